//! IPv4 header view (RFC 791).
//!
//! [`Ipv4Packet::parse`] checks every length field once: IHL >= 5, IHL <= total length, total
//! length <= the bytes present. Afterwards no accessor can panic. Trailing bytes past the total
//! length (Ethernet padding) are cut off. Options are accepted and skipped; the engine never
//! acts on them, since it re-originates every forwarded payload from a host socket.
use core::net::Ipv4Addr;

use zerocopy::network_endian::U16;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::csum;
use crate::filter::DropReason;

/// IP protocol numbers the engine tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpProtocol {
    /// 1
    Icmp,
    /// 6
    Tcp,
    /// 17
    Udp,
    /// Anything else.
    Unknown(u8),
}

impl From<u8> for IpProtocol {
    fn from(v: u8) -> Self {
        match v {
            1 => IpProtocol::Icmp,
            6 => IpProtocol::Tcp,
            17 => IpProtocol::Udp,
            o => IpProtocol::Unknown(o),
        }
    }
}

impl From<IpProtocol> for u8 {
    fn from(p: IpProtocol) -> u8 {
        match p {
            IpProtocol::Icmp => 1,
            IpProtocol::Tcp => 6,
            IpProtocol::Udp => 17,
            IpProtocol::Unknown(v) => v,
        }
    }
}

/// The fixed 20-byte part of an IPv4 header.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct Ipv4Header {
    /// Version (high nibble) and IHL in 32-bit words (low nibble).
    pub ver_ihl: u8,
    /// DSCP and ECN.
    pub tos: u8,
    /// Total length of header and payload.
    pub total_len: U16,
    /// Identification.
    pub ident: U16,
    /// Flags (3 bits) and fragment offset (13 bits, in 8-byte units).
    pub flags_frag: U16,
    /// Time to live.
    pub ttl: u8,
    /// Transport protocol.
    pub protocol: u8,
    /// Header checksum.
    pub checksum: U16,
    /// Source address.
    pub src: [u8; 4],
    /// Destination address.
    pub dst: [u8; 4],
}
const _: () = assert!(size_of::<Ipv4Header>() == Ipv4Header::LEN);

impl Ipv4Header {
    /// Length of the header without options.
    pub const LEN: usize = 20;
    /// The "don't fragment" flag in `flags_frag`.
    pub const DONT_FRAGMENT: u16 = 0x4000;
    /// The "more fragments" flag in `flags_frag`.
    pub const MORE_FRAGMENTS: u16 = 0x2000;

    /// A header without options, checksum filled in, "don't fragment" set.
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, protocol: IpProtocol, payload_len: u16, ttl: u8) -> Self {
        let mut h = Self {
            ver_ihl: 0x45,
            tos: 0,
            total_len: U16::new(payload_len.saturating_add(20)),
            ident: U16::new(0),
            flags_frag: U16::new(Self::DONT_FRAGMENT),
            ttl,
            protocol: protocol.into(),
            checksum: U16::new(0),
            src: src.octets(),
            dst: dst.octets(),
        };
        h.checksum = U16::new(csum::checksum(h.as_bytes()));
        h
    }

    /// IP version (4 for a valid packet).
    pub fn version(&self) -> u8 {
        self.ver_ihl >> 4
    }

    /// Header length in bytes, from the IHL field (not yet validated here).
    pub fn header_len(&self) -> usize {
        usize::from(self.ver_ihl & 0x0f) * 4
    }
}

/// A parsed IPv4 packet: header, options and payload, all within the checked total length.
#[derive(Debug, Clone, Copy)]
pub struct Ipv4Packet<'a> {
    header: &'a Ipv4Header,
    options: &'a [u8],
    payload: &'a [u8],
}

impl<'a> Ipv4Packet<'a> {
    /// Parses and length-checks `bytes`. Does not verify the checksum ([`Self::checksum_ok`]).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, DropReason> {
        let (header, rest) = Ipv4Header::ref_from_prefix(bytes).map_err(|_| DropReason::Ipv4Truncated)?;
        if header.version() != 4 {
            return Err(DropReason::Ipv4BadVersion);
        }
        let header_len = header.header_len();
        if header_len < Ipv4Header::LEN {
            return Err(DropReason::Ipv4BadIhl);
        }
        let total_len = usize::from(header.total_len.get());
        if total_len < header_len {
            return Err(DropReason::Ipv4BadIhl);
        }
        if total_len > bytes.len() {
            return Err(DropReason::Ipv4BadTotalLen);
        }
        let after_fixed = rest.get(..total_len - Ipv4Header::LEN).ok_or(DropReason::Ipv4BadTotalLen)?;
        let (options, payload) =
            after_fixed.split_at_checked(header_len - Ipv4Header::LEN).ok_or(DropReason::Ipv4BadIhl)?;
        Ok(Self { header, options, payload })
    }

    /// The fixed header.
    pub fn header(&self) -> &'a Ipv4Header {
        self.header
    }

    /// Header length including options, in bytes (20 to 60).
    pub fn header_len(&self) -> usize {
        Ipv4Header::LEN + self.options.len()
    }

    /// Total length (header and payload), as checked.
    pub fn total_len(&self) -> usize {
        self.header_len() + self.payload.len()
    }

    /// The option bytes (possibly empty).
    pub fn options(&self) -> &'a [u8] {
        self.options
    }

    /// The transport payload, cut to the total length.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// Source address.
    pub fn src(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.header.src)
    }

    /// Destination address.
    pub fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.header.dst)
    }

    /// Transport protocol.
    pub fn protocol(&self) -> IpProtocol {
        IpProtocol::from(self.header.protocol)
    }

    /// Time to live.
    pub fn ttl(&self) -> u8 {
        self.header.ttl
    }

    /// True for any fragment: "more fragments" set or a non-zero offset.
    pub fn is_fragment(&self) -> bool {
        self.header.flags_frag.get() & (Ipv4Header::MORE_FRAGMENTS | 0x1fff) != 0
    }

    /// True when the header checksum (options included) verifies.
    pub fn checksum_ok(&self) -> bool {
        let mut c = csum::Checksum::new();
        c.add(self.header.as_bytes()).add(self.options);
        c.fold() == 0xffff
    }

    /// Source and destination ports for UDP and TCP, when the transport header is present and
    /// the packet is not a fragment. `None` otherwise.
    pub fn ports(&self) -> Option<(u16, u16)> {
        if self.is_fragment() {
            return None;
        }
        match self.protocol() {
            IpProtocol::Udp => {
                super::udp::UdpHeader::parse(self.payload).ok().map(|(h, _)| (h.src_port.get(), h.dst_port.get()))
            }
            IpProtocol::Tcp => {
                super::tcp::TcpHeader::parse(self.payload).ok().map(|h| (h.src_port.get(), h.dst_port.get()))
            }
            _ => None,
        }
    }

    /// Destination port for UDP and TCP (see [`Self::ports`]).
    pub fn dst_port(&self) -> Option<u16> {
        self.ports().map(|(_, d)| d)
    }

    /// The UDP payload, if this is a complete UDP datagram.
    pub fn udp_payload(&self) -> Option<&'a [u8]> {
        if self.is_fragment() || self.protocol() != IpProtocol::Udp {
            return None;
        }
        super::udp::UdpHeader::parse(self.payload).ok().map(|(_, p)| p)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// 10.0.2.15:40000 -> 203.0.113.7:51820, UDP, payload "hello" (28 + 5 bytes).
    pub(crate) fn udp_packet() -> Vec<u8> {
        let payload = b"hello";
        let ip =
            Ipv4Header::new(Ipv4Addr::new(10, 0, 2, 15), Ipv4Addr::new(203, 0, 113, 7), IpProtocol::Udp, 8 + 5, 64);
        let mut v = ip.as_bytes().to_vec();
        v.extend_from_slice(&[0x9c, 0x40, 0xca, 0x6c, 0x00, 0x0d, 0x00, 0x00]);
        v.extend_from_slice(payload);
        v
    }

    // 10.0.2.15:50000 -> 192.168.1.1:443, TCP SYN, hand-made, checksum valid.
    static TCP_SYN: [u8; 40] = [
        0x45, 0x00, 0x00, 0x28, 0x00, 0x01, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00, 10, 0, 2, 15, 192, 168, 1, 1, 0xc3,
        0x50, 0x01, 0xbb, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
    ];

    fn with_checksum(mut b: Vec<u8>) -> Vec<u8> {
        let hl = usize::from(b[0] & 0x0f) * 4;
        b[10] = 0;
        b[11] = 0;
        let c = csum::checksum(&b[..hl]);
        b[10..12].copy_from_slice(&c.to_be_bytes());
        b
    }

    /// seed: testParseValidUDPPacket
    #[test]
    fn parse_valid_udp_packet() {
        let b = udp_packet();
        let p = Ipv4Packet::parse(&b).unwrap();
        assert_eq!(p.src(), Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(p.dst(), Ipv4Addr::new(203, 0, 113, 7));
        assert_eq!(p.protocol(), IpProtocol::Udp);
        assert_eq!(u8::from(p.protocol()), 17);
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.total_len(), 33);
        assert_eq!(p.ttl(), 64);
        assert!(p.checksum_ok());
        assert!(!p.is_fragment());
    }

    /// seed: testParseValidTCPPacket
    #[test]
    fn parse_valid_tcp_packet() {
        let b = with_checksum(TCP_SYN.to_vec());
        let p = Ipv4Packet::parse(&b).unwrap();
        assert_eq!(p.src(), Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(p.dst(), Ipv4Addr::new(192, 168, 1, 1));
        assert_eq!(p.protocol(), IpProtocol::Tcp);
        assert_eq!(u8::from(p.protocol()), 6);
        assert!(p.checksum_ok());
    }

    /// seed: testParseICMPPacket
    #[test]
    fn parse_icmp_packet() {
        let ip = Ipv4Header::new(Ipv4Addr::new(10, 0, 2, 15), Ipv4Addr::new(8, 8, 8, 8), IpProtocol::Icmp, 8, 64);
        let mut b = ip.as_bytes().to_vec();
        b.extend_from_slice(&[8, 0, 0xf7, 0xfe, 0, 1, 0, 0]);
        let p = Ipv4Packet::parse(&b).unwrap();
        assert_eq!(p.protocol(), IpProtocol::Icmp);
        assert_eq!(u8::from(p.protocol()), 1);
        assert_eq!(p.payload().len(), 8);
        assert_eq!(p.dst_port(), None);
    }

    /// seed: testParseWithIPOptions
    #[test]
    fn parse_with_ip_options() {
        // IHL 6: one 4-byte option word (NOP NOP NOP EOL) before the UDP header.
        let mut b = udp_packet();
        b[0] = 0x46;
        b.splice(20..20, [1u8, 1, 1, 0]);
        let total = u16::try_from(b.len()).unwrap();
        b[2..4].copy_from_slice(&total.to_be_bytes());
        let b = with_checksum(b);
        let p = Ipv4Packet::parse(&b).unwrap();
        assert_eq!(p.header_len(), 24);
        assert_eq!(p.options(), &[1, 1, 1, 0]);
        assert!(p.checksum_ok());
        assert_eq!(p.dst_port(), Some(51820));
        assert_eq!(p.udp_payload(), Some(&b"hello"[..]));
    }

    /// seed: testParseTruncatedHeader
    #[test]
    fn parse_truncated_header() {
        let b = udp_packet();
        for len in 0..20 {
            assert_eq!(Ipv4Packet::parse(&b[..len]).unwrap_err(), DropReason::Ipv4Truncated, "len {len}");
        }
        // A whole header whose total length runs past the bytes present.
        assert_eq!(Ipv4Packet::parse(&b[..25]).unwrap_err(), DropReason::Ipv4BadTotalLen);
    }

    /// seed: testParseInvalidHeaderLength
    #[test]
    fn parse_invalid_header_length() {
        let b = udp_packet();
        for ihl in 0..5u8 {
            let mut x = b.clone();
            x[0] = 0x40 | ihl;
            assert_eq!(Ipv4Packet::parse(&x).unwrap_err(), DropReason::Ipv4BadIhl, "ihl {ihl}");
        }
        // IHL 15 (60 bytes) is more than the total length of 33.
        let mut x = b.clone();
        x[0] = 0x4f;
        assert_eq!(Ipv4Packet::parse(&x).unwrap_err(), DropReason::Ipv4BadIhl);
        // Total length below the header length.
        let mut x = b;
        x[2..4].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(Ipv4Packet::parse(&x).unwrap_err(), DropReason::Ipv4BadIhl);
    }

    #[test]
    fn bad_version_and_checksum() {
        let mut b = udp_packet();
        b[0] = 0x65;
        assert_eq!(Ipv4Packet::parse(&b).unwrap_err(), DropReason::Ipv4BadVersion);
        let mut b = udp_packet();
        b[8] = 63; // TTL changed, checksum not updated
        assert!(!Ipv4Packet::parse(&b).unwrap().checksum_ok());
    }

    #[test]
    fn padding_past_total_length_is_cut() {
        let mut b = udp_packet();
        b.extend_from_slice(&[0; 13]);
        let p = Ipv4Packet::parse(&b).unwrap();
        assert_eq!(p.total_len(), 33);
        assert_eq!(p.udp_payload(), Some(&b"hello"[..]));
    }

    #[test]
    fn fragments_have_no_ports() {
        for ff in [Ipv4Header::MORE_FRAGMENTS, 1, 0x1fff, Ipv4Header::MORE_FRAGMENTS | 3] {
            let mut b = udp_packet();
            b[6..8].copy_from_slice(&ff.to_be_bytes());
            let p = Ipv4Packet::parse(&b).unwrap();
            assert!(p.is_fragment(), "{ff:#x}");
            assert_eq!(p.ports(), None);
            assert_eq!(p.udp_payload(), None);
        }
    }

    /// seed: testDestinationPortUDP
    #[test]
    fn destination_port_udp() {
        let b = udp_packet();
        let p = Ipv4Packet::parse(&b).unwrap();
        assert_eq!(p.dst_port(), Some(51820));
        assert_eq!(p.ports(), Some((40000, 51820)));
    }

    /// seed: testDestinationPortTCP
    #[test]
    fn destination_port_tcp() {
        let b = with_checksum(TCP_SYN.to_vec());
        let p = Ipv4Packet::parse(&b).unwrap();
        assert_eq!(p.dst_port(), Some(443));
        assert_eq!(p.ports(), Some((50000, 443)));
    }

    /// seed: testUDPPayloadExtraction
    #[test]
    fn udp_payload_extraction() {
        let b = udp_packet();
        let p = Ipv4Packet::parse(&b).unwrap();
        let payload = p.udp_payload().unwrap();
        assert_eq!(payload, b"hello");
        // The payload is a view into the packet at offset 28, not a copy.
        assert_eq!(payload.as_ptr(), b[28..].as_ptr());
    }
}
