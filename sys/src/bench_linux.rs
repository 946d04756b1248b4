//! The calls of tools and benchmarks, never of the data plane (Linux): safe batch send and
//! receive (the traffic generator, the sink), raw AF_PACKET frames (the guest helper), UDP
//! GRO, and process and thread CPU and memory figures. The engine's own batches are
//! `engine::io::batch`. Each `unsafe` block is a system call without a std wrapper.
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::socklen;

/// Most datagrams per call.
pub const MAX: usize = 64;

/// Sends up to [`MAX`] datagrams in one `sendmmsg` to the socket's connected peer, blocking
/// until the kernel takes at least one. Returns how many it took.
pub fn send_many(fd: BorrowedFd<'_>, datagrams: &[&[u8]]) -> io::Result<usize> {
    let n = datagrams.len().min(MAX);
    // SAFETY: plain C structs; all zeros is a valid (empty) value.
    let mut iovs: [libc::iovec; MAX] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut hdrs: [libc::mmsghdr; MAX] = unsafe { std::mem::zeroed() };
    for i in 0..n {
        iovs[i] = libc::iovec { iov_base: datagrams[i].as_ptr().cast_mut().cast(), iov_len: datagrams[i].len() };
        hdrs[i].msg_hdr.msg_iov = &raw mut iovs[i];
        hdrs[i].msg_hdr.msg_iovlen = 1;
    }
    let len = u32::try_from(n).unwrap_or(0);
    // SAFETY: the headers point at `iovs`, which point at the caller's slices; all outlive
    // the call and are only read.
    let r = unsafe { libc::sendmmsg(fd.as_raw_fd(), hdrs.as_mut_ptr(), len, libc::MSG_NOSIGNAL) };
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// Sends up to [`MAX`] datagrams, each the concatenation of its two parts (a header and a
/// payload elsewhere), in one `sendmmsg` to the connected peer. Returns how many were taken.
pub fn send_many_parts(fd: BorrowedFd<'_>, datagrams: &[[&[u8]; 2]]) -> io::Result<usize> {
    let n = datagrams.len().min(MAX);
    // SAFETY: plain C structs; all zeros is a valid (empty) value.
    let mut iovs: [[libc::iovec; 2]; MAX] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut hdrs: [libc::mmsghdr; MAX] = unsafe { std::mem::zeroed() };
    for i in 0..n {
        for (v, part) in iovs[i].iter_mut().zip(datagrams[i]) {
            *v = libc::iovec { iov_base: part.as_ptr().cast_mut().cast(), iov_len: part.len() };
        }
        hdrs[i].msg_hdr.msg_iov = iovs[i].as_mut_ptr();
        hdrs[i].msg_hdr.msg_iovlen = 2;
    }
    let len = u32::try_from(n).unwrap_or(0);
    // SAFETY: the headers point at `iovs`, which point at the caller's slices; all outlive
    // the call and are only read.
    let r = unsafe { libc::sendmmsg(fd.as_raw_fd(), hdrs.as_mut_ptr(), len, libc::MSG_NOSIGNAL) };
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// `UDP_SEGMENT` from linux/udp.h.
const UDP_SEGMENT: libc::c_int = 103;

/// Sends `buf` to the connected peer as datagrams of `seg_size` bytes (the last may be
/// shorter) in one `sendmsg` with UDP GSO: the kernel cuts it. Returns the bytes taken.
pub fn send_gso(fd: BorrowedFd<'_>, buf: &[u8], seg_size: u16) -> io::Result<usize> {
    /// One control message carrying a u16, laid out as CMSG_SPACE(2) bytes.
    #[repr(C)]
    struct Gso {
        hdr: libc::cmsghdr,
        seg: u16,
        pad: [u8; 6],
    }
    let mut iov = libc::iovec { iov_base: buf.as_ptr().cast_mut().cast(), iov_len: buf.len() };
    let mut cmsg = Gso {
        // CMSG_LEN(2): the header and the u16.
        hdr: libc::cmsghdr {
            cmsg_len: size_of::<libc::cmsghdr>() + 2,
            cmsg_level: libc::SOL_UDP,
            cmsg_type: UDP_SEGMENT,
        },
        seg: seg_size,
        pad: [0; 6],
    };
    // SAFETY: plain C struct; all zeros is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = (&raw mut cmsg).cast();
    msg.msg_controllen = size_of::<Gso>();
    // SAFETY: `msg` points at `iov` (the caller's buffer, only read) and `cmsg`, both alive.
    let r = unsafe { libc::sendmsg(fd.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) };
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// Receives up to `bufs.len()` (at most [`MAX`]) datagrams in one `recvmmsg`, waiting for the
/// first; writes their lengths to `lens`. Returns how many arrived.
pub fn recv_many(fd: BorrowedFd<'_>, bufs: &mut [Vec<u8>], lens: &mut [usize]) -> io::Result<usize> {
    // Without UDP GRO on the socket no control message arrives: each buffer is one datagram.
    let (mut segs, mut size) = ([0usize; MAX], [0usize; MAX]);
    recv_many_gro(fd, bufs, lens, &mut segs, &mut size)
}

/// Like [`recv_many`], each datagram written at `bufs[i][at..]` (room kept in front for a
/// header written in place). Returns how many arrived; `lens` are the datagrams' lengths.
pub fn recv_many_at(fd: BorrowedFd<'_>, bufs: &mut [Vec<u8>], at: usize, lens: &mut [usize]) -> io::Result<usize> {
    let (mut segs, mut size) = ([0usize; MAX], [0usize; MAX]);
    recv_into(fd, bufs, at, lens, &mut segs, &mut size)
}

/// Waits up to `timeout_ms` for either descriptor to be readable; which are.
pub fn wait_readable(a: BorrowedFd<'_>, b: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<[bool; 2]> {
    let mut fds = [
        libc::pollfd { fd: a.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: b.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    // SAFETY: `fds` is an array of two pollfd, valid for reads and writes for the call.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok([fds[0].revents != 0, fds[1].revents != 0])
}

/// Resident memory of this process, in bytes (Linux: /proc/self/statm).
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf takes no pointers.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// CPU time used by the calling thread, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    // SAFETY: all zeros is a valid timespec.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is valid for writes.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    if r != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Sends one raw Ethernet frame out of interface `ifname` through an AF_PACKET socket, below
/// any firewall of the sender's own (what a guest with root can always do). For the guest
/// helper's defense-in-depth test.
pub fn send_raw_frame(ifname: &str, frame: &[u8]) -> io::Result<usize> {
    match send_raw_frames(ifname, &[frame])? {
        1 => Ok(frame.len()),
        _ => Err(io::ErrorKind::WouldBlock.into()),
    }
}

/// Sends raw Ethernet frames out of interface `ifname` back to back: an AF_PACKET socket bound
/// to the interface and `sendmmsg` batches of [`MAX`], so they reach the NIC's queue together.
/// Returns how many were sent. For the guest helper's tests of what follows a violation.
pub fn send_raw_frames(ifname: &str, frames: &[&[u8]]) -> io::Result<usize> {
    let name = std::ffi::CString::new(ifname).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    let proto = u16::try_from(libc::ETH_P_ALL).unwrap_or(3).to_be();
    // SAFETY: socket takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: all zeros is a valid sockaddr_ll.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or(17);
    addr.sll_protocol = proto;
    addr.sll_ifindex = i32::try_from(index).unwrap_or(0);
    // SAFETY: `addr` is a sockaddr_ll of the size passed and outlives the call.
    let r = unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), socklen::<libc::sockaddr_ll>()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut sent = 0;
    while sent < frames.len() {
        sent += send_many(std::os::fd::AsFd::as_fd(&fd), &frames[sent..])?;
    }
    Ok(sent)
}

/// `UDP_GRO` from linux/udp.h.
const UDP_GRO: libc::c_int = 104;

/// Turns on UDP GRO for a receiving socket: runs of datagrams of one flow may then arrive as
/// one buffer with a segment size (see [`recv_many_gro`]).
pub fn enable_udp_gro(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: passes a pointer to a c_int and its size.
    let r = unsafe {
        libc::setsockopt(fd.as_raw_fd(), libc::SOL_UDP, UDP_GRO, (&raw const one).cast(), socklen::<libc::c_int>())
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Like [`recv_many`] on a socket with UDP GRO on: also writes, for each buffer, how many
/// datagrams it holds (`segs`) and their size (`seg_size`; 0 when it holds one).
pub fn recv_many_gro(
    fd: BorrowedFd<'_>,
    bufs: &mut [Vec<u8>],
    lens: &mut [usize],
    segs: &mut [usize],
    seg_size: &mut [usize],
) -> io::Result<usize> {
    recv_into(fd, bufs, 0, lens, segs, seg_size)
}

/// The one `recvmmsg` behind the receive functions: datagrams at `bufs[i][at..]`, with the
/// UDP GRO control message read where there is one.
fn recv_into(
    fd: BorrowedFd<'_>,
    bufs: &mut [Vec<u8>],
    at: usize,
    lens: &mut [usize],
    segs: &mut [usize],
    seg_size: &mut [usize],
) -> io::Result<usize> {
    let n = bufs.len().min(lens.len()).min(segs.len()).min(seg_size.len()).min(MAX);
    // SAFETY: plain C structs; all zeros is a valid (empty) value.
    let mut iovs: [libc::iovec; MAX] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut hdrs: [libc::mmsghdr; MAX] = unsafe { std::mem::zeroed() };
    // Room for one control message with an int, aligned for cmsghdr.
    let mut cmsg = [[0u64; 4]; MAX];
    for i in 0..n {
        let tail = bufs[i].get_mut(at..).unwrap_or_default();
        iovs[i] = libc::iovec { iov_base: tail.as_mut_ptr().cast(), iov_len: tail.len() };
        hdrs[i].msg_hdr.msg_iov = &raw mut iovs[i];
        hdrs[i].msg_hdr.msg_iovlen = 1;
        hdrs[i].msg_hdr.msg_control = cmsg[i].as_mut_ptr().cast();
        hdrs[i].msg_hdr.msg_controllen = size_of::<[u64; 4]>();
    }
    let len = u32::try_from(n).unwrap_or(0);
    // SAFETY: the headers point at `iovs` (the tails of the caller's buffers, valid for writes
    // of their lengths) and at `cmsg` (32 bytes each), all borrowed mutably for the call.
    let r =
        unsafe { libc::recvmmsg(fd.as_raw_fd(), hdrs.as_mut_ptr(), len, libc::MSG_WAITFORONE, std::ptr::null_mut()) };
    let got = usize::try_from(r).map_err(|_| io::Error::last_os_error())?;
    for i in 0..got {
        lens[i] = hdrs[i].msg_len as usize;
        let mut size = 0usize;
        // The kernel wrote at most `msg_controllen` bytes of control messages into cmsg[i]:
        // read the first header and, if it is UDP_GRO, its int.
        let c = &cmsg[i];
        let ctl_len = hdrs[i].msg_hdr.msg_controllen;
        if ctl_len >= size_of::<libc::cmsghdr>() + size_of::<libc::c_int>() {
            let bytes: Vec<u8> = c.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let word = |at: usize| i32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
            // cmsghdr on 64-bit Linux: cmsg_len (8 bytes), cmsg_level (4), cmsg_type (4), data.
            if word(8) == libc::SOL_UDP && word(12) == UDP_GRO {
                size = usize::try_from(word(16)).unwrap_or(0);
            }
        }
        seg_size[i] = size;
        segs[i] = if size > 0 { lens[i].div_ceil(size) } else { 1 };
    }
    Ok(got)
}
