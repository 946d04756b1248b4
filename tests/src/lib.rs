//! Cross-crate integration tests (`omerta-it`): shared harness.
//!
//! - [`private_netns`]: runs a closure on a thread inside a new network namespace that holds
//!   only a loopback interface, so nothing the engine sends can leave the machine.
//! - [`SyntheticVm`]: the far end of a VM handle (the seed plan's `MockVMHandle`), sending
//!   frames built by `engine::testkit` and reading what the engine writes back.
//! - [`Consumer`]: a UDP socket on a documentation address (198.51.100.0/24) of the private
//!   namespace's `lo`, playing the consumer.
//! - [`Sink`]: a listener on a forbidden address (8.8.8.8, 192.168.1.1, ...) added to the
//!   private namespace's `lo`: a datagram that gets past the filter is counted, not lost.
//! - [`require`]: a test that lacks a capability fails under `CI=true` and says why elsewhere.
//!
//! # No packet leaves the machine
//! Everything in this harness that can make the engine, a VMM or a consumer send ([`Rig`],
//! [`EngineProc`], [`boot_guest`], [`WgConsumer`], [`Consumer`], [`Sink`]) refuses to run
//! outside a private network namespace ([`assert_private_netns`]): a test cannot forget it.
//! The namespaces hold only `lo` (and veth pairs to other namespaces the test made), so a
//! packet to any other address has no route; it is impossible, not merely filtered.
//!
//! Over 500 lines on purpose: the one harness every test goes through (the no-leak rule is
//! enforced here and nowhere else), kept in one file so that no way around it hides.
#![deny(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{IntoRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use engine::testkit::{arp_request, FrameSpec};
use engine::worker::{self, Backend, Event, EventKind, VmWorker};
use engine::{Endpoint, VmIdentity};
#[allow(unused_imports)]
use hv as _;

/// Both backends, each test runs against each.
pub const BACKENDS: [Backend; 2] = [Backend::Portable, Backend::Uring];

/// The backends to test: both, or those named in `OMERTA_TEST_BACKENDS` (comma-separated),
/// which CI never sets.
pub fn backends() -> Vec<Backend> {
    match std::env::var("OMERTA_TEST_BACKENDS") {
        Ok(v) if !v.is_empty() => {
            v.split(',').map(|b| b.parse().expect("OMERTA_TEST_BACKENDS: uring or portable")).collect()
        }
        _ => BACKENDS.to_vec(),
    }
}

/// The name a backend reports when it runs.
pub fn backend_name(b: Backend) -> &'static str {
    match b {
        Backend::Uring => "io_uring",
        _ => "portable",
    }
}

/// True under CI, where a missing capability is a failure.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Checks a capability. Under CI a missing one fails the test; elsewhere the test says it
/// skipped and why, and returns false.
pub fn require(what: &str, ok: Result<(), String>) -> bool {
    match ok {
        Ok(()) => true,
        Err(why) if ci() => panic!("CI=true and this test needs {what}: {why}"),
        Err(why) => {
            eprintln!("SKIPPED (needs {what}: {why})");
            false
        }
    }
}

/// The far end of a VM handle.
#[derive(Debug)]
pub enum VmEnd {
    /// A datagram socketpair end.
    Dgram(UnixDatagram),
    /// A stream socketpair end (u32 big-endian length framing).
    Stream(UnixStream),
}

/// A synthetic VM: the test's end of the handle, and the identity the engine expects.
#[derive(Debug)]
pub struct SyntheticVm {
    /// The socket.
    pub end: VmEnd,
    /// The VM's identity (defaults).
    pub id: VmIdentity,
}

impl SyntheticVm {
    /// Sends one frame.
    pub fn send(&self, frame: &[u8]) {
        match &self.end {
            VmEnd::Dgram(s) => {
                s.send(frame).expect("send a frame to the engine");
            }
            VmEnd::Stream(s) => {
                use std::io::Write;
                let mut w = s;
                let mut buf = u32::try_from(frame.len()).expect("frame fits u32").to_be_bytes().to_vec();
                buf.extend_from_slice(frame);
                w.write_all(&buf).expect("write a frame to the engine");
            }
        }
    }

    /// Waits up to `timeout` for the next frame from the engine.
    pub fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        match &self.end {
            VmEnd::Dgram(s) => {
                s.set_read_timeout(Some(timeout)).ok()?;
                let mut buf = vec![0u8; 65536];
                let n = s.recv(&mut buf).ok()?;
                buf.truncate(n);
                Some(buf)
            }
            VmEnd::Stream(s) => {
                use std::io::Read;
                s.set_read_timeout(Some(timeout)).ok()?;
                let mut r = s;
                let mut len = [0u8; 4];
                r.read_exact(&mut len).ok()?;
                let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
                r.read_exact(&mut buf).ok()?;
                Some(buf)
            }
        }
    }

    /// Receives frames until one matches `pred`, for up to `timeout`.
    pub fn recv_matching(&self, timeout: Duration, pred: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let end = Instant::now() + timeout;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.recv(left.max(Duration::from_millis(1))) {
                Some(f) if pred(&f) => return Some(f),
                Some(_) => {}
                None => return None,
            }
        }
        None
    }

    /// A UDP frame from the VM to `to` with `payload`.
    pub fn udp(&self, to: Endpoint, payload: &[u8]) -> Vec<u8> {
        FrameSpec::udp(&self.id, to, payload).build()
    }

    /// An ARP request for the gateway.
    pub fn arp_for_gateway(&self) -> Vec<u8> {
        arp_request(&self.id, self.id.gateway_ip)
    }
}

/// The inode of a network namespace file.
fn netns_id(path: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// The network namespace of the test runner (the process's main thread, which never leaves it).
pub fn runner_netns() -> Option<u64> {
    netns_id("/proc/self/ns/net")
}

/// The network namespace of a process.
pub fn netns_of(pid: u32) -> Option<u64> {
    netns_id(&format!("/proc/{pid}/ns/net"))
}

/// The calling thread's network namespace.
pub fn current_netns() -> Option<u64> {
    netns_id("/proc/thread-self/ns/net")
}

/// True when the calling thread is in a network namespace other than the runner's.
pub fn in_private_netns() -> bool {
    matches!((netns_id("/proc/thread-self/ns/net"), runner_netns()), (Some(a), Some(b)) if a != b)
}

/// Refuses (an `Err` naming `what`) outside a private network namespace.
pub fn check_private_netns(what: &str) -> Result<(), String> {
    if in_private_netns() {
        Ok(())
    } else {
        Err(format!(
            "harness: refusing to start {what} in the runner's network namespace: its traffic could leave \
             the machine; run the test inside omerta_it::private_netns"
        ))
    }
}

/// Panics outside a private network namespace.
pub fn assert_private_netns(what: &str) {
    if let Err(e) = check_private_netns(what) {
        panic!("{e}");
    }
}

/// The documentation range every private namespace holds on its `lo`, for consumers.
pub const CONSUMER_NET: [u8; 3] = [198, 51, 100];

/// A consumer on a documentation address of the private namespace's `lo`.
#[derive(Debug)]
pub struct Consumer {
    /// Its socket.
    pub sock: UdpSocket,
}

impl Consumer {
    /// Binds the next address of 198.51.100.0/24 on an ephemeral port, in the consumers'
    /// namespace of the caller's private namespace (see [`private_netns`]).
    pub fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
        assert_private_netns("a consumer");
        let host = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 250 + 1;
        let [a, b, c] = CONSUMER_NET;
        let sock = consumer_socket(Ipv4Addr::new(a, b, c, host), 0);
        engine::io::grow_buffers(std::os::fd::AsFd::as_fd(&sock), 8 << 20);
        Self { sock }
    }

    /// Its endpoint.
    pub fn endpoint(&self) -> Endpoint {
        match self.sock.local_addr().expect("local address") {
            SocketAddr::V4(a) => a.into(),
            SocketAddr::V6(_) => unreachable!("bound to IPv4"),
        }
    }

    /// Waits for one datagram.
    pub fn recv(&self, timeout: Duration) -> Option<(Vec<u8>, SocketAddr)> {
        self.sock.set_read_timeout(Some(timeout)).ok()?;
        let mut buf = vec![0u8; 65536];
        let (n, from) = self.sock.recv_from(&mut buf).ok()?;
        buf.truncate(n);
        Some((buf, from))
    }

    /// Counts datagrams until none arrives for `quiet`.
    pub fn drain(&self, quiet: Duration) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some((d, _)) = self.recv(quiet) {
            out.push(d);
        }
        out
    }
}

/// A UDP listener on a forbidden address (added to the private namespace's `lo`) that counts
/// what reaches it, from its start until it is finished. A leak past the filter shows here.
#[derive(Debug)]
pub struct Sink {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Where it listens.
    pub at: Endpoint,
}

impl Sink {
    /// Listens on `ip:port` of the private namespace's own `lo` (a forbidden destination;
    /// bounded: it stops by itself after 5 minutes).
    pub fn on(ip: [u8; 4], port: u16) -> Self {
        assert_private_netns("a sink on a forbidden address");
        add_local_address(ip);
        Self::with(UdpSocket::bind((Ipv4Addr::from(ip), port)).expect("bind a sink"))
    }

    /// A consumer that counts: listens on `ip:port` (in 198.51.100.0/24) in the consumers'
    /// namespace.
    pub fn consumer_at(ip: [u8; 4], port: u16) -> Self {
        Self::with(consumer_socket(Ipv4Addr::from(ip), port))
    }

    fn with(sock: UdpSocket) -> Self {
        use std::sync::atomic::Ordering;
        let at = match sock.local_addr().expect("local address") {
            SocketAddr::V4(a) => a.into(),
            SocketAddr::V6(_) => unreachable!("bound to IPv4"),
        };
        sock.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (s2, c2) = (stop.clone(), count.clone());
        let thread = std::thread::spawn(move || {
            let (mut buf, end) = ([0u8; 2048], Instant::now() + Duration::from_secs(300));
            while !s2.load(Ordering::Relaxed) && Instant::now() < end {
                if sock.recv(&mut buf).is_ok() {
                    c2.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Self { stop, count, thread: Some(thread), at }
    }

    /// Datagrams received so far.
    pub fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits up to `timeout` until at least `n` datagrams arrived; returns the count.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> usize {
        let end = Instant::now() + timeout;
        while self.count() < n && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.count()
    }

    /// Stops listening and returns how many datagrams arrived.
    pub fn finish(mut self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.count()
    }
}

/// The forbidden destinations the tests name (internet DNS, a provider LAN host, ...), each
/// with a [`Sink`]: what gets past the filter to them is counted.
pub const FORBIDDEN: [([u8; 4], u16); 4] =
    [([8, 8, 8, 8], 53), ([8, 8, 4, 4], 53), ([1, 1, 1, 1], 53), ([192, 168, 1, 1], 80)];

/// Sinks on every address of [`FORBIDDEN`].
#[derive(Debug)]
pub struct ForbiddenSinks(Vec<Sink>);

impl ForbiddenSinks {
    /// Starts them in the current (private) namespace.
    pub fn start() -> Self {
        Self(FORBIDDEN.iter().map(|(ip, port)| Sink::on(*ip, *port)).collect())
    }

    /// Stops them; the destinations that received anything, with their counts.
    pub fn leaks(self) -> Vec<(Endpoint, usize)> {
        self.0.into_iter().map(|s| (s.at, s.finish())).filter(|(_, n)| *n > 0).collect()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Default for Consumer {
    fn default() -> Self {
        Self::new()
    }
}

/// A running in-process engine worker with its synthetic VM.
#[derive(Debug)]
pub struct Rig {
    /// The worker.
    pub worker: Option<VmWorker>,
    /// The VM's end of the handle.
    pub vm: SyntheticVm,
    /// The worker's events.
    pub events: Receiver<Event>,
}

impl Rig {
    /// Starts a worker for `spec` (keys of `--vm` without `name` and `handle`) on a fresh
    /// socketpair (`stream` picks the stream framing), and checks it reports `backend`.
    pub fn start(spec: &str, backend: Backend, stream: bool) -> Self {
        assert_private_netns("an engine worker");
        let ty = if stream { libc::SOCK_STREAM } else { libc::SOCK_DGRAM };
        let (ours, theirs): (OwnedFd, OwnedFd) = engine::io::socketpair(ty).expect("socketpair");
        let fd = theirs.into_raw_fd();
        let handle = if stream { format!("stream-fd:{fd}") } else { format!("fd:{fd}") };
        let cfg = control::config::vm_from_spec(&format!("name=t,handle={handle},{spec}")).expect("valid test config");
        let (tx, events) = crossbeam_channel::unbounded();
        let worker = spawn_worker(&cfg, backend, tx).expect("start the worker");
        let end = if stream { VmEnd::Stream(UnixStream::from(ours)) } else { VmEnd::Dgram(UnixDatagram::from(ours)) };
        let rig = Self { worker: Some(worker), vm: SyntheticVm { end, id: cfg.identity }, events };
        match rig.events.recv_timeout(Duration::from_secs(5)) {
            Ok(Event { kind: EventKind::Started(name), .. }) => {
                assert_eq!(name, backend_name(backend), "the backend asked for is the one running")
            }
            other => panic!("worker did not start: {other:?}"),
        }
        rig
    }

    /// The worker.
    pub fn worker(&self) -> &VmWorker {
        self.worker.as_ref().expect("worker running")
    }

    /// Waits until the worker's published counters satisfy `pred` (up to 5 s).
    pub fn wait_for(&self, what: &str, pred: impl Fn(&worker::Snapshot) -> bool) -> worker::Snapshot {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let s = self.worker().snapshot();
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < end, "timed out waiting for {what}; counters: {s:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for an event other than `Started` (up to 15 s: a bound for a loaded machine, where
    /// a guest booting beside the test may hold both cores).
    pub fn next_event(&self) -> EventKind {
        self.events.recv_timeout(Duration::from_secs(15)).map(|e| e.kind).expect("an event from the worker")
    }

    /// Stops the worker and returns its final counters.
    pub fn stop(&mut self) -> worker::Snapshot {
        self.worker.take().map(VmWorker::stop).unwrap_or_default()
    }
}

/// Starts an engine worker in this process; refused outside a private network namespace. The
/// tests start workers only through this (or [`Rig`]); `cli::the_harness_is_the_only_way_in`
/// checks that.
pub fn spawn_worker(
    cfg: &engine::config::VmConfig,
    backend: Backend,
    events: crossbeam_channel::Sender<Event>,
) -> Result<VmWorker, worker::StartError> {
    assert_private_netns("an engine worker");
    worker::spawn(cfg, backend, events)
}

/// `consumer=...` for each endpoint.
pub fn allow(eps: &[Endpoint]) -> String {
    let list: Vec<String> = eps.iter().map(|e| format!("consumer={e}")).collect();
    list.join(",")
}

/// An endpoint.
pub fn ep(ip: [u8; 4], port: u16) -> Endpoint {
    Endpoint::new(Ipv4Addr::from(ip), port)
}

/// The consumers' namespace of each private namespace (by its inode): the far end of a veth
/// pair `oc0` (192.0.2.253/30) ↔ `oc1` (192.0.2.254/30), which owns 198.51.100.0/24. Consumers
/// live there, not on the private namespace's own `lo`, because the engine refuses the
/// provider host's own addresses as consumers.
static CONSUMER_NS: std::sync::Mutex<Vec<(u64, String)>> = std::sync::Mutex::new(Vec::new());

/// A consumers' namespace, deleted on drop.
struct ConsumerNs(String);

impl Drop for ConsumerNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).output();
        if let Ok(mut m) = CONSUMER_NS.lock() {
            m.retain(|(_, n)| *n != self.0);
        }
    }
}

fn make_consumer_ns() -> Result<ConsumerNs, String> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!("omerta-cn{}-{}", std::process::id(), SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let run = |args: &[&str]| -> Result<(), String> {
        let out = std::process::Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
        }
    };
    let _ = run(&["netns", "del", &name]);
    run(&["netns", "add", &name])?;
    let ns = ConsumerNs(name.clone());
    let net = format!("{}.0/24", CONSUMER_NET.map(|b| b.to_string()).join("."));
    run(&["link", "add", "oc0", "type", "veth", "peer", "name", "oc1", "netns", &name])?;
    run(&["addr", "add", "192.0.2.253/30", "dev", "oc0"])?;
    run(&["link", "set", "oc0", "up"])?;
    run(&["-n", &name, "addr", "add", "192.0.2.254/30", "dev", "oc1"])?;
    run(&["-n", &name, "link", "set", "oc1", "up"])?;
    run(&["-n", &name, "link", "set", "lo", "up"])?;
    // The whole consumer range is local there: any address of it can be bound.
    run(&["-n", &name, "route", "add", "local", &net, "dev", "lo"])?;
    run(&["route", "add", &net, "via", "192.0.2.254", "dev", "oc0"])?;
    let me = current_netns().ok_or("no namespace id")?;
    CONSUMER_NS.lock().map_err(|_| "poisoned")?.push((me, name));
    Ok(ns)
}

/// The name of the consumers' namespace of the caller's private namespace.
fn consumers_ns(what: &str) -> String {
    assert_private_netns(what);
    let me = current_netns().expect("namespace id");
    let m = CONSUMER_NS.lock().expect("consumer namespaces");
    let name = m.iter().find(|(n, _)| *n == me).map(|(_, n)| n.clone());
    name.expect("the caller's private namespace has a consumers' namespace")
}

/// A UDP socket bound to `ip:port` in the consumers' namespace of the caller's private
/// namespace (an address of 198.51.100.0/24, or one added with [`consumer_address`]).
pub fn consumer_socket(ip: Ipv4Addr, port: u16) -> UdpSocket {
    in_named_netns(&consumers_ns("a consumer"), move || UdpSocket::bind((ip, port)).expect("bind a consumer"))
}

/// Runs `f` on a thread in the consumers' namespace of the caller's private namespace:
/// sockets it makes (a TCP listener playing "the internet", say) stay there.
pub fn in_consumers_ns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    in_named_netns(&consumers_ns("something in the consumers' namespace"), f)
}

/// Runs `f` on a thread inside the named namespace `name` (`ip netns`), a namespace the test
/// made; sockets it makes stay there.
fn in_named_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("a namespace the test made");
        #[allow(unsafe_code)]
        // SAFETY: setns takes a descriptor we own and moves only this thread.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Makes `ip` a consumer address outside 198.51.100.0/24 (the real-guest tests' 203.0.113.2):
/// local in the consumers' namespace, routed there from the caller's.
pub fn consumer_address(ip: [u8; 4]) {
    let name = consumers_ns("a consumer address");
    let a = format!("{}/32", Ipv4Addr::from(ip));
    let _ = std::process::Command::new("ip").args(["-n", &name, "route", "add", "local", &a, "dev", "lo"]).output();
    let _ = std::process::Command::new("ip").args(["route", "add", &a, "via", "192.0.2.254", "dev", "oc0"]).output();
}

/// Runs `f` in a private namespace (see [`private_netns`]) with sinks on the forbidden
/// destinations, and fails if any of them received anything.
pub fn sealed(f: impl FnOnce() + Send + 'static) {
    private_netns(|| {
        let sinks = ForbiddenSinks::start();
        f();
        let leaks = sinks.leaks();
        assert!(leaks.is_empty(), "datagrams reached forbidden destinations: {leaks:?}");
    });
}

/// Runs `f` on a thread that lives in a new network namespace with only `lo` (up), and a
/// consumers' namespace behind a veth pair (see [`CONSUMER_NS`]). Sockets created there, by
/// the engine included, cannot reach anything beyond the namespaces the test made.
pub fn private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let t = std::thread::spawn(move || -> Result<T, String> {
        #[allow(unsafe_code)]
        // SAFETY: unshare takes no pointers; CLONE_NEWNET moves only this thread (and what
        // it creates from now on) into a new, empty network namespace.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        if r != 0 {
            return Err(format!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error()));
        }
        let out = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).output();
        let out = out.map_err(|e| format!("ip: {e}"))?;
        if !out.status.success() {
            return Err(format!("ip link set lo up: {}", String::from_utf8_lossy(&out.stderr)));
        }
        // Proof that the namespace is sealed: no route to anywhere but loopback.
        let probe = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        if probe.send_to(b"x", "192.0.2.1:9").is_ok() {
            return Err("the new namespace has a route out".into());
        }
        let _consumers = make_consumer_ns()?;
        Ok(f())
    });
    match t.join() {
        Ok(Ok(v)) => Some(v),
        Ok(Err(why)) => {
            require("a private network namespace (root, unshare)", Err(why));
            None
        }
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A binary of this workspace (`omerta-engine`, `omertactl`). The engine's only from a private
/// network namespace: whatever it is asked to do, it could send.
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    if name == "omerta-engine" {
        assert_private_netns("omerta-engine");
    }
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target directory");
    let bin = dir.join(name);
    assert!(bin.exists(), "{} is missing: run `cargo build --workspace --bins` (make test does)", bin.display());
    bin
}

/// The user an engine started as root runs as by default (`--runas`): `omerta` where it
/// exists, else `nobody`; `None` when the tests do not run as root (the engine keeps its user).
pub fn engine_user() -> Option<hv::VmmUser> {
    control::launcher::engine_user_for_children()
}

/// Binds a datagram socket at `path` that a VMM (or an intruder) uses to talk to an engine's
/// `dgram:PATH` handle; the engine's user may write to it, as to a real VMM's socket.
pub fn bind_vmm_socket(path: &std::path::Path) -> UnixDatagram {
    let s = UnixDatagram::bind(path).expect("bind a VMM socket");
    control::launcher::give_to_engine_user(path).expect("a VMM socket for the engine's user");
    s
}

/// A running `omerta-engine` process with a control socket in its own directory. Ended by pid
/// when dropped.
#[derive(Debug)]
pub struct EngineProc {
    /// The child.
    pub child: std::process::Child,
    /// Its control socket.
    pub control: std::path::PathBuf,
    /// A scratch directory for this engine (sockets, files).
    pub dir: std::path::PathBuf,
}

impl EngineProc {
    /// Starts the engine with `args` (and `--control`) and waits until its control socket
    /// answers. Descriptors the caller made inheritable stay open in the child.
    pub fn start(tag: &str, args: &[String]) -> Self {
        Self::try_start(tag, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`EngineProc::start`] with extra environment variables (`OMERTA_ICMP=raw`, say).
    pub fn start_env(tag: &str, args: &[String], env: &[(&str, &str)]) -> Self {
        Self::try_start_env(tag, args, env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`EngineProc::start`], refused outside a private network namespace: the engine's VMs
    /// may send anywhere, and only the namespace makes that impossible.
    pub fn try_start(tag: &str, args: &[String]) -> Result<Self, String> {
        Self::try_start_env(tag, args, &[])
    }

    fn try_start_env(tag: &str, args: &[String], env: &[(&str, &str)]) -> Result<Self, String> {
        check_private_netns(&format!("omerta-engine {}", args.join(" ")))?;
        let dir = std::env::temp_dir().join(format!("omerta-eng-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        // The engine drops root to its user: the handles it makes here are that user's.
        control::launcher::give_to_engine_user(&dir).expect("scratch dir for the engine's user");
        let control = dir.join("ctl/engine.sock");
        // Guests come from the test image and the engine's own scratch directory.
        let guests = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest");
        let _ = std::fs::create_dir_all(&guests);
        let child = std::process::Command::new(workspace_bin("omerta-engine"))
            .envs(env.iter().copied())
            .arg("--image-dir")
            .arg(&guests)
            .arg("--image-dir")
            .arg(&dir)
            .args(args)
            .arg("--control")
            .arg(&control)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start omerta-engine");
        let e = Self { child, control, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while e.ctl(&["status"]).0 != 0 {
            assert!(Instant::now() < deadline, "the engine's control socket never answered");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(e)
    }

    /// Polls `omertactl --json args` until `pred` holds (up to `secs`), returning that answer;
    /// fails the test with the last answer when it never does.
    pub fn wait_json(
        &self,
        what: &str,
        args: &[&str],
        secs: u64,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.json(args);
            if pred(&v) {
                return v;
            }
            assert!(Instant::now() < end, "timed out waiting for {what}; omertactl {args:?}: {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `omertactl --socket <ours> args...`: (exit code, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let out = std::process::Command::new(workspace_bin("omertactl"))
            .arg("--socket")
            .arg(&self.control)
            .args(args)
            .output()
            .expect("run omertactl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Adds VM `name` on a datagram handle at `<dir>/<name>.sock` with the further keys
    /// `keys` (`consumer=...` among them): `omertactl vm add`'s (exit code, stdout, stderr).
    pub fn add_vm(&self, name: &str, keys: &str) -> (i32, String, String) {
        let spec = format!("name={name},handle=dgram:{},{keys}", self.dir.join(format!("{name}.sock")).display());
        self.ctl(&["vm", "add", &spec])
    }

    /// `omertactl --json vm start SPEC --kernel KERNEL --initrd INITRD`: (exit code, the VM
    /// object as JSON text, stderr).
    pub fn vm_start(&self, spec: &str, kernel: &std::path::Path, initrd: &std::path::Path) -> (i32, String, String) {
        let (k, i) = (kernel.to_string_lossy(), initrd.to_string_lossy());
        self.ctl(&["--json", "vm", "start", spec, "--kernel", &k, "--initrd", &i])
    }

    /// Runs `omertactl --json ...` and parses its output.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let (code, out, err) = self.ctl(&a);
        assert_eq!(code, 0, "omertactl {args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("omertactl {args:?} printed no JSON ({e}): {out}"))
    }

    /// The engine's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the engine with SIGTERM (by its pid) and returns its exit code and stderr.
    pub fn stop(mut self) -> (Option<i32>, String) {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        let code = self.child.wait().ok().and_then(|s| s.code());
        (code, err)
    }
}

impl Drop for EngineProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The Debian cloud-style image built by `scripts/cloud-image.sh`: (base disk, kernel,
/// initrd), built once per test run (a few minutes on a fresh machine, cached under
/// `target/cloud-image`). `None` (after `require`) when it cannot be built.
pub fn cloud_image() -> Option<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)> {
    type Image = (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf);
    static BUILT: std::sync::OnceLock<Result<Image, String>> = std::sync::OnceLock::new();
    let r = BUILT.get_or_init(|| {
        let top = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = std::process::Command::new(top.join("scripts/cloud-image.sh")).output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("scripts/cloud-image.sh failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let dir = top.join("target/cloud-image");
        Ok((dir.join("disk.raw"), dir.join("vmlinuz"), dir.join("initrd.img")))
    });
    match r {
        Ok(v) => Some(v.clone()),
        Err(e) => {
            require("the cloud test image (mmdebstrap, Debian's mirror)", Err(e.clone()));
            None
        }
    }
}

/// QEMU, or `None` after `require` says it is missing.
fn vm_backend() -> Option<Box<dyn hv::Backend>> {
    hv::new().map_err(|e| require("QEMU", Err(e.to_string()))).ok()
}

/// A fresh scratch directory for guest `tag` of `kind` (`guest`, `cloud`).
fn guest_dir(kind: &str, tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("omerta-{kind}-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("guest scratch dir");
    dir
}

/// Starts `spec` on `backend`: the running guest and its scratch directory `dir`, or `None`
/// after `require`.
fn start_guest(
    backend: &dyn hv::Backend,
    spec: hv::VmSpec,
    dir: std::path::PathBuf,
) -> Option<(Box<dyn hv::RunningVm>, std::path::PathBuf)> {
    match backend.start(spec) {
        Ok(vm) => Some((vm, dir)),
        Err(e) => {
            require("QEMU", Err(e.to_string()));
            None
        }
    }
}

/// The test guest built by `scripts/guest-image.sh` (kernel, base initramfs), built once per
/// test run. `None` (after `require`) when it cannot be built.
pub fn guest_image() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    static BUILT: std::sync::OnceLock<Result<(std::path::PathBuf, std::path::PathBuf), String>> =
        std::sync::OnceLock::new();
    let r = BUILT.get_or_init(|| {
        let top = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = std::process::Command::new(top.join("scripts/guest-image.sh")).output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("scripts/guest-image.sh failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let dir = top.join("target/guest");
        Ok((dir.join("vmlinuz"), dir.join("initrd.cpio")))
    });
    match r {
        Ok(v) => Some(v.clone()),
        Err(e) => {
            require("the test guest image (QEMU, Debian packages)", Err(e.clone()));
            None
        }
    }
}

/// At most two guests at a time on this 2-core machine.
static GUEST_SLOTS: std::sync::Mutex<usize> = std::sync::Mutex::new(0);
static GUEST_FREED: std::sync::Condvar = std::sync::Condvar::new();

/// A slot for one guest; released on drop.
#[derive(Debug)]
pub struct GuestSlot(());

impl GuestSlot {
    /// Waits for a free slot.
    pub fn take() -> Self {
        let mut n = GUEST_SLOTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while *n >= 2 {
            n = GUEST_FREED.wait(n).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *n += 1;
        Self(())
    }
}

impl Drop for GuestSlot {
    fn drop(&mut self) {
        let mut n = GUEST_SLOTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *n -= 1;
        GUEST_FREED.notify_one();
    }
}

/// How to boot a test guest.
#[derive(Debug, Clone)]
pub struct GuestOpts {
    /// The guest's shell script (run as /test.sh after the network is up).
    pub script: String,
    /// The consumer endpoint (for the guest firewall and the script).
    pub consumer: Endpoint,
    /// Apply the guest firewall at boot.
    pub firewall: bool,
    /// Keep IPv6 enabled in the guest (it then sends MLD and solicitations by itself).
    pub ipv6: bool,
    /// Try DHCP (briefly) before the static address.
    pub dhcp: bool,
    /// Hard timeout.
    pub timeout: Duration,
}

/// A finished guest: how it ended and what it printed.
#[derive(Debug)]
pub struct GuestRun {
    /// How the VMM ended.
    pub exit: hv::Exit,
    /// The serial console.
    pub console: String,
}

impl GuestRun {
    /// The exit status of `/test.sh`, from the console marker.
    pub fn rc(&self) -> Option<i32> {
        self.console
            .lines()
            .find_map(|l| l.trim().strip_prefix("OMERTA-RESULT rc="))
            .and_then(|v| v.trim().parse().ok())
    }

    /// True if the console has a line containing `s`.
    pub fn saw(&self, s: &str) -> bool {
        self.console.contains(s)
    }
}

/// Writes the base initramfs `base` followed by an archive holding `/test.sh` = `script`.
pub fn write_test_initrd(base: &std::path::Path, script: &str, out: &std::path::Path) {
    let mut initrd = std::fs::read(base).expect("base initramfs");
    hv::initramfs::write(
        &mut initrd,
        &[hv::initramfs::Entry::File {
            path: "test.sh".into(),
            mode: 0o755,
            data: format!("#!/bin/sh\n{script}\n").into_bytes(),
        }],
    )
    .expect("append /test.sh");
    std::fs::write(out, initrd).expect("write initrd");
}

/// Boots a guest whose NIC is `nic` and returns it running (the caller waits or kills it).
pub fn boot_guest(opts: &GuestOpts, nic: hv::Nic, tag: &str) -> Option<(Box<dyn hv::RunningVm>, std::path::PathBuf)> {
    assert_private_netns("a guest");
    let (kernel, base) = guest_image()?;
    let backend = vm_backend()?;
    let dir = guest_dir("guest", tag);
    let initrd_path = dir.join("initrd");
    write_test_initrd(&base, &opts.script, &initrd_path);
    let id = VmIdentity::default();
    let cmdline = format!(
        "console=ttyS0 quiet panic=-1 reboot=t {}{}omerta.ip={}/{} omerta.gw={} omerta.fw={} omerta.consumer={}",
        if opts.ipv6 { "" } else { "ipv6.disable=1 " },
        if opts.dhcp { "omerta.dhcp=1 " } else { "" },
        id.ip,
        id.prefix_len,
        id.gateway_ip,
        u8::from(opts.firewall),
        opts.consumer
    );
    let console = dir.join("console.log");
    let spec = hv::VmSpec {
        name: tag.into(),
        kernel,
        initrd: initrd_path,
        cmdline,
        memory_mib: 128,
        cpus: 1,
        nic,
        mac: id.mac.to_string(),
        console: console.clone(),
        timeout: opts.timeout,
        user: None,
        disks: Vec::new(),
        fdsets: Vec::new(),
        reboot: false,
    };
    start_guest(backend.as_ref(), spec, dir)
}

/// The consumer's address inside a test namespace (on its loopback interface, or at the far
/// end of a veth pair for [`WgConsumer`]), a documentation address.
pub const CONSUMER_IP: [u8; 4] = [203, 0, 113, 2];

/// Adds `ip`/32 to `lo` in the current thread's network namespace.
pub fn add_local_address(ip: [u8; 4]) {
    let addr = format!("{}/32", Ipv4Addr::from(ip));
    let st = std::process::Command::new("ip").args(["addr", "add", &addr, "dev", "lo"]).status().expect("ip");
    assert!(st.success(), "ip addr add {addr} dev lo");
}

/// A second namespace made by the test, joined to the caller's private namespace by a veth
/// pair: the "provider" end `vp0` (203.0.113.1/24) on the caller's side, the "consumer" end
/// `vc0` (203.0.113.2/24, [`CONSUMER_IP`]) in the peer. For tests where a link really goes
/// down or the provider's address changes. Deleted on drop.
#[derive(Debug)]
pub struct VethPeer {
    /// The peer namespace's name (`ip netns`).
    pub ns: String,
}

/// Runs `ip args`, failing the test with its error.
pub fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl VethPeer {
    /// Makes the peer namespace and the veth pair.
    pub fn new(tag: &str) -> Self {
        assert_private_netns("a veth pair");
        let ns = format!("omerta-p{}-{tag}", std::process::id());
        let _ = std::process::Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        let me = Self { ns: ns.clone() };
        ip(&["link", "add", "vp0", "type", "veth", "peer", "name", "vc0", "netns", &ns]);
        ip(&["addr", "add", "203.0.113.1/24", "dev", "vp0"]);
        ip(&["link", "set", "vp0", "up"]);
        ip(&["-n", &ns, "addr", "add", "203.0.113.2/24", "dev", "vc0"]);
        ip(&["-n", &ns, "link", "set", "vc0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        me
    }

    /// Runs `f` on a thread inside the peer namespace; sockets it makes stay there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_named_netns(&self.ns, f)
    }

    /// `program` to be run in the peer namespace (through `ip netns exec`).
    pub fn cmd(&self, program: &std::path::Path) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }
}

impl Drop for VethPeer {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// A consumer running `omerta-consumer` (userspace WireGuard) in a network namespace of its
/// own, joined to the caller's (private) namespace by a veth pair: `vc0` with 203.0.113.1/24 on
/// the caller's side, 203.0.113.2/24 ([`CONSUMER_IP`]) on the consumer's. Removed (process ended by pid, namespace deleted) on drop.
#[derive(Debug)]
pub struct WgConsumer {
    ns: String,
    child: Option<std::process::Child>,
    /// The consumer's public key (base64).
    pub public: String,
}

impl WgConsumer {
    /// Starts the consumer for a peer with public key `peer_public`, answering on tunnel
    /// address `tunnel_ip`, for at most `seconds`.
    pub fn start(tag: &str, private: &str, public: &str, peer_public: &str, tunnel_ip: &str, seconds: u64) -> Self {
        assert_private_netns("a WireGuard consumer's veth pair");
        let ns = format!("omerta-c{}-{tag}", std::process::id());
        let run = |args: &[&str]| {
            let st = std::process::Command::new("ip").args(args).status().expect("ip");
            assert!(st.success(), "ip {args:?}");
        };
        run(&["netns", "add", &ns]);
        let mut me = Self { ns: ns.clone(), child: None, public: public.to_string() };
        consumer_veth(&ns);
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(workspace_bin("omerta-consumer"))
            .args(["203.0.113.2:51820", private, peer_public, tunnel_ip, &seconds.to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start omerta-consumer");
        me.child = Some(child);
        me
    }

    /// Ends the consumer and returns everything it printed.
    pub fn finish(mut self) -> String {
        let mut out = String::new();
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            if let Some(mut o) = c.stdout.take() {
                use std::io::Read;
                let _ = o.read_to_string(&mut out);
            }
            let _ = c.wait();
        }
        out
    }
}

impl Drop for WgConsumer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// The value of `key` (`"Uid:"`, `"Seccomp:"`...) in a `/proc/PID/status` text, trimmed;
/// empty when it is not there.
pub fn status_field(status: &str, key: &str) -> String {
    status.lines().find_map(|l| l.strip_prefix(key)).map(str::trim).unwrap_or_default().to_string()
}

/// A consumer on real WireGuard software, in a namespace of its own joined to the caller's
/// private namespace by a veth pair (`vc0` 203.0.113.1/24 on the caller's side, `vc1`
/// 203.0.113.2/24, [`CONSUMER_IP`], on the consumer's): the kernel's WireGuard when the host
/// has the module, else Debian's `wireguard-go` on a TUN device, configured with `wg`, listening
/// on 203.0.113.2:51820. The OpenSSH client runs there too ([`RealWgConsumer::ssh`]). Removed
/// (wireguard-go ended by its pid, namespace deleted) on drop.
#[derive(Debug)]
pub struct RealWgConsumer {
    /// The namespace (`ip netns`).
    pub ns: String,
    /// The WireGuard interface.
    pub ifname: String,
    /// `kernel` or `wireguard-go`.
    pub kind: &'static str,
    /// The consumer's public key (base64).
    pub public: String,
    child: Option<std::process::Child>,
    dir: std::path::PathBuf,
}

/// Joins the consumer's namespace `ns` to the caller's: `vc0` 203.0.113.1/24 here, `vc1`
/// 203.0.113.2/24 ([`CONSUMER_IP`]) there, both up.
fn consumer_veth(ns: &str) {
    ip(&["link", "add", "vc0", "type", "veth", "peer", "name", "vc1", "netns", ns]);
    ip(&["addr", "add", "203.0.113.1/24", "dev", "vc0"]);
    ip(&["link", "set", "vc0", "up"]);
    ip(&["-n", ns, "addr", "add", "203.0.113.2/24", "dev", "vc1"]);
    ip(&["-n", ns, "link", "set", "vc1", "up"]);
    ip(&["-n", ns, "link", "set", "lo", "up"]);
}

/// Runs `cmd`, failing the test with its stderr; returns its stdout.
fn must(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl RealWgConsumer {
    /// Makes the namespace and the interface with tunnel addresses `addrs` (`10.50.1.1/24`...);
    /// its key pair comes from `wg genkey`. `None` (after `require`) without WireGuard.
    pub fn start(tag: &str, addrs: &[&str]) -> Option<Self> {
        assert_private_netns("a WireGuard consumer's veth pair");
        let have = std::process::Command::new("wg").arg("--version").output().is_ok_and(|o| o.status.success());
        if !require("wireguard-tools (wg; make setup installs it)", if have { Ok(()) } else { Err("no wg".into()) }) {
            return None;
        }
        let ns = format!("omerta-w{}-{tag}", std::process::id());
        let ifname = format!("owg{}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("omerta-wgc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("consumer scratch dir");
        let _ = std::process::Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        let mut me =
            Self { ns: ns.clone(), ifname: ifname.clone(), kind: "kernel", public: String::new(), child: None, dir };
        consumer_veth(&ns);
        let private = must(std::process::Command::new("wg").arg("genkey"));
        let key = me.dir.join("private.key");
        std::fs::write(&key, private.trim()).expect("consumer key file");
        let public = {
            use std::io::Write;
            let mut c = std::process::Command::new("wg")
                .arg("pubkey")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("wg pubkey");
            c.stdin.take().expect("stdin").write_all(private.as_bytes()).expect("wg pubkey input");
            String::from_utf8_lossy(&c.wait_with_output().expect("wg pubkey").stdout).trim().to_string()
        };
        me.public = public;
        let kernel =
            std::process::Command::new("ip").args(["-n", &ns, "link", "add", &ifname, "type", "wireguard"]).output();
        if !kernel.is_ok_and(|o| o.status.success()) {
            // No WireGuard module on this host: Debian's userspace implementation.
            me.kind = "wireguard-go";
            // A socket left by a run that was killed would be found before ours exists.
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{ifname}.sock"));
            let child = std::process::Command::new("ip")
                .args(["netns", "exec", &ns, "wireguard-go", "-f", &ifname])
                .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn();
            let child = match child {
                Ok(c) => c,
                Err(e) => {
                    require("wireguard-go (make setup installs it)", Err(e.to_string()));
                    return None;
                }
            };
            me.child = Some(child);
            let sock = format!("/var/run/wireguard/{ifname}.sock");
            let end = Instant::now() + Duration::from_secs(10);
            let up = || {
                std::process::Command::new("ip")
                    .args(["-n", &ns, "link", "show", &ifname])
                    .output()
                    .is_ok_and(|o| o.status.success())
            };
            while !std::path::Path::new(&sock).exists() || !up() {
                assert!(Instant::now() < end, "wireguard-go never made {sock}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        me.wg(&["set", &ifname, "private-key", &key.to_string_lossy(), "listen-port", "51820"]);
        for a in addrs {
            ip(&["-n", &ns, "addr", "add", a, "dev", &ifname]);
        }
        ip(&["-n", &ns, "link", "set", &ifname, "up"]);
        Some(me)
    }

    /// Runs `wg args` for this consumer's interface (in its namespace); its stdout.
    pub fn wg(&self, args: &[&str]) -> String {
        must(std::process::Command::new("ip").args(["netns", "exec", &self.ns, "wg"]).args(args))
    }

    /// Adds the VM's peer: its public key, the tunnel address it may use.
    pub fn add_peer(&self, public: &str, allowed: &str) {
        self.wg(&["set", &self.ifname, "peer", public, "allowed-ips", allowed]);
    }

    /// The peer's (latest handshake in seconds since the epoch, bytes received, bytes sent).
    pub fn peer_stats(&self, public: &str) -> (u64, u64, u64) {
        let dump = self.wg(&["show", &self.ifname, "dump"]);
        let line = dump.lines().find(|l| l.starts_with(public)).unwrap_or_default();
        let f: Vec<&str> = line.split('\t').collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
        (n(4), n(5), n(6))
    }

    /// A command in the consumer's namespace.
    pub fn cmd(&self, program: &str) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }

    /// OpenSSH from the consumer's namespace: `ssh -i key` to `user@host` running `command`,
    /// the host key checked against `known_hosts` only (no trust on first use); (exit code,
    /// stdout, stderr). At most 60 s.
    pub fn ssh(
        &self,
        key: &std::path::Path,
        known_hosts: &std::path::Path,
        to: &str,
        command: &str,
    ) -> (i32, String, String) {
        let mut c = self.cmd("timeout");
        c.arg("60").arg("ssh").args(ssh_options(key, known_hosts)).arg(to).arg(command);
        let out = c.output().expect("run ssh");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs `f` on a thread in the consumer's namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_named_netns(&self.ns, f)
    }
}

/// The OpenSSH client options of the tests: this key only, this known_hosts only, strict host
/// key checking, no agent, no password, short timeouts.
pub fn ssh_options(key: &std::path::Path, known_hosts: &std::path::Path) -> Vec<String> {
    [
        "-i".to_string(),
        key.display().to_string(),
        "-o".into(),
        format!("UserKnownHostsFile={}", known_hosts.display()),
        "-o".into(),
        "GlobalKnownHostsFile=/dev/null".into(),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        "ConnectTimeout=10".into(),
        "-o".into(),
        "ServerAliveInterval=5".into(),
        "-o".into(),
        "ServerAliveCountMax=3".into(),
        "-o".into(),
        "LogLevel=ERROR".into(),
    ]
    .to_vec()
}

impl Drop for RealWgConsumer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let _ = c.wait();
        }
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP listener on a forbidden address (added to the private namespace's `lo`) counting the
/// connections that reach it; bounded: it stops by itself after 10 minutes.
#[derive(Debug)]
pub struct TcpSink {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Where it listens.
    pub at: Endpoint,
}

impl TcpSink {
    /// Listens on `ip:port`.
    pub fn on(ip: [u8; 4], port: u16) -> Self {
        use std::sync::atomic::Ordering;
        assert_private_netns("a TCP sink on a forbidden address");
        let _ = std::process::Command::new("ip")
            .args(["addr", "add", &format!("{}/32", Ipv4Addr::from(ip)), "dev", "lo"])
            .output();
        let l = std::net::TcpListener::bind((Ipv4Addr::from(ip), port)).expect("bind a TCP sink");
        l.set_nonblocking(true).expect("nonblocking");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (s2, c2) = (stop.clone(), count.clone());
        std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(600);
            while !s2.load(Ordering::Relaxed) && Instant::now() < end {
                if l.accept().is_ok() {
                    c2.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self { stop, count, at: ep(ip, port) }
    }

    /// Connections accepted so far.
    pub fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for TcpSink {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `omertad` and `omerta`, copied once into a directory every user may read, so that the mesh
/// tests can run them as `nobody` wherever the checkout is: (omertad, omerta).
pub fn mesh_bins() -> (std::path::PathBuf, std::path::PathBuf) {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        let exe = std::env::current_exe().expect("test binary path");
        let from = exe.parent().and_then(|d| d.parent()).expect("target directory");
        let dir = std::env::temp_dir().join(format!("omerta-mesh-bin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mesh bin dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for b in ["omertad", "omerta"] {
            let src = from.join(b);
            assert!(
                src.exists(),
                "{} is missing: run `cargo build --workspace --bins` (make test does)",
                src.display()
            );
            std::fs::copy(&src, dir.join(b)).expect("copy a mesh binary");
            std::fs::set_permissions(dir.join(b), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        dir
    });
    (dir.join("omertad"), dir.join("omerta"))
}

/// One packet of a pcapng file as `read_pcapng` reads it.
#[derive(Debug, Clone)]
pub struct PcapngFrame {
    /// Bytes captured.
    pub caplen: usize,
    /// Length on the wire.
    pub len: usize,
    /// The captured bytes.
    pub data: Vec<u8>,
    /// Direction (epb_flags): true for inbound (to the VM).
    pub to_vm: bool,
    /// Its comment, if any.
    pub comment: Option<String>,
}

/// Reads a little-endian pcapng file as `omertactl capture` writes it, checking its structure
/// (block lengths, one interface, records within the snaplen): the interface's snaplen and
/// every Enhanced Packet Block. Panics on anything malformed.
pub fn read_pcapng(b: &[u8]) -> (usize, Vec<PcapngFrame>) {
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    let u16_at = |at: usize| u16::from_le_bytes(b[at..at + 2].try_into().unwrap()) as usize;
    let (mut at, mut snaplen, mut frames) = (0, None, Vec::new());
    while at < b.len() {
        let (kind, len) = (u32_at(at), u32_at(at + 4));
        assert!(len >= 12 && len % 4 == 0 && at + len <= b.len(), "block at {at}: length {len}");
        assert_eq!(u32_at(at + len - 4), len, "block at {at}: trailing length");
        match kind {
            0x0A0D_0D0A => assert_eq!(u32_at(at + 8), 0x1A2B_3C4D, "byte-order magic"),
            1 => {
                assert!(snaplen.is_none(), "one interface");
                assert_eq!(u16_at(at + 8), 1, "link type Ethernet");
                snaplen = Some(u32_at(at + 12));
            }
            6 => {
                let (caplen, wire) = (u32_at(at + 20), u32_at(at + 24));
                let data = b[at + 28..at + 28 + caplen].to_vec();
                let snap = snaplen.expect("an interface before packets");
                assert!(caplen <= snap && caplen <= wire, "captured {caplen} of {wire}, snaplen {snap}");
                let mut o = at + 28 + caplen.next_multiple_of(4);
                let (mut to_vm, mut comment) = (None, None);
                while o < at + len - 4 {
                    let (code, olen) = (u16_at(o), u16_at(o + 2));
                    let v = &b[o + 4..o + 4 + olen];
                    match code {
                        0 => break,
                        1 => comment = Some(String::from_utf8(v.to_vec()).unwrap()),
                        2 => to_vm = Some(u32::from_le_bytes(v.try_into().unwrap()) & 3 == 1),
                        _ => {}
                    }
                    o += 4 + olen.next_multiple_of(4);
                }
                frames.push(PcapngFrame { caplen, len: wire, data, to_vm: to_vm.expect("epb_flags"), comment });
            }
            other => panic!("unexpected block type {other:#x}"),
        }
        at += len;
    }
    (snaplen.expect("an interface"), frames)
}
