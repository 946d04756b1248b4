//! The control socket: a blocking unix stream socket served by short-lived handler threads.
//!
//! The socket is created with mode 0600 (0660 with an allowed group) in a directory that only
//! its owner can write to; a peer is served only if `SO_PEERCRED` shows the engine's uid, root,
//! or the allowed gid. A handler reads one line at a time with a size cap and a deadline for the
//! whole line ([`READ_TIMEOUT`], however slowly its bytes trickle in), parses it, and passes the
//! request to the control thread over a channel; so a garbage, huge or slow client gets a clear
//! error and costs the control thread nothing. At most [`MAX_CLIENTS`] handlers run at once,
//! and at most [`MAX_PER_GROUP_UID`] for any one uid let in through the allowed group; more
//! clients are told the engine is busy.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use api::{wire, ErrorCode, Failure, Reply, Request, MAX_REQUEST};
use crossbeam_channel::Sender;

/// Handlers running at once, at most.
pub const MAX_CLIENTS: usize = 16;
/// How long a client may take to send a whole request line (and how long an idle connection
/// stays open).
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections at once from one uid admitted as a member of the allowed group (root and the
/// engine's own uid are bounded by [`MAX_CLIENTS`] only).
pub const MAX_PER_GROUP_UID: usize = 4;
/// How long the control thread may take to answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Who sent a request, as `SO_PEERCRED` shows: files the engine opens on its behalf are opened
/// only if this user could read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

/// A request, who sent it, and the channel its answer goes back on.
pub type Job = (Request, Peer, Sender<Result<Reply, Failure>>);

/// Who may talk to the engine.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// The engine's effective uid (always allowed, as is root).
    pub uid: u32,
    /// A group whose members are allowed too.
    pub gid: Option<u32>,
}

/// Creates the socket's directory if needed, checks it, and binds the socket.
pub fn bind(path: &Path, gid: Option<u32>) -> Result<UnixListener, String> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let (uid, _) = sys::effective_ids();
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mode = if gid.is_some() { 0o710 } else { 0o700 };
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        if let Some(g) = gid {
            std::os::unix::fs::chown(dir, None, Some(g)).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
    }
    let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if meta.uid() != uid || meta.mode() & 0o022 != 0 {
        return Err(format!(
            "control socket directory {} must be owned by uid {uid} and writable by no one else (it is uid {}, mode {:o})",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        ));
    }
    if let Ok(m) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !m.file_type().is_socket() {
            return Err(format!("{} exists and is not a socket; refusing to replace it", path.display()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(format!("{} is in use: another engine is running", path.display()));
        }
        std::fs::remove_file(path).map_err(|e| format!("removing stale {}: {e}", path.display()))?;
    }
    let l = UnixListener::bind(path).map_err(|e| format!("binding {}: {e}", path.display()))?;
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(g) = gid {
        std::os::unix::fs::chown(path, None, Some(g)).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(l)
}

/// The running accept loop.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves `listener` (bound at `path`), passing requests to `jobs`.
    pub fn start(listener: UnixListener, path: PathBuf, jobs: Sender<Job>, policy: Policy) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let active = Arc::new(AtomicUsize::new(0));
        let per_uid: PerUid = Arc::default();
        let thread = std::thread::Builder::new()
            .name("omerta-control".into())
            .spawn(move || {
                // Before anyone is served: this thread and every handler it starts hold no
                // capability and run under a seccomp filter (they never start a process).
                if let Err(e) = engine::io::confine_control_socket_thread() {
                    engine::warn!("control socket threads run unconfined: {e}");
                }
                let mut warned: Option<std::time::Instant> = None;
                for conn in listener.incoming() {
                    if stop2.load(Ordering::Relaxed) {
                        break;
                    }
                    let stream = match conn {
                        Ok(s) => s,
                        Err(e) => {
                            // Out of descriptors, say: the connection stays queued and accept
                            // fails again at once. Back off instead of spinning; say why, at
                            // most once a second.
                            if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                                engine::warn!("control socket: cannot accept a connection: {e}");
                                warned = Some(std::time::Instant::now());
                            }
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                    };
                    if active.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                        active.fetch_sub(1, Ordering::AcqRel);
                        reply(
                            &stream,
                            &Err(Failure::new(ErrorCode::Busy, "too many control clients at once; try again")),
                        );
                        continue;
                    }
                    let (jobs, mine, per_uid) = (jobs.clone(), active.clone(), per_uid.clone());
                    let spawned = std::thread::Builder::new().name("omerta-ctl-conn".into()).spawn(move || {
                        serve_client(stream, &jobs, policy, &per_uid);
                        mine.fetch_sub(1, Ordering::AcqRel);
                    });
                    if spawned.is_err() {
                        // The handler never ran; give its slot back.
                        active.fetch_sub(1, Ordering::AcqRel);
                        engine::warn!("control: cannot start a connection handler");
                    }
                }
            })
            .ok();
        Self { path, stop, thread }
    }

    /// Stops accepting and removes the socket file.
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocking accept with a connection of our own. If the socket file was
        // removed behind our back, nothing can wake it: leave the thread to end with the
        // process rather than wait forever.
        let woke = UnixStream::connect(&self.path).is_ok();
        if let (true, Some(t)) = (woke, self.thread.take()) {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn reply(mut stream: &UnixStream, r: &Result<Reply, Failure>) {
    let mut line = wire::encode(r);
    line.push('\n');
    let _ = stream.write_all(line.as_bytes());
}

/// Reads one line of at most `MAX_REQUEST` bytes, all of it within [`READ_TIMEOUT`] of the
/// call. `Ok(None)` at a clean end of stream, or when the connection stayed idle.
fn read_line(stream: &mut UnixStream, pending: &mut Vec<u8>) -> Result<Option<String>, Failure> {
    let deadline = std::time::Instant::now() + READ_TIMEOUT;
    loop {
        if let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).take(i).collect();
            return String::from_utf8(line)
                .map(|s| Some(s.trim_end_matches('\r').to_string()))
                .map_err(|_| Failure::new(ErrorCode::BadRequest, "request is not UTF-8"));
        }
        if pending.len() > MAX_REQUEST {
            return Err(Failure::new(ErrorCode::BadRequest, format!("request longer than {MAX_REQUEST} bytes")));
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            if pending.is_empty() {
                return Ok(None);
            }
            return Err(Failure::new(
                ErrorCode::BadRequest,
                format!("request not completed within {} s", READ_TIMEOUT.as_secs()),
            ));
        }
        let mut buf = [0u8; 4096];
        match stream.read(&mut buf) {
            Ok(0) if pending.is_empty() => return Ok(None),
            Ok(0) => return Err(Failure::new(ErrorCode::BadRequest, "request not ended by a newline")),
            Ok(n) => pending.extend_from_slice(buf.get(..n).unwrap_or_default()),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                if pending.is_empty() {
                    return Ok(None); // an idle connection: close it quietly
                }
                return Err(Failure::new(
                    ErrorCode::BadRequest,
                    format!("request not completed within {} s", READ_TIMEOUT.as_secs()),
                ));
            }
            Err(_) => return Ok(None),
        }
    }
}

/// Connections open per uid let in through the allowed group.
type PerUid = Arc<std::sync::Mutex<std::collections::HashMap<u32, usize>>>;

/// A group member's place among its uid's connections, given back on drop.
struct Slot(PerUid, u32);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.0.lock() {
            if let Some(n) = m.get_mut(&self.1) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

fn serve_client(mut stream: UnixStream, jobs: &Sender<Job>, policy: Policy, per_uid: &PerUid) {
    let (peer, _slot) = match sys::peer_cred(stream.as_fd()) {
        Ok((_, uid, gid)) if uid == policy.uid || uid == 0 => (Peer { uid, gid }, None),
        Ok((pid, uid, gid)) if Some(gid) == policy.gid => {
            let mut m = per_uid.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = m.entry(uid).or_insert(0);
            if *n >= MAX_PER_GROUP_UID {
                drop(m);
                engine::warn!("control: uid {uid} (pid {pid}) has {MAX_PER_GROUP_UID} connections open already");
                reply(&stream, &Err(Failure::new(ErrorCode::Busy, "too many connections from this uid; try again")));
                return;
            }
            *n += 1;
            (Peer { uid, gid }, Some(Slot(per_uid.clone(), uid)))
        }
        Ok((pid, uid, _)) => {
            engine::warn!("control: refused a client (pid {pid}, uid {uid})");
            reply(
                &stream,
                &Err(Failure::new(ErrorCode::Refused, format!("uid {uid} may not use this control socket"))),
            );
            return;
        }
        Err(e) => {
            reply(&stream, &Err(Failure::new(ErrorCode::Refused, format!("cannot check the peer's credentials: {e}"))));
            return;
        }
    };
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    let mut pending = Vec::with_capacity(256);
    loop {
        let line = match read_line(&mut stream, &mut pending) {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(f) => {
                reply(&stream, &Err(f));
                return;
            }
        };
        let answer = match api::parse(&line) {
            Err(f) => Err(f),
            Ok(req) => {
                let (tx, rx) = crossbeam_channel::bounded(1);
                if jobs.send((req, peer, tx)).is_err() {
                    Err(Failure::new(ErrorCode::Internal, "the engine is shutting down"))
                } else {
                    rx.recv_timeout(ANSWER_TIMEOUT).unwrap_or_else(|_| {
                        Err(Failure::new(ErrorCode::Internal, "the control thread did not answer in time"))
                    })
                }
            }
        };
        reply(&stream, &answer);
    }
}
