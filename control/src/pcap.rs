//! Writing captured frames as pcapng (link type Ethernet), readable by tcpdump, Wireshark and
//! tshark: one section, one interface (the VM's NIC, `if_name` its name, microsecond
//! timestamps, the capture's snaplen), one Enhanced Packet Block per frame with its direction
//! as the VM sees it (`epb_flags`: inbound = to the VM, outbound = from it) and, for a dropped
//! frame, the reason as its comment (`dropped: REASON`). Format: draft-ietf-opsawg-pcapng.
#![forbid(unsafe_code)]

use std::io::{self, Write};

/// One frame to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Microseconds since the Unix epoch.
    pub unix_us: u64,
    /// Its length on the wire.
    pub len: u32,
    /// The bytes kept (at most the snaplen).
    pub bytes: Vec<u8>,
    /// True for a frame to the VM, false for one from it.
    pub to_vm: bool,
    /// Why it was dropped, if it was.
    pub dropped: Option<String>,
}

/// An option: code, length, value padded to 4 bytes.
fn option(out: &mut Vec<u8>, code: u16, value: &[u8]) {
    let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&value[..usize::from(len)]);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// A block: type, total length, body (padded to 4), total length again.
fn block(out: &mut impl Write, kind: u32, body: &[u8]) -> io::Result<()> {
    let total = u32::try_from(12 + body.len().next_multiple_of(4)).unwrap_or(u32::MAX);
    out.write_all(&kind.to_le_bytes())?;
    out.write_all(&total.to_le_bytes())?;
    out.write_all(body)?;
    out.write_all(&[0u8; 3][..body.len().next_multiple_of(4) - body.len()])?;
    out.write_all(&total.to_le_bytes())
}

/// Writes the section and interface headers: `vm` names the interface, `snaplen` is the most
/// bytes of any frame written.
pub fn write_header(out: &mut impl Write, vm: &str, snaplen: u32) -> io::Result<()> {
    let mut shb = Vec::new();
    shb.extend_from_slice(&0x1A2B_3C4Du32.to_le_bytes());
    shb.extend_from_slice(&1u16.to_le_bytes());
    shb.extend_from_slice(&0u16.to_le_bytes());
    shb.extend_from_slice(&(-1i64).to_le_bytes());
    option(&mut shb, 4, b"omertactl capture"); // shb_userappl
    option(&mut shb, 0, &[]);
    block(out, 0x0A0D_0D0A, &shb)?;
    let mut idb = Vec::new();
    idb.extend_from_slice(&1u16.to_le_bytes()); // LINKTYPE_ETHERNET
    idb.extend_from_slice(&0u16.to_le_bytes());
    idb.extend_from_slice(&snaplen.to_le_bytes());
    option(&mut idb, 2, vm.as_bytes()); // if_name
    option(&mut idb, 9, &[6]); // if_tsresol: microseconds
    option(&mut idb, 0, &[]);
    block(out, 1, &idb)
}

/// Writes one frame as an Enhanced Packet Block.
pub fn write_record(out: &mut impl Write, r: &Record) -> io::Result<()> {
    let mut epb = Vec::new();
    epb.extend_from_slice(&0u32.to_le_bytes());
    epb.extend_from_slice(&u32::try_from(r.unix_us >> 32).unwrap_or(0).to_le_bytes());
    epb.extend_from_slice(&u32::try_from(r.unix_us & 0xffff_ffff).unwrap_or(0).to_le_bytes());
    epb.extend_from_slice(&u32::try_from(r.bytes.len()).unwrap_or(u32::MAX).to_le_bytes());
    epb.extend_from_slice(&r.len.to_le_bytes());
    epb.extend_from_slice(&r.bytes);
    epb.resize(epb.len().next_multiple_of(4), 0);
    // Direction bits 0-1: 1 inbound, 2 outbound.
    let flags: u32 = if r.to_vm { 1 } else { 2 };
    option(&mut epb, 2, &flags.to_le_bytes());
    if let Some(why) = &r.dropped {
        option(&mut epb, 1, format!("dropped: {why}").as_bytes());
    }
    option(&mut epb, 0, &[]);
    block(out, 6, &epb)
}

/// Writes a whole file: the headers and every record.
pub fn write(out: &mut impl Write, vm: &str, snaplen: u32, records: &[Record]) -> io::Result<()> {
    write_header(out, vm, snaplen)?;
    for r in records {
        write_record(out, r)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_aligned_and_carry_direction_and_reason() {
        let mut v = Vec::new();
        let r = Record {
            unix_us: 1_500_000,
            len: 60,
            bytes: vec![1, 2, 3],
            to_vm: false,
            dropped: Some("not_allowed".into()),
        };
        write(&mut v, "vm0", 128, &[r]).unwrap();
        assert_eq!(&v[..4], &0x0A0D_0D0Au32.to_le_bytes());
        assert_eq!(v.len() % 4, 0);
        // Walk the blocks by their lengths: SHB, IDB, EPB, nothing else.
        let (mut at, mut kinds) = (0, Vec::new());
        while at < v.len() {
            let kind = u32::from_le_bytes(v[at..at + 4].try_into().unwrap());
            let len = u32::from_le_bytes(v[at + 4..at + 8].try_into().unwrap()) as usize;
            assert_eq!(&v[at + len - 4..at + len], &v[at + 4..at + 8], "trailing length");
            kinds.push(kind);
            at += len;
        }
        assert_eq!(kinds, [0x0A0D_0D0A, 1, 6]);
        let text = String::from_utf8_lossy(&v);
        assert!(text.contains("dropped: not_allowed") && text.contains("vm0"));
    }
}
