//! Provisioning of stock cloud images: the per-VM NoCloud seed (`meta-data`, `user-data`,
//! `network-config` and Omerta's `omerta-firewall.conf`, on an ISO 9660 volume labelled
//! `cidata`) and the per-VM qcow2 overlay over a read-only base image.
//!
//! [`Seed`] is typed: every value that lands in the YAML is an address, a key checked for its
//! alphabet and shape, or a name of a restricted alphabet, and strings are written quoted, so
//! nothing a consumer supplies can add a key to the cloud-config. docs/guest-provisioning.md
//! describes what the seed does at first boot and at every boot.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::Command;

/// The line a provisioned guest prints on its serial console once its setup is complete.
pub const READY_LINE: &str = "OMERTA-READY";

/// How the guest gets its address.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Addressing {
    /// DHCP (from the engine).
    Dhcp,
    /// Static, from `network-config`: address/prefix, gateway, MTU.
    Static {
        /// The VM's address.
        address: Ipv4Addr,
        /// Its prefix length.
        prefix: u8,
        /// The gateway (the engine).
        gateway: Ipv4Addr,
        /// The link MTU.
        mtu: u16,
    },
}

/// Everything a VM's seed says. Private keys are in here: never log it (its `Debug` leaves
/// them out).
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seed {
    /// cloud-init's instance id (a new one makes cloud-init run its first boot again).
    pub instance_id: String,
    /// The guest's host name.
    pub hostname: String,
    /// The NIC's MAC address (`52:54:00:...`), which `network-config` matches.
    pub mac: String,
    /// How the NIC gets its address.
    pub addressing: Addressing,
    /// The consumer's login.
    pub user: String,
    /// The consumer's SSH public key, one `authorized_keys` line without options.
    pub ssh_authorized_key: String,
    /// The VM's SSH host key, OpenSSH private key format (PEM-like armour).
    pub host_key_private: String,
    /// Its public half, `ssh-ed25519 AAAA...`.
    pub host_key_public: String,
    /// The VM's WireGuard private key (base64).
    pub wg_private_key: String,
    /// The VM's tunnel address and prefix length.
    pub wg_address: (Ipv4Addr, u8),
    /// The UDP port the VM's WireGuard listens on.
    pub wg_port: u16,
    /// The consumer's WireGuard public key (base64).
    pub consumer_key: String,
    /// The consumer's WireGuard endpoint.
    pub consumer_endpoint: SocketAddrV4,
    /// The consumer's tunnel address (the peer's AllowedIPs, /32).
    pub consumer_tunnel: Ipv4Addr,
}

impl std::fmt::Debug for Seed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seed")
            .field("instance_id", &self.instance_id)
            .field("user", &self.user)
            .field("wg_address", &self.wg_address)
            .field("consumer_endpoint", &self.consumer_endpoint)
            .finish_non_exhaustive()
    }
}

/// A login name the seed accepts: what `useradd` takes by default, not root.
pub fn valid_user(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
        && s != "root"
}

/// A host name or instance id: letters, digits, `-` and `.`, at most 63 bytes.
fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
}

fn base64_alphabet(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
}

/// A WireGuard key: 44 characters of base64 (32 bytes: 43 characters, then one `=`).
fn valid_wg_key(s: &str) -> bool {
    s.len() == 44 && s.ends_with('=') && base64_alphabet(s) && !s[..43].contains('=')
}

/// An SSH public key line `TYPE BASE64` of a known type, no options, no comment.
pub fn valid_ssh_public_key(s: &str) -> bool {
    const TYPES: [&str; 6] = [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
    ];
    let mut parts = s.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(t), Some(b), None) => TYPES.contains(&t) && b.len() <= 1024 && base64_alphabet(b),
        _ => false,
    }
}

/// An OpenSSH private key in its armour: the two markers and base64 lines between them.
fn valid_private_armour(s: &str) -> bool {
    let lines: Vec<&str> = s.trim_end_matches('\n').split('\n').collect();
    lines.len() >= 3
        && lines.len() <= 64
        && lines[0] == "-----BEGIN OPENSSH PRIVATE KEY-----"
        && lines[lines.len() - 1] == "-----END OPENSSH PRIVATE KEY-----"
        && lines[1..lines.len() - 1].iter().all(|l| l.len() <= 80 && base64_alphabet(l))
}

/// A MAC address as `aa:bb:cc:dd:ee:ff`, lower-case hex.
fn valid_mac(s: &str) -> bool {
    s.len() == 17
        && s.split(':').count() == 6
        && s.split(':').all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// Why a seed was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedError(pub String);

impl std::fmt::Display for SeedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SeedError {}

impl Seed {
    /// Checks every field against its alphabet and shape.
    pub fn check(&self) -> Result<(), SeedError> {
        let bad = |what: &str| Err(SeedError(format!("seed: bad {what}")));
        if !valid_label(&self.instance_id) {
            return bad("instance id");
        }
        if !valid_label(&self.hostname) {
            return bad("host name");
        }
        if !valid_mac(&self.mac) {
            return bad("MAC address");
        }
        if !valid_user(&self.user) {
            return bad("user name (lower-case letters, digits, '-' and '_', not root)");
        }
        if !valid_ssh_public_key(&self.ssh_authorized_key) {
            return bad("SSH public key");
        }
        if !valid_ssh_public_key(&self.host_key_public) || !self.host_key_public.starts_with("ssh-ed25519 ") {
            return bad("SSH host key");
        }
        if !valid_private_armour(&self.host_key_private) {
            return bad("SSH host private key");
        }
        if !valid_wg_key(&self.wg_private_key) || !valid_wg_key(&self.consumer_key) {
            return bad("WireGuard key");
        }
        if !(1..=32).contains(&self.wg_address.1) || self.wg_port == 0 || self.consumer_endpoint.port() == 0 {
            return bad("tunnel address or port");
        }
        if let Addressing::Static { prefix, mtu, .. } = self.addressing {
            if !(1..=32).contains(&prefix) || !(576..=9000).contains(&mtu) {
                return bad("static address");
            }
        }
        Ok(())
    }

    /// `meta-data`.
    pub fn meta_data(&self) -> String {
        format!("instance-id: \"{}\"\nlocal-hostname: \"{}\"\n", self.instance_id, self.hostname)
    }

    /// `network-config` (version 2, matching the NIC by its MAC).
    pub fn network_config(&self) -> String {
        let mut s = String::from("version: 2\nethernets:\n  nic0:\n    match:\n");
        let _ = writeln!(s, "      macaddress: \"{}\"", self.mac);
        match &self.addressing {
            Addressing::Dhcp => s.push_str("    dhcp4: true\n    dhcp6: false\n"),
            Addressing::Static { address, prefix, gateway, mtu } => {
                let _ = write!(
                    s,
                    "    dhcp4: false\n    dhcp6: false\n    addresses: [\"{address}/{prefix}\"]\n    routes:\n      \
                     - to: \"0.0.0.0/0\"\n        via: \"{gateway}\"\n    mtu: {mtu}\n"
                );
            }
        }
        s
    }

    /// `omerta-firewall.conf`: the image's firewall unit reads it from the seed at first boot.
    pub fn firewall_conf(&self) -> String {
        format!("consumer={}\n", self.consumer_endpoint)
    }

    /// `/etc/wireguard/wg0.conf`.
    pub fn wg_conf(&self) -> String {
        let (addr, prefix) = self.wg_address;
        format!(
            "[Interface]\nPrivateKey = {}\nAddress = {addr}/{prefix}\nListenPort = {}\n\n[Peer]\nPublicKey = {}\n\
             Endpoint = {}\nAllowedIPs = {}/32\nPersistentKeepalive = 25\n",
            self.wg_private_key, self.wg_port, self.consumer_key, self.consumer_endpoint, self.consumer_tunnel
        )
    }

    /// `user-data`: the login, the host keys, wg0.conf, and the first boot's last steps
    /// (WireGuard enabled for every boot, then the readiness line).
    pub fn user_data(&self) -> String {
        let indent = |text: &str, n: usize| -> String {
            let pad = " ".repeat(n);
            text.lines().map(|l| format!("{pad}{l}\n")).collect()
        };
        let mut s = String::from("#cloud-config\n");
        let _ = write!(
            s,
            "users:\n  - name: \"{user}\"\n    gecos: \"Omerta consumer\"\n    shell: /bin/bash\n    \
             sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n    lock_passwd: true\n    ssh_authorized_keys:\n      - \"{key}\"\n",
            user = self.user,
            key = self.ssh_authorized_key
        );
        s.push_str("disable_root: true\nssh_pwauth: false\nssh_deletekeys: true\nssh_genkeytypes: []\n");
        s.push_str("ssh_keys:\n  ed25519_private: |\n");
        s.push_str(&indent(&self.host_key_private, 4));
        let _ = writeln!(s, "  ed25519_public: \"{}\"", self.host_key_public);
        s.push_str(
            "write_files:\n  - path: /etc/wireguard/wg0.conf\n    owner: \"root:root\"\n    permissions: \"0600\"\n",
        );
        s.push_str("    content: |\n");
        s.push_str(&indent(&self.wg_conf(), 6));
        // Every boot after the first (a guest booted again from its disk after its host
        // rebooted) says it is ready once WireGuard is up; the first boot's runcmd says it
        // (cloud-init runs per-boot scripts before runcmd).
        s.push_str("  - path: /var/lib/cloud/scripts/per-boot/omerta-ready\n    owner: \"root:root\"\n    permissions: \"0755\"\n    content: |\n");
        let _ = writeln!(
            s,
            "      #!/bin/sh\n      if [ -e /var/lib/omerta-booted ]; then\n        systemctl start wg-quick@wg0.service && echo {READY_LINE} > /dev/ttyS0\n      fi\n      touch /var/lib/omerta-booted"
        );
        // The disk may be larger than the image: cloud-init's resizefs (before runcmd, so
        // before the ready line) grows `/` to it. `/` is the whole disk, not a partition:
        // there is nothing for growpart to do (and the image has no growpart).
        s.push_str("growpart:\n  mode: \"off\"\nresize_rootfs: true\n");
        s.push_str("runcmd:\n  - [systemctl, enable, --now, wg-quick@wg0.service]\n");
        let _ = writeln!(s, "  - [sh, -c, \"echo {READY_LINE} > /dev/ttyS0\"]");
        s
    }

    /// The seed's files: (name on the volume, contents).
    pub fn files(&self) -> [(&'static str, String); 4] {
        [
            ("meta-data", self.meta_data()),
            ("user-data", self.user_data()),
            ("network-config", self.network_config()),
            ("omerta-firewall.conf", self.firewall_conf()),
        ]
    }
}

/// Where the tools run by the (privileged) launcher are looked up: system directories only,
/// never the caller's `PATH`; and nothing else of its environment.
const TOOL_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

fn run(cmd: &mut Command, what: &str) -> Result<(), SeedError> {
    run_output(cmd, what).map(drop)
}

/// Runs `cmd` as [`run`] does and returns its standard output.
fn run_output(cmd: &mut Command, what: &str) -> Result<Vec<u8>, SeedError> {
    let out = cmd.env_clear().env("PATH", TOOL_PATH).output().map_err(|e| SeedError(format!("{what}: {e}")))?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    let err = String::from_utf8_lossy(&out.stderr);
    Err(SeedError(format!("{what}: {}", err.lines().last().unwrap_or("failed"))))
}

/// The most bytes a qcow2 overlay of virtual size `size` can take on the host, its metadata
/// included (`qemu-img measure`'s "fully-allocated": no snapshots, no compression, so a guest
/// writing every block of its disk reaches this and no more).
pub fn measure(size: u64) -> Result<u64, SeedError> {
    #[derive(serde::Deserialize)]
    struct Measured {
        #[serde(rename = "fully-allocated")]
        fully_allocated: u64,
    }
    let out = run_output(
        Command::new("qemu-img").args(["measure", "-O", "qcow2", "--output=json", "--size"]).arg(size.to_string()),
        "qemu-img measure",
    )?;
    let m: Measured =
        serde_json::from_slice(&out).map_err(|e| SeedError(format!("qemu-img measure: unexpected answer: {e}")))?;
    Ok(m.fully_allocated)
}

/// Writes `seed` as a NoCloud volume at `iso` (0600), staging its files in `scratch` (a private
/// directory, emptied again before this returns).
pub fn write_iso(seed: &Seed, scratch: &Path, iso: &Path) -> Result<(), SeedError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    seed.check()?;
    let io = |e: std::io::Error| SeedError(format!("seed: {e}"));
    let mut names = Vec::new();
    let made = (|| {
        for (name, text) in seed.files() {
            let path = scratch.join(name);
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(io)?;
            names.push(path);
            f.write_all(text.as_bytes()).map_err(io)?;
        }
        let f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(iso).map_err(io)?;
        drop(f);
        run(
            Command::new("genisoimage")
                .args(["-quiet", "-volid", "cidata", "-joliet", "-rock", "-output"])
                .arg(iso)
                .args(&names),
            "genisoimage",
        )
    })();
    for n in &names {
        let _ = std::fs::remove_file(n);
    }
    if made.is_err() {
        let _ = std::fs::remove_file(iso);
    }
    made
}

/// Makes a qcow2 overlay at `path` (0600) over the raw image `backing`, of `size` bytes, without
/// opening the backing file (it may be a name only the VMM resolves, such as `/dev/fdset/1`).
pub fn make_overlay(backing: &str, size: u64, path: &Path) -> Result<(), SeedError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| SeedError(format!("{}: {e}", path.display())))?;
    drop(f);
    let r = run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", backing])
            .arg(path)
            .arg(size.to_string()),
        "qemu-img create",
    );
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> Seed {
        Seed {
            instance_id: "omerta-a-1".into(),
            hostname: "a".into(),
            mac: "52:54:00:12:34:56".into(),
            addressing: Addressing::Dhcp,
            user: "omerta".into(),
            ssh_authorized_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB".into(),
            host_key_private:
                "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk=\n-----END OPENSSH PRIVATE KEY-----\n".into(),
            host_key_public: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC".into(),
            wg_private_key: format!("{}=", "A".repeat(43)),
            wg_address: (Ipv4Addr::new(10, 50, 1, 2), 24),
            wg_port: 51820,
            consumer_key: format!("{}=", "B".repeat(43)),
            consumer_endpoint: "203.0.113.2:51820".parse().unwrap(),
            consumer_tunnel: Ipv4Addr::new(10, 50, 1, 1),
        }
    }

    #[test]
    fn a_good_seed_passes_and_renders_what_cloud_init_needs() {
        let s = seed();
        s.check().unwrap();
        let u = s.user_data();
        assert!(u.starts_with("#cloud-config\n"));
        assert!(u.contains("  - name: \"omerta\"\n"));
        assert!(u.contains("      - \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB\"\n"));
        assert!(u.contains("    permissions: \"0600\"\n"));
        assert!(u.contains("      PersistentKeepalive = 25\n"));
        assert!(u.contains("      AllowedIPs = 10.50.1.1/32\n"));
        assert!(u.contains("    -----BEGIN OPENSSH PRIVATE KEY-----\n"));
        assert!(u.contains("wg-quick@wg0.service"));
        // Ready on every later boot too (a guest booted again from its disk).
        assert!(
            u.contains("/var/lib/cloud/scripts/per-boot/omerta-ready") && u.contains("[ -e /var/lib/omerta-booted ]"),
            "{u}"
        );
        assert!(u.contains(READY_LINE));
        assert_eq!(s.firewall_conf(), "consumer=203.0.113.2:51820\n");
        assert!(s.network_config().contains("dhcp4: true"));
        let st = Seed {
            addressing: Addressing::Static {
                address: Ipv4Addr::new(10, 0, 2, 15),
                prefix: 24,
                gateway: Ipv4Addr::new(10, 0, 2, 2),
                mtu: 1500,
            },
            ..seed()
        };
        let n = st.network_config();
        assert!(
            n.contains("addresses: [\"10.0.2.15/24\"]") && n.contains("via: \"10.0.2.2\"") && n.contains("mtu: 1500")
        );
    }

    #[test]
    fn the_seed_volume_and_the_overlay_are_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("omerta-hv-seed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("stage")).unwrap();
        let (iso, overlay) = (dir.join("seed.iso"), dir.join("overlay.qcow2"));
        let tools =
            ["genisoimage", "qemu-img"].iter().all(|t| TOOL_PATH.split(':').any(|d| Path::new(d).join(t).exists()));
        if !tools {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI has genisoimage and qemu-img (make image)");
            return;
        }
        write_iso(&seed(), &dir.join("stage"), &iso).unwrap();
        make_overlay("/dev/fdset/1", 1 << 30, &overlay).unwrap();
        for f in [&iso, &overlay] {
            assert_eq!(std::fs::metadata(f).unwrap().permissions().mode() & 0o777, 0o600, "{}", f.display());
        }
        let volume = std::fs::read(&iso).unwrap();
        assert!(volume.windows(6).any(|w| w == b"CIDATA" || w == b"cidata"), "the volume label");
        assert!(volume.windows(9).any(|w| w == b"#cloud-co"), "user-data is on it");
        assert_eq!(std::fs::read_dir(dir.join("stage")).unwrap().count(), 0, "the staged files are gone");
        // A file in the way is never overwritten.
        assert!(make_overlay("/dev/fdset/1", 1 << 30, &overlay).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nothing_a_consumer_sends_can_add_to_the_cloud_config() {
        let cases: Vec<Seed> = vec![
            Seed { user: "root".into(), ..seed() },
            Seed { user: "a\"\nruncmd: [x]".into(), ..seed() },
            Seed { user: "Omerta".into(), ..seed() },
            Seed { ssh_authorized_key: "ssh-ed25519 AAAA\"\n  - x".into(), ..seed() },
            Seed { ssh_authorized_key: "ssh-ed25519 AAAA comment".into(), ..seed() },
            Seed { ssh_authorized_key: "command=\"x\" ssh-ed25519 AAAA".into(), ..seed() },
            Seed { ssh_authorized_key: "ssh-dss AAAA".into(), ..seed() },
            Seed { consumer_key: "short=".into(), ..seed() },
            Seed { consumer_key: format!("{}\n=", "B".repeat(42)), ..seed() },
            Seed { hostname: "a b".into(), ..seed() },
            Seed { instance_id: String::new(), ..seed() },
            Seed { mac: "52:54:00:12:34:5G".into(), ..seed() },
            Seed {
                host_key_private: "-----BEGIN OPENSSH PRIVATE KEY-----\nx: y\n-----END OPENSSH PRIVATE KEY-----".into(),
                ..seed()
            },
            Seed { wg_address: (Ipv4Addr::new(10, 50, 1, 2), 33), ..seed() },
            Seed { consumer_key: format!("{}=={}", "B".repeat(20), "B".repeat(22)), ..seed() },
        ];
        for s in cases {
            assert!(s.check().is_err(), "accepted {s:?} ({} / {})", s.user, s.ssh_authorized_key);
        }
    }
}
