//! `omertad`: one daemon per network and user, provider and consumer at once.
//!
//! By job, one file each: [`peers`] the wire (the UDP socket, the peer table, who waits for
//! which answer), [`provider`] the VMs this node rents out, [`consumer`] the VMs it rents,
//! [`engine`] every request to the engine's control socket, [`store`] the state files,
//! [`timers`] the periodic work, [`serve`] the IPC listener. Each role keeps its own state
//! behind its own lock; no lock is held while another is taken, nor across I/O to the engine
//! or a peer.
//!
//! Threads: the receiver (one UDP socket, every datagram admitted by [`crate::admit`] and
//! opened and checked by [`crate::wire::open`], then dispatched on its type), the timer (keepalives, heartbeats,
//! reclaims, endpoint changes), the IPC listener (a thread per CLI connection, at most
//! [`MAX_CLIENTS`]), the provider's engine queue, and the main thread, which waits for
//! SIGTERM/SIGINT and then stops this daemon's VMs and removes its tunnels. A provider's VM
//! starts run on a thread of their own (at most [`MAX_STARTING`] at once) so the receiver
//! never waits for the engine.
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::net::{Home, HomeError};
use crate::wire::Message;

mod consumer;
mod engine;
mod journal;
mod peers;
mod provider;
mod serve;
mod store;
mod timers;

pub use crate::ipc::RentalState;
pub use consumer::ConsumerError;
pub use engine::EngineError;

use consumer::Consumer;
use peers::Link;
use provider::Provider;

/// CLI connections served at once.
pub const MAX_CLIENTS: usize = 16;
/// Provider VM starts at once.
pub const MAX_STARTING: usize = 2;

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
    /// How the consumer's tunnels are made.
    pub tunnel: crate::tunnel::Mode,
    /// The UDP ports the provider's VMs take (`None`: any the kernel picks).
    pub port_range: Option<std::ops::RangeInclusive<u16>>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            network: String::new(),
            port: 9999,
            bind: Ipv4Addr::UNSPECIFIED,
            dry_run: false,
            provider: true,
            engine_socket: engine::default_socket(),
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
            tunnel: crate::tunnel::Mode::Auto,
            port_range: None,
        }
    }
}

/// Why the daemon could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state directory, the network or the identity.
    #[error(transparent)]
    Home(#[from] HomeError),
    /// A file or socket of the state directory.
    #[error("{}: {source}", .path.display())]
    Io {
        /// Which.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another daemon holds the lock.
    #[error("a daemon for network {id} already runs for this user (its socket: {}); stop it first, or use it: omerta status --network {id}", .socket.display())]
    Running {
        /// The network.
        id: String,
        /// Its daemon's socket.
        socket: PathBuf,
    },
    /// The lock could not be taken.
    #[error("locking: {0}")]
    Lock(std::io::Error),
    /// The UDP socket.
    #[error("UDP {bind}:{port}: {source}")]
    Bind {
        /// The address.
        bind: Ipv4Addr,
        /// The port.
        port: u16,
        /// Why.
        source: std::io::Error,
    },
    /// The UDP socket's timeout.
    #[error("{0}")]
    Socket(std::io::Error),
    /// The signal handler.
    #[error("signals: {0}")]
    Signals(std::io::Error),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    /// The consumer's SSH key.
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
}

/// A running daemon: the wire and the two roles, wired together.
#[derive(Debug)]
pub struct Daemon {
    link: Arc<Link>,
    provider: Arc<Provider>,
    consumer: Arc<Consumer>,
    opts: Options,
    stop: Arc<AtomicBool>,
    /// Set by `omertad stop --release`: the rentals end with the daemon.
    release: AtomicBool,
    socket_path: PathBuf,
    /// Held for the daemon's life: one daemon per network and user.
    _lock: std::fs::File,
}

/// Takes an exclusive lock on `f` without waiting: `Ok(false)` when another process holds it.
fn try_lock(f: &std::fs::File) -> Result<bool, DaemonError> {
    sys::try_lock_exclusive(std::os::fd::AsFd::as_fd(f)).map_err(DaemonError::Lock)
}

impl Daemon {
    /// Opens the network, binds the UDP socket and the IPC socket (refusing when another
    /// daemon of this network and user answers there), and cleans up what a crashed
    /// predecessor left.
    pub fn start(home: Home, opts: Options) -> Result<Arc<Self>, DaemonError> {
        let net = home.network(&opts.network)?;
        let id = net.id();
        let me = home.identity()?;
        let socket_path = crate::ipc::socket_path(&home, &id)?;
        let lock_path = socket_path.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| DaemonError::Io { path: lock_path.clone(), source })?;
        if !try_lock(&lock)? {
            return Err(DaemonError::Running { id, socket: socket_path });
        }
        let sock = UdpSocket::bind(SocketAddrV4::new(opts.bind, opts.port)).map_err(|source| DaemonError::Bind {
            bind: opts.bind,
            port: opts.port,
            source,
        })?;
        sock.set_read_timeout(Some(Duration::from_millis(250))).map_err(DaemonError::Socket)?;
        // Room for a flood's bursts while the receiver is not scheduled: what overflows the
        // kernel's queue is lost before admission can tell the flood from honest peers.
        sys::grow_buffers(std::os::fd::AsFd::as_fd(&sock), 4 << 20);
        let _ = std::fs::remove_file(&socket_path);
        let link = Arc::new(Link::new(net, me, sock, &home, &opts.allow_peers)?);
        let provider = Arc::new(Provider::new(link.clone(), &home, &opts));
        let consumer = Arc::new(Consumer::new(link.clone(), home, &opts));
        let d = Arc::new(Self {
            link,
            provider,
            consumer,
            opts,
            stop: Arc::new(AtomicBool::new(false)),
            release: AtomicBool::new(false),
            socket_path,
            _lock: lock,
        });
        d.provider.adopt();
        d.consumer.restore();
        // The consumer's SSH key, made once here rather than by concurrent requests.
        d.consumer.ensure_ssh_key()?;
        Ok(d)
    }

    /// This node's peer ID.
    pub fn peer_id(&self) -> &str {
        self.link.my_id()
    }

    /// The IPC socket's path.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Runs until SIGTERM or SIGINT (or `omertad stop`); then saves the rentals it provides,
    /// whose VMs keep running for the next start (ended instead after `omertad stop
    /// --release`), and stops the VMs it rents and their tunnels. `notify`
    /// hears `READY=1` once the IPC socket is up and the threads run (systemd `Type=notify`).
    /// SIGHUP is logged and changes nothing (all the daemon reads it reads at start).
    pub fn run(self: &Arc<Self>, notify: &control::notify::Notifier) -> Result<(), DaemonError> {
        let io = |source| DaemonError::Io { path: self.socket_path.clone(), source };
        let listener = UnixListener::bind(&self.socket_path).map_err(io)?;
        std::fs::set_permissions(&self.socket_path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGHUP,
        ])
        .map_err(DaemonError::Signals)?;
        let mut threads = Vec::new();
        let started = (|| {
            threads.push(spawn("mesh-rx", {
                let d = self.clone();
                move || d.link.receive_loop(&d.stop, |from_id, from, ts, msg| d.dispatch(from_id, from, ts, msg))
            })?);
            threads.push(spawn("mesh-timer", {
                let d = self.clone();
                move || timers::run(&d.link, &d.provider, &d.consumer, &d.opts, &d.stop)
            })?);
            threads.push(spawn("mesh-ipc", {
                let d = self.clone();
                move || serve::accept_loop(&d, listener)
            })?);
            threads.push(spawn("mesh-engine", {
                let d = self.clone();
                move || d.provider.run_jobs(&d.stop)
            })?);
            Ok(())
        })();
        if let Err(e) = started {
            self.stop_threads(threads);
            let _ = std::fs::remove_file(&self.socket_path);
            return Err(DaemonError::Thread(e));
        }
        self.link.say_hello_to_bootstrap(true);
        let role = if self.opts.provider { "Mesh provider daemon started" } else { "Mesh consumer daemon started" };
        let dry = if self.opts.dry_run { " (dry run: no VM and no tunnel is made)" } else { "" };
        let tunnels = match self.opts.tunnel.resolve() {
            crate::tunnel::Mode::Userspace => "userspace (no root needed)",
            crate::tunnel::Mode::Kernel => "kernel WireGuard",
            crate::tunnel::Mode::WireguardGo => "wireguard-go",
            crate::tunnel::Mode::Auto => "kernel WireGuard, else wireguard-go",
        };
        ::engine::info!(
            "{role}{dry}: network {} ({}), UDP port {}, tunnels {tunnels}",
            self.link.network_id(),
            self.link.network_name(),
            self.opts.port
        );
        notify.send(&format!("READY=1\nSTATUS=network {}, UDP port {}", self.link.network_id(), self.opts.port));
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
        self.stop_threads(threads);
        self.provider.shutdown(self.release.load(Ordering::SeqCst));
        self.consumer.shutdown(self.release.load(Ordering::SeqCst));
        let _ = std::fs::remove_file(&self.socket_path);
        ::engine::info!("stopped");
        Ok(())
    }

    /// `omertad stop`: the daemon stops as on SIGTERM (a signal to itself, which the signal
    /// loop of [`Daemon::run`] takes), its rentals ended first when `release`.
    pub(super) fn stop_on_request(&self, release: bool) -> std::io::Result<()> {
        if release {
            self.release.store(true, Ordering::SeqCst);
        }
        ::engine::info!("stop asked over the control socket{}", if release { ", rentals released" } else { "" });
        signal_hook::low_level::raise(signal_hook::consts::SIGTERM)
    }

    /// Tells the threads to stop (the IPC listener by a connection of its own) and waits for
    /// them.
    fn stop_threads(&self, threads: Vec<std::thread::JoinHandle<()>>) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.socket_path);
        for t in threads {
            let _ = t.join();
        }
    }

    /// Hands an admitted message to its role (a heartbeat older than the last one taken from
    /// its peer is ignored).
    fn dispatch(&self, from_id: String, from: SocketAddrV4, ts: u64, msg: Message) {
        let beat = matches!(msg, Message::VmHeartbeat { .. } | Message::VmHeartbeatResponse { .. });
        if beat && !self.link.fresh_beat(&from_id, ts) {
            return;
        }
        let link = &self.link;
        match msg {
            Message::Hello { reply } => {
                if reply {
                    link.send(&from_id, from, Message::Hello { reply: false });
                }
            }
            Message::Ping { nonce } => link.send(&from_id, from, Message::Pong { nonce }),
            Message::Pong { ref nonce } => {
                link.answer(&format!("ping:{nonce}"), &from_id, msg.clone(), from);
            }
            Message::VmRequest(req) => self.provider.provide(from_id, from, *req),
            Message::VmCreated(ref c) => {
                link.answer(&format!("request:{}", c.request_id), &from_id, msg.clone(), from);
            }
            Message::VmError { ref request_id, ref vm_id, ref error } => {
                if let Some(r) = request_id {
                    let _ = link.answer(&format!("request:{r}"), &from_id, msg.clone(), from);
                } else if let Some(v) = vm_id {
                    if !link.answer(&format!("release:{v}"), &from_id, msg.clone(), from) {
                        self.consumer.vm_failed(&from_id, v, error);
                    }
                }
            }
            Message::VmRelease { vm_id } => self.provider.release(&from_id, from, &vm_id),
            Message::VmReleased { ref vm_id } => {
                link.answer(&format!("release:{vm_id}"), &from_id, msg.clone(), from);
            }
            Message::VmHeartbeat { vm_ids, .. } => self.consumer.heartbeat_from_provider(&from_id, from, &vm_ids),
            Message::VmHeartbeatResponse { vm_ids } => self.provider.heartbeat_answer(&from_id, &vm_ids),
            Message::VmStatus { vm_id, state, reason } => self.consumer.vm_status(&from_id, &vm_id, state, &reason),
            Message::VmEndpointUpdate { vm_id, consumer_endpoint } => {
                self.provider.endpoint_update(&from_id, from, &vm_id, &consumer_endpoint)
            }
        }
    }
}

/// Starts a named thread (the caller says what its failure means: no process exit here).
fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(name.into()).spawn(f)
}
