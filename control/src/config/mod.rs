//! VM descriptions as operators write them: the `--vm` flag, the TOML config file, merging and
//! validation, into the engine's typed `engine::config::VmConfig`.
//!
//! One VM is a list of `key=value` pairs: `name=vm0,handle=fd:3,consumer=203.0.113.7:51820`.
//! The config file holds the same keys, one `[[vm]]` table per VM (arrays for repeated keys),
//! read by serde straight into the same typed [`VmDesc`] the pairs are parsed into: each value
//! is parsed once, by the type of its key, whichever way it came. A `--vm` with the name of a
//! VM of the file overrides the file's keys one by one. [`VmDesc::validate`] is the one place a
//! description becomes the engine's `VmConfig`. Every error is one line naming the VM and the
//! key; nothing here panics on any input.
//!
//! Over 500 lines: about half are its tests, which list the grammar's every error.
#![forbid(unsafe_code)]

use core::fmt;
use core::net::{Ipv4Addr, SocketAddrV4};
use core::str::FromStr;
use std::path::PathBuf;

use engine::config::{HandleSpec, Mode, VmConfig};
use engine::filter::{Allowlist, Conntrack, Endpoint, Policy, SampleRate, SpecialAddresses};
use engine::nat::VmIdentity;
use engine::wire::Mac;
use serde::{Deserialize, Deserializer};

/// The keys a VM description accepts, with their meaning (for `--help` and errors).
pub const KEYS: &[(&str, &str)] = &[
    ("name", "unique VM name (letters, digits, '-', '_', '.'; required)"),
    ("handle", "the VM's NIC: dgram:PATH | fd:N | stream:PATH | stream-fd:N (required)"),
    ("peer", "dgram:PATH only: the VMM's socket path, the only sender accepted (default: the first one)"),
    ("peer-uid", "stream:PATH only: the only uid whose connection is accepted (default: the first to connect)"),
    ("consumer", "an allowed endpoint IP:PORT; repeat for more (at least one)"),
    ("mode", "filtered (default) | conntrack | sampled"),
    ("sample-rate", "sampled mode: share of packets checked, in (0, 1] (default 0.01)"),
    ("seed", "sampled mode: generator seed, tests and labs only (with allow-special=yes; default: random)"),
    ("flows", "conntrack mode: flow-table size (default 1024)"),
    ("cpu", "CPU to pin the VM's thread to (default: not pinned)"),
    ("mac", "the VM's MAC (default 52:54:00:12:34:56)"),
    ("ip", "the VM's address and prefix (default 10.0.2.15/24)"),
    ("gateway", "the gateway address the engine answers for (default 10.0.2.2)"),
    ("gateway-mac", "the gateway's MAC (default 52:55:0a:00:02:02)"),
    ("mtu", "the VM's MTU, 576..=9000 (default 1500)"),
    ("bind", "local address of the VM's host UDP socket (default 0.0.0.0:0)"),
    ("allow-special", "yes: accept loopback/link-local consumers (labs and tests only; default no)"),
    ("allow-private", "yes: accept private consumers (RFC 1918, CGNAT 100.64/10) for LAN deployments (default no)"),
    ("busy-poll", "yes: the VM's thread never sleeps (lower latency, one core always busy; default no)"),
    ("spin-us", "after traffic, the VM's thread polls this many µs before it sleeps, 0..=1000 (adaptive polling; default 50, 0: off)"),
    ("dhcp", "no: the engine answers no DHCP, the guest sets its address itself (default yes)"),
    ("dhcp-lease", "seconds of the leases the engine's DHCP gives, 60..=604800 (default 3600)"),
    ("alias", "a UDP port: the consumer's alias at the gateway address; the VM sends there, the engine to its one consumer (default: none)"),
];

/// A configuration that cannot be used. Every message is one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A `--vm` part without `=`.
    #[error("'{part}' is not key=value (in --vm {spec})")]
    NotKeyValue {
        /// The part.
        part: String,
        /// The whole description.
        spec: String,
    },
    /// A key no VM description has.
    #[error("{vm}: unknown key '{key}' (known: {known})", known = key_names())]
    UnknownKey {
        /// `vm 'NAME'` or `vm`.
        vm: Label,
        /// The key.
        key: String,
    },
    /// A value its key's type does not take.
    #[error("{vm}: {key}={value}: {why}")]
    BadValue {
        /// `vm 'NAME'` or `vm`.
        vm: Label,
        /// The key.
        key: &'static str,
        /// The value as written.
        value: String,
        /// Why.
        why: String,
    },
    /// Values that are each fine but do not work together, or a required key missing.
    #[error("{vm}: {why}")]
    Invalid {
        /// `vm 'NAME'` or `vm`.
        vm: Label,
        /// Why.
        why: String,
    },
    /// The config file is not TOML or not of the expected shape.
    #[error("config file: {0}")]
    File(String),
    /// Two VMs with one name.
    #[error("vm '{0}' is described twice")]
    Duplicate(String),
    /// A key of a request around the description (`vm start`'s guest keys), said as is.
    #[error("{0}")]
    Request(String),
    /// Two VMs on one handle.
    #[error("vm '{vm}': handle {handle} is used by another VM")]
    SharedHandle {
        /// The second VM.
        vm: String,
        /// The handle.
        handle: String,
    },
}

/// How an error names its VM: `vm 'NAME'`, or `vm` before the name is known.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Label(Option<String>);

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(n) if !n.is_empty() => write!(f, "vm '{n}'"),
            _ => f.write_str("vm"),
        }
    }
}

/// Key/value pairs of one VM description, in order.
pub type Pairs = Vec<(String, String)>;

/// Splits `name=vm0,handle=fd:3,...` into pairs.
pub fn split_spec(spec: &str) -> Result<Pairs, ConfigError> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| ConfigError::NotKeyValue { part: part.to_string(), spec: spec.to_string() })?;
        out.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(out)
}

/// A VM handle as written: `dgram:PATH`, `fd:N`, `stream:PATH`, `stream-fd:N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle(pub HandleSpec);

impl FromStr for Handle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let fd = |v: &str| {
            v.parse::<i32>().ok().filter(|fd| *fd >= 0).ok_or_else(|| format!("'{v}' is not a file descriptor"))
        };
        let path = |v: &str| {
            if v.is_empty() {
                Err("empty path".to_string())
            } else if v.len() >= 108 {
                Err("a unix socket path must be shorter than 108 bytes".to_string())
            } else {
                Ok(PathBuf::from(v))
            }
        };
        Ok(Handle(match s.split_once(':') {
            Some(("dgram", p)) => HandleSpec::Dgram { path: path(p)?, peer: None },
            Some(("fd", n)) => HandleSpec::DgramFd(fd(n)?),
            Some(("stream", p)) => HandleSpec::Stream(path(p)?),
            Some(("stream-fd", n)) => HandleSpec::StreamFd(fd(n)?),
            _ => return Err("expected dgram:PATH, fd:N, stream:PATH or stream-fd:N".to_string()),
        }))
    }
}

/// The VM's address and prefix length: `10.0.2.15/24` (a bare address means /24).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub Ipv4Addr, pub u8);

impl FromStr for Cidr {
    type Err = String;
    fn from_str(v: &str) -> Result<Self, String> {
        let (ip, prefix) = v.split_once('/').unwrap_or((v, "24"));
        match (ip.parse(), prefix.parse()) {
            (Ok(ip), Ok(p)) => Ok(Cidr(ip, p)),
            _ => Err("not an IPv4 address/prefix".to_string()),
        }
    }
}

/// The local address of the VM's host socket: `IP` or `IP:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind(pub SocketAddrV4);

impl FromStr for Bind {
    type Err = String;
    fn from_str(v: &str) -> Result<Self, String> {
        v.parse::<SocketAddrV4>()
            .or_else(|_| v.parse::<Ipv4Addr>().map(|ip| SocketAddrV4::new(ip, 0)))
            .map(Bind)
            .map_err(|_| "an IPv4 address, with or without :PORT".to_string())
    }
}

/// The `mode` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeName {
    /// Every packet checked.
    Filtered,
    /// The first packet of a flow checked.
    Conntrack,
    /// A share of packets checked.
    Sampled,
    /// No engine in the path (refused here: the VM launcher sets it up).
    Direct,
}

impl FromStr for ModeName {
    type Err = String;
    fn from_str(v: &str) -> Result<Self, String> {
        match v {
            "filtered" => Ok(ModeName::Filtered),
            "conntrack" => Ok(ModeName::Conntrack),
            "sampled" => Ok(ModeName::Sampled),
            "direct" => Ok(ModeName::Direct),
            _ => Err("filtered, conntrack or sampled".to_string()),
        }
    }
}

/// A yes/no key in a `--vm` description.
fn yes_no(v: &str) -> Result<bool, String> {
    match v {
        "yes" | "true" | "1" => Ok(true),
        "no" | "false" | "0" => Ok(false),
        _ => Err("yes or no".to_string()),
    }
}

/// One VM as described, every key typed and optional until [`VmDesc::validate`].
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VmDesc {
    /// `name`.
    pub name: Option<String>,
    /// `handle`.
    #[serde(default, deserialize_with = "parsed")]
    pub handle: Option<Handle>,
    /// `peer`.
    pub peer: Option<PathBuf>,
    /// `peer-uid`.
    #[serde(alias = "peer_uid")]
    pub peer_uid: Option<u32>,
    /// `consumer`, every one given.
    #[serde(default, deserialize_with = "endpoints")]
    pub consumer: Option<Vec<Endpoint>>,
    /// `mode`.
    pub mode: Option<ModeName>,
    /// `sample-rate`.
    #[serde(alias = "sample_rate")]
    pub sample_rate: Option<f64>,
    /// `seed`.
    pub seed: Option<u64>,
    /// `flows`.
    pub flows: Option<usize>,
    /// `cpu`.
    pub cpu: Option<usize>,
    /// `mac`.
    #[serde(default, deserialize_with = "parsed")]
    pub mac: Option<Mac>,
    /// `ip`.
    #[serde(default, deserialize_with = "parsed")]
    pub ip: Option<Cidr>,
    /// `gateway`.
    pub gateway: Option<Ipv4Addr>,
    /// `gateway-mac`.
    #[serde(default, alias = "gateway_mac", deserialize_with = "parsed")]
    pub gateway_mac: Option<Mac>,
    /// `mtu`.
    pub mtu: Option<u16>,
    /// `bind`.
    #[serde(default, deserialize_with = "parsed")]
    pub bind: Option<Bind>,
    /// `allow-special`.
    #[serde(alias = "allow_special")]
    pub allow_special: Option<bool>,
    /// `allow-private`.
    #[serde(alias = "allow_private")]
    pub allow_private: Option<bool>,
    /// `busy-poll`.
    #[serde(alias = "busy_poll")]
    pub busy_poll: Option<bool>,
    /// `spin-us`.
    #[serde(alias = "spin_us")]
    pub spin_us: Option<u32>,
    /// `dhcp`.
    pub dhcp: Option<bool>,
    /// `dhcp-lease`.
    #[serde(alias = "dhcp_lease")]
    pub dhcp_lease: Option<u32>,
    /// `alias`: the port of the consumer's alias at the gateway's address.
    pub alias: Option<u16>,
    /// The rental's endpoint-proof key (`vm start image=...,proof-key=`; no config key).
    #[serde(skip)]
    pub proof: Option<engine::proof::Key>,
}

/// A string key parsed by its type's `FromStr`.
fn parsed<'de, D: Deserializer<'de>, T: FromStr>(d: D) -> Result<Option<T>, D::Error>
where
    T::Err: fmt::Display,
{
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(|e| serde::de::Error::custom(format!("'{s}': {e}")))
}

/// `consumer = "IP:PORT"` or `consumer = ["IP:PORT", ...]`.
fn endpoints<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Endpoint>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let list = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    };
    list.iter()
        .map(|s| s.parse::<Endpoint>().map_err(|e| serde::de::Error::custom(format!("consumer '{s}': {e}"))))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

impl VmDesc {
    /// Parses `--vm` pairs, each value by its key's type. Repeated `consumer` keys add up
    /// (and one may join several with `+`); any other repeated key: the last one counts.
    pub fn from_pairs(pairs: &Pairs) -> Result<Self, ConfigError> {
        let vm = Label(pairs.iter().rev().find(|(k, _)| k == "name").map(|(_, v)| v.clone()));
        let mut d = VmDesc::default();
        for (k, v) in pairs {
            d.set(&vm, k, v)?;
        }
        Ok(d)
    }

    fn set(&mut self, vm: &Label, key: &str, v: &str) -> Result<(), ConfigError> {
        fn p<T: FromStr>(vm: &Label, key: &'static str, v: &str, why: &str) -> Result<Option<T>, ConfigError>
        where
            T::Err: fmt::Display,
        {
            v.parse::<T>().map(Some).map_err(|e| {
                let e = e.to_string();
                ConfigError::BadValue {
                    vm: vm.clone(),
                    key,
                    value: v.to_string(),
                    why: if why.is_empty() { e } else { why.to_string() },
                }
            })
        }
        let Some(&(key, _)) = KEYS.iter().find(|(k, _)| *k == key) else {
            return Err(ConfigError::UnknownKey { vm: vm.clone(), key: key.to_string() });
        };
        let flag = |v: &str| {
            yes_no(v).map(Some).map_err(|why| ConfigError::BadValue { vm: vm.clone(), key, value: v.to_string(), why })
        };
        match key {
            "name" => self.name = Some(v.to_string()),
            "handle" => self.handle = p(vm, key, v, "")?,
            "peer" => self.peer = Some(PathBuf::from(v)),
            "peer-uid" => self.peer_uid = p(vm, key, v, "not a uid")?,
            "consumer" => {
                let list = self.consumer.get_or_insert_with(Vec::new);
                for one in v.split('+').filter(|s| !s.is_empty()) {
                    list.extend(p::<Endpoint>(vm, key, one, "")?);
                }
            }
            "mode" => self.mode = p(vm, key, v, "")?,
            "sample-rate" => self.sample_rate = p(vm, key, v, "not a number")?,
            "seed" => self.seed = p(vm, key, v, "not a number")?,
            "flows" => self.flows = p(vm, key, v, "a number from 1 to 1048576")?,
            "cpu" => self.cpu = p(vm, key, v, "not a CPU number")?,
            "mac" => self.mac = p(vm, key, v, "")?,
            "ip" => self.ip = p(vm, key, v, "")?,
            "gateway" => self.gateway = p(vm, key, v, "not an IPv4 address")?,
            "gateway-mac" => self.gateway_mac = p(vm, key, v, "")?,
            "mtu" => self.mtu = p(vm, key, v, "not a number")?,
            "bind" => self.bind = p(vm, key, v, "")?,
            "allow-special" => self.allow_special = flag(v)?,
            "allow-private" => self.allow_private = flag(v)?,
            "busy-poll" => self.busy_poll = flag(v)?,
            "spin-us" => self.spin_us = p(vm, key, v, "a number of microseconds")?,
            "dhcp" => self.dhcp = flag(v)?,
            "dhcp-lease" => self.dhcp_lease = p(vm, key, v, "a number of seconds")?,
            "alias" => self.alias = p(vm, key, v, "a UDP port")?,
            _ => return Err(ConfigError::UnknownKey { vm: vm.clone(), key: key.to_string() }),
        }
        Ok(())
    }

    /// This description with every key `over` sets replacing this one's (its consumers, if
    /// any, replace all of this one's).
    pub fn overlay(mut self, over: &VmDesc) -> Self {
        macro_rules! take {
            ($($f:ident),*) => { $( if over.$f.is_some() { self.$f = over.$f.clone(); } )* };
        }
        take!(
            name,
            handle,
            peer,
            peer_uid,
            consumer,
            mode,
            sample_rate,
            seed,
            flows,
            cpu,
            mac,
            ip,
            gateway,
            gateway_mac,
            mtu,
            bind,
            allow_special,
            allow_private,
            busy_poll,
            spin_us,
            dhcp,
            dhcp_lease,
            alias,
            proof
        );
        self
    }

    /// Checks the description as a whole and makes the engine's typed configuration.
    pub fn validate(&self) -> Result<VmConfig, ConfigError> {
        self.validate_with(self.handle.clone().map(|h| h.0))
    }

    /// [`VmDesc::validate`] with `handle` in place of the description's.
    fn validate_with(&self, handle: Option<HandleSpec>) -> Result<VmConfig, ConfigError> {
        let name = self.name.clone().unwrap_or_default();
        let vm = Label(self.name.clone());
        let invalid = |why: String| ConfigError::Invalid { vm: vm.clone(), why };
        let bad =
            |key: &'static str, value: String, why: String| ConfigError::BadValue { vm: vm.clone(), key, value, why };
        if name.is_empty()
            || name.len() > 64
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(invalid("name is required: 1 to 64 letters, digits, '-', '_' or '.'".into()));
        }
        let Some(mut handle) = handle else {
            return Err(invalid("handle= is required".into()));
        };
        if let Some(peer) = &self.peer {
            match &mut handle {
                HandleSpec::Dgram { peer: p, .. } => *p = Some(peer.clone()),
                _ => {
                    return Err(bad(
                        "peer",
                        peer.display().to_string(),
                        "peer= goes only with handle=dgram:PATH".into(),
                    ))
                }
            }
        }
        if let (Some(uid), false) = (self.peer_uid, matches!(handle, HandleSpec::Stream(_))) {
            return Err(bad("peer-uid", uid.to_string(), "peer-uid= goes only with handle=stream:PATH".into()));
        }
        let mut identity = VmIdentity::default();
        identity.mac = self.mac.unwrap_or(identity.mac);
        identity.gateway_mac = self.gateway_mac.unwrap_or(identity.gateway_mac);
        if let Some(Cidr(ip, prefix)) = self.ip {
            (identity.ip, identity.prefix_len) = (ip, prefix);
        }
        identity.gateway_ip = self.gateway.unwrap_or(identity.gateway_ip);
        identity.mtu = self.mtu.unwrap_or(identity.mtu);
        identity.alias_port = self.alias;
        identity.validate().map_err(|e| invalid(e.to_string()))?;

        let special = if self.allow_special == Some(true) { SpecialAddresses::Allow } else { SpecialAddresses::Refuse };
        let consumers = self.consumer.clone().unwrap_or_default();
        // A proof rental starts with none: its consumer's endpoint is learned from a proof.
        if consumers.is_empty() && !(self.alias.is_some() && self.proof.is_some()) {
            return Err(invalid(
                "at least one consumer=IP:PORT is required (an empty allowlist blocks everything)".into(),
            ));
        }
        if self.alias.is_some() && consumers.len() > 1 {
            return Err(invalid("alias= stands for one consumer: give one consumer=".into()));
        }
        let private = self.allow_private == Some(true);
        let policy = Policy {
            special,
            private,
            own: Some((identity.ip, identity.prefix_len, identity.gateway_ip)),
            host: sys::local_ipv4_addrs().unwrap_or_default(),
        };
        Allowlist::under(consumers.iter().copied(), &policy).map_err(|e| invalid(e.to_string()))?;

        let rate = match self.sample_rate {
            None => SampleRate::DEFAULT,
            Some(r) => SampleRate::new(r).map_err(|e| bad("sample-rate", r.to_string(), e.to_string()))?,
        };
        let mode = match self.mode.unwrap_or(ModeName::Filtered) {
            ModeName::Filtered => Mode::Filtered,
            ModeName::Conntrack => Mode::Conntrack,
            ModeName::Sampled => Mode::Sampled(rate),
            ModeName::Direct => {
                return Err(invalid(
                    "mode=direct has no engine in the path; it is set up by the VM launcher, not here".into(),
                ))
            }
        };
        if self.sample_rate.is_some() && !matches!(mode, Mode::Sampled(_)) {
            return Err(invalid("sample-rate= goes only with mode=sampled".into()));
        }
        if self.seed.is_some() && special != SpecialAddresses::Allow {
            return Err(invalid(
                "seed= makes the sampling predictable: tests and labs only, with allow-special=yes".into(),
            ));
        }
        let dhcp = match (self.dhcp.unwrap_or(true), self.dhcp_lease) {
            (false, _) => None,
            (true, None) => Some(engine::nat::DHCP_LEASE),
            (true, Some(l)) if (60..=604_800).contains(&l) => Some(l),
            (true, Some(l)) => return Err(bad("dhcp-lease", l.to_string(), "60 to 604800 seconds".into())),
        };
        let spin = match self.spin_us {
            None => engine::config::DEFAULT_SPIN,
            Some(us) if us <= 1000 => std::time::Duration::from_micros(u64::from(us)),
            Some(us) => return Err(bad("spin-us", us.to_string(), "0 to 1000 microseconds".into())),
        };
        let flows = match self.flows {
            None => Conntrack::DEFAULT_CAPACITY,
            Some(n) if (1..=1 << 20).contains(&n) => n,
            Some(n) => return Err(bad("flows", n.to_string(), "a number from 1 to 1048576".into())),
        };
        Ok(VmConfig {
            name,
            handle,
            identity,
            consumers,
            special,
            private,
            mode,
            seed: self.seed,
            flows,
            cpu: self.cpu,
            bind: self.bind.map_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0), |b| b.0),
            busy_poll: self.busy_poll.unwrap_or(false),
            spin,
            peer_uid: self.peer_uid,
            dhcp,
            proof: self.proof,
            proof_floor_ms: 0,
        })
    }
}

/// Parses and validates one VM from its pairs.
pub fn vm_from_pairs(pairs: &Pairs) -> Result<VmConfig, ConfigError> {
    VmDesc::from_pairs(pairs)?.validate()
}

/// Parses a `--vm` flag value.
pub fn vm_from_spec(spec: &str) -> Result<VmConfig, ConfigError> {
    vm_from_pairs(&split_spec(spec)?)
}

fn key_names() -> String {
    KEYS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
}

mod file;
mod guest;
#[cfg(test)]
mod tests;

pub use file::{merge, parse_file, FileConfig};
pub use guest::{GuestStart, Unattached, GUEST_KEYS};
