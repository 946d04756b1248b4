//! Direct mode's VMM namespace (the launcher makes, fences and removes it): QEMU's user-mode NAT (slirp) maps the guest's gateway
//! address 10.0.2.2 to the loopback of the network namespace QEMU runs in. Run in the
//! provider's own namespace, that would hand a guest every service listening on the
//! provider's 127.0.0.1. So a direct-mode VMM runs in a namespace of its own, whose loopback
//! holds nothing, joined to the engine's namespace by a veth pair:
//!
//! ```text
//!   [engine's namespace]  om<pid>n<N>h .1/30  --veth--  om<pid>n<N>v .2/30  [VMM's namespace omerta-<pid>-<N>]
//!                          MASQUERADE the /30                   default via .1
//! ```
//!
//! The guest still reaches the internet (direct mode is bypassable by design: its barrier is
//! the guest's firewall), but neither the provider's loopback nor, unless the VM is allowed
//! private addresses, the provider's LAN: the VMM's namespace (ours, removed with it) rejects
//! in its `OUTPUT` chain what slirp would send to the provider host's own addresses, to
//! RFC 1918, CGNAT and link-local ranges, and to the veth's own /30.
//! Traffic from the VMM's namespace is masqueraded behind the provider's address when
//! `iptables` is installed, and forwarding is enabled in the engine's namespace
//! (`net.ipv4.ip_forward`) while a direct-mode VM lives: the value found before the first one
//! is put back when the last one goes. The /30 is one of 10.254.0.0/16, chosen by the engine's
//! pid and a count. Everything is removed when the engine exits; an engine that was killed
//! leaves its namespaces behind, and the next one to start a direct-mode VM removes them.
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};

/// Why a direct-mode VM's namespace could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// `ip netns add` failed.
    #[error("vm '{vm}': direct mode needs a namespace of its own: {why}")]
    Namespace {
        /// The VM.
        vm: String,
        /// What `ip` said.
        why: String,
    },
    /// The veth pair, its addresses or the route failed.
    #[error("vm '{vm}': setting up its VMM namespace: {why}")]
    Setup {
        /// The VM.
        vm: String,
        /// What `ip` said.
        why: String,
    },
}

/// VMM namespaces made by this engine, counted.
static NEXT: AtomicU16 = AtomicU16::new(0);

/// A VMM namespace and its veth pair; removed on drop.
#[derive(Debug)]
pub struct VmmNet {
    ns: String,
    host_if: String,
    subnet: String,
    nat: bool,
    /// This host's addresses the VMM's namespace rejects now.
    fenced: Vec<std::net::Ipv4Addr>,
    /// Whether it holds a share of the forwarding setting (released on drop).
    forwarding: bool,
}

/// The forwarding setting of the engine's namespace: how many direct-mode namespaces need it,
/// and the value found before the first of them (put back after the last).
static FORWARDING: std::sync::Mutex<(usize, Option<String>)> = std::sync::Mutex::new((0, None));
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Turns forwarding on for one more direct-mode VM; false if it could not be.
fn forwarding_take(vm: &str) -> bool {
    let mut g = FORWARDING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if g.0 == 0 {
        g.1 = std::fs::read_to_string(IP_FORWARD).ok().map(|v| v.trim().to_string());
    }
    if g.1.as_deref() != Some("1") && g.0 == 0 {
        if let Err(e) = std::fs::write(IP_FORWARD, "1") {
            engine::warn!("vm {vm}: cannot enable forwarding ({e}): the guest reaches only this host");
            return false;
        }
        engine::info!(
            "direct mode: forwarding on in the engine's namespace (it was {}); put back when the last direct-mode VM goes",
            g.1.as_deref().unwrap_or("unknown")
        );
    }
    g.0 += 1;
    true
}

/// One direct-mode VM less: after the last, forwarding is put back as it was found.
fn forwarding_release() {
    let mut g = FORWARDING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    g.0 = g.0.saturating_sub(1);
    if g.0 == 0 {
        if let Some(prev) = g.1.take().filter(|p| p != "1") {
            match std::fs::write(IP_FORWARD, &prev) {
                Ok(()) => engine::info!("direct mode: forwarding put back to {prev} in the engine's namespace"),
                Err(e) => engine::warn!("direct mode: cannot put forwarding back to {prev}: {e}"),
            }
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e} (iproute2 is needed)"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!("ip {}: {}", args.join(" "), err.split_whitespace().collect::<Vec<_>>().join(" ")))
    }
}

fn iptables(verb: &str, subnet: &str) -> bool {
    Command::new("iptables")
        .args(["-w", "5", "-t", "nat", verb, "POSTROUTING", "-s", subnet, "-j", "MASQUERADE"])
        .output()
        .is_ok_and(|o| o.status.success())
}

impl VmmNet {
    /// Creates the namespace for VM `vm` and joins it to the caller's namespace; `lan` lets
    /// the VMM reach private addresses (the VM's `allow-private=yes`).
    pub fn create(vm: &str, lan: bool) -> Result<Self, NetError> {
        sweep();
        let (pid, n) = (std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let ns = format!("omerta-{pid}-{n}");
        // Names carry the engine's pid, so two engines (or one restarted after a crash) on a
        // host never collide; so does the /30, spread over 10.254.0.0/16 by pid and count.
        let (host_if, vmm_if) = (format!("om{pid:x}n{n:x}h"), format!("om{pid:x}n{n:x}v"));
        let i = (pid.wrapping_mul(61).wrapping_add(u32::from(n))) % (1 << 14);
        let (a, b) = (i >> 6, (i & 63) << 2);
        let (host_ip, vmm_ip, gw) =
            (format!("10.254.{a}.{}/30", b + 1), format!("10.254.{a}.{}/30", b + 2), format!("10.254.{a}.{}", b + 1));
        let subnet = format!("10.254.{a}.{b}/30");
        let _ = ip(&["netns", "del", &ns]);
        ip(&["netns", "add", &ns]).map_err(|why| NetError::Namespace { vm: vm.to_string(), why })?;
        // From here on, drop removes what exists.
        let mut me = Self {
            ns: ns.clone(),
            host_if: host_if.clone(),
            subnet,
            nat: false,
            fenced: Vec::new(),
            forwarding: false,
        };
        let setup = || -> Result<(), String> {
            ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &vmm_if, "netns", &ns])?;
            ip(&["addr", "add", &host_ip, "dev", &host_if])?;
            ip(&["link", "set", &host_if, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "addr", "add", &vmm_ip, "dev", &vmm_if])?;
            ip(&["-n", &ns, "link", "set", &vmm_if, "up"])?;
            ip(&["-n", &ns, "route", "add", "default", "via", &gw])
        };
        setup().map_err(|why| NetError::Setup { vm: vm.to_string(), why })?;
        me.forwarding = forwarding_take(vm);
        match fence(&ns, &me.subnet, lan) {
            Ok(host) => me.fenced = host,
            Err(e) => {
                engine::warn!("vm {vm}: cannot fence its VMM off this host and its LAN ({e}): they are reachable")
            }
        }
        me.nat = iptables("-A", &me.subnet);
        if !me.nat {
            engine::warn!("vm {vm}: no NAT for its VMM namespace (iptables missing or refused): the guest reaches only this host's directly routed networks");
        }
        engine::info!("vm {vm}: direct mode: VMM in namespace {ns} ({}), away from this host's loopback", me.subnet);
        Ok(me)
    }

    /// Follows this host's addresses: rejects the new ones in the VMM's namespace, and stops
    /// rejecting those the host no longer has (they may be anyone's now). Call when they change.
    pub fn refence(&mut self, vm: &str, host: &[std::net::Ipv4Addr]) {
        let host: Vec<std::net::Ipv4Addr> = host.iter().copied().filter(|a| !a.is_loopback()).collect();
        if host == self.fenced {
            return;
        }
        // Only what took effect is recorded: a rule that failed is tried again next time.
        let mut fenced: Vec<std::net::Ipv4Addr> =
            self.fenced.iter().copied().filter(|a| !host.contains(a)).collect::<Vec<_>>();
        fenced.retain(|a| reject(&self.ns, "-D", &format!("{a}/32")).is_err());
        for a in &host {
            if self.fenced.contains(a) {
                fenced.push(*a);
                continue;
            }
            match reject(&self.ns, "-A", &format!("{a}/32")) {
                Ok(()) => {
                    engine::info!("vm {vm}: this host's new address {a} is fenced off from its VMM");
                    fenced.push(*a);
                }
                Err(e) => engine::warn!("vm {vm}: cannot fence this host's new address {a} off from its VMM: {e}"),
            }
        }
        fenced.sort_unstable();
        self.fenced = fenced;
    }

    /// The namespace file the VMM joins.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.ns)
    }
}

/// Rejects, in the VMM's namespace, what slirp would send to this host or (unless `lan`) to
/// private networks. Returns the host's addresses it rejects (those it has now; see
/// [`VmmNet::refence`]).
fn fence(ns: &str, subnet: &str, lan: bool) -> Result<Vec<std::net::Ipv4Addr>, String> {
    let host: Vec<std::net::Ipv4Addr> = sys::local_ipv4_addrs()
        .map_err(|e| format!("reading this host's addresses: {e}"))?
        .into_iter()
        .filter(|a| !a.is_loopback())
        .collect();
    let mut dst: Vec<String> = host.iter().map(|a| format!("{a}/32")).collect();
    dst.push(subnet.to_string());
    if !lan {
        dst.extend(
            ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16"].map(String::from),
        );
    }
    for d in dst {
        reject(ns, "-A", &d)?;
    }
    Ok(host)
}

/// Adds (`-A`) or deletes (`-D`) the rule of the VMM namespace's `OUTPUT` chain that rejects
/// what goes to `dst`.
fn reject(ns: &str, verb: &str, dst: &str) -> Result<(), String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "iptables", "-w", "5", verb, "OUTPUT", "-d", dst, "-j", "REJECT"])
        .output()
        .map_err(|e| format!("iptables: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("iptables {verb} OUTPUT -d {dst}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Removes the VMM namespaces of engines that are gone (killed before they could clean up):
/// `omerta-<pid>-<n>` whose pid no longer runs. Their veth pairs went with them.
fn sweep() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else { return };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("omerta-").and_then(|r| r.split('-').next()) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

impl Drop for VmmNet {
    fn drop(&mut self) {
        if self.nat {
            iptables("-D", &self.subnet);
        }
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.ns]);
        if self.forwarding {
            forwarding_release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a network namespace of its own (its forwarding is its own), as root.
    fn in_private_netns(f: impl FnOnce() + Send + 'static) -> bool {
        if sys::effective_ids().0 != 0 {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true: this test needs root (network namespaces)");
            eprintln!("skipped: needs root (network namespaces)");
            return false;
        }
        std::thread::spawn(move || {
            sys::unshare_network().expect("a private network namespace");
            f();
        })
        .join()
        .is_ok()
    }

    #[test]
    fn direct_mode_puts_forwarding_back_as_it_found_it() {
        let ok = in_private_netns(|| {
            let read = || std::fs::read_to_string(IP_FORWARD).unwrap().trim().to_string();
            std::fs::write(IP_FORWARD, "0").unwrap();
            let a = VmmNet::create("fwd-a", false).expect("a direct-mode namespace");
            assert_eq!(read(), "1", "on while a direct-mode VM lives");
            let b = VmmNet::create("fwd-b", false).expect("a second one");
            drop(a);
            assert_eq!(read(), "1", "still on while the second lives");
            drop(b);
            assert_eq!(read(), "0", "put back after the last");
            // Found on: left on.
            std::fs::write(IP_FORWARD, "1").unwrap();
            drop(VmmNet::create("fwd-c", false).expect("a third"));
            assert_eq!(read(), "1");
        });
        assert!(ok, "the test thread panicked");
    }
}
