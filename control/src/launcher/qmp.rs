//! The launcher's QMP client: asks a VMM whether its guest runs or is paused (a host that ran
//! out of room pauses it: `werror=enospc`) and lets it go on. One short connection per
//! question to the monitor socket the launcher bound for that VMM. The answers come from a
//! process a guest may have taken over: lines are capped, every read has a deadline, replies
//! are parsed into types, events are skipped.
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// How long one question may take, all of it.
pub(super) const DEADLINE: Duration = Duration::from_millis(500);

/// The longest line read from a monitor.
const MAX_LINE: u64 = 64 * 1024;

/// The most lines read while waiting for one answer (events come between).
const MAX_LINES: usize = 64;

/// Why a monitor did not answer.
#[derive(Debug, thiserror::Error)]
pub(super) enum QmpError {
    /// Connecting, reading or writing failed, or the deadline passed.
    #[error("monitor: {0}")]
    Io(#[from] std::io::Error),
    /// A line too long, not JSON of the expected shape, or no answer among the lines read.
    #[error("monitor: {0}")]
    Bad(String),
    /// QEMU answered with an error.
    #[error("monitor: QEMU said {0}")]
    Refused(String),
}

/// What `query-status` says.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(super) struct Status {
    /// `running`, `paused`, `io-error`, `shutdown`, ...
    pub(super) status: String,
    /// Whether the guest's CPUs run.
    pub(super) running: bool,
}

#[derive(Deserialize)]
struct Answer<T> {
    #[serde(rename = "return")]
    ret: Option<T>,
    error: Option<ErrorBody>,
    event: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct ErrorBody {
    desc: String,
}

/// One connection to a monitor, within [`DEADLINE`] from its start.
struct Session {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    until: Instant,
}

impl Session {
    fn open(path: &Path) -> Result<Self, QmpError> {
        let until = Instant::now() + DEADLINE;
        let s = UnixStream::connect(path)?;
        s.set_write_timeout(Some(DEADLINE))?;
        let mut me = Session { reader: BufReader::new(s.try_clone()?), writer: s, until };
        // The greeting, then capabilities negotiation.
        me.line()?;
        me.ask::<serde::de::IgnoredAny>("qmp_capabilities")?;
        Ok(me)
    }

    fn line(&mut self) -> Result<Vec<u8>, QmpError> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(QmpError::Io(std::io::ErrorKind::TimedOut.into()));
        }
        self.reader.get_ref().set_read_timeout(Some(left))?;
        let mut line = Vec::new();
        let n = (&mut self.reader).take(MAX_LINE + 1).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Err(QmpError::Bad("closed".into()));
        }
        if n as u64 > MAX_LINE {
            return Err(QmpError::Bad(format!("a line longer than {MAX_LINE} bytes")));
        }
        Ok(line)
    }

    /// Sends `command` and reads lines until its answer (events skipped).
    fn ask<T: serde::de::DeserializeOwned>(&mut self, command: &str) -> Result<T, QmpError> {
        self.writer.write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes())?;
        for _ in 0..MAX_LINES {
            let line = self.line()?;
            let a: Answer<T> = serde_json::from_slice(&line).map_err(|e| QmpError::Bad(format!("{command}: {e}")))?;
            match a {
                Answer { ret: Some(r), .. } => return Ok(r),
                Answer { error: Some(e), .. } => {
                    return Err(QmpError::Refused(e.desc.chars().take(200).collect()));
                }
                Answer { event: Some(_), .. } => continue,
                _ => return Err(QmpError::Bad(format!("{command}: neither an answer nor an event"))),
            }
        }
        Err(QmpError::Bad(format!("{command}: no answer in {MAX_LINES} lines")))
    }
}

/// The guest's run state, asked of the monitor at `path`.
pub(super) fn status(path: &Path) -> Result<Status, QmpError> {
    Session::open(path)?.ask("query-status")
}

/// Lets a paused guest go on (`cont`).
pub(super) fn cont(path: &Path) -> Result<(), QmpError> {
    Session::open(path)?.ask::<serde::de::IgnoredAny>("cont").map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A monitor that greets, then answers each command with the next of `answers` (each
    /// answer may be several lines).
    fn fake(tag: &str, answers: Vec<String>) -> (std::path::PathBuf, std::thread::JoinHandle<()>) {
        let path = std::env::temp_dir().join(format!("omerta-qmp-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let _ = s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n");
            let mut r = BufReader::new(s.try_clone().unwrap());
            for a in answers {
                let mut cmd = String::new();
                if r.read_line(&mut cmd).unwrap_or(0) == 0 {
                    return;
                }
                let _ = s.write_all(a.as_bytes());
            }
            std::thread::sleep(Duration::from_secs(1));
        });
        (path, t)
    }

    #[test]
    fn a_monitor_is_asked_through_events_and_within_its_deadline() {
        let ok = "{\"return\": {}}\n".to_string();
        // Events between command and answer are skipped.
        let event = "{\"event\": \"BLOCK_IO_ERROR\", \"data\": {\"reason\": \"No space left on device\"}}\n";
        let (p, t) = fake(
            "status",
            vec![ok.clone(), format!("{event}{event}{{\"return\": {{\"status\": \"io-error\", \"running\": false, \"singlestep\": false}}}}\n")],
        );
        assert_eq!(status(&p).unwrap(), Status { status: "io-error".into(), running: false });
        t.join().unwrap();
        // An error answer.
        let (p, t) =
            fake("error", vec![ok.clone(), "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n".into()]);
        assert!(cont(&p).unwrap_err().to_string().contains("nope"));
        t.join().unwrap();
        // A line without end, and a monitor that says nothing: refused within the deadline.
        let (p, t) = fake("long", vec![ok.clone(), "x".repeat(200 * 1024)]);
        let t0 = Instant::now();
        assert!(status(&p).is_err());
        assert!(t0.elapsed() < DEADLINE * 3, "{:?}", t0.elapsed());
        t.join().unwrap();
        let (p, t) = fake("silent", vec![ok, String::new()]);
        let t0 = Instant::now();
        assert!(status(&p).is_err());
        assert!(t0.elapsed() < DEADLINE * 3, "{:?}", t0.elapsed());
        t.join().unwrap();
        // No monitor at all.
        let _ = std::fs::remove_file(&p);
        assert!(status(&p).is_err());
    }
}
