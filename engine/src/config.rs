//! A VM description as the data plane receives it: typed and validated. Parsing (the `--vm`
//! grammar, the TOML file, merging and validation) lives outside the data-plane crate, in
//! `control::config`.
#![forbid(unsafe_code)]

use core::fmt;
use core::net::SocketAddrV4;
use std::path::PathBuf;

use crate::filter::{Allowlist, Endpoint, Policy, SampleRate, SpecialAddresses};
use crate::nat::VmIdentity;

/// How much of a VM's traffic is checked, and what a violation does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Every packet checked; violations dropped.
    Filtered,
    /// First packet of each flow checked; a violation terminates the VM.
    Conntrack,
    /// A share of packets checked; a violation terminates the VM.
    Sampled(SampleRate),
}

impl Mode {
    /// `filtered`, `conntrack` or `sampled`.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Filtered => "filtered",
            Mode::Conntrack => "conntrack",
            Mode::Sampled(_) => "sampled",
        }
    }
}

/// Where the VM's frames come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandleSpec {
    /// A unix datagram socket the engine binds at `path` (QEMU `-netdev dgram` with unix paths).
    Dgram {
        /// Path the engine binds.
        path: PathBuf,
        /// Path of the VMM's socket; learnt from the first frame when absent.
        peer: Option<PathBuf>,
    },
    /// An inherited unix datagram socket (a socketpair end), one frame per datagram.
    DgramFd(i32),
    /// A unix stream socket the engine listens on; frames carry a u32 big-endian length.
    Stream(PathBuf),
    /// An inherited connected unix stream socket with the same framing.
    StreamFd(i32),
}

impl HandleSpec {
    /// The socket file this handle binds, if it binds one.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            HandleSpec::Dgram { path, .. } | HandleSpec::Stream(path) => Some(path),
            HandleSpec::DgramFd(_) | HandleSpec::StreamFd(_) => None,
        }
    }

    /// Whether two handles would take the same place: one socket path (whatever the scheme:
    /// `dgram:P` and `stream:P` both bind `P`) or one inherited descriptor.
    pub fn same_place(&self, other: &HandleSpec) -> bool {
        match (self, other) {
            (HandleSpec::DgramFd(a) | HandleSpec::StreamFd(a), HandleSpec::DgramFd(b) | HandleSpec::StreamFd(b)) => {
                a == b
            }
            _ => self.path().is_some() && self.path() == other.path(),
        }
    }
}

impl fmt::Display for HandleSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandleSpec::Dgram { path, .. } => write!(f, "dgram:{}", path.display()),
            HandleSpec::DgramFd(fd) => write!(f, "fd:{fd}"),
            HandleSpec::Stream(path) => write!(f, "stream:{}", path.display()),
            HandleSpec::StreamFd(fd) => write!(f, "stream-fd:{fd}"),
        }
    }
}

/// The default adaptive-polling window after traffic (`spin-us`).
pub const DEFAULT_SPIN: std::time::Duration = std::time::Duration::from_micros(50);

/// One VM, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    /// Unique name.
    pub name: String,
    /// The NIC handle.
    pub handle: HandleSpec,
    /// Link identity.
    pub identity: VmIdentity,
    /// The allowed endpoints.
    pub consumers: Vec<Endpoint>,
    /// Whether special consumer addresses are accepted.
    pub special: SpecialAddresses,
    /// Whether private consumer addresses (RFC 1918, CGNAT) are accepted.
    pub private: bool,
    /// Filtering mode.
    pub mode: Mode,
    /// Seed for sampled mode.
    pub seed: Option<u64>,
    /// Conntrack table size.
    pub flows: usize,
    /// CPU to pin to.
    pub cpu: Option<usize>,
    /// Local address of the host socket.
    pub bind: SocketAddrV4,
    /// The worker polls without ever sleeping.
    pub busy_poll: bool,
    /// After traffic, the worker polls without sleeping for this long before it waits in the
    /// kernel (adaptive polling: round trips without a wake-up, an idle VM costs nothing);
    /// zero: it waits at once.
    pub spin: std::time::Duration,
    /// `stream:PATH` handles: the only uid whose connection is accepted.
    pub peer_uid: Option<u32>,
    /// The lease (seconds) the engine's DHCP server gives the VM; `None`: no DHCP.
    pub dhcp: Option<u32>,
    /// The rental's endpoint-proof key: a proof from anywhere moves the VM's one endpoint
    /// (`proof.rs`). Set by `vm start image=...,proof-key=...` only, never by a config file.
    pub proof: Option<crate::proof::Key>,
    /// No proof whose counter (Unix ms) is at or below this is accepted: a VM restored after
    /// an engine restart accepts no proof made before it (0: any).
    pub proof_floor_ms: u64,
}

impl VmConfig {
    /// What this VM's allowlist may contain, given the host's addresses as they are now
    /// (`sys::local_ipv4_addrs`; a configuration reads no system state itself).
    pub fn policy(&self, host: Vec<std::net::Ipv4Addr>) -> Policy {
        let id = &self.identity;
        Policy { special: self.special, private: self.private, own: Some((id.ip, id.prefix_len, id.gateway_ip)), host }
    }

    /// The allowlist of this VM, under [`VmConfig::policy`] with `host`.
    pub fn allowlist(&self, host: Vec<std::net::Ipv4Addr>) -> Allowlist {
        // Validated when the description was read; a failure here degrades to an empty list.
        Allowlist::under(self.consumers.iter().copied(), &self.policy(host)).unwrap_or_default()
    }
}
