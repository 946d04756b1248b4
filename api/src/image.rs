//! `vm start image=...`: a stock cloud image provisioned for one consumer, as one typed value
//! with its text form (`KEY=VALUE,...`, an SSH key's space written as `:`).
use std::collections::BTreeMap;

use engine::Endpoint;

use crate::error::Failure;

fn bad(msg: impl Into<String>) -> Failure {
    Failure::bad_request(msg)
}

fn endpoint(s: &str) -> Result<Endpoint, Failure> {
    s.parse::<Endpoint>().map_err(|e| bad(format!("'{s}': {e}")))
}

/// `vm start` of a stock cloud image for one consumer, typed: the image, the consumer's
/// WireGuard public key and endpoint, the tunnel addresses, the consumer's SSH login, CPUs and
/// memory. The engine makes the VM's WireGuard and SSH host keys, a qcow2 overlay over the
/// image and a NoCloud seed (docs/guest-provisioning.md). On the wire:
/// `vm start image=DIR,name=N,consumer=IP:PORT,consumer-key=B64,tunnel=IP/P,consumer-tunnel=IP,
/// ssh-user=U,ssh-key=TYPE:B64,cpus=C,memory=MIB,network=dhcp|static[,mode=M][,boot-timeout=S]
/// [,disk=MB]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageStart {
    /// The VM's name.
    pub name: String,
    /// The image: a directory (in an `--image-dir`) holding `disk.raw`, `vmlinuz` and
    /// `initrd.img`, as `make image` builds it.
    pub image: String,
    /// The consumer's WireGuard endpoint: the VM's only allowed destination. `None` with a
    /// proof key: the endpoint is learned from the consumer's first proof.
    pub consumer: Option<Endpoint>,
    /// The consumer's WireGuard public key (base64).
    pub consumer_key: String,
    /// The VM's tunnel address and prefix length.
    pub tunnel: (std::net::Ipv4Addr, u8),
    /// The consumer's tunnel address.
    pub consumer_tunnel: std::net::Ipv4Addr,
    /// The consumer's login in the VM.
    pub ssh_user: String,
    /// The consumer's SSH public key, `TYPE BASE64`.
    pub ssh_key: String,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// The VM takes its address by DHCP (else from its seed's `network-config`).
    pub dhcp: bool,
    /// The engine mode (`filtered` when `None`).
    pub mode: Option<String>,
    /// Seconds the guest has to become ready (the engine's default when `None`).
    pub boot_timeout_s: Option<u64>,
    /// The guest names its consumer at an alias on its link (the gateway's address, port
    /// 51820) and the engine sends to the consumer's current endpoint: the consumer may move
    /// without the guest knowing (`alias=yes`).
    pub alias: bool,
    /// The VM's host UDP port, where its consumer reaches it (`port=N`; `None`: one the
    /// kernel picks). A port in use is refused.
    pub port: Option<u16>,
    /// The consumer's endpoint-proof public key (X25519, base64; `proof-key=`, with
    /// `alias=yes`): the engine learns the consumer's endpoint from proofs made with the key
    /// of this exchange, and returns its own public half.
    pub proof_key: Option<String>,
    /// The VM's disk in MB (2^20 bytes; `disk=N`): its root file system grows to it at first
    /// boot, and it can take no more of the host. At least the image's size; `None`: the
    /// image's own size.
    pub disk_mb: Option<u32>,
}

impl ImageStart {
    /// The defaults of everything but the name, image, consumer and keys.
    pub fn new(name: &str, image: &str, consumer: Endpoint, consumer_key: &str, ssh_key: &str) -> Self {
        Self {
            name: name.into(),
            image: image.into(),
            consumer: Some(consumer),
            consumer_key: consumer_key.into(),
            tunnel: (std::net::Ipv4Addr::new(10, 50, 1, 2), 24),
            consumer_tunnel: std::net::Ipv4Addr::new(10, 50, 1, 1),
            ssh_user: "omerta".into(),
            ssh_key: ssh_key.into(),
            cpus: 1,
            memory_mib: 1024,
            dhcp: true,
            mode: None,
            boot_timeout_s: None,
            alias: false,
            port: None,
            proof_key: None,
            disk_mb: None,
        }
    }

    /// Whether a `vm start` description is of this kind (it has `image=`).
    pub fn names_an_image(spec: &str) -> bool {
        spec.split(',').any(|p| p.trim().starts_with("image="))
    }

    /// Reads and checks a description (see the type's documentation).
    pub fn parse(spec: &str) -> Result<Self, Failure> {
        let mut v: BTreeMap<&str, &str> = BTreeMap::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, val) = part.split_once('=').ok_or_else(|| bad(format!("'{part}' is not KEY=VALUE")))?;
            if v.insert(k, val).is_some() {
                return Err(bad(format!("{k}= given twice")));
            }
        }
        fn need<'a>(v: &BTreeMap<&str, &'a str>, k: &str) -> Result<&'a str, Failure> {
            v.get(k)
                .copied()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad(format!("vm start image=...: {k}= is missing")))
        }
        let key = need(&v, "consumer-key")?;
        if !crate::keys::valid_wg_key(key) {
            return Err(bad("consumer-key: not a WireGuard public key (44 characters of base64)"));
        }
        let ssh = crate::keys::ssh_public_key(&need(&v, "ssh-key")?.replacen(':', " ", 1)).map_err(bad)?;
        // With a proof key the consumer's endpoint may be left out: its first proof names it.
        let consumer = match (v.get("consumer"), v.contains_key("proof-key")) {
            (Some(c), _) => Some(endpoint(c)?),
            (None, true) => None,
            (None, false) => return Err(bad("vm start image=...: consumer= is missing")),
        };
        let unspecified = Endpoint::new(std::net::Ipv4Addr::UNSPECIFIED, 0);
        let mut s = Self::new(need(&v, "name")?, need(&v, "image")?, unspecified, key, &ssh);
        s.consumer = consumer;
        for (k, val) in &v {
            match *k {
                "name" | "image" | "consumer" | "consumer-key" | "ssh-key" => {}
                "proof-key" => {
                    if !crate::keys::valid_wg_key(val) {
                        return Err(bad("proof-key: not an X25519 public key (44 characters of base64)"));
                    }
                    s.proof_key = Some((*val).into());
                }
                "tunnel" => {
                    let (a, p) = val.split_once('/').ok_or_else(|| bad(format!("tunnel={val}: ADDRESS/PREFIX")))?;
                    let a = a.parse().map_err(|_| bad(format!("tunnel={val}: not an IPv4 address")))?;
                    let p = p.parse().ok().filter(|p| (8..=30).contains(p));
                    s.tunnel = (a, p.ok_or_else(|| bad(format!("tunnel={val}: a prefix of 8 to 30")))?);
                }
                "consumer-tunnel" => {
                    s.consumer_tunnel = val.parse().map_err(|_| bad(format!("consumer-tunnel={val}: not an IPv4 address")))?;
                }
                "ssh-user" => {
                    if !hv::cloud::valid_user(val) {
                        return Err(bad(format!(
                            "ssh-user={val}: lower-case letters, digits, '-' and '_', at most 32, not root"
                        )));
                    }
                    s.ssh_user = (*val).into();
                }
                "cpus" => {
                    s.cpus = val.parse().ok().filter(|c| (1..=64).contains(c)).ok_or_else(|| bad(format!("cpus={val}: 1 to 64")))?;
                }
                "memory" => {
                    s.memory_mib = val
                        .parse()
                        .ok()
                        .filter(|m| (256..=262_144).contains(m))
                        .ok_or_else(|| bad(format!("memory={val}: 256 to 262144 MiB")))?;
                }
                "network" => {
                    s.dhcp = match *val {
                        "dhcp" => true,
                        "static" => false,
                        _ => return Err(bad(format!("network={val}: dhcp or static"))),
                    }
                }
                "mode" => s.mode = Some((*val).into()),
                "disk" => {
                    s.disk_mb = Some(
                        val.parse().ok().filter(|d| *d >= 1).ok_or_else(|| bad(format!("disk={val}: a size in MB, 1 to 4294967295")))?,
                    );
                }
                "port" => {
                    s.port = Some(
                        val.parse().ok().filter(|p| *p >= 1024).ok_or_else(|| bad(format!("port={val}: 1024 to 65535")))?,
                    );
                }
                "alias" => {
                    s.alias = match *val {
                        "yes" => true,
                        "no" => false,
                        _ => return Err(bad(format!("alias={val}: yes or no"))),
                    }
                }
                "boot-timeout" => {
                    s.boot_timeout_s = Some(
                        val.parse().ok().filter(|t| (1..=3600).contains(t)).ok_or_else(|| bad(format!("boot-timeout={val}: 1 to 3600 seconds")))?,
                    );
                }
                other => {
                    return Err(bad(format!(
                        "vm start image=...: unknown key '{}' (keys: name, image, consumer, consumer-key, tunnel, consumer-tunnel, ssh-user, ssh-key, cpus, memory, network, mode, boot-timeout, alias, port, proof-key, disk)",
                        other.chars().take(32).collect::<String>()
                    )))
                }
            }
        }
        if s.proof_key.is_some() && !s.alias {
            return Err(bad(
                "proof-key= needs alias=yes: the guest names its consumer at the alias while the endpoint moves",
            ));
        }
        if s.tunnel.0 == s.consumer_tunnel {
            return Err(bad("tunnel and consumer-tunnel are the same address"));
        }
        Ok(s)
    }
}

impl std::fmt::Display for ImageStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "image={},name={},consumer-key={},tunnel={}/{},consumer-tunnel={},ssh-user={},ssh-key={},cpus={},memory={},network={}",
            self.image,
            self.name,
            self.consumer_key,
            self.tunnel.0,
            self.tunnel.1,
            self.consumer_tunnel,
            self.ssh_user,
            self.ssh_key.replacen(' ', ":", 1),
            self.cpus,
            self.memory_mib,
            if self.dhcp { "dhcp" } else { "static" }
        )?;
        if let Some(c) = self.consumer {
            write!(f, ",consumer={c}")?;
        }
        if let Some(k) = &self.proof_key {
            write!(f, ",proof-key={k}")?;
        }
        if let Some(m) = &self.mode {
            write!(f, ",mode={m}")?;
        }
        if let Some(t) = self.boot_timeout_s {
            write!(f, ",boot-timeout={t}")?;
        }
        if self.alias {
            write!(f, ",alias=yes")?;
        }
        if let Some(p) = self.port {
            write!(f, ",port={p}")?;
        }
        if let Some(d) = self.disk_mb {
            write!(f, ",disk={d}")?;
        }
        Ok(())
    }
}
