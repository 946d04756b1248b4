//! Zero-copy views of the headers the engine reads and writes.
//!
//! One file per protocol. Every view is a `#[repr(C)]`, `Unaligned` zerocopy struct with
//! network-endian fields and a compile-time size assert. Parsers check each length field once
//! and return a [`DropReason`](crate::filter::DropReason) on bad input; after a successful
//! parse no accessor can panic. Nothing in here allocates or does I/O.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod arp;
pub mod csum;
pub mod dhcp;
pub mod emit;
pub mod eth;
pub mod icmp;
pub mod ipv4;
pub mod tcp;
pub mod udp;

pub use arp::{ArpOp, ArpPacket, ArpReplyFrame};
pub use dhcp::{DhcpReply, DhcpRequest, MessageType as DhcpMessage};
pub use emit::{emit_icmp_echo_reply, emit_udp, FrameAddrs, HEADROOM};
pub use eth::{EtherType, EthernetHeader, Mac};
pub use icmp::{IcmpEchoHeader, IcmpType};
pub use ipv4::{IpProtocol, Ipv4Header, Ipv4Packet};
pub use tcp::TcpHeader;
pub use udp::UdpHeader;
