//! One VM's worker thread: its resources, its commands and events, and the per-frame logic
//! that every I/O backend shares.
//!
//! [`spawn`] opens everything the VM needs in the caller's thread (so a bad path or a lack of
//! file descriptors is a synchronous, one-line error), then starts a thread that pins itself,
//! builds the VM's [`FilteredNat`] for its mode, and runs the chosen backend's loop until it
//! is told to stop, its handle closes, or it fails. Commands are applied between batches only.
#![forbid(unsafe_code)]

use std::fmt;
use std::net::Ipv4Addr;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::config::{Mode, VmConfig};
use crate::filter::{Allowlist, Conntrack, DropReason, Endpoint, Full, Sampled, Strategy, StrategyStats};
use crate::io::{self, Resources};
use crate::log::{blocked_traffic_limiter, FrameSummary, RateLimiter};
use crate::nat::{FilteredNat, VmAction};
use crate::stats::Counters;

/// Frames pulled from one source per batch: enough to amortise a system call over many
/// frames, small enough that a batch of 1514-byte frames (100 KB) stays in L2 cache.
pub const BATCH: usize = 64;

/// How often a busy worker publishes its counters.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// What the control side asks of a worker. Applied between two batches.
#[derive(Debug, Clone)]
pub enum Command {
    /// Replace the allowlist: later packets see the new one, none sees a mix.
    SetAllowlist(Arc<Allowlist>),
    /// End the worker.
    Stop,
}

/// What a worker reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// The loop runs, with this backend.
    Started(&'static str),
    /// A policy violation in a terminating mode: nothing is forwarded any more.
    Terminated(DropReason),
    /// The VM handle closed (the VMM went away); the worker has ended.
    HandleClosed(String),
    /// The worker ended on an error it could not go on from.
    Failed(String),
    /// The worker ended because it was told to.
    Stopped,
}

/// An event of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The VM's name.
    pub vm: Arc<str>,
    /// What happened.
    pub kind: EventKind,
}

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

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Backend::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(Backend::Uring),
            "portable" | "mio" => Ok(Backend::Portable),
            other => Err(format!("backend '{other}': expected auto, uring or portable")),
        }
    }
}

impl Backend {
    /// The backend forced by `OMERTA_BACKEND`, if set.
    pub fn from_env() -> Result<Option<Self>, String> {
        match std::env::var("OMERTA_BACKEND") {
            Ok(v) if !v.is_empty() => v.parse().map(Some),
            _ => Ok(None),
        }
    }
}

/// Counters a worker publishes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Traffic and drops.
    pub counters: Counters,
    /// The strategy's own counters.
    pub strategy: StrategyStats,
    /// Set once the VM was terminated.
    pub terminated: Option<DropReason>,
}

/// A VM that could not start; one line.
#[derive(Debug)]
pub struct StartError(pub String);

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// The control side's handle on a running worker.
#[derive(Debug)]
pub struct VmWorker {
    name: Arc<str>,
    thread: Option<JoinHandle<()>>,
    commands: Sender<Command>,
    bell: Arc<io::Bell>,
    shared: Arc<Mutex<Snapshot>>,
    /// Bytes of buffers and tables the worker preallocated.
    pub footprint: usize,
}

impl VmWorker {
    /// The VM's name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Sends a command and wakes the worker.
    pub fn command(&self, c: Command) {
        if self.commands.send(c).is_ok() {
            self.bell.ring();
        }
    }

    /// Replaces the allowlist (between two batches).
    pub fn set_allowlist(&self, list: Arc<Allowlist>) {
        self.command(Command::SetAllowlist(list));
    }

    /// The last published counters.
    pub fn snapshot(&self) -> Snapshot {
        self.shared.lock().map(|s| *s).unwrap_or_default()
    }

    /// True once the thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the worker and waits for its thread; its sockets and buffers are released.
    pub fn stop(mut self) -> Snapshot {
        self.command(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.snapshot()
    }
}

impl Drop for VmWorker {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.commands.send(Command::Stop);
            self.bell.ring();
            let _ = t.join();
        }
    }
}

/// Opens the VM's resources and starts its worker thread.
pub fn spawn(cfg: &VmConfig, backend: Backend, events: Sender<Event>) -> Result<VmWorker, StartError> {
    let name: Arc<str> = Arc::from(cfg.name.as_str());
    if let Some(cpu) = cfg.cpu {
        let cpus = io::allowed_cpus();
        if !cpus.contains(&cpu) {
            return Err(StartError(format!("vm '{name}': cpu={cpu} is not one this process may use ({cpus:?})")));
        }
    }
    let res = io::open(cfg).map_err(|e| StartError(format!("vm '{name}': {e}")))?;
    let (tx, rx) = crossbeam_channel::bounded(64);
    let bell = res.bell.clone();
    let shared = Arc::new(Mutex::new(Snapshot::default()));
    let footprint = io::footprint(cfg);
    let cfg = cfg.clone();
    let (name2, shared2, events2) = (name.clone(), shared.clone(), events.clone());
    let thread = std::thread::Builder::new()
        .name(format!("omerta-vm-{}", cfg.name))
        .spawn(move || worker_main(cfg, backend, res, rx, events2, shared2, name2))
        .map_err(|e| StartError(format!("vm '{name}': cannot start its thread: {e}")))?;
    Ok(VmWorker { name, thread: Some(thread), commands: tx, bell, shared, footprint })
}

fn worker_main(
    cfg: VmConfig,
    backend: Backend,
    res: Resources,
    commands: Receiver<Command>,
    events: Sender<Event>,
    shared: Arc<Mutex<Snapshot>>,
    name: Arc<str>,
) {
    if let Some(cpu) = cfg.cpu {
        if let Err(e) = io::pin_current_thread(cpu) {
            crate::warn!("vm {name}: cannot pin to CPU {cpu}: {e}; running unpinned");
        }
    }
    let allow = Arc::new(cfg.allowlist());
    let id = cfg.identity;
    let ctx = Ctx { name, events, commands, shared };
    match cfg.mode {
        Mode::Filtered => run(Core::new(FilteredNat::new(id, allow, Full::new()), ctx), backend, res),
        Mode::Conntrack => run(Core::new(FilteredNat::new(id, allow, Conntrack::new(cfg.flows)), ctx), backend, res),
        Mode::Sampled(rate) => {
            let seed = cfg.seed.unwrap_or_else(random_seed);
            run(Core::new(FilteredNat::new(id, allow, Sampled::new(rate, seed)), ctx), backend, res)
        }
    }
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

fn run<S: Strategy>(mut core: Core<S>, backend: Backend, res: Resources) {
    let end = io::run_loop(&mut core, backend, res);
    core.publish(true);
    let kind = match end {
        io::End::Stopped => EventKind::Stopped,
        io::End::HandleClosed(why) => EventKind::HandleClosed(why),
        io::End::Failed(why) => EventKind::Failed(why),
    };
    match &kind {
        EventKind::Stopped => crate::info!("vm {}: stopped", core.ctx.name),
        EventKind::HandleClosed(why) => crate::info!("vm {}: handle closed ({why}); worker ends", core.ctx.name),
        EventKind::Failed(why) => crate::error!("vm {}: worker failed: {why}", core.ctx.name),
        _ => {}
    }
    core.event(kind);
}

struct Ctx {
    name: Arc<str>,
    events: Sender<Event>,
    commands: Receiver<Command>,
    shared: Arc<Mutex<Snapshot>>,
}

/// Per-frame logic shared by the backends: translation, counting, logging, commands.
pub(crate) struct Core<S> {
    nat: FilteredNat<S>,
    /// Counters, published between batches.
    pub counters: Counters,
    ctx: Ctx,
    blocked_log: RateLimiter,
    error_log: RateLimiter,
    last_publish: Instant,
    stop: bool,
}

impl<S: Strategy> Core<S> {
    fn new(nat: FilteredNat<S>, ctx: Ctx) -> Self {
        Self {
            nat,
            counters: Counters::default(),
            ctx,
            blocked_log: blocked_traffic_limiter(),
            error_log: RateLimiter::new(1, 5),
            last_publish: Instant::now(),
            stop: false,
        }
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.ctx.name
    }

    /// Reports an event to the control side.
    pub fn event(&self, kind: EventKind) {
        let _ = self.ctx.events.send(Event { vm: self.ctx.name.clone(), kind });
    }

    /// Translates and counts one frame from the VM.
    #[inline]
    pub fn vm_frame<'a>(&mut self, frame: &'a [u8]) -> VmAction<'a> {
        let action = self.nat.vm_frame(frame);
        self.counters.record_vm_frame(frame.len(), &action);
        match action {
            VmAction::Drop(reason) if reason != DropReason::Terminated => self.log_blocked(frame, reason),
            VmAction::Terminate(reason) => {
                self.log_blocked(frame, reason);
                crate::error!(
                    "vm {}: policy violation ({reason}): {}; forwarding stopped",
                    self.ctx.name,
                    FrameSummary::of(frame)
                );
                self.event(EventKind::Terminated(reason));
                self.publish(true);
            }
            _ => {}
        }
        action
    }

    /// Counts a frame that could not even be read whole (longer than the receive slot).
    pub fn vm_frame_oversized(&mut self, len: usize) {
        self.counters.vm_frames += 1;
        self.counters.vm_bytes += len as u64;
        self.counters.count_drop(DropReason::FrameTooBig);
    }

    /// Counts a frame lost to a full output (a bounded queue overflowing).
    pub fn dropped_on_full_queue(&mut self) {
        self.counters.queue_overflows += 1;
    }

    fn log_blocked(&mut self, frame: &[u8], reason: DropReason) {
        if let Some(suppressed) = self.blocked_log.allow(Instant::now()) {
            let more = if suppressed > 0 { format!(" ({suppressed} more not logged)") } else { String::new() };
            crate::warn!("vm {}: dropped {reason}: {}{more}", self.ctx.name, FrameSummary::of(frame));
        }
    }

    /// Builds the VM frame for a datagram from `from`; `None` if it is dropped (counted).
    #[inline]
    pub fn host_udp(&mut self, from: Endpoint, slot: &mut [u8], payload: Range<usize>) -> Option<Range<usize>> {
        self.counters.host_datagrams += 1;
        let len = payload.len();
        match self.nat.host_udp(from, slot, payload) {
            Ok(r) => Some(r),
            Err(reason) => {
                self.host_drop(reason, from, len);
                None
            }
        }
    }

    /// Builds the VM frame for an ICMP message from `from`; `None` if it is dropped.
    pub fn host_icmp(&mut self, from: Ipv4Addr, slot: &mut [u8], message: Range<usize>) -> Option<Range<usize>> {
        self.counters.host_datagrams += 1;
        let len = message.len();
        match self.nat.host_icmp(from, slot, message) {
            Ok(r) => Some(r),
            Err(reason) => {
                self.host_drop(reason, Endpoint::new(from, 0), len);
                None
            }
        }
    }

    fn host_drop(&mut self, reason: DropReason, from: Endpoint, len: usize) {
        self.counters.count_drop(reason);
        // Counted but not logged: ICMP other than echo replies (host noise on a raw socket).
        let quiet = matches!(reason, DropReason::Terminated | DropReason::IcmpNotEcho);
        if !quiet && self.blocked_log.allow(Instant::now()).is_some() {
            crate::warn!("vm {}: dropped inbound {reason}: from {from} len={len}", self.ctx.name);
        }
    }

    /// Counts frames written to the VM.
    pub fn sent_to_vm(&mut self, frames: usize, bytes: usize) {
        self.counters.to_vm_frames += frames as u64;
        self.counters.to_vm_bytes += bytes as u64;
    }

    /// Counts and logs (rarely) a send the kernel refused; the loop goes on.
    pub fn send_error(&mut self, to_host: bool, count: usize, errno: Option<i32>) {
        if count == 0 {
            return;
        }
        if to_host {
            self.counters.host_send_errors += count as u64;
        } else {
            self.counters.vm_send_errors += count as u64;
        }
        if self.error_log.allow(Instant::now()).is_some() {
            let err = errno.map(std::io::Error::from_raw_os_error);
            let dir = if to_host { "host socket" } else { "VM handle" };
            crate::warn!(
                "vm {}: {count} send(s) on the {dir} refused: {}",
                self.ctx.name,
                err.map_or("unknown error".into(), |e| e.to_string())
            );
        }
    }

    /// Applies pending commands and publishes counters when due. Call between batches.
    /// Returns true when the worker must stop.
    pub fn between_batches(&mut self) -> bool {
        loop {
            match self.ctx.commands.try_recv() {
                Ok(Command::SetAllowlist(list)) => {
                    crate::info!("vm {}: allowlist now {} endpoint(s)", self.ctx.name, list.len());
                    self.nat.set_allowlist(list);
                }
                Ok(Command::Stop) | Err(TryRecvError::Disconnected) => self.stop = true,
                Err(TryRecvError::Empty) => break,
            }
            if self.stop {
                break;
            }
        }
        if self.last_publish.elapsed() >= PUBLISH_EVERY {
            self.publish(false);
        }
        self.stop
    }

    /// Publishes a snapshot of the counters. Never blocks the loop unless `wait` is set.
    pub fn publish(&mut self, wait: bool) {
        let snap = Snapshot {
            counters: self.counters,
            strategy: self.nat.strategy().stats(),
            terminated: self.nat.terminated(),
        };
        let guard = if wait { self.ctx.shared.lock().ok() } else { self.ctx.shared.try_lock().ok() };
        if let Some(mut g) = guard {
            *g = snap;
            self.last_publish = Instant::now();
        }
    }
}
