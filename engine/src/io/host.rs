//! The host side of one VM: its UDP socket and, where the system permits, an ICMP socket.
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::sys;

/// How ICMP echo reaches the consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcmpKind {
    /// An ICMP datagram ("ping") socket: the kernel picks the identifier and gives each
    /// socket the replies to its own requests only.
    Ping,
    /// A raw socket (needs CAP_NET_RAW), which sees every echo reply the host receives:
    /// requests leave with this VM's own engine-chosen identifier, and only replies carrying
    /// it are the VM's. Replies arrive with their IP header.
    Raw {
        /// The identifier this VM's requests carry on the wire.
        ident: u16,
    },
}

/// The VM's host sockets.
#[derive(Debug)]
pub struct HostSockets {
    /// UDP towards the consumer.
    pub udp: UdpSocket,
    /// ICMP echo towards the consumer, if the system permits one.
    pub icmp: Option<(OwnedFd, IcmpKind)>,
    /// Whether the kernel takes UDP GSO on `udp`.
    pub gso: bool,
}

/// Socket buffers we ask for: room for bursts while the loop serves the other direction.
const SOCKET_BUFFER: usize = 4 << 20;

impl HostSockets {
    /// Opens the sockets, bound to `bind`.
    pub fn open(bind: SocketAddrV4) -> io::Result<Self> {
        let s = Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
        s.set_nonblocking(true)?;
        sys::grow_buffers(s.as_fd(), SOCKET_BUFFER);
        s.bind(&SockAddr::from(bind))?;
        let udp: UdpSocket = s.into();
        let gso = std::env::var("OMERTA_GSO").as_deref() != Ok("0") && sys::udp_gso_supported(udp.as_fd());
        Ok(Self { udp, icmp: open_icmp(*bind.ip()), gso })
    }
}

fn open_icmp(bind: Ipv4Addr) -> Option<(OwnedFd, IcmpKind)> {
    let ping = || -> io::Result<(OwnedFd, IcmpKind)> {
        let s = Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), Some(Protocol::ICMPV4))?;
        s.set_nonblocking(true)?;
        s.bind(&SockAddr::from(SocketAddrV4::new(bind, 0)))?;
        Ok((s.into(), IcmpKind::Ping))
    };
    let raw = || -> io::Result<(OwnedFd, IcmpKind)> {
        let s = Socket::new(Domain::IPV4, Type::RAW.cloexec(), Some(Protocol::ICMPV4))?;
        s.set_nonblocking(true)?;
        // Echo replies only: the kernel filters out every other ICMP type.
        sys::icmp_filter_echo_replies(s.as_fd())?;
        Ok((s.into(), IcmpKind::Raw { ident: next_ident() }))
    };
    if std::env::var("OMERTA_ICMP").as_deref() == Ok("raw") {
        return raw().ok();
    }
    ping()
        .or_else(|e| {
            // Ping sockets are off (new namespaces have them off): allow them for our own group
            // where we may, rather than share a raw socket's view of every reply.
            if e.kind() == io::ErrorKind::PermissionDenied && allow_ping_for_own_group() {
                ping()
            } else {
                Err(e)
            }
        })
        .or_else(|_| raw())
        .ok()
}

/// Widens `net.ipv4.ping_group_range` (of the engine's network namespace) to the engine's own
/// group when ping sockets are off altogether; true if it did. A range already set is left.
fn allow_ping_for_own_group() -> bool {
    const RANGE: &str = "/proc/sys/net/ipv4/ping_group_range";
    let (uid, gid) = sys::effective_ids();
    let Ok(now) = std::fs::read_to_string(RANGE) else { return false };
    let mut it = now.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
    let (lo, hi) = (it.next().unwrap_or(1), it.next().unwrap_or(0));
    if uid != 0 || lo <= hi {
        return false;
    }
    std::fs::write(RANGE, format!("{gid} {gid}")).is_ok()
}

/// An ICMP identifier for the next VM with a raw socket: distinct per VM of this process,
/// counting from a random value.
fn next_ident() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU16, Ordering};
    static BASE: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    static N: AtomicU16 = AtomicU16::new(0);
    let base = *BASE.get_or_init(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        u16::try_from(h.finish() & 0xffff).unwrap_or(0)
    });
    base.wrapping_add(N.fetch_add(1, Ordering::Relaxed))
}

/// Sends one ICMP echo request message through a raw socket with identifier `ident` in place
/// of the VM's (the checksum recomputed); the message is copied, the VM's frame untouched.
pub fn icmp_send_as(fd: RawFd, message: &[u8], to: Ipv4Addr, ident: u16) -> io::Result<()> {
    let mut buf = [0u8; 9216];
    let Some(out) = buf.get_mut(..message.len()).filter(|o| o.len() >= 8) else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    out.copy_from_slice(message);
    out[4..6].copy_from_slice(&ident.to_be_bytes());
    out[2..4].copy_from_slice(&[0, 0]);
    let sum = crate::wire::csum::checksum(out);
    out[2..4].copy_from_slice(&sum.to_be_bytes());
    icmp_send(fd, out, to)
}

/// Sends one ICMP echo request message to `to`.
pub fn icmp_send(fd: RawFd, message: &[u8], to: Ipv4Addr) -> io::Result<()> {
    let (addr, len) = super::batch::from_in(to, 0);
    // SAFETY: `message` is valid for reads of its length, `addr` is a sockaddr_in of `len`
    // bytes; both outlive the call.
    let r = unsafe {
        libc::sendto(fd, message.as_ptr().cast(), message.len(), libc::MSG_DONTWAIT, (&raw const addr).cast(), len)
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Receives one ICMP message into `buf`; returns its length and source.
pub fn icmp_recv(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Ipv4Addr)> {
    // SAFETY: all zeros is a valid sockaddr_storage.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = sys::socklen::<libc::sockaddr_storage>();
    // SAFETY: `buf` is valid for writes of its length and `addr` for `len` bytes.
    let r = unsafe {
        libc::recvfrom(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT, (&raw mut addr).cast(), &raw mut len)
    };
    let n = usize::try_from(r).map_err(|_| io::Error::last_os_error())?;
    let sin = super::batch::as_in(&addr);
    Ok((n, Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))))
}

/// The source endpoint of a received UDP datagram.
pub fn source_endpoint(name: &libc::sockaddr_storage) -> Option<crate::Endpoint> {
    if i32::from(name.ss_family) != libc::AF_INET {
        return None;
    }
    let sin = super::batch::as_in(name);
    Some(crate::Endpoint::new(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)), u16::from_be(sin.sin_port)))
}

impl AsRawFd for HostSockets {
    fn as_raw_fd(&self) -> RawFd {
        self.udp.as_raw_fd()
    }
}
