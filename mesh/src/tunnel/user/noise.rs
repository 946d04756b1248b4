//! WireGuard for one VM in this process: boringtun's `Tunn` over one UDP socket. It learns the
//! VM's endpoint only from a datagram that proves the VM's key (data, or a handshake boringtun
//! answered; never a cookie, which boringtun hands out under load for a valid mac1 alone),
//! sends what the stack writes, and runs WireGuard's timers. Buffers are allocated once.
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;

use boringtun::noise::{Tunn, TunnResult};

use super::prover::Prover;
use super::stats::Stats;

/// The largest datagram taken in: a data packet of the tunnel's MTU with WireGuard's 32
/// bytes, with room. Larger ones are dropped (and counted) before boringtun sees them: it
/// panics on a destination smaller than the ciphertext.
pub const MAX_DATAGRAM: usize = 2048;

/// Whether what boringtun made of a datagram proves its sender holds the VM's key: data it
/// decrypted (a packet, or a keepalive), or a handshake it answered with a response (type 2)
/// or completed (the keepalive, type 4, after the VM's response). Never a cookie reply (type
/// 3): boringtun sends one, under load, to anyone who knows our public key.
fn proves_the_key(result: &TunnResult<'_>, datagram: &[u8]) -> bool {
    match result {
        TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => true,
        TunnResult::WriteToNetwork(d) => matches!(d.first(), Some(2 | 4)),
        TunnResult::Done => datagram.first() == Some(&4),
        TunnResult::Err(_) => false,
    }
}

/// Sends `datagram` to the VM's `endpoint`, if known.
fn send(socket: &mio::net::UdpSocket, endpoint: Option<SocketAddr>, datagram: &[u8], stats: &Stats) {
    let Some(to) = endpoint else {
        stats.no_endpoint.fetch_add(1, Ordering::Relaxed);
        return;
    };
    match socket.send_to(datagram, to) {
        Ok(n) => {
            stats.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        // A full socket buffer loses the datagram, as a link would; TCP sends it again.
        Err(_) => {
            stats.send_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The tunnel's WireGuard state and socket.
pub struct Noise {
    tunn: Tunn,
    socket: mio::net::UdpSocket,
    /// Where the VM is: set at start when known, then followed from authenticated datagrams.
    endpoint: Option<SocketAddr>,
    out: Box<[u8; MAX_DATAGRAM]>,
    /// The stack's next packet, written in place and encrypted from here.
    plain: Box<[u8; MAX_DATAGRAM]>,
    /// The datagram being received (one more byte than taken, to see an oversized one).
    incoming: Box<[u8; MAX_DATAGRAM + 1]>,
    /// Proves our endpoint to the VM's engine (a consumer that may be behind NAT).
    prover: Option<Prover>,
    /// `tx_bytes` at the last tick: whether we sent since.
    tx_seen: u64,
}

impl std::fmt::Debug for Noise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Noise").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

/// What one received datagram gave.
#[derive(Debug)]
pub enum Received<'a> {
    /// A packet for the stack (decrypted in place in the caller's buffer).
    Packet(&'a [u8]),
    /// Nothing for the stack.
    Nothing,
}

impl Noise {
    /// Wraps `tunn` and `socket`; with an `endpoint`, starts the handshake toward it, after a
    /// first proof with a `prover`.
    pub fn new(
        tunn: Tunn,
        socket: mio::net::UdpSocket,
        endpoint: Option<SocketAddr>,
        prover: Option<Prover>,
        stats: &Stats,
    ) -> Self {
        let mut n = Self {
            tunn,
            socket,
            endpoint,
            out: Box::new([0; MAX_DATAGRAM]),
            plain: Box::new([0; MAX_DATAGRAM]),
            incoming: Box::new([0; MAX_DATAGRAM + 1]),
            prover,
            tx_seen: 0,
        };
        n.prove(std::time::Instant::now(), stats);
        if n.endpoint.is_some() {
            let mut buf = [0u8; 256];
            if let TunnResult::WriteToNetwork(d) = n.tunn.format_handshake_initiation(&mut buf, false) {
                send(&n.socket, n.endpoint, d, stats);
            }
        }
        n
    }

    /// The socket, for the poll set.
    pub fn socket(&mut self) -> &mut mio::net::UdpSocket {
        &mut self.socket
    }

    /// Where the VM is now.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint
    }

    /// Room for the stack's next packet ([`Self::send_plain`] sends it). Reused as it is: the
    /// stack writes every byte of the length it asked for.
    pub fn plain(&mut self) -> &mut [u8] {
        &mut self.plain[..]
    }

    /// Encrypts the first `len` bytes of [`Self::plain`] and sends them to the VM.
    pub fn send_plain(&mut self, len: usize, stats: &Stats) {
        let Self { tunn, socket, endpoint, out, plain, .. } = self;
        let packet = plain.get(..len).unwrap_or_default();
        match tunn.encapsulate(packet, &mut out[..]) {
            TunnResult::WriteToNetwork(d) => send(socket, *endpoint, d, stats),
            TunnResult::Err(_) => {
                stats.wg_errors.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// Reads one datagram into `buf` and decrypts it there. `Ok(None)`: the socket is empty.
    pub fn receive<'b>(&mut self, buf: &'b mut [u8; MAX_DATAGRAM], stats: &Stats) -> Option<Received<'b>> {
        let (len, from) = match self.socket.recv_from(&mut self.incoming[..]) {
            Ok(x) => x,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
            Err(_) => {
                stats.recv_errors.fetch_add(1, Ordering::Relaxed);
                return Some(Received::Nothing);
            }
        };
        stats.rx_bytes.fetch_add(len as u64, Ordering::Relaxed);
        if len > MAX_DATAGRAM {
            stats.oversize.fetch_add(1, Ordering::Relaxed);
            return Some(Received::Nothing);
        }
        let datagram = &self.incoming[..len];
        let ip: IpAddr = from.ip();
        let result = self.tunn.decapsulate(Some(ip), datagram, &mut buf[..]);
        let proved = proves_the_key(&result, datagram);
        if proved {
            if let Some(p) = self.prover.as_mut() {
                p.heard(std::time::Instant::now());
            }
        }
        if proved && self.endpoint != Some(from) {
            if self.endpoint.is_some() {
                stats.endpoint_moves.fetch_add(1, Ordering::Relaxed);
            }
            self.endpoint = Some(from);
        }
        match result {
            // A cookie reply goes back to whoever asked; nothing else is due there.
            TunnResult::WriteToNetwork(d) if d.first() == Some(&3) => {
                send(&self.socket, Some(from), d, stats);
                Some(Received::Nothing)
            }
            TunnResult::WriteToNetwork(d) => {
                send(&self.socket, self.endpoint, d, stats);
                self.flush(stats);
                Some(Received::Nothing)
            }
            TunnResult::WriteToTunnelV4(p, _) => Some(Received::Packet(p)),
            TunnResult::WriteToTunnelV6(..) => {
                stats.ipv6.fetch_add(1, Ordering::Relaxed);
                Some(Received::Nothing)
            }
            TunnResult::Done => Some(Received::Nothing),
            TunnResult::Err(_) => {
                stats.wg_errors.fetch_add(1, Ordering::Relaxed);
                Some(Received::Nothing)
            }
        }
    }

    /// Sends what boringtun queued while it had no session (after a handshake completes).
    fn flush(&mut self, stats: &Stats) {
        let mut buf = [0u8; MAX_DATAGRAM];
        for _ in 0..512 {
            match self.tunn.decapsulate(None, &[], &mut buf) {
                TunnResult::WriteToNetwork(d) => send(&self.socket, self.endpoint, d, stats),
                _ => break,
            }
        }
    }

    /// WireGuard's timers: retries, keepalives, rekeys (every 250 ms). Also notes the latest
    /// handshake for `vm show`.
    pub fn tick(&mut self, stats: &Stats) {
        let mut buf = [0u8; MAX_DATAGRAM];
        match self.tunn.update_timers(&mut buf) {
            TunnResult::WriteToNetwork(d) => send(&self.socket, self.endpoint, d, stats),
            TunnResult::Err(boringtun::noise::errors::WireGuardError::ConnectionExpired) => {
                stats.expired.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        self.prove(std::time::Instant::now(), stats);
        let (since, ..) = self.tunn.stats();
        if let Some(since) = since {
            let at = crate::now_s().saturating_sub(since.as_secs());
            stats.last_handshake.store(at, Ordering::Relaxed);
        }
    }

    /// Sends a proof of our endpoint if one is due (`prover.rs` says when), and after it a
    /// handshake initiation while the VM has not answered yet.
    fn prove(&mut self, now: std::time::Instant, stats: &Stats) {
        let Some(p) = self.prover.as_mut() else { return };
        let tx = stats.tx_bytes.load(Ordering::Relaxed);
        if tx != self.tx_seen {
            p.sent(now);
            self.tx_seen = tx;
        }
        let initiate = p.take_initiation();
        if let (Some(proof), Some(to)) = (p.due(now, ::engine::log::unix_ms()), self.endpoint) {
            match self.socket.send_to(&proof, to) {
                Ok(_) => stats.proofs_sent.fetch_add(1, Ordering::Relaxed),
                Err(_) => stats.send_errors.fetch_add(1, Ordering::Relaxed),
            };
            if p.silent_too_long() {
                ::engine::warn!(
                    "userspace tunnel to {to}: {} endpoint proofs and no answer from the VM: still booting, the provider's port closed on the way, or this machine's clock more than 2 minutes off (the engine refuses proofs from such a clock)",
                    super::prover::UNANSWERED_WARN
                );
            }
        }
        if initiate {
            let mut buf = [0u8; 256];
            if let TunnResult::WriteToNetwork(d) = self.tunn.format_handshake_initiation(&mut buf, true) {
                send(&self.socket, self.endpoint, d, stats);
            }
        }
    }
}
