//! The allowlist: the exact IPv4 endpoints (address, port) a VM may talk to.
//!
//! An [`Allowlist`] is immutable once built. The control side builds a new one and hands an
//! `Arc<Allowlist>` to the VM thread, which swaps it in between two batches: a packet is checked
//! against the old list or the new one, never a mix. Building refuses endpoints that would open
//! the provider host or its neighbourhood ([`Policy`]): special addresses (loopback,
//! unspecified, 0/8, 240/4, multicast, broadcast, link-local such as a cloud metadata service)
//! unless asked for explicitly (labs, tests); private ones (RFC 1918, CGNAT) unless the VM is
//! allowed them (LAN deployments); the VM's own subnet and gateway, always.
use core::fmt;
use core::hash::{Hash, Hasher};
use core::net::{Ipv4Addr, SocketAddrV4};
use core::str::FromStr;

use hashbrown::HashSet;

use super::DropReason;

/// One IPv4 endpoint.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    /// Address.
    pub ip: Ipv4Addr,
    /// UDP port (0 for the address-only part of an ICMP flow).
    pub port: u16,
}

impl Endpoint {
    /// An endpoint.
    pub const fn new(ip: Ipv4Addr, port: u16) -> Self {
        Self { ip, port }
    }

    fn key(self) -> u64 {
        (u64::from(u32::from(self.ip)) << 16) | u64::from(self.port)
    }
}

// One 64-bit write instead of hashing the address bytes and the port separately. The key is
// injective, so this agrees with the derived `Eq`.
impl Hash for Endpoint {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.key());
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<SocketAddrV4> for Endpoint {
    fn from(a: SocketAddrV4) -> Self {
        Self::new(*a.ip(), a.port())
    }
}

impl From<Endpoint> for SocketAddrV4 {
    fn from(e: Endpoint) -> Self {
        SocketAddrV4::new(e.ip, e.port)
    }
}

impl FromStr for Endpoint {
    type Err = AllowlistError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<SocketAddrV4>().map(Endpoint::from).map_err(|_| AllowlistError::Syntax)
    }
}

/// Why an endpoint or a list was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllowlistError {
    /// Not `a.b.c.d:port`.
    Syntax,
    /// Port 0 cannot be a destination.
    PortZero(Endpoint),
    /// An address class that would open the provider host or its network.
    Special(Endpoint, &'static str),
    /// A private address (the provider's LAN, say), without the VM's opt-in.
    Private(Endpoint, &'static str),
    /// The VM's own subnet or gateway.
    OwnNetwork(Endpoint),
    /// An address of the provider host itself.
    HostAddress(Endpoint),
    /// More than [`Allowlist::MAX_ENDPOINTS`] endpoints.
    TooMany,
}

impl fmt::Display for AllowlistError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowlistError::Syntax => f.write_str("an endpoint is an IPv4 address and a port, like 203.0.113.7:51820"),
            AllowlistError::PortZero(e) => write!(f, "endpoint {e}: port 0 is not a destination"),
            AllowlistError::Special(e, class) => {
                write!(f, "endpoint {e} is a {class} address; refused unless allow-special=yes (labs and tests only)")
            }
            AllowlistError::Private(e, class) => {
                write!(f, "endpoint {e} is a {class} address; refused unless allow-private=yes (LAN deployments)")
            }
            AllowlistError::OwnNetwork(e) => {
                write!(f, "endpoint {e} is in the VM's own subnet (or is its gateway); never a consumer")
            }
            AllowlistError::HostAddress(e) => write!(
                f,
                "endpoint {e} is an address of this host (the provider's own); refused unless allow-special=yes"
            ),
            AllowlistError::TooMany => write!(f, "more than {} endpoints", Allowlist::MAX_ENDPOINTS),
        }
    }
}

impl std::error::Error for AllowlistError {}

/// Whether loopback, link-local and other special addresses may be listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpecialAddresses {
    /// Refuse them (the default, and the only sane choice in production).
    #[default]
    Refuse,
    /// Accept them: for tests and labs whose consumer lives on loopback.
    Allow,
}

/// The address class that makes `ip` special, if any.
pub fn special_class(ip: Ipv4Addr) -> Option<&'static str> {
    let first = ip.octets()[0];
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else if first == 0 {
        Some("this-network (0.0.0.0/8)")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if first >= 240 {
        Some("reserved (240.0.0.0/4)")
    } else {
        None
    }
}

/// The private class of `ip`, if any: RFC 1918 or the shared CGNAT range (RFC 6598).
pub fn private_class(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_private() {
        Some("private (RFC 1918)")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared (CGNAT, 100.64.0.0/10)")
    } else {
        None
    }
}

/// What a VM's allowlist may contain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    /// Special addresses (loopback, link-local, ...): labs and tests only.
    pub special: SpecialAddresses,
    /// Private addresses (RFC 1918, CGNAT): LAN deployments only.
    pub private: bool,
    /// The VM's own network, always refused: (its address, prefix length, its gateway).
    pub own: Option<(Ipv4Addr, u8, Ipv4Addr)>,
    /// The provider host's own addresses, refused like special ones.
    pub host: Vec<Ipv4Addr>,
}

impl Policy {
    /// Why `e` may not be listed under this policy, if it may not.
    pub fn refuse(&self, e: Endpoint) -> Option<AllowlistError> {
        if e.port == 0 {
            return Some(AllowlistError::PortZero(e));
        }
        if let Some((ip, prefix, gw)) = self.own {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix.min(32))).unwrap_or(0);
            if e.ip == gw || (u32::from(e.ip) ^ u32::from(ip)) & mask == 0 {
                return Some(AllowlistError::OwnNetwork(e));
            }
        }
        if let (SpecialAddresses::Refuse, Some(class)) = (self.special, special_class(e.ip)) {
            return Some(AllowlistError::Special(e, class));
        }
        if let (false, Some(class)) = (self.private, private_class(e.ip)) {
            return Some(AllowlistError::Private(e, class));
        }
        if self.special == SpecialAddresses::Refuse && self.host.contains(&e.ip) {
            return Some(AllowlistError::HostAddress(e));
        }
        None
    }
}

/// The transport of a flow, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// A UDP datagram to `dst` (address and port).
    Udp,
    /// An ICMP echo request to `dst.ip` (`dst.port` is 0).
    IcmpEcho,
    /// Any other IP protocol (TCP included), by number: never allowed.
    Other(u8),
}

/// What the policy looks at: one packet's transport, source port and destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// Transport.
    pub transport: Transport,
    /// The VM's source port (UDP, TCP) or echo identifier (ICMP).
    pub src_port: u16,
    /// Destination; the port is 0 for ICMP and unknown protocols.
    pub dst: Endpoint,
}

impl Hash for Flow {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let t: u64 = match self.transport {
            Transport::Udp => 17,
            Transport::IcmpEcho => 1,
            Transport::Other(p) => u64::from(p),
        };
        state.write_u64(self.dst.key() ^ (u64::from(self.src_port) << 48) ^ (t << 56));
    }
}

/// An immutable set of allowed endpoints.
#[derive(Debug, Clone, Default)]
pub struct Allowlist {
    endpoints: HashSet<Endpoint>,
    ips: HashSet<Ipv4Addr>,
}

impl Allowlist {
    /// Upper bound on endpoints per VM.
    pub const MAX_ENDPOINTS: usize = 1024;

    /// Builds a list, refusing special addresses (see [`special_class`]) and port 0.
    pub fn new(endpoints: impl IntoIterator<Item = Endpoint>) -> Result<Self, AllowlistError> {
        Self::with_policy(endpoints, SpecialAddresses::Refuse)
    }

    /// Builds a list with an explicit choice about special addresses (private ones refused).
    pub fn with_policy(
        endpoints: impl IntoIterator<Item = Endpoint>,
        special: SpecialAddresses,
    ) -> Result<Self, AllowlistError> {
        Self::under(endpoints, &Policy { special, ..Policy::default() })
    }

    /// Builds a list under `policy`; the first refused endpoint is the error.
    pub fn under(endpoints: impl IntoIterator<Item = Endpoint>, policy: &Policy) -> Result<Self, AllowlistError> {
        let mut list = Self::default();
        for e in endpoints {
            if let Some(why) = policy.refuse(e) {
                return Err(why);
            }
            list.endpoints.insert(e);
            list.ips.insert(e.ip);
            if list.endpoints.len() > Self::MAX_ENDPOINTS {
                return Err(AllowlistError::TooMany);
            }
        }
        Ok(list)
    }

    /// An empty list: every packet is refused.
    pub fn empty() -> Self {
        Self::default()
    }

    /// True if UDP to `e` is allowed.
    #[inline]
    pub fn permits(&self, e: Endpoint) -> bool {
        self.endpoints.contains(&e)
    }

    /// True if some allowed endpoint has address `ip` (ICMP echo, ARP, inbound ICMP).
    #[inline]
    pub fn permits_ip(&self, ip: Ipv4Addr) -> bool {
        self.ips.contains(&ip)
    }

    /// The policy check for one flow.
    #[inline]
    pub fn check(&self, flow: &Flow) -> Result<(), DropReason> {
        let ok = match flow.transport {
            Transport::Udp => self.permits(flow.dst),
            Transport::IcmpEcho => self.permits_ip(flow.dst.ip),
            Transport::Other(_) => return Err(DropReason::ProtocolNotAllowed),
        };
        if ok {
            Ok(())
        } else {
            Err(DropReason::NotAllowed)
        }
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// True if nothing is allowed.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// The endpoints, sorted (for display and the control protocol).
    pub fn endpoints(&self) -> Vec<Endpoint> {
        let mut v: Vec<_> = self.endpoints.iter().copied().collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str) -> Endpoint {
        s.parse().unwrap()
    }

    #[test]
    fn refuses_special_addresses_unless_allowed() {
        for (s, class) in [
            ("127.0.0.1:51820", "loopback"),
            ("127.9.9.9:1", "loopback"),
            ("0.0.0.0:51820", "unspecified"),
            ("255.255.255.255:51820", "broadcast"),
            ("224.0.0.1:51820", "multicast"),
            ("169.254.169.254:80", "link-local"),
            ("0.1.2.3:53", "this-network (0.0.0.0/8)"),
            ("240.0.0.1:53", "reserved (240.0.0.0/4)"),
        ] {
            assert_eq!(Allowlist::new([ep(s)]).unwrap_err(), AllowlistError::Special(ep(s), class));
            let l = Allowlist::with_policy([ep(s)], SpecialAddresses::Allow).unwrap();
            assert!(l.permits(ep(s)));
        }
        assert_eq!(Allowlist::new([ep("203.0.113.7:0")]).unwrap_err(), AllowlistError::PortZero(ep("203.0.113.7:0")));
        assert!(Allowlist::with_policy([ep("127.0.0.1:0")], SpecialAddresses::Allow).is_err());
    }

    #[test]
    fn private_addresses_need_the_opt_in_and_the_vms_own_network_never_passes() {
        let own = Some((Ipv4Addr::new(10, 0, 2, 15), 24, Ipv4Addr::new(10, 0, 2, 2)));
        let strict = Policy { own, ..Policy::default() };
        let lan = Policy { private: true, own, ..Policy::default() };
        for s in ["10.1.2.3:80", "172.16.0.1:80", "172.31.255.1:80", "192.168.1.1:80", "100.64.0.1:80", "100.127.0.1:1"]
        {
            assert!(matches!(Allowlist::under([ep(s)], &strict), Err(AllowlistError::Private(..))), "{s}");
            assert!(Allowlist::under([ep(s)], &lan).is_ok(), "{s}");
        }
        for s in ["172.32.0.1:80", "100.128.0.1:80", "203.0.113.7:51820", "198.51.100.2:1"] {
            assert!(Allowlist::under([ep(s)], &strict).is_ok(), "{s} is not private");
        }
        for s in ["10.0.2.2:53", "10.0.2.15:53", "10.0.2.200:1"] {
            let all = Policy { special: SpecialAddresses::Allow, ..lan.clone() };
            assert_eq!(Allowlist::under([ep(s)], &all).unwrap_err(), AllowlistError::OwnNetwork(ep(s)), "{s}");
        }
    }

    #[test]
    fn checks_by_transport() {
        let l = Allowlist::new([ep("203.0.113.7:51820")]).unwrap();
        let udp = |s: &str| Flow { transport: Transport::Udp, src_port: 1, dst: ep(s) };
        assert_eq!(l.check(&udp("203.0.113.7:51820")), Ok(()));
        assert_eq!(l.check(&udp("203.0.113.7:51821")), Err(DropReason::NotAllowed));
        let icmp = |ip: [u8; 4]| Flow { transport: Transport::IcmpEcho, src_port: 1, dst: Endpoint::new(ip.into(), 0) };
        assert_eq!(l.check(&icmp([203, 0, 113, 7])), Ok(()));
        assert_eq!(l.check(&icmp([8, 8, 8, 8])), Err(DropReason::NotAllowed));
        let tcp = Flow { transport: Transport::Other(6), src_port: 1, dst: ep("203.0.113.7:51820") };
        assert_eq!(l.check(&tcp), Err(DropReason::ProtocolNotAllowed));
    }

    #[test]
    fn bounded_and_parses() {
        let many = (0..=Allowlist::MAX_ENDPOINTS)
            .map(|i| Endpoint::new(Ipv4Addr::new(203, 0, 113, 7), 1000 + u16::try_from(i).unwrap()));
        assert_eq!(Allowlist::new(many).unwrap_err(), AllowlistError::TooMany);
        assert_eq!("nonsense".parse::<Endpoint>().unwrap_err(), AllowlistError::Syntax);
        assert_eq!(ep("203.0.113.7:51820").to_string(), "203.0.113.7:51820");
        let l = Allowlist::new([ep("203.0.113.9:2"), ep("203.0.113.7:1")]).unwrap();
        assert_eq!(l.endpoints(), vec![ep("203.0.113.7:1"), ep("203.0.113.9:2")]);
    }
}
