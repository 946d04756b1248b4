//! Linux: the system's own calls for everything in the contract (`sys/src/lib.rs`): eventfd,
//! `sched_setaffinity`, `SO_PEERCRED`, `SO_*BUFFORCE`, UDP GSO, `recvmmsg`/`sendmmsg`.
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::{cvt, socklen};

/// A message header of the batch calls.
pub use libc::mmsghdr;

/// A connected pair of unix sockets of `sock_type`, both close-on-exec.
pub fn socketpair(sock_type: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors the call writes.
    cvt(unsafe { libc::socketpair(libc::AF_UNIX, sock_type | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) })?;
    // SAFETY: both descriptors were just created by socketpair and are owned by nobody else.
    let a = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let b = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    Ok((a, b))
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is a plain bit array; all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= 8 * size_of::<libc::cpu_set_t>() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("CPU {cpu} is out of range")));
    }
    // SAFETY: `cpu` was checked against the set's size above, so the bit is inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    cvt(unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) })?;
    Ok(())
}

/// CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is a plain bit array; all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid for writes of the size passed; pid 0 is the calling thread.
    let r = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut set) };
    if r != 0 {
        return Vec::new();
    }
    (0..8 * size_of::<libc::cpu_set_t>())
        // SAFETY: every `c` is below the set's size in bits, so the bit is inside `set`.
        .filter(|c| unsafe { libc::CPU_ISSET(*c, &set) })
        .collect()
}

/// A non-blocking eventfd: the control side's doorbell for a sleeping VM thread.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A new eventfd.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        // SAFETY: `fd` was just created and is owned by nobody else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Rings the bell.
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of `one` to our own eventfd. A full counter (EAGAIN)
        // means a wake-up is pending anyway.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    /// Clears pending rings.
    pub fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into `v`; EAGAIN when nothing is pending is fine.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&raw mut v).cast(), 8) };
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Asks for socket buffers of `bytes` each way: beyond `net.core.[rw]mem_max` where the
/// process may (CAP_NET_ADMIN), else as large as the system allows. Best effort.
pub fn grow_buffers(fd: BorrowedFd<'_>, bytes: usize) {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for (forced, plain) in [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
        for opt in [forced, plain] {
            // SAFETY: passes a pointer to a c_int and its size.
            let r = unsafe {
                libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, opt, (&raw const v).cast(), socklen::<libc::c_int>())
            };
            if r == 0 {
                break;
            }
        }
    }
}

/// `UDP_SEGMENT` from linux/udp.h.
pub const UDP_SEGMENT: libc::c_int = 103;

/// True when the kernel accepts UDP GSO on this socket.
pub fn udp_gso_supported(fd: BorrowedFd<'_>) -> bool {
    let zero: libc::c_int = 0;
    // SAFETY: passes a pointer to a c_int and its size; setting 0 leaves GSO off for sends
    // without a per-message segment size.
    let r = unsafe {
        libc::setsockopt(fd.as_raw_fd(), libc::SOL_UDP, UDP_SEGMENT, (&raw const zero).cast(), socklen::<libc::c_int>())
    };
    r == 0
}

/// `recvmmsg` without blocking: fills up to `hdrs.len()` messages. Returns how many.
///
/// # Safety
/// Every header's `msg_iov`, `msg_name` and `msg_control` must point to memory valid for
/// writes of the lengths they state, and that memory must not be read or written through any
/// other path during the call.
pub unsafe fn recvmmsg(fd: RawFd, hdrs: &mut [mmsghdr]) -> io::Result<usize> {
    let n = u32::try_from(hdrs.len()).unwrap_or(u32::MAX);
    // SAFETY: the caller guarantees every buffer the headers point to; `hdrs` itself is a
    // valid array of `n` headers.
    let r = unsafe { libc::recvmmsg(fd, hdrs.as_mut_ptr(), n, libc::MSG_DONTWAIT, std::ptr::null_mut()) };
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// `sendmmsg` without blocking. Returns how many messages the kernel took.
///
/// # Safety
/// Every header's `msg_iov`, `msg_name` and `msg_control` must point to memory valid for
/// reads of the lengths they state for the duration of the call.
pub unsafe fn sendmmsg(fd: RawFd, hdrs: &mut [mmsghdr]) -> io::Result<usize> {
    let n = u32::try_from(hdrs.len()).unwrap_or(u32::MAX);
    // SAFETY: the caller guarantees every buffer the headers point to; the kernel writes only
    // each header's `msg_len`.
    let r = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), n, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// The peer's credentials on a connected unix socket: (pid, uid, gid).
pub fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<(i32, u32, u32)> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = socklen::<libc::ucred>();
    // SAFETY: `cred` and `len` are valid for writes of the sizes given.
    cvt(unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&raw mut cred).cast(), &raw mut len)
    })?;
    Ok((cred.pid, cred.uid, cred.gid))
}

/// `ICMP_FILTER` on a raw ICMP socket: every type but echo reply (0) filtered out.
pub fn icmp_filter_echo_replies(fd: BorrowedFd<'_>) -> io::Result<()> {
    const SOL_RAW: libc::c_int = 255;
    const ICMP_FILTER: libc::c_int = 1;
    let mask: u32 = !1;
    // SAFETY: `mask` is a u32 (struct icmp_filter) valid for reads of its size during the call.
    cvt(unsafe { libc::setsockopt(fd.as_raw_fd(), SOL_RAW, ICMP_FILTER, (&raw const mask).cast(), socklen::<u32>()) })?;
    Ok(())
}

/// Privileges: no-new-privs, capabilities, the privilege drop and the seccomp filters.
#[path = "confine_linux.rs"]
mod confine;

pub use confine::{confine_control_socket, confine_worker, harden, WorkerKind};
pub use confine::{confine_control_thread, drop_privileges, guard_from_workers, keep_capabilities};

/// How many threads this process has (from /proc).
pub fn thread_count() -> io::Result<Option<usize>> {
    std::fs::read_dir("/proc/self/task").map(|d| Some(d.count()))
}

/// `O_PATH`: a descriptor that names a file without opening it for reading or writing.
pub fn path_flag() -> libc::c_int {
    libc::O_PATH
}

/// Closes every descriptor of this process above 2 but `keep` (`close_range`): for a child
/// that must not hold what its parent had open.
pub fn close_fds_except(keep: RawFd) -> io::Result<()> {
    let close = |first: RawFd, last: libc::c_uint| -> io::Result<()> {
        let Ok(first) = libc::c_uint::try_from(first) else { return Ok(()) };
        if first > last {
            return Ok(());
        }
        // SAFETY: close_range with a range of descriptor numbers and no flags closes them;
        // the caller owns none of them any more (it keeps only `keep` and 0..=2).
        if unsafe { libc::syscall(libc::SYS_close_range, first, last, 0 as libc::c_uint) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    let keep_u = libc::c_uint::try_from(keep).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    if keep_u > 3 {
        close(3, keep_u - 1)?;
    }
    close(keep + 1, libc::c_uint::MAX)
}

/// Gives the calling thread a descriptor table of its own (`unshare(CLONE_FILES)`: a copy of
/// the process's) and closes in it every descriptor but 0..=2 and `keep`. From then on the
/// thread, and io_uring work it submits, can name no descriptor of the rest of the process
/// (nor can it receive one but through a socket it keeps), and the rest of the process none
/// of its. The caller closes its own copies of `keep` in the shared table once this returned.
/// Fails only when the table cannot be unshared (nothing was closed then).
pub fn private_descriptors(keep: &[RawFd]) -> io::Result<()> {
    // SAFETY: unshare with CLONE_FILES only affects the calling thread's descriptor table.
    if unsafe { libc::unshare(libc::CLONE_FILES) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut keep: Vec<libc::c_uint> = keep.iter().filter_map(|fd| libc::c_uint::try_from(*fd).ok()).collect();
    keep.extend([0, 1, 2]);
    keep.sort_unstable();
    keep.dedup();
    let mut first: libc::c_uint = 0;
    // Past the highest descriptor the process may have, nothing is open.
    let top = libc::c_uint::try_from(crate::open_files_limit().unwrap_or(1 << 20)).unwrap_or(libc::c_uint::MAX);
    for k in keep.iter().copied().chain([libc::c_uint::MAX]) {
        if k > first {
            // SAFETY: close_range of descriptor numbers of this thread's own table (a copy):
            // the rest of the process keeps its descriptors; nothing in this thread owns these.
            if unsafe { libc::syscall(libc::SYS_close_range, first, k - 1, 0 as libc::c_uint) } != 0 {
                // A kernel before 5.9: one by one, up to the open-files limit.
                for fd in (first..k.min(top)).filter_map(|fd| libc::c_int::try_from(fd).ok()) {
                    // SAFETY: as above, one number at a time (EBADF for those not open).
                    unsafe { libc::close(fd) };
                }
            }
        }
        first = k.saturating_add(1);
    }
    Ok(())
}

/// Closes descriptor `fd` of this process's table, by number: the shared copy of one a thread
/// took into a table of its own ([`private_descriptors`]), which nothing else owns.
pub fn close_number(fd: RawFd) {
    // SAFETY: closing a number the caller says nothing in this table owns.
    unsafe { libc::close(fd) };
}

/// `recvmsg` flags that make received descriptors close-on-exec at once.
pub fn cloexec_flag() -> libc::c_int {
    libc::MSG_CMSG_CLOEXEC
}

/// Makes the process `cmd` starts, between fork and exec: a network namespace of its own with
/// nothing in it, then no supplementary group, `gid` and `uid`, then killed should its parent
/// die (a change of ids clears that, so it is set after them). For VMMs (Linux only).
pub fn isolate_before_exec(cmd: &mut std::process::Command, uid: u32, gid: u32) {
    use std::os::unix::process::CommandExt;
    let step = |r: libc::c_int| if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) };
    let drop_all = move || {
        // SAFETY: unshare with a flag, on the child itself.
        step(unsafe { libc::unshare(libc::CLONE_NEWNET) })?;
        // SAFETY: an empty group list (null with size 0).
        step(unsafe { libc::setgroups(0, std::ptr::null()) })?;
        // SAFETY: integers only.
        step(unsafe { libc::setresgid(gid, gid, gid) })?;
        // SAFETY: integers only.
        step(unsafe { libc::setresuid(uid, uid, uid) })?;
        // SAFETY: prctl with integers only.
        step(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) })
    };
    // SAFETY: the closure runs in the child between fork and exec and makes only
    // async-signal-safe system calls (unshare, setgroups, setresgid, setresuid, prctl) on plain
    // integers; it allocates nothing and touches no lock.
    unsafe { cmd.pre_exec(drop_all) };
}

/// `KVM_GET_API_VERSION` on an open `/dev/kvm` (Linux only).
pub fn kvm_api_version(kvm: BorrowedFd<'_>) -> libc::c_int {
    /// `_IO(KVMIO, 0x00)` with `KVMIO = 0xAE`.
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an integer; the fd is
    // valid for the duration of the call.
    unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION) }
}

/// Moves the calling thread into a new, empty network namespace (Linux only; the test harness's
/// private namespaces).
pub fn unshare_network() -> io::Result<()> {
    // SAFETY: unshare takes no pointers; CLONE_NEWNET moves only this thread (and what it
    // creates from now on) into a new network namespace.
    cvt(unsafe { libc::unshare(libc::CLONE_NEWNET) })?;
    Ok(())
}

/// Moves the calling thread into the network namespace `ns` (an open `/run/netns/NAME` or
/// `/proc/PID/ns/net`; Linux only).
pub fn enter_network(ns: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: setns takes a descriptor the caller lends and moves only this thread.
    cvt(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) })?;
    Ok(())
}

/// A copy of descriptor `fd` of process `pid` (`pidfd_open` and `pidfd_getfd`, Linux 5.6; the
/// caller needs ptrace rights over the process, as root has over its own children). Linux
/// only: the benchmarks use it to give a stand-in peer's socket the buffers it never asks for.
pub fn descriptor_of(pid: u32, fd: RawFd) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let pidfd = RawFd::try_from(pidfd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_open just made this descriptor; nobody else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number of that process and flags, and
    // returns a new descriptor of ours or -1.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    let got = RawFd::try_from(got).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_getfd just made this descriptor in our table; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(got) })
}

/// Frees the blocks of `len` bytes of the file `fd` from `offset` on, keeping its size
/// (`fallocate(PUNCH_HOLE | KEEP_SIZE)`; ext4, xfs, btrfs and tmpfs have it): they read as
/// zeros and take no room. What bounds a file another process keeps appending to.
pub fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: fallocate on a descriptor the caller lends, with plain integer arguments.
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, len) })?;
    Ok(())
}
