//! The endpoint proof: how a consumer behind NAT tells the engine where it is.
//!
//! A consumer behind NAT cannot say in its request where the provider will see it: only the
//! engine, receiving its datagrams, learns the mapping. So the consumer's tunnel sends, from the
//! socket its WireGuard uses, a *proof* to the VM's host port: 48 bytes, a magic, a version, a
//! counter (its clock in Unix milliseconds, strictly increasing) and a MAC over them with a key
//! only the consumer and this VM's engine hold. The engine accepts a proof whose MAC verifies,
//! whose counter is above the last accepted one and within [`SKEW_MS`] of its own clock, and
//! moves the VM's one endpoint to the proof's source (through the control thread: the kernel
//! fence follows). Proofs are never given to the guest.
//!
//! The key (`K`, 32 bytes) is [`derive`]d from an X25519 exchange made for the rental alone: the
//! consumer puts a fresh public key in its request, the engine makes its own pair, returns the
//! public half, and forgets the private half once `K` is made. The exchange's secret never
//! travels; the request and answer are readable by every network member, which is why `K`
//! is not simply sent. WireGuard's keys are not reused: the two protocols stay separate.
//!
//! This module is pure: the format, the key derivation (Blake2s, RustCrypto's `blake2`) and the
//! [`Gate`] that checks candidates on the worker's path (no allocation, no system call but the
//! clock; a forgery costs one MAC, checked first, so a flood of them cannot crowd out the
//! consumer's proofs; moves at most one per [`MOVE_GAP`]).
#![forbid(unsafe_code)]

use std::time::Instant;

use blake2::digest::{KeyInit, Mac};
use blake2::Blake2sMac256;

use crate::filter::{DropReason, Endpoint};

/// The first bytes of a proof. `O` (0x4F) is no WireGuard message type (1 to 4), so a proof is
/// never mistaken for the tunnel's traffic, nor the reverse.
pub const MAGIC: [u8; 4] = *b"OMEP";
/// This format's version.
pub const VERSION: u8 = 1;
/// A proof's length: magic 4, version 1, reserved 3, counter 8, MAC 32.
pub const LEN: usize = 48;
/// How far a proof's counter (Unix ms) may be from the engine's clock: the mesh's skew bound.
pub const SKEW_MS: u64 = 120_000;
/// The least time between two moves a VM's proofs ask for (a consumer flapping between two
/// sockets costs the control thread one allowlist change a second at most); also how long a
/// move asked for is awaited before the same endpoint's next proof asks again.
pub const MOVE_GAP: std::time::Duration = std::time::Duration::from_secs(1);

const LABEL: &[u8] = b"omerta endpoint proof v1";
const HEADER: usize = 16;

/// A rental's proof key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Key(pub [u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("proof::Key(..)")
    }
}

/// `K` from the X25519 shared secret and both public keys (the consumer's first).
pub fn derive(shared: &[u8; 32], consumer_public: &[u8; 32], engine_public: &[u8; 32]) -> Key {
    let mut mac = <Blake2sMac256 as KeyInit>::new_from_slice(shared).unwrap_or_else(|_| unreachable!("32-byte key"));
    mac.update(LABEL);
    mac.update(consumer_public);
    mac.update(engine_public);
    Key(mac.finalize().into_bytes().into())
}

fn mac_of(key: &Key, header: &[u8]) -> Blake2sMac256 {
    let mut mac = <Blake2sMac256 as KeyInit>::new_from_slice(&key.0).unwrap_or_else(|_| unreachable!("32-byte key"));
    mac.update(header);
    mac
}

/// The proof with `counter` (the sender's clock, Unix ms).
pub fn seal(key: &Key, counter: u64) -> [u8; LEN] {
    let mut p = [0u8; LEN];
    p[..4].copy_from_slice(&MAGIC);
    p[4] = VERSION;
    p[8..16].copy_from_slice(&counter.to_be_bytes());
    let tag = mac_of(key, &p[..HEADER]).finalize().into_bytes();
    p[HEADER..].copy_from_slice(&tag);
    p
}

/// Whether a datagram has a proof's shape (length and magic): the engine checks it as a proof
/// and never gives it to the guest.
#[inline]
pub fn is_candidate(datagram: &[u8]) -> bool {
    datagram.len() == LEN && datagram[..4] == MAGIC
}

/// The counter of a proof made with `key`; `ProofBadMac` if it was not (constant-time check).
pub fn open(key: &Key, datagram: &[u8]) -> Result<u64, DropReason> {
    if !is_candidate(datagram) || datagram[4] != VERSION {
        return Err(DropReason::ProofBadMac);
    }
    mac_of(key, &datagram[..HEADER]).verify_slice(&datagram[HEADER..]).map_err(|_| DropReason::ProofBadMac)?;
    let mut c = [0u8; 8];
    c.copy_from_slice(&datagram[8..16]);
    Ok(u64::from_be_bytes(c))
}

/// What an accepted proof means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proved {
    /// From the endpoint the VM has already (or is being moved to): nothing to do.
    Same,
    /// From a new endpoint: the VM's one endpoint should become it.
    Moved(Endpoint),
}

/// A VM's proof checks: its key, the last counter accepted, the move asked for last.
#[derive(Debug)]
pub struct Gate {
    key: Key,
    last: u64,
    /// The endpoint the last move asked for, and when (until the VM's endpoint is it).
    pending: Option<(Endpoint, Instant)>,
}

impl Gate {
    /// A gate for `key`; no proof accepted yet.
    pub fn new(key: Key) -> Self {
        Self::resume(key, 0)
    }

    /// A gate for `key` that accepts no proof whose counter is `floor` or below (a VM
    /// restored after an engine restart: nothing proved before it can be replayed).
    pub fn resume(key: Key, floor: u64) -> Self {
        Self { key, last: floor, pending: None }
    }

    /// Checks a candidate from `from` against `current`, the endpoint the VM has now; `now_ms`
    /// is the engine's clock (Unix ms). MAC first (a forgery is dropped at the cost of one
    /// MAC and touches no state), then counter and clock, then whether to move.
    pub fn check(
        &mut self,
        from: Endpoint,
        datagram: &[u8],
        current: Option<Endpoint>,
        now: Instant,
        now_ms: u64,
    ) -> Result<Proved, DropReason> {
        let counter = open(&self.key, datagram)?;
        if counter <= self.last {
            return Err(DropReason::ProofReplayed);
        }
        if counter.abs_diff(now_ms) > SKEW_MS {
            return Err(DropReason::ProofStale);
        }
        // Taken before any refusal below: a proof held back cannot be replayed later.
        self.last = counter;
        if self.pending.is_some_and(|(e, _)| Some(e) == current) {
            self.pending = None;
        }
        match self.pending {
            None if Some(from) == current => return Ok(Proved::Same),
            Some((e, t)) if now.saturating_duration_since(t) < MOVE_GAP => {
                return if e == from { Ok(Proved::Same) } else { Err(DropReason::ProofRate) };
            }
            // No move yet, or one asked for a while ago and not applied (refused, late, or
            // superseded): this endpoint is asked for, the current one included.
            _ => {}
        }
        self.pending = Some((from, now));
        Ok(Proved::Moved(from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const NOW: u64 = 1_800_000_000_000;

    fn ep(last: u8, port: u16) -> Endpoint {
        Endpoint::new(std::net::Ipv4Addr::new(203, 0, 113, last), port)
    }

    fn key() -> Key {
        derive(&[7; 32], &[1; 32], &[2; 32])
    }

    #[test]
    fn the_key_binds_the_secret_and_both_public_keys() {
        let k = key();
        assert_ne!(k, derive(&[8; 32], &[1; 32], &[2; 32]));
        assert_ne!(k, derive(&[7; 32], &[2; 32], &[1; 32]));
        assert_ne!(k, derive(&[7; 32], &[1; 32], &[3; 32]));
    }

    #[test]
    fn a_proof_opens_with_its_key_only() {
        let p = seal(&key(), NOW);
        assert!(is_candidate(&p));
        assert_eq!(open(&key(), &p), Ok(NOW));
        assert_eq!(open(&derive(&[9; 32], &[1; 32], &[2; 32]), &p), Err(DropReason::ProofBadMac));
        for i in 0..LEN {
            let mut q = p;
            q[i] ^= 1;
            assert!(open(&key(), &q).is_err(), "byte {i} flipped still opens");
        }
        assert!(!is_candidate(&p[..LEN - 1]));
        // A WireGuard message is never a candidate.
        let mut wg = [0u8; LEN];
        wg[0] = 1;
        assert!(!is_candidate(&wg));
    }

    #[test]
    fn a_resumed_gate_takes_no_proof_made_before_its_floor() {
        let t0 = Instant::now();
        let mut g = Gate::resume(key(), NOW);
        // Made before the engine restarted (a copy an attacker kept): a replay.
        assert_eq!(g.check(ep(1, 4000), &seal(&key(), NOW - 5), None, t0, NOW), Err(DropReason::ProofReplayed));
        assert_eq!(g.check(ep(1, 4000), &seal(&key(), NOW), None, t0, NOW), Err(DropReason::ProofReplayed));
        assert_eq!(g.check(ep(1, 4000), &seal(&key(), NOW + 1), None, t0, NOW), Ok(Proved::Moved(ep(1, 4000))));
    }

    #[test]
    fn the_gate_moves_once_refuses_replays_stale_and_floods() {
        let t0 = Instant::now();
        let later = |ms: u64| t0 + Duration::from_millis(ms);
        let mut g = Gate::new(key());
        let a = ep(1, 4000);
        let b = ep(2, 5000);
        // Forgeries first: they touch nothing, however many.
        let forged = seal(&derive(&[0; 32], &[1; 32], &[2; 32]), NOW + 9);
        for _ in 0..1000 {
            assert_eq!(g.check(b, &forged, None, t0, NOW), Err(DropReason::ProofBadMac));
        }
        assert_eq!(g.check(a, &seal(&key(), NOW), None, t0, NOW), Ok(Proved::Moved(a)));
        // The same proof again, from anywhere: a replay.
        assert_eq!(g.check(b, &seal(&key(), NOW), None, t0, NOW), Err(DropReason::ProofReplayed));
        // Again from a, asked for and not applied yet: no second ask within the gap.
        assert_eq!(g.check(a, &seal(&key(), NOW + 1), None, later(10), NOW), Ok(Proved::Same));
        // Applied: the same endpoint is nothing to do.
        assert_eq!(g.check(a, &seal(&key(), NOW + 2), Some(a), later(20), NOW), Ok(Proved::Same));
        assert_eq!(g.check(b, &seal(&key(), NOW + 3), Some(a), later(30), NOW), Ok(Proved::Moved(b)));
        // Flapping back within the gap is refused (and that proof is spent: no later replay).
        let flap = seal(&key(), NOW + 4);
        assert_eq!(g.check(a, &flap, Some(a), later(40), NOW), Err(DropReason::ProofRate));
        assert_eq!(g.check(a, &flap, Some(a), later(2000), NOW), Err(DropReason::ProofReplayed));
        // b not applied (refused, or late): after the gap b's next proof asks again; or a's
        // (where the VM still points) asks to stay, overriding the stale ask.
        assert_eq!(g.check(b, &seal(&key(), NOW + 5), Some(a), later(500), NOW), Ok(Proved::Same));
        assert_eq!(g.check(b, &seal(&key(), NOW + 6), Some(a), later(1100), NOW), Ok(Proved::Moved(b)));
        assert_eq!(g.check(a, &seal(&key(), NOW + 7), Some(a), later(2200), NOW), Ok(Proved::Moved(a)));
        // Outside the skew either way.
        assert_eq!(
            g.check(a, &seal(&key(), NOW + SKEW_MS + 10), Some(a), later(9000), NOW),
            Err(DropReason::ProofStale)
        );
        assert_eq!(
            g.check(a, &seal(&key(), NOW - SKEW_MS - 1), Some(a), later(9000), NOW),
            Err(DropReason::ProofReplayed)
        );
    }

    proptest::proptest! {
        /// Any datagram, of any length and content, from anywhere: no panic, and nothing but
        /// a proof sealed with the key moves anything.
        #[test]
        fn no_datagram_but_a_sealed_proof_moves_anything(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..96),
            magic in proptest::prelude::any::<bool>(),
        ) {
            let mut d = bytes;
            if magic && d.len() >= 4 {
                d[..4].copy_from_slice(&MAGIC);
            }
            let mut g = Gate::new(key());
            let r = g.check(ep(9, 9), &d, None, Instant::now(), NOW);
            proptest::prop_assert!(r.is_err(), "{r:?}");
        }
    }
}
