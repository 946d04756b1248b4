//! The portable backend: mio readiness (epoll on Linux, kqueue on macOS) with batched
//! `recvmmsg`/`sendmmsg` where the OS has them.
//!
//! mio is edge-triggered: a source stays "ready" in our flags until an operation on it
//! returns `WouldBlock`, and only then does the loop wait for its next event.
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use super::batch::{RxBatch, TxBatch};
use super::host::{Change, Egress};
use super::vm::{accept, pump_host, VmOpen, VmSide};
use super::{End, LoopError, Resources, Source, Turn};
use crate::filter::Strategy;
use crate::vmcore::{Core, BATCH, PUBLISH_EVERY};
use crate::wire::HEADROOM;

const VM: Token = Token(0);
const HOST: Token = Token(1);
const BELL: Token = Token(3);
const LISTEN: Token = Token(4);
/// ICMP sockets: `ICMP_BASE + tag`.
const ICMP_BASE: usize = 16;

fn register(poll: &Poll, fd: RawFd, token: Token, interest: Interest) -> io::Result<()> {
    poll.registry().register(&mut SourceFd(&fd), token, interest)
}

/// Waits for the VMM to connect to a listening stream handle (commands still apply).
fn wait_for_connection<S: Strategy>(core: &mut Core<S>, poll: &mut Poll, open: VmOpen) -> Result<VmOpen, End> {
    let VmOpen::Listen { listener, uid } = open else { return Ok(open) };
    let fd = listener.as_raw_fd();
    register(poll, fd, LISTEN, Interest::READABLE).map_err(|e| End::Failed(LoopError::Poll(e.to_string())))?;
    let mut events = Events::with_capacity(4);
    loop {
        if core.between_batches() {
            return Err(End::Stopped);
        }
        match accept(core, &listener, uid) {
            Ok(Some(s)) => {
                let _ = poll.registry().deregister(&mut SourceFd(&fd));
                crate::info!("vm {}: VMM connected to the stream handle", core.name());
                return Ok(VmOpen::Stream(s));
            }
            Ok(None) => {}
            Err(e) => return Err(End::Failed(LoopError::Accept(e.to_string()))),
        }
        if let Err(e) = poll.poll(&mut events, Some(PUBLISH_EVERY)) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(End::Failed(LoopError::Poll(e.to_string())));
            }
        }
    }
}

/// Runs the loop until the worker ends.
pub(crate) fn run<S: Strategy>(core: &mut Core<S>, res: Resources) -> End {
    match run_inner(core, res) {
        Ok(end) | Err(end) => end,
    }
}

/// The portable receive source: edge-triggered readiness as last seen, and recvmmsg.
struct Readiness {
    /// The VM handle may have frames.
    vm_r: bool,
    /// The VM's UDP socket may have datagrams.
    host_r: bool,
    host_fd: RawFd,
    host_rx: RxBatch,
}

/// Watches the ICMP sockets that joined the set; those that left are closed already, which
/// ends their registration.
fn follow(poll: &Poll, egress: &mut Egress) -> io::Result<()> {
    for c in egress.take_changes() {
        if let Change::Added { fd, tag } = c {
            register(poll, fd, Token(ICMP_BASE + tag as usize), Interest::READABLE)?;
        }
    }
    Ok(())
}

impl Source for Readiness {
    fn vm_batch<S: Strategy>(
        &mut self,
        core: &mut Core<S>,
        side: &mut VmSide,
        to_host: &mut TxBatch,
        egress: &mut Egress,
    ) -> Result<bool, End> {
        if !self.vm_r {
            return Ok(false);
        }
        let got = side.pump_in(core, to_host, egress)?;
        self.vm_r = got;
        Ok(got)
    }

    fn host_batch<S: Strategy>(&mut self, core: &mut Core<S>, side: &mut VmSide) -> Result<bool, End> {
        if !self.host_r {
            return Ok(false);
        }
        match pump_host(core, self.host_fd, &mut self.host_rx, side) {
            Ok(got) if got > 0 => return Ok(true),
            Ok(_) => self.host_r = false,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.host_r = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A UDP socket reports an earlier ICMP error (refused port...) once.
            Err(e) => core.send_error(true, 1, e.raw_os_error()),
        }
        Ok(false)
    }

    // recvmmsg copies into the loop's own slots: nothing to give back.
    fn host_batch_sent(&mut self) -> Result<(), End> {
        Ok(())
    }

    fn vm_queue_sent(&mut self) -> Result<(), End> {
        Ok(())
    }
}

fn run_inner<S: Strategy>(core: &mut Core<S>, res: Resources) -> Result<End, End> {
    let fail = |e: io::Error| End::Failed(LoopError::Poll(e.to_string()));
    let Resources { vm, host, bell, slot, max_frame, busy_poll, spin, .. } = res;
    // Busy polling: ask for readiness without ever sleeping.
    let wait = if busy_poll { Duration::ZERO } else { PUBLISH_EVERY.min(Duration::from_millis(100)) };
    let mut poll = Poll::new().map_err(fail)?;
    register(&poll, bell.0.as_raw_fd(), BELL, Interest::READABLE).map_err(fail)?;
    let vm = wait_for_connection(core, &mut poll, vm)?;
    let mut side = VmSide::new(vm, slot, max_frame, BATCH)?;
    let host_fd = host.udp.as_raw_fd();
    let gso = host.gso;
    let mut turn = Turn::new(host);
    register(&poll, side.fd(), VM, Interest::READABLE | Interest::WRITABLE).map_err(fail)?;
    register(&poll, host_fd, HOST, Interest::READABLE | Interest::WRITABLE).map_err(fail)?;
    // Readiness as last seen; cleared only by a WouldBlock (edge-triggered events).
    let mut src = Readiness { vm_r: true, host_r: true, host_fd, host_rx: RxBatch::new(BATCH, slot, HEADROOM) };
    let mut to_host = TxBatch::new(BATCH, gso);
    let mut events = Events::with_capacity(16);
    super::confine(core, sys::WorkerKind::Portable, &turn.host);
    let mut spinning = super::Spin::new(spin);

    loop {
        if core.between_batches() {
            return Ok(End::Stopped);
        }
        let progress = turn.run(core, &mut src, &mut side, &mut to_host)?;
        if turn.host.egress.changed() {
            follow(&poll, &mut turn.host.egress).map_err(fail)?;
        }
        if progress {
            spinning.progress();
            continue;
        }
        // A stalled VM handle is also retried (or its frames dropped) on a timer; right
        // after traffic, readiness is asked for without sleeping (adaptive polling).
        let retry = side.retry_in();
        let wait = if spinning.on() { Duration::ZERO } else { wait };
        if let Err(e) = poll.poll(&mut events, Some(retry.map_or(wait, |r| r.min(wait)))) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(fail(e));
            }
        }
        for ev in events.iter() {
            match ev.token() {
                VM => {
                    src.vm_r |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
                    turn.vm_w |= ev.is_writable() || ev.is_write_closed() || ev.is_error();
                }
                HOST => {
                    src.host_r |= ev.is_readable() || ev.is_error();
                    turn.host_w |= ev.is_writable() || ev.is_error();
                }
                BELL => bell.0.drain(),
                Token(t) if t >= ICMP_BASE => turn.icmp_r = true,
                _ => {}
            }
        }
        turn.after_wait(&side);
    }
}
