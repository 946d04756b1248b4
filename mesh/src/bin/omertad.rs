//! `omertad`: the mesh daemon (provider and consumer). See docs/mesh.md.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use argh::FromArgs;

/// Omerta's mesh daemon: rents VMs out to members of an Omerta network, and rents from them
/// (--version prints the version).
#[derive(FromArgs, Debug)]
struct Args {
    #[argh(subcommand)]
    cmd: Cmd,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum Cmd {
    Start(Start),
    Stop(Stop),
}

/// Stop the network's running daemon. The VMs it provides keep running, and the next start
/// adopts them; --release ends them instead, telling each consumer.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "stop")]
struct Stop {
    /// the network's ID; optional when only one network is stored
    #[argh(option)]
    network: Option<String>,
    /// end every rental this daemon provides (each consumer is told) and every VM it rents
    #[argh(switch)]
    release: bool,
}

/// Start the daemon for one network (it runs until SIGTERM, ^C or omertad stop; the VMs it
/// provides keep running for the next start, see stop --release).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "start")]
struct Start {
    /// the network's ID (omerta network list); optional when only one network is stored
    #[argh(option)]
    network: Option<String>,
    /// UDP port for the mesh (default 9999)
    #[argh(option, default = "9999")]
    port: u16,
    /// address to bind (default 0.0.0.0)
    #[argh(option, default = "std::net::Ipv4Addr::UNSPECIFIED")]
    bind: std::net::Ipv4Addr,
    /// make no VM and no tunnel: the whole message flow, no root needed
    #[argh(switch)]
    dry_run: bool,
    /// rent nothing out (consumer only)
    #[argh(switch)]
    no_provider: bool,
    /// the engine's control socket (default: omertactl's, /run/omerta/engine.sock as root)
    #[argh(option)]
    engine_socket: Option<PathBuf>,
    /// the image directory offered, in the engine's --image-dir (default cloud-image)
    #[argh(option, default = "String::from(\"cloud-image\")")]
    image: String,
    /// a peer that may rent (repeatable; default: every member of the network)
    #[argh(option)]
    allow_peer: Vec<String>,
    /// VMs at once (default 4)
    #[argh(option, default = "4")]
    max_vms: usize,
    /// vCPUs per VM (default 4)
    #[argh(option, default = "4")]
    max_cpus: u32,
    /// memory per VM in MB (default 8192)
    #[argh(option, default = "8192")]
    max_memory: u32,
    /// disk per VM in MB (default 65536)
    #[argh(option, default = "65536")]
    max_disk: u32,
    /// seconds between heartbeats to consumers (default 60)
    #[argh(option, default = "60")]
    heartbeat_interval: u64,
    /// seconds without a heartbeat answer before a VM is reclaimed (default 600)
    #[argh(option, default = "600")]
    heartbeat_timeout: u64,
    /// seconds between keepalives to peers (default 15)
    #[argh(option, default = "15")]
    keepalive: u64,
    /// seconds a VM has to boot (default: the engine's, 300)
    #[argh(option)]
    boot_timeout: Option<u64>,
    /// how tunnels to rented VMs are made: kernel, wireguard-go (both need root), userspace
    /// (none), or auto (default: an interface with root, else userspace)
    #[argh(option, default = "mesh::tunnel::Mode::Auto")]
    tunnel: mesh::tunnel::Mode,
    /// UDP ports for the VMs' WireGuard, FIRST-LAST (default: any the kernel picks); open or
    /// forward this range and the mesh port on a firewall or NAT in front of the provider
    #[argh(option)]
    port_range: Option<String>,
}

fn main() {
    let Args { cmd } = control::cli::parse();
    let done = match cmd {
        Cmd::Start(s) => run(s),
        Cmd::Stop(s) => stop(s),
    };
    if let Err(e) = done {
        eprintln!("omertad: {e}");
        std::process::exit(1);
    }
}

/// The network named, or the one stored.
fn network_of(home: &mesh::net::Home, named: Option<String>) -> Result<String, String> {
    match named {
        Some(n) => Ok(n),
        None => match home.networks().map_err(|e| e.to_string())?.as_slice() {
            [(id, _)] => Ok(id.clone()),
            [] => Err("no network stored: omerta network create, or omerta network join LINK".into()),
            _ => Err("several networks are stored: name one with --network ID".into()),
        },
    }
}

/// `omertad stop`: asks the daemon to stop, then waits (60 s at most) until it has.
fn stop(s: Stop) -> Result<(), String> {
    let home = mesh::net::Home::open().map_err(|e| e.to_string())?;
    let network = network_of(&home, s.network)?;
    let socket = mesh::ipc::socket_path(&home, &network).map_err(|e| e.to_string())?;
    let req = mesh::ipc::Request::Stop { release: s.release };
    let _: serde_json::Value = mesh::ipc::call(&socket, &req, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    eprintln!(
        "omertad (network {network}) is stopping{}",
        if s.release { " and ending its rentals" } else { "; its rentals keep running" }
    );
    let end = std::time::Instant::now() + Duration::from_secs(60);
    while socket.exists() {
        if std::time::Instant::now() > end {
            return Err(format!("the daemon has not stopped within 60 s ({} is still there)", socket.display()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("omertad (network {network}) stopped");
    Ok(())
}

fn run(s: Start) -> Result<(), String> {
    // The engine's logger, its level from OMERTA_LOG (a bad value is refused, not ignored).
    engine::log::init(None, engine::log::Format::Text)?;
    // systemd's notify socket, connected before any thread starts (it unsets the variable).
    let notify = control::notify::Notifier::from_env()?;
    let home = mesh::net::Home::open().map_err(|e| e.to_string())?;
    let network = network_of(&home, s.network)?;
    for p in &s.allow_peer {
        if !mesh::net::valid_id(p) {
            return Err(format!("--allow-peer '{}': not a peer ID", mesh::net::printable(p, 40)));
        }
    }
    let port_range = match s.port_range.as_deref().map(parse_range).transpose()? {
        Some(r) if r.contains(&s.port) => {
            return Err(format!("--port-range {}-{} holds the mesh port {}", r.start(), r.end(), s.port))
        }
        r => r,
    };
    if s.heartbeat_interval == 0 || s.heartbeat_timeout == 0 || s.keepalive == 0 {
        return Err("intervals and timeouts are at least 1 second".into());
    }
    let mut opts = mesh::daemon::Options {
        network,
        port: s.port,
        bind: s.bind,
        dry_run: s.dry_run,
        provider: !s.no_provider,
        image: s.image,
        allow_peers: s.allow_peer,
        max_vms: s.max_vms,
        max_cpus: s.max_cpus,
        max_memory_mb: s.max_memory,
        max_disk_mb: s.max_disk,
        heartbeat: Duration::from_secs(s.heartbeat_interval),
        heartbeat_timeout: Duration::from_secs(s.heartbeat_timeout),
        keepalive: Duration::from_secs(s.keepalive),
        boot_timeout_s: s.boot_timeout,
        tunnel: s.tunnel,
        port_range,
        ..Default::default()
    };
    if let Some(p) = s.engine_socket {
        opts.engine_socket = p;
    }
    let d = mesh::daemon::Daemon::start(home, opts).map_err(|e| e.to_string())?;
    println!("Peer ID: {}", d.peer_id());
    println!("Control socket: {}", d.socket_path().display());
    d.run(&notify).map_err(|e| e.to_string())
}

/// `FIRST-LAST`, 1024 to 65535, FIRST <= LAST.
fn parse_range(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let bad = || format!("--port-range '{}': FIRST-LAST, ports 1024 to 65535", mesh::net::printable(s, 20));
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b): (u16, u16) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if a < 1024 || a > b {
        return Err(bad());
    }
    Ok(a..=b)
}
