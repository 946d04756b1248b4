//! `omerta`: the mesh CLI. Networks are handled here; everything else asks the network's
//! `omertad` over its IPC socket. See docs/mesh.md.
#![forbid(unsafe_code)]

use std::io::Read;
use std::time::{Duration, Instant};

use argh::FromArgs;
use mesh::ipc::{self, Request};
use mesh::net::{Bootstrap, Home, Network};
use mesh::wire::Requirements;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Omerta: rent a VM from a provider on your Omerta network and SSH into it through WireGuard
/// (--version prints the version).
#[derive(FromArgs, Debug)]
struct Args {
    /// print JSON (errors too) instead of text
    #[argh(switch)]
    json: bool,
    #[argh(subcommand)]
    cmd: Cmd,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum Cmd {
    Network(NetworkCmd),
    Status(Status),
    Peers(Peers),
    Ping(Ping),
    Vm(VmCmd),
    Ssh(Ssh),
}

/// Log in to a rented VM with OpenSSH through its tunnel (its host key pinned), or run
/// COMMAND there: `omerta ssh VM [-- COMMAND...]`. The exit status is the command's.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "ssh")]
struct Ssh {
    /// the network's ID (optional when only one is stored)
    #[argh(option)]
    network: Option<String>,
    /// the VM's ID
    #[argh(positional)]
    vm: String,
    /// the command to run instead of a login shell
    #[argh(positional, greedy)]
    command: Vec<String>,
}

/// Create, join, list and leave networks.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "network")]
struct NetworkCmd {
    #[argh(subcommand)]
    cmd: NetSub,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum NetSub {
    Create(Create),
    Join(Join),
    List(List),
    Leave(Leave),
}

/// Make a network (a random key) and print its ID and invite link.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "create")]
struct Create {
    /// its name
    #[argh(option)]
    name: String,
    /// this node's mesh endpoint IP:PORT, put in the invite for others to find it
    #[argh(option)]
    endpoint: String,
}

/// Store a network from an invite link (omerta://join/...).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "join")]
struct Join {
    /// the invite link
    #[argh(positional)]
    link: String,
}

/// List the stored networks.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "list")]
struct List {}

/// Forget a network.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "leave")]
struct Leave {
    /// its ID
    #[argh(positional)]
    id: String,
}

/// The daemon's summary.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "status")]
struct Status {
    /// the network's ID (optional when only one is stored)
    #[argh(option)]
    network: Option<String>,
}

/// The peers the daemon knows.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "peers")]
struct Peers {
    /// the network's ID (optional when only one is stored)
    #[argh(option)]
    network: Option<String>,
}

/// Check that a provider answers, and how fast.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "ping")]
struct Ping {
    /// the network's ID (optional when only one is stored)
    #[argh(option)]
    network: Option<String>,
    /// the provider's peer ID
    #[argh(option)]
    peer: String,
    /// milliseconds to wait (default 3000)
    #[argh(option, default = "3000")]
    timeout: u64,
}

/// Rent, list and release VMs.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "vm")]
struct VmCmd {
    #[argh(subcommand)]
    cmd: VmSub,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum VmSub {
    Request(VmRequest),
    List(VmList),
    Release(VmRelease),
    Connect(VmConnect),
    Forward(VmForward),
    Show(VmShow),
}

/// Join stdin and stdout to a TCP port of a rented VM, through its tunnel (for
/// `ssh -o ProxyCommand='omerta vm connect VM %p'`, scp, rsync, git).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "connect")]
struct VmConnect {
    /// the network's ID (optional when only one is stored)
    #[argh(option)]
    network: Option<String>,
    /// the VM's ID
    #[argh(positional)]
    vm: String,
    /// the VM's TCP port
    #[argh(positional)]
    port: u16,
}

/// Listen on a local port and carry each connection to a TCP port of a rented VM:
/// `[ADDR:]LOCAL_PORT:VM_PORT` (ADDR defaults to 127.0.0.1). Runs until ^C.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "forward")]
struct VmForward {
    /// the network's ID (optional when only one is stored)
    #[argh(option)]
    network: Option<String>,
    /// the VM's ID
    #[argh(positional)]
    vm: String,
    /// [ADDR:]LOCAL_PORT:VM_PORT
    #[argh(positional)]
    spec: String,
}

/// A rented VM's tunnel: its mode, latest handshake, bytes each way, connections, what its
/// fence dropped.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "show")]
struct VmShow {
    /// the network's ID (optional when only one is stored)
    #[argh(option)]
    network: Option<String>,
    /// the VM's ID
    #[argh(positional)]
    vm: String,
}

/// Ask a provider for a VM; prints how to SSH into it.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "request")]
struct VmRequest {
    /// the network's ID (optional when only one is stored)
    #[argh(option)]
    network: Option<String>,
    /// the provider's peer ID
    #[argh(option)]
    peer: String,
    /// the whole message flow, no VM and no tunnel
    #[argh(switch)]
    dry_run: bool,
    /// return once the VM's SSH server answers through the tunnel
    #[argh(switch)]
    wait: bool,
    /// seconds --wait waits at most (default 600)
    #[argh(option, default = "600")]
    wait_timeout: u64,
    /// vCPUs (default 2)
    #[argh(option, default = "2")]
    cpus: u32,
    /// memory in MB (default 2048)
    #[argh(option, default = "2048")]
    memory: u32,
    /// disk in MB (default 4096)
    #[argh(option, default = "4096")]
    disk: u32,
    /// minutes without heartbeat answers before the provider reclaims the VM (default 10)
    #[argh(option)]
    timeout_minutes: Option<u32>,
}

/// The VMs this node rents and provides.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "list")]
struct VmList {
    /// the network's ID (optional when only one is stored)
    #[argh(option)]
    network: Option<String>,
}

/// Give a rented VM back (its provider stops it; the tunnel goes).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "release")]
struct VmRelease {
    /// the network's ID (optional when only one is stored)
    #[argh(option)]
    network: Option<String>,
    /// the VM's ID
    #[argh(positional)]
    vm: String,
}

fn main() {
    // `--json` is taken wherever it stands (before or after the command), and argument errors
    // are JSON too when it is given.
    let argv: Vec<String> = std::env::args().collect();
    // Words after `--` are a remote command's (`omerta ssh VM -- ls --json`): never ours.
    let ours = argv.iter().skip(1).take_while(|a| *a != "--").count();
    let json = argv.iter().skip(1).take(ours).any(|a| a == "--json");
    let rest: Vec<&str> = argv
        .iter()
        .skip(1)
        .enumerate()
        .filter(|(i, a)| *i >= ours || *a != "--json")
        .map(|(_, a)| a.as_str())
        .collect();
    let name = argv.first().map_or("omerta", |p| p.rsplit('/').next().unwrap_or("omerta"));
    if rest.iter().take_while(|a| **a != "--").any(|a| *a == "--version") {
        println!("{name} {}", env!("CARGO_PKG_VERSION"));
        std::process::exit(0);
    }
    let args = match Args::from_args(&[name], &rest) {
        Ok(mut a) => {
            a.json = json;
            a
        }
        Err(early) => {
            if early.status.is_ok() {
                println!("{}", early.output);
                std::process::exit(0);
            }
            if json {
                println!("{}", serde_json::json!({"ok": false, "error": early.output.trim()}));
            } else {
                eprintln!("{}", early.output.trim());
            }
            std::process::exit(2);
        }
    };
    match run(args) {
        Ok(()) => {}
        Err(e) => {
            if json {
                println!("{}", serde_json::json!({"ok": false, "error": e.to_string()}));
            } else {
                eprintln!("omerta: {e}");
            }
            std::process::exit(1);
        }
    }
}

/// What this CLI's commands fail with: a one-line message.
type Error = Box<dyn std::error::Error>;

fn req_peer(r: &Request) -> &str {
    match r {
        Request::VmRequest { peer_id, .. } => peer_id,
        _ => "",
    }
}

fn network_id(home: &Home, given: Option<String>) -> Result<String, Error> {
    match given {
        Some(n) => Ok(n),
        None => match home.networks()?.as_slice() {
            [(id, _)] => Ok(id.clone()),
            [] => Err("no network stored: omerta network create, or omerta network join LINK".into()),
            _ => Err("several networks are stored: name one with --network ID".into()),
        },
    }
}

/// The socket of the network's daemon.
fn daemon_socket(home: &Home, network: Option<String>) -> Result<std::path::PathBuf, Error> {
    let id = network_id(home, network)?;
    home.network(&id)?;
    Ok(ipc::socket_path(home, &id)?)
}

/// Asks the network's daemon; its reply read as `T`.
fn call<T: DeserializeOwned>(
    home: &Home,
    network: Option<String>,
    req: &Request,
    timeout: Duration,
) -> Result<T, Error> {
    let id = network_id(home, network)?;
    home.network(&id)?;
    ipc::call(&ipc::socket_path(home, &id)?, req, timeout).map_err(|e| {
        e.to_string().replace("omertad start --network ID", &format!("omertad start --network {id}")).into()
    })
}

/// Prints `v` as `{"ok": true, "result": v}` with `--json`, else as `text` says.
fn out<T: Serialize>(json: bool, v: &T, text: impl FnOnce(&T)) {
    if json {
        println!("{}", serde_json::json!({"ok": true, "result": v}));
    } else {
        text(v);
    }
}

/// `network create`'s result.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Created {
    network_id: String,
    name: String,
    peer_id: String,
    invite: String,
}

/// `network join`'s result.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Joined {
    network_id: String,
    name: String,
    bootstrap_peers: Vec<String>,
}

/// One of `network list`'s result.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Stored {
    network_id: String,
    name: String,
    created_at: u64,
    bootstrap_peers: Vec<String>,
}

/// `network leave`'s result.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Left {
    network_id: String,
    left: bool,
}

fn run(args: Args) -> Result<(), Error> {
    let json = args.json;
    let home = Home::open()?;
    match args.cmd {
        Cmd::Network(NetworkCmd { cmd }) => match cmd {
            NetSub::Create(c) => {
                let ep = mesh::check::endpoint(&c.endpoint).map_err(|e| format!("--endpoint {e}"))?;
                let me = home.identity()?;
                let peer = mesh::net::peer_id(&me.verifying_key().to_bytes());
                let boot = Bootstrap::parse(&format!("{peer}@{ep}"))?;
                let n = Network::create(&c.name, vec![boot])?;
                let id = home.save_network(&n)?;
                let v = Created { network_id: id, name: n.name.clone(), peer_id: peer, invite: n.link() };
                out(json, &v, |v| {
                    println!("Network created: {}", v.name);
                    println!("Network ID: {}", v.network_id);
                    println!("Your peer ID: {}", v.peer_id);
                    println!("Invite link (a secret: it holds the network key):");
                    println!("{}", v.invite);
                });
            }
            NetSub::Join(j) => {
                let n = Network::from_link(&j.link)?;
                let id = home.save_network(&n)?;
                let v = Joined {
                    network_id: id,
                    name: n.name.clone(),
                    bootstrap_peers: n.bootstrap.iter().map(ToString::to_string).collect(),
                };
                out(json, &v, |v| {
                    println!("Joined network {} ({})", v.name, v.network_id);
                    for b in &v.bootstrap_peers {
                        println!("  bootstrap peer {b}");
                    }
                });
            }
            NetSub::List(_) => {
                let v: Vec<Stored> = home
                    .networks()?
                    .into_iter()
                    .map(|(id, n)| Stored {
                        network_id: id,
                        name: n.name,
                        created_at: n.created_at,
                        bootstrap_peers: n.bootstrap.iter().map(ToString::to_string).collect(),
                    })
                    .collect();
                out(json, &v, |v| {
                    if v.is_empty() {
                        println!("no networks (omerta network create, or omerta network join LINK)");
                    }
                    for n in v {
                        let secs = n.created_at;
                        let created = std::time::UNIX_EPOCH.checked_add(Duration::from_secs(secs));
                        let when = created.map_or_else(|| format!("at {secs} s"), mesh::rfc3339);
                        println!("{}  {}  created {when}", n.network_id, n.name);
                    }
                });
            }
            NetSub::Leave(l) => {
                if !home.remove_network(&l.id)? {
                    return Err(format!("network {} is not stored here", l.id).into());
                }
                out(json, &Left { network_id: l.id.clone(), left: true }, |_| println!("Left network {}", l.id));
            }
        },
        Cmd::Status(st) => {
            let v: ipc::Status = call(&home, st.network, &Request::Status, Duration::from_secs(5))?;
            out(json, &v, |v| {
                println!("network:  {} ({})", v.network, v.network_name);
                println!("peer ID:  {}", v.peer_id);
                println!("port:     {}", v.port);
                println!("role:     {}", if v.provider { "provider and consumer" } else { "consumer" });
                println!("dry run:  {}", v.dry_run);
                println!("peers:    {}", v.peers);
                println!("VMs:      {} provided, {} rented", v.providing, v.renting);
                println!("dropped:  {} datagrams", v.dropped_datagrams);
                let refused: Vec<String> =
                    v.refused.iter().filter(|(_, n)| **n > 0).map(|(why, n)| format!("{why} {n}")).collect();
                if !refused.is_empty() {
                    println!("refused:  {}", refused.join(", "));
                }
            });
        }
        Cmd::Peers(p) => {
            let v: Vec<ipc::PeerView> = call(&home, p.network, &Request::Peers, Duration::from_secs(5))?;
            out(json, &v, |v| {
                if v.is_empty() {
                    println!("no peers seen yet");
                }
                for p in v {
                    println!("{}  {}  seen {} s ago", p.peer_id, p.endpoint, p.last_seen_seconds_ago);
                }
            });
        }
        Cmd::Ping(p) => {
            let req = Request::Ping { peer_id: p.peer, timeout: Some(p.timeout) };
            let v: ipc::Pong = call(&home, p.network, &req, Duration::from_millis(p.timeout) + Duration::from_secs(5))?;
            out(json, &v, |v| {
                println!("Provider reachable: {:.0}ms latency at {}", v.latency_ms, v.endpoint);
            });
        }
        Cmd::Vm(VmCmd { cmd }) => match cmd {
            VmSub::Request(r) => {
                if r.timeout_minutes == Some(0) {
                    return Err("--timeout-minutes is at least 1".into());
                }
                let req = Request::VmRequest {
                    peer_id: r.peer,
                    requirements: Requirements {
                        cpu_cores: r.cpus,
                        memory_mb: r.memory,
                        storage_mb: r.disk,
                        ..Default::default()
                    },
                    timeout_minutes: r.timeout_minutes,
                    dry_run: r.dry_run,
                };
                if !json {
                    eprintln!("Requesting a VM from {} ...", req_peer(&req));
                }
                let network = r.network.clone();
                let v: ipc::VmGranted = call(&home, r.network, &req, Duration::from_secs(120))?;
                out(json, &v, |v| {
                    println!("VM Created Successfully!");
                    println!("  VM ID:          {}", v.vm_id);
                    println!("  VM IP:          {}", v.vm_ip);
                    println!("  Log in:         {}", v.omerta_ssh);
                    if !v.ssh_command.is_empty() {
                        println!("  SSH:            {}", v.ssh_command);
                    }
                    println!("  Host key:       {} (pinned)", v.ssh_host_fingerprint);
                    if v.interface.is_empty() {
                        println!("  Tunnel:         {}, port {}", v.tunnel_kind, v.listen_port);
                    } else {
                        println!("  VPN Interface:  {} ({}, port {})", v.interface, v.tunnel_kind, v.listen_port);
                    }
                    println!("  Heartbeat timeout: {} minutes", v.heartbeat_timeout_minutes);
                    if v.dry_run {
                        println!("  (dry run: no VM was started and no tunnel was made)");
                    }
                });
                if r.wait && v.dry_run {
                    if !json {
                        eprintln!("(--wait: nothing to wait for in a dry run)");
                    }
                } else if r.wait {
                    let socket = daemon_socket(&home, network)?;
                    wait_for_ssh(&socket, &v.vm_id, Duration::from_secs(r.wait_timeout), json)?;
                }
            }
            VmSub::List(l) => {
                let v: ipc::VmList = call(&home, l.network, &Request::VmList, Duration::from_secs(10))?;
                out(json, &v, |v| {
                    println!("Rented ({}):", v.renting.len());
                    for r in &v.renting {
                        println!("  {}  {}  from {}  via {}  {}", r.vm_id, r.vm_ip, r.provider, r.interface, r.state);
                    }
                    println!("Provided ({}):", v.providing.len());
                    for p in &v.providing {
                        println!(
                            "  {}  {}  for {} at {}  {}",
                            p.vm_id, p.vm_ip, p.consumer, p.consumer_endpoint, p.state
                        );
                    }
                });
            }
            VmSub::Release(r) => {
                let req = Request::VmRelease { vm_id: r.vm.clone() };
                let v: ipc::Released = call(&home, r.network, &req, Duration::from_secs(40))?;
                out(json, &v, |_| println!("VM {} released", r.vm));
            }
            VmSub::Connect(c) => {
                let conn = mesh::stream::dial(&daemon_socket(&home, c.network)?, &c.vm, c.port)?;
                mesh::stream::join(conn, std::io::stdin(), std::io::stdout())?;
            }
            VmSub::Forward(f) => forward(&daemon_socket(&home, f.network)?, &f.vm, &f.spec, json)?,
            VmSub::Show(sh) => {
                let req = Request::VmShow { vm_id: sh.vm };
                let v: ipc::TunnelView = call(&home, sh.network, &req, Duration::from_secs(10))?;
                out(json, &v, print_show);
            }
        },
        Cmd::Ssh(s) => ssh(&home, s)?,
    }
    Ok(())
}

/// `vm show`'s text.
fn print_show(v: &ipc::TunnelView) {
    println!("VM {}: tunnel {}, port {}", v.vm_id, v.mode, v.listen_port);
    if !v.interface.is_empty() {
        println!("  interface:    {}", v.interface);
    }
    println!("  VM IP:        {} (ours {})", v.vm_ip, v.consumer_ip);
    println!("  provider:     {}", v.provider);
    println!("  endpoint:     {}", v.endpoint.as_deref().unwrap_or("(none yet)"));
    let now = mesh::now_s();
    if v.latest_handshake == 0 {
        println!("  handshake:    never");
    } else {
        println!("  handshake:    {} s ago", now.saturating_sub(v.latest_handshake));
    }
    println!("  transfer:     {} B received, {} B sent", v.rx_bytes, v.tx_bytes);
    if let Some(n) = v.streams {
        println!("  connections:  {n}");
    }
    if !v.fenced.is_empty() {
        let f: Vec<String> = v.fenced.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!("  fenced:       {} (packets of the VM dropped)", f.join(", "));
    }
    println!("  state:        {}", v.state);
}

/// Puts `s` in single quotes for a shell (ssh runs its ProxyCommand with one).
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Replaces this process with OpenSSH, reaching the VM through `omerta vm connect`.
fn ssh(home: &Home, s: Ssh) -> Result<(), Error> {
    use std::os::unix::process::CommandExt;
    let req = Request::VmShow { vm_id: s.vm.clone() };
    let v: ipc::TunnelView = call(home, s.network.clone(), &req, Duration::from_secs(10))?;
    let exe = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
    let exe = exe.to_string_lossy();
    let network = network_id(home, s.network)?;
    // ssh expands `%` tokens (and `~`) in these values and splits a file list on blanks:
    // `%` is doubled and the files double-quoted; a path ssh cannot be given safely is refused.
    for path in [exe.as_ref(), v.known_hosts.as_str(), v.ssh_identity.as_str()] {
        if path.contains(['"', '\n', '\r']) {
            return Err(format!(
                "'{}': a path ssh cannot be given (a quote or a line break in it)",
                path.escape_debug()
            )
            .into());
        }
    }
    let ssh_escape = |s: &str| s.replace('%', "%%");
    let proxy = format!(
        "{} vm connect --network {} {} %p",
        ssh_escape(&shell_quote(&exe)),
        ssh_escape(&shell_quote(&network)),
        ssh_escape(&shell_quote(&v.vm_id))
    );
    let mut c = std::process::Command::new("ssh");
    c.arg("-o").arg(format!("ProxyCommand={proxy}"));
    c.arg("-o").arg(format!("UserKnownHostsFile=\"{}\"", ssh_escape(&v.known_hosts)));
    c.args(["-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes"]);
    c.arg("-o").arg(format!("IdentityFile=\"{}\"", ssh_escape(&v.ssh_identity)));
    c.arg(format!("{}@{}", v.ssh_user, v.vm_ip));
    if !s.command.is_empty() {
        c.arg("--").args(&s.command);
    }
    let e = c.exec();
    Err(format!("ssh: {e} (install OpenSSH's client)").into())
}

/// `vm forward`: listens on `[ADDR:]LOCAL:VM_PORT`'s local side and carries each connection
/// to the VM (at most 32 at once; more wait in the listen queue).
fn forward(socket: &std::path::Path, vm: &str, spec: &str, json: bool) -> Result<(), Error> {
    let parts: Vec<&str> = spec.rsplitn(3, ':').collect();
    let bad = || format!("'{spec}': not [ADDR:]LOCAL_PORT:VM_PORT");
    let (vm_port, local_port, addr) = match parts.as_slice() {
        [v, l] => (v.parse::<u16>().map_err(|_| bad())?, l.parse::<u16>().map_err(|_| bad())?, "127.0.0.1"),
        [v, l, a] => (v.parse::<u16>().map_err(|_| bad())?, l.parse::<u16>().map_err(|_| bad())?, *a),
        _ => return Err(bad().into()),
    };
    let ip: std::net::IpAddr = addr.parse().map_err(|_| format!("'{addr}': not an IP address"))?;
    // The VM must exist and its tunnel answer before we listen.
    let _: ipc::TunnelView =
        ipc::call(socket, &Request::VmShow { vm_id: vm.into() }, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    let listener =
        std::net::TcpListener::bind((ip, local_port)).map_err(|e| format!("listen on {addr}:{local_port}: {e}"))?;
    let local = listener.local_addr()?;
    if json {
        println!(
            "{}",
            serde_json::json!({"ok": true, "result": {"listening": local.to_string(), "vmId": vm, "vmPort": vm_port}})
        );
    } else {
        println!("Forwarding {local} to port {vm_port} of VM {vm} (^C to stop)");
    }
    let open = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        while open.load(std::sync::atomic::Ordering::SeqCst) >= 32 {
            std::thread::sleep(Duration::from_millis(50));
        }
        open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (socket, vm, open) = (socket.to_path_buf(), vm.to_string(), open.clone());
        let spawned = std::thread::Builder::new().name("forward".into()).spawn(move || {
            match mesh::stream::dial(&socket, &vm, vm_port) {
                Ok(c) => {
                    let _ = mesh::stream::join_tcp(c, conn);
                }
                Err(e) => eprintln!("omerta: forward: {e}"),
            }
            open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
        if spawned.is_err() {
            eprintln!("omerta: forward: cannot start a thread: a connection dropped");
        }
    }
    Ok(())
}

/// Waits until the VM's SSH server sends its banner through the tunnel, with a progress line
/// every 15 s.
fn wait_for_ssh(socket: &std::path::Path, vm: &str, timeout: Duration, json: bool) -> Result<(), Error> {
    let t0 = Instant::now();
    let mut said = Instant::now();
    if !json {
        eprintln!("Waiting for SSH on VM {vm} (it boots; up to {} s) ...", timeout.as_secs());
    }
    while t0.elapsed() < timeout {
        if let Ok(mut c) = mesh::stream::dial(socket, vm, 22) {
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let mut b = [0u8; 4];
            if c.read_exact(&mut b).is_ok() && &b == b"SSH-" {
                if !json {
                    eprintln!("SSH answers on VM {vm} after {} s", t0.elapsed().as_secs());
                }
                return Ok(());
            }
        }
        if !json && said.elapsed() >= Duration::from_secs(15) {
            said = Instant::now();
            eprintln!("  still booting ({} s)", t0.elapsed().as_secs());
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    Err(format!("SSH did not answer on VM {vm} within {} s", timeout.as_secs()).into())
}
