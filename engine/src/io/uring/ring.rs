//! The ring itself: the kernel probe, provided-buffer pools, received-buffer parsing, request
//! accounting and the shutdown that drains every request before memory is freed.
use std::io;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

use super::{CANCEL, POOL, PROVIDE, RECVMSG_OUT};
use crate::io::host::source_endpoint;

/// The only operations a worker's ring accepts (`IORING_REGISTER_RESTRICTIONS`): multishot
/// receives, buffer provision, polls and cancellation. A ring is made disabled, restricted,
/// then enabled, so no other operation (open, connect, send, splice...) can ever be queued on
/// it: io_uring does its work in the kernel, where no seccomp filter of the thread applies.
pub(super) const OPCODES: [(u8, &str); 4] = [
    (opcode::RecvMsg::CODE, "RECVMSG"),
    (opcode::ProvideBuffers::CODE, "PROVIDE_BUFFERS"),
    (opcode::PollAdd::CODE, "POLL_ADD"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
];

/// A ring of `entries` restricted to [`OPCODES`], with buffer selection the only SQE flag.
pub(super) fn restricted(entries: u32) -> io::Result<IoUring> {
    use io_uring::register::Restriction;
    let ring = IoUring::builder().setup_r_disabled().build(entries)?;
    let mut rules: Vec<Restriction> = OPCODES.iter().map(|(code, _)| Restriction::sqe_op(*code)).collect();
    rules.push(Restriction::sqe_flags_allowed(squeue::Flags::BUFFER_SELECT.bits()));
    ring.submitter().register_restrictions(&mut rules)?;
    ring.submitter().register_enable_rings()?;
    Ok(ring)
}

/// Checks that this kernel has what the loop needs.
pub(crate) fn probe() -> Result<(), String> {
    let ring = IoUring::new(8).map_err(|e| format!("io_uring_setup: {e}"))?;
    restricted(8).map_err(|e| format!("restricting a ring to the loop's operations: {e}"))?;
    let mut p = Probe::new();
    ring.submitter().register_probe(&mut p).map_err(|e| format!("probing opcodes: {e}"))?;
    for (code, name) in OPCODES {
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
pub(super) struct Pool {
    mem: Box<[u8]>,
    size: usize,
    bgid: u16,
}

impl Pool {
    pub(super) fn new(size: usize, bgid: u16) -> Self {
        Self { mem: vec![0u8; POOL * size].into_boxed_slice(), size, bgid }
    }

    pub(super) fn provide(&mut self, bid: u16, count: u16) -> squeue::Entry {
        let addr = self.mem.as_mut_ptr().wrapping_add(usize::from(bid) * self.size);
        let len = i32::try_from(self.size).unwrap_or(i32::MAX);
        opcode::ProvideBuffers::new(addr, len, count, self.bgid, bid).build().user_data(PROVIDE)
    }

    pub(super) fn buf_mut(&mut self, bid: u16, len: usize) -> &mut [u8] {
        let start = usize::from(bid) * self.size;
        self.mem.get_mut(start..start + len.min(self.size)).unwrap_or_default()
    }
}

/// A completion of a multishot receive: buffer id and bytes used.
#[derive(Clone, Copy)]
pub(super) struct Done {
    pub(super) bid: u16,
    pub(super) len: usize,
}

/// The parts of a received buffer, as offsets: the name's length, the payload, and whether
/// it was truncated. io-uring's `RecvMsgOut` reads the header; `tmpl` is the msghdr the
/// receive was armed with (its name and control lengths fix where the payload starts).
pub(super) fn parse(buf: &[u8], tmpl: &libc::msghdr) -> Option<(usize, std::ops::Range<usize>, bool)> {
    let out = types::RecvMsgOut::parse(buf, tmpl).ok()?;
    let start = RECVMSG_OUT + usize::try_from(tmpl.msg_namelen).ok()? + tmpl.msg_controllen;
    Some((out.name_data().len(), start..start + out.payload_data().len(), out.is_payload_truncated()))
}

pub(super) struct Ring {
    pub(super) ring: IoUring,
    /// Requests pushed whose last completion has not been reaped yet.
    pub(super) inflight: usize,
}

impl Ring {
    /// Queues an SQE, submitting first if the queue is full.
    pub(super) fn push(&mut self, e: &squeue::Entry) -> io::Result<()> {
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
    pub(super) fn ended(&mut self, flags: impl Iterator<Item = u32>) {
        let n = flags.filter(|f| !cqueue::more(*f)).count();
        self.inflight = self.inflight.saturating_sub(n);
    }
}

pub(super) fn sys_len(n: usize) -> libc::socklen_t {
    libc::socklen_t::try_from(n).unwrap_or(0)
}

/// Cancels every request and waits (up to 2 s) until each has delivered its last completion,
/// so that no kernel write can reach memory we free. Returns false if some did not.
pub(super) fn shutdown(ring: &mut Ring) -> bool {
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

/// The source endpoint from the raw sockaddr bytes of a multishot receive.
pub(super) fn name_endpoint(name: &[u8]) -> Option<crate::Endpoint> {
    if name.len() < size_of::<libc::sockaddr_in>() {
        return None;
    }
    // SAFETY: all zeros is a valid sockaddr_storage.
    let mut s: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    // SAFETY: at most a sockaddr_in's worth of bytes (checked above) into a larger storage.
    unsafe { std::ptr::copy_nonoverlapping(name.as_ptr(), (&raw mut s).cast::<u8>(), size_of::<libc::sockaddr_in>()) };
    source_endpoint(&s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restricted_ring_refuses_every_other_operation() {
        if probe().is_err() {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "io_uring is required under CI=true");
            return;
        }
        let mut ring = restricted(8).expect("a restricted ring");
        let efd = sys::EventFd::new().expect("eventfd");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&efd);
        // An operation the loop never uses (a NOP; an OPENAT would be refused the same way).
        let nop = opcode::Nop::new().build().user_data(1);
        let poll = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build().user_data(2);
        // SAFETY: the entry points into no memory of ours.
        unsafe { ring.submission().push(&nop) }.expect("room");
        // SAFETY: as above.
        unsafe { ring.submission().push(&poll) }.expect("room");
        ring.submit().expect("submit");
        efd.notify();
        ring.submit_and_wait(2).expect("wait");
        let mut got: Vec<(u64, i32)> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
        got.sort_unstable();
        assert_eq!(got.first(), Some(&(1, -libc::EACCES)), "the NOP is refused: {got:?}");
        assert!(got.get(1).is_some_and(|&(tag, res)| tag == 2 && res > 0), "the poll is served: {got:?}");
    }
}
