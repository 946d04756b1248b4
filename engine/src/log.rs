//! Logging: one line per event on stderr, and a rate limiter for anything a guest can trigger.
//!
//! Guest-triggered lines carry header fields only ([`FrameSummary`]): never payload bytes,
//! never raw header bytes. `OMERTA_LOG=debug|info|warn|error` sets the level (default info), a
//! binary's `-q`/`-v` override it; lines are text with an RFC 3339 time or JSON ([`Format`]).
//! When stderr is systemd's journal (`$JOURNAL_STREAM` names it), each line starts with its
//! syslog priority (`<3>` error, `<4>` warn, `<6>` info, `<7>` debug: sd-daemon(3)), so
//! `journalctl -p warning` shows warnings and errors.
#![forbid(unsafe_code)]

use core::fmt;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use zerocopy::FromBytes;

use crate::wire::{EtherType, EthernetHeader, IpProtocol, Ipv4Header};

/// Severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Level {
    /// Details for developers.
    Debug,
    /// Normal lifecycle events.
    Info,
    /// Something was refused or went wrong, the engine goes on.
    Warn,
    /// A VM or the engine stops because of it.
    Error,
}

static LEVEL: AtomicU8 = AtomicU8::new(u8::MAX);
static FORMAT: AtomicU8 = AtomicU8::new(0);
/// Stderr is the journal: lines carry their priority.
static JOURNAL: AtomicBool = AtomicBool::new(false);

impl std::str::FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "debug" => Ok(Level::Debug),
            "info" => Ok(Level::Info),
            "warn" => Ok(Level::Warn),
            "error" => Ok(Level::Error),
            _ => Err(format!("'{s}' is not a log level (debug, info, warn, error)")),
        }
    }
}

/// How lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `2026-12-06T17:00:00.123Z omerta-engine INFO message`.
    Text,
    /// One JSON object a line: `time`, `level`, `program`, `msg`.
    Json,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            _ => Err(format!("'{s}' is not a log format (text, json)")),
        }
    }
}

/// Sets the level and format for the rest of the process: `level` if given (the command
/// line), else `OMERTA_LOG`, else info. A set `OMERTA_LOG` that is not a level is an error
/// (say it once at start rather than log at a level nobody asked for).
pub fn init(level: Option<Level>, format: Format) -> Result<(), String> {
    let env = match std::env::var("OMERTA_LOG") {
        Ok(v) => Some(v.parse::<Level>().map_err(|e| format!("OMERTA_LOG: {e}"))?),
        Err(_) => None,
    };
    LEVEL.store(level.or(env).unwrap_or(Level::Info) as u8, Ordering::Relaxed);
    FORMAT.store(u8::from(format == Format::Json), Ordering::Relaxed);
    JOURNAL.store(stderr_is_journal(), Ordering::Relaxed);
    Ok(())
}

/// True when `$JOURNAL_STREAM` (`DEV:INO`, set by systemd for a unit whose output is the
/// journal) names this process's stderr, as sd-daemon(3) says to check.
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd as _;
    use std::os::unix::fs::MetadataExt as _;
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else { return false };
    let stat = std::io::stderr().as_fd().try_clone_to_owned().map(std::fs::File::from).and_then(|f| f.metadata());
    stat.is_ok_and(|m| names_stream(&stream, m.dev(), m.ino()))
}

/// Whether `stream` (`DEV:INO`, decimal) is the file `(dev, ino)`.
fn names_stream(stream: &str, dev: u64, ino: u64) -> bool {
    stream.split_once(':').is_some_and(|(d, i)| d.parse::<u64>() == Ok(dev) && i.parse::<u64>() == Ok(ino))
}

fn threshold() -> u8 {
    let l = LEVEL.load(Ordering::Relaxed);
    if l != u8::MAX {
        return l;
    }
    // Not initialised (libraries, tests): OMERTA_LOG if it is a level, else info.
    let from_env = std::env::var("OMERTA_LOG").ok().and_then(|v| v.parse().ok()).unwrap_or(Level::Info) as u8;
    LEVEL.store(from_env, Ordering::Relaxed);
    from_env
}

/// True if `level` is printed.
pub fn enabled(level: Level) -> bool {
    level as u8 >= threshold()
}

fn program() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        std::env::args()
            .next()
            .and_then(|a| std::path::Path::new(&a).file_name().map(|f| f.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "omerta".into())
    })
}

/// The wall clock in milliseconds since the Unix epoch (0 before it): blocked events' time and
/// the endpoint proof's counter.
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// RFC 3339 in UTC, to the millisecond: `2026-12-06T17:00:00.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
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

/// `s` as the inside of a JSON string.
fn json_escape(s: &str, out: &mut String) {
    use fmt::Write as _;
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
}

/// One line as it is written, without its newline (`journal`: with its syslog priority first).
fn line(level: Level, at: SystemTime, args: fmt::Arguments<'_>, journal: bool) -> String {
    let priority = match (journal, level) {
        (false, _) => "",
        (true, Level::Debug) => "<7>",
        (true, Level::Info) => "<6>",
        (true, Level::Warn) => "<4>",
        (true, Level::Error) => "<3>",
    };
    let time = rfc3339(at);
    if FORMAT.load(Ordering::Relaxed) == 1 {
        let tag = match level {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        };
        let mut out = format!("{priority}{{\"time\":\"{time}\",\"level\":\"{tag}\",\"program\":\"");
        json_escape(program(), &mut out);
        out.push_str("\",\"msg\":\"");
        json_escape(&args.to_string(), &mut out);
        out.push_str("\"}");
        out
    } else {
        let tag = match level {
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        };
        format!("{priority}{time} {} {tag} {args}", program())
    }
}

/// Writes one line: `time program LEVEL message` (RFC 3339 time, UTC), or its JSON object.
pub fn emit(level: Level, args: fmt::Arguments<'_>) {
    if !enabled(level) {
        return;
    }
    let text = line(level, SystemTime::now(), args, JOURNAL.load(Ordering::Relaxed));
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{text}");
}

/// Logs at info level.
#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::log::emit($crate::log::Level::Info, format_args!($($t)*)) } }
/// Logs at warn level (not for guest-triggered events: use a [`RateLimiter`](crate::log::RateLimiter)).
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::log::emit($crate::log::Level::Warn, format_args!($($t)*)) } }
/// Logs at error level.
#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::log::emit($crate::log::Level::Error, format_args!($($t)*)) } }
/// Logs at debug level.
#[macro_export]
macro_rules! debug { ($($t:tt)*) => { $crate::log::emit($crate::log::Level::Debug, format_args!($($t)*)) } }

/// A token bucket: `burst` lines at once, then `per_sec` a second; counts what it suppresses.
#[derive(Debug)]
pub struct RateLimiter {
    tokens: f64,
    per_sec: f64,
    burst: f64,
    last: Instant,
    suppressed: u64,
}

impl RateLimiter {
    /// A limiter.
    pub fn new(per_sec: u32, burst: u32) -> Self {
        Self {
            tokens: f64::from(burst),
            per_sec: f64::from(per_sec),
            burst: f64::from(burst),
            last: Instant::now(),
            suppressed: 0,
        }
    }

    /// Takes a token at `now`. `Some(n)` means log now, after `n` suppressed lines; `None`
    /// means stay quiet.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.per_sec).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// Lines suppressed since the last one allowed.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

/// The header fields of a frame that may be logged. Built without trusting any length field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSummary {
    /// Frame length.
    pub len: usize,
    /// Ethertype, if the Ethernet header is present.
    pub ethertype: Option<EtherType>,
    /// IPv4 source, destination and protocol, if an IPv4 header is present.
    pub ipv4: Option<([u8; 4], [u8; 4], IpProtocol)>,
    /// Transport ports (UDP, TCP), if present right after a plain 20-byte IPv4 header or options.
    pub ports: Option<(u16, u16)>,
}

impl FrameSummary {
    /// Summarises `frame`.
    pub fn of(frame: &[u8]) -> Self {
        let mut s = Self { len: frame.len(), ethertype: None, ipv4: None, ports: None };
        let Ok((eth, rest)) = EthernetHeader::parse(frame) else { return s };
        s.ethertype = Some(eth.ethertype());
        if eth.ethertype() != EtherType::Ipv4 {
            return s;
        }
        let Ok((ip, _)) = Ipv4Header::ref_from_prefix(rest) else { return s };
        let proto = IpProtocol::from(ip.protocol);
        s.ipv4 = Some((ip.src, ip.dst, proto));
        if matches!(proto, IpProtocol::Udp | IpProtocol::Tcp) && ip.header_len() >= Ipv4Header::LEN {
            if let Some([a, b, c, d]) =
                rest.get(ip.header_len()..ip.header_len() + 4).and_then(|p| <[u8; 4]>::try_from(p).ok())
            {
                s.ports = Some((u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d])));
            }
        }
        s
    }
}

impl fmt::Display for FrameSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "len={}", self.len)?;
        match self.ethertype {
            Some(EtherType::Ipv4) => {}
            Some(t) => return write!(f, " ethertype={:#06x}", u16::from(t)),
            None => return Ok(()),
        }
        if let Some((src, dst, proto)) = self.ipv4 {
            let p = match proto {
                IpProtocol::Udp => "udp".to_string(),
                IpProtocol::Tcp => "tcp".to_string(),
                IpProtocol::Icmp => "icmp".to_string(),
                IpProtocol::Unknown(n) => format!("proto-{n}"),
            };
            let (s, d) = (core::net::Ipv4Addr::from(src), core::net::Ipv4Addr::from(dst));
            match self.ports {
                Some((sp, dp)) => write!(f, " {p} {s}:{sp} -> {d}:{dp}")?,
                None => write!(f, " {p} {s} -> {d}")?,
            }
        }
        Ok(())
    }
}

/// How often a VM's blocked traffic may be logged: 10 lines a second, bursts of 20.
pub fn blocked_traffic_limiter() -> RateLimiter {
    RateLimiter::new(10, 20)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::FrameSpec;
    use crate::{Endpoint, VmIdentity};
    use std::time::Duration;

    #[test]
    fn rfc3339_of_known_instants() {
        let at = |ms| UNIX_EPOCH + Duration::from_millis(ms);
        assert_eq!(rfc3339(at(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(at(1_796_223_557_174)), "2026-12-02T14:59:17.174Z");
        assert_eq!(rfc3339(at(951_782_400_000)), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(at(4_107_542_399_999)), "2100-02-28T23:59:59.999Z");
    }

    #[test]
    fn the_journal_gets_each_lines_priority_and_nothing_else_does() {
        let at = UNIX_EPOCH;
        let text = line(Level::Warn, at, format_args!("m"), true);
        assert!(text.starts_with("<4>1970-01-01T00:00:00.000Z ") && text.ends_with(" WARN m"), "{text}");
        assert!(line(Level::Error, at, format_args!("m"), true).starts_with("<3>"));
        assert!(line(Level::Info, at, format_args!("m"), true).starts_with("<6>"));
        assert!(line(Level::Debug, at, format_args!("m"), true).starts_with("<7>"));
        assert!(line(Level::Warn, at, format_args!("m"), false).starts_with("1970"));
        assert!(names_stream("8:1234", 8, 1234));
        for other in ["8:1235", "9:1234", "8", "", "x:y", "8:1234:5"] {
            assert!(!names_stream(other, 8, 1234), "{other}");
        }
    }

    #[test]
    fn json_lines_escape_what_json_needs() {
        let mut out = String::new();
        json_escape("a\"b\\c\nd\u{1}e é", &mut out);
        assert_eq!(out, "a\\\"b\\\\c\\nd\\u0001e é");
        assert!("json".parse::<Format>().is_ok() && "xml".parse::<Format>().is_err());
        assert!("warn".parse::<Level>().is_ok() && "loud".parse::<Level>().unwrap_err().contains("debug, info"));
    }

    #[test]
    fn limiter_allows_a_burst_then_a_rate() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(10, 3);
        assert_eq!((0..5).filter(|_| l.allow(t0).is_some()).count(), 3);
        assert_eq!(l.suppressed(), 2);
        // 100 ms later one token is back, and it reports the two suppressed lines.
        assert_eq!(l.allow(t0 + Duration::from_millis(100)), Some(2));
        assert_eq!(l.allow(t0 + Duration::from_millis(101)), None);
    }

    #[test]
    fn summary_has_headers_only() {
        let id = VmIdentity::default();
        let secret = b"secret-payload-bytes";
        let f = FrameSpec::udp(&id, Endpoint::new([8, 8, 8, 8].into(), 53), secret).build();
        let line = FrameSummary::of(&f).to_string();
        assert_eq!(line, format!("len={} udp 10.0.2.15:40000 -> 8.8.8.8:53", f.len()));
        assert!(!line.contains("secret"));
        assert_eq!(FrameSummary::of(&f[..5]).to_string(), "len=5");
        assert_eq!(FrameSummary::of(&f[..20]).to_string(), "len=20");
        let v6 = crate::testkit::raw_frame(&id, 0x86dd, &[0; 40]);
        assert_eq!(FrameSummary::of(&v6).to_string(), "len=54 ethertype=0x86dd");
    }
}
