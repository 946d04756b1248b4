//! One datagram's way in, from bytes to a message to act on, with no socket and the caller's
//! clock: the daemon's receiver ([`crate::daemon`]) and the fuzz target's sessions
//! ([`crate::fuzzing::session`]) both go through [`take`], so what the fuzzer checks is what
//! runs.
//!
//! The order ([`crate::admit`] has the why): the source's rate (before any decryption), the
//! AEAD, a known address's check budget, parsing, the claimed peer's address, the signature
//! and the envelope's fields, then admission by peer and path; an accepted message's
//! reservation is recorded (the journal) before it is handed back, and one that cannot be is
//! not acted on.
use std::collections::HashSet;
use std::net::SocketAddrV4;

use crate::admit::{Admission, Refusal, Verdict};
use crate::wire::{self, Envelope};

/// What became of a datagram.
#[derive(Debug)]
pub enum Outcome {
    /// Act on it (`moved`: its peer answered a challenge from this new address).
    Dispatch {
        /// The message.
        env: Envelope,
        /// The peer's endpoint moved to the datagram's source.
        moved: bool,
    },
    /// Not acted on: ping `peer` at `to` with `nonce` (its pong from there moves it).
    Challenge {
        /// The peer.
        peer: String,
        /// Where the message came from.
        to: SocketAddrV4,
        /// The nonce.
        nonce: String,
    },
    /// It did not open (size, AEAD, JSON, signature, addressee, hop count, staleness).
    Dropped(wire::Drop),
    /// Admission refused it (counted there).
    Refused {
        /// Why.
        why: Refusal,
        /// The peer it was, or claimed to be, from, once known.
        peer: Option<String>,
    },
    /// Accepted (its peer's slot, and a move, are admission's), but its reservation could
    /// not be recorded: not acted on (after a restart it could otherwise be accepted again).
    Unrecorded {
        /// The message.
        env: Envelope,
        /// The peer's endpoint moved to the datagram's source.
        moved: bool,
        /// Why.
        error: std::io::Error,
    },
}

/// The clocks: the wall clock envelopes are stamped with, and a monotonic one.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Seconds since the epoch.
    pub now_s: u64,
    /// Milliseconds of a monotonic clock.
    pub now_ms: u64,
}

/// Takes the datagram `data` from `from`, meant for peer `me` under network key `key`.
/// `kept`: peers never evicted for a newcomer (asked by the caller when
/// [`Admission::is_full`]); `nonce` makes a challenge's nonce; `record` writes a reservation
/// to the journal.
#[allow(clippy::too_many_arguments)]
pub fn take(
    adm: &mut Admission,
    key: &[u8; 32],
    me: &str,
    data: &[u8],
    from: SocketAddrV4,
    clock: Clock,
    kept: &HashSet<String>,
    nonce: impl FnOnce() -> String,
    record: impl FnOnce(&str, u64) -> std::io::Result<()>,
) -> Outcome {
    let Clock { now_s, now_ms } = clock;
    if let Err(why) = adm.source(from, now_ms) {
        return Outcome::Refused { why, peer: None };
    }
    let plain = match wire::decrypt(key, data) {
        Ok(p) => p,
        Err(d) => return Outcome::Dropped(d),
    };
    if let Err(why) = adm.after_decrypt(from, now_ms) {
        return Outcome::Refused { why, peer: None };
    }
    let unverified = match wire::parse(&plain) {
        Ok(u) => u,
        Err(d) => return Outcome::Dropped(d),
    };
    if let Err(why) = adm.before_verify(unverified.claimed(), from, now_ms) {
        return Outcome::Refused { why, peer: Some(unverified.claimed().to_string()) };
    }
    let env = match unverified.verify(me, now_s) {
        Ok((env, _)) => env,
        Err(d) => return Outcome::Dropped(d),
    };
    match adm.admit(&env, from, now_s, now_ms, kept, nonce) {
        Verdict::Accept(a) => {
            if let Some(t) = a.reserve {
                if let Err(error) = record(&env.from_peer_id, t) {
                    return Outcome::Unrecorded { env, moved: a.moved, error };
                }
                adm.commit(&env.from_peer_id, t);
            }
            Outcome::Dispatch { env, moved: a.moved }
        }
        Verdict::Challenge { to, nonce } => Outcome::Challenge { peer: env.from_peer_id, to, nonce },
        Verdict::Refuse(why) => Outcome::Refused { why, peer: Some(env.from_peer_id) },
    }
}
