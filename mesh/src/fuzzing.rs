//! Fuzz bodies, shared by `mesh/fuzz` (cargo-fuzz) and the replay test
//! (`mesh/tests/fuzz_replay.rs`): any bytes as a datagram from a peer, as the decrypted
//! plaintext of one (past the AEAD, where the parsers are), and as an IPC frame's body. Each
//! must return without panicking.
use crate::wire;

/// The network key and peer ID the bodies use.
const KEY: [u8; 32] = [7; 32];
const ME: &str = "0123456789abcdef";

/// Any bytes as a sealed datagram, and as its plaintext.
pub fn datagram(data: &[u8]) {
    let _ = wire::open(&KEY, ME, data, crate::now_s());
    let _ = wire::open_plain(ME, data, crate::now_s());
    // A message that did parse is dispatched on its type: its fields go through the checks.
    if let Ok(wire::Message::VmRequest(r)) = serde_json::from_slice::<wire::Message>(data) {
        let _ = crate::check::ssh_public_key(&r.ssh_public_key);
        let _ = crate::check::endpoint(&r.consumer_endpoint);
        let _ = crate::check::tunnel_pair(&r.consumer_vpn_ip, &r.vm_vpn_ip);
        let _ = crate::check::wg_key(&r.consumer_public_key);
        let _ = crate::check::ssh_user(&r.ssh_user);
    }
}

/// Any bytes as an IPC request body.
pub fn ipc(data: &[u8]) {
    let _ = serde_json::from_slice::<crate::ipc::Request>(data);
    let _ = std::str::from_utf8(data).map(crate::net::Network::from_link);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Message;

    /// Writes the seed corpus (`cargo test -p omerta-mesh -- --ignored write_seed_corpus`):
    /// sealed datagrams and plaintexts of each message type, IPC requests, an invite link.
    #[test]
    #[ignore = "writes mesh/fuzz/corpus/seed"]
    fn write_seed_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/seed");
        std::fs::create_dir_all(&dir).unwrap();
        let me = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let req = wire::VmRequest {
            request_id: "00112233aabbccdd".into(),
            requirements: wire::Requirements::default(),
            consumer_public_key: "29c2z11913CeLzuULP7aPC0DrUgl8eC+S1G1epi3AT4=".into(),
            consumer_endpoint: "203.0.113.2:51900".into(),
            consumer_vpn_ip: "10.77.1.1".into(),
            vm_vpn_ip: "10.77.1.2".into(),
            ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMJJaCgxwgG8k2yq9OFDQ4zYmkBrj3AnqmsVC6WxQ9YU c".into(),
            ssh_user: "omerta".into(),
            timeout_minutes: Some(10),
            dry_run: false,
        };
        let messages = [
            Message::Hello { reply: true },
            Message::Ping { nonce: "1".into() },
            Message::VmRequest(Box::new(req)),
            Message::VmRelease { vm_id: "0123456789abcdef".into() },
            Message::VmHeartbeat { vm_ids: vec!["0123456789abcdef".into()], timestamp: 1 },
            Message::VmEndpointUpdate {
                vm_id: "0123456789abcdef".into(),
                consumer_endpoint: "203.0.113.3:51900".into(),
            },
        ];
        for (i, m) in messages.iter().enumerate() {
            std::fs::write(dir.join(format!("message-{i:02}.json")), serde_json::to_vec(m).unwrap()).unwrap();
            std::fs::write(dir.join(format!("datagram-{i:02}.bin")), wire::seal(&KEY, &me, ME, m.clone()).unwrap())
                .unwrap();
        }
        let ipc = [
            r#"{"type":"status"}"#,
            r#"{"type":"ping","peerId":"0123456789abcdef","timeout":3000}"#,
            r#"{"type":"vm_request","peerId":"0123456789abcdef","requirements":{"cpuCores":1,"memoryMB":1024,"storageMB":4096},"dryRun":true}"#,
            r#"{"type":"vm_release","vmId":"0123456789abcdef"}"#,
        ];
        for (i, r) in ipc.iter().enumerate() {
            std::fs::write(dir.join(format!("ipc-{i:02}.json")), r).unwrap();
        }
        let n = crate::net::Network { key: [1; 32], name: "seed".into(), bootstrap: vec![], created_at: 0 };
        std::fs::write(dir.join("invite.txt"), n.link()).unwrap();
    }
}
