//! VM descriptions as operators write them: the `--vm` flag, the TOML config file, merging and
//! validation, into the engine's typed `engine::config::VmConfig`.
//!
//! One VM is a list of `key=value` pairs: `name=vm0,handle=fd:3,consumer=203.0.113.7:51820`.
//! The config file holds the same keys, one `[[vm]]` table per VM (arrays for repeated keys).
//! A `--vm` with the name of a VM of the file overrides the file's keys one by one. Every error
//! is one line naming the VM and the key; nothing here panics on any input.
#![forbid(unsafe_code)]

use core::fmt;
use core::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;

use engine::config::{HandleSpec, Mode, VmConfig};
use engine::filter::{Allowlist, Conntrack, Endpoint, SampleRate, SpecialAddresses};
use engine::nat::VmIdentity;
use engine::wire::Mac;

/// The keys a VM description accepts, with their meaning (for `--help` and errors).
pub const KEYS: &[(&str, &str)] = &[
    ("name", "unique VM name (letters, digits, '-', '_', '.'; required)"),
    ("handle", "the VM's NIC: dgram:PATH | fd:N | stream:PATH | stream-fd:N (required)"),
    ("peer", "dgram:PATH only: the VMM's socket path to send to (default: learnt from its first frame)"),
    ("consumer", "an allowed endpoint IP:PORT; repeat for more (at least one)"),
    ("mode", "filtered (default) | conntrack | sampled"),
    ("sample-rate", "sampled mode: share of packets checked, in (0, 1] (default 0.01)"),
    ("seed", "sampled mode: generator seed (default: random)"),
    ("flows", "conntrack mode: flow-table size (default 1024)"),
    ("cpu", "CPU to pin the VM's thread to (default: not pinned)"),
    ("mac", "the VM's MAC (default 52:54:00:12:34:56)"),
    ("ip", "the VM's address and prefix (default 10.0.2.15/24)"),
    ("gateway", "the gateway address the engine answers for (default 10.0.2.2)"),
    ("gateway-mac", "the gateway's MAC (default 52:55:0a:00:02:02)"),
    ("mtu", "the VM's MTU, 576..=9000 (default 1500)"),
    ("bind", "local address of the VM's host UDP socket (default 0.0.0.0:0)"),
    ("allow-special", "yes: accept loopback/link-local consumers (labs and tests only; default no)"),
    ("busy-poll", "yes: the VM's thread never sleeps (lower latency, one core always busy; default no)"),
];

/// A configuration that cannot be used; the message is one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Key/value pairs of one VM description, in order.
pub type Pairs = Vec<(String, String)>;

/// Splits `name=vm0,handle=fd:3,...` into pairs.
pub fn split_spec(spec: &str) -> Result<Pairs, ConfigError> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) =
            part.split_once('=').ok_or_else(|| ConfigError(format!("'{part}' is not key=value (in --vm {spec})")))?;
        out.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(out)
}

fn value_of<'a>(pairs: &'a Pairs, key: &str) -> Option<&'a str> {
    pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Parses and validates one VM from its pairs.
pub fn vm_from_pairs(pairs: &Pairs) -> Result<VmConfig, ConfigError> {
    let name = value_of(pairs, "name").unwrap_or_default().to_string();
    let label = if name.is_empty() { "vm".to_string() } else { format!("vm '{name}'") };
    let bad = |key: &str, value: &str, why: &dyn fmt::Display| ConfigError(format!("{label}: {key}={value}: {why}"));
    for (k, _) in pairs {
        if !KEYS.iter().any(|(known, _)| known == k) {
            return Err(ConfigError(format!("{label}: unknown key '{k}' (known: {})", key_names())));
        }
    }
    if name.is_empty()
        || name.len() > 64
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(ConfigError(format!("{label}: name is required: 1 to 64 letters, digits, '-', '_' or '.'")));
    }
    let handle_s = value_of(pairs, "handle").ok_or_else(|| ConfigError(format!("{label}: handle= is required")))?;
    let mut handle = parse_handle(handle_s).map_err(|e| bad("handle", handle_s, &e))?;
    if let Some(peer) = value_of(pairs, "peer") {
        match &mut handle {
            HandleSpec::Dgram { peer: p, .. } => *p = Some(PathBuf::from(peer)),
            _ => return Err(bad("peer", peer, &"peer= goes only with handle=dgram:PATH")),
        }
    }
    let mut identity = VmIdentity::default();
    if let Some(v) = value_of(pairs, "mac") {
        identity.mac = v.parse::<Mac>().map_err(|e| bad("mac", v, &e))?;
    }
    if let Some(v) = value_of(pairs, "gateway-mac") {
        identity.gateway_mac = v.parse::<Mac>().map_err(|e| bad("gateway-mac", v, &e))?;
    }
    if let Some(v) = value_of(pairs, "ip") {
        let (ip, prefix) = v.split_once('/').unwrap_or((v, "24"));
        identity.ip = ip.parse().map_err(|_| bad("ip", v, &"not an IPv4 address/prefix"))?;
        identity.prefix_len = prefix.parse().map_err(|_| bad("ip", v, &"not an IPv4 address/prefix"))?;
    }
    if let Some(v) = value_of(pairs, "gateway") {
        identity.gateway_ip = v.parse().map_err(|_| bad("gateway", v, &"not an IPv4 address"))?;
    }
    if let Some(v) = value_of(pairs, "mtu") {
        identity.mtu = v.parse().map_err(|_| bad("mtu", v, &"not a number"))?;
    }
    identity.validate().map_err(|e| ConfigError(format!("{label}: {e}")))?;

    let special = match value_of(pairs, "allow-special") {
        None | Some("no" | "false" | "0") => SpecialAddresses::Refuse,
        Some("yes" | "true" | "1") => SpecialAddresses::Allow,
        Some(v) => return Err(bad("allow-special", v, &"yes or no")),
    };
    let mut consumers = Vec::new();
    for (_, v) in pairs.iter().filter(|(k, _)| k == "consumer") {
        for one in v.split('+').filter(|s| !s.is_empty()) {
            consumers.push(one.parse::<Endpoint>().map_err(|e| bad("consumer", one, &e))?);
        }
    }
    if consumers.is_empty() {
        return Err(ConfigError(format!(
            "{label}: at least one consumer=IP:PORT is required (an empty allowlist blocks everything)"
        )));
    }
    Allowlist::with_policy(consumers.iter().copied(), special).map_err(|e| ConfigError(format!("{label}: {e}")))?;

    let rate = match value_of(pairs, "sample-rate") {
        None => SampleRate::DEFAULT,
        Some(v) => {
            let r: f64 = v.parse().map_err(|_| bad("sample-rate", v, &"not a number"))?;
            SampleRate::new(r).map_err(|e| bad("sample-rate", v, &e))?
        }
    };
    let mode = match value_of(pairs, "mode").unwrap_or("filtered") {
        "filtered" => Mode::Filtered,
        "conntrack" => Mode::Conntrack,
        "sampled" => Mode::Sampled(rate),
        "direct" => {
            return Err(ConfigError(format!(
                "{label}: mode=direct has no engine in the path; it is set up by the VM launcher, not here"
            )))
        }
        v => return Err(bad("mode", v, &"filtered, conntrack or sampled")),
    };
    if value_of(pairs, "sample-rate").is_some() && !matches!(mode, Mode::Sampled(_)) {
        return Err(ConfigError(format!("{label}: sample-rate= goes only with mode=sampled")));
    }
    let seed = match value_of(pairs, "seed") {
        None => None,
        Some(v) => Some(v.parse().map_err(|_| bad("seed", v, &"not a number"))?),
    };
    let flows = match value_of(pairs, "flows") {
        None => Conntrack::DEFAULT_CAPACITY,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1 << 20).contains(n))
            .ok_or_else(|| bad("flows", v, &"a number from 1 to 1048576"))?,
    };
    let cpu = match value_of(pairs, "cpu") {
        None => None,
        Some(v) => Some(v.parse().map_err(|_| bad("cpu", v, &"not a CPU number"))?),
    };
    let bind = match value_of(pairs, "bind") {
        None => SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
        Some(v) => v
            .parse::<SocketAddrV4>()
            .or_else(|_| v.parse::<Ipv4Addr>().map(|ip| SocketAddrV4::new(ip, 0)))
            .map_err(|_| bad("bind", v, &"an IPv4 address, with or without :PORT"))?,
    };
    let busy_poll = match value_of(pairs, "busy-poll") {
        None | Some("no" | "false" | "0") => false,
        Some("yes" | "true" | "1") => true,
        Some(v) => return Err(bad("busy-poll", v, &"yes or no")),
    };
    Ok(VmConfig { name, handle, identity, consumers, special, mode, seed, flows, cpu, bind, busy_poll })
}

/// Parses a `--vm` flag value.
pub fn vm_from_spec(spec: &str) -> Result<VmConfig, ConfigError> {
    vm_from_pairs(&split_spec(spec)?)
}

fn key_names() -> String {
    KEYS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
}

fn parse_handle(s: &str) -> Result<HandleSpec, String> {
    let fd =
        |v: &str| v.parse::<i32>().ok().filter(|fd| *fd >= 0).ok_or_else(|| format!("'{v}' is not a file descriptor"));
    let path = |v: &str| {
        if v.is_empty() {
            Err("empty path".to_string())
        } else if v.len() >= 108 {
            Err("a unix socket path must be shorter than 108 bytes".to_string())
        } else {
            Ok(PathBuf::from(v))
        }
    };
    match s.split_once(':') {
        Some(("dgram", p)) => Ok(HandleSpec::Dgram { path: path(p)?, peer: None }),
        Some(("fd", n)) => Ok(HandleSpec::DgramFd(fd(n)?)),
        Some(("stream", p)) => Ok(HandleSpec::Stream(path(p)?)),
        Some(("stream-fd", n)) => Ok(HandleSpec::StreamFd(fd(n)?)),
        _ => Err("expected dgram:PATH, fd:N, stream:PATH or stream-fd:N".to_string()),
    }
}

/// Settings of the whole engine from the config file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileConfig {
    /// `backend = "auto" | "uring" | "portable"`.
    pub backend: Option<String>,
    /// The `[[vm]]` tables as pairs.
    pub vms: Vec<Pairs>,
}

/// Reads a TOML config file's text.
pub fn parse_file(text: &str) -> Result<FileConfig, ConfigError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        ConfigError(format!("config file: {}", e.message().lines().next().unwrap_or("invalid TOML")))
    })?;
    let mut out = FileConfig::default();
    for (key, value) in &table {
        match (key.as_str(), value) {
            ("backend", toml::Value::String(s)) => out.backend = Some(s.clone()),
            ("vm", toml::Value::Array(vms)) => {
                for (i, vm) in vms.iter().enumerate() {
                    let toml::Value::Table(t) = vm else {
                        return Err(ConfigError(format!("config file: vm #{} is not a table", i + 1)));
                    };
                    let mut pairs = Pairs::new();
                    for (k, v) in t {
                        let mut push = |v: &toml::Value| -> Result<(), ConfigError> {
                            let s = match v {
                                toml::Value::String(s) => s.clone(),
                                toml::Value::Integer(n) => n.to_string(),
                                toml::Value::Float(x) => x.to_string(),
                                toml::Value::Boolean(b) => if *b { "yes" } else { "no" }.to_string(),
                                _ => {
                                    return Err(ConfigError(format!(
                                        "config file: vm #{}: {k} has an unsupported type",
                                        i + 1
                                    )))
                                }
                            };
                            pairs.push((k.replace('_', "-"), s));
                            Ok(())
                        };
                        match v {
                            toml::Value::Array(items) => items.iter().try_for_each(&mut push)?,
                            other => push(other)?,
                        }
                    }
                    out.vms.push(pairs);
                }
            }
            (k, _) => {
                return Err(ConfigError(format!(
                    "config file: unknown or mistyped setting '{k}' (known: backend, [[vm]])"
                )))
            }
        }
    }
    Ok(out)
}

/// Merges the file's VMs with `--vm` flags: a flag naming a file VM overrides its keys (its
/// `consumer` keys replace the file's); other flags add VMs. Names must be unique.
pub fn merge(file: &[Pairs], flags: &[Pairs]) -> Result<Vec<VmConfig>, ConfigError> {
    let mut all: Vec<Pairs> = file.to_vec();
    for flag in flags {
        let name = value_of(flag, "name");
        match all.iter_mut().find(|p| name.is_some() && value_of(p, "name") == name) {
            Some(base) => {
                if flag.iter().any(|(k, _)| k == "consumer") {
                    base.retain(|(k, _)| k != "consumer");
                }
                base.extend(flag.iter().cloned());
            }
            None => all.push(flag.clone()),
        }
    }
    let vms = all.iter().map(vm_from_pairs).collect::<Result<Vec<_>, _>>()?;
    for (i, vm) in vms.iter().enumerate() {
        if vms.iter().take(i).any(|o| o.name == vm.name) {
            return Err(ConfigError(format!("vm '{}' is described twice", vm.name)));
        }
        if vms.iter().take(i).any(|o| o.handle == vm.handle) {
            return Err(ConfigError(format!("vm '{}': handle {} is used by another VM", vm.name, vm.handle)));
        }
    }
    Ok(vms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(spec: &str) -> String {
        vm_from_spec(spec).unwrap_err().to_string()
    }

    #[test]
    fn defaults_and_full_spec() {
        let vm = vm_from_spec("name=vm0,handle=fd:3,consumer=203.0.113.7:51820").unwrap();
        assert_eq!(vm.identity, VmIdentity::default());
        assert_eq!(vm.mode, Mode::Filtered);
        assert_eq!(vm.handle, HandleSpec::DgramFd(3));
        assert_eq!(vm.bind, "0.0.0.0:0".parse().unwrap());
        let vm = vm_from_spec(
            "name=b,handle=dgram:/tmp/e.sock,peer=/tmp/q.sock,consumer=203.0.113.7:1+198.51.100.2:2,mode=sampled,\
             sample-rate=0.05,seed=7,cpu=1,mac=52:54:00:00:00:02,ip=192.168.50.10/24,gateway=192.168.50.1,mtu=1400,\
             bind=127.0.0.1",
        )
        .unwrap();
        assert_eq!(vm.consumers.len(), 2);
        assert_eq!(vm.mode, Mode::Sampled(SampleRate::new(0.05).unwrap()));
        assert_eq!(vm.handle, HandleSpec::Dgram { path: "/tmp/e.sock".into(), peer: Some("/tmp/q.sock".into()) });
        assert_eq!((vm.cpu, vm.seed, vm.identity.mtu), (Some(1), Some(7), 1400));
        assert_eq!(vm.bind, "127.0.0.1:0".parse().unwrap());
        assert!(!vm.busy_poll);
        assert!(vm_from_spec("name=a,handle=fd:3,consumer=203.0.113.7:1,busy-poll=yes").unwrap().busy_poll);
        assert!(err("name=a,handle=fd:3,consumer=203.0.113.7:1,busy-poll=maybe").contains("busy-poll=maybe"));
    }

    #[test]
    fn sampling_rate_configurable() {
        let vm = vm_from_spec("name=a,handle=fd:3,consumer=203.0.113.7:1,mode=sampled,sample-rate=0.05").unwrap();
        let Mode::Sampled(rate) = vm.mode else { panic!("not sampled") };
        assert_eq!(rate.get(), 0.05);
        let vm = vm_from_spec("name=a,handle=fd:3,consumer=203.0.113.7:1,mode=sampled").unwrap();
        assert_eq!(vm.mode, Mode::Sampled(SampleRate::DEFAULT));
        assert!(err("name=a,handle=fd:3,consumer=203.0.113.7:1,mode=sampled,sample-rate=0").contains("not in (0, 1]"));
    }

    #[test]
    fn errors_are_one_line_and_name_the_key() {
        let cases = [
            ("handle=fd:3,consumer=203.0.113.7:1", "name is required"),
            ("name=a,consumer=203.0.113.7:1", "handle= is required"),
            ("name=a,handle=tcp:1,consumer=203.0.113.7:1", "handle=tcp:1"),
            ("name=a,handle=fd:-1,consumer=203.0.113.7:1", "not a file descriptor"),
            ("name=a,handle=fd:3", "at least one consumer"),
            ("name=a,handle=fd:3,consumer=127.0.0.1:5", "loopback"),
            ("name=a,handle=fd:3,consumer=nope", "consumer=nope"),
            ("name=a,handle=fd:3,consumer=203.0.113.7:1,mode=bridge", "mode=bridge"),
            ("name=a,handle=fd:3,consumer=203.0.113.7:1,mode=direct", "direct"),
            ("name=a,handle=fd:3,consumer=203.0.113.7:1,mtu=100", "MTU 100"),
            ("name=a,handle=fd:3,consumer=203.0.113.7:1,ip=10.0.9.9/24", "gateway 10.0.2.2"),
            ("name=a,handle=fd:3,consumer=203.0.113.7:1,colour=red", "unknown key 'colour'"),
            ("name=a,handle=fd:3,consumer=203.0.113.7:1,sample-rate=0.5", "only with mode=sampled"),
            ("name=a,handle=fd:3,consumer=203.0.113.7:1,peer=/x", "only with handle=dgram"),
            ("name=a b,handle=fd:3,consumer=203.0.113.7:1", "name is required"),
            ("name=a,handle=fd:3,consumer=203.0.113.7:1,oops", "not key=value"),
        ];
        for (spec, want) in cases {
            let e = err(spec);
            assert!(e.contains(want), "{spec}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        assert!(vm_from_spec("name=a,handle=fd:3,consumer=127.0.0.1:5,allow-special=yes").is_ok());
    }

    #[test]
    fn file_and_flags_merge() {
        let file = parse_file(
            r#"
backend = "portable"
[[vm]]
name = "vm0"
handle = "fd:3"
consumer = ["203.0.113.7:51820", "198.51.100.2:51820"]
mtu = 1400
allow_special = false
"#,
        )
        .unwrap();
        assert_eq!(file.backend.as_deref(), Some("portable"));
        let flags = vec![
            split_spec("name=vm0,mtu=1300,consumer=203.0.113.9:1").unwrap(),
            split_spec("name=vm1,handle=fd:4,consumer=203.0.113.7:2").unwrap(),
        ];
        let vms = merge(&file.vms, &flags).unwrap();
        assert_eq!(vms.len(), 2);
        assert_eq!(vms[0].identity.mtu, 1300, "the flag overrides the file");
        assert_eq!(vms[0].consumers, vec!["203.0.113.9:1".parse().unwrap()]);
        assert!(merge(&file.vms, &[split_spec("name=vm1,handle=fd:3,consumer=203.0.113.7:2").unwrap()])
            .unwrap_err()
            .to_string()
            .contains("used by another VM"));
        for bad in ["backend = 3", "[[vm]]\nname = { a = 1 }", "vm = 3", "this is not toml"] {
            assert!(parse_file(bad).is_err() || merge(&parse_file(bad).unwrap().vms, &[]).is_err(), "{bad}");
        }
    }
}
