//! The rogue-connection detector of direct mode (no engine in the path): it lists the VMM
//! process's IPv4 TCP and UDP sockets through /proc and reports every one whose peer is not an
//! allowed consumer. It sees connected sockets only (a user-mode NAT's connected TCP and UDP
//! flows); an unconnected UDP socket has no peer to show. It is a detector, not a barrier:
//! direct mode's barrier is the guest's own firewall, which the guest can remove.
#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};

use engine::Endpoint;

/// One socket with a peer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Connection {
    /// `tcp` or `udp`.
    pub proto: &'static str,
    /// Local address.
    pub local: SocketAddrV4,
    /// Peer address.
    pub remote: SocketAddrV4,
}

impl std::fmt::Display for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} -> {}", self.proto, self.local, self.remote)
    }
}

/// Parses `0100007F:1F90` (the kernel prints the address as a native-endian u32).
fn addr(s: &str) -> Option<SocketAddrV4> {
    let (ip, port) = s.split_once(':')?;
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(ip.to_le())), port))
}

/// Socket lines of a /proc/net table whose inode is in `inodes` and that have a peer.
fn parse_table(text: &str, proto: &'static str, inodes: &HashSet<u64>) -> Vec<Connection> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, remote, inode) = (addr(f.get(1)?)?, addr(f.get(2)?)?, f.get(9)?.parse::<u64>().ok()?);
            (inodes.contains(&inode) && !remote.ip().is_unspecified()).then_some(Connection { proto, local, remote })
        })
        .collect()
}

/// The IPv4 TCP and UDP sockets of process `pid` that have a peer.
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
    for (file, proto) in [("tcp", "tcp"), ("udp", "udp")] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{file}"))?;
        out.extend(parse_table(&text, proto, &inodes));
    }
    Ok(out)
}

/// The connections whose peer is not one of `allowed`.
pub fn rogue(conns: &[Connection], allowed: &[Endpoint]) -> Vec<Connection> {
    conns
        .iter()
        .filter(|c| !allowed.iter().any(|a| a.ip == *c.remote.ip() && a.port == c.remote.port()))
        .cloned()
        .collect()
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
        assert_eq!(conns[0].remote, "10.250.0.3:8080".parse().unwrap());
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
        let peer = match s.peer_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            std::net::SocketAddr::V6(_) => unreachable!(),
        };
        assert!(conns.iter().any(|c| c.proto == "tcp" && c.remote == peer), "{conns:?}");
    }
}
