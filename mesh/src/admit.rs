//! Admission: what a datagram must pass before the daemon remembers anything about it or acts
//! on it. Its one job is to make a member's flood cost that member, and nobody else.
//!
//! In order:
//! 1. **By source**, before any decryption ([`Admission::source`]): a token bucket per source
//!    address. Whatever does not decrypt costs at most one decryption, and a source over its
//!    rate costs not even that.
//! 2. Decryption, signature, addressee, hop count and freshness (±[`MAX_SKEW_S`]):
//!    [`crate::wire::open`].
//! 3. **By peer** ([`Admission::admit`]): the sender needs a slot in the peer table. Bootstrap
//!    peers and peers that rent or provide here are never evicted for a newcomer; when the
//!    table is full of them, newcomers are refused. Each slot has its own token bucket, its own
//!    replay window (the IDs of its unexpired messages, bounded) and a floor: its messages
//!    stamped at or before the floor are refused. The floor comes from the journal of
//!    reservations ([`Accept::reserve`]): before a message stamped `t` is acted on, the
//!    daemon writes that it accepts nothing of that peer's at or before `t + reserve_s`
//!    again once the slot is gone, whether by eviction or by a restart. So nothing captured
//!    before a restart is accepted after it, and a peer whose slot was evicted is deaf at most
//!    `reserve_s` seconds when it comes back.
//! 4. **By path**: a known peer's message from another address is not acted on. The peer is
//!    challenged there (a ping of a fresh nonce, at most one per `challenge_every_ms`), and
//!    its endpoint moves only when its signed pong carrying that nonce comes back from there.
//!    A datagram captured and replayed from elsewhere moves nothing, and, refused before its ID
//!    is remembered, does not stop the original from being accepted.
//!
//! Only then is the message's ID remembered and the message dispatched. Everything here is
//! bounded (sources, slots, window per slot, floors), and time is the caller's (`now_s`: the
//! wall clock the envelopes are stamped with; `now_ms`: a monotonic clock), so the fuzz
//! target drives it with a fake clock.
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddrV4;

use crate::wire::{Envelope, Message, MAX_SKEW_S};

/// The bounds and rates (the defaults are the daemon's).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Datagrams a second one source address may have opened, sustained.
    pub source_per_s: u32,
    /// And in a burst.
    pub source_burst: u32,
    /// Messages a second one peer may have acted on, sustained.
    pub peer_per_s: u32,
    /// And in a burst.
    pub peer_burst: u32,
    /// IDs remembered per peer (above what its rate can fill in a window's time).
    pub window: usize,
    /// Peer slots.
    pub max_peers: usize,
    /// Source buckets.
    pub max_sources: usize,
    /// Floors remembered (peers heard from within the last few minutes).
    pub max_floors: usize,
    /// Seconds each reservation reaches ahead of the message that made it.
    pub reserve_s: u64,
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
            peer_per_s: 5,
            peer_burst: 50,
            // 5 a second for the 240 s an ID is kept, and the burst: 1,250.
            window: 1280,
            max_peers: 1024,
            max_sources: 4096,
            max_floors: 1 << 17,
            reserve_s: 5,
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
    /// Its peer sends faster than its rate.
    PeerRate,
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
    pub const ALL: [Refusal; 9] = [
        Refusal::SourceRate,
        Refusal::SourcesReset,
        Refusal::PeerRate,
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
            Refusal::PeerRate => "peer_rate",
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
            Refusal::PeerRate => "a peer over its rate",
            Refusal::Duplicate => "a replayed message (its ID was seen)",
            Refusal::WindowFull => "a peer whose replay window is full",
            Refusal::BeforeFloor => "a replayed message (stamped before this peer's floor)",
            Refusal::OtherPath => "a known peer's message from another address (challenged there)",
            Refusal::TableFull => "a new peer while the table is full of bootstrap and renting peers",
            Refusal::FloorsFull => "a new peer while the floors are full",
        })
    }
}

/// What to do with a message that passed [`crate::wire::open`].
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
    /// A reservation to write to the journal before the message is acted on: the peer's
    /// messages stamped at or before it are refused after a restart.
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
    window: Window,
    challenge: Option<Challenge>,
    /// The envelope time of the last heartbeat (or answer) taken: an older one is ignored.
    last_beat: u64,
}

/// Admission's state (module doc).
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    sources: HashMap<SocketAddrV4, Bucket>,
    slots: HashMap<String, Slot>,
    /// The journal's reservations: peer → the stamp at or before which its messages are
    /// refused when it takes a new slot.
    floors: HashMap<String, u64>,
    /// Bootstrap peers and their endpoints from the invite: never evicted, and a first
    /// message from elsewhere is challenged.
    bootstrap: HashMap<String, SocketAddrV4>,
    refused: HashMap<Refusal, u64>,
    accepted: u64,
}

impl Admission {
    /// Empty, with the floors a journal held and the network's bootstrap peers.
    pub fn new(limits: Limits, floors: HashMap<String, u64>, bootstrap: &[(String, SocketAddrV4)]) -> Self {
        Self {
            limits,
            sources: HashMap::new(),
            slots: HashMap::new(),
            floors,
            bootstrap: bootstrap.iter().cloned().collect(),
            refused: HashMap::new(),
            accepted: 0,
        }
    }

    /// Counts a refusal (also those of the caller: sources that did not decrypt are not
    /// counted here).
    fn refuse(&mut self, why: Refusal) -> Refusal {
        *self.refused.entry(why).or_insert(0) += 1;
        why
    }

    /// Step 1: whether a datagram from `from` may be opened at all.
    pub fn source(&mut self, from: SocketAddrV4, now_ms: u64) -> Result<(), Refusal> {
        let l = &self.limits;
        let (per_s, burst) = (l.source_per_s, l.source_burst);
        if !self.sources.contains_key(&from) && self.sources.len() >= l.max_sources {
            // Sources back at a full bucket are like new ones: forget them. If all are busy,
            // forget them all: that only gives each a new burst, where refusing new sources
            // would let a member holding many ports shut everyone else out.
            self.sources.retain(|_, b| !b.is_full(per_s, burst, now_ms));
            if self.sources.len() >= self.limits.max_sources {
                self.sources.clear();
                *self.refused.entry(Refusal::SourcesReset).or_insert(0) += 1;
            }
        }
        let b = self.sources.entry(from).or_insert_with(|| Bucket::full(burst, now_ms));
        if b.take(per_s, burst, now_ms) {
            Ok(())
        } else {
            Err(self.refuse(Refusal::SourceRate))
        }
    }

    /// Steps 3 and 4 for a message that [`crate::wire::open`] passed, from `from`. `nonce`
    /// makes a challenge's nonce (called only when one is sent).
    pub fn admit(
        &mut self,
        env: &Envelope,
        from: SocketAddrV4,
        now_s: u64,
        now_ms: u64,
        nonce: impl FnOnce() -> String,
    ) -> Verdict {
        let Some(id) = u64::from_str_radix(&env.message_id, 16).ok().filter(|_| env.message_id.len() == 16) else {
            // `open` checked the ID's form: never here.
            return Verdict::Refuse(self.refuse(Refusal::Duplicate));
        };
        let peer = env.from_peer_id.as_str();
        let l = &self.limits;
        let (mut slot, new) = match self.slots.remove(peer) {
            Some(s) => (s, false),
            None => {
                // Bootstrap peers always have room (there are at most a few).
                if self.slots.len() >= l.max_peers && !self.bootstrap.contains_key(peer) {
                    return Verdict::Refuse(self.refuse(Refusal::TableFull));
                }
                if !self.floors.contains_key(peer) && self.floors.len() >= l.max_floors {
                    self.floors.retain(|_, t| t.saturating_add(MAX_SKEW_S) >= now_s);
                    if self.floors.len() >= self.limits.max_floors {
                        return Verdict::Refuse(self.refuse(Refusal::FloorsFull));
                    }
                }
                let slot = Slot {
                    endpoint: self.bootstrap.get(peer).copied().unwrap_or(from),
                    last_ms: now_ms,
                    floor: self.floors.get(peer).copied().unwrap_or(0),
                    bucket: Bucket::full(self.limits.peer_burst, now_ms),
                    window: Window::default(),
                    challenge: None,
                    last_beat: 0,
                };
                (slot, true)
            }
        };
        let verdict = judge(&mut slot, &self.limits, env, id, from, now_s, now_ms, nonce);
        // A newcomer is remembered only once it is accepted or challenged.
        if !new || !matches!(verdict, Verdict::Refuse(_)) {
            self.slots.insert(peer.to_string(), slot);
        }
        match verdict {
            Verdict::Accept(_) => {
                self.accepted += 1;
                let floor = self.floors.entry(peer.to_string()).or_insert(0);
                let reserve = (env.timestamp >= *floor).then(|| {
                    *floor = env.timestamp.saturating_add(self.limits.reserve_s);
                    *floor
                });
                let moved = matches!(verdict, Verdict::Accept(Accept { moved: true, .. }));
                Verdict::Accept(Accept { reserve, moved })
            }
            Verdict::Challenge { .. } => {
                self.refuse(Refusal::OtherPath);
                verdict
            }
            Verdict::Refuse(why) => Verdict::Refuse(self.refuse(why)),
        }
    }

    /// Frees a slot for a newcomer: the peer heard from longest ago that is neither a
    /// bootstrap peer nor `kept` (peers with rentals). Its floor stays.
    pub fn evict_one(&mut self, kept: &HashSet<String>) -> Option<String> {
        let victim = self
            .slots
            .iter()
            .filter(|(id, _)| !self.bootstrap.contains_key(*id) && !kept.contains(*id))
            .min_by_key(|(_, s)| s.last_ms)
            .map(|(id, _)| id.clone())?;
        self.slots.remove(&victim);
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

    /// Whether the table is full and `peer` has no slot in it (nor a bootstrap peer's room).
    pub fn full_without(&self, peer: &str) -> bool {
        self.slots.len() >= self.limits.max_peers
            && !self.slots.contains_key(peer)
            && !self.bootstrap.contains_key(peer)
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

    /// IDs remembered in all windows, and the sizes of the tables (for the fuzz target's
    /// bound on memory).
    pub fn sizes(&self) -> (usize, usize, usize, usize) {
        let ids = self.slots.values().map(|s| s.window.order.len()).sum();
        (self.sources.len(), self.slots.len(), self.floors.len(), ids)
    }
}

/// Steps 3 (its rate, floor and window) and 4 (its path) for one peer's slot; counts nothing.
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
        let answered = match (&env.payload, &slot.challenge) {
            (Message::Pong { nonce }, Some(c)) => {
                c.to == from && *nonce == c.nonce && now_ms.saturating_sub(c.sent_ms) <= l.challenge_ttl_ms
            }
            _ => false,
        };
        if !answered {
            let due = slot.challenge.as_ref().is_none_or(|c| now_ms.saturating_sub(c.sent_ms) >= l.challenge_every_ms);
            if !due {
                return Verdict::Refuse(Refusal::OtherPath);
            }
            let n = nonce();
            slot.challenge = Some(Challenge { to: from, nonce: n.clone(), sent_ms: now_ms });
            return Verdict::Challenge { to: from, nonce: n };
        }
        moved = true;
    }
    if !slot.bucket.take(l.peer_per_s, l.peer_burst, now_ms) {
        return Verdict::Refuse(Refusal::PeerRate);
    }
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
    slot.window.ids.insert(id);
    slot.window.order.push_back((now_s, id));
    slot.last_ms = now_ms;
    if moved {
        slot.endpoint = from;
        slot.challenge = None;
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
        SocketAddrV4::new(std::net::Ipv4Addr::new(203, 0, 113, 9), port)
    }

    fn accepted(v: &Verdict) -> bool {
        matches!(v, Verdict::Accept(_))
    }

    #[test]
    fn one_peers_flood_fills_only_its_own_window_and_bucket() {
        let mut a = Admission::new(Limits::default(), HashMap::new(), &[]);
        let t = 1_000_000;
        let mut flood_in = 0;
        for i in 0..60_000u64 {
            // 3,000 a second for 20 s, each a fresh ID.
            let ms = i / 3;
            if accepted(&a.admit(&hello("flood", i, t + ms / 1000), ep(1), t + ms / 1000, ms, String::new)) {
                flood_in += 1;
            }
            if i % 3000 == 0 {
                let v = a.admit(&hello("honest", 1 << 40 | i, t + ms / 1000), ep(2), t + ms / 1000, ms, String::new);
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
        let mut a = Admission::new(Limits::default(), HashMap::new(), &[]);
        let passed = (0..1000).filter(|i| a.source(ep(1), *i / 10).is_ok()).count();
        assert!((200..=211).contains(&passed), "{passed}");
        assert!(a.source(ep(2), 100).is_ok());
    }

    #[test]
    fn a_replay_is_refused_in_the_window_and_after_a_restart() {
        let mut a = Admission::new(Limits::default(), HashMap::new(), &[]);
        let t = 1_000_000;
        assert!(accepted(&a.admit(&hello("p", 1, t), ep(1), t, 0, String::new)));
        assert_eq!(a.admit(&hello("p", 1, t), ep(1), t, 10, String::new), Verdict::Refuse(Refusal::Duplicate));
        // A restart keeps the floors only: the same message is still refused.
        let mut b = Admission::new(Limits::default(), a.floors().clone(), &[]);
        assert_eq!(b.admit(&hello("p", 1, t), ep(1), t + 1, 0, String::new), Verdict::Refuse(Refusal::BeforeFloor));
        // And the peer is heard again once past its reservation.
        assert!(accepted(&b.admit(&hello("p", 2, t + 6), ep(1), t + 6, 0, String::new)));
    }

    #[test]
    fn an_endpoint_moves_only_when_a_challenge_is_answered_from_there() {
        let mut a = Admission::new(Limits::default(), HashMap::new(), &[]);
        let t = 1_000_000;
        assert!(accepted(&a.admit(&hello("p", 1, t), ep(1), t, 0, String::new)));
        // A fresh message of the peer's, first from elsewhere: challenged there, not acted on,
        // and not remembered, so the original is still accepted.
        let v = a.admit(&hello("p", 2, t), ep(9), t, 10, || "n1".into());
        assert_eq!(v, Verdict::Challenge { to: ep(9), nonce: "n1".into() });
        assert!(accepted(&a.admit(&hello("p", 2, t), ep(1), t, 20, String::new)));
        assert_eq!(a.endpoint("p"), Some(ep(1)));
        // A pong of another nonce, or from another address, does not move it.
        let wrong = env("p", 3, t, Message::Pong { nonce: "other".into() });
        assert_eq!(a.admit(&wrong, ep(9), t, 30, String::new), Verdict::Refuse(Refusal::OtherPath));
        // The peer's pong from there does.
        let pong = env("p", 4, t, Message::Pong { nonce: "n1".into() });
        assert_eq!(a.admit(&pong, ep(9), t, 40, String::new), Verdict::Accept(Accept { reserve: None, moved: true }));
        assert_eq!(a.endpoint("p"), Some(ep(9)));
    }

    #[test]
    fn fresh_identities_never_evict_bootstrap_or_kept_peers() {
        let limits = Limits { max_peers: 4, ..Limits::default() };
        let mut a = Admission::new(limits, HashMap::new(), &[("boot".into(), ep(1))]);
        let t = 1_000_000;
        for (i, p) in ["boot", "renter", "idle"].iter().enumerate() {
            let port = u16::try_from(i + 1).unwrap();
            assert!(accepted(&a.admit(&hello(p, 1, t), ep(port), t, 0, String::new)));
        }
        let kept: HashSet<String> = ["renter".to_string()].into();
        for i in 0..100u64 {
            let p = format!("fresh{i}");
            let port = u16::try_from(100 + i).unwrap();
            if a.admit(&hello(&p, 1, t), ep(port), t, i, String::new) == Verdict::Refuse(Refusal::TableFull) {
                a.evict_one(&kept);
                assert!(accepted(&a.admit(&hello(&p, 1, t), ep(port), t, i, String::new)));
            }
        }
        assert!(a.knows("boot") && a.knows("renter"));
        assert!(!a.knows("idle"));
        // The table full of kept peers: newcomers are refused, nobody kept goes.
        let all: HashSet<String> = a.peers(0).into_iter().map(|p| p.0).collect();
        assert_eq!(a.evict_one(&all), None);
    }
}
