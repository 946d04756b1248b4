//! The replay journal, `replay/<network>.log`: one line `PEER STAMP` per reservation of
//! [`crate::admit`], appended before the message that made it is acted on. A restarted daemon
//! reads it back as its floors, so nothing accepted before the restart (nor anything stamped
//! up to the reservation) is accepted after it.
//!
//! Each line is written with one `write` as it is made (a crashed process loses none: they
//! are in the kernel's cache); the file is synced at most once a second by the timer thread
//! (a machine that loses power is down longer than a message stays fresh, most of the time:
//! docs/mesh.md). It is compacted at start and when it grows past twice its live lines.
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::Instant;

use crate::net::{Home, HomeError};
use crate::wire::MAX_SKEW_S;

/// Lines past which a journal is compacted, at least.
const COMPACT_AT: usize = 4096;

/// The journal of one network's daemon.
#[derive(Debug)]
pub(super) struct Journal {
    path: PathBuf,
    file: File,
    lines: usize,
    dirty: bool,
    synced: Instant,
}

impl Journal {
    /// Reads the journal (a line that does not parse is skipped) and rewrites it with the
    /// reservations still of use at `now_s`; the floors it held.
    pub fn open(home: &Home, network: &str, now_s: u64) -> Result<(Self, HashMap<String, u64>), HomeError> {
        let path = home.sub("replay")?.join(format!("{network}.log"));
        let mut floors: HashMap<String, u64> = HashMap::new();
        if let Ok(text) = std::fs::read_to_string(&path) {
            for line in text.lines() {
                let mut f = line.split(' ');
                let (Some(peer), Some(t), None) = (f.next(), f.next(), f.next()) else { continue };
                let Ok(t) = t.parse::<u64>() else { continue };
                if crate::net::valid_id(peer) {
                    let e = floors.entry(peer.to_string()).or_insert(0);
                    *e = (*e).max(t);
                }
            }
        }
        floors.retain(|_, t| useful(*t, now_s));
        let j =
            Self { file: rewrite(&path, &floors)?, lines: floors.len(), path, dirty: false, synced: Instant::now() };
        Ok((j, floors))
    }

    /// Appends a reservation (one `write`).
    pub fn reserve(&mut self, peer: &str, t: u64) -> std::io::Result<()> {
        self.file.write_all(format!("{peer} {t}\n").as_bytes())?;
        self.lines += 1;
        self.dirty = true;
        Ok(())
    }

    /// A handle to sync, and the path, if the file changed and was last synced a second ago or
    /// more (the caller syncs it without holding what guards this).
    pub fn due(&mut self) -> Option<(File, PathBuf)> {
        if !self.dirty || self.synced.elapsed().as_secs() < 1 {
            return None;
        }
        self.dirty = false;
        self.synced = Instant::now();
        self.file.try_clone().ok().map(|f| (f, self.path.clone()))
    }

    /// Rewrites the journal with `floors` when it has grown past twice them.
    pub fn compact(&mut self, floors: &HashMap<String, u64>, now_s: u64) {
        if self.lines < COMPACT_AT.max(2 * floors.len()) {
            return;
        }
        let live: HashMap<String, u64> =
            floors.iter().filter(|(_, t)| useful(**t, now_s)).map(|(p, t)| (p.clone(), *t)).collect();
        match rewrite(&self.path, &live) {
            Ok(f) => {
                self.file = f;
                self.lines = live.len();
            }
            Err(e) => ::engine::warn!("compacting the replay journal: {e}"),
        }
    }
}

/// Whether a floor can still refuse something: a message stamped before `now - MAX_SKEW_S`
/// is stale anyway.
fn useful(t: u64, now_s: u64) -> bool {
    t.saturating_add(MAX_SKEW_S) >= now_s
}

/// Writes `floors` to a new file renamed over `path`; it, open for appending.
fn rewrite(path: &std::path::Path, floors: &HashMap<String, u64>) -> Result<File, HomeError> {
    let text: String = floors.iter().map(|(p, t)| format!("{p} {t}\n")).collect();
    crate::net::write_private(path, text.as_bytes())?;
    OpenOptions::new()
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| HomeError::Io { path: path.to_path_buf(), source })
}
