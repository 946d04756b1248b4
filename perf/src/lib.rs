//! Benchmarks for Omerta: the harness behind `make perf`.
//!
//! A [`Dut`] (device under test) is either the `omerta-engine` binary (a process per device,
//! started with a `--vm` description as production starts it, either backend, GSO on or off;
//! see [`engine_proc`]) or a passt process, with the socket that plays the VM's NIC. Around it:
//! a generator that plays the VM (pre-built frames written in batches, flat out or paced, each
//! with a sequence number), a sink that plays the consumer (recvmmsg, counting sequence numbers
//! so loss and reordering are exact), and an echo consumer for round trips. Everything runs on
//! loopback; every run is bounded in time and count.
//!
//! Over 500 lines on purpose: the generator, the sinks and the device under test are one
//! harness whose timing assumptions must be read together.
#![forbid(unsafe_code)]
// Reports turn counts and durations into rates and back: truncating casts are deliberate here.
#![allow(clippy::cast_possible_truncation)]

pub mod ab;
pub mod engine_proc;
pub mod floor;
pub mod ndr;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::engine_proc::{EngineProc, Opts};
use std::time::{Duration, Instant};

use engine::testkit::FrameSpec;
use engine::wire::{EthernetHeader, Ipv4Packet, Mac};
use engine::worker::Backend;
use engine::{Endpoint, VmIdentity};
use hdrhistogram::Histogram;

/// What is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Omerta with this backend and GSO setting.
    Omerta(Backend, bool),
    /// Omerta (io_uring, GSO) with the VM on QEMU's stream framing instead of datagrams.
    OmertaStream,
    /// Omerta with this backend, GSO, and busy polling (the worker never sleeps).
    OmertaBusy(Backend),
    /// passt (Debian's package), driven over its stream socket.
    Passt,
    /// Omerta with this backend and GSO, adaptive polling off (`spin-us=0`): the A/B of the
    /// default.
    OmertaNoSpin(Backend),
    /// The bare forwarder (`floor`): the same hand-offs on datagram sockets, no work.
    Floor,
    /// The bare forwarder polling without sleeping (the floor of the busy-poll rows).
    FloorBusy,
    /// The bare forwarder with UDP GRO on its UDP socket (the upper bound of that lever).
    FloorGro,
}

impl Kind {
    /// A short label: `omerta/io_uring/gso`, `passt`.
    pub fn label(self) -> String {
        match self {
            Kind::Omerta(b, gso) => {
                format!(
                    "omerta/{}{}",
                    if b == Backend::Uring { "io_uring" } else { "portable" },
                    if gso { "/gso" } else { "" }
                )
            }
            Kind::OmertaStream => "omerta/io_uring/gso/stream".into(),
            Kind::OmertaBusy(b) => {
                format!("omerta/{}/gso/busy-poll", if b == Backend::Uring { "io_uring" } else { "portable" })
            }
            Kind::Passt => "passt".into(),
            Kind::OmertaNoSpin(b) => {
                format!("omerta/{}/gso/no-spin", if b == Backend::Uring { "io_uring" } else { "portable" })
            }
            Kind::Floor => "floor (bare forwarder)".into(),
            Kind::FloorBusy => "floor (bare forwarder)/busy-poll".into(),
            Kind::FloorGro => "floor (bare forwarder)/gro".into(),
        }
    }
}

/// The VM's end of the NIC.
#[derive(Debug)]
pub enum VmSock {
    /// One frame per datagram (Omerta's socketpair).
    Dgram(UnixDatagram),
    /// u32 big-endian length, then the frame (passt, QEMU stream).
    Stream(UnixStream),
}

/// A device under test with its VM-side socket.
#[derive(Debug)]
pub struct Dut {
    /// What it is.
    pub kind: Kind,
    /// The VM's end.
    pub vm: VmSock,
    /// The MAC frames go to.
    pub gw_mac: Mac,
    /// The address the VM sends to for a consumer on 127.0.0.1:port.
    pub dst_ip: Ipv4Addr,
    engine: Option<Arc<EngineProc>>,
    passt: Option<Child>,
    floor: Option<Arc<floor::Floor>>,
    name: String,
    timeout: Option<Duration>,
    /// The receive buffer of [`Dut::recv_frame`] (no allocation per frame in timed loops).
    buf: Vec<u8>,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

impl Dut {
    /// Starts one under test, allowing the consumers on 127.0.0.1 at `ports`.
    pub fn start(kind: Kind, ports: &[u16]) -> Result<Self, String> {
        Self::start_on(kind, ports, None)
    }

    /// [`Dut::start`], its forwarding thread (or passt) pinned to CPU `cpu` if given.
    pub fn start_on(kind: Kind, ports: &[u16], cpu: Option<usize>) -> Result<Self, String> {
        let id = VmIdentity::default();
        let (backend, gso, stream) = match kind {
            Kind::Omerta(b, g) => (b, g, false),
            Kind::OmertaStream => (Backend::Uring, true, true),
            Kind::OmertaBusy(b) | Kind::OmertaNoSpin(b) => (b, true, false),
            Kind::Passt | Kind::Floor | Kind::FloorBusy | Kind::FloorGro => (Backend::Auto, false, false),
        };
        let busy = match kind {
            Kind::OmertaBusy(_) => ",busy-poll=yes",
            Kind::OmertaNoSpin(_) => ",spin-us=0",
            _ => "",
        };
        match kind {
            Kind::Floor | Kind::FloorBusy | Kind::FloorGro => {
                let (ours, theirs): (OwnedFd, OwnedFd) =
                    engine::io::socketpair(libc::SOCK_DGRAM).map_err(|e| e.to_string())?;
                engine::io::grow_buffers(ours.as_fd(), 8 << 20);
                let port = ports.first().copied().unwrap_or(0);
                let f = floor::Floor::start(
                    UnixDatagram::from(theirs),
                    port,
                    kind == Kind::FloorBusy,
                    kind == Kind::FloorGro,
                    cpu,
                )?;
                Ok(Self {
                    kind,
                    vm: VmSock::Dgram(UnixDatagram::from(ours)),
                    gw_mac: id.gateway_mac,
                    dst_ip: Ipv4Addr::LOCALHOST,
                    engine: None,
                    passt: None,
                    floor: Some(Arc::new(f)),
                    name: "floor".into(),
                    timeout: None,
                    buf: vec![0u8; 65536],
                })
            }
            Kind::Omerta(..) | Kind::OmertaStream | Kind::OmertaBusy(_) | Kind::OmertaNoSpin(_) => {
                let ty = if stream { libc::SOCK_STREAM } else { libc::SOCK_DGRAM };
                let (ours, theirs): (OwnedFd, OwnedFd) = engine::io::socketpair(ty).map_err(|e| e.to_string())?;
                engine::io::grow_buffers(ours.as_fd(), 8 << 20);
                // Short: the kernel keeps 15 bytes of a thread name, and CPU is read by name.
                let name = format!("p{}", SEQ.fetch_add(1, Ordering::Relaxed));
                let consumers: Vec<String> = ports.iter().map(|p| format!("consumer=127.0.0.1:{p}")).collect();
                let handle = if stream { "stream-fd" } else { "fd" };
                let fd = theirs.as_raw_fd();
                let pin = cpu.map(|c| format!(",cpu={c}")).unwrap_or_default();
                let spec =
                    format!("name={name},handle={handle}:{fd},{},allow-special=yes{busy}{pin}", consumers.join(","));
                let eng = EngineProc::start(Opts { backend, gso }, &[spec], Some(theirs))?;
                eng.wait_running(&name)?;
                Ok(Self {
                    kind,
                    vm: if stream {
                        VmSock::Stream(UnixStream::from(ours))
                    } else {
                        VmSock::Dgram(UnixDatagram::from(ours))
                    },
                    gw_mac: id.gateway_mac,
                    dst_ip: Ipv4Addr::LOCALHOST,
                    engine: Some(Arc::new(eng)),
                    passt: None,
                    floor: None,
                    name,
                    timeout: None,
                    buf: Vec::new(),
                })
            }
            Kind::Passt => {
                let (ours, theirs): (OwnedFd, OwnedFd) =
                    engine::io::socketpair(libc::SOCK_STREAM).map_err(|e| e.to_string())?;
                engine::io::set_inheritable(theirs.as_fd()).map_err(|e| e.to_string())?;
                // Pinned by taskset, which execs passt (the child's pid is passt's).
                let mut cmd = match cpu {
                    Some(c) => {
                        let mut t = Command::new("taskset");
                        t.args(["-c", &c.to_string(), "passt"]);
                        t
                    }
                    None => Command::new("passt"),
                };
                let child = cmd
                    .args([
                        "-f",
                        "-4",
                        "-q",
                        "-F",
                        &theirs.as_raw_fd().to_string(),
                        "-a",
                        "10.0.2.15",
                        "-g",
                        "10.0.2.2",
                        "-n",
                        "24",
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .map_err(|e| format!("passt: {e} (make perf installs Debian's passt package)"))?;
                drop(theirs);
                let s = UnixStream::from(ours);
                engine::io::grow_buffers(s.as_fd(), 8 << 20);
                let mut dut = Self {
                    kind,
                    vm: VmSock::Stream(s),
                    gw_mac: Mac::BROADCAST,
                    dst_ip: Ipv4Addr::new(10, 0, 2, 2),
                    engine: None,
                    passt: Some(child),
                    floor: None,
                    name: "passt".into(),
                    timeout: None,
                    buf: Vec::new(),
                };
                // Learn passt's MAC from its ARP reply.
                dut.send(&engine::testkit::arp_request(&id, id.gateway_ip))?;
                let reply = dut.recv(Duration::from_secs(3)).ok_or("passt did not answer ARP")?;
                let (eth, _) = EthernetHeader::parse(&reply).map_err(|_| "bad ARP reply from passt")?;
                dut.gw_mac = eth.src;
                Ok(dut)
            }
        }
    }

    /// A UDP frame from the VM to the consumer on 127.0.0.1:`port`, `size` bytes in all, with
    /// no UDP checksum (so its sequence number can be patched in place at bytes 42..50).
    pub fn frame(&self, port: u16, size: usize) -> Vec<u8> {
        let id = VmIdentity::default();
        let mut spec =
            FrameSpec::udp(&id, Endpoint::new(self.dst_ip, port), &vec![0u8; size.saturating_sub(42).max(8)]);
        spec.eth_dst = self.gw_mac;
        let mut f = spec.build();
        f[40] = 0;
        f[41] = 0;
        f
    }

    /// A device for VM `name`, already added to `engine` with a `dgram:` handle that `vm` (bound
    /// and connected to the engine's end) plays the VM's side of.
    pub fn on_engine(engine: &Arc<EngineProc>, name: &str, vm: UnixDatagram) -> Self {
        Self {
            kind: Kind::Omerta(Backend::Auto, true),
            vm: VmSock::Dgram(vm),
            gw_mac: VmIdentity::default().gateway_mac,
            dst_ip: Ipv4Addr::LOCALHOST,
            engine: Some(engine.clone()),
            passt: None,
            floor: None,
            name: name.to_string(),
            timeout: None,
            buf: Vec::new(),
        }
    }

    /// A second handle on the VM's socket for another thread (datagram handles only: a stream
    /// cannot be shared without interleaving frames).
    pub fn sender(&self) -> Option<Dut> {
        let VmSock::Dgram(s) = &self.vm else { return None };
        Some(Dut {
            kind: self.kind,
            vm: VmSock::Dgram(s.try_clone().ok()?),
            gw_mac: self.gw_mac,
            dst_ip: self.dst_ip,
            engine: self.engine.clone(),
            passt: None,
            floor: self.floor.clone(),
            name: self.name.clone(),
            timeout: None,
            buf: Vec::new(),
        })
    }

    /// Writes one frame.
    pub fn send(&mut self, frame: &[u8]) -> Result<(), String> {
        match &mut self.vm {
            VmSock::Dgram(s) => s.send(frame).map(|_| ()).map_err(|e| e.to_string()),
            VmSock::Stream(s) => {
                let mut b = u32::try_from(frame.len()).unwrap_or(0).to_be_bytes().to_vec();
                b.extend_from_slice(frame);
                s.write_all(&b).map_err(|e| e.to_string())
            }
        }
    }

    /// Writes a batch of frames (one system call where the handle allows).
    pub fn send_batch(&mut self, frames: &[Vec<u8>], framed: &mut Vec<u8>) -> Result<(), String> {
        match &mut self.vm {
            VmSock::Dgram(s) => {
                let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
                let mut off = 0;
                while off < refs.len() {
                    off += support::send_many(s.as_fd(), &refs[off..]).map_err(|e| e.to_string())?;
                }
                Ok(())
            }
            VmSock::Stream(s) => {
                framed.clear();
                for f in frames {
                    framed.extend_from_slice(&u32::try_from(f.len()).unwrap_or(0).to_be_bytes());
                    framed.extend_from_slice(f);
                }
                s.write_all(framed).map_err(|e| e.to_string())
            }
        }
    }

    /// Reads one frame from the engine, waiting up to `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        // Set the timeout only when it changes: one system call less per round trip.
        if self.timeout != Some(timeout) {
            let _ = match &self.vm {
                VmSock::Dgram(s) => s.set_read_timeout(Some(timeout)),
                VmSock::Stream(s) => s.set_read_timeout(Some(timeout)),
            };
            self.timeout = Some(timeout);
        }
        match &mut self.vm {
            VmSock::Dgram(s) => {
                let mut b = vec![0u8; 65536];
                let n = s.recv(&mut b).ok()?;
                b.truncate(n);
                Some(b)
            }
            VmSock::Stream(s) => {
                let mut len = [0u8; 4];
                s.read_exact(&mut len).ok()?;
                let mut b = vec![0u8; u32::from_be_bytes(len) as usize];
                s.read_exact(&mut b).ok()?;
                Some(b)
            }
        }
    }

    /// Reads one frame into this device's own buffer, waiting up to `timeout` (no allocation:
    /// for timed loops).
    pub fn recv_frame(&mut self, timeout: Duration) -> Option<&[u8]> {
        if self.timeout != Some(timeout) {
            let _ = match &self.vm {
                VmSock::Dgram(s) => s.set_read_timeout(Some(timeout)),
                VmSock::Stream(s) => s.set_read_timeout(Some(timeout)),
            };
            self.timeout = Some(timeout);
        }
        if self.buf.len() < 65536 {
            self.buf.resize(65536, 0);
        }
        match &mut self.vm {
            VmSock::Dgram(s) => {
                let n = s.recv(&mut self.buf).ok()?;
                self.buf.get(..n)
            }
            VmSock::Stream(s) => {
                let mut len = [0u8; 4];
                s.read_exact(&mut len).ok()?;
                let n = u32::from_be_bytes(len) as usize;
                let b = self.buf.get_mut(..n)?;
                s.read_exact(b).ok()?;
                self.buf.get(..n)
            }
        }
    }

    /// The CPU seconds used so far by the thread or process that forwards.
    pub fn cpu_seconds(&self) -> f64 {
        if let Some(f) = &self.floor {
            return f.cpu_seconds();
        }
        match (&self.passt, &self.engine) {
            (Some(c), _) => proc_cpu(&format!("/proc/{}/stat", c.id())),
            (None, Some(e)) => e.thread_cpu(&format!("omerta-vm-{}", self.name)),
            (None, None) => 0.0,
        }
    }

    /// CPU seconds of the whole forwarding process when it is not this one (the engine's or
    /// passt's; 0 for the floor, which runs in the harness).
    pub fn process_cpu_seconds(&self) -> f64 {
        match (&self.passt, &self.engine) {
            (Some(c), _) => proc_cpu(&format!("/proc/{}/stat", c.id())),
            (None, Some(e)) => proc_cpu(&format!("/proc/{}/stat", e.pid())),
            (None, None) => 0.0,
        }
    }

    /// Resident memory of the forwarding process (passt's, or the engine's).
    pub fn rss_kib(&self) -> Option<u64> {
        if let Some(e) = &self.engine {
            return e.rss_kib();
        }
        let pid = self.passt.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    /// The engine's latency for this VM (ingress to egress inside the engine, VM to host), as
    /// its control socket reports it: frames measured and percentiles in µs.
    pub fn engine_latency(&self) -> Option<(u64, [f64; 5])> {
        self.engine.as_ref()?.latency(&self.name)
    }

    /// The engine process behind this device, if it is Omerta.
    pub fn engine(&self) -> Option<&EngineProc> {
        self.engine.as_deref()
    }
}

impl Drop for Dut {
    fn drop(&mut self) {
        if let Some(mut c) = self.passt.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn proc_cpu(stat_path: &str) -> f64 {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    (field(11) + field(12)) as f64 / 100.0
}

/// CPU seconds used so far by the thread named `name` among the tasks under `task_dir`
/// (`/proc/PID/task`).
pub fn thread_cpu_of(task_dir: &str, name: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir(task_dir) else { return 0.0 };
    for t in tasks.flatten() {
        if std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim() == name {
            return proc_cpu(&t.path().join("stat").to_string_lossy());
        }
    }
    0.0
}

/// A consumer that counts datagrams by sequence number (bytes 0..8 of the payload).
#[derive(Debug)]
pub struct Sink {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Datagrams received so far (live).
    pub live: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<SinkCount>>,
}

/// What a sink saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct SinkCount {
    /// Datagrams.
    pub received: u64,
    /// Payload bytes.
    pub bytes: u64,
    /// Datagrams whose sequence number was below one already seen.
    pub reordered: u64,
    /// Highest sequence number seen, plus one.
    pub max_seq: u64,
}

impl Sink {
    /// Binds 127.0.0.1 and counts until stopped; with UDP GRO on, as a real receiver would
    /// (runs of equal datagrams of one flow may arrive as one buffer; each is counted).
    pub fn start() -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind the sink");
        engine::io::grow_buffers(sock.as_fd(), 32 << 20);
        let gro =
            std::env::var("OMERTA_PERF_GRO").as_deref() != Ok("0") && support::enable_udp_gro(sock.as_fd()).is_ok();
        let port = sock.local_addr().map(|a| a.port()).unwrap_or(0);
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let live = Arc::new(AtomicU64::new(0));
        let l2 = live.clone();
        let thread = std::thread::spawn(move || {
            let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
            let mut bufs: Vec<Vec<u8>> = (0..support::MAX).map(|_| vec![0u8; if gro { 65536 } else { 2048 }]).collect();
            let (mut lens, mut segs, mut size) =
                ([0usize; support::MAX], [1usize; support::MAX], [0usize; support::MAX]);
            let mut c = SinkCount::default();
            loop {
                let got = if gro {
                    support::recv_many_gro(sock.as_fd(), &mut bufs, &mut lens, &mut segs, &mut size)
                } else {
                    support::recv_many(sock.as_fd(), &mut bufs, &mut lens)
                };
                match got {
                    Ok(k) => {
                        for i in 0..k {
                            let (n, step) = if gro && size[i] > 0 { (segs[i], size[i]) } else { (1, lens[i].max(1)) };
                            l2.fetch_add(n as u64, Ordering::Relaxed);
                            c.received += n as u64;
                            c.bytes += lens[i] as u64;
                            for s in 0..n {
                                let Some(head) = bufs[i].get(s * step..s * step + 8) else { break };
                                let mut b = [0u8; 8];
                                b.copy_from_slice(head);
                                let seq = u64::from_be_bytes(b);
                                if seq + 1 < c.max_seq {
                                    c.reordered += 1;
                                }
                                c.max_seq = c.max_seq.max(seq + 1);
                            }
                        }
                    }
                    Err(_) if s2.load(Ordering::Relaxed) => return c,
                    Err(_) => {}
                }
            }
        });
        Self { port, live, stop, thread: Some(thread) }
    }

    /// Datagrams received so far.
    pub fn received(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    /// Stops after the in-flight datagrams have drained; returns the counts.
    pub fn finish(mut self) -> SinkCount {
        std::thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default()
    }
}

/// A consumer that echoes every datagram back to its sender.
#[derive(Debug)]
pub struct Echo {
    /// Its port on 127.0.0.1.
    pub port: u16,
    stop: Arc<AtomicBool>,
}

impl Echo {
    /// Binds 127.0.0.1 and echoes until dropped.
    pub fn start() -> Self {
        Self::start_on(None)
    }

    /// [`Echo::start`], its thread pinned to CPU `cpu` if given.
    pub fn start_on(cpu: Option<usize>) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind the echo consumer");
        let port = sock.local_addr().map(|a| a.port()).unwrap_or(0);
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        std::thread::spawn(move || {
            if let Some(c) = cpu {
                let _ = engine::io::pin_current_thread(c);
            }
            let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
            let mut b = [0u8; 2048];
            while !s2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut b) {
                    let _ = sock.send_to(&b[..n], from);
                }
            }
        });
        Self { port, stop }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What a generator run did.
#[derive(Debug, Clone, Copy, Default)]
pub struct GenCount {
    /// Frames written.
    pub sent: u64,
    /// Seconds it ran.
    pub secs: f64,
}

/// Writes frames of the sizes in `mix` (cycled) to `port`, flat out (`pps == 0`) or paced, for
/// `secs` seconds or `max_frames` frames, whichever ends first. Sequence numbers start at 0.
pub fn generate(dut: &mut Dut, port: u16, mix: &[usize], pps: u64, secs: f64, max_frames: u64) -> GenCount {
    const BATCH: usize = 64;
    let mut frames: Vec<Vec<u8>> = (0..BATCH).map(|i| dut.frame(port, mix[i % mix.len()])).collect();
    let mut framed = Vec::with_capacity(BATCH * 1600);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut seq = 0u64;
    while Instant::now() < end && seq < max_frames {
        let n = BATCH.min((max_frames - seq) as usize);
        for f in frames.iter_mut().take(n) {
            f[42..50].copy_from_slice(&seq.to_be_bytes());
            seq += 1;
        }
        if dut.send_batch(&frames[..n], &mut framed).is_err() {
            break;
        }
        if pps > 0 {
            let due = start + Duration::from_secs_f64(seq as f64 / pps as f64);
            while Instant::now() < due {
                std::hint::spin_loop();
            }
        }
    }
    GenCount { sent: seq, secs: start.elapsed().as_secs_f64() }
}

/// True if `frame` is the echo of round trip `seq` (its UDP payload starts with it).
fn echo_of(frame: &[u8], seq: u64) -> bool {
    EthernetHeader::parse(frame)
        .ok()
        .and_then(|(_, ip)| Ipv4Packet::parse(ip).ok())
        .and_then(|p| p.udp_payload().map(|u| u.get(..8) == Some(&seq.to_be_bytes()[..])))
        .unwrap_or(false)
}

/// Records the microseconds since `t` in `h` and `all`.
fn record_since(t: Instant, h: &mut Histogram<u64>, all: &mut Vec<f64>) {
    let us = t.elapsed().as_secs_f64() * 1e6;
    let _ = h.record(us.round().max(1.0) as u64);
    all.push(us);
}

/// Round trips, one frame at a time, VM → echo consumer → VM, in microseconds.
pub fn round_trips(dut: &mut Dut, port: u16, samples: u64, max_secs: f64) -> (Histogram<u64>, Vec<f64>) {
    let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()));
    let mut all = Vec::with_capacity(samples as usize);
    let mut f = dut.frame(port, 64);
    let end = Instant::now() + Duration::from_secs_f64(max_secs);
    for seq in 0..samples {
        if Instant::now() > end {
            break;
        }
        f[42..50].copy_from_slice(&seq.to_be_bytes());
        let t = Instant::now();
        if dut.send(&f).is_err() {
            break;
        }
        // Wait for the echo of this very frame (skip ARP or stray frames).
        while let Some(r) = dut.recv_frame(Duration::from_millis(500)) {
            if echo_of(r, seq) {
                record_since(t, &mut h, &mut all);
                break;
            }
        }
    }
    (h, all)
}

/// Process resident memory in KiB.
pub fn self_rss_kib() -> u64 {
    support::rss_bytes().unwrap_or(0) / 1024
}

/// Threads and open descriptors of this process.
pub fn threads_and_fds() -> (usize, usize) {
    let count = |p: &str| std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0);
    (count("/proc/self/task"), count("/proc/self/fd"))
}

/// Percentiles of a histogram in its unit, for reports.
pub fn pct(h: &Histogram<u64>) -> [f64; 5] {
    [0.5, 0.9, 0.99, 0.999]
        .map(|q| h.value_at_quantile(q) as f64)
        .into_iter()
        .chain([h.max() as f64])
        .collect::<Vec<_>>()
        .try_into()
        .unwrap_or([0.0; 5])
}

/// The machine and build a run was made on.
pub fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string());
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    serde_json::json!({
        "commit": commit,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": model,
        "batch": 64,
    })
}

/// Where a UDP socket is bound.
pub fn port_of(s: &UdpSocket) -> u16 {
    match s.local_addr() {
        Ok(SocketAddr::V4(a)) => a.port(),
        _ => 0,
    }
}

/// Round trips as [`round_trips`] with a harness that never sleeps: one thread plays both the
/// VM (sends the frame, waits for its echo) and the echo consumer (bound here, answers what
/// reaches it), polling both sockets without blocking, so neither side's wake-up is in the
/// figure. `consumer` is the socket of the consumer the DUT was started for. Datagram handles
/// only.
pub fn round_trips_busy(
    dut: &mut Dut,
    consumer: &UdpSocket,
    samples: u64,
    max_secs: f64,
) -> (Histogram<u64>, Vec<f64>) {
    let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()));
    let mut all = Vec::with_capacity(samples as usize);
    let port = port_of(consumer);
    let mut f = dut.frame(port, 64);
    // The datagram handle only (a stream would need a framing parser in the spin).
    let VmSock::Dgram(vm) = &dut.vm else { return (h, all) };
    if vm.set_nonblocking(true).is_err() || consumer.set_nonblocking(true).is_err() {
        return (h, all);
    }
    let (mut eb, mut vb) = ([0u8; 2048], [0u8; 2048]);
    let end = Instant::now() + Duration::from_secs_f64(max_secs);
    'samples: for seq in 0..samples {
        f[42..50].copy_from_slice(&seq.to_be_bytes());
        let t = Instant::now();
        if vm.send(&f).is_err() {
            break;
        }
        let give_up = t + Duration::from_millis(500);
        loop {
            if let Ok((n, from)) = consumer.recv_from(&mut eb) {
                let _ = consumer.send_to(&eb[..n], from);
            }
            if let Ok(n) = vm.recv(&mut vb) {
                if echo_of(&vb[..n], seq) {
                    record_since(t, &mut h, &mut all);
                    break;
                }
            }
            let now = Instant::now();
            if now > give_up || now > end {
                break 'samples;
            }
            std::hint::spin_loop();
        }
    }
    let _ = vm.set_nonblocking(false);
    (h, all)
}

/// The floor: round trips straight between two UDP sockets on loopback, nothing in between,
/// measured the same way (microseconds).
pub fn floor_round_trips(samples: u64) -> Histogram<u64> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()));
    let echo = Echo::start();
    let Ok(s) = UdpSocket::bind("127.0.0.1:0") else { return h };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut b = [0u8; 64];
    for seq in 0..samples {
        let t = Instant::now();
        if s.send_to(&seq.to_be_bytes(), ("127.0.0.1", echo.port)).is_err() || s.recv_from(&mut b).is_err() {
            continue;
        }
        let _ = h.record((t.elapsed().as_secs_f64() * 1e6).round().max(1.0) as u64);
    }
    h
}

/// Counts frames arriving at the VM's end until `stop`, reading as cheaply as the handle allows
/// (recvmmsg for datagrams, a buffered parse of the length-prefixed stream), so the reader is
/// not what limits a host-to-VM measurement. Frames shorter than `min_len` (ARP and such) are
/// not counted.
pub fn drain_vm(vm: VmSock, stop: Arc<AtomicBool>, min_len: usize) -> u64 {
    let mut n = 0u64;
    match vm {
        VmSock::Dgram(s) => {
            let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
            let mut bufs: Vec<Vec<u8>> = (0..support::MAX).map(|_| vec![0u8; 2048]).collect();
            let mut lens = [0usize; support::MAX];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(k) = support::recv_many(s.as_fd(), &mut bufs, &mut lens) {
                    n += lens.iter().take(k).filter(|l| **l >= min_len).count() as u64;
                }
            }
        }
        VmSock::Stream(mut s) => {
            let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
            let mut buf = vec![0u8; 1 << 20];
            let (mut start, mut end) = (0usize, 0usize);
            while !stop.load(Ordering::Relaxed) {
                if start > 0 {
                    buf.copy_within(start..end, 0);
                    end -= start;
                    start = 0;
                }
                match s.read(&mut buf[end..]) {
                    Ok(0) => break,
                    Ok(k) => end += k,
                    Err(_) => continue,
                }
                while end - start >= 4 {
                    let len = u32::from_be_bytes([buf[start], buf[start + 1], buf[start + 2], buf[start + 3]]) as usize;
                    if end - start < 4 + len {
                        break;
                    }
                    if len >= min_len {
                        n += 1;
                    }
                    start += 4 + len;
                }
            }
        }
    }
    n
}

impl Dut {
    /// A second handle on the VM's socket for a reader thread (either framing).
    pub fn reader(&self) -> Option<VmSock> {
        match &self.vm {
            VmSock::Dgram(s) => s.try_clone().ok().map(VmSock::Dgram),
            VmSock::Stream(s) => s.try_clone().ok().map(VmSock::Stream),
        }
    }
}
