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
use super::vm::{accept, pump_host, VmOpen, VmSide};
use super::{flush_host, flush_vm, End, LoopError, Resources};
use crate::filter::Strategy;
use crate::vmcore::{Core, BATCH, PUBLISH_EVERY};
use crate::wire::HEADROOM;

const VM: Token = Token(0);
const HOST: Token = Token(1);
const ICMP: Token = Token(2);
const BELL: Token = Token(3);
const LISTEN: Token = Token(4);

fn register(poll: &Poll, fd: RawFd, token: Token, interest: Interest) -> io::Result<()> {
    poll.registry().register(&mut SourceFd(&fd), token, interest)
}

/// Waits for the VMM to connect to a listening stream handle (commands still apply).
fn wait_for_connection<S: Strategy>(core: &mut Core<S>, poll: &mut Poll, open: VmOpen) -> Result<VmOpen, End> {
    let VmOpen::Listen(listener) = open else { return Ok(open) };
    let fd = listener.as_raw_fd();
    register(poll, fd, LISTEN, Interest::READABLE).map_err(|e| End::Failed(LoopError::Poll(e.to_string())))?;
    let mut events = Events::with_capacity(4);
    loop {
        if core.between_batches() {
            return Err(End::Stopped);
        }
        match accept(&listener) {
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

fn run_inner<S: Strategy>(core: &mut Core<S>, res: Resources) -> Result<End, End> {
    let fail = |e: io::Error| End::Failed(LoopError::Poll(e.to_string()));
    let Resources { vm, host, bell, slot, max_frame, busy_poll, _paths } = res;
    // Busy polling: ask for readiness without ever sleeping.
    let wait = if busy_poll { Duration::ZERO } else { PUBLISH_EVERY.min(Duration::from_millis(100)) };
    let mut poll = Poll::new().map_err(fail)?;
    register(&poll, bell.0.as_raw_fd(), BELL, Interest::READABLE).map_err(fail)?;
    let vm = wait_for_connection(core, &mut poll, vm)?;
    let mut side = VmSide::new(vm, slot, max_frame, BATCH)?;
    let host_fd = host.udp.as_raw_fd();
    let icmp = host.icmp.as_ref().map(|(fd, kind)| (fd.as_raw_fd(), *kind));
    register(&poll, side.fd(), VM, Interest::READABLE | Interest::WRITABLE).map_err(fail)?;
    register(&poll, host_fd, HOST, Interest::READABLE | Interest::WRITABLE).map_err(fail)?;
    if let Some((fd, _)) = icmp {
        register(&poll, fd, ICMP, Interest::READABLE).map_err(fail)?;
    }
    let mut host_rx = RxBatch::new(BATCH, slot, HEADROOM);
    let mut to_host = TxBatch::new(BATCH, host.gso);
    let mut events = Events::with_capacity(16);
    // Readiness as last seen; cleared only by a WouldBlock (edge-triggered events).
    let (mut vm_r, mut vm_w, mut host_r, mut host_w, mut icmp_r) = (true, true, true, true, icmp.is_some());

    loop {
        if core.between_batches() {
            return Ok(End::Stopped);
        }
        let mut progress = false;

        if !to_host.is_empty() && host_w {
            host_w = flush_host(core, &mut to_host, host_fd);
            progress = true;
        }
        if !side.tx_is_empty() && vm_w {
            vm_w = flush_vm(core, &mut side)?;
            progress = true;
        }
        // VM to host: read only when everything this side produced before has gone out.
        if vm_r && to_host.is_empty() && side.tx_accepts() {
            if side.pump_in(core, &mut to_host, icmp)? {
                progress = true;
                if !to_host.is_empty() {
                    host_w = flush_host(core, &mut to_host, host_fd);
                }
                if !side.tx_is_empty() {
                    vm_w = flush_vm(core, &mut side)?;
                }
            } else {
                vm_r = false;
            }
        }
        // Host to VM.
        if host_r && side.tx_accepts() {
            match pump_host(core, host_fd, &mut host_rx, &mut side) {
                Ok(n) if n > 0 => {
                    progress = true;
                    vm_w = flush_vm(core, &mut side)?;
                }
                Ok(_) => host_r = false,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => host_r = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // A UDP socket reports an earlier ICMP error (refused port...) once.
                    core.send_error(true, 1, e.raw_os_error());
                }
            }
        }
        if let (true, Some((fd, kind))) = (icmp_r && side.tx_accepts(), icmp) {
            if side.pump_icmp(core, fd, kind) {
                progress = true;
                vm_w = flush_vm(core, &mut side)?;
            } else {
                icmp_r = false;
            }
        }
        core.batch_done(to_host.is_empty(), side.tx_is_empty());
        if progress {
            continue;
        }
        // A stalled VM handle is also retried (or its frames dropped) on a timer.
        let retry = side.retry_in();
        if let Err(e) = poll.poll(&mut events, Some(retry.map_or(wait, |r| r.min(wait)))) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(fail(e));
            }
        }
        for ev in events.iter() {
            match ev.token() {
                VM => {
                    vm_r |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
                    vm_w |= ev.is_writable() || ev.is_write_closed() || ev.is_error();
                }
                HOST => {
                    host_r |= ev.is_readable() || ev.is_error();
                    host_w |= ev.is_writable() || ev.is_error();
                }
                ICMP => icmp_r = true,
                BELL => bell.0.drain(),
                _ => {}
            }
        }
        match side.retry_in() {
            Some(r) if r.is_zero() => vm_w = true,
            Some(_) if side.timed_retries() => vm_w = false,
            _ => {}
        }
    }
}
