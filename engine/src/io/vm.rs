//! The VM side of a worker: reading frames from the handle, handing each to the `Core`, and
//! queueing frames for the VM (zero copy for datagram handles; stream handles copy into their
//! framing buffer).
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};

use zerocopy::IntoBytes;

use super::batch::{OwnPool, RxBatch, TxBatch};
use super::host::{icmp_recv, icmp_send, icmp_send_as, source_endpoint, Egress, IcmpKind};
use super::stream::{Next, StreamRx, StreamTx};
use super::{Closed, End, LoopError};
use crate::filter::{DropReason, Strategy};
use crate::nat::VmAction;
use crate::vmcore::Core;
use crate::wire::{IcmpEchoHeader, Ipv4Header, HEADROOM};

/// A VM handle as opened, before its loop starts.
#[derive(Debug)]
pub enum VmOpen {
    /// A datagram socket: bound path or inherited socketpair end.
    Dgram {
        /// The socket.
        sock: UnixDatagram,
        /// Where frames for the VM go (`None`: the connected peer, or not learnt yet).
        peer: Option<(libc::sockaddr_storage, libc::socklen_t)>,
        /// A bound path anyone may send to: frames are accepted from one sender only (`peer`,
        /// or the first named sender), and the socket is then connected to it. False for a
        /// socketpair, which is connected already.
        check: bool,
    },
    /// A connected stream socket.
    Stream(UnixStream),
    /// A listening stream socket; the VMM connects later, once: the first connection accepted
    /// ends the listening.
    Listen {
        /// The socket.
        listener: UnixListener,
        /// The only uid whose connection is accepted (`peer-uid=`), checked with `SO_PEERCRED`.
        uid: Option<u32>,
    },
}

enum Rx {
    Dgram { sock: UnixDatagram, batch: RxBatch, sender: Sender },
    Stream { sock: UnixStream, rx: StreamRx },
}

/// Who may send on a datagram handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sender {
    /// The socket is connected to the VM's end (a socketpair, or connected once known): the
    /// kernel refuses every other sender.
    Connected,
    /// The first named sender becomes the VM.
    Learning,
    /// `peer=` named the VM's address (or it was learnt but connecting failed): only frames
    /// from that address.
    Expect,
}

enum Tx {
    Dgram { batch: TxBatch, peer: Box<Option<(libc::sockaddr_storage, libc::socklen_t)>>, needs_peer: bool },
    Stream(StreamTx),
}

/// The VM handle during the loop.
pub struct VmSide {
    rx: Rx,
    tx: Tx,
    own: OwnPool,
    stall: Stall,
}

/// A VM handle that does not take frames. After a refused write the loop waits for
/// writability as usual, and for [`STALL_MAX`] at most: frames that waited that long are
/// dropped (counted in `queue_overflows`) so that host datagrams for the VM keep being read
/// and judged. A retry on a writability signal that gets nothing out at all means the signal
/// cannot be trusted (a unix datagram socket bound to a path reports writable while its
/// peer's queue is full, so the loop would retry flat out): until a write gets through again,
/// retries are timed, 1 ms doubling to 100 ms. Any frame that gets out resets all of this.
#[derive(Debug, Default)]
struct Stall {
    /// When the frames now waiting were first refused.
    since: Option<std::time::Instant>,
    /// The next timed retry (or the drop deadline).
    next_try: Option<std::time::Instant>,
    /// Writability signals are not to be trusted.
    timed: bool,
    backoff: std::time::Duration,
    /// A stream past its deadline: its unstarted frames were dropped, the rest of one partly
    /// out remains, and one new batch may be queued behind it.
    draining: bool,
}

/// How long frames may wait for a stalled VM handle before they are dropped; the longest
/// pause between two retries.
pub const STALL_MAX: std::time::Duration = std::time::Duration::from_millis(100);

/// Most frames handled per pump of a stream handle (a datagram handle's batch is its size).
const STREAM_FRAMES_PER_PUMP: usize = crate::vmcore::BATCH;

impl VmSide {
    /// Sets up the loop's side of an opened (and, for streams, connected) handle.
    pub fn new(open: VmOpen, slot: usize, max_frame: usize, batch: usize) -> Result<Self, End> {
        let own = OwnPool::new(batch, slot);
        match open {
            VmOpen::Dgram { sock, peer, check } => Ok(Self {
                rx: Rx::Dgram {
                    sender: match (check, &peer) {
                        (false, _) => Sender::Connected,
                        (true, None) => Sender::Learning,
                        (true, Some((addr, len))) => {
                            if sys::connect(sock.as_raw_fd(), addr, *len).is_ok() {
                                Sender::Connected
                            } else {
                                Sender::Expect
                            }
                        }
                    },
                    sock,
                    batch: RxBatch::new(batch, slot, 0),
                },
                tx: Tx::Dgram {
                    batch: TxBatch::new(2 * batch, false),
                    needs_peer: check && peer.is_none(),
                    peer: Box::new(peer),
                },
                own,
                stall: Stall::default(),
            }),
            VmOpen::Stream(sock) => Ok(Self {
                rx: Rx::Stream { sock, rx: StreamRx::new(max_frame, 64 * 1024) },
                // Room for a whole batch of the largest frames (and a few small ones of our
                // own): 64 KiB used to drop the tail of every full batch of 1400 B datagrams
                // (counted `queue_overflows`) at any rate that brought two bursts together.
                tx: Tx::Stream(StreamTx::new(batch * (max_frame + 4) + 4096)),
                own,
                stall: Stall::default(),
            }),
            VmOpen::Listen { .. } => Err(End::Failed(LoopError::NotConnected)),
        }
    }

    /// The handle's descriptor.
    pub fn fd(&self) -> RawFd {
        match &self.rx {
            Rx::Dgram { sock, .. } => sock.as_raw_fd(),
            Rx::Stream { sock, .. } => sock.as_raw_fd(),
        }
    }

    /// True when no frame for the VM is waiting.
    pub fn tx_is_empty(&self) -> bool {
        match &self.tx {
            Tx::Dgram { batch, .. } => batch.is_empty(),
            Tx::Stream(t) => t.is_empty(),
        }
    }

    /// True when no queued frame points into a host receive buffer any more: nothing waits,
    /// or the handle is a stream, which copies each frame into its own buffer as it queues it.
    pub fn host_buffers_free(&self) -> bool {
        matches!(self.tx, Tx::Stream(_)) || self.tx_is_empty()
    }

    /// True when a new batch may be queued for the VM: nothing waits, or (a stream past its
    /// stall deadline) only the rest of a frame partly out. A direction is read only then.
    pub fn tx_accepts(&self) -> bool {
        self.tx_is_empty() || self.stall.draining
    }

    /// Queues a frame for the VM. Datagram handles keep a pointer to `frame` until flushed.
    fn queue<S: Strategy>(tx: &mut Tx, core: &mut Core<S>, frame: &[u8]) {
        let ok = match tx {
            Tx::Dgram { batch, peer, needs_peer } => {
                if *needs_peer && peer.is_none() {
                    // A bound path whose VMM has not sent anything yet: no address to send to.
                    core.send_error(false, 1, Some(libc::EDESTADDRREQ));
                    return;
                }
                // SAFETY: `frame` is a receive slot or an own-pool slot; neither is reused
                // until this batch is flushed or cleared (the loop reads the host side and
                // resets the own pool only once the VM batch is empty).
                unsafe { batch.push(frame, peer.as_ref().as_ref().map(|(a, l)| (a, *l))) }
            }
            Tx::Stream(t) => t.push(frame),
        };
        if ok {
            core.sent_to_vm(1, frame.len());
            core.captured_to_vm(frame);
        } else {
            core.dropped_on_full_queue();
        }
    }

    /// Reads one batch from the VM and handles every frame. `Ok(false)`: nothing to read.
    /// Call only when `to_host` and this side's output are empty (see the module doc).
    pub fn pump_in<S: Strategy>(
        &mut self,
        core: &mut Core<S>,
        to_host: &mut TxBatch,
        egress: &mut Egress,
    ) -> Result<bool, End> {
        let Self { rx, tx, own, .. } = self;
        match rx {
            Rx::Dgram { sock, batch, sender } => {
                let n = match batch.recv(sock.as_raw_fd()) {
                    Ok(n) => n,
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {
                        return Ok(false)
                    }
                    Err(e) => return Err(End::HandleClosed(Closed::io(&e))),
                };
                for i in 0..n {
                    if *sender != Sender::Connected {
                        let name = batch.source(i).map_or(&[][..], |(s, l)| sockaddr_bytes(s, l));
                        if !accept_sender(core, sock.as_raw_fd(), sender, tx, name, batch.datagram(i).0.len()) {
                            continue;
                        }
                    }
                    let (frame, truncated) = batch.datagram(i);
                    if truncated {
                        core.vm_frame_oversized(frame.len());
                        continue;
                    }
                    let action = core.vm_frame(frame);
                    act(core, action, to_host, egress, own, tx);
                }
                Ok(n > 0)
            }
            Rx::Stream { sock, rx } => {
                let mut handled = 0;
                loop {
                    match rx.next_frame() {
                        Next::Frame(range) => {
                            let frame = rx.buf().get(range).unwrap_or_default();
                            let action = core.vm_frame(frame);
                            act(core, action, to_host, egress, own, tx);
                            handled += 1;
                        }
                        Next::Oversized(len) => {
                            core.vm_frame_oversized(len);
                            handled += 1;
                        }
                        Next::Empty => {
                            let _ = core.vm_frame(&[]);
                            handled += 1;
                        }
                        Next::NeedMore => {
                            // Reading compacts the buffer: only with nothing pointing into it.
                            if handled > 0 {
                                return Ok(true);
                            }
                            match rx.fill(sock) {
                                Ok(0) => return Err(End::HandleClosed(Closed::EndOfStream)),
                                Ok(_) => continue,
                                Err(e)
                                    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) =>
                                {
                                    return Ok(false)
                                }
                                Err(e) => return Err(End::HandleClosed(Closed::io(&e))),
                            }
                        }
                    }
                    if handled >= STREAM_FRAMES_PER_PUMP {
                        return Ok(true);
                    }
                }
            }
        }
    }

    /// True for a datagram handle (one frame per datagram).
    pub fn is_dgram(&self) -> bool {
        matches!(self.rx, Rx::Dgram { .. })
    }

    /// True while frames must be checked against their sender's address (a bound path not
    /// yet connected to the VM's end): a backend then receives each frame's source name.
    pub fn checks_sender(&self) -> bool {
        matches!(self.rx, Rx::Dgram { sender: Sender::Learning | Sender::Expect, .. })
    }

    /// Whether a frame of `len` bytes whose sender's raw `sockaddr_un` bytes are `name` is the
    /// VM's (see [`VmOpen::Dgram`]); others are dropped and counted (`foreign_sender`).
    pub fn accept_sender<S: Strategy>(&mut self, core: &mut Core<S>, name: &[u8], len: usize) -> bool {
        match &mut self.rx {
            Rx::Dgram { sock, sender, .. } if *sender != Sender::Connected => {
                accept_sender(core, sock.as_raw_fd(), sender, &mut self.tx, name, len)
            }
            _ => true,
        }
    }

    /// Handles one frame that arrived outside `pump_in` (a backend with its own receive path).
    pub fn act_frame<S: Strategy>(
        &mut self,
        core: &mut Core<S>,
        frame: &[u8],
        to_host: &mut TxBatch,
        egress: &mut Egress,
    ) {
        let action = core.vm_frame(frame);
        act(core, action, to_host, egress, &mut self.own, &mut self.tx);
    }

    /// Judges one datagram from the host, however the backend received it: `from` its source
    /// (`None`: not IPv4, ignored), `truncated` if it did not fit, its payload at `payload` in
    /// `slot`, where the VM's frame is built in front of it and queued for the VM.
    pub fn host_datagram<S: Strategy>(
        &mut self,
        core: &mut Core<S>,
        from: Option<crate::Endpoint>,
        truncated: bool,
        slot: &mut [u8],
        payload: std::ops::Range<usize>,
    ) {
        let Some(from) = from else { return };
        if truncated {
            core.host_too_big();
            return;
        }
        if let Some(frame) = core.host_udp(from, slot, payload) {
            self.queue_frame(core, slot.get(frame).unwrap_or_default());
        }
    }

    /// Queues the frame for datagram `i` of `host_rx` (already translated in place).
    pub fn queue_frame<S: Strategy>(&mut self, core: &mut Core<S>, frame: &[u8]) {
        Self::queue(&mut self.tx, core, frame);
    }

    /// Receives up to a batch of ICMP messages from the host and queues their frames.
    pub fn pump_icmp<S: Strategy>(&mut self, core: &mut Core<S>, fd: RawFd, kind: IcmpKind) -> bool {
        let Self { tx, own, .. } = self;
        let at = HEADROOM - IcmpEchoHeader::LEN;
        let mut any = false;
        loop {
            let Some(slot) = own.take() else { return any };
            // Raw sockets deliver the IP header too: receive it in front, then line up.
            let raw = matches!(kind, IcmpKind::Raw { .. });
            let recv_at = if raw { at - Ipv4Header::LEN } else { at };
            let Some(space) = slot.get_mut(recv_at..) else { return any };
            let (n, from) = match icmp_recv(fd, space) {
                Ok(v) => v,
                Err(_) => {
                    own.untake();
                    return any;
                }
            };
            any = true;
            let mut len = n;
            if let IcmpKind::Raw { ident } = kind {
                let ihl = space.first().map_or(0, |b| usize::from(b & 0x0f) * 4);
                if ihl < Ipv4Header::LEN || ihl > n {
                    own.untake();
                    continue;
                }
                slot.copy_within(recv_at + ihl..recv_at + n, at);
                len = n - ihl;
                // A raw socket sees every echo reply on the host: only those to this VM's
                // identifier are its own (counted, not logged: host noise).
                if slot.get(at + 4..at + 6) != Some(&ident.to_be_bytes()[..]) {
                    core.counters.count_drop(DropReason::IcmpForeignReply);
                    own.untake();
                    continue;
                }
            }
            match core.host_icmp(from, slot, at..at + len) {
                Some(frame) => Self::queue(tx, core, slot.get(frame).unwrap_or_default()),
                None => own.untake(),
            }
        }
    }

    /// Time until a stalled handle is to be tried again (a timed retry, or the deadline after
    /// which its waiting frames are dropped); `None` when it is not stalled.
    pub fn retry_in(&self) -> Option<std::time::Duration> {
        self.stall.next_try.map(|t| t.saturating_duration_since(std::time::Instant::now()))
    }

    /// True when the handle's writability signals are not to be trusted (retries are timed).
    pub fn timed_retries(&self) -> bool {
        self.stall.timed
    }

    /// Frames counted as sent to the VM when queued that were dropped instead.
    fn uncount<S: Strategy>(core: &mut Core<S>, lost: usize, bytes: usize) {
        core.counters.queue_overflows += lost as u64;
        core.counters.to_vm_frames = core.counters.to_vm_frames.saturating_sub(lost as u64);
        core.counters.to_vm_bytes = core.counters.to_vm_bytes.saturating_sub(bytes as u64);
    }

    /// Writes queued frames to the VM. `Ok(true)`: all written (or, after [`STALL_MAX`],
    /// dropped); `Ok(false)`: the handle is full, wait for it to become writable (unless
    /// [`VmSide::timed_retries`]) or for [`VmSide::retry_in`].
    pub fn flush<S: Strategy>(&mut self, core: &mut Core<S>) -> Result<bool, End> {
        if self.stall.timed && self.retry_in().is_some_and(|d| !d.is_zero()) {
            return Ok(false);
        }
        let (done, progress) = self.write(core)?;
        if done {
            self.stall = Stall::default();
            return Ok(true);
        }
        // Only a refused write reads the clock.
        let now = std::time::Instant::now();
        core.counters.backpressure_waits += 1;
        if let Tx::Stream(t) = &mut self.tx {
            // A stream's writability is exact: no timed retries, only the deadline. What has
            // not started to go out by then is dropped; a frame partly out stays (the framing
            // must stay whole), and one new batch may be queued behind it.
            self.stall.draining = false;
            match self.stall.since {
                Some(since) if !progress && now.duration_since(since) >= STALL_MAX => {
                    let (lost, bytes) = t.drop_unstarted();
                    Self::uncount(core, lost, bytes);
                    self.own.reset();
                    self.stall = Stall { draining: !t.is_empty(), ..Stall::default() };
                    return Ok(true);
                }
                Some(_) if !progress => {}
                _ => self.stall = Stall { since: Some(now), next_try: Some(now + STALL_MAX), ..Stall::default() },
            }
            return Ok(false);
        }
        match self.stall.since {
            Some(since) if !progress => {
                if now.duration_since(since) >= STALL_MAX {
                    let Tx::Dgram { batch, .. } = &mut self.tx else { return Ok(false) };
                    // Counted as sent to the VM when queued: they were not.
                    let (lost, bytes) = batch.waiting_datagrams();
                    Self::uncount(core, lost, bytes);
                    batch.clear();
                    self.own.reset();
                    self.stall = Stall { timed: self.stall.timed, backoff: self.stall.backoff, ..Stall::default() };
                    return Ok(true);
                }
                self.stall.timed = true;
                self.stall.backoff = (self.stall.backoff * 2).clamp(std::time::Duration::from_millis(1), STALL_MAX);
                self.stall.next_try = Some((now + self.stall.backoff).min(since + STALL_MAX));
            }
            _ => self.stall = Stall { since: Some(now), next_try: Some(now + STALL_MAX), ..Stall::default() },
        }
        Ok(false)
    }

    /// Writes what is queued: (everything went, something went).
    fn write<S: Strategy>(&mut self, core: &mut Core<S>) -> Result<(bool, bool), End> {
        let mut progress = false;
        let done = match (&mut self.tx, &mut self.rx) {
            (Tx::Dgram { batch, .. }, Rx::Dgram { sock, .. }) => {
                let f = batch.flush(sock.as_raw_fd());
                progress = f.sent > 0;
                if let Some(e) = f.last_error {
                    if matches!(e, libc::ECONNREFUSED | libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN) {
                        return Err(End::HandleClosed(Closed::io(&io::Error::from_raw_os_error(e))));
                    }
                }
                core.send_error(false, f.errors, f.last_error);
                !f.blocked
            }
            (Tx::Stream(t), Rx::Stream { sock, .. }) => {
                let before = t.waiting();
                let done = t.flush(sock).map_err(|e| End::HandleClosed(Closed::io(&e)))?;
                progress = t.waiting() < before;
                done
            }
            _ => true,
        };
        if done {
            self.own.reset();
        }
        Ok((done, progress))
    }
}

/// The bytes of a socket address.
fn sockaddr_bytes(s: &libc::sockaddr_storage, len: libc::socklen_t) -> &[u8] {
    let n = (len as usize).min(size_of::<libc::sockaddr_storage>());
    // SAFETY: a sockaddr_storage is plain bytes, `n` of them at most, borrowed for as long as `s`.
    unsafe { std::slice::from_raw_parts((s as *const libc::sockaddr_storage).cast::<u8>(), n) }
}

/// See [`VmSide::accept_sender`]. The first accepted sender becomes the VM's address and the
/// socket is connected to it, after which the kernel refuses everyone else.
fn accept_sender<S: Strategy>(
    core: &mut Core<S>,
    fd: RawFd,
    sender: &mut Sender,
    tx: &mut Tx,
    name: &[u8],
    len: usize,
) -> bool {
    let Tx::Dgram { peer, .. } = tx else { return true };
    let named = name.len() > size_of::<libc::sa_family_t>() && name.len() <= size_of::<libc::sockaddr_storage>();
    let ok = match (*sender, peer.as_ref()) {
        (Sender::Connected, _) => return true,
        (Sender::Learning, _) => named,
        (Sender::Expect, Some((p, l))) => named && sockaddr_bytes(p, *l) == name,
        (Sender::Expect, None) => false,
    };
    if !ok {
        core.foreign_frame(len);
        return false;
    }
    if *sender == Sender::Learning {
        // SAFETY: all zeros is a valid sockaddr_storage.
        let mut s: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        // SAFETY: `name` fits in the storage (checked above) and both are plain bytes.
        unsafe { std::ptr::copy_nonoverlapping(name.as_ptr(), (&raw mut s).cast::<u8>(), name.len()) };
        // The box's address stays put: batches queued later point into it.
        **peer = Some((s, libc::socklen_t::try_from(name.len()).unwrap_or(0)));
        *sender = Sender::Expect;
    }
    if let Some((p, l)) = peer.as_ref() {
        if sys::connect(fd, p, *l).is_ok() {
            *sender = Sender::Connected;
        }
    }
    true
}

/// Carries out one action of the translation. A datagram is queued for the VM's one UDP
/// socket, naming its destination, which the translation has just found on the allowlist;
/// an echo goes out on the ICMP socket connected to its destination (`no_egress_socket` when
/// it has none; one whose peer is unreachable just now counts as a refused send).
fn act<S: Strategy>(
    core: &mut Core<S>,
    action: VmAction<'_>,
    to_host: &mut TxBatch,
    egress: &mut Egress,
    own: &mut OwnPool,
    tx: &mut Tx,
) {
    match action {
        VmAction::ForwardUdp { to, payload, .. } => {
            // SAFETY: `payload` lies in the VM receive slot being handled; the VM side is read
            // again only after `to_host` has been flushed or cleared.
            if !unsafe { to_host.push_to(payload, std::net::SocketAddrV4::from(to)) } {
                core.dropped_on_full_queue();
            }
        }
        VmAction::ForwardIcmpEcho { to, message } => match egress.icmp_fd(to) {
            Ok((fd, kind)) => {
                let sent = match kind {
                    IcmpKind::Ping => icmp_send(fd, message),
                    IcmpKind::Raw { ident } => icmp_send_as(fd, message, ident),
                };
                if let Err(e) = sent {
                    core.send_error(true, 1, e.raw_os_error());
                    egress.send_failed(e.raw_os_error(), fd);
                }
            }
            Err(true) => core.send_error(true, 1, Some(libc::ENETUNREACH)),
            Err(false) if egress.icmp_kind().is_none() => core.counters.count_drop(DropReason::IcmpUnavailable),
            Err(false) => core.counters.count_drop(DropReason::NoEgressSocket),
        },
        VmAction::ArpReply(reply) => match own.take() {
            Some(slot) => {
                let bytes = reply.as_bytes();
                if let Some(dst) = slot.get_mut(..bytes.len()) {
                    dst.copy_from_slice(bytes);
                    VmSide::queue(tx, core, dst);
                }
            }
            None => core.dropped_on_full_queue(),
        },
        // Built in the frame's own buffer (every buffer holds a full frame, far more than a
        // reply's 342 bytes).
        VmAction::DhcpReply(reply) => match own.take() {
            Some(slot) => {
                if let Some(n) = reply.emit(slot) {
                    if let Some(dst) = slot.get_mut(..n) {
                        VmSide::queue(tx, core, dst);
                    }
                }
            }
            None => core.dropped_on_full_queue(),
        },
        VmAction::Drop(_) | VmAction::Terminate(_) => {}
    }
}

/// Receives one batch of host datagrams and queues their frames for the VM.
pub fn pump_host<S: Strategy>(
    core: &mut Core<S>,
    host_fd: RawFd,
    host_rx: &mut RxBatch,
    vm: &mut VmSide,
) -> io::Result<usize> {
    let n = host_rx.recv(host_fd)?;
    for i in 0..n {
        let from = host_rx.source(i).and_then(|(name, _)| source_endpoint(name));
        let truncated = host_rx.datagram(i).1;
        let (slot, payload) = host_rx.slot_mut(i);
        vm.host_datagram(core, from, truncated, slot, payload);
    }
    Ok(n)
}

/// Accepts the VMM's connection on a listening stream handle; one from another uid than
/// `uid` (when given) is closed at once and counted (`foreign_sender`).
pub fn accept<S: Strategy>(core: &mut Core<S>, l: &UnixListener, uid: Option<u32>) -> io::Result<Option<UnixStream>> {
    match l.accept() {
        Ok((s, _)) => {
            if let Some(want) = uid {
                let got = sys::peer_cred(std::os::fd::AsFd::as_fd(&s)).map(|(_, u, _)| u);
                if got.as_ref().ok() != Some(&want) {
                    core.foreign_connection(got.ok());
                    return Ok(None);
                }
            }
            s.set_nonblocking(true)?;
            sys::grow_buffers(std::os::fd::AsFd::as_fd(&s), 4 << 20);
            Ok(Some(s))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}
