//! Fuzz bodies, shared by `mesh/fuzz` (cargo-fuzz) and the replay test
//! (`mesh/tests/fuzz_replay.rs`): any bytes as a datagram from a peer, as the decrypted
//! plaintext of one (past the AEAD, where the parsers are), as an IPC frame's body, and as a
//! session ([`session`]): a sequence of sealed, signed messages from several identities and
//! sources through admission, with the invariants of issue 24 checked after every step. Each
//! must return without panicking.
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};

use crate::admit::{Accept, Admission, Limits, Refusal, Verdict};
use crate::receive::{self, Clock, Outcome};
use crate::wire::{self, Message};

/// The network key and peer ID the bodies use.
const KEY: [u8; 32] = [7; 32];
const ME: &str = "0123456789abcdef";

/// Any bytes as a sealed datagram, and as its plaintext.
pub fn datagram(data: &[u8]) {
    let _ = wire::open(&KEY, ME, data, crate::now_s());
    let _ = wire::open_plain(ME, data, crate::now_s());
    // A message that did parse is dispatched on its type: its fields go through the checks.
    if let Ok(Message::VmRequest(r)) = serde_json::from_slice::<Message>(data) {
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

/// Identities in a session: 0 floods, 1 is honest (a bootstrap peer at its own source, one
/// message a second at most; non-members may forge its address), the others are whatever the
/// input makes them.
const IDENTITIES: usize = 12;
/// The honest identity's source port (no other identity sends from it).
const HONEST_PORT: u16 = 7;
/// Datagrams kept for replays.
const HISTORY: usize = 64;
/// Steps per session.
const STEPS: usize = 512;

/// A session's state: admission as the daemon has it (small bounds, so the input reaches
/// them), the fake clocks, and the model the invariants are checked against.
struct Session {
    limits: Limits,
    adm: Admission,
    keys: Vec<ed25519_dalek::SigningKey>,
    ids: Vec<String>,
    bootstrap: Vec<(String, SocketAddrV4)>,
    now_s: u64,
    now_ms: u64,
    next_id: u64,
    history: Vec<(Vec<u8>, u64)>,
    /// Every message ID ever accepted (restarts included): none twice.
    accepted: HashSet<u64>,
    /// Where each peer is, as the model knows it: it moves only by a challenge answered.
    endpoints: HashMap<String, SocketAddrV4>,
    /// Challenges sent: (peer, address, nonce).
    challenges: HashSet<(String, SocketAddrV4, String)>,
    /// Leases: VM ID → the provider that made it.
    leases: HashMap<String, String>,
    /// When the honest peer last sent, and until when (after a restart) it may be refused.
    honest_sent: Option<u64>,
    honest_deaf_until: u64,
    /// The journal cannot be written (a full disk): accepted messages are not acted on.
    journal_fails: bool,
}

fn source(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 7), port)
}

impl Session {
    fn new() -> Self {
        let limits = Limits { max_peers: 6, max_sources: 6, max_floors: 16, window: 16, ..Limits::default() };
        let keys: Vec<_> = (0..IDENTITIES)
            .map(|i| ed25519_dalek::SigningKey::from_bytes(&[u8::try_from(i + 1).unwrap_or(1); 32]))
            .collect();
        let ids: Vec<String> = keys.iter().map(|k| crate::net::peer_id(&k.verifying_key().to_bytes())).collect();
        let bootstrap = vec![(ids[1].clone(), source(HONEST_PORT))];
        let adm = Admission::new(limits.clone(), HashMap::new(), &bootstrap, &[]);
        let mut endpoints = HashMap::new();
        endpoints.insert(ids[1].clone(), source(HONEST_PORT));
        Self {
            limits,
            adm,
            keys,
            ids,
            bootstrap,
            now_s: 1_800_000_000,
            now_ms: 0,
            next_id: 1,
            history: Vec::new(),
            accepted: HashSet::new(),
            endpoints,
            challenges: HashSet::new(),
            leases: HashMap::new(),
            honest_sent: None,
            honest_deaf_until: 0,
            journal_fails: false,
        }
    }

    /// Seals `m` as identity `who`, stamped `skew` seconds off the clock.
    fn seal(&mut self, who: usize, m: Message, skew: i64) -> Vec<u8> {
        let id = self.next_id;
        self.next_id += 1;
        let ts = self.now_s.saturating_add_signed(skew);
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&id.to_le_bytes());
        let d = wire::seal_fixed(&KEY, &self.keys[who], ME, m, ts, 0, id, nonce);
        if self.history.len() < HISTORY {
            self.history.push((d.clone(), id));
        } else {
            let slot = usize::try_from(id).unwrap_or(0) % HISTORY;
            self.history[slot] = (d.clone(), id);
        }
        d
    }

    /// One datagram from `from`, as the daemon's receiver takes it; the verdict, if it got
    /// that far.
    fn deliver(&mut self, d: &[u8], from: SocketAddrV4) -> Option<Verdict> {
        // Renting peers are kept: those with a lease here.
        let kept: HashSet<String> =
            if self.adm.is_full() { self.leases.values().cloned().collect() } else { HashSet::new() };
        let nonce = format!("n{}", self.now_ms);
        let clock = Clock { now_s: self.now_s, now_ms: self.now_ms };
        let fails = self.journal_fails;
        let known: HashMap<String, SocketAddrV4> = self.adm.peers(0).into_iter().map(|(p, ep, _)| (p, ep)).collect();
        let out = receive::take(
            &mut self.adm,
            &KEY,
            ME,
            d,
            from,
            clock,
            &kept,
            || nonce.clone(),
            |_, _| {
                if fails {
                    Err(std::io::Error::other("a full disk"))
                } else {
                    Ok(())
                }
            },
        );
        let (env, moved, acted) = match out {
            Outcome::Dispatch { env, moved } => (env, moved, true),
            Outcome::Unrecorded { env, moved, .. } => (env, moved, false),
            Outcome::Challenge { peer, to, nonce } => {
                self.challenges.insert((peer, to, nonce.clone()));
                self.agree();
                return Some(Verdict::Challenge { to, nonce });
            }
            Outcome::Refused { why, .. } => {
                self.agree();
                return Some(Verdict::Refuse(why));
            }
            Outcome::Dropped(_) => return None,
        };
        let peer = env.from_peer_id.clone();
        if moved {
            // Item 5: an endpoint moves only on the pong of a challenge sent there.
            let Message::Pong { nonce } = &env.payload else { panic!("moved by a {}", env.payload.kind()) };
            assert!(self.challenges.contains(&(peer.clone(), from, nonce.clone())), "moved by a stray pong");
            self.endpoints.insert(peer.clone(), from);
            self.challenges.retain(|c| c.0 != peer);
        } else if let Some(ep) = known.get(&peer) {
            assert_eq!(*ep, from, "a message of {peer} from another address was accepted");
        } else {
            // A new slot (first heard, or back after an eviction): where it is now.
            self.endpoints.insert(peer.clone(), from);
        }
        self.agree();
        if !acted {
            // Not recorded, so not acted on.
            return None;
        }
        let id = u64::from_str_radix(&env.message_id, 16).unwrap_or(0);
        // Item 5: a message ID is acted on once, restarts included.
        assert!(self.accepted.insert(id), "message {id:016x} acted on twice");
        self.dispatch(&peer, &env.payload, env.timestamp);
        Some(Verdict::Accept(Accept { reserve: None, moved }))
    }

    /// Checks that the model and admission agree on every endpoint admission knows.
    fn agree(&self) {
        for (peer, ep, _) in self.adm.peers(self.now_ms) {
            if let Some(model) = self.endpoints.get(&peer) {
                assert_eq!(*model, ep, "{peer}'s endpoint");
            }
        }
    }

    /// What the daemon's dispatch does with an accepted message, for the state the
    /// invariants speak of.
    fn dispatch(&mut self, peer: &str, m: &Message, ts: u64) {
        match m {
            Message::VmCreated(c) => {
                // Item 3: an ID already leased is refused, whoever answers with it.
                let before = self.leases.get(&c.vm_id).cloned();
                match crate::lease::claim(before.as_deref(), &c.vm_id) {
                    Ok(()) => {
                        self.leases.insert(c.vm_id.clone(), peer.to_string());
                    }
                    Err(_) => assert!(before.is_some(), "a free ID refused"),
                }
                if let Some(owner) = before {
                    assert_eq!(self.leases.get(&c.vm_id), Some(&owner), "lease {} taken over", c.vm_id);
                }
            }
            // Only the lease's provider ends it.
            Message::VmReleased { vm_id } if self.leases.get(vm_id).is_some_and(|p| p == peer) => {
                self.leases.remove(vm_id);
            }
            Message::VmHeartbeat { .. } => {
                let _ = self.adm.beat(peer, ts);
            }
            _ => {}
        }
    }

    fn restart(&mut self) {
        self.adm = Admission::new(self.limits.clone(), self.adm.floors().clone(), &self.bootstrap, &[]);
        self.challenges.clear();
        self.endpoints.retain(|p, _| self.bootstrap.iter().any(|b| b.0 == *p));
        self.honest_deaf_until = self.now_s + self.limits.reserve_s + 1;
    }

    fn created(vm: u8) -> Message {
        Message::VmCreated(Box::new(wire::VmCreated {
            request_id: "00112233aabbccdd".into(),
            vm_id: format!("{vm:016x}"),
            vm_ip: "10.77.1.2".into(),
            vm_public_key: String::new(),
            ssh_host_key: String::new(),
            ssh_host_fingerprint: String::new(),
            heartbeat_timeout_s: None,
            vm_port: None,
            engine_proof_key: None,
        }))
    }

    /// One step of the input: `(op, a, b)`.
    fn step(&mut self, op: u8, a: u8, b: u8) {
        let who = usize::from(a) % IDENTITIES;
        // Nobody but the honest peer sends from its port.
        let port = |x: u8| 1 + u16::from(x % 8) + u16::from(x % 8 >= 6);
        match op % 8 {
            0 => {
                let m = match b % 5 {
                    0 => Message::Hello { reply: b & 8 != 0 },
                    1 => Message::Ping { nonce: b.to_string() },
                    2 => Message::Pong { nonce: format!("n{}", self.now_ms.saturating_sub(u64::from(b))) },
                    3 => Message::VmHeartbeat { vm_ids: vec![], timestamp: 0 },
                    _ => Message::VmReleased { vm_id: format!("{:016x}", b % 4) },
                };
                let skew = i64::from(b >> 4) * 16 - 128;
                let d = self.seal(who.max(2), m, skew);
                self.deliver(&d, source(port(a >> 4)));
            }
            1 => {
                if !self.history.is_empty() {
                    let (d, _) = self.history[usize::from(a) % self.history.len()].clone();
                    self.deliver(&d, source(port(b)));
                }
            }
            2 => {
                self.now_ms += u64::from(a) * 10 + u64::from(b) * 1000;
                self.now_s = 1_800_000_000 + self.now_ms / 1000;
            }
            3 if b & 1 == 1 => self.journal_fails = !self.journal_fails,
            3 => self.restart(),
            4 => {
                if self.honest_sent.is_some_and(|t| self.now_ms < t + 1000) {
                    return;
                }
                self.honest_sent = Some(self.now_ms);
                let m = if b & 1 == 0 { Message::Ping { nonce: a.to_string() } } else { Session::created(b % 4) };
                let d = self.seal(1, m, 0);
                let v = self.deliver(&d, source(HONEST_PORT));
                if self.journal_fails {
                    // Accepted, not acted on: nothing is owed to anyone while the disk is full.
                    return;
                }
                // Item 1: whatever the others do, the honest peer is heard (but for the few
                // seconds after a restart its reservation covers).
                if self.now_s > self.honest_deaf_until {
                    assert!(matches!(v, Some(Verdict::Accept(_))), "the honest peer was refused: {v:?}");
                } else {
                    assert!(
                        matches!(v, Some(Verdict::Accept(_) | Verdict::Refuse(Refusal::BeforeFloor))),
                        "the honest peer was refused: {v:?}"
                    );
                }
            }
            5 => {
                // The flood: identity 0, as fast as it can seal, from one of the sources.
                for i in 0..u16::from(b % 64) {
                    let d = self.seal(0, Message::Ping { nonce: i.to_string() }, 0);
                    self.deliver(&d, source(port(a)));
                }
            }
            6 => {
                // A peer answers the challenge it was sent, from where it was sent.
                let peer = self.ids[who].clone();
                let pending = self.challenges.iter().filter(|c| c.0 == peer).nth(usize::from(b) % 4).cloned();
                if let Some((_, to, nonce)) = pending {
                    let d = self.seal(who, Message::Pong { nonce }, 0);
                    self.deliver(&d, to);
                }
            }
            _ if b >= 128 => {
                // A non-member forging the honest peer's address: garbage that never opens.
                for i in 0..u16::from(b % 64) {
                    let mut d = vec![a; 60];
                    d[..2].copy_from_slice(&i.to_le_bytes());
                    assert!(self.deliver(&d, source(HONEST_PORT)).is_none());
                }
            }
            _ => {
                let d = self.seal(who.max(2), Session::created(b % 4), 0);
                self.deliver(&d, source(port(a >> 4)));
            }
        }
        // Bounded memory, whatever the input.
        let (sources, slots, floors, ids) = self.adm.sizes();
        let l = &self.limits;
        assert!(sources <= l.max_sources && slots <= l.max_peers + 1, "{sources} sources, {slots} slots");
        assert!(floors <= l.max_floors + 1 && ids <= l.max_peers * l.window, "{floors} floors, {ids} IDs");
    }
}

/// Any bytes as a session: each three bytes one step (module doc), at most [`STEPS`].
pub fn session(data: &[u8]) {
    let mut s = Session::new();
    for c in data.chunks_exact(3).take(STEPS) {
        s.step(c[0], c[1], c[2]);
    }
}

/// `len` pseudo-random bytes from the xorshift state `x` (tests' inputs: reproducible).
#[cfg(test)]
pub(crate) fn noise(x: &mut u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            *x ^= *x << 13;
            *x ^= *x >> 17;
            *x ^= *x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// Any bytes as packets a hostile VM sends into a userspace tunnel after decryption: each goes
/// through the fence and, when admitted, into the consumer's TCP/IP stack, which holds one
/// connection this consumer opened (to the VM's port 22) and runs its timers on a fake clock.
/// Input: chunks of `[flags, len, len bytes]`; flag bit 0 sets the TCP ACK number to answer
/// our SYN (so the fuzzer reaches an open connection), the rest of `flags` moves the clock on
/// in milliseconds. Checked after every step: every packet our stack sends belongs to the
/// connection we opened (the VM never gets an answer to anything it started), and the stack
/// is given nothing the fence refused.
pub fn tunnel(data: &[u8]) {
    use crate::tunnel::user::device::{Device, Ring, Wire};
    use crate::tunnel::user::fence;
    use crate::tunnel::user::stats::Stats;
    use crate::tunnel::user::streams::Streams;
    use smoltcp::iface::{Config, Interface, SocketSet};
    use smoltcp::wire::{HardwareAddress, IpCidr};

    const VM: Ipv4Addr = Ipv4Addr::new(10, 60, 3, 2);
    const US: Ipv4Addr = Ipv4Addr::new(10, 60, 3, 1);

    /// What the stack sent: our SYN's sequence number, and whether anything left a flow.
    struct Sink {
        syn_seq: Option<u32>,
        sent: Vec<(u16, u16)>,
        plain: Vec<u8>,
    }
    impl Wire for Sink {
        fn plain(&mut self) -> &mut [u8] {
            &mut self.plain
        }
        fn send_plain(&mut self, len: usize, _: &Stats) {
            let packet = &self.plain[..len];
            let Ok(ip) = engine::wire::Ipv4Packet::parse(packet) else { panic!("the stack sent a broken packet") };
            assert_eq!((ip.src(), ip.dst()), (US, VM), "the stack sent to another address");
            let tcp = engine::wire::TcpHeader::parse(ip.payload()).expect("the stack sends TCP only");
            if tcp.is_syn() && !tcp.is_ack() {
                self.syn_seq = Some(tcp.seq.get());
            }
            self.sent.push((tcp.src_port.get(), tcp.dst_port.get()));
        }
    }

    let Ok(poll) = mio::Poll::new() else { return };
    let stats = Stats::default();
    let mut ring = Ring::default();
    let mut sink = Sink { syn_seq: None, sent: Vec::new(), plain: vec![0; 2048] };
    let mut config = Config::new(HardwareAddress::Ip);
    config.random_seed = 7;
    let mut now = smoltcp::time::Instant::from_millis(0);
    let mut iface = {
        let mut dev = Device { rx: &mut ring, noise: &mut sink, stats: &stats };
        Interface::new(config, &mut dev, now)
    };
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(US.into(), 24));
    });
    let mut sockets = SocketSet::new(vec![]);
    let mut streams = Streams::new(Default::default());
    let (reply, _answers) = crossbeam_channel::bounded(1);
    let t0 = std::time::Instant::now();
    streams.open(&mut iface, &mut sockets, VM, 22, reply, t0);
    let mut rest = data;
    while let [flags, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let mut packet = tail[..n].to_vec();
        rest = &tail[n..];
        if flags & 1 == 1 {
            answer_our_syn(&mut packet, sink.syn_seq);
        }
        now += smoltcp::time::Duration::from_millis(u64::from(flags >> 1) * 50);
        let admitted = fence::admit(&packet, VM, US, |l, r| streams.opened(l, r)).is_ok();
        if admitted {
            if let Some(slot) = ring.free_slot() {
                let k = packet.len().min(slot.len());
                slot[..k].copy_from_slice(&packet[..k]);
                ring.commit(k);
            }
        }
        let mut dev = Device { rx: &mut ring, noise: &mut sink, stats: &stats };
        iface.poll(now, &mut dev, &mut sockets);
        streams.service(&mut sockets, poll.registry(), t0, &stats);
        for (ours, theirs) in sink.sent.drain(..) {
            assert!(
                streams.opened(ours, theirs) || theirs == 22,
                "the stack answered the VM on a flow it did not open: {ours} -> {theirs}"
            );
        }
    }
}

/// Makes `packet` (IPv4 with TCP, as far as it goes) acknowledge our SYN `syn_seq`, with its
/// IPv4 and TCP checksums right, so the fuzzer gets past the stack's first checks.
fn answer_our_syn(packet: &mut [u8], syn_seq: Option<u32>) {
    use engine::wire::csum::Checksum;
    let ihl = usize::from(packet.first().copied().unwrap_or(0) & 0x0f) * 4;
    if ihl < 20 || packet.len() < ihl + 20 {
        return;
    }
    if let (Some(seq), Some(ack)) = (syn_seq, packet.get_mut(ihl + 8..ihl + 12)) {
        ack.copy_from_slice(&seq.wrapping_add(1).to_be_bytes());
    }
    let total = packet.len();
    let Ok(total16) = u16::try_from(total) else { return };
    packet[2..4].copy_from_slice(&total16.to_be_bytes());
    packet[10..12].copy_from_slice(&[0, 0]);
    let c = Checksum::new().add(&packet[..ihl]).finish();
    packet[10..12].copy_from_slice(&c.to_be_bytes());
    let Ok(seg_len) = u16::try_from(total - ihl) else { return };
    let (src, dst) = (<[u8; 4]>::try_from(&packet[12..16]), <[u8; 4]>::try_from(&packet[16..20]));
    let (Ok(src), Ok(dst)) = (src, dst) else { return };
    packet[ihl + 16..ihl + 18].copy_from_slice(&[0, 0]);
    let c = Checksum::new().add_pseudo_header(src, dst, 6, seg_len).add(&packet[ihl..]).finish();
    packet[ihl + 16..ihl + 18].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Message;

    /// Sessions of pseudo-random steps hold every invariant (the fuzz target searches
    /// further; its corpus is replayed by `mesh/tests/fuzz_replay.rs`).
    #[test]
    fn random_sessions_hold_the_invariants() {
        let mut x: u32 = 0x9e37_79b9;
        for _ in 0..8 {
            session(&noise(&mut x, STEPS * 3));
        }
    }

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
            consumer_proof_key: None,
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
            Message::VmStatus {
                vm_id: "0123456789abcdef".into(),
                state: wire::RunState::Paused,
                reason: "the provider's disk is full".into(),
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
