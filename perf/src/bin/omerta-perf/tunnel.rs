//! `userspace_tunnel`: bulk TCP and round trips from a consumer to its VM through the
//! consumer's userspace WireGuard tunnel (`mesh::tunnel::user`: boringtun and smoltcp in this
//! process, a CLI's unix stream joined to each TCP connection), beside the same through
//! wireguard-go on a TUN device with the kernel's TCP, in one run, interleaved.
//!
//! The topology, all in namespaces the scenario makes (and deletes on every return):
//!
//! ```text
//!  consumer namespace (omerta-perf-cn-PID)          VM namespace (omerta-perf-vm-PID)
//!  A: wireguard-go on TUN opwaN 10.77.0.1 ─┐         ┌─ wireguard-go on TUN opwvN 10.77.0.2
//!     (client: a kernel TCP socket)        ├─ veth ──┤   peers A (10.77.0.1) and B (10.77.0.3)
//!  B: UserTunnel's UDP socket  10.77.0.3 ──┘ 198.18. └─ TCP sink :5001, TCP echo :5002
//!     (client: a unix stream, this process)   0.0/30     (threads of this process)
//! ```
//!
//! Both consumers talk to the same VM WireGuard over the same veth pair; only the consumer's
//! side differs. B's client is the far end of a `UnixStream::pair` whose other end the tunnel
//! holds: the path `omerta vm connect` takes, minus the daemon's one unix hop.
//!
//! Beside each bulk rate the note gives what explains it: the datagrams the VM's socket
//! dropped (`Udp RcvbufErrors` in its namespace), the WireGuard bytes sent per byte delivered
//! (retransmissions), and the sink's longest gap (a retransmission timeout). Rounds run A then
//! B; docs/PERFORMANCE.md (2026-12-07) has the figures and why B's bulk rate collapses.
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mesh::tunnel::user::{self, Spec, UserTunnel};
use omerta_perf::netns::{self, Named};
use omerta_perf::wg::{self, WgGo};

use crate::report::{median, Row};

/// The scenario's name.
pub(crate) const NAME: &str = "userspace_tunnel";
/// A's row: wireguard-go on a TUN device, the kernel's TCP.
pub(crate) const TUN: &str = "wireguard-go (TUN, kernel TCP)";
/// B's row: the userspace tunnel, its client a unix stream.
pub(crate) const USER: &str = "userspace tunnel (boringtun+smoltcp, unix stream)";
/// The issue's bar: B's bulk throughput at least this share of A's.
pub(crate) const BAR: f64 = 0.5;

/// The veth pair between the namespaces (RFC 2544's benchmarking range).
const LINK_CONSUMER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const LINK_VM: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Tunnel addresses: A, the VM, B.
const A_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
const WG_PORT: u16 = 51820;
const SINK_PORT: u16 = 5001;
const ECHO_PORT: u16 = 5002;
/// The stand-in VM's UDP receive buffer by default (`Topology::new`).
const VM_BUFFER: usize = 4 << 20;
/// Bulk writes, and the sink's reads.
const CHUNK: usize = 64 * 1024;
/// How long any one blocking read, write, accept or connect may take.
const IO_WAIT: Duration = Duration::from_secs(10);
/// The most a run's round trips may take altogether.
const RTT_LIMIT: Duration = Duration::from_secs(60);

/// Which consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// A: wireguard-go on TUN.
    Tun,
    /// B: the userspace tunnel.
    User,
}

/// The client's end of a connection: a TCP socket (A) or a unix stream (B).
trait Conn: Read + Write {
    fn half_close(&self) -> std::io::Result<()>;
    fn timeouts(&self, d: Duration) -> std::io::Result<()>;
}

impl Conn for TcpStream {
    fn half_close(&self) -> std::io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
    fn timeouts(&self, d: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(d))?;
        self.set_write_timeout(Some(d))
    }
}

impl Conn for UnixStream {
    fn half_close(&self) -> std::io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
    fn timeouts(&self, d: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(d))?;
        self.set_write_timeout(Some(d))
    }
}

/// Everything the scenario made. Fields drop in order: the tunnel's thread, then the
/// wireguard-go processes (by pid), the listeners, the namespaces.
struct Topology {
    tunnel: UserTunnel,
    a: WgGo,
    vm: WgGo,
    sink: TcpListener,
    echo: TcpListener,
    consumer: Named,
    vm_ns: Named,
    /// The stand-in VM's UDP sockets' receive buffers (bytes; empty: left at the default).
    vm_buffer: Vec<usize>,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A counter of `/proc/net/snmp` in namespace `ns` (`Udp`, `RcvbufErrors`), 0 if unreadable.
fn snmp(ns: &Named, proto: &'static str, field: &'static str) -> u64 {
    let text = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap_or_default()).unwrap_or_default();
    let prefix = format!("{proto}:");
    let mut rows = text.lines().filter(|l| l.starts_with(&prefix));
    let (Some(names), Some(values)) = (rows.next(), rows.next()) else { return 0 };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == field)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

impl Topology {
    /// Makes the namespaces, starts both wireguard-go, the listeners in the VM and the
    /// userspace tunnel; checks that no traffic can go anywhere but the namespaces made.
    /// Called on the scenario's thread (wireguard-go dies with the thread that started it).
    fn new() -> Result<Self, String> {
        // What a killed run left: its namespaces go in `Named::add`, its control sockets here.
        wg::remove_dead_sockets("opw");
        let vm_ns = Named::add("vm")?;
        let consumer = Named::add("cn")?;
        netns::veth(&consumer, "opc0", &format!("{LINK_CONSUMER}/30"), &vm_ns, "opv0", &format!("{LINK_VM}/30"))?;
        let n = std::process::id() % 100_000;
        let vm = WgGo::start(&vm_ns, &format!("opwv{n}"), WG_PORT, &format!("{VM_IP}/24"))?;
        let a = WgGo::start(&consumer, &format!("opwa{n}"), WG_PORT, &format!("{A_IP}/24"))?;
        // The stand-in VM's receive buffer: what a later wireguard-go asks for itself (7 MiB)
        // and what a guest's kernel WireGuard behind the engine (4 MiB sockets) never lacks;
        // OMERTA_PERF_TUNNEL_VM_BUFFER=BYTES sets it, 0 leaves Debian's wireguard-go at
        // rmem_default (208 KiB), where it drops bursts of either consumer.
        let want = std::env::var("OMERTA_PERF_TUNNEL_VM_BUFFER").ok().and_then(|v| v.parse().ok()).unwrap_or(VM_BUFFER);
        let vm_buffer = if want > 0 { vm.grow_udp_buffers(want)? } else { Vec::new() };
        // B's UDP socket is made in the consumer's namespace, beside A's.
        let socket = consumer.run(|| user::bind(0))?.map_err(|e| format!("the tunnel's socket: {e}"))?;
        let b_port = socket.local_addr().map_err(err)?.port();
        let (b_private, b_public) = wg::keypair()?;
        vm.add_peer(&a.public, &format!("{A_IP}/32"), Some(SocketAddr::from((LINK_CONSUMER, WG_PORT))))?;
        vm.add_peer(&b_public, &format!("{B_IP}/32"), Some(SocketAddr::from((LINK_CONSUMER, b_port))))?;
        a.add_peer(&vm.public, &format!("{VM_IP}/32"), Some(SocketAddr::from((LINK_VM, WG_PORT))))?;
        // The refusal: only the interfaces made here, no way out, and every address sent to
        // (the WireGuard endpoints, the VM's tunnel address) one of these namespaces'.
        consumer.confined(&["opc0", &a.ifname])?;
        vm_ns.confined(&["opv0", &vm.ifname])?;
        netns::only_to_ours(&[&consumer, &vm_ns], &[LINK_CONSUMER, LINK_VM, VM_IP])?;
        let listen = |port: u16| -> Result<TcpListener, String> {
            let l = vm_ns.run(move || TcpListener::bind((VM_IP, port)))?.map_err(|e| format!("listen :{port}: {e}"))?;
            l.set_nonblocking(true).map_err(err)?;
            Ok(l)
        };
        let (sink, echo) = (listen(SINK_PORT)?, listen(ECHO_PORT)?);
        let spec = Spec {
            name: "perf".into(),
            private: wg::key_bytes(&b_private)?,
            peer: wg::key_bytes(&vm.public)?,
            me: B_IP,
            vm: VM_IP,
            endpoint: Some(SocketAddr::from((LINK_VM, WG_PORT))),
            proof: None,
            streams: Default::default(),
        };
        let tunnel = UserTunnel::start(socket, spec).map_err(|e| format!("the userspace tunnel: {e}"))?;
        Ok(Self { tunnel, a, vm, sink, echo, consumer, vm_ns, vm_buffer })
    }

    /// The userspace tunnel's counters, for error messages.
    fn counters(&self) -> String {
        let s = self.tunnel.stats();
        let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "userspace tunnel: tx {} B, rx {} B, send errors {}, recv errors {}, wg errors {}, oversize {}, no endpoint {}, fenced {:?}",
            n(&s.tx_bytes),
            n(&s.rx_bytes),
            n(&s.send_errors),
            n(&s.recv_errors),
            n(&s.wg_errors),
            n(&s.oversize),
            n(&s.no_endpoint),
            s.fence_drops()
        )
    }

    /// WireGuard bytes consumer `path` has sent so far.
    fn wire_sent(&self, path: Path) -> u64 {
        match path {
            Path::User => self.tunnel.stats().tx_bytes.load(Ordering::Relaxed),
            // `wg show IF transfer`: peer, received, sent.
            Path::Tun => self
                .a
                .wg(&["show", &self.a.ifname, "transfer"])
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split('\t').nth(2)?.trim().parse::<u64>().ok())
                .sum(),
        }
    }

    /// B's client: a connection to the VM's `port` through the userspace tunnel, joined to
    /// one end of a unix pair; the other end.
    fn open_user(&self, port: u16) -> Result<UnixStream, String> {
        let id = self.tunnel.open(port)?;
        let (ours, cli) = UnixStream::pair().map_err(err)?;
        self.tunnel.attach(id, ours);
        cli.timeouts(IO_WAIT).map_err(err)?;
        Ok(cli)
    }

    /// Runs `client` on a connection to the VM's `port` from consumer `path` (A's on a
    /// thread in the consumer's namespace).
    fn client<T: Send + 'static>(
        &self,
        path: Path,
        port: u16,
        client: impl FnOnce(&mut dyn Conn) -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        match path {
            Path::Tun => self.consumer.run(move || {
                let mut s = TcpStream::connect_timeout(&SocketAddr::from((VM_IP, port)), IO_WAIT)
                    .map_err(|e| format!("connect to {VM_IP}:{port}: {e}"))?;
                s.set_nodelay(true).map_err(err)?;
                s.timeouts(IO_WAIT).map_err(err)?;
                client(&mut s)
            })?,
            Path::User => {
                let mut cli = self.open_user(port)?;
                client(&mut cli)
            }
        }
    }

    /// Bulk TCP consumer → VM: what the VM's sink received in `secs` from its first byte,
    /// while the client writes flat out (stopped by the sink when the window ends).
    fn bulk(&self, path: Path, secs: f64) -> Result<Bulk, String> {
        let sink = self.sink.try_clone().map_err(err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let server = std::thread::spawn(move || sink_one(&sink, secs, &s2));
        let limit = Duration::from_secs_f64(secs) + IO_WAIT * 2;
        let drops0 = snmp(&self.vm_ns, "Udp", "RcvbufErrors");
        let wire0 = self.wire_sent(path);
        let sent = self.client(path, SINK_PORT, move |c| blast(c, &stop, limit));
        let got = server.join().map_err(|_| "the sink's thread panicked".to_string())?;
        sent?;
        let mut b = got?;
        b.vm_drops = snmp(&self.vm_ns, "Udp", "RcvbufErrors").saturating_sub(drops0);
        b.wire = self.wire_sent(path).saturating_sub(wire0) as f64 / (b.bytes.max(1) as f64);
        Ok(b)
    }

    /// `n` round trips of one byte over one TCP connection, one at a time: their times (ns).
    fn rtt(&self, path: Path, n: u64) -> Result<Histogram<u64>, String> {
        let echo = self.echo.try_clone().map_err(err)?;
        let server = std::thread::spawn(move || echo_one(&echo, n + 1));
        let h = self.client(path, ECHO_PORT, move |c| ping_pong(c, n));
        let _ = server.join();
        let h = h?;
        if h.len() < n {
            return Err(format!("only {} of {n} round trips within {} s", h.len(), RTT_LIMIT.as_secs()));
        }
        Ok(h)
    }
}

/// Writes 64 KiB chunks until `stop` (at most `limit`): the bytes written. A write that
/// waits long (a stalled connection) is retried until then.
fn blast(c: &mut dyn Conn, stop: &AtomicBool, limit: Duration) -> Result<u64, String> {
    c.timeouts(Duration::from_millis(100)).map_err(err)?;
    let buf = vec![0x5au8; CHUNK];
    let (t0, mut sent) = (Instant::now(), 0u64);
    while !stop.load(Ordering::Relaxed) && t0.elapsed() < limit {
        match c.write(&buf) {
            Ok(n) => sent += n as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            // The sink closed its end when its window ended.
            Err(_) if stop.load(Ordering::Relaxed) => break,
            Err(e) => return Err(format!("bulk write after {sent} bytes: {e}")),
        }
    }
    Ok(sent)
}

/// `n` one-byte exchanges, one at a time, at most [`RTT_LIMIT`] in all; then a half close.
fn ping_pong(c: &mut dyn Conn, n: u64) -> Result<Histogram<u64>, String> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).map_err(err)?;
    let start = Instant::now();
    let mut b = [0u8; 1];
    for i in 0..n {
        if start.elapsed() > RTT_LIMIT {
            break;
        }
        let x = [i as u8];
        let t = Instant::now();
        c.write_all(&x).map_err(|e| format!("round trip {i}: {e}"))?;
        c.read_exact(&mut b).map_err(|e| format!("round trip {i}: {e}"))?;
        h.saturating_record(t.elapsed().as_nanos() as u64);
        if b != x {
            return Err(format!("round trip {i}: sent {x:?}, got {b:?} back"));
        }
    }
    c.half_close().map_err(err)?;
    Ok(h)
}

/// Accepts one connection within [`IO_WAIT`].
fn accept(l: &TcpListener) -> Result<TcpStream, String> {
    let end = Instant::now() + IO_WAIT;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(err)?;
                s.set_read_timeout(Some(IO_WAIT)).map_err(err)?;
                s.set_write_timeout(Some(IO_WAIT)).map_err(err)?;
                return Ok(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
}

/// One bulk run as the VM's sink saw it.
#[derive(Debug, Clone, Copy)]
struct Bulk {
    /// Bytes received in the window.
    bytes: u64,
    /// Mbit/s received over the window.
    mbps: f64,
    /// Datagrams the VM's UDP sockets dropped (receive buffer full) meanwhile.
    vm_drops: u64,
    /// WireGuard bytes the consumer sent per byte the sink received in the window (a little
    /// above 1 without retransmissions; the client goes on sending after the window, so
    /// read it as a comparison only).
    wire: f64,
    /// The longest time without a byte, in seconds.
    stall: f64,
}

/// The VM's sink: one connection read for `secs` from its first byte (the first within
/// [`IO_WAIT`]); then `done` is set, before the connection is closed (reset: the client's
/// bytes in flight are not read).
fn sink_one(l: &TcpListener, secs: f64, done: &AtomicBool) -> Result<Bulk, String> {
    let r = sink_window(l, secs);
    done.store(true, Ordering::Relaxed);
    r.map(|(b, _conn)| b)
}

/// [`sink_one`]'s reading: the run, and the connection (still open).
fn sink_window(l: &TcpListener, secs: f64) -> Result<(Bulk, TcpStream), String> {
    let mut s = accept(l)?;
    s.set_read_timeout(Some(Duration::from_millis(50))).map_err(err)?;
    let window = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut buf = vec![0u8; 4 * CHUNK];
    let (mut bytes, mut first, mut last, mut stall) = (0u64, None::<Instant>, Instant::now(), Duration::ZERO);
    loop {
        let now = Instant::now();
        match first {
            Some(f) if now >= f + window => break,
            None if now > start + IO_WAIT => return Err(format!("no byte within {} s", IO_WAIT.as_secs())),
            _ => {}
        }
        match s.read(&mut buf) {
            Ok(0) => return Err(format!("the client closed after {bytes} bytes, before the window ended")),
            Ok(n) => {
                let now = Instant::now();
                let f = *first.get_or_insert(now);
                // Only what arrived inside the window counts.
                if now < f + window {
                    bytes += n as u64;
                    stall = stall.max(now - last);
                }
                last = now;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(e) => return Err(format!("sink read after {bytes} bytes: {e}")),
        }
    }
    if let Some(f) = first {
        stall = stall.max((f + window).saturating_duration_since(last));
    }
    let b = Bulk { bytes, mbps: bytes as f64 * 8.0 / secs / 1e6, stall: stall.as_secs_f64(), vm_drops: 0, wire: 0.0 };
    Ok((b, s))
}

/// The VM's echo server: one connection, what it reads written back, until its end, at most
/// `max` reads and [`RTT_LIMIT`].
fn echo_one(l: &TcpListener, max: u64) -> Result<(), String> {
    let mut s = accept(l)?;
    s.set_nodelay(true).map_err(err)?;
    let end = Instant::now() + RTT_LIMIT;
    let mut buf = [0u8; 64];
    for _ in 0..max {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => s.write_all(buf.get(..n).unwrap_or_default()).map_err(err)?,
            Err(e) => return Err(format!("echo: {e}")),
        }
        if Instant::now() > end {
            break;
        }
    }
    Ok(())
}

/// One consumer's results over the rounds.
#[derive(Default)]
struct Runs {
    mbps: Vec<f64>,
    /// Each bulk run's longest time without a byte at the sink, in seconds.
    stalls: Vec<f64>,
    /// Each bulk run's datagrams dropped at the VM's UDP socket.
    drops: Vec<f64>,
    /// Each bulk run's WireGuard bytes sent per byte received.
    wire: Vec<f64>,
    /// Each run's p50, p90, p99, p99.9, max in µs.
    rtt: Vec<[f64; 5]>,
    exchanges: u64,
}

impl Runs {
    fn row(&self, target: &str, note: String) -> Row {
        let col = |i: usize| median(self.rtt.iter().map(|p| p[i]).collect());
        let lat = (!self.rtt.is_empty())
            .then(|| [col(0), col(1), col(2), col(3), self.rtt.iter().map(|p| p[4]).fold(0.0, f64::max)]);
        Row {
            scenario: NAME,
            target: target.into(),
            gbps: (!self.mbps.is_empty()).then(|| median(self.mbps.clone()) / 1e3),
            lat_us: lat,
            note,
            ..Row::default()
        }
    }
}

fn list(v: &[f64], d: usize) -> String {
    v.iter().map(|x| format!("{x:.d$}")).collect::<Vec<_>>().join("/")
}

/// The scenario: `rounds` rounds, each a bulk run of `secs` through A then B, then `exchanges`
/// round trips through A then B. One row per consumer: median Mbit/s, median percentiles.
pub(crate) fn run(secs: f64, rounds: usize, exchanges: u64) -> Result<Vec<Row>, String> {
    let mut t = Topology::new()?;
    // Both handshakes done and caches warm before anything is timed.
    for p in [Path::Tun, Path::User] {
        t.rtt(p, 50).map_err(|e| format!("warm-up, {p:?}: {e}"))?;
    }
    let (mut a, mut b) = (Runs::default(), Runs::default());
    for _ in 0..rounds {
        for (p, r) in [(Path::Tun, &mut a), (Path::User, &mut b)] {
            let x = t.bulk(p, secs).map_err(|e| format!("bulk, {p:?}: {e}; {}", t.counters()))?;
            r.mbps.push(x.mbps);
            r.stalls.push(x.stall);
            r.drops.push(x.vm_drops as f64);
            r.wire.push(x.wire);
            // The connection just cut (the sink's close resets it) settles before the next.
            std::thread::sleep(Duration::from_millis(200));
        }
        for (p, r) in [(Path::Tun, &mut a), (Path::User, &mut b)] {
            let h = t.rtt(p, exchanges).map_err(|e| format!("round trips, {p:?}: {e}"))?;
            r.rtt.push(omerta_perf::pct(&h).map(|ns| ns / 1e3));
            r.exchanges += h.len();
        }
    }
    let s = t.tunnel.stats();
    if !t.a.alive() || !t.vm.alive() {
        return Err("a wireguard-go exited during the run".into());
    }
    let ratios: Vec<f64> = a.mbps.iter().zip(&b.mbps).map(|(x, y)| y / x.max(1e-9)).collect();
    let how = |r: &Runs| {
        format!(
            "bulk consumer→VM, {rounds} runs, {secs} s each at the VM's sink: {} Mbit/s (longest gap {} s; VM socket drops {}; WireGuard bytes per byte {}); RTT {} × 1-byte ping-pong on one TCP connection in {rounds} runs, p50 per run {} µs",
            list(&r.mbps, 0),
            list(&r.stalls, 2),
            list(&r.drops, 0),
            list(&r.wire, 2),
            r.exchanges,
            list(&r.rtt.iter().map(|p| p[0]).collect::<Vec<_>>(), 1)
        )
    };
    let buffer = match t.vm_buffer.as_slice() {
        [] => "the stand-in VM's wireguard-go at rmem_default".to_string(),
        b => format!(
            "the stand-in VM's UDP receive buffers {}",
            b.iter().map(usize::to_string).collect::<Vec<_>>().join("/")
        ),
    };
    let a_note = format!("{}; {buffer}", how(&a));
    let b_note = format!(
        "{}; client = the unix stream end of a UnixStream::pair joined to the connection (omerta vm connect's path minus its unix hop); B/A per round {}; tunnel send errors {}, wg errors {}, fenced {:?} (late segments of closed connections)",
        how(&b),
        list(&ratios, 2),
        s.send_errors.load(Ordering::Relaxed),
        s.wg_errors.load(Ordering::Relaxed),
        s.fence_drops()
    );
    Ok(vec![a.row(TUN, a_note), b.row(USER, b_note)])
}
