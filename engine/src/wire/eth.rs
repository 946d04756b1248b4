//! Ethernet II header view.
//!
//! Frames arrive as QEMU and Virtualization.framework hand them over: no preamble, no FCS, no
//! padding guarantee. Does not support 802.1Q tags: a tagged frame reports its ethertype as
//! `Unknown(0x8100)` and is dropped as non-IP.
use core::fmt;
use core::str::FromStr;

use zerocopy::network_endian::U16;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::filter::DropReason;

/// A 48-bit MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(transparent)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: Mac = Mac([0xff; 6]);

    /// True for the broadcast address.
    pub fn is_broadcast(self) -> bool {
        self == Self::BROADCAST
    }

    /// True for group addresses (the I/G bit), which includes broadcast.
    pub fn is_multicast(self) -> bool {
        self.0[0] & 1 == 1
    }

    /// True for a usable station address: not a group address and not all zeros.
    pub fn is_unicast(self) -> bool {
        !self.is_multicast() && self.0 != [0; 6]
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A MAC address that is not six colon-separated hex octets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacParseError;

impl fmt::Display for MacParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a MAC address is six hex octets separated by ':' (52:54:00:12:34:56)")
    }
}

impl std::error::Error for MacParseError {}

impl FromStr for Mac {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in &mut out {
            let p = parts.next().ok_or(MacParseError)?;
            if p.is_empty() || p.len() > 2 {
                return Err(MacParseError);
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| MacParseError)?;
        }
        if parts.next().is_some() {
            return Err(MacParseError);
        }
        Ok(Mac(out))
    }
}

/// The ethertypes the engine tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtherType {
    /// 0x0800
    Ipv4,
    /// 0x0806
    Arp,
    /// 0x86DD
    Ipv6,
    /// Anything else, kept for counters and logs.
    Unknown(u16),
}

impl From<u16> for EtherType {
    fn from(v: u16) -> Self {
        match v {
            0x0800 => EtherType::Ipv4,
            0x0806 => EtherType::Arp,
            0x86dd => EtherType::Ipv6,
            other => EtherType::Unknown(other),
        }
    }
}

impl From<EtherType> for u16 {
    fn from(t: EtherType) -> u16 {
        match t {
            EtherType::Ipv4 => 0x0800,
            EtherType::Arp => 0x0806,
            EtherType::Ipv6 => 0x86dd,
            EtherType::Unknown(v) => v,
        }
    }
}

/// The 14-byte Ethernet II header.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct EthernetHeader {
    /// Destination MAC.
    pub dst: Mac,
    /// Source MAC.
    pub src: Mac,
    /// Ethertype, network order.
    pub ethertype: U16,
}
const _: () = assert!(size_of::<EthernetHeader>() == EthernetHeader::LEN);

impl EthernetHeader {
    /// Header length in bytes.
    pub const LEN: usize = 14;

    /// Builds a header.
    pub fn new(dst: Mac, src: Mac, ethertype: EtherType) -> Self {
        Self { dst, src, ethertype: U16::new(ethertype.into()) }
    }

    /// Splits a frame into its header and payload. Never panics.
    pub fn parse(frame: &[u8]) -> Result<(&Self, &[u8]), DropReason> {
        Self::ref_from_prefix(frame).map_err(|_| DropReason::EthTruncated)
    }

    /// The ethertype, classified.
    pub fn ethertype(&self) -> EtherType {
        EtherType::from(self.ethertype.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 52:54:00:12:34:56 -> 02:00:00:00:00:01, IPv4, then 4 payload bytes.
    static IPV4_FRAME: [u8; 18] =
        [0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x08, 0x00, 0xde, 0xad, 0xbe, 0xef];
    static ARP_FRAME_HEAD: [u8; 14] =
        [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x08, 0x06];
    static IPV6_FRAME_HEAD: [u8; 14] =
        [0x33, 0x33, 0x00, 0x00, 0x00, 0x16, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x86, 0xdd];

    /// seed: testParseValidIPv4Frame
    #[test]
    fn parse_valid_ipv4_frame() {
        let (h, payload) = EthernetHeader::parse(&IPV4_FRAME).unwrap();
        assert_eq!(h.dst, Mac([2, 0, 0, 0, 0, 1]));
        assert_eq!(h.src, Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(h.ethertype(), EtherType::Ipv4);
        assert_eq!(h.ethertype.get(), 0x0800);
        assert_eq!(payload, &[0xde, 0xad, 0xbe, 0xef]);
    }

    /// seed: testParseValidARPFrame
    #[test]
    fn parse_valid_arp_frame() {
        let (h, _) = EthernetHeader::parse(&ARP_FRAME_HEAD).unwrap();
        assert_eq!(h.ethertype(), EtherType::Arp);
        assert_eq!(h.ethertype.get(), 0x0806);
        assert!(h.dst.is_broadcast());
    }

    /// seed: testParseIPv6Frame
    #[test]
    fn parse_ipv6_frame() {
        let (h, _) = EthernetHeader::parse(&IPV6_FRAME_HEAD).unwrap();
        assert_eq!(h.ethertype(), EtherType::Ipv6);
        assert_eq!(h.ethertype.get(), 0x86dd);
        assert!(h.dst.is_multicast() && !h.dst.is_broadcast());
    }

    /// seed: testParseTruncatedFrame
    #[test]
    fn parse_truncated_frame() {
        for len in 0..EthernetHeader::LEN {
            assert_eq!(EthernetHeader::parse(&IPV4_FRAME[..len]).unwrap_err(), DropReason::EthTruncated);
        }
    }

    /// seed: testParseEmptyPayload
    #[test]
    fn parse_empty_payload() {
        let (h, payload) = EthernetHeader::parse(&IPV4_FRAME[..14]).unwrap();
        assert_eq!(h.ethertype(), EtherType::Ipv4);
        assert!(payload.is_empty());
    }

    /// seed: testRoundTrip
    #[test]
    fn round_trip() {
        let (h, payload) = EthernetHeader::parse(&IPV4_FRAME).unwrap();
        let rebuilt = EthernetHeader::new(h.dst, h.src, h.ethertype());
        let mut out = rebuilt.as_bytes().to_vec();
        out.extend_from_slice(payload);
        assert_eq!(out, IPV4_FRAME);
        // Unknown ethertypes survive the trip too.
        let odd = EthernetHeader::new(Mac::BROADCAST, Mac([2; 6]), EtherType::Unknown(0x88b5));
        let (back, _) = EthernetHeader::parse(odd.as_bytes()).unwrap();
        assert_eq!(back.ethertype(), EtherType::Unknown(0x88b5));
    }

    /// seed: testMACAddressExtraction
    #[test]
    fn mac_address_extraction() {
        let cases: [[u8; 6]; 4] =
            [[0, 0, 0, 0, 0, 0], [0xff; 6], [0x01, 0x00, 0x5e, 0x7f, 0xff, 0xfa], [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x0f]];
        for dst in cases {
            for src in cases {
                let h = EthernetHeader::new(Mac(dst), Mac(src), EtherType::Ipv4);
                let (p, _) = EthernetHeader::parse(h.as_bytes()).unwrap();
                assert_eq!(p.dst.0, dst);
                assert_eq!(p.src.0, src);
            }
        }
        assert_eq!(Mac([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x0f]).to_string(), "aa:bb:cc:dd:ee:0f");
    }

    #[test]
    fn mac_parse_and_classes() {
        assert_eq!("52:54:00:12:34:56".parse::<Mac>().unwrap(), Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        for bad in ["", "52:54:00:12:34", "52:54:00:12:34:56:78", "52:54:00:12:34:zz", "525:4:00:12:34:56"] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
        assert!(Mac([0x52, 0, 0, 0, 0, 1]).is_unicast());
        assert!(!Mac([0; 6]).is_unicast());
        assert!(Mac([0x01, 0, 0x5e, 0, 0, 1]).is_multicast());
    }
}
