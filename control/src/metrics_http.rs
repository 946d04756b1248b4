//! `--metrics-listen ADDR:PORT`: a Prometheus scrape endpoint. `GET /metrics` answers the same
//! text as `omertactl metrics` (the control thread makes it, through the same job channel as
//! the control socket); anything else is 404, a bad request 400. One short-lived connection at
//! a time, with one deadline for all of it ([`CONNECTION_DEADLINE`]: reading at most 8 KiB of
//! request, then writing the answer), so a slow or silent client holds the endpoint for that
//! long at most, never the control thread: a scraper, not a web server.
//! Off by default; the operator picks the address (loopback, or a management network).
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;

use crate::server::{Job, Peer, ANSWER_TIMEOUT};
use api::{Reply, Request};

/// The longest request head read.
const MAX_HEAD: usize = 8192;
/// How long one connection may take, request and answer together.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);

/// A running endpoint; stops when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    stop: Arc<AtomicBool>,
    /// The listener again, to wake its accept at the end.
    wake: TcpListener,
    thread: Option<JoinHandle<()>>,
}

/// Binds the endpoint (before the engine drops privileges: a port below 1024 needs them).
pub fn bind(addr: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr).map_err(|e| format!("--metrics-listen {addr}: {e}"))
}

impl MetricsServer {
    /// Serves `listener`, asking the control thread through `jobs` as `peer` (the engine).
    pub fn start(listener: TcpListener, jobs: Sender<Job>, peer: Peer) -> Result<Self, String> {
        let wake = listener.try_clone().map_err(|e| format!("metrics listener: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("omerta-metrics".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if s2.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Ok(c) = conn {
                        serve(c, &jobs, peer);
                    }
                }
            })
            .map_err(|e| format!("metrics thread: {e}"))?;
        Ok(Self { stop, wake, thread: Some(thread) })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept by shutting the listener, not by connecting to it: the kernel fence
        // drops a TCP connection the engine's user opens, even to itself.
        if let Err(e) = sys::shutdown_read(std::os::fd::AsFd::as_fd(&self.wake)) {
            engine::warn!("metrics: cannot wake the listener's thread: {e}");
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The time left before `deadline`, or `None` once it has passed.
fn left(deadline: std::time::Instant) -> Option<Duration> {
    deadline.checked_duration_since(std::time::Instant::now()).filter(|d| !d.is_zero())
}

/// The request head, up to its blank line, within the deadline and the size cap.
fn read_head(c: &mut TcpStream, deadline: std::time::Instant) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() > MAX_HEAD {
            return None;
        }
        // Each read waits only for what is left of the connection's time.
        c.set_read_timeout(Some(left(deadline)?)).ok()?;
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8(head).ok()
}

fn serve(mut c: TcpStream, jobs: &Sender<Job>, peer: Peer) {
    let deadline = std::time::Instant::now() + CONNECTION_DEADLINE;
    let Some(head) = read_head(&mut c, deadline) else {
        let _ = respond(&mut c, deadline, "400 Bad Request", "text/plain", "bad request\n");
        return;
    };
    let mut words = head.lines().next().unwrap_or("").split(' ');
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    if method != "GET" || !(path == "/metrics" || path.starts_with("/metrics?")) {
        let _ = respond(&mut c, deadline, "404 Not Found", "text/plain", "only GET /metrics is served here\n");
        return;
    }
    let (tx, rx) = crossbeam_channel::bounded(1);
    if jobs.send((Request::Metrics, peer, tx)).is_err() {
        let _ = respond(&mut c, deadline, "503 Service Unavailable", "text/plain", "the engine is stopping\n");
        return;
    }
    match rx.recv_timeout(ANSWER_TIMEOUT) {
        Ok(Ok(Reply::Metrics(text))) => {
            let _ = respond(
                &mut c,
                deadline,
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                &text,
            );
        }
        _ => {
            let _ = respond(&mut c, deadline, "503 Service Unavailable", "text/plain", "no answer from the engine\n");
        }
    }
}

/// Writes the answer, each write waiting only for what is left of the connection's time: a
/// client that reads slowly is cut off at the deadline.
fn respond(
    c: &mut TcpStream,
    deadline: std::time::Instant,
    status: &str,
    kind: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let all = [head.as_bytes(), body.as_bytes()].concat();
    let mut off = 0;
    while off < all.len() {
        let Some(t) = left(deadline) else { return Err(std::io::ErrorKind::TimedOut.into()) };
        c.set_write_timeout(Some(t))?;
        match c.write(&all[off..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
