//! macOS: plain equivalents of the Linux calls (see `sys/src/lib.rs` for the contract). Not built
//! or tested on our machines (no macOS toolchain here): batches are loops of `recvmsg` and
//! `sendmsg`, the doorbell is a pipe, UDP GSO and CPU pinning do not exist, peer credentials
//! come from `getpeereid` and `LOCAL_PEERPID`.
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::{cvt, set_cloexec, set_nonblocking, socklen};

/// A message header of the batch calls, laid out as Linux's (macOS has no `mmsghdr`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
#[allow(non_camel_case_types)]
pub struct mmsghdr {
    /// The message.
    pub msg_hdr: libc::msghdr,
    /// Bytes received or sent.
    pub msg_len: libc::c_uint,
}

/// A connected pair of unix sockets of `sock_type`, both close-on-exec.
pub fn socketpair(sock_type: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors the call writes.
    cvt(unsafe { libc::socketpair(libc::AF_UNIX, sock_type, 0, fds.as_mut_ptr()) })?;
    // SAFETY: both descriptors were just created by socketpair and are owned by nobody else.
    let a = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let b = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    set_cloexec(a.as_fd())?;
    set_cloexec(b.as_fd())?;
    Ok((a, b))
}

/// macOS cannot pin a thread to a CPU.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, format!("macOS cannot pin a thread to CPU {cpu}")))
}

/// CPUs this process may run on: all of them.
pub fn allowed_cpus() -> Vec<usize> {
    (0..std::thread::available_parallelism().map_or(1, std::num::NonZero::get)).collect()
}

/// The doorbell: a non-blocking pipe (macOS has no eventfd); readable while rung.
#[derive(Debug)]
pub struct EventFd {
    read: OwnedFd,
    write: OwnedFd,
}

impl EventFd {
    /// A new doorbell.
    pub fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors the call writes.
        cvt(unsafe { libc::pipe(fds.as_mut_ptr()) })?;
        // SAFETY: both descriptors were just created by pipe and are owned by nobody else.
        let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        // SAFETY: as above.
        let write = unsafe { OwnedFd::from_raw_fd(fds[1]) };
        for fd in [read.as_fd(), write.as_fd()] {
            set_nonblocking(fd)?;
            set_cloexec(fd)?;
        }
        Ok(Self { read, write })
    }

    /// Rings the bell.
    pub fn notify(&self) {
        let one = 1u8;
        // SAFETY: writes one byte from `one`; a full pipe (EAGAIN) means a ring is pending.
        let _ = unsafe { libc::write(self.write.as_raw_fd(), (&raw const one).cast(), 1) };
    }

    /// Clears pending rings.
    pub fn drain(&self) {
        let mut buf = [0u8; 64];
        // SAFETY: reads at most `buf.len()` bytes into `buf`; stops at EAGAIN.
        while unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }
}

/// Asks for socket buffers of `bytes` each way, as large as the system allows. Best effort.
pub fn grow_buffers(fd: BorrowedFd<'_>, bytes: usize) {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: passes a pointer to a c_int and its size.
        let _ = unsafe {
            libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, opt, (&raw const v).cast(), socklen::<libc::c_int>())
        };
    }
}

/// No UDP GSO on macOS; the value is never sent (see [`udp_gso_supported`]).
pub const UDP_SEGMENT: libc::c_int = 103;

/// macOS has no UDP GSO.
pub fn udp_gso_supported(_fd: BorrowedFd<'_>) -> bool {
    false
}

/// `recvmsg` in a loop, without blocking: fills up to `hdrs.len()` messages.
///
/// # Safety
/// As Linux's: every header's buffers must be valid for writes of the lengths they state and
/// not be touched through any other path during the call.
pub unsafe fn recvmmsg(fd: RawFd, hdrs: &mut [mmsghdr]) -> io::Result<usize> {
    let mut n = 0;
    for h in hdrs.iter_mut() {
        // SAFETY: the caller guarantees the buffers `h.msg_hdr` points to.
        let r = unsafe { libc::recvmsg(fd, &raw mut h.msg_hdr, libc::MSG_DONTWAIT) };
        match usize::try_from(r) {
            Ok(len) => {
                h.msg_len = libc::c_uint::try_from(len).unwrap_or(libc::c_uint::MAX);
                n += 1;
            }
            Err(_) if n > 0 => break,
            Err(_) => return Err(io::Error::last_os_error()),
        }
    }
    Ok(n)
}

/// `sendmsg` in a loop, without blocking. Returns how many messages the kernel took.
///
/// # Safety
/// As Linux's: every header's buffers must be valid for reads of the lengths they state.
pub unsafe fn sendmmsg(fd: RawFd, hdrs: &mut [mmsghdr]) -> io::Result<usize> {
    let mut n = 0;
    for h in hdrs.iter_mut() {
        // SAFETY: the caller guarantees the buffers `h.msg_hdr` points to.
        let r = unsafe { libc::sendmsg(fd, &raw const h.msg_hdr, libc::MSG_DONTWAIT) };
        match usize::try_from(r) {
            Ok(len) => {
                h.msg_len = libc::c_uint::try_from(len).unwrap_or(libc::c_uint::MAX);
                n += 1;
            }
            Err(_) if n > 0 => break,
            Err(_) => return Err(io::Error::last_os_error()),
        }
    }
    Ok(n)
}

/// The peer's credentials on a connected unix socket: (pid, uid, gid); pid 0 if unknown.
pub fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<(i32, u32, u32)> {
    let (mut uid, mut gid) = (0, 0);
    // SAFETY: `uid` and `gid` are valid for writes.
    cvt(unsafe { libc::getpeereid(fd.as_raw_fd(), &raw mut uid, &raw mut gid) })?;
    let mut pid: libc::pid_t = 0;
    let mut len = socklen::<libc::pid_t>();
    // SAFETY: `pid` and `len` are valid for writes of the sizes given; failure leaves pid 0.
    let _ = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_LOCAL, libc::LOCAL_PEERPID, (&raw mut pid).cast(), &raw mut len)
    };
    Ok((pid, uid, gid))
}

/// macOS has no `ICMP_FILTER`: the engine's own checks drop what is not an echo reply.
pub fn icmp_filter_echo_replies(_fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(())
}

/// macOS has neither `PR_SET_NO_NEW_PRIVS` nor capability bounding sets: nothing to do.
pub fn harden() -> io::Result<usize> {
    Ok(0)
}

/// Which loop a worker thread runs (see `linux.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerKind {
    /// kqueue with recvmsg/sendmsg loops.
    Portable,
    /// Never on macOS.
    Uring,
}

/// macOS has no seccomp and no per-thread capabilities: the worker runs unconfined (the
/// sandbox profile of the app that embeds the engine is the place for that).
pub fn confine_worker(_kind: WorkerKind, _keep: u32) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "no seccomp on this OS"))
}

/// No seccomp on macOS (see [`confine_worker`]): nothing is guarded.
pub fn guard_from_workers(_fd: std::os::fd::BorrowedFd<'_>) {}

/// No seccomp on macOS (see [`confine_worker`]).
pub fn confine_control_socket() -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "no seccomp on this OS"))
}

/// macOS does not say how many threads a process has (cheaply): not checked.
pub fn thread_count() -> io::Result<Option<usize>> {
    Ok(None)
}

/// macOS has no `O_PATH`.
pub fn path_flag() -> libc::c_int {
    0
}

/// Threads share one descriptor table on macOS: nothing to do (the worker's separation is the
/// Linux one).
pub fn private_descriptors(_keep: &[RawFd]) -> io::Result<()> {
    Ok(())
}

/// Nothing to close: the table was never copied ([`private_descriptors`]).
pub fn close_number(_fd: RawFd) {}

/// Closes every descriptor of this process above 2 but `keep` (one by one: no close_range).
pub fn close_fds_except(keep: RawFd) -> io::Result<()> {
    // SAFETY: getdtablesize takes no arguments.
    let max = unsafe { libc::getdtablesize() };
    for fd in 3..max {
        if fd != keep {
            // SAFETY: closing a descriptor number the caller no longer owns; EBADF is fine.
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

/// macOS has no `MSG_CMSG_CLOEXEC`: received descriptors get close-on-exec right after.
pub fn cloexec_flag() -> libc::c_int {
    0
}

/// No capability sets on macOS.
pub fn keep_capabilities(_keep: u32) -> io::Result<()> {
    Ok(())
}

/// Runs the process as `uid` and `gid` (no supplementary group), checked afterwards.
pub fn drop_privileges(uid: u32, gid: u32) -> io::Result<()> {
    if uid == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "refusing to drop privileges to uid 0"));
    }
    // SAFETY: an empty group list, then integers only.
    cvt(unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: integers only.
    cvt(unsafe { libc::setgid(gid) })?;
    // SAFETY: integers only.
    cvt(unsafe { libc::setuid(uid) })?;
    // SAFETY: setuid(0) with an integer; it must fail now.
    if unsafe { libc::setuid(0) } == 0 {
        return Err(io::Error::other("uid 0 could be taken back after the drop"));
    }
    Ok(())
}

/// No seccomp on macOS (see [`confine_worker`]).
pub fn confine_control_thread(_keep: u32) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "no seccomp on this OS"))
}

/// Frees a file's blocks in a range (Linux's `fallocate(PUNCH_HOLE)`); macOS's `F_PUNCHHOLE`
/// is not wired: unsupported.
pub fn punch_hole(_fd: BorrowedFd<'_>, _offset: u64, _len: u64) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}
