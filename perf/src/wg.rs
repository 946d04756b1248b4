//! WireGuard on a TUN device in a namespace the benchmark made: Debian's `wireguard-go`,
//! configured with `wg` (the recipe of the integration tests' real WireGuard peer, written
//! again here: perf does not depend on the tests). Keys come from
//! `control::provision::wg_keypair`. Ended by its pid (SIGTERM, then SIGKILL) on drop; it
//! also gets SIGKILL if this process dies first (`setpriv --pdeathsig`).
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::command::run;
use crate::netns::Named;

/// Where wireguard-go keeps its control sockets (one directory for every namespace).
const UAPI_DIR: &str = "/var/run/wireguard";

/// Whether `wireguard-go` and `wg` can run here, or why not.
pub fn available() -> Result<(), String> {
    for (program, arg) in [("wireguard-go", "--version"), ("wg", "--version")] {
        match Command::new(program).arg(arg).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => return Err(format!("{program} {arg}: exit status {:?}", o.status.code())),
            Err(e) => return Err(format!("{program}: {e}")),
        }
    }
    Ok(())
}

/// A fresh WireGuard key pair (private, public), base64 as `wg` reads it.
pub fn keypair() -> Result<(String, String), String> {
    control::provision::wg_keypair().map_err(|e| e.to_string())
}

/// A 32-byte key from its base64.
pub fn key_bytes(b64: &str) -> Result<[u8; 32], String> {
    use base64::Engine;
    let v = base64::engine::general_purpose::STANDARD.decode(b64.trim()).map_err(|e| format!("a key: {e}"))?;
    v.try_into().map_err(|_| "a key is not 32 bytes".to_string())
}

/// Removes the control sockets named `PREFIX*.sock` that no process listens on any more (left
/// by a wireguard-go that was killed).
pub fn remove_dead_sockets(prefix: &str) {
    let Ok(dir) = std::fs::read_dir(UAPI_DIR) else { return };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) && name.ends_with(".sock") {
            let path = e.path();
            if let Err(err) = std::os::unix::net::UnixStream::connect(&path) {
                if err.kind() == std::io::ErrorKind::ConnectionRefused {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
}

/// One `wireguard-go` with its TUN interface in a namespace of ours.
#[derive(Debug)]
pub struct WgGo {
    ns: String,
    /// The interface.
    pub ifname: String,
    /// Its public key (base64).
    pub public: String,
    child: Option<Child>,
    dir: PathBuf,
}

impl WgGo {
    /// Starts `wireguard-go -f IFNAME` in `ns` with a fresh key, listening on UDP `listen`,
    /// the interface holding `addr` (CIDR) and up. `ifname` must be unique on the machine
    /// while it runs (the control sockets share one directory) and at most 15 bytes.
    pub fn start(ns: &Named, ifname: &str, listen: u16, addr: &str) -> Result<Self, String> {
        let (private, public) = keypair()?;
        let dir = std::env::temp_dir().join(format!("omerta-perf-wg-{ifname}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut me =
            Self { ns: ns.name().to_string(), ifname: ifname.to_string(), public, child: None, dir: dir.clone() };
        let key = dir.join("private.key");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&key)
                .map_err(|e| format!("{}: {e}", key.display()))?;
            f.write_all(private.as_bytes()).map_err(|e| format!("{}: {e}", key.display()))?;
        }
        // A socket left by a run that was killed would be found before ours exists.
        let sock = PathBuf::from(format!("{UAPI_DIR}/{ifname}.sock"));
        let _ = std::fs::remove_file(&sock);
        // setpriv execs wireguard-go in turn: the child's pid stays wireguard-go's.
        let setpriv = Command::new("setpriv").arg("--help").output().is_ok_and(|o| o.status.success());
        let mut cmd = if setpriv {
            let mut c = ns.cmd("setpriv");
            c.args(["--pdeathsig", "KILL", "wireguard-go"]);
            c
        } else {
            ns.cmd("wireguard-go")
        };
        let child = cmd
            .args(["-f", ifname])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("wireguard-go: {e}"))?;
        me.child = Some(child);
        let end = Instant::now() + Duration::from_secs(10);
        while !sock.exists() || ns.ip(&["link", "show", ifname]).is_err() {
            if let Some(st) = me.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(format!("wireguard-go -f {ifname} exited at start ({st})"));
            }
            if Instant::now() > end {
                return Err(format!("wireguard-go never made {}", sock.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        me.wg(&["set", ifname, "private-key", &key.to_string_lossy(), "listen-port", &listen.to_string()])?;
        ns.ip(&["addr", "add", addr, "dev", ifname])?;
        ns.ip(&["link", "set", ifname, "up"])?;
        Ok(me)
    }

    /// Gives each of its UDP sockets a receive (and send) buffer of `bytes`, forced past
    /// `rmem_max` (root only): Debian's wireguard-go (0.0.20220316) never sizes its sockets, so
    /// they keep `net.core.rmem_default` (208 KiB), which a namespace cannot raise on this
    /// kernel, and drop bursts a later wireguard-go (7 MiB) or a guest's kernel WireGuard
    /// would take. The sockets' size after, per socket.
    pub fn grow_udp_buffers(&self, bytes: usize) -> Result<Vec<usize>, String> {
        let pid = self.child.as_ref().map(Child::id).ok_or("wireguard-go is not running")?;
        let end = Instant::now() + Duration::from_secs(3);
        loop {
            let mut sizes = Vec::new();
            let dir = format!("/proc/{pid}/fd");
            for entry in std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))?.flatten() {
                let is_socket =
                    std::fs::read_link(entry.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
                let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()).filter(|_| is_socket) else {
                    continue;
                };
                let Ok(copy) = sys::descriptor_of(pid, fd) else { continue };
                let sock = socket2::Socket::from(copy);
                if sock.r#type().ok() != Some(socket2::Type::DGRAM)
                    || sock.local_addr().ok().and_then(|a| a.as_socket()).is_none()
                {
                    continue;
                }
                sys::grow_buffers(std::os::fd::AsFd::as_fd(&sock), bytes);
                sizes.push(sock.recv_buffer_size().map_err(|e| format!("SO_RCVBUF: {e}"))?);
            }
            if !sizes.is_empty() {
                return Ok(sizes);
            }
            if Instant::now() > end {
                return Err(format!("wireguard-go (pid {pid}) has no UDP socket"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `wg args` in its namespace: its stdout.
    pub fn wg(&self, args: &[&str]) -> Result<String, String> {
        run(Command::new("ip").args(["netns", "exec", &self.ns, "wg"]).args(args))
    }

    /// Adds a peer: its public key, the tunnel addresses it may use (CIDR), where it is.
    pub fn add_peer(&self, public: &str, allowed: &str, endpoint: Option<SocketAddr>) -> Result<(), String> {
        let mut args = vec!["set", &self.ifname, "peer", public, "allowed-ips", allowed];
        let e = endpoint.map(|e| e.to_string());
        if let Some(e) = &e {
            args.extend(["endpoint", e.as_str()]);
        }
        self.wg(&args).map(drop)
    }

    /// The process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for WgGo {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(None) = c.try_wait() {
                sys::terminate_child(&c);
                let end = Instant::now() + Duration::from_secs(2);
                while matches!(c.try_wait(), Ok(None)) && Instant::now() < end {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if let Ok(None) = c.try_wait() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
        let _ = std::fs::remove_file(format!("{UAPI_DIR}/{}.sock", self.ifname));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
