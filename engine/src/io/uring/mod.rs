//! The io_uring backend (Linux). Declared by `io/os.rs`, the engine's one choice by OS, since
//! no other OS has it; it is an I/O loop like `portable.rs` and lives beside it.
//!
//! Receiving: one multishot `RECVMSG` per datagram socket (the VM handle and the host UDP
//! socket), each drawing on its own pool of provided buffers. One request serves every
//! datagram, completions come in arrival order (so nothing is reordered), and the kernel
//! copies data in on our own thread with no system call per batch. The host pool's layout puts
//! each payload exactly `HEADROOM` bytes into its buffer, so frame headers are written in
//! front of it in place. A buffer goes back to the kernel only after the batch that refers to
//! it has been sent: an exhausted pool stops the kernel from reading the socket, which is the
//! backpressure that reaches the VMM.
//!
//! Sending: the same `sendmmsg` batches as the portable backend (one system call per batch,
//! UDP GSO where it pays). Waiting: multishot polls for the doorbell, the ICMP socket and
//! stream handles, one-shot polls for writability, and one `io_uring_enter` that submits and
//! waits, with a timeout so counters are published while idle.
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{cqueue, opcode, types};

mod ring;

pub(crate) use ring::probe;
use ring::{name_endpoint, parse, shutdown, sys_len, Done, Pool, Ring};

use crate::filter::Strategy;
use crate::io::batch::TxBatch;
use crate::io::host::{Egress, HostSockets};
use crate::io::vm::{accept, VmOpen, VmSide};
use crate::io::{Closed, End, LoopError, Resources, Source, Turn};
use crate::vmcore::{Core, BATCH};
use crate::wire::HEADROOM;

const VM_RECV: u64 = 1;
const HOST_RECV: u64 = 2;
const BELL_POLL: u64 = 3;
const VM_POLL_IN: u64 = 5;
const VM_POLL_OUT: u64 = 6;
const HOST_POLL_OUT: u64 = 7;
const PROVIDE: u64 = 8;
const CANCEL: u64 = 9;
const LISTEN_POLL: u64 = 10;
/// Polls on ICMP sockets: `ICMP_POLL + tag`.
const ICMP_POLL: u64 = 1 << 32;

const BGID_VM: u16 = 1;
const BGID_HOST: u16 = 2;

/// Buffers per pool: two batches, so the kernel can fill one while the loop sends the other.
const POOL: usize = 2 * BATCH;

/// Size of `struct io_uring_recvmsg_out`, which starts every multishot buffer.
const RECVMSG_OUT: usize = 16;
/// Name area reserved in host buffers: a sockaddr_in (16 bytes) fits, and the payload then
/// starts at `RECVMSG_OUT + HOST_NAME == HEADROOM`.
const HOST_NAME: usize = HEADROOM - RECVMSG_OUT;
/// Name area reserved in VM buffers while the sender of the VM's frames is checked (a
/// sockaddr_un).
const VM_NAME: usize = 112;

const _: () = assert!(HOST_NAME >= size_of::<libc::sockaddr_in>());
const _: () = assert!(VM_NAME >= size_of::<libc::sockaddr_un>());

/// What the ring's requests point into: the buffer pools and the msghdr templates. Owned by
/// `run` for the ring's whole life and freed only after every request has ended.
struct Owned {
    vm_pool: Pool,
    host_pool: Pool,
    vm_tmpl: Box<libc::msghdr>,
    host_tmpl: Box<libc::msghdr>,
}

/// The rest of a worker's resources, as the loop uses them.
struct Env<'a> {
    bell: &'a crate::io::Bell,
    slot: usize,
    max_frame: usize,
    busy_poll: bool,
    spin: std::time::Duration,
}

/// Runs the loop until the worker ends.
pub(crate) fn run<S: Strategy>(core: &mut Core<S>, res: Resources) -> End {
    let Resources { vm, host, bell, slot, max_frame, busy_poll, spin, .. } = res;
    let size = slot + VM_NAME + RECVMSG_OUT;
    // SAFETY: all zeros is a valid (empty) msghdr; only the name and control lengths matter.
    let zeroed = || Box::new(unsafe { std::mem::zeroed::<libc::msghdr>() });
    let mut owned = Owned {
        vm_pool: Pool::new(size, BGID_VM),
        host_pool: Pool::new(size, BGID_HOST),
        vm_tmpl: zeroed(),
        host_tmpl: zeroed(),
    };
    owned.host_tmpl.msg_namelen = sys_len(HOST_NAME);
    let ring = match ring::restricted(256) {
        Ok(r) => r,
        Err(e) => return End::Failed(LoopError::RingSetup(e.to_string())),
    };
    let mut ring = Ring { ring, inflight: 0 };
    let env = Env { bell: &bell, slot, max_frame, busy_poll, spin };
    let out = run_inner(core, &mut ring, &mut owned, vm, host, &env);
    if !shutdown(&mut ring) {
        // Requests the kernel still holds point into these: never free them.
        crate::error!("vm {}: io_uring requests did not end; keeping their buffers", core.name());
        std::mem::forget(owned);
        std::mem::forget(ring);
    }
    match out {
        Ok(end) | Err(end) => end,
    }
}

/// The io_uring receive source: completed multishot receives waiting to be handled, the
/// buffers the outgoing batches still point into, and what has to be armed again.
struct Rings<'a> {
    ring: &'a mut Ring,
    vm_pool: &'a mut Pool,
    host_pool: &'a mut Pool,
    vm_tmpl: &'a libc::msghdr,
    host_tmpl: &'a libc::msghdr,
    vm_q: VecDeque<Done>,
    host_q: VecDeque<Done>,
    /// Buffers the current outgoing batches refer to; returned to the kernel once sent.
    held_vm: Vec<u16>,
    held_host: Vec<u16>,
    /// A datagram handle (multishot receives) rather than a stream (polled, read with recv).
    dgram: bool,
    /// The stream handle may have bytes.
    stream_r: bool,
    /// The VM's UDP socket, and whether its multishot receive is armed.
    host_fd: RawFd,
    host_armed: bool,
}

impl Rings<'_> {
    /// Starts polling the ICMP sockets that joined the set, and cancels the polls of those
    /// that left.
    fn follow(&mut self, egress: &mut Egress) -> io::Result<()> {
        use crate::io::host::Change;
        for c in egress.take_changes() {
            match c {
                Change::Added { fd, tag } => self.ring.push(&multi_poll(fd, ICMP_POLL + u64::from(tag)))?,
                Change::Removed { tag } => {
                    self.ring.push(&opcode::AsyncCancel::new(ICMP_POLL + u64::from(tag)).build().user_data(CANCEL))?;
                }
            }
        }
        Ok(())
    }
}

fn recv_host(fd: RawFd, t: &libc::msghdr) -> io_uring::squeue::Entry {
    opcode::RecvMsgMulti::new(types::Fd(fd), t, BGID_HOST).build().user_data(HOST_RECV)
}

fn multi_poll(fd: RawFd, tag: u64) -> io_uring::squeue::Entry {
    opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).multi(true).build().user_data(tag)
}

fn ring_err(e: io::Error) -> End {
    End::Failed(LoopError::Ring(e.to_string()))
}

impl Source for Rings<'_> {
    fn vm_batch<S: Strategy>(
        &mut self,
        core: &mut Core<S>,
        side: &mut VmSide,
        to_host: &mut TxBatch,
        egress: &mut Egress,
    ) -> Result<bool, End> {
        if self.dgram && !self.vm_q.is_empty() {
            for _ in 0..BATCH {
                let Some(d) = self.vm_q.pop_front() else { break };
                let buf = self.vm_pool.buf_mut(d.bid, d.len);
                self.held_vm.push(d.bid);
                let Some((namelen, payload, truncated)) = parse(buf, self.vm_tmpl) else { continue };
                let name = buf.get(RECVMSG_OUT..RECVMSG_OUT + namelen).unwrap_or_default();
                if side.checks_sender() && !side.accept_sender(core, name, payload.len()) {
                    continue;
                }
                if truncated {
                    core.vm_frame_oversized(payload.len());
                    continue;
                }
                side.act_frame(core, buf.get(payload).unwrap_or_default(), to_host, egress);
            }
            return Ok(true);
        }
        if self.stream_r {
            self.stream_r = side.pump_in(core, to_host, egress)?;
            return Ok(self.stream_r);
        }
        Ok(false)
    }

    fn host_batch<S: Strategy>(&mut self, core: &mut Core<S>, side: &mut VmSide) -> Result<bool, End> {
        if self.host_q.is_empty() {
            return Ok(false);
        }
        for _ in 0..BATCH {
            let Some(d) = self.host_q.pop_front() else { break };
            self.held_host.push(d.bid);
            let buf = self.host_pool.buf_mut(d.bid, d.len);
            let Some((namelen, payload, truncated)) = parse(buf, self.host_tmpl) else { continue };
            let from = name_endpoint(buf.get(RECVMSG_OUT..RECVMSG_OUT + namelen).unwrap_or_default());
            side.host_datagram(core, from, truncated, buf, payload);
        }
        Ok(true)
    }

    fn host_batch_sent(&mut self) -> Result<(), End> {
        for bid in self.held_vm.drain(..) {
            self.ring.push(&self.vm_pool.provide(bid, 1)).map_err(ring_err)?;
        }
        Ok(())
    }

    fn vm_queue_sent(&mut self) -> Result<(), End> {
        for bid in self.held_host.drain(..) {
            self.ring.push(&self.host_pool.provide(bid, 1)).map_err(ring_err)?;
        }
        Ok(())
    }
}

fn run_inner<S: Strategy>(
    core: &mut Core<S>,
    ring: &mut Ring,
    owned: &mut Owned,
    vm: VmOpen,
    host: HostSockets,
    env: &Env<'_>,
) -> Result<End, End> {
    let Owned { vm_pool, host_pool, vm_tmpl, host_tmpl } = owned;
    let Env { bell, slot, max_frame, busy_poll, spin } = *env;
    let mut spinning = crate::io::Spin::new(spin);
    let fail = ring_err;
    let bell_fd = bell.0.as_raw_fd();
    ring.push(&opcode::PollAdd::new(types::Fd(bell_fd), libc::POLLIN as u32).multi(true).build().user_data(BELL_POLL))
        .map_err(fail)?;
    let vm = wait_for_connection(core, ring, bell, vm)?;
    let mut side = VmSide::new(vm, slot, max_frame, BATCH)?;
    let vm_fd = side.fd();
    let host_fd = host.udp.as_raw_fd();
    let gso = host.gso;
    let mut turn = Turn::new(host);
    let dgram = side.is_dgram();
    let vm_name = if side.checks_sender() { VM_NAME } else { 0 };
    vm_tmpl.msg_namelen = sys_len(vm_name);

    // Hand the pools to the kernel and start the receives.
    let count = u16::try_from(POOL).unwrap_or(u16::MAX);
    if dgram {
        ring.push(&vm_pool.provide(0, count)).map_err(fail)?;
    }
    ring.push(&host_pool.provide(0, count)).map_err(fail)?;
    let recv_vm = |t: &libc::msghdr| opcode::RecvMsgMulti::new(types::Fd(vm_fd), t, BGID_VM).build().user_data(VM_RECV);
    if dgram {
        ring.push(&recv_vm(vm_tmpl)).map_err(fail)?;
    } else {
        ring.push(
            &opcode::PollAdd::new(types::Fd(vm_fd), libc::POLLIN as u32).multi(true).build().user_data(VM_POLL_IN),
        )
        .map_err(fail)?;
    }
    ring.push(&recv_host(host_fd, host_tmpl)).map_err(fail)?;

    let mut src = Rings {
        ring,
        vm_pool,
        host_pool,
        vm_tmpl,
        host_tmpl,
        vm_q: VecDeque::with_capacity(POOL + 1),
        host_q: VecDeque::with_capacity(POOL + 1),
        held_vm: Vec::with_capacity(POOL),
        held_host: Vec::with_capacity(POOL),
        dgram,
        stream_r: !dgram,
        host_fd,
        host_armed: true,
    };
    let mut to_host = TxBatch::new(BATCH, gso);
    let mut vm_armed = dgram;
    crate::io::confine(core, sys::WorkerKind::Uring, &turn.host);
    let (mut vm_out_polled, mut host_out_polled) = (false, false);
    // A 256-entry ring has at most 512 completions queued.
    let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(1024);

    loop {
        if core.between_batches() {
            return Ok(End::Stopped);
        }
        let progress = turn.run(core, &mut src, &mut side, &mut to_host)?;
        if turn.host.egress.changed() {
            src.follow(&mut turn.host.egress).map_err(fail)?;
        }
        if progress {
            spinning.progress();
        }

        // Re-arm what has ended, ask for writability where blocked.
        if !vm_armed && dgram && src.held_vm.is_empty() && src.vm_q.is_empty() {
            src.ring.push(&recv_vm(src.vm_tmpl)).map_err(fail)?;
            vm_armed = true;
        }
        if !src.host_armed && src.held_host.is_empty() && src.host_q.is_empty() {
            src.ring.push(&recv_host(src.host_fd, src.host_tmpl)).map_err(fail)?;
            src.host_armed = true;
        }
        if !turn.host_w && !host_out_polled {
            src.ring
                .push(
                    &opcode::PollAdd::new(types::Fd(src.host_fd), libc::POLLOUT as u32)
                        .build()
                        .user_data(HOST_POLL_OUT),
                )
                .map_err(fail)?;
            host_out_polled = true;
        }
        // A stalled VM handle is also retried (or its frames dropped) on a timer; with timed
        // retries its writability is not asked for.
        let retry = side.retry_in();
        if !turn.vm_w && !vm_out_polled && !side.timed_retries() {
            src.ring
                .push(&opcode::PollAdd::new(types::Fd(vm_fd), libc::POLLOUT as u32).build().user_data(VM_POLL_OUT))
                .map_err(fail)?;
            vm_out_polled = true;
        }

        // Submit, and wait only when there is nothing to do.
        let work_left = (!src.vm_q.is_empty() && to_host.is_empty() && side.tx_accepts())
            || (!src.host_q.is_empty() && side.tx_accepts())
            || (src.stream_r && to_host.is_empty() && side.tx_accepts());
        // Busy polling: submit and reap without ever waiting in the kernel; adaptive polling:
        // the same for a while after traffic.
        let want = usize::from(!(progress || work_left || busy_poll || spinning.on()));
        let wait = retry.map_or(crate::io::vm::STALL_MAX, |r| r.min(crate::io::vm::STALL_MAX));
        let ts = types::Timespec::new().nsec(u32::try_from(wait.as_nanos()).unwrap_or(100_000_000));
        let args = types::SubmitArgs::new().timespec(&ts);
        match src.ring.ring.submitter().submit_with_args(want, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)) => {}
            Err(e) => return Err(fail(e)),
        }
        // Copied out first (into capacity reserved up front: no allocation) so the handlers
        // below may queue new requests.
        cqes.clear();
        cqes.extend(src.ring.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
        src.ring.ended(cqes.iter().map(|c| c.2));
        for &(user_data, res, flags) in &cqes {
            let more = cqueue::more(flags);
            match user_data {
                VM_RECV | HOST_RECV => {
                    let is_vm = user_data == VM_RECV;
                    if let (true, Some(bid)) = (res >= 0, cqueue::buffer_select(flags)) {
                        let d = Done { bid, len: usize::try_from(res).unwrap_or(0) };
                        if is_vm {
                            src.vm_q.push_back(d);
                        } else {
                            src.host_q.push_back(d);
                        }
                    } else if res < 0 && res != -libc::ENOBUFS && res != -libc::ECANCELED {
                        let e = io::Error::from_raw_os_error(-res);
                        if is_vm {
                            return Err(End::HandleClosed(Closed::Error(e.to_string())));
                        }
                        // A UDP socket reports an earlier ICMP error once; receiving goes on.
                        core.send_error(true, 1, Some(-res));
                    }
                    if !more {
                        if is_vm {
                            vm_armed = false;
                        } else {
                            src.host_armed = false;
                        }
                    }
                }
                BELL_POLL => {
                    bell.0.drain();
                    if !more {
                        src.ring.push(&multi_poll(bell_fd, BELL_POLL)).map_err(fail)?;
                    }
                }
                t if t >= ICMP_POLL => {
                    turn.icmp_r = true;
                    if !more && res != -libc::ECANCELED {
                        let tag = t - ICMP_POLL;
                        // Armed again while the socket is still in the set.
                        if let Some(fd) = turn.host.egress.icmp_fd_by_tag(tag) {
                            src.ring.push(&multi_poll(fd, t)).map_err(fail)?;
                        }
                    }
                }
                VM_POLL_IN => {
                    src.stream_r = true;
                    if !more {
                        src.ring.push(&multi_poll(vm_fd, VM_POLL_IN)).map_err(fail)?;
                    }
                }
                VM_POLL_OUT => {
                    turn.vm_w = true;
                    vm_out_polled = false;
                }
                HOST_POLL_OUT => {
                    turn.host_w = true;
                    host_out_polled = false;
                }
                PROVIDE if res < 0 => {
                    return Err(End::Failed(LoopError::ProvideBuffers(io::Error::from_raw_os_error(-res).to_string())))
                }
                _ => {}
            }
        }
        turn.after_wait(&side);
    }
}

/// Waits for the VMM to connect to a listening stream handle.
fn wait_for_connection<S: Strategy>(
    core: &mut Core<S>,
    ring: &mut Ring,
    bell: &crate::io::Bell,
    open: VmOpen,
) -> Result<VmOpen, End> {
    let VmOpen::Listen { listener, uid } = open else { return Ok(open) };
    let fd: RawFd = listener.as_raw_fd();
    // One multishot poll on the listener for the whole wait (armed again only if it ends).
    let mut polling = false;
    loop {
        if core.between_batches() {
            return Err(End::Stopped);
        }
        match accept(core, &listener, uid) {
            Ok(Some(s)) => {
                crate::info!("vm {}: VMM connected to the stream handle", core.name());
                // The poll holds the listening socket open: end it, so that closing the
                // listener refuses every later connection.
                if polling && !end_listen_poll(ring, bell) {
                    crate::warn!("vm {}: the stream handle's poll did not end; it may queue connections", core.name());
                }
                return Ok(VmOpen::Stream(s));
            }
            Ok(None) => {}
            Err(e) => return Err(End::Failed(LoopError::Accept(e.to_string()))),
        }
        if !polling {
            ring.push(
                &opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).multi(true).build().user_data(LISTEN_POLL),
            )
            .map_err(|e| End::Failed(LoopError::Ring(e.to_string())))?;
            polling = true;
        }
        let ts = types::Timespec::new().nsec(100_000_000);
        let args = types::SubmitArgs::new().timespec(&ts);
        let _ = ring.ring.submitter().submit_with_args(1, &args);
        let done: Vec<(u64, u32)> = ring.ring.completion().map(|c| (c.user_data(), c.flags())).collect();
        ring.ended(done.iter().map(|d| d.1));
        for (user_data, flags) in done {
            match user_data {
                BELL_POLL => bell.0.drain(),
                // One multishot poll serves the whole wait; armed again only if it ended.
                LISTEN_POLL if !cqueue::more(flags) => polling = false,
                _ => {}
            }
        }
    }
}

/// Cancels the listener's multishot poll and waits (up to 2 s) for its last completion.
fn end_listen_poll(ring: &mut Ring, bell: &crate::io::Bell) -> bool {
    if ring.push(&opcode::AsyncCancel::new(LISTEN_POLL).build().user_data(CANCEL)).is_err() {
        return false;
    }
    for _ in 0..200 {
        let ts = types::Timespec::new().nsec(10_000_000);
        let args = types::SubmitArgs::new().timespec(&ts);
        let _ = ring.ring.submitter().submit_with_args(1, &args);
        let done: Vec<(u64, u32)> = ring.ring.completion().map(|c| (c.user_data(), c.flags())).collect();
        ring.ended(done.iter().map(|d| d.1));
        let mut ended = false;
        for (user_data, flags) in done {
            match user_data {
                BELL_POLL => bell.0.drain(),
                LISTEN_POLL if !cqueue::more(flags) => ended = true,
                _ => {}
            }
        }
        if ended {
            return true;
        }
    }
    false
}
