//! Admission: what a datagram must pass before the daemon remembers anything about it or acts
//! on it. Its one job is to make a member's flood cost that member, and nobody else.
//!
//! In order:
//! 1. **By source**, before any decryption ([`Admission::source`]): a token bucket per source
//!    address and one for all unknown addresses together, except for the address a known
//!    peer was last validated at (a non-member
//!    forging that address must not make the peer deaf: what it sends fails the AEAD, which
//!    is cheap). Whatever does not decrypt costs at most one decryption, and a source over its
//!    rate costs not even that.
//! 2. Decryption ([`crate::wire::decrypt`]); a datagram from a known peer's address is then
//!    charged to that peer's own check budget before it is parsed
//!    ([`Admission::after_decrypt`]; a member flooding from its address costs a decryption
//!    per datagram past it), and once parsed, one that claims to be another peer is charged
//!    to its source's bucket ([`Admission::before_verify`]). Then the signature, addressee,
//!    hop count and freshness (±[`MAX_SKEW_S`]).
//! 3. **By peer** ([`Admission::admit`]): the sender needs a slot in the peer table. A
//!    newcomer is admitted at a bounded rate (per source IP and in all): fresh identities cost
//!    nothing to make, so they cannot be let in faster than keepalives refresh the peers that
//!    talk; and only once its message is judged acceptable does it take the slot of the peer
//!    heard from longest ago, never a bootstrap peer nor one that rents or provides here
//!    (`kept`). Each slot has its own replay window (the IDs of its unexpired messages,
//!    bounded), token bucket and a floor: its messages stamped at or before the floor are
//!    refused. The floor comes from the journal of reservations ([`Accept::reserve`]): before
//!    a message stamped `t` is acted on, the daemon writes that it accepts nothing of that
//!    peer's at or before `t + reserve_s` (0 by default) again once the slot is gone, by
//!    eviction or by a restart ([`Admission::commit`] once written). So nothing captured
//!    before a restart is accepted after it, and a peer whose slot was evicted is deaf only
//!    for the rest of its last second (plus `reserve_s`) when it comes back.
//! 4. **By path**: a known peer's message from another address is not acted on. The peer is
//!    challenged there (a ping of a fresh nonce, at most one per `challenge_every_ms`), and
//!    its endpoint moves only when its signed pong carrying that nonce comes back from there.
//!    A datagram captured and replayed from elsewhere moves nothing, and, refused before its ID
//!    is remembered, does not stop the original from being accepted.
//!
//! Only then is the message's ID remembered, the peer's rate charged and the message
//! dispatched. Everything here is bounded (sources, newcomer IPs, slots, window per slot,
//! floors), and time is the caller's (`now_s`: the wall clock the envelopes are stamped with;
//! `now_ms`: a monotonic clock), so the fuzz target drives it with a fake clock.
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};

use crate::wire::{Envelope, Message, MAX_SKEW_S};

/// The bounds and rates (the defaults are the daemon's).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Datagrams a second one source address may have opened, sustained.
    pub source_per_s: u32,
    /// And in a burst.
    pub source_burst: u32,
    /// Datagrams a second all unknown addresses together may have opened (a flood from many
    /// addresses costs what this many cost; known peers' addresses are not counted).
    pub strangers_per_s: u32,
    /// And in a burst.
    pub strangers_burst: u32,
    /// Signature checks a second for datagrams from a known peer's address claiming to be it.
    pub verify_per_s: u32,
    /// And in a burst.
    pub verify_burst: u32,
    /// Messages a second one peer may have acted on, sustained.
    pub peer_per_s: u32,
    /// And in a burst.
    pub peer_burst: u32,
    /// New peers a second from one source IP.
    pub newcomer_ip_per_s: u32,
    /// And in a burst.
    pub newcomer_ip_burst: u32,
    /// New peers a second in all.
    pub newcomer_per_s: u32,
    /// And in a burst.
    pub newcomer_burst: u32,
    /// IDs remembered per peer (above what its rate can fill in a window's time).
    pub window: usize,
    /// Peer slots.
    pub max_peers: usize,
    /// Source buckets (and newcomer IP buckets).
    pub max_sources: usize,
    /// Floors remembered (peers heard from within the last few minutes).
    pub max_floors: usize,
    /// Seconds each reservation reaches ahead of the message that made it.
    pub reserve_s: u64,
    /// A peer heard within this long is never evicted for a newcomer (three keepalives).
    pub keep_recent_ms: u64,
    /// Least time between two challenges of one peer.
    pub challenge_every_ms: u64,
    /// How long a challenge may be answered.
    pub challenge_ttl_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            source_per_s: 100,
            source_burst: 200,
            strangers_per_s: 500,
            strangers_burst: 1000,
            verify_per_s: 200,
            verify_burst: 400,
            peer_per_s: 5,
            peer_burst: 50,
            newcomer_ip_per_s: 2,
            newcomer_ip_burst: 20,
            // 1,024 slots turn over in no less than 20 s: peers that talk (a keepalive every
            // 15 s by default) keep theirs.
            newcomer_per_s: 50,
            newcomer_burst: 100,
            // 5 a second for the 240 s an ID is kept, and the burst: 1,250.
            window: 1280,
            max_peers: 1024,
            max_sources: 4096,
            // 50 newcomers a second for the 245 s a floor may matter: 12,250.
            max_floors: 1 << 15,
            // The floor is the last stamp accepted: after a restart (or an eviction) a peer is
            // deaf for the rest of that second only.
            reserve_s: 0,
            keep_recent_ms: 45_000,
            challenge_every_ms: 2000,
            challenge_ttl_ms: 5000,
        }
    }
}

/// Why a datagram or a message was not acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Its source sends faster than its rate (dropped before decryption).
    SourceRate,
    /// Not a refusal: the source table was full of busy sources and was forgotten (counted
    /// for operators: many sources at once).
    SourcesReset,
    /// Unknown addresses together send faster than their rate (dropped before decryption).
    StrangerRate,
    /// A known peer's address sends more claimed messages of it than its check budget.
    VerifyRate,
    /// Its peer sends faster than its rate.
    PeerRate,
    /// A new peer while newcomers arrive faster than their rate (from its IP, or in all).
    NewcomerRate,
    /// Its ID was accepted before.
    Duplicate,
    /// Its peer's replay window is full.
    WindowFull,
    /// Stamped at or before its peer's floor: accepted before a restart or an eviction.
    BeforeFloor,
    /// A known peer's message from another address (a challenge went there).
    OtherPath,
    /// The peer table is full of peers that are never evicted.
    TableFull,
    /// Too many floors are remembered to take a new peer.
    FloorsFull,
}

impl Refusal {
    /// Every kind, for counters.
    pub const ALL: [Refusal; 12] = [
        Refusal::SourceRate,
        Refusal::StrangerRate,
        Refusal::SourcesReset,
        Refusal::VerifyRate,
        Refusal::PeerRate,
        Refusal::NewcomerRate,
        Refusal::Duplicate,
        Refusal::WindowFull,
        Refusal::BeforeFloor,
        Refusal::OtherPath,
        Refusal::TableFull,
        Refusal::FloorsFull,
    ];

    /// Its counter's name.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::SourceRate => "source_rate",
            Refusal::SourcesReset => "sources_reset",
            Refusal::StrangerRate => "stranger_rate",
            Refusal::VerifyRate => "verify_rate",
            Refusal::PeerRate => "peer_rate",
            Refusal::NewcomerRate => "newcomer_rate",
            Refusal::Duplicate => "duplicate",
            Refusal::WindowFull => "window_full",
            Refusal::BeforeFloor => "before_floor",
            Refusal::OtherPath => "other_path",
            Refusal::TableFull => "table_full",
            Refusal::FloorsFull => "floors_full",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::SourceRate => "a source over its rate",
            Refusal::SourcesReset => "many busy sources at once (their rates were reset)",
            Refusal::StrangerRate => "an unknown address while unknown addresses send too much",
            Refusal::VerifyRate => "a known peer's address over its check budget",
            Refusal::PeerRate => "a peer over its rate",
            Refusal::NewcomerRate => "a new peer while new peers arrive too fast",
            Refusal::Duplicate => "a replayed message (its ID was seen)",
            Refusal::WindowFull => "a peer whose replay window is full",
            Refusal::BeforeFloor => "a replayed message (stamped before this peer's floor)",
            Refusal::OtherPath => "a known peer's message from another address (challenged there)",
            Refusal::TableFull => "a new peer while the table is full of bootstrap and renting peers",
            Refusal::FloorsFull => "a new peer while the floors are full",
        })
    }
}

/// What to do with a message that passed [`crate::wire::Unverified::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Act on it.
    Accept(Accept),
    /// Do not act on it; ping the peer at `to` with `nonce` (its pong from there moves it).
    Challenge {
        /// Where the message came from.
        to: SocketAddrV4,
        /// The nonce the pong must carry.
        nonce: String,
    },
    /// Do not act on it.
    Refuse(Refusal),
}

/// An accepted message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accept {
    /// A reservation to write to the journal before the message is acted on (and then to
    /// [`Admission::commit`]): the peer's messages stamped at or before it are refused after a
    /// restart. Not written: the message must not be acted on.
    pub reserve: Option<u64>,
    /// The peer's endpoint moved to the message's source (a challenge answered).
    pub moved: bool,
}

/// A token bucket, in thousandths of a token.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    milli: u64,
    at_ms: u64,
}

impl Bucket {
    fn full(burst: u32, now_ms: u64) -> Self {
        Self { milli: u64::from(burst) * 1000, at_ms: now_ms }
    }

    fn refill(&mut self, per_s: u32, burst: u32, now_ms: u64) {
        let add = now_ms.saturating_sub(self.at_ms).saturating_mul(u64::from(per_s));
        self.milli = self.milli.saturating_add(add).min(u64::from(burst) * 1000);
        self.at_ms = self.at_ms.max(now_ms);
    }

    fn take(&mut self, per_s: u32, burst: u32, now_ms: u64) -> bool {
        self.refill(per_s, burst, now_ms);
        if self.milli < 1000 {
            return false;
        }
        self.milli -= 1000;
        true
    }

    fn is_full(mut self, per_s: u32, burst: u32, now_ms: u64) -> bool {
        self.refill(per_s, burst, now_ms);
        self.milli >= u64::from(burst) * 1000
    }
}

/// Buckets by key, bounded: when full of busy ones, all are forgotten (which hands out new
/// bursts, where refusing new keys would let whoever holds many shut everyone else out).
#[derive(Debug)]
struct Buckets<K> {
    map: HashMap<K, Bucket>,
}

impl<K: std::hash::Hash + Eq> Buckets<K> {
    fn new() -> Self {
        Self { map: HashMap::new() }
    }

    /// Takes a token of `key`'s bucket; `Err(reset)` when it has none (`reset`: the table was
    /// forgotten on the way).
    fn take(&mut self, key: K, per_s: u32, burst: u32, max: usize, now_ms: u64) -> (bool, bool) {
        let mut reset = false;
        if !self.map.contains_key(&key) && self.map.len() >= max {
            self.map.retain(|_, b| !b.is_full(per_s, burst, now_ms));
            if self.map.len() >= max {
                self.map.clear();
                reset = true;
            }
        }
        let b = self.map.entry(key).or_insert_with(|| Bucket::full(burst, now_ms));
        (b.take(per_s, burst, now_ms), reset)
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// The IDs of a peer's messages accepted lately, each kept for twice [`MAX_SKEW_S`] after
/// its receipt (by then the message itself is stale).
#[derive(Debug, Default)]
struct Window {
    ids: HashSet<u64>,
    order: VecDeque<(u64, u64)>,
}

impl Window {
    fn expire(&mut self, now_s: u64) {
        while let Some(&(at, id)) = self.order.front() {
            if now_s.saturating_sub(at) <= 2 * MAX_SKEW_S {
                break;
            }
            self.order.pop_front();
            self.ids.remove(&id);
        }
    }
}

/// Challenges pending per peer.
const MAX_CHALLENGES: usize = 8;

/// A pending challenge.
#[derive(Debug, Clone)]
struct Challenge {
    to: SocketAddrV4,
    nonce: String,
    sent_ms: u64,
}

/// A peer's slot.
#[derive(Debug)]
struct Slot {
    endpoint: SocketAddrV4,
    last_ms: u64,
    floor: u64,
    bucket: Bucket,
    verify: Bucket,
    window: Window,
    /// Challenges pending, one per address at most, the oldest first (several: a replay
    /// from one address must not keep the peer's real new address from being challenged).
    challenges: Vec<Challenge>,
    /// The envelope time of the last heartbeat (or answer) taken: an older one is ignored.
    last_beat: u64,
}

/// Admission's state (module doc).
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    sources: Buckets<SocketAddrV4>,
    newcomer_ips: Buckets<Ipv4Addr>,
    newcomers: Bucket,
    strangers: Bucket,
    slots: HashMap<String, Slot>,
    /// Where each slot's peer was last validated: datagrams from there skip the source rate.
    at: HashMap<SocketAddrV4, String>,
    /// The journal's reservations: peer → the stamp at or before which its messages are
    /// refused when it takes a new slot.
    floors: HashMap<String, u64>,
    /// Bootstrap peers and their endpoints from the invite: never evicted, always room, and
    /// a first message from elsewhere is challenged.
    bootstrap: HashMap<String, SocketAddrV4>,
    /// Peers that always have room and are never evicted: the bootstrap peers and those the
    /// operator named (`--allow-peer`).
    pinned: HashSet<String>,
    refused: HashMap<Refusal, u64>,
    accepted: u64,
}

impl Admission {
    /// Empty, with the floors a journal held, the network's bootstrap peers and the peers the
    /// operator named (`pinned`: never evicted, always room).
    pub fn new(
        limits: Limits,
        floors: HashMap<String, u64>,
        bootstrap: &[(String, SocketAddrV4)],
        pinned: &[String],
    ) -> Self {
        let newcomers = Bucket::full(limits.newcomer_burst, 0);
        let strangers = Bucket::full(limits.strangers_burst, 0);
        Self {
            strangers,
            limits,
            sources: Buckets::new(),
            newcomer_ips: Buckets::new(),
            newcomers,
            slots: HashMap::new(),
            // Bootstrap peers' addresses are known from the invite, before they are heard.
            at: bootstrap.iter().map(|(id, ep)| (*ep, id.clone())).collect(),
            floors,
            bootstrap: bootstrap.iter().cloned().collect(),
            pinned: bootstrap.iter().map(|b| b.0.clone()).chain(pinned.iter().cloned()).collect(),
            refused: HashMap::new(),
            accepted: 0,
        }
    }

    /// Counts a refusal.
    fn refuse(&mut self, why: Refusal) -> Refusal {
        *self.refused.entry(why).or_insert(0) += 1;
        why
    }

    /// Charges `from`'s source bucket.
    fn charge_source(&mut self, from: SocketAddrV4, now_ms: u64) -> Result<(), Refusal> {
        let l = &self.limits;
        let (ok, reset) = self.sources.take(from, l.source_per_s, l.source_burst, l.max_sources, now_ms);
        if reset {
            self.refuse(Refusal::SourcesReset);
        }
        if ok {
            Ok(())
        } else {
            Err(self.refuse(Refusal::SourceRate))
        }
    }

    /// Step 1: whether a datagram from `from` may be decrypted at all (a known peer's
    /// address always may: its own budget is charged once it decrypts).
    pub fn source(&mut self, from: SocketAddrV4, now_ms: u64) -> Result<(), Refusal> {
        if self.at.contains_key(&from) {
            return Ok(());
        }
        self.charge_source(from, now_ms)
    }

    /// Step 2, once a datagram from `from` decrypted (a member sealed it), before it is parsed
    /// and its signature checked: from a known peer's address, it is charged to that peer's
    /// check budget (a member flooding from its address costs a decryption per datagram past
    /// it); from a bootstrap peer's address not heard yet, to that address's bucket; from an
    /// unknown address, to the budget all unknown addresses share (garbage, which never
    /// decrypts, is not counted there: a non-member cannot spend it).
    pub fn after_decrypt(&mut self, from: SocketAddrV4, now_ms: u64) -> Result<(), Refusal> {
        let (per_s, burst) = (self.limits.verify_per_s, self.limits.verify_burst);
        match self.at.get(&from).map(|owner| self.slots.get_mut(owner)) {
            Some(Some(slot)) => {
                if slot.verify.take(per_s, burst, now_ms) {
                    Ok(())
                } else {
                    Err(self.refuse(Refusal::VerifyRate))
                }
            }
            Some(None) => self.charge_source(from, now_ms),
            None => {
                let (per_s, burst) = (self.limits.strangers_per_s, self.limits.strangers_burst);
                if self.strangers.take(per_s, burst, now_ms) {
                    Ok(())
                } else {
                    Err(self.refuse(Refusal::StrangerRate))
                }
            }
        }
    }

    /// Step 2, once parsed: a datagram from a known peer's address claiming to be another
    /// peer pays as any source does.
    pub fn before_verify(&mut self, claimed: &str, from: SocketAddrV4, now_ms: u64) -> Result<(), Refusal> {
        match self.at.get(&from) {
            Some(owner) if owner != claimed => self.charge_source(from, now_ms),
            _ => Ok(()),
        }
    }

    /// Steps 3 and 4 for a message whose signature checked, from `from`. `kept`: peers never
    /// evicted for a newcomer (those that rent or provide here; the caller need only fill it
    /// when [`Admission::full_without`] says a newcomer needs room). `nonce` makes a
    /// challenge's nonce (called only when one is sent).
    pub fn admit(
        &mut self,
        env: &Envelope,
        from: SocketAddrV4,
        now_s: u64,
        now_ms: u64,
        kept: &HashSet<String>,
        nonce: impl FnOnce() -> String,
    ) -> Verdict {
        let Some(id) = u64::from_str_radix(&env.message_id, 16).ok().filter(|_| env.message_id.len() == 16) else {
            // `verify` checked the ID's form: never here.
            return Verdict::Refuse(self.refuse(Refusal::Duplicate));
        };
        let peer = env.from_peer_id.as_str();
        let (mut slot, new) = match self.slots.remove(peer) {
            Some(s) => (s, false),
            None => match self.newcomer(peer, from, now_s, now_ms) {
                Ok(s) => (s, true),
                Err(why) => return Verdict::Refuse(self.refuse(why)),
            },
        };
        let verdict = judge(&mut slot, &self.limits, env, id, from, now_s, now_ms, nonce);
        // A newcomer takes a slot only once it is accepted or challenged, and only then
        // makes room.
        if new
            && !matches!(verdict, Verdict::Refuse(_))
            && self.full_without(peer)
            && self.evict_one(kept, now_ms).is_none()
        {
            return Verdict::Refuse(self.refuse(Refusal::TableFull));
        }
        if !new || !matches!(verdict, Verdict::Refuse(_)) {
            // Two peers at one address: the first keeps it.
            self.at.entry(slot.endpoint).or_insert_with(|| peer.to_string());
            self.slots.insert(peer.to_string(), slot);
        }
        match verdict {
            Verdict::Accept(a) => {
                self.accepted += 1;
                if a.moved {
                    self.at.retain(|ep, p| p != peer || *ep == from);
                    self.at.entry(from).or_insert_with(|| peer.to_string());
                }
                let floor = self.floors.get(peer).copied().unwrap_or(0);
                // One line per peer per second (stamps are whole seconds).
                let reserve = (env.timestamp > floor || !self.floors.contains_key(peer))
                    .then(|| env.timestamp.saturating_add(self.limits.reserve_s));
                Verdict::Accept(Accept { reserve, moved: a.moved })
            }
            Verdict::Challenge { .. } => {
                self.refuse(Refusal::OtherPath);
                verdict
            }
            Verdict::Refuse(why) => Verdict::Refuse(self.refuse(why)),
        }
    }

    /// A new peer's slot, if newcomers may come now (bootstrap peers always may).
    fn newcomer(&mut self, peer: &str, from: SocketAddrV4, now_s: u64, now_ms: u64) -> Result<Slot, Refusal> {
        let l = &self.limits;
        if !self.pinned.contains(peer) {
            let (ok, _) =
                self.newcomer_ips.take(*from.ip(), l.newcomer_ip_per_s, l.newcomer_ip_burst, l.max_sources, now_ms);
            if !ok || !self.newcomers.take(l.newcomer_per_s, l.newcomer_burst, now_ms) {
                return Err(Refusal::NewcomerRate);
            }
        }
        if !self.floors.contains_key(peer) && self.floors.len() >= l.max_floors {
            self.floors.retain(|_, t| t.saturating_add(MAX_SKEW_S) >= now_s);
            if self.floors.len() >= self.limits.max_floors {
                return Err(Refusal::FloorsFull);
            }
        }
        let l = &self.limits;
        Ok(Slot {
            endpoint: self.bootstrap.get(peer).copied().unwrap_or(from),
            last_ms: now_ms,
            floor: self.floors.get(peer).copied().unwrap_or(0),
            bucket: Bucket::full(l.peer_burst, now_ms),
            verify: Bucket::full(l.verify_burst, now_ms),
            window: Window::default(),
            challenges: Vec::new(),
            last_beat: 0,
        })
    }

    /// Records that `peer`'s reservation `t` is in the journal: it is the peer's floor should
    /// it take a new slot.
    pub fn commit(&mut self, peer: &str, t: u64) {
        let f = self.floors.entry(peer.to_string()).or_insert(0);
        *f = (*f).max(t);
    }

    /// Frees a slot for a newcomer at `now_ms`: the peer heard from longest ago that is
    /// neither pinned, nor `kept` (peers with rentals), nor heard within `keep_recent_ms`
    /// (fresh identities that keep themselves fresh cannot push out a peer that talks). Its
    /// floor stays.
    pub fn evict_one(&mut self, kept: &HashSet<String>, now_ms: u64) -> Option<String> {
        let recent = self.limits.keep_recent_ms;
        let victim = self
            .slots
            .iter()
            .filter(|(id, _)| !self.pinned.contains(*id) && !kept.contains(*id))
            .filter(|(_, s)| now_ms.saturating_sub(s.last_ms) >= recent)
            .min_by_key(|(_, s)| s.last_ms)
            .map(|(id, _)| id.clone())?;
        self.slots.remove(&victim);
        self.at.retain(|_, p| *p != victim);
        Some(victim)
    }

    /// Whether a heartbeat (or its answer) stamped `ts` from `peer` is newer than the last
    /// one taken (and takes it).
    pub fn beat(&mut self, peer: &str, ts: u64) -> bool {
        let Some(s) = self.slots.get_mut(peer) else { return false };
        if ts < s.last_beat {
            return false;
        }
        s.last_beat = ts;
        true
    }

    /// Where `peer` is, as last validated.
    pub fn endpoint(&self, peer: &str) -> Option<SocketAddrV4> {
        self.slots.get(peer).map(|s| s.endpoint)
    }

    /// Whether the table is full (a newcomer would need room).
    pub fn is_full(&self) -> bool {
        self.slots.len() >= self.limits.max_peers
    }

    /// Whether the table is full and `peer` has no slot in it (nor a bootstrap peer's room).
    pub fn full_without(&self, peer: &str) -> bool {
        self.slots.len() >= self.limits.max_peers && !self.slots.contains_key(peer) && !self.pinned.contains(peer)
    }

    /// Whether `peer` has a slot.
    pub fn knows(&self, peer: &str) -> bool {
        self.slots.contains_key(peer)
    }

    /// Every peer with a slot: (ID, endpoint, milliseconds since its last accepted message).
    pub fn peers(&self, now_ms: u64) -> Vec<(String, SocketAddrV4, u64)> {
        self.slots.iter().map(|(id, s)| (id.clone(), s.endpoint, now_ms.saturating_sub(s.last_ms))).collect()
    }

    /// Peers with a slot.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no peer has a slot.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The floors (a restart starts from these, as the journal holds them).
    pub fn floors(&self) -> &HashMap<String, u64> {
        &self.floors
    }

    /// Messages accepted, and refusals by kind.
    pub fn counts(&self) -> (u64, Vec<(Refusal, u64)>) {
        (self.accepted, Refusal::ALL.iter().map(|r| (*r, self.refused.get(r).copied().unwrap_or(0))).collect())
    }

    /// The sizes of the tables: sources (and newcomer IPs), slots, floors, IDs remembered in
    /// all windows (for the fuzz target's bound on memory).
    pub fn sizes(&self) -> (usize, usize, usize, usize) {
        let ids = self.slots.values().map(|s| s.window.order.len()).sum();
        (self.sources.len().max(self.newcomer_ips.len()), self.slots.len(), self.floors.len(), ids)
    }
}

/// Steps 3 (its floor, window and rate) and 4 (its path) for one peer's slot; counts nothing.
#[allow(clippy::too_many_arguments)]
fn judge(
    slot: &mut Slot,
    l: &Limits,
    env: &Envelope,
    id: u64,
    from: SocketAddrV4,
    now_s: u64,
    now_ms: u64,
    nonce: impl FnOnce() -> String,
) -> Verdict {
    let mut moved = false;
    if from != slot.endpoint {
        // A replay from elsewhere challenges nobody (nor fills the list of challenges).
        slot.window.expire(now_s);
        if env.timestamp <= slot.floor {
            return Verdict::Refuse(Refusal::BeforeFloor);
        }
        if slot.window.ids.contains(&id) {
            return Verdict::Refuse(Refusal::Duplicate);
        }
        slot.challenges.retain(|c| now_ms.saturating_sub(c.sent_ms) <= l.challenge_ttl_ms);
        let answered = match &env.payload {
            Message::Pong { nonce } => slot.challenges.iter().any(|c| c.to == from && c.nonce == *nonce),
            _ => false,
        };
        if !answered {
            let pending =
                slot.challenges.iter().any(|c| c.to == from && now_ms.saturating_sub(c.sent_ms) < l.challenge_every_ms);
            if pending {
                return Verdict::Refuse(Refusal::OtherPath);
            }
            slot.challenges.retain(|c| c.to != from);
            if slot.challenges.len() >= MAX_CHALLENGES {
                // All still answerable: none is pushed out before its time.
                return Verdict::Refuse(Refusal::OtherPath);
            }
            let n = nonce();
            slot.challenges.push(Challenge { to: from, nonce: n.clone(), sent_ms: now_ms });
            return Verdict::Challenge { to: from, nonce: n };
        }
        moved = true;
    }
    // Replays first, so a replay costs the peer nothing.
    if env.timestamp <= slot.floor {
        return Verdict::Refuse(Refusal::BeforeFloor);
    }
    slot.window.expire(now_s);
    if slot.window.ids.contains(&id) {
        return Verdict::Refuse(Refusal::Duplicate);
    }
    if slot.window.order.len() >= l.window {
        return Verdict::Refuse(Refusal::WindowFull);
    }
    if !slot.bucket.take(l.peer_per_s, l.peer_burst, now_ms) {
        return Verdict::Refuse(Refusal::PeerRate);
    }
    slot.window.ids.insert(id);
    slot.window.order.push_back((now_s, id));
    slot.last_ms = now_ms;
    if moved {
        slot.endpoint = from;
        slot.challenges.clear();
    }
    Verdict::Accept(Accept { reserve: None, moved })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(peer: &str, id: u64, ts: u64, payload: Message) -> Envelope {
        Envelope {
            message_id: format!("{id:016x}"),
            from_peer_id: peer.into(),
            public_key: String::new(),
            to_peer_id: "me".into(),
            hop_count: 0,
            timestamp: ts,
            payload,
        }
    }

    fn hello(peer: &str, id: u64, ts: u64) -> Envelope {
        env(peer, id, ts, Message::Hello { reply: false })
    }

    fn ep(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 9), port)
    }

    fn accepted(v: &Verdict) -> bool {
        matches!(v, Verdict::Accept(_))
    }

    #[test]
    fn one_peers_flood_fills_only_its_own_window_and_bucket() {
        let mut a = Admission::new(Limits::default(), HashMap::new(), &[], &[]);
        let t = 1_000_000;
        let mut flood_in = 0;
        for i in 0..60_000u64 {
            // 3,000 a second for 20 s, each a fresh ID.
            let ms = i / 3;
            if accepted(&a.admit(
                &hello("flood", i, t + ms / 1000),
                ep(1),
                t + ms / 1000,
                ms,
                &HashSet::new(),
                String::new,
            )) {
                flood_in += 1;
            }
            if i % 3000 == 0 {
                let v = a.admit(
                    &hello("honest", 1 << 40 | i, t + ms / 1000),
                    ep(2),
                    t + ms / 1000,
                    ms,
                    &HashSet::new(),
                    String::new,
                );
                assert!(accepted(&v), "the honest peer at {ms} ms: {v:?}");
            }
        }
        // The flood got its burst and its rate, nothing more.
        assert!(flood_in <= 50 + 5 * 20 + 1, "{flood_in}");
        let (_, refused) = a.counts();
        assert!(refused.contains(&(Refusal::PeerRate, 60_000 - flood_in)), "{refused:?}");
    }

    #[test]
    fn a_source_over_its_rate_is_refused_before_decryption_and_others_are_not() {
        let mut a = Admission::new(Limits::default(), HashMap::new(), &[], &[]);
        let passed = (0..1000).filter(|i| a.source(ep(1), *i / 10).is_ok()).count();
        assert!((200..=211).contains(&passed), "{passed}");
        assert!(a.source(ep(2), 100).is_ok());
    }

    #[test]
    fn a_replay_is_refused_in_the_window_and_after_a_restart() {
        let mut a = Admission::new(Limits::default(), HashMap::new(), &[], &[]);
        let t = 1_000_000;
        let v = a.admit(&hello("p", 1, t), ep(1), t, 0, &HashSet::new(), String::new);
        let Verdict::Accept(Accept { reserve: Some(r), .. }) = v else { panic!("{v:?}") };
        a.commit("p", r);
        assert_eq!(
            a.admit(&hello("p", 1, t), ep(1), t, 10, &HashSet::new(), String::new),
            Verdict::Refuse(Refusal::Duplicate)
        );
        // A restart keeps the floors only: the same message is still refused.
        let mut b = Admission::new(Limits::default(), a.floors().clone(), &[], &[]);
        assert_eq!(
            b.admit(&hello("p", 1, t), ep(1), t + 1, 0, &HashSet::new(), String::new),
            Verdict::Refuse(Refusal::BeforeFloor)
        );
        // And the peer is heard again once past its reservation.
        assert!(accepted(&b.admit(&hello("p", 2, t + 6), ep(1), t + 6, 0, &HashSet::new(), String::new)));
    }

    #[test]
    fn an_endpoint_moves_only_when_a_challenge_is_answered_from_there() {
        let mut a = Admission::new(Limits::default(), HashMap::new(), &[], &[]);
        let t = 1_000_000;
        assert!(accepted(&a.admit(&hello("p", 1, t), ep(1), t, 0, &HashSet::new(), String::new)));
        // A fresh message of the peer's, first from elsewhere: challenged there, not acted on,
        // and not remembered, so the original is still accepted.
        let v = a.admit(&hello("p", 2, t), ep(9), t, 10, &HashSet::new(), || "n1".into());
        assert_eq!(v, Verdict::Challenge { to: ep(9), nonce: "n1".into() });
        assert!(accepted(&a.admit(&hello("p", 2, t), ep(1), t, 20, &HashSet::new(), String::new)));
        assert_eq!(a.endpoint("p"), Some(ep(1)));
        // A pong of another nonce, or from another address, does not move it.
        let wrong = env("p", 3, t, Message::Pong { nonce: "other".into() });
        assert_eq!(a.admit(&wrong, ep(9), t, 30, &HashSet::new(), String::new), Verdict::Refuse(Refusal::OtherPath));
        // The peer's pong from there does.
        let pong = env("p", 4, t, Message::Pong { nonce: "n1".into() });
        let v = a.admit(&pong, ep(9), t, 40, &HashSet::new(), String::new);
        assert!(matches!(v, Verdict::Accept(Accept { moved: true, .. })), "{v:?}");
        assert_eq!(a.endpoint("p"), Some(ep(9)));
    }

    #[test]
    fn fresh_identities_never_evict_bootstrap_kept_or_talking_peers() {
        let mut a = Admission::new(Limits::default(), HashMap::new(), &[("boot".into(), ep(1))], &[]);
        let t = 1_000_000;
        let kept: HashSet<String> = ["renter".to_string()].into();
        for (i, p) in ["boot", "renter", "talker", "idle"].iter().enumerate() {
            let port = u16::try_from(i + 1).unwrap();
            assert!(accepted(&a.admit(&hello(p, 1, t), ep(port), t, 0, &kept, String::new)));
        }
        // 3,000 fresh identities a second for a minute, each from a port of its own and from
        // many IPs, while "talker" keeps alive every 15 s.
        let mut fresh_in = 0;
        for i in 0..180_000u64 {
            let ms = i / 3;
            let ip = Ipv4Addr::new(198, 51, u8::try_from(i % 200).unwrap(), 1);
            let from = SocketAddrV4::new(ip, u16::try_from(1000 + i % 60_000).unwrap());
            let p = format!("fresh{i}");
            if accepted(&a.admit(&hello(&p, 1, t + ms / 1000), from, t + ms / 1000, ms, &kept, String::new)) {
                fresh_in += 1;
            }
            if i % 45_000 == 0 {
                let v = a.admit(&hello("talker", 2 + i, t + ms / 1000), ep(3), t + ms / 1000, ms, &kept, String::new);
                assert!(accepted(&v), "the talking peer at {ms} ms: {v:?}");
            }
        }
        // Newcomers came at their rate, no faster.
        assert!(fresh_in <= 100 + 50 * 60 + 1, "{fresh_in}");
        assert!(a.knows("boot") && a.knows("renter") && a.knows("talker"));
        // A new honest peer from an IP of its own still gets in once the burst has refilled.
        assert!(accepted(&a.admit(&hello("new", 1, t + 62), ep(9), t + 62, 62_000, &kept, String::new)));
    }

    #[test]
    fn identities_that_keep_themselves_fresh_cannot_push_out_a_peer_that_talks() {
        // The second review's case: a member's identities fill the table and each says hello
        // every second, so a peer with a 15 s keepalive is the one heard from longest ago.
        let limits = Limits { max_peers: 8, ..Limits::default() };
        let mut a = Admission::new(limits, HashMap::new(), &[], &["named".into()]);
        let (t, none) = (1_000_000, HashSet::new());
        let hear = |a: &mut Admission, p: &str, id: u64, ms: u64, port: u16| {
            let s = t + ms / 1000;
            a.admit(&hello(p, id, s), ep(port), s, ms, &none, String::new)
        };
        assert!(accepted(&hear(&mut a, "talker", 1, 0, 1)));
        let mut id = 10;
        for second in 0..120u64 {
            let ms = second * 1000;
            for n in 0..20u16 {
                id += 1;
                let _ = hear(&mut a, &format!("sybil{n}"), id, ms, 100 + n);
            }
            if second % 15 == 0 {
                id += 1;
                assert!(accepted(&hear(&mut a, "talker", id, ms + 1, 1)), "the talking peer at {second} s");
            }
        }
        assert!(a.knows("talker"));
        // A peer the operator named always has room.
        assert!(accepted(&hear(&mut a, "named", 1, 120_500, 2)));
    }

    #[test]
    fn garbage_from_anywhere_spends_no_budget_a_member_needs() {
        // The second review's case: a non-member sending from many ports cannot empty the
        // budget unknown members share: it is spent only by what decrypts.
        let mut a = Admission::new(Limits::default(), HashMap::new(), &[], &[]);
        for i in 0..20_000u64 {
            let _ = a.source(ep(u16::try_from(1000 + i % 20).unwrap()), i / 10);
        }
        assert!(a.source(ep(7), 2000).is_ok() && a.after_decrypt(ep(7), 2000).is_ok());
    }

    #[test]
    fn a_replay_from_elsewhere_cannot_pin_a_roaming_peer() {
        let mut a = Admission::new(Limits::default(), HashMap::new(), &[], &[]);
        let (t, none) = (1_000_000, HashSet::new());
        assert!(accepted(&a.admit(&hello("p", 1, t), ep(1), t, 0, &none, String::new)));
        // A captured message replayed from 9 keeps a challenge there pending...
        let v = a.admit(&hello("p", 2, t), ep(9), t, 10, &none, || "x".into());
        assert!(matches!(v, Verdict::Challenge { .. }));
        // ...while the peer itself moved to 5: it is challenged there too, and moves there.
        let v = a.admit(&hello("p", 3, t), ep(5), t, 20, &none, || "y".into());
        assert_eq!(v, Verdict::Challenge { to: ep(5), nonce: "y".into() });
        let pong = env("p", 4, t, Message::Pong { nonce: "y".into() });
        assert!(matches!(
            a.admit(&pong, ep(5), t, 30, &none, String::new),
            Verdict::Accept(Accept { moved: true, .. })
        ));
        assert_eq!(a.endpoint("p"), Some(ep(5)));
    }

    #[test]
    fn a_forged_source_does_not_make_a_known_peer_deaf() {
        let mut a = Admission::new(Limits::default(), HashMap::new(), &[], &[]);
        let t = 1_000_000;
        assert!(a.source(ep(1), 0).is_ok());
        assert!(accepted(&a.admit(&hello("p", 1, t), ep(1), t, 0, &HashSet::new(), String::new)));
        // A non-member floods garbage from the peer's address: it never decrypts, and the
        // address is never refused before decryption.
        assert!((0..10_000).all(|i| a.source(ep(1), 1 + i / 100).is_ok()));
        assert!(a.after_decrypt(ep(1), 100).is_ok() && a.before_verify("p", ep(1), 100).is_ok());
        // A stranger's address is.
        assert!((0..1000).any(|i| a.source(ep(2), i / 100).is_err()));
    }
}
