//! `omerta-engine`: runs the data plane for one or more VMs.
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use argh::FromArgs;
use crossbeam_channel::RecvTimeoutError;
use engine::config::{self, VmConfig};
use engine::worker::{self, Backend, EventKind, Snapshot, VmWorker};
use engine::{error, info};

#[derive(FromArgs)]
/// The Omerta data plane: each VM's NIC is a unix socket whose other end is this engine, which
/// forwards UDP and ICMP echo to the VM's allowed consumer endpoints and nothing else.
#[argh(
    example = "Serve one VM on an inherited socketpair end, allowing one WireGuard consumer:\n  {command_name} --vm name=vm0,handle=fd:3,consumer=203.0.113.7:51820",
    example = "Two VMs, one in conntrack mode pinned to CPU 1, one on a QEMU dgram socket path:\n  {command_name} --vm name=a,handle=fd:3,consumer=203.0.113.7:51820,mode=conntrack,cpu=1 \\\n     --vm name=b,handle=dgram:/run/omerta/b.sock,consumer=203.0.113.7:51821",
    example = "From a config file, overriding one VM's MTU:\n  {command_name} --config /etc/omerta/engine.toml --vm name=vm0,mtu=1400",
    note = "A VM description is comma-separated key=value pairs (the same keys as [[vm]] tables of\nthe config file, where repeated keys are arrays):\n  name=NAME            unique VM name (required)\n  handle=H             the VM's NIC: dgram:PATH (engine binds PATH; QEMU -netdev dgram with unix\n                       paths), fd:N (inherited unix datagram socketpair end), stream:PATH (engine\n                       listens; QEMU -netdev stream), stream-fd:N (required)\n  peer=PATH            with dgram:PATH, the VMM's socket path (default: learnt from its frames)\n  consumer=IP:PORT     an allowed endpoint; repeat, or join with '+' (at least one)\n  mode=M               filtered (default: every packet checked, violations dropped), conntrack\n                       (first packet of a flow checked; a violation terminates the VM), sampled\n  sample-rate=R        sampled mode: share of packets checked, in (0, 1] (default 0.01)\n  seed=N               sampled mode: generator seed (default random)\n  flows=N              conntrack mode: flow-table size (default 1024)\n  cpu=N                pin the VM's thread to CPU N (default: not pinned)\n  mac=MAC              the VM's MAC (default 52:54:00:12:34:56)\n  ip=IP/PREFIX         the VM's address (default 10.0.2.15/24)\n  gateway=IP           the gateway the engine answers ARP for (default 10.0.2.2)\n  gateway-mac=MAC      the gateway's MAC (default 52:55:0a:00:02:02)\n  mtu=N                576..=9000 (default 1500)\n  bind=IP[:PORT]       local address of the VM's host UDP socket (default 0.0.0.0:0)\n  allow-special=yes    accept loopback/link-local consumers (labs and tests only)\nEnvironment: OMERTA_BACKEND=auto|uring|portable forces the I/O backend; OMERTA_LOG=debug|info|\nwarn|error sets the log level; OMERTA_GSO=0 turns UDP GSO off.\nExit status: 0 after a clean stop, 1 when a VM cannot start or fails, 2 for bad usage."
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
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("omerta-engine: {msg}");
    ExitCode::from(2)
}

fn summary(name: &str, s: &Snapshot) -> String {
    let c = &s.counters;
    let drops: Vec<String> = c.nonzero_drops().map(|(r, n)| format!("{r}={n}")).collect();
    format!(
        "vm {name}: from-vm {} frames, forwarded udp {} ({} bytes) icmp {}, arp replies {}, to-vm {} frames, \
         drops {}{}{}, send errors host {} vm {}, waits {}",
        c.vm_frames,
        c.forwarded_udp,
        c.forwarded_udp_bytes,
        c.forwarded_icmp,
        c.arp_replies,
        c.to_vm_frames,
        c.dropped(),
        if drops.is_empty() { String::new() } else { format!(" ({})", drops.join(" ")) },
        s.terminated.map_or(String::new(), |r| format!(", TERMINATED ({r})")),
        c.host_send_errors,
        c.vm_send_errors,
        c.backpressure_waits,
    )
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
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
    let flags = match args.vm.iter().map(|s| config::split_spec(s)).collect::<Result<Vec<_>, _>>() {
        Ok(f) => f,
        Err(e) => return usage(&e.to_string()),
    };
    let vms: Vec<VmConfig> = match config::merge(&file.vms, &flags) {
        Ok(v) if v.is_empty() => {
            return usage("no VM to serve: give --vm or a --config with [[vm]] tables (see --help)")
        }
        Ok(v) => v,
        Err(e) => return usage(&e.to_string()),
    };
    let backend = match Backend::from_env() {
        Ok(Some(b)) => b,
        Ok(None) => match args.backend.as_deref().or(file.backend.as_deref()).map(str::parse::<Backend>) {
            Some(Ok(b)) => b,
            Some(Err(e)) => return usage(&e),
            None => Backend::Auto,
        },
        Err(e) => return usage(&e),
    };
    if args.check {
        for vm in &vms {
            println!(
                "vm {}: handle {}, {} at {}/{} via {}, mode {}, consumers {}",
                vm.name,
                vm.handle,
                vm.identity.mac,
                vm.identity.ip,
                vm.identity.prefix_len,
                vm.identity.gateway_ip,
                vm.mode.name(),
                vm.consumers.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ")
            );
        }
        return ExitCode::SUCCESS;
    }

    let (events_tx, events) = crossbeam_channel::unbounded();
    let mut workers: Vec<VmWorker> = Vec::new();
    for vm in &vms {
        match worker::spawn(vm, backend, events_tx.clone()) {
            Ok(w) => {
                info!(
                    "vm {}: serving {} in {} mode, {} consumer(s), {} KiB preallocated",
                    vm.name,
                    vm.handle,
                    vm.mode.name(),
                    vm.consumers.len(),
                    w.footprint / 1024
                );
                workers.push(w);
            }
            Err(e) => {
                error!("{e}");
                for w in workers {
                    w.stop();
                }
                return ExitCode::from(1);
            }
        }
    }
    let signals = match signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
    {
        Ok(s) => s,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    let (sig_tx, sig_rx) = crossbeam_channel::bounded(1);
    let sig_handle = signals.handle();
    std::thread::spawn(move || {
        let mut signals = signals;
        if let Some(sig) = signals.forever().next() {
            let _ = sig_tx.send(sig);
        }
    });

    let mut failed = false;
    let interval = (args.stats_interval > 0).then(|| Duration::from_secs(args.stats_interval));
    let mut next_stats = interval.map(|i| Instant::now() + i);
    while !workers.is_empty() {
        if let Ok(sig) = sig_rx.try_recv() {
            info!("signal {sig}: stopping {} VM(s)", workers.len());
            break;
        }
        match events.recv_timeout(Duration::from_millis(100)) {
            Ok(ev) => {
                let idx = workers.iter().position(|w| **w.name() == *ev.vm);
                match ev.kind {
                    EventKind::Started(backend) => info!("vm {}: running, {backend} backend", ev.vm),
                    EventKind::Terminated(reason) => {
                        // The control plane stops the VM itself; here the VM's network ends.
                        error!("vm {}: terminated for a policy violation ({reason}); stopping its network", ev.vm);
                        if let Some(i) = idx {
                            let w = workers.swap_remove(i);
                            info!("{}", summary(&ev.vm, &w.stop()));
                        }
                    }
                    EventKind::HandleClosed(_) | EventKind::Stopped | EventKind::Failed(_) => {
                        failed |= matches!(ev.kind, EventKind::Failed(_));
                        if let Some(i) = idx {
                            let w = workers.swap_remove(i);
                            info!("{}", summary(&ev.vm, &w.stop()));
                        }
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if let (Some(at), Some(every)) = (next_stats, interval) {
            if Instant::now() >= at {
                for w in &workers {
                    info!("{}", summary(w.name(), &w.snapshot()));
                }
                next_stats = Some(at + every);
            }
        }
    }
    for w in workers {
        let name: Arc<str> = w.name().clone();
        info!("{}", summary(&name, &w.stop()));
    }
    sig_handle.close();
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
