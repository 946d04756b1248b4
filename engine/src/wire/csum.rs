//! The Internet checksum (RFC 1071), with the IPv4 pseudo-header for UDP.
//!
//! The ones-complement sum does not depend on byte order (RFC 1071 §2(B)), so words are summed
//! in native order, eight bytes at a time, and the result is turned into network order once.

/// Running ones-complement sum. Add even-length pieces; only the last piece may be odd.
#[derive(Debug, Clone, Copy, Default)]
pub struct Checksum {
    sum: u64,
}

impl Checksum {
    /// An empty sum.
    pub const fn new() -> Self {
        Self { sum: 0 }
    }

    /// Adds `bytes`. If `bytes` has odd length it must be the last piece added.
    pub fn add(&mut self, bytes: &[u8]) -> &mut Self {
        let mut chunks = bytes.chunks_exact(8);
        let mut acc = self.sum;
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            let (s, carry) = acc.overflowing_add(u64::from_ne_bytes(w));
            acc = s + u64::from(carry);
        }
        let rest = chunks.remainder();
        let mut tail = [0u8; 8];
        // `rest` is shorter than 8 bytes, so zipping never runs past `tail`.
        for (t, b) in tail.iter_mut().zip(rest) {
            *t = *b;
        }
        let (s, carry) = acc.overflowing_add(u64::from_ne_bytes(tail));
        self.sum = s + u64::from(carry);
        self
    }

    /// Adds the IPv4 pseudo-header of RFC 768 for a transport segment of `len` bytes.
    pub fn add_pseudo_header(&mut self, src: [u8; 4], dst: [u8; 4], protocol: u8, len: u16) -> &mut Self {
        let l = len.to_be_bytes();
        self.add(&[src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3]]).add(&[0, protocol, l[0], l[1]])
    }

    /// Folds the sum to 16 bits, in network order as a number (ready for `U16::new`).
    pub fn fold(&self) -> u16 {
        let mut s = self.sum;
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        // The loop leaves at most 16 significant bits.
        let native = u16::try_from(s).unwrap_or(u16::MAX);
        u16::from_be_bytes(native.to_ne_bytes())
    }

    /// The checksum to store: the ones complement of the folded sum.
    pub fn finish(&self) -> u16 {
        !self.fold()
    }
}

/// Checksum of one buffer (IPv4 header, ICMP message).
pub fn checksum(bytes: &[u8]) -> u16 {
    Checksum::new().add(bytes).finish()
}

/// True when `bytes` (which include their checksum field) sum to all ones.
pub fn verifies(bytes: &[u8]) -> bool {
    Checksum::new().add(bytes).fold() == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;

    // An IPv4 header whose checksum is 0xb861 (the classic worked example).
    static HEADER: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
        0x00, 0xc7,
    ];

    #[test]
    fn known_ipv4_header_checksum() {
        let mut h = HEADER;
        h[10] = 0;
        h[11] = 0;
        assert_eq!(checksum(&h), 0xb861);
        assert!(verifies(&HEADER));
    }

    #[test]
    fn odd_lengths_and_chunking_agree_with_a_naive_sum() {
        fn naive(b: &[u8]) -> u16 {
            let mut s: u32 = 0;
            for pair in b.chunks(2) {
                let hi = u32::from(pair[0]) << 8;
                let lo = pair.get(1).copied().map_or(0, u32::from);
                s += hi | lo;
            }
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            !u16::try_from(s).unwrap()
        }
        let data: Vec<u8> = (0..300u32).map(|i| (i * 37 + 11).to_le_bytes()[0]).collect();
        for len in 0..data.len() {
            assert_eq!(checksum(&data[..len]), naive(&data[..len]), "len {len}");
        }
        // All-ones input exercises the carries.
        let ones = [0xffu8; 64];
        assert_eq!(checksum(&ones), naive(&ones));
    }
}
