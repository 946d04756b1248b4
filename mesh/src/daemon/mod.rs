//! `omertad`: one daemon per network and user, provider and consumer at once.
//!
//! Threads: the receiver (one UDP socket, every datagram opened and checked by [`wire::open`],
//! then dispatched on its type), the timer (keepalives, heartbeats, reclaims, endpoint
//! changes), the IPC listener (a thread per CLI connection, at most [`MAX_CLIENTS`]), and
//! the main thread, which waits for SIGTERM/SIGINT and then stops this daemon's VMs and removes
//! its tunnels. A provider's VM starts run on a thread of their own (at most
//! [`MAX_STARTING`] at once) so the receiver never waits for the engine.
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use std::sync::mpsc;

use engine::{Engine, ImageVm, VmState};

mod engine;

pub use engine::EngineError;

use crate::check;
use crate::ipc::{self, Reply, Request};
use crate::net::{Home, Network};
use crate::tunnel::{self, Tunnel};
use crate::wire::{self, Message, Requirements, Seen, VmCreated, VmRequest};

/// CLI connections served at once.
pub const MAX_CLIENTS: usize = 16;
/// Provider VM starts at once.
pub const MAX_STARTING: usize = 2;
/// Peers remembered.
const MAX_PEERS: usize = 1024;
/// How long a consumer waits for `vm_created`.
const REQUEST_WAIT: Duration = Duration::from_secs(90);

/// The daemon's settings (`omertad start`'s flags).
#[derive(Debug, Clone)]
pub struct Options {
    /// The network's ID.
    pub network: String,
    /// UDP port.
    pub port: u16,
    /// Address to bind.
    pub bind: Ipv4Addr,
    /// No VM and no tunnel are made.
    pub dry_run: bool,
    /// Whether this node rents VMs out.
    pub provider: bool,
    /// The engine's control socket.
    pub engine_socket: PathBuf,
    /// The image directory offered (in the engine's `--image-dir`).
    pub image: String,
    /// Peers that may rent (empty: every member).
    pub allow_peers: Vec<String>,
    /// VMs at once.
    pub max_vms: usize,
    /// vCPUs per VM.
    pub max_cpus: u32,
    /// Memory per VM, MiB.
    pub max_memory_mb: u32,
    /// Disk per VM, MiB.
    pub max_disk_mb: u32,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// A VM whose consumer has not answered heartbeats for this long is reclaimed (a
    /// request's `timeoutMinutes` shortens it, never lengthens it).
    pub heartbeat_timeout: Duration,
    /// Keepalive interval.
    pub keepalive: Duration,
    /// Seconds a VM has to boot (the engine's default when `None`).
    pub boot_timeout_s: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            network: String::new(),
            port: 9999,
            bind: Ipv4Addr::UNSPECIFIED,
            dry_run: false,
            provider: true,
            engine_socket: control::client::default_socket_path(),
            image: "cloud-image".into(),
            allow_peers: Vec::new(),
            max_vms: 4,
            max_cpus: 4,
            max_memory_mb: 8192,
            max_disk_mb: 65536,
            heartbeat: Duration::from_secs(60),
            heartbeat_timeout: Duration::from_secs(600),
            keepalive: Duration::from_secs(15),
            boot_timeout_s: None,
        }
    }
}

#[derive(Debug)]
struct Peer {
    endpoint: SocketAddrV4,
    last_seen: Instant,
}

/// A provided VM's state (written as before: `"booting"`, `"ready"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RentalState {
    /// The engine started it; its guest is not up yet.
    Booting,
    /// Its guest is up (a dry run's at once).
    Ready,
}

impl std::fmt::Display for RentalState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RentalState::Booting => "booting",
            RentalState::Ready => "ready",
        })
    }
}

/// A VM this node provides.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Rental {
    vm_id: String,
    engine_name: String,
    consumer: String,
    endpoint: String,
    vm_ip: String,
    cpus: u32,
    memory_mb: u32,
    disk_mb: u32,
    started: u64,
    dry_run: bool,
    state: RentalState,
    #[serde(skip)]
    last_ack: Option<Instant>,
    /// When this daemon made it (`None` for a predecessor's).
    #[serde(skip)]
    since: Option<Instant>,
    /// The last endpoint change applied.
    #[serde(skip)]
    last_update: Option<Instant>,
    timeout_s: u64,
}

/// A VM this node rents.
#[derive(Debug)]
struct Lease {
    vm_id: String,
    provider: String,
    vm_ip: Ipv4Addr,
    consumer_ip: Ipv4Addr,
    port: u16,
    endpoint_ip: Ipv4Addr,
    fingerprint: String,
    created: u64,
    created_at: Instant,
    dry_run: bool,
    error: Option<String>,
    tunnel: Option<Tunnel>,
    interface: String,
}

/// What the consumer remembers on disk (`vms/active.json`), to clean up after a crash.
#[derive(Debug, Serialize, Deserialize)]
struct ActiveVm {
    network: String,
    vm_id: String,
    provider: String,
    vm_ip: String,
    interface: String,
    created: u64,
}

#[derive(Debug, Default)]
struct State {
    peers: HashMap<String, Peer>,
    rentals: HashMap<String, Rental>,
    /// Consumers that rented here since this daemon (or a predecessor that died) started:
    /// heartbeats go to them even when they have nothing left, so that they drop VMs this
    /// provider no longer has.
    consumers: std::collections::HashSet<String>,
    leases: HashMap<String, Lease>,
    seen: Seen,
    /// Who waits for an answer under a key, and from which peer it must come.
    waiters: HashMap<String, (String, mpsc::SyncSender<(Message, SocketAddrV4)>)>,
    /// The envelope time of the last heartbeat (or answer) taken from each peer: an older
    /// one is a replay and is ignored.
    last_beat: HashMap<String, u64>,
    /// Tunnel /24s and ports chosen for requests still in flight.
    reserved: Vec<(Ipv4Addr, u16)>,
    drops: u64,
    /// Dropped datagrams are logged at most once a second.
    drop_log: DropLog,
}

/// The limiter of the dropped-datagram lines: one a second, what it held back counted.
#[derive(Debug)]
struct DropLog(::engine::log::RateLimiter);

impl Default for DropLog {
    fn default() -> Self {
        Self(::engine::log::RateLimiter::new(1, 1))
    }
}

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    home: Home,
    net: Network,
    id: String,
    me: SigningKey,
    my_id: String,
    sock: UdpSocket,
    opts: Options,
    engine: Engine,
    state: Mutex<State>,
    stop: AtomicBool,
    clients: AtomicUsize,
    starting: AtomicUsize,
    socket_path: PathBuf,
    /// Held for the daemon's life: one daemon per network and user.
    _lock: std::fs::File,
    /// Serialises the state files' writers.
    saving: Mutex<()>,
    /// Engine work asked for by peers, done on a thread of its own (the receiver never waits
    /// for the engine).
    jobs: mpsc::SyncSender<Job>,
    jobs_rx: Mutex<Option<mpsc::Receiver<Job>>>,
}

/// A piece of engine work.
type Job = Box<dyn FnOnce() + Send>;

/// Engine jobs queued at most.
const MAX_JOBS: usize = 64;

/// Takes an exclusive lock on `f` without waiting: `Ok(false)` when another process holds it.
#[allow(unsafe_code)]
fn try_lock(f: &std::fs::File) -> Result<bool, String> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function borrows; no pointers.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(format!("locking: {e}"))
    }
}

fn err(msg: impl Into<String>) -> Reply {
    Reply::err(msg)
}

fn ok(v: &impl Serialize) -> Reply {
    Reply::ok(v)
}

impl Daemon {
    /// Opens the network, binds the UDP socket and the IPC socket (refusing when another
    /// daemon of this network and user answers there), and cleans up what a crashed
    /// predecessor left.
    pub fn start(home: Home, opts: Options) -> Result<Arc<Self>, String> {
        let net = home.network(&opts.network).map_err(|e| e.to_string())?;
        let id = net.id();
        let me = home.identity().map_err(|e| e.to_string())?;
        let my_id = crate::net::peer_id(&me.verifying_key().to_bytes());
        let socket_path = ipc::socket_path(&home, &id).map_err(|e| e.to_string())?;
        let lock_path = socket_path.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| format!("{}: {e}", lock_path.display()))?;
        if !try_lock(&lock)? {
            return Err(format!(
                "a daemon for network {id} already runs for this user (its socket: {}); stop it first, or use it: omerta status --network {id}",
                socket_path.display()
            ));
        }
        let sock = UdpSocket::bind(SocketAddrV4::new(opts.bind, opts.port))
            .map_err(|e| format!("UDP {}:{}: {e}", opts.bind, opts.port))?;
        sock.set_read_timeout(Some(Duration::from_millis(250))).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(&socket_path);
        let (jobs_tx, jobs_rx) = mpsc::sync_channel(MAX_JOBS);
        let d = Arc::new(Self {
            home,
            net,
            id,
            me,
            my_id,
            sock,
            engine: Engine::new(opts.engine_socket.clone()),
            opts,
            state: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
            clients: AtomicUsize::new(0),
            starting: AtomicUsize::new(0),
            socket_path,
            _lock: lock,
            saving: Mutex::new(()),
            jobs: jobs_tx,
            jobs_rx: Mutex::new(Some(jobs_rx)),
        });
        d.clean_leftovers();
        // The consumer's SSH key, made once here rather than by concurrent requests.
        d.ensure_ssh_key()?;
        Ok(d)
    }

    /// This node's peer ID.
    pub fn peer_id(&self) -> &str {
        &self.my_id
    }

    /// The IPC socket's path.
    pub fn socket_path(&self) -> &std::path::Path {
        &self.socket_path
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs until SIGTERM or SIGINT; then stops this daemon's VMs and tunnels. `notify`
    /// hears `READY=1` once the IPC socket is up and the threads run (systemd `Type=notify`).
    /// SIGHUP is logged and changes nothing (all the daemon reads it reads at start).
    pub fn run(self: &Arc<Self>, notify: &control::notify::Notifier) -> Result<(), String> {
        let listener =
            UnixListener::bind(&self.socket_path).map_err(|e| format!("{}: {e}", self.socket_path.display()))?;
        std::fs::set_permissions(&self.socket_path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("{}: {e}", self.socket_path.display()))?;
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGHUP,
        ])
        .map_err(|e| format!("signals: {e}"))?;
        let threads = vec![
            spawn("mesh-rx", {
                let d = self.clone();
                move || d.receive_loop()
            }),
            spawn("mesh-timer", {
                let d = self.clone();
                move || d.timer_loop()
            }),
            spawn("mesh-ipc", {
                let d = self.clone();
                move || d.ipc_loop(listener)
            }),
            spawn("mesh-engine", {
                let d = self.clone();
                move || d.job_loop()
            }),
        ];
        self.say_hello_to_bootstrap(true);
        let role = if self.opts.provider { "Mesh provider daemon started" } else { "Mesh consumer daemon started" };
        let dry = if self.opts.dry_run { " (dry run: no VM and no tunnel is made)" } else { "" };
        ::engine::info!("{role}{dry}: network {} ({}), UDP port {}", self.id, self.net.name, self.opts.port);
        notify.send(&format!("READY=1\nSTATUS=network {}, UDP port {}", self.id, self.opts.port));
        for sig in signals.forever() {
            if sig == signal_hook::consts::SIGHUP {
                ::engine::info!(
                    "SIGHUP: nothing to reload (the network and its keys are read at start); still running"
                );
                continue;
            }
            ::engine::info!("signal {sig}: stopping");
            notify.send("STOPPING=1");
            break;
        }
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.socket_path);
        for t in threads {
            let _ = t.join();
        }
        self.shutdown();
        let _ = std::fs::remove_file(&self.socket_path);
        ::engine::info!("stopped");
        Ok(())
    }

    fn job_loop(self: Arc<Self>) {
        let Some(rx) = self.jobs_rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() else { return };
        while !self.stop.load(Ordering::SeqCst) {
            if let Ok(job) = rx.recv_timeout(Duration::from_millis(250)) {
                job();
            }
        }
        // What was queued before the stop still runs (releases, endpoint changes).
        while let Ok(job) = rx.try_recv() {
            job();
        }
    }

    /// Queues engine work; `false` (and a log line) when the queue is full.
    fn queue(&self, what: &str, job: Job) -> bool {
        match self.jobs.try_send(job) {
            Ok(()) => true,
            Err(_) => {
                ::engine::warn!("{what}: the engine queue is full ({MAX_JOBS}); not done");
                false
            }
        }
    }

    /// Stops every VM this daemon provides and removes every tunnel it made.
    fn shutdown(&self) {
        let rentals: Vec<Rental> = self.lock().rentals.drain().map(|(_, r)| r).collect();
        for r in rentals {
            self.end_rental(&r, "the provider daemon stopped");
            self.tell_consumer(&r, "the provider daemon stopped");
        }
        // Rented VMs are given back: their tunnels (and the keys only they held) go now.
        let leases: Vec<Lease> = self.lock().leases.drain().map(|(_, l)| l).collect();
        for mut l in leases {
            if let Some(ep) = self.peer_endpoint(&l.provider) {
                self.send(&l.provider, ep, Message::VmRelease { vm_id: l.vm_id.clone() });
            }
            if let Some(t) = l.tunnel.as_mut() {
                t.remove();
            }
        }
        self.save_rentals();
        self.save_leases();
    }

    // ---- the wire ----

    fn send(&self, to_id: &str, to: SocketAddrV4, msg: Message) {
        let d = match wire::seal(&self.net.key, &self.me, to_id, msg) {
            Ok(d) => d,
            Err(e) => return ::engine::error!("sending to {to_id} at {to}: {e}"),
        };
        if let Err(e) = self.sock.send_to(&d, to) {
            ::engine::warn!("sending to {to_id} at {to}: {e}");
        }
    }

    fn peer_endpoint(&self, id: &str) -> Option<SocketAddrV4> {
        if let Some(p) = self.lock().peers.get(id) {
            return Some(p.endpoint);
        }
        self.net.bootstrap.iter().find(|b| b.peer_id() == id).map(|b| b.endpoint)
    }

    fn say_hello_to_bootstrap(&self, first: bool) {
        for b in &self.net.bootstrap {
            if b.peer_id() == self.my_id {
                continue;
            }
            let known = self.lock().peers.contains_key(b.peer_id());
            self.send(b.peer_id(), b.endpoint, Message::Hello { reply: first || !known });
        }
    }

    fn receive_loop(self: Arc<Self>) {
        let mut buf = vec![0u8; wire::MAX_DATAGRAM + 1];
        while !self.stop.load(Ordering::SeqCst) {
            let (n, from) = match self.sock.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ICMP errors of earlier sends show here once: not fatal.
                    if e.kind() != std::io::ErrorKind::ConnectionRefused {
                        ::engine::warn!("receiving: {e}");
                    }
                    continue;
                }
            };
            let SocketAddr::V4(from) = from else { continue };
            let opened = {
                let mut st = self.lock();
                wire::open(&self.net.key, &self.my_id, &buf[..n], crate::now_s(), &mut st.seen)
            };
            match opened {
                Ok((env, _)) => self.dispatch(env.from_peer_id, from, env.timestamp, env.payload),
                Err(why) => self.dropped(&why, from, n),
            }
        }
    }

    /// Counts a dropped datagram and logs it at most once a second (header facts only).
    fn dropped(&self, why: &wire::Drop, from: SocketAddrV4, len: usize) {
        let mut st = self.lock();
        st.drops += 1;
        let Some(more) = st.drop_log.0.allow(Instant::now()) else { return };
        drop(st);
        let more = if more > 0 { format!(" ({more} more dropped since the last line)") } else { String::new() };
        ::engine::warn!("{why}: {len} bytes from {from}, dropped{more}");
    }

    fn dispatch(self: &Arc<Self>, from_id: String, from: SocketAddrV4, ts: u64, msg: Message) {
        {
            let mut st = self.lock();
            if st.peers.len() >= MAX_PEERS && !st.peers.contains_key(&from_id) {
                // Full: the peer seen longest ago goes, unless it rents or provides here.
                let busy = |st: &State, id: &str| {
                    st.rentals.values().any(|r| r.consumer == id) || st.leases.values().any(|l| l.provider == id)
                };
                let victim = st
                    .peers
                    .iter()
                    .filter(|(id, _)| !busy(&st, id))
                    .min_by_key(|(_, p)| p.last_seen)
                    .map(|(id, _)| id.clone());
                if let Some(v) = victim {
                    st.peers.remove(&v);
                }
            }
            if st.peers.len() < MAX_PEERS || st.peers.contains_key(&from_id) {
                st.peers.insert(from_id.clone(), Peer { endpoint: from, last_seen: Instant::now() });
            }
            if matches!(msg, Message::VmHeartbeat { .. } | Message::VmHeartbeatResponse { .. }) {
                let last = st.last_beat.get(&from_id).copied().unwrap_or(0);
                if ts < last {
                    return;
                }
                if st.last_beat.len() < MAX_PEERS || st.last_beat.contains_key(&from_id) {
                    st.last_beat.insert(from_id.clone(), ts);
                }
            }
        }
        match msg {
            Message::Hello { reply } => {
                if reply {
                    self.send(&from_id, from, Message::Hello { reply: false });
                }
            }
            Message::Ping { nonce } => self.send(&from_id, from, Message::Pong { nonce }),
            Message::Pong { ref nonce } => {
                self.answer(&format!("ping:{nonce}"), &from_id, msg.clone(), from);
            }
            Message::VmRequest(req) => self.provide(from_id, from, *req),
            Message::VmCreated(ref c) => {
                self.answer(&format!("request:{}", c.request_id), &from_id, msg.clone(), from);
            }
            Message::VmError { ref request_id, ref vm_id, ref error } => {
                if let Some(r) = request_id {
                    let _ = self.answer(&format!("request:{r}"), &from_id, msg.clone(), from);
                } else if let Some(v) = vm_id {
                    if !self.answer(&format!("release:{v}"), &from_id, msg.clone(), from) {
                        self.vm_failed(&from_id, v, error);
                    }
                }
            }
            Message::VmRelease { vm_id } => self.release_rental(&from_id, from, &vm_id),
            Message::VmReleased { ref vm_id } => {
                self.answer(&format!("release:{vm_id}"), &from_id, msg.clone(), from);
            }
            Message::VmHeartbeat { vm_ids, .. } => self.heartbeat_from_provider(&from_id, from, &vm_ids),
            Message::VmHeartbeatResponse { vm_ids } => self.heartbeat_answer(&from_id, &vm_ids),
            Message::VmEndpointUpdate { vm_id, consumer_endpoint } => {
                self.endpoint_update(&from_id, from, &vm_id, &consumer_endpoint)
            }
        }
    }

    /// Hands an answer to whoever waits for `key`, if it comes from the peer asked; whether
    /// someone took it. (Every member can read a request's ID off the wire: an answer from
    /// anyone else is not one.)
    fn answer(&self, key: &str, from_id: &str, msg: Message, from: SocketAddrV4) -> bool {
        let mut st = self.lock();
        match st.waiters.get(key) {
            Some((peer, _)) if peer == from_id => {}
            _ => return false,
        }
        match st.waiters.remove(key) {
            Some((_, tx)) => tx.try_send((msg, from)).is_ok(),
            None => false,
        }
    }

    /// Sends `msg` to `peer` and waits for the answer filed under `key`.
    fn ask(
        &self,
        peer: &str,
        to: SocketAddrV4,
        key: String,
        msg: Message,
        wait: Duration,
    ) -> Option<(Message, SocketAddrV4)> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.lock().waiters.insert(key.clone(), (peer.to_string(), tx));
        self.send(peer, to, msg);
        let got = rx.recv_timeout(wait).ok();
        self.lock().waiters.remove(&key);
        got
    }

    // ---- the timer ----

    fn timer_loop(self: Arc<Self>) {
        let mut last_keepalive = Instant::now();
        let mut last_heartbeat = Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(250));
            if last_keepalive.elapsed() >= self.opts.keepalive {
                last_keepalive = Instant::now();
                self.say_hello_to_bootstrap(false);
                let peers: Vec<(String, SocketAddrV4)> =
                    self.lock().peers.iter().map(|(id, p)| (id.clone(), p.endpoint)).collect();
                for (id, ep) in peers {
                    if !self.net.bootstrap.iter().any(|b| b.peer_id() == id) {
                        self.send(&id, ep, Message::Hello { reply: false });
                    }
                }
                self.check_endpoints();
            }
            if self.opts.provider && last_heartbeat.elapsed() >= self.opts.heartbeat {
                last_heartbeat = Instant::now();
                self.send_heartbeats();
            }
            self.reclaim_silent();
        }
    }

    // ---- provider ----

    fn refuse(&self, from_id: &str, from: SocketAddrV4, request_id: &str, why: String) {
        ::engine::warn!("vm_request from {from_id} refused: {why}");
        self.send(from_id, from, Message::VmError { request_id: Some(request_id.into()), vm_id: None, error: why });
    }

    fn provide(self: &Arc<Self>, from_id: String, from: SocketAddrV4, req: VmRequest) {
        if !crate::net::valid_id(&req.request_id) {
            return self.dropped(&wire::Drop::Malformed("a request ID".into()), from, 0);
        }
        if let Err(why) = self.policy(&from_id, from, &req) {
            return self.refuse(&from_id, from, &req.request_id, why);
        }
        if self.starting.fetch_add(1, Ordering::SeqCst) >= MAX_STARTING {
            self.starting.fetch_sub(1, Ordering::SeqCst);
            return self.refuse(
                &from_id,
                from,
                &req.request_id,
                "the provider is busy starting other VMs; try again".into(),
            );
        }
        let d = self.clone();
        spawn("mesh-start", move || {
            let answer = d.start_vm(&from_id, &req);
            d.starting.fetch_sub(1, Ordering::SeqCst);
            match answer {
                Ok(created) => d.send(&from_id, from, Message::VmCreated(Box::new(created))),
                Err(why) => d.refuse(&from_id, from, &req.request_id, why),
            }
        });
    }

    /// Who may rent, how much, and every field's grammar.
    fn policy(&self, from_id: &str, from: SocketAddrV4, req: &VmRequest) -> Result<(), String> {
        if !self.opts.provider {
            return Err("this node does not provide VMs".into());
        }
        if !self.opts.allow_peers.is_empty() && !self.opts.allow_peers.iter().any(|p| p == from_id) {
            return Err(format!("peer {from_id} may not rent from this provider"));
        }
        if req.timeout_minutes == Some(0) {
            return Err("timeoutMinutes is at least 1".into());
        }
        if req.dry_run && !self.opts.dry_run {
            return Err("this provider is not in dry run: ask without --dry-run".into());
        }
        check::ssh_user(&req.ssh_user).map_err(|e| e.to_string())?;
        check::ssh_public_key(&req.ssh_public_key).map_err(|e| e.to_string())?;
        check::wg_key(&req.consumer_public_key).map_err(|e| e.to_string())?;
        let ep = check::endpoint(&req.consumer_endpoint).map_err(|e| e.to_string())?;
        if ep.ip().is_loopback() || ep.ip().is_link_local() {
            return Err(format!("the consumer endpoint {ep} is not an address a VM may be sent to"));
        }
        if ep.ip() != from.ip() {
            return Err(format!("the consumer endpoint {ep} is not the request's source address {}", from.ip()));
        }
        check::tunnel_pair(&req.consumer_vpn_ip, &req.vm_vpn_ip).map_err(|e| e.to_string())?;
        let r = &req.requirements;
        if r.cpu_architecture != wire::Arch::X86_64 || r.gpu {
            return Err("this provider offers x86_64 VMs without GPUs only".into());
        }
        if r.cpu_cores == 0 || r.cpu_cores > self.opts.max_cpus {
            return Err(format!("{} vCPUs asked; this provider gives 1 to {}", r.cpu_cores, self.opts.max_cpus));
        }
        if !(256..=self.opts.max_memory_mb).contains(&r.memory_mb) {
            return Err(format!(
                "{} MB of memory asked; this provider gives 256 to {}",
                r.memory_mb, self.opts.max_memory_mb
            ));
        }
        if r.storage_mb > self.opts.max_disk_mb {
            return Err(format!(
                "{} MB of disk asked; this provider gives up to {}",
                r.storage_mb, self.opts.max_disk_mb
            ));
        }
        let st = self.lock();
        if st.rentals.len() + self.starting.load(Ordering::SeqCst) >= self.opts.max_vms {
            return Err(format!("the provider runs its limit of {} VMs", self.opts.max_vms));
        }
        if st.rentals.values().any(|x| x.vm_ip == req.vm_vpn_ip && x.consumer == from_id) {
            return Err(format!("{} is the address of another of your VMs here", req.vm_vpn_ip));
        }
        Ok(())
    }

    fn start_vm(&self, from_id: &str, req: &VmRequest) -> Result<VmCreated, String> {
        let vm_id = crate::random_id().map_err(|e| e.to_string())?;
        let engine_name = format!("mesh-{vm_id}");
        let (consumer_ip, vm_ip) =
            check::tunnel_pair(&req.consumer_vpn_ip, &req.vm_vpn_ip).map_err(|e| e.to_string())?;
        let endpoint = check::endpoint(&req.consumer_endpoint).map_err(|e| e.to_string())?;
        let ssh_key = check::ssh_public_key(&req.ssh_public_key).map_err(|e| e.to_string())?;
        let dry_run = self.opts.dry_run;
        let (vm_public_key, host_key, fingerprint) = if dry_run {
            // Keys of the same kind as a real VM's, made here and thrown away.
            let k = control::provision::generate()?;
            (k.wg_public, k.host_public, k.host_fingerprint)
        } else {
            let started = self
                .engine
                .start_image(&ImageVm {
                    name: &engine_name,
                    image: &self.opts.image,
                    consumer: endpoint,
                    consumer_key: &req.consumer_public_key,
                    ssh_key: &ssh_key,
                    vm_ip,
                    consumer_ip,
                    cpus: req.requirements.cpu_cores,
                    memory_mib: req.requirements.memory_mb,
                    boot_timeout_s: self.opts.boot_timeout_s,
                })
                .map_err(|e| e.to_string())?;
            (started.wireguard_public_key, started.ssh_host_key, started.ssh_host_fingerprint)
        };
        let timeout_s = req
            .timeout_minutes
            .map_or(self.opts.heartbeat_timeout.as_secs(), |m| {
                (u64::from(m.max(1)) * 60).min(self.opts.heartbeat_timeout.as_secs())
            })
            // Never shorter than two heartbeat rounds: one late answer is not a dead consumer.
            .max(2 * self.opts.heartbeat.as_secs() + 5);
        let rental = Rental {
            vm_id: vm_id.clone(),
            engine_name: engine_name.clone(),
            consumer: from_id.into(),
            endpoint: endpoint.to_string(),
            vm_ip: vm_ip.to_string(),
            cpus: req.requirements.cpu_cores,
            memory_mb: req.requirements.memory_mb,
            disk_mb: req.requirements.storage_mb,
            started: crate::now_s(),
            dry_run,
            state: if dry_run { RentalState::Ready } else { RentalState::Booting },
            last_ack: Some(Instant::now()),
            since: Some(Instant::now()),
            last_update: None,
            timeout_s,
        };
        ::engine::info!(
            "rental start: VM {vm_id} ({engine_name}) for peer {from_id} at {endpoint}, image {}, {} vCPU, {} MB memory, {} MB disk, tunnel {vm_ip}{}",
            self.opts.image,
            rental.cpus,
            rental.memory_mb,
            rental.disk_mb,
            if dry_run { " (dry run)" } else { "" }
        );
        {
            let mut st = self.lock();
            st.consumers.insert(from_id.to_string());
            st.rentals.insert(vm_id.clone(), rental);
        }
        self.save_rentals();
        Ok(VmCreated {
            request_id: req.request_id.clone(),
            vm_id,
            vm_ip: vm_ip.to_string(),
            vm_public_key,
            ssh_host_key: host_key.split(' ').take(2).collect::<Vec<_>>().join(" "),
            ssh_host_fingerprint: fingerprint,
            heartbeat_timeout_s: Some(timeout_s),
        })
    }

    fn end_rental(&self, r: &Rental, why: &str) {
        if !r.dry_run {
            if let Err(e) = self.engine.remove(&r.engine_name) {
                ::engine::warn!("removing {}: {e}", r.engine_name);
            }
        }
        let secs = crate::now_s().saturating_sub(r.started);
        ::engine::info!("rental end: VM {} ({}) of peer {} after {secs} s: {why}", r.vm_id, r.engine_name, r.consumer);
    }

    /// Tells a VM's consumer that the provider ended it (best effort: it may be gone).
    fn tell_consumer(&self, r: &Rental, why: &str) {
        if let Some(ep) = self.peer_endpoint(&r.consumer) {
            let msg = Message::VmError { request_id: None, vm_id: Some(r.vm_id.clone()), error: why.into() };
            self.send(&r.consumer, ep, msg);
        }
    }

    fn release_rental(self: &Arc<Self>, from_id: &str, from: SocketAddrV4, vm_id: &str) {
        let owner = self.lock().rentals.get(vm_id).map(|r| r.consumer.clone());
        match owner {
            None => self.send(from_id, from, Message::VmReleased { vm_id: vm_id.into() }),
            Some(o) if o != from_id => self.send(
                from_id,
                from,
                Message::VmError {
                    request_id: None,
                    vm_id: Some(vm_id.into()),
                    error: "Not authorized to release this VM".into(),
                },
            ),
            Some(_) => {
                let Some(r) = self.lock().rentals.remove(vm_id) else { return };
                let keep = r.clone();
                let (d, to, id) = (self.clone(), from_id.to_string(), vm_id.to_string());
                let queued = self.queue(
                    "a release",
                    Box::new(move || {
                        d.end_rental(&r, "released by its consumer");
                        d.save_rentals();
                        d.send(&to, from, Message::VmReleased { vm_id: id });
                    }),
                );
                if !queued {
                    // Not done: it stays, and the consumer may ask again.
                    self.lock().rentals.insert(keep.vm_id.clone(), keep);
                    let error = "the provider is busy; release again in a moment".to_string();
                    self.send(from_id, from, Message::VmError { request_id: None, vm_id: Some(vm_id.into()), error });
                }
            }
        }
    }

    fn send_heartbeats(&self) {
        let mut by_consumer: HashMap<String, Vec<String>> = HashMap::new();
        {
            let st = self.lock();
            for c in &st.consumers {
                by_consumer.insert(c.clone(), Vec::new());
            }
            for r in st.rentals.values() {
                by_consumer.entry(r.consumer.clone()).or_default().push(r.vm_id.clone());
            }
        }
        for (consumer, mut vm_ids) in by_consumer {
            vm_ids.sort();
            if let Some(ep) = self.peer_endpoint(&consumer) {
                self.send(&consumer, ep, Message::VmHeartbeat { vm_ids, timestamp: crate::now_s() });
            }
        }
        self.refresh_boot_states();
    }

    /// Follows booting VMs: one that failed is removed and its consumer told why.
    fn refresh_boot_states(&self) {
        let booting: Vec<(String, String)> = self
            .lock()
            .rentals
            .values()
            .filter(|r| r.state == RentalState::Booting)
            .map(|r| (r.vm_id.clone(), r.engine_name.clone()))
            .collect();
        for (vm_id, name) in booting {
            let Ok(state) = self.engine.vm_state(&name) else { continue };
            let r = match state {
                VmState::Booting => continue,
                VmState::Ready => {
                    if let Some(r) = self.lock().rentals.get_mut(&vm_id) {
                        r.state = RentalState::Ready;
                        ::engine::info!("VM {vm_id} ({name}) is ready");
                    }
                    None
                }
                VmState::Other(_) => self.lock().rentals.remove(&vm_id),
            };
            if let Some(r) = r {
                let why = format!("the VM did not boot (engine state {state})");
                self.end_rental(&r, &why);
                self.save_rentals();
                if let Some(ep) = self.peer_endpoint(&r.consumer) {
                    self.send(&r.consumer, ep, Message::VmError { request_id: None, vm_id: Some(vm_id), error: why });
                }
            }
        }
    }

    fn heartbeat_answer(self: &Arc<Self>, from_id: &str, vm_ids: &[String]) {
        // A VM made after the heartbeat left may be missing from its answer: it is judged by
        // the next one.
        let grace = self.opts.heartbeat + Duration::from_secs(5);
        let gone: Vec<Rental> = {
            let mut st = self.lock();
            let mut gone = Vec::new();
            let mine: Vec<String> =
                st.rentals.values().filter(|r| r.consumer == from_id).map(|r| r.vm_id.clone()).collect();
            if mine.is_empty() {
                // It heard that it has nothing here: no more heartbeats until it rents again.
                st.consumers.remove(from_id);
            }
            for id in mine {
                let young = st.rentals.get(&id).and_then(|r| r.since).is_some_and(|t| t.elapsed() < grace);
                if vm_ids.contains(&id) {
                    if let Some(r) = st.rentals.get_mut(&id) {
                        r.last_ack = Some(Instant::now());
                    }
                } else if !young {
                    if let Some(r) = st.rentals.remove(&id) {
                        gone.push(r);
                    }
                }
            }
            gone
        };
        if gone.is_empty() {
            return;
        }
        let d = self.clone();
        let keep = gone.clone();
        let queued = self.queue(
            "ending VMs a heartbeat answer left out",
            Box::new(move || {
                for r in &gone {
                    d.end_rental(r, "its consumer no longer wants it (heartbeat answer)");
                }
                d.save_rentals();
            }),
        );
        if !queued {
            let mut st = self.lock();
            for r in keep {
                st.rentals.insert(r.vm_id.clone(), r);
            }
        }
    }

    fn reclaim_silent(&self) {
        let gone: Vec<Rental> = {
            let mut st = self.lock();
            let silent: Vec<String> = st
                .rentals
                .values()
                .filter(|r| r.last_ack.is_some_and(|t| t.elapsed() > Duration::from_secs(r.timeout_s)))
                .map(|r| r.vm_id.clone())
                .collect();
            silent.iter().filter_map(|id| st.rentals.remove(id)).collect()
        };
        for r in &gone {
            let why = format!("reclaimed: its consumer answered no heartbeat for {} s", r.timeout_s);
            self.end_rental(r, &why);
            self.tell_consumer(r, &why);
        }
        if !gone.is_empty() {
            self.save_rentals();
        }
    }

    fn endpoint_update(self: &Arc<Self>, from_id: &str, from: SocketAddrV4, vm_id: &str, endpoint: &str) {
        let rental = self.lock().rentals.get(vm_id).cloned();
        let Some(r) = rental.filter(|r| r.consumer == from_id) else {
            ::engine::warn!("vm_endpoint_update from {from_id} for a VM it does not rent here: ignored");
            return;
        };
        let ep = match check::endpoint(endpoint) {
            Ok(ep) if ep.ip() == from.ip() => ep,
            Ok(ep) => {
                return ::engine::warn!(
                    "vm_endpoint_update from {from_id} refused: {ep} is not its source address {}",
                    from.ip()
                )
            }
            Err(e) => return ::engine::warn!("vm_endpoint_update from {from_id} refused: {e}"),
        };
        if r.endpoint == ep.to_string() {
            return;
        }
        if r.last_update.is_some_and(|t| t.elapsed() < Duration::from_secs(5)) {
            return ::engine::warn!("VM {vm_id}: endpoint changes come too fast; {ep} ignored");
        }
        if let Some(x) = self.lock().rentals.get_mut(vm_id) {
            x.last_update = Some(Instant::now());
        }
        let (d, vm_id) = (self.clone(), vm_id.to_string());
        self.queue(
            "an endpoint change",
            Box::new(move || {
                if !r.dry_run {
                    if let Err(e) = d.engine.allow_set(&r.engine_name, ep) {
                        return ::engine::warn!("VM {vm_id}: the new endpoint {ep} could not be applied: {e}");
                    }
                }
                if let Some(x) = d.lock().rentals.get_mut(&vm_id) {
                    x.endpoint = ep.to_string();
                }
                ::engine::info!("VM {vm_id}: consumer endpoint now {ep}");
                d.save_rentals();
            }),
        );
    }

    fn provider_state_path(&self) -> Option<PathBuf> {
        self.home.sub("provider").ok().map(|d| d.join(format!("{}.json", self.id)))
    }

    fn save_rentals(&self) {
        let _saving = self.saving.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let list: Vec<Rental> = self.lock().rentals.values().cloned().collect();
        if let (Some(p), Ok(json)) = (self.provider_state_path(), serde_json::to_vec_pretty(&list)) {
            if let Err(e) = crate::net::write_private(&p, &json) {
                ::engine::warn!("saving the rentals: {e}");
            }
        }
    }

    // ---- consumer ----

    fn leases_path(&self) -> Option<PathBuf> {
        self.home.sub("vms").ok().map(|d| d.join("active.json"))
    }

    fn save_leases(&self) {
        let _saving = self.saving.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(path) = self.leases_path() else { return };
        // Other networks' entries stay.
        let mut all: Vec<ActiveVm> =
            std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        all.retain(|a| a.network != self.id);
        for l in self.lock().leases.values() {
            all.push(ActiveVm {
                network: self.id.clone(),
                vm_id: l.vm_id.clone(),
                provider: l.provider.clone(),
                vm_ip: l.vm_ip.to_string(),
                interface: l.interface.clone(),
                created: l.created,
            });
        }
        if let Ok(json) = serde_json::to_vec_pretty(&all) {
            if let Err(e) = crate::net::write_private(&path, &json) {
                ::engine::warn!("saving the active VMs: {e}");
            }
        }
    }

    /// What a crashed predecessor left: its VMs (provider) and tunnels (consumer).
    fn clean_leftovers(&self) {
        if let Some(p) = self.provider_state_path() {
            let old: Vec<Rental> =
                std::fs::read(&p).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
            for r in &old {
                self.end_rental(r, "left by a daemon that did not stop cleanly");
                if crate::net::valid_id(&r.consumer) {
                    self.lock().consumers.insert(r.consumer.clone());
                }
            }
            if !old.is_empty() {
                self.save_rentals();
            }
        }
        if let Some(p) = self.leases_path() {
            let all: Vec<ActiveVm> =
                std::fs::read(&p).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
            let mut any = false;
            for a in all.iter().filter(|a| a.network == self.id) {
                if tunnel_name_ok(&a.interface) {
                    tunnel::remove_interface(&a.interface);
                }
                ::engine::info!("removed the tunnel {} of VM {} left by an earlier daemon", a.interface, a.vm_id);
                any = true;
            }
            if any {
                self.save_leases();
            }
        }
    }

    fn vm_failed(&self, from_id: &str, vm_id: &str, error: &str) {
        let tunnel = {
            let mut st = self.lock();
            let Some(l) = st.leases.get_mut(vm_id).filter(|l| l.provider == from_id) else { return };
            l.error = Some(crate::net::printable(error, 200));
            l.tunnel.take()
        };
        ::engine::warn!("VM {vm_id} failed at its provider: {}", crate::net::printable(error, 200));
        if let Some(mut t) = tunnel {
            t.remove();
        }
    }

    fn heartbeat_from_provider(&self, from_id: &str, from: SocketAddrV4, vm_ids: &[String]) {
        let (wanted, dropped) = {
            let mut st = self.lock();
            let wanted: Vec<String> = vm_ids
                .iter()
                .filter(|v| st.leases.get(*v).is_some_and(|l| l.provider == from_id && l.error.is_none()))
                .cloned()
                .collect();
            // Leases of this provider that it no longer lists (a grace period for a lease
            // made while the heartbeat was on its way).
            let stale: Vec<String> = st
                .leases
                .values()
                .filter(|l| {
                    l.provider == from_id
                        && !vm_ids.contains(&l.vm_id)
                        && l.created_at.elapsed() > Duration::from_secs(5)
                })
                .map(|l| l.vm_id.clone())
                .collect();
            let dropped: Vec<Lease> = stale.iter().filter_map(|id| st.leases.remove(id)).collect();
            (wanted, dropped)
        };
        let any = !dropped.is_empty();
        for mut l in dropped {
            ::engine::info!("VM {} is no longer listed by its provider {from_id}: tunnel removed", l.vm_id);
            if let Some(t) = l.tunnel.as_mut() {
                t.remove();
            }
        }
        if any {
            self.save_leases();
        }
        self.send(from_id, from, Message::VmHeartbeatResponse { vm_ids: wanted });
    }

    /// Our address toward `to` (the one the kernel picks for it).
    fn local_ip_toward(to: SocketAddrV4) -> Option<Ipv4Addr> {
        let s = UdpSocket::bind("0.0.0.0:0").ok()?;
        s.connect(to).ok()?;
        match s.local_addr().ok()? {
            SocketAddr::V4(a) => Some(*a.ip()),
            SocketAddr::V6(_) => None,
        }
    }

    /// Sends `vm_endpoint_update` for each VM whose provider now sees us from elsewhere.
    fn check_endpoints(&self) {
        let leases: Vec<(String, String, Ipv4Addr, u16)> = self
            .lock()
            .leases
            .values()
            .filter(|l| l.error.is_none())
            .map(|l| (l.vm_id.clone(), l.provider.clone(), l.endpoint_ip, l.port))
            .collect();
        for (vm_id, provider, old_ip, port) in leases {
            let Some(ep) = self.peer_endpoint(&provider) else { continue };
            let Some(ip) = Self::local_ip_toward(ep) else { continue };
            if ip == old_ip {
                continue;
            }
            let new = SocketAddrV4::new(ip, port);
            ::engine::info!("VM {vm_id}: our endpoint moved from {old_ip} to {new}: telling its provider");
            self.send(
                &provider,
                ep,
                Message::VmEndpointUpdate { vm_id: vm_id.clone(), consumer_endpoint: new.to_string() },
            );
            if let Some(l) = self.lock().leases.get_mut(&vm_id) {
                l.endpoint_ip = ip;
            }
        }
    }

    // ---- IPC ----

    fn ipc_loop(self: Arc<Self>, listener: UnixListener) {
        for conn in listener.incoming() {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let Ok(mut conn) = conn else { continue };
            if self.clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                self.clients.fetch_sub(1, Ordering::SeqCst);
                let _ = ipc::write_frame(&mut conn, &err("omertad is busy: too many clients").to_value());
                continue;
            }
            let d = self.clone();
            spawn("mesh-client", move || {
                d.serve(conn);
                d.clients.fetch_sub(1, Ordering::SeqCst);
            });
        }
    }

    fn serve(&self, mut conn: UnixStream) {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
        let reply = match ipc::read_frame(&mut conn) {
            Ok(body) => match serde_json::from_slice::<Request>(&body) {
                Ok(req) => self.handle(req),
                Err(e) => err(format!("not a request: {}", e.to_string().chars().take(120).collect::<String>())),
            },
            Err(e) => err(format!("reading the request: {e}")),
        };
        let _ = ipc::write_frame(&mut conn, &reply.to_value());
    }

    fn handle(&self, req: Request) -> Reply {
        match req {
            Request::Status => ok(&self.status()),
            Request::Peers => ok(&self.peers()),
            Request::Ping { peer_id, timeout } => {
                self.ping(&peer_id, Duration::from_millis(timeout.unwrap_or(3000).clamp(100, 30_000)))
            }
            Request::VmRequest { peer_id, requirements, timeout_minutes, dry_run } => {
                match self.request_vm(&peer_id, requirements, timeout_minutes, dry_run || self.opts.dry_run) {
                    Ok(v) => ok(&v),
                    Err(e) => err(e),
                }
            }
            Request::VmList => ok(&self.vm_list()),
            Request::VmRelease { vm_id } => match self.release(&vm_id) {
                Ok(v) => ok(&v),
                Err(e) => err(e),
            },
        }
    }

    fn status(&self) -> ipc::Status {
        let st = self.lock();
        ipc::Status {
            network: self.id.clone(),
            network_name: self.net.name.clone(),
            peer_id: self.my_id.clone(),
            port: self.opts.port,
            provider: self.opts.provider,
            dry_run: self.opts.dry_run,
            peers: st.peers.len(),
            providing: st.rentals.len(),
            renting: st.leases.len(),
            dropped_datagrams: st.drops,
            socket: self.socket_path.display().to_string(),
        }
    }

    fn peers(&self) -> Vec<ipc::PeerView> {
        let st = self.lock();
        let mut v: Vec<ipc::PeerView> = st
            .peers
            .iter()
            .map(|(id, p)| ipc::PeerView {
                peer_id: id.clone(),
                endpoint: p.endpoint.to_string(),
                last_seen_seconds_ago: p.last_seen.elapsed().as_secs(),
            })
            .collect();
        v.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        v
    }

    fn ping(&self, peer: &str, wait: Duration) -> Reply {
        if !crate::net::valid_id(peer) {
            return err(format!("'{}' is not a peer ID (16 hex characters)", crate::net::printable(peer, 40)));
        }
        let Some(ep) = self.peer_endpoint(peer) else {
            return err(unknown_peer(peer));
        };
        let nonce = match crate::random_id() {
            Ok(n) => n,
            Err(e) => return err(e.to_string()),
        };
        let t0 = Instant::now();
        match self.ask(peer, ep, format!("ping:{nonce}"), Message::Ping { nonce }, wait) {
            Some((_, from)) => {
                let ms = t0.elapsed().as_secs_f64() * 1000.0;
                ok(&ipc::Pong {
                    peer_id: peer.to_string(),
                    endpoint: from.to_string(),
                    latency_ms: (ms * 10.0).round() / 10.0,
                })
            }
            None => err("No response from provider"),
        }
    }

    fn ensure_ssh_key(&self) -> Result<String, String> {
        let dir = self.home.sub("ssh").map_err(|e| e.to_string())?;
        let private = dir.join("id_ed25519");
        let public = dir.join("id_ed25519.pub");
        if let Ok(text) = std::fs::read_to_string(&public) {
            if private.exists() {
                return check::ssh_public_key(text.trim()).map_err(|e| e.to_string());
            }
        }
        let pair = ssh_key::private::Ed25519Keypair::from_seed(&crate::random::<32>().map_err(|e| e.to_string())?);
        let key = ssh_key::PrivateKey::from(pair);
        let text = key.to_openssh(ssh_key::LineEnding::LF).map_err(|e| format!("SSH key: {e}"))?;
        crate::net::write_private(&private, text.as_bytes()).map_err(|e| e.to_string())?;
        let pub_line = key.public_key().to_openssh().map_err(|e| format!("SSH key: {e}"))?;
        crate::net::write_private(&public, format!("{pub_line} omerta\n").as_bytes()).map_err(|e| e.to_string())?;
        ::engine::info!("made the SSH key {}", private.display());
        check::ssh_public_key(&pub_line).map_err(|e| e.to_string())
    }

    fn request_vm(
        &self,
        peer: &str,
        requirements: Requirements,
        timeout_minutes: Option<u32>,
        dry_run: bool,
    ) -> Result<ipc::VmGranted, String> {
        if !crate::net::valid_id(peer) {
            return Err(format!("'{}' is not a peer ID (16 hex characters)", crate::net::printable(peer, 40)));
        }
        let ep = self.peer_endpoint(peer).ok_or_else(|| unknown_peer(peer))?;
        let ssh_key = self.ensure_ssh_key()?;
        // A provider that does not answer a ping (down, unreachable, or on another network
        // key) is told at once, not after the wait for a VM.
        let nonce = crate::random_id().map_err(|e| e.to_string())?;
        if self.ask(peer, ep, format!("ping:{nonce}"), Message::Ping { nonce }, Duration::from_secs(3)).is_none() {
            return Err("No response from provider".into());
        }
        // The /24 and the port are reserved while the request is in flight, so two requests
        // at once never pick the same.
        let (consumer_ip, vm_ip, port) = {
            let mut st = self.lock();
            let mut taken: Vec<(Ipv4Addr, u16)> = st.leases.values().map(|l| (l.consumer_ip, l.port)).collect();
            taken.extend(st.reserved.iter().copied());
            let (ips, ports): (Vec<Ipv4Addr>, Vec<u16>) = taken.into_iter().unzip();
            let (c, v) = tunnel::pick_addresses(&ips, crate::random::<2>().map_err(|e| e.to_string())?)
                .ok_or("no free tunnel /24 in 10.50-249.x")?;
            let port = tunnel::free_port(&ports).ok_or("no free UDP port from 51900 for the tunnel")?;
            st.reserved.push((c, port));
            (c, v, port)
        };
        let r =
            self.request_vm_with(peer, ep, ssh_key, (consumer_ip, vm_ip, port), requirements, timeout_minutes, dry_run);
        self.lock().reserved.retain(|x| *x != (consumer_ip, port));
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn request_vm_with(
        &self,
        peer: &str,
        ep: SocketAddrV4,
        ssh_key: String,
        (consumer_ip, vm_ip, port): (Ipv4Addr, Ipv4Addr, u16),
        requirements: Requirements,
        timeout_minutes: Option<u32>,
        dry_run: bool,
    ) -> Result<ipc::VmGranted, String> {
        let my_ip = Self::local_ip_toward(ep).ok_or(format!("no route to the provider at {ep}"))?;
        let request_id = crate::random_id().map_err(|e| e.to_string())?;
        let interface = format!("wg{}", &request_id[..8]);
        let (wg_private, wg_public) = control::provision::wg_keypair()?;
        let mut tunnel = None;
        if !dry_run {
            let key_file = self.home.sub("run").map_err(|e| e.to_string())?.join(format!("{interface}.key"));
            crate::net::write_private(&key_file, wg_private.as_bytes()).map_err(|e| e.to_string())?;
            let made = Tunnel::create(&interface, &key_file, port, consumer_ip);
            let _ = std::fs::remove_file(&key_file);
            tunnel = Some(made.map_err(|e| e.to_string())?);
        }
        let req = VmRequest {
            request_id: request_id.clone(),
            requirements,
            consumer_public_key: wg_public,
            consumer_endpoint: SocketAddrV4::new(my_ip, port).to_string(),
            consumer_vpn_ip: consumer_ip.to_string(),
            vm_vpn_ip: vm_ip.to_string(),
            ssh_public_key: ssh_key,
            ssh_user: check::SSH_USER.into(),
            timeout_minutes,
            dry_run,
        };
        let answer =
            self.ask(peer, ep, format!("request:{request_id}"), Message::VmRequest(Box::new(req)), REQUEST_WAIT);
        let fail = |mut t: Option<Tunnel>, why: String| {
            if let Some(t) = t.as_mut() {
                t.remove();
            }
            Err(why)
        };
        let created = match answer {
            None => return fail(tunnel, "No response from provider".into()),
            Some((Message::VmError { error, .. }, _)) => {
                return fail(tunnel, format!("the provider refused: {}", crate::net::printable(&error, 200)))
            }
            Some((Message::VmCreated(c), _)) => c,
            Some(_) => return fail(tunnel, "the provider answered with another message".into()),
        };
        // The provider's answer is checked like anything else from a peer.
        let checked = (|| -> Result<(String, String, String), String> {
            let id = check::vm_id(&created.vm_id).map_err(|e| e.to_string())?;
            if created.vm_ip != vm_ip.to_string() {
                return Err(format!(
                    "the provider gave the VM {} instead of the address proposed, {vm_ip}",
                    crate::net::printable(&created.vm_ip, 20)
                ));
            }
            let key = check::wg_key(&created.vm_public_key).map_err(|e| e.to_string())?;
            let host = check::ssh_public_key(&created.ssh_host_key).map_err(|e| e.to_string())?;
            let fp = check::fingerprint(&created.ssh_host_fingerprint).map_err(|e| e.to_string())?;
            let real = ssh_key::PublicKey::from_openssh(&host)
                .map_err(|e| e.to_string())?
                .fingerprint(ssh_key::HashAlg::Sha256)
                .to_string();
            if real != fp {
                return Err("the VM's SSH host key does not match its fingerprint".into());
            }
            let _ = key;
            Ok((id, host, fp))
        })();
        let (vm_id, host_key, fingerprint) = match checked {
            Ok(x) => x,
            Err(e) => return fail(tunnel, format!("the provider's answer was refused: {e}")),
        };
        if let Some(t) = &tunnel {
            if let Err(e) = t.add_peer(&created.vm_public_key, vm_ip) {
                return fail(tunnel, e.to_string());
            }
        }
        let known_hosts = self.home.dir.join("known_hosts");
        self.pin_host_key(&known_hosts, vm_ip, &host_key)?;
        let ssh_dir = self.home.dir.join("ssh");
        let ssh_command = format!(
            "ssh -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes -i {} {}@{vm_ip}",
            known_hosts.display(),
            ssh_dir.join("id_ed25519").display(),
            check::SSH_USER
        );
        let kind = tunnel.as_ref().map_or("none (dry run)", |t| t.kind);
        ::engine::info!("VM {vm_id} from {peer}: {vm_ip} through {interface} ({kind}), host key {fingerprint}");
        self.lock().leases.insert(
            vm_id.clone(),
            Lease {
                vm_id: vm_id.clone(),
                provider: peer.into(),
                vm_ip,
                consumer_ip,
                port,
                endpoint_ip: my_ip,
                fingerprint: fingerprint.clone(),
                created: crate::now_s(),
                created_at: Instant::now(),
                dry_run,
                error: None,
                tunnel,
                interface: interface.clone(),
            },
        );
        self.save_leases();
        Ok(ipc::VmGranted {
            vm_id,
            vm_ip: vm_ip.to_string(),
            consumer_ip: consumer_ip.to_string(),
            interface,
            tunnel_kind: kind.to_string(),
            listen_port: port,
            ssh_command,
            ssh_host_fingerprint: fingerprint,
            provider: peer.into(),
            dry_run,
            heartbeat_timeout_minutes: created
                .heartbeat_timeout_s
                .map_or(u64::from(timeout_minutes.unwrap_or(10)), |s| s.div_ceil(60)),
        })
    }

    /// Removes the lines of `ip` from `known_hosts` (a released VM's address may be another
    /// VM's tomorrow).
    fn unpin_host_key(&self, path: &std::path::Path, ip: Ipv4Addr) -> Result<(), String> {
        let _saving = self.saving.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Ok(old) = std::fs::read_to_string(path) else { return Ok(()) };
        let prefix = format!("{ip} ");
        let text: String = old.lines().filter(|l| !l.starts_with(&prefix)).map(|l| format!("{l}\n")).collect();
        crate::net::write_private(path, text.as_bytes()).map_err(|e| e.to_string())
    }

    /// Writes `ip KEY` into `known_hosts`, replacing earlier lines for that address.
    fn pin_host_key(&self, path: &std::path::Path, ip: Ipv4Addr, key: &str) -> Result<(), String> {
        let _saving = self.saving.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = std::fs::read_to_string(path).unwrap_or_default();
        let prefix = format!("{ip} ");
        let mut text: String = old.lines().filter(|l| !l.starts_with(&prefix)).map(|l| format!("{l}\n")).collect();
        text.push_str(&format!("{ip} {key}\n"));
        crate::net::write_private(path, text.as_bytes()).map_err(|e| e.to_string())
    }

    fn vm_list(&self) -> ipc::VmList {
        let st = self.lock();
        let mut renting: Vec<ipc::RentedView> = st
            .leases
            .values()
            .map(|l| ipc::RentedView {
                vm_id: l.vm_id.clone(),
                provider: l.provider.clone(),
                vm_ip: l.vm_ip.to_string(),
                interface: l.interface.clone(),
                created: l.created,
                dry_run: l.dry_run,
                ssh_host_fingerprint: l.fingerprint.clone(),
                state: l.error.as_ref().map_or("active".to_string(), |e| format!("failed: {e}")),
                last_handshake: l.tunnel.as_ref().map(Tunnel::last_handshake),
            })
            .collect();
        renting.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
        let mut providing: Vec<ipc::ProvidedView> = st
            .rentals
            .values()
            .map(|r| ipc::ProvidedView {
                vm_id: r.vm_id.clone(),
                consumer: r.consumer.clone(),
                vm_ip: r.vm_ip.clone(),
                engine_name: r.engine_name.clone(),
                consumer_endpoint: r.endpoint.clone(),
                state: r.state,
                started: r.started,
                dry_run: r.dry_run,
                cpus: r.cpus,
                memory_mb: r.memory_mb,
            })
            .collect();
        providing.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
        ipc::VmList { renting, providing }
    }

    fn release(&self, vm_id: &str) -> Result<ipc::Released, String> {
        let vm_id = check::vm_id(vm_id).map_err(|e| e.to_string())?;
        let provider = self
            .lock()
            .leases
            .get(&vm_id)
            .map(|l| l.provider.clone())
            .ok_or(format!("no VM {vm_id} is rented here"))?;
        let ep = self.peer_endpoint(&provider).ok_or("Provider endpoint not available")?;
        let answer = self.ask(
            &provider,
            ep,
            format!("release:{vm_id}"),
            Message::VmRelease { vm_id: vm_id.clone() },
            Duration::from_secs(30),
        );
        match answer {
            Some((Message::VmReleased { .. }, _)) => {
                let lease = self.lock().leases.remove(&vm_id);
                if let Some(ip) = lease.as_ref().map(|l| l.vm_ip) {
                    let _ = self.unpin_host_key(&self.home.dir.join("known_hosts"), ip);
                }
                if let Some(mut t) = lease.and_then(|l| l.tunnel) {
                    t.remove();
                }
                self.save_leases();
                ::engine::info!("VM {vm_id} released");
                Ok(ipc::Released { vm_id, released: true })
            }
            Some((Message::VmError { error, .. }, _)) => Err(crate::net::printable(&error, 200)),
            Some(_) => Err("the provider answered with another message".into()),
            None => Err("No response from provider".into()),
        }
    }
}

/// The plan's error for a peer this daemon cannot reach, with what to check.
fn unknown_peer(peer: &str) -> String {
    format!(
        "Provider endpoint not available: {peer} is not a bootstrap peer of this network and has not been seen (omerta peers lists those known)"
    )
}

fn tunnel_name_ok(s: &str) -> bool {
    s.len() == 10 && s.starts_with("wg") && s[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new().name(name.into()).spawn(f).unwrap_or_else(|e| {
        eprintln!("omertad: cannot start a thread: {e}");
        std::process::exit(1)
    })
}
