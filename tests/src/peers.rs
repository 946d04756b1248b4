//! Peers in namespaces of their own, joined by veth pairs: `VethPeer`, the WireGuard consumers
//! (`WgConsumer` on `omerta-consumer`, `RealWgConsumer` on real WireGuard) and their SSH client.
use std::time::{Duration, Instant};

use crate::netns::in_named_netns;
use crate::{ip, require, workspace_bin, Netns};

/// The consumer's address inside a test namespace (on its loopback interface, or at the far
/// end of a veth pair for [`WgConsumer`]), a documentation address.
pub const CONSUMER_IP: [u8; 4] = [203, 0, 113, 2];

/// A second namespace made by the test, joined to the caller's private namespace by a veth
/// pair: the "provider" end `vp0` (203.0.113.1/24) on the caller's side, the "consumer" end
/// `vc0` (203.0.113.2/24, [`CONSUMER_IP`]) in the peer. For tests where a link really goes
/// down or the provider's address changes. Deleted on drop.
#[derive(Debug)]
pub struct VethPeer {
    /// The peer namespace's name (`ip netns`).
    pub ns: String,
}

impl VethPeer {
    /// Makes the peer namespace and the veth pair.
    pub fn new(_ns: &Netns, tag: &str) -> Self {
        let ns = format!("omerta-p{}-{tag}", std::process::id());
        let _ = std::process::Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        let me = Self { ns: ns.clone() };
        ip(&["link", "add", "vp0", "type", "veth", "peer", "name", "vc0", "netns", &ns]);
        ip(&["addr", "add", "203.0.113.1/24", "dev", "vp0"]);
        ip(&["link", "set", "vp0", "up"]);
        ip(&["-n", &ns, "addr", "add", "203.0.113.2/24", "dev", "vc0"]);
        ip(&["-n", &ns, "link", "set", "vc0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        me
    }

    /// Runs `f` on a thread inside the peer namespace; sockets it makes stay there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_named_netns(&self.ns, f)
    }

    /// `program` to be run in the peer namespace (through `ip netns exec`).
    pub fn cmd(&self, program: &std::path::Path) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }
}

impl Drop for VethPeer {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// A consumer running `omerta-consumer` (userspace WireGuard) in a network namespace of its
/// own, joined to the caller's (private) namespace by a veth pair: `vc0` with 203.0.113.1/24 on
/// the caller's side, 203.0.113.2/24 ([`CONSUMER_IP`]) on the consumer's. Removed (process ended by pid, namespace deleted) on drop.
#[derive(Debug)]
pub struct WgConsumer {
    ns: String,
    child: Option<std::process::Child>,
    /// The consumer's public key (base64).
    pub public: String,
}

impl WgConsumer {
    /// Starts the consumer for a peer with public key `peer_public`, answering on tunnel
    /// address `tunnel_ip`, for at most `seconds`.
    pub fn start(
        _ns: &Netns,
        tag: &str,
        private: &str,
        public: &str,
        peer_public: &str,
        tunnel_ip: &str,
        seconds: u64,
    ) -> Self {
        let ns = format!("omerta-c{}-{tag}", std::process::id());
        let run = |args: &[&str]| {
            let st = std::process::Command::new("ip").args(args).status().expect("ip");
            assert!(st.success(), "ip {args:?}");
        };
        run(&["netns", "add", &ns]);
        let mut me = Self { ns: ns.clone(), child: None, public: public.to_string() };
        consumer_veth(&ns);
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(workspace_bin("omerta-consumer"))
            .args(["203.0.113.2:51820", private, peer_public, tunnel_ip, &seconds.to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start omerta-consumer");
        me.child = Some(child);
        me
    }

    /// Ends the consumer and returns everything it printed.
    pub fn finish(mut self) -> String {
        let mut out = String::new();
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            if let Some(mut o) = c.stdout.take() {
                use std::io::Read;
                let _ = o.read_to_string(&mut out);
            }
            let _ = c.wait();
        }
        out
    }
}

impl Drop for WgConsumer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// A consumer on real WireGuard software, in a namespace of its own joined to the caller's
/// private namespace by a veth pair (`vc0` 203.0.113.1/24 on the caller's side, `vc1`
/// 203.0.113.2/24, [`CONSUMER_IP`], on the consumer's): the kernel's WireGuard when the host
/// has the module, else Debian's `wireguard-go` on a TUN device, configured with `wg`, listening
/// on 203.0.113.2:51820. The OpenSSH client runs there too ([`RealWgConsumer::ssh`]). Removed
/// (wireguard-go ended by its pid, namespace deleted) on drop.
#[derive(Debug)]
pub struct RealWgConsumer {
    /// The namespace (`ip netns`).
    pub ns: String,
    /// The WireGuard interface.
    pub ifname: String,
    /// `kernel` or `wireguard-go`.
    pub kind: &'static str,
    /// The consumer's public key (base64).
    pub public: String,
    child: Option<std::process::Child>,
    dir: std::path::PathBuf,
}

/// Joins the consumer's namespace `ns` to the caller's: `vc0` 203.0.113.1/24 here, `vc1`
/// 203.0.113.2/24 ([`CONSUMER_IP`]) there, both up.
fn consumer_veth(ns: &str) {
    ip(&["link", "add", "vc0", "type", "veth", "peer", "name", "vc1", "netns", ns]);
    ip(&["addr", "add", "203.0.113.1/24", "dev", "vc0"]);
    ip(&["link", "set", "vc0", "up"]);
    ip(&["-n", ns, "addr", "add", "203.0.113.2/24", "dev", "vc1"]);
    ip(&["-n", ns, "link", "set", "vc1", "up"]);
    ip(&["-n", ns, "link", "set", "lo", "up"]);
}

/// Runs `cmd`, failing the test with its stderr; returns its stdout.
fn must(cmd: &mut std::process::Command) -> String {
    omerta_perf::command::run(cmd).unwrap_or_else(|e| panic!("{e}"))
}

impl RealWgConsumer {
    /// Makes the namespace and the interface with tunnel addresses `addrs` (`10.50.1.1/24`...);
    /// its key pair comes from `wg genkey`. `None` (after `require`) without WireGuard.
    pub fn start(_ns: &Netns, tag: &str, addrs: &[&str]) -> Option<Self> {
        let have = std::process::Command::new("wg").arg("--version").output().is_ok_and(|o| o.status.success());
        if !require("wireguard-tools (wg; make setup installs it)", if have { Ok(()) } else { Err("no wg".into()) }) {
            return None;
        }
        let ns = format!("omerta-w{}-{tag}", std::process::id());
        // Unique in this process too: wireguard-go's control sockets share one directory
        // across namespaces, so two at once must not share a name.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 100;
        let ifname = format!("owg{}x{n}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("omerta-wgc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("consumer scratch dir");
        let _ = std::process::Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        let mut me =
            Self { ns: ns.clone(), ifname: ifname.clone(), kind: "kernel", public: String::new(), child: None, dir };
        consumer_veth(&ns);
        let private = must(std::process::Command::new("wg").arg("genkey"));
        let key = me.dir.join("private.key");
        std::fs::write(&key, private.trim()).expect("consumer key file");
        let public = {
            use std::io::Write;
            let mut c = std::process::Command::new("wg")
                .arg("pubkey")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("wg pubkey");
            c.stdin.take().expect("stdin").write_all(private.as_bytes()).expect("wg pubkey input");
            String::from_utf8_lossy(&c.wait_with_output().expect("wg pubkey").stdout).trim().to_string()
        };
        me.public = public;
        let kernel =
            std::process::Command::new("ip").args(["-n", &ns, "link", "add", &ifname, "type", "wireguard"]).output();
        if !kernel.is_ok_and(|o| o.status.success()) {
            // No WireGuard module on this host: Debian's userspace implementation.
            me.kind = "wireguard-go";
            // A socket left by a run that was killed would be found before ours exists.
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{ifname}.sock"));
            let child = std::process::Command::new("ip")
                .args(["netns", "exec", &ns, "wireguard-go", "-f", &ifname])
                .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn();
            let child = match child {
                Ok(c) => c,
                Err(e) => {
                    require("wireguard-go (make setup installs it)", Err(e.to_string()));
                    return None;
                }
            };
            me.child = Some(child);
            let sock = format!("/var/run/wireguard/{ifname}.sock");
            let end = Instant::now() + Duration::from_secs(10);
            let up = || {
                std::process::Command::new("ip")
                    .args(["-n", &ns, "link", "show", &ifname])
                    .output()
                    .is_ok_and(|o| o.status.success())
            };
            while !std::path::Path::new(&sock).exists() || !up() {
                assert!(Instant::now() < end, "wireguard-go never made {sock}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        me.wg(&["set", &ifname, "private-key", &key.to_string_lossy(), "listen-port", "51820"]);
        for a in addrs {
            ip(&["-n", &ns, "addr", "add", a, "dev", &ifname]);
        }
        ip(&["-n", &ns, "link", "set", &ifname, "up"]);
        Some(me)
    }

    /// Runs `wg args` for this consumer's interface (in its namespace); its stdout.
    pub fn wg(&self, args: &[&str]) -> String {
        must(std::process::Command::new("ip").args(["netns", "exec", &self.ns, "wg"]).args(args))
    }

    /// Adds the VM's peer: its public key, the tunnel address it may use.
    pub fn add_peer(&self, public: &str, allowed: &str) {
        self.wg(&["set", &self.ifname, "peer", public, "allowed-ips", allowed]);
    }

    /// The peer's (latest handshake in seconds since the epoch, bytes received, bytes sent).
    pub fn peer_stats(&self, public: &str) -> (u64, u64, u64) {
        let dump = self.wg(&["show", &self.ifname, "dump"]);
        let line = dump.lines().find(|l| l.starts_with(public)).unwrap_or_default();
        let f: Vec<&str> = line.split('\t').collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
        (n(4), n(5), n(6))
    }

    /// A command in the consumer's namespace.
    pub fn cmd(&self, program: &str) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }

    /// OpenSSH from the consumer's namespace: `ssh -i key` to `user@host` running `command`,
    /// the host key checked against `known_hosts` only (no trust on first use); (exit code,
    /// stdout, stderr). At most 60 s.
    pub fn ssh(
        &self,
        key: &std::path::Path,
        known_hosts: &std::path::Path,
        to: &str,
        command: &str,
    ) -> (i32, String, String) {
        let mut c = self.cmd("timeout");
        c.arg("60").arg("ssh").args(ssh_options(key, known_hosts)).arg(to).arg(command);
        omerta_perf::command::output(&mut c).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `f` on a thread in the consumer's namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_named_netns(&self.ns, f)
    }
}

/// The OpenSSH client options of the tests: this key only, this known_hosts only, strict host
/// key checking, no agent, no password, short timeouts.
pub fn ssh_options(key: &std::path::Path, known_hosts: &std::path::Path) -> Vec<String> {
    [
        "-i".to_string(),
        key.display().to_string(),
        "-o".into(),
        format!("UserKnownHostsFile={}", known_hosts.display()),
        "-o".into(),
        "GlobalKnownHostsFile=/dev/null".into(),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        "ConnectTimeout=10".into(),
        "-o".into(),
        "ServerAliveInterval=5".into(),
        "-o".into(),
        "ServerAliveCountMax=3".into(),
        "-o".into(),
        "LogLevel=ERROR".into(),
    ]
    .to_vec()
}

impl Drop for RealWgConsumer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let _ = c.wait();
        }
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
