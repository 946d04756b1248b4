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
use hdrhistogram::Histogram;

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
    /// Replace the allowlist: later packets see the new one, none sees a mix. The sender, if
    /// any, hears once the worker has applied it: every frame read after that sees it.
    SetAllowlist(Arc<Allowlist>, Option<Sender<()>>),
    /// Copy the next `count` dropped frames from the VM (at most `snaplen` bytes of each);
    /// `count == 0` ends a capture early. Both are bounded by [`CAPTURE_MAX`].
    Capture {
        /// Frames to capture.
        count: usize,
        /// Bytes kept of each frame.
        snaplen: usize,
    },
    /// End the worker.
    Stop,
}

/// Limits of one capture: frames and bytes per frame.
pub const CAPTURE_MAX: (usize, usize) = (1000, 2048);

/// Recent blocked events kept per VM.
pub const RECENT_BLOCKED: usize = 64;

/// One blocked frame or datagram, header fields only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockedEvent {
    /// Milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// Why.
    pub reason: DropReason,
    /// True for a frame from the VM, false for a datagram from the host side.
    pub from_vm: bool,
    /// Header fields.
    pub summary: FrameSummary,
}

/// Dropped frames copied for a capture (pcap is written by the client).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capture {
    /// Each frame: microseconds since the Unix epoch, original length, captured bytes.
    pub frames: Vec<(u64, u32, Vec<u8>)>,
    /// True once the requested count was reached or the capture was ended.
    pub done: bool,
}

/// What a worker publishes besides its counters: latency histograms, recent blocked events and
/// a capture. Written by the worker with `try_lock` between batches; read by the control side.
#[derive(Debug)]
pub struct Telemetry {
    /// Counters.
    pub snapshot: Snapshot,
    /// Per-frame time inside the engine, VM to host, nanoseconds (cumulative).
    pub latency_out: Histogram<u64>,
    /// Per-frame time inside the engine, host to VM, nanoseconds (cumulative).
    pub latency_in: Histogram<u64>,
    /// The last blocked events, oldest first.
    pub recent: Vec<BlockedEvent>,
    /// The capture in progress or finished, if one was asked for.
    pub capture: Option<Capture>,
}

/// A latency histogram: 1 ns to 10 s, two significant digits (1% precision, ~20 KiB).
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 10_000_000_000, 2)
        .unwrap_or_else(|_| Histogram::new(2).unwrap_or_else(|_| unreachable!()))
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
    /// The strategy's name: `filtered`, `conntrack` or `sampled`.
    pub strategy_name: &'static str,
    /// The backend running the loop, once started.
    pub backend: &'static str,
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
    shared: Arc<Mutex<Telemetry>>,
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

    /// Replaces the allowlist (between two batches) and waits up to `timeout` until the
    /// worker has applied it. True once applied: a frame the VM writes after this returns is
    /// decided by the new list. False when the worker did not apply it in time or has ended.
    pub fn set_allowlist(&self, list: Arc<Allowlist>, timeout: Duration) -> bool {
        let (done, applied) = crossbeam_channel::bounded(1);
        self.command(Command::SetAllowlist(list, Some(done)));
        applied.recv_timeout(timeout).is_ok()
    }

    /// The last published counters.
    pub fn snapshot(&self) -> Snapshot {
        self.shared.lock().map(|s| s.snapshot).unwrap_or_default()
    }

    /// Runs `f` on the published telemetry (histograms, recent events, capture).
    pub fn with_telemetry<T>(&self, f: impl FnOnce(&mut Telemetry) -> T) -> Option<T> {
        self.shared.lock().ok().map(|mut t| f(&mut t))
    }

    /// True once the thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the worker and waits for its thread; its sockets and buffers are released.
    pub fn stop(self) -> Snapshot {
        self.finish().snapshot
    }

    /// Stops the worker, waits for its thread, and returns everything it published last: the
    /// final counters, histograms, recent blocked events and capture (published as it ends).
    pub fn finish(mut self) -> Telemetry {
        self.command(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut empty = Telemetry {
            snapshot: Snapshot::default(),
            latency_out: latency_histogram(),
            latency_in: latency_histogram(),
            recent: Vec::new(),
            capture: None,
        };
        if let Ok(mut t) = self.shared.lock() {
            std::mem::swap(&mut *t, &mut empty);
        }
        empty
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
    let shared = Arc::new(Mutex::new(Telemetry {
        snapshot: Snapshot::default(),
        latency_out: latency_histogram(),
        latency_in: latency_histogram(),
        recent: Vec::with_capacity(RECENT_BLOCKED),
        capture: None,
    }));
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
    shared: Arc<Mutex<Telemetry>>,
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
    shared: Arc<Mutex<Telemetry>>,
}

/// A capture being filled by the worker. Both vectors are allocated with their full capacity
/// when the command arrives, so capturing a frame never allocates.
struct CaptureState {
    want: usize,
    snaplen: usize,
    data: Vec<u8>,
    // Per frame: time (µs), original length, start and length in `data`.
    meta: Vec<(u64, u32, usize, usize)>,
    published: usize,
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
    backend: &'static str,
    latency_out: Histogram<u64>,
    latency_in: Histogram<u64>,
    out_start: Option<Instant>,
    out_frames: u64,
    in_start: Option<Instant>,
    in_frames: u64,
    recent: [Option<BlockedEvent>; RECENT_BLOCKED],
    recent_next: usize,
    capture: Option<CaptureState>,
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
            backend: "",
            latency_out: latency_histogram(),
            latency_in: latency_histogram(),
            out_start: None,
            out_frames: 0,
            in_start: None,
            in_frames: 0,
            recent: [None; RECENT_BLOCKED],
            recent_next: 0,
            capture: None,
        }
    }

    /// Notes the backend that runs the loop, and reports it.
    pub fn started(&mut self, backend: &'static str) {
        self.backend = backend;
        self.event(EventKind::Started(backend));
        self.publish(true);
    }

    /// Call at the end of each turn of the loop: a direction whose output has been handed to
    /// the kernel records, for each frame of its batch, the time since the batch's first frame
    /// was in hand (its time inside the engine, including the send).
    #[inline]
    pub fn batch_done(&mut self, out_sent: bool, in_sent: bool) {
        if out_sent {
            if let Some(t0) = self.out_start.take() {
                let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX).clamp(1, 10_000_000_000);
                let _ = self.latency_out.record_n(ns, std::mem::take(&mut self.out_frames));
            }
        }
        if in_sent {
            if let Some(t0) = self.in_start.take() {
                let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX).clamp(1, 10_000_000_000);
                let _ = self.latency_in.record_n(ns, std::mem::take(&mut self.in_frames));
            }
        }
    }

    fn remember_blocked(&mut self, reason: DropReason, from_vm: bool, summary: FrameSummary) {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        if let Some(slot) = self.recent.get_mut(self.recent_next % RECENT_BLOCKED) {
            *slot = Some(BlockedEvent { unix_ms, reason, from_vm, summary });
        }
        self.recent_next = self.recent_next.wrapping_add(1);
    }

    fn capture_frame(&mut self, frame: &[u8]) {
        let Some(c) = self.capture.as_mut() else { return };
        if c.meta.len() >= c.want {
            return;
        }
        let us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let keep = frame.get(..c.snaplen.min(frame.len())).unwrap_or_default();
        let start = c.data.len();
        c.data.extend_from_slice(keep);
        c.meta.push((us, u32::try_from(frame.len()).unwrap_or(u32::MAX), start, keep.len()));
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
        if self.out_start.is_none() {
            self.out_start = Some(Instant::now());
        }
        self.out_frames += 1;
        let action = self.nat.vm_frame(frame);
        self.counters.record_vm_frame(frame.len(), &action);
        if let VmAction::Drop(reason) | VmAction::Terminate(reason) = action {
            if self.capture.is_some() {
                self.capture_frame(frame);
            }
            if reason != DropReason::Terminated {
                self.remember_blocked(reason, true, FrameSummary::of(frame));
            }
        }
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
        if self.in_start.is_none() {
            self.in_start = Some(Instant::now());
        }
        self.in_frames += 1;
        self.counters.host_datagrams += 1;
        let len = payload.len();
        match self.nat.host_udp(from, slot, payload) {
            Ok(r) => Some(r),
            Err(reason) => {
                self.host_drop(reason, from, len, crate::wire::IpProtocol::Udp);
                None
            }
        }
    }

    /// Builds the VM frame for an ICMP message from `from`; `None` if it is dropped.
    pub fn host_icmp(&mut self, from: Ipv4Addr, slot: &mut [u8], message: Range<usize>) -> Option<Range<usize>> {
        if self.in_start.is_none() {
            self.in_start = Some(Instant::now());
        }
        self.in_frames += 1;
        self.counters.host_datagrams += 1;
        let len = message.len();
        match self.nat.host_icmp(from, slot, message) {
            Ok(r) => Some(r),
            Err(reason) => {
                self.host_drop(reason, Endpoint::new(from, 0), len, crate::wire::IpProtocol::Icmp);
                None
            }
        }
    }

    fn host_drop(&mut self, reason: DropReason, from: Endpoint, len: usize, proto: crate::wire::IpProtocol) {
        self.counters.count_drop(reason);
        if !matches!(reason, DropReason::Terminated | DropReason::IcmpNotEcho) {
            let vm_ip = self.nat.identity().ip.octets();
            let udp = proto == crate::wire::IpProtocol::Udp;
            let summary = FrameSummary {
                len,
                ethertype: None,
                ipv4: Some((from.ip.octets(), vm_ip, proto)),
                ports: udp.then_some((from.port, 0)),
            };
            self.remember_blocked(reason, false, summary);
        }
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
                Ok(Command::SetAllowlist(list, done)) => {
                    crate::info!("vm {}: allowlist now {} endpoint(s)", self.ctx.name, list.len());
                    self.nat.set_allowlist(list);
                    if let Some(done) = done {
                        let _ = done.try_send(());
                    }
                }
                Ok(Command::Capture { count, snaplen }) => {
                    let count = count.min(CAPTURE_MAX.0);
                    if count == 0 {
                        if let Some(c) = self.capture.as_mut() {
                            c.want = c.meta.len();
                        }
                    } else {
                        let snaplen = snaplen.clamp(64, CAPTURE_MAX.1);
                        self.capture = Some(CaptureState {
                            want: count,
                            snaplen,
                            data: Vec::with_capacity(count * snaplen),
                            meta: Vec::with_capacity(count),
                            published: 0,
                        });
                        if let Ok(mut t) = self.ctx.shared.lock() {
                            t.capture = Some(Capture::default());
                        }
                    }
                    self.publish(true);
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

    /// Publishes counters, histograms, recent events and capture progress. Never blocks the
    /// loop unless `wait` is set (lifecycle moments, not the packet path).
    pub fn publish(&mut self, wait: bool) {
        let snap = Snapshot {
            counters: self.counters,
            strategy: self.nat.strategy().stats(),
            terminated: self.nat.terminated(),
            strategy_name: S::NAME,
            backend: self.backend,
        };
        let shared = self.ctx.shared.clone();
        let guard = if wait { shared.lock().ok() } else { shared.try_lock().ok() };
        let Some(mut t) = guard else { return };
        t.snapshot = snap;
        if t.latency_out.add(&self.latency_out).is_ok() {
            self.latency_out.reset();
        }
        if t.latency_in.add(&self.latency_in).is_ok() {
            self.latency_in.reset();
        }
        t.recent.clear();
        for i in 0..RECENT_BLOCKED {
            let idx = self.recent_next.wrapping_add(i) % RECENT_BLOCKED;
            if let Some(Some(ev)) = self.recent.get(idx) {
                t.recent.push(*ev);
            }
        }
        if let Some(c) = self.capture.as_mut() {
            let out = t.capture.get_or_insert_with(Capture::default);
            for &(us, len, start, n) in c.meta.iter().skip(c.published) {
                out.frames.push((us, len, c.data.get(start..start + n).unwrap_or_default().to_vec()));
            }
            c.published = c.meta.len();
            if c.meta.len() >= c.want {
                out.done = true;
                self.capture = None;
            }
        }
        self.last_publish = Instant::now();
    }
}
