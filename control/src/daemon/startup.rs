//! The engine's startup, as phases whose order the compiler keeps (after passt's
//! `isolation.c` and Firecracker's jailer).
//!
//! ```text
//! Initial ──fork_launcher──▶ Forked ──bind──▶ Bound ──drop_privileges──▶ Dropped ──confine──▶ Confined
//! hardened,                 launcher,        control and               the engine's           the control
//! one thread                signals          metrics sockets           own user, no caps      thread's filter
//! ```
//!
//! # The security argument
//!
//! The engine is started as root and must end up holding nothing of root before it reads a
//! byte a control client or a guest sends. What still needs privilege afterwards (VMMs as
//! other users, direct mode's namespaces) is done by the launcher, a process forked for it.
//! That holds only if these happen in this order:
//!
//! 1. **Harden** ([`Initial::begin`]), before any thread: no-new-privs set (nothing the
//!    engine or the launcher runs gains privileges) and the bounding set narrowed to what
//!    the programs the launcher runs need. systemd's notify socket is connected here too,
//!    while the engine may still reach it. There is one `Initial` per process: a second
//!    `begin` is refused.
//! 2. **Fork the launcher** ([`Initial::fork_launcher`]) while the process has one thread:
//!    the child of a multi-threaded fork may find a lock (the allocator's, the logger's) held
//!    by a thread that does not exist in it. This is the one step the types cannot prove:
//!    `sys::fork_single_threaded` counts the threads and refuses otherwise. The child
//!    closes every descriptor but its socket, narrows its capabilities to
//!    [`crate::launcher::LAUNCHER_CAPS`] and serves; it never returns here. Signal handling
//!    is installed right after, so a SIGTERM while VMs start is a clean stop.
//! 3. **Bind** ([`Forked::bind`]) while still root: the control socket in a directory only
//!    root may write, and the metrics listener (a port below 1024 is possible). The
//!    launcher is told to own the control socket, since the engine, once unprivileged, may
//!    not remove it.
//! 4. **Drop privileges** ([`Bound::drop_privileges`]): the configured VMs' handle
//!    directories made for the engine's user, ping sockets enabled for its group, then
//!    `setresgid`/`setresuid` to that user with no supplementary group, the bounding and
//!    ambient sets emptied, not dumpable, checked afterwards (an error if anything of root
//!    remains). `--runas self` keeps root (labs), with a warning.
//! 5. **Confine** ([`Dropped::confine`]): the control thread's seccomp filter, which every
//!    thread started afterwards inherits (the signal thread, the control socket's threads,
//!    the workers), and no capability but those a root engine keeps for raw ICMP and low
//!    ports ([`ROOT_KEEPS`]).
//!
//! Only then does anything read input: [`Confined`] is what the control loop
//! (`control_loop::run`) takes, and the only way to get one is this chain. Each phase's type
//! has private fields and is made only by the phase before it, so skipping or reordering a
//! step (serving before the drop, binding after it, forking once a thread runs) does not
//! compile.
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use engine::config::VmConfig;
use signal_hook::iterator::Signals;

use super::users::{handle_dir, make_dir_for, make_own_dir};
use super::{Plan, StartError};
use crate::caps::{Cap, CapSet};
use crate::launcher;
use crate::notify::Notifier;

/// What an engine that kept root (`--runas self`) keeps once confined: raw ICMP sockets and
/// host ports below 1024. An engine that dropped to its user keeps nothing.
pub const ROOT_KEEPS: CapSet = CapSet::of(&[Cap::NetRaw, Cap::NetBindService]);

/// Set by the one [`Initial::begin`] of the process.
static BEGUN: AtomicBool = AtomicBool::new(false);

/// Phase 0: the process hardened, still one thread, systemd's notify socket connected.
#[derive(Debug)]
pub struct Initial {
    notify: Notifier,
}

/// Phase 1: the launcher forked (when there is a state directory) and the signals caught.
#[derive(Debug)]
pub struct Forked {
    notify: Notifier,
    launcher: Option<Arc<launcher::Client>>,
    signals: Signals,
}

/// Phase 2: the sockets that may need root bound.
#[derive(Debug)]
pub struct Bound {
    notify: Notifier,
    launcher: Option<Arc<launcher::Client>>,
    signals: Signals,
    control: Option<(UnixListener, PathBuf)>,
    metrics: Option<std::net::TcpListener>,
}

/// Phase 3: running as the engine's own user (unless `--runas self`), no capability.
#[derive(Debug)]
pub struct Dropped {
    bound: Bound,
    kept_own_user: bool,
}

/// Phase 4: the control thread under its filter. What the control loop runs with.
#[derive(Debug)]
pub struct Confined {
    bound: Bound,
}

/// What a confined engine runs with, taken apart for the control loop.
#[derive(Debug)]
pub struct Running {
    /// systemd's notify socket.
    pub notify: Notifier,
    /// The launcher (none without a state directory).
    pub launcher: Option<Arc<launcher::Client>>,
    /// SIGINT, SIGTERM and SIGHUP.
    pub signals: Signals,
    /// The control socket and its path.
    pub control: Option<(UnixListener, PathBuf)>,
    /// The metrics listener.
    pub metrics: Option<std::net::TcpListener>,
}

impl Initial {
    /// Connects systemd's notify socket (it unsets the variable, so before any thread) and
    /// hardens the process: nothing it runs may gain privileges, and no child may ever hold a
    /// capability none of them needs. Once per process.
    pub fn begin() -> Result<Initial, StartError> {
        if BEGUN.swap(true, Ordering::SeqCst) {
            return Err(StartError::Failed("startup: the process has begun already".into()));
        }
        let notify = Notifier::from_env().map_err(StartError::Failed)?;
        match sys::harden_process() {
            Ok(n) => engine::debug!("no-new-privs set; {n} capabilities dropped from the bounding set"),
            Err(e) => engine::warn!("{}", engine::io::describe("setting no-new-privs", &e)),
        }
        Ok(Initial { notify })
    }

    /// Forks the launcher, while this is the only thread (checked: a fork is refused
    /// otherwise): what still needs privilege once the engine has dropped it (VMMs, direct
    /// mode's namespaces) goes through it. Then installs the signal handlers (before anything
    /// else starts, so a SIGTERM arriving while VMs start is a clean stop, not the default
    /// death).
    ///
    /// With `--launcher PATH` it connects to the launcher serving there instead (as root:
    /// that launcher serves root alone), which must have been set up as this engine would set
    /// its own up (users, fence); its VMMs then outlive this engine.
    pub fn fork_launcher(self, plan: &Plan) -> Result<Forked, StartError> {
        // A launcher when there is a state directory (VMMs, direct mode) or a fence to keep.
        let launcher = if let Some(path) = &plan.launcher_at {
            Some(connect_launcher(path, plan)?)
        } else if plan.state_dir.is_some() || plan.fence.is_some() {
            Some(launcher::spawn(plan.launcher_setup(false)).map_err(|e| StartError::Failed(e.to_string()))?)
        } else {
            None
        };
        // Fails closed: no fence, no engine (unless --kernel-fence=off said so).
        if let (Some(l), Some(_)) = (&launcher, plan.fence) {
            l.fence_up().map_err(|e| StartError::Failed(format!("{e}; to run without it: --kernel-fence=off")))?;
        }
        let signals =
            Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP])
                .map_err(|e| StartError::Failed(engine::io::describe("installing signal handlers", &e)))?;
        Ok(Forked { notify: self.notify, launcher, signals })
    }
}

/// Connects to the launcher serving engines at `path` and checks it was set up as this engine
/// sets its own up.
fn connect_launcher(path: &std::path::Path, plan: &Plan) -> Result<Arc<launcher::Client>, StartError> {
    let (client, info) = launcher::Client::connect(path).map_err(|e| StartError::Failed(e.to_string()))?;
    let restart =
        "start it and the engine with the same configuration (systemctl restart omerta-launcher ends its VMs)";
    let differs = |what: &str, theirs: Option<u32>, ours: Option<u32>| {
        let show = |v: Option<u32>| v.map_or_else(|| "none".to_string(), |u| u.to_string());
        StartError::Failed(format!(
            "the launcher at {} has {what} {}, this engine {}: {restart}",
            path.display(),
            show(theirs),
            show(ours)
        ))
    };
    if !info.durable {
        return Err(StartError::Failed(format!("{} is not a launcher serving engines", path.display())));
    }
    if info.fence != plan.fence {
        return Err(differs("the kernel fence for uid", info.fence, plan.fence));
    }
    if info.vmm_uid != plan.vmm.as_ref().map(|u| u.uid) {
        return Err(differs("VMMs running as uid", info.vmm_uid, plan.vmm.as_ref().map(|u| u.uid)));
    }
    if info.state_dir != plan.state_dir {
        let show = |d: &Option<PathBuf>| d.as_ref().map_or_else(|| "none".to_string(), |d| d.display().to_string());
        return Err(StartError::Failed(format!(
            "the launcher at {} keeps its state in {}, this engine in {}: {restart}",
            path.display(),
            show(&info.state_dir),
            show(&plan.state_dir)
        )));
    }
    if info.vmm_uid_base != plan.vmm_uid_base {
        return Err(differs("the VMM uid range from", info.vmm_uid_base, plan.vmm_uid_base));
    }
    if info.version != env!("CARGO_PKG_VERSION") {
        engine::warn!(
            "the launcher at {} runs version {}, this engine {}: it runs its old code until it is restarted (which ends its VMs)",
            path.display(),
            info.version,
            env!("CARGO_PKG_VERSION")
        );
    }
    engine::info!("launcher at {} (pid {}): its VMMs outlive this engine", path.display(), client.pid());
    Ok(client)
}

impl Initial {
    /// `--serve-launcher PATH`: this process becomes a launcher that outlives its engines
    /// (as root only); returns only an error of its start.
    pub fn serve_launcher(self, plan: &Plan, path: &std::path::Path) -> Result<(), StartError> {
        if plan.started_as != 0 {
            return Err(StartError::Usage("--serve-launcher needs root".into()));
        }
        if plan.state_dir.is_none() {
            return Err(StartError::Usage("--serve-launcher needs a state directory (--state-dir)".into()));
        }
        launcher::serve_engines(path, &plan.launcher_setup(true), &self.notify)
            .map_err(|e| StartError::Failed(e.to_string()))
    }
}

impl Forked {
    /// Raises the open-files limit and binds the control socket (while the engine may still
    /// create it where root may; the launcher removes it at the end) and the metrics endpoint
    /// (while a low port is still possible).
    pub fn bind(self, plan: &Plan) -> Result<Bound, StartError> {
        // Each VM holds a few descriptors and each control client one: the hard limit, not the
        // soft default of 1024, is the engine's budget.
        if let Err(e) = sys::raise_open_files_limit() {
            engine::warn!("{}", engine::io::describe("raising the open-files limit", &e));
        }
        let control = match (&plan.control, &self.launcher) {
            (Some(path), Some(l)) => {
                let listener = crate::server::bind(path, plan.control_gid)
                    .map_err(|e| StartError::Failed(format!("control socket: {e}")))?;
                engine::info!("control socket at {}", path.display());
                if let Err(e) = l.own() {
                    engine::warn!("launcher: {e}: the control socket stays behind at the end");
                }
                Some((listener, path.clone()))
            }
            _ => None,
        };
        // Served once the control thread runs (its thread inherits the control thread's
        // filter).
        let metrics = match plan.metrics_listen.as_deref().map(crate::metrics_http::bind) {
            Some(Ok(l)) => {
                let at = l.local_addr().map_or_else(|_| "?".into(), |a| a.to_string());
                engine::info!("metrics at http://{at}/metrics");
                Some(l)
            }
            Some(Err(e)) => return Err(StartError::Failed(e)),
            None => None,
        };
        Ok(Bound { notify: self.notify, launcher: self.launcher, signals: self.signals, control, metrics })
    }
}

impl Bound {
    /// From here on the engine holds no privilege: it runs as its own user, with no
    /// capability. The configured VMs' handle directories are made first, for the user that
    /// binds their sockets.
    pub fn drop_privileges(self, plan: &Plan, vms: &[VmConfig]) -> Result<Dropped, StartError> {
        let dir_failed = |dir: &PathBuf, e: std::io::Error| StartError::Failed(format!("{}: {e}", dir.display()));
        let Some(u) = &plan.runas else {
            // The engine keeps its user: a handle socket's missing directory is made now, 0700.
            for dir in vms.iter().filter_map(|v| handle_dir(&v.handle)).chain(plan.records.clone()) {
                make_own_dir(&dir).map_err(|e| dir_failed(&dir, e))?;
            }
            if plan.started_as == 0 {
                engine::warn!("running as root (--runas self): the data plane keeps root's identity (labs only)");
            }
            return Ok(Dropped { bound: self, kept_own_user: true });
        };
        // Its user makes the configured VMs' handle sockets: a directory of theirs that does
        // not exist yet is made for that user (one that exists is left as it is).
        // So are guests' records (`STATE/engine`, with a launcher that outlives the engine).
        for dir in vms.iter().filter_map(|v| handle_dir(&v.handle)).chain(plan.records.clone()) {
            make_dir_for(&dir, u).map_err(|e| dir_failed(&dir, e))?;
        }
        // And `vms/` beside an absolute control socket, where the sockets of VMs added later
        // (a reload, `vm add`) go: once root is dropped the engine could not make it there.
        // No VM needs it yet, so a failure is a warning.
        if let Some(dir) =
            plan.control.as_ref().filter(|c| c.is_absolute()).and_then(|c| c.parent()).map(|d| d.join("vms"))
        {
            if let Err(e) = make_dir_for(&dir, u) {
                engine::warn!("{}: {e}; VMs added later cannot bind their sockets there", dir.display());
            }
        }
        // Ping sockets for the engine's group, where the namespace has them off (only root may
        // turn them on); raw ICMP sockets need a capability the engine no longer holds.
        if engine::io::allow_ping_sockets(u.gid) {
            engine::info!("ping sockets allowed for group {} in this network namespace", u.gid);
        }
        sys::drop_privileges(u.uid, u.gid)
            .map_err(|e| StartError::Failed(engine::io::describe(&format!("dropping privileges to {}", u.name), &e)))?;
        engine::info!("running as {} (uid {}, gid {}): no capabilities, no supplementary groups", u.name, u.uid, u.gid);
        warn_small_socket_buffers();
        Ok(Dropped { bound: self, kept_own_user: false })
    }
}

impl Dropped {
    /// Puts the control thread under its filter, which every thread it starts inherits.
    /// Where the OS has no seccomp, the engine runs on unconfined (said at debug level).
    pub fn confine(self) -> Result<Confined, StartError> {
        let keep = if self.kept_own_user { ROOT_KEEPS } else { CapSet::EMPTY };
        match sys::confine_control_thread(keep.bits()) {
            Ok(()) => engine::debug!("control thread confined"),
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => engine::debug!("{e}"),
            Err(e) => return Err(StartError::Failed(engine::io::describe("confining the control thread", &e))),
        }
        Ok(Confined { bound: self.bound })
    }
}

impl Confined {
    /// What the control loop runs with.
    pub fn into_running(self) -> Running {
        let Bound { notify, launcher, signals, control, metrics } = self.bound;
        Running { notify, launcher, signals, control, metrics }
    }
}

/// Once without privilege, the engine's socket buffers are capped by the host's maxima: said
/// once at start when they are below what it asks for (host-to-VM bursts are then dropped).
fn warn_small_socket_buffers() {
    const WANT: u64 = 4 << 20;
    for key in ["rmem_max", "wmem_max"] {
        let path = format!("/proc/sys/net/core/{key}");
        let Some(v) = std::fs::read_to_string(&path).ok().and_then(|t| t.trim().parse::<u64>().ok()) else { continue };
        if v < WANT {
            engine::warn!(
                "net.core.{key} is {v} bytes, below the {WANT} each VM's sockets ask for: bursts beyond it are dropped (install packaging/sysctl.d/90-omerta.conf, or sysctl -w net.core.{key}={WANT})"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_engine_keeps_raw_icmp_and_low_ports_as_before() {
        // The bits the engine kept before capabilities had names: 1 << 13 | 1 << 10.
        assert_eq!(ROOT_KEEPS.bits(), 1 << 13 | 1 << 10);
    }
}
