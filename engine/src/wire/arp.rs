//! ARP for IPv4 over Ethernet (RFC 826): the request view and the reply the gateway sends.
//!
//! Does not support other hardware or protocol types: they are malformed here.
use core::net::Ipv4Addr;

use zerocopy::network_endian::U16;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::eth::{EtherType, EthernetHeader, Mac};
use crate::filter::DropReason;

/// ARP operation codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArpOp {
    /// 1
    Request,
    /// 2
    Reply,
    /// Anything else.
    Unknown(u16),
}

impl From<u16> for ArpOp {
    fn from(v: u16) -> Self {
        match v {
            1 => ArpOp::Request,
            2 => ArpOp::Reply,
            o => ArpOp::Unknown(o),
        }
    }
}

/// The 28-byte ARP packet for IPv4 over Ethernet.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct ArpPacket {
    /// Hardware type (1 = Ethernet).
    pub htype: U16,
    /// Protocol type (0x0800 = IPv4).
    pub ptype: U16,
    /// Hardware address length (6).
    pub hlen: u8,
    /// Protocol address length (4).
    pub plen: u8,
    /// Operation.
    pub oper: U16,
    /// Sender hardware address.
    pub sha: Mac,
    /// Sender protocol address.
    pub spa: [u8; 4],
    /// Target hardware address.
    pub tha: Mac,
    /// Target protocol address.
    pub tpa: [u8; 4],
}
const _: () = assert!(size_of::<ArpPacket>() == ArpPacket::LEN);

impl ArpPacket {
    /// Packet length in bytes.
    pub const LEN: usize = 28;

    /// Views an Ethernet payload as IPv4-over-Ethernet ARP. Trailing padding is ignored.
    pub fn parse(bytes: &[u8]) -> Result<&Self, DropReason> {
        let (p, _padding) = Self::ref_from_prefix(bytes).map_err(|_| DropReason::ArpMalformed)?;
        if p.htype.get() != 1 || p.ptype.get() != 0x0800 || p.hlen != 6 || p.plen != 4 {
            return Err(DropReason::ArpMalformed);
        }
        Ok(p)
    }

    /// The operation.
    pub fn op(&self) -> ArpOp {
        ArpOp::from(self.oper.get())
    }

    /// Sender IP.
    pub fn sender_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.spa)
    }

    /// Target IP.
    pub fn target_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.tpa)
    }
}

/// A complete ARP reply frame (Ethernet + ARP, 42 bytes), built by value so it cannot fail.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct ArpReplyFrame {
    /// Ethernet header.
    pub eth: EthernetHeader,
    /// ARP reply.
    pub arp: ArpPacket,
}
const _: () = assert!(size_of::<ArpReplyFrame>() == ArpReplyFrame::LEN);

impl ArpReplyFrame {
    /// Frame length in bytes (unpadded, as virtual NICs accept).
    pub const LEN: usize = EthernetHeader::LEN + ArpPacket::LEN;

    /// "`ip` is at `mac`", sent to the asker at `to_mac`/`to_ip`.
    pub fn new(mac: Mac, ip: Ipv4Addr, to_mac: Mac, to_ip: Ipv4Addr) -> Self {
        Self {
            eth: EthernetHeader::new(to_mac, mac, EtherType::Arp),
            arp: ArpPacket {
                htype: U16::new(1),
                ptype: U16::new(0x0800),
                hlen: 6,
                plen: 4,
                oper: U16::new(2),
                sha: mac,
                spa: ip.octets(),
                tha: to_mac,
                tpa: to_ip.octets(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Who has 10.0.2.2? Tell 10.0.2.15 (from 52:54:00:12:34:56), as a guest sends it.
    pub(crate) static REQUEST: [u8; 28] = [
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 10, 0, 2, 15, 0, 0, 0, 0,
        0, 0, 10, 0, 2, 2,
    ];

    #[test]
    fn parses_a_request() {
        let p = ArpPacket::parse(&REQUEST).unwrap();
        assert_eq!(p.op(), ArpOp::Request);
        assert_eq!(p.sender_ip(), Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(p.target_ip(), Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(p.sha, Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
    }

    #[test]
    fn rejects_other_types_and_truncation() {
        for len in 0..ArpPacket::LEN {
            assert_eq!(ArpPacket::parse(&REQUEST[..len]).unwrap_err(), DropReason::ArpMalformed);
        }
        for (i, v) in [(1, 0x06u8), (3, 0x01), (4, 8), (5, 16)] {
            let mut p = REQUEST;
            p[i] = v;
            assert_eq!(ArpPacket::parse(&p).unwrap_err(), DropReason::ArpMalformed, "byte {i}");
        }
    }

    #[test]
    fn reply_frame_layout() {
        let gw = Mac([2, 0, 0, 0, 0, 1]);
        let vm = Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let f = ArpReplyFrame::new(gw, Ipv4Addr::new(10, 0, 2, 2), vm, Ipv4Addr::new(10, 0, 2, 15));
        let bytes = f.as_bytes();
        assert_eq!(bytes.len(), 42);
        let (eth, rest) = EthernetHeader::parse(bytes).unwrap();
        assert_eq!((eth.dst, eth.src, eth.ethertype()), (vm, gw, EtherType::Arp));
        let arp = ArpPacket::parse(rest).unwrap();
        assert_eq!(arp.op(), ArpOp::Reply);
        assert_eq!((arp.sha, arp.sender_ip()), (gw, Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!((arp.tha, arp.target_ip()), (vm, Ipv4Addr::new(10, 0, 2, 15)));
    }
}
