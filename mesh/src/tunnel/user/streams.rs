//! TCP connections to the VM, each joined to a unix stream of a CLI (`omerta vm connect`,
//! `omerta ssh`, `omerta vm forward`). Backpressure both ways without a buffer of ours: bytes
//! go from the unix stream straight into the TCP socket's send ring only while it has room,
//! and from its receive ring to the unix stream only as fast as the CLI reads (a full ring
//! closes the TCP window, so the VM's sender waits). A half close is passed on each way.
use std::io::{ErrorKind, Read, Write};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;

use super::stats::Stats;

/// Connections to one VM at once.
pub const MAX_PER_VM: usize = 32;
/// Connections through all of a daemon's userspace tunnels at once (counted in the
/// [`Shared`] every tunnel of the daemon holds).
pub const MAX_PER_DAEMON: usize = 128;

/// The count of connections all the tunnels of one daemon hold.
pub type Shared = std::sync::Arc<std::sync::atomic::AtomicUsize>;
/// Each TCP socket's send and receive rings.
const RING_BYTES: usize = 256 * 1024;
/// How long the VM has to accept a connection, and a CLI to take it once accepted.
pub const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// Local ports used for connections to the VM.
const FIRST_LOCAL_PORT: u16 = 49152;

/// The answer to an open: the connection's ID, or why not (one line).
pub type Opened = Result<u64, String>;

/// One connection.
#[derive(Debug)]
struct Flow {
    id: u64,
    handle: SocketHandle,
    local: u16,
    remote: u16,
    /// Who waits for the VM to accept (until it did or could not).
    reply: Option<Sender<Opened>>,
    /// Until when it may wait for that, or for its unix stream.
    deadline: Instant,
    unix: Option<mio::net::UnixStream>,
    /// The CLI sent its last byte: the VM was sent a FIN.
    unix_eof: bool,
    /// The VM sent its last byte: the CLI's stream was shut for writing.
    unix_shut: bool,
    /// The CLI closed its end entirely: the connection is reset (a VM that never closes its
    /// side must not keep it).
    cli_gone: bool,
    /// Reset: removed on the next pass, once the stack has sent the VM its RST.
    reset: bool,
}

/// What became of a flow in one pass.
enum Fate {
    Keep,
    Remove,
    /// Aborted: its CLI stream goes now, its socket after the stack sent the RST.
    Reset,
}

/// The connections of one VM.
#[derive(Debug, Default)]
pub struct Streams {
    flows: Vec<Flow>,
    next_id: u64,
    next_port: u16,
    /// The daemon's count, one place per flow held here.
    shared: Shared,
}

impl Drop for Streams {
    fn drop(&mut self) {
        self.shared.fetch_sub(self.flows.len(), std::sync::atomic::Ordering::SeqCst);
    }
}

impl Streams {
    /// No connections yet, counted in the daemon's `shared` count.
    pub fn new(shared: Shared) -> Self {
        Self { flows: Vec::new(), next_id: 0, next_port: 0, shared }
    }

    /// Whether `(our port, the VM's port)` is a connection this tunnel opened.
    pub fn opened(&self, local: u16, remote: u16) -> bool {
        self.flows.iter().any(|f| f.local == local && f.remote == remote)
    }

    /// Connections now.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    fn local_port(&mut self) -> u16 {
        for _ in 0..=u16::MAX - FIRST_LOCAL_PORT {
            if self.next_port < FIRST_LOCAL_PORT {
                self.next_port = FIRST_LOCAL_PORT;
            }
            let p = self.next_port;
            self.next_port = self.next_port.wrapping_add(1);
            if !self.flows.iter().any(|f| f.local == p) {
                return p;
            }
        }
        FIRST_LOCAL_PORT
    }

    /// Starts a connection to `vm:port`; `reply` hears when the VM accepts or refuses.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        &mut self,
        iface: &mut Interface,
        sockets: &mut SocketSet<'static>,
        vm: Ipv4Addr,
        port: u16,
        reply: Sender<Opened>,
        now: Instant,
    ) {
        if self.flows.len() >= MAX_PER_VM {
            let _ = reply.send(Err(format!("{MAX_PER_VM} connections to this VM are open already")));
            return;
        }
        // A place in the daemon's count first: opens at the same instant cannot pass together.
        if self.shared.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= MAX_PER_DAEMON {
            self.shared.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            let _ = reply.send(Err(format!("omertad is busy: {MAX_PER_DAEMON} connections to VMs are open")));
            return;
        }
        if port == 0 {
            let _ = reply.send(Err("port 0 is not a port".into()));
            return;
        }
        let mut socket =
            tcp::Socket::new(tcp::SocketBuffer::new(vec![0; RING_BYTES]), tcp::SocketBuffer::new(vec![0; RING_BYTES]));
        socket.set_nagle_enabled(false);
        socket.set_keep_alive(Some(smoltcp::time::Duration::from_secs(30)));
        socket.set_timeout(Some(smoltcp::time::Duration::from_secs(120)));
        let local = self.local_port();
        if let Err(e) = socket.connect(iface.context(), (vm, port), local) {
            self.shared.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            let _ = reply.send(Err(format!("cannot connect: {e}")));
            return;
        }
        let handle = sockets.add(socket);
        self.next_id += 1;
        self.flows.push(Flow {
            id: self.next_id,
            handle,
            local,
            remote: port,
            reply: Some(reply),
            deadline: now + CONNECT_WAIT,
            unix: None,
            unix_eof: false,
            unix_shut: false,
            cli_gone: false,
            reset: false,
        });
    }

    /// Joins the accepted connection `id` to `unix`, registered in `registry` under `token`.
    pub fn attach(&mut self, id: u64, unix: std::os::unix::net::UnixStream, registry: &mio::Registry) -> bool {
        let Some(f) = self.flows.iter_mut().find(|f| f.id == id && f.reply.is_none() && f.unix.is_none()) else {
            return false;
        };
        if unix.set_nonblocking(true).is_err() {
            return false;
        }
        let mut unix = mio::net::UnixStream::from_std(unix);
        let token = mio::Token(usize::try_from(id).unwrap_or(usize::MAX).wrapping_add(super::FIRST_STREAM_TOKEN));
        if registry.register(&mut unix, token, mio::Interest::READABLE | mio::Interest::WRITABLE).is_err() {
            return false;
        }
        f.unix = Some(unix);
        true
    }

    /// Notes that the CLI of connection `id` closed its end entirely.
    pub fn cli_gone(&mut self, id: u64) {
        if let Some(f) = self.flows.iter_mut().find(|f| f.id == id) {
            f.cli_gone = true;
        }
    }

    /// Ends connection `id` (its CLI went before taking it).
    pub fn abort(&mut self, id: u64, sockets: &mut SocketSet<'static>) {
        if let Some(f) = self.flows.iter().find(|f| f.id == id) {
            sockets.get_mut::<tcp::Socket>(f.handle).abort();
        }
    }

    /// Ends every connection (the tunnel stops).
    pub fn abort_all(&mut self, sockets: &mut SocketSet<'static>) {
        for f in &self.flows {
            sockets.get_mut::<tcp::Socket>(f.handle).abort();
        }
    }

    /// Moves bytes both ways, answers opens, passes closes on, and forgets finished
    /// connections.
    pub fn service(&mut self, sockets: &mut SocketSet<'static>, registry: &mio::Registry, now: Instant, stats: &Stats) {
        let mut i = 0;
        while let Some(f) = self.flows.get_mut(i) {
            let socket = sockets.get_mut::<tcp::Socket>(f.handle);
            let fate = if f.reset {
                Fate::Remove
            } else if f.reply.is_some() {
                match waiting(f, socket, now, stats) {
                    Some(true) | None => Fate::Keep,
                    // A reset (ours, after a refusal or a timeout) still has to reach the VM.
                    Some(false) => Fate::Reset,
                }
            } else if f.unix.is_none() {
                if socket.state() == tcp::State::Closed {
                    Fate::Remove
                } else if now > f.deadline {
                    socket.abort();
                    Fate::Reset
                } else {
                    Fate::Keep
                }
            } else if f.cli_gone {
                socket.abort();
                Fate::Reset
            } else {
                pump(f, socket)
            };
            match fate {
                Fate::Keep => i += 1,
                Fate::Reset => {
                    f.reset = true;
                    if let Some(mut u) = f.unix.take() {
                        let _ = registry.deregister(&mut u);
                    }
                    i += 1;
                }
                Fate::Remove => {
                    let f = self.flows.swap_remove(i);
                    self.shared.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    if let Some(mut u) = f.unix {
                        let _ = registry.deregister(&mut u);
                    }
                    sockets.remove(f.handle);
                }
            }
        }
    }

    /// The earliest deadline of a connection waiting to be accepted or taken.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.flows.iter().filter(|f| f.unix.is_none()).map(|f| f.deadline).min()
    }
}

/// An open waiting for the VM: `Some(true)` accepted (told), `Some(false)` refused or timed
/// out (told), `None` still waiting.
fn waiting(f: &mut Flow, socket: &mut tcp::Socket<'_>, now: Instant, stats: &Stats) -> Option<bool> {
    let answer = match socket.state() {
        tcp::State::Established | tcp::State::CloseWait => Ok(f.id),
        tcp::State::Closed => Err(format!("the VM refused a connection to port {}", f.remote)),
        _ if now > f.deadline => {
            socket.abort();
            Err(format!("the VM did not answer on port {} within {} s", f.remote, CONNECT_WAIT.as_secs()))
        }
        _ => return None,
    };
    let ok = answer.is_ok();
    // Counted before the answer goes: whoever hears it sees the count.
    let counter = if ok { &stats.streams_opened } else { &stats.streams_refused };
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let delivered = f.reply.take().is_some_and(|r| r.send(answer).is_ok());
    if ok && !delivered {
        socket.abort();
        return Some(false);
    }
    f.deadline = now + CONNECT_WAIT;
    Some(ok)
}

/// What a read or write on the unix side gave.
enum Io {
    Moved,
    Blocked,
    Eof,
    Failed,
}

/// A read or write of the unix side as (bytes moved, what it gave); `zero` is what a
/// return of 0 means (an end of file for a read, a failure for a write).
fn outcome(r: std::io::Result<usize>, zero: Io) -> (usize, Io) {
    match r {
        Ok(0) => (0, zero),
        Ok(n) => (n, Io::Moved),
        Err(e) if e.kind() == ErrorKind::WouldBlock => (0, Io::Blocked),
        Err(e) if e.kind() == ErrorKind::Interrupted => (0, Io::Moved),
        Err(_) => (0, Io::Failed),
    }
}

fn pump(f: &mut Flow, socket: &mut tcp::Socket<'_>) -> Fate {
    let Some(unix) = f.unix.as_mut() else { return Fate::Remove };
    // CLI → VM, only while the socket has room.
    while !f.unix_eof && socket.can_send() {
        let r = socket.send(|buf| outcome(unix.read(buf), Io::Eof));
        match r {
            Ok(Io::Moved) => {}
            Ok(Io::Blocked) | Err(_) => break,
            Ok(Io::Eof) => {
                f.unix_eof = true;
                socket.close();
            }
            Ok(Io::Failed) => {
                socket.abort();
                return Fate::Reset;
            }
        }
    }
    // VM → CLI, only as fast as the CLI reads.
    while socket.can_recv() {
        let r = socket.recv(|data| outcome(unix.write(data), Io::Failed));
        match r {
            Ok(Io::Moved) => {}
            Ok(Io::Blocked | Io::Eof) | Err(_) => break,
            Ok(Io::Failed) => {
                socket.abort();
                return Fate::Reset;
            }
        }
    }
    // The VM sent its last byte and the CLI has all of it: pass the half close on.
    if !f.unix_shut && !socket.may_recv() && socket.recv_queue() == 0 {
        let _ = unix.shutdown(std::net::Shutdown::Write);
        f.unix_shut = true;
    }
    match socket.state() {
        // Closed (by both, by a reset, or a timeout), once the CLI has what the VM sent.
        tcp::State::Closed if !socket.can_recv() => Fate::Remove,
        tcp::State::TimeWait if f.unix_eof && f.unix_shut => Fate::Remove,
        _ => Fate::Keep,
    }
}
