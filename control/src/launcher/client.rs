//! The engine's side of the launcher: [`Client`] sends one request at a time and waits for
//! its answer; [`RemoteVm`] (a VMM the launcher started, as `hv::RunningVm`) and [`Net`] (a
//! direct-mode namespace) are handles whose drop has the launcher let go of what they name.
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::fence::FenceRule;
use super::protocol::{Envelope, HeldVm, NicKind, Reply, Request, StartSpec, ANSWER_WITHIN, CONSOLE_MAX, MAX_MESSAGE};

/// What went wrong talking to the launcher, or what it refused; one sentence each.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socketpair to the launcher could not be made.
    #[error("{}", engine::io::describe("launcher: socketpair", .0))]
    Socketpair(std::io::Error),
    /// The launcher's socket could not be served.
    #[error("launcher socket {}: {source}", path.display())]
    Listen {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The launcher's socket could not be reached.
    #[error("launcher socket {}: {source} (is omerta-engine --serve-launcher running? as root?)", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The launcher could not be forked.
    #[error("{}", engine::io::describe("launcher: fork", .0))]
    Fork(std::io::Error),
    /// The engine's end of the socket could not be set up.
    #[error("launcher: {0}")]
    Socket(std::io::Error),
    /// A thread panicked while it talked to the launcher.
    #[error("the launcher's channel is poisoned")]
    Poisoned,
    /// A request could not be encoded.
    #[error("{0}")]
    Encode(serde_json::Error),
    /// Sending or receiving failed: the launcher has ended.
    #[error("the launcher is gone ({0})")]
    Gone(std::io::Error),
    /// The launcher's end closed.
    #[error("the launcher is gone")]
    Closed,
    /// No answer within [`ANSWER_WITHIN`] (and a stop's grace period).
    #[error("the launcher did not answer in time")]
    Timeout,
    /// An answer that does not decode.
    #[error("the launcher's answer: {0}")]
    BadAnswer(serde_json::Error),
    /// An answer of the wrong kind.
    #[error("the launcher answered {0}")]
    Unexpected(String),
    /// The launcher refused: its own sentence.
    #[error("{0}")]
    Refused(String),
    /// A cloud image asked for on a NIC that is not the engine's.
    #[error("a cloud image's NIC is the engine's")]
    ImageNic,
    /// A cloud image without its base image, or a base image without a cloud image.
    #[error("a cloud image and its base image go together")]
    ImageBase,
}

/// How a guest's NIC is attached, as the engine hands it over.
#[derive(Debug)]
pub enum Nic {
    /// The engine's datagram socketpair: the VMM's end, and a copy of the engine's own (a
    /// launcher that outlives its engines keeps it for the next one).
    Dgram {
        /// The VMM's end.
        vmm: OwnedFd,
        /// A copy of the engine's end.
        engine: OwnedFd,
    },
    /// Direct mode: the VMM's user-mode NAT, in the namespace of this [`Net`].
    Direct(u64),
}

/// The files a start sends (open, for reading): the kernel, the initrd and, for a cloud
/// image ([`StartSpec::image`]), the base image.
#[derive(Debug, Clone, Copy)]
pub struct BootFiles<'a> {
    /// The kernel.
    pub kernel: &'a File,
    /// The initrd.
    pub initrd: &'a File,
    /// A cloud image's base disk.
    pub base: Option<&'a File>,
}

/// The engine's side of the launcher: requests go one at a time (a lock), each answered in
/// turn; an answer to an earlier request that timed out is recognised by its number and
/// skipped.
#[derive(Debug)]
pub struct Client {
    sock: Mutex<(UnixDatagram, u64)>,
    pid: u32,
}

impl Client {
    /// The engine's side over `sock`, to the launcher `pid`.
    pub(super) fn new(sock: UnixDatagram, pid: u32) -> Result<Arc<Self>, Error> {
        sock.set_read_timeout(Some(ANSWER_WITHIN)).map_err(Error::Socket)?;
        Ok(Arc::new(Client { sock: Mutex::new((sock, 0)), pid }))
    }

    /// The launcher's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// True once the launcher's end has closed (it ended: the kernel fence, and a forked
    /// launcher's VMMs, with it). Looks without waiting; a request under way is not touched.
    pub fn gone(&self) -> bool {
        let Ok(guard) = self.sock.try_lock() else { return false };
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        matches!(
            socket2::SockRef::from(&guard.0).recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT),
            Ok(0)
        )
    }

    fn call(&self, req: &Request, fds: &[BorrowedFd<'_>], grace: Duration) -> Result<(Reply, Vec<OwnedFd>), Error> {
        let mut guard = self.sock.lock().map_err(|_| Error::Poisoned)?;
        let (sock, seq) = &mut *guard;
        *seq += 1;
        let me = *seq;
        let msg = serde_json::to_vec(&Envelope { seq: me, body: req }).map_err(Error::Encode)?;
        sys::send_fds(sock.as_fd(), &msg, fds).map_err(Error::Gone)?;
        let _ = sock.set_read_timeout(Some(ANSWER_WITHIN + grace));
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let (n, fds) = sys::recv_fds(sock.as_fd(), &mut buf).map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Error::Timeout,
                _ => Error::Gone(e),
            })?;
            if n == 0 {
                return Err(Error::Closed);
            }
            let env: Envelope<Reply> = serde_json::from_slice(&buf[..n]).map_err(Error::BadAnswer)?;
            if env.seq < me {
                continue;
            }
            return match env.body {
                Reply::Error { message } => Err(Error::Refused(message)),
                r => Ok((r, fds)),
            };
        }
    }

    pub(super) fn done(&self, req: &Request) -> Result<(), Error> {
        match self.call(req, &[], Duration::ZERO)?.0 {
            Reply::Done => Ok(()),
            r => Err(Error::Unexpected(format!("{r:?}"))),
        }
    }

    /// Has the launcher remove the control socket (the path it was given at the fork) when the
    /// engine ends, if it is still the socket there now (the engine, once unprivileged, may not
    /// remove it).
    pub fn own(&self) -> Result<(), Error> {
        self.done(&Request::Own)
    }

    /// Has the launcher put the kernel fence up for the engine's user (an error: it could not;
    /// the engine then does not start).
    pub fn fence_up(&self) -> Result<(), Error> {
        self.done(&Request::FenceUp)
    }

    /// VM `vm`'s share of the kernel fence, empty until [`VmFence::set`]; it leaves the
    /// fence when dropped.
    pub fn vm_fence(self: &Arc<Self>, vm: &str, rule: FenceRule) -> VmFence {
        VmFence { client: Arc::clone(self), vm: vm.to_string(), rule, endpoints: Vec::new() }
    }

    /// Has the launcher end every VMM and namespace it holds and remove the files it owns;
    /// it then exits.
    pub fn finish(&self) -> Result<(), Error> {
        self.done(&Request::Finish)
    }

    /// Makes direct-mode VM `name`'s namespace (`lan`: it may reach private addresses).
    pub fn direct_net(self: &Arc<Self>, name: &str, lan: bool) -> Result<Net, Error> {
        match self.call(&Request::DirectNet { name: name.to_string(), lan }, &[], Duration::ZERO)?.0 {
            Reply::Net { net, path } => Ok(Net { client: Arc::clone(self), id: net, path }),
            r => Err(Error::Unexpected(format!("{r:?}"))),
        }
    }

    /// Starts the guest `spec` describes on `nic`, booting `files` (a cloud image: over
    /// `files.base`, with an overlay and a seed volume the launcher makes and that go with
    /// the VMM; its NIC must be the engine's, [`Nic::Dgram`]).
    pub fn start(self: &Arc<Self>, spec: StartSpec, nic: Nic, files: BootFiles<'_>) -> Result<RemoteVm, Error> {
        if spec.image.is_some() != files.base.is_some() {
            return Err(Error::ImageBase);
        }
        let (kind, nic_fds) = match &nic {
            Nic::Dgram { vmm, engine } => (NicKind::Dgram, vec![vmm.as_fd(), engine.as_fd()]),
            Nic::Direct(_) if spec.image.is_some() => return Err(Error::ImageNic),
            Nic::Direct(net) => (NicKind::Direct { net: *net }, Vec::new()),
        };
        let fds: Vec<BorrowedFd<'_>> = nic_fds
            .into_iter()
            .chain([files.kernel.as_fd(), files.initrd.as_fd()])
            .chain(files.base.map(AsFd::as_fd))
            .collect();
        let req = Request::Start { spec, nic: kind };
        debug_assert_eq!(fds.len(), req.descriptors());
        match self.call(&req, &fds, Duration::ZERO)? {
            (Reply::Started { id, pid, console: console_path, dir }, mut fds) if fds.len() == 1 => {
                let console = File::from(fds.remove(0));
                Ok(RemoteVm::new(self, id, pid, console, console_path, dir))
            }
            (r, _) => Err(Error::Unexpected(format!("{r:?} without the console"))),
        }
    }

    /// Connects to a launcher that outlives its engines (`omerta-engine --serve-launcher`) at
    /// `path`, as root (it serves no one else), and asks how it was set up.
    pub fn connect(path: &std::path::Path) -> Result<(Arc<Self>, LauncherInfo), Error> {
        use socket2::{Domain, SockAddr, Socket, Type};
        let at = |source: std::io::Error| Error::Connect { path: path.to_path_buf(), source };
        let sock = Socket::new(Domain::UNIX, Type::SEQPACKET, None).map_err(at)?;
        sock.connect(&SockAddr::unix(path).map_err(at)?).map_err(at)?;
        let fd = OwnedFd::from(sock);
        let (pid, uid, _) = sys::peer_cred(fd.as_fd()).map_err(at)?;
        // Only root's launcher: it gets guests' seeds (their private keys) and keeps the fence.
        if uid != 0 {
            return Err(at(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("served by uid {uid}, not root"),
            )));
        }
        // As for a forked launcher: no worker or control-socket thread may reach it.
        sys::guard_from_workers(fd.as_fd());
        let client = Client::new(UnixDatagram::from(fd), u32::try_from(pid).unwrap_or(0))?;
        let info = match client.call(&Request::Hello, &[], Duration::ZERO)?.0 {
            Reply::Hello { version, fence, vmm_uid, vmm_uid_base, durable, state_dir } => {
                LauncherInfo { version, fence, vmm_uid, vmm_uid_base, durable, state_dir }
            }
            r => return Err(Error::Unexpected(format!("{r:?}"))),
        };
        Ok((client, info))
    }

    /// The VMMs the launcher holds (a restarted engine attaches those it has records of).
    pub fn held(&self) -> Result<Vec<HeldVm>, Error> {
        let mut all = Vec::new();
        loop {
            let after = all.last().map_or(0, |h: &HeldVm| h.id);
            let page = match self.call(&Request::Held { after }, &[], Duration::ZERO)?.0 {
                Reply::Held { list } => list,
                r => return Err(Error::Unexpected(format!("{r:?}"))),
            };
            let full = page.len() >= super::protocol::HELD_PAGE;
            // Numbers only grow: a page that does not is a launcher's fault, not a loop.
            if page.first().is_some_and(|h| h.id <= after) {
                return Err(Error::Unexpected("held: numbers out of order".into()));
            }
            all.extend(page);
            if !full {
                return Ok(all);
            }
        }
    }

    /// Takes over VMM `id`, started for an engine before this one: the guest as a
    /// [`RemoteVm`] and the engine's end of its NIC.
    pub fn attach(self: &Arc<Self>, id: u64) -> Result<Attached, Error> {
        match self.call(&Request::Attach { id }, &[], Duration::ZERO)? {
            (Reply::Attached { pid, console: console_path, dir }, mut fds) if fds.len() == 2 => {
                let nic = fds.remove(1);
                let console = File::from(fds.remove(0));
                Ok(Attached { vm: RemoteVm::new(self, id, pid, console, console_path, dir), nic })
            }
            (r, _) => Err(Error::Unexpected(format!("{r:?} without the console and the NIC"))),
        }
    }

    /// Boots kept guest `id` (its VMM ended with a launcher before this one) again from its
    /// disk, as it was described at its start, on `nic`, with `kernel`, `initrd` and `base`
    /// (the base image its disk was made over).
    pub fn boot(
        self: &Arc<Self>,
        id: u64,
        nic: Nic,
        kernel: &File,
        initrd: &File,
        base: &File,
    ) -> Result<RemoteVm, Error> {
        let Nic::Dgram { vmm, engine } = &nic else { return Err(Error::ImageNic) };
        let fds = [vmm.as_fd(), engine.as_fd(), kernel.as_fd(), initrd.as_fd(), base.as_fd()];
        match self.call(&Request::Boot { id }, &fds, Duration::ZERO)? {
            (Reply::Started { id, pid, console: console_path, dir }, mut fds) if fds.len() == 1 => {
                let console = File::from(fds.remove(0));
                Ok(RemoteVm::new(self, id, pid, console, console_path, dir))
            }
            (r, _) => Err(Error::Unexpected(format!("{r:?} without the console"))),
        }
    }

    /// Has the launcher forget kept guest `id` and delete its directory (disk, seed).
    pub fn forget(&self, id: u64) -> Result<(), Error> {
        self.done(&Request::Remove { id })
    }
}

/// How a launcher serving engines was set up (its answer to `hello`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LauncherInfo {
    /// Its version.
    pub version: String,
    /// The uid its kernel fence holds (`None`: no fence).
    pub fence: Option<u32>,
    /// The uid VMMs run as (`None`: its own).
    pub vmm_uid: Option<u32>,
    /// The first uid of VMMs' own range, if one is set.
    pub vmm_uid_base: Option<u32>,
    /// Whether it keeps VMMs when an engine goes.
    pub durable: bool,
    /// Its state directory.
    pub state_dir: Option<PathBuf>,
}

/// A guest taken over from the engine before: it, and the engine's end of its NIC.
#[derive(Debug)]
pub struct Attached {
    /// The guest.
    pub vm: RemoteVm,
    /// The engine's end of its NIC (a datagram socket).
    pub nic: OwnedFd,
}

/// A VM's endpoints in the kernel fence's sets: what the engine's sockets may send to on its
/// behalf. Changed only by the control thread, which holds it; emptied when dropped.
#[derive(Debug)]
pub struct VmFence {
    client: Arc<Client>,
    vm: String,
    rule: FenceRule,
    endpoints: Vec<SocketAddrV4>,
}

impl VmFence {
    /// Makes `endpoints` (sorted, without repeats) the VM's share of the fence; an error
    /// (refused by the launcher's checks, or not done) leaves the share as it was.
    pub fn set(&mut self, endpoints: &[engine::filter::Endpoint]) -> Result<(), Error> {
        let mut eps: Vec<SocketAddrV4> = endpoints.iter().map(|e| SocketAddrV4::new(e.ip, e.port)).collect();
        eps.sort_unstable();
        eps.dedup();
        if eps == self.endpoints {
            return Ok(());
        }
        self.client.done(&Request::FenceSet { vm: self.vm.clone(), rule: self.rule, endpoints: eps.clone() })?;
        self.endpoints = eps;
        Ok(())
    }

    /// Takes the VM's endpoints out of the fence (its worker has stopped); a failure is
    /// logged, and the endpoints stay until the next change or the engine's end.
    pub fn clear(&mut self) {
        if let Err(e) = self.set(&[]) {
            engine::warn!("vm {}: kernel fence: its endpoints stay in the set: {e}", self.vm);
        }
    }

    /// How many endpoints of the VM the fence holds.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// True when it holds none.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }
}

impl Drop for VmFence {
    fn drop(&mut self) {
        if !self.endpoints.is_empty() {
            self.clear();
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
    console_path: PathBuf,
    /// Why the launcher last said the guest is paused (a host out of room), while it is.
    paused: Option<String>,
    exit: Option<hv::Exit>,
    status: Option<ExitStatus>,
    /// Left running for the next engine: dropping it releases nothing.
    detached: bool,
    /// Its directory's id (`STATE/launcher/vms/<dir>`).
    dir: String,
}

impl RemoteVm {
    fn new(client: &Arc<Client>, id: u64, pid: u32, console: File, console_path: PathBuf, dir: String) -> Self {
        RemoteVm {
            client: Arc::clone(client),
            id,
            pid,
            console,
            console_path,
            paused: None,
            exit: None,
            status: None,
            detached: false,
            dir,
        }
    }

    /// Its directory's id, which outlives the launcher (a kept guest is found by it).
    pub fn dir(&self) -> &str {
        &self.dir
    }

    /// The launcher's number for it (what an engine restored after a restart attaches).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Leaves the guest running, held by the launcher, for the next engine (this one is
    /// stopping): nothing is released.
    pub fn detach(mut self) {
        self.detached = true;
    }

    /// Why the guest is paused, as of the last status (`try_wait`): the host it runs on ran
    /// out of room for its disk.
    pub fn paused(&self) -> Option<&str> {
        self.paused.as_deref()
    }

    /// Where the launcher keeps its console (root's, 0600: read through the descriptor it
    /// gave; the path is for people).
    pub fn console_path(&self) -> &std::path::Path {
        &self.console_path
    }

    /// The VMM's sockets (for the rogue detector).
    pub fn sockets(&self) -> Result<Vec<crate::rogue::Connection>, Error> {
        match self.client.call(&Request::Sockets { id: self.id }, &[], Duration::ZERO)?.0 {
            Reply::Sockets { list } => Ok(list
                .into_iter()
                .filter_map(|s| {
                    let proto = crate::rogue::PROTOS.iter().find(|p| **p == s.proto)?;
                    Some(crate::rogue::Connection { proto, local: s.local, remote: s.remote })
                })
                .collect()),
            r => Err(Error::Unexpected(format!("{r:?}"))),
        }
    }

    /// At most `max` bytes of the console from `offset` on (what the guest printed since the
    /// last look), and the offset after them. An offset in the part the launcher freed
    /// (before the console's last [`CONSOLE_MAX`] bytes) skips to what is kept.
    pub fn console_from(&self, offset: u64, max: usize) -> (Vec<u8>, u64) {
        let len = self.console.metadata().map_or(0, |m| m.len());
        let offset = offset.max(len.saturating_sub(CONSOLE_MAX));
        let mut buf = vec![0u8; max];
        let n = self.console.read_at(&mut buf, offset).unwrap_or(0);
        buf.truncate(n);
        (buf, offset + n as u64)
    }

    /// Ends the VMM if it still runs and has the launcher forget it and delete its files
    /// (console, disk, seed).
    pub fn remove(self) {
        if let Err(e) = self.client.done(&Request::Remove { id: self.id }) {
            engine::warn!("guest pid {}: removing: {e}", self.pid);
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
            Ok((Reply::Status { wait_status: Some(raw), .. }, _)) => {
                self.paused = None;
                self.status = Some(ExitStatus::from_raw(raw));
            }
            Ok((Reply::Status { wait_status: None, paused }, _)) => self.paused = paused,
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
        // Read through the descriptor the launcher gave (the file is root's, 0600): what the
        // launcher keeps, its last CONSOLE_MAX bytes (a hole, read as zeros, may begin it).
        let len = self.console.metadata().map_or(0, |m| m.len());
        let start = len.saturating_sub(CONSOLE_MAX);
        let mut buf = vec![0u8; usize::try_from(len - start).unwrap_or(0)];
        let n = self.console.read_at(&mut buf, start).unwrap_or(0);
        buf.truncate(n);
        buf.retain(|b| *b != 0);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Drop for RemoteVm {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        let _ = self.client.done(&Request::Release { id: self.id });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_launcher_whose_end_closed_is_gone_and_a_live_one_is_not() {
        let (ours, theirs) = sys::socketpair(libc::SOCK_SEQPACKET).unwrap();
        let client = Client::new(UnixDatagram::from(ours), 1).unwrap();
        assert!(!client.gone(), "the launcher's end is open");
        drop(theirs);
        assert!(client.gone(), "the launcher's end closed");
    }
}
