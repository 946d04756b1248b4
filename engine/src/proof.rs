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
//! clock, at most [`RATE`] per second).
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
/// Proof candidates a VM's engine checks per second; [`BURST`] may come at once.
pub const RATE: u32 = 10;
/// See [`RATE`].
pub const BURST: u32 = 20;

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

/// A VM's proof checks: its key, the last counter accepted, a token bucket.
#[derive(Debug)]
pub struct Gate {
    key: Key,
    last: u64,
    tokens: u32,
    refilled: Option<Instant>,
    /// The endpoint the last accepted proof named (asked for, maybe not applied yet).
    pending: Option<Endpoint>,
}

impl Gate {
    /// A gate for `key`; no proof accepted yet.
    pub fn new(key: Key) -> Self {
        Self { key, last: 0, tokens: BURST, refilled: None, pending: None }
    }

    /// Checks a candidate from `from` against `current`, the endpoint the VM has now; `now_ms`
    /// is the engine's clock (Unix ms). Rate, MAC, counter, in that order: a flood costs one
    /// comparison per datagram past the rate, a forgery one MAC.
    pub fn check(
        &mut self,
        from: Endpoint,
        datagram: &[u8],
        current: Option<Endpoint>,
        now: Instant,
        now_ms: u64,
    ) -> Result<Proved, DropReason> {
        self.refill(now);
        if self.tokens == 0 {
            return Err(DropReason::ProofRate);
        }
        self.tokens -= 1;
        let counter = open(&self.key, datagram)?;
        if counter <= self.last {
            return Err(DropReason::ProofReplayed);
        }
        if counter.abs_diff(now_ms) > SKEW_MS {
            return Err(DropReason::ProofStale);
        }
        self.last = counter;
        if Some(from) == current || Some(from) == self.pending {
            return Ok(Proved::Same);
        }
        self.pending = Some(from);
        Ok(Proved::Moved(from))
    }

    fn refill(&mut self, now: Instant) {
        let Some(then) = self.refilled else {
            self.refilled = Some(now);
            return;
        };
        let earned = now.saturating_duration_since(then).as_millis() * u128::from(RATE) / 1000;
        if earned > 0 {
            self.tokens = u32::try_from(earned).map_or(BURST, |e| self.tokens.saturating_add(e).min(BURST));
            self.refilled = Some(now);
        }
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
    fn the_gate_moves_once_refuses_replays_stale_and_floods() {
        let t0 = Instant::now();
        let mut g = Gate::new(key());
        let a = ep(1, 4000);
        let b = ep(2, 5000);
        assert_eq!(g.check(a, &seal(&key(), NOW), None, t0, NOW), Ok(Proved::Moved(a)));
        // The same proof again, from anywhere: a replay.
        assert_eq!(g.check(b, &seal(&key(), NOW), None, t0, NOW), Err(DropReason::ProofReplayed));
        // Again from a (asked for, not applied yet): no second move.
        assert_eq!(g.check(a, &seal(&key(), NOW + 1), None, t0, NOW), Ok(Proved::Same));
        assert_eq!(g.check(a, &seal(&key(), NOW + 2), Some(a), t0, NOW), Ok(Proved::Same));
        assert_eq!(g.check(b, &seal(&key(), NOW + 3), Some(a), t0, NOW), Ok(Proved::Moved(b)));
        // Outside the skew either way.
        assert_eq!(g.check(a, &seal(&key(), NOW + SKEW_MS + 10), Some(b), t0, NOW), Err(DropReason::ProofStale));
        assert_eq!(g.check(a, &seal(&key(), NOW - SKEW_MS - 1), Some(b), t0, NOW), Err(DropReason::ProofReplayed));
        // A forgery costs a token and moves nothing.
        assert_eq!(g.check(a, &seal(&derive(&[0; 32], &[1; 32], &[2; 32]), NOW + 9), Some(b), t0, NOW), Err(DropReason::ProofBadMac));
        // The bucket: BURST at once, then RATE per second.
        let mut g = Gate::new(key());
        let mut passed = 0;
        for i in 0..100 {
            if g.check(a, &seal(&key(), NOW + i), None, t0, NOW).is_ok() {
                passed += 1;
            }
        }
        assert_eq!(passed, BURST);
        assert_eq!(g.check(a, &seal(&key(), NOW + 200), None, t0, NOW), Err(DropReason::ProofRate));
        let later = t0 + Duration::from_millis(1000);
        assert!(g.check(a, &seal(&key(), NOW + 201), None, later, NOW).is_ok());
    }
}
