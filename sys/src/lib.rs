//! The platform boundary of the workspace: thin, documented wrappers over the system calls std
//! lacks, for the engine (the data plane's sockets, pinning, confinement), its control plane
//! (the launcher's fork, descriptors passed over sockets, the privilege drop), the mesh, the
//! hypervisor glue, the tools and the tests. Outside this crate only the data path's batch I/O
//! (`engine::io`: `recvmmsg`/`sendmmsg` into its buffers, GSO, io_uring) makes a system call
//! of its own. Shared code never names an OS; what differs lives in one file per OS, chosen
//! here:
//! - `linux.rs` — built and tested here;
//! - `macos.rs` — plain equivalents (recvmsg/sendmsg loops, a pipe doorbell, no GSO, no CPU
//!   pinning); it cannot be built on our machines and is untested.
//!
//! Every OS file provides: `mmsghdr`; `socketpair`; `pin_current_thread`,
//! `allowed_cpus`; `EventFd` (`new`, `notify`, `drain`, `AsRawFd`); `grow_buffers`;
//! `UDP_SEGMENT`, `udp_gso_supported`; `recvmmsg`, `sendmmsg` (unsafe, same contracts);
//! `peer_cred`; the privileges (`harden`, `keep_capabilities`, `drop_privileges`, the
//! seccomp filters of `confine_*`). The POSIX calls all of them share are below.
#![allow(unsafe_code)] // The platform boundary: system calls are what it is for.
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
compile_error!("Omerta supports Linux (and, untested, macOS) only");

#[cfg_attr(target_os = "linux", path = "linux.rs")]
#[cfg_attr(target_os = "macos", path = "macos.rs")]
mod os;

pub use os::*;

#[cfg(target_os = "linux")]
#[path = "bench_linux.rs"]
pub mod bench;

/// The size of a C struct as a `socklen_t` (all of them are far below 2^32 bytes).
#[allow(clippy::cast_possible_truncation)]
pub const fn socklen<T>() -> libc::socklen_t {
    size_of::<T>() as libc::socklen_t
}

/// Address families as the type `sockaddr` fields use (small constants that fit).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub const AF_INET: libc::sa_family_t = libc::AF_INET as libc::sa_family_t;
/// See [`AF_INET`].
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub const AF_UNIX: libc::sa_family_t = libc::AF_UNIX as libc::sa_family_t;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Puts `fd` in non-blocking mode.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL on a valid descriptor (borrowed for the call) reads its flags only.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: F_SETFL with the flags just read plus O_NONBLOCK changes only this descriptor.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// Sets close-on-exec on `fd` (inherited handles arrive without it).
pub fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_SETFD with FD_CLOEXEC on a valid descriptor changes only its fd flags.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) })?;
    Ok(())
}

/// Shuts the reading side of socket `fd`: on Linux a thread blocked in `accept` on a listening
/// socket wakes (with an error), which a server's end uses instead of connecting to itself.
pub fn shutdown_read(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: shutdown on a descriptor the borrow keeps open; no memory is passed.
    if unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RD) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Clears close-on-exec on `fd`, so a child process (a VMM) inherits it.
pub fn set_inheritable(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_SETFD with no flags on a valid descriptor changes only its fd flags.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) })?;
    Ok(())
}

/// Takes an exclusive `flock` on `fd` without waiting: `Ok(false)` when another process
/// holds it.
pub fn try_lock_exclusive(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: flock on a descriptor the caller lends; no pointers.
    let r = unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// The uid and gid of the user named `name`, from the system's user database. Reentrant
/// (`getpwnam_r`, into a buffer of its own): test threads and the engine may look up at once.
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    let c = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: plain C struct; all zeros is a valid (empty) value, filled by the call.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the name (NUL-terminated), the entry, the
    // buffer with its true length, and the result pointer; the entry's strings point into
    // `buf`, and only its integer fields are read, before `buf` goes.
    let r = unsafe { libc::getpwnam_r(c.as_ptr(), &raw mut pw, buf.as_mut_ptr(), buf.len(), &raw mut found) };
    (r == 0 && !found.is_null()).then_some((pw.pw_uid, pw.pw_gid))
}

/// Lets the program `cmd` starts inherit `fds` (at their numbers) without ever making them
/// inheritable in this process: their close-on-exec flag is cleared in the child, between fork
/// and exec, so a program another thread starts meanwhile never gets them (it would keep, say,
/// a VMM's end of a stream open after the VMM exits).
pub fn inherit_in_child(cmd: &mut std::process::Command, fds: Vec<RawFd>) {
    use std::os::unix::process::CommandExt;
    let clear = move || {
        for fd in &fds {
            // SAFETY: F_SETFD with no flags changes only the child's own descriptor flags.
            cvt(unsafe { libc::fcntl(*fd, libc::F_SETFD, 0) })?;
        }
        Ok(())
    };
    // SAFETY: the closure runs in the child between fork and exec and makes only fcntl, an
    // async-signal-safe call, on integers; it allocates nothing (the list was made before the
    // fork) and touches no lock.
    unsafe { cmd.pre_exec(clear) };
}

/// Asks a child process of ours to end (SIGTERM). Only for a child that has not been reaped
/// (`Child::try_wait` has not returned its status), so its pid cannot have been reused.
pub fn terminate_child(child: &std::process::Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) with the pid of the caller's own unreaped child and a signal number.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

/// The effective user and group ids of this process.
pub fn effective_ids() -> (u32, u32) {
    // SAFETY: geteuid and getegid take no arguments and cannot fail.
    let uid = unsafe { libc::geteuid() };
    // SAFETY: as above.
    let gid = unsafe { libc::getegid() };
    (uid, gid)
}

/// The current process's limit on open files (soft limit).
pub fn open_files_limit() -> Option<u64> {
    // SAFETY: rlimit is plain data; all zeros is a valid value to be overwritten.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `lim` is valid for writes.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) };
    (r == 0).then_some(lim.rlim_cur)
}

/// Raises the soft limit on open files to the hard limit (each VM holds a few descriptors, and
/// a control client one); returns the new soft limit.
pub fn raise_open_files_limit() -> io::Result<u64> {
    // SAFETY: rlimit is plain data; all zeros is a valid value to be overwritten.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `lim` is valid for writes.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) })?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit, read just above, with the soft limit raised to the hard.
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) })?;
    }
    Ok(lim.rlim_cur)
}

/// The IPv4 addresses of this host's interfaces (in the calling thread's network namespace).
pub fn local_ipv4_addrs() -> io::Result<Vec<std::net::Ipv4Addr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is valid for writes; on success it points to a list we free below.
    cvt(unsafe { libc::getifaddrs(&raw mut head) })?;
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: `ifa_addr` is non-null and points to a sockaddr of the list.
            let family = unsafe { (*ifa.ifa_addr).sa_family };
            if family == AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                out.push(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once, after the last use of the list.
    unsafe { libc::freeifaddrs(head) };
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Connects a datagram socket to the address `addr` (of `len` bytes): its default destination,
/// and for a unix socket the only sender the kernel lets in from then on.
pub fn connect(fd: RawFd, addr: &libc::sockaddr_storage, len: libc::socklen_t) -> io::Result<()> {
    // SAFETY: `addr` is a valid socket address of `len` bytes at most (a sockaddr_storage).
    cvt(unsafe { libc::connect(fd, (addr as *const libc::sockaddr_storage).cast::<libc::sockaddr>(), len) })?;
    Ok(())
}

/// Connects an IPv4 datagram socket to `to`.
pub fn connect_inet(fd: RawFd, to: std::net::SocketAddrV4) -> io::Result<()> {
    // SAFETY: all zeros is a valid sockaddr_in (and fills the fields some OSes add).
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = AF_INET;
    sin.sin_port = to.port().to_be();
    sin.sin_addr.s_addr = u32::from(*to.ip()).to_be();
    // SAFETY: `sin` is a valid sockaddr_in of the length given, alive for the call.
    cvt(unsafe { libc::connect(fd, (&raw const sin).cast::<libc::sockaddr>(), socklen::<libc::sockaddr_in>()) })?;
    Ok(())
}

/// Makes a raw ICMP socket deliver echo replies only (`ICMP_FILTER`, Linux; elsewhere a no-op
/// that leaves the filtering to the engine's own checks).
pub fn icmp_filter_echo_replies(fd: BorrowedFd<'_>) -> io::Result<()> {
    os::icmp_filter_echo_replies(fd)
}

/// Hardens the process at start, before any thread: on Linux `PR_SET_NO_NEW_PRIVS` and a
/// narrowed capability bounding set (see `linux.rs`). Returns the capabilities dropped.
pub fn harden_process() -> io::Result<usize> {
    harden()
}

/// Takes ownership of an inherited descriptor after checking that it is an open socket of
/// `sock_type` (`SOCK_DGRAM` or `SOCK_STREAM`) in the unix family (its local address tells,
/// on every OS).
pub fn adopt_unix_socket(fd: RawFd, sock_type: libc::c_int) -> io::Result<OwnedFd> {
    let mut ty: libc::c_int = 0;
    let mut len = socklen::<libc::c_int>();
    // SAFETY: `ty` and `len` are valid for writes of the sizes given; an invalid `fd` only
    // makes the call fail with EBADF or ENOTSOCK.
    cvt(unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE, (&raw mut ty).cast(), &raw mut len) })?;
    if ty != sock_type {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("fd {fd} is a socket of another type")));
    }
    // SAFETY: all zeros is a valid sockaddr_storage.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut alen = socklen::<libc::sockaddr_storage>();
    // SAFETY: `addr` and `alen` are valid for writes of the sizes given.
    cvt(unsafe { libc::getsockname(fd, (&raw mut addr).cast(), &raw mut alen) })?;
    if addr.ss_family != AF_UNIX {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("fd {fd} is not a unix socket")));
    }
    // SAFETY: the checks above show `fd` is an open socket; the caller hands it over (it was
    // inherited for this purpose and nothing else in the process owns it).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(owned.as_fd())?;
    Ok(owned)
}

/// Which side of [`fork_single_threaded`] this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// The new process.
    Child,
    /// The process that forked, with the child's pid.
    Parent(u32),
}

/// Forks the process, refused unless it has one thread (a child of a threaded process may
/// find a lock held forever by a thread that did not come along). The child has a copy of
/// everything, descriptors included: it closes what it must not keep.
pub fn fork_single_threaded() -> io::Result<Forked> {
    match thread_count() {
        Ok(Some(1) | None) => {}
        Ok(Some(n)) => return Err(io::Error::other(format!("refusing to fork a process with {n} threads"))),
        // Out of descriptors: said as such (the caller names the limit).
        Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => return Err(e),
        Err(e) => return Err(io::Error::other(format!("refusing to fork: cannot count this process's threads ({e})"))),
    }
    // SAFETY: the process has a single thread (checked above where the OS can tell), so the
    // child's copy of every lock and allocator state is consistent.
    let pid = unsafe { libc::fork() };
    match pid {
        0 => Ok(Forked::Child),
        p if p > 0 => Ok(Forked::Parent(p.unsigned_abs())),
        _ => Err(io::Error::last_os_error()),
    }
}

/// The most descriptors one [`send_fds`] message carries.
pub const MAX_FDS: usize = 8;

/// A control message of up to [`MAX_FDS`] descriptors, laid out as the kernel reads and
/// writes one (`CMSG_DATA` follows the header at its alignment on Linux and macOS, where the
/// header's size is a multiple of it).
#[repr(C)]
struct FdMessage {
    hdr: libc::cmsghdr,
    fds: [RawFd; MAX_FDS],
}

impl FdMessage {
    fn empty() -> Self {
        // SAFETY: all zeros is a valid cmsghdr and descriptor array.
        unsafe { std::mem::zeroed() }
    }
}

/// `CMSG_LEN(n)` for `n` descriptors: header plus data, no trailing padding.
fn cmsg_len(n: usize) -> usize {
    std::mem::offset_of!(FdMessage, fds) + n * size_of::<RawFd>()
}

/// Sends one message (a datagram or a seqpacket record) with `fds` (at most [`MAX_FDS`]) as
/// `SCM_RIGHTS`: the receiver gets its own descriptors for the same open files.
pub fn send_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many descriptors for one message"));
    }
    let mut iov = libc::iovec { iov_base: data.as_ptr().cast_mut().cast(), iov_len: data.len() };
    let mut cmsg = FdMessage::empty();
    // SAFETY: all zeros is a valid msghdr (no name, no iovecs, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        for (slot, fd) in cmsg.fds.iter_mut().zip(fds) {
            *slot = fd.as_raw_fd();
        }
        cmsg.hdr.cmsg_level = libc::SOL_SOCKET;
        cmsg.hdr.cmsg_type = libc::SCM_RIGHTS;
        cmsg.hdr.cmsg_len = cmsg_len(fds.len()) as _;
        msg.msg_control = (&raw mut cmsg).cast();
        // The whole buffer (CMSG_SPACE rounds up to the header's alignment; it fits in it).
        msg.msg_controllen = cmsg_len(fds.len()).next_multiple_of(align_of::<libc::cmsghdr>()) as _;
    }
    // SAFETY: msg and everything it points to (iov, data, cmsg) live for the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &raw const msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n.unsigned_abs() != data.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "message sent in part"));
    }
    Ok(())
}

/// Receives one message into `buf` with the descriptors it carries (close-on-exec). A message
/// longer than `buf`, or with more than [`MAX_FDS`] descriptors, is an error (whatever
/// descriptors did arrive are closed). `Ok((0, []))` when the peer has closed.
#[allow(clippy::unnecessary_cast)] // the lengths are usize on Linux, u32 on macOS
pub fn recv_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut cmsg = FdMessage::empty();
    // SAFETY: all zeros is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = (&raw mut cmsg).cast();
    msg.msg_controllen = size_of::<FdMessage>() as _;
    // SAFETY: msg points to buf and cmsg, both valid for writes of the sizes given.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &raw mut msg, cloexec_flag()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    let got = msg.msg_controllen as usize;
    if got >= cmsg_len(0) && cmsg.hdr.cmsg_level == libc::SOL_SOCKET && cmsg.hdr.cmsg_type == libc::SCM_RIGHTS {
        let count = (cmsg.hdr.cmsg_len as usize).min(got).saturating_sub(cmsg_len(0)) / size_of::<RawFd>();
        for fd in cmsg.fds.iter().take(count.min(MAX_FDS)) {
            // SAFETY: the kernel installed these descriptors in this process for this message;
            // nothing else owns them.
            fds.push(unsafe { OwnedFd::from_raw_fd(*fd) });
        }
    }
    for f in &fds {
        set_cloexec(f.as_fd())?;
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "message or its descriptors truncated"));
    }
    Ok((n.unsigned_abs(), fds))
}

/// Blocks `signals` for the calling thread (and the threads it starts): they stay pending
/// instead of being delivered. A child process started through `std::process::Command`
/// begins with an empty mask again.
pub fn block_signals(signals: &[libc::c_int]) -> io::Result<()> {
    // SAFETY: all zeros is a valid sigset_t, emptied and filled by the calls below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid for writes.
    unsafe { libc::sigemptyset(&raw mut set) };
    for s in signals {
        // SAFETY: `set` is a valid, initialised set; an unknown signal number fails with EINVAL.
        cvt(unsafe { libc::sigaddset(&raw mut set, *s) })?;
    }
    // SAFETY: `set` is valid for reads; no old mask is asked for.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}

/// Whether `fd` was opened for reading (not write-only, not `O_PATH`): a file handed to
/// another process to read must be one its sender could read.
pub fn opened_for_reading(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: F_GETFL on a valid descriptor (borrowed for the call) reads its flags only.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    Ok(flags & path_flag() == 0 && flags & libc::O_ACCMODE != libc::O_WRONLY)
}

/// Bytes an unprivileged writer may still put in the file system holding `path`
/// (`statvfs`: `f_bavail` blocks of `f_frsize`).
pub fn fs_available(path: &std::path::Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: `statvfs` is plain data; all zeros is a valid value for the call to fill.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` valid for writes, both for the call.
    cvt(unsafe { libc::statvfs(c.as_ptr(), &raw mut st) })?;
    #[allow(clippy::useless_conversion)] // u64 on Linux, narrower elsewhere.
    Ok(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

#[cfg(test)]
mod inherit_tests {
    use std::os::fd::{AsFd, AsRawFd};
    use std::process::Command;

    #[test]
    fn a_descriptor_is_inherited_by_its_child_alone() {
        let (a, _b) = super::socketpair(libc::SOCK_STREAM).unwrap();
        let fd = a.as_raw_fd();
        let has = |cmd: &mut Command| cmd.status().unwrap().success();
        let probe = || {
            let mut c = Command::new("sh");
            c.arg("-c").arg(format!("test -e /proc/self/fd/{fd}"));
            c
        };
        let mut with = probe();
        super::inherit_in_child(&mut with, vec![fd]);
        assert!(has(&mut with), "the child it was given to has it");
        assert!(!has(&mut probe()), "any other child does not");
        // SAFETY: F_GETFD on a descriptor we own reads only its flags.
        let flags = unsafe { libc::fcntl(a.as_fd().as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC, "still close-on-exec here");
    }
}
