//! Sinks and consumers: UDP consumers on documentation addresses, and UDP and TCP sinks on the
//! forbidden destinations, which count what gets past the filter.
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use engine::Endpoint;

use crate::{add_local_address, consumer_socket, ep, Netns};

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
    /// namespace of the caller's private namespace (see [`private_netns`](crate::private_netns)).
    pub fn new(ns: &Netns) -> Self {
        static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
        let host = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 250 + 1;
        let [a, b, c] = CONSUMER_NET;
        let sock = consumer_socket(ns, Ipv4Addr::new(a, b, c, host), 0);
        sys::grow_buffers(std::os::fd::AsFd::as_fd(&sock), 8 << 20);
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
    pub fn on(ns: &Netns, ip: [u8; 4], port: u16) -> Self {
        add_local_address(ns, ip);
        Self::with(UdpSocket::bind((Ipv4Addr::from(ip), port)).expect("bind a sink"))
    }

    /// A consumer that counts: listens on `ip:port` (in 198.51.100.0/24) in the consumers'
    /// namespace.
    pub fn consumer_at(ns: &Netns, ip: [u8; 4], port: u16) -> Self {
        Self::with(consumer_socket(ns, Ipv4Addr::from(ip), port))
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
    pub fn start(ns: &Netns) -> Self {
        Self(FORBIDDEN.iter().map(|(ip, port)| Sink::on(ns, *ip, *port)).collect())
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
    pub fn on(ns: &Netns, ip: [u8; 4], port: u16) -> Self {
        use std::sync::atomic::Ordering;
        let _ = ns;
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
