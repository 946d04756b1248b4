//! Linux privileges: `PR_SET_NO_NEW_PRIVS` and the capability bounding set at start, the drop
//! to an unprivileged user (`--runas`), the capabilities a thread keeps, and the seccomp
//! filters of each thread kind (the lists are in docs/threat-model.md).
use std::io;

use super::cvt;

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
pub fn harden() -> io::Result<usize> {
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

/// The descriptor no control-socket thread may use (-1: none): the launcher's socket, by its
/// number. (Workers cannot name it at all: each has a descriptor table of its own.)
static GUARDED: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Keeps `fd` (the launcher's socket) out of reach of every control-socket thread confined
/// from now on: each of their system calls that takes a descriptor (read, write, send,
/// receive, close, fcntl, ioctl, socket options, epoll_ctl) fails with EBADF when it names
/// this one, by a filter stacked on theirs. They cannot make another number for it either (no
/// dup, no F_DUPFD, no open of /proc/self/fd). Workers never see it: each takes a descriptor
/// table of its own (`private_descriptors`). Call once, before any such thread starts; the
/// descriptor must stay open (its number is what is guarded).
pub fn guard_from_workers(fd: std::os::fd::BorrowedFd<'_>) {
    use std::os::fd::AsRawFd;
    GUARDED.store(fd.as_raw_fd(), std::sync::atomic::Ordering::SeqCst);
}

/// The guarded descriptor, if any.
fn guarded() -> Option<i32> {
    Some(GUARDED.load(std::sync::atomic::Ordering::SeqCst)).filter(|fd| *fd >= 0)
}

/// Confines the calling worker thread, once its loop is set up: its capabilities drop to
/// `keep` (a mask of capability numbers below 32; usually none), and a seccomp filter allows
/// only the system calls its loop, its allowlist changes and its end make (the lists are in
/// docs/threat-model.md); any other kills the process. Per thread: the control side, which
/// starts VMMs, is not under it.
pub fn confine_worker(kind: WorkerKind, keep: u32) -> io::Result<()> {
    confine(Confined::Worker(kind), keep)
}

/// Confines the control socket's accept thread before it serves anyone, and with it every
/// connection handler it starts (both inherit): no capabilities, and a filter of what
/// accepting, threads and one request's reading and answering take.
pub fn confine_control_socket() -> io::Result<()> {
    confine(Confined::ControlSocket, 0)
}

/// Confines the calling thread, the control thread, once the process has dropped to its
/// unprivileged user and before it starts any other thread (every thread it starts inherits
/// the filter, and workers and the control socket stack their own on it): the files, sockets,
/// rings and threads that serving VMs takes; never a new process, a namespace, a mount, a
/// change of ids, executable memory or tracing. What it does not list is refused with EPERM
/// rather than killing the process: this thread's work is the most varied (an error line is
/// better than a dead data plane for a call a rare path makes), and a refused call gains
/// nothing.
/// Capabilities the thread still holds beyond `keep` (a mask of numbers below 32) are dropped:
/// after a drop to another user there are none; an engine that kept root (`--runas self`)
/// keeps those its VMs' sockets need (`CAP_NET_RAW`, `CAP_NET_BIND_SERVICE`).
pub fn confine_control_thread(keep: u32) -> io::Result<()> {
    confine(Confined::Control, keep)
}

#[derive(Clone, Copy)]
enum Confined {
    Worker(WorkerKind),
    ControlSocket,
    Control,
}

/// Sets the calling thread's effective and permitted capabilities to `keep & held` (a mask of
/// capability numbers below 32) and its inheritable ones to none.
fn set_caps(keep: u32) -> io::Result<()> {
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
    let r = unsafe { libc::syscall(libc::SYS_capset, &raw const hdr, data.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The highest capability number any kernel may know (`CAP_LAST_CAP` is 40 today).
const CAP_MAX: libc::c_ulong = 63;

/// Drops every capability but those in `keep` from the bounding set (where the process may:
/// `CAP_SETPCAP`), then keeps only those in the calling thread's sets. For the launcher,
/// while it is still the only thread of its process. Programs it executes then hold no more
/// than `keep` (no-new-privs caps what an executed program may gain at the permitted set).
pub fn keep_capabilities(keep: u32) -> io::Result<()> {
    for cap in 0..=CAP_MAX {
        if cap < 32 && keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with PR_CAPBSET_DROP takes a capability number; EINVAL for one this
        // kernel does not know and EPERM without CAP_SETPCAP are both fine to ignore.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    }
    set_caps(keep)
}

/// The user and group ids of this process: (real, effective, saved) of each.
fn ids() -> ([libc::uid_t; 3], [libc::gid_t; 3]) {
    let (mut u, mut g) = ([0; 3], [0; 3]);
    // SAFETY: three valid places to write; the call cannot fail with valid pointers.
    unsafe { libc::getresuid(&raw mut u[0], &raw mut u[1], &raw mut u[2]) };
    // SAFETY: as above.
    unsafe { libc::getresgid(&raw mut g[0], &raw mut g[1], &raw mut g[2]) };
    (u, g)
}

/// Runs the process as `uid` and `gid` from now on, with no supplementary group, an empty
/// capability bounding set and no ambient capabilities: it holds no capability, now or after
/// any exec, and can never take root back. Call while the process has one thread (glibc
/// changes every thread's ids, but a thread under a seccomp filter might refuse the change).
/// Checked afterwards: an error if any id is not the one asked for or a capability remains.
pub fn drop_privileges(uid: u32, gid: u32) -> io::Result<()> {
    if uid == 0 || gid == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "refusing to drop privileges to uid or gid 0"));
    }
    for cap in 0..=CAP_MAX {
        // SAFETY: as in keep_capabilities.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    }
    // SAFETY: prctl with integers only; clears this thread's ambient set.
    let _ = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    // SAFETY: an empty group list (null with size 0).
    cvt(unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: integers only.
    cvt(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: integers only. From uid 0 to another, the kernel clears every capability set.
    cvt(unsafe { libc::setresuid(uid, uid, uid) })?;
    let (u, g) = ids();
    if u != [uid; 3] || g != [gid; 3] {
        return Err(io::Error::other(format!("ids after the drop are uid {u:?} gid {g:?}")));
    }
    // SAFETY: setuid(0) with an integer; it must fail now.
    if unsafe { libc::setuid(0) } == 0 {
        return Err(io::Error::other("uid 0 could be taken back after the drop"));
    }
    // Not dumpable: its /proc files stay root's and no process of the same user (a VMM that
    // shares it, say) may trace it or read its memory. The kernel does this on the change of
    // ids already; said here so it does not hang on that.
    // SAFETY: prctl with integers only.
    cvt(unsafe {
        libc::prctl(
            libc::PR_SET_DUMPABLE,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    })?;
    set_caps(0)?;
    // What the drop must have left: no supplementary group, no capability in any set, an
    // empty bounding set.
    // SAFETY: getgroups with size 0 only counts.
    let groups = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if groups != 0 {
        return Err(io::Error::other(format!("{groups} supplementary group(s) after the drop")));
    }
    let hdr = CapHeader { version: CAP_V3, pid: 0 };
    let mut now = [CapData { effective: 0, permitted: 0, inheritable: 0 }; 2];
    // SAFETY: capget with a v3 header for this thread and room for two data structs.
    if unsafe { libc::syscall(libc::SYS_capget, &raw const hdr, now.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if now.iter().any(|d| d.effective | d.permitted | d.inheritable != 0) {
        return Err(io::Error::other("a capability remains after the drop"));
    }
    for cap in 0..=CAP_MAX {
        // SAFETY: prctl with PR_CAPBSET_READ reads one bit of this thread's bounding set
        // (EINVAL for a number the kernel does not know).
        let r = unsafe {
            libc::prctl(libc::PR_CAPBSET_READ, cap, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong)
        };
        if r > 0 {
            return Err(io::Error::other(format!("capability {cap} remains in the bounding set after the drop")));
        }
    }
    Ok(())
}

fn confine(kind: Confined, keep: u32) -> io::Result<()> {
    confine_guarding(kind, keep, guarded())
}

fn confine_guarding(kind: Confined, keep: u32, guarded: Option<i32>) -> io::Result<()> {
    let caps = set_caps(keep);
    // The filter goes on whatever capset said.
    let (filter, mut refusals) = filters(kind).map_err(|e| io::Error::other(e.to_string()))?;
    // Control-socket threads share the process's table: the number names the launcher's socket
    // there. Workers have tables of their own (`private_descriptors`), where the same number
    // may be one of their own descriptors: no guard by number for them.
    if let (Some(fd), Confined::ControlSocket) = (guarded, kind) {
        refusals.push(guard(fd).map_err(|e| io::Error::other(e.to_string()))?);
    }
    // The refusing ones first: installing a filter takes prctl and seccomp, which the main
    // filter does not allow. Stacked filters all run; the strictest answer wins.
    for f in &refusals {
        seccompiler::apply_filter(f).map_err(|e| io::Error::other(e.to_string()))?;
    }
    if matches!(kind, Confined::Control) {
        // Its refusals (EPERM) reach the kernel's audit log, so a call the list lacks shows.
        apply_logged(&filter)?;
    } else {
        seccompiler::apply_filter(&filter).map_err(|e| io::Error::other(e.to_string()))?;
    }
    caps.map_err(|e| io::Error::other(format!("dropping capabilities: {e} (the seccomp filter is on)")))
}

/// Installs `filter` on the calling thread with `SECCOMP_FILTER_FLAG_LOG`: every answer but
/// "allow" is logged (seccompiler installs without flags). No-new-privs is set already.
fn apply_logged(filter: &seccompiler::BpfProgram) -> io::Result<()> {
    let len = u16::try_from(filter.len()).map_err(|_| io::Error::other("seccomp filter too long"))?;
    let prog = libc::sock_fprog { len, filter: filter.as_ptr().cast_mut().cast::<libc::sock_filter>() };
    // SAFETY: `prog` points to `len` BPF instructions (seccompiler's `sock_filter` has the
    // kernel's layout), alive for the call; the kernel copies them.
    let r = unsafe {
        libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, libc::SECCOMP_FILTER_FLAG_LOG, &raw const prog)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
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
        // Refused with an error by the filters below (the control thread opens files).
        libc::SYS_openat,
        libc::SYS_clone3,
    ];
    let mut refused = Vec::new();
    if !matches!(kind, Confined::Control) {
        refused.push((libc::SYS_openat, libc::ENOENT));
    }
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
                // ICMP sockets for addresses added later (made and connected here), a stream VMM's
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
        Confined::Control => {
            allow.extend(CONTROL_CALLS);
            #[cfg(target_arch = "x86_64")]
            allow.extend(CONTROL_CALLS_X86_64);
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
    if matches!(kind, Confined::Control) {
        // A worker thread, started under this filter, takes a descriptor table of its own
        // first thing (`private_descriptors`): that flag alone, and closing ranges in it.
        let files = u64::try_from(libc::CLONE_FILES).unwrap_or(0x400);
        rules.insert(libc::SYS_unshare, vec![SeccompRule::new(vec![Cond::new(0, Len::Qword, Op::Eq, files)?])?]);
        rules.insert(libc::SYS_close_range, Vec::new());
    }
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
        Confined::ControlSocket | Confined::Control => {
            // Threads of this process only: never a new process.
            let thread = u64::try_from(libc::CLONE_THREAD).unwrap_or(0x10000);
            rules.insert(
                libc::SYS_clone,
                vec![SeccompRule::new(vec![Cond::new(0, Len::Qword, Op::MaskedEq(thread), thread)?])?],
            );
            // Naming a new thread; for the control thread, also the no-new-privs flag a worker
            // sets again as it installs its own filter.
            let mut options = vec![libc::PR_SET_NAME];
            if matches!(kind, Confined::Control) {
                options.push(libc::PR_SET_NO_NEW_PRIVS);
            }
            let prctl = options
                .into_iter()
                .map(|o| SeccompRule::new(vec![Cond::new(0, Len::Dword, Op::Eq, u64::try_from(o).unwrap_or(0))?]))
                .collect::<Result<Vec<_>, _>>()?;
            rules.insert(libc::SYS_prctl, prctl);
        }
    }
    if matches!(kind, Confined::Control) {
        // Sockets: IPv4 (host sockets), unix (handles, the launcher), netlink (the host's
        // addresses, through getifaddrs).
        let family = |f: libc::c_int| Cond::new(0, Len::Dword, Op::Eq, u64::try_from(f).unwrap_or(0));
        let socket = vec![
            SeccompRule::new(vec![family(libc::AF_INET)?])?,
            SeccompRule::new(vec![family(libc::AF_UNIX)?])?,
            // NETLINK_ROUTE (0) only: not sock_diag, audit or uevents.
            SeccompRule::new(vec![family(libc::AF_NETLINK)?, Cond::new(2, Len::Dword, Op::Eq, 0)?])?,
        ];
        rules.insert(libc::SYS_socket, socket);
        // This process's own limits and this thread's CPUs only (pid 0).
        for call in [libc::SYS_prlimit64, libc::SYS_sched_setaffinity] {
            rules.insert(call, vec![SeccompRule::new(vec![Cond::new(0, Len::Dword, Op::Eq, 0)?])?]);
        }
        let ioctl = [libc::FIONBIO, libc::FIOCLEX, libc::TCGETS]
            .into_iter()
            .map(|r| SeccompRule::new(vec![Cond::new(1, Len::Dword, Op::Eq, r)?]))
            .collect::<Result<Vec<_>, _>>()?;
        rules.insert(libc::SYS_ioctl, ioctl);
    }
    let mismatch = match kind {
        Confined::Control => SeccompAction::Errno(u32::try_from(libc::EPERM).unwrap_or(1)),
        _ => SeccompAction::KillProcess,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)?.try_into()?;
    let mut refusals = Vec::new();
    for (call, errno) in refused {
        let errno = u32::try_from(errno).unwrap_or(1);
        let one = std::iter::once((call, Vec::new())).collect();
        refusals.push(SeccompFilter::new(one, SeccompAction::Allow, SeccompAction::Errno(errno), arch)?.try_into()?);
    }
    Ok((filter, refusals))
}

/// A filter stacked on a worker's or the control socket's: every call of theirs that takes a
/// descriptor fails with EBADF when it names `fd` (see [`guard_from_workers`]); everything
/// else is left to the thread's own filter.
fn guard(fd: i32) -> Result<seccompiler::BpfProgram, seccompiler::BackendError> {
    use seccompiler::{SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond};
    use seccompiler::{SeccompFilter, SeccompRule, TargetArch};
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    let fd = u64::try_from(fd).unwrap_or(u64::MAX);
    let first = [
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_close,
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
        libc::SYS_recvmmsg,
        libc::SYS_sendto,
        libc::SYS_sendmsg,
        libc::SYS_sendmmsg,
        libc::SYS_bind,
        libc::SYS_connect,
        libc::SYS_getsockopt,
        libc::SYS_getsockname,
        libc::SYS_setsockopt,
        libc::SYS_fcntl,
        libc::SYS_ioctl,
        libc::SYS_accept4,
    ];
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> = std::collections::BTreeMap::new();
    for call in first {
        rules.insert(call, vec![SeccompRule::new(vec![Cond::new(0, Len::Dword, Op::Eq, fd)?])?]);
    }
    // epoll_ctl(epfd, op, fd, event): the watched descriptor is the third.
    rules.insert(libc::SYS_epoll_ctl, vec![SeccompRule::new(vec![Cond::new(2, Len::Dword, Op::Eq, fd)?])?]);
    let ebadf = u32::try_from(libc::EBADF).unwrap_or(9);
    SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(ebadf), arch)?.try_into()
}

/// What the control thread calls beyond the base list of [`filters`]: files (configuration,
/// images, /proc, handle sockets' modes), sockets (host sockets, handles, the control socket,
/// the launcher's descriptors, the metrics endpoint's TCP connections: its thread inherits
/// this filter), readiness and rings (a worker sets its loop up under this
/// filter before it stacks its own), threads and their capabilities and filters, ids and
/// limits, state files replaced atomically (guests' records: rename, fsync).
const CONTROL_CALLS: [libc::c_long; 62] = [
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_readv,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_unlinkat,
    libc::SYS_mkdirat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_getcwd,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_fcntl,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_connect,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    libc::SYS_shutdown,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd2,
    libc::SYS_pipe2,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_register,
    libc::SYS_io_uring_enter,
    libc::SYS_set_robust_list,
    libc::SYS_rt_sigaction,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_seccomp,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getresuid,
    libc::SYS_getresgid,
    libc::SYS_getppid,
    libc::SYS_uname,
    libc::SYS_clock_getres,
];

/// The same, by the names x86-64 kept besides the generic ones (std and glibc still use some).
#[cfg(target_arch = "x86_64")]
const CONTROL_CALLS_X86_64: [libc::c_long; 11] = [
    libc::SYS_stat,
    libc::SYS_rename,
    libc::SYS_lstat,
    libc::SYS_readlink,
    libc::SYS_unlink,
    libc::SYS_mkdir,
    libc::SYS_chmod,
    libc::SYS_poll,
    libc::SYS_epoll_wait,
    libc::SYS_pipe,
    libc::SYS_access,
];

#[cfg(test)]
mod tests {
    #[test]
    fn the_control_thread_starts_threads_but_no_process_namespace_or_id_change() {
        // On a thread of its own: the filter stays with it (and the threads it starts).
        let (spawned, unshare, setuid, thread) = std::thread::spawn(|| {
            super::confine_control_thread(0).expect("confine");
            let spawned = std::process::Command::new("/bin/true").status();
            // SAFETY: unshare with a flag; refused by the filter.
            let unshare = unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0;
            // SAFETY: the raw call changes this thread's ids only (were it let through).
            let setuid = unsafe { libc::syscall(libc::SYS_setuid, 0) } == 0;
            let thread = std::thread::spawn(|| 7).join().ok();
            (spawned.is_ok(), unshare, setuid, thread)
        })
        .join()
        .expect("the confined thread");
        assert!(!spawned, "a process was started");
        assert!(!unshare, "a namespace was made");
        assert!(!setuid, "the ids could change");
        assert_eq!(thread, Some(7), "threads still start");
    }

    #[test]
    fn a_control_socket_thread_cannot_reach_the_guarded_descriptor() {
        // The launcher's socket in miniature: a socketpair whose one end is guarded. From a
        // thread under the control socket's filter, nothing reaches the other end through it
        // (EBADF), while another socket of the same kind still works, and the guarded end
        // survives an attempt to close it.
        use std::os::fd::AsRawFd;
        let (guarded, listener) = crate::socketpair(libc::SOCK_SEQPACKET).expect("socketpair");
        let (free, free_peer) = crate::socketpair(libc::SOCK_SEQPACKET).expect("socketpair");
        let (g, f) = (guarded.as_raw_fd(), free.as_raw_fd());
        let (write, send, close, other) = std::thread::spawn(move || {
            super::confine_guarding(super::Confined::ControlSocket, 0, Some(g)).expect("confine");
            let errno = |r: isize| if r < 0 { std::io::Error::last_os_error().raw_os_error() } else { None };
            // SAFETY: writes one byte from a live buffer to a descriptor number.
            let write = errno(unsafe { libc::write(g, b"x".as_ptr().cast(), 1) });
            // SAFETY: as above, through send.
            let send = errno(unsafe { libc::send(g, b"y".as_ptr().cast(), 1, 0) });
            // SAFETY: closing a number; refused by the guard.
            let close =
                if unsafe { libc::close(g) } < 0 { std::io::Error::last_os_error().raw_os_error() } else { None };
            // SAFETY: as the first write, on a descriptor that is not guarded.
            let other = errno(unsafe { libc::write(f, b"z".as_ptr().cast(), 1) });
            (write, send, close, other)
        })
        .join()
        .expect("the confined thread");
        assert_eq!((write, send, close), (Some(libc::EBADF), Some(libc::EBADF), Some(libc::EBADF)));
        assert_eq!(other, None, "another descriptor is still usable");
        let mut buf = [0u8; 4];
        // SAFETY: a non-blocking receive into a live buffer.
        let got = unsafe { libc::recv(listener.as_raw_fd(), buf.as_mut_ptr().cast(), 4, libc::MSG_DONTWAIT) };
        assert!(got < 0, "the guarded socket's peer got {got} byte(s)");
        // SAFETY: as above.
        let got = unsafe { libc::recv(free_peer.as_raw_fd(), buf.as_mut_ptr().cast(), 4, libc::MSG_DONTWAIT) };
        assert_eq!(got, 1, "the free socket's peer got its byte");
        // Still open: the guard refused the close.
        // SAFETY: F_GETFD on a number.
        assert!(unsafe { libc::fcntl(g, libc::F_GETFD) } >= 0, "the guarded descriptor was closed");
        drop(guarded);
    }
}
