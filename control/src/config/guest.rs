//! `vm start SPEC`: a VM description without `handle` (the engine makes the handle, a
//! socketpair, itself) plus the keys of the guest the engine boots for it. Read here, once,
//! into [`GuestStart`]; the registry only acts on it.
use std::time::Duration;

use engine::config::{HandleSpec, VmConfig};

use super::{split_spec, ConfigError, Label, VmDesc};

/// The keys `vm start` takes beside a VM description's.
pub const GUEST_KEYS: &[(&str, &str)] = &[
    ("kernel", "the guest kernel: an absolute path or a file name in the engine's first --image-dir (required)"),
    ("initrd", "the guest initramfs, as kernel (required)"),
    ("memory", "guest memory in MiB (default 128)"),
    ("firewall", "no: boot without the guest firewall rule set (default yes)"),
    ("mode", "as a VM's, or direct: the guest on its VMM's own NAT, no engine in the path"),
    ("rogue-interval", "direct mode: seconds between checks of the VMM's connections, 1 to 3600 (default 5)"),
    ("boot-timeout", "seconds the guest has to say it is ready, 1 to 3600 (default: the engine's)"),
];

/// A `vm start` request, read and checked key by key (the VM's own keys are checked as a
/// whole by [`GuestStart::validate`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GuestStart {
    /// The VM's own keys (no handle).
    pub desc: VmDesc,
    /// `kernel=` as given (resolved in the image directories by the registry).
    pub kernel: String,
    /// `initrd=` as given.
    pub initrd: String,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Whether the guest firewall is on.
    pub firewall: bool,
    /// `mode=direct`: no engine in the path, the rogue-connection detector watching.
    pub direct: bool,
    /// Direct mode: how often the VMM's connections are checked.
    pub rogue_interval: Duration,
    /// How long the guest has to become ready (`None`: the engine's default).
    pub boot_timeout: Option<Duration>,
}

/// Plain messages: these keys are the request's, not the VM's (as the engine has always said
/// them).
fn refused(msg: String) -> ConfigError {
    ConfigError::Request(msg)
}

/// 1 to 3600 seconds.
fn seconds(key: &str, v: &str) -> Result<Duration, ConfigError> {
    v.parse::<u64>()
        .ok()
        .filter(|s| (1..=3600).contains(s))
        .map(Duration::from_secs)
        .ok_or_else(|| refused(format!("{key}={v}: 1 to 3600 seconds")))
}

impl GuestStart {
    /// Reads `name=...,consumer=...,kernel=K,initrd=I[,memory=M][,firewall=no][,mode=M]
    /// [,rogue-interval=S][,boot-timeout=S]`.
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let mut pairs = split_spec(spec)?;
        let mut take = |key: &str| {
            let v = pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.clone());
            pairs.retain(|(k, _)| k != key);
            v
        };
        let kernel = take("kernel").ok_or_else(|| refused("vm start needs kernel=PATH".into()))?;
        let initrd = take("initrd").ok_or_else(|| refused("vm start needs initrd=PATH".into()))?;
        let memory_mib = match take("memory") {
            Some(m) => m.parse().map_err(|_| refused(format!("memory={m}: not a number of MiB")))?,
            None => 128,
        };
        let firewall = !matches!(take("firewall").as_deref(), Some("no" | "false" | "0"));
        let rogue_interval = take("rogue-interval");
        let mode = take("mode");
        let boot_timeout = take("boot-timeout").map(|v| seconds("boot-timeout", &v)).transpose()?;
        let rogue_interval = rogue_interval.map_or(Ok(Duration::from_secs(5)), |v| seconds("rogue-interval", &v))?;
        if pairs.iter().any(|(k, _)| k == "handle") {
            return Err(refused("vm start makes the VM's handle itself; drop handle=".into()));
        }
        let direct = mode.as_deref() == Some("direct");
        if let Some(m) = mode.filter(|_| !direct) {
            pairs.push(("mode".into(), m));
        }
        let desc = VmDesc::from_pairs(&pairs)?;
        Ok(Self { desc, kernel, initrd, memory_mib, firewall, direct, rogue_interval, boot_timeout })
    }

    /// Checks the VM's own keys as a whole, as `vm add` would, before any handle exists.
    pub fn validate(&self) -> Result<Unattached, ConfigError> {
        self.desc.validate_unattached()
    }
}

/// A VM checked before its handle exists: the engine makes one (a socketpair) only once
/// everything is known to be good, so a refusal leaves no descriptor behind.
#[derive(Debug, Clone, PartialEq)]
pub struct Unattached(VmConfig);

impl Unattached {
    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The VM as checked (its handle is not yet its own).
    pub fn config(&self) -> &VmConfig {
        &self.0
    }

    /// The VM on `handle`, ready for a worker.
    pub fn attach(self, handle: HandleSpec) -> VmConfig {
        VmConfig { handle, ..self.0 }
    }

    /// A direct-mode VM, whose description is checked like any other's but which no worker
    /// ever serves: its handle is an inherited descriptor that is never opened.
    pub fn never_attached(self) -> VmConfig {
        self.0
    }
}

impl VmDesc {
    /// [`VmDesc::validate`] for a description whose handle the engine makes itself (a
    /// `handle=` given is refused).
    pub fn validate_unattached(&self) -> Result<Unattached, ConfigError> {
        if self.handle.is_some() {
            let vm = Label(self.name.clone());
            return Err(ConfigError::Invalid {
                vm,
                why: "the engine makes this VM's handle itself; drop handle=".into(),
            });
        }
        // Checked as if on an inherited socket: descriptor 0 is never opened for it (attach
        // replaces it, and direct mode has no worker).
        self.validate_with(Some(HandleSpec::DgramFd(0))).map(Unattached)
    }
}
