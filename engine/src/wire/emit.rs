//! Frames towards the VM, built in place.
//!
//! A host datagram is received into a buffer at offset [`HEADROOM`] or later; the Ethernet,
//! IPv4 and UDP (or ICMP echo) headers are then written into the bytes just in front of the
//! payload, so the payload is never copied. The headers are assembled by value (a 42-byte
//! struct on the stack), checksummed, and stored with one bounds-checked write.
use core::net::Ipv4Addr;
use core::ops::Range;

use zerocopy::network_endian::U16;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::eth::{EtherType, EthernetHeader, Mac};
use super::icmp::{self, IcmpEchoHeader, IcmpType};
use super::ipv4::{IpProtocol, Ipv4Header};
use super::udp::{self, UdpHeader};
use crate::filter::DropReason;

/// Bytes needed in front of a payload: Ethernet (14) + IPv4 (20) + UDP or ICMP echo (8).
pub const HEADROOM: usize = EthernetHeader::LEN + Ipv4Header::LEN + UdpHeader::LEN;

/// TTL of the packets the gateway hands to the VM.
pub const TTL: u8 = 64;

/// Ethernet + IPv4 + UDP headers of one frame.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct UdpFrameHeaders {
    eth: EthernetHeader,
    ip: Ipv4Header,
    udp: UdpHeader,
}
const _: () = assert!(size_of::<UdpFrameHeaders>() == HEADROOM);

/// Ethernet + IPv4 + ICMP echo headers of one frame.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
struct IcmpFrameHeaders {
    eth: EthernetHeader,
    ip: Ipv4Header,
    icmp: IcmpEchoHeader,
}
const _: () = assert!(size_of::<IcmpFrameHeaders>() == HEADROOM);

/// Link and network addressing of a frame towards the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameAddrs {
    /// The VM's MAC (destination).
    pub dst_mac: Mac,
    /// The gateway's MAC (source).
    pub src_mac: Mac,
    /// The remote peer's address (source).
    pub src_ip: Ipv4Addr,
    /// The VM's address (destination).
    pub dst_ip: Ipv4Addr,
}

/// Splits `buf` around `payload` and returns (headroom slot, payload bytes) or a reason.
fn split_for_headers(buf: &mut [u8], payload: &Range<usize>) -> Result<(usize, Range<usize>), DropReason> {
    let start = payload.start.checked_sub(HEADROOM).ok_or(DropReason::InboundNoHeadroom)?;
    if payload.end < payload.start || payload.end > buf.len() {
        return Err(DropReason::InboundNoHeadroom);
    }
    Ok((start, start..payload.end))
}

/// The transport length (an 8-byte header plus `data_len`) if the IPv4 packet still fits its
/// 16-bit total length.
fn transport_len(data_len: usize) -> Result<u16, DropReason> {
    u16::try_from(data_len + UdpHeader::LEN)
        .ok()
        .filter(|l| usize::from(*l) + Ipv4Header::LEN <= usize::from(u16::MAX))
        .ok_or(DropReason::InboundTooBig)
}

/// Stores `headers` (exactly `HEADROOM` bytes) at `buf[start..payload_start]`.
fn store(
    buf: &mut [u8],
    start: usize,
    payload_start: usize,
    headers: &(impl IntoBytes + Immutable),
) -> Result<(), DropReason> {
    let slot = buf.get_mut(start..payload_start).ok_or(DropReason::InboundNoHeadroom)?;
    headers.write_to(slot).map_err(|_| DropReason::InboundNoHeadroom)
}

/// Writes Ethernet/IPv4/UDP headers in front of `buf[payload]` and returns the frame's range
/// in `buf`. The UDP checksum is computed over the payload in place.
pub fn emit_udp(
    buf: &mut [u8],
    payload: Range<usize>,
    addrs: &FrameAddrs,
    src_port: u16,
    dst_port: u16,
) -> Result<Range<usize>, DropReason> {
    let (start, frame) = split_for_headers(buf, &payload)?;
    let data = buf.get(payload.clone()).ok_or(DropReason::InboundNoHeadroom)?;
    let udp_len = transport_len(data.len())?;
    let mut udp_hdr = UdpHeader {
        src_port: U16::new(src_port),
        dst_port: U16::new(dst_port),
        len: U16::new(udp_len),
        checksum: U16::new(0),
    };
    udp_hdr.checksum = U16::new(udp::checksum(addrs.src_ip, addrs.dst_ip, &udp_hdr, data));
    let headers = UdpFrameHeaders {
        eth: EthernetHeader::new(addrs.dst_mac, addrs.src_mac, EtherType::Ipv4),
        ip: Ipv4Header::new(addrs.src_ip, addrs.dst_ip, IpProtocol::Udp, udp_len, TTL),
        udp: udp_hdr,
    };
    store(buf, start, payload.start, &headers)?;
    Ok(frame)
}

/// Writes Ethernet/IPv4/ICMP echo reply headers in front of the echo data `buf[data]` and
/// returns the frame's range in `buf`.
pub fn emit_icmp_echo_reply(
    buf: &mut [u8],
    data: Range<usize>,
    addrs: &FrameAddrs,
    ident: u16,
    seq: u16,
) -> Result<Range<usize>, DropReason> {
    let (start, frame) = split_for_headers(buf, &data)?;
    let bytes = buf.get(data.clone()).ok_or(DropReason::InboundNoHeadroom)?;
    let icmp_len = transport_len(bytes.len())?;
    let mut icmp_hdr = IcmpEchoHeader {
        kind: IcmpType::EchoReply.into(),
        code: 0,
        checksum: U16::new(0),
        ident: U16::new(ident),
        seq: U16::new(seq),
    };
    icmp_hdr.checksum = U16::new(icmp::checksum(&icmp_hdr, bytes));
    let headers = IcmpFrameHeaders {
        eth: EthernetHeader::new(addrs.dst_mac, addrs.src_mac, EtherType::Ipv4),
        ip: Ipv4Header::new(addrs.src_ip, addrs.dst_ip, IpProtocol::Icmp, icmp_len, TTL),
        icmp: icmp_hdr,
    };
    store(buf, start, data.start, &headers)?;
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{csum, Ipv4Packet};

    fn addrs() -> FrameAddrs {
        FrameAddrs {
            dst_mac: Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            src_mac: Mac([2, 0, 0, 0, 0, 1]),
            src_ip: Ipv4Addr::new(203, 0, 113, 7),
            dst_ip: Ipv4Addr::new(10, 0, 2, 15),
        }
    }

    #[test]
    fn udp_headers_land_in_front_of_the_payload() {
        let mut buf = [0u8; 128];
        buf[50..55].copy_from_slice(b"hello");
        let r = emit_udp(&mut buf, 50..55, &addrs(), 51820, 40000).unwrap();
        assert_eq!(r, 8..55);
        let frame = &buf[r];
        let (eth, rest) = EthernetHeader::parse(frame).unwrap();
        assert_eq!((eth.dst, eth.src, eth.ethertype()), (addrs().dst_mac, addrs().src_mac, EtherType::Ipv4));
        let ip = Ipv4Packet::parse(rest).unwrap();
        assert!(ip.checksum_ok());
        assert_eq!((ip.src(), ip.dst(), ip.ttl()), (addrs().src_ip, addrs().dst_ip, TTL));
        assert_eq!(ip.ports(), Some((51820, 40000)));
        assert_eq!(ip.udp_payload(), Some(&b"hello"[..]));
        let (h, p) = UdpHeader::parse(ip.payload()).unwrap();
        assert!(h.checksum.get() != 0 && udp::checksum_ok(ip.src(), ip.dst(), h, p));
    }

    #[test]
    fn icmp_reply_in_place() {
        let mut buf = [0u8; 100];
        buf[42..46].copy_from_slice(b"ping");
        let r = emit_icmp_echo_reply(&mut buf, 42..46, &addrs(), 7, 9).unwrap();
        assert_eq!(r, 0..46);
        let ip = Ipv4Packet::parse(&buf[14..46]).unwrap();
        assert!(ip.checksum_ok());
        assert_eq!(ip.protocol(), IpProtocol::Icmp);
        assert!(csum::verifies(ip.payload()));
        let (h, d) = IcmpEchoHeader::parse(ip.payload()).unwrap();
        assert!(h.is_echo(IcmpType::EchoReply));
        assert_eq!((h.ident.get(), h.seq.get(), d), (7, 9, &b"ping"[..]));
    }

    #[test]
    fn refuses_missing_headroom_and_bad_ranges() {
        let mut buf = [0u8; 64];
        assert_eq!(emit_udp(&mut buf, 41..50, &addrs(), 1, 2), Err(DropReason::InboundNoHeadroom));
        assert_eq!(emit_udp(&mut buf, 42..65, &addrs(), 1, 2), Err(DropReason::InboundNoHeadroom));
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = 50..45;
        assert_eq!(emit_udp(&mut buf, backwards, &addrs(), 1, 2), Err(DropReason::InboundNoHeadroom));
        assert_eq!(emit_udp(&mut buf, 42..42, &addrs(), 1, 2), Ok(0..42));
        let mut big = vec![0u8; 70_000];
        assert_eq!(emit_udp(&mut big, 42..65_600, &addrs(), 1, 2), Err(DropReason::InboundTooBig));
    }
}
