//! A userspace tunnel's counters, shared between its thread (which writes them) and the
//! daemon (which reads them for `omerta vm show`).
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::fence::FenceDrop;

/// Counters of one tunnel; all monotonic except `last_handshake` and `streams`.
#[derive(Debug, Default)]
pub struct Stats {
    /// WireGuard bytes sent and received on the tunnel's socket.
    pub tx_bytes: AtomicU64,
    /// See `tx_bytes`.
    pub rx_bytes: AtomicU64,
    /// Seconds since the epoch of the latest handshake (0: none yet).
    pub last_handshake: AtomicU64,
    /// Datagrams boringtun refused (bad MAC, replay, wrong index, ...).
    pub wg_errors: AtomicU64,
    /// Datagrams larger than the tunnel takes.
    pub oversize: AtomicU64,
    /// Sends that failed (a full socket buffer) or had nowhere to go yet.
    pub send_errors: AtomicU64,
    /// See `send_errors`.
    pub no_endpoint: AtomicU64,
    /// Receives that failed.
    pub recv_errors: AtomicU64,
    /// Sessions that expired (no answer for 90 s, or no new keys for 540 s).
    pub expired: AtomicU64,
    /// IPv6 packets from the VM (dropped: the tunnel is IPv4).
    pub ipv6: AtomicU64,
    /// Endpoint proofs sent to the VM's engine.
    pub proofs_sent: AtomicU64,
    /// Times the VM's endpoint changed (after an authenticated datagram from the new one).
    pub endpoint_moves: AtomicU64,
    /// Packets the fence kept out, by [`FenceDrop`] index.
    pub fence: [AtomicU64; FenceDrop::ALL.len()],
    /// Streams opened to the VM, refused by the VM or by limits, and open now.
    pub streams_opened: AtomicU64,
    /// See `streams_opened`.
    pub streams_refused: AtomicU64,
    /// See `streams_opened`.
    pub streams: AtomicU64,
    /// The VM's endpoint as last seen (`None` before its first handshake).
    pub endpoint: Mutex<Option<std::net::SocketAddr>>,
}

impl Stats {
    /// Counts a packet the fence dropped.
    pub fn fenced(&self, why: FenceDrop) {
        if let Some(c) = self.fence.get(why.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The fence's counters by name, non-zero ones only.
    pub fn fence_drops(&self) -> Vec<(&'static str, u64)> {
        FenceDrop::ALL
            .iter()
            .zip(&self.fence)
            .map(|(r, c)| (r.name(), c.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}
