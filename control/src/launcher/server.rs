//! The launcher's side: its loop (one request, one answer, until the engine's end closes)
//! and the handling of each request. A start is checked field by field here, whoever sent
//! it, and only then becomes an [`hv::VmSpec`].
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::Duration;

use super::disk::{self, Full, Room};
use super::fence::{Fence, FenceError};
use super::netns::{NetError, VmmNet};
use super::protocol::{
    Ended, Envelope, HeldVm, NicKind, Reply, Request, Socket, StartSpec, CONSOLE_MAX, HELD_PAGE, MAX_MESSAGE,
};
use super::provision::{self, BaseId, KeptFile, Layout, ProvisionError, VmDir};
use super::qmp;
use super::users::{self, UserError};
use super::{Setup, LAUNCHER_CAPS};

/// How often the launcher keeps its VMMs' consoles bounded.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// How often it asks each VMM whether its guest is paused (a host out of room).
const PAUSE_CHECK: Duration = Duration::from_secs(2);
/// How long a VMM whose monitor did not answer is left alone.
const MONITOR_QUIET: Duration = Duration::from_secs(30);
/// How often a paused guest is let go on while there is room again.
const CONT_EVERY: Duration = Duration::from_secs(10);

/// The most VMMs and namespaces the launcher holds at once.
const MAX_HELD: usize = 4096;
/// The most sockets a `sockets` reply lists.
const MAX_SOCKETS: usize = 256;
/// The most vCPUs a guest is given.
const MAX_CPUS: u32 = 64;
/// The most memory a guest is given (MiB).
const MAX_MEMORY_MIB: u32 = 256 * 1024;
/// The longest kernel command line.
const MAX_CMDLINE: usize = 4096;
/// The most host addresses one `refence` names.
const MAX_HOST_ADDRS: usize = 256;

/// Why the launcher refused a request; the sentence goes back to the engine as it is.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// A bad VM name, or more held than the launcher keeps.
    #[error("launcher: refused")]
    Refused,
    /// The request came with the wrong number of descriptors.
    #[error("launcher: {got} descriptor(s) where {expected} belong")]
    Descriptors {
        /// How many came.
        got: usize,
        /// How many belong.
        expected: usize,
    },
    /// No control socket was given at the fork.
    #[error("launcher: no control socket to own")]
    NoControl,
    /// The control socket's path is not (or no longer) a socket.
    #[error("{} is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No namespace of that number.
    #[error("launcher: no such namespace")]
    NoNamespace,
    /// No VMM of that number.
    #[error("launcher: no such VMM")]
    NoVmm,
    /// The MAC is not six bytes of a unicast address.
    #[error("launcher: bad MAC")]
    BadMac,
    /// The command line is too long or not printable ASCII.
    #[error("launcher: bad kernel command line")]
    BadCmdline,
    /// Memory or vCPUs out of range.
    #[error("launcher: memory 16..={MAX_MEMORY_MIB} MiB and 1..={MAX_CPUS} vCPUs")]
    Size,
    /// The NIC descriptor is not a unix datagram socket.
    #[error("launcher: the NIC is not a unix datagram socket")]
    Nic,
    /// `attach` of a VMM whose NIC the launcher does not keep (direct mode, or a launcher
    /// that ends with its engine).
    #[error("launcher: that VMM's NIC is not kept for another engine")]
    NotAttachable,
    /// A boot file was not opened for reading.
    #[error("launcher: the {0} was not opened for reading")]
    NotReadable(&'static str),
    /// A boot file is not a regular file.
    #[error("launcher: the {0} is not a regular file")]
    NotRegular(&'static str),
    /// A boot file's metadata could not be read.
    #[error("launcher: the {what}: {source}")]
    Stat {
        /// Which file.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A cloud image's seed failed its checks.
    #[error("launcher: {0}")]
    Seed(hv::cloud::SeedError),
    /// A cloud image's seed names another MAC than the VM's.
    #[error("launcher: the seed is for another MAC")]
    SeedMac,
    /// A cloud image on a NIC that is not the engine's.
    #[error("a cloud image's NIC is the engine's")]
    ImageNic,
    /// `boot` of a kept guest over another base image than the one its disk was made over,
    /// or with another kernel or initrd than it first booted.
    #[error("launcher: the image changed since this guest first booted (its disk boots only with the same base image, kernel and initrd)")]
    ImageChanged,
    /// The VMM's user.
    #[error(transparent)]
    User(#[from] UserError),
    /// A cloud image's disks.
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    /// The state directory cannot hold the disk.
    #[error(transparent)]
    Full(#[from] Full),
    /// A direct-mode namespace.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The VM backend: none, or it could not start the VMM.
    #[error("{0}")]
    Backend(hv::HvError),
    /// A descriptor could not be handed on.
    #[error("{0}")]
    Io(std::io::Error),
    /// The rogue detector's /proc reading.
    #[error("{0}")]
    Sockets(String),
    /// The kernel fence.
    #[error(transparent)]
    Fence(#[from] FenceError),
    /// No state directory was given at the fork (no control socket): no VMM starts.
    #[error("launcher: no state directory (the engine has no control socket)")]
    NoStateDir,
}

/// A VMM the launcher started. Dropped in this order: the VMM is killed and reaped, then its
/// directory (console, disk, seed) is removed.
struct Held {
    vm: Box<dyn hv::RunningVm>,
    /// The VM's name (for log lines).
    name: String,
    /// Its QMP monitor's socket (a cloud image's VMM).
    monitor: Option<PathBuf>,
    /// Why its guest is paused (the host ran out of room), while it is.
    paused: Option<String>,
    /// Its monitor is not asked before this (it did not answer).
    quiet_until: Option<std::time::Instant>,
    /// When it was last let go on.
    last_cont: Option<std::time::Instant>,
    /// Its uid slot, when VMMs have a uid range.
    slot: Option<u32>,
    /// The most its files may take: its disk filled, its seed and its console.
    charge: u64,
    /// Whether keeping its console bounded failed once (said once).
    console_failed: bool,
    /// The engine's end of its NIC, kept unread for the next engine (a launcher that
    /// outlives its engines, `Setup::durable`).
    engine_end: Option<OwnedFd>,
    /// Whether its directory describes it (a cloud guest): a launcher that outlives its
    /// engines keeps that directory when it stops, for the guest to boot again.
    described: bool,
    dir: VmDir,
}

/// A guest whose VMM ended with a launcher before this one, its directory kept: it boots
/// again from its disk on `boot`.
struct Kept {
    dir: VmDir,
    file: KeptFile,
}

/// A VMM just started, before it is held.
struct Spawned {
    vm: Box<dyn hv::RunningVm>,
    name: String,
    monitor: Option<PathBuf>,
    slot: Option<u32>,
    charge: u64,
    engine_end: Option<OwnedFd>,
    described: bool,
}

/// A VMM about to run: what `start` and `boot` have checked and made.
struct Launch {
    spec: StartSpec,
    mac: engine::wire::Mac,
    nic: hv::Nic,
    engine_end: Option<OwnedFd>,
    kernel: OwnedFd,
    initrd: OwnedFd,
    user: Option<hv::VmmUser>,
    disks: Vec<hv::Disk>,
    fdsets: Vec<(u32, OwnedFd)>,
    charge: u64,
    described: bool,
}

pub(super) struct Launcher<'a> {
    setup: &'a Setup,
    backend: Option<Box<dyn hv::Backend>>,
    /// The launcher's directories, made at the first start.
    layout: Option<Layout>,
    /// When its VMMs were last asked whether they are paused.
    last_pause_check: std::time::Instant,
    vms: HashMap<u64, Held>,
    /// Guests kept by a launcher before this one (no VMM runs).
    kept: HashMap<u64, Kept>,
    nets: HashMap<u64, VmmNet>,
    owned: Vec<(PathBuf, u64, u64)>,
    next: u64,
    fence: Option<Fence>,
    /// The number of the engine's `finish`, answered once every VMM has ended.
    finish_seq: u64,
}

/// How serving one engine ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The engine asked for `finish` (answered).
    Finish,
    /// Its end closed, or the connection failed.
    Closed,
    /// The launcher was asked to stop (a service's SIGTERM).
    Stop,
}

/// Drops capabilities but [`LAUNCHER_CAPS`]: an error ends a root launcher.
fn narrow_capabilities() {
    if let Err(e) = sys::keep_capabilities(LAUNCHER_CAPS.bits()) {
        if sys::effective_ids().0 == 0 {
            engine::error!("launcher: cannot narrow its capabilities: {e}; ending");
            std::process::exit(1);
        }
    }
}

/// The forked launcher's loop: one request, one answer, until the engine's end closes; then
/// every VMM ends and the launcher exits.
pub(super) fn serve(sock: &OwnedFd, setup: &Setup) -> ! {
    // The engine decides when to stop: a signal to the whole process group (^C) reaches it,
    // and it ends the VMMs here before it goes.
    if let Err(e) = sys::block_signals(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT]) {
        engine::warn!("launcher: cannot block stop signals: {e}");
    }
    narrow_capabilities();
    let mut l = Launcher::new(setup);
    l.remove_leftovers();
    let end = serve_one(sock, &mut l, None, None);
    l.finish();
    if end == End::Finish {
        let msg = serde_json::to_vec(&Envelope { seq: l.finish_seq, body: Reply::Done }).unwrap_or_default();
        let _ = sys::send_fds(sock.as_fd(), &msg, &[]);
    }
    std::process::exit(0)
}

/// A launcher that outlives its engines (`omerta-engine --serve-launcher PATH`): it accepts
/// one engine at a time on `listener` (root's connections only), serves it, and when that
/// engine goes keeps every VMM on an engine NIC running, its NIC's engine end held unread
/// for the next engine (`attach`). Direct mode's VMMs and namespaces end with the engine that
/// asked for them. SIGTERM or SIGINT ends every VMM, takes the fence down, and exits.
pub(super) fn serve_engines(listener: &socket2::Socket, setup: &Setup, notify: &crate::notify::Notifier) -> ! {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [libc::SIGINT, libc::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, std::sync::Arc::clone(&stop)) {
            engine::error!("launcher: cannot catch signal {sig}: {e}; ending");
            std::process::exit(1);
        }
    }
    narrow_capabilities();
    let mut l = Launcher::new(setup);
    l.remove_leftovers();
    if let Err(e) = listener.set_read_timeout(Some(HOUSEKEEPING)) {
        engine::error!("launcher: {e}; ending");
        std::process::exit(1);
    }
    let stopping = || stop.load(std::sync::atomic::Ordering::Relaxed);
    let mut last = std::time::Instant::now();
    notify.send("READY=1");
    engine::info!("launcher: serving engines; VMMs outlive them");
    while !stopping() {
        if last.elapsed() >= HOUSEKEEPING {
            l.housekeep();
            last = std::time::Instant::now();
        }
        let conn = match listener.accept() {
            Ok((c, _)) => OwnedFd::from(c),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                engine::error!("launcher: accepting an engine: {e}");
                std::thread::sleep(HOUSEKEEPING);
                continue;
            }
        };
        match sys::peer_cred(conn.as_fd()) {
            Ok((pid, 0, _)) => engine::info!("launcher: serving the engine of pid {pid}"),
            Ok((pid, uid, _)) => {
                engine::warn!("launcher: refused a connection of uid {uid} (pid {pid}): only root's engine is served");
                continue;
            }
            Err(e) => {
                engine::warn!("launcher: refused a connection whose peer is unknown: {e}");
                continue;
            }
        }
        match serve_one(&conn, &mut l, Some(listener), Some(&stop)) {
            End::Finish => {
                l.finish_vms();
                let msg = serde_json::to_vec(&Envelope { seq: l.finish_seq, body: Reply::Done }).unwrap_or_default();
                let _ = sys::send_fds(conn.as_fd(), &msg, &[]);
                engine::info!("launcher: its engine asked every VMM to end");
            }
            End::Closed => {
                let kept = l.detach();
                engine::info!(
                    "launcher: the engine went; {kept} VMM(s) kept running for the next one, without network"
                );
            }
            End::Stop => {}
        }
    }
    notify.send("STOPPING=1");
    engine::info!("launcher: stopping: every VMM ends; cloud guests' disks are kept to boot again");
    l.keep_described();
    l.finish();
    std::process::exit(0)
}

/// Serves one engine on `sock`: one request, one answer, until it closes or asks to finish
/// (or `stop` is set). With `listener`, any other engine that connects meanwhile is refused.
fn serve_one(
    sock: &OwnedFd,
    l: &mut Launcher<'_>,
    listener: Option<&socket2::Socket>,
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> End {
    // The loop wakes at least once a second for its housekeeping (consoles kept bounded).
    if let Err(e) = socket2::SockRef::from(sock).set_read_timeout(Some(HOUSEKEEPING)) {
        engine::warn!("launcher: no housekeeping tick ({e}): consoles are not bounded");
    }
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut last = std::time::Instant::now();
    loop {
        if stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed)) {
            return End::Stop;
        }
        if last.elapsed() >= HOUSEKEEPING {
            l.housekeep();
            if let Some(listener) = listener {
                refuse_others(listener);
            }
            last = std::time::Instant::now();
        }
        let (n, fds) = match sys::recv_fds(sock.as_fd(), &mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                engine::warn!("launcher: a request was refused: {e}");
                continue;
            }
            Err(e) => {
                engine::error!("launcher: {e}; the engine is gone");
                return End::Closed;
            }
        };
        if n == 0 {
            return End::Closed;
        }
        let (seq, reply, out) = match serde_json::from_slice::<Envelope<Request>>(&buf[..n]) {
            Ok(Envelope { seq, body: Request::Finish }) => {
                l.finish_seq = seq;
                return End::Finish;
            }
            Ok(env) => {
                let (reply, out) =
                    l.handle(env.body, fds).unwrap_or_else(|e| (Reply::Error { message: e.to_string() }, Vec::new()));
                (env.seq, reply, out)
            }
            Err(e) => {
                // Answered under the request's number when it has one, so the engine does not
                // wait for an answer that never comes.
                let seq = serde_json::from_slice::<serde_json::Value>(&buf[..n])
                    .ok()
                    .and_then(|v| v.get("seq")?.as_u64())
                    .unwrap_or(0);
                let message = format!("launcher: bad request (line {}, column {})", e.line(), e.column());
                (seq, Reply::Error { message }, Vec::new())
            }
        };
        let msg = serde_json::to_vec(&Envelope { seq, body: reply }).unwrap_or_else(|_| {
            br#"{"seq":0,"body":{"reply":"error","message":"launcher: unencodable answer"}}"#.to_vec()
        });
        let fds: Vec<BorrowedFd<'_>> = out.iter().map(AsFd::as_fd).collect();
        if let Err(e) = sys::send_fds(sock.as_fd(), &msg, &fds) {
            engine::error!("launcher: answering: {e}; the engine is gone");
            return End::Closed;
        }
    }
}

/// One engine at a time: a second that connects while one is served is closed at once (its
/// first request fails: "the launcher is gone"), said in one line.
fn refuse_others(listener: &socket2::Socket) {
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    while let Ok((c, _)) = listener.accept() {
        let who = sys::peer_cred(c.as_fd()).map_or_else(|_| "?".to_string(), |(pid, _, _)| pid.to_string());
        engine::warn!("launcher: refused an engine (pid {who}): it serves another");
    }
    let _ = listener.set_nonblocking(false);
}

/// A VM name as consoles may carry it: what the engine's configuration accepts.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.')
}

/// A start's files, last in `fds`: the kernel, the initrd and (`image`) the base image, each
/// a regular file opened for reading.
fn boot_files(fds: &mut Vec<OwnedFd>, image: bool) -> Result<(OwnedFd, OwnedFd, Option<OwnedFd>), Refusal> {
    let missing = || Refusal::Descriptors { got: 0, expected: 1 };
    let base = if image { Some(fds.pop().ok_or_else(missing)?) } else { None };
    let initrd = fds.pop().ok_or_else(missing)?;
    let kernel = fds.pop().ok_or_else(missing)?;
    regular_file(&kernel, "kernel")?;
    regular_file(&initrd, "initrd")?;
    if let Some(b) = &base {
        regular_file(b, "base image")?;
    }
    Ok((kernel, initrd, base))
}

/// A cloud guest's drives and the descriptors behind them: `/dev/fdset/1` the base, 2 the
/// overlay (whose backing file is /dev/fdset/1), 3 the seed.
fn cloud_disks(base: OwnedFd, d: provision::Disks) -> (Vec<hv::Disk>, Vec<(u32, OwnedFd)>) {
    let disks = vec![
        hv::Disk { path: "/dev/fdset/2".into(), format: "qcow2", read_only: false },
        hv::Disk { path: "/dev/fdset/3".into(), format: "raw", read_only: true },
    ];
    (disks, vec![(1, base), (2, d.overlay), (2, d.overlay_ro), (3, d.seed)])
}

/// A datagram NIC's two ends, first in `fds`: the VMM's and the engine's, each checked to be
/// a datagram socket.
fn nic_pair(fds: &mut Vec<OwnedFd>) -> Result<(hv::Nic, OwnedFd), Refusal> {
    if fds.len() < 2 {
        return Err(Refusal::Descriptors { got: fds.len(), expected: 2 });
    }
    let vmm = dgram_nic(fds.remove(0))?;
    let engine_end = fds.remove(0);
    if socket2::SockRef::from(&engine_end).r#type().ok() != Some(socket2::Type::DGRAM) {
        return Err(Refusal::Nic);
    }
    Ok((vmm, engine_end))
}

/// The engine's end of a VM's datagram socketpair, checked to be one.
fn dgram_nic(fd: OwnedFd) -> Result<hv::Nic, Refusal> {
    let fd = std::os::fd::IntoRawFd::into_raw_fd(fd);
    let nic = engine::io::adopt_handle(fd, libc::SOCK_DGRAM).map_err(|_| Refusal::Nic)?;
    Ok(hv::Nic::DgramFd(nic))
}

/// The kernel or initrd must be a regular file the engine opened for reading (not an
/// `O_PATH` name of a file it could not read: the VMM opens it again, as its own user).
fn regular_file(fd: &OwnedFd, what: &'static str) -> Result<(), Refusal> {
    if !sys::opened_for_reading(fd.as_fd()).unwrap_or(false) {
        return Err(Refusal::NotReadable(what));
    }
    let f = File::from(fd.try_clone().map_err(Refusal::Io)?);
    match f.metadata() {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(Refusal::NotRegular(what)),
        Err(source) => Err(Refusal::Stat { what, source }),
    }
}

/// A start's values, checked: the MAC re-made from its six bytes, the command line printable
/// ASCII, sizes in range, the name one a console path may carry.
fn check(spec: &StartSpec) -> Result<engine::wire::Mac, Refusal> {
    if !valid_name(&spec.name) {
        return Err(Refusal::Refused);
    }
    let mac: engine::wire::Mac = spec.mac.parse().map_err(|_| Refusal::BadMac)?;
    if !mac.is_unicast() {
        return Err(Refusal::BadMac);
    }
    if spec.cmdline.len() > MAX_CMDLINE || !spec.cmdline.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(Refusal::BadCmdline);
    }
    if !(16..=MAX_MEMORY_MIB).contains(&spec.memory_mib) || !(1..=MAX_CPUS).contains(&spec.cpus) {
        return Err(Refusal::Size);
    }
    if let Some(seed) = &spec.image {
        seed.check().map_err(Refusal::Seed)?;
        if seed.mac != spec.mac {
            return Err(Refusal::SeedMac);
        }
    }
    Ok(mac)
}

impl<'a> Launcher<'a> {
    pub(super) fn new(setup: &'a Setup) -> Self {
        Launcher {
            setup,
            backend: None,
            layout: None,
            last_pause_check: std::time::Instant::now(),
            vms: HashMap::new(),
            kept: HashMap::new(),
            nets: HashMap::new(),
            owned: Vec::new(),
            next: 1,
            fence: setup.fence.map(Fence::new),
            finish_seq: 0,
        }
    }

    fn id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// What a launcher before this one left in the state directory, removed: its VMMs ended
    /// with it, their files go (nothing here resumes a VM yet).
    fn remove_leftovers(&mut self) {
        let Some(state) = &self.setup.state_dir else { return };
        let old = self.setup.control.as_deref().and_then(std::path::Path::parent);
        if !state.join("launcher").exists() {
            if let Some(old) = old {
                Layout::remove_old_files(old);
            }
            return;
        }
        match Layout::prepare(state) {
            // A launcher that outlives its engines keeps what a launcher before it kept: each
            // cloud guest boots again from its disk when its engine asks (`boot`).
            Ok(layout) if self.setup.durable => {
                for (dir, file) in layout.kept() {
                    let id = self.id();
                    engine::info!(
                        "launcher: vm {}: kept from before ({}): its disk waits to boot again",
                        file.spec.name,
                        dir.id()
                    );
                    self.kept.insert(id, Kept { dir, file });
                }
                if let Some(old) = old {
                    Layout::remove_old_files(old);
                }
                self.layout = Some(layout);
            }
            Ok(layout) => {
                layout.remove_leftovers(old);
                self.layout = Some(layout);
            }
            Err(e) => engine::error!("launcher: {e}; no VM starts"),
        }
    }

    /// The launcher's directories, made (and checked) the first time.
    fn layout(&mut self) -> Result<&Layout, Refusal> {
        if self.layout.is_none() {
            let state = self.setup.state_dir.as_ref().ok_or(Refusal::NoStateDir)?;
            self.layout = Some(Layout::prepare(state)?);
        }
        self.layout.as_ref().ok_or(Refusal::NoStateDir)
    }

    /// Refused unless the state directory can hold `charge` more bytes besides everything
    /// already granted (see `disk::admit`).
    fn admit(&mut self, charge: u64) -> Result<(), Refusal> {
        let ratio = self.setup.disk_overcommit;
        let state = self.setup.state_dir.clone().ok_or(Refusal::NoStateDir)?;
        let layout = self.layout()?.clone();
        let available =
            sys::fs_available(layout.vms()).map_err(|source| Refusal::File { path: state.clone(), source })?;
        // Kept guests count as if they ran: their disks may fill when they boot again.
        let room = Room {
            available,
            allocated: self
                .vms
                .values()
                .map(|h| h.dir.allocated())
                .chain(self.kept.values().map(|k| k.dir.allocated()))
                .fold(0u64, u64::saturating_add),
            granted: self
                .vms
                .values()
                .map(|h| h.charge)
                .chain(self.kept.values().map(|k| k.file.charge))
                .fold(0u64, u64::saturating_add),
        };
        Ok(disk::admit(room, charge, ratio, &state.display().to_string())?)
    }

    /// Whether uid slot `slot` is another VMM's, or a kept guest's (but `except`'s), which
    /// boots again with it.
    fn slot_taken(&self, slot: u32, except: Option<u64>) -> bool {
        self.vms.values().any(|h| h.slot == Some(slot))
            || self.kept.iter().any(|(id, k)| Some(*id) != except && k.file.spec.uid_slot == Some(slot))
    }

    /// Starts the VMM `spec` asks for on `nic` with `fds` (the NIC's, if any, already taken:
    /// kernel, initrd and, for a cloud image, the base image). Every value that reaches the
    /// VMM's command line is checked here.
    fn start(
        &mut self,
        spec: StartSpec,
        nic: hv::Nic,
        engine_end: Option<OwnedFd>,
        mut fds: Vec<OwnedFd>,
    ) -> Result<(Reply, Vec<OwnedFd>), Refusal> {
        let mac = check(&spec)?;
        let (kernel, initrd, base) = boot_files(&mut fds, spec.image.is_some())?;
        // The user is the one configured at start (or a slot of its range that no other
        // VMM holds), never one a request names; and never root.
        let user = users::vmm_user(self.setup, spec.uid_slot, |s| self.slot_taken(s, None))?;
        // A cloud image's disk has the size granted (at least the image's), and is admitted
        // only if the state directory can hold it filled, with every disk granted before.
        let disk_size = match (&spec.image, &base) {
            (Some(_), Some(base)) => Some(provision::disk_bytes(base, spec.disk_mb)?),
            _ => None,
        };
        let disk_most = match disk_size {
            Some(size) => {
                hv::cloud::measure(size).map_err(|source| ProvisionError::Make { vm: spec.name.clone(), source })?
            }
            None => 0,
        };
        let charge = disk_most.saturating_add(disk::FILES_ALLOWANCE);
        self.admit(charge)?;
        let dir = self.layout()?.new_vm()?;
        // A cloud image: the overlay and the seed are files of the VMM's directory, which goes
        // when the VMM is released, removed, or the launcher ends. The VMM takes them, and
        // the base image, as /dev/fdset/1 (base), 2 (overlay, whose backing file is
        // /dev/fdset/1), 3 (seed). The directory describes its guest (`vm.json`), so that it
        // can boot again from its disk after this launcher.
        let (disks, fdsets, described) = match (&spec.image, base, disk_size) {
            (Some(seed), Some(base), Some(size)) => {
                // Only a launcher that outlives its engines boots a guest again.
                if self.setup.durable {
                    let (kernel_sha256, initrd_sha256) = (provision::sha256(&kernel)?, provision::sha256(&initrd)?);
                    let base_id = BaseId::of(&base)?;
                    dir.describe(&KeptFile {
                        spec: spec.clone(),
                        base: base_id,
                        charge,
                        kernel_sha256,
                        initrd_sha256,
                    })?;
                }
                let d = provision::make(&dir, &spec.name, seed, size)?;
                let (disks, fdsets) = cloud_disks(base, d);
                (disks, fdsets, self.setup.durable)
            }
            _ => (Vec::new(), Vec::new(), false),
        };
        let launch = Launch { spec, mac, nic, engine_end, kernel, initrd, user, disks, fdsets, charge, described };
        self.run(launch, dir).map_err(|(e, _)| e)
    }

    /// Boots kept guest `id` again from its disk, as it was described at its start, on `nic`
    /// with `fds` (kernel, initrd, base image: the same base, by identity, as its disk's).
    /// Refused: it stays kept.
    fn boot(
        &mut self,
        id: u64,
        nic: hv::Nic,
        engine_end: Option<OwnedFd>,
        mut fds: Vec<OwnedFd>,
    ) -> Result<(Reply, Vec<OwnedFd>), Refusal> {
        let k = self.kept.get(&id).ok_or(Refusal::NoVmm)?;
        let spec = k.file.spec.clone();
        let mac = check(&spec)?;
        let (kernel, initrd, base) = boot_files(&mut fds, true)?;
        let base = base.ok_or(Refusal::Descriptors { got: 0, expected: 1 })?;
        let same = BaseId::of(&base)? == k.file.base
            && provision::sha256(&kernel)? == k.file.kernel_sha256
            && provision::sha256(&initrd)? == k.file.initrd_sha256;
        if !same {
            return Err(Refusal::ImageChanged);
        }
        // Its own slot is free again; another kept guest's is not.
        let user = users::vmm_user(self.setup, spec.uid_slot, |s| self.slot_taken(s, Some(id)))?;
        let d = k.dir.reopen()?;
        let Some(k) = self.kept.remove(&id) else { return Err(Refusal::NoVmm) };
        let (disks, fdsets) = cloud_disks(base, d);
        let charge = k.file.charge;
        engine::info!("launcher: vm {}: booting again from its disk ({})", spec.name, k.dir.id());
        let launch =
            Launch { spec, mac, nic, engine_end, kernel, initrd, user, disks, fdsets, charge, described: true };
        // A boot that fails leaves the guest kept, its disk as it was.
        self.run(launch, k.dir).map_err(|(e, dir)| {
            if let Some(dir) = dir {
                self.kept.insert(id, Kept { dir, file: k.file });
            }
            e
        })
    }

    /// Runs a VMM `start` or `boot` made ready, in `dir`; refused, the directory comes back
    /// with the refusal.
    fn run(&mut self, l: Launch, dir: VmDir) -> Result<(Reply, Vec<OwnedFd>), (Refusal, Option<VmDir>)> {
        let (held, console, read) = match self.spawn(l, &dir) {
            Ok(r) => r,
            Err(e) => return Err((e, Some(dir))),
        };
        let (id, pid, dir_id) = (self.id(), held.vm.pid(), dir.id());
        let Spawned { vm, name, monitor, slot, charge, engine_end, described } = held;
        let held = Held {
            vm,
            name,
            monitor,
            paused: None,
            quiet_until: None,
            last_cont: None,
            slot,
            charge,
            console_failed: false,
            engine_end,
            described,
            dir,
        };
        self.vms.insert(id, held);
        Ok((Reply::Started { id, pid, console, dir: dir_id }, vec![read]))
    }

    /// Starts the VMM `l` describes in `dir`: what becomes its entry, its console and the
    /// console opened read-only.
    fn spawn(&mut self, l: Launch, dir: &VmDir) -> Result<(Spawned, PathBuf, OwnedFd), Refusal> {
        let Launch { spec, mac, nic, engine_end, kernel, initrd, user, disks, fdsets, charge, described } = l;
        for f in [&kernel, &initrd] {
            sys::set_inheritable(f.as_fd()).map_err(Refusal::Io)?;
        }
        // A cloud image's VMM serves a monitor, asked whether a host out of room paused it.
        let (monitor_path, monitor) = match disks.is_empty() {
            true => (None, None),
            false => {
                let (path, fd) = dir.monitor()?;
                (Some(path), Some(fd))
            }
        };
        if self.backend.is_none() {
            let b = hv::new().map_err(Refusal::Backend)?;
            engine::info!("guests run on {} with {} ({})", b.name(), b.accel().name, b.accel().reason);
            self.backend = Some(b);
        }
        let backend =
            self.backend.as_ref().ok_or_else(|| Refusal::Backend(hv::HvError::Unsupported("no VM backend".into())))?;
        let console = dir.console();
        let fd_path = |f: &OwnedFd| PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(f)));
        let vm_spec_name = spec.name.clone();
        let vm_spec = hv::VmSpec {
            name: spec.name,
            kernel: fd_path(&kernel),
            initrd: fd_path(&initrd),
            cmdline: spec.cmdline,
            memory_mib: spec.memory_mib,
            cpus: spec.cpus,
            nic,
            mac: mac.to_string(),
            console: console.clone(),
            timeout: Duration::from_secs(u64::from(u32::MAX)),
            user,
            reboot: !disks.is_empty(),
            disks,
            fdsets,
            monitor,
        };
        let vm = backend.start(vm_spec).map_err(Refusal::Backend)?;
        drop((kernel, initrd));
        let read = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&console)
            .map_err(|source| Refusal::File { path: console.clone(), source })?;
        let slot = spec.uid_slot.filter(|_| self.setup.vmm_uid_base.is_some());
        let engine_end = engine_end.filter(|_| self.setup.durable);
        let spawned = Spawned { vm, name: vm_spec_name, monitor: monitor_path, slot, charge, engine_end, described };
        Ok((spawned, console, OwnedFd::from(read)))
    }

    pub(super) fn handle(&mut self, req: Request, mut fds: Vec<OwnedFd>) -> Result<(Reply, Vec<OwnedFd>), Refusal> {
        let expected = req.descriptors();
        if fds.len() != expected {
            return Err(Refusal::Descriptors { got: fds.len(), expected });
        }
        let held = self.vms.len() + self.nets.len();
        match req {
            Request::Hello => Ok((
                Reply::Hello {
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    fence: self.setup.fence,
                    vmm_uid: self.setup.vmm_user.as_ref().map(|u| u.uid),
                    vmm_uid_base: self.setup.vmm_uid_base,
                    durable: self.setup.durable,
                    state_dir: self.setup.state_dir.clone(),
                },
                Vec::new(),
            )),
            Request::Held { after } => {
                let mut ids: Vec<u64> =
                    self.vms.keys().chain(self.kept.keys()).copied().filter(|id| *id > after).collect();
                ids.sort_unstable();
                ids.truncate(HELD_PAGE);
                let list = ids
                    .into_iter()
                    .filter_map(|id| {
                        if let Some(k) = self.kept.get(&id) {
                            let (name, dir) = (k.file.spec.name.clone(), k.dir.id());
                            return Some(HeldVm {
                                id,
                                name,
                                pid: 0,
                                running: false,
                                attachable: false,
                                dir,
                                kept: true,
                            });
                        }
                        let h = self.vms.get_mut(&id)?;
                        Some(HeldVm {
                            id,
                            name: h.name.clone(),
                            pid: h.vm.pid(),
                            running: h.vm.try_wait().is_none(),
                            attachable: h.engine_end.is_some(),
                            dir: h.dir.id(),
                            kept: false,
                        })
                    })
                    .collect();
                Ok((Reply::Held { list }, Vec::new()))
            }
            Request::Attach { id } => {
                let h = self.vms.get(&id).ok_or(Refusal::NoVmm)?;
                let end = h.engine_end.as_ref().ok_or(Refusal::NotAttachable)?;
                let nic = end.try_clone().map_err(Refusal::Io)?;
                let console = h.dir.console();
                let read = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&console)
                    .map_err(|source| Refusal::File { path: console.clone(), source })?;
                Ok((Reply::Attached { pid: h.vm.pid(), console, dir: h.dir.id() }, vec![OwnedFd::from(read), nic]))
            }
            Request::Own => {
                let path = self.setup.control.clone().ok_or(Refusal::NoControl)?;
                let m =
                    std::fs::symlink_metadata(&path).map_err(|source| Refusal::File { path: path.clone(), source })?;
                if !m.file_type().is_socket() {
                    return Err(Refusal::NotASocket(path));
                }
                if self.owned.is_empty() {
                    self.owned.push((path, m.dev(), m.ino()));
                }
                Ok((Reply::Done, Vec::new()))
            }
            Request::DirectNet { name, lan } => {
                if !valid_name(&name) || held >= MAX_HELD {
                    return Err(Refusal::Refused);
                }
                let net = VmmNet::create(&name, lan)?;
                let (id, path) = (self.id(), net.path());
                self.nets.insert(id, net);
                Ok((Reply::Net { net: id, path }, Vec::new()))
            }
            Request::Refence { net, name, host } => {
                if !valid_name(&name) || host.len() > MAX_HOST_ADDRS {
                    return Err(Refusal::Refused);
                }
                let n = self.nets.get_mut(&net).ok_or(Refusal::NoNamespace)?;
                n.refence(&name, &host);
                Ok((Reply::Done, Vec::new()))
            }
            Request::DropNet { net } => {
                self.nets.remove(&net);
                Ok((Reply::Done, Vec::new()))
            }
            Request::Start { spec, nic } => {
                if held >= MAX_HELD {
                    return Err(Refusal::Refused);
                }
                let nic = match nic {
                    NicKind::Direct { .. } if spec.image.is_some() => return Err(Refusal::ImageNic),
                    NicKind::Direct { net } => {
                        hv::Nic::UserNat(Some(self.nets.get(&net).ok_or(Refusal::NoNamespace)?.path()))
                    }
                    // The NIC's two ends come first: the VMM's, the engine's.
                    NicKind::Dgram => {
                        let (vmm, engine_end) = nic_pair(&mut fds)?;
                        return self.start(spec, vmm, Some(engine_end), fds);
                    }
                };
                self.start(spec, nic, None, fds)
            }
            Request::Boot { id } => {
                let (vmm, engine_end) = nic_pair(&mut fds)?;
                self.boot(id, vmm, Some(engine_end), fds)
            }
            Request::Status { id } => {
                let h = self.vms.get_mut(&id).ok_or(Refusal::NoVmm)?;
                let wait_status = h.vm.try_wait().map(|s| s.into_raw());
                Ok((Reply::Status { wait_status, paused: h.paused.clone() }, Vec::new()))
            }
            Request::Stop { id, grace_ms } => {
                let h = self.vms.get_mut(&id).ok_or(Refusal::NoVmm)?;
                let ended = h.vm.stop(Duration::from_millis(grace_ms.min(60_000))).into();
                Ok((Reply::Ended { ended }, Vec::new()))
            }
            Request::Kill { id } => {
                let h = self.vms.get_mut(&id).ok_or(Refusal::NoVmm)?;
                Ok((Reply::Ended { ended: Ended::from(h.vm.kill()) }, Vec::new()))
            }
            Request::Release { id } | Request::Remove { id } => {
                // Dropping it kills a VMM still running, reaps it and removes its directory:
                // console, disk and seed (the engine still reads the console it was given);
                // a kept guest's directory goes the same way.
                self.vms.remove(&id);
                self.kept.remove(&id);
                Ok((Reply::Done, Vec::new()))
            }
            Request::Finish => Ok((Reply::Done, Vec::new())),
            Request::FenceUp => {
                self.fence.as_mut().ok_or(FenceError::Off)?.up()?;
                Ok((Reply::Done, Vec::new()))
            }
            Request::FenceSet { vm, rule, endpoints } => {
                if !valid_name(&vm) || endpoints.len() > engine::filter::Allowlist::MAX_ENDPOINTS {
                    return Err(Refusal::Refused);
                }
                self.fence.as_mut().ok_or(FenceError::Off)?.set(&vm, rule, &endpoints)?;
                Ok((Reply::Done, Vec::new()))
            }
            Request::Sockets { id } => {
                let h = self.vms.get(&id).ok_or(Refusal::NoVmm)?;
                let mut conns = crate::rogue::connections(h.vm.pid()).map_err(|e| Refusal::Sockets(e.to_string()))?;
                // Connected sockets first: many to an allowed peer cannot push a rogue one out
                // of the list.
                conns.sort_by_key(|c| c.remote.is_none());
                let list = conns
                    .into_iter()
                    .take(MAX_SOCKETS)
                    .map(|c| Socket { proto: c.proto.to_string(), local: c.local, remote: c.remote })
                    .collect();
                Ok((Reply::Sockets { list }, Vec::new()))
            }
        }
    }

    /// Every [`PAUSE_CHECK`]: each cloud image's VMM is asked whether its guest is paused by a
    /// host out of room (QEMU's `werror=enospc`: status `io-error`). A pause is said once, and
    /// shown in the VM's status; while there is room again (more than the reserve free) the
    /// guest is let go on, at most every [`CONT_EVERY`]. A monitor that does not answer is left
    /// alone for [`MONITOR_QUIET`].
    fn watch_pauses(&mut self) {
        use std::time::Instant;
        if self.last_pause_check.elapsed() < PAUSE_CHECK {
            return;
        }
        self.last_pause_check = Instant::now();
        let free = self.layout.as_ref().and_then(|l| sys::fs_available(l.vms()).ok());
        let free_mb = free.map_or_else(|| "?".to_string(), |b| (b >> 20).to_string());
        for h in self.vms.values_mut() {
            let Some(monitor) = &h.monitor else { continue };
            if h.quiet_until.is_some_and(|t| Instant::now() < t) || h.vm.try_wait().is_some() {
                continue;
            }
            match qmp::status(monitor) {
                Ok(st) if st.status == "io-error" => {
                    if h.paused.is_none() {
                        engine::warn!(
                            "launcher: vm {}: paused: the state directory is full ({free_mb} MB free); it goes on when there is room",
                            h.name
                        );
                        h.paused = Some("the provider's disk is full".into());
                    }
                    let room = free.is_some_and(|b| b > disk::RESERVE);
                    if room && h.last_cont.is_none_or(|t| t.elapsed() >= CONT_EVERY) {
                        h.last_cont = Some(Instant::now());
                        match qmp::cont(monitor) {
                            Ok(()) => {
                                engine::info!("launcher: vm {}: room again ({free_mb} MB free): let go on", h.name)
                            }
                            Err(e) => engine::warn!("launcher: vm {}: cannot let it go on: {e}", h.name),
                        }
                    }
                }
                Ok(st) => {
                    if st.running && h.paused.take().is_some() {
                        engine::info!("launcher: vm {}: running again", h.name);
                    }
                }
                Err(e) => {
                    h.quiet_until = Some(Instant::now() + MONITOR_QUIET);
                    engine::debug!("launcher: vm {}: {e}; not asked again for {} s", h.name, MONITOR_QUIET.as_secs());
                }
            }
        }
    }

    /// Every second: each VMM's console is kept within [`CONSOLE_MAX`] on the host, and
    /// paused guests are watched ([`Launcher::watch_pauses`]).
    fn housekeep(&mut self) {
        self.watch_pauses();
        for h in self.vms.values_mut() {
            let console = h.dir.console();
            match provision::bound_console(&console, CONSOLE_MAX) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) if !h.console_failed => {
                    h.console_failed = true;
                    engine::warn!("launcher: {}: cannot keep it bounded: {e}", console.display());
                }
                Err(_) => {}
            }
        }
    }

    /// Cloud guests' directories (described, with their disks) are kept when their VMMs end
    /// (a launcher that outlives its engines stops: the host goes down, or the service is
    /// stopped): the next launcher boots them again when asked.
    fn keep_described(&mut self) {
        for h in self.vms.values_mut().filter(|h| h.described) {
            h.dir.keep();
        }
        for k in self.kept.values_mut() {
            k.dir.keep();
        }
    }

    /// Every VMM ends (its files with it), every namespace goes.
    fn finish_vms(&mut self) {
        self.vms.clear();
        self.kept.clear();
        self.nets.clear();
    }

    /// The files the engine asked the launcher to own (its control socket) are removed, if
    /// they are still what they were.
    fn remove_owned(&mut self) {
        for (path, dev, ino) in self.owned.drain(..) {
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.dev() == dev && m.ino() == ino) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// An engine went without `finish` (a launcher that outlives its engines): every VMM on
    /// an engine NIC keeps running, without network until the next engine attaches it;
    /// direct mode's VMMs and namespaces end (nothing would watch them); the control socket
    /// goes. The fence stays up, as it was. Returns how many VMMs were kept.
    fn detach(&mut self) -> usize {
        self.vms.retain(|_, h| h.engine_end.is_some());
        self.nets.clear();
        self.remove_owned();
        // No engine, no worker: nothing of the engine's user may send anywhere (a killed
        // engine left its VMs' endpoints in the sets).
        if let Some(f) = self.fence.as_mut() {
            f.empty();
        }
        self.vms.len()
    }

    /// The engine is gone: every VMM ends (its files with it), every namespace goes, owned
    /// files are removed.
    pub(super) fn finish(&mut self) {
        self.finish_vms();
        // The engine and its VMs are gone: so is the fence.
        if let Some(f) = self.fence.as_mut() {
            f.down();
        }
        self.remove_owned();
    }
}

#[cfg(test)]
mod tests {
    use super::super::VMM_UID_RANGE;
    use super::*;

    fn start(mac: &str, cmdline: &str, memory_mib: u32, cpus: u32, uid_slot: Option<u32>) -> Request {
        let spec = StartSpec {
            name: "vm".into(),
            cmdline: cmdline.into(),
            memory_mib,
            cpus,
            mac: mac.into(),
            uid_slot,
            image: None,
            disk_mb: None,
        };
        Request::Start { spec, nic: NicKind::Dgram }
    }

    /// A NIC (a datagram socketpair's two ends), and a kernel and an initrd (this test
    /// binary).
    fn fds() -> Vec<OwnedFd> {
        let (a, b) = sys::socketpair(libc::SOCK_DGRAM).unwrap();
        let exe = std::env::current_exe().unwrap();
        vec![a, b, File::open(&exe).unwrap().into(), File::open(&exe).unwrap().into()]
    }

    #[test]
    fn a_start_request_reaches_no_vmm_unless_every_value_is_sane() {
        let setup = Setup {
            state_dir: Some(std::env::temp_dir()),
            disk_overcommit: 100,
            vmm_user: Some(hv::VmmUser { name: "t".into(), uid: 4242, gid: 4242 }),
            vmm_uid_base: Some(40_000),
            control: None,
            fence: None,
            durable: false,
        };
        let mut l = Launcher::new(&setup);
        let mac = "52:54:00:12:34:56";
        let refused = |l: &mut Launcher<'_>, req: Request, fds: Vec<OwnedFd>| match l.handle(req, fds) {
            Err(e) => e.to_string(),
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
        f[2] = path_only.into();
        assert!(refused(&mut l, start(mac, "x", 64, 1, None), f).contains("not opened for reading"));
        // A bad VM name never becomes a console path.
        let mut bad = start(mac, "x", 64, 1, None);
        if let Request::Start { spec, .. } = &mut bad {
            spec.name = "../../etc/x".into();
        }
        assert!(refused(&mut l, bad, fds()).contains("refused"));
        // Direct mode's NIC in a namespace the launcher does not hold.
        let mut direct = start(mac, "x", 64, 1, None);
        if let Request::Start { nic, .. } = &mut direct {
            *nic = NicKind::Direct { net: 1 };
        }
        assert!(refused(&mut l, direct, fds().split_off(2)).contains("no such namespace"));
        assert!(l.vms.is_empty());
    }

    #[test]
    fn as_root_a_vmm_never_runs_as_root() {
        if sys::effective_ids().0 != 0 {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI runs the tests as root");
            return;
        }
        for user in [None, Some(hv::VmmUser { name: "root".into(), uid: 0, gid: 0 })] {
            let setup = Setup {
                state_dir: Some(std::env::temp_dir()),
                disk_overcommit: 100,
                vmm_user: user,
                vmm_uid_base: None,
                control: None,
                fence: None,
                durable: false,
            };
            let mut l = Launcher::new(&setup);
            let e = l.handle(start("52:54:00:12:34:56", "x", 64, 1, None), fds()).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains("never run as root"), "{e}");
        }
    }
}
