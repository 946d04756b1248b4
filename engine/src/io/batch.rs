//! Preallocated batches of datagrams for `recvmmsg` and `sendmmsg`.
//!
//! [`RxBatch`] owns a fixed pool of slots; each receive fills up to `len` slots at a fixed
//! offset (0 for VM frames, `HEADROOM` for host datagrams, so frame headers can be written in
//! front of the payload). [`TxBatch`] holds iovecs that point into those slots: it copies
//! nothing. The loop upholds the rule that makes this sound: a slot is not received into
//! again while a [`TxBatch`] still refers to it (the loop reads a direction only once the
//! batch fed from it has been flushed or cleared).
use std::io;
use std::os::fd::RawFd;

use sys;

/// One receive buffer pool with its message headers.
pub struct RxBatch {
    mem: Box<[u8]>,
    slot: usize,
    offset: usize,
    hdrs: Box<[sys::mmsghdr]>,
    iovs: Box<[libc::iovec]>,
    names: Box<[libc::sockaddr_storage]>,
    /// Datagrams held by the last receive.
    pub len: usize,
}

impl RxBatch {
    /// `n` slots of `slot` bytes; data lands at `offset` in each slot.
    pub fn new(n: usize, slot: usize, offset: usize) -> Self {
        let mut b = Self {
            mem: vec![0u8; n * slot].into_boxed_slice(),
            slot,
            offset,
            // SAFETY: mmsghdr, iovec and sockaddr_storage are plain C structs for which all
            // zeros (null pointers, zero lengths) is a valid value.
            hdrs: (0..n).map(|_| unsafe { std::mem::zeroed() }).collect(),
            // SAFETY: as above.
            iovs: (0..n).map(|_| unsafe { std::mem::zeroed() }).collect(),
            // SAFETY: as above.
            names: (0..n).map(|_| unsafe { std::mem::zeroed() }).collect(),
            len: 0,
        };
        let base = b.mem.as_mut_ptr();
        for i in 0..n {
            // The boxed slices never move or resize, so these pointers stay valid for the
            // life of the batch. `wrapping_add` keeps the arithmetic safe; the offsets are in
            // bounds by construction (i < n, offset < slot).
            b.iovs[i] = libc::iovec { iov_base: base.wrapping_add(i * slot + offset).cast(), iov_len: slot - offset };
            b.hdrs[i].msg_hdr.msg_iov = &raw mut b.iovs[i];
            b.hdrs[i].msg_hdr.msg_iovlen = 1;
            b.hdrs[i].msg_hdr.msg_name = (&raw mut b.names[i]).cast();
        }
        b
    }

    /// Receives up to a full batch without blocking; `WouldBlock` when nothing is queued.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        for h in self.hdrs.iter_mut() {
            h.msg_hdr.msg_namelen = sys::socklen::<libc::sockaddr_storage>();
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        // SAFETY: every header points at its own iovec (slot memory of `slot - offset`
        // bytes) and its own sockaddr_storage, all owned by `self` and borrowed mutably here,
        // so nothing else touches them during the call.
        let n = unsafe { sys::recvmmsg(fd, &mut self.hdrs) };
        self.len = n.as_ref().copied().unwrap_or(0);
        n
    }

    /// Datagram `i` of the last receive: its bytes, and whether the kernel cut it to fit.
    pub fn datagram(&self, i: usize) -> (&[u8], bool) {
        let Some(h) = self.hdrs.get(i) else { return (&[], false) };
        let len = (h.msg_len as usize).min(self.slot - self.offset);
        let start = i * self.slot + self.offset;
        (self.mem.get(start..start + len).unwrap_or_default(), h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0)
    }

    /// The source address of datagram `i` and its length.
    pub fn source(&self, i: usize) -> Option<(&libc::sockaddr_storage, libc::socklen_t)> {
        Some((self.names.get(i)?, self.hdrs.get(i)?.msg_hdr.msg_namelen))
    }

    /// The whole of slot `i` (headroom included) and where datagram `i` lies in it.
    pub fn slot_mut(&mut self, i: usize) -> (&mut [u8], std::ops::Range<usize>) {
        let len = self.hdrs.get(i).map_or(0, |h| h.msg_len as usize).min(self.slot - self.offset);
        let range = self.offset..self.offset + len;
        let start = i * self.slot;
        (self.mem.get_mut(start..start + self.slot).unwrap_or_default(), range)
    }
}

/// A control message carrying a UDP GSO segment size.
#[repr(C)]
#[derive(Clone, Copy)]
struct GsoCmsg {
    hdr: libc::cmsghdr,
    segment: u16,
    _pad: [u8; 6],
}

/// Most segments the kernel takes in one GSO send (UDP_MAX_SEGMENTS).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most payload bytes in one GSO send (a UDP datagram's limit, less headers).
const GSO_MAX_BYTES: usize = 65_000;

/// Outcome of a flush.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    /// Messages the kernel took.
    pub sent: usize,
    /// Datagrams in those messages (more than `sent` with GSO).
    pub datagrams: usize,
    /// Datagrams lost because the kernel refused their message (counted, never retried).
    pub errors: usize,
    /// The last refusal, for the log.
    pub last_error: Option<i32>,
    /// Whether the socket would block with messages still queued.
    pub blocked: bool,
}

/// Messages to send, each one or more iovecs pointing into receive slots.
pub struct TxBatch {
    hdrs: Box<[sys::mmsghdr]>,
    iovs: Box<[libc::iovec]>,
    names: Box<[libc::sockaddr_storage]>,
    cmsgs: Box<[GsoCmsg]>,
    // Per message: first iovec, segment size, segment count, whether a short segment closed it.
    segs: Box<[(usize, usize, usize, bool)]>,
    msgs: usize,
    iovs_used: usize,
    sent: usize,
    gso: bool,
}

/// Where a queued datagram goes.
#[derive(Clone, Copy)]
enum Dest<'a> {
    /// The peer the socket is connected to.
    Peer,
    /// A socket address, as the kernel gave it (a VM handle's unix peer).
    Name(&'a libc::sockaddr_storage, libc::socklen_t),
    /// An IPv4 endpoint (a consumer).
    Inet(std::net::SocketAddrV4),
}

impl TxBatch {
    /// Room for `n` datagrams. With `gso`, runs of equal-size datagrams to the same address
    /// share one message with a `UDP_SEGMENT` control message.
    pub fn new(n: usize, gso: bool) -> Self {
        Self {
            // SAFETY: plain C structs; all zeros is a valid (empty) value.
            hdrs: (0..n).map(|_| unsafe { std::mem::zeroed() }).collect(),
            // SAFETY: as above.
            iovs: (0..n).map(|_| unsafe { std::mem::zeroed() }).collect(),
            // SAFETY: as above.
            names: (0..n).map(|_| unsafe { std::mem::zeroed() }).collect(),
            // SAFETY: as above.
            cmsgs: (0..n).map(|_| unsafe { std::mem::zeroed() }).collect(),
            segs: vec![(0, 0, 0, false); n].into_boxed_slice(),
            msgs: 0,
            iovs_used: 0,
            sent: 0,
            gso,
        }
    }

    /// Whether GSO is in use.
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Turns GSO off (after the kernel refused a segmented send).
    pub fn disable_gso(&mut self) {
        self.gso = false;
    }

    /// True when no message is waiting.
    pub fn is_empty(&self) -> bool {
        self.sent == self.msgs
    }

    /// Datagrams and bytes waiting (a GSO message holds several datagrams).
    pub fn waiting_datagrams(&self) -> (usize, usize) {
        let segs = self.segs.get(self.sent..self.msgs).unwrap_or_default();
        segs.iter().fold((0, 0), |(n, bytes), &(first, _, count, _)| {
            let iovs = self.iovs.get(first..first + count).unwrap_or_default();
            (n + count, bytes + iovs.iter().map(|v| v.iov_len).sum::<usize>())
        })
    }

    /// True when another datagram would not fit.
    pub fn is_full(&self) -> bool {
        self.iovs_used == self.iovs.len()
    }

    /// Queues `data` to `name` (or to the connected peer with `None`). Returns false when the
    /// batch is full.
    ///
    /// # Safety
    /// The batch keeps a pointer to `data`, not a copy, and the kernel reads through it in
    /// [`TxBatch::flush`]: the memory behind `data` must stay allocated and unmodified until
    /// the batch has been flushed (every message sent) or [`TxBatch::clear`]ed. The loops
    /// uphold this by reading a direction again only once the batch fed from it is empty
    /// (module doc).
    pub unsafe fn push(&mut self, data: &[u8], name: Option<(&libc::sockaddr_storage, libc::socklen_t)>) -> bool {
        let dest = name.map_or(Dest::Peer, |(n, len)| Dest::Name(n, len));
        // SAFETY: the caller upholds the contract, which is the same.
        unsafe { self.push_on(data, dest) }
    }

    /// Queues `data` to the IPv4 endpoint `to` (the message names it: the socket is never
    /// connected). Returns false when the batch is full.
    ///
    /// # Safety
    /// As for [`TxBatch::push`].
    #[inline]
    pub unsafe fn push_to(&mut self, data: &[u8], to: std::net::SocketAddrV4) -> bool {
        // SAFETY: the caller upholds the contract, which is the same.
        unsafe { self.push_on(data, Dest::Inet(to)) }
    }

    /// # Safety
    /// As for [`TxBatch::push`].
    unsafe fn push_on(&mut self, data: &[u8], dest: Dest<'_>) -> bool {
        if self.is_full() || self.msgs == self.hdrs.len() && !self.gso {
            return false;
        }
        let iov = libc::iovec { iov_base: data.as_ptr().cast_mut().cast(), iov_len: data.len() };
        if self.gso && self.msgs > self.sent && !data.is_empty() {
            let last = self.msgs - 1;
            if let (Some(seg), Some(prev_name), Some(h)) =
                (self.segs.get_mut(last), self.names.get(last), self.hdrs.get(last))
            {
                let (_, size, count, closed) = *seg;
                let same_dest = match dest {
                    Dest::Peer => h.msg_hdr.msg_namelen == 0,
                    Dest::Name(n, len) => h.msg_hdr.msg_namelen == len && same_addr(prev_name, n),
                    Dest::Inet(to) => {
                        h.msg_hdr.msg_namelen == sys::socklen::<libc::sockaddr_in>() && is_in(prev_name, to)
                    }
                };
                if same_dest
                    && !closed
                    && data.len() <= size
                    && count < GSO_MAX_SEGMENTS
                    && size * (count + 1) <= GSO_MAX_BYTES
                {
                    if let Some(slot) = self.iovs.get_mut(self.iovs_used) {
                        *slot = iov;
                        self.iovs_used += 1;
                        *seg = (seg.0, size, count + 1, data.len() < size);
                        return true;
                    }
                }
            }
        }
        if self.msgs == self.hdrs.len() {
            return false;
        }
        let (i, v) = (self.msgs, self.iovs_used);
        if let (Some(slot), Some(seg), Some(h), Some(n)) =
            (self.iovs.get_mut(v), self.segs.get_mut(i), self.hdrs.get_mut(i), self.names.get_mut(i))
        {
            *slot = iov;
            *seg = (v, data.len(), 1, false);
            h.msg_hdr.msg_namelen = match dest {
                Dest::Peer => 0,
                Dest::Name(addr, len) => {
                    *n = *addr;
                    len
                }
                Dest::Inet(to) => set_in(n, to),
            };
            self.msgs += 1;
            self.iovs_used += 1;
            return true;
        }
        false
    }

    /// Sends what is queued, without blocking. Messages the kernel refuses are skipped and
    /// counted; `blocked` reports a full socket with messages left for the next flush.
    pub fn flush(&mut self, fd: RawFd) -> Flushed {
        let mut out = Flushed::default();
        // Wire up the headers of the unsent messages (pointers into our own boxed slices).
        for i in self.sent..self.msgs {
            let (first, size, count, _) = self.segs.get(i).copied().unwrap_or_default();
            let iov_ptr = self.iovs.as_mut_ptr().wrapping_add(first);
            let name_ptr: *mut libc::sockaddr_storage = self.names.as_mut_ptr().wrapping_add(i);
            let cmsg_ptr: *mut GsoCmsg = self.cmsgs.as_mut_ptr().wrapping_add(i);
            let Some(h) = self.hdrs.get_mut(i) else { continue };
            h.msg_hdr.msg_iov = iov_ptr;
            h.msg_hdr.msg_iovlen = count;
            h.msg_hdr.msg_name = if h.msg_hdr.msg_namelen == 0 { std::ptr::null_mut() } else { name_ptr.cast() };
            h.msg_len = 0;
            if count > 1 {
                if let Some(c) = self.cmsgs.get_mut(i) {
                    c.hdr.cmsg_len = size_of::<libc::cmsghdr>() + 2;
                    c.hdr.cmsg_level = libc::SOL_UDP;
                    c.hdr.cmsg_type = sys::UDP_SEGMENT;
                    c.segment = u16::try_from(size).unwrap_or(u16::MAX);
                }
                h.msg_hdr.msg_control = cmsg_ptr.cast();
                h.msg_hdr.msg_controllen = size_of::<GsoCmsg>();
            } else {
                h.msg_hdr.msg_control = std::ptr::null_mut();
                h.msg_hdr.msg_controllen = 0;
            }
        }
        while self.sent < self.msgs {
            let Some(pending) = self.hdrs.get_mut(self.sent..self.msgs) else { break };
            // SAFETY: the headers point into `self.iovs`, `self.names` and `self.cmsgs` (set
            // just above), and the iovecs point into receive slots that the loop does not
            // reuse while this batch refers to them (module doc). All are valid for reads.
            match unsafe { sys::sendmmsg(fd, pending) } {
                Ok(n) => {
                    for i in self.sent..self.sent + n {
                        out.datagrams += self.segs.get(i).map_or(1, |s| s.2);
                    }
                    self.sent += n;
                    out.sent += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    out.blocked = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // The first unsent message was refused (unreachable network, a refused
                    // port reported by ICMP, a segmented send the device cannot take...).
                    out.errors += self.segs.get(self.sent).map_or(1, |s| s.2);
                    out.last_error = e.raw_os_error();
                    self.sent += 1;
                }
            }
        }
        if self.sent == self.msgs {
            self.clear();
        }
        out
    }

    /// Forgets every queued message (the slots they refer to may then be reused).
    pub fn clear(&mut self) {
        self.msgs = 0;
        self.iovs_used = 0;
        self.sent = 0;
    }
}

fn same_addr(a: &libc::sockaddr_storage, b: &libc::sockaddr_storage) -> bool {
    if a.ss_family != b.ss_family {
        return false;
    }
    if i32::from(a.ss_family) == libc::AF_INET {
        let (x, y) = (as_in(a), as_in(b));
        x.sin_port == y.sin_port && x.sin_addr.s_addr == y.sin_addr.s_addr
    } else {
        // Unix peers of one VM handle: one address per batch, compared by family only.
        true
    }
}

/// Whether `s` holds the AF_INET address `to`.
#[inline]
fn is_in(s: &libc::sockaddr_storage, to: std::net::SocketAddrV4) -> bool {
    let sin = as_in(s);
    i32::from(s.ss_family) == libc::AF_INET
        && sin.sin_port == to.port().to_be()
        && sin.sin_addr.s_addr == u32::from(*to.ip()).to_be()
}

/// Writes the AF_INET address `to` into `s`; returns its length.
#[inline]
fn set_in(s: &mut libc::sockaddr_storage, to: std::net::SocketAddrV4) -> libc::socklen_t {
    // SAFETY: all zeros is a valid sockaddr_in (and fills the fields some OSes add).
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = sys::AF_INET;
    sin.sin_port = to.port().to_be();
    sin.sin_addr.s_addr = u32::from(*to.ip()).to_be();
    // SAFETY: the storage is larger than and aligned for sockaddr_in, and we hold it mutably:
    // writing one there is sound. The bytes past it are never read (the length says 16).
    unsafe { std::ptr::write((s as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>(), sin) };
    sys::socklen::<libc::sockaddr_in>()
}

/// Views a storage holding an AF_INET address.
pub fn as_in(s: &libc::sockaddr_storage) -> libc::sockaddr_in {
    // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in, and every bit
    // pattern is a valid sockaddr_in (plain integers), so reading one out is sound.
    unsafe { std::ptr::read((s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>()) }
}

/// A storage holding the unix socket address `path`, with its length.
pub fn from_unix(path: &std::path::Path) -> Result<(libc::sockaddr_storage, libc::socklen_t), String> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: all zeros is a valid sockaddr_un.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= sun.sun_path.len() {
        return Err(format!("{} is not a usable unix socket path", path.display()));
    }
    sun.sun_family = sys::AF_UNIX;
    for (d, s) in sun.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: all zeros is a valid sockaddr_storage.
    let mut s: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    // SAFETY: the storage is larger than and aligned for sockaddr_un; we write one there.
    unsafe { std::ptr::write((&raw mut s).cast::<libc::sockaddr_un>(), sun) };
    let len = size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((s, libc::socklen_t::try_from(len).map_err(|_| "path too long".to_string())?))
}

/// Fixed slots for frames the engine builds itself (ARP replies, ICMP echo replies), which
/// must stay in place until the VM handle has taken them.
pub(crate) struct OwnPool {
    mem: Box<[u8]>,
    slot: usize,
    used: usize,
}

impl OwnPool {
    pub(crate) fn new(n: usize, slot: usize) -> Self {
        Self { mem: vec![0u8; n * slot].into_boxed_slice(), slot, used: 0 }
    }

    /// The next free slot, if any.
    pub(crate) fn take(&mut self) -> Option<&mut [u8]> {
        let start = self.used * self.slot;
        let s = self.mem.get_mut(start..start + self.slot)?;
        self.used += 1;
        Some(s)
    }

    /// Gives back the slot taken last (its frame was dropped).
    pub(crate) fn untake(&mut self) {
        self.used = self.used.saturating_sub(1);
    }

    pub(crate) fn reset(&mut self) {
        self.used = 0;
    }
}
