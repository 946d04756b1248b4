//! NAT between a consumer and its provider, made of namespaces the test makes (issue 25).
//!
//! ```text
//! consumer ns        inner router            outer router             the caller's private ns
//! c0 192.168.77.2 -- r2l 192.168.77.1        vc0 203.0.113.2 (.3) --- vp0 203.0.113.1 (provider)
//!                    r2w 100.64.0.2 (.3) --- r1l 100.64.0.1
//! ```
//! The outer router is a [`VethPeer`] (its `vc0` is the "public" side). [`Nat`] says which
//! routers translate: only the outer, endpoint-independent (`MASQUERADE`, which keeps source
//! ports where it can), the outer with a random port per connection (`--random-fully`: a
//! symmetric NAT), or both in a row. Every switch also gives the translating routers a new
//! outside address, which makes the kernel forget their mappings (masquerade drops the
//! connection-tracking entries of an address that goes): the consumer's traffic leaves from a
//! new endpoint, as after a roam or a NAT reboot. Nothing is forwarded toward the consumer.
//! Namespaces are deleted on drop.
use crate::netns::{ip, Netns};
use crate::peers::VethPeer;

/// Which routers translate, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// The outer router only, endpoint-independent mapping.
    EndpointIndependent,
    /// The outer router only, a random port per connection (symmetric).
    Symmetric,
    /// Both routers (the inner one in carrier-grade space, 100.64/10).
    Double,
}

/// The consumer's namespace behind two routers.
#[derive(Debug)]
pub struct NatPath {
    outer: VethPeer,
    inner: VethPeer,
    /// The consumer's namespace (run the consumer's daemon and CLI here).
    pub consumer: VethPeer,
    /// Switches so far (each gives the translating routers a new outside address).
    moves: u8,
}

fn sh(ns: &str, script: &str) {
    let st = std::process::Command::new("ip").args(["netns", "exec", ns, "sh", "-ec", script]).status();
    assert!(st.is_ok_and(|s| s.success()), "in {ns}: {script}");
}

impl NatPath {
    /// Makes the routers and the consumer's namespace, translating as `nat` says.
    pub fn new(ns: &Netns, tag: &str, nat: Nat) -> Self {
        let outer = VethPeer::new(ns, &format!("{tag}o"));
        let named = |t: &str| {
            let name = format!("omerta-p{}-{tag}{t}", std::process::id());
            let _ = std::process::Command::new("ip").args(["netns", "del", &name]).output();
            ip(&["netns", "add", &name]);
            VethPeer { ns: name }
        };
        let (inner, consumer) = (named("i"), named("c"));
        let (o, i, c) = (outer.ns.as_str(), inner.ns.as_str(), consumer.ns.as_str());
        ip(&["link", "add", "r1l", "netns", o, "type", "veth", "peer", "name", "r2w", "netns", i]);
        ip(&["link", "add", "r2l", "netns", i, "type", "veth", "peer", "name", "c0", "netns", c]);
        sh(
            o,
            "ip addr add 100.64.0.1/24 dev r1l; ip link set r1l up; ip route add 192.168.77.0/24 via 100.64.0.2; \
             sysctl -qw net.ipv4.ip_forward=1",
        );
        sh(
            i,
            "ip link set lo up; ip addr add 100.64.0.2/24 dev r2w; ip link set r2w up; \
             ip addr add 192.168.77.1/24 dev r2l; ip link set r2l up; ip route add default via 100.64.0.1; \
             sysctl -qw net.ipv4.ip_forward=1",
        );
        sh(
            c,
            "ip link set lo up; ip addr add 192.168.77.2/24 dev c0; ip link set c0 up; \
             ip route add default via 192.168.77.1",
        );
        let me = Self { outer, inner, consumer, moves: 0 };
        me.rules(nat);
        me
    }

    fn rules(&self, nat: Nat) {
        let outer = match nat {
            Nat::Symmetric => "iptables -t nat -A POSTROUTING -o vc0 -j MASQUERADE --random-fully",
            _ => "iptables -t nat -A POSTROUTING -o vc0 -j MASQUERADE",
        };
        sh(&self.outer.ns, &format!("iptables -t nat -F POSTROUTING; {outer}"));
        let inner = match nat {
            Nat::Double => "iptables -t nat -A POSTROUTING -o r2w -j MASQUERADE",
            _ => "true",
        };
        sh(&self.inner.ns, &format!("iptables -t nat -F POSTROUTING; {inner}"));
    }

    /// Translates as `nat` says from now on, from new outside addresses (the consumer's
    /// mappings are forgotten: its next datagram leaves from a new endpoint).
    pub fn switch(&mut self, nat: Nat) {
        self.rules(nat);
        self.moves += 1;
        let (old, new) = (2 + (self.moves - 1) % 2, 2 + self.moves % 2);
        sh(&self.outer.ns, &format!("ip addr del 203.0.113.{old}/24 dev vc0; ip addr add 203.0.113.{new}/24 dev vc0"));
        sh(
            &self.inner.ns,
            &format!(
                "ip addr del 100.64.0.{old}/24 dev r2w; ip addr add 100.64.0.{new}/24 dev r2w; \
                 ip route replace default via 100.64.0.1"
            ),
        );
        sh(&self.outer.ns, &format!("ip route replace 192.168.77.0/24 via 100.64.0.{new}"));
    }

    /// The outer router's outside address now: where the provider sees the consumer.
    pub fn public_ip(&self) -> String {
        format!("203.0.113.{}", 2 + self.moves % 2)
    }
}
