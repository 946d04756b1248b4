//! I/O: the VM handle, the host sockets, and the loops that move frames between them.
//!
//! The only module of the engine with `unsafe`, and only in the files that need it: `batch`,
//! `host`, `uring/` and `vm` (the data path's batch I/O and its buffers). Every other system
//! call is the platform boundary's (the `sys` crate).
//!
//! The backend contract: a backend is `run(core, resources) -> End`, a run-to-completion loop
//! that calls [`Turn::run`] with its [`Source`] until nothing moves, then waits for readiness
//! (never longer than `VmSide::retry_in`) and calls [`Turn::after_wait`]. The turn, here, owns
//! every ordering rule; a backend owns only readiness, arming and how bytes come in.
//! Backends: `portable` (mio: epoll on Linux, kqueue on macOS, with recvmmsg/sendmmsg) and
//! `uring` (io_uring, Linux only, so `os.rs` declares it; probed at start, falling back
//! to portable with a log line). A new backend is a `Source` and a loop around `Turn`.
//!
//! Backpressure: a direction is read only after the batch it produced has been sent; a full
//! socket makes the loop wait for writability instead of dropping (counted in
//! `backpressure_waits`). A VM handle that stays full is retried on a timer and what waited
//! 100 ms is dropped (counted in `queue_overflows`; see `vm::VmSide::flush`); on a stream,
//! whole frames only: the one partly out stays, and one new batch may queue behind it
//! (`VmSide::tx_accepts`), so the consumer's datagrams keep being read and judged.
//!
//! Inside the turn both backends hand each frame from the VM to `VmSide::act_frame` (or
//! `pump_in`), each datagram from the host to `VmSide::host_datagram`, and flush with
//! [`flush_host`] and `VmSide::flush`.

#[allow(unsafe_code)]
pub(crate) mod batch;
#[allow(unsafe_code)]
pub(crate) mod host;
mod os;
mod portable;
pub(crate) mod stream;
#[allow(unsafe_code)]
pub(crate) mod vm;

use std::io;
use std::os::fd::{AsFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use batch::TxBatch;
use vm::VmSide;

use crate::config::VmConfig;
use crate::filter::Strategy;
use crate::vmcore::{Core, BATCH};
use crate::wire::HEADROOM;

pub use crate::vmcore::{Closed, LoopError};
pub use host::allow_ping_sockets;

/// Which I/O backend runs the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// io_uring where the kernel has what it needs, else portable.
    #[default]
    Auto,
    /// io_uring (Linux); falls back to portable with a log line if the kernel lacks it.
    Uring,
    /// mio (epoll on Linux, kqueue on macOS) with recvmmsg/sendmmsg.
    Portable,
}

/// A backend name that is none of `auto`, `uring`, `portable`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("backend '{0}': expected auto, uring or portable")]
pub struct UnknownBackend(pub String);

impl std::str::FromStr for Backend {
    type Err = UnknownBackend;
    fn from_str(s: &str) -> Result<Self, UnknownBackend> {
        match s {
            "auto" => Ok(Backend::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(Backend::Uring),
            "portable" | "mio" => Ok(Backend::Portable),
            other => Err(UnknownBackend(other.to_string())),
        }
    }
}

impl Backend {
    /// Its name as the configuration spells it: `auto`, `uring`, `portable`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Uring => "uring",
            Backend::Portable => "portable",
        }
    }

    /// The backend forced by `OMERTA_BACKEND`, if set.
    pub fn from_env() -> Result<Option<Self>, UnknownBackend> {
        match std::env::var("OMERTA_BACKEND") {
            Ok(v) if !v.is_empty() => v.parse().map(Some),
            _ => Ok(None),
        }
    }
}

/// The worker's doorbell: the control side rings it after queueing a command.
#[derive(Debug)]
pub struct Bell(sys::EventFd);

impl Bell {
    /// Wakes the worker.
    pub fn ring(&self) {
        self.0.notify();
    }
}

/// Why a loop ended.
#[derive(Debug)]
pub enum End {
    /// Told to stop.
    Stopped,
    /// The VM handle closed.
    HandleClosed(Closed),
    /// An error the loop cannot go on from.
    Failed(LoopError),
}

/// A VM's resources that could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A system call failed (the message names the open-files limit when that is the cause).
    #[error("{}", describe(what, source))]
    Io {
        /// What was being done.
        what: String,
        /// The system's error.
        source: io::Error,
    },
    /// A socket path another process listens on.
    #[error("{} is in use by another process", .0.display())]
    InUse(PathBuf),
    /// A leftover socket file of another user at a handle path.
    #[error("{} is a socket of uid {uid}, not one this engine made; refusing to replace it", .path.display())]
    NotOurs {
        /// The path.
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// A handle path where something other than a socket is.
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
    /// A `peer=` path that is not a usable unix socket address.
    #[error("peer: {0}")]
    Peer(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> OpenError {
    let what = what.into();
    move |source| OpenError::Io { what, source }
}

/// Removes a socket file the engine created when the VM's resources are dropped.
#[derive(Debug)]
pub struct PathGuard(PathBuf);

impl Drop for PathGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Everything a worker needs, opened before its thread starts.
#[derive(Debug)]
pub(crate) struct Resources {
    /// The VM handle.
    pub vm: vm::VmOpen,
    /// The host side, its ICMP set following `allow`.
    pub host: host::HostSockets,
    /// The allowlist the VM starts with.
    pub allow: Arc<crate::filter::Allowlist>,

    /// The doorbell.
    pub bell: Arc<Bell>,
    /// Bytes per buffer slot: headroom plus the largest frame, rounded to a cache line.
    pub slot: usize,
    /// The largest frame the VM may send.
    pub max_frame: usize,
    /// Never sleep waiting for readiness.
    pub busy_poll: bool,
    /// Poll without sleeping for this long after the last progress (adaptive polling).
    pub spin: std::time::Duration,
    /// Socket files to remove when the VM goes: taken by the control side at spawn, since a
    /// worker (under its seccomp filter) never unlinks anything.
    pub paths: Vec<PathGuard>,
}

impl Resources {
    /// The descriptors the worker owns (its handle, its host sockets), not the doorbell, which
    /// the control side rings too.
    pub(crate) fn owned_descriptors(&self) -> Vec<RawFd> {
        use std::os::fd::AsRawFd;
        let mut v = vec![self.host.udp.as_raw_fd()];
        v.extend(self.host.egress.icmp_fds());
        v.push(match &self.vm {
            vm::VmOpen::Dgram { sock, .. } => sock.as_raw_fd(),
            vm::VmOpen::Stream(s) => s.as_raw_fd(),
            vm::VmOpen::Listen { listener, .. } => listener.as_raw_fd(),
        });
        v
    }

    /// Every descriptor the worker needs: its own and the doorbell.
    pub(crate) fn descriptors(&self) -> Vec<RawFd> {
        use std::os::fd::AsRawFd;
        let mut v = self.owned_descriptors();
        v.push(self.bell.0.as_raw_fd());
        v
    }
}

/// Bytes per slot for a VM config.
fn slot_size(cfg: &VmConfig) -> usize {
    (HEADROOM + cfg.identity.max_frame_len()).div_ceil(64) * 64
}

/// Buffers and tables a worker preallocates, in bytes (reported as its memory footprint).
pub fn footprint(cfg: &VmConfig) -> usize {
    let slot = slot_size(cfg);
    // VM receive slots, host receive slots, frames the engine builds itself, stream buffers,
    // message headers, plus the conntrack table when used.
    let buffers = 3 * BATCH * slot + 2 * (64 * 1024) + 4 * BATCH * 256;
    let flows = match cfg.mode {
        crate::config::Mode::Conntrack => cfg.flows * 2 * 48,
        _ => 0,
    };
    buffers + flows
}

/// A one-line explanation of an I/O error, naming the open-files limit when that is the cause.
pub fn describe(what: &str, e: &io::Error) -> String {
    if e.raw_os_error() == Some(libc::EMFILE) || e.raw_os_error() == Some(libc::ENFILE) {
        let limit = sys::open_files_limit().map_or(String::new(), |l| format!(" (limit {l})"));
        format!("{what}: out of file descriptors{limit}: {e}; raise the open-files limit (ulimit -n) or run fewer VMs")
    } else {
        format!("{what}: {e}")
    }
}

/// Removes a leftover socket file at `path`, and only that: a socket file of this engine's
/// user that nothing is bound to any more. A socket someone is bound to is refused whatever
/// its type (a connect of the wrong type says `EPROTOTYPE`, not "refused"), as is one of
/// another user or one the engine cannot probe: the engine replaces only what it made.
fn clear_stale(path: &Path, stream: bool) -> Result<(), OpenError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(format!("checking {}", path.display()))(e)),
        // Only a socket is ever removed: never a file, a directory or a symlink.
        Ok(m) if !m.file_type().is_socket() => return Err(OpenError::NotASocket(path.to_path_buf())),
        Ok(m) => m,
    };
    let probe = if stream {
        // Without blocking: a listener whose backlog is full (a local user can fill one)
        // would hold the control thread in connect() for ever; EAGAIN says it lives.
        socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM.cloexec(), None).and_then(|s| {
            s.set_nonblocking(true)?;
            s.connect(&socket2::SockAddr::unix(path)?)
        })
    } else {
        std::os::unix::net::UnixDatagram::unbound().and_then(|s| s.connect(path))
    };
    match probe {
        // Nothing is bound there: a leftover.
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {}
        // Bound (by anyone, of any type), or not ours to probe.
        _ => return Err(OpenError::InUse(path.to_path_buf())),
    }
    let (uid, _) = sys::effective_ids();
    if meta.uid() != uid {
        return Err(OpenError::NotOurs { path: path.to_path_buf(), uid: meta.uid() });
    }
    std::fs::remove_file(path).map_err(io_err(format!("removing stale {}", path.display())))
}

/// Takes an inherited handle descriptor if it is an open unix socket of `ty`.
pub fn adopt_handle(fd: RawFd, ty: libc::c_int) -> io::Result<std::os::fd::OwnedFd> {
    sys::adopt_unix_socket(fd, ty)
}

/// Makes a socket file the engine bound readable and writable by its own user only (a VMM
/// of another user is given the handle by fd, or the file by the operator).
fn owner_only(path: &Path) -> Result<(), OpenError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(format!("setting the mode of {}", path.display())))
}

/// Opens the VM handle, the host sockets and the doorbell of `cfg`.
pub(crate) fn open(cfg: &VmConfig) -> Result<Resources, OpenError> {
    use crate::config::HandleSpec;
    let mut paths = Vec::new();
    let vm = match &cfg.handle {
        HandleSpec::Dgram { path, peer } => {
            clear_stale(path, false)?;
            let sock =
                std::os::unix::net::UnixDatagram::bind(path).map_err(io_err(format!("binding {}", path.display())))?;
            paths.push(PathGuard(path.clone()));
            owner_only(path)?;
            let peer = peer.as_deref().map(batch::from_unix).transpose().map_err(OpenError::Peer)?;
            vm::VmOpen::Dgram { sock, check: true, peer }
        }
        HandleSpec::DgramFd(fd) => {
            let owned = sys::adopt_unix_socket(*fd, libc::SOCK_DGRAM).map_err(io_err(format!("handle fd:{fd}")))?;
            vm::VmOpen::Dgram { sock: owned.into(), check: false, peer: None }
        }
        HandleSpec::Stream(path) => {
            clear_stale(path, true)?;
            let l = std::os::unix::net::UnixListener::bind(path)
                .map_err(io_err(format!("listening on {}", path.display())))?;
            paths.push(PathGuard(path.clone()));
            owner_only(path)?;
            vm::VmOpen::Listen { listener: l, uid: cfg.peer_uid }
        }
        HandleSpec::StreamFd(fd) => {
            let owned =
                sys::adopt_unix_socket(*fd, libc::SOCK_STREAM).map_err(io_err(format!("handle stream-fd:{fd}")))?;
            vm::VmOpen::Stream(owned.into())
        }
    };
    match &vm {
        vm::VmOpen::Dgram { sock, .. } => sys::set_nonblocking(sock.as_fd()),
        vm::VmOpen::Stream(s) => sys::set_nonblocking(s.as_fd()),
        vm::VmOpen::Listen { listener, .. } => sys::set_nonblocking(listener.as_fd()),
    }
    .map_err(io_err("VM handle"))?;
    match &vm {
        vm::VmOpen::Dgram { sock, .. } => sys::grow_buffers(sock.as_fd(), 4 << 20),
        vm::VmOpen::Stream(s) => sys::grow_buffers(s.as_fd(), 4 << 20),
        vm::VmOpen::Listen { .. } => {}
    }
    let mut host = host::HostSockets::open(cfg.bind).map_err(io_err("host UDP socket"))?;
    let allow = Arc::new(cfg.allowlist(sys::local_ipv4_addrs().unwrap_or_default()));
    host.egress.sync(&allow).map_err(|(what, e)| io_err(format!("opening {what}"))(e))?;
    let bell = Arc::new(Bell(sys::EventFd::new().map_err(io_err("eventfd"))?));
    Ok(Resources {
        vm,
        host,
        allow,
        bell,
        slot: slot_size(cfg),
        max_frame: cfg.identity.max_frame_len(),
        busy_poll: cfg.busy_poll,
        spin: cfg.spin,
        paths,
    })
}

/// Confines the calling worker thread once its loop is set up (`sys::confine_worker`): no
/// capability but what its ICMP set may still need (`CAP_NET_RAW` for raw ICMP sockets,
/// `CAP_NET_BIND_SERVICE` for a port below 1024), and a seccomp filter for its backend.
pub(crate) fn confine<S: Strategy>(core: &Core<S>, kind: sys::WorkerKind, host: &host::HostSockets) {
    const NET_BIND_SERVICE: u32 = 10;
    const NET_RAW: u32 = 13;
    let mut keep = 0;
    if matches!(host.egress.icmp_kind(), Some(host::IcmpKind::Raw { .. })) {
        keep |= 1 << NET_RAW;
    }
    if host.egress.port() < 1024 {
        keep |= 1 << NET_BIND_SERVICE;
    }
    match sys::confine_worker(kind, keep) {
        Ok(()) => crate::debug!("vm {}: worker confined ({kind:?} seccomp filter)", core.name()),
        Err(e) => crate::warn!("vm {}: worker runs unconfined: {e}", core.name()),
    }
}

/// Confines the calling thread as the control socket's accept thread (call it first thing in
/// that thread): no capabilities, and a seccomp filter of what accepting connections,
/// starting their handler threads (which inherit both) and serving a request take. Err where
/// the OS has no seccomp or refuses it.
pub fn confine_control_socket_thread() -> io::Result<()> {
    sys::confine_control_socket()
}

/// Runs the chosen backend's loop until the worker ends.
pub(crate) fn run_loop<S: Strategy>(core: &mut Core<S>, backend: Backend, res: Resources) -> End {
    if backend != Backend::Portable {
        match os::uring_probe() {
            Ok(()) => {
                core.started("io_uring");
                return os::uring_run(core, res);
            }
            Err(why) => crate::warn!("vm {}: io_uring unavailable ({why}); using the portable backend", core.name()),
        }
    }
    core.started("portable");
    portable::run(core, res)
}

// The turn both backends share.

/// Where a backend's frames and datagrams come from: the one thing the backends do
/// differently inside a turn (recvmmsg after mio readiness, or io_uring's multishot receives
/// into provided buffers). [`Turn::run`] decides when each is called.
pub(crate) trait Source {
    /// Hands the next batch from the VM to `side` (each frame to [`VmSide::act_frame`], or
    /// [`VmSide::pump_in`] for a stream); false when there was nothing to read.
    fn vm_batch<S: Strategy>(
        &mut self,
        core: &mut Core<S>,
        side: &mut VmSide,
        to_host: &mut TxBatch,
        egress: &mut host::Egress,
    ) -> Result<bool, End>;
    /// Hands the next batch of host datagrams to [`VmSide::host_datagram`]; false when there
    /// was none.
    fn host_batch<S: Strategy>(&mut self, core: &mut Core<S>, side: &mut VmSide) -> Result<bool, End>;
    /// The host batch is out: the VM frames it pointed into may be reused.
    fn host_batch_sent(&mut self) -> Result<(), End>;
    /// No frame for the VM points into host receive buffers any more: they may be reused.
    fn vm_queue_sent(&mut self) -> Result<(), End>;
}

/// Adaptive polling: after progress, the loop asks for readiness without sleeping until
/// `spin` has passed with nothing to do; then it waits in the kernel as usual. A VM in a
/// conversation answers without a wake-up (tens of µs each way); an idle VM costs nothing.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Spin {
    spin: std::time::Duration,
    since: Option<std::time::Instant>,
    /// Empty polls since the clock was last read.
    polls: u32,
}

impl Spin {
    /// Empty polls between two looks at the clock (a poll is a system call of about a
    /// microsecond: the window is kept to within a few µs, and reading the clock on every
    /// poll cost 3% of a busy worker's time).
    const CLOCK_EVERY: u32 = 4;

    /// Spinning for `spin` after each progress (zero: never).
    pub(crate) fn new(spin: std::time::Duration) -> Self {
        Self { spin, since: None, polls: 0 }
    }

    /// Something moved: spin from now on (one clock read per batch, none when spinning is off).
    #[inline]
    pub(crate) fn progress(&mut self) {
        if !self.spin.is_zero() {
            self.since = Some(std::time::Instant::now());
            self.polls = 0;
        }
    }

    /// Whether to poll without sleeping now.
    #[inline]
    pub(crate) fn on(&mut self) -> bool {
        let Some(t) = self.since else { return false };
        self.polls += 1;
        if self.polls < Self::CLOCK_EVERY {
            return true;
        }
        self.polls = 0;
        if t.elapsed() < self.spin {
            return true;
        }
        self.since = None;
        false
    }
}

/// The turn both backends share, with the writability each direction last showed, and the
/// host sockets it sends on.
///
/// Order within a turn: make the ICMP set follow the allowlist; flush the host batch, then
/// the VM's queue; read one batch from the VM only when both are empty (so no slot an
/// outgoing batch points into is refilled); read host datagrams and ICMP replies only when the
/// VM's queue accepts a batch; flush after each read. A backend calls [`Turn::run`] until it
/// reports no progress, watches the ICMP sockets [`host::Egress::take_changes`] names, then waits
/// for readiness (at most [`VmSide::retry_in`]) and calls [`Turn::after_wait`].
pub(crate) struct Turn {
    /// The VM handle took everything last time (or said it is writable since).
    pub vm_w: bool,
    /// The VM's UDP socket took everything last time (or said it is writable since).
    pub host_w: bool,
    /// An ICMP socket may have replies to read.
    pub icmp_r: bool,
    /// The VM's host sockets.
    pub host: host::HostSockets,
}

impl Turn {
    /// A turn over these host sockets, everything assumed ready.
    pub fn new(host: host::HostSockets) -> Self {
        Self { vm_w: true, host_w: true, icmp_r: true, host }
    }

    /// One turn; returns whether anything moved.
    pub fn run<S: Strategy, R: Source>(
        &mut self,
        core: &mut Core<S>,
        src: &mut R,
        side: &mut VmSide,
        to_host: &mut TxBatch,
    ) -> Result<bool, End> {
        let egress = &mut self.host.egress;
        if !egress.follows(core.allowlist()) {
            if let Err((what, e)) = egress.sync(core.allowlist()) {
                crate::error!("vm {}: {}", core.name(), describe(&format!("opening {what}"), &e));
            }
        }
        if core.take_addresses_changed() {
            egress.addresses_changed();
        }
        egress.maintain();
        let udp_fd = std::os::fd::AsRawFd::as_raw_fd(&self.host.udp);
        let mut progress = false;
        if !to_host.is_empty() && self.host_w {
            self.host_w = flush_host(core, to_host, udp_fd);
            progress = true;
        }
        if to_host.is_empty() {
            src.host_batch_sent()?;
        }
        if !side.tx_is_empty() && self.vm_w {
            self.vm_w = side.flush(core)?;
            progress = true;
        }
        // (A stream frees them at once, so one that stays full never empties the pools.)
        if side.host_buffers_free() {
            src.vm_queue_sent()?;
        }
        // VM to host: read only when everything this side produced before has gone out.
        if to_host.is_empty() && side.tx_accepts() && src.vm_batch(core, side, to_host, egress)? {
            progress = true;
            if !to_host.is_empty() {
                self.host_w = flush_host(core, to_host, udp_fd);
            }
            if !side.tx_is_empty() {
                self.vm_w = side.flush(core)?;
            }
        }
        // Host to VM.
        if side.tx_accepts() && src.host_batch(core, side)? {
            progress = true;
            self.vm_w = side.flush(core)?;
        }
        if let (true, Some(kind)) = (self.icmp_r && side.tx_accepts(), egress.icmp_kind()) {
            let mut any = false;
            for fd in egress.icmp_fds() {
                any |= side.pump_icmp(core, fd, kind);
            }
            if any {
                progress = true;
                self.vm_w = side.flush(core)?;
            } else {
                self.icmp_r = false;
            }
        }
        core.batch_done(to_host.is_empty(), side.tx_is_empty());
        Ok(progress)
    }

    /// After a wait: a stalled VM handle whose timer ran out is tried again; one whose
    /// writability signals lie is tried only on its timer.
    pub fn after_wait(&mut self, side: &VmSide) {
        match side.retry_in() {
            Some(r) if r.is_zero() => self.vm_w = true,
            Some(_) if side.timed_retries() => self.vm_w = false,
            _ => {}
        }
    }
}

/// Flushes the host batch on the VM's UDP socket `fd`; returns whether it is still writable.
/// Every message names its destination (the socket is never connected).
pub(crate) fn flush_host<S: Strategy>(core: &mut Core<S>, to_host: &mut TxBatch, fd: RawFd) -> bool {
    let f = to_host.flush(fd);
    if f.errors > 0 && to_host.gso() && f.last_error == Some(libc::EIO) {
        crate::warn!("vm {}: UDP GSO refused by the kernel; sending datagrams one by one", core.name());
        to_host.disable_gso();
    }
    core.send_error(true, f.errors, f.last_error);
    if f.blocked {
        core.counters.backpressure_waits += 1;
    }
    !f.blocked
}

#[cfg(test)]
mod spin_tests {
    use super::Spin;
    use std::time::Duration;

    #[test]
    fn spinning_follows_progress_and_ends_after_its_window() {
        let mut off = Spin::new(Duration::ZERO);
        off.progress();
        assert!(!off.on(), "spin-us=0 never spins");
        let mut s = Spin::new(Duration::from_millis(20));
        assert!(!s.on(), "nothing moved yet: sleep");
        s.progress();
        assert!(s.on(), "right after progress: spin");
        std::thread::sleep(Duration::from_millis(30));
        let spun = (0..Spin::CLOCK_EVERY + 1).filter(|_| s.on()).count();
        assert!(spun < Spin::CLOCK_EVERY as usize + 1, "the window ends within a few polls");
        assert!(!s.on(), "and stays ended until the next progress");
        s.progress();
        assert!(s.on());
    }
}

#[cfg(test)]
mod stale_tests {
    use super::{clear_stale, OpenError};
    use std::os::unix::net::{UnixDatagram, UnixListener};

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("omerta-stale-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_live_socket_of_either_type_is_never_replaced() {
        let d = dir("live");
        let (s, g) = (d.join("s"), d.join("g"));
        let _stream = UnixListener::bind(&s).unwrap();
        let _dgram = UnixDatagram::bind(&g).unwrap();
        for (path, as_stream) in [(&s, false), (&s, true), (&g, false), (&g, true)] {
            assert!(
                matches!(clear_stale(path, as_stream), Err(OpenError::InUse(_))),
                "{} probed as stream={as_stream}",
                path.display()
            );
            assert!(path.exists(), "the live socket stays");
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_listener_with_a_full_backlog_is_in_use_at_once() {
        // A local user's listener with a backlog of 0, filled: a blocking probe waited for
        // ever (and the control thread with it).
        let d = dir("backlog");
        let path = d.join("s");
        let l = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        l.bind(&socket2::SockAddr::unix(&path).unwrap()).unwrap();
        l.listen(0).unwrap();
        let fill: Vec<_> = (0..4)
            .map(|_| {
                let c = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
                c.set_nonblocking(true).unwrap();
                let _ = c.connect(&socket2::SockAddr::unix(&path).unwrap());
                c
            })
            .collect();
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(matches!(clear_stale(&p, true), Err(OpenError::InUse(_))));
        });
        let answer = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(answer, Ok(true), "the probe of a full listener did not come back as in use");
        drop((fill, l));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_leftover_of_this_user_is_removed_and_a_file_is_not() {
        let d = dir("left");
        let (s, f) = (d.join("s"), d.join("f"));
        drop(UnixListener::bind(&s).unwrap());
        assert!(s.exists());
        clear_stale(&s, false).unwrap();
        assert!(!s.exists(), "nothing bound to it: a leftover");
        std::fs::write(&f, b"x").unwrap();
        assert!(matches!(clear_stale(&f, true), Err(OpenError::NotASocket(_))));
        let _ = std::fs::remove_dir_all(&d);
    }
}
