//! `omerta-engine`: runs the data plane for one or more VMs. This file is the command line;
//! what runs is `control::daemon` (its startup phases, in the order the types allow, then the
//! control loop).
use std::path::PathBuf;
use std::process::ExitCode;

use argh::FromArgs;
use control::daemon::{self, startup, usage};

#[derive(FromArgs)]
/// The Omerta data plane: each VM's NIC is a unix socket whose other end is this engine, which
/// forwards UDP and ICMP echo to the VM's allowed consumer endpoints and nothing else.
#[argh(
    example = "Serve one VM on an inherited socketpair end, allowing one WireGuard consumer:\n  {command_name} --vm name=vm0,handle=fd:3,consumer=203.0.113.7:51820",
    example = "Two VMs, one in conntrack mode pinned to CPU 1, one on a QEMU dgram socket path:\n  {command_name} --vm name=a,handle=fd:3,consumer=203.0.113.7:51820,mode=conntrack,cpu=1 \\\n     --vm name=b,handle=dgram:/run/omerta/vms/b.sock,consumer=203.0.113.7:51821",
    example = "From a config file, overriding one VM's MTU:\n  {command_name} --config /etc/omerta/engine.toml --vm name=vm0,mtu=1400",
    note = "A VM description is comma-separated key=value pairs (the same keys as [[vm]] tables of\nthe config file, where repeated keys are arrays):\n  name=NAME            unique VM name (required)\n  handle=H             the VM's NIC: dgram:PATH (engine binds PATH; QEMU -netdev dgram with unix\n                       paths), fd:N (inherited unix datagram socketpair end), stream:PATH (engine\n                       listens; QEMU -netdev stream), stream-fd:N (required)\n  peer=PATH            with dgram:PATH, the VMM's socket path: only its frames are accepted\n                       (default: the first sender's; the handle is then connected to it)\n  peer-uid=N           with stream:PATH, the only uid whose connection is accepted\n  consumer=IP:PORT     an allowed endpoint; repeat, or join with '+' (at least one)\n  mode=M               filtered (default: every packet checked, violations dropped), conntrack\n                       (first packet of a flow checked; a violation terminates the VM), sampled\n  sample-rate=R        sampled mode: share of packets checked, in (0, 1] (default 0.01)\n  seed=N               sampled mode: generator seed, tests and labs only (needs allow-special=yes)\n  flows=N              conntrack mode: flow-table size (default 1024)\n  cpu=N                pin the VM's thread to CPU N (default: not pinned)\n  mac=MAC              the VM's MAC (default 52:54:00:12:34:56)\n  ip=IP/PREFIX         the VM's address (default 10.0.2.15/24)\n  gateway=IP           the gateway the engine answers ARP for (default 10.0.2.2)\n  gateway-mac=MAC      the gateway's MAC (default 52:55:0a:00:02:02)\n  mtu=N                576..=9000 (default 1500)\n  bind=IP[:PORT]       local address of the VM's host UDP socket (default 0.0.0.0:0)\n  allow-special=yes    accept loopback/link-local consumers (labs and tests only)\n  allow-private=yes    accept private consumers (RFC 1918, CGNAT) for LAN deployments\n  busy-poll=yes        the VM's thread never sleeps: lower latency, one core always busy\n  spin-us=N            after traffic the VM's thread polls N µs before it sleeps, 0..=1000\n                       (adaptive polling; default 50, 0: off)\n  dhcp=no              the engine answers no DHCP (default: it gives the VM its address,\n                       prefix, gateway and MTU)\n  dhcp-lease=S         seconds of those leases, 60..=604800 (default 3600)\n  alias=PORT           the consumer's alias: what the VM sends to the gateway's address on PORT\n                       goes to its one consumer, whose datagrams it gets from there (default: none)\nEnvironment: OMERTA_BACKEND=auto|uring|portable sets the I/O backend where --backend is not given;\nOMERTA_LOG=debug|info|warn|error sets the log level (-q and -v override it; other values are\nrefused); OMERTA_GSO=0 turns UDP GSO off; OMERTA_ICMP=raw uses a raw ICMP\nsocket even where ping sockets are permitted.\nControl: omertactl talks to the engine over its control socket (docs/control-protocol.md); VMs\ncan be added there too, so the engine may start with none.\nExit status: 0 after a clean stop, 1 when a VM cannot start or fails, 2 for bad usage."
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

    /// the kernel fence: on (default), nftables in the engine's network namespace drops
    /// everything the engine's user sends but UDP and ICMP echo to its VMs' allowlisted
    /// endpoints (needs root, nft and a dedicated --runas user); off runs without it
    #[argh(option, default = "String::from(\"on\")")]
    kernel_fence: String,

    /// where guests' disks, seeds and consoles are kept, in its launcher/ (root's, 0700); it
    /// and every directory above it must be writable by root alone (default, as root:
    /// /var/lib/omerta; else the control socket's directory)
    #[argh(option)]
    state_dir: Option<PathBuf>,

    /// how far the disks granted may pass the state directory's room: a ratio from 1 (the
    /// default: a disk is granted only if every disk granted can be filled) to 100
    #[argh(option)]
    disk_overcommit: Option<String>,

    /// connect to the launcher serving at this socket (omerta-engine --serve-launcher) instead
    /// of forking one: guests then outlive this engine, and the next engine takes them over
    /// from their records in the state directory's engine/
    #[argh(option)]
    launcher: Option<PathBuf>,

    /// run only the launcher, serving engines (--launcher) at this socket, one at a time: its
    /// VMMs outlive them; SIGTERM ends every VMM (read from the same options as the engine)
    #[argh(option)]
    serve_launcher: Option<PathBuf>,

    /// print the version and exit
    #[argh(switch)]
    version: bool,
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
    // Phase 0, before anything else and while this is the only thread: systemd's notify
    // socket connected, the process hardened.
    let initial = match startup::Initial::begin() {
        Ok(i) => i,
        Err(e) => return e.report(),
    };
    let (configured, vms, backend) =
        match daemon::configuration(args.config.as_ref(), &args.vm, args.backend.as_deref(), args.no_control) {
            Ok(c) => c,
            Err(e) => return e.report(),
        };
    if args.check {
        return daemon::check(&vms, &args.image_dir, backend);
    }
    let kernel_fence = match args.kernel_fence.as_str() {
        "on" => true,
        "off" => false,
        other => return usage(&format!("--kernel-fence: on or off, not '{other}'")),
    };
    let opts = daemon::Options {
        kernel_fence,
        runas: args.runas,
        vmm_user: args.vmm_user,
        vmm_uid_base: args.vmm_uid_base,
        image_dirs: args.image_dir,
        control: (!args.no_control).then(|| args.control.unwrap_or_else(api::default_socket_path)),
        control_gid: args.control_gid,
        metrics_listen: args.metrics_listen,
        stats_interval: args.stats_interval,
        state_dir: args.state_dir,
        disk_overcommit: args.disk_overcommit,
        launcher: args.launcher,
    };
    if let Some(path) = &args.serve_launcher {
        if opts.launcher.is_some() {
            return usage("--serve-launcher and --launcher: a process is the launcher or an engine, not both");
        }
        return daemon::serve_launcher(initial, &opts, path);
    }
    // The phases (fork the launcher, bind, drop privileges, confine), then the control loop.
    daemon::run(initial, &opts, configured, vms, backend)
}
