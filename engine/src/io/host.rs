//! The host side of one VM: its UDP socket and, where the system permits, an ICMP socket.
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::sys;

/// How ICMP echo reaches the consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcmpKind {
    /// An unprivileged ICMP datagram ("ping") socket: the kernel picks the identifier.
    Ping,
    /// A raw socket (needs CAP_NET_RAW); replies arrive with their IP header.
    Raw,
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
    let attempt = |ty: Type, kind: IcmpKind| -> io::Result<(OwnedFd, IcmpKind)> {
        let s = Socket::new(Domain::IPV4, ty.cloexec(), Some(Protocol::ICMPV4))?;
        s.set_nonblocking(true)?;
        if kind == IcmpKind::Ping {
            s.bind(&SockAddr::from(SocketAddrV4::new(bind, 0)))?;
        }
        Ok((s.into(), kind))
    };
    attempt(Type::DGRAM, IcmpKind::Ping).or_else(|_| attempt(Type::RAW, IcmpKind::Raw)).ok()
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
