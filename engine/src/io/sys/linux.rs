//! Linux: the system's own calls for everything in the contract (`sys/mod.rs`): eventfd,
//! `sched_setaffinity`, `SO_PEERCRED`, `SO_*BUFFORCE`, UDP GSO, `recvmmsg`/`sendmmsg`.
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::{cvt, socklen};

/// The io_uring backend: only Linux has it, so the platform boundary declares it.
#[path = "../uring/mod.rs"]
pub(crate) mod uring;

pub(crate) use uring::{probe as uring_probe, run as uring_run};

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
pub(crate) fn icmp_filter_echo_replies(fd: BorrowedFd<'_>) -> io::Result<()> {
    const SOL_RAW: libc::c_int = 255;
    const ICMP_FILTER: libc::c_int = 1;
    let mask: u32 = !1;
    // SAFETY: `mask` is a u32 (struct icmp_filter) valid for reads of its size during the call.
    cvt(unsafe { libc::setsockopt(fd.as_raw_fd(), SOL_RAW, ICMP_FILTER, (&raw const mask).cast(), socklen::<u32>()) })?;
    Ok(())
}

/// Capabilities no program the engine runs (`ip`, `iptables`, `nsenter`, QEMU) needs: dropped
/// from the bounding set, so no child can ever hold them (kernel capability numbers).
const UNNEEDED_CAPS: [libc::c_ulong; 26] = [
    9,  // LINUX_IMMUTABLE
    11, // NET_BROADCAST
    14, // IPC_LOCK
    15, // IPC_OWNER
    16, // SYS_MODULE
    17, // SYS_RAWIO
    18, // SYS_CHROOT
    19, // SYS_PTRACE
    20, // SYS_PACCT
    22, // SYS_BOOT
    25, // SYS_TIME
    26, // SYS_TTY_CONFIG
    27, // MKNOD
    28, // LEASE
    29, // AUDIT_WRITE
    30, // AUDIT_CONTROL
    31, // SETFCAP
    32, // MAC_OVERRIDE
    33, // MAC_ADMIN
    34, // SYSLOG
    35, // WAKE_ALARM
    36, // BLOCK_SUSPEND
    37, // AUDIT_READ
    38, // PERFMON
    39, // BPF
    40, // CHECKPOINT_RESTORE
];

/// Sets `PR_SET_NO_NEW_PRIVS` (nothing the engine executes can gain privileges: no setuid, no
/// file capabilities) and drops [`UNNEEDED_CAPS`] from the bounding set where the process may
/// (`CAP_SETPCAP`). Returns how many capabilities it dropped.
pub(crate) fn harden() -> io::Result<usize> {
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integers only and affects this process.
    cvt(unsafe {
        libc::prctl(
            libc::PR_SET_NO_NEW_PRIVS,
            1 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    })?;
    let mut dropped = 0;
    for cap in UNNEEDED_CAPS {
        // SAFETY: prctl with PR_CAPBSET_DROP takes a capability number; EINVAL for one this
        // kernel does not know and EPERM without CAP_SETPCAP are both fine to ignore.
        if unsafe {
            libc::prctl(libc::PR_CAPBSET_DROP, cap, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong)
        } == 0
        {
            dropped += 1;
        }
    }
    Ok(dropped)
}

/// Which loop a worker thread runs, for its seccomp filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerKind {
    /// mio (epoll) with recvmmsg/sendmmsg.
    Portable,
    /// io_uring (its ring restricted to the loop's operations).
    Uring,
}

/// `_LINUX_CAPABILITY_VERSION_3` from linux/capability.h.
const CAP_V3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Confines the calling worker thread, once its loop is set up: its capabilities drop to
/// `keep` (a mask of capability numbers below 32; usually none), and a seccomp filter allows
/// only the system calls its loop, its allowlist changes and its end make (the lists are in
/// docs/threat-model.md); any other kills the process. Per thread: the control side, which
/// starts VMMs, is not under it.
pub(crate) fn confine_worker(kind: WorkerKind, keep: u32) -> io::Result<()> {
    confine(Confined::Worker(kind), keep)
}

/// Confines the control socket's accept thread before it serves anyone, and with it every
/// connection handler it starts (both inherit): no capabilities, and a filter of what
/// accepting, threads and one request's reading and answering take.
pub(crate) fn confine_control_socket() -> io::Result<()> {
    confine(Confined::ControlSocket, 0)
}

#[derive(Clone, Copy)]
enum Confined {
    Worker(WorkerKind),
    ControlSocket,
}

fn confine(kind: Confined, keep: u32) -> io::Result<()> {
    let hdr = CapHeader { version: CAP_V3, pid: 0 };
    let mut now = [CapData { effective: 0, permitted: 0, inheritable: 0 }; 2];
    // SAFETY: capget with a v3 header for this thread and room for two data structs, as the
    // kernel expects for version 3; both live for the call.
    let held = if unsafe { libc::syscall(libc::SYS_capget, &raw const hdr, now.as_mut_ptr()) } == 0 {
        now[0].permitted
    } else {
        0
    };
    // Only what the thread holds can be kept (asking for more would refuse the whole call).
    let keep = keep & held;
    let data = [
        CapData { effective: keep, permitted: keep, inheritable: 0 },
        CapData { effective: 0, permitted: 0, inheritable: 0 },
    ];
    // SAFETY: capset with a v3 header for this thread (pid 0) and two data structs, as the
    // kernel expects for version 3; both live for the call.
    let caps = unsafe { libc::syscall(libc::SYS_capset, &raw const hdr, data.as_ptr()) };
    let caps = if caps == 0 { Ok(()) } else { Err(io::Error::last_os_error()) };
    // The filter goes on whatever capset said.
    let (filter, refusals) = filters(kind).map_err(|e| io::Error::other(e.to_string()))?;
    // The refusing ones first: installing a filter takes prctl and seccomp, which the main
    // filter does not allow. Stacked filters all run; the strictest answer wins.
    for f in refusals.iter().chain(std::iter::once(&filter)) {
        seccompiler::apply_filter(f).map_err(|e| io::Error::other(e.to_string()))?;
    }
    caps.map_err(|e| io::Error::other(format!("dropping capabilities: {e} (the seccomp filter is on)")))
}

/// A thread's filter, and filters stacked on it for calls it lets through only to refuse them
/// with an error: glibc's allocator opens `/proc/sys/vm/overcommit_memory` once, when a
/// thread's heap is first trimmed (a thread's end, say), and copes with ENOENT; glibc starts
/// threads with `clone3` and falls back to `clone` (whose flags a filter can read) on ENOSYS.
fn filters(
    kind: Confined,
) -> Result<(seccompiler::BpfProgram, Vec<seccompiler::BpfProgram>), seccompiler::BackendError> {
    use seccompiler::{SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond};
    use seccompiler::{SeccompFilter, SeccompRule, TargetArch};
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    // Both kinds: threads, time, memory, logging, the end of the thread.
    let mut allow: Vec<libc::c_long> = vec![
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_close,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_gettime,
        libc::SYS_gettimeofday,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_getrandom,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_madvise,
        libc::SYS_rseq,
        libc::SYS_exit,
        libc::SYS_exit_group,
        // glibc's allocator asks how many CPUs there are when it makes a new arena.
        libc::SYS_sched_getaffinity,
        // Refused with an error by the filters below.
        libc::SYS_openat,
        libc::SYS_clone3,
    ];
    let mut refused = vec![(libc::SYS_openat, libc::ENOENT)];
    match kind {
        Confined::Worker(backend) => {
            allow.extend([
                // The loop: frames, datagrams, echoes.
                libc::SYS_recvfrom,
                libc::SYS_recvmsg,
                libc::SYS_recvmmsg,
                libc::SYS_sendto,
                libc::SYS_sendmsg,
                libc::SYS_sendmmsg,
                // Egress sockets for endpoints added later, reconnecting them, a stream VMM's
                // connection (SO_PEERCRED), a datagram handle's peer.
                libc::SYS_bind,
                libc::SYS_connect,
                libc::SYS_getsockopt,
                libc::SYS_getsockname,
                libc::SYS_setsockopt,
                libc::SYS_fcntl,
            ]);
            match backend {
                WorkerKind::Portable => {
                    allow.extend([libc::SYS_epoll_ctl, libc::SYS_epoll_pwait, libc::SYS_epoll_pwait2]);
                    #[cfg(target_arch = "x86_64")]
                    allow.push(libc::SYS_epoll_wait);
                }
                WorkerKind::Uring => allow.push(libc::SYS_io_uring_enter),
            }
        }
        Confined::ControlSocket => {
            allow.extend([
                // Accepting, the peer's credentials, a request's deadlines, its answer.
                libc::SYS_accept4,
                libc::SYS_getsockopt,
                libc::SYS_setsockopt,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_fcntl,
                // A thread per connection.
                libc::SYS_set_robust_list,
            ]);
            refused.push((libc::SYS_clone3, libc::ENOSYS));
        }
    }
    if matches!(kind, Confined::Worker(_)) {
        refused.push((libc::SYS_clone3, libc::EPERM));
    }
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> =
        allow.into_iter().map(|s| (s, Vec::new())).collect();
    let prot_exec = u64::try_from(libc::PROT_EXEC).unwrap_or(4);
    let no_exec = || -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
        Ok(vec![SeccompRule::new(vec![Cond::new(2, Len::Dword, Op::MaskedEq(prot_exec), 0)?])?])
    };
    // A panic's abort signals this process only (never another).
    let me = u64::from(std::process::id());
    rules.insert(libc::SYS_tgkill, vec![SeccompRule::new(vec![Cond::new(0, Len::Dword, Op::Eq, me)?])?]);
    // Memory, never executable.
    rules.insert(libc::SYS_mmap, no_exec()?);
    rules.insert(libc::SYS_mprotect, no_exec()?);
    match kind {
        Confined::Worker(_) => {
            // IPv4 sockets only (UDP towards new endpoints, ICMP echo).
            let af_inet = u64::try_from(libc::AF_INET).unwrap_or(2);
            rules.insert(libc::SYS_socket, vec![SeccompRule::new(vec![Cond::new(0, Len::Dword, Op::Eq, af_inet)?])?]);
            // Non-blocking mode on an accepted stream, nothing else.
            rules.insert(
                libc::SYS_ioctl,
                vec![SeccompRule::new(vec![Cond::new(1, Len::Dword, Op::Eq, libc::FIONBIO)?])?],
            );
        }
        Confined::ControlSocket => {
            // Threads of this process only: never a new process.
            let thread = u64::try_from(libc::CLONE_THREAD).unwrap_or(0x10000);
            rules.insert(
                libc::SYS_clone,
                vec![SeccompRule::new(vec![Cond::new(0, Len::Qword, Op::MaskedEq(thread), thread)?])?],
            );
            // Naming a new thread.
            let set_name = u64::try_from(libc::PR_SET_NAME).unwrap_or(15);
            rules.insert(libc::SYS_prctl, vec![SeccompRule::new(vec![Cond::new(0, Len::Dword, Op::Eq, set_name)?])?]);
        }
    }
    let filter = SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, arch)?.try_into()?;
    let mut refusals = Vec::new();
    for (call, errno) in refused {
        let errno = u32::try_from(errno).unwrap_or(1);
        let one = std::iter::once((call, Vec::new())).collect();
        refusals.push(SeccompFilter::new(one, SeccompAction::Allow, SeccompAction::Errno(errno), arch)?.try_into()?);
    }
    Ok((filter, refusals))
}
