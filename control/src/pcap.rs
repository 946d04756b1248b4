//! Writing captured frames as a classic pcap file (link type Ethernet), readable by tcpdump
//! and Wireshark.
#![forbid(unsafe_code)]

use std::io::{self, Write};

/// Writes the file header and every `(microseconds since the epoch, original length, bytes)`.
pub fn write(out: &mut impl Write, snaplen: u32, frames: &[(u64, u32, Vec<u8>)]) -> io::Result<()> {
    out.write_all(&0xa1b2_c3d4u32.to_le_bytes())?;
    out.write_all(&2u16.to_le_bytes())?;
    out.write_all(&4u16.to_le_bytes())?;
    out.write_all(&0i32.to_le_bytes())?;
    out.write_all(&0u32.to_le_bytes())?;
    out.write_all(&snaplen.to_le_bytes())?;
    out.write_all(&1u32.to_le_bytes())?; // LINKTYPE_ETHERNET
    for (us, orig, bytes) in frames {
        let secs = u32::try_from(us / 1_000_000).unwrap_or(u32::MAX);
        let micros = u32::try_from(us % 1_000_000).unwrap_or(0);
        let incl = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        out.write_all(&secs.to_le_bytes())?;
        out.write_all(&micros.to_le_bytes())?;
        out.write_all(&incl.to_le_bytes())?;
        out.write_all(&orig.to_le_bytes())?;
        out.write_all(bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn header_and_records() {
        let mut v = Vec::new();
        super::write(&mut v, 256, &[(1_500_000, 60, vec![1, 2, 3])]).unwrap();
        assert_eq!(v.len(), 24 + 16 + 3);
        assert_eq!(&v[..4], &[0xd4, 0xc3, 0xb2, 0xa1]);
        assert_eq!(&v[24..28], &1u32.to_le_bytes());
        assert_eq!(&v[28..32], &500_000u32.to_le_bytes());
        assert_eq!(&v[32..36], &3u32.to_le_bytes());
        assert_eq!(&v[36..40], &60u32.to_le_bytes());
    }
}
