//! Safe batch send and receive for tools and benchmarks (the traffic generator, the sink).
//! The data plane itself uses the preallocated batches of `batch.rs`.
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::sys;

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

/// Receives up to `bufs.len()` (at most [`MAX`]) datagrams in one `recvmmsg`, waiting for the
/// first; writes their lengths to `lens`. Returns how many arrived.
pub fn recv_many(fd: BorrowedFd<'_>, bufs: &mut [Vec<u8>], lens: &mut [usize]) -> io::Result<usize> {
    let n = bufs.len().min(lens.len()).min(MAX);
    // SAFETY: plain C structs; all zeros is a valid (empty) value.
    let mut iovs: [libc::iovec; MAX] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut hdrs: [libc::mmsghdr; MAX] = unsafe { std::mem::zeroed() };
    for i in 0..n {
        iovs[i] = libc::iovec { iov_base: bufs[i].as_mut_ptr().cast(), iov_len: bufs[i].len() };
        hdrs[i].msg_hdr.msg_iov = &raw mut iovs[i];
        hdrs[i].msg_hdr.msg_iovlen = 1;
    }
    let len = u32::try_from(n).unwrap_or(0);
    // SAFETY: the headers point at `iovs`, which point at the caller's buffers, valid for
    // writes of their lengths and borrowed mutably for the call.
    let r =
        unsafe { libc::recvmmsg(fd.as_raw_fd(), hdrs.as_mut_ptr(), len, libc::MSG_WAITFORONE, std::ptr::null_mut()) };
    let got = usize::try_from(r).map_err(|_| io::Error::last_os_error())?;
    for i in 0..got {
        lens[i] = hdrs[i].msg_len as usize;
    }
    Ok(got)
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

/// Keeps the batch constants in one place.
const _: () = assert!(MAX <= sys::MMSG_MAX);

/// Sends one raw Ethernet frame out of interface `ifname` through an AF_PACKET socket, below
/// any firewall of the sender's own (what a guest with root can always do). For the guest
/// helper's defense-in-depth test.
pub fn send_raw_frame(ifname: &str, frame: &[u8]) -> io::Result<usize> {
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
    addr.sll_halen = 6;
    if let Some(dst) = frame.get(..6) {
        addr.sll_addr[..6].copy_from_slice(dst);
    }
    // SAFETY: `frame` is valid for reads of its length and `addr` is a sockaddr_ll of the size
    // passed; both outlive the call.
    let r = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            sys::socklen::<libc::sockaddr_ll>(),
        )
    };
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}
