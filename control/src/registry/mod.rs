//! The control thread's registry of VMs, by job: this file is the lifecycle (workers, guests,
//! direct mode, events, allowlist changes), `handle.rs` answers requests, `views.rs` renders
//! VMs, counters and metrics. It starts and stops their workers, applies allowlist
//! changes, follows their events, and answers every request. Only the control thread touches
//! it; connection handlers pass requests in over a channel.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::reply::{self as view, Reply, VmState};
use api::{ErrorCode, Failure, Request};
use crossbeam_channel::{Receiver, Sender};
use engine::config::{HandleSpec, Mode, VmConfig};
use engine::filter::Allowlist;
use engine::worker::{self, Backend, BlockedEvent, Capture, Event, EventKind, Snapshot, VmWorker, CAPTURE_MAX};
use engine::{DropReason, Endpoint};
use hdrhistogram::Histogram;

mod boot;
mod guests;
mod handle;
mod record;
mod views;
mod watch;

use boot::{console_tail, Boot, BootState};
pub use boot::{BOOT_TIMEOUT, READY_LINE};
use guests::{image_desc, Cloud, Guest, GuestArgs, GUEST_WG_PORT};
use record::{PublicKeys, Start};

use views::{hex, stats_view, vm_reply, vm_view};

/// How long `allow set` waits for the worker to apply the new list before it says so.
const APPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a VM is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Its worker is starting.
    Starting,
    /// Its worker runs the loop.
    Running,
    /// Stopped for a policy violation.
    Terminated(DropReason),
    /// Stopped on request.
    Stopped,
    /// Its handle closed (the VMM went away).
    Exited(String),
    /// Its worker failed.
    Failed(String),
    /// A guest whose VMM ended with its launcher (a reboot), its disk kept; no worker until
    /// `vm resume`.
    Kept,
}

impl State {
    /// The state as every view names it.
    fn view(&self) -> VmState {
        match self {
            State::Starting => VmState::Starting,
            State::Running => VmState::Running,
            State::Terminated(_) => VmState::Terminated,
            State::Stopped => VmState::Stopped,
            State::Exited(_) => VmState::Exited,
            State::Failed(_) => VmState::Failed,
            State::Kept => VmState::Kept,
        }
    }

    /// The state as a number for the metrics (`omerta_vm_state`), so that a VM's label set
    /// never changes with it.
    fn code(&self) -> u8 {
        match self {
            State::Starting => 0,
            State::Running => 1,
            State::Stopped => 2,
            State::Exited(_) => 3,
            State::Terminated(_) => 4,
            State::Failed(_) => 5,
            State::Kept => 6,
        }
    }

    fn reason(&self) -> Option<String> {
        match self {
            State::Terminated(r) => Some(r.to_string()),
            State::Exited(s) | State::Failed(s) => Some(s.clone()),
            _ => None,
        }
    }
}

/// Direct mode: no engine in the path, only the detector watching the VMM's sockets.
struct Direct {
    interval: Duration,
    next: Instant,
    rogue: Vec<String>,
    /// Sockets of the VMM whose destinations cannot be seen (unconnected UDP and ICMP).
    blind: Vec<String>,
    checks: u64,
    /// The VMM's own network namespace, away from this host's loopback (the launcher's).
    net: crate::launcher::Net,
}

/// What carries a VM's network: the engine's worker or direct mode's NAT, never both.
enum Carrier {
    /// The engine: its worker while it runs (none once stopped, exited or failed).
    Engine(Option<VmWorker>),
    /// Direct mode: the VMM's own NAT in its namespace, watched; no worker ever.
    Direct(Direct),
}

/// One VM: its description, its allowlist, what carries its network, the guest the engine
/// started for it (if any) and what its worker last published.
struct Vm {
    cfg: VmConfig,
    guest: Option<Guest>,
    net: Carrier,
    allow: Arc<Allowlist>,
    state: State,
    last: Snapshot,
    latency_out: Histogram<u64>,
    latency_in: Histogram<u64>,
    recent: Vec<BlockedEvent>,
    starts: u32,
    /// The capture the worker held when it ended (`capture fetch` after a stop).
    capture: Option<Capture>,
    /// Its endpoints in the kernel fence (an engine VM of a fenced engine): there while its
    /// worker may send to them, emptied once the worker has stopped.
    fence: Option<crate::launcher::VmFence>,
    /// A kept guest (state `kept`): the launcher's number for it and its record, to boot it
    /// again (`vm resume`).
    kept: Option<record::KeptGuest>,
}

impl Vm {
    /// A VM's entry as it starts: nothing seen yet, one start.
    fn new(cfg: VmConfig, net: Carrier, state: State) -> Self {
        let allow = Arc::new(cfg.allowlist(sys::local_ipv4_addrs().unwrap_or_default()));
        Self {
            cfg,
            guest: None,
            net,
            allow,
            state,
            last: Snapshot::default(),
            latency_out: worker::latency_histogram(),
            latency_in: worker::latency_histogram(),
            recent: Vec::new(),
            starts: 1,
            capture: None,
            fence: None,
            kept: None,
        }
    }

    /// Before its worker starts: its allowlist's endpoints enter the kernel fence (refused:
    /// the worker does not start).
    fn fence_in(&mut self) -> Result<(), Failure> {
        let eps = self.allow.endpoints();
        match self.fence.as_mut() {
            Some(f) => f.set(&eps).map_err(|e| refused(format!("vm '{}': {e}", self.cfg.name))),
            None => Ok(()),
        }
    }

    /// Its worker, while one runs.
    fn worker(&self) -> Option<&VmWorker> {
        match &self.net {
            Carrier::Engine(w) => w.as_ref(),
            Carrier::Direct(_) => None,
        }
    }

    /// Takes its worker out (to finish it).
    fn take_worker(&mut self) -> Option<VmWorker> {
        match &mut self.net {
            Carrier::Engine(w) => w.take(),
            Carrier::Direct(_) => None,
        }
    }

    /// A new worker carries its network.
    fn set_worker(&mut self, w: VmWorker) {
        self.net = Carrier::Engine(Some(w));
    }

    /// Direct mode's NAT, if that carries its network.
    fn direct(&self) -> Option<&Direct> {
        match &self.net {
            Carrier::Direct(d) => Some(d),
            Carrier::Engine(_) => None,
        }
    }

    /// As [`Vm::direct`], to change.
    fn direct_mut(&mut self) -> Option<&mut Direct> {
        match &mut self.net {
            Carrier::Direct(d) => Some(d),
            Carrier::Engine(_) => None,
        }
    }

    /// Copies what the worker published (or keeps the last copy once it has ended).
    fn refresh(&mut self) {
        if let Some(w) = self.worker() {
            let (snap, out, inn, recent) = w
                .with_telemetry(|t| (t.snapshot, t.latency_out.clone(), t.latency_in.clone(), t.recent.clone()))
                .unwrap_or_else(|| (self.last, self.latency_out.clone(), self.latency_in.clone(), self.recent.clone()));
            self.last = snap;
            self.latency_out = out;
            self.latency_in = inn;
            self.recent = recent;
        }
    }

    fn stop_worker(&mut self) {
        // The worker publishes once more as it ends: keep that, not what was seen before.
        if let Some(w) = self.take_worker() {
            let t = w.finish();
            self.last = t.snapshot;
            self.latency_out = t.latency_out;
            self.latency_in = t.latency_in;
            self.recent = t.recent;
            self.capture = t.capture;
        }
        // The worker has ended: nothing sends for this VM any more.
        if let Some(f) = self.fence.as_mut() {
            f.clear();
        }
    }

    /// Ends the guest, if the engine started one: SIGTERM, then SIGKILL after a grace period.
    fn stop_guest(&mut self, grace: Duration) {
        if let Some(g) = self.guest.as_mut() {
            let _ = hv::RunningVm::stop(&mut g.vm, grace);
        }
    }
}

/// The VM registry.
pub struct Registry {
    vms: BTreeMap<String, Vm>,
    backend: Backend,
    /// Starts and ends guests' VMMs (none: `vm start` is refused).
    launcher: Option<Arc<crate::launcher::Client>>,
    events_tx: Sender<Event>,
    events: Receiver<Event>,
    started: Instant,
    /// The control client whose request is being handled (uid, gid), if any.
    client: Option<(u32, u32)>,
    /// Where `vm start` may take kernels and initrds from (canonical paths).
    image_dirs: Vec<std::path::PathBuf>,
    /// The host's addresses at the last check.
    host_addrs: Vec<std::net::Ipv4Addr>,
    /// The user VMMs run as (`None`: the engine's own).
    vmm_user: Option<hv::VmmUser>,
    /// The launcher keeps a kernel fence: every engine VM's endpoints go through it.
    kernel_fence: bool,
    /// With it, each guest's VMM runs as a uid of its own from this one up.
    vmm_uid_base: Option<u32>,
    /// Where guests' records go (their VMMs outlive the engine: `--launcher`), if they do.
    records: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("vms", &self.vms.len()).finish()
    }
}

fn not_found(name: &str) -> Failure {
    Failure::new(ErrorCode::NotFound, format!("no VM named '{name}'"))
}

fn refused(msg: impl Into<String>) -> Failure {
    Failure::new(ErrorCode::Refused, msg)
}

/// Percentiles of a histogram of nanoseconds, in microseconds.
pub fn percentiles(h: &Histogram<u64>) -> view::Percentiles {
    let us = |ns: u64| (ns as f64 / 1000.0 * 100.0).round() / 100.0;
    view::Percentiles {
        count: h.len(),
        p50_us: us(h.value_at_quantile(0.5)),
        p90_us: us(h.value_at_quantile(0.9)),
        p99_us: us(h.value_at_quantile(0.99)),
        p999_us: us(h.value_at_quantile(0.999)),
        max_us: us(h.max()),
    }
}

impl Registry {
    /// An empty registry whose workers use `backend`.
    pub fn new(backend: Backend) -> Self {
        let (events_tx, events) = crossbeam_channel::unbounded();
        Self {
            vms: BTreeMap::new(),
            backend,
            launcher: None,
            events_tx,
            events,
            started: Instant::now(),
            client: None,
            image_dirs: Vec::new(),
            host_addrs: sys::local_ipv4_addrs().unwrap_or_default(),
            vmm_user: None,
            vmm_uid_base: None,
            kernel_fence: false,
            records: None,
        }
    }

    /// Every engine VM's endpoints go into the launcher's kernel fence before its worker may
    /// use them, and leave it once the worker no longer does.
    pub fn set_kernel_fence(&mut self, on: bool) {
        self.kernel_fence = on;
    }

    /// VM `cfg`'s share of the kernel fence, if the engine keeps one.
    fn vm_fence(&self, cfg: &VmConfig) -> Option<crate::launcher::VmFence> {
        let l = self.launcher.as_ref().filter(|_| self.kernel_fence)?;
        Some(l.vm_fence(&cfg.name, crate::launcher::FenceRule::of(cfg)))
    }

    /// The directories `vm start` may take kernels and initrds from; each must exist.
    pub fn set_image_dirs(&mut self, dirs: &[std::path::PathBuf]) -> Result<(), String> {
        self.image_dirs = dirs
            .iter()
            .map(|d| {
                let c = d.canonicalize().map_err(|e| format!("--image-dir {}: {e}", d.display()))?;
                if c.is_dir() {
                    Ok(c)
                } else {
                    Err(format!("--image-dir {}: not a directory", d.display()))
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(())
    }

    /// Starts guests through `launcher` (without one, `vm start` is refused).
    pub fn set_launcher(&mut self, launcher: Arc<crate::launcher::Client>) {
        self.launcher = Some(launcher);
    }

    /// Runs VMMs as `user` (`None`: as the engine's own user).
    pub fn set_vmm_user(&mut self, user: Option<hv::VmmUser>) {
        self.vmm_user = user;
    }

    /// Runs each guest's VMM as a uid (and gid) of its own, from `base` up (`None`: all as the
    /// VMM user).
    pub fn set_vmm_uid_base(&mut self, base: Option<u32>) {
        self.vmm_uid_base = base;
    }

    /// Worker events, for the control loop's `select!`.
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// Adds and starts a VM.
    /// An inherited handle (`fd:N`) is the new VM's from this call on: closed if refused.
    pub fn add(&mut self, cfg: VmConfig) -> Result<(), Failure> {
        if self.vms.contains_key(&cfg.name) {
            // Unless another VM runs on that very descriptor, nothing else may use it.
            if !self.vms.values().any(|v| v.cfg.handle.same_place(&cfg.handle) && v.worker().is_some()) {
                worker::release_handle(&cfg.handle);
            }
            return Err(refused(format!("a VM named '{}' exists already", cfg.name)));
        }
        if let Some(other) = self.vms.values().find(|v| v.cfg.handle.same_place(&cfg.handle) && v.worker().is_some()) {
            let why = format!("handle {} is used by VM '{}'", cfg.handle, other.cfg.name);
            engine::warn!("vm {}: refused{}: {why}", cfg.name, self.asked_by());
            return Err(refused(why));
        }
        let fence = self.vm_fence(&cfg);
        let mut vm = Vm::new(cfg, Carrier::Engine(None), State::Starting);
        vm.fence = fence;
        if let Err(f) = vm.fence_in() {
            engine::warn!("vm {}: refused{}: {}", vm.cfg.name, self.asked_by(), f.message);
            worker::release_handle(&vm.cfg.handle);
            return Err(f);
        }
        let cfg = &vm.cfg;
        let worker = worker::spawn(cfg, self.backend, self.events_tx.clone()).map_err(|e| {
            // A live socket (or another user's) at its path: said in the log too, with who asked.
            if let worker::StartError::Open {
                source: o @ (engine::io::OpenError::InUse(_) | engine::io::OpenError::NotOurs { .. }),
                ..
            } = &e
            {
                engine::warn!("vm {}: refused{}: {o}", cfg.name, self.asked_by());
            }
            refused(e.to_string())
        })?;
        vm.set_worker(worker);
        self.vms.insert(vm.cfg.name.clone(), vm);
        Ok(())
    }

    /// ` (asked by uid N)` when a control client's request is being handled.
    fn asked_by(&self) -> String {
        self.client.map_or(String::new(), |(uid, _)| format!(" (asked by uid {uid})"))
    }

    /// Follows one worker event.
    pub fn on_event(&mut self, ev: Event) {
        if let EventKind::EndpointProved(to) = ev.kind {
            return self.endpoint_proved(&ev.vm, to);
        }
        let Some(vm) = self.vms.get_mut(&*ev.vm) else { return };
        match ev.kind {
            EventKind::EndpointProved(_) => {}
            EventKind::Started(_) => vm.state = State::Running,
            EventKind::Terminated(reason) => {
                engine::error!("vm {}: terminated for a policy violation ({reason}); its network is stopped", ev.vm);
                if let Some(g) = vm.guest.as_mut() {
                    engine::error!("vm {}: killing its guest (pid {})", ev.vm, hv::RunningVm::pid(&g.vm));
                    let _ = hv::RunningVm::kill(&mut g.vm);
                }
                vm.stop_worker();
                vm.state = State::Terminated(reason);
            }
            EventKind::HandleClosed(why) => {
                vm.stop_guest(Duration::from_secs(2));
                vm.stop_worker();
                vm.state = State::Exited(why.to_string());
            }
            EventKind::Failed(why) => {
                vm.stop_worker();
                vm.state = State::Failed(why.to_string());
            }
            EventKind::Stopped => {}
        }
    }

    /// A VM's consumer proved it is at `to` (its worker checked the proof): the VM's one
    /// endpoint moves there, the kernel fence with it, as an `allow set` would.
    fn endpoint_proved(&mut self, name: &str, to: Endpoint) {
        let from = match self.vms.get(name) {
            Some(vm) if vm.cfg.proof.is_some() => vm.allow.endpoints(),
            _ => return,
        };
        match self.set_list(name, vec![to]) {
            Ok(_) => engine::info!("vm {name}: its consumer proved its endpoint: {from:?} -> {to}"),
            Err(f) => engine::warn!("vm {name}: its consumer proved endpoint {to}, refused: {}", f.message),
        }
    }

    /// The engine stops and its guests outlive it (records are kept): each guest on an
    /// engine NIC is left to the launcher, running, its record kept; every worker stops (the
    /// guest has no network until the next engine); other guests (direct mode) end.
    pub fn detach_all(&mut self) {
        if self.records.is_none() {
            return self.stop_all();
        }
        for vm in self.vms.values_mut() {
            let kept = vm.direct().is_none();
            if !kept {
                vm.stop_guest(Duration::from_secs(2));
            }
            if vm.worker().is_some() {
                vm.stop_worker();
                vm.state = State::Stopped;
            }
            if let Some(g) = vm.guest.take().filter(|_| kept) {
                engine::info!(
                    "vm {}: its guest (pid {}) runs on for the next engine",
                    vm.cfg.name,
                    hv::RunningVm::pid(&g.vm)
                );
                g.vm.detach();
            }
        }
    }

    /// Stops every worker (engine shutdown).
    pub fn stop_all(&mut self) {
        for vm in self.vms.values_mut() {
            vm.stop_guest(Duration::from_secs(2));
            if vm.worker().is_some() {
                vm.stop_worker();
                vm.state = State::Stopped;
            }
        }
    }

    /// Names of the VMs whose worker is running.
    pub fn running(&self) -> Vec<String> {
        self.vms.iter().filter(|(_, v)| v.worker().is_some()).map(|(n, _)| n.clone()).collect()
    }

    /// The configuration VM `name` runs with, if there is such a VM.
    pub fn config_of(&self, name: &str) -> Option<&VmConfig> {
        self.vms.get(name).map(|v| &v.cfg)
    }

    fn vm(&mut self, name: &str) -> Result<&mut Vm, Failure> {
        self.vms.get_mut(name).ok_or_else(|| not_found(name))
    }

    fn selected(&mut self, name: Option<&str>) -> Result<Vec<&mut Vm>, Failure> {
        match name {
            Some(n) => Ok(vec![self.vms.get_mut(n).ok_or_else(|| not_found(n))?]),
            None => Ok(self.vms.values_mut().collect()),
        }
    }

    fn set_list(&mut self, name: &str, eps: Vec<Endpoint>) -> Result<Reply, Failure> {
        let vm = self.vm(name)?;
        // Its record holds the list it boots again with; it changes once it runs again.
        if vm.kept.is_some() {
            return Err(refused(format!("vm '{name}' is kept: its allowlist changes once it runs again (vm resume)")));
        }
        if vm.cfg.identity.alias_port.is_some() && eps.len() > 1 {
            return Err(refused(format!("vm '{name}' has a consumer alias: its allowlist holds one endpoint")));
        }
        let list = Allowlist::under(eps.iter().copied(), &vm.cfg.policy(sys::local_ipv4_addrs().unwrap_or_default()))
            .map_err(|e| refused(e.to_string()))?;
        let list = Arc::new(list);
        // The kernel fence takes the new endpoints beside the old ones before the worker may
        // use them (refused: nothing changes), and lets the old go once it has applied the
        // list: at no moment does the kernel drop what the worker may send.
        let running = vm.worker().is_some_and(|w| !w.is_finished());
        if let (true, Some(f)) = (running, vm.fence.as_mut()) {
            let mut both = vm.allow.endpoints();
            both.extend(list.endpoints());
            f.set(&both).map_err(|e| refused(format!("vm '{name}': {e}")))?;
        }
        // The reply means applied, not queued: a frame the VM sends after it meets the new
        // list. A worker that ends meanwhile has no list to apply. One that is late still
        // applies it (the command is queued), so the registry keeps the new list either way.
        let late = vm
            .worker()
            .filter(|w| !w.is_finished())
            .is_some_and(|w| !w.set_allowlist(list.clone(), APPLY_TIMEOUT) && !w.is_finished());
        vm.cfg.consumers = list.endpoints();
        vm.allow = list;
        // Late: the worker may still use the old endpoints, which stay until the next change.
        if let (true, false, Some(f)) = (running, late, vm.fence.as_mut()) {
            if let Err(e) = f.set(&vm.allow.endpoints()) {
                engine::warn!("vm {name}: kernel fence: the endpoints it left stay in the set: {e}");
            }
        }
        let allow = vm.allow.endpoints();
        self.save_record(name);
        if late {
            return Err(refused(format!(
                "vm '{name}': the new allowlist is queued but the worker did not apply it within {} s",
                APPLY_TIMEOUT.as_secs()
            )));
        }
        Ok(Reply::Allow(view::Allowlist { vm: name.to_string(), allow }))
    }
}

fn libc_dgram() -> i32 {
    libc::SOCK_DGRAM
}
