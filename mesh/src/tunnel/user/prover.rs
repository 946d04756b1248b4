//! When a userspace tunnel proves its endpoint to the VM's engine (docs/mesh.md, "Behind NAT").
//!
//! The engine learns where we are (after every NAT on the way) only from a proof sent from the
//! tunnel's own socket: the same NAT mapping as our WireGuard. So the tunnel sends one
//! - at once, and every [`UNCONFIRMED`] until the VM is first heard (each followed by a
//!   handshake initiation on the next tick: the one before the engine moved was dropped);
//! - every [`EVERY`] after that (the engine keeps the endpoint; the proof also holds the NAT
//!   mapping, beside WireGuard's 25 s keepalive);
//! - [`SILENT`] after we sent something and heard nothing back since: our mapping may have
//!   changed (a roam, a NAT that forgot us), and the engine follows the next proof.
//!
//! Never more than one per [`UNCONFIRMED`]; the engine takes 10 per second. Pure: the caller
//! gives the clock.
use std::time::{Duration, Instant};

use engine::proof::{Key, LEN};

/// Between proofs until the VM is first heard.
pub const UNCONFIRMED: Duration = Duration::from_secs(1);
/// Between proofs once it has been.
pub const EVERY: Duration = Duration::from_secs(15);
/// Silence after a send that calls for a proof.
pub const SILENT: Duration = Duration::from_millis(1500);

/// A tunnel's proof schedule and counter.
#[derive(Debug)]
pub struct Prover {
    key: Key,
    counter: u64,
    last_proof: Option<Instant>,
    heard: Option<Instant>,
    /// The first send since the VM was last heard.
    sent_unanswered: Option<Instant>,
    initiate: bool,
    /// Proofs sent before the VM was first heard.
    unanswered: u32,
}

/// Proofs unanswered after which the tunnel says why that may be (once).
pub const UNANSWERED_WARN: u32 = 30;

impl Prover {
    /// A schedule for `key`: the first proof is due at once.
    pub fn new(key: Key) -> Self {
        Self { key, counter: 0, last_proof: None, heard: None, sent_unanswered: None, initiate: false, unanswered: 0 }
    }

    /// An authenticated datagram came from the VM.
    pub fn heard(&mut self, now: Instant) {
        self.heard = Some(now);
        self.sent_unanswered = None;
    }

    /// We sent the VM something (data, a handshake, a keepalive).
    pub fn sent(&mut self, now: Instant) {
        self.sent_unanswered.get_or_insert(now);
    }

    /// The proof to send now, if one is due; `unix_ms` is our clock (the counter follows it,
    /// and never goes back).
    pub fn due(&mut self, now: Instant, unix_ms: u64) -> Option<[u8; LEN]> {
        let since = |t: Option<Instant>| t.map(|t| now.saturating_duration_since(t));
        let last = since(self.last_proof);
        let due = match (last, self.heard) {
            (None, _) => true,
            (Some(l), None) => l >= UNCONFIRMED,
            (Some(l), Some(_)) => l >= EVERY || (l >= UNCONFIRMED && since(self.sent_unanswered) >= Some(SILENT)),
        };
        if !due {
            return None;
        }
        self.last_proof = Some(now);
        // A proof answers the silence: the next one needs another unanswered send.
        self.sent_unanswered = None;
        self.initiate = self.heard.is_none();
        self.unanswered += u32::from(self.heard.is_none());
        self.counter = unix_ms.max(self.counter + 1);
        Some(engine::proof::seal(&self.key, self.counter))
    }

    /// Whether the VM has stayed silent for exactly [`UNANSWERED_WARN`] proofs (true once).
    pub fn silent_too_long(&self) -> bool {
        self.heard.is_none() && self.unanswered == UNANSWERED_WARN && self.initiate
    }

    /// Whether to send a handshake initiation now (once, after a proof while the VM has not
    /// been heard yet).
    pub fn take_initiation(&mut self) -> bool {
        std::mem::take(&mut self.initiate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_800_000_000_000;

    fn prover() -> Prover {
        Prover::new(engine::proof::derive(&[1; 32], &[2; 32], &[3; 32]))
    }

    #[test]
    fn proofs_come_every_second_until_heard_then_every_fifteen() {
        let t = Instant::now();
        let mut p = prover();
        let first = p.due(t, MS).expect("at once");
        assert_eq!(engine::proof::open(&engine::proof::derive(&[1; 32], &[2; 32], &[3; 32]), &first), Ok(MS));
        assert!(p.take_initiation() && !p.take_initiation());
        assert!(p.due(t + Duration::from_millis(900), MS).is_none());
        assert!(p.due(t + Duration::from_millis(1000), MS).is_some());
        p.heard(t + Duration::from_millis(1100));
        assert!(p.due(t + Duration::from_secs(10), MS).is_none());
        assert!(p.due(t + Duration::from_secs(16), MS).is_some());
        assert!(!p.take_initiation(), "no initiation once heard");
    }

    #[test]
    fn silence_after_a_send_brings_a_proof_and_only_one() {
        let t = Instant::now();
        let mut p = prover();
        p.due(t, MS);
        p.heard(t);
        p.sent(t + Duration::from_secs(2));
        assert!(p.due(t + Duration::from_millis(3000), MS).is_none(), "1 s of silence is not enough");
        assert!(p.due(t + Duration::from_millis(3600), MS).is_some());
        // Still silent, nothing sent since the proof: no storm.
        assert!(p.due(t + Duration::from_secs(6), MS).is_none());
        // Sent again and still unanswered: another.
        p.sent(t + Duration::from_secs(6));
        assert!(p.due(t + Duration::from_millis(7600), MS).is_some());
    }

    #[test]
    fn the_counter_never_goes_back_with_the_clock() {
        let t = Instant::now();
        let key = engine::proof::derive(&[1; 32], &[2; 32], &[3; 32]);
        let mut p = Prover::new(key);
        let a = engine::proof::open(&key, &p.due(t, MS).unwrap()).unwrap();
        let b = engine::proof::open(&key, &p.due(t + Duration::from_secs(2), MS - 5000).unwrap()).unwrap();
        assert!(b > a);
    }
}
