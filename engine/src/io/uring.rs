//! The io_uring backend (Linux).
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

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

use super::batch::TxBatch;
use super::host::source_endpoint;
use super::vm::{accept, VmOpen, VmSide};
use super::{Closed, End, LoopError, Resources};
use crate::filter::Strategy;
use crate::vmcore::{Core, BATCH};
use crate::wire::HEADROOM;

const VM_RECV: u64 = 1;
const HOST_RECV: u64 = 2;
const BELL_POLL: u64 = 3;
const ICMP_POLL: u64 = 4;
const VM_POLL_IN: u64 = 5;
const VM_POLL_OUT: u64 = 6;
const HOST_POLL_OUT: u64 = 7;
const PROVIDE: u64 = 8;
const CANCEL: u64 = 9;
const LISTEN_POLL: u64 = 10;

const BGID_VM: u16 = 1;
const BGID_HOST: u16 = 2;

/// Buffers per pool: two batches, so the kernel can fill one while the loop sends the other.
const POOL: usize = 2 * BATCH;

/// Size of `struct io_uring_recvmsg_out`, which starts every multishot buffer.
const RECVMSG_OUT: usize = 16;
/// Name area reserved in host buffers: a sockaddr_in (16 bytes) fits, and the payload then
/// starts at `RECVMSG_OUT + HOST_NAME == HEADROOM`.
const HOST_NAME: usize = HEADROOM - RECVMSG_OUT;
/// Name area reserved in VM buffers when the VMM's address is learnt (a sockaddr_un).
const VM_NAME: usize = 112;

const _: () = assert!(HOST_NAME >= size_of::<libc::sockaddr_in>());
const _: () = assert!(VM_NAME >= size_of::<libc::sockaddr_un>());

/// Checks that this kernel has what the loop needs.
pub(crate) fn probe() -> Result<(), String> {
    let ring = IoUring::new(8).map_err(|e| format!("io_uring_setup: {e}"))?;
    let mut p = Probe::new();
    ring.submitter().register_probe(&mut p).map_err(|e| format!("probing opcodes: {e}"))?;
    for (code, name) in [
        (opcode::RecvMsg::CODE, "RECVMSG"),
        (opcode::ProvideBuffers::CODE, "PROVIDE_BUFFERS"),
        (opcode::PollAdd::CODE, "POLL_ADD"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    ] {
        if !p.is_supported(code) {
            return Err(format!("the kernel lacks IORING_OP_{name}"));
        }
    }
    // Multishot RECVMSG cannot be probed by opcode; it arrived in Linux 6.0.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (6, 0) {
        return Err(format!("multishot RECVMSG needs Linux 6.0, this is {}", release.trim()));
    }
    Ok(())
}

/// A pool of provided buffers.
struct Pool {
    mem: Box<[u8]>,
    size: usize,
    bgid: u16,
}

impl Pool {
    fn new(size: usize, bgid: u16) -> Self {
        Self { mem: vec![0u8; POOL * size].into_boxed_slice(), size, bgid }
    }

    fn provide(&mut self, bid: u16, count: u16) -> squeue::Entry {
        let addr = self.mem.as_mut_ptr().wrapping_add(usize::from(bid) * self.size);
        let len = i32::try_from(self.size).unwrap_or(i32::MAX);
        opcode::ProvideBuffers::new(addr, len, count, self.bgid, bid).build().user_data(PROVIDE)
    }

    fn buf_mut(&mut self, bid: u16, len: usize) -> &mut [u8] {
        let start = usize::from(bid) * self.size;
        self.mem.get_mut(start..start + len.min(self.size)).unwrap_or_default()
    }
}

/// A completion of a multishot receive: buffer id and bytes used.
#[derive(Clone, Copy)]
struct Done {
    bid: u16,
    len: usize,
}

/// The parts of a received buffer, as offsets: the name's length, the payload, and whether
/// it was truncated. io-uring's `RecvMsgOut` reads the header; `tmpl` is the msghdr the
/// receive was armed with (its name and control lengths fix where the payload starts).
fn parse(buf: &[u8], tmpl: &libc::msghdr) -> Option<(usize, std::ops::Range<usize>, bool)> {
    let out = types::RecvMsgOut::parse(buf, tmpl).ok()?;
    let start = RECVMSG_OUT + usize::try_from(tmpl.msg_namelen).ok()? + tmpl.msg_controllen;
    Some((out.name_data().len(), start..start + out.payload_data().len(), out.is_payload_truncated()))
}

struct Ring {
    ring: IoUring,
    /// Requests pushed whose last completion has not been reaped yet.
    inflight: usize,
}

impl Ring {
    /// Queues an SQE, submitting first if the queue is full.
    fn push(&mut self, e: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every entry we push refers to memory (the buffer pools and msghdr
            // templates `run` owns) that is freed only once `inflight` is back to zero
            // (`shutdown`), or never (leaked, when the requests could not be drained).
            if unsafe { self.ring.submission().push(e) }.is_ok() {
                self.inflight += 1;
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    /// Counts the reaped completions that end their request (those without `MORE`).
    fn ended(&mut self, flags: impl Iterator<Item = u32>) {
        let n = flags.filter(|f| !cqueue::more(*f)).count();
        self.inflight = self.inflight.saturating_sub(n);
    }
}

/// Runs the loop until the worker ends.
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
    host: &'a super::host::HostSockets,
    bell: &'a super::Bell,
    slot: usize,
    max_frame: usize,
    busy_poll: bool,
}

/// Runs the loop until the worker ends.
pub(crate) fn run<S: Strategy>(core: &mut Core<S>, res: Resources) -> End {
    let Resources { vm, host, bell, slot, max_frame, busy_poll, _paths } = res;
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
    let ring = match IoUring::new(256) {
        Ok(r) => r,
        Err(e) => return End::Failed(LoopError::RingSetup(e.to_string())),
    };
    let mut ring = Ring { ring, inflight: 0 };
    let env = Env { host: &host, bell: &bell, slot, max_frame, busy_poll };
    let out = run_inner(core, &mut ring, &mut owned, vm, &env);
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

fn sys_len(n: usize) -> libc::socklen_t {
    libc::socklen_t::try_from(n).unwrap_or(0)
}

/// Cancels every request and waits (up to 2 s) until each has delivered its last completion,
/// so that no kernel write can reach memory we free. Returns false if some did not.
fn shutdown(ring: &mut Ring) -> bool {
    let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any()).build().user_data(CANCEL);
    if ring.push(&cancel).is_err() {
        return false;
    }
    // Requests end with -ECANCELED (or their own result, if they were finishing anyway).
    for _ in 0..200 {
        let ts = types::Timespec::new().nsec(10_000_000);
        let args = types::SubmitArgs::new().timespec(&ts);
        let _ = ring.ring.submitter().submit_with_args(1, &args);
        let flags: Vec<u32> = ring.ring.completion().map(|c| c.flags()).collect();
        ring.ended(flags.into_iter());
        if ring.inflight == 0 {
            return true;
        }
    }
    false
}

fn run_inner<S: Strategy>(
    core: &mut Core<S>,
    ring: &mut Ring,
    owned: &mut Owned,
    vm: VmOpen,
    env: &Env<'_>,
) -> Result<End, End> {
    let Owned { vm_pool, host_pool, vm_tmpl, host_tmpl } = owned;
    let Env { host, bell, slot, max_frame, busy_poll } = *env;
    let fail = |e: io::Error| End::Failed(LoopError::Ring(e.to_string()));
    let bell_fd = bell.0.as_raw_fd();
    ring.push(&opcode::PollAdd::new(types::Fd(bell_fd), libc::POLLIN as u32).multi(true).build().user_data(BELL_POLL))
        .map_err(fail)?;
    let vm = wait_for_connection(core, ring, bell, vm)?;
    let mut side = VmSide::new(vm, slot, max_frame, BATCH)?;
    let vm_fd = side.fd();
    let host_fd = host.udp.as_raw_fd();
    let icmp = host.icmp.as_ref().map(|(fd, kind)| (fd.as_raw_fd(), *kind));
    let dgram = side.is_dgram();
    let vm_name = if side.learns_peer() { VM_NAME } else { 0 };
    vm_tmpl.msg_namelen = sys_len(vm_name);

    // Hand the pools to the kernel and start the receives.
    let count = u16::try_from(POOL).unwrap_or(u16::MAX);
    if dgram {
        ring.push(&vm_pool.provide(0, count)).map_err(fail)?;
    }
    ring.push(&host_pool.provide(0, count)).map_err(fail)?;
    let recv_vm = |t: &libc::msghdr| opcode::RecvMsgMulti::new(types::Fd(vm_fd), t, BGID_VM).build().user_data(VM_RECV);
    let recv_host =
        |t: &libc::msghdr| opcode::RecvMsgMulti::new(types::Fd(host_fd), t, BGID_HOST).build().user_data(HOST_RECV);
    if dgram {
        ring.push(&recv_vm(vm_tmpl)).map_err(fail)?;
    } else {
        ring.push(
            &opcode::PollAdd::new(types::Fd(vm_fd), libc::POLLIN as u32).multi(true).build().user_data(VM_POLL_IN),
        )
        .map_err(fail)?;
    }
    ring.push(&recv_host(host_tmpl)).map_err(fail)?;
    if let Some((fd, _)) = icmp {
        ring.push(&opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).multi(true).build().user_data(ICMP_POLL))
            .map_err(fail)?;
    }

    let mut vm_q: VecDeque<Done> = VecDeque::with_capacity(POOL + 1);
    let mut host_q: VecDeque<Done> = VecDeque::with_capacity(POOL + 1);
    // Buffers the current outgoing batches refer to; returned to the kernel once sent.
    let mut held_vm: Vec<u16> = Vec::with_capacity(POOL);
    let mut held_host: Vec<u16> = Vec::with_capacity(POOL);
    let mut to_host = TxBatch::new(BATCH, host.gso);
    let (mut vm_armed, mut host_armed) = (dgram, true);
    let (mut vm_w, mut host_w, mut stream_r, mut icmp_r) = (true, true, !dgram, icmp.is_some());
    let (mut vm_out_polled, mut host_out_polled) = (false, false);
    // A 256-entry ring has at most 512 completions queued.
    let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(1024);

    loop {
        if core.between_batches() {
            return Ok(End::Stopped);
        }
        let mut progress = false;

        // Outputs first; once a batch is out, its buffers go back to the kernel.
        if !to_host.is_empty() && host_w {
            host_w = super::flush_host(core, &mut to_host, host_fd);
            progress = true;
        }
        if to_host.is_empty() {
            for bid in held_vm.drain(..) {
                ring.push(&vm_pool.provide(bid, 1)).map_err(fail)?;
            }
        }
        if !side.tx_is_empty() && vm_w {
            vm_w = super::flush_vm(core, &mut side)?;
            progress = true;
        }
        if side.tx_is_empty() {
            for bid in held_host.drain(..) {
                ring.push(&host_pool.provide(bid, 1)).map_err(fail)?;
            }
        }

        // VM to host, one batch, only when the previous one has gone out.
        if to_host.is_empty() && side.tx_accepts() {
            if dgram && !vm_q.is_empty() {
                for _ in 0..BATCH {
                    let Some(d) = vm_q.pop_front() else { break };
                    let buf = vm_pool.buf_mut(d.bid, d.len);
                    held_vm.push(d.bid);
                    let Some((namelen, payload, truncated)) = parse(buf, vm_tmpl) else { continue };
                    if namelen > 0 {
                        side.learn_peer(buf.get(RECVMSG_OUT..RECVMSG_OUT + namelen).unwrap_or_default());
                    }
                    if truncated {
                        core.vm_frame_oversized(payload.len());
                        continue;
                    }
                    let frame = buf.get(payload).unwrap_or_default();
                    side.act_frame(core, frame, &mut to_host, icmp);
                }
                progress = true;
            } else if stream_r {
                if side.pump_in(core, &mut to_host, icmp)? {
                    progress = true;
                } else {
                    stream_r = false;
                }
            }
            if !to_host.is_empty() {
                host_w = super::flush_host(core, &mut to_host, host_fd);
            }
            if !side.tx_is_empty() {
                vm_w = super::flush_vm(core, &mut side)?;
            }
        }

        // Host to VM.
        if side.tx_accepts() && !host_q.is_empty() {
            for _ in 0..BATCH {
                let Some(d) = host_q.pop_front() else { break };
                held_host.push(d.bid);
                let buf = host_pool.buf_mut(d.bid, d.len);
                let Some((namelen, payload, truncated)) = parse(buf, host_tmpl) else { continue };
                let from = name_endpoint(buf.get(RECVMSG_OUT..RECVMSG_OUT + namelen).unwrap_or_default());
                side.host_datagram(core, from, truncated, buf, payload);
            }
            progress = true;
            vm_w = super::flush_vm(core, &mut side)?;
        }
        if let (true, Some((fd, kind))) = (icmp_r && side.tx_accepts(), icmp) {
            if side.pump_icmp(core, fd, kind) {
                progress = true;
                vm_w = super::flush_vm(core, &mut side)?;
            } else {
                icmp_r = false;
            }
        }

        // Re-arm what has ended, ask for writability where blocked.
        if !vm_armed && dgram && held_vm.is_empty() && vm_q.is_empty() {
            ring.push(&recv_vm(vm_tmpl)).map_err(fail)?;
            vm_armed = true;
        }
        if !host_armed && held_host.is_empty() && host_q.is_empty() {
            ring.push(&recv_host(host_tmpl)).map_err(fail)?;
            host_armed = true;
        }
        if !host_w && !host_out_polled {
            ring.push(&opcode::PollAdd::new(types::Fd(host_fd), libc::POLLOUT as u32).build().user_data(HOST_POLL_OUT))
                .map_err(fail)?;
            host_out_polled = true;
        }
        // A stalled VM handle is also retried (or its frames dropped) on a timer; with timed
        // retries its writability is not asked for.
        let retry = side.retry_in();
        if !vm_w && !vm_out_polled && !side.timed_retries() {
            ring.push(&opcode::PollAdd::new(types::Fd(vm_fd), libc::POLLOUT as u32).build().user_data(VM_POLL_OUT))
                .map_err(fail)?;
            vm_out_polled = true;
        }

        core.batch_done(to_host.is_empty(), side.tx_is_empty());
        // Submit, and wait only when there is nothing to do.
        let work_left = (!vm_q.is_empty() && to_host.is_empty() && side.tx_accepts())
            || (!host_q.is_empty() && side.tx_accepts())
            || (stream_r && to_host.is_empty() && side.tx_accepts());
        // Busy polling: submit and reap without ever waiting in the kernel.
        let want = usize::from(!(progress || work_left || busy_poll));
        let wait = retry.map_or(super::vm::STALL_MAX, |r| r.min(super::vm::STALL_MAX));
        let ts = types::Timespec::new().nsec(u32::try_from(wait.as_nanos()).unwrap_or(100_000_000));
        let args = types::SubmitArgs::new().timespec(&ts);
        match ring.ring.submitter().submit_with_args(want, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)) => {}
            Err(e) => return Err(fail(e)),
        }
        // Copied out first (into capacity reserved up front: no allocation) so the handlers
        // below may queue new requests.
        cqes.clear();
        cqes.extend(ring.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
        ring.ended(cqes.iter().map(|c| c.2));
        for &(user_data, res, flags) in &cqes {
            match user_data {
                VM_RECV | HOST_RECV => {
                    let is_vm = user_data == VM_RECV;
                    if let (true, Some(bid)) = (res >= 0, cqueue::buffer_select(flags)) {
                        let d = Done { bid, len: usize::try_from(res).unwrap_or(0) };
                        if is_vm {
                            vm_q.push_back(d);
                        } else {
                            host_q.push_back(d);
                        }
                    } else if res < 0 && res != -libc::ENOBUFS && res != -libc::ECANCELED {
                        let e = io::Error::from_raw_os_error(-res);
                        if is_vm {
                            return Err(End::HandleClosed(Closed::Error(e.to_string())));
                        }
                        // A UDP socket reports an earlier ICMP error once; receiving goes on.
                        core.send_error(true, 1, Some(-res));
                    }
                    if !cqueue::more(flags) {
                        if is_vm {
                            vm_armed = false;
                        } else {
                            host_armed = false;
                        }
                    }
                }
                BELL_POLL => {
                    bell.0.drain();
                    if !cqueue::more(flags) {
                        ring.push(
                            &opcode::PollAdd::new(types::Fd(bell_fd), libc::POLLIN as u32)
                                .multi(true)
                                .build()
                                .user_data(BELL_POLL),
                        )
                        .map_err(fail)?;
                    }
                }
                ICMP_POLL => {
                    icmp_r = true;
                    if let (false, Some((fd, _))) = (cqueue::more(flags), icmp) {
                        ring.push(
                            &opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
                                .multi(true)
                                .build()
                                .user_data(ICMP_POLL),
                        )
                        .map_err(fail)?;
                    }
                }
                VM_POLL_IN => {
                    stream_r = true;
                    if !cqueue::more(flags) {
                        ring.push(
                            &opcode::PollAdd::new(types::Fd(vm_fd), libc::POLLIN as u32)
                                .multi(true)
                                .build()
                                .user_data(VM_POLL_IN),
                        )
                        .map_err(fail)?;
                    }
                }
                VM_POLL_OUT => {
                    vm_w = true;
                    vm_out_polled = false;
                }
                HOST_POLL_OUT => {
                    host_w = true;
                    host_out_polled = false;
                }
                PROVIDE if res < 0 => {
                    return Err(End::Failed(LoopError::ProvideBuffers(io::Error::from_raw_os_error(-res).to_string())))
                }
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

/// The source endpoint from the raw sockaddr bytes of a multishot receive.
fn name_endpoint(name: &[u8]) -> Option<crate::Endpoint> {
    if name.len() < size_of::<libc::sockaddr_in>() {
        return None;
    }
    // SAFETY: all zeros is a valid sockaddr_storage.
    let mut s: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    // SAFETY: at most a sockaddr_in's worth of bytes (checked above) into a larger storage.
    unsafe { std::ptr::copy_nonoverlapping(name.as_ptr(), (&raw mut s).cast::<u8>(), size_of::<libc::sockaddr_in>()) };
    source_endpoint(&s)
}

/// Waits for the VMM to connect to a listening stream handle.
fn wait_for_connection<S: Strategy>(
    core: &mut Core<S>,
    ring: &mut Ring,
    bell: &super::Bell,
    open: VmOpen,
) -> Result<VmOpen, End> {
    let VmOpen::Listen(listener) = open else { return Ok(open) };
    let fd: RawFd = listener.as_raw_fd();
    // One poll on the listener at a time (it is single-shot and may outlive a 100 ms wait).
    let mut polling = false;
    loop {
        if core.between_batches() {
            return Err(End::Stopped);
        }
        match accept(&listener) {
            Ok(Some(s)) => {
                crate::info!("vm {}: VMM connected to the stream handle", core.name());
                return Ok(VmOpen::Stream(s));
            }
            Ok(None) => {}
            Err(e) => return Err(End::Failed(LoopError::Accept(e.to_string()))),
        }
        if !polling {
            ring.push(&opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build().user_data(LISTEN_POLL))
                .map_err(|e| End::Failed(LoopError::Ring(e.to_string())))?;
            polling = true;
        }
        let ts = types::Timespec::new().nsec(100_000_000);
        let args = types::SubmitArgs::new().timespec(&ts);
        let _ = ring.ring.submitter().submit_with_args(1, &args);
        let done: Vec<(u64, u32)> = ring.ring.completion().map(|c| (c.user_data(), c.flags())).collect();
        ring.ended(done.iter().map(|d| d.1));
        for (user_data, _) in done {
            match user_data {
                BELL_POLL => bell.0.drain(),
                LISTEN_POLL => polling = false,
                _ => {}
            }
        }
    }
}
