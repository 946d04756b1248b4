//! The wire, shared by both roles: the UDP socket, this node's keys, the peers it knows, the
//! replay window, and who waits for which answer. Its table has a lock of its own, held only
//! for bookkeeping (never across a send or a wait).
use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ::engine::log::RateLimiter;
use ed25519_dalek::SigningKey;

use crate::net::Network;
use crate::wire::{self, Message, Seen};

/// Peers remembered.
const MAX_PEERS: usize = 1024;

/// A peer heard from.
#[derive(Debug)]
pub(super) struct Peer {
    pub endpoint: SocketAddrV4,
    pub last_seen: Instant,
}

/// Who waits for an answer: the peer it must come from and where to hand it.
type Waiter = (String, mpsc::SyncSender<(Message, SocketAddrV4)>);

#[derive(Debug)]
struct Table {
    peers: HashMap<String, Peer>,
    seen: Seen,
    /// Who waits for an answer under a key, and from which peer it must come.
    waiters: HashMap<String, Waiter>,
    /// The envelope time of the last heartbeat (or answer) taken from each peer: an older
    /// one is a replay and is ignored.
    last_beat: HashMap<String, u64>,
    drops: u64,
    /// Dropped datagrams are logged at most once a second.
    drop_log: RateLimiter,
}

/// This node on the wire.
#[derive(Debug)]
pub(super) struct Link {
    net: Network,
    id: String,
    me: SigningKey,
    my_id: String,
    sock: UdpSocket,
    table: Mutex<Table>,
}

impl Link {
    pub fn new(net: Network, me: SigningKey, sock: UdpSocket) -> Self {
        let id = net.id();
        let my_id = crate::net::peer_id(&me.verifying_key().to_bytes());
        let table = Table {
            peers: HashMap::new(),
            seen: Seen::default(),
            waiters: HashMap::new(),
            last_beat: HashMap::new(),
            drops: 0,
            drop_log: RateLimiter::new(1, 1),
        };
        Self { net, id, me, my_id, sock, table: Mutex::new(table) }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// This node's peer ID.
    pub fn my_id(&self) -> &str {
        &self.my_id
    }

    /// The network's ID.
    pub fn network_id(&self) -> &str {
        &self.id
    }

    /// The network's name.
    pub fn network_name(&self) -> &str {
        &self.net.name
    }

    /// Datagrams dropped so far.
    pub fn drops(&self) -> u64 {
        self.lock().drops
    }

    /// Peers known.
    pub fn peer_count(&self) -> usize {
        self.lock().peers.len()
    }

    /// Every known peer: (ID, endpoint, seconds since its last datagram).
    pub fn peers(&self) -> Vec<(String, SocketAddrV4, u64)> {
        self.lock().peers.iter().map(|(id, p)| (id.clone(), p.endpoint, p.last_seen.elapsed().as_secs())).collect()
    }

    /// Seals and sends `msg` (a failure is logged: the peer may be gone).
    pub fn send(&self, to_id: &str, to: SocketAddrV4, msg: Message) {
        let d = match wire::seal(&self.net.key, &self.me, to_id, msg) {
            Ok(d) => d,
            Err(e) => return ::engine::error!("sending to {to_id} at {to}: {e}"),
        };
        if let Err(e) = self.sock.send_to(&d, to) {
            ::engine::warn!("sending to {to_id} at {to}: {e}");
        }
    }

    /// Where `id` was last heard from, else its bootstrap entry.
    pub fn peer_endpoint(&self, id: &str) -> Option<SocketAddrV4> {
        if let Some(p) = self.lock().peers.get(id) {
            return Some(p.endpoint);
        }
        self.net.bootstrap.iter().find(|b| b.peer_id() == id).map(|b| b.endpoint)
    }

    /// Hellos to the bootstrap peers (asking for an answer at the start, or from one not
    /// heard from yet).
    pub fn say_hello_to_bootstrap(&self, first: bool) {
        for b in &self.net.bootstrap {
            if b.peer_id() == self.my_id {
                continue;
            }
            let known = self.lock().peers.contains_key(b.peer_id());
            self.send(b.peer_id(), b.endpoint, Message::Hello { reply: first || !known });
        }
    }

    /// Keepalives: the bootstrap peers, then every other peer known.
    pub fn keepalive(&self) {
        self.say_hello_to_bootstrap(false);
        let peers: Vec<(String, SocketAddrV4)> =
            self.lock().peers.iter().map(|(id, p)| (id.clone(), p.endpoint)).collect();
        for (id, ep) in peers {
            if !self.net.bootstrap.iter().any(|b| b.peer_id() == id) {
                self.send(&id, ep, Message::Hello { reply: false });
            }
        }
    }

    /// Receives until `stop`: each datagram opened and checked, then given to `dispatch`
    /// with its sender's ID, address and envelope time.
    pub fn receive_loop(&self, stop: &AtomicBool, dispatch: impl Fn(String, SocketAddrV4, u64, Message)) {
        let mut buf = vec![0u8; wire::MAX_DATAGRAM + 1];
        while !stop.load(Ordering::SeqCst) {
            let (n, from) = match self.sock.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ICMP errors of earlier sends show here once: not fatal.
                    if e.kind() != std::io::ErrorKind::ConnectionRefused {
                        ::engine::warn!("receiving: {e}");
                    }
                    continue;
                }
            };
            let SocketAddr::V4(from) = from else { continue };
            let Some(data) = buf.get(..n) else { continue };
            let opened = {
                let mut t = self.lock();
                wire::open(&self.net.key, &self.my_id, data, crate::now_s(), &mut t.seen)
            };
            match opened {
                Ok((env, _)) => dispatch(env.from_peer_id, from, env.timestamp, env.payload),
                Err(why) => self.dropped(&why, from, n),
            }
        }
    }

    /// Counts a dropped datagram and logs it at most once a second (header facts only).
    pub fn dropped(&self, why: &wire::Drop, from: SocketAddrV4, len: usize) {
        let mut t = self.lock();
        t.drops += 1;
        let Some(more) = t.drop_log.allow(Instant::now()) else { return };
        drop(t);
        let more = if more > 0 { format!(" ({more} more dropped since the last line)") } else { String::new() };
        ::engine::warn!("{why}: {len} bytes from {from}, dropped{more}");
    }

    /// Whether the peer table is full and `id` is not in it.
    pub fn table_full_without(&self, id: &str) -> bool {
        let t = self.lock();
        t.peers.len() >= MAX_PEERS && !t.peers.contains_key(id)
    }

    /// Forgets the peer seen longest ago, unless it is in `busy`.
    pub fn evict_oldest(&self, busy: &HashSet<String>) {
        let mut t = self.lock();
        let victim = t
            .peers
            .iter()
            .filter(|(id, _)| !busy.contains(*id))
            .min_by_key(|(_, p)| p.last_seen)
            .map(|(id, _)| id.clone());
        if let Some(v) = victim {
            t.peers.remove(&v);
        }
    }

    /// Notes a datagram from `id` at `from` (envelope time `ts`); `false` when it is a
    /// heartbeat (`beat`) older than the last one taken from that peer: a replay to ignore.
    pub fn note(&self, id: &str, from: SocketAddrV4, ts: u64, beat: bool) -> bool {
        let mut t = self.lock();
        if t.peers.len() < MAX_PEERS || t.peers.contains_key(id) {
            t.peers.insert(id.to_string(), Peer { endpoint: from, last_seen: Instant::now() });
        }
        if beat {
            let last = t.last_beat.get(id).copied().unwrap_or(0);
            if ts < last {
                return false;
            }
            if t.last_beat.len() < MAX_PEERS || t.last_beat.contains_key(id) {
                t.last_beat.insert(id.to_string(), ts);
            }
        }
        true
    }

    /// Hands an answer to whoever waits for `key`, if it comes from the peer asked; whether
    /// someone took it. (Every member can read a request's ID off the wire: an answer from
    /// anyone else is not one.)
    pub fn answer(&self, key: &str, from_id: &str, msg: Message, from: SocketAddrV4) -> bool {
        let mut t = self.lock();
        match t.waiters.get(key) {
            Some((peer, _)) if peer == from_id => {}
            _ => return false,
        }
        match t.waiters.remove(key) {
            Some((_, tx)) => tx.try_send((msg, from)).is_ok(),
            None => false,
        }
    }

    /// Sends `msg` to `peer` and waits for the answer filed under `key`.
    pub fn ask(
        &self,
        peer: &str,
        to: SocketAddrV4,
        key: String,
        msg: Message,
        wait: Duration,
    ) -> Option<(Message, SocketAddrV4)> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.lock().waiters.insert(key.clone(), (peer.to_string(), tx));
        self.send(peer, to, msg);
        let got = rx.recv_timeout(wait).ok();
        self.lock().waiters.remove(&key);
        got
    }
}

/// Our address toward `to` (the one the kernel picks for it).
pub(super) fn local_ip_toward(to: SocketAddrV4) -> Option<std::net::Ipv4Addr> {
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect(to).ok()?;
    match s.local_addr().ok()? {
        SocketAddr::V4(a) => Some(*a.ip()),
        SocketAddr::V6(_) => None,
    }
}
