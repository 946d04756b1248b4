//! The consumer's tunnels to the VMs it rents: an interface made with root ([`iface`]: the
//! kernel's WireGuard or `wireguard-go` on a TUN device), or kept in this process without any
//! privilege ([`user`]: boringtun and smoltcp). [`Mode`] is the choice (`omertad start
//! --tunnel`); [`Way`] one VM's tunnel, whichever it is.
pub mod iface;
pub mod user;

use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub use iface::{collides, free_port, pick_addresses, remove_interface, routes, Tunnel, TunnelError, FIRST_PORT};
pub use user::UserTunnel;

/// How this daemon makes its tunnels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// An interface where the daemon may make one (root, or `CAP_NET_ADMIN`), else userspace.
    #[default]
    Auto,
    /// The kernel's WireGuard only.
    Kernel,
    /// `wireguard-go` on a TUN device only.
    WireguardGo,
    /// boringtun and smoltcp in this process: no privilege.
    Userspace,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Kernel => "kernel",
            Self::WireguardGo => "wireguard-go",
            Self::Userspace => "userspace",
        })
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "kernel" => Ok(Self::Kernel),
            "wireguard-go" => Ok(Self::WireguardGo),
            "userspace" => Ok(Self::Userspace),
            _ => Err(format!(
                "'{}': the tunnel is auto, kernel, wireguard-go or userspace",
                crate::net::printable(s, 20)
            )),
        }
    }
}

impl Mode {
    /// What `Auto` comes to here: `Userspace` for a daemon that cannot make interfaces.
    pub fn resolve(self) -> Self {
        match self {
            Self::Auto if !can_make_interfaces() => Self::Userspace,
            m => m,
        }
    }
}

/// Whether this process holds `CAP_NET_ADMIN` (bit 12 of its effective set), which making a
/// WireGuard interface and its firewall rules needs.
pub fn can_make_interfaces() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

/// One VM's tunnel.
#[derive(Debug)]
pub enum Way {
    /// An interface.
    Iface(Tunnel),
    /// In this process (shared with the CLI connections being opened through it).
    User(Arc<UserTunnel>),
}

impl Way {
    /// `kernel`, `wireguard-go` or `userspace`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Iface(t) => t.kind,
            Self::User(_) => "userspace",
        }
    }

    /// What reads its state without holding whatever holds it (a `wg` run may be slow).
    pub fn probe(&self) -> Probe {
        match self {
            Self::Iface(t) => Probe::Iface(t.name.clone()),
            Self::User(u) => Probe::User(u.clone()),
        }
    }

    /// Ends it: the interface and its fence go, or the thread stops with every connection.
    pub fn remove(&mut self) {
        match self {
            Self::Iface(t) => t.remove(),
            Self::User(u) => u.stop(),
        }
    }
}

/// A tunnel's state, read apart from its owner ([`Way::probe`]).
#[derive(Debug, Clone)]
pub enum Probe {
    /// An interface, by name.
    Iface(String),
    /// A userspace tunnel.
    User(Arc<UserTunnel>),
}

impl Probe {
    /// (latest handshake in seconds since the epoch (0: none), WireGuard bytes received and
    /// sent, the VM's endpoint).
    pub fn peer(&self) -> (u64, u64, u64, Option<String>) {
        match self {
            Self::Iface(name) => iface::peer_stats(name),
            Self::User(u) => {
                let s = u.stats();
                let ep = s.endpoint.lock().ok().and_then(|e| e.map(|e| e.to_string()));
                let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
                (load(&s.last_handshake), load(&s.rx_bytes), load(&s.tx_bytes), ep)
            }
        }
    }
}

/// Where a CLI's connection to a VM's port goes.
#[derive(Debug)]
pub enum Route {
    /// Through this daemon's userspace tunnel.
    User(Arc<UserTunnel>),
    /// Straight to the VM's tunnel address, through the interface.
    Direct(Ipv4Addr),
}
