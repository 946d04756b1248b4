//! Reading the pcapng files `omertactl capture` writes, checking their structure.

/// One packet of a pcapng file as `read_pcapng` reads it.
#[derive(Debug, Clone)]
pub struct PcapngFrame {
    /// Bytes captured.
    pub caplen: usize,
    /// Length on the wire.
    pub len: usize,
    /// The captured bytes.
    pub data: Vec<u8>,
    /// Direction (epb_flags): true for inbound (to the VM).
    pub to_vm: bool,
    /// Its comment, if any.
    pub comment: Option<String>,
}

/// Reads a little-endian pcapng file as `omertactl capture` writes it, checking its structure
/// (block lengths, one interface, records within the snaplen): the interface's snaplen and
/// every Enhanced Packet Block. Panics on anything malformed.
pub fn read_pcapng(b: &[u8]) -> (usize, Vec<PcapngFrame>) {
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    let u16_at = |at: usize| u16::from_le_bytes(b[at..at + 2].try_into().unwrap()) as usize;
    let (mut at, mut snaplen, mut frames) = (0, None, Vec::new());
    while at < b.len() {
        let (kind, len) = (u32_at(at), u32_at(at + 4));
        assert!(len >= 12 && len % 4 == 0 && at + len <= b.len(), "block at {at}: length {len}");
        assert_eq!(u32_at(at + len - 4), len, "block at {at}: trailing length");
        match kind {
            0x0A0D_0D0A => assert_eq!(u32_at(at + 8), 0x1A2B_3C4D, "byte-order magic"),
            1 => {
                assert!(snaplen.is_none(), "one interface");
                assert_eq!(u16_at(at + 8), 1, "link type Ethernet");
                snaplen = Some(u32_at(at + 12));
            }
            6 => {
                let (caplen, wire) = (u32_at(at + 20), u32_at(at + 24));
                let data = b[at + 28..at + 28 + caplen].to_vec();
                let snap = snaplen.expect("an interface before packets");
                assert!(caplen <= snap && caplen <= wire, "captured {caplen} of {wire}, snaplen {snap}");
                let mut o = at + 28 + caplen.next_multiple_of(4);
                let (mut to_vm, mut comment) = (None, None);
                while o < at + len - 4 {
                    let (code, olen) = (u16_at(o), u16_at(o + 2));
                    let v = &b[o + 4..o + 4 + olen];
                    match code {
                        0 => break,
                        1 => comment = Some(String::from_utf8(v.to_vec()).unwrap()),
                        2 => to_vm = Some(u32::from_le_bytes(v.try_into().unwrap()) & 3 == 1),
                        _ => {}
                    }
                    o += 4 + olen.next_multiple_of(4);
                }
                frames.push(PcapngFrame { caplen, len: wire, data, to_vm: to_vm.expect("epb_flags"), comment });
            }
            other => panic!("unexpected block type {other:#x}"),
        }
        at += len;
    }
    (snaplen.expect("an interface"), frames)
}
