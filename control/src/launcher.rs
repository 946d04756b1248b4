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
//! | `direct_net`| —                         | makes a direct-mode VM's namespace (`vmmnet`)             |
//! | `refence`   | —                         | has that namespace reject this host's current addresses   |
//! | `drop_net`  | —                         | removes the namespace                                     |
//! | `start`     | NIC (dgram), kernel, initrd | starts the VMM as the VMM user, console in the state directory; answers with the console, read-only |
//! | `status`, `stop`, `kill`, `release`, `remove` | — | watches, ends and forgets a VMM it started (`remove`: and deletes its console) |
//! | `sockets`   | —                         | lists a VMM's sockets for the rogue detector (/proc/PID/fd needs ptrace rights over the VMM) |
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
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The capabilities the launcher keeps (bit numbers): `CAP_KILL` (signal VMMs of other
/// users), `CAP_SETGID`/`CAP_SETUID` (start VMMs as their user), `CAP_NET_ADMIN` and
/// `CAP_NET_RAW` (`ip`, `iptables` for direct mode's namespaces), `CAP_DAC_READ_SEARCH` and
/// `CAP_SYS_PTRACE` (list and read a VMM's /proc/PID/fd, which is its user's), `CAP_SYS_ADMIN`
/// (network namespaces: `unshare`, `ip netns`, `nsenter`). Programs it runs hold no more
/// (no-new-privs caps them at its permitted set).
pub const LAUNCHER_CAPS: u32 = 1 << 2 | 1 << 5 | 1 << 6 | 1 << 7 | 1 << 12 | 1 << 13 | 1 << 19 | 1 << 21;

/// The user an engine started as root drops to when `--runas` names none: `omerta` where it
/// exists, else `nobody` (as passt does).
pub fn default_engine_user() -> Option<hv::VmmUser> {
    hv::VmmUser::lookup("omerta").or_else(|| hv::VmmUser::lookup("nobody"))
}

/// The user this process's engines run as when started without `--runas`: the default one
/// when this process is root, else none (an engine keeps its user). For test harnesses, which
/// make the directories engines write in.
pub fn engine_user_for_children() -> Option<hv::VmmUser> {
    (engine::io::effective_ids().0 == 0).then(default_engine_user).flatten()
}

/// Makes `path` (a directory an engine makes sockets in, or a VMM's socket it writes to) the
/// user's of engines this process starts (see [`engine_user_for_children`]).
pub fn give_to_engine_user(path: &std::path::Path) -> std::io::Result<()> {
    match engine_user_for_children() {
        Some(u) => std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid)),
        None => Ok(()),
    }
}

/// The largest request or reply.
const MAX_MESSAGE: usize = 64 * 1024;

/// The most VMMs and namespaces the launcher holds at once.
const MAX_HELD: usize = 4096;

/// The most sockets a `sockets` reply lists.
const MAX_SOCKETS: usize = 256;

/// How long the engine waits for an answer (a `stop` takes its grace period on top).
const ANSWER_WITHIN: Duration = Duration::from_secs(20);

/// What the launcher is given when it is forked.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Where consoles are written (the control socket's directory).
    pub state_dir: PathBuf,
    /// The user VMMs run as (`None`: the launcher's own).
    pub vmm_user: Option<hv::VmmUser>,
    /// With it, a VMM's uid and gid are this plus its slot.
    pub vmm_uid_base: Option<u32>,
    /// The control socket the engine binds after the fork: the one file the launcher removes
    /// at the end (if it is still the socket that was there at `own`).
    pub control: Option<PathBuf>,
}

/// How many uids `--vmm-uid-base` spans: a slot is below this.
pub const VMM_UID_RANGE: u32 = 65536;
/// The most vCPUs a guest is given.
const MAX_CPUS: u32 = 64;
/// The most memory a guest is given (MiB).
const MAX_MEMORY_MIB: u32 = 256 * 1024;
/// The longest kernel command line.
const MAX_CMDLINE: usize = 4096;
/// The most host addresses one `refence` names.
const MAX_HOST_ADDRS: usize = 256;

/// How a guest's NIC is attached, as the engine asks for it.
#[derive(Debug)]
pub enum Nic {
    /// The VMM's end of the engine's datagram socketpair.
    Dgram(OwnedFd),
    /// Direct mode: the VMM's user-mode NAT, in the namespace of this [`Net`].
    Direct(u64),
}

/// A guest to start (its kernel and initrd travel as open files).
#[derive(Debug)]
pub struct StartSpec {
    /// The VM's name (consoles are named after it).
    pub name: String,
    /// The kernel command line.
    pub cmdline: String,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub cpus: u32,
    /// The NIC's MAC address.
    pub mac: String,
    /// The NIC.
    pub nic: Nic,
    /// Its place in the `--vmm-uid-base` range, if one is set.
    pub uid_slot: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Own,
    DirectNet {
        name: String,
        lan: bool,
    },
    Refence {
        net: u64,
        name: String,
        host: Vec<Ipv4Addr>,
    },
    DropNet {
        net: u64,
    },
    Start {
        name: String,
        cmdline: String,
        memory_mib: u32,
        cpus: u32,
        mac: String,
        net: Option<u64>,
        uid_slot: Option<u32>,
    },
    StartImage {
        name: String,
        cmdline: String,
        memory_mib: u32,
        cpus: u32,
        mac: String,
        uid_slot: Option<u32>,
        seed: Box<hv::cloud::Seed>,
    },
    Status {
        id: u64,
    },
    Stop {
        id: u64,
        grace_ms: u64,
    },
    Kill {
        id: u64,
    },
    Release {
        id: u64,
    },
    Remove {
        id: u64,
    },
    Sockets {
        id: u64,
    },
    Finish,
}

/// How a VMM ended, on the wire.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Ended {
    Exited { code: Option<i32> },
    TimedOut,
    Killed,
}

impl From<hv::Exit> for Ended {
    fn from(e: hv::Exit) -> Self {
        match e {
            hv::Exit::Exited(code) => Ended::Exited { code },
            hv::Exit::TimedOut => Ended::TimedOut,
            hv::Exit::Killed => Ended::Killed,
        }
    }
}

impl From<Ended> for hv::Exit {
    fn from(e: Ended) -> Self {
        match e {
            Ended::Exited { code } => hv::Exit::Exited(code),
            Ended::TimedOut => hv::Exit::TimedOut,
            Ended::Killed => hv::Exit::Killed,
        }
    }
}

/// One socket of a VMM, on the wire.
#[derive(Debug, Serialize, Deserialize)]
struct Socket {
    proto: String,
    local: SocketAddr,
    remote: Option<SocketAddr>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case", deny_unknown_fields)]
enum Reply {
    Done,
    Net { net: u64, path: PathBuf },
    Started { id: u64, pid: u32 },
    Status { wait_status: Option<i32> },
    Ended { ended: Ended },
    Sockets { list: Vec<Socket> },
    Error { message: String },
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope<T> {
    seq: u64,
    body: T,
}

/// The engine's side of the launcher: requests go one at a time (a lock), each answered in
/// turn; an answer to an earlier request that timed out is recognised by its number and
/// skipped.
#[derive(Debug)]
pub struct Client {
    sock: Mutex<(UnixDatagram, u64)>,
    pid: u32,
}

/// Forks the launcher (call while the process has one thread) and returns the engine's side.
pub fn spawn(setup: Setup) -> Result<Arc<Client>, String> {
    let (ours, theirs) =
        engine::io::socketpair(libc::SOCK_SEQPACKET).map_err(|e| format!("launcher: socketpair: {e}"))?;
    match engine::io::fork_single_threaded().map_err(|e| format!("launcher: fork: {e}"))? {
        engine::io::Forked::Child => {
            drop(ours);
            // Nothing the engine had open comes along (other VMs' handles above all): VMMs
            // started from here inherit only what each is given.
            if let Err(e) = engine::io::close_fds_except(std::os::fd::AsRawFd::as_raw_fd(&theirs)) {
                engine::error!("launcher: closing inherited descriptors: {e}");
                std::process::exit(1);
            }
            serve(&theirs, &setup)
        }
        engine::io::Forked::Parent(pid) => {
            drop(theirs);
            let sock = UnixDatagram::from(ours);
            sock.set_read_timeout(Some(ANSWER_WITHIN)).map_err(|e| format!("launcher: {e}"))?;
            Ok(Arc::new(Client { sock: Mutex::new((sock, 0)), pid }))
        }
    }
}

impl Client {
    /// The launcher's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn call(&self, req: &Request, fds: &[BorrowedFd<'_>], grace: Duration) -> Result<(Reply, Vec<OwnedFd>), String> {
        let mut guard = self.sock.lock().map_err(|_| "the launcher's channel is poisoned".to_string())?;
        let (sock, seq) = &mut *guard;
        *seq += 1;
        let me = *seq;
        let msg = serde_json::to_vec(&Envelope { seq: me, body: req }).map_err(|e| e.to_string())?;
        engine::io::send_fds(sock.as_fd(), &msg, fds).map_err(|e| format!("the launcher is gone ({e})"))?;
        let _ = sock.set_read_timeout(Some(ANSWER_WITHIN + grace));
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let (n, fds) = engine::io::recv_fds(sock.as_fd(), &mut buf).map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    "the launcher did not answer in time".to_string()
                }
                _ => format!("the launcher is gone ({e})"),
            })?;
            if n == 0 {
                return Err("the launcher is gone".into());
            }
            let env: Envelope<Reply> =
                serde_json::from_slice(&buf[..n]).map_err(|e| format!("the launcher's answer: {e}"))?;
            if env.seq < me {
                continue;
            }
            return match env.body {
                Reply::Error { message } => Err(message),
                r => Ok((r, fds)),
            };
        }
    }

    fn done(&self, req: &Request) -> Result<(), String> {
        match self.call(req, &[], Duration::ZERO)?.0 {
            Reply::Done => Ok(()),
            r => Err(format!("the launcher answered {r:?}")),
        }
    }

    /// Has the launcher remove the control socket (the path it was given at the fork) when the
    /// engine ends, if it is still the socket there now (the engine, once unprivileged, may not
    /// remove it).
    pub fn own(&self) -> Result<(), String> {
        self.done(&Request::Own)
    }

    /// Has the launcher end every VMM and namespace it holds and remove the files it owns;
    /// it then exits.
    pub fn finish(&self) -> Result<(), String> {
        self.done(&Request::Finish)
    }

    /// Makes direct-mode VM `name`'s namespace (`lan`: it may reach private addresses).
    pub fn direct_net(self: &Arc<Self>, name: &str, lan: bool) -> Result<Net, String> {
        match self.call(&Request::DirectNet { name: name.to_string(), lan }, &[], Duration::ZERO)?.0 {
            Reply::Net { net, path } => Ok(Net { client: Arc::clone(self), id: net, path }),
            r => Err(format!("the launcher answered {r:?}")),
        }
    }

    /// Starts a guest booting `kernel` with `initrd`.
    pub fn start(self: &Arc<Self>, spec: StartSpec, kernel: &File, initrd: &File) -> Result<RemoteVm, String> {
        let (net, nic_fd) = match &spec.nic {
            Nic::Dgram(fd) => (None, Some(fd.as_fd())),
            Nic::Direct(net) => (Some(*net), None),
        };
        let req = Request::Start {
            name: spec.name,
            cmdline: spec.cmdline,
            memory_mib: spec.memory_mib,
            cpus: spec.cpus,
            mac: spec.mac,
            net,
            uid_slot: spec.uid_slot,
        };
        let fds: Vec<BorrowedFd<'_>> = nic_fd.into_iter().chain([kernel.as_fd(), initrd.as_fd()]).collect();
        self.started(&req, &fds)
    }

    /// Starts a cloud image: `kernel` and `initrd` booting a qcow2 overlay (made by the
    /// launcher, gone with the VMM) over `base`, with the NoCloud `seed` (likewise). The NIC
    /// must be a datagram socketpair's end ([`Nic::Dgram`]).
    pub fn start_image(
        self: &Arc<Self>,
        spec: StartSpec,
        [kernel, initrd, base]: [&File; 3],
        seed: hv::cloud::Seed,
    ) -> Result<RemoteVm, String> {
        let Nic::Dgram(nic) = &spec.nic else {
            return Err("a cloud image's NIC is the engine's".into());
        };
        let fds = [nic.as_fd(), kernel.as_fd(), initrd.as_fd(), base.as_fd()];
        let req = Request::StartImage {
            name: spec.name,
            cmdline: spec.cmdline,
            memory_mib: spec.memory_mib,
            cpus: spec.cpus,
            mac: spec.mac,
            uid_slot: spec.uid_slot,
            seed: Box::new(seed),
        };
        self.started(&req, &fds)
    }

    fn started(self: &Arc<Self>, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<RemoteVm, String> {
        match self.call(req, fds, Duration::ZERO)? {
            (Reply::Started { id, pid }, mut fds) if fds.len() == 1 => {
                let console = File::from(fds.remove(0));
                Ok(RemoteVm { client: Arc::clone(self), id, pid, console, exit: None, status: None })
            }
            (r, _) => Err(format!("the launcher answered {r:?} without the console")),
        }
    }
}

/// A direct-mode VM's namespace, held by the launcher; removed when dropped.
#[derive(Debug)]
pub struct Net {
    client: Arc<Client>,
    id: u64,
    path: PathBuf,
}

impl Net {
    /// Its number, for [`Nic::Direct`].
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The namespace's file (for messages).
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Has the namespace reject this host's addresses `host` (and no longer those it lost).
    pub fn refence(&self, vm: &str, host: &[Ipv4Addr]) {
        let req = Request::Refence { net: self.id, name: vm.to_string(), host: host.to_vec() };
        if let Err(e) = self.client.done(&req) {
            engine::warn!("vm {vm}: cannot fence this host's addresses off from its VMM: {e}");
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = self.client.done(&Request::DropNet { net: self.id });
    }
}

/// A guest the launcher started, as the engine sees it.
#[derive(Debug)]
pub struct RemoteVm {
    client: Arc<Client>,
    id: u64,
    pid: u32,
    console: File,
    exit: Option<hv::Exit>,
    status: Option<ExitStatus>,
}

impl RemoteVm {
    /// The VMM's sockets (for the rogue detector).
    pub fn sockets(&self) -> Result<Vec<crate::rogue::Connection>, String> {
        match self.client.call(&Request::Sockets { id: self.id }, &[], Duration::ZERO)?.0 {
            Reply::Sockets { list } => Ok(list
                .into_iter()
                .filter_map(|s| {
                    let proto = crate::rogue::PROTOS.iter().find(|p| **p == s.proto)?;
                    Some(crate::rogue::Connection { proto, local: s.local, remote: s.remote })
                })
                .collect()),
            r => Err(format!("the launcher answered {r:?}")),
        }
    }

    fn ended(&mut self, req: &Request, grace: Duration) -> hv::Exit {
        if let Some(e) = &self.exit {
            return e.clone();
        }
        let exit = match self.client.call(req, &[], grace) {
            Ok((Reply::Ended { ended }, _)) => ended.into(),
            Ok((r, _)) => {
                engine::warn!("launcher: unexpected answer {r:?}");
                hv::Exit::Killed
            }
            Err(e) => {
                engine::warn!("vm guest pid {}: {e}", self.pid);
                hv::Exit::Killed
            }
        };
        self.exit = Some(exit.clone());
        exit
    }
}

impl hv::RunningVm for RemoteVm {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn wait(&mut self) -> hv::Exit {
        loop {
            if let Some(s) = self.try_wait() {
                let exit = hv::Exit::Exited(s.code());
                self.exit.get_or_insert(exit.clone());
                return exit;
            }
            if self.exit.is_some() {
                return self.ended(&Request::Kill { id: self.id }, Duration::ZERO);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        match self.client.call(&Request::Status { id: self.id }, &[], Duration::ZERO) {
            Ok((Reply::Status { wait_status: Some(raw) }, _)) => self.status = Some(ExitStatus::from_raw(raw)),
            Ok(_) => {}
            Err(e) => {
                // The launcher is gone, and with it the VMM.
                engine::warn!("guest pid {}: {e}", self.pid);
                self.status = Some(ExitStatus::from_raw(9));
            }
        }
        self.status
    }

    fn stop(&mut self, grace: Duration) -> hv::Exit {
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        self.ended(&Request::Stop { id: self.id, grace_ms }, grace)
    }

    fn kill(&mut self) -> hv::Exit {
        self.ended(&Request::Kill { id: self.id }, Duration::ZERO)
    }

    fn console(&self) -> String {
        // Read through the descriptor the launcher gave (the file is root's, 0600), at most
        // the last 4 MiB.
        const MAX: u64 = 4 << 20;
        let len = self.console.metadata().map_or(0, |m| m.len());
        let start = len.saturating_sub(MAX);
        let mut buf = vec![0u8; usize::try_from(len - start).unwrap_or(0)];
        let n = self.console.read_at(&mut buf, start).unwrap_or(0);
        buf.truncate(n);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl RemoteVm {
    /// At most `max` bytes of the console from `offset` on (what the guest printed since the
    /// last look), and the offset after them.
    pub fn console_from(&self, offset: u64, max: usize) -> (Vec<u8>, u64) {
        let mut buf = vec![0u8; max];
        let n = self.console.read_at(&mut buf, offset).unwrap_or(0);
        buf.truncate(n);
        (buf, offset + n as u64)
    }

    /// Ends the VMM if it still runs and has the launcher forget it and delete its console.
    pub fn remove(self) {
        if let Err(e) = self.client.done(&Request::Remove { id: self.id }) {
            engine::warn!("guest pid {}: removing: {e}", self.pid);
        }
    }
}

impl Drop for RemoteVm {
    fn drop(&mut self) {
        let _ = self.client.done(&Request::Release { id: self.id });
    }
}

// The launcher's side.

/// A VMM the launcher started: the VMM, its uid slot, its console.
type Held = (Box<dyn hv::RunningVm>, Option<u32>, PathBuf);

struct Launcher<'a> {
    setup: &'a Setup,
    backend: Option<Box<dyn hv::Backend>>,
    /// VMMs with their uid slot and console.
    vms: HashMap<u64, Held>,
    nets: HashMap<u64, crate::vmmnet::VmmNet>,
    owned: Vec<(PathBuf, u64, u64)>,
    next: u64,
}

/// The launcher's loop: one request, one answer, until the engine's end closes.
fn serve(sock: &OwnedFd, setup: &Setup) -> ! {
    // The engine decides when to stop: a signal to the whole process group (^C) reaches it,
    // and it ends the VMMs here before it goes.
    if let Err(e) = engine::io::block_signals(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT]) {
        engine::warn!("launcher: cannot block stop signals: {e}");
    }
    if let Err(e) = engine::io::keep_capabilities(LAUNCHER_CAPS) {
        if engine::io::effective_ids().0 == 0 {
            engine::error!("launcher: cannot narrow its capabilities: {e}; ending");
            std::process::exit(1);
        }
    }
    remove_leftovers(&setup.state_dir);
    let mut l =
        Launcher { setup, backend: None, vms: HashMap::new(), nets: HashMap::new(), owned: Vec::new(), next: 1 };
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (n, fds) = match engine::io::recv_fds(sock.as_fd(), &mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                engine::warn!("launcher: a request was refused: {e}");
                continue;
            }
            Err(e) => {
                engine::error!("launcher: {e}; ending");
                break;
            }
        };
        if n == 0 {
            break;
        }
        let (seq, reply, out) = match serde_json::from_slice::<Envelope<Request>>(&buf[..n]) {
            Ok(Envelope { seq, body: Request::Finish }) => {
                l.finish();
                let msg = serde_json::to_vec(&Envelope { seq, body: Reply::Done }).unwrap_or_default();
                let _ = engine::io::send_fds(sock.as_fd(), &msg, &[]);
                std::process::exit(0)
            }
            Ok(env) => {
                let (reply, out) = l.handle(env.body, fds).unwrap_or_else(|message| (Reply::Error { message }, None));
                (env.seq, reply, out)
            }
            Err(e) => {
                // Answered under the request's number when it has one, so the engine does not
                // wait for an answer that never comes.
                let seq = serde_json::from_slice::<serde_json::Value>(&buf[..n])
                    .ok()
                    .and_then(|v| v.get("seq")?.as_u64())
                    .unwrap_or(0);
                (
                    seq,
                    Reply::Error {
                        message: format!("launcher: bad request (line {}, column {})", e.line(), e.column()),
                    },
                    None,
                )
            }
        };
        let msg = serde_json::to_vec(&Envelope { seq, body: reply }).unwrap_or_else(|_| {
            br#"{"seq":0,"body":{"reply":"error","message":"launcher: unencodable answer"}}"#.to_vec()
        });
        let fds: Vec<BorrowedFd<'_>> = out.iter().map(AsFd::as_fd).collect();
        if let Err(e) = engine::io::send_fds(sock.as_fd(), &msg, &fds) {
            engine::error!("launcher: answering: {e}; ending");
            break;
        }
    }
    l.finish();
    std::process::exit(0)
}

/// A VM name as consoles may carry it: what the engine's configuration accepts.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.')
}

/// Removes what an earlier launcher that died mid-way may have left of a VM's provisioning in
/// `dir` (seed files hold private keys): `omerta-*.seed.iso`, `omerta-*.seed.d`,
/// `omerta-*.overlay.qcow2`. Links are removed, never followed.
fn remove_leftovers(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let ours = name.starts_with("omerta-")
            && (name.ends_with(".seed.iso") || name.ends_with(".seed.d") || name.ends_with(".overlay.qcow2"));
        if !ours {
            continue;
        }
        let path = e.path();
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {
                let _ = std::fs::remove_dir_all(&path);
            }
            Ok(_) => {
                let _ = std::fs::remove_file(&path);
            }
            Err(_) => {}
        }
        engine::warn!("launcher: removed {} (left by an earlier launcher)", path.display());
    }
}

/// What every VMM is started with, checked by [`Launcher::start`].
struct Vmm {
    name: String,
    cmdline: String,
    memory_mib: u32,
    cpus: u32,
    mac: String,
    uid_slot: Option<u32>,
}

/// The engine's end of a VM's datagram socketpair, checked to be one.
fn dgram_nic(fd: OwnedFd) -> Result<hv::Nic, String> {
    let fd = std::os::fd::IntoRawFd::into_raw_fd(fd);
    let nic = engine::io::adopt_handle(fd, libc::SOCK_DGRAM)
        .map_err(|_| "launcher: the NIC is not a unix datagram socket".to_string())?;
    Ok(hv::Nic::DgramFd(nic))
}

/// The kernel or initrd must be a regular file the engine opened for reading (not an
/// `O_PATH` name of a file it could not read: the VMM opens it again, as its own user).
fn regular_file(fd: &OwnedFd, what: &str) -> Result<(), String> {
    if !engine::io::opened_for_reading(fd.as_fd()).unwrap_or(false) {
        return Err(format!("launcher: the {what} was not opened for reading"));
    }
    let f = File::from(fd.try_clone().map_err(|e| e.to_string())?);
    match f.metadata() {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!("launcher: the {what} is not a regular file")),
        Err(e) => Err(format!("launcher: the {what}: {e}")),
    }
}

impl Launcher<'_> {
    fn id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// Makes VM `name`'s overlay (over `base`) and seed in the state directory, opens them and
    /// unlinks them: (overlay read-write, overlay read-only, seed), 0600, held by nobody but the
    /// VMM that gets them.
    fn provision(
        &self,
        name: &str,
        seed: &hv::cloud::Seed,
        base: &OwnedFd,
    ) -> Result<(OwnedFd, OwnedFd, OwnedFd), String> {
        use std::os::unix::fs::DirBuilderExt;
        let size =
            File::from(base.try_clone().map_err(|e| e.to_string())?).metadata().map_err(|e| e.to_string())?.len();
        let dir = &self.setup.state_dir;
        let scratch = dir.join(format!("omerta-{name}.seed.d"));
        let overlay = dir.join(format!("omerta-{name}.overlay.qcow2"));
        let iso = dir.join(format!("omerta-{name}.seed.iso"));
        // Leftovers of a launcher that died mid-way, never followed if they are links.
        let _ = std::fs::remove_dir_all(&scratch);
        let _ = std::fs::remove_file(&overlay);
        let _ = std::fs::remove_file(&iso);
        std::fs::DirBuilder::new().mode(0o700).create(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
        let made = hv::cloud::write_iso(seed, &scratch, &iso);
        let _ = std::fs::remove_dir_all(&scratch);
        made.map_err(|e| format!("launcher: vm {name}: {e}"))?;
        let open = |p: &std::path::Path, write: bool| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(libc::O_NOFOLLOW)
                .open(p)
                .map_err(|e| format!("{}: {e}", p.display()))
        };
        let iso_file = open(&iso, false);
        let _ = std::fs::remove_file(&iso);
        let iso_file = iso_file?;
        hv::cloud::make_overlay("/dev/fdset/1", size, &overlay).map_err(|e| format!("launcher: vm {name}: {e}"))?;
        let (rw, ro) = (open(&overlay, true), open(&overlay, false));
        let _ = std::fs::remove_file(&overlay);
        Ok((OwnedFd::from(rw?), OwnedFd::from(ro?), OwnedFd::from(iso_file)))
    }

    /// Starts a VMM for `vmm` on `nic` booting `kernel` and `initrd` with `disks`, handing it
    /// `fdsets`; every value that reaches its command line is checked here.
    fn start(
        &mut self,
        vmm: Vmm,
        nic: hv::Nic,
        [kernel, initrd]: [OwnedFd; 2],
        disks: Vec<hv::Disk>,
        fdsets: Vec<(u32, OwnedFd)>,
    ) -> Result<(Reply, Option<OwnedFd>), String> {
        let Vmm { name, cmdline, memory_mib, cpus, mac, uid_slot } = vmm;
        let reboot = !disks.is_empty();
        if !valid_name(&name) {
            return Err("launcher: refused".into());
        }
        // Whoever sent them: a MAC is re-made from its six bytes, the command line is
        // printable ASCII.
        let mac: engine::wire::Mac = mac.parse().map_err(|_| "launcher: bad MAC".to_string())?;
        if !mac.is_unicast() {
            return Err("launcher: bad MAC".into());
        }
        if cmdline.len() > MAX_CMDLINE || !cmdline.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err("launcher: bad kernel command line".into());
        }
        if !(16..=MAX_MEMORY_MIB).contains(&memory_mib) || !(1..=MAX_CPUS).contains(&cpus) {
            return Err(format!("launcher: memory 16..={MAX_MEMORY_MIB} MiB and 1..={MAX_CPUS} vCPUs"));
        }
        regular_file(&kernel, "kernel")?;
        regular_file(&initrd, "initrd")?;
        // The user is the one configured at start (or a slot of its range that no other
        // VMM holds), never one a request names; and never root.
        let user = match (self.setup.vmm_uid_base, uid_slot) {
            (Some(base), Some(k)) => {
                if k >= VMM_UID_RANGE || self.vms.values().any(|(_, s, _)| *s == Some(k)) {
                    return Err(format!("launcher: uid slot {k} is not free"));
                }
                let id = base.checked_add(k).ok_or("launcher: bad slot")?;
                Some(hv::VmmUser { name: format!("uid {id}"), uid: id, gid: id })
            }
            _ => self.setup.vmm_user.clone(),
        };
        if engine::io::effective_ids().0 == 0 && user.as_ref().is_none_or(|u| u.uid == 0 || u.gid == 0) {
            return Err("launcher: VMMs never run as root".into());
        }
        for f in [&kernel, &initrd] {
            engine::io::set_inheritable(f.as_fd()).map_err(|e| e.to_string())?;
        }
        if self.backend.is_none() {
            let b = hv::new().map_err(|e| e.to_string())?;
            engine::info!("guests run on {} with {} ({})", b.name(), b.accel().name, b.accel().reason);
            self.backend = Some(b);
        }
        let backend = self.backend.as_ref().ok_or("no VM backend")?;
        let console = self.setup.state_dir.join(format!("omerta-{name}.console"));
        let fd_path = |f: &OwnedFd| PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(f)));
        let spec = hv::VmSpec {
            name,
            kernel: fd_path(&kernel),
            initrd: fd_path(&initrd),
            cmdline,
            memory_mib,
            cpus,
            nic,
            mac: mac.to_string(),
            console: console.clone(),
            timeout: Duration::from_secs(u64::from(u32::MAX)),
            user,
            disks,
            fdsets,
            reboot,
        };
        let vm = backend.start(spec).map_err(|e| e.to_string())?;
        drop((kernel, initrd));
        let read = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&console)
            .map_err(|e| format!("{}: {e}", console.display()))?;
        let (id, pid) = (self.id(), vm.pid());
        self.vms.insert(id, (vm, uid_slot.filter(|_| self.setup.vmm_uid_base.is_some()), console));
        Ok((Reply::Started { id, pid }, Some(OwnedFd::from(read))))
    }

    fn handle(&mut self, req: Request, mut fds: Vec<OwnedFd>) -> Result<(Reply, Option<OwnedFd>), String> {
        let expect = match &req {
            Request::StartImage { .. } => 4,
            Request::Start { net: None, .. } => 3,
            Request::Start { .. } => 2,
            _ => 0,
        };
        if fds.len() != expect {
            return Err(format!("launcher: {} descriptor(s) where {expect} belong", fds.len()));
        }
        let held = self.vms.len() + self.nets.len();
        match req {
            Request::Own => {
                let path = self.setup.control.clone().ok_or("launcher: no control socket to own")?;
                let m = std::fs::symlink_metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                if !m.file_type().is_socket() {
                    return Err(format!("{} is not a socket", path.display()));
                }
                if self.owned.is_empty() {
                    self.owned.push((path, m.dev(), m.ino()));
                }
                Ok((Reply::Done, None))
            }
            Request::DirectNet { name, lan } => {
                if !valid_name(&name) || held >= MAX_HELD {
                    return Err("launcher: refused".into());
                }
                let net = crate::vmmnet::VmmNet::create(&name, lan)?;
                let (id, path) = (self.id(), net.path());
                self.nets.insert(id, net);
                Ok((Reply::Net { net: id, path }, None))
            }
            Request::Refence { net, name, host } => {
                if !valid_name(&name) || host.len() > MAX_HOST_ADDRS {
                    return Err("launcher: refused".into());
                }
                let n = self.nets.get_mut(&net).ok_or("launcher: no such namespace")?;
                n.refence(&name, &host);
                Ok((Reply::Done, None))
            }
            Request::DropNet { net } => {
                self.nets.remove(&net);
                Ok((Reply::Done, None))
            }
            Request::Start { name, cmdline, memory_mib, cpus, mac, net, uid_slot } => {
                if held >= MAX_HELD {
                    return Err("launcher: refused".into());
                }
                let initrd = fds.pop().ok_or("launcher: no initrd")?;
                let kernel = fds.pop().ok_or("launcher: no kernel")?;
                let nic = match net {
                    Some(n) => hv::Nic::UserNat(Some(self.nets.get(&n).ok_or("launcher: no such namespace")?.path())),
                    None => dgram_nic(fds.pop().ok_or("launcher: no NIC")?)?,
                };
                let vmm = Vmm { name, cmdline, memory_mib, cpus, mac, uid_slot };
                self.start(vmm, nic, [kernel, initrd], Vec::new(), Vec::new())
            }
            Request::StartImage { name, cmdline, memory_mib, cpus, mac, uid_slot, seed } => {
                if held >= MAX_HELD {
                    return Err("launcher: refused".into());
                }
                let base = fds.pop().ok_or("launcher: no base image")?;
                let initrd = fds.pop().ok_or("launcher: no initrd")?;
                let kernel = fds.pop().ok_or("launcher: no kernel")?;
                let nic = dgram_nic(fds.pop().ok_or("launcher: no NIC")?)?;
                regular_file(&base, "base image")?;
                if !valid_name(&name) {
                    return Err("launcher: refused".into());
                }
                seed.check().map_err(|e| format!("launcher: {e}"))?;
                if seed.mac != mac {
                    return Err("launcher: the seed is for another MAC".into());
                }
                // The overlay and the seed exist only as the VMM's open files: made here,
                // opened, unlinked at once, so they go with the VMM whatever happens to the
                // engine or the launcher. The VMM takes them, and the base image, as
                // /dev/fdset/1 (base), 2 (overlay, whose backing file is /dev/fdset/1), 3 (seed).
                let (overlay, overlay_ro, iso) = self.provision(&name, &seed, &base)?;
                let disks = vec![
                    hv::Disk { path: "/dev/fdset/2".into(), format: "qcow2", read_only: false },
                    hv::Disk { path: "/dev/fdset/3".into(), format: "raw", read_only: true },
                ];
                let vmm = Vmm { name, cmdline, memory_mib, cpus, mac, uid_slot };
                let sets = vec![(1, base), (2, overlay), (2, overlay_ro), (3, iso)];
                self.start(vmm, nic, [kernel, initrd], disks, sets)
            }
            Request::Status { id } => {
                let (vm, _, _) = self.vms.get_mut(&id).ok_or("launcher: no such VMM")?;
                Ok((Reply::Status { wait_status: vm.try_wait().map(|s| s.into_raw()) }, None))
            }
            Request::Stop { id, grace_ms } => {
                let (vm, _, _) = self.vms.get_mut(&id).ok_or("launcher: no such VMM")?;
                let ended = vm.stop(Duration::from_millis(grace_ms.min(60_000))).into();
                Ok((Reply::Ended { ended }, None))
            }
            Request::Kill { id } => {
                let (vm, _, _) = self.vms.get_mut(&id).ok_or("launcher: no such VMM")?;
                Ok((Reply::Ended { ended: vm.kill().into() }, None))
            }
            Request::Release { id } => {
                // Dropping it kills a VMM still running and reaps it.
                self.vms.remove(&id);
                Ok((Reply::Done, None))
            }
            Request::Remove { id } => {
                // The same, and its console goes too (the file the launcher made for it).
                if let Some((vm, _, console)) = self.vms.remove(&id) {
                    drop(vm);
                    let _ = std::fs::remove_file(console);
                }
                Ok((Reply::Done, None))
            }
            Request::Finish => Ok((Reply::Done, None)),
            Request::Sockets { id } => {
                let (vm, _, _) = self.vms.get(&id).ok_or("launcher: no such VMM")?;
                let mut conns = crate::rogue::connections(vm.pid()).map_err(|e| e.to_string())?;
                // Connected sockets first: many to an allowed peer cannot push a rogue one out
                // of the list.
                conns.sort_by_key(|c| c.remote.is_none());
                let list = conns
                    .into_iter()
                    .take(MAX_SOCKETS)
                    .map(|c| Socket { proto: c.proto.to_string(), local: c.local, remote: c.remote })
                    .collect();
                Ok((Reply::Sockets { list }, None))
            }
        }
    }

    /// The engine is gone: every VMM ends, every namespace goes, owned files are removed.
    fn finish(&mut self) {
        self.vms.clear();
        self.nets.clear();
        for (path, dev, ino) in &self.owned {
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.dev() == *dev && m.ino() == *ino) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launcher(setup: &Setup) -> Launcher<'_> {
        Launcher { setup, backend: None, vms: HashMap::new(), nets: HashMap::new(), owned: Vec::new(), next: 1 }
    }

    fn start(mac: &str, cmdline: &str, memory_mib: u32, cpus: u32, uid_slot: Option<u32>) -> Request {
        Request::Start {
            name: "vm".into(),
            cmdline: cmdline.into(),
            memory_mib,
            cpus,
            mac: mac.into(),
            net: None,
            uid_slot,
        }
    }

    /// A NIC (a datagram socketpair end), and a kernel and an initrd (this test binary).
    fn fds() -> Vec<OwnedFd> {
        let (a, _b) = engine::io::socketpair(libc::SOCK_DGRAM).unwrap();
        let exe = std::env::current_exe().unwrap();
        vec![a, File::open(&exe).unwrap().into(), File::open(&exe).unwrap().into()]
    }

    #[test]
    fn a_start_request_reaches_no_vmm_unless_every_value_is_sane() {
        let setup = Setup {
            state_dir: std::env::temp_dir(),
            vmm_user: Some(hv::VmmUser { name: "t".into(), uid: 4242, gid: 4242 }),
            vmm_uid_base: Some(40_000),
            control: None,
        };
        let mut l = launcher(&setup);
        let mac = "52:54:00:12:34:56";
        let refused = |l: &mut Launcher<'_>, req: Request, fds: Vec<OwnedFd>| match l.handle(req, fds) {
            Err(e) => e,
            Ok((r, _)) => panic!("started: {r:?}"),
        };
        // QEMU options smuggled in the MAC or the command line, absurd sizes.
        let e = refused(&mut l, start("52:54:00:12:34:56,romfile=/etc/shadow", "x", 64, 1, None), fds());
        assert!(e.contains("bad MAC"), "{e}");
        assert!(refused(&mut l, start("ff:ff:ff:ff:ff:ff", "x", 64, 1, None), fds()).contains("bad MAC"));
        assert!(refused(&mut l, start(mac, "a\nb", 64, 1, None), fds()).contains("command line"));
        assert!(refused(&mut l, start(mac, "x", 64, 0, None), fds()).contains("vCPUs"));
        assert!(refused(&mut l, start(mac, "x", u32::MAX, 1, None), fds()).contains("MiB"));
        // A uid beyond the range the engine was given.
        assert!(refused(&mut l, start(mac, "x", 64, 1, Some(VMM_UID_RANGE)), fds()).contains("not free"));
        // The wrong number of descriptors, a NIC that is not a datagram socket, a kernel that
        // was not opened for reading.
        assert!(refused(&mut l, start(mac, "x", 64, 1, None), Vec::new()).contains("descriptor"));
        let mut f = fds();
        f[0] = File::open(std::env::current_exe().unwrap()).unwrap().into();
        assert!(refused(&mut l, start(mac, "x", 64, 1, None), f).contains("NIC"));
        let mut f = fds();
        let path_only = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(std::env::current_exe().unwrap())
            .unwrap();
        f[1] = path_only.into();
        assert!(refused(&mut l, start(mac, "x", 64, 1, None), f).contains("not opened for reading"));
        // A bad VM name never becomes a console path.
        let mut bad = start(mac, "x", 64, 1, None);
        if let Request::Start { name, .. } = &mut bad {
            *name = "../../etc/x".into();
        }
        assert!(refused(&mut l, bad, fds()).contains("refused"));
        assert!(l.vms.is_empty());
    }

    #[test]
    fn as_root_a_vmm_never_runs_as_root() {
        if engine::io::effective_ids().0 != 0 {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI runs the tests as root");
            return;
        }
        for user in [None, Some(hv::VmmUser { name: "root".into(), uid: 0, gid: 0 })] {
            let setup = Setup { state_dir: std::env::temp_dir(), vmm_user: user, vmm_uid_base: None, control: None };
            let mut l = launcher(&setup);
            let e = l.handle(start("52:54:00:12:34:56", "x", 64, 1, None), fds()).map(|_| ()).unwrap_err();
            assert!(e.contains("never run as root"), "{e}");
        }
    }
}
