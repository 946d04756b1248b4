//! Replays the mesh's fuzz seed corpus and any saved crash artifacts through the fuzz bodies,
//! so a crash found by `make fuzz` becomes a regression test once its input is kept.
use std::path::Path;

fn replay(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut n = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_file() {
            let data = std::fs::read(&path).unwrap();
            mesh::fuzzing::datagram(&data);
            mesh::fuzzing::ipc(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn mesh_fuzz_corpus_replays_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let seeds = replay(&root.join("corpus/seed"));
    assert!(seeds >= 8, "the seed corpus is missing ({seeds} files)");
    for target in ["mesh_datagram", "mesh_ipc"] {
        replay(&root.join("artifacts").join(target));
    }
}

/// Runs `body` on every file of `dirs` (under the fuzz directory); how many there were.
fn each_input(dirs: &[&str], body: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else { continue };
        for entry in entries.flatten().filter(|e| e.path().is_file()) {
            body(&std::fs::read(entry.path()).unwrap());
            n += 1;
        }
    }
    n
}

/// Sessions (`mesh::fuzzing::session`): the seed corpus of `corpus/session`, what `make fuzz`
/// kept in `corpus/mesh_session`, and its crash artifacts, each with the invariants checked.
#[test]
fn mesh_session_corpus_holds_the_invariants() {
    let n = each_input(&["corpus/session", "corpus/mesh_session", "artifacts/mesh_session"], mesh::fuzzing::session);
    assert!(n >= 8, "the session corpus is missing ({n} files)");
}

/// Packets from a hostile VM into a userspace tunnel (`mesh::fuzzing::tunnel`): the seeds of
/// `corpus/tunnel`, what `make fuzz` kept in `corpus/tunnel_packets`, and its crash artifacts.
#[test]
fn tunnel_packet_corpus_holds_the_invariants() {
    let n = each_input(&["corpus/tunnel", "corpus/tunnel_packets", "artifacts/tunnel_packets"], mesh::fuzzing::tunnel);
    assert!(n >= 6, "the tunnel seed corpus is missing ({n} files)");
}
