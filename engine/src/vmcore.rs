//! The per-frame core of a VM's worker, shared by every I/O backend: translation (through the
//! VM's [`FilteredNat`]), counting, rate-limited logging, termination; the commands a worker
//! takes between batches, the events it sends, and the telemetry it publishes (counters,
//! latency histograms, recent blocked events, captures). Below `io/`, which calls it; above
//! `nat`, `filter`, `stats` and `log`. **Invariant:** nothing here allocates or blocks on the
//! packet path; commands apply between batches only.
//!
//! Over 500 lines on purpose: `Core` and the commands, events and telemetry it exchanges are one
//! contract between the loops and the worker, and read best side by side.
#![forbid(unsafe_code)]

use std::net::Ipv4Addr;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use hdrhistogram::Histogram;

use crate::filter::{Allowlist, DropReason, Endpoint, Strategy, StrategyStats};
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
    /// Copy the next `count` dropped frames from the VM, or with `all` the next `count` frames
    /// either way (from the VM, dropped or not, and to it), at most `snaplen` bytes of each;
    /// `count == 0` ends a capture early. Both are bounded by [`CAPTURE_MAX`].
    Capture {
        /// Frames to capture.
        count: usize,
        /// Bytes kept of each frame.
        snaplen: usize,
        /// Both directions, forwarded frames too.
        all: bool,
    },
    /// The host's addresses changed: open the ICMP sockets again, so each picks its source
    /// address anew (the UDP socket is never connected: the kernel picks one per datagram).
    AddressesChanged,
    /// End the worker.
    Stop,
}

/// Limits of one capture: frames and bytes per frame.
pub const CAPTURE_MAX: (usize, usize) = (1000, 2048);

/// Recent blocked events kept per VM and direction.
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

/// One captured frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedFrame {
    /// Microseconds since the Unix epoch.
    pub unix_us: u64,
    /// Its length on the wire.
    pub len: u32,
    /// Its first `snaplen` bytes.
    pub bytes: Vec<u8>,
    /// True for a frame the engine wrote to the VM, false for one the VM sent.
    pub to_vm: bool,
    /// Why it was dropped; `None` for a frame forwarded.
    pub dropped: Option<DropReason>,
}

/// Frames copied for a capture (the client writes the file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capture {
    /// The frames, in the order the worker saw them.
    pub frames: Vec<CapturedFrame>,
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
    /// A valid endpoint proof came from this endpoint, which is not the VM's: its one
    /// endpoint should move there (the control thread does, through the allowlist).
    EndpointProved(Endpoint),
    /// The VM handle closed (the VMM went away); the worker has ended.
    HandleClosed(Closed),
    /// The worker ended on an error it could not go on from.
    Failed(LoopError),
    /// The worker ended because it was told to.
    Stopped,
}

/// Why the VM handle closed (the VMM went away).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Closed {
    /// A stream handle reached its end.
    #[error("end of stream")]
    EndOfStream,
    /// Reading or writing the handle failed (the text of the system's error).
    #[error("{0}")]
    Error(String),
}

impl Closed {
    pub(crate) fn io(e: &std::io::Error) -> Self {
        Closed::Error(e.to_string())
    }
}

/// An error the loop cannot go on from (the system's error in words).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoopError {
    /// Registering with or waiting on the readiness queue failed.
    #[error("waiting for readiness: {0}")]
    Poll(String),
    /// Setting up io_uring failed.
    #[error("io_uring_setup: {0}")]
    RingSetup(String),
    /// Submitting to io_uring failed.
    #[error("io_uring: {0}")]
    Ring(String),
    /// The kernel refused the receive buffers.
    #[error("io_uring: providing buffers: {0}")]
    ProvideBuffers(String),
    /// Accepting the VMM's connection on a stream handle failed.
    #[error("accepting on the stream handle: {0}")]
    Accept(String),
    /// The loop was given a stream handle nobody had connected to.
    #[error("stream handle not connected")]
    NotConnected,
}

/// An event of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The VM's name.
    pub vm: Arc<str>,
    /// What happened.
    pub kind: EventKind,
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

/// What a worker's core talks through: its name, events out, commands in, published telemetry.
pub(crate) struct Ctx {
    pub(crate) name: Arc<str>,
    pub(crate) events: Sender<Event>,
    pub(crate) commands: Receiver<Command>,
    pub(crate) shared: Arc<Mutex<Telemetry>>,
    /// The rental's endpoint-proof key, if its endpoint is learned from proofs, and the
    /// counter at or below which no proof is accepted.
    pub(crate) proof: Option<(crate::proof::Key, u64)>,
}

/// A capture being filled by the worker. Both vectors are allocated with their full capacity
/// when the command arrives, so capturing a frame never allocates.
struct CaptureState {
    want: usize,
    snaplen: usize,
    all: bool,
    data: Vec<u8>,
    // Per frame: time (µs), original length, start and length in `data`, to the VM, the drop.
    meta: Vec<(u64, u32, usize, usize, bool, Option<DropReason>)>,
    published: usize,
}

/// Per-frame logic shared by the backends: translation, counting, logging, commands.
pub(crate) struct Core<S> {
    nat: FilteredNat<S>,
    /// Counters, published between batches.
    pub counters: Counters,
    ctx: Ctx,
    /// One limiter per direction (VM, host side): host-side noise never silences the log
    /// lines of the guest's own violations, nor the reverse.
    blocked_log: [RateLimiter; 2],
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
    /// Recent blocked events, one ring per direction (VM, host side), for the same reason.
    recent: [[Option<BlockedEvent>; RECENT_BLOCKED]; 2],
    recent_next: [usize; 2],
    capture: Option<CaptureState>,
    addresses_changed: bool,
    /// Checks endpoint proofs, for a VM that learns its endpoint from them.
    proof: Option<crate::proof::Gate>,
}

/// The index of a direction in the per-direction limiters and rings.
const fn dir(from_vm: bool) -> usize {
    if from_vm {
        0
    } else {
        1
    }
}

impl<S: Strategy> Core<S> {
    /// A core over `nat`, talking through `ctx`.
    pub(crate) fn new(nat: FilteredNat<S>, ctx: Ctx) -> Self {
        Self {
            proof: ctx.proof.map(|(key, floor)| crate::proof::Gate::resume(key, floor)),
            nat,
            counters: Counters::default(),
            ctx,
            blocked_log: [blocked_traffic_limiter(), blocked_traffic_limiter()],
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
            recent: [[None; RECENT_BLOCKED]; 2],
            recent_next: [0; 2],
            capture: None,
            addresses_changed: false,
        }
    }

    /// The allowlist packets are checked against now.
    pub fn allowlist(&self) -> &Arc<Allowlist> {
        self.nat.allowlist()
    }

    /// Whether the host's addresses changed since the last call.
    pub fn take_addresses_changed(&mut self) -> bool {
        std::mem::take(&mut self.addresses_changed)
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
        let unix_ms = crate::log::unix_ms();
        let d = dir(from_vm);
        if let Some(slot) = self.recent[d].get_mut(self.recent_next[d] % RECENT_BLOCKED) {
            *slot = Some(BlockedEvent { unix_ms, reason, from_vm, summary });
        }
        self.recent_next[d] = self.recent_next[d].wrapping_add(1);
    }

    /// Copies a frame into the capture in progress: a dropped one always, a forwarded one
    /// only when the capture takes all frames.
    fn capture_frame(&mut self, frame: &[u8], to_vm: bool, dropped: Option<DropReason>) {
        let Some(c) = self.capture.as_mut() else { return };
        if c.meta.len() >= c.want || (dropped.is_none() && !c.all) {
            return;
        }
        let us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let keep = frame.get(..c.snaplen.min(frame.len())).unwrap_or_default();
        let start = c.data.len();
        c.data.extend_from_slice(keep);
        c.meta.push((us, u32::try_from(frame.len()).unwrap_or(u32::MAX), start, keep.len(), to_vm, dropped));
    }

    /// A frame about to be written to the VM, for a capture of all frames.
    #[inline]
    pub fn captured_to_vm(&mut self, frame: &[u8]) {
        if self.capture.is_some() {
            self.capture_frame(frame, true, None);
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
        if self.out_start.is_none() {
            self.out_start = Some(Instant::now());
        }
        self.out_frames += 1;
        let action = self.nat.vm_frame(frame);
        self.counters.record_vm_frame(frame.len(), &action);
        if self.capture.is_some() {
            let dropped = match action {
                VmAction::Drop(r) | VmAction::Terminate(r) => Some(r),
                _ => None,
            };
            self.capture_frame(frame, false, dropped);
        }
        if let VmAction::Drop(reason) | VmAction::Terminate(reason) = action {
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

    /// Counts (and logs, rate-limited) a frame on the VM's handle from someone else.
    pub fn foreign_frame(&mut self, len: usize) {
        self.counters.count_drop(DropReason::ForeignSender);
        if let Some(suppressed) = self.blocked_log[dir(true)].allow(Instant::now()) {
            let more = if suppressed > 0 { format!(" ({suppressed} more not logged)") } else { String::new() };
            crate::warn!(
                "vm {}: dropped foreign_sender: a {len}-byte frame from a socket that is not the VM's{more}",
                self.ctx.name
            );
        }
    }

    /// Counts (and logs, rate-limited) a connection to the VM's stream handle from a uid
    /// other than the VM's (`peer-uid=`); `None` when its credentials could not be read.
    pub fn foreign_connection(&mut self, uid: Option<u32>) {
        self.counters.count_drop(DropReason::ForeignSender);
        if self.blocked_log[dir(true)].allow(Instant::now()).is_some() {
            let who = uid.map_or("an unknown uid".to_string(), |u| format!("uid {u}"));
            crate::warn!("vm {}: refused a connection to the stream handle from {who}", self.ctx.name);
        }
    }

    /// Counts a frame lost to a full output (a bounded queue overflowing).
    pub fn dropped_on_full_queue(&mut self) {
        self.counters.queue_overflows += 1;
    }

    fn log_blocked(&mut self, frame: &[u8], reason: DropReason) {
        if let Some(suppressed) = self.blocked_log[dir(true)].allow(Instant::now()) {
            let more = if suppressed > 0 { format!(" ({suppressed} more not logged)") } else { String::new() };
            crate::warn!("vm {}: dropped {reason}: {}{more}", self.ctx.name, FrameSummary::of(frame));
        }
    }

    /// Starts the clock of a host-to-VM batch at its first datagram and counts the datagram.
    #[inline]
    fn host_in(&mut self) {
        if self.in_start.is_none() {
            self.in_start = Some(Instant::now());
        }
        self.in_frames += 1;
        self.counters.host_datagrams += 1;
    }

    /// Counts a datagram from the host too big for the VM's frames (dropped).
    pub fn host_too_big(&mut self) {
        self.counters.host_datagrams += 1;
        self.counters.count_drop(DropReason::InboundTooBig);
    }

    /// Builds the VM frame for a datagram from `from`; `None` if it is dropped (counted).
    #[inline]
    pub fn host_udp(&mut self, from: Endpoint, slot: &mut [u8], payload: Range<usize>) -> Option<Range<usize>> {
        self.host_in();
        let len = payload.len();
        if self.proof.is_some() {
            if let Some(proof) = slot.get(payload.clone()).filter(|d| crate::proof::is_candidate(d)) {
                self.endpoint_proof(from, proof);
                return None;
            }
        }
        match self.nat.host_udp(from, slot, payload) {
            Ok(r) => {
                self.counters.alias_in += u64::from(self.nat.alias().is_some());
                Some(r)
            }
            Err(reason) => {
                self.host_drop(reason, from, len, crate::wire::IpProtocol::Udp);
                None
            }
        }
    }

    /// An endpoint proof from `from` (never given to the guest): checked, counted, and if it
    /// names a new endpoint, the control thread is told (the gate's rate bounds the events).
    #[cold]
    fn endpoint_proof(&mut self, from: Endpoint, datagram: &[u8]) {
        let Some(gate) = self.proof.as_mut() else { return };
        match gate.check(from, datagram, self.nat.alias_target(), Instant::now(), crate::log::unix_ms()) {
            Ok(proved) => {
                self.counters.proofs_accepted += 1;
                if let crate::proof::Proved::Moved(to) = proved {
                    self.counters.endpoint_proved += 1;
                    self.event(EventKind::EndpointProved(to));
                }
            }
            Err(reason) => self.host_drop(reason, from, datagram.len(), crate::wire::IpProtocol::Udp),
        }
    }

    /// Builds the VM frame for an ICMP message from `from`; `None` if it is dropped.
    pub fn host_icmp(&mut self, from: Ipv4Addr, slot: &mut [u8], message: Range<usize>) -> Option<Range<usize>> {
        self.host_in();
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
        if !quiet && self.blocked_log[dir(false)].allow(Instant::now()).is_some() {
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
                Ok(Command::Capture { count, snaplen, all }) => {
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
                            all,
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
                Ok(Command::AddressesChanged) => self.addresses_changed = true,
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
        // Both directions' rings, oldest first (within capacity reserved at spawn, and an
        // unstable sort, which does not allocate).
        t.recent.clear();
        for d in 0..2 {
            for i in 0..RECENT_BLOCKED {
                let idx = self.recent_next[d].wrapping_add(i) % RECENT_BLOCKED;
                if let Some(Some(ev)) = self.recent[d].get(idx) {
                    t.recent.push(*ev);
                }
            }
        }
        t.recent.sort_unstable_by_key(|e| e.unix_ms);
        if let Some(c) = self.capture.as_mut() {
            let out = t.capture.get_or_insert_with(Capture::default);
            for &(unix_us, len, start, n, to_vm, dropped) in c.meta.iter().skip(c.published) {
                let bytes = c.data.get(start..start + n).unwrap_or_default().to_vec();
                out.frames.push(CapturedFrame { unix_us, len, bytes, to_vm, dropped });
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
