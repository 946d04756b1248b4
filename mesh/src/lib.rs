//! Omerta's mesh: a consumer asks a provider on the same Omerta network for a VM, gets it, and
//! SSHes in through WireGuard. `omertad` is the daemon (provider and consumer roles), `omerta`
//! its CLI; docs/mesh.md has the messages, the files and an operator's steps.
//!
//! - [`net`]: networks, node identities, invite links and the state directory (`~/.omerta`).
//! - [`wire`]: the sealed, signed datagrams between daemons and the messages they carry.
//! - [`check`]: the strict grammar every field from a peer meets before it is used.
//! - [`ipc`]: the CLI ⇄ daemon frames (4-byte big-endian length + JSON).
//! - [`daemon`]: `omertad` itself, by role; [`tunnel`]: the consumer's WireGuard tunnels (interfaces, or in userspace).
//! - [`text`]: the ID grammar, base64 and safe printing (a leaf every module may use).
//!
//! Bad input from a peer or a CLI client is refused with a reason and never panics; every
//! size is bounded, every wait has a timeout.
#![forbid(unsafe_code)]

pub mod admit;
pub mod check;
pub mod daemon;
pub mod fuzzing;
pub mod ipc;
pub mod lease;
pub mod net;
pub mod receive;
pub mod stream;
pub mod text;
pub mod tunnel;
pub mod wire;

/// Seconds since the Unix epoch.
pub fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The OS's random source failed: no key, nonce or ID may be made.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the OS random source failed: {0}")]
pub struct RandomError(getrandom::Error);

/// `n` random bytes from the OS.
pub fn random<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(RandomError)?;
    Ok(b)
}

/// A random ID: 16 lowercase hex characters (VM, request and message IDs, nonces).
pub fn random_id() -> Result<String, RandomError> {
    Ok(hex(&random::<8>()?))
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// 32 bytes from 64 hex characters (either case), or `None`.
pub fn unhex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        *o = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// RFC 3339 in UTC, to the millisecond (the engine's: one format in every log).
pub use engine::log::rfc3339;
