//! The rogue-connection detector of direct mode (no engine in the path): it lists the VMM
//! process's sockets through /proc (TCP, UDP and ICMP, IPv4 and IPv6) and reports every one
//! whose peer is not an allowed consumer.
//!
//! What it cannot see, it says: a user-mode NAT sends most UDP and ICMP from unconnected
//! sockets, whose destinations /proc does not show; each such socket is reported as a blind
//! spot (`rogue_blind`), and a flow that opens and closes between two checks is missed
//! altogether. It is a detector, not a barrier: direct mode's barrier is the guest's own
//! firewall, which the guest can remove.
#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use engine::Endpoint;

/// One socket of the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Connection {
    /// `tcp`, `udp`, `icmp`, `tcp6`, `udp6`, `icmp6`.
    pub proto: &'static str,
    /// Local address.
    pub local: SocketAddr,
    /// Peer address; `None` for an unconnected socket (or a listening one).
    pub remote: Option<SocketAddr>,
}

impl std::fmt::Display for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.remote {
            Some(r) => write!(f, "{} {} -> {r}", self.proto, self.local),
            None => write!(f, "{} {} unconnected (its destinations cannot be seen)", self.proto, self.local),
        }
    }
}

/// Parses `0100007F:1F90`, or the 32 hex digits of an IPv6 address: the kernel prints each
/// 32-bit word of an address in native byte order.
fn addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |w: &str| u32::from_str_radix(w, 16).ok().map(|v| u32::from_be(v.to_le()));
    match ip.len() {
        8 => Some(SocketAddr::new(Ipv4Addr::from(word(ip)?).into(), port)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[4 * i..4 * i + 4].copy_from_slice(&word(ip.get(8 * i..8 * i + 8)?)?.to_be_bytes());
            }
            Some(SocketAddr::new(Ipv6Addr::from(b).into(), port))
        }
        _ => None,
    }
}

/// Socket lines of a /proc/net table whose inode is in `inodes`. TCP sockets without a peer
/// (listening) are left out; others without one are kept as unconnected.
fn parse_table(text: &str, proto: &'static str, inodes: &HashSet<u64>) -> Vec<Connection> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, remote, inode) = (addr(f.get(1)?)?, addr(f.get(2)?)?, f.get(9)?.parse::<u64>().ok()?);
            let remote = (!remote.ip().is_unspecified()).then_some(remote);
            if !inodes.contains(&inode) || (remote.is_none() && proto.starts_with("tcp")) {
                return None;
            }
            Some(Connection { proto, local, remote })
        })
        .collect()
}

/// The tables [`connections`] reads, which name a [`Connection`]'s protocol.
pub const PROTOS: [&str; 6] = ["tcp", "udp", "icmp", "tcp6", "udp6", "icmp6"];

/// The TCP, UDP and ICMP sockets (IPv4 and IPv6) of process `pid`.
pub fn connections(pid: u32) -> io::Result<Vec<Connection>> {
    let mut inodes = HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let t = target.to_string_lossy();
            if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                if let Ok(n) = n.parse() {
                    inodes.insert(n);
                }
            }
        }
    }
    let mut out = Vec::new();
    for proto in PROTOS {
        // A table the kernel does not have (no IPv6, say) has no sockets to show.
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{proto}")) else { continue };
        out.extend(parse_table(&text, proto, &inodes));
    }
    Ok(out)
}

/// The connected sockets whose peer is not one of `allowed`.
pub fn rogue(conns: &[Connection], allowed: &[Endpoint]) -> Vec<Connection> {
    conns
        .iter()
        .filter(|c| {
            c.remote.is_some_and(|r| match r {
                SocketAddr::V4(a) => !allowed.iter().any(|e| e.ip == *a.ip() && e.port == a.port()),
                SocketAddr::V6(_) => true,
            })
        })
        .cloned()
        .collect()
}

/// The sockets whose destinations cannot be seen (unconnected UDP and ICMP).
pub fn blind(conns: &[Connection]) -> Vec<Connection> {
    conns.iter().filter(|c| c.remote.is_none()).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0000000000000000 100 0 0 10 0
   1: 0F02000A:9C40 0300FA0A:1F90 01 00000000:00000000 00:00000000 00000000     0        0 222 1 0000000000000000 20 4 30 10 -1
   2: 0F02000A:9C41 0200FA0A:CA6C 01 00000000:00000000 00:00000000 00000000     0        0 333 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn finds_peers_of_our_sockets_only() {
        let inodes: HashSet<u64> = [111, 222, 333].into_iter().collect();
        let conns = parse_table(TCP, "tcp", &inodes);
        assert_eq!(conns.len(), 2, "the listening socket has no peer");
        assert_eq!(conns[0].remote, Some("10.250.0.3:8080".parse().unwrap()));
        let consumer: Endpoint = "10.250.0.2:51820".parse().unwrap();
        let bad = rogue(&conns, &[consumer]);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].to_string(), "tcp 10.0.2.15:40000 -> 10.250.0.3:8080");
        let only_222: HashSet<u64> = [222].into_iter().collect();
        assert_eq!(parse_table(TCP, "tcp", &only_222).len(), 1, "sockets of other processes are ignored");
    }

    #[test]
    fn reads_this_process() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let conns = connections(std::process::id()).unwrap();
        let peer = s.peer_addr().unwrap();
        assert!(conns.iter().any(|c| c.proto == "tcp" && c.remote == Some(peer)), "{conns:?}");
        // An unconnected UDP socket is a blind spot, said as such.
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let conns = connections(std::process::id()).unwrap();
        let local = u.local_addr().unwrap();
        let b = blind(&conns);
        assert!(b.iter().any(|c| c.proto == "udp" && c.local == local), "{b:?}");
        assert!(b.iter().all(|c| c.to_string().contains("cannot be seen")));
    }

    #[test]
    fn reads_ipv6_and_icmp_tables() {
        const UDP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
   0: 00000000000000000000000001000000:A2A2 B80D0120000000000000000001000000:0035 01 00000000:00000000 00:00000000 00000000     0        0 444 2 0000000000000000 0
";
        const ICMP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
   0: 0F02000A:0007 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 555 2 0000000000000000 0
";
        let inodes: HashSet<u64> = [444, 555].into_iter().collect();
        let v6 = parse_table(UDP6, "udp6", &inodes);
        assert_eq!(v6[0].remote, Some("[2001:db8::1]:53".parse().unwrap()), "{v6:?}");
        assert_eq!(v6[0].local, "[::1]:41634".parse().unwrap());
        assert_eq!(rogue(&v6, &[]).len(), 1, "an IPv6 peer is never a consumer");
        let icmp = parse_table(ICMP, "icmp", &inodes);
        assert_eq!(blind(&icmp).len(), 1, "an unconnected ping socket is a blind spot: {icmp:?}");
    }
}
