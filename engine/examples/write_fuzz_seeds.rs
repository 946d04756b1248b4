//! Writes the fuzz seed corpus (`engine/fuzz/corpus/seed`) from the test frame corpus.
//! Run: `cargo run -p omerta-engine --example write_fuzz_seeds`.
use std::net::Ipv4Addr;

use engine::testkit::corpus;
use engine::{Endpoint, VmIdentity};

fn main() -> std::io::Result<()> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/seed");
    std::fs::create_dir_all(dir)?;
    let consumer = Endpoint::new(Ipv4Addr::new(203, 0, 113, 7), 51820);
    for (i, frame) in corpus(&VmIdentity::default(), consumer).iter().enumerate() {
        std::fs::write(format!("{dir}/frame-{i:02}.bin"), frame)?;
    }
    // Host datagrams: selector byte, headroom byte, then payload or ICMP message.
    std::fs::write(format!("{dir}/host-udp.bin"), [0u8, 42, b'h', b'e', b'l', b'l', b'o'])?;
    std::fs::write(format!("{dir}/host-icmp.bin"), [1u8, 34, 0, 0, 0, 0, 0, 9, 0, 1, b'p', b'o', b'n', b'g'])?;
    Ok(())
}
