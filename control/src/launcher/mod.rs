//! The launcher: the one process of an engine that keeps privileges once the engine has
//! dropped to its unprivileged user (`--runas`).
//!
//! It is forked at start, while the engine is still one thread and before anything reads a
//! control client's request, and answers a narrow typed request set over a `SOCK_SEQPACKET`
//! socketpair (one JSON record per request and reply; descriptors travel as `SCM_RIGHTS`):
//!
//! | request     | descriptors in            | what the launcher does                                   |
//! |-------------|---------------------------|----------------------------------------------------------|
//! | `own`       | —                         | remembers a socket file (the control socket) to remove at the end, if it is still that file |
//! | `direct_net`| —                         | makes a direct-mode VM's namespace (`netns`)              |
//! | `refence`   | —                         | has that namespace reject this host's current addresses   |
//! | `drop_net`  | —                         | removes the namespace                                     |
//! | `start`     | NIC (dgram), kernel, initrd, base (a cloud image) | checks a [`StartSpec`], makes a cloud image's seed and overlay (`provision`), starts the VMM as the VMM user, console in the state directory; answers with the console, read-only |
//! | `status`, `stop`, `kill`, `release`, `remove` | — | watches, ends and forgets a VMM it started (`remove`: and deletes its console) |
//! | `sockets`   | —                         | lists a VMM's sockets for the rogue detector (/proc/PID/fd needs ptrace rights over the VMM) |
//! | `fence_up`  | —                         | puts the kernel fence up for the engine's user (`fence`): table `inet omerta` |
//! | `fence_set` | —                         | makes a VM's endpoints its share of the fence's sets, each checked against its policy |
//!
//! It never opens a path a request names: the engine opens kernels and initrds (checked
//! against the image directories and the client's rights) and sends the open files; the
//! launcher checks that they are regular files. VMMs run only as the VMM user configured at
//! start (or a uid of the `--vmm-uid-base` range, by slot), never as a uid a request gives.
//! It keeps only the capabilities that work takes (see [`LAUNCHER_CAPS`]), ignores the stop
//! signals (the engine decides when to stop) and ends when the engine's end of the socket
//! closes, however the engine ended: every VMM killed, every namespace removed, owned files
//! unlinked. It is not under a seccomp filter: it starts programs, and filters are inherited
//! across exec (a VMM must not run under the engine's); QEMU runs under its own `-sandbox`.
//!
//! The module tree: `protocol` (the messages, [`StartSpec`] the one description of a VMM
//! start on the wire), `client` (the engine's side: [`Client`], [`RemoteVm`], [`Net`]),
//! `server` (the launcher's loop and its checks; a start becomes an `hv::VmSpec` there and
//! nowhere else), `provision` (a cloud image's seed volume and overlay), `users` (who VMMs
//! run as), `netns` (direct mode's namespaces), `fence` (the kernel fence: nftables).
#![forbid(unsafe_code)]

mod client;
mod disk;
mod fence;
mod netns;
mod protocol;
mod provision;
mod qmp;
mod server;
mod users;

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Arc;

use crate::caps::{Cap, CapSet};

pub use client::{Attached, BootFiles, Client, Error, LauncherInfo, Net, Nic, RemoteVm, VmFence};
pub use disk::Full;
pub use fence::{FenceError, FenceRule};
pub use netns::NetError;
pub use protocol::{HeldVm, StartSpec};
pub use provision::ProvisionError;
pub use server::Refusal;
pub use users::{default_engine_user, engine_user_for_children, give_to_engine_user, UserError, VMM_UID_RANGE};

/// The capabilities the launcher keeps: `CAP_KILL` (signal VMMs of other users),
/// `CAP_SETGID`/`CAP_SETUID` (start VMMs as their user), `CAP_NET_ADMIN` and `CAP_NET_RAW`
/// (`ip`, `iptables` for direct mode's namespaces, `nft` for the kernel fence), `CAP_DAC_READ_SEARCH` and
/// `CAP_SYS_PTRACE` (list and read a VMM's /proc/PID/fd, which is its user's), `CAP_SYS_ADMIN`
/// (network namespaces: `unshare`, `ip netns`, `nsenter`). Programs it runs hold no more
/// (no-new-privs caps them at its permitted set).
pub const LAUNCHER_CAPS: CapSet = CapSet::of(&[
    Cap::DacReadSearch,
    Cap::Kill,
    Cap::SetGid,
    Cap::SetUid,
    Cap::NetAdmin,
    Cap::NetRaw,
    Cap::SysPtrace,
    Cap::SysAdmin,
]);

/// What the launcher is given when it is forked.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The state directory: VMMs' consoles and disks go in its `launcher/vms/<id>` (none: no
    /// VMM starts).
    pub state_dir: Option<PathBuf>,
    /// How far disk grants may pass the state directory's room, in hundredths
    /// (`--disk-overcommit`; 100: not at all).
    pub disk_overcommit: u32,
    /// The user VMMs run as (`None`: the launcher's own).
    pub vmm_user: Option<hv::VmmUser>,
    /// With it, a VMM's uid and gid are this plus its slot.
    pub vmm_uid_base: Option<u32>,
    /// The control socket the engine binds after the fork: the one file the launcher removes
    /// at the end (if it is still the socket that was there at `own`).
    pub control: Option<PathBuf>,
    /// The engine's user, whom the kernel fence holds (`None`: `--kernel-fence=off`).
    pub fence: Option<u32>,
    /// The launcher outlives its engines (`--serve-launcher`): it keeps each VMM on an engine
    /// NIC, and that NIC's engine end, when its engine goes, for the next one to attach.
    pub durable: bool,
}

/// Forks the launcher and returns the engine's side. Refused (an error) unless the process
/// has one thread: the child of a multi-threaded fork may find a lock held forever.
pub fn spawn(setup: Setup) -> Result<Arc<Client>, Error> {
    let (ours, theirs) = sys::socketpair(libc::SOCK_SEQPACKET).map_err(Error::Socketpair)?;
    match sys::fork_single_threaded().map_err(Error::Fork)? {
        sys::Forked::Child => {
            drop(ours);
            // Nothing the engine had open comes along (other VMs' handles above all): VMMs
            // started from here inherit only what each is given.
            if let Err(e) = sys::close_fds_except(std::os::fd::AsRawFd::as_raw_fd(&theirs)) {
                engine::error!("launcher: closing inherited descriptors: {e}");
                std::process::exit(1);
            }
            server::serve(&theirs, &setup)
        }
        sys::Forked::Parent(pid) => {
            drop(theirs);
            // Code that took over a worker (which parses guest frames) or a control-socket
            // thread must not reach the launcher: the fence's sets change only on the control
            // thread's requests.
            sys::guard_from_workers(std::os::fd::AsFd::as_fd(&ours));
            Client::new(UnixDatagram::from(ours), pid)
        }
    }
}

/// Runs a launcher that outlives its engines (`omerta-engine --serve-launcher PATH`): binds
/// `path` (a `SOCK_SEQPACKET` socket, root's, 0600, in a directory made 0700 if missing; a
/// dead socket left there is replaced, a live one refused) and serves one engine at a time
/// until SIGTERM. Returns only an error of its start.
pub fn serve_engines(path: &std::path::Path, setup: &Setup, notify: &crate::notify::Notifier) -> Result<(), Error> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let at = |source: std::io::Error| Error::Listen { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::create_dir_all(dir).map_err(at)?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).map_err(at)?;
    }
    let addr = SockAddr::unix(path).map_err(at)?;
    if std::fs::symlink_metadata(path).is_ok() {
        let probe = Socket::new(Domain::UNIX, Type::SEQPACKET, None).map_err(at)?;
        if probe.connect(&addr).is_ok() {
            return Err(at(std::io::Error::new(std::io::ErrorKind::AddrInUse, "a launcher serves there already")));
        }
        if std::fs::symlink_metadata(path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
            std::fs::remove_file(path).map_err(at)?;
        }
    }
    let listener = Socket::new(Domain::UNIX, Type::SEQPACKET, None).map_err(at)?;
    listener.bind(&addr).map_err(at)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(at)?;
    listener.listen(8).map_err(at)?;
    engine::info!("launcher: listening at {}", path.display());
    server::serve_engines(&listener, setup, notify)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_launchers_capabilities_are_the_numbers_they_always_were() {
        // The bit numbers the launcher kept before capabilities had names.
        let old: u32 = 1 << 2 | 1 << 5 | 1 << 6 | 1 << 7 | 1 << 12 | 1 << 13 | 1 << 19 | 1 << 21;
        assert_eq!(LAUNCHER_CAPS.bits(), old);
    }
}
