//! The consumer's WireGuard interface for one VM: the kernel's WireGuard where the host has the
//! module, else Debian's `wireguard-go` on a TUN device; configured with `wg` and `ip`.
//! Interfaces are named `wg` + 8 hex characters; listen ports are counted up from 51900,
//! skipping those in use.
use std::net::{Ipv4Addr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The first listen port tried.
pub const FIRST_PORT: u16 = 51900;

/// A tunnel interface this daemon made.
#[derive(Debug)]
pub struct Tunnel {
    /// Its name.
    pub name: String,
    /// `kernel` or `wireguard-go`.
    pub kind: &'static str,
    /// Its listen port.
    pub port: u16,
    child: Option<Child>,
}

/// Why a tunnel could not be made or changed.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// A program could not be run.
    #[error("{program}: {source}")]
    Exec {
        /// Which.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// A program failed: the command and the first line it wrote on stderr.
    #[error("{command}: {reason}")]
    Failed {
        /// The command line.
        command: String,
        /// Its first line of stderr.
        reason: String,
    },
    /// Neither WireGuard in the kernel nor `wireguard-go`.
    #[error("no WireGuard module and no wireguard-go ({0}); make setup installs it")]
    NoWireguard(std::io::Error),
    /// `wireguard-go` made no interface.
    #[error("wireguard-go did not make {0} within 10 s")]
    Timeout(String),
    /// The firewall rules could not be set.
    #[error("fencing the tunnel from the VM: {0} (make setup installs iptables)")]
    Fence(Box<TunnelError>),
}

fn run(program: &str, args: &[&str]) -> Result<String, TunnelError> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| TunnelError::Exec { program: program.into(), source })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(TunnelError::Failed {
            command: format!("{program} {}", args.join(" ")),
            reason: err.lines().next().unwrap_or("failed").to_string(),
        })
    }
}

/// The first free UDP port from [`FIRST_PORT`] not in `taken`.
pub fn free_port(taken: &[u16]) -> Option<u16> {
    (FIRST_PORT..FIRST_PORT + 1000).find(|p| !taken.contains(p) && UdpSocket::bind(("0.0.0.0", *p)).is_ok())
}

/// The IPv4 routes of this namespace, as (network, prefix length).
pub fn routes() -> Vec<(Ipv4Addr, u8)> {
    let text = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            Some((Ipv4Addr::from(u32::from_be(dest)), u8::try_from(u32::from_be(mask).count_ones()).ok()?))
        })
        .collect()
}

/// Whether the /24 of `ip` overlaps any of `routes` (a default route excepted).
pub fn collides(ip: Ipv4Addr, routes: &[(Ipv4Addr, u8)]) -> bool {
    let net = u32::from(ip) & 0xffff_ff00;
    routes.iter().filter(|(_, p)| *p > 0).any(|(r, p)| {
        let p = (*p).min(32);
        let common = p.min(24);
        let mask = if common == 0 { 0 } else { u32::MAX << (32 - common) };
        (u32::from(*r) & mask) == (net & mask)
    })
}

/// A tunnel /24 of 10.50-249.1-250.0 that collides with no route and none of `taken`:
/// (consumer `.1`, VM `.2`). The search starts at a place `r` (random bytes) picks.
pub fn pick_addresses(taken: &[Ipv4Addr], r: [u8; 2]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let routes = routes();
    let start = (u32::from(r[0]) % 200) * 250 + u32::from(r[1]) % 250;
    for i in 0..(200 * 250) {
        let k = (start + i) % (200 * 250);
        let (Ok(b), Ok(c)) = (u8::try_from(50 + k / 250), u8::try_from(1 + k % 250)) else { continue };
        let consumer = Ipv4Addr::new(10, b, c, 1);
        if !collides(consumer, &routes) && !taken.iter().any(|t| t.octets()[..3] == consumer.octets()[..3]) {
            return Some((consumer, Ipv4Addr::new(10, b, c, 2)));
        }
    }
    None
}

impl Tunnel {
    /// Makes `name` with the private key in `key_file`, listening on `port`, addressed
    /// `ip/24`, up, with no peer yet: the kernel's WireGuard unless `kernel` is false or the
    /// host has no module (then `wireguard-go`, unless `go` is false).
    pub fn create(
        name: &str,
        key_file: &Path,
        port: u16,
        ip: Ipv4Addr,
        kernel: bool,
        go: bool,
    ) -> Result<Self, TunnelError> {
        let mut t = Self { name: name.into(), kind: "kernel", port, child: None };
        let made = if kernel { run("ip", &["link", "add", name, "type", "wireguard"]) } else { Ok(String::new()) };
        if let (Err(e), false) = (&made, go) {
            return Err(TunnelError::Failed { command: "ip link add type wireguard".into(), reason: e.to_string() });
        }
        if !kernel || made.is_err() {
            t.kind = "wireguard-go";
            let sock = format!("/var/run/wireguard/{name}.sock");
            let _ = std::fs::remove_file(&sock);
            let child = Command::new("wireguard-go")
                .args(["-f", name])
                .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(TunnelError::NoWireguard)?;
            t.child = Some(child);
            let end = Instant::now() + Duration::from_secs(10);
            while !Path::new(&sock).exists() || run("ip", &["link", "show", name]).is_err() {
                if Instant::now() > end {
                    return Err(TunnelError::Timeout(name.into()));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let key = key_file.to_string_lossy();
        let port_s = port.to_string();
        // The VM is the provider's: it may answer what we open through the tunnel, never open
        // anything on this machine or beyond it.
        let setup = fence(name, true)
            .and_then(|()| run("wg", &["set", name, "private-key", &key, "listen-port", &port_s]))
            .and_then(|_| run("ip", &["addr", "add", &format!("{ip}/24"), "dev", name]))
            .and_then(|_| run("ip", &["link", "set", name, "up"]));
        if let Err(e) = setup {
            t.remove();
            return Err(e);
        }
        Ok(t)
    }

    /// Adds the VM as its one peer, for its /32 only (it dials out to us: no endpoint).
    pub fn add_peer(&self, public: &str, vm_ip: Ipv4Addr) -> Result<(), TunnelError> {
        run("wg", &["set", &self.name, "peer", public, "allowed-ips", &format!("{vm_ip}/32")]).map(|_| ())
    }

    /// Names where peer `public` is, so this side can start a session (a tunnel made again
    /// after a restart: the VM still holds the old session's keys).
    pub fn set_peer_endpoint(&self, public: &str, endpoint: std::net::SocketAddrV4) -> Result<(), TunnelError> {
        run("wg", &["set", &self.name, "peer", public, "endpoint", &endpoint.to_string()]).map(|_| ())
    }

    /// The latest handshake with its peer, seconds since the epoch (0: none).
    pub fn last_handshake(&self) -> u64 {
        peer_stats(&self.name).0
    }

    /// Removes the interface (and ends its wireguard-go), then its fence: never the other way
    /// round, so no packet of the VM arrives while the fence is down.
    pub fn remove(&mut self) {
        // A wireguard-go TUN goes with its process; a kernel interface with `ip link del`.
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        remove_interface(&self.name);
    }
}

/// The peer of interface `name`: (latest handshake in seconds since the epoch, bytes
/// received, bytes sent, endpoint), from `wg show dump` (zeros if it cannot be read). It runs
/// `wg`: call it holding no lock.
pub fn peer_stats(name: &str) -> (u64, u64, u64, Option<String>) {
    let dump = run("wg", &["show", name, "dump"]).unwrap_or_default();
    // The first line is the interface's; the peer's: key, psk, endpoint, ips, handshake, rx, tx, ...
    let Some(line) = dump.lines().nth(1) else { return (0, 0, 0, None) };
    let f: Vec<&str> = line.split('\t').collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
    let ep = f.get(2).filter(|e| **e != "(none)").map(|e| (*e).to_string());
    (n(4), n(5), n(6), ep)
}

/// The firewall rules of a tunnel interface: nothing from the VM but answers
/// (INPUT: only established or related flows), nothing forwarded from it. `add`: insert them
/// (failing if iptables cannot), else delete them (quietly).
fn fence(name: &str, add: bool) -> Result<(), TunnelError> {
    let op = if add { "-I" } else { "-D" };
    let rules: [&[&str]; 2] = [
        &["INPUT", "-i", name, "-m", "conntrack", "!", "--ctstate", "ESTABLISHED,RELATED", "-j", "DROP"],
        &["FORWARD", "-i", name, "-j", "DROP"],
    ];
    for r in rules {
        let mut args = vec!["-w", op];
        args.extend_from_slice(r);
        let done = run("iptables", &args);
        if add {
            done.map_err(|e| TunnelError::Fence(Box::new(e)))?;
        }
    }
    Ok(())
}

/// Removes an interface by name (a leftover of a crashed daemon included) and then its
/// firewall rules, only once the interface is gone (a fence never comes down while packets can
/// still arrive on it: an interface that will not go keeps its fence, said in the log); quiet if
/// absent.
pub fn remove_interface(name: &str) {
    let _ = run("ip", &["link", "del", name]);
    let gone = || run("ip", &["link", "show", name]).is_err();
    let end = Instant::now() + Duration::from_secs(2);
    while !gone() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    if gone() {
        let _ = fence(name, false);
    } else {
        engine::warn!("tunnel {name}: the interface did not go; its fence stays");
    }
    let _ = std::fs::remove_file(format!("/var/run/wireguard/{name}.sock"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_addresses_avoid_existing_routes() {
        let routes = [(Ipv4Addr::new(10, 0, 0, 0), 8u8)];
        assert!(collides(Ipv4Addr::new(10, 60, 3, 1), &routes));
        let routes = [(Ipv4Addr::new(10, 60, 3, 0), 24u8), (Ipv4Addr::new(0, 0, 0, 0), 0)];
        assert!(collides(Ipv4Addr::new(10, 60, 3, 1), &routes));
        assert!(!collides(Ipv4Addr::new(10, 60, 4, 1), &routes));
        let routes = [(Ipv4Addr::new(10, 60, 3, 128), 25u8)];
        assert!(collides(Ipv4Addr::new(10, 60, 3, 1), &routes));
        let (c, v) = pick_addresses(&[], [7, 9]).unwrap();
        assert_eq!(c.octets()[..3], v.octets()[..3]);
        assert_eq!((c.octets()[3], v.octets()[3]), (1, 2));
    }
}
