//! smoltcp's view of the tunnel: an IP-medium device whose receive side is a fixed ring only
//! the fence fills, and whose transmit side encrypts and sends at once. Nothing is allocated
//! per packet.
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use super::noise::{Noise, MAX_DATAGRAM};
use super::stats::Stats;

/// Where the stack's packets go: WireGuard ([`Noise`]), or a fuzz body's sink. The stack
/// writes each packet straight into the wire's own buffer.
pub trait Wire {
    /// Room for one packet (at least [`MTU`] bytes), reused from packet to packet.
    fn plain(&mut self) -> &mut [u8];
    /// Sends the first `len` bytes of [`Wire::plain`].
    fn send_plain(&mut self, len: usize, stats: &Stats);
}

impl Wire for Noise {
    fn plain(&mut self) -> &mut [u8] {
        Noise::plain(self)
    }
    fn send_plain(&mut self, len: usize, stats: &Stats) {
        Noise::send_plain(self, len, stats);
    }
}

/// The tunnel's MTU, as WireGuard's default on a 1500-byte path.
pub const MTU: usize = 1420;
/// Packets held between decryption and the stack.
pub const RING: usize = 64;

/// Decrypted packets waiting for the stack, in fixed slots.
pub struct Ring {
    slots: Box<[[u8; MAX_DATAGRAM]; RING]>,
    lens: [usize; RING],
    head: usize,
    len: usize,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("len", &self.len).finish_non_exhaustive()
    }
}

impl Default for Ring {
    fn default() -> Self {
        Self { slots: Box::new([[0; MAX_DATAGRAM]; RING]), lens: [0; RING], head: 0, len: 0 }
    }
}

impl Ring {
    /// Whether no slot is free.
    pub fn is_full(&self) -> bool {
        self.len == RING
    }

    /// The next free slot, to decrypt into; [`Self::commit`] keeps its first `len` bytes.
    pub fn free_slot(&mut self) -> Option<&mut [u8; MAX_DATAGRAM]> {
        if self.is_full() {
            return None;
        }
        let i = (self.head + self.len) % RING;
        self.slots.get_mut(i)
    }

    /// Keeps the packet just written in the free slot.
    pub fn commit(&mut self, len: usize) {
        if self.is_full() {
            return;
        }
        let i = (self.head + self.len) % RING;
        if let Some(l) = self.lens.get_mut(i) {
            *l = len.min(MAX_DATAGRAM);
            self.len += 1;
        }
    }

    fn pop(&mut self) -> Option<&[u8]> {
        if self.len == 0 {
            return None;
        }
        let i = self.head;
        self.head = (self.head + 1) % RING;
        self.len -= 1;
        let len = self.lens.get(i).copied().unwrap_or(0);
        self.slots.get(i).and_then(|s| s.get(..len))
    }
}

/// The device for one `Interface::poll`.
pub struct Device<'a, W: Wire = Noise> {
    /// Packets in.
    pub rx: &'a mut Ring,
    /// Packets out.
    pub noise: &'a mut W,
    /// Counters.
    pub stats: &'a Stats,
}

impl<W: Wire> std::fmt::Debug for Device<'_, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("rx", &self.rx).finish_non_exhaustive()
    }
}

/// A packet for the stack.
#[derive(Debug)]
pub struct RxToken<'a>(&'a [u8]);

/// Room for one packet from the stack.
pub struct TxToken<'a, W: Wire> {
    noise: &'a mut W,
    stats: &'a Stats,
}

impl<W: Wire> std::fmt::Debug for TxToken<'_, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxToken").finish_non_exhaustive()
    }
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(self.0)
    }
}

impl<W: Wire> phy::TxToken for TxToken<'_, W> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let buf = self.noise.plain();
        let len = len.min(MTU).min(buf.len());
        let r = f(&mut buf[..len]);
        self.noise.send_plain(len, self.stats);
        r
    }
}

impl<W: Wire> phy::Device for Device<'_, W> {
    type RxToken<'a>
        = RxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a, W>
    where
        Self: 'a;

    fn receive(&mut self, _now: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let Self { rx, noise, stats } = self;
        let packet = rx.pop()?;
        Some((RxToken(packet), TxToken { noise, stats }))
    }

    fn transmit(&mut self, _now: Instant) -> Option<Self::TxToken<'_>> {
        Some(TxToken { noise: self.noise, stats: self.stats })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        caps.max_burst_size = Some(RING);
        caps
    }
}
