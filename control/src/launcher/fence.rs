//! The kernel fence (the launcher keeps it): in the engine's network namespace, nftables drops
//! every packet a socket of the engine's user sends except UDP to an endpoint some VM's
//! allowlist holds, ICMP echo to such an address, and TCP replies on connections others
//! opened to it (a metrics scrape). One table of ours, `inet omerta`; the host's own rules are
//! not touched:
//!
//! ```text
//! table inet omerta {
//!   comment "omerta-engine launcher <pid>"
//!   set udp_ok  { type ipv4_addr . inet_service; }   every VM's endpoints, the union
//!   set icmp_ok { type ipv4_addr; }                  their addresses
//!   chain output { type filter hook output priority filter; policy accept;
//!                  meta skuid <engine uid> jump engine }
//!   chain engine { meta l4proto tcp ct direction reply accept
//!                  ip daddr . udp dport @udp_ok accept
//!                  icmp type echo-request ip daddr @icmp_ok accept
//!                  counter drop }                    IPv6, TCP it opens, anything else
//! }
//! ```
//!
//! The sets change only on the engine's control thread's requests (workers cannot reach the
//! launcher's socket: `sys::guard_from_workers`); each endpoint is checked again here against
//! the VM's policy (`engine::filter::Policy`: no host, private or special address unless that
//! VM was configured so), each change is one `nft -f -` transaction (flush and refill: atomic)
//! and is logged. The table is made afresh at the engine's start (a stale one of an engine
//! that died is replaced; a live engine's is refused) and removed when the launcher ends.
//! It does not see what the kernel forwards (direct mode's VMM namespace) nor what a socket of
//! another user sends.
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Command, Stdio};

use engine::filter::{Allowlist, Endpoint, Policy, SpecialAddresses};
use serde::{Deserialize, Serialize};

/// The table's family and name.
const TABLE: &str = "inet omerta";
/// What the table's comment starts with (the launcher's pid follows).
const OWNER: &str = "omerta-engine launcher ";
/// The most VMs the fence holds endpoints for.
const MAX_VMS: usize = 4096;

/// What a VM's endpoints are checked against, as the engine sends it: the VM's own choices
/// (the host's addresses the launcher reads itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FenceRule {
    /// `allow-special=yes`.
    pub special: bool,
    /// `allow-private=yes`.
    pub private: bool,
    /// The VM's own network (address, prefix length, gateway), always refused.
    pub own: (Ipv4Addr, u8, Ipv4Addr),
}

impl FenceRule {
    /// The rule of a VM configured as `cfg`.
    pub fn of(cfg: &engine::config::VmConfig) -> Self {
        let id = &cfg.identity;
        FenceRule {
            special: cfg.special == SpecialAddresses::Allow,
            private: cfg.private,
            own: (id.ip, id.prefix_len, id.gateway_ip),
        }
    }

    fn policy(self, host: Vec<Ipv4Addr>) -> Policy {
        Policy {
            special: if self.special { SpecialAddresses::Allow } else { SpecialAddresses::Refuse },
            private: self.private,
            own: Some(self.own),
            host,
        }
    }
}

/// Why the fence could not be put up or changed.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The launcher was started without a user to fence.
    #[error("kernel fence: off in this engine")]
    Off,
    /// `nft` failed or is missing.
    #[error("kernel fence: {0}")]
    Nft(String),
    /// Another live engine's table is in this namespace.
    #[error("kernel fence: the table {TABLE} of another running engine (launcher pid {0}) is in this network namespace; one fenced engine per namespace")]
    Taken(u32),
    /// An endpoint the VM's policy refuses.
    #[error("kernel fence: vm '{vm}': {why}")]
    Refused {
        /// The VM.
        vm: String,
        /// The policy's sentence.
        why: engine::filter::AllowlistError,
    },
    /// Too many VMs or endpoints.
    #[error("kernel fence: vm '{0}': too many VMs or endpoints")]
    TooMany(String),
}

/// The fence as the launcher holds it: the engine's uid and every VM's endpoints.
#[derive(Debug)]
pub(super) struct Fence {
    uid: u32,
    up: bool,
    vms: BTreeMap<String, BTreeSet<SocketAddrV4>>,
}

/// Runs `nft -f -` with `script` as one transaction.
fn nft(script: &str) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => engine::io::describe("nft", &e),
            _ => format!("nft: {e} (nftables is needed: make setup installs it)"),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(|e| format!("nft: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!("nft: {}", err.lines().next().unwrap_or("failed").trim()))
    }
}

/// The table already in this namespace: `Ok(None)` when there is none, else the launcher pid
/// it names (`None`: not one of ours), or why `nft` could not say.
fn read_owner() -> Result<Option<Option<u32>>, String> {
    let out =
        Command::new("nft").args(["list", "table", "inet", "omerta"]).output().map_err(|e| format!("nft: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No such file or directory") {
            return Ok(None);
        }
        return Err(format!("nft list table: {} ({})", err.trim(), out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let pid =
        text.split_once(OWNER).and_then(|(_, rest)| rest.split('"').next()).and_then(|p| p.trim().parse::<u32>().ok());
    Ok(Some(pid))
}

impl Fence {
    /// A fence for the engine's user `uid`, not yet up.
    pub(super) fn new(uid: u32) -> Self {
        Fence { uid, up: false, vms: BTreeMap::new() }
    }

    /// Puts the table up with empty sets (one transaction, replacing a stale table of an
    /// engine that is gone; refused while another launcher that lives holds it).
    pub(super) fn up(&mut self) -> Result<(), FenceError> {
        if self.up {
            return Ok(());
        }
        let me = std::process::id();
        if let Ok(Some(Some(pid))) = read_owner() {
            // An engine that just stopped: its launcher removes the table as it ends, a
            // moment after the engine itself. Waited for, 3 s at most.
            let alive = || std::path::Path::new(&format!("/proc/{pid}")).exists();
            let until = std::time::Instant::now() + std::time::Duration::from_secs(3);
            while pid != me && alive() && std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            if pid != me && alive() {
                return Err(FenceError::Taken(pid));
            }
            engine::warn!("kernel fence: replacing the table {TABLE} an engine that is gone left (launcher pid {pid})");
        }
        let uid = self.uid;
        let script = format!(
            "add table {TABLE}\ndelete table {TABLE}\ntable {TABLE} {{\n\
             comment \"{OWNER}{me}\"\n\
             set udp_ok {{ type ipv4_addr . inet_service; }}\n\
             set icmp_ok {{ type ipv4_addr; }}\n\
             chain output {{ type filter hook output priority filter; policy accept; meta skuid {uid} jump engine; }}\n\
             chain engine {{\n\
             meta l4proto tcp ct direction reply accept\n\
             meta nfproto ipv4 meta l4proto udp ip daddr . udp dport @udp_ok accept\n\
             meta nfproto ipv4 icmp type echo-request ip daddr @icmp_ok accept\n\
             counter drop\n}}\n}}\n"
        );
        nft(&script).map_err(FenceError::Nft)?;
        self.up = true;
        engine::info!(
            "kernel fence: up (table {TABLE}): uid {uid} may send only to the endpoints of its VMs' allowlists"
        );
        Ok(())
    }

    /// Makes `endpoints` VM `vm`'s share of the sets (none: the VM leaves them), each checked
    /// against `rule` and this host's addresses as they are now: one refused, nothing changes.
    /// Each endpoint added or removed is logged.
    pub(super) fn set(&mut self, vm: &str, rule: FenceRule, endpoints: &[SocketAddrV4]) -> Result<(), FenceError> {
        if !self.up {
            return Err(FenceError::Off);
        }
        let policy = rule.policy(sys::local_ipv4_addrs().unwrap_or_default());
        let eps = endpoints.iter().map(|a| Endpoint::new(*a.ip(), a.port()));
        if let Err(why) = Allowlist::under(eps, &policy) {
            engine::warn!("kernel fence: vm {vm}: refused: {why}");
            return Err(FenceError::Refused { vm: vm.to_string(), why });
        }
        let new: BTreeSet<SocketAddrV4> = endpoints.iter().copied().collect();
        if !new.is_empty() && !self.vms.contains_key(vm) && self.vms.len() >= MAX_VMS {
            return Err(FenceError::TooMany(vm.to_string()));
        }
        let old = self.vms.get(vm).cloned().unwrap_or_default();
        if old == new {
            return Ok(());
        }
        let mut next = self.vms.clone();
        if new.is_empty() {
            next.remove(vm);
        } else {
            next.insert(vm.to_string(), new.clone());
        }
        nft(&Self::fill(&next)).map_err(FenceError::Nft)?;
        self.vms = next;
        let total = self.vms.values().map(BTreeSet::len).sum::<usize>();
        for a in new.difference(&old) {
            engine::info!("kernel fence: vm {vm}: {a} added ({total} endpoint(s) of all VMs in the set)");
        }
        for a in old.difference(&new) {
            engine::info!("kernel fence: vm {vm}: {a} removed ({total} endpoint(s) of all VMs in the set)");
        }
        Ok(())
    }

    /// Empties the sets (the engine went: nothing of its user may send until the next engine
    /// puts each VM's endpoints back as its worker starts). The table stays up.
    pub(super) fn empty(&mut self) {
        if !self.up || self.vms.is_empty() {
            return;
        }
        match nft(&Self::fill(&BTreeMap::new())) {
            Ok(()) => {
                self.vms.clear();
                engine::info!("kernel fence: emptied (no engine runs)");
            }
            Err(e) => engine::warn!("kernel fence: cannot empty its sets: {e}"),
        }
    }

    /// One transaction that makes the sets the union of `vms`.
    fn fill(vms: &BTreeMap<String, BTreeSet<SocketAddrV4>>) -> String {
        let all: BTreeSet<SocketAddrV4> = vms.values().flatten().copied().collect();
        let ips: BTreeSet<Ipv4Addr> = all.iter().map(|a| *a.ip()).collect();
        let mut s = format!("flush set {TABLE} udp_ok\nflush set {TABLE} icmp_ok\n");
        if !all.is_empty() {
            let list: Vec<String> = all.iter().map(|a| format!("{} . {}", a.ip(), a.port())).collect();
            s.push_str(&format!("add element {TABLE} udp_ok {{ {} }}\n", list.join(", ")));
            let list: Vec<String> = ips.iter().map(Ipv4Addr::to_string).collect();
            s.push_str(&format!("add element {TABLE} icmp_ok {{ {} }}\n", list.join(", ")));
        }
        s
    }

    /// Removes the table (the engine is gone).
    pub(super) fn down(&mut self) {
        if !self.up {
            return;
        }
        // Only ours: a table another launcher made meanwhile stays (and is said to).
        match read_owner() {
            Ok(Some(Some(pid))) if pid == std::process::id() => match nft(&format!("delete table {TABLE}\n")) {
                Ok(()) => engine::info!("kernel fence: down (table {TABLE} removed)"),
                Err(e) => engine::warn!("kernel fence: cannot remove the table {TABLE}: {e}"),
            },
            Ok(Some(Some(pid))) => {
                engine::warn!("kernel fence: the table {TABLE} is launcher pid {pid}'s now: left to it")
            }
            Ok(Some(None)) => engine::warn!("kernel fence: the table {TABLE} names no launcher: left"),
            Ok(None) => engine::warn!("kernel fence: the table {TABLE} is already gone"),
            Err(e) => engine::warn!("kernel fence: cannot read the table {TABLE}, so it stays: {e}"),
        }
        self.up = false;
        self.vms.clear();
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        self.down();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> FenceRule {
        FenceRule { special: false, private: false, own: (Ipv4Addr::new(10, 0, 0, 2), 24, Ipv4Addr::new(10, 0, 0, 1)) }
    }

    fn listed() -> String {
        let out = Command::new("nft").args(["list", "table", "inet", "omerta"]).output().expect("nft");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn the_fence_holds_only_what_the_policy_allows_and_goes_with_the_launcher() {
        if sys::effective_ids().0 != 0 || Command::new("nft").arg("--version").output().is_err() {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI=true: this test needs root and nft");
            eprintln!("skipped: needs root and nft");
            return;
        }
        let done = std::thread::spawn(|| {
            sys::unshare_network().expect("a private network namespace");
            let mut f = Fence::new(4242);
            assert!(matches!(f.set("a", rule(), &[]), Err(FenceError::Off)), "nothing before it is up");
            f.up().expect("up");
            let consumer: SocketAddrV4 = "198.51.100.7:51820".parse().unwrap();
            f.set("a", rule(), &[consumer]).expect("a public consumer");
            let t = listed();
            assert!(t.contains("198.51.100.7 . 51820") && t.contains("skuid 4242"), "{t}");
            // Private, special, the VM's own network: refused, and the set is as it was.
            for bad in ["192.168.1.5:51820", "127.0.0.1:9", "169.254.169.254:80", "10.0.0.1:53"] {
                let e = f.set("a", rule(), &[consumer, bad.parse().unwrap()]).unwrap_err();
                assert!(matches!(e, FenceError::Refused { .. }), "{bad}: {e}");
                assert!(!listed().contains(bad.split(':').next().unwrap()), "{bad} entered the set");
            }
            // Unless the VM was configured so.
            let lan = FenceRule { private: true, ..rule() };
            f.set("b", lan, &["192.168.1.5:51820".parse().unwrap()]).expect("a LAN VM's consumer");
            // A VM's endpoints leave; another's stay.
            f.set("a", rule(), &[]).expect("a leaves");
            let t = listed();
            assert!(!t.contains("198.51.100.7") && t.contains("192.168.1.5 . 51820"), "{t}");
            drop(f);
            assert!(listed().is_empty(), "the table goes with the launcher");
        })
        .join();
        assert!(done.is_ok(), "the test thread panicked");
    }
}
