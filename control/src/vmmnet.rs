//! Direct mode's VMM namespace: QEMU's user-mode NAT (slirp) maps the guest's gateway
//! address 10.0.2.2 to the loopback of the network namespace QEMU runs in. Run in the
//! provider's own namespace, that would hand a guest every service listening on the
//! provider's 127.0.0.1. So a direct-mode VMM runs in a namespace of its own, whose loopback
//! holds nothing, joined to the engine's namespace by a veth pair:
//!
//! ```text
//!   [engine's namespace]  omd<N>h 10.254.<N>.1/30  --veth--  omd<N>v 10.254.<N>.2/30  [VMM's namespace]
//!                          MASQUERADE 10.254.<N>.0/30                default via 10.254.<N>.1
//! ```
//!
//! The guest still reaches everything else the provider can (direct mode is bypassable by
//! design: its barrier is the guest's firewall); it no longer reaches the provider's loopback.
//! Traffic from the VMM's namespace is masqueraded behind the provider's address when
//! `iptables` is installed, and forwarding is enabled in the engine's namespace
//! (`net.ipv4.ip_forward`). Everything is removed when the VM is removed or the engine exits.
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};

/// Subnets handed out, one /30 per direct-mode VM: 10.254.N.0/30.
static NEXT: AtomicU8 = AtomicU8::new(0);

/// A VMM namespace and its veth pair; removed on drop.
#[derive(Debug)]
pub struct VmmNet {
    ns: String,
    host_if: String,
    subnet: String,
    nat: bool,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e} (iproute2 is needed)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn iptables(verb: &str, subnet: &str) -> bool {
    Command::new("iptables")
        .args(["-w", "-t", "nat", verb, "POSTROUTING", "-s", subnet, "-j", "MASQUERADE"])
        .output()
        .is_ok_and(|o| o.status.success())
}

impl VmmNet {
    /// Creates the namespace for VM `vm` and joins it to the caller's namespace.
    pub fn create(vm: &str) -> Result<Self, String> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let ns = format!("omerta-{}-{n}", std::process::id());
        let (host_if, vmm_if) = (format!("omd{n}h"), format!("omd{n}v"));
        let (host_ip, vmm_ip, gw) = (format!("10.254.{n}.1/30"), format!("10.254.{n}.2/30"), format!("10.254.{n}.1"));
        let _ = ip(&["netns", "del", &ns]);
        ip(&["netns", "add", &ns]).map_err(|e| format!("vm '{vm}': direct mode needs a namespace of its own: {e}"))?;
        // From here on, drop removes what exists.
        let mut me = Self { ns: ns.clone(), host_if: host_if.clone(), subnet: format!("10.254.{n}.0/30"), nat: false };
        let setup = || -> Result<(), String> {
            ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &vmm_if, "netns", &ns])?;
            ip(&["addr", "add", &host_ip, "dev", &host_if])?;
            ip(&["link", "set", &host_if, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "addr", "add", &vmm_ip, "dev", &vmm_if])?;
            ip(&["-n", &ns, "link", "set", &vmm_if, "up"])?;
            ip(&["-n", &ns, "route", "add", "default", "via", &gw])
        };
        setup().map_err(|e| format!("vm '{vm}': setting up its VMM namespace: {e}"))?;
        if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
            engine::warn!("vm {vm}: cannot enable forwarding ({e}): the guest reaches only this host");
        }
        me.nat = iptables("-A", &me.subnet);
        if !me.nat {
            engine::warn!("vm {vm}: no NAT for its VMM namespace (iptables missing or refused): the guest reaches only this host's directly routed networks");
        }
        engine::info!("vm {vm}: direct mode: VMM in namespace {ns} ({}), away from this host's loopback", me.subnet);
        Ok(me)
    }

    /// The namespace file the VMM joins.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.ns)
    }
}

impl Drop for VmmNet {
    fn drop(&mut self) {
        if self.nat {
            iptables("-D", &self.subnet);
        }
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.ns]);
    }
}
