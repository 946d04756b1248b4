//! The device under test: `omerta-engine` (a process per device, see [`crate::engine_proc`])
//! or passt, or the bare forwarder of the floor, with the socket that plays the VM's NIC.
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use engine::testkit::FrameSpec;
use engine::wire::{EthernetHeader, Mac};
use engine::worker::Backend;
use engine::{Endpoint, VmIdentity};

use crate::engine_proc::{EngineProc, Opts};
use crate::floor;

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
                    sys::socketpair(libc::SOCK_DGRAM).map_err(|e| e.to_string())?;
                sys::grow_buffers(ours.as_fd(), 8 << 20);
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
                let (ours, theirs): (OwnedFd, OwnedFd) = sys::socketpair(ty).map_err(|e| e.to_string())?;
                sys::grow_buffers(ours.as_fd(), 8 << 20);
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
                    sys::socketpair(libc::SOCK_STREAM).map_err(|e| e.to_string())?;
                sys::set_inheritable(theirs.as_fd()).map_err(|e| e.to_string())?;
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
                sys::grow_buffers(s.as_fd(), 8 << 20);
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
                    off += sys::bench::send_many(s.as_fd(), &refs[off..]).map_err(|e| e.to_string())?;
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

impl Dut {
    /// A second handle on the VM's socket for a reader thread (either framing).
    pub fn reader(&self) -> Option<VmSock> {
        match &self.vm {
            VmSock::Dgram(s) => s.try_clone().ok().map(VmSock::Dgram),
            VmSock::Stream(s) => s.try_clone().ok().map(VmSock::Stream),
        }
    }
}
