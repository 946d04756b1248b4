//! ICMP echo header view (RFC 792): type, code, checksum, identifier, sequence number.
//!
//! Does not parse other ICMP messages beyond their type and code.
use zerocopy::network_endian::U16;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::csum;
use crate::filter::DropReason;

/// ICMP types the engine tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcmpType {
    /// 0
    EchoReply,
    /// 8
    EchoRequest,
    /// Anything else.
    Unknown(u8),
}

impl From<u8> for IcmpType {
    fn from(v: u8) -> Self {
        match v {
            0 => IcmpType::EchoReply,
            8 => IcmpType::EchoRequest,
            o => IcmpType::Unknown(o),
        }
    }
}

impl From<IcmpType> for u8 {
    fn from(t: IcmpType) -> u8 {
        match t {
            IcmpType::EchoReply => 0,
            IcmpType::EchoRequest => 8,
            IcmpType::Unknown(v) => v,
        }
    }
}

/// The 8-byte ICMP echo header.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct IcmpEchoHeader {
    /// Message type.
    pub kind: u8,
    /// Code (0 for echo).
    pub code: u8,
    /// Checksum over the whole ICMP message.
    pub checksum: U16,
    /// Identifier.
    pub ident: U16,
    /// Sequence number.
    pub seq: U16,
}
const _: () = assert!(size_of::<IcmpEchoHeader>() == IcmpEchoHeader::LEN);

impl IcmpEchoHeader {
    /// Header length in bytes.
    pub const LEN: usize = 8;

    /// Splits an ICMP message into the echo header and its data. Never panics.
    pub fn parse(bytes: &[u8]) -> Result<(&Self, &[u8]), DropReason> {
        Self::ref_from_prefix(bytes).map_err(|_| DropReason::IcmpTruncated)
    }

    /// The message type.
    pub fn kind(&self) -> IcmpType {
        IcmpType::from(self.kind)
    }

    /// True for an echo request or reply with code 0.
    pub fn is_echo(&self, kind: IcmpType) -> bool {
        self.kind() == kind && self.code == 0
    }
}

/// The checksum of an echo message with `header` (its checksum field ignored) and `data`.
pub fn checksum(header: &IcmpEchoHeader, data: &[u8]) -> u16 {
    let mut h = *header;
    h.checksum = U16::new(0);
    csum::Checksum::new().add(h.as_bytes()).add(data).finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Echo request id 0x1234 seq 1, data "abcd"; checksum valid.
    fn request() -> Vec<u8> {
        let mut m = vec![8, 0, 0, 0, 0x12, 0x34, 0x00, 0x01, b'a', b'b', b'c', b'd'];
        let c = csum::checksum(&m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        m
    }

    #[test]
    fn parses_echo_fields() {
        let m = request();
        let (h, data) = IcmpEchoHeader::parse(&m).unwrap();
        assert!(h.is_echo(IcmpType::EchoRequest));
        assert_eq!((h.ident.get(), h.seq.get()), (0x1234, 1));
        assert_eq!(data, b"abcd");
        assert!(csum::verifies(&m));
        assert_eq!(checksum(h, data), h.checksum.get());
    }

    #[test]
    fn truncated_and_other_types() {
        let m = request();
        for len in 0..8 {
            assert_eq!(IcmpEchoHeader::parse(&m[..len]).unwrap_err(), DropReason::IcmpTruncated);
        }
        let mut x = m.clone();
        x[0] = 3;
        let (h, _) = IcmpEchoHeader::parse(&x).unwrap();
        assert_eq!(h.kind(), IcmpType::Unknown(3));
        assert!(!h.is_echo(IcmpType::EchoRequest));
        let mut x = m;
        x[1] = 1;
        assert!(!IcmpEchoHeader::parse(&x).unwrap().0.is_echo(IcmpType::EchoRequest));
    }
}
