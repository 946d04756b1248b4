//! The wire, shared by both roles: the UDP socket, this node's keys, admission (the peer table,
//! per-source and per-peer rates, replay windows, paths: [`crate::admit`]) with its journal,
//! and who waits for which answer. Its table has a lock of its own, held for bookkeeping and
//! while one datagram is taken in ([`crate::receive::take`]: a decryption and a signature
//! check at most), never across a send or a wait.
use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ::engine::log::RateLimiter;
use ed25519_dalek::SigningKey;

use super::journal::Journal;
use crate::admit::{Admission, Limits, Refusal};
use crate::net::{Home, HomeError, Network};
use crate::receive::{self, Clock, Outcome};
use crate::wire::{self, Message};

/// Who waits for an answer: the peer it must come from and where to hand it.
type Waiter = (String, mpsc::SyncSender<(Message, SocketAddrV4)>);

#[derive(Debug)]
struct Table {
    admission: Admission,
    journal: Journal,
    /// Who waits for an answer under a key, and from which peer it must come.
    waiters: HashMap<String, Waiter>,
    /// Peers that rent or provide here (never evicted for a newcomer), as the timer last
    /// found them.
    kept: HashSet<String>,
    /// Datagrams that did not open (decryption, parsing, signature, addressee, staleness).
    drops: u64,
    /// Dropped and refused datagrams are logged at most once a second.
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
    /// The monotonic clock admission counts in.
    epoch: Instant,
    table: Mutex<Table>,
}

impl Link {
    /// The wire of `net`, with the floors of its journal under `home`; `pinned` (the peers
    /// the operator named) always have room in the peer table.
    pub fn new(
        net: Network,
        me: SigningKey,
        sock: UdpSocket,
        home: &Home,
        pinned: &[String],
    ) -> Result<Self, HomeError> {
        let id = net.id();
        let my_id = crate::net::peer_id(&me.verifying_key().to_bytes());
        let (journal, floors) = Journal::open(home, &id, crate::now_s())?;
        let bootstrap: Vec<(String, SocketAddrV4)> = net
            .bootstrap
            .iter()
            .filter(|b| b.peer_id() != my_id)
            .map(|b| (b.peer_id().to_string(), b.endpoint))
            .collect();
        let table = Table {
            admission: Admission::new(Limits::default(), floors, &bootstrap, pinned),
            journal,
            kept: HashSet::new(),
            waiters: HashMap::new(),
            drops: 0,
            drop_log: RateLimiter::new(1, 1),
        };
        Ok(Self { net, id, me, my_id, sock, epoch: Instant::now(), table: Mutex::new(table) })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
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

    /// Datagrams that did not open, and messages refused by kind (admission's counters).
    pub fn drops(&self) -> (u64, Vec<(Refusal, u64)>) {
        let t = self.lock();
        (t.drops, t.admission.counts().1)
    }

    /// Peers known.
    pub fn peer_count(&self) -> usize {
        self.lock().admission.len()
    }

    /// Every known peer: (ID, endpoint, seconds since its last message acted on).
    pub fn peers(&self) -> Vec<(String, SocketAddrV4, u64)> {
        let now = self.now_ms();
        self.lock().admission.peers(now).into_iter().map(|(id, ep, ms)| (id, ep, ms / 1000)).collect()
    }

    /// Syncs the replay journal (and compacts it when it has grown), and notes the peers that
    /// rent or provide here: the timer's, each tick. The sync runs without the lock held.
    pub fn tick(&self, kept: HashSet<String>) {
        let file = {
            let mut t = self.lock();
            t.kept = kept;
            let now = crate::now_s();
            let Table { admission, journal, .. } = &mut *t;
            journal.compact(admission.floors(), now);
            journal.due()
        };
        if let Some((f, path)) = file {
            if let Err(e) = f.sync_data() {
                ::engine::warn!("{}: {e}", path.display());
            }
        }
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
        if let Some(ep) = self.lock().admission.endpoint(id) {
            return Some(ep);
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
            let known = self.lock().admission.knows(b.peer_id());
            self.send(b.peer_id(), b.endpoint, Message::Hello { reply: first || !known });
        }
    }

    /// Keepalives: the bootstrap peers, then every other peer known.
    pub fn keepalive(&self) {
        self.say_hello_to_bootstrap(false);
        let peers: Vec<(String, SocketAddrV4)> =
            self.lock().admission.peers(0).into_iter().map(|(id, ep, _)| (id, ep)).collect();
        for (id, ep) in peers {
            if !self.net.bootstrap.iter().any(|b| b.peer_id() == id) {
                self.send(&id, ep, Message::Hello { reply: false });
            }
        }
    }

    /// Receives until `stop`: each datagram taken in by [`receive::take`] (admitted by its
    /// source, opened, checked, admitted by its peer) and given to `dispatch` with its
    /// sender's ID, address and envelope time.
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
            let clock = Clock { now_s: crate::now_s(), now_ms: self.now_ms() };
            let outcome = {
                let mut t = self.lock();
                let Table { admission, journal, kept, .. } = &mut *t;
                let nonce = || crate::random_id().unwrap_or_default();
                receive::take(admission, &self.net.key, &self.my_id, data, from, clock, kept, nonce, |p, f| {
                    journal.reserve(p, f)
                })
            };
            match outcome {
                Outcome::Dispatch { env, moved } => {
                    if moved {
                        ::engine::info!(
                            "peer {} answered our challenge from {from}: its endpoint moved there",
                            env.from_peer_id
                        );
                    }
                    dispatch(env.from_peer_id, from, env.timestamp, env.payload);
                }
                Outcome::Challenge { peer, to, nonce } => {
                    self.refused(Refusal::OtherPath, Some(&peer), from);
                    self.send(&peer, to, Message::Ping { nonce });
                }
                Outcome::Dropped(why) => self.dropped(&why, from, n),
                Outcome::Refused { why, peer } => self.refused(why, peer.as_deref(), from),
                Outcome::Unrecorded { env, error, .. } => {
                    ::engine::error!("the replay journal: {error}: a message from {} not acted on", env.from_peer_id);
                }
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

    /// Logs a refusal (counted by admission) at most once a second, naming the peer and
    /// address.
    fn refused(&self, why: Refusal, peer: Option<&str>, from: SocketAddrV4) {
        let Some(more) = self.lock().drop_log.allow(Instant::now()) else { return };
        let more = if more > 0 { format!(" ({more} more dropped since the last line)") } else { String::new() };
        match peer {
            Some(p) => ::engine::warn!("refused {why}: peer {p} from {from}{more}"),
            None => ::engine::warn!("refused {why}: from {from}{more}"),
        }
    }

    /// Whether a heartbeat (or its answer) from `id` stamped `ts` is newer than the last one
    /// taken: an older one is a replay to ignore.
    pub fn fresh_beat(&self, id: &str, ts: u64) -> bool {
        self.lock().admission.beat(id, ts)
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
