//! TCP header view: ports and flags, enough to classify a segment. The engine never forwards
//! TCP, so it does not check the data offset, options or checksum.
use zerocopy::network_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::filter::DropReason;

/// The fixed 20-byte TCP header.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct TcpHeader {
    /// Source port.
    pub src_port: U16,
    /// Destination port.
    pub dst_port: U16,
    /// Sequence number.
    pub seq: U32,
    /// Acknowledgement number.
    pub ack: U32,
    /// Data offset (4 bits), reserved bits and flags.
    pub offset_flags: U16,
    /// Window.
    pub window: U16,
    /// Checksum.
    pub checksum: U16,
    /// Urgent pointer.
    pub urgent: U16,
}
const _: () = assert!(size_of::<TcpHeader>() == TcpHeader::LEN);

impl TcpHeader {
    /// Fixed header length in bytes.
    pub const LEN: usize = 20;

    /// Views the start of a segment. Never panics.
    pub fn parse(bytes: &[u8]) -> Result<&Self, DropReason> {
        Self::ref_from_prefix(bytes).map(|(h, _)| h).map_err(|_| DropReason::TcpTruncated)
    }

    /// The SYN flag (a connection attempt).
    pub fn is_syn(&self) -> bool {
        self.offset_flags.get() & 0x0002 != 0
    }

    /// The ACK flag (every segment of an opened connection has it; a bare SYN does not).
    pub fn is_ack(&self) -> bool {
        self.offset_flags.get() & 0x0010 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_flags() {
        let seg = [0xc3, 0x50, 0x01, 0xbb, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0];
        let h = TcpHeader::parse(&seg).unwrap();
        assert_eq!((h.src_port.get(), h.dst_port.get()), (50000, 443));
        assert!(h.is_syn());
        assert!(!h.is_ack());
        for len in 0..20 {
            assert_eq!(TcpHeader::parse(&seg[..len]).unwrap_err(), DropReason::TcpTruncated);
        }
    }
}
