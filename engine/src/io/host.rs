//! The host side of one VM: the one UDP socket that holds its port (every datagram to and
//! from its consumers goes through it), and the ICMP sockets connected to its allowed
//! addresses.
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::filter::Allowlist;
use crate::Endpoint;
use sys;

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

/// The VM's host sockets: the UDP socket that holds the VM's port, and the ICMP set.
#[derive(Debug)]
pub struct HostSockets {
    /// Bound to the VM's address and port without `SO_REUSEPORT`, so no other socket (of any
    /// user) may share the port; never connected. Every datagram for a consumer goes out on it
    /// naming its destination (the translation let it through the allowlist), and every
    /// datagram to the port arrives on it and is judged by its source (`inbound_not_allowed`
    /// when off the list).
    pub udp: UdpSocket,
    /// One ICMP socket per allowed address, connected to it.
    pub egress: Egress,
    /// Whether the kernel takes UDP GSO on the VM's socket.
    pub gso: bool,
}

/// Socket buffers we ask for: room for bursts while the loop serves the other direction.
const SOCKET_BUFFER: usize = 4 << 20;

/// How often ICMP sockets whose peer is unreachable are opened again.
const REPAIR_EVERY: Duration = Duration::from_millis(250);

impl HostSockets {
    /// Opens the VM's UDP socket, bound to `bind` (port 0: one the kernel picks); the ICMP
    /// set starts empty and follows the allowlist ([`Egress::sync`]).
    pub fn open(bind: SocketAddrV4) -> io::Result<Self> {
        let s = Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
        s.set_nonblocking(true)?;
        sys::grow_buffers(s.as_fd(), SOCKET_BUFFER);
        // Never SO_REUSEPORT (nor SO_REUSEADDR): the port is this VM's alone. A port the kernel
        // picks is one nobody holds, and any later bind to it is refused (EADDRINUSE), another
        // VM's or another process's of the engine's own user, which SO_REUSEPORT would let join
        // the port and be handed the consumer's datagrams.
        s.bind(&SockAddr::from(bind))?;
        let local = s.local_addr()?.as_socket_ipv4().ok_or(io::ErrorKind::InvalidInput)?;
        let udp: UdpSocket = s.into();
        let gso = std::env::var("OMERTA_GSO").as_deref() != Ok("0") && sys::udp_gso_supported(udp.as_fd());
        let icmp = icmp_choice(*bind.ip());
        Ok(Self { udp, egress: Egress::new(local, icmp), gso })
    }
}

/// An ICMP socket of the set and what the backends know it by.
#[derive(Debug)]
struct Link {
    sock: OwnedFd,
    tag: u32,
    /// Connected to its peer: the only state in which it is sent on.
    connected: bool,
    /// To be opened again (a send on it failed, or the host's addresses changed).
    stale: bool,
}

/// An ICMP socket that joined or left the set, for the backend to watch or forget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A new socket: read its replies (with [`icmp_recv`]).
    Added {
        /// Its descriptor.
        fd: RawFd,
        /// Unique for the life of the set (never reused).
        tag: u32,
    },
    /// A socket that left (already closed): stop watching it.
    Removed {
        /// Its tag.
        tag: u32,
    },
}

/// The ICMP set: one ICMP socket per allowed address, connected to it, so each echo goes to
/// its socket's peer and nowhere else, and each socket gets only its peer's replies.
///
/// Sockets whose peer cannot be reached (no route: a link down, an address gone) are opened
/// again every [`REPAIR_EVERY`] until it can, and all of them when told the host's addresses
/// changed, so the kernel picks the source address anew. (UDP needs none of this: the VM's
/// one socket is never connected, so the kernel picks a route and a source address for every
/// datagram.)
#[derive(Debug)]
pub struct Egress {
    local: SocketAddrV4,
    icmp_kind: Option<IcmpKind>,
    icmp: HashMap<Ipv4Addr, Link>,
    synced: Option<Arc<Allowlist>>,
    changes: Vec<Change>,
    next_tag: u32,
    repair_at: Option<Instant>,
    /// The last repair, so repairs come at most every [`REPAIR_EVERY`].
    last_repair: Option<Instant>,
    /// Some socket of the list could not be opened: tried again with the repairs.
    incomplete: bool,
    /// Sockets that left the set, kept open until the backend has taken the changes that
    /// name them (so it never reads a descriptor number that was closed and reused).
    retired: Vec<OwnedFd>,
}

impl Egress {
    fn new(local: SocketAddrV4, icmp_kind: Option<IcmpKind>) -> Self {
        Self {
            local,
            icmp_kind,
            icmp: HashMap::new(),
            synced: None,
            changes: Vec::new(),
            next_tag: 1,
            repair_at: None,
            last_repair: None,
            incomplete: false,
            retired: Vec::new(),
        }
    }

    /// The VM's UDP port.
    pub fn port(&self) -> u16 {
        self.local.port()
    }

    /// How ICMP echo reaches consumers, if the system permits it at all.
    pub fn icmp_kind(&self) -> Option<IcmpKind> {
        self.icmp_kind
    }

    /// Whether `allow` is the list the set was last made to follow.
    pub fn follows(&self, allow: &Arc<Allowlist>) -> bool {
        self.synced.as_ref().is_some_and(|s| Arc::ptr_eq(s, allow))
    }

    /// Makes the set follow `allow`: opens and connects a socket for each new address, and
    /// retires those of addresses that left (closed once the backend has forgotten them).
    ///
    /// A socket that cannot be opened is left out (an echo to its address is then counted
    /// `no_egress_socket`); the first such error is returned, with the address it was for.
    pub fn sync(&mut self, allow: &Arc<Allowlist>) -> Result<(), (String, io::Error)> {
        let mut first = None;
        if let Some(kind) = self.icmp_kind {
            for ip in allow.endpoints().iter().map(|e| e.ip) {
                if self.icmp.contains_key(&ip) {
                    continue;
                }
                match open_icmp_link(*self.local.ip(), ip, kind, &mut self.next_tag) {
                    Ok(link) => {
                        self.admit(&link);
                        self.icmp.insert(ip, link);
                    }
                    Err(e) => first = first.or(Some((format!("the ICMP socket for {ip}"), e))),
                }
            }
        }
        let gone: Vec<Ipv4Addr> = self.icmp.keys().copied().filter(|ip| !allow.permits_ip(*ip)).collect();
        for ip in gone {
            if let Some(link) = self.icmp.remove(&ip) {
                self.retire(link);
            }
        }
        self.synced = Some(Arc::clone(allow));
        self.incomplete = first.is_some();
        if self.incomplete {
            self.schedule_repair();
        }
        first.map_or(Ok(()), Err)
    }

    /// A socket leaves the set: it is closed at the next [`Egress::take_changes`], and the
    /// backend told to forget it; if the backend has not been told of it yet (it joined and
    /// left between two looks, as an ICMP socket replaced at once), its joining is withdrawn
    /// instead, so the backend never watches a closed descriptor.
    fn retire(&mut self, link: Link) {
        let pending = self.changes.iter().position(|c| matches!(c, Change::Added { tag, .. } if *tag == link.tag));
        match pending {
            Some(at) => {
                self.changes.remove(at);
            }
            None => self.changes.push(Change::Removed { tag: link.tag }),
        }
        self.retired.push(link.sock);
    }

    /// Sockets that joined or left since the last call, for the backend to (un)watch. Those
    /// that left are closed now: the backend forgets them before it reads anything again.
    pub fn take_changes(&mut self) -> Vec<Change> {
        self.retired.clear();
        std::mem::take(&mut self.changes)
    }

    /// Whether changes wait for the backend.
    pub fn changed(&self) -> bool {
        !self.changes.is_empty()
    }

    /// The connected ICMP socket for `to`: `Err(true)` when it has one that is not connected
    /// now (its peer unreachable), `Err(false)` when it has none.
    pub fn icmp_fd(&self, to: Ipv4Addr) -> Result<(RawFd, IcmpKind), bool> {
        match (self.icmp.get(&to), self.icmp_kind) {
            (Some(l), Some(kind)) if l.connected => Ok((l.sock.as_raw_fd(), kind)),
            (Some(_), _) => Err(true),
            (None, _) => Err(false),
        }
    }

    /// The ICMP socket known to backends as `tag`, while it is in the set.
    pub fn icmp_fd_by_tag(&self, tag: u64) -> Option<RawFd> {
        self.icmp.values().find(|l| u64::from(l.tag) == tag).map(|l| l.sock.as_raw_fd())
    }

    /// Every ICMP socket, to read replies from.
    pub fn icmp_fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.icmp.values().map(|l| l.sock.as_raw_fd())
    }

    /// A send on the ICMP socket `fd` failed with `errno`: if its peer may be reachable
    /// another way (a route or an address changed), open it again soon.
    pub fn send_failed(&mut self, errno: Option<i32>, fd: RawFd) {
        if matches!(errno, Some(libc::ECONNREFUSED | libc::EMSGSIZE | libc::EIO | libc::ENOBUFS)) {
            return;
        }
        let mut any = false;
        for link in self.icmp.values_mut() {
            if link.sock.as_raw_fd() == fd {
                link.stale = true;
                any = true;
            }
        }
        if any {
            self.schedule_repair();
        }
    }

    /// The host's addresses changed: open every ICMP socket again, so each picks its source
    /// address anew.
    pub fn addresses_changed(&mut self) {
        for link in self.icmp.values_mut() {
            link.stale = true;
        }
        self.schedule_repair();
    }

    /// Announces a socket that joins the set to the backend, and asks for its repair if it is
    /// not connected yet.
    fn admit(&mut self, link: &Link) {
        self.changes.push(Change::Added { fd: link.sock.as_raw_fd(), tag: link.tag });
        if !link.connected {
            self.schedule_repair();
        }
    }

    /// Asks for a repair as soon as the last one is [`REPAIR_EVERY`] old.
    fn schedule_repair(&mut self) {
        if self.repair_at.is_none() {
            let now = Instant::now();
            self.repair_at = Some(self.last_repair.map_or(now, |t| (t + REPAIR_EVERY).max(now)));
        }
    }

    /// Replaces the sockets a failure or an address change marked (at most every
    /// [`REPAIR_EVERY`], until each is connected), and opens those that could not be opened.
    /// A socket is replaced rather than reconnected (dissolving a raw socket's association
    /// unhooks it from the kernel's tables; a ping socket would lose its identifier). Cheap
    /// when nothing is due.
    #[inline]
    pub fn maintain(&mut self) {
        let Some(at) = self.repair_at else { return };
        let now = Instant::now();
        if now < at {
            return;
        }
        self.repair_at = None;
        self.last_repair = Some(now);
        let mut unreachable = 0;
        if let Some(kind) = self.icmp_kind {
            let bind = *self.local.ip();
            let stale: Vec<Ipv4Addr> = self.icmp.iter().filter(|(_, l)| l.stale).map(|(ip, _)| *ip).collect();
            for ip in stale {
                match open_icmp_link(bind, ip, kind, &mut self.next_tag) {
                    Ok(new) => {
                        unreachable += usize::from(!new.connected);
                        self.admit(&new);
                        if let Some(old) = self.icmp.insert(ip, new) {
                            self.retire(old);
                        }
                    }
                    Err(_) => unreachable += 1,
                }
            }
        }
        if self.incomplete {
            if let Some(allow) = self.synced.clone() {
                let _ = self.sync(&allow);
            }
        }
        if unreachable > 0 || self.incomplete {
            self.schedule_repair();
        }
    }
}

fn tag(next: &mut u32) -> u32 {
    let t = *next;
    *next = next.wrapping_add(1).max(1);
    t
}

fn open_icmp_link(bind: Ipv4Addr, to: Ipv4Addr, kind: IcmpKind, next: &mut u32) -> io::Result<Link> {
    let sock = match kind {
        IcmpKind::Ping => ping_socket(bind)?,
        IcmpKind::Raw { .. } => raw_socket()?,
    };
    let connected = sys::connect_inet(sock.as_raw_fd(), SocketAddrV4::new(to, 0)).is_ok();
    Ok(Link { sock, tag: tag(next), connected, stale: !connected })
}

fn ping_socket(bind: Ipv4Addr) -> io::Result<OwnedFd> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), Some(Protocol::ICMPV4))?;
    s.set_nonblocking(true)?;
    s.bind(&SockAddr::from(SocketAddrV4::new(bind, 0)))?;
    Ok(s.into())
}

fn raw_socket() -> io::Result<OwnedFd> {
    let s = Socket::new(Domain::IPV4, Type::RAW.cloexec(), Some(Protocol::ICMPV4))?;
    s.set_nonblocking(true)?;
    // Echo replies only: the kernel filters out every other ICMP type.
    sys::icmp_filter_echo_replies(s.as_fd())?;
    Ok(s.into())
}

/// Decides how this VM's echo requests go out: ping sockets where the system permits them
/// (enabling them for the engine's own group where it may), else raw sockets with an
/// identifier of this VM's own, else not at all.
fn icmp_choice(bind: Ipv4Addr) -> Option<IcmpKind> {
    let raw = || raw_socket().ok().map(|_| IcmpKind::Raw { ident: next_ident() });
    if std::env::var("OMERTA_ICMP").as_deref() == Ok("raw") {
        return raw();
    }
    match ping_socket(bind) {
        Ok(_) => Some(IcmpKind::Ping),
        // Ping sockets are off (new namespaces have them off): allow them for our own group
        // where we may, rather than share a raw socket's view of every reply.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied && allow_ping_for_own_group() => {
            ping_socket(bind).ok().map(|_| IcmpKind::Ping).or_else(raw)
        }
        Err(_) => raw(),
    }
}

/// Widens `net.ipv4.ping_group_range` (of the engine's network namespace) to the engine's own
/// group when ping sockets are off altogether; true if it did. A range already set is left.
fn allow_ping_for_own_group() -> bool {
    let (uid, gid) = sys::effective_ids();
    uid == 0 && allow_ping_sockets(gid)
}

/// Widens `net.ipv4.ping_group_range` of the caller's network namespace to `gid` when ping
/// sockets are off there altogether (as in every new namespace), so a process of that group
/// may open them; a range already set is left. True if it widened it. Needs root; an engine
/// that drops to another user calls this for that user's group first.
pub fn allow_ping_sockets(gid: u32) -> bool {
    const RANGE: &str = "/proc/sys/net/ipv4/ping_group_range";
    let Ok(now) = std::fs::read_to_string(RANGE) else { return false };
    let mut it = now.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
    let (lo, hi) = (it.next().unwrap_or(1), it.next().unwrap_or(0));
    if lo <= hi {
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

/// Sends one ICMP echo request message through a connected raw socket with identifier
/// `ident` in place of the VM's (the checksum recomputed); the message is copied, the VM's
/// frame untouched.
pub fn icmp_send_as(fd: RawFd, message: &[u8], ident: u16) -> io::Result<()> {
    let mut buf = [0u8; 9216];
    let Some(out) = buf.get_mut(..message.len()).filter(|o| o.len() >= 8) else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    out.copy_from_slice(message);
    out[4..6].copy_from_slice(&ident.to_be_bytes());
    out[2..4].copy_from_slice(&[0, 0]);
    let sum = crate::wire::csum::checksum(out);
    out[2..4].copy_from_slice(&sum.to_be_bytes());
    icmp_send(fd, out)
}

/// Sends one ICMP echo request message on a connected ICMP socket (to its peer only).
pub fn icmp_send(fd: RawFd, message: &[u8]) -> io::Result<()> {
    // SAFETY: `message` is valid for reads of its length for the whole call.
    let r = unsafe { libc::send(fd, message.as_ptr().cast(), message.len(), libc::MSG_DONTWAIT) };
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
pub fn source_endpoint(name: &libc::sockaddr_storage) -> Option<Endpoint> {
    if i32::from(name.ss_family) != libc::AF_INET {
        return None;
    }
    let sin = super::batch::as_in(name);
    Some(Endpoint::new(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)), u16::from_be(sin.sin_port)))
}
