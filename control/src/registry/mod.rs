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

mod handle;
mod views;

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

/// A guest the engine started itself (`vm start`), with what it takes to start it again.
struct Guest {
    vm: crate::launcher::RemoteVm,
    kernel: String,
    initrd: String,
    memory_mib: u32,
    cpus: u32,
    firewall: bool,
    /// A cloud image's provisioning (its keys stay the same across restarts).
    cloud: Option<Cloud>,
    console: std::path::PathBuf,
    /// Its VMM's place in the uid range (`--vmm-uid-base`), if one is set.
    uid_slot: Option<u32>,
    /// Whether it has said it is ready.
    boot: Boot,
}

/// A cloud image VM: the request, the image directory, the seed and the keys in it.
#[derive(Clone)]
struct Cloud {
    request: api::ImageStart,
    /// The image directory (canonical).
    image: String,
    seed: hv::cloud::Seed,
    keys: crate::provision::VmKeys,
}

/// The files of an image directory, as `make image` builds it.
const IMAGE_FILES: [&str; 3] = ["disk.raw", "vmlinuz", "initrd.img"];

/// A started guest's readiness, read from its console: guest input, so read in bounded
/// pieces and matched strictly (a whole line that is exactly [`READY_LINE`]).
#[derive(Debug)]
struct Boot {
    state: BootState,
    started: Instant,
    timeout: Duration,
    /// How far the console has been read.
    offset: u64,
    /// The unfinished last line (at most [`MAX_LINE`] bytes are kept).
    partial: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum BootState {
    Booting,
    Ready(Duration),
    /// Not ready in time; the console's last lines (printable ASCII only).
    Failed(Vec<String>),
}

/// The line a guest prints on its serial console when its setup is complete.
pub const READY_LINE: &str = "OMERTA-READY";
/// How long a guest may take to become ready by default.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest console line looked at; the console bytes read per check.
const MAX_LINE: usize = 256;
const READ_PER_CHECK: usize = 64 * 1024;

impl Boot {
    fn new(timeout: Duration) -> Self {
        Self { state: BootState::Booting, started: Instant::now(), timeout, offset: 0, partial: Vec::new() }
    }

    /// Reads what the guest printed since the last check; true once it is ready.
    fn check(&mut self, vm: &crate::launcher::RemoteVm) -> bool {
        let (bytes, next) = vm.console_from(self.offset, READ_PER_CHECK);
        self.offset = next;
        for &b in &bytes {
            if b == b'\n' {
                let line = std::mem::take(&mut self.partial);
                let line = line.strip_suffix(b"\r").unwrap_or(&line);
                if line == READY_LINE.as_bytes() {
                    return true;
                }
            } else if self.partial.len() < MAX_LINE {
                self.partial.push(b);
            }
        }
        false
    }
}

/// The last `n` lines of a console, reduced to printable ASCII, each at most [`MAX_LINE`].
fn console_tail(text: &str, n: usize) -> Vec<String> {
    let mut lines: Vec<String> = text
        .lines()
        .rev()
        .filter(|l| !l.trim().is_empty())
        .take(n)
        .map(|l| l.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(MAX_LINE).collect())
        .collect();
    lines.reverse();
    lines
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest").field("pid", &hv::RunningVm::pid(&self.vm)).field("kernel", &self.kernel).finish()
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

struct Vm {
    cfg: VmConfig,
    guest: Option<Guest>,
    direct: Option<Direct>,
    allow: Arc<Allowlist>,
    worker: Option<VmWorker>,
    state: State,
    last: Snapshot,
    latency_out: Histogram<u64>,
    latency_in: Histogram<u64>,
    recent: Vec<BlockedEvent>,
    starts: u32,
    /// The capture the worker held when it ended (`capture fetch` after a stop).
    capture: Option<Capture>,
}

impl Vm {
    /// A VM's entry as it starts: nothing seen yet, one start.
    fn new(cfg: VmConfig, direct: Option<Direct>, worker: Option<VmWorker>, state: State) -> Self {
        let allow = Arc::new(cfg.allowlist());
        Self {
            cfg,
            guest: None,
            direct,
            allow,
            worker,
            state,
            last: Snapshot::default(),
            latency_out: worker::latency_histogram(),
            latency_in: worker::latency_histogram(),
            recent: Vec::new(),
            starts: 1,
            capture: None,
        }
    }

    /// Copies what the worker published (or keeps the last copy once it has ended).
    fn refresh(&mut self) {
        if let Some(w) = &self.worker {
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
        if let Some(w) = self.worker.take() {
            let t = w.finish();
            self.last = t.snapshot;
            self.latency_out = t.latency_out;
            self.latency_in = t.latency_in;
            self.recent = t.recent;
            self.capture = t.capture;
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
    state_dir: std::path::PathBuf,
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
    /// With it, each guest's VMM runs as a uid of its own from this one up.
    vmm_uid_base: Option<u32>,
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

impl Registry {
    /// The file a `kernel=`/`initrd=` value names, if it lies in an image directory: a file
    /// name is looked up in the first directory, an absolute path must resolve (symlinks
    /// followed) inside one; any other relative path is refused (the engine's directory means
    /// nothing to its client; omertactl sends such paths made absolute).
    fn image(&self, value: &str) -> Result<String, Failure> {
        let Some(first) = self.image_dirs.first() else {
            return Err(refused(
                "vm start takes kernels and initrds from --image-dir directories only, and this engine has none",
            ));
        };
        let p = std::path::Path::new(value);
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else if p.components().count() == 1 {
            first.join(p)
        } else {
            return Err(refused(format!(
                "{value}: a relative path; give an absolute path or a file name in {}",
                first.display()
            )));
        };
        let real = p.canonicalize().map_err(|e| refused(format!("{}: {e}", p.display())))?;
        if !self.image_dirs.iter().any(|d| real.starts_with(d)) {
            return Err(refused(format!("{value} is not in an image directory (--image-dir)")));
        }
        Ok(real.to_string_lossy().into_owned())
    }
}

/// Opens `path` to read for a client (uid, gid): refused unless it is a regular file that user
/// could read by its mode (root and the engine's own requests are not checked). The launcher
/// gets the open file; the VMM reads it as `/proc/self/fd/N`, as its own user.
fn open_for(path: &str, client: Option<(u32, u32)>, vmm: Option<&hv::VmmUser>) -> Result<std::fs::File, Failure> {
    use std::os::unix::fs::MetadataExt;
    let f = std::fs::File::open(path).map_err(|e| refused(format!("{path}: {e}")))?;
    let m = f.metadata().map_err(|e| refused(format!("{path}: {e}")))?;
    if !m.is_file() {
        return Err(refused(format!("{path} is not a regular file")));
    }
    if let Some((uid, gid)) = client.filter(|(uid, _)| *uid != 0 && *uid != engine::io::effective_ids().0) {
        let mode = m.mode();
        let readable =
            (m.uid() == uid && mode & 0o400 != 0) || (m.gid() == gid && mode & 0o040 != 0) || mode & 0o004 != 0;
        if !readable {
            return Err(refused(format!("{path} is not readable by uid {uid}, who asked for it")));
        }
    }
    // The VMM opens it again (by /proc/self/fd) as its own user.
    if let Some(u) = vmm.filter(|u| !u.can_read(&m)) {
        return Err(refused(format!(
            "{path} is not readable by the VMM's user {} (uid {}); make it readable by that user or choose another with --vmm-user",
            u.name, u.uid
        )));
    }
    Ok(f)
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
            state_dir: std::env::temp_dir(),
            events_tx,
            events,
            started: Instant::now(),
            client: None,
            image_dirs: Vec::new(),
            host_addrs: engine::io::local_ipv4_addrs().unwrap_or_default(),
            vmm_user: None,
            vmm_uid_base: None,
        }
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

    /// Where guest consoles are kept (default: the system's temporary directory).
    pub fn set_state_dir(&mut self, dir: std::path::PathBuf) {
        self.state_dir = dir;
    }

    /// Keeps every allowlist clear of the host's own addresses as they change: an endpoint that
    /// has become one is removed from the lists that name it (said in a log line). Call
    /// periodically.
    pub fn check_host_addresses(&mut self) {
        let Ok(host) = engine::io::local_ipv4_addrs() else { return };
        if host != self.host_addrs {
            // The kernel chose each connected socket's source address when it connected: let
            // every worker connect its sockets again.
            if !self.host_addrs.is_empty() {
                for w in self.vms.values().filter_map(|vm| vm.worker.as_ref()) {
                    w.command(worker::Command::AddressesChanged);
                }
            }
            self.host_addrs.clone_from(&host);
        }
        // Direct-mode VMMs: their namespace rejects this host's addresses as they are now
        // (each compares with what it rejects; nothing to do when they agree).
        for (name, d) in self.vms.iter_mut().filter_map(|(n, vm)| Some((n, vm.direct.as_mut()?))) {
            d.net.refence(name, &host);
        }
        let hit: Vec<(String, Vec<Endpoint>)> = self
            .vms
            .iter()
            .filter(|(_, vm)| vm.cfg.special == engine::filter::SpecialAddresses::Refuse)
            .filter_map(|(name, vm)| {
                let eps = vm.allow.endpoints();
                let keep: Vec<Endpoint> = eps.iter().copied().filter(|e| !host.contains(&e.ip)).collect();
                (keep.len() < eps.len()).then(|| (name.clone(), keep))
            })
            .collect();
        for (name, keep) in hit {
            engine::error!(
                "vm {name}: an allowed endpoint is now an address of this host; removed from its allowlist (now {} endpoint(s))",
                keep.len()
            );
            if let Err(f) = self.set_list(&name, keep) {
                engine::error!("vm {name}: {}", f.message);
            }
        }
    }

    /// Notices guests that ended on their own (a datagram socketpair gives no sign of that):
    /// their VM becomes `exited` and its worker is stopped. Call periodically.
    pub fn tick(&mut self) {
        for (name, vm) in &mut self.vms {
            let Some(g) = vm.guest.as_mut() else { continue };
            let active = vm.worker.is_some() || (vm.direct.is_some() && vm.state == State::Running);
            if !active {
                continue;
            }
            if g.boot.state == BootState::Booting {
                if g.boot.check(&g.vm) {
                    let took = g.boot.started.elapsed();
                    engine::info!("vm {name}: its guest is ready ({:.1} s after it started)", took.as_secs_f64());
                    g.boot.state = BootState::Ready(took);
                } else if g.boot.started.elapsed() >= g.boot.timeout {
                    let tail = console_tail(&hv::RunningVm::console(&g.vm), 10);
                    engine::warn!(
                        "vm {name}: its guest was not ready within {} s; stopping it",
                        g.boot.timeout.as_secs()
                    );
                    g.boot.state = BootState::Failed(tail);
                    let _ = hv::RunningVm::kill(&mut g.vm);
                    let why = format!("the guest was not ready within {} s", g.boot.timeout.as_secs());
                    vm.stop_worker();
                    vm.state = State::Failed(why);
                    continue;
                }
            }
            if let Some(status) = hv::RunningVm::try_wait(&mut g.vm) {
                engine::info!("vm {name}: its guest exited ({status}); stopping its network");
                vm.stop_worker();
                vm.state = State::Exited(format!("guest exited ({status})"));
                continue;
            }
            if let Some(d) = vm.direct.as_mut() {
                if Instant::now() >= d.next {
                    d.next = Instant::now() + d.interval;
                    d.checks += 1;
                    let conns = g.vm.sockets();
                    if let Err(e) = &conns {
                        // Said once per VM: the check runs every few seconds.
                        if d.checks == 1 {
                            engine::warn!("vm {name}: the rogue detector cannot list the VMM's sockets: {e}");
                        }
                    }
                    if let Ok(conns) = conns {
                        for c in crate::rogue::rogue(&conns, &vm.cfg.consumers) {
                            let line = c.to_string();
                            if !d.rogue.contains(&line) && d.rogue.len() < 64 {
                                engine::warn!("vm {name}: rogue connection from the VMM: {line} (not the consumer)");
                                d.rogue.push(line);
                            }
                        }
                        for c in crate::rogue::blind(&conns) {
                            let line = c.to_string();
                            if !d.blind.contains(&line) && d.blind.len() < 64 {
                                engine::warn!("vm {name}: the detector is blind to the VMM's socket {line}");
                                d.blind.push(line);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Starts a guest for `cfg` (whose handle is the engine's end of a fresh socketpair).
    fn start_guest(&mut self, name: &str, nic: crate::launcher::Nic, g: GuestArgs) -> Result<Guest, Failure> {
        let launcher = self.launcher.clone().ok_or_else(|| refused("this engine starts no guests (no launcher)"))?;
        // Opened here, as the engine, but only if the client may read them (a control-group
        // member must not make a root VMM read a root-only file); QEMU gets the open files,
        // so nothing can be swapped in between the check and its use.
        // With a uid range, each guest's VMM gets a uid (and gid) of its own: the lowest no
        // other guest of this engine holds.
        let uid_slot = self.vmm_uid_base.map(|_| {
            let taken: Vec<u32> = self.vms.values().filter_map(|v| v.guest.as_ref()?.uid_slot).collect();
            (0..).find(|k| !taken.contains(k)).unwrap_or(0)
        });
        let user = match (self.vmm_uid_base, uid_slot) {
            (Some(base), Some(k)) => {
                let id = base.saturating_add(k);
                Some(hv::VmmUser { name: format!("uid {id}"), uid: id, gid: id })
            }
            _ => self.vmm_user.clone(),
        };
        let kernel = open_for(&self.image(&g.kernel)?, self.client, user.as_ref())?;
        let initrd = open_for(&self.image(&g.initrd)?, self.client, user.as_ref())?;
        // A cloud image's base disk reaches the VMM as an open file it never opens again
        // itself (`/dev/fdset`): only the client's right to read it is checked.
        let base = match &g.cloud {
            Some(c) => Some(open_for(&self.image(&format!("{}/disk.raw", c.image))?, self.client, None)?),
            None => None,
        };
        let vm = self.vms.get(name).ok_or_else(|| not_found(name))?;
        let id = vm.cfg.identity;
        let consumer = vm.cfg.consumers.first().map(ToString::to_string).unwrap_or_default();
        let console = self.state_dir.join(format!("omerta-{name}.console"));
        let spec = crate::launcher::StartSpec {
            name: name.to_string(),
            cmdline: format!(
                "console=ttyS0 quiet panic=-1 reboot=t omerta.ip={}/{} omerta.gw={} omerta.consumer={consumer} omerta.fw={}",
                id.ip,
                id.prefix_len,
                id.gateway_ip,
                u8::from(g.firewall)
            ),
            memory_mib: g.memory_mib,
            cpus: g.cpus,
            mac: id.mac.to_string(),
            uid_slot,
            image: None,
        };
        let files = crate::launcher::BootFiles { kernel: &kernel, initrd: &initrd, base: None };
        let running = match (&g.cloud, &base) {
            (Some(c), Some(base)) => {
                // Its own root disk, the serial console, no quiet: the firewall's LOG lines and
                // cloud-init's progress reach the console.
                let cmdline = "root=/dev/vda rw console=ttyS0".into();
                let spec = crate::launcher::StartSpec { cmdline, image: Some(Box::new(c.seed.clone())), ..spec };
                launcher.start(spec, nic, crate::launcher::BootFiles { base: Some(base), ..files })
            }
            _ => launcher.start(spec, nic, files),
        };
        let running = running.map_err(|e| refused(e.to_string()))?;
        Ok(Guest {
            vm: running,
            kernel: g.kernel,
            initrd: g.initrd,
            memory_mib: g.memory_mib,
            cpus: g.cpus,
            firewall: g.firewall,
            cloud: g.cloud,
            console,
            uid_slot,
            boot: Boot::new(g.boot_timeout),
        })
    }

    /// `vm start` in direct mode: the guest on the VMM's own user-mode NAT, no engine in the
    /// path, the guest firewall as the barrier and the rogue-connection detector watching.
    fn start_direct(&mut self, mut pairs: crate::config::Pairs, g: GuestArgs, interval: u64) -> Result<Reply, Failure> {
        // The description is validated as a filtered VM would be (name, identity, consumers);
        // its handle is never opened.
        pairs.push(("handle".into(), "fd:0".into()));
        let cfg = crate::config::vm_from_pairs(&pairs).map_err(|e| refused(e.to_string()))?;
        let name = cfg.name.clone();
        if self.vms.contains_key(&name) {
            return Err(refused(format!("a VM named '{name}' exists already")));
        }
        let launcher = self.launcher.clone().ok_or_else(|| refused("this engine starts no guests (no launcher)"))?;
        let net = launcher.direct_net(&name, cfg.private).map_err(|e| refused(e.to_string()))?;
        let netns = net.id();
        let direct = Direct {
            interval: Duration::from_secs(interval),
            next: Instant::now(),
            rogue: Vec::new(),
            blind: Vec::new(),
            checks: 0,
            net,
        };
        self.vms.insert(name.clone(), Vm::new(cfg, Some(direct), None, State::Running));
        match self.start_guest(&name, crate::launcher::Nic::Direct(netns), g) {
            Ok(guest) => {
                if let Some(vm) = self.vms.get_mut(&name) {
                    vm.guest = Some(guest);
                }
                Ok(vm_reply(self.vm(&name)?))
            }
            Err(e) => {
                self.vms.remove(&name);
                Err(e)
            }
        }
    }

    /// `vm start`: a socketpair, a worker on one end, a guest on the other.
    fn vm_start(&mut self, spec: &str) -> Result<Reply, Failure> {
        let mut pairs = crate::config::split_spec(spec).map_err(|e| refused(e.to_string()))?;
        let mut take = |key: &str| {
            let v = pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.clone());
            pairs.retain(|(k, _)| k != key);
            v
        };
        let kernel = take("kernel").ok_or_else(|| refused("vm start needs kernel=PATH"))?;
        let initrd = take("initrd").ok_or_else(|| refused("vm start needs initrd=PATH"))?;
        let memory_mib = match take("memory") {
            Some(m) => m.parse().map_err(|_| refused(format!("memory={m}: not a number of MiB")))?,
            None => 128,
        };
        let firewall = !matches!(take("firewall").as_deref(), Some("no" | "false" | "0"));
        let interval = take("rogue-interval");
        let mode = take("mode");
        let boot_timeout = match take("boot-timeout") {
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|s| (1..=3600).contains(s))
                .map(Duration::from_secs)
                .ok_or_else(|| refused(format!("boot-timeout={v}: 1 to 3600 seconds")))?,
            None => BOOT_TIMEOUT,
        };
        let interval = match interval {
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|s| (1..=3600).contains(s))
                .ok_or_else(|| refused(format!("rogue-interval={v}: 1 to 3600 seconds")))?,
            None => 5,
        };
        // Resolved in the image directories now, so a bad path is refused before anything
        // is made; opened (as the client may) only when the guest starts.
        let (kernel, initrd) = (self.image(&kernel)?, self.image(&initrd)?);
        for p in [&kernel, &initrd] {
            if !std::path::Path::new(p).is_file() {
                return Err(refused(format!("{p} is not a file")));
            }
        }
        if pairs.iter().any(|(k, _)| k == "handle") {
            return Err(refused("vm start makes the VM's handle itself; drop handle="));
        }
        if mode.as_deref() == Some("direct") {
            return self.start_direct(
                pairs,
                GuestArgs { kernel, initrd, memory_mib, cpus: 1, firewall, boot_timeout, cloud: None },
                interval,
            );
        }
        if let Some(m) = mode {
            pairs.push(("mode".into(), m));
        }
        // Everything is checked before the socketpair exists, so a refusal leaves no descriptor
        // behind; from `add` on, the worker owns the engine's end (and closes it if it fails).
        pairs.push(("handle".into(), "fd:0".into()));
        let cfg = crate::config::vm_from_pairs(&pairs).map_err(|e| refused(e.to_string()))?;
        let name = cfg.name.clone();
        if self.vms.contains_key(&name) {
            return Err(refused(format!("a VM named '{name}' exists already")));
        }
        self.add_with_guest(cfg, GuestArgs { kernel, initrd, memory_mib, cpus: 1, firewall, boot_timeout, cloud: None })
    }

    /// Adds `cfg` on a fresh socketpair (its worker on the engine's end) and starts its guest
    /// with `g` on the other; a guest that fails to start takes the VM with it. Call once
    /// everything is checked, so a refusal leaves no descriptor behind: from `add` on, the
    /// worker owns the engine's end (and closes it if it fails).
    fn add_with_guest(&mut self, mut cfg: VmConfig, g: GuestArgs) -> Result<Reply, Failure> {
        let name = cfg.name.clone();
        let (engine_end, vmm_end) =
            engine::io::socketpair(libc_dgram()).map_err(|e| refused(format!("socketpair: {e}")))?;
        cfg.handle = HandleSpec::DgramFd(std::os::fd::IntoRawFd::into_raw_fd(engine_end));
        self.add(cfg)?;
        match self.start_guest(&name, crate::launcher::Nic::Dgram(vmm_end), g) {
            Ok(g) => {
                if let Some(vm) = self.vms.get_mut(&name) {
                    vm.guest = Some(g);
                }
            }
            Err(e) => {
                if let Some(mut vm) = self.vms.remove(&name) {
                    vm.stop_worker();
                }
                return Err(e);
            }
        }
        Ok(vm_reply(self.vm(&name)?))
    }

    /// `vm start image=...`: a stock cloud image for one consumer. The engine makes the VM's
    /// WireGuard key pair and SSH host key; the launcher makes its overlay and seed.
    fn vm_start_image(&mut self, s: api::ImageStart) -> Result<Reply, Failure> {
        let image = self.image(&s.image)?;
        for f in IMAGE_FILES {
            if !std::path::Path::new(&image).join(f).is_file() {
                return Err(refused(format!(
                    "image {}: no {f} (an image directory holds {}, as make image builds it)",
                    s.image,
                    IMAGE_FILES.join(", ")
                )));
            }
        }
        let mut pairs: crate::config::Pairs =
            vec![("name".into(), s.name.clone()), ("consumer".into(), s.consumer.to_string())];
        if let Some(m) = &s.mode {
            pairs.push(("mode".into(), m.clone()));
        }
        pairs.push(("handle".into(), "fd:0".into()));
        let cfg = crate::config::vm_from_pairs(&pairs).map_err(|e| refused(e.to_string()))?;
        let name = cfg.name.clone();
        if self.vms.contains_key(&name) {
            return Err(refused(format!("a VM named '{name}' exists already")));
        }
        let keys = crate::provision::generate().map_err(refused)?;
        let id = cfg.identity;
        let mut nonce = [0u8; 4];
        getrandom::fill(&mut nonce).map_err(|e| refused(format!("the OS random source: {e}")))?;
        let seed = hv::cloud::Seed {
            instance_id: format!("omerta-{}", hex(&nonce)),
            hostname: name.replace('_', "-").trim_start_matches(['-', '.']).chars().take(63).collect::<String>(),
            mac: id.mac.to_string(),
            addressing: if s.dhcp {
                hv::cloud::Addressing::Dhcp
            } else {
                hv::cloud::Addressing::Static {
                    address: id.ip,
                    prefix: id.prefix_len,
                    gateway: id.gateway_ip,
                    mtu: id.mtu,
                }
            },
            user: s.ssh_user.clone(),
            ssh_authorized_key: s.ssh_key.clone(),
            host_key_private: keys.host_private.clone(),
            host_key_public: keys.host_public.clone(),
            wg_private_key: keys.wg_private.clone(),
            wg_address: s.tunnel,
            wg_port: 51820,
            consumer_key: s.consumer_key.clone(),
            consumer_endpoint: std::net::SocketAddrV4::new(s.consumer.ip, s.consumer.port),
            consumer_tunnel: s.consumer_tunnel,
        };
        seed.check().map_err(|e| refused(e.to_string()))?;
        let boot_timeout = s.boot_timeout_s.map_or(BOOT_TIMEOUT, Duration::from_secs);
        let dir = std::path::Path::new(&image);
        let g = GuestArgs {
            kernel: dir.join("vmlinuz").to_string_lossy().into_owned(),
            initrd: dir.join("initrd.img").to_string_lossy().into_owned(),
            memory_mib: s.memory_mib,
            cpus: s.cpus,
            firewall: true,
            boot_timeout,
            cloud: Some(Cloud { request: s, image: image.clone(), seed, keys }),
        };
        let shown = self.add_with_guest(cfg, g)?;
        engine::info!("vm {name}: started image {image}");
        Ok(shown)
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
            if !self.vms.values().any(|v| v.cfg.handle == cfg.handle && v.worker.is_some()) {
                worker::release_handle(&cfg.handle);
            }
            return Err(refused(format!("a VM named '{}' exists already", cfg.name)));
        }
        if let Some(other) = self.vms.values().find(|v| v.cfg.handle == cfg.handle && v.worker.is_some()) {
            return Err(refused(format!("handle {} is used by VM '{}'", cfg.handle, other.cfg.name)));
        }
        let worker = worker::spawn(&cfg, self.backend, self.events_tx.clone()).map_err(|e| refused(e.to_string()))?;
        let vm = Vm::new(cfg, None, Some(worker), State::Starting);
        self.vms.insert(vm.cfg.name.clone(), vm);
        Ok(())
    }

    /// Follows one worker event.
    pub fn on_event(&mut self, ev: Event) {
        let Some(vm) = self.vms.get_mut(&*ev.vm) else { return };
        match ev.kind {
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

    /// Stops every worker (engine shutdown).
    pub fn stop_all(&mut self) {
        for vm in self.vms.values_mut() {
            vm.stop_guest(Duration::from_secs(2));
            if vm.worker.is_some() {
                vm.stop_worker();
                vm.state = State::Stopped;
            }
        }
    }

    /// Names of the VMs whose worker is running.
    pub fn running(&self) -> Vec<String> {
        self.vms.iter().filter(|(_, v)| v.worker.is_some()).map(|(n, _)| n.clone()).collect()
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
        let list = Allowlist::under(eps.iter().copied(), &vm.cfg.policy()).map_err(|e| refused(e.to_string()))?;
        let list = Arc::new(list);
        // The reply means applied, not queued: a frame the VM sends after it meets the new
        // list. A worker that ends meanwhile has no list to apply. One that is late still
        // applies it (the command is queued), so the registry keeps the new list either way.
        let late = vm
            .worker
            .as_ref()
            .filter(|w| !w.is_finished())
            .is_some_and(|w| !w.set_allowlist(list.clone(), APPLY_TIMEOUT) && !w.is_finished());
        vm.cfg.consumers = list.endpoints();
        vm.allow = list;
        if late {
            return Err(refused(format!(
                "vm '{name}': the new allowlist is queued but the worker did not apply it within {} s",
                APPLY_TIMEOUT.as_secs()
            )));
        }
        Ok(Reply::Allow(view::Allowlist { vm: name.to_string(), allow: vm.allow.endpoints() }))
    }
}

/// The guest settings `vm start` was given, kept for `vm restart`.
struct GuestArgs {
    kernel: String,
    initrd: String,
    memory_mib: u32,
    cpus: u32,
    firewall: bool,
    boot_timeout: Duration,
    cloud: Option<Cloud>,
}

fn libc_dgram() -> i32 {
    libc::SOCK_DGRAM
}
