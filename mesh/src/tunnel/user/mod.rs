//! The userspace tunnel: a rented VM's WireGuard tunnel kept inside this process, for a
//! consumer without root, TUN or capabilities. One thread per VM (`mesh-tun-<id>`) runs
//! boringtun ([`noise`]) over one UDP socket, the [`fence`], and smoltcp over a [`device`];
//! CLIs reach the VM's TCP ports through unix streams joined to smoltcp sockets
//! ([`streams`]). Nothing the VM sends reaches this machine but answers on connections a CLI
//! opened. See docs/mesh.md.
pub mod device;
pub mod fence;
pub mod noise;
pub mod prover;
pub mod stats;
pub mod streams;

use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boringtun::noise::Tunn;
use boringtun::x25519::{PublicKey, StaticSecret};
use crossbeam_channel::{Receiver, Sender};
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::wire::{HardwareAddress, IpCidr};

use device::{Device, Ring};
use noise::{Noise, Received};
pub use stats::Stats;
use streams::{Opened, Streams};

/// WireGuard's keepalive toward the VM, in seconds (holds NAT mappings on the way).
pub const KEEPALIVE_S: u16 = 25;
/// How often WireGuard's timers run (as boringtun's own device does).
const TICK: Duration = Duration::from_millis(250);
/// Datagrams taken per turn before the streams get theirs.
const BATCH: usize = 256;
/// The socket's buffers asked for (the kernel caps them for an ordinary user).
const SOCKET_BUFFER: usize = 4 << 20;

const UDP: mio::Token = mio::Token(0);
const WAKER: mio::Token = mio::Token(1);
/// Stream `id` is polled under `FIRST_STREAM_TOKEN + id`.
const FIRST_STREAM_TOKEN: usize = 2;

/// What a tunnel is asked.
#[derive(Debug)]
enum Command {
    Open { port: u16, reply: Sender<Opened> },
    Attach { id: u64, stream: std::os::unix::net::UnixStream },
    Abort { id: u64 },
    Stop,
}

/// What a tunnel is made of.
#[derive(Debug)]
pub struct Spec {
    /// A name for its thread and log lines (the VM ID).
    pub name: String,
    /// Our WireGuard private key.
    pub private: [u8; 32],
    /// The VM's WireGuard public key.
    pub peer: [u8; 32],
    /// Our address inside the tunnel.
    pub me: Ipv4Addr,
    /// The VM's.
    pub vm: Ipv4Addr,
    /// Where the VM is, if known (else it is learned from its first handshake).
    pub endpoint: Option<SocketAddr>,
    /// The rental's endpoint-proof key: the tunnel proves its endpoint to `endpoint` (the
    /// VM's engine), so the VM's one endpoint follows us through NAT.
    pub proof: Option<engine::proof::Key>,
    /// The count of connections every tunnel of this daemon holds (one per daemon).
    pub streams: streams::Shared,
}

/// A running userspace tunnel; dropping it stops its thread and every connection through it.
#[derive(Debug)]
pub struct UserTunnel {
    commands: Sender<Command>,
    waker: Arc<mio::Waker>,
    stats: Arc<Stats>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
    port: u16,
}

/// Binds the tunnel's UDP socket on `port` of every address (0: any free port).
pub fn bind(port: u16) -> io::Result<UdpSocket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
    Ok(s.into())
}

impl UserTunnel {
    /// Starts the tunnel described by `spec` on `socket` (from [`bind`]).
    pub fn start(socket: UdpSocket, spec: Spec) -> io::Result<Self> {
        let port = socket.local_addr()?.port();
        socket.set_nonblocking(true)?;
        let poll = mio::Poll::new()?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER)?);
        let mut socket = mio::net::UdpSocket::from_std(socket);
        poll.registry().register(&mut socket, UDP, mio::Interest::READABLE)?;
        let stats = Arc::new(Stats::default());
        let index = u32::from_le_bytes(crate::random::<4>().map_err(io::Error::other)?) >> 8;
        let tunn = Tunn::new(
            StaticSecret::from(spec.private),
            PublicKey::from(spec.peer),
            None,
            Some(KEEPALIVE_S),
            index,
            None,
        );
        let seed = u64::from_le_bytes(crate::random::<8>().map_err(io::Error::other)?);
        let (tx, rx) = crossbeam_channel::bounded(64);
        let st = stats.clone();
        let name = format!("mesh-tun-{}", spec.name.get(..8).unwrap_or(&spec.name));
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let noise = Noise::new(tunn, socket, spec.endpoint, spec.proof.map(prover::Prover::new), &st);
            let mut w = Worker::new(noise, poll, rx, st, &spec, seed);
            w.run();
        })?;
        Ok(Self { commands: tx, waker, stats, thread: std::sync::Mutex::new(Some(thread)), port })
    }

    fn tell(&self, c: Command) -> bool {
        let sent = self.commands.send_timeout(c, Duration::from_secs(2)).is_ok();
        let _ = self.waker.wake();
        sent
    }

    /// Opens a TCP connection to the VM's `port`: its ID once the VM accepted, or why not.
    pub fn open(&self, port: u16) -> Opened {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if !self.tell(Command::Open { port, reply: tx }) {
            return Err("the tunnel is not running".into());
        }
        rx.recv_timeout(streams::CONNECT_WAIT + Duration::from_secs(2))
            .unwrap_or_else(|_| Err("the tunnel did not answer".into()))
    }

    /// Joins the accepted connection `id` to `stream`.
    pub fn attach(&self, id: u64, stream: std::os::unix::net::UnixStream) {
        self.tell(Command::Attach { id, stream });
    }

    /// Ends connection `id` before it was attached.
    pub fn abort(&self, id: u64) {
        self.tell(Command::Abort { id });
    }

    /// Its counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Its UDP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops its thread (every connection through it ends).
    pub fn stop(&self) {
        let thread = self.thread.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(t) = thread {
            self.tell(Command::Stop);
            let _ = t.join();
        }
    }
}

impl Drop for UserTunnel {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The tunnel's thread.
struct Worker {
    noise: Noise,
    iface: Interface,
    sockets: SocketSet<'static>,
    ring: Ring,
    streams: Streams,
    poll: mio::Poll,
    commands: Receiver<Command>,
    stats: Arc<Stats>,
    me: Ipv4Addr,
    vm: Ipv4Addr,
    epoch: Instant,
    next_tick: Instant,
    /// A turn stopped with datagrams still waiting: poll again at once.
    more: bool,
}

impl Worker {
    fn new(
        mut noise: Noise,
        poll: mio::Poll,
        commands: Receiver<Command>,
        stats: Arc<Stats>,
        spec: &Spec,
        seed: u64,
    ) -> Self {
        let mut ring = Ring::default();
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = seed;
        let epoch = Instant::now();
        let mut iface = {
            let mut dev = Device { rx: &mut ring, noise: &mut noise, stats: &stats };
            Interface::new(config, &mut dev, smoltcp::time::Instant::from_micros(0))
        };
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(spec.me.into(), 24));
        });
        Self {
            noise,
            iface,
            sockets: SocketSet::new(vec![]),
            ring,
            streams: Streams::new(spec.streams.clone()),
            poll,
            commands,
            stats,
            me: spec.me,
            vm: spec.vm,
            epoch,
            next_tick: epoch,
            more: false,
        }
    }

    fn now(&self) -> smoltcp::time::Instant {
        let us = i64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(i64::MAX);
        smoltcp::time::Instant::from_micros(us)
    }

    fn run(&mut self) {
        let mut events = mio::Events::with_capacity(64);
        loop {
            let wait = self.wait();
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    engine::warn!("userspace tunnel: poll: {e}");
                    std::thread::sleep(TICK);
                }
            }
            for e in events.iter() {
                // The CLI closed its end entirely (HUP): its connection is reset.
                let t = e.token().0;
                if t >= FIRST_STREAM_TOKEN && e.is_write_closed() {
                    self.streams.cli_gone((t - FIRST_STREAM_TOKEN) as u64);
                }
            }
            if !self.commands() {
                self.streams.abort_all(&mut self.sockets);
                self.stack();
                return;
            }
            self.receive();
            self.stack();
            let now = Instant::now();
            self.streams.service(&mut self.sockets, self.poll.registry(), now, &self.stats);
            self.stack();
            if now >= self.next_tick {
                self.next_tick = now + TICK;
                self.noise.tick(&self.stats);
                if let Ok(mut e) = self.stats.endpoint.lock() {
                    *e = self.noise.endpoint();
                }
            }
            self.stats.streams.store(self.streams.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// How long the next poll may wait.
    fn wait(&mut self) -> Duration {
        if self.more {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let mut wait = self.next_tick.saturating_duration_since(now);
        let t = self.now();
        if let Some(d) = self.iface.poll_delay(t, &self.sockets) {
            wait = wait.min(Duration::from_micros(d.total_micros()));
        }
        if let Some(d) = self.streams.next_deadline() {
            wait = wait.min(d.saturating_duration_since(now) + Duration::from_millis(1));
        }
        wait
    }

    /// Carries out what was asked; `false` on Stop (or the handle gone).
    fn commands(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(Command::Open { port, reply }) => {
                    self.streams.open(&mut self.iface, &mut self.sockets, self.vm, port, reply, Instant::now());
                }
                Ok(Command::Attach { id, stream }) => {
                    if !self.streams.attach(id, stream, self.poll.registry()) {
                        self.streams.abort(id, &mut self.sockets);
                    }
                }
                Ok(Command::Abort { id }) => self.streams.abort(id, &mut self.sockets),
                Ok(Command::Stop) | Err(crossbeam_channel::TryRecvError::Disconnected) => return false,
                Err(crossbeam_channel::TryRecvError::Empty) => return true,
            }
        }
    }

    /// Takes up to [`BATCH`] datagrams: decrypted into the ring, through the fence.
    fn receive(&mut self) {
        self.more = false;
        for _ in 0..BATCH {
            if self.ring.is_full() {
                self.stack();
            }
            let Some(slot) = self.ring.free_slot() else { break };
            let (me, vm) = (self.me, self.vm);
            let len = match self.noise.receive(slot, &self.stats) {
                None => return,
                Some(Received::Nothing) => continue,
                Some(Received::Packet(p)) => {
                    let streams = &self.streams;
                    match fence::admit(p, vm, me, |l, r| streams.opened(l, r)) {
                        Ok(()) => p.len(),
                        Err(why) => {
                            self.stats.fenced(why);
                            continue;
                        }
                    }
                }
            };
            self.ring.commit(len);
        }
        self.more = true;
    }

    /// Lets smoltcp take what the ring holds and send what its sockets have.
    fn stack(&mut self) {
        let t = self.now();
        let mut dev = Device { rx: &mut self.ring, noise: &mut self.noise, stats: &self.stats };
        self.iface.poll(t, &mut dev, &mut self.sockets);
    }
}
