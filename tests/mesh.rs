//! The mesh (issue 13): `omertad` and `omerta` on two "machines", the test's private network
//! namespace (the provider, 203.0.113.1) and a peer namespace joined to it by a veth pair (the
//! consumer, 203.0.113.2), each with its own `OMERTA_HOME`. Nothing else is reachable from
//! either. The dry-run cases run both daemons and the CLI as `nobody`; the real run
//! (`realvm::mesh_*`) boots the Debian cloud image through the engine and logs in with OpenSSH
//! through the tunnel the consumer's daemon made.
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use omerta_it::{mesh_bins, private_netns, Netns, VethPeer};
use serde_json::Value;

const NOBODY: u32 = 65534;
pub const PROVIDER_EP: &str = "203.0.113.1:9999";

/// One node: its state directory, where it runs (the caller's namespace or a peer's), as whom,
/// and its daemon (ended by its pid on drop).
pub struct Node {
    pub home: PathBuf,
    ns: Option<String>,
    nobody: bool,
    daemon: Option<Child>,
    log: PathBuf,
}

/// `(exit code, stdout, stderr)`.
pub type Out = (i32, String, String);

impl Node {
    pub fn new(tag: &str, ns: Option<&VethPeer>, nobody: bool) -> Self {
        let home = std::env::temp_dir().join(format!("omerta-mesh-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&home);
        std::fs::create_dir_all(&home).expect("node home");
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        if nobody {
            std::os::unix::fs::chown(&home, Some(NOBODY), Some(NOBODY)).expect("chown the home to nobody");
        }
        let log = std::env::temp_dir().join(format!("omerta-mesh-{}-{tag}.log", std::process::id()));
        Self { home, ns: ns.map(|p| p.ns.clone()), nobody, daemon: None, log }
    }

    /// `bin` as this node runs it, bounded to 15 minutes.
    pub fn command(&self, bin: &Path) -> Command {
        self.command_as(bin, true)
    }

    /// `bin` as this node runs it; `bounded`: under `timeout 900` (else the pid is the
    /// program's own, for signals).
    pub fn command_as(&self, bin: &Path, bounded: bool) -> Command {
        let mut c = if bounded {
            let mut c = Command::new("timeout");
            c.args(["900", "env"]);
            c
        } else {
            Command::new("env")
        };
        if let Some(ns) = &self.ns {
            c.args(["ip", "netns", "exec", ns]);
        }
        if self.nobody {
            c.args(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
        }
        c.arg(bin).env("OMERTA_HOME", &self.home).env_remove("HOME").stdin(Stdio::null());
        c
    }

    /// Runs `omerta args`.
    pub fn omerta(&self, args: &[&str]) -> Out {
        omerta_perf::command::output(self.command(&mesh_bins().1).args(args)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `omerta --json args`'s result (the command must succeed).
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let (code, out, err) = self.omerta(&a);
        assert_eq!(code, 0, "omerta {args:?}: {out}{err}");
        let v: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("omerta {args:?} printed no JSON ({e}): {out}"));
        v["result"].clone()
    }

    /// `omerta network create` with this node as the bootstrap peer at `endpoint`:
    /// (network ID, invite link).
    pub fn create_network(&self, endpoint: &str) -> (String, String) {
        let (code, out, err) = self.omerta(&["network", "create", "--name", "test", "--endpoint", endpoint]);
        assert_eq!(code, 0, "network create: {err}");
        let id = out.lines().find_map(|l| l.strip_prefix("Network ID: ")).expect("a network ID").to_string();
        let link = out.lines().find(|l| l.starts_with("omerta://join/")).expect("an invite link").to_string();
        (id, link)
    }

    /// Starts `omertad start args` (from the private namespace `ns` proves) and waits (10 s at most) until it says it started; its
    /// peer ID.
    pub fn start_daemon(&mut self, _ns: &Netns, args: &[&str]) -> String {
        let log = std::fs::File::create(&self.log).expect("daemon log");
        let err = log.try_clone().expect("log");
        // No `timeout` wrapper here: the pid is the daemon's own, so a SIGTERM reaches it.
        let mut c = self.command_as(&mesh_bins().0, false);
        c.arg("start").args(args).stdout(log).stderr(err);
        let child = c.spawn().expect("start omertad");
        self.daemon = Some(child);
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.log();
            if text.contains("daemon started") {
                let id = text.lines().find_map(|l| l.strip_prefix("Peer ID: ")).expect("Peer ID printed");
                return id.trim().to_string();
            }
            if let Some(st) = self.daemon.as_mut().and_then(|d| d.try_wait().ok().flatten()) {
                panic!("omertad ended ({st}) at start:\n{text}");
            }
            assert!(Instant::now() < end, "omertad did not start within 10 s:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ends the daemon with `signal` (by its pid) and waits for it (30 s at most); its exit
    /// code.
    pub fn stop_daemon(&mut self, signal: &str) -> Option<i32> {
        let d = self.daemon.as_ref()?;
        let _ = Command::new("kill").args([&format!("-{signal}"), &d.id().to_string()]).status();
        self.wait_daemon_end(&format!("SIG{signal}"))
    }

    /// Waits (30 s at most) for the daemon to end after `what`; its exit code.
    fn wait_daemon_end(&mut self, what: &str) -> Option<i32> {
        let mut d = self.daemon.take()?;
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = d.try_wait() {
                return st.code();
            }
            if Instant::now() > end {
                let _ = d.kill();
                let _ = d.wait();
                panic!("omertad did not stop within 30 s of {what}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `omertad stop --network NET [--release]` as this node runs it; then waits for the
    /// daemon to end (30 s at most): what `omertad stop` said, and the daemon's exit code.
    pub fn omertad_stop(&mut self, net: &str, release: bool) -> (Out, Option<i32>) {
        let mut c = self.command(&mesh_bins().0);
        c.args(["stop", "--network", net]);
        if release {
            c.arg("--release");
        }
        let said = omerta_perf::command::output(&mut c).unwrap_or_else(|e| panic!("{e}"));
        assert!(self.daemon.is_some(), "a running daemon");
        let code = self.wait_daemon_end(&format!("omertad stop ({said:?})"));
        (said, code)
    }

    /// What the daemon printed.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `pred` holds for the daemon's log (`secs` at most).
    pub fn wait_log(&self, what: &str, secs: u64, pred: impl Fn(&str) -> bool) {
        let end = Instant::now() + Duration::from_secs(secs);
        while !pred(&self.log()) {
            assert!(Instant::now() < end, "{what} within {secs} s; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            // SIGTERM first, so the daemon removes its tunnels (a wireguard-go each) as a user's
            // would; killed only if it has not ended in 10 s (a test that failed midway left
            // wireguard-go processes running when the daemon was killed outright).
            let _ = Command::new("kill").args(["-TERM", &d.id().to_string()]).status();
            let end = Instant::now() + Duration::from_secs(10);
            while d.try_wait().ok().flatten().is_none() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
        let _ = std::fs::remove_dir_all(&self.home);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A provider (in the private namespace) and a consumer (in the peer namespace) on one
/// network, both daemons started with their arguments after `--network ID`, both as nobody
/// when `nobody`: (provider, consumer, network ID, provider's peer ID).
pub fn pair(
    ns: &Netns,
    peer: &VethPeer,
    tag: &str,
    nobody: bool,
    p_args: &[&str],
    c_args: &[&str],
) -> (Node, Node, String, String) {
    pair_as(ns, peer, tag, (nobody, nobody), p_args, c_args)
}

/// [`pair`], the provider and the consumer each as nobody or not (`nobody`: provider,
/// consumer).
pub fn pair_as(
    ns: &Netns,
    peer: &VethPeer,
    tag: &str,
    nobody: (bool, bool),
    p_args: &[&str],
    c_args: &[&str],
) -> (Node, Node, String, String) {
    let mut p = Node::new(&format!("{tag}-p"), None, nobody.0);
    let mut c = Node::new(&format!("{tag}-c"), Some(peer), nobody.1);
    let (net, link) = p.create_network(PROVIDER_EP);
    let (code, out, err) = c.omerta(&["network", "join", &link]);
    assert_eq!(code, 0, "network join: {err}");
    assert!(out.contains(&format!("Joined network test ({net})")), "{out}");
    let mut a = vec!["--network", &net];
    a.extend_from_slice(p_args);
    let pid = p.start_daemon(ns, &a);
    let mut a = vec!["--network", &net];
    a.extend_from_slice(c_args);
    c.start_daemon(ns, &a);
    (p, c, net, pid)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777).unwrap_or(0)
}

/// seed: mesh: Daemon startup
#[test]
fn mesh_daemon_startup() {
    private_netns(|ns| {
        let peer = VethPeer::new(ns, "mstart");
        let (mut p, c, net, pid) = pair(ns, &peer, "start", true, &["--dry-run"], &["--dry-run", "--no-provider"]);
        assert!(mesh::net::valid_id(&pid), "Peer ID: {pid}");
        assert!(p.log().contains("Mesh provider daemon started"), "{}", p.log());
        assert!(c.log().contains("Mesh consumer daemon started"), "{}", c.log());
        // A second daemon of the same network and user is refused with a clear line.
        let (code, _, err) = p
            .command(&mesh_bins().0)
            .args(["start", "--network", &net, "--dry-run", "--port", "9998"])
            .output()
            .map(|o| (o.status.code().unwrap_or(-1), String::new(), String::from_utf8_lossy(&o.stderr).into_owned()))
            .expect("omertad");
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("already runs") && err.lines().count() == 1, "{err}");
        // Private state, owned by the user that ran it (nobody: no root needed).
        let sock = p.home.join("run").join(format!("omertad-{net}.sock"));
        assert_eq!(mode(&p.home), 0o700);
        assert_eq!(mode(&p.home.join("identity.key")), 0o600);
        assert_eq!(mode(&p.home.join("networks").join(format!("{net}.json"))), 0o600);
        assert_eq!(mode(&sock), 0o600);
        assert_eq!(std::fs::metadata(p.home.join("identity.key")).map(|m| m.uid()).unwrap_or(0), NOBODY);
        // The consumer found the provider through the invite's bootstrap entry.
        let peers = c.json(&["peers"]);
        assert!(peers.to_string().contains(&pid) && peers.to_string().contains(PROVIDER_EP), "{peers}");
        // SIGHUP (systemctl reload, a terminal closing): said and survived.
        let proc_id = p.daemon.as_ref().map(Child::id).expect("the provider runs");
        Command::new("kill").args(["-HUP", &proc_id.to_string()]).status().unwrap();
        p.wait_log("the SIGHUP line", 10, |l| l.contains("SIGHUP: nothing to reload"));
        assert!(c.json(&["peers"]).to_string().contains(&pid), "still serving");
        assert!(p.daemon.as_mut().is_some_and(|d| d.try_wait().is_ok_and(|s| s.is_none())), "alive after SIGHUP");
        // SIGTERM: a clean stop, the socket gone.
        assert_eq!(p.stop_daemon("TERM"), Some(0), "{}", p.log());
        assert!(!sock.exists(), "the IPC socket stays after a stop");
        assert!(p.log().contains("stopped"));
    });
}

/// seed: mesh: IPC ping
#[test]
fn mesh_ipc_ping() {
    private_netns(|ns| {
        let peer = VethPeer::new(ns, "mping");
        let (mut p, c, net, pid) = pair(ns, &peer, "ping", true, &["--dry-run"], &["--dry-run", "--no-provider"]);
        let (code, out, err) = c.omerta(&["ping", "--network", &net, "--peer", &pid]);
        assert_eq!(code, 0, "{err}");
        let line = out.trim();
        let ms = line.strip_prefix("Provider reachable: ").and_then(|r| r.split_once("ms latency at ")).expect(line);
        assert!(ms.0.parse::<u64>().is_ok() && ms.1 == PROVIDER_EP, "{line}");
        // A peer nobody knows.
        let (code, _, err) = c.omerta(&["ping", "--network", &net, "--peer", "0123456789abcdef"]);
        assert!(code == 1 && err.starts_with("omerta: Provider endpoint not available: 0123456789abcdef"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        // A node of another network (another key, the same bootstrap entry): no answer, and
        // the provider logs why.
        let mut x = Node::new("ping-x", Some(&peer), true);
        let forged = mesh::net::Network {
            key: mesh::random::<32>().expect("random"),
            name: "test".into(),
            bootstrap: vec![mesh::net::Bootstrap::parse(&format!("{pid}@{PROVIDER_EP}")).expect("bootstrap")],
            created_at: 0,
        };
        let (code, _, err) = x.omerta(&["network", "join", &forged.link()]);
        assert_eq!(code, 0, "{err}");
        x.start_daemon(ns, &["--network", &forged.id(), "--port", "9997", "--dry-run"]);
        let (code, _, err) = x.omerta(&["ping", "--peer", &pid, "--timeout", "1000"]);
        assert_eq!((code, err.trim()), (1, "omerta: No response from provider"));
        p.wait_log("the provider logs the decrypt failure", 5, |l| l.contains("Failed to decrypt message"));
        // The provider down.
        p.stop_daemon("TERM");
        let (code, _, err) = c.omerta(&["ping", "--network", &net, "--peer", &pid, "--timeout", "1000"]);
        assert_eq!((code, err.trim()), (1, "omerta: No response from provider"));
        // No daemon at all.
        let (code, _, err) = p.omerta(&["status", "--network", &net]);
        assert!(code == 1 && err.contains("no omertad answers"), "{err}");
    });
}

/// seed: mesh: Dry Run Mode
#[test]
fn mesh_dry_run() {
    // The plan's "Dry Run Mode": both daemons and the CLI as nobody, the whole message flow,
    // no VM and no tunnel.
    private_netns(|ns| {
        let peer = VethPeer::new(ns, "mdry");
        let (p, c, net, pid) = pair(ns, &peer, "dry", true, &["--dry-run"], &["--dry-run"]);
        let (code, out, err) = c.omerta(&["vm", "request", "--network", &net, "--peer", &pid, "--dry-run"]);
        assert_eq!(code, 0, "{err}");
        assert!(out.starts_with("VM Created Successfully!"), "{out}");
        let field = |k: &str| out.lines().find_map(|l| l.trim().strip_prefix(k)).map(|v| v.trim().to_string());
        let vm = field("VM ID:").expect("VM ID");
        let ip = field("VM IP:").expect("VM IP");
        let ssh = field("SSH:").expect("SSH");
        assert!(field("VPN Interface:").is_some_and(|i| i.starts_with("wg")), "{out}");
        assert!(
            ssh.contains(&format!("omerta@{ip}")) && ssh.contains("ssh/id_ed25519") && ssh.contains("known_hosts"),
            "{ssh}"
        );
        // The consumer's SSH key was made (0600), the VM's host key pinned.
        assert_eq!(mode(&c.home.join("ssh/id_ed25519")), 0o600);
        let kh = std::fs::read_to_string(c.home.join("known_hosts")).unwrap_or_default();
        assert!(kh.starts_with(&format!("{ip} ssh-ed25519 ")), "{kh}");
        // Listed on both sides, with the consumer's endpoint as the provider saw it.
        let list = c.json(&["vm", "list"]);
        assert_eq!(list["renting"][0]["vmId"], vm.as_str(), "{list}");
        let list = p.json(&["vm", "list"]);
        assert_eq!(list["providing"][0]["vmId"], vm.as_str(), "{list}");
        assert!(
            list["providing"][0]["consumerEndpoint"].as_str().is_some_and(|e| e.starts_with("203.0.113.2:")),
            "{list}"
        );
        assert!(p.log().contains(&format!("rental start: VM {vm}")), "{}", p.log());
        // Nothing made: no tunnel interface in the consumer's namespace.
        let links = Command::new("ip").args(["-n", &peer.ns, "-o", "link"]).output().expect("ip link");
        assert!(!String::from_utf8_lossy(&links.stdout).contains(": wg"), "a dry run made a tunnel");
        // Released: gone on both sides; released again: refused by the CLI, not a crash.
        let (code, out, err) = c.omerta(&["vm", "release", &vm]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(out.trim(), format!("VM {vm} released"));
        assert_eq!(c.json(&["vm", "list"])["renting"], serde_json::json!([]));
        assert_eq!(p.json(&["vm", "list"])["providing"], serde_json::json!([]));
        assert!(p.log().contains(&format!("rental end: VM {vm}")) && p.log().contains("released by its consumer"));
        let kh = std::fs::read_to_string(c.home.join("known_hosts")).unwrap_or_default();
        assert!(!kh.contains(&ip), "a released VM's host key stays pinned: {kh}");
        let (code, _, err) = c.omerta(&["vm", "release", &vm]);
        assert!(code == 1 && err.contains("no VM"), "{err}");
        // --json wherever it stands, bad arguments included.
        let (code, out, _) = c.omerta(&["vm", "list", "--json"]);
        assert!(code == 0 && out.starts_with("{\"ok\":true"), "{out}");
        let (code, out, _) = c.omerta(&["--json", "vm", "request"]);
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
        assert!(code == 2 && v["ok"] == false && v["error"].as_str().is_some_and(|e| e.contains("--peer")), "{out}");
        let (code, _, err) = c.omerta(&["vm", "request", "--peer", &pid, "--timeout-minutes", "0"]);
        assert!(code == 1 && err.contains("at least 1"), "{err}");
        // A consumer daemon that stops keeps its leases for its next start; `omertad stop
        // --release` gives them back.
        let v = c.json(&["vm", "request", "--peer", &pid, "--dry-run"]);
        let vm2 = v["vmId"].as_str().expect("vmId").to_string();
        let mut c = c;
        assert_eq!(c.stop_daemon("TERM"), Some(0));
        c.start_daemon(ns, &["--network", &net, "--dry-run"]);
        assert_eq!(c.json(&["vm", "list"])["renting"][0]["vmId"], vm2.as_str(), "{}", c.log());
        assert!(c.log().contains(&format!("VM {vm2} from {pid}: lease kept")), "{}", c.log());
        assert!(!p.log().contains(&format!("rental end: VM {vm2}")), "{}", p.log());
        let ((code, _, err), exit) = c.omertad_stop(&net, true);
        assert_eq!((code, exit), (0, Some(0)), "{err}");
        p.wait_log("the stopped consumer's VM released", 10, |l| {
            l.lines().any(|x| x.contains(&format!("rental end: VM {vm2}")) && x.contains("released by its consumer"))
        });
        drop(c);
        drop(p);
    });
}

/// Sends `msg` to the provider as the member `me` (from a new port of 203.0.113.1) and returns
/// its answer. A member the provider knows at another port is challenged there first: it
/// answers the challenge, as a daemon does, and sends `msg` again.
fn as_member_with(
    me: &mesh::net::SigningKey,
    key: &[u8; 32],
    provider: &str,
    msg: mesh::wire::Message,
) -> Option<mesh::wire::Message> {
    let my_id = mesh::net::peer_id(&me.verifying_key().to_bytes());
    let s = std::net::UdpSocket::bind("203.0.113.1:0").expect("bind");
    s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    let send = |m: mesh::wire::Message| {
        s.send_to(&mesh::wire::seal(key, me, provider, m).expect("seal"), PROVIDER_EP).expect("send");
    };
    send(msg.clone());
    let mut buf = vec![0u8; 9000];
    for _ in 0..3 {
        let n = s.recv(&mut buf).ok()?;
        let (env, _) = mesh::wire::open(key, &my_id, &buf[..n], mesh::now_s()).ok()?;
        match env.payload {
            mesh::wire::Message::Ping { nonce } if !matches!(msg, mesh::wire::Message::Ping { .. }) => {
                send(mesh::wire::Message::Pong { nonce });
                std::thread::sleep(Duration::from_millis(100));
                send(msg.clone());
            }
            other => return Some(other),
        }
    }
    None
}

/// [`as_member_with`] a fresh identity.
pub(crate) fn as_member(key: &[u8; 32], provider: &str, msg: mesh::wire::Message) -> Option<mesh::wire::Message> {
    as_member_with(&ed25519_dalek_key(), key, provider, msg)
}

/// The network key as stored in a node's home (read as root: the daemon would refuse a home
/// of another user).
pub(crate) fn network_key(home: &Path, net: &str) -> [u8; 32] {
    let text = std::fs::read_to_string(home.join("networks").join(format!("{net}.json"))).expect("the network file");
    let inv: mesh::net::Invite = serde_json::from_str(&text).expect("the network's JSON");
    mesh::net::Network::from_invite(inv).expect("the network").key
}

fn ed25519_dalek_key() -> mesh::net::SigningKey {
    mesh::net::SigningKey::from_bytes(&mesh::random::<32>().expect("random"))
}

/// A request that passes every check (from 203.0.113.1, in dry run unless changed).
fn good_request() -> mesh::wire::VmRequest {
    mesh::wire::VmRequest {
        request_id: "00112233aabbccdd".into(),
        requirements: mesh::wire::Requirements { cpu_cores: 1, memory_mb: 1024, ..Default::default() },
        consumer_public_key: control::provision::wg_keypair().expect("key").1,
        consumer_endpoint: "203.0.113.1:51900".into(),
        consumer_vpn_ip: "10.77.1.1".into(),
        vm_vpn_ip: "10.77.1.2".into(),
        ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMJJaCgxwgG8k2yq9OFDQ4zYmkBrj3AnqmsVC6WxQ9YU".into(),
        ssh_user: "omerta".into(),
        timeout_minutes: None,
        dry_run: true,
        consumer_proof_key: None,
    }
}

fn error_of(m: &Option<mesh::wire::Message>) -> String {
    match m {
        Some(mesh::wire::Message::VmError { error, .. }) => error.clone(),
        other => format!("not a vm_error: {other:?}"),
    }
}

#[test]
fn mesh_provider_policy() {
    // Who may rent, how much, a provider whose engine does not answer, a dry run the
    // provider did not choose; the IPC socket fed garbage.
    private_netns(|ns| {
        let peer = VethPeer::new(ns, "mpolicy");
        let a = ed25519_dalek_key();
        let b = ed25519_dalek_key();
        let a_id = mesh::net::peer_id(&a.verifying_key().to_bytes());
        let p_args = [
            "--engine-socket",
            "/nonexistent/engine.sock",
            "--allow-peer",
            &a_id,
            "--max-vms",
            "1",
            "--max-memory",
            "2048",
        ];
        let (p, _c, net, pid) = pair(ns, &peer, "policy", true, &p_args, &["--dry-run", "--no-provider"]);
        let key = network_key(&p.home, &net);
        let ask = |who: &mesh::net::SigningKey, r: mesh::wire::VmRequest| {
            as_member_with(who, &key, &pid, mesh::wire::Message::VmRequest(Box::new(r)))
        };
        let e = error_of(&ask(&b, good_request()));
        assert!(e.contains("may not rent"), "{e}");
        let mut big = good_request();
        big.requirements.memory_mb = 4096;
        big.dry_run = false;
        let e = error_of(&ask(&a, big));
        assert!(e.contains("4096 MB of memory"), "{e}");
        let mut real = good_request();
        real.dry_run = false;
        let e = error_of(&ask(&a, real));
        assert!(e.contains("no engine answers at /nonexistent/engine.sock"), "{e}");
        // Behind NAT: an endpoint that is not the source is refused without a proof key, and
        // not looked at with one (the engine learns the endpoint from proofs).
        let mut natted = good_request();
        natted.dry_run = false;
        natted.consumer_endpoint = "192.168.77.2:51900".into();
        let e = error_of(&ask(&a, natted.clone()));
        assert!(e.contains("not the request's source address") && e.contains("consumerProofKey"), "{e}");
        natted.consumer_proof_key = Some("not-a-key".into());
        let e = error_of(&ask(&a, natted.clone()));
        assert!(e.contains("consumerProofKey"), "{e}");
        natted.consumer_proof_key = Some(control::provision::wg_keypair().expect("key").1);
        let e = error_of(&ask(&a, natted));
        assert!(e.contains("no engine answers"), "past the policy, to the engine: {e}");
        // A member cannot make a real provider pretend (a dry run is the provider's choice).
        let e = error_of(&ask(&a, good_request()));
        assert!(e.contains("not in dry run"), "{e}");
        // The IPC socket: a huge length, not JSON, an unknown request, a cut frame.
        let sock = p.home.join("run").join(format!("omertad-{net}.sock"));
        let frames: [&[u8]; 4] =
            [&[0xff, 0xff, 0xff, 0xff], b"\0\0\0\x05hello", b"\0\0\0\x11{\"type\":\"reboot\"}", b"\0\0\0\x64{\"ty"];
        for f in frames {
            use std::io::{Read as _, Write as _};
            let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
            s.write_all(f).expect("write");
            s.shutdown(std::net::Shutdown::Write).expect("shutdown");
            let mut reply = Vec::new();
            let _ = s.read_to_end(&mut reply);
            let text = String::from_utf8_lossy(reply.get(4..).unwrap_or_default()).into_owned();
            assert!(text.contains("\"ok\":false"), "{f:?}: {text}");
        }
        let st = p.json(&["status"]);
        assert_eq!(st["peerId"], pid.as_str(), "{st}");
    });
}

#[test]
fn mesh_consumer_drops_what_its_provider_lost() {
    // A provider daemon killed (or stopped) and started again adopts its rentals: its
    // heartbeats list the VM again and the consumer keeps it. One stopped with --release
    // ends them and tells the consumer, whose lease shows why until it releases it.
    private_netns(|ns| {
        let peer = VethPeer::new(ns, "mlost");
        let p_args = ["--dry-run", "--heartbeat-interval", "1"];
        let c_args = ["--dry-run", "--no-provider", "--keepalive", "1"];
        let (mut p, c, net, pid) = pair(ns, &peer, "lost", true, &p_args, &c_args);
        let v = c.json(&["vm", "request", "--network", &net, "--peer", &pid, "--dry-run"]);
        let vm = v["vmId"].as_str().expect("vmId").to_string();
        std::thread::sleep(Duration::from_secs(6));
        assert_eq!(c.json(&["vm", "list"])["renting"][0]["vmId"], vm.as_str(), "kept while listed: {}", c.log());
        let mut a = vec!["--network", net.as_str()];
        a.extend_from_slice(&p_args);
        for signal in ["KILL", "TERM"] {
            p.stop_daemon(signal);
            p.start_daemon(ns, &a);
            assert!(p.log().contains(&format!("rental adopted: VM {vm}")), "SIG{signal}: {}", p.log());
            assert_eq!(p.json(&["vm", "list"])["providing"][0]["vmId"], vm.as_str(), "SIG{signal}");
            // Heartbeats resume (one a second here) and the consumer keeps its VM.
            std::thread::sleep(Duration::from_secs(5));
            assert!(!c.log().contains("no longer listed"), "SIG{signal}: {}", c.log());
            assert_eq!(c.json(&["vm", "list"])["renting"][0]["vmId"], vm.as_str(), "SIG{signal}: {}", c.log());
        }
        let (said, code) = p.omertad_stop(&net, true);
        assert_eq!((said.0, code), (0, Some(0)), "{said:?}\n{}", p.log());
        assert!(said.2.contains("stopping and ending its rentals") && said.2.contains("stopped"), "{said:?}");
        assert!(p.log().contains(&format!("rental end: VM {vm}")), "{}", p.log());
        // The consumer is told: its lease shows why, and a release clears it.
        c.wait_log("the consumer hears of the release", 15, |l| {
            l.contains(&format!("VM {vm} failed at its provider: the provider released its rentals"))
        });
        let state = c.json(&["vm", "list"])["renting"][0]["state"].clone();
        assert_eq!(state, "failed: the provider released its rentals", "{}", c.log());
        p.start_daemon(ns, &a);
        assert!(!p.log().contains("rental adopted"), "{}", p.log());
        // Once the new daemon knows the consumer again (its keepalive), the release passes.
        let me = c.json(&["status"])["peerId"].as_str().unwrap_or_default().to_string();
        let end = Instant::now() + Duration::from_secs(30);
        while !p.json(&["peers"]).to_string().contains(&me) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(200));
        }
        let (code, out, err) = c.omerta(&["vm", "release", "--network", &net, &vm]);
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(c.json(&["vm", "list"])["renting"], serde_json::json!([]));
    });
}

#[test]
fn mesh_peer_fields_are_checked() {
    // A member of the network sends vm_request with hostile fields: each is refused with a
    // reason; the limit of VMs holds; only a VM's renter may release it; the daemon survives
    // garbage, replays and stale messages.
    private_netns(|ns| {
        let peer = VethPeer::new(ns, "mfields");
        let (p, _c, net, pid) =
            pair(ns, &peer, "fields", true, &["--dry-run", "--max-vms", "1"], &["--dry-run", "--no-provider"]);
        let key = network_key(&p.home, &net);
        let good = good_request;
        type Edit = fn(&mut mesh::wire::VmRequest);
        let hostile: [(&str, Edit); 9] = [
            (",mode=direct", |r| r.consumer_endpoint = "203.0.113.1:51900,mode=direct".into()),
            ("a newline", |r| r.ssh_public_key.push_str("\nssh-ed25519 AAAA")),
            ("../", |r| r.ssh_user = "../root".into()),
            ("an oversized key", |r| r.consumer_public_key = "A".repeat(4000)),
            ("0.0.0.0/0", |r| r.vm_vpn_ip = "0.0.0.0/0".into()),
            ("another source", |r| r.consumer_endpoint = "203.0.113.2:51900".into()),
            ("too many vCPUs", |r| r.requirements.cpu_cores = 999),
            ("root", |r| r.ssh_user = "root".into()),
            ("a comment with a comma", |r| r.ssh_public_key.push_str(" a,b")),
        ];
        for (what, edit) in hostile {
            let mut r = good();
            edit(&mut r);
            let answer = as_member(&key, &pid, mesh::wire::Message::VmRequest(Box::new(r)));
            assert!(
                matches!(&answer, Some(mesh::wire::Message::VmError { error, .. }) if !error.is_empty()),
                "{what}: {answer:?}"
            );
        }
        // The same request without the hostile field is served; a second one meets the limit.
        let a = ed25519_dalek_key();
        let b = ed25519_dalek_key();
        let answer = as_member_with(&a, &key, &pid, mesh::wire::Message::VmRequest(Box::new(good())));
        let Some(mesh::wire::Message::VmCreated(c)) = answer else { panic!("a good request: {answer:?}") };
        let e = error_of(&as_member_with(&a, &key, &pid, mesh::wire::Message::VmRequest(Box::new(good()))));
        assert!(e.contains("limit of 1 VMs"), "{e}");
        // Only its renter may release a VM; an unknown VM is released (idempotent).
        let release = |who: &mesh::net::SigningKey, vm: &str| {
            as_member_with(who, &key, &pid, mesh::wire::Message::VmRelease { vm_id: vm.into() })
        };
        assert_eq!(error_of(&release(&b, &c.vm_id)), "Not authorized to release this VM");
        let gone = release(&b, "0123456789abcdef");
        assert_eq!(gone, Some(mesh::wire::Message::VmReleased { vm_id: "0123456789abcdef".into() }));
        assert_eq!(release(&a, &c.vm_id), Some(mesh::wire::Message::VmReleased { vm_id: c.vm_id.clone() }));
        // Garbage, an oversized datagram, a replay: dropped; the daemon still answers.
        let s = std::net::UdpSocket::bind("203.0.113.1:0").expect("bind");
        for d in [vec![0u8; 0], vec![0xff; 40], vec![7; 60_000]] {
            let _ = s.send_to(&d, PROVIDER_EP);
        }
        let me = ed25519_dalek_key();
        let d = mesh::wire::seal(&key, &me, &pid, mesh::wire::Message::Ping { nonce: "1".into() }).expect("seal");
        s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
        s.send_to(&d, PROVIDER_EP).expect("send");
        let mut buf = vec![0u8; 9000];
        assert!(s.recv(&mut buf).is_ok(), "the first ping is answered");
        s.set_read_timeout(Some(Duration::from_millis(700))).expect("timeout");
        s.send_to(&d, PROVIDER_EP).expect("send");
        assert!(s.recv(&mut buf).is_err(), "a replayed ping is answered");
        let stale = mesh::wire::seal_at(
            &key,
            &me,
            &pid,
            mesh::wire::Message::Ping { nonce: "2".into() },
            mesh::now_s() - 600,
            0,
        )
        .expect("seal");
        s.send_to(&stale, PROVIDER_EP).expect("send");
        assert!(s.recv(&mut buf).is_err(), "a stale ping is answered");
        let st = p.json(&["status"]);
        assert!(st["droppedDatagrams"].as_u64().unwrap_or(0) >= 4, "{st}");
    });
}

#[test]
fn mesh_heartbeat_reclaim_and_endpoint_update() {
    private_netns(|ns| {
        let peer = VethPeer::new(ns, "mbeat");
        let p_args = ["--dry-run", "--heartbeat-interval", "1", "--heartbeat-timeout", "4", "--keepalive", "1"];
        let (p, mut c, net, pid) =
            pair(ns, &peer, "beat", true, &p_args, &["--dry-run", "--no-provider", "--keepalive", "1"]);
        let v = c.json(&["vm", "request", "--network", &net, "--peer", &pid, "--dry-run"]);
        let vm = v["vmId"].as_str().expect("vmId").to_string();
        // Heartbeats are answered: the VM stays past the timeout.
        std::thread::sleep(Duration::from_secs(6));
        assert_eq!(p.json(&["vm", "list"])["providing"][0]["vmId"], vm.as_str(), "{}", p.log());
        // The consumer's address changes: it tells the provider, which checks the source.
        // (Deleting the primary address first: it would take a secondary of its subnet along.)
        Command::new("ip").args(["-n", &peer.ns, "addr", "del", "203.0.113.2/24", "dev", "vc0"]).status().expect("ip");
        Command::new("ip").args(["-n", &peer.ns, "addr", "add", "203.0.113.3/24", "dev", "vc0"]).status().expect("ip");
        p.wait_log("the endpoint update", 15, |l| l.contains(&format!("VM {vm}: consumer endpoint now 203.0.113.3:")));
        // The consumer is gone (killed: no goodbye): the provider reclaims its VM.
        c.stop_daemon("KILL");
        p.wait_log("the reclaim", 20, |l| l.contains(&format!("rental end: VM {vm}")) && l.contains("reclaimed"));
        assert_eq!(p.json(&["vm", "list"])["providing"], serde_json::json!([]));
        drop(p);
    });
}

/// The rental's disk, as the real run saw it (issue 26).
#[derive(Default, Debug)]
pub struct DiskSeen {
    /// VMM directories under the launcher's state while the VM ran.
    pub dirs_running: usize,
    /// The guest's root file system, MB.
    pub df_mb: u64,
    /// The guest writing its disk full.
    pub fill: Out,
    /// The VM's disk file's allocated bytes on the host after that.
    pub allocated: u64,
    /// The most the grant lets it take (`qemu-img measure`).
    pub grant: u64,
    /// A request for more than the state directory's room.
    pub too_large: Out,
    pub dirs_after_refusal: usize,
    pub dirs_after_release: usize,
}

/// What the real run saw (`realvm::mesh_vm_request`, `mesh_wireguard_tunnel`,
/// `mesh_ssh_access`, `mesh_rental_disk` check a part each).
/// A host that ran out of room (issue 26, h).
#[derive(Default, Debug)]
pub struct PauseSeen {
    /// The state directory's file system was filled but for 64 MiB.
    pub filled: bool,
    /// The engine's `guest.paused`.
    pub engine: Option<String>,
    /// The launcher's line.
    pub launcher_said: bool,
    /// The consumer's `vm list` state, paused and after.
    pub consumer: String,
    pub consumer_after: String,
    /// The guest's write completed once there was room.
    pub wrote: bool,
    pub resumed_said: bool,
}

/// A tmpfs mounted for a test, lazily unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mount -t tmpfs on {}", at.display());
        Self(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        // The mount point, empty again.
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Issue 26 (b): the provider's engine restarted under a launcher that outlives it.
#[derive(Debug, Default)]
pub struct EngineRestartSeen {
    /// A line through an SSH session opened before the restarts came back before them.
    pub session_before: bool,
    /// Per signal: the same session answered after the restart, and the VMM's pid then.
    pub rounds: Vec<(String, bool, Option<u64>)>,
    /// In the VM after both: the mark and the boot ID.
    pub after: Out,
    /// The engine said it restored the VM.
    pub restored_said: bool,
}

/// Issue 26 (d): the provider's host "rebooted" (every process of it killed, its runtime
/// directories emptied, its state directory kept).
#[derive(Debug, Default)]
pub struct RebootSeen {
    /// The VMM was gone after the kill.
    pub vmm_died: bool,
    /// In the VM after the reboot: the mark and the boot ID.
    pub after: Out,
    /// The provider's daemon said it boots the VM again.
    pub resumed_said: bool,
    /// The engine's state of the VM when it answered again.
    pub engine_state: String,
    pub engine_log: String,
    /// The second rental, its lease run out during a second reboot: its disk was kept over
    /// the reboot, the engine held it `kept`, the daemon said why it ended it, and its VMM
    /// directory was gone after.
    pub expired_kept: bool,
    pub expired_engine_before: String,
    pub expired_said: bool,
    pub expired_dirs: usize,
}

/// The provider daemon killed and started again (issue 26, a).
#[derive(Default, Debug)]
pub struct AdoptSeen {
    /// In the VM before: the mark written, the boot ID.
    pub before: Out,
    pub pid_before: Option<u64>,
    /// The successor's line about it.
    pub said: String,
    pub pid_after: Option<u64>,
    /// In the VM after: the mark, the boot ID.
    pub after: Out,
    /// The successor's `vm list`.
    pub listed: Value,
}

#[derive(Debug, Default)]
pub struct RealSeen {
    pub disk: DiskSeen,
    pub pause: PauseSeen,
    pub adopt: AdoptSeen,
    pub engine_restart: EngineRestartSeen,
    pub reboot: RebootSeen,
    /// The consumer's daemon restarted after each signal: `omerta ssh VM -- cat mark`.
    pub consumer_restarts: Vec<(String, Out)>,
    pub request: Out,
    pub request_s: f64,
    pub vm: String,
    pub vm_ip: String,
    pub interface: String,
    pub provider_list: Value,
    pub engine_vm: Value,
    pub handshake: u64,
    pub transfer: (u64, u64),
    pub login: Out,
    /// `omerta ssh VM -- id -un` and `omerta vm show --json` where the tunnel is an interface.
    pub omerta_ssh: Out,
    pub show: Value,
    pub escape: Out,
    pub drops: (u64, u64),
    pub leaks: Vec<String>,
    /// Connections the VM opened to a listener of the consumer's, through the tunnel.
    pub into_consumer: usize,
    pub release: Out,
    pub engine_after_release: Value,
    pub links_after_release: String,
    /// The second VM's rental adopted by the daemon started after a SIGTERM.
    pub vm2_adopted: bool,
    /// The engine's VMs after that SIGTERM (the second VM still runs).
    pub engine_after_restart: Value,
    /// `omertad stop --release`: what it said, and the daemon's exit code.
    pub release_stop: (Out, Option<i32>),
    pub stop_code: Option<i32>,
    pub engine_after_stop: Value,
    pub links_after_consumer_stop: String,
    pub provider_log: String,
    pub consumer_log: String,
}

fn mesh_vms(e: &omerta_it::EngineProc) -> Value {
    let all = e.json(&["vm", "list"]);
    Value::Array(
        all.as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["name"].as_str().is_some_and(|n| n.starts_with("mesh-")))
            .cloned()
            .collect(),
    )
}

fn links(ns: &str) -> String {
    let out = Command::new("ip").args(["-n", ns, "-o", "link"]).output().expect("ip link");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The plan's cross-machine run, once for the three tests that share it: `vm request --wait`
/// on the consumer boots the Debian cloud image at the provider's engine; then OpenSSH through
/// the tunnel, root's escape attempts, release, a crashed provider's leftovers, and stops.
pub fn real_run() -> Option<&'static RealSeen> {
    static RUN: std::sync::OnceLock<Option<RealSeen>> = std::sync::OnceLock::new();
    RUN.get_or_init(|| {
        let (base, _, _) = omerta_it::cloud_image()?;
        let image = base.parent().expect("image dir").to_path_buf();
        private_netns(move |ns| real(ns, &image)).flatten()
    })
    .as_ref()
}

fn real(ns: &Netns, image: &Path) -> Option<RealSeen> {
    let slot = omerta_it::GuestSlot::take();
    let mut seen = RealSeen::default();
    let peer = VethPeer::new(ns, "mreal");
    let wg = Command::new("wg").arg("--version").output().is_ok_and(|o| o.status.success());
    if !omerta_it::require(
        "wireguard-tools (wg; make setup installs it)",
        if wg { Ok(()) } else { Err("no wg".into()) },
    ) {
        return None;
    }
    // The state directory on a file system of its own, which the test can fill (issue 26,
    // h): the launcher makes its directories there at the first VM. The launcher is a
    // process of its own, which the engine's VMMs outlive (issue 26, b).
    let state = std::env::temp_dir().join(format!("omerta-mesh-state-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&state);
    let _tmpfs = Tmpfs::mount(&state, "4g");
    let mut launcher = omerta_it::LauncherProc::start(ns, "mesh", &state);
    let mut engine_args = vec!["--image-dir".to_string(), image.display().to_string()];
    engine_args.extend(launcher.engine_args());
    let mut e = omerta_it::EngineProc::start(ns, "mesh", &engine_args);
    let (control, img) = (e.control.display().to_string(), image.display().to_string());
    // Disks up to the state directory's room: the engine's admission, not the daemon's
    // policy, refuses one too large (issue 26, f).
    let provider =
        ["--engine-socket", &control, "--image", &img, "--heartbeat-interval", "3", "--max-disk", "4000000000"];
    let (mut p, mut c, net, pid) = pair(ns, &peer, "real", false, &provider, &["--no-provider"]);
    let p_args: Vec<&str> = ["--network", &net].into_iter().chain(provider).collect();

    // The plan's step 3, with --wait: returns once SSH answers through the tunnel.
    let t0 = Instant::now();
    // A disk of 2560 MB, larger than the image's 2048: the guest's root grows to it.
    let disk_mb = "2560";
    seen.request =
        c.omerta(&["vm", "request", "--peer", &pid, "--cpus", "1", "--memory", "1024", "--disk", disk_mb, "--wait"]);
    seen.request_s = t0.elapsed().as_secs_f64();
    let out = seen.request.1.clone();
    let field = |k: &str| out.lines().find_map(|l| l.trim().strip_prefix(k)).map(|v| v.trim().to_string());
    seen.vm = field("VM ID:").unwrap_or_default();
    seen.vm_ip = field("VM IP:").unwrap_or_default();
    seen.interface = field("VPN Interface:").and_then(|i| i.split(' ').next().map(str::to_string)).unwrap_or_default();
    let ssh = field("SSH:").unwrap_or_default();
    if seen.request.0 != 0 || seen.vm.is_empty() {
        seen.provider_log = p.log();
        seen.consumer_log = c.log();
        return Some(seen);
    }
    // The printed SSH command as the consumer would type it (plus batch mode, no agent).
    let ssh_command = |cmd: &str| -> Command {
        let words: Vec<&str> = ssh.split_whitespace().collect();
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &peer.ns, "timeout", "300", words[0]]);
        c.args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=20", "-o", "IdentitiesOnly=yes", "-F", "/dev/null"]);
        c.args(&words[1..]).arg(cmd);
        c
    };
    let run_ssh = |cmd: &str, stdin: Option<&str>| -> Out {
        let mut c = ssh_command(cmd);
        c.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("ssh");
        if let (Some(text), Some(mut i)) = (stdin, child.stdin.take()) {
            use std::io::Write as _;
            let _ = i.write_all(text.as_bytes());
        }
        let o = child.wait_with_output().expect("ssh");
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        seen.login = run_ssh("id -un; hostname", None);
        if seen.login.0 == 0 || Instant::now() > end {
            break;
        }
        std::thread::sleep(Duration::from_secs(3));
    }
    let wg_show = |what: &str| {
        let o = Command::new("ip").args(["netns", "exec", &peer.ns, "wg", "show", &seen.interface, what]).output();
        o.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
    };
    // The commands that work the same in every tunnel mode, here with an interface.
    seen.omerta_ssh = c.omerta(&["ssh", &seen.vm, "--", "id", "-un"]);
    seen.show = c.json(&["vm", "show", &seen.vm]);
    seen.handshake = wg_show("latest-handshakes").split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    let t: Vec<u64> = wg_show("transfer").split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    seen.transfer = (t.first().copied().unwrap_or(0), t.get(1).copied().unwrap_or(0));

    // Root in the VM drops its firewall and tries the internet, the LAN and the provider host.
    let name = format!("mesh-{}", seen.vm);
    let drops = |e: &omerta_it::EngineProc| {
        let s = &e.json(&["stats", &name])[0];
        s["drops"]["not_allowed"].as_u64().unwrap_or(0)
    };
    let sinks = omerta_it::ForbiddenSinks::start(ns);
    let host = omerta_it::Sink::on(ns, [203, 0, 113, 1], 22);
    // A service of the consumer's on every address, its tunnel's included: the VM may not
    // open a connection to it (the consumer's daemon fences the tunnel).
    let service = peer.run(|| std::net::TcpListener::bind("0.0.0.0:2222").expect("a consumer service"));
    service.set_nonblocking(true).expect("nonblocking");
    let consumer_tunnel = seen.vm_ip.rsplit_once('.').map(|(net, _)| format!("{net}.1")).unwrap_or_default();
    let before = drops(&e);
    let script = format!(
        "iptables -P INPUT ACCEPT; iptables -P OUTPUT ACCEPT; iptables -F; \
        for d in 8.8.8.8/53 8.8.4.4/53 192.168.1.1/80 203.0.113.1/22 203.0.113.1/9999; do \
        echo leak > /dev/udp/${{d%/*}}/${{d#*/}}; echo leak > /dev/udp/${{d%/*}}/${{d#*/}}; done; \
        timeout 5 bash -c 'echo in > /dev/tcp/{consumer_tunnel}/2222' && echo TUNNEL-OPEN || echo TUNNEL-FENCED; \
        echo ESCAPES-SENT\n"
    );
    seen.escape = run_ssh("sudo bash -s", Some(&script));
    while service.accept().is_ok() {
        seen.into_consumer += 1;
    }
    std::thread::sleep(Duration::from_secs(2));
    seen.drops = (before, drops(&e));
    let mut leaks: Vec<String> = sinks.leaks().iter().map(|(ep, n)| format!("{ep}: {n}")).collect();
    let n = host.finish();
    if n > 0 {
        leaks.push(format!("203.0.113.1:22: {n}"));
    }
    seen.leaks = leaks;
    seen.engine_vm = e.json(&["vm", "show", &name]);
    // The provider learns of readiness on its heartbeat round (every 3 s here).
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        seen.provider_list = p.json(&["vm", "list"]);
        if seen.provider_list["providing"][0]["state"] == "ready" || Instant::now() > end {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }

    // The disk (issue 26): the guest's root has the size granted; written full, the guest
    // gets "no space" from its own file system while its disk file on the host stays within
    // the grant; a rental larger than the state directory's room is refused with its reason
    // and makes nothing; released, its files are gone.
    let vms_dir = e.state_dir().join("launcher/vms");
    // (h) The host runs out of room (something else fills the state directory's file system):
    // the guest writing is paused, not failed; the launcher says so, the engine shows it, the
    // consumer is told; room again, it goes on by itself and its write completes.
    let free = sys::fs_available(&vms_dir).unwrap_or(0);
    let filler = e.state_dir().join("filler");
    let made = Command::new("fallocate").args(["-l", &free.saturating_sub(64 << 20).to_string()]).arg(&filler).status();
    seen.pause.filled = made.is_ok_and(|s| s.success());
    let writer =
        ssh_command("sudo dd if=/dev/zero of=/big bs=4M count=64 oflag=direct status=none && sync && echo WROTE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ssh");
    let wait_for = |secs: u64, what: &mut dyn FnMut() -> bool| {
        let end = Instant::now() + Duration::from_secs(secs);
        while !what() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    wait_for(60, &mut || {
        let (_, out, _) = e.ctl(&["--json", "vm", "show", &name]);
        seen.pause.engine =
            serde_json::from_str::<Value>(&out).ok().and_then(|v| v["guest"]["paused"].as_str().map(str::to_string));
        seen.pause.engine.is_some()
    });
    wait_for(20, &mut || {
        seen.pause.consumer = c.json(&["vm", "list"])["renting"][0]["state"].as_str().unwrap_or_default().to_string();
        seen.pause.consumer.starts_with("paused")
    });
    // The launcher's own log: it is a process of its own here.
    seen.pause.launcher_said =
        launcher.log().lines().any(|l| l.contains(&format!("vm {name}: paused: the state directory is full")));
    let _ = std::fs::remove_file(&filler);
    let done = writer.wait_with_output().expect("ssh");
    seen.pause.wrote = String::from_utf8_lossy(&done.stdout).contains("WROTE");
    wait_for(20, &mut || {
        seen.pause.consumer_after =
            c.json(&["vm", "list"])["renting"][0]["state"].as_str().unwrap_or_default().to_string();
        seen.pause.consumer_after == "active"
    });
    seen.pause.resumed_said = launcher.log().contains(&format!("vm {name}: room again"));
    let _ = run_ssh("sudo rm -f /big; sync", None);
    let held = || -> Vec<PathBuf> {
        std::fs::read_dir(&vms_dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
    };
    seen.disk.dirs_running = held().len();
    seen.disk.df_mb = run_ssh("df -B1M --output=size / | tail -1", None).1.trim().parse().unwrap_or(0);
    seen.disk.fill = run_ssh(
        "sudo dd if=/dev/zero of=/fill bs=4M oflag=direct status=none; sync; sudo rm -f /fill; echo FILLED",
        None,
    );
    let allocated = |p: &Path| std::fs::metadata(p).map(|m| m.blocks() * 512);
    seen.disk.allocated = held().first().and_then(|d| allocated(&d.join("disk.qcow2")).ok()).unwrap_or(u64::MAX);
    seen.disk.grant = hv::cloud::measure(disk_mb.parse::<u64>().unwrap() << 20).unwrap_or(0);
    let free_mb = sys::fs_available(&vms_dir).unwrap_or(0) >> 20;
    seen.disk.too_large = c.omerta(&[
        "vm",
        "request",
        "--peer",
        &pid,
        "--cpus",
        "1",
        "--memory",
        "1024",
        "--disk",
        &(free_mb + 1024).to_string(),
    ]);
    seen.disk.dirs_after_refusal = held().len();

    // Issue 26 (a): the provider's daemon killed and started again adopts the rental: the
    // same VMM (pid) and guest (boot ID), the file written before still there.
    // None when the engine no longer has the VM.
    let guest_pid = |e: &omerta_it::EngineProc| {
        let (_, out, _) = e.ctl(&["--json", "vm", "show", &name]);
        serde_json::from_str::<Value>(&out).ok()?["guest"]["pid"].as_u64()
    };
    seen.adopt.before =
        run_ssh("echo kept-$$ | tee /home/omerta/mark; sync; cat /proc/sys/kernel/random/boot_id", None);
    seen.adopt.pid_before = guest_pid(&e);
    p.stop_daemon("KILL");
    p.start_daemon(ns, &p_args);
    seen.adopt.said = p.log().lines().find(|l| l.contains("rental adopted")).unwrap_or_default().to_string();
    seen.adopt.pid_after = guest_pid(&e);
    seen.adopt.after = run_ssh("cat /home/omerta/mark; cat /proc/sys/kernel/random/boot_id", None);
    seen.adopt.listed = p.json(&["vm", "list"])["providing"].clone();

    // Issue 26 (b): the engine stopped, then killed, and started again each time takes the
    // VM over: an SSH session opened before answers after, the same VMM and boot, the mark.
    {
        use std::io::{BufRead as _, Write as _};
        let mut session =
            ssh_command("cat").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("ssh");
        let (tx, rx) = std::sync::mpsc::channel();
        let out = session.stdout.take().expect("the session's output");
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut input = session.stdin.take().expect("the session's input");
        let mut echo = |word: &str| {
            let _ = writeln!(input, "{word}").and_then(|()| input.flush());
            rx.recv_timeout(Duration::from_secs(90)).is_ok_and(|l| l == word)
        };
        seen.engine_restart.session_before = echo("before");
        for signal in ["TERM", "KILL"] {
            e.restart(signal);
            let back = echo(&format!("after-{signal}"));
            seen.engine_restart.rounds.push((signal.to_string(), back, guest_pid(&e)));
        }
        drop(input);
        let _ = session.kill();
        let _ = session.wait();
    }
    seen.engine_restart.after = run_ssh("cat /home/omerta/mark; cat /proc/sys/kernel/random/boot_id", None);
    seen.engine_restart.restored_said = e.stderr().contains(&format!("vm {name}: restored"));

    // Issue 26 (c): the consumer's daemon killed, then stopped, and started again makes its
    // tunnel again with the kept keys: `omerta ssh` reads the mark, with no other command.
    let c_args = ["--network", net.as_str(), "--no-provider"];
    for signal in ["KILL", "TERM"] {
        c.stop_daemon(signal);
        c.start_daemon(ns, &c_args);
        let end = Instant::now() + Duration::from_secs(90);
        let out = loop {
            let o = c.omerta(&["ssh", &seen.vm, "--", "cat", "/home/omerta/mark"]);
            if o.0 == 0 || Instant::now() > end {
                break o;
            }
            std::thread::sleep(Duration::from_secs(2));
        };
        seen.consumer_restarts.push((signal.to_string(), out));
    }

    // Issue 26 (d): the provider's host goes down as a crash would take it (its launcher,
    // engine and daemon killed: the VMM dies with its launcher), its runtime directories are
    // emptied, its state directory stays; started again, the daemon boots the rental again
    // from its disk (its lease is valid): the same keys and address, and the consumer reaches
    // it with no command of its own.
    let vmm = guest_pid(&e);
    p.stop_daemon("KILL");
    e.end("KILL");
    launcher.restart(ns, "KILL");
    seen.reboot.vmm_died = vmm.is_some_and(|pid| {
        let end = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(100));
        }
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    let _ = std::fs::remove_dir_all(e.dir.join("ctl"));
    e.restart("KILL");
    p.start_daemon(ns, &p_args);
    let end = Instant::now() + Duration::from_secs(300);
    loop {
        seen.reboot.after = run_ssh("cat /home/omerta/mark; cat /proc/sys/kernel/random/boot_id", None);
        if seen.reboot.after.0 == 0 || Instant::now() > end {
            break;
        }
        std::thread::sleep(Duration::from_secs(3));
    }
    seen.reboot.resumed_said = p.log().contains(&format!("({name}) boots again from its disk"));
    let (_, out, _) = e.ctl(&["--json", "vm", "show", &name]);
    seen.reboot.engine_state = serde_json::from_str::<Value>(&out)
        .ok()
        .and_then(|v| v["state"].as_str().map(str::to_string))
        .unwrap_or_default();
    seen.reboot.engine_log = e.stderr();

    // Released: the engine forgets the VM, the consumer's interface goes.
    seen.release = c.omerta(&["vm", "release", &seen.vm]);
    seen.engine_after_release = mesh_vms(&e);
    seen.links_after_release = links(&peer.ns);
    seen.disk.dirs_after_release = held().len();
    drop(slot);

    // A provider daemon stopped (SIGTERM) keeps its VMs running, and its successor adopts
    // them; one stopped with `omertad stop --release` ends them.
    let slot = omerta_it::GuestSlot::take();
    // (A disk the size of the image: the state directory is a 4 GiB tmpfs.)
    let r = c.json(&["vm", "request", "--peer", &pid, "--cpus", "1", "--memory", "1024", "--disk", "2048"]);
    let vm2 = r["vmId"].as_str().unwrap_or_default().to_string();
    seen.stop_code = p.stop_daemon("TERM");
    seen.engine_after_restart = mesh_vms(&e);
    p.start_daemon(ns, &p_args);
    seen.vm2_adopted = p.log().contains(&format!("rental adopted: VM {vm2}"));
    // Issue 26 (d), the other half: the host goes down again, and this time the rental's
    // lease runs out meanwhile (its last answer made old in the daemon's file): the next
    // daemon does not boot it again; its disk is deleted and its consumer told.
    let name2 = format!("mesh-{vm2}");
    p.stop_daemon("KILL");
    e.end("KILL");
    launcher.restart(ns, "KILL");
    let rentals = p.home.join("provider").join(format!("{net}.json"));
    if let Ok(mut list) = std::fs::read(&rentals)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<Value>(&b).map_err(|e| e.to_string()))
    {
        for r in list.as_array_mut().into_iter().flatten() {
            if r["vm_id"] == vm2.as_str() {
                r["last_ack_s"] = Value::from(1);
            }
        }
        let _ = std::fs::write(&rentals, serde_json::to_vec(&list).unwrap_or_default());
    }
    seen.reboot.expired_kept = held().len() == 1;
    let _ = std::fs::remove_dir_all(e.dir.join("ctl"));
    e.restart("KILL");
    let (_, out, _) = e.ctl(&["--json", "vm", "show", &name2]);
    seen.reboot.expired_engine_before =
        serde_json::from_str::<Value>(&out).ok().and_then(|v| v["state"].as_str().map(str::to_string)).unwrap_or(out);
    p.start_daemon(ns, &p_args);
    let end = Instant::now() + Duration::from_secs(20);
    while !p.log().contains("its lease ran out while its provider was down") && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    seen.reboot.expired_said = p.log().contains("its lease ran out while its provider was down");
    seen.reboot.expired_dirs = held().len();
    let (said, code) = p.omertad_stop(&net, true);
    seen.release_stop = (said, code);
    seen.engine_after_stop = mesh_vms(&e);
    drop(slot);
    // A consumer daemon that stops removes its tunnels.
    c.stop_daemon("TERM");
    seen.links_after_consumer_stop = links(&peer.ns);
    seen.provider_log = p.log();
    seen.consumer_log = c.log();
    Some(seen)
}

/// The consumer's tunnel keeps its fence until its interface is gone (issue 24): while the
/// provider's VM floods new flows at the consumer through the tunnel, removing the tunnel lets
/// none of them in, before, during or after.
#[test]
fn a_tunnels_fence_outlives_its_interface() {
    private_netns(|ns| {
        use std::net::UdpSocket;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        // The "VM": a WireGuard peer in a namespace of its own, 203.0.113.2 beyond a veth,
        // tunnel address 10.77.0.2.
        let Some(vm) = omerta_it::RealWgConsumer::start(ns, "fence", &["10.77.0.2/24"]) else { return };
        // The consumer: mesh's own tunnel, here, 10.77.0.1 listening on 203.0.113.1:51901.
        let dir = std::env::temp_dir().join(format!("omerta-fence-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (private, public) = control::provision::wg_keypair().expect("keys");
        let key = dir.join("private.key");
        std::fs::write(&key, private).unwrap();
        let name = format!("wgf{}", std::process::id() % 100_000);
        let mut t =
            mesh::tunnel::Tunnel::create(&name, &key, 51901, "10.77.0.1".parse().unwrap(), true, true).expect("tunnel");
        t.add_peer(&vm.public, "10.77.0.2".parse().unwrap()).expect("peer");
        vm.wg(&["set", &vm.ifname, "peer", &public, "allowed-ips", "10.77.0.1/32", "endpoint", "203.0.113.1:51901"]);
        // What the VM must never reach: a service on the consumer.
        let listener = UdpSocket::bind("10.77.0.1:5555").expect("a service on the consumer");
        listener.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flood = {
            let stop = stop.clone();
            vm.run(move || {
                std::thread::spawn(move || {
                    let s = UdpSocket::bind("10.77.0.2:0").expect("the VM's socket");
                    let end = Instant::now() + Duration::from_secs(20);
                    let mut sent = 0u64;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                        if s.send_to(b"from-the-vm", "10.77.0.1:5555").is_ok() {
                            sent += 1;
                        }
                        if sent.is_multiple_of(64) {
                            std::thread::sleep(Duration::from_micros(200));
                        }
                    }
                    sent
                })
            })
        };
        // The tunnel carries the flood (a handshake, bytes in), and the fence drops all of it.
        let end = Instant::now() + Duration::from_secs(10);
        while t.last_handshake() == 0 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(t.last_handshake() > 0, "the VM's peer never made its handshake");
        let mut got = 0usize;
        let mut buf = [0u8; 64];
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            got += usize::from(listener.recv_from(&mut buf).is_ok());
        }
        assert_eq!(got, 0, "the fence lets no new flow of the VM in");
        // Removed while the flood goes on: nothing gets in at any moment.
        let remover = std::thread::spawn(move || t.remove());
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            got += usize::from(listener.recv_from(&mut buf).is_ok());
        }
        remover.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        let sent = flood.join().unwrap();
        assert!(sent > 1000, "the VM flooded ({sent} datagrams)");
        assert_eq!(got, 0, "datagrams of the VM reached the consumer while its tunnel was removed");
        let rules = omerta_perf::command::run(Command::new("iptables").args(["-S"])).unwrap_or_default();
        assert!(!rules.contains(&name), "the fence goes once the interface is gone: {rules}");
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// A member cannot take over a lease (issue 24): a provider the consumer asks that answers with
/// the ID of a VM the consumer already rents from another provider is refused, and the first
/// lease stays whole (its provider, its releases).
#[test]
fn a_lease_cannot_be_taken_over_by_another_provider() {
    private_netns(|ns| {
        let peer = VethPeer::new(ns, "mtake");
        let (p, c, net, pid) = pair(ns, &peer, "take", true, &["--dry-run"], &["--dry-run"]);
        let v = c.json(&["vm", "request", "--network", &net, "--peer", &pid, "--dry-run"]);
        let victim = v["vmId"].as_str().expect("vmId").to_string();
        // The member: a fake provider at 203.0.113.1:9997 that answers any request with the
        // victim's ID (every member can read vm_created, so it can know one).
        let key = network_key(&p.home, &net);
        let me = ed25519_dalek_key();
        let my_id = mesh::net::peer_id(&me.verifying_key().to_bytes());
        let consumer_id = {
            let log = c.log();
            log.lines().find_map(|l| l.strip_prefix("Peer ID: ")).expect("the consumer's Peer ID").trim().to_string()
        };
        let s = std::net::UdpSocket::bind("203.0.113.1:9997").expect("the member's socket");
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let to_consumer = "203.0.113.2:9999";
        let say = |m: mesh::wire::Message| {
            s.send_to(&mesh::wire::seal(&key, &me, &consumer_id, m).expect("seal"), to_consumer).expect("send");
        };
        say(mesh::wire::Message::Hello { reply: false });
        std::thread::sleep(Duration::from_millis(300));
        let (net2, my_id2) = (net.clone(), my_id.clone());
        let asked = std::thread::scope(|scope| {
            let cli = scope.spawn(|| c.omerta(&["vm", "request", "--network", &net2, "--peer", &my_id2, "--dry-run"]));
            let keys = control::provision::generate().expect("keys");
            let mut buf = vec![0u8; 9000];
            let mut answered = false;
            let end = Instant::now() + Duration::from_secs(20);
            while !cli.is_finished() && Instant::now() < end {
                let Ok(n) = s.recv(&mut buf) else { continue };
                let Ok((env, _)) = mesh::wire::open(&key, &my_id, &buf[..n], mesh::now_s()) else {
                    continue;
                };
                match env.payload {
                    mesh::wire::Message::Ping { nonce } => say(mesh::wire::Message::Pong { nonce }),
                    mesh::wire::Message::VmRequest(r) => {
                        answered = true;
                        say(mesh::wire::Message::VmCreated(Box::new(mesh::wire::VmCreated {
                            request_id: r.request_id.clone(),
                            vm_id: victim.clone(),
                            vm_ip: r.vm_vpn_ip.clone(),
                            vm_public_key: keys.wg_public.clone(),
                            ssh_host_key: keys.host_public.clone(),
                            ssh_host_fingerprint: keys.host_fingerprint.clone(),
                            heartbeat_timeout_s: None,
                            vm_port: None,
                            engine_proof_key: None,
                        })));
                    }
                    _ => {}
                }
            }
            (cli.join().expect("the CLI"), answered)
        });
        let ((code, out, err), answered) = asked;
        assert!(answered, "the consumer never asked the member: {out}{err}\n{}", c.log());
        assert_eq!(code, 1, "the member's answer is refused: {out}{err}");
        assert!(err.contains("already rents"), "{err}");
        // The first lease is whole: listed once, from its provider.
        let list = c.json(&["vm", "list"]);
        let renting = list["renting"].as_array().expect("renting").clone();
        assert_eq!(renting.len(), 1, "{list}");
        assert_eq!(
            (renting[0]["vmId"].as_str(), renting[0]["provider"].as_str()),
            (Some(victim.as_str()), Some(pid.as_str())),
            "{list}"
        );
        assert!(c.log().contains("its answer refused"), "{}", c.log());
        drop(c);
        drop(p);
    });
}

/// A member's UDP socket in the provider's namespace, and a helper to read what it is sent.
struct Member {
    me: mesh::net::SigningKey,
    id: String,
    key: [u8; 32],
    s: std::net::UdpSocket,
}

impl Member {
    fn new(key: [u8; 32], port: u16) -> Self {
        let me = ed25519_dalek_key();
        let id = mesh::net::peer_id(&me.verifying_key().to_bytes());
        let s = std::net::UdpSocket::bind(("203.0.113.1", port)).expect("the member's socket");
        s.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
        Self { me, id, key, s }
    }

    fn seal(&self, to: &str, m: mesh::wire::Message) -> Vec<u8> {
        mesh::wire::seal(&self.key, &self.me, to, m).expect("seal")
    }

    /// The messages it is sent within `ms`.
    fn heard(&self, ms: u64) -> Vec<mesh::wire::Message> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 9000];
        let end = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < end {
            let Ok(n) = self.s.recv(&mut buf) else { continue };
            if let Ok((env, _)) = mesh::wire::open(&self.key, &self.id, &buf[..n], mesh::now_s()) {
                got.push(env.payload);
            }
        }
        got
    }
}

/// A consumer's ping during a flood: (second, exit code, output).
type Ping = (u64, i32, String);

/// While `send(i)` floods the provider for `secs.0` seconds, held to 3,200 messages a second
/// (over the 3,000 the issue asks for: on this two-core machine the attacker's sealing would
/// otherwise take the CPU the daemon under test needs, which a member flooding from its own
/// machine does not), the consumer `c` pings it every 2 s for `secs.1` seconds, then does
/// `then`: the flood's (messages sent, duration) and each ping's (second, exit code, output).
fn during_flood(
    c: &Node,
    net: &str,
    pid: &str,
    secs: (u64, u64),
    mut send: impl FnMut(u64) -> bool + Send,
    then: impl FnOnce() -> Option<(i32, String)>,
) -> ((u64, Duration), Vec<Ping>) {
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let flood = scope.spawn(|| {
            let (mut sent, t0) = (0u64, Instant::now());
            while t0.elapsed() < Duration::from_secs(secs.0) && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let due = Duration::from_micros(sent.saturating_mul(1_000_000) / 3200);
                if let Some(wait) = due.checked_sub(t0.elapsed()) {
                    std::thread::sleep(wait);
                }
                if send(sent) {
                    sent += 1;
                }
            }
            (sent, t0.elapsed())
        });
        let mut pings = Vec::new();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(secs.1) {
            std::thread::sleep(Duration::from_secs(2));
            let (code, out, err) = c.omerta(&["ping", "--network", net, "--peer", pid, "--timeout", "3000"]);
            pings.push((t0.elapsed().as_secs(), code, format!("{out}{err}")));
        }
        if let Some((code, out)) = then() {
            pings.push((t0.elapsed().as_secs(), code, out));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (flood.join().expect("the flood"), pings)
    })
}

fn refused(node: &Node, why: &str) -> u64 {
    node.json(&["status"])["refused"][why].as_u64().unwrap_or(0)
}

/// Issue 24, item 1: one member flooding a provider with signed messages (3,200 a second, for
/// a minute) costs only that member: the consumer's pings are
/// answered and its rental's heartbeats keep flowing (a provider that missed the answers for
/// 5 s would reclaim it). Before, the flood filled the daemon's one replay window in 22 s.
#[test]
fn a_members_flood_costs_only_that_member() {
    private_netns(|ns| {
        // The flood takes a core: no guest boots beside it.
        let _machine = omerta_it::GuestSlot::all();
        let peer = VethPeer::new(ns, "mflood");
        let p_args = ["--dry-run", "--heartbeat-interval", "1", "--heartbeat-timeout", "5", "--keepalive", "1"];
        let (p, c, net, pid) =
            pair(ns, &peer, "flood", true, &p_args, &["--dry-run", "--no-provider", "--keepalive", "1"]);
        let v = c.json(&["vm", "request", "--network", &net, "--peer", &pid, "--dry-run"]);
        let vm = v["vmId"].as_str().expect("vmId").to_string();
        let flooder = Member::new(network_key(&p.home, &net), 0);
        let send = |i: u64| {
            let d = flooder.seal(&pid, mesh::wire::Message::Ping { nonce: i.to_string() });
            flooder.s.send_to(&d, PROVIDER_EP).is_ok()
        };
        let (sent, pings) = during_flood(&c, &net, &pid, (60, 58), send, || None);
        let (sent, took) = sent;
        let rate = sent as f64 / took.as_secs_f64();
        assert!(rate >= 3000.0 && took >= Duration::from_secs(57), "the flood: {sent} in {took:?} ({rate:.0}/s)");
        let failed: Vec<_> = pings.iter().filter(|p| p.1 != 0).collect();
        assert!(failed.is_empty(), "pings failed during the flood ({rate:.0}/s): {failed:?}\n{}", p.log());
        assert_eq!(p.json(&["vm", "list"])["providing"][0]["vmId"], vm.as_str(), "kept: {}", p.log());
        assert_eq!(c.json(&["vm", "list"])["renting"][0]["vmId"], vm.as_str(), "kept: {}", c.log());
        // The flood is visible: counted, and logged naming the source.
        let st = p.json(&["status"]);
        let over: u64 =
            ["source_rate", "verify_rate", "peer_rate"].iter().map(|k| st["refused"][k].as_u64().unwrap_or(0)).sum();
        assert!(over > sent / 2, "{st}");
        let from = format!("from {}", flooder.s.local_addr().unwrap());
        assert!(p.log().lines().any(|l| l.contains("refused a ") && l.contains(&from)), "{}", p.log());
        drop(c);
        drop(p);
    });
}

/// Issue 24, item 5: a member's datagram captured and replayed first from elsewhere moves
/// nothing (the daemon answers where the member is, and the original is still accepted), and
/// one accepted before a restart is refused after it.
#[test]
fn a_replayed_message_moves_nothing_and_outlives_no_restart() {
    private_netns(|ns| {
        let _peer = VethPeer::new(ns, "mreplay");
        let mut p = Node::new("replay-p", None, true);
        let (net, _) = p.create_network(PROVIDER_EP);
        let pid = p.start_daemon(ns, &["--network", &net, "--dry-run"]);
        let key = network_key(&p.home, &net);
        let a = Member::new(key, 9996);
        let elsewhere = std::net::UdpSocket::bind("203.0.113.1:9995").expect("bind");
        elsewhere.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
        a.s.send_to(&a.seal(&pid, mesh::wire::Message::Hello { reply: false }), PROVIDER_EP).expect("send");
        std::thread::sleep(Duration::from_millis(300));
        // Captured on its way, sent first from elsewhere, then arriving.
        let d = a.seal(&pid, mesh::wire::Message::Ping { nonce: "first".into() });
        elsewhere.send_to(&d, PROVIDER_EP).expect("send");
        std::thread::sleep(Duration::from_millis(200));
        a.s.send_to(&d, PROVIDER_EP).expect("send");
        let heard = a.heard(1000);
        assert!(heard.contains(&mesh::wire::Message::Pong { nonce: "first".into() }), "{heard:?}\n{}", p.log());
        let mut buf = vec![0u8; 9000];
        let mut there = Vec::new();
        while let Ok(n) = elsewhere.recv(&mut buf) {
            if let Ok((env, _)) = mesh::wire::open(&key, &a.id, &buf[..n], mesh::now_s()) {
                there.push(env.payload);
            }
        }
        assert!(
            there.iter().all(|m| matches!(m, mesh::wire::Message::Ping { .. })),
            "only a challenge goes elsewhere: {there:?}"
        );
        let peers = p.json(&["peers"]);
        let entry = peers.as_array().unwrap().iter().find(|e| e["peerId"] == a.id.as_str()).cloned();
        assert_eq!(entry.map(|e| e["endpoint"].clone()), Some("203.0.113.1:9996".into()), "{peers}");
        // Accepted before a restart, replayed after it (well within its 120 s): refused.
        let d = a.seal(&pid, mesh::wire::Message::Ping { nonce: "before".into() });
        a.s.send_to(&d, PROVIDER_EP).expect("send");
        assert!(a.heard(1000).contains(&mesh::wire::Message::Pong { nonce: "before".into() }));
        assert_eq!(p.stop_daemon("TERM"), Some(0));
        p.start_daemon(ns, &["--network", &net, "--dry-run"]);
        a.s.send_to(&d, PROVIDER_EP).expect("send");
        let heard = a.heard(1500);
        assert!(heard.is_empty(), "the replay after the restart was answered: {heard:?}\n{}", p.log());
        assert!(refused(&p, "before_floor") >= 1, "{}", p.log());
        // The member itself is heard again once past its reservation (a few seconds).
        std::thread::sleep(Duration::from_secs(6));
        a.s.send_to(&a.seal(&pid, mesh::wire::Message::Ping { nonce: "after".into() }), PROVIDER_EP).expect("send");
        assert!(a.heard(1500).contains(&mesh::wire::Message::Pong { nonce: "after".into() }), "{}", p.log());
    });
}

/// Issue 24, item 6: fresh identities (free to make) cannot empty the peer table: past its
/// 1,024 slots, a daemon's bootstrap peer stays. Here the provider joined a network the
/// consumer made, so the consumer is its bootstrap peer; 1,100 identities come from 50
/// addresses at the rate newcomers are let in.
#[test]
fn fresh_identities_cannot_evict_a_bootstrap_peer() {
    private_netns(|ns| {
        let peer = VethPeer::new(ns, "mevict");
        let mut p = Node::new("evict-p", None, true);
        let mut c = Node::new("evict-c", Some(&peer), true);
        let (net, link) = c.create_network("203.0.113.2:9999");
        assert_eq!(p.omerta(&["network", "join", &link]).0, 0);
        let cid = c.start_daemon(ns, &["--network", &net, "--dry-run", "--no-provider"]);
        let pid = p.start_daemon(ns, &["--network", &net, "--dry-run"]);
        p.wait_log("the bootstrap peer heard", 10, |_| p.json(&["peers"]).to_string().contains(&cid));
        let key = network_key(&p.home, &net);
        let socks = flood_sources(50);
        let keys: Vec<_> = (0..1100).map(|_| ed25519_dalek_key()).collect();
        let t0 = Instant::now();
        for (i, me) in keys.iter().enumerate() {
            // 55 a second: a little over the newcomers' rate.
            while t0.elapsed() < Duration::from_millis(u64::try_from(i).unwrap_or(0) * 1000 / 55) {
                std::thread::sleep(Duration::from_millis(2));
            }
            let d = mesh::wire::seal(&key, me, &pid, mesh::wire::Message::Hello { reply: false }).expect("seal");
            socks[i % socks.len()].send_to(&d, PROVIDER_EP).expect("send");
        }
        std::thread::sleep(Duration::from_secs(1));
        let peers = p.json(&["peers"]);
        let n = peers.as_array().map_or(0, Vec::len);
        assert!(n >= 1000, "the identities were taken in: {n} peers\n{}", p.log());
        assert!(peers.to_string().contains(&cid), "the bootstrap peer was evicted: {n} peers");
        drop(p);
        drop(c);
    });
}

/// Sockets on `n` addresses of 198.51.100.0/24 added to the test namespace's loopback (the
/// flooding member's), four each.
fn flood_sources(n: u8) -> Vec<std::net::UdpSocket> {
    for i in 1..=n {
        let a = format!("198.51.100.{i}/32");
        let _ = Command::new("ip").args(["addr", "add", &a, "dev", "lo"]).status();
    }
    (1..=n)
        .flat_map(|i| (0..4).map(move |_| i))
        .map(|i| std::net::UdpSocket::bind(format!("198.51.100.{i}:0")).expect("bind"))
        .collect()
}

/// Issue 24, item 1 (the review's case): fresh identities cost nothing, so a member floods with
/// a new one per message (3,000 a second, from 50 addresses and rotating ports): a consumer
/// that does not rent yet keeps its slot at the provider (its keepalives refresh it faster
/// than newcomers are let in), its pings are answered, and its request is served. Before,
/// each newcomer evicted the peer heard from longest ago, and a peer coming back was refused
/// as a replay for the few seconds of its floor.
#[test]
fn fresh_identities_flooding_cost_no_talking_peer_its_requests() {
    private_netns(|ns| {
        // The flood takes a core: no guest boots beside it.
        let _machine = omerta_it::GuestSlot::all();
        let peer = VethPeer::new(ns, "mfresh");
        let (p, c, net, pid) = pair(
            ns,
            &peer,
            "fresh",
            true,
            &["--dry-run", "--keepalive", "1"],
            &["--dry-run", "--no-provider", "--keepalive", "1"],
        );
        let key = network_key(&p.home, &net);
        let socks = flood_sources(50);
        // Made beforehand, so the flood is as fast as sealing (100,000: over 30 s of it).
        let keys: Vec<_> = (0..100_000).map(|_| ed25519_dalek_key()).collect();
        let send = |i: u64| {
            let me = &keys[usize::try_from(i).unwrap_or(0) % keys.len()];
            let d = mesh::wire::seal(&key, me, &pid, mesh::wire::Message::Hello { reply: false }).expect("seal");
            socks[usize::try_from(i).unwrap_or(0) % socks.len()].send_to(&d, PROVIDER_EP).is_ok()
        };
        let request = || {
            let (code, out, err) = c.omerta(&["vm", "request", "--network", &net, "--peer", &pid, "--dry-run"]);
            Some((code, format!("vm request: {out}{err}")))
        };
        let (sent, pings) = during_flood(&c, &net, &pid, (30, 26), send, request);
        let (sent, took) = sent;
        let rate = sent as f64 / took.as_secs_f64();
        assert!(rate >= 3000.0, "the flood: {sent} in {took:?} ({rate:.0}/s)");
        let failed: Vec<_> = pings.iter().filter(|p| p.1 != 0).collect();
        assert!(failed.is_empty(), "failed during the flood ({rate:.0}/s): {failed:?}\n{}", p.log());
        assert!(refused(&p, "newcomer_rate") > sent / 2, "{}", p.json(&["status"]));
        drop(c);
        drop(p);
    });
}

/// Durable state (issue 26): a torn state file is said in one line and kept aside for the
/// operator, never dropped silently with the VMs it names; the daemon starts anyway.
#[test]
fn a_torn_state_file_is_said_and_kept_aside() {
    private_netns(|ns| {
        let _peer = VethPeer::new(ns, "mtorn");
        let mut p = Node::new("torn-p", None, false);
        let (net, _link) = p.create_network(PROVIDER_EP);
        let dir = p.home.join("provider");
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700).create(&dir).expect("mkdir");
        let torn = r#"[{"vm_id":"00112233aabbccdd","engine_name":"mesh-0011"#;
        std::fs::write(dir.join(format!("{net}.json")), torn).expect("a torn file");
        p.start_daemon(ns, &["--network", &net, "--dry-run"]);
        p.wait_log("the line about the torn file", 10, |l| l.contains("does not parse") && l.contains("moved to"));
        let aside: Vec<_> = std::fs::read_dir(&dir)
            .expect("the provider's directory")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{net}.json.corrupt-")))
            .collect();
        assert_eq!(aside.len(), 1, "kept aside once");
        assert_eq!(std::fs::read_to_string(aside[0].path()).unwrap_or_default(), torn, "kept whole");
        assert_eq!(p.json(&["status"])["network"], net.as_str(), "the daemon runs");
    });
}
