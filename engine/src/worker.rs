//! One VM's worker thread: [`spawn`] and the control side's handle on it, [`VmWorker`]. The
//! per-frame logic every backend shares is `vmcore`; the loops are `io`. This is the only
//! reader of the VM's configuration on the data path (its resources are opened from it here).
//!
//! [`spawn`] opens everything the VM needs in the caller's thread (so a bad path or a lack of
//! file descriptors is a synchronous, one-line error), then starts a thread that pins itself,
//! builds the VM's [`FilteredNat`] for its mode, and runs the chosen backend's loop until it
//! is told to stop, its handle closes, or it fails. Commands are applied between batches only.
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use crate::config::{Mode, VmConfig};
use crate::filter::{Allowlist, Conntrack, Full, Sampled, Strategy};
use crate::io::{self, Resources};
use crate::nat::FilteredNat;
use crate::vmcore::{Core, Ctx};

pub use crate::io::Backend;
pub use crate::vmcore::{
    latency_histogram, BlockedEvent, Capture, CapturedFrame, Command, Event, EventKind, Snapshot, Telemetry, BATCH,
    CAPTURE_MAX, PUBLISH_EVERY, RECENT_BLOCKED,
};

/// A VM that could not start; one line naming the VM.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `cpu=` names a CPU this process may not run on.
    #[error("vm '{vm}': cpu={cpu} is not one this process may use ({allowed:?})")]
    Cpu {
        /// The VM.
        vm: String,
        /// The CPU asked for.
        cpu: usize,
        /// The CPUs allowed.
        allowed: Vec<usize>,
    },
    /// Its handle, host socket or doorbell could not be opened.
    #[error("vm '{vm}': {source}")]
    Open {
        /// The VM.
        vm: String,
        /// Why.
        source: io::OpenError,
    },
    /// Its thread could not be started (or could not take a descriptor table of its own).
    #[error("vm '{vm}': cannot start its thread: {source}")]
    Thread {
        /// The VM.
        vm: String,
        /// Why.
        source: std::io::Error,
    },
}

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
    /// The VM's host UDP port: where its consumer's WireGuard reaches it.
    pub host_port: u16,
    /// The VM's socket files, removed when this goes (after the thread has ended).
    _paths: Vec<io::PathGuard>,
    /// The process's copy of an inherited handle (the worker took its own): kept while it
    /// runs, so its number names this VM's handle only, and closed after it ended.
    _copies: SharedCopies,
}

/// Descriptor numbers of the process's table that a worker's own table has copies of: closed
/// when this goes.
#[derive(Debug)]
struct SharedCopies(Vec<std::os::fd::RawFd>);

impl Drop for SharedCopies {
    fn drop(&mut self) {
        for fd in self.0.drain(..) {
            sys::close_number(fd);
        }
    }
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

/// Opens the VM's resources and starts its worker thread. An inherited handle (`fd:N`,
/// `stream-fd:N`) belongs to the worker from this call on: if the VM cannot start, it is
/// closed here, whatever the reason, so a caller never has to guess.
pub fn spawn(cfg: &VmConfig, backend: Backend, events: Sender<Event>) -> Result<VmWorker, StartError> {
    let name: Arc<str> = Arc::from(cfg.name.as_str());
    if let Some(cpu) = cfg.cpu {
        let cpus = sys::allowed_cpus();
        if !cpus.contains(&cpu) {
            release_handle(&cfg.handle);
            return Err(StartError::Cpu { vm: name.to_string(), cpu, allowed: cpus });
        }
    }
    let mut res = io::open(cfg).map_err(|source| StartError::Open { vm: name.to_string(), source })?;
    let paths = std::mem::take(&mut res.paths);
    let (tx, rx) = crossbeam_channel::bounded(64);
    let bell = res.bell.clone();
    let shared = Arc::new(Mutex::new(Telemetry {
        snapshot: Snapshot::default(),
        latency_out: latency_histogram(),
        latency_in: latency_histogram(),
        recent: Vec::with_capacity(2 * RECENT_BLOCKED),
        capture: None,
    }));
    let footprint = io::footprint(cfg);
    let host_port = res.host.egress.port();
    let cfg = cfg.clone();
    let (name2, shared2, events2) = (name.clone(), shared.clone(), events.clone());
    // The process's copies: an inherited handle's number stays taken while the worker runs
    // (handles are told apart by it); the rest are closed as soon as the worker has its own
    // (a listening handle's copy would otherwise go on accepting connections nobody serves).
    let (keep_copies, close_now): (Vec<_>, Vec<_>) = {
        let handle = match &cfg.handle {
            crate::config::HandleSpec::DgramFd(fd) | crate::config::HandleSpec::StreamFd(fd) => Some(*fd),
            _ => None,
        };
        res.owned_descriptors().into_iter().partition(|fd| Some(*fd) == handle)
    };
    let (took, took_rx) = std::sync::mpsc::sync_channel::<std::io::Result<()>>(1);
    let thread = std::thread::Builder::new()
        .name(format!("omerta-vm-{}", cfg.name))
        .spawn(move || {
            // First thing: a descriptor table of its own holding only what it needs, so that
            // nothing it does (guest frames are parsed here), io_uring included, can name the
            // launcher's socket, the control socket or another VM's descriptors, and none can
            // be passed to it but through its own sockets.
            let private = sys::private_descriptors(&res.descriptors());
            let ok = private.is_ok();
            let _ = took.send(private);
            if ok {
                worker_main(cfg, backend, res, rx, events2, shared2, name2);
            }
        })
        .map_err(|source| StartError::Thread { vm: name.to_string(), source })?;
    // The worker has its copies; the process's own are closed now, or once it has ended.
    let copies = SharedCopies(keep_copies);
    let refused = match took_rx.recv() {
        Ok(Ok(())) => {
            drop(SharedCopies(close_now));
            None
        }
        Ok(Err(e)) => Some(e),
        Err(_) => Some(std::io::Error::other("the worker ended as it started")),
    };
    if let Some(source) = refused {
        let _ = thread.join();
        // It did not take a table of its own (unshare refused): what it owned it closed in
        // the process's table already.
        std::mem::forget(copies);
        return Err(StartError::Thread { vm: name.to_string(), source });
    }
    Ok(VmWorker {
        name,
        thread: Some(thread),
        commands: tx,
        bell,
        shared,
        footprint,
        host_port,
        _paths: paths,
        _copies: copies,
    })
}

/// Closes an inherited handle that will not be used (a VM refused before its worker took it).
/// Other handles are paths, with nothing to close.
pub fn release_handle(handle: &crate::config::HandleSpec) {
    use crate::config::HandleSpec;
    let (fd, ty) = match handle {
        HandleSpec::DgramFd(fd) => (*fd, libc::SOCK_DGRAM),
        HandleSpec::StreamFd(fd) => (*fd, libc::SOCK_STREAM),
        _ => return,
    };
    // Adopted only if it is the unix socket it claims to be, and closed on drop.
    drop(io::adopt_handle(fd, ty));
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
        if let Err(e) = sys::pin_current_thread(cpu) {
            crate::warn!("vm {name}: cannot pin to CPU {cpu}: {e}; running unpinned");
        }
    }
    let allow = Arc::clone(&res.allow);
    let id = cfg.identity;
    let ctx = Ctx { name, events, commands, shared, proof: cfg.proof.map(|k| (k, cfg.proof_floor_ms)) };
    match cfg.mode {
        Mode::Filtered => {
            let mut n = FilteredNat::new(id, allow, Full::new());
            n.set_dhcp(cfg.dhcp);
            run(Core::new(n, ctx), backend, res);
        }
        Mode::Conntrack => {
            let mut n = FilteredNat::new(id, allow, Conntrack::new(cfg.flows));
            n.set_dhcp(cfg.dhcp);
            run(Core::new(n, ctx), backend, res);
        }
        Mode::Sampled(rate) => {
            let seed = cfg.seed.unwrap_or_else(random_seed);
            let mut n = FilteredNat::new(id, allow, Sampled::new(rate, seed));
            n.set_dhcp(cfg.dhcp);
            run(Core::new(n, ctx), backend, res);
        }
    }
}

/// A seed nobody can predict (the OS CSPRNG), so the sampling draws cannot be replayed; the
/// egress gate holds whatever they are. Falls back to std's randomly keyed hasher only if the
/// OS refuses (it does not on Linux or macOS).
fn random_seed() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
        h.finish()
    })
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
        EventKind::Stopped => crate::info!("vm {}: stopped", core.name()),
        EventKind::HandleClosed(why) => crate::info!("vm {}: handle closed ({why}); worker ends", core.name()),
        EventKind::Failed(why) => crate::error!("vm {}: worker failed: {why}", core.name()),
        _ => {}
    }
    core.event(kind);
}
