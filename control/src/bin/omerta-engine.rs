//! `omerta-engine`: runs the data plane for one or more VMs.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use argh::FromArgs;
use control::config;
use control::registry::Registry;
use control::{launcher, server};
use engine::config::VmConfig;
use engine::worker::Backend;
use engine::{error, info, warn};

#[derive(FromArgs)]
/// The Omerta data plane: each VM's NIC is a unix socket whose other end is this engine, which
/// forwards UDP and ICMP echo to the VM's allowed consumer endpoints and nothing else.
#[argh(
    example = "Serve one VM on an inherited socketpair end, allowing one WireGuard consumer:\n  {command_name} --vm name=vm0,handle=fd:3,consumer=203.0.113.7:51820",
    example = "Two VMs, one in conntrack mode pinned to CPU 1, one on a QEMU dgram socket path:\n  {command_name} --vm name=a,handle=fd:3,consumer=203.0.113.7:51820,mode=conntrack,cpu=1 \\\n     --vm name=b,handle=dgram:/run/omerta/vms/b.sock,consumer=203.0.113.7:51821",
    example = "From a config file, overriding one VM's MTU:\n  {command_name} --config /etc/omerta/engine.toml --vm name=vm0,mtu=1400",
    note = "A VM description is comma-separated key=value pairs (the same keys as [[vm]] tables of\nthe config file, where repeated keys are arrays):\n  name=NAME            unique VM name (required)\n  handle=H             the VM's NIC: dgram:PATH (engine binds PATH; QEMU -netdev dgram with unix\n                       paths), fd:N (inherited unix datagram socketpair end), stream:PATH (engine\n                       listens; QEMU -netdev stream), stream-fd:N (required)\n  peer=PATH            with dgram:PATH, the VMM's socket path: only its frames are accepted\n                       (default: the first sender's; the handle is then connected to it)\n  peer-uid=N           with stream:PATH, the only uid whose connection is accepted\n  consumer=IP:PORT     an allowed endpoint; repeat, or join with '+' (at least one)\n  mode=M               filtered (default: every packet checked, violations dropped), conntrack\n                       (first packet of a flow checked; a violation terminates the VM), sampled\n  sample-rate=R        sampled mode: share of packets checked, in (0, 1] (default 0.01)\n  seed=N               sampled mode: generator seed, tests and labs only (needs allow-special=yes)\n  flows=N              conntrack mode: flow-table size (default 1024)\n  cpu=N                pin the VM's thread to CPU N (default: not pinned)\n  mac=MAC              the VM's MAC (default 52:54:00:12:34:56)\n  ip=IP/PREFIX         the VM's address (default 10.0.2.15/24)\n  gateway=IP           the gateway the engine answers ARP for (default 10.0.2.2)\n  gateway-mac=MAC      the gateway's MAC (default 52:55:0a:00:02:02)\n  mtu=N                576..=9000 (default 1500)\n  bind=IP[:PORT]       local address of the VM's host UDP socket (default 0.0.0.0:0)\n  allow-special=yes    accept loopback/link-local consumers (labs and tests only)\n  allow-private=yes    accept private consumers (RFC 1918, CGNAT) for LAN deployments\n  busy-poll=yes        the VM's thread never sleeps: lower latency, one core always busy\n  spin-us=N            after traffic the VM's thread polls N µs before it sleeps, 0..=1000\n                       (adaptive polling; default 50, 0: off)\n  dhcp=no              the engine answers no DHCP (default: it gives the VM its address,\n                       prefix, gateway and MTU)\n  dhcp-lease=S         seconds of those leases, 60..=604800 (default 3600)\nEnvironment: OMERTA_BACKEND=auto|uring|portable sets the I/O backend where --backend is not given;\nOMERTA_LOG=debug|info|warn|error sets the log level (-q and -v override it; other values are\nrefused); OMERTA_GSO=0 turns UDP GSO off; OMERTA_ICMP=raw uses a raw ICMP\nsocket even where ping sockets are permitted.\nControl: omertactl talks to the engine over its control socket (docs/control-protocol.md); VMs\ncan be added there too, so the engine may start with none.\nExit status: 0 after a clean stop, 1 when a VM cannot start or fails, 2 for bad usage."
)]
struct Args {
    /// a VM description (repeatable); see the keys below
    #[argh(option)]
    vm: Vec<String>,

    /// a TOML file with `backend` and [[vm]] tables; --vm flags override its keys
    #[argh(option)]
    config: Option<PathBuf>,

    /// the I/O backend: auto (io_uring if the kernel has it), uring, portable
    #[argh(option)]
    backend: Option<String>,

    /// log every VM's counters every N seconds (default 0: only when it ends)
    #[argh(option, default = "0")]
    stats_interval: u64,

    /// check the configuration, print the VMs, and exit
    #[argh(switch)]
    check: bool,

    /// path of the control socket (default: $OMERTA_CONTROL, /run/omerta/engine.sock as root)
    #[argh(option)]
    control: Option<PathBuf>,

    /// a group whose members may use the control socket besides the engine's user
    #[argh(option)]
    control_gid: Option<u32>,

    /// a directory `vm start` may take guest kernels and initrds from (repeat for more; with
    /// none, `vm start` is refused)
    #[argh(option)]
    image_dir: Vec<PathBuf>,

    /// the user guests' VMMs run as (default, when the engine runs as root: omerta-vmm where
    /// that user exists, else nobody); `self` keeps the engine's own user
    #[argh(option)]
    vmm_user: Option<String>,

    /// run each guest's VMM as a uid and gid of its own, from N up (N >= 1000; an unused range
    /// with no other owner), so VMMs cannot touch each other; overrides --vmm-user
    #[argh(option)]
    vmm_uid_base: Option<u32>,

    /// the user the engine runs as once it holds what needs root (default, when started as
    /// root: omerta where that user exists, else nobody); `self` keeps root (labs only: raw
    /// ICMP sockets, host ports below 1024)
    #[argh(option)]
    runas: Option<String>,

    /// serve no control socket (the engine then ends when its last VM does)
    #[argh(switch)]
    no_control: bool,

    /// log lines as text (default: RFC 3339 time, program, level, message) or json (one
    /// object a line: time, level, program, msg)
    #[argh(option, default = "String::from(\"text\")")]
    log_format: String,

    /// log warnings and errors only (overrides OMERTA_LOG)
    #[argh(switch, short = 'q')]
    quiet: bool,

    /// log debug lines too (overrides OMERTA_LOG)
    #[argh(switch, short = 'v')]
    verbose: bool,

    /// serve the metrics (the text of omertactl metrics) for Prometheus at http://ADDR:PORT/metrics
    /// (default: off); e.g. 127.0.0.1:9617
    #[argh(option)]
    metrics_listen: Option<String>,

    /// print the version and exit
    #[argh(switch)]
    version: bool,
}

/// The user the engine drops to: the one named, none for `self` (or when not started as
/// root); by default `omerta` where it exists, else `nobody` (as passt does).
fn runas_user(name: Option<&str>) -> Result<Option<hv::VmmUser>, String> {
    let root = engine::io::effective_ids().0 == 0;
    let user = match name {
        Some("self") => return Ok(None),
        Some(_) if !root => return Err("--runas needs the engine to start as root".into()),
        Some(n) => hv::VmmUser::lookup(n).ok_or_else(|| format!("--runas: no user named '{n}'"))?,
        None if !root => return Ok(None),
        None => {
            launcher::default_engine_user().ok_or("--runas: neither an omerta nor a nobody user exists; name one")?
        }
    };
    if user.uid == 0 {
        return Err(format!("--runas {}: that is root; use --runas self to keep root", user.name));
    }
    Ok(Some(user))
}

/// The user VMMs run as: the one named, none for `self`; by default, as root, `omerta-vmm`
/// where it exists, else `nobody` (as passt does); otherwise the engine's own user.
fn vmm_user(name: Option<&str>) -> Result<Option<hv::VmmUser>, String> {
    match name {
        Some("self") => Ok(None),
        Some(n) => hv::VmmUser::lookup(n).map(Some).ok_or_else(|| format!("--vmm-user: no user named '{n}'")),
        None if engine::io::effective_ids().0 == 0 => {
            Ok(hv::VmmUser::lookup("omerta-vmm").or_else(|| hv::VmmUser::lookup("nobody")))
        }
        None => Ok(None),
    }
}

/// The directory a path handle's socket goes in.
fn handle_dir(h: &engine::config::HandleSpec) -> Option<PathBuf> {
    match h {
        engine::config::HandleSpec::Dgram { path, .. } | engine::config::HandleSpec::Stream(path) => {
            path.parent().filter(|p| !p.as_os_str().is_empty()).map(std::path::Path::to_path_buf)
        }
        _ => None,
    }
}

/// Makes `dir` and its missing parents as the engine's own user, 0700 (an existing one is left
/// as it is): where a handle socket goes when no other user is to own it.
fn make_own_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Makes `dir` (and missing parents, root's) if it does not exist, the last one `user`'s, 0700:
/// made, then opened without following a symlink and checked to be the directory just made by
/// root before its owner and mode change through that descriptor (a link swapped in meanwhile
/// is refused, never followed).
fn make_dir_for(dir: &std::path::Path, user: &hv::VmmUser) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    if std::fs::symlink_metadata(dir).is_ok() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::create_dir(dir)?;
    let d = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW).open(dir)?;
    let m = d.metadata()?;
    if !m.is_dir() || m.uid() != 0 {
        return Err(std::io::Error::other("not the directory just made; left alone"));
    }
    d.set_permissions(std::fs::Permissions::from_mode(0o700))?;
    std::os::unix::fs::fchown(&d, Some(user.uid), Some(user.gid))
}

/// What `--check` verifies against this host beyond the syntax: each `cpu=` is one the engine
/// may run on, each `bind=` address is one of the host's (binding port 0 there and letting
/// go), each `--image-dir` exists.
fn check_on_host(vms: &[VmConfig], image_dirs: &[PathBuf]) -> Result<(), String> {
    let cpus = engine::io::allowed_cpus();
    for vm in vms {
        if let Some(c) = vm.cpu.filter(|c| !cpus.contains(c)) {
            return Err(format!("vm '{}': cpu={c} is not one this process may use ({cpus:?})", vm.name));
        }
        let probe = std::net::SocketAddrV4::new(*vm.bind.ip(), 0);
        if let Err(e) = std::net::UdpSocket::bind(probe) {
            return Err(format!("vm '{}': bind={}: {e}", vm.name, vm.bind.ip()));
        }
    }
    if let Some(d) = image_dirs.iter().find(|d| !d.is_dir()) {
        return Err(format!("--image-dir {}: not an existing directory", d.display()));
    }
    Ok(())
}

/// The VMs the configuration (the file and the `--vm` flags) describes, as last applied: what
/// SIGHUP compares the file with. VMs added through the control socket are not among them and
/// a reload never touches them.
struct Configured {
    path: Option<PathBuf>,
    flags: Vec<config::VmDesc>,
    vms: Vec<VmConfig>,
}

/// SIGHUP: reads the file again (the `--vm` flags still apply over it) and makes the
/// configured VMs what it says: new ones added, gone ones removed, changed allowlists set in
/// place, other changes applied by removing and adding the VM again. Only VMs this
/// configuration made and that still run as it made them are touched: one removed or replaced
/// through the control socket since is the control socket's. `Err((why, nothing_changed))`:
/// a file that does not read, parse or validate, or a change that cannot be applied, changes
/// nothing (`true`); a failure while applying says what was done and what failed (`false`).
fn reload(registry: &mut Registry, c: &mut Configured) -> Result<String, (String, bool)> {
    use api::Request;
    let refuse = |why: String| (why, true);
    let path = c.path.clone().ok_or_else(|| refuse("no --config file to reload".into()))?;
    let text = std::fs::read_to_string(&path).map_err(|e| refuse(format!("{}: {e}", path.display())))?;
    let file = config::parse_file(&text).map_err(|e| refuse(format!("{}: {e}", path.display())))?;
    let new = config::merge(&file.vms, &c.flags).map_err(|e| refuse(format!("{}: {e}", path.display())))?;
    // Ours: the configured VMs that still run with the configuration we gave them.
    let mut ours: Vec<VmConfig> = c.vms.iter().filter(|o| registry.config_of(&o.name) == Some(*o)).cloned().collect();
    let old_of = |ours: &[VmConfig], name: &str| ours.iter().find(|o| o.name == name).cloned();
    // Everything that cannot be applied is refused before anything changes.
    for vm in &new {
        match old_of(&ours, &vm.name) {
            None if registry.config_of(&vm.name).is_some() => {
                return Err(refuse(format!("vm '{}' exists already (not from the configuration)", vm.name)))
            }
            None if is_fd(&vm.handle) => {
                return Err(refuse(format!(
                    "vm '{}': an inherited fd handle exists only at start; a reload cannot add one",
                    vm.name
                )))
            }
            Some(o) if !same_but_consumers(&o, vm) && (is_fd(&o.handle) || is_fd(&vm.handle)) => {
                return Err(refuse(format!(
                    "vm '{}': has an inherited fd handle, so a reload cannot restart it",
                    vm.name
                )))
            }
            _ => {}
        }
    }
    let (mut added, mut removed, mut lists, mut restarted, mut failed) = (0, 0, 0, 0, Vec::new());
    let gone: Vec<String> =
        ours.iter().filter(|o| !new.iter().any(|v| v.name == o.name)).map(|o| o.name.clone()).collect();
    for name in gone {
        if registry.handle(Request::VmRemove(name.clone())).is_ok() {
            removed += 1;
        }
        ours.retain(|x| x.name != name);
    }
    for vm in &new {
        match old_of(&ours, &vm.name) {
            Some(o) if o == *vm => {}
            Some(o) if same_but_consumers(&o, vm) => {
                match registry.handle(Request::AllowSet(vm.name.clone(), vm.consumers.clone())) {
                    Ok(_) => {
                        lists += 1;
                        ours.retain(|x| x.name != vm.name);
                        ours.push(vm.clone());
                    }
                    Err(e) => failed.push(format!("vm '{}': {}", vm.name, e.message)),
                }
            }
            existing => {
                if existing.is_some() {
                    let _ = registry.handle(Request::VmRemove(vm.name.clone()));
                    ours.retain(|x| x.name != vm.name);
                }
                // A failure here shows as the add's own (its socket cannot be bound).
                if let Some(dir) = handle_dir(&vm.handle) {
                    let _ = make_own_dir(&dir);
                }
                match registry.add(vm.clone()) {
                    Ok(()) => {
                        if existing.is_some() {
                            restarted += 1;
                        } else {
                            added += 1;
                        }
                        ours.push(vm.clone());
                    }
                    Err(e) => failed.push(e.message),
                }
            }
        }
    }
    // What runs now as the configuration made it: the base of the next reload.
    c.vms = ours;
    let done = format!("{added} added, {removed} removed, {lists} allowlist(s) set, {restarted} restarted");
    if failed.is_empty() {
        Ok(done)
    } else {
        Err((format!("{done}; failed: {}", failed.join("; ")), false))
    }
}

fn is_fd(h: &engine::config::HandleSpec) -> bool {
    matches!(h, engine::config::HandleSpec::DgramFd(_) | engine::config::HandleSpec::StreamFd(_))
}

/// True when `a` and `b` differ at most in their consumers.
fn same_but_consumers(a: &VmConfig, b: &VmConfig) -> bool {
    let mut a = a.clone();
    a.consumers.clone_from(&b.consumers);
    a == *b
}

/// Once without privilege, the engine's socket buffers are capped by the host's maxima: said
/// once at start when they are below what it asks for (host-to-VM bursts are then dropped).
fn warn_small_socket_buffers() {
    const WANT: u64 = 4 << 20;
    for key in ["rmem_max", "wmem_max"] {
        let path = format!("/proc/sys/net/core/{key}");
        let Some(v) = std::fs::read_to_string(&path).ok().and_then(|t| t.trim().parse::<u64>().ok()) else { continue };
        if v < WANT {
            warn!(
                "net.core.{key} is {v} bytes, below the {WANT} each VM's sockets ask for: bursts beyond it are dropped (install packaging/sysctl.d/90-omerta.conf, or sysctl -w net.core.{key}={WANT})"
            );
        }
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("omerta-engine: {msg}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Args = control::cli::parse();
    if args.version {
        println!("omerta-engine {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let level = match (args.quiet, args.verbose) {
        (true, true) => return usage("-q and -v contradict each other"),
        (true, false) => Some(engine::log::Level::Warn),
        (false, true) => Some(engine::log::Level::Debug),
        (false, false) => None,
    };
    let format = match args.log_format.parse() {
        Ok(f) => f,
        Err(e) => return usage(&format!("--log-format: {e}")),
    };
    if let Err(e) = engine::log::init(level, format) {
        return usage(&e);
    }
    // systemd's notify socket, connected while the engine may still reach it (before any
    // thread, since it unsets the variable).
    let notify = match control::notify::Notifier::from_env() {
        Ok(n) => n,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(1);
        }
    };
    // Before any thread: nothing the engine runs may gain privileges, and no child may ever
    // hold a capability none of them needs.
    match engine::io::harden_process() {
        Ok(n) => engine::debug!("no-new-privs set; {n} capabilities dropped from the bounding set"),
        Err(e) => warn!("{}", engine::io::describe("setting no-new-privs", &e)),
    }
    let file = match &args.config {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => match config::parse_file(&text) {
                Ok(f) => f,
                Err(e) => return usage(&format!("{}: {e}", path.display())),
            },
            Err(e) => return usage(&format!("{}: {e}", path.display())),
        },
        None => config::FileConfig::default(),
    };
    let flags = match args
        .vm
        .iter()
        .map(|s| config::VmDesc::from_pairs(&config::split_spec(s)?))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(f) => f,
        Err(e) => return usage(&e.to_string()),
    };
    let mut configured = Configured { path: args.config.clone(), flags: flags.clone(), vms: Vec::new() };
    let vms: Vec<VmConfig> = match config::merge(&file.vms, &flags) {
        Ok(v) if v.is_empty() && args.no_control => {
            return usage(
                "no VM to serve and no control socket: give --vm or a --config with [[vm]] tables (see --help)",
            )
        }
        Ok(v) => v,
        Err(e) => return usage(&e.to_string()),
    };
    // The flag wins, then OMERTA_BACKEND, then the file.
    let backend = match args.backend.as_deref().map(str::parse::<Backend>) {
        Some(Ok(b)) => b,
        Some(Err(e)) => return usage(&format!("--backend: {e}")),
        None => match Backend::from_env() {
            Ok(Some(b)) => b,
            Ok(None) => match file.backend.as_deref().map(str::parse::<Backend>) {
                Some(Ok(b)) => b,
                Some(Err(e)) => return usage(&format!("config file: backend: {e}")),
                None => Backend::Auto,
            },
            Err(e) => return usage(&e.to_string()),
        },
    };
    if args.check {
        // What would fail at start on this host is refused here too, in one line.
        if let Err(e) = check_on_host(&vms, &args.image_dir) {
            return usage(&e);
        }
        println!("backend {}", backend.name());
        for vm in &vms {
            println!(
                "vm {}: handle {}, {} at {}/{} via {}, mtu {}, mode {}, consumers {}, bind {}, cpu {}",
                vm.name,
                vm.handle,
                vm.identity.mac,
                vm.identity.ip,
                vm.identity.prefix_len,
                vm.identity.gateway_ip,
                vm.identity.mtu,
                vm.mode.name(),
                vm.consumers.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "),
                vm.bind,
                vm.cpu.map_or_else(|| "any".to_string(), |c| c.to_string()),
            );
            if let Some(dir) = handle_dir(&vm.handle).filter(|d| !d.exists()) {
                println!("vm {}: {} does not exist yet; the engine makes it at start", vm.name, dir.display());
            }
        }
        return ExitCode::SUCCESS;
    }
    let runas = match runas_user(args.runas.as_deref()) {
        Ok(u) => u,
        Err(e) => return usage(&e),
    };
    let (started_as, _) = engine::io::effective_ids();
    let mut registry = Registry::new(backend);
    let vmm = match vmm_user(args.vmm_user.as_deref()) {
        Ok(u) => {
            if let Some(u) = &u {
                info!("guests' VMMs run as {} (uid {}, gid {})", u.name, u.uid, u.gid);
            }
            u
        }
        Err(e) => return usage(&e),
    };
    // As root, VMMs never run as root: `self` is the engine's own user after the drop.
    let vmm = match (vmm, args.vmm_user.as_deref(), &runas) {
        (_, Some("self"), Some(u)) => Some(u.clone()),
        (None, _, _) if started_as == 0 && args.vmm_uid_base.is_none() => {
            return usage(
                "guests' VMMs would run as root: name their user with --vmm-user (or create omerta-vmm), or use --vmm-uid-base",
            )
        }
        (Some(u), _, _) if u.uid == 0 || u.gid == 0 => return usage(&format!("--vmm-user {}: VMMs never run as root", u.name)),
        (v, _, _) => v,
    };
    if let (Some(v), Some(r)) = (&vmm, &runas) {
        if v.uid == r.uid && args.vmm_uid_base.is_none() {
            warn!(
                "the engine and guests' VMMs share uid {} ({}): a VMM taken over could replace handle sockets; create the omerta-vmm user or use --vmm-uid-base",
                v.uid, v.name
            );
        }
    }
    registry.set_vmm_user(vmm.clone());
    match args.vmm_uid_base {
        Some(n) if !(1000..=u32::MAX - launcher::VMM_UID_RANGE).contains(&n) => {
            return usage("--vmm-uid-base: a uid from 1000 up, below 2^32 - 65536")
        }
        Some(_) if started_as != 0 => return usage("--vmm-uid-base needs the engine to run as root"),
        Some(n) => {
            info!("each guest's VMM runs as a uid of its own from {n} up");
            registry.set_vmm_uid_base(Some(n));
        }
        None => {}
    }
    if let Err(e) = registry.set_image_dirs(&args.image_dir) {
        return usage(&e);
    }
    let control = (!args.no_control).then(|| args.control.clone().unwrap_or_else(api::default_socket_path));
    let state_dir = control.as_ref().and_then(|p| p.parent()).map(std::path::Path::to_path_buf);

    // The launcher, forked while this is the only thread: what still needs privilege once the
    // engine has dropped it (VMMs, direct mode's namespaces) goes through it.
    let launcher = match &state_dir {
        Some(dir) => {
            let setup = launcher::Setup {
                state_dir: dir.clone(),
                vmm_user: vmm,
                vmm_uid_base: args.vmm_uid_base,
                control: control.clone(),
            };
            match launcher::spawn(setup) {
                Ok(l) => Some(l),
                Err(e) => {
                    error!("{e}");
                    return ExitCode::from(1);
                }
            }
        }
        None => None,
    };
    // Before anything else, so a SIGTERM arriving while VMs start is a clean stop, not the
    // default death.
    let signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ]) {
        Ok(s) => s,
        Err(e) => {
            error!("{}", engine::io::describe("installing signal handlers", &e));
            return ExitCode::from(1);
        }
    };
    // Each VM holds a few descriptors and each control client one: the hard limit, not the
    // soft default of 1024, is the engine's budget.
    if let Err(e) = engine::io::raise_open_files_limit() {
        warn!("{}", engine::io::describe("raising the open-files limit", &e));
    }
    // The control socket is bound while the engine may still create it where root may; the
    // launcher removes it at the end.
    let listener = match (&control, &launcher) {
        (Some(path), Some(l)) => match server::bind(path, args.control_gid) {
            Ok(listener) => {
                info!("control socket at {}", path.display());
                if let Err(e) = l.own() {
                    warn!("launcher: {e}: the control socket stays behind at the end");
                }
                Some((listener, path.clone()))
            }
            Err(e) => {
                error!("control socket: {e}");
                return ExitCode::from(1);
            }
        },
        _ => None,
    };

    // The metrics endpoint, bound while a low port is still possible; served once the
    // control thread runs (its thread inherits the control thread's filter).
    let metrics_listener = match args.metrics_listen.as_deref().map(control::metrics_http::bind) {
        Some(Ok(l)) => {
            info!("metrics at http://{}/metrics", l.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()));
            Some(l)
        }
        Some(Err(e)) => {
            error!("{e}");
            return ExitCode::from(1);
        }
        None => None,
    };
    // From here on the engine holds no privilege: it runs as its own user, with no
    // capability, and the control thread (with every thread it starts) under its filter.
    if runas.is_none() {
        // The engine keeps its user: a handle socket's missing directory is made now, 0700.
        for dir in vms.iter().filter_map(|v| handle_dir(&v.handle)) {
            if let Err(e) = make_own_dir(&dir) {
                error!("{}: {e}", dir.display());
                return ExitCode::from(1);
            }
        }
    }
    if let Some(u) = &runas {
        // Its user makes the configured VMs' handle sockets: a directory of theirs that does
        // not exist yet is made for that user (one that exists is left as it is).
        for dir in vms.iter().filter_map(|v| handle_dir(&v.handle)) {
            if let Err(e) = make_dir_for(&dir, u) {
                error!("{}: {e}", dir.display());
                return ExitCode::from(1);
            }
        }
        // Ping sockets for the engine's group, where the namespace has them off (only root may
        // turn them on); raw ICMP sockets need a capability the engine no longer holds.
        if engine::io::allow_ping_sockets(u.gid) {
            info!("ping sockets allowed for group {} in this network namespace", u.gid);
        }
        if let Err(e) = engine::io::drop_privileges(u.uid, u.gid) {
            error!("{}", engine::io::describe(&format!("dropping privileges to {}", u.name), &e));
            return ExitCode::from(1);
        }
        info!("running as {} (uid {}, gid {}): no capabilities, no supplementary groups", u.name, u.uid, u.gid);
        warn_small_socket_buffers();
    } else if started_as == 0 {
        warn!("running as root (--runas self): the data plane keeps root's identity (labs only)");
    }
    // Kept only by an engine that kept root: what raw ICMP sockets and low ports take.
    let keep = if runas.is_none() { 1 << 13 | 1 << 10 } else { 0 };
    match engine::io::confine_control_thread(keep) {
        Ok(()) => engine::debug!("control thread confined"),
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => engine::debug!("{e}"),
        Err(e) => {
            error!("{}", engine::io::describe("confining the control thread", &e));
            return ExitCode::from(1);
        }
    }
    if let Some(l) = &launcher {
        registry.set_launcher(std::sync::Arc::clone(l));
    }
    configured.vms.clone_from(&vms);
    for vm in vms {
        let (name, handle, mode, n) = (vm.name.clone(), vm.handle.to_string(), vm.mode.name(), vm.consumers.len());
        if let Err(e) = registry.add(vm) {
            error!("{}", e.message);
            registry.stop_all();
            return ExitCode::from(1);
        }
        info!("vm {name}: serving {handle} in {mode} mode, {n} consumer(s)");
    }
    let (jobs_tx, jobs) = crossbeam_channel::bounded::<server::Job>(64);
    if let Some(dir) = &state_dir {
        registry.set_state_dir(dir.clone());
    }
    let metrics = match metrics_listener.map(|l| {
        let me = server::Peer { uid: started_as, gid: 0 };
        control::metrics_http::MetricsServer::start(l, jobs_tx.clone(), me)
    }) {
        Some(Ok(m)) => Some(m),
        Some(Err(e)) => {
            error!("{e}");
            registry.stop_all();
            return ExitCode::from(1);
        }
        None => None,
    };
    let server = listener.map(|(l, path)| {
        server::Server::start(l, path, jobs_tx, server::Policy { uid: started_as, gid: args.control_gid })
    });
    let (sig_tx, sig_rx) = crossbeam_channel::bounded(4);
    let sig_handle = signals.handle();
    std::thread::spawn(move || {
        let mut signals = signals;
        for sig in signals.forever() {
            // SIGHUPs arriving faster than reloads are one reload.
            if sig_tx.try_send(sig).is_err() && sig != signal_hook::consts::SIGHUP {
                let _ = sig_tx.send(sig);
            }
        }
    });

    // The control thread: requests, worker events, signals, periodic counters.
    let interval = (args.stats_interval > 0).then(|| Duration::from_secs(args.stats_interval));
    let mut next_stats = interval.map(|i| Instant::now() + i);
    let mut host_check = Instant::now();
    let events = registry.events().clone();
    let mut failed = false;
    // Ready (for systemd) once the control socket is up (it is) and every configured VM's
    // worker runs or has failed to: not when guests have booted.
    let mut pending: std::collections::HashSet<String> = configured.vms.iter().map(|v| v.name.clone()).collect();
    let mut ready_sent = false;
    loop {
        if !ready_sent && pending.is_empty() {
            let n = registry.running().len();
            notify.send(&format!("READY=1\nSTATUS=serving {n} VM(s)"));
            ready_sent = true;
        }
        crossbeam_channel::select! {
            recv(jobs) -> job => {
                if let Ok((req, peer, answer)) = job {
                    let _ = answer.send(registry.handle_for(req, (peer.uid, peer.gid)));
                }
            }
            recv(events) -> ev => {
                if let Ok(ev) = ev {
                    failed |= matches!(ev.kind, engine::worker::EventKind::Failed(_));
                    if matches!(ev.kind, engine::worker::EventKind::Started(_) | engine::worker::EventKind::Failed(_)) {
                        pending.remove(&*ev.vm);
                    }
                    match &ev.kind {
                        engine::worker::EventKind::Started(b) => info!("vm {}: running, {b} backend", ev.vm),
                        engine::worker::EventKind::HandleClosed(why) => info!("vm {}: handle closed ({why})", ev.vm),
                        _ => {}
                    }
                    let name = ev.vm.to_string();
                    let was_running = registry.running().contains(&name);
                    registry.on_event(ev);
                    if was_running && !registry.running().contains(&name) {
                        for line in registry.summaries(Some(&name)) {
                            info!("{line}");
                        }
                    }
                }
            }
            recv(sig_rx) -> sig => {
                if sig == Ok(signal_hook::consts::SIGHUP) {
                    notify.send("RELOADING=1");
                    match reload(&mut registry, &mut configured) {
                        Ok(done) => info!("SIGHUP: configuration reloaded: {done}"),
                        Err((e, true)) => warn!("SIGHUP: {e}; the running configuration is kept"),
                        Err((e, false)) => warn!("SIGHUP: configuration partly reloaded: {e}"),
                    }
                    notify.send(&format!("READY=1\nSTATUS=serving {} VM(s)", registry.running().len()));
                    continue;
                }
                notify.send("STOPPING=1");
                info!("signal {}: stopping {} VM(s)", sig.unwrap_or(0), registry.running().len());
                break;
            }
            default(Duration::from_millis(500)) => {}
        }
        registry.tick();
        // The host's addresses change (DHCP, a new interface): no allowlist may name one.
        if host_check.elapsed() >= Duration::from_secs(2) {
            registry.check_host_addresses();
            host_check = Instant::now();
        }
        if server.is_none() && registry.running().is_empty() {
            break;
        }
        if let (Some(at), Some(every)) = (next_stats, interval) {
            if Instant::now() >= at {
                for line in registry.summaries(None) {
                    info!("{line}");
                }
                next_stats = Some(at + every);
            }
        }
    }
    let running = registry.running();
    registry.stop_all();
    for name in running {
        for line in registry.summaries(Some(&name)) {
            info!("{line}");
        }
    }
    drop(metrics);
    if let Some(s) = server {
        s.shutdown();
    }
    // The launcher ends its VMMs and namespaces and removes the control socket, then answers.
    if let Some(l) = &launcher {
        if let Err(e) = l.finish() {
            warn!("launcher: {e}");
        }
    }
    sig_handle.close();
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
