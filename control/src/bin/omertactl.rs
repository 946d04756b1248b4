//! `omertactl`: the command-line client of a running `omerta-engine`.
//!
//! Over 500 lines on purpose: every command's arguments (argh structs) and its text rendering,
//! one after the other, so `--help`, the request and the output of a command are read together.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use api::reply::{self, Reply};
use api::{default_socket_path, Client, Failure, Request};
use argh::FromArgs;

#[derive(FromArgs)]
/// Control a running omerta-engine over its control socket (--version prints the version).
#[argh(
    example = "Engine and VMs at a glance:\n  {command_name} status\n  {command_name} vm list",
    example = "Replace a VM's allowlist, then watch its counters:\n  {command_name} allow set vm0 203.0.113.7:51820\n  {command_name} stats vm0",
    example = "Capture the next 50 dropped frames of vm0 for Wireshark:\n  {command_name} capture vm0 --dropped /tmp/vm0-dropped.pcap --count 50",
    note = "The socket is $OMERTA_CONTROL, else /run/omerta/engine.sock for root, else\n$XDG_RUNTIME_DIR/omerta/engine.sock. Requests and replies are in docs/control-protocol.md.",
    error_code(2, "bad usage or a request the engine could not parse"),
    error_code(3, "not found: no VM of that name"),
    error_code(4, "refused: the engine understood and said no (bad endpoint, wrong state, not permitted)"),
    error_code(5, "engine not running: nothing answers on the control socket"),
    error_code(1, "any other failure")
)]
struct Top {
    /// the control socket (default: see below)
    #[argh(option)]
    socket: Option<PathBuf>,

    /// print the engine's JSON result instead of text, errors as JSON too (before or after
    /// the command's words)
    #[argh(switch)]
    json: bool,

    #[argh(subcommand)]
    cmd: Cmd,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Cmd {
    Status(Status),
    Vm(VmCmd),
    Allow(AllowCmd),
    Stats(Stats),
    Latency(Latency),
    Log(Log),
    Metrics(Metrics),
    Capture(Capture),
}

#[derive(FromArgs)]
/// engine version, uptime, backend and VM count by state
#[argh(subcommand, name = "status")]
struct Status {}

#[derive(FromArgs)]
/// list, show, add, stop or restart VMs
#[argh(subcommand, name = "vm")]
struct VmCmd {
    #[argh(subcommand)]
    sub: VmSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
// Parsed once per run: the size of `vm start`'s options does not matter.
#[allow(clippy::large_enum_variant)]
enum VmSub {
    List(VmList),
    Show(VmShow),
    Add(VmAdd),
    Start(VmStart),
    Stop(VmStop),
    Restart(VmRestart),
    Remove(VmRemove),
}

#[derive(FromArgs)]
/// every VM with its state, mode, handle and allowlist
#[argh(subcommand, name = "list")]
struct VmList {}

#[derive(FromArgs)]
/// one VM in detail
#[argh(subcommand, name = "show")]
struct VmShow {
    /// the VM
    #[argh(positional)]
    name: String,
}

#[derive(FromArgs)]
/// add and start a VM: the same description as omerta-engine --vm (dgram:PATH or stream:PATH
/// handles; fd handles only at engine start)
#[argh(subcommand, name = "add")]
struct VmAdd {
    /// e.g. name=vm1,handle=dgram:/run/omerta/vms/vm1.sock,consumer=203.0.113.7:51820
    #[argh(positional)]
    spec: String,
}

#[derive(FromArgs)]
/// boot a guest (QEMU on Linux) with its NIC on a new engine handle: the description of
/// omerta-engine --vm without handle=, and either a kernel and initrd (the test guest) or a
/// cloud image provisioned for one consumer (--image, --consumer-key, --ssh-key-file)
#[argh(subcommand, name = "start")]
struct VmStart {
    /// e.g. name=vm1,consumer=203.0.113.7:51820,mode=conntrack
    #[argh(positional)]
    spec: String,
    /// the guest kernel: a path (made absolute here, from this directory) or a file name in
    /// the engine's first --image-dir
    #[argh(option)]
    kernel: Option<String>,
    /// the guest initramfs (as --kernel)
    #[argh(option)]
    initrd: Option<String>,
    /// a cloud image directory (disk.raw, vmlinuz, initrd.img, as make image builds it; made
    /// absolute here)
    #[argh(option)]
    image: Option<String>,
    /// the consumer's WireGuard public key (base64), with --image
    #[argh(option)]
    consumer_key: Option<String>,
    /// the consumer's SSH public key file (e.g. ~/.ssh/id_ed25519.pub), with --image
    #[argh(option)]
    ssh_key_file: Option<String>,
    /// the consumer's login in the VM (default omerta), with --image
    #[argh(option)]
    ssh_user: Option<String>,
    /// the VM's tunnel address/prefix (default 10.50.1.2/24), with --image
    #[argh(option)]
    tunnel: Option<String>,
    /// the consumer's tunnel address (default 10.50.1.1), with --image
    #[argh(option)]
    consumer_tunnel: Option<String>,
    /// vCPUs (default 1), with --image
    #[argh(option)]
    cpus: Option<u32>,
    /// dhcp (default) or static (the seed's network-config), with --image
    #[argh(option)]
    network: Option<String>,
    /// guest memory in MiB (default 128; 1024 with --image)
    #[argh(option)]
    memory: Option<u32>,
    /// boot without the guest firewall (defense in depth) rule set
    #[argh(switch)]
    no_firewall: bool,
}

/// A path as the engine must see it: a bare file name stays (the engine looks it up in its
/// image directory); any other relative path is made absolute from this process's directory,
/// since the engine's own directory means nothing here.
fn client_path(p: &str) -> Result<String, String> {
    let path = std::path::Path::new(p);
    if path.is_absolute() || path.components().count() == 1 && !p.starts_with('.') {
        return Ok(p.to_string());
    }
    std::path::absolute(path).map(|a| a.to_string_lossy().into_owned()).map_err(|e| format!("{p}: {e}"))
}

impl VmStart {
    /// The request: a cloud image's typed one, or the description with kernel and initrd.
    fn request(&self) -> Result<Request, String> {
        let image = match self.image.as_deref().map(std::path::absolute).transpose() {
            Ok(i) => i.map(|i| i.to_string_lossy().into_owned()),
            Err(e) => return Err(format!("--image: {e}")),
        };
        let Some(image) = &image else {
            let (Some(k), Some(i)) = (&self.kernel, &self.initrd) else {
                return Err("vm start needs --kernel and --initrd, or --image".into());
            };
            let (k, i) = (client_path(k)?, client_path(i)?);
            return Ok(Request::VmStart(format!(
                "{},kernel={k},initrd={i},memory={}{}",
                self.spec,
                self.memory.unwrap_or(128),
                if self.no_firewall { ",firewall=no" } else { "" }
            )));
        };
        if self.kernel.is_some() || self.initrd.is_some() || self.no_firewall {
            return Err(
                "--image boots the image's own kernel with its own firewall: drop --kernel, --initrd and --no-firewall"
                    .into(),
            );
        }
        let key =
            self.consumer_key.as_deref().ok_or("--image needs --consumer-key (the consumer's WireGuard public key)")?;
        let file =
            self.ssh_key_file.as_deref().ok_or("--image needs --ssh-key-file (the consumer's SSH public key)")?;
        let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
        let ssh = control::provision::ssh_public_key(text.lines().next().unwrap_or(""))
            .map_err(|e| format!("{file}: {e}"))?;
        let mut spec = format!("{},image={image},consumer-key={key},ssh-key={}", self.spec, ssh.replacen(' ', ":", 1));
        let opts = [
            ("ssh-user", self.ssh_user.clone()),
            ("tunnel", self.tunnel.clone()),
            ("consumer-tunnel", self.consumer_tunnel.clone()),
            ("cpus", self.cpus.map(|c| c.to_string())),
            ("network", self.network.clone()),
            ("memory", self.memory.map(|m| m.to_string())),
        ];
        for (k, v) in opts {
            if let Some(v) = v {
                spec.push_str(&format!(",{k}={v}"));
            }
        }
        api::ImageStart::parse(&spec).map(|s| Request::VmStartImage(Box::new(s))).map_err(|f| f.message)
    }
}

#[derive(FromArgs)]
/// stop a VM's network and its guest, if the engine started one (its entry stays)
#[argh(subcommand, name = "stop")]
struct VmStop {
    /// the VM
    #[argh(positional)]
    name: String,
}

#[derive(FromArgs)]
/// stop a VM and its guest, if the engine started one, and forget it (its sockets, console and
/// counters go; the name is free again)
#[argh(subcommand, name = "remove")]
struct VmRemove {
    /// the VM
    #[argh(positional)]
    name: String,
}

#[derive(FromArgs)]
/// stop and start a VM again with its description and current allowlist
#[argh(subcommand, name = "restart")]
struct VmRestart {
    /// the VM
    #[argh(positional)]
    name: String,
}

#[derive(FromArgs)]
/// show or change a VM's allowlist (changes are atomic for the data plane)
#[argh(subcommand, name = "allow")]
struct AllowCmd {
    #[argh(subcommand)]
    sub: AllowSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum AllowSub {
    List(AllowList),
    Set(AllowSet),
    Add(AllowAdd),
    Remove(AllowRemove),
}

#[derive(FromArgs)]
/// the VM's allowed endpoints
#[argh(subcommand, name = "list")]
struct AllowList {
    /// the VM
    #[argh(positional)]
    name: String,
}

#[derive(FromArgs)]
/// replace the allowlist with these endpoints (none: block everything)
#[argh(subcommand, name = "set")]
struct AllowSet {
    /// the VM
    #[argh(positional)]
    name: String,
    /// IP:PORT endpoints
    #[argh(positional, greedy)]
    endpoints: Vec<String>,
}

#[derive(FromArgs)]
/// add one endpoint
#[argh(subcommand, name = "add")]
struct AllowAdd {
    /// the VM
    #[argh(positional)]
    name: String,
    /// IP:PORT
    #[argh(positional)]
    endpoint: String,
}

#[derive(FromArgs)]
/// remove one endpoint
#[argh(subcommand, name = "remove")]
struct AllowRemove {
    /// the VM
    #[argh(positional)]
    name: String,
    /// IP:PORT
    #[argh(positional)]
    endpoint: String,
}

#[derive(FromArgs)]
/// frames and bytes in and out, drops by reason, forwarded/dropped/terminated counts
#[argh(subcommand, name = "stats")]
struct Stats {
    /// one VM (default: all)
    #[argh(positional)]
    name: Option<String>,
}

#[derive(FromArgs)]
/// per-frame time inside the engine: p50/p90/p99/p99.9/max in microseconds
#[argh(subcommand, name = "latency")]
struct Latency {
    /// one VM (default: all, and all merged)
    #[argh(positional)]
    name: Option<String>,
}

#[derive(FromArgs)]
/// recent blocked traffic (header fields only)
#[argh(subcommand, name = "log")]
struct Log {
    /// one VM (default: all)
    #[argh(positional)]
    name: Option<String>,
}

#[derive(FromArgs)]
/// every counter and histogram in the Prometheus text format
#[argh(subcommand, name = "metrics")]
struct Metrics {}

#[derive(FromArgs)]
/// write the VM's next dropped frames (--dropped FILE), or its next frames both ways
/// (--all FILE), to a pcapng file for Wireshark and tcpdump; each dropped frame's comment
/// says why it was dropped
#[argh(subcommand, name = "capture")]
struct Capture {
    /// the VM
    #[argh(positional)]
    name: String,
    /// the file for dropped frames only
    #[argh(option)]
    dropped: Option<PathBuf>,
    /// the file for every frame: from the VM (forwarded or dropped) and to it
    #[argh(option)]
    all: Option<PathBuf>,
    /// frames to capture, 1..=1000 (default 100)
    #[argh(option, default = "100")]
    count: usize,
    /// bytes kept of each frame, 64..=2048 (default 128: headers, not payloads)
    #[argh(option, default = "128")]
    snaplen: usize,
    /// seconds to wait for the frames (default 10)
    #[argh(option, default = "10")]
    timeout: u64,
}

impl Capture {
    /// The file and whether every frame is wanted; exactly one of --dropped and --all.
    fn target(&self) -> Result<(&PathBuf, bool), String> {
        match (&self.dropped, &self.all) {
            (Some(f), None) => Ok((f, false)),
            (None, Some(f)) => Ok((f, true)),
            _ => Err("capture: give one of --dropped FILE and --all FILE".into()),
        }
    }

    /// The start request, its limits checked here (the file's header states the snaplen).
    fn start(&self) -> Result<Request, String> {
        let (_, all) = self.target()?;
        if !(1..=1000).contains(&self.count) {
            return Err("--count: 1..=1000".into());
        }
        if !(64..=2048).contains(&self.snaplen) {
            return Err("--snaplen: 64..=2048".into());
        }
        Ok(Request::CaptureStart { vm: self.name.clone(), count: self.count, snaplen: self.snaplen, all })
    }
}

/// An endpoint from the command line; a bad one is bad usage (exit 2), said in one line.
fn endpoint(s: &str) -> Result<engine::Endpoint, ExitCode> {
    s.parse().map_err(|e| {
        report(&format!("'{s}': {e}"), 2);
        ExitCode::from(2)
    })
}

/// A request that cannot be encoded: bad usage (exit 2), said in one line.
/// `--json` was given (anywhere): errors are JSON objects on stdout too.
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Says what went wrong and gives the exit status: one line on stderr, or with `--json`
/// `{"ok": false, "error": ..., "status": N}` on stdout.
fn report(msg: &str, status: u8) -> ExitCode {
    if JSON.load(std::sync::atomic::Ordering::Relaxed) {
        println!("{}", serde_json::json!({"ok": false, "error": msg, "status": status}));
    } else {
        eprintln!("omertactl: {msg}");
    }
    ExitCode::from(status)
}

fn usage(f: Failure) -> ExitCode {
    report(&f.message, 2)
}

/// Bad usage found here (not by the protocol's encoder): one line, status 2.
fn bad(msg: String) -> ExitCode {
    report(&msg, 2)
}

/// A duration as people read it: `45 s`, `12 min 5 s`, `3 h 20 min`, `2 d 4 h`.
fn human_duration(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs} s"),
        60..=3599 => format!("{} min {} s", secs / 60, secs % 60),
        3600..=86_399 => format!("{} h {} min", secs / 3600, secs % 3600 / 60),
        _ => format!("{} d {} h", secs / 86_400, secs % 86_400 / 3600),
    }
}

/// Bytes in binary units, as `wg show` writes them: `512 B`, `1.50 KiB`, `3.20 MiB`.
fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.2} {unit}")
}

fn ask(client: &mut Client, req: &Request) -> Result<Reply, ExitCode> {
    req.line().map_err(usage)?;
    client.call(req).map_err(|e| report(&e.to_string(), e.exit_status()))
}

/// Endpoints as one line, space-separated.
fn list(eps: &[engine::Endpoint]) -> String {
    eps.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ")
}

fn print_vm(v: &reply::Vm) {
    let rows: [(&str, Option<String>); 16] = [
        ("name", Some(v.name.clone())),
        ("state", Some(v.state.to_string())),
        ("reason", v.reason.clone()),
        ("mode", Some(v.mode.clone())),
        ("strategy", v.strategy.clone()),
        ("sample_rate", v.sample_rate.map(|r| serde_json::json!(r).to_string())),
        ("backend", v.backend.clone()),
        ("attachment", Some(v.attachment.clone())),
        ("handle", Some(v.handle.clone())),
        ("mac", Some(v.mac.clone())),
        ("ip", Some(v.ip.clone())),
        ("gateway", Some(v.gateway.clone())),
        ("gateway_mac", Some(v.gateway_mac.clone())),
        ("mtu", Some(v.mtu.to_string())),
        ("cpu", v.cpu.map(|c| c.to_string())),
        ("starts", Some(v.starts.to_string())),
    ];
    for (k, x) in rows {
        if let Some(x) = x {
            println!("{k:12} {x}");
        }
    }
    println!("{:12} {}", "allow", list(&v.allow));
}

fn print_stats(v: &reply::VmStats) {
    // Every counter of the vocabulary, in its order, then the drops and the termination.
    println!("{}", v.vm);
    for k in engine::stats::COUNTERS {
        let value = v.counter(k.name);
        if k.name.contains("bytes") && value >= 1024 {
            println!("  {:24} {value} ({})", k.name, human_bytes(value));
        } else {
            println!("  {:24} {value}", k.name);
        }
    }
    println!("  {:24} {}", "dropped", v.dropped);
    for (reason, c) in &v.drops {
        println!("    {reason:22} {c}");
    }
    println!("  {:24} {}", "terminated", v.terminated.as_deref().unwrap_or("no"));
}

/// The typed answer to a capture request (any other shape is the engine's error).
fn captured(r: Reply) -> Result<reply::Captured, ExitCode> {
    match r {
        Reply::Captured(c) => Ok(c),
        _ => Err(report("the engine answered a capture fetch with something else", 1)),
    }
}

fn capture(client: &mut Client, c: &Capture, json: bool) -> Result<(), ExitCode> {
    let start = c.start().map_err(bad)?;
    let (path, all) = c.target().map_err(bad)?;
    let fail = |e: std::io::Error| {
        let hint =
            if e.kind() == std::io::ErrorKind::AlreadyExists { " (it exists: remove it or name another)" } else { "" };
        report(&format!("{}: {e}{hint}", path.display()), 1)
    };
    // Opened before anything is asked: a path that cannot be written fails now, not after the
    // wait. A new file, never through a symlink nor over an existing file (a capture run as
    // root into a shared directory must not let anyone aim it at another file).
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)
    }
    .map_err(fail)?;
    let answer = match ask(client, &start) {
        Ok(a) => a,
        Err(code) => {
            let _ = std::fs::remove_file(path);
            return Err(code);
        }
    };
    let snaplen = match answer {
        Reply::CaptureStarted(a) => a.snaplen as u64,
        _ => c.snaplen as u64,
    };
    let deadline = Instant::now() + Duration::from_secs(c.timeout);
    let fetch = Request::CaptureFetch(c.name.clone());
    let mut result = captured(ask(client, &fetch)?)?;
    while !result.done && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        result = captured(ask(client, &fetch)?)?;
    }
    if !result.done {
        ask(client, &Request::CaptureStop(c.name.clone()))?;
        std::thread::sleep(Duration::from_millis(200));
        result = captured(ask(client, &fetch)?)?;
    }
    let records: Vec<control::pcap::Record> = result
        .frames
        .iter()
        .map(|f| control::pcap::Record {
            unix_us: f.time_us,
            len: f.len,
            bytes: f.bytes(),
            to_vm: f.to_vm,
            dropped: f.dropped.clone(),
        })
        .collect();
    control::pcap::write(&mut file, &c.name, u32::try_from(snaplen).unwrap_or(128), &records).map_err(fail)?;
    let dropped = records.iter().filter(|r| r.dropped.is_some()).count();
    if json {
        println!(
            "{}",
            serde_json::json!({"file": path, "frames": records.len(), "dropped": dropped, "snaplen": snaplen})
        );
    } else if all {
        println!(
            "{} frame(s) of {} ({dropped} dropped, {} to the VM) written to {} (pcapng, {snaplen} bytes of each)",
            records.len(),
            c.name,
            records.iter().filter(|r| r.to_vm).count(),
            path.display()
        );
    } else {
        println!("{} dropped frame(s) of {} written to {} (pcapng)", records.len(), c.name, path.display());
    }
    Ok(())
}

fn run(top: Top) -> Result<(), ExitCode> {
    let path = top.socket.clone().unwrap_or_else(default_socket_path);
    let connect = || Client::connect(&path).map_err(|e| report(&e.to_string(), 5));
    let json = top.json;
    let (req, as_json): (Request, bool) = match &top.cmd {
        Cmd::Status(_) => (Request::Status, json),
        Cmd::Vm(v) => match &v.sub {
            VmSub::List(_) => (Request::VmList, json),
            VmSub::Show(c) => (Request::VmShow(c.name.clone()), json),
            VmSub::Add(c) => (Request::VmAdd(c.spec.clone()), json),
            VmSub::Start(c) => (c.request().map_err(bad)?, json),
            VmSub::Stop(c) => (Request::VmStop(c.name.clone()), json),
            VmSub::Restart(c) => (Request::VmRestart(c.name.clone()), json),
            VmSub::Remove(c) => (Request::VmRemove(c.name.clone()), json),
        },
        Cmd::Allow(a) => match &a.sub {
            AllowSub::List(c) => (Request::AllowList(c.name.clone()), json),
            AllowSub::Set(c) => {
                let eps = c.endpoints.iter().flat_map(|e| e.split(',')).filter(|e| !e.is_empty()).map(endpoint);
                (Request::AllowSet(c.name.clone(), eps.collect::<Result<_, _>>()?), json)
            }
            AllowSub::Add(c) => (Request::AllowAdd(c.name.clone(), endpoint(&c.endpoint)?), json),
            AllowSub::Remove(c) => (Request::AllowRemove(c.name.clone(), endpoint(&c.endpoint)?), json),
        },
        Cmd::Stats(c) => (Request::Stats(c.name.clone()), json),
        Cmd::Latency(c) => (Request::Latency(c.name.clone()), json),
        Cmd::Log(c) => (Request::Log(c.name.clone()), json),
        Cmd::Metrics(_) => (Request::Metrics, json),
        Cmd::Capture(c) => {
            c.start().map_err(bad)?.line().map_err(usage)?;
            return capture(&mut connect()?, c, json);
        }
    };
    // A request that cannot be sent is bad usage, whether or not an engine listens.
    req.line().map_err(usage)?;
    let r = ask(&mut connect()?, &req)?;
    if as_json {
        println!("{}", r.to_json());
        return Ok(());
    }
    match r {
        Reply::Status(v) => {
            let states = v.states.iter().map(|(k, c)| format!("{c} {k}")).collect::<Vec<_>>().join(", ");
            println!(
                "omerta-engine {} up {}, backend {}, {} VM(s){}",
                v.version,
                human_duration(v.uptime_s),
                v.backend,
                v.vms,
                if states.is_empty() { String::new() } else { format!(": {states}") }
            );
        }
        Reply::Vms(vms) => {
            println!("{:16} {:11} {:10} {:34} ALLOW", "NAME", "STATE", "MODE", "HANDLE");
            for vm in vms {
                println!("{:16} {:11} {:10} {:34} {}", vm.name, vm.state.name(), vm.mode, vm.handle, list(&vm.allow));
            }
        }
        Reply::Vm(v) => print_vm(&v),
        Reply::Allow(v) => println!("{}: {}", v.vm, list(&v.allow)),
        Reply::Stats(v) => v.iter().for_each(print_stats),
        Reply::Latency(rows) => {
            println!(
                "{:16} {:11} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
                "VM", "DIRECTION", "FRAMES", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "max µs"
            );
            for row in rows {
                for (dir, d) in [("vm_to_host", row.vm_to_host), ("host_to_vm", row.host_to_vm)] {
                    println!(
                        "{:16} {:11} {:>10} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                        row.vm, dir, d.count, d.p50_us, d.p90_us, d.p99_us, d.p999_us, d.max_us
                    );
                }
            }
        }
        Reply::Log(events) => {
            for e in events {
                let at = std::time::UNIX_EPOCH + Duration::from_millis(e.time_ms);
                println!("{} {} {} {} {}", engine::log::rfc3339(at), e.vm, e.direction.name(), e.reason, e.headers);
            }
        }
        Reply::Metrics(text) => print!("{text}"),
        Reply::CaptureStarted(_) | Reply::Captured(_) | Reply::CaptureStopped(_) => {}
    }
    Ok(())
}

fn main() -> ExitCode {
    // --json is taken wherever it stands (every command has it), and known before parsing, so
    // that even a parse error comes out as JSON.
    let argv: Vec<String> = std::env::args().collect();
    // Up to `--` only: after it, `--json` is a word like any other (a VM may be named so).
    let end = argv.iter().position(|a| a == "--").unwrap_or(argv.len());
    let json = argv[1.min(end)..end].iter().any(|a| a == "--json");
    JSON.store(json, std::sync::atomic::Ordering::Relaxed);
    let args: Vec<String> = argv
        .iter()
        .enumerate()
        .filter(|(i, a)| *i == 0 || *i >= end || a.as_str() != "--json")
        .map(|(_, a)| a.clone())
        .collect();
    let top: Top = match control::cli::parse_from::<Top>(&args) {
        Ok(mut t) => {
            t.json |= json;
            t
        }
        Err((text, code)) if code == ExitCode::SUCCESS => {
            println!("{text}");
            return code;
        }
        Err((text, _)) => return report(text.lines().next().unwrap_or("bad usage"), 2),
    };
    match run(top) {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}
