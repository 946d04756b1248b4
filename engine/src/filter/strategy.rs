//! Filtering strategies: how much of the traffic is checked against the allowlist.
//!
//! A strategy is chosen once per VM and is a type parameter of the translation
//! ([`FilteredNat<S>`](crate::nat::FilteredNat)), so the per-packet call is static dispatch.
//!
//! | strategy | checks | on a violation |
//! |---|---|---|
//! | [`Full`] | every packet | drop it |
//! | [`Conntrack`] | the first packet of a flow; later ones hit the flow table | terminate the VM |
//! | [`Sampled`] | a random share of packets (default 1%) | terminate the VM |
//!
//! Only policy violations (a well-formed packet to a destination that is not allowed) reach a
//! strategy. Malformed, spoofed, broadcast and non-IPv4 frames are dropped before, in every mode.
use core::fmt;

use hashbrown::HashSet;

use super::allowlist::{Allowlist, Flow};
use super::Verdict;

/// Counters a strategy keeps about its own work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StrategyStats {
    /// Packets checked against the allowlist.
    pub allowlist_checks: u64,
    /// Packets passed by the conntrack flow table without an allowlist check.
    pub fast_path: u64,
    /// Packets forwarded unchecked by sampling.
    pub unchecked: u64,
    /// Flows evicted from a full conntrack table.
    pub evictions: u64,
}

/// A policy over flows. Implementations never allocate in [`Strategy::check`].
pub trait Strategy {
    /// Short name: `filtered`, `conntrack` or `sampled`.
    const NAME: &'static str;

    /// True if `check` looks every packet up in the allowlist. Otherwise the translation makes
    /// that lookup itself before anything is forwarded (the egress gate): a strategy may skip
    /// work, never the destination.
    const CHECKS_EVERY_PACKET: bool = false;

    /// True if a violation terminates the VM (rather than dropping the packet).
    const TERMINATES: bool = true;

    /// Decides one packet.
    fn check(&mut self, allow: &Allowlist, flow: &Flow) -> Verdict;

    /// Called after the allowlist was replaced (between batches).
    fn allowlist_changed(&mut self) {}

    /// What the strategy has done so far.
    fn stats(&self) -> StrategyStats;
}

/// Checks every packet; a violation is dropped.
#[derive(Debug, Default)]
pub struct Full {
    stats: StrategyStats,
}

impl Full {
    /// A new strategy.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Strategy for Full {
    const NAME: &'static str = "filtered";
    const CHECKS_EVERY_PACKET: bool = true;
    const TERMINATES: bool = false;

    #[inline]
    fn check(&mut self, allow: &Allowlist, flow: &Flow) -> Verdict {
        self.stats.allowlist_checks += 1;
        match allow.check(flow) {
            Ok(()) => Verdict::Forward,
            Err(r) => Verdict::Drop(r),
        }
    }

    fn stats(&self) -> StrategyStats {
        self.stats
    }
}

/// Checks the first packet of each flow (transport, source port, destination); packets of a
/// known flow take the fast path. A flow to a destination that is not allowed terminates the VM.
///
/// The table holds at most `capacity` flows; when it is full, the oldest inserted flow is
/// evicted (first in, first out), and its next packet is simply checked again. Replacing the
/// allowlist empties the table, so a removed endpoint is never reached through a stale flow.
#[derive(Debug)]
pub struct Conntrack {
    flows: HashSet<Flow>,
    // Insertion order for eviction: a ring of `capacity` slots.
    order: Box<[Option<Flow>]>,
    next: usize,
    stats: StrategyStats,
}

impl Conntrack {
    /// Default flow-table size: far more than one WireGuard VM needs, small in memory.
    pub const DEFAULT_CAPACITY: usize = 1024;

    /// A table of `capacity` flows (at least 1). All memory is allocated here, not per packet.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            // Twice the capacity: eviction leaves tombstones, and hashbrown cleans them by an
            // in-place rehash only while the items fit in half its capacity; past that it
            // grows, which would allocate on the packet path.
            flows: HashSet::with_capacity(capacity * 2),
            order: vec![None; capacity].into_boxed_slice(),
            next: 0,
            stats: StrategyStats::default(),
        }
    }

    /// Flows currently tracked.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// True if no flow is tracked.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    fn insert(&mut self, flow: Flow) {
        if let Some(slot) = self.order.get_mut(self.next) {
            if let Some(old) = slot.replace(flow) {
                self.flows.remove(&old);
                self.stats.evictions += 1;
            }
            self.flows.insert(flow);
        }
        self.next += 1;
        if self.next == self.order.len() {
            self.next = 0;
        }
    }
}

impl Default for Conntrack {
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY)
    }
}

impl Strategy for Conntrack {
    const NAME: &'static str = "conntrack";

    #[inline]
    fn check(&mut self, allow: &Allowlist, flow: &Flow) -> Verdict {
        if self.flows.contains(flow) {
            self.stats.fast_path += 1;
            return Verdict::Forward;
        }
        self.stats.allowlist_checks += 1;
        match allow.check(flow) {
            Ok(()) => {
                self.insert(*flow);
                Verdict::Forward
            }
            Err(r) => Verdict::Terminate(r),
        }
    }

    fn allowlist_changed(&mut self) {
        self.flows.clear();
        self.order.iter_mut().for_each(|s| *s = None);
        self.next = 0;
    }

    fn stats(&self) -> StrategyStats {
        self.stats
    }
}

/// A share of packets to check, in (0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleRate(f64);

/// A sample rate outside (0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleRateError(pub f64);

impl fmt::Display for SampleRateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sample rate {} is not in (0, 1] (0.01 checks 1% of packets)", self.0)
    }
}

impl std::error::Error for SampleRateError {}

impl SampleRate {
    /// 1% of packets.
    pub const DEFAULT: SampleRate = SampleRate(0.01);

    /// Validates a rate.
    pub fn new(rate: f64) -> Result<Self, SampleRateError> {
        if rate > 0.0 && rate <= 1.0 {
            Ok(Self(rate))
        } else {
            Err(SampleRateError(rate))
        }
    }

    /// The rate as a fraction.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl Default for SampleRate {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// SplitMix64: a tiny, fast, seedable generator; statistical quality is ample for sampling.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u32(&mut self) -> u32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        // The high half of the mixed word.
        (z >> 32) as u32
    }
}

/// Checks a random share of packets against the policy; a checked violation terminates the VM.
/// An unchecked packet still meets the egress gate (see [`Strategy::CHECKS_EVERY_PACKET`]): a
/// destination off the allowlist terminates the VM whether or not the draw checked it, so
/// knowing the generator gains a guest nothing. Deterministic for a given seed.
#[derive(Debug)]
pub struct Sampled {
    rate: SampleRate,
    // A packet is checked when the next 32-bit draw is below this (rate * 2^32).
    threshold: u64,
    rng: SplitMix64,
    stats: StrategyStats,
}

impl Sampled {
    /// A sampler with `rate` and a generator seeded with `seed`.
    pub fn new(rate: SampleRate, seed: u64) -> Self {
        // rate is in (0, 1], so this is in (0, 2^32] and fits easily.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let threshold = (rate.get() * 4_294_967_296.0).ceil() as u64;
        Self { rate, threshold, rng: SplitMix64(seed), stats: StrategyStats::default() }
    }

    /// The configured rate.
    pub fn rate(&self) -> SampleRate {
        self.rate
    }
}

impl Strategy for Sampled {
    const NAME: &'static str = "sampled";

    #[inline]
    fn check(&mut self, allow: &Allowlist, flow: &Flow) -> Verdict {
        if u64::from(self.rng.next_u32()) >= self.threshold {
            self.stats.unchecked += 1;
            return Verdict::Forward;
        }
        self.stats.allowlist_checks += 1;
        match allow.check(flow) {
            Ok(()) => Verdict::Forward,
            Err(r) => Verdict::Terminate(r),
        }
    }

    fn stats(&self) -> StrategyStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::{DropReason, Endpoint, Transport};

    fn consumer() -> Endpoint {
        "203.0.113.7:51820".parse().unwrap()
    }
    fn list() -> Allowlist {
        Allowlist::new([consumer()]).unwrap()
    }
    fn udp(dst: Endpoint, src_port: u16) -> Flow {
        Flow { transport: Transport::Udp, src_port, dst }
    }
    fn bad() -> Flow {
        udp("8.8.8.8:53".parse().unwrap(), 1000)
    }

    /// seed: testFullFilterAllowsValidTraffic
    #[test]
    fn full_filter_allows_valid_traffic() {
        let mut s = Full::new();
        assert_eq!(s.check(&list(), &udp(consumer(), 40000)), Verdict::Forward);
        assert_eq!(s.stats().allowlist_checks, 1);
    }

    /// seed: testFullFilterDropsInvalidTraffic
    #[test]
    fn full_filter_drops_invalid_traffic() {
        let mut s = Full::new();
        assert_eq!(s.check(&list(), &bad()), Verdict::Drop(DropReason::NotAllowed));
        // Dropping never escalates: the next good packet still passes.
        assert_eq!(s.check(&list(), &udp(consumer(), 40000)), Verdict::Forward);
    }

    /// seed: testConntrackFirstPacketChecked
    #[test]
    fn conntrack_first_packet_checked() {
        let mut s = Conntrack::default();
        assert_eq!(s.check(&list(), &udp(consumer(), 40000)), Verdict::Forward);
        assert_eq!(s.stats().allowlist_checks, 1);
        assert_eq!(s.stats().fast_path, 0);
        assert_eq!(s.len(), 1);
    }

    /// seed: testConntrackRepeatPacketFastPath
    #[test]
    fn conntrack_repeat_packet_fast_path() {
        let mut s = Conntrack::default();
        let l = list();
        for _ in 0..100 {
            assert_eq!(s.check(&l, &udp(consumer(), 40000)), Verdict::Forward);
        }
        assert_eq!(s.stats().allowlist_checks, 1, "only the first packet consults the allowlist");
        assert_eq!(s.stats().fast_path, 99);
        // A new source port is a new flow: checked once more.
        assert_eq!(s.check(&l, &udp(consumer(), 40001)), Verdict::Forward);
        assert_eq!(s.stats().allowlist_checks, 2);
    }

    /// seed: testConntrackBadFlowTerminates
    #[test]
    fn conntrack_bad_flow_terminates() {
        let mut s = Conntrack::default();
        assert_eq!(s.check(&list(), &bad()), Verdict::Terminate(DropReason::NotAllowed));
        assert!(s.is_empty(), "a refused flow is never cached");
        let tcp = Flow { transport: Transport::Other(6), src_port: 5, dst: consumer() };
        assert_eq!(s.check(&list(), &tcp), Verdict::Terminate(DropReason::ProtocolNotAllowed));
    }

    #[test]
    fn conntrack_evicts_oldest_when_full_and_flushes_on_new_list() {
        let mut s = Conntrack::new(2);
        let l = list();
        for port in [1, 2, 3] {
            assert_eq!(s.check(&l, &udp(consumer(), port)), Verdict::Forward);
        }
        assert_eq!(s.len(), 2);
        assert_eq!(s.stats().evictions, 1);
        // Port 1 was evicted (oldest): checked again; port 3 is still a fast-path hit.
        let before = s.stats().allowlist_checks;
        assert_eq!(s.check(&l, &udp(consumer(), 3)), Verdict::Forward);
        assert_eq!(s.stats().allowlist_checks, before);
        assert_eq!(s.check(&l, &udp(consumer(), 1)), Verdict::Forward);
        assert_eq!(s.stats().allowlist_checks, before + 1);
        // After the consumer is removed, a cached flow must not keep it reachable.
        s.allowlist_changed();
        assert!(s.is_empty());
        assert_eq!(s.check(&Allowlist::empty(), &udp(consumer(), 3)), Verdict::Terminate(DropReason::NotAllowed));
    }

    /// seed: testSampledSkipsMostPackets
    #[test]
    fn sampled_skips_most_packets() {
        let mut s = Sampled::new(SampleRate::DEFAULT, 42);
        let l = list();
        for _ in 0..1000 {
            assert_eq!(s.check(&l, &udp(consumer(), 40000)), Verdict::Forward);
        }
        let st = s.stats();
        assert_eq!(st.allowlist_checks + st.unchecked, 1000);
        // 1% of 1000 is 10; the binomial spread keeps a fair seed well inside 1..=30.
        assert!((1..=30).contains(&st.allowlist_checks), "checked {}", st.allowlist_checks);
        assert!(st.unchecked >= 970, "unchecked {}", st.unchecked);
    }

    #[test]
    fn sampled_is_deterministic_per_seed() {
        let run = |seed| {
            let mut s = Sampled::new(SampleRate::new(0.5).unwrap(), seed);
            (0..64).map(|_| s.check(&Allowlist::empty(), &bad())).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    /// seed: testSampledCatchesViolation
    #[test]
    fn sampled_catches_violation() {
        // At rate 1.0 every packet is checked, so the first violation terminates.
        let mut s = Sampled::new(SampleRate::new(1.0).unwrap(), 1);
        assert_eq!(s.check(&list(), &bad()), Verdict::Terminate(DropReason::NotAllowed));
        // At 1% a stream of bad packets is caught within a few hundred packets.
        let mut s = Sampled::new(SampleRate::DEFAULT, 3);
        let caught = (0..2000).position(|_| matches!(s.check(&list(), &bad()), Verdict::Terminate(_)));
        assert!(caught.is_some(), "1% sampling missed 2000 violations in a row");
    }

    #[test]
    fn sample_rate_bounds() {
        for bad in [0.0, -0.1, 1.0001, f64::NAN, f64::INFINITY] {
            assert!(SampleRate::new(bad).is_err(), "{bad}");
        }
        assert_eq!(SampleRate::new(0.05).unwrap().get(), 0.05);
        assert_eq!(Sampled::new(SampleRate::new(0.05).unwrap(), 0).rate().get(), 0.05);
    }
}
