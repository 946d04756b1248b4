//! Omerta's mesh: a consumer asks a provider on the same Omerta network for a VM, gets it, and
//! SSHes in through WireGuard. `omertad` is the daemon (provider and consumer roles), `omerta`
//! its CLI; docs/mesh.md has the messages, the files and an operator's steps.
//!
//! - [`net`]: networks, node identities, invite links and the state directory (`~/.omerta`).
//! - [`wire`]: the sealed, signed datagrams between daemons and the messages they carry.
//! - [`check`]: the strict grammar every field from a peer meets before it is used.
//! - [`ipc`]: the CLI ⇄ daemon frames (4-byte big-endian length + JSON).
//! - [`daemon`]: `omertad` itself; [`tunnel`]: the consumer's WireGuard interfaces.
//!
//! Bad input from a peer or a CLI client is refused with a reason and never panics; every
//! size is bounded, every wait has a timeout.
#![deny(unsafe_code)]

pub mod check;
pub mod daemon;
pub mod fuzzing;
pub mod ipc;
pub mod net;
pub mod tunnel;
pub mod wire;

/// Seconds since the Unix epoch.
pub fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `n` random bytes from the OS.
pub fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // Without the OS's random source no key, nonce or ID may be made: end here, clearly.
    if let Err(e) = getrandom::fill(&mut b) {
        eprintln!("omerta: the OS random source failed: {e}");
        std::process::exit(1);
    }
    b
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A log line on stderr with an RFC 3339 timestamp (UTC).
pub fn log(msg: &str) {
    eprintln!("{} {msg}", rfc3339(std::time::SystemTime::now()));
}

/// RFC 3339 in UTC, to the millisecond.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_of_known_instants() {
        let at = |s| std::time::UNIX_EPOCH + std::time::Duration::from_millis(s);
        assert_eq!(super::rfc3339(at(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339(at(1_796_223_557_174)), "2026-12-02T14:59:17.174Z");
        assert_eq!(super::rfc3339(at(951_782_400_000)), "2000-02-29T00:00:00.000Z");
    }
}
