//! UDP header view (RFC 768).
//!
//! Parsing does not verify the checksum: a forwarded payload is re-sent from a host socket,
//! whose kernel computes a fresh one, and WireGuard authenticates its own payload anyway.
//! [`checksum`] is here for the frames the engine builds towards the VM.
use core::net::Ipv4Addr;

use zerocopy::network_endian::U16;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::csum::Checksum;
use crate::filter::DropReason;

/// The 8-byte UDP header.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct UdpHeader {
    /// Source port.
    pub src_port: U16,
    /// Destination port.
    pub dst_port: U16,
    /// Length of header and payload.
    pub len: U16,
    /// Checksum over the pseudo-header, header and payload (0: none).
    pub checksum: U16,
}
const _: () = assert!(size_of::<UdpHeader>() == UdpHeader::LEN);

impl UdpHeader {
    /// Header length in bytes.
    pub const LEN: usize = 8;

    /// Splits `bytes` into header and declared payload (bytes past the UDP length are
    /// dropped). Never panics.
    pub fn parse(bytes: &[u8]) -> Result<(&Self, &[u8]), DropReason> {
        let (hdr, rest) = Self::ref_from_prefix(bytes).map_err(|_| DropReason::UdpTruncated)?;
        let payload_len = usize::from(hdr.len.get()).checked_sub(Self::LEN).ok_or(DropReason::UdpBadLength)?;
        let payload = rest.get(..payload_len).ok_or(DropReason::UdpBadLength)?;
        Ok((hdr, payload))
    }
}

/// The UDP checksum for `header` (its checksum field is ignored) and `payload` between `src`
/// and `dst`. Returns 0xffff where the sum is zero, as RFC 768 asks.
pub fn checksum(src: Ipv4Addr, dst: Ipv4Addr, header: &UdpHeader, payload: &[u8]) -> u16 {
    let mut h = *header;
    h.checksum = U16::new(0);
    let c = Checksum::new()
        .add_pseudo_header(src.octets(), dst.octets(), 17, h.len.get())
        .add(h.as_bytes())
        .add(payload)
        .finish();
    if c == 0 {
        0xffff
    } else {
        c
    }
}

/// True when the datagram's checksum is absent (0) or verifies.
pub fn checksum_ok(src: Ipv4Addr, dst: Ipv4Addr, header: &UdpHeader, payload: &[u8]) -> bool {
    let stored = header.checksum.get();
    stored == 0 || stored == checksum(src, dst, header, payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    static DATAGRAM: [u8; 13] = [0x9c, 0x40, 0xca, 0x6c, 0x00, 0x0d, 0x00, 0x00, b'h', b'e', b'l', b'l', b'o'];

    #[test]
    fn parses_ports_length_and_payload() {
        let (h, p) = UdpHeader::parse(&DATAGRAM).unwrap();
        assert_eq!((h.src_port.get(), h.dst_port.get(), h.len.get()), (40000, 51820, 13));
        assert_eq!(p, b"hello");
    }

    #[test]
    fn length_field_edges() {
        for len in 0..8 {
            assert_eq!(UdpHeader::parse(&DATAGRAM[..len]).unwrap_err(), DropReason::UdpTruncated);
        }
        for (field, expect) in [
            (0u16, Err(DropReason::UdpBadLength)),
            (7, Err(DropReason::UdpBadLength)),
            (8, Ok(0)),
            (12, Ok(4)),
            (13, Ok(5)),
            (14, Err(DropReason::UdpBadLength)),
            (u16::MAX, Err(DropReason::UdpBadLength)),
        ] {
            let mut d = DATAGRAM;
            d[4..6].copy_from_slice(&field.to_be_bytes());
            assert_eq!(UdpHeader::parse(&d).map(|(_, p)| p.len()), expect, "len field {field}");
        }
    }

    #[test]
    fn checksum_round_trip() {
        let src = Ipv4Addr::new(10, 0, 2, 15);
        let dst = Ipv4Addr::new(203, 0, 113, 7);
        let (h, p) = UdpHeader::parse(&DATAGRAM).unwrap();
        let mut h2 = *h;
        h2.checksum = U16::new(checksum(src, dst, h, p));
        assert!(checksum_ok(src, dst, &h2, p));
        assert!(!checksum_ok(src, Ipv4Addr::new(203, 0, 113, 8), &h2, p));
        assert!(checksum_ok(src, dst, h, p), "zero means no checksum");
    }
}
