//! The traffic around a device under test: the generator that plays the VM, the sink that
//! plays the consumer (loss and reordering exact), the echo consumer, round trips (sleeping,
//! busy and the floor's), and the reader that counts frames reaching the VM.
use std::io::Read;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::wire::{EthernetHeader, Ipv4Packet};
use hdrhistogram::Histogram;

use crate::{Dut, VmSock};

/// A consumer that counts datagrams by sequence number (bytes 0..8 of the payload).
#[derive(Debug)]
pub struct Sink {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Datagrams received so far (live).
    pub live: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<SinkCount>>,
}

/// What a sink saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct SinkCount {
    /// Datagrams.
    pub received: u64,
    /// Payload bytes.
    pub bytes: u64,
    /// Datagrams whose sequence number was below one already seen.
    pub reordered: u64,
    /// Highest sequence number seen, plus one.
    pub max_seq: u64,
}

impl Sink {
    /// Binds 127.0.0.1 and counts until stopped; with UDP GRO on, as a real receiver would
    /// (runs of equal datagrams of one flow may arrive as one buffer; each is counted).
    pub fn start() -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind the sink");
        sys::grow_buffers(sock.as_fd(), 32 << 20);
        let gro =
            std::env::var("OMERTA_PERF_GRO").as_deref() != Ok("0") && sys::bench::enable_udp_gro(sock.as_fd()).is_ok();
        let port = sock.local_addr().map(|a| a.port()).unwrap_or(0);
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let live = Arc::new(AtomicU64::new(0));
        let l2 = live.clone();
        let thread = std::thread::spawn(move || {
            let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
            let mut bufs: Vec<Vec<u8>> =
                (0..sys::bench::MAX).map(|_| vec![0u8; if gro { 65536 } else { 2048 }]).collect();
            let (mut lens, mut segs, mut size) =
                ([0usize; sys::bench::MAX], [1usize; sys::bench::MAX], [0usize; sys::bench::MAX]);
            let mut c = SinkCount::default();
            loop {
                let got = if gro {
                    sys::bench::recv_many_gro(sock.as_fd(), &mut bufs, &mut lens, &mut segs, &mut size)
                } else {
                    sys::bench::recv_many(sock.as_fd(), &mut bufs, &mut lens)
                };
                match got {
                    Ok(k) => {
                        for i in 0..k {
                            let (n, step) = if gro && size[i] > 0 { (segs[i], size[i]) } else { (1, lens[i].max(1)) };
                            l2.fetch_add(n as u64, Ordering::Relaxed);
                            c.received += n as u64;
                            c.bytes += lens[i] as u64;
                            for s in 0..n {
                                let Some(head) = bufs[i].get(s * step..s * step + 8) else { break };
                                let mut b = [0u8; 8];
                                b.copy_from_slice(head);
                                let seq = u64::from_be_bytes(b);
                                if seq + 1 < c.max_seq {
                                    c.reordered += 1;
                                }
                                c.max_seq = c.max_seq.max(seq + 1);
                            }
                        }
                    }
                    Err(_) if s2.load(Ordering::Relaxed) => return c,
                    Err(_) => {}
                }
            }
        });
        Self { port, live, stop, thread: Some(thread) }
    }

    /// Datagrams received so far.
    pub fn received(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }

    /// Stops after the in-flight datagrams have drained; returns the counts.
    pub fn finish(mut self) -> SinkCount {
        std::thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default()
    }
}

/// A consumer that echoes every datagram back to its sender.
#[derive(Debug)]
pub struct Echo {
    /// Its port on 127.0.0.1.
    pub port: u16,
    stop: Arc<AtomicBool>,
}

impl Echo {
    /// Binds 127.0.0.1 and echoes until dropped.
    pub fn start() -> Self {
        Self::start_on(None)
    }

    /// [`Echo::start`], its thread pinned to CPU `cpu` if given.
    pub fn start_on(cpu: Option<usize>) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind the echo consumer");
        let port = sock.local_addr().map(|a| a.port()).unwrap_or(0);
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        std::thread::spawn(move || {
            if let Some(c) = cpu {
                let _ = sys::pin_current_thread(c);
            }
            let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
            let mut b = [0u8; 2048];
            while !s2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut b) {
                    let _ = sock.send_to(&b[..n], from);
                }
            }
        });
        Self { port, stop }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What a generator run did.
#[derive(Debug, Clone, Copy, Default)]
pub struct GenCount {
    /// Frames written.
    pub sent: u64,
    /// Seconds it ran.
    pub secs: f64,
}

/// Writes frames of the sizes in `mix` (cycled) to `port`, flat out (`pps == 0`) or paced, for
/// `secs` seconds or `max_frames` frames, whichever ends first. Sequence numbers start at 0.
pub fn generate(dut: &mut Dut, port: u16, mix: &[usize], pps: u64, secs: f64, max_frames: u64) -> GenCount {
    const BATCH: usize = 64;
    let mut frames: Vec<Vec<u8>> = (0..BATCH).map(|i| dut.frame(port, mix[i % mix.len()])).collect();
    let mut framed = Vec::with_capacity(BATCH * 1600);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut seq = 0u64;
    while Instant::now() < end && seq < max_frames {
        let n = BATCH.min((max_frames - seq) as usize);
        for f in frames.iter_mut().take(n) {
            f[42..50].copy_from_slice(&seq.to_be_bytes());
            seq += 1;
        }
        if dut.send_batch(&frames[..n], &mut framed).is_err() {
            break;
        }
        if pps > 0 {
            let due = start + Duration::from_secs_f64(seq as f64 / pps as f64);
            while Instant::now() < due {
                std::hint::spin_loop();
            }
        }
    }
    GenCount { sent: seq, secs: start.elapsed().as_secs_f64() }
}

/// True if `frame` is the echo of round trip `seq` (its UDP payload starts with it).
fn echo_of(frame: &[u8], seq: u64) -> bool {
    EthernetHeader::parse(frame)
        .ok()
        .and_then(|(_, ip)| Ipv4Packet::parse(ip).ok())
        .and_then(|p| p.udp_payload().map(|u| u.get(..8) == Some(&seq.to_be_bytes()[..])))
        .unwrap_or(false)
}

/// Records the microseconds since `t` in `h` and `all`.
fn record_since(t: Instant, h: &mut Histogram<u64>, all: &mut Vec<f64>) {
    let us = t.elapsed().as_secs_f64() * 1e6;
    let _ = h.record(us.round().max(1.0) as u64);
    all.push(us);
}

/// Round trips, one frame at a time, VM → echo consumer → VM, in microseconds.
pub fn round_trips(dut: &mut Dut, port: u16, samples: u64, max_secs: f64) -> (Histogram<u64>, Vec<f64>) {
    let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()));
    let mut all = Vec::with_capacity(samples as usize);
    let mut f = dut.frame(port, 64);
    let end = Instant::now() + Duration::from_secs_f64(max_secs);
    for seq in 0..samples {
        if Instant::now() > end {
            break;
        }
        f[42..50].copy_from_slice(&seq.to_be_bytes());
        let t = Instant::now();
        if dut.send(&f).is_err() {
            break;
        }
        // Wait for the echo of this very frame (skip ARP or stray frames).
        while let Some(r) = dut.recv_frame(Duration::from_millis(500)) {
            if echo_of(r, seq) {
                record_since(t, &mut h, &mut all);
                break;
            }
        }
    }
    (h, all)
}

/// Where a UDP socket is bound.
pub fn port_of(s: &UdpSocket) -> u16 {
    match s.local_addr() {
        Ok(SocketAddr::V4(a)) => a.port(),
        _ => 0,
    }
}

/// Round trips as [`round_trips`] with a harness that never sleeps: one thread plays both the
/// VM (sends the frame, waits for its echo) and the echo consumer (bound here, answers what
/// reaches it), polling both sockets without blocking, so neither side's wake-up is in the
/// figure. `consumer` is the socket of the consumer the DUT was started for. Datagram handles
/// only.
pub fn round_trips_busy(
    dut: &mut Dut,
    consumer: &UdpSocket,
    samples: u64,
    max_secs: f64,
) -> (Histogram<u64>, Vec<f64>) {
    let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()));
    let mut all = Vec::with_capacity(samples as usize);
    let port = port_of(consumer);
    let mut f = dut.frame(port, 64);
    // The datagram handle only (a stream would need a framing parser in the spin).
    let VmSock::Dgram(vm) = &dut.vm else { return (h, all) };
    if vm.set_nonblocking(true).is_err() || consumer.set_nonblocking(true).is_err() {
        return (h, all);
    }
    let (mut eb, mut vb) = ([0u8; 2048], [0u8; 2048]);
    let end = Instant::now() + Duration::from_secs_f64(max_secs);
    'samples: for seq in 0..samples {
        f[42..50].copy_from_slice(&seq.to_be_bytes());
        let t = Instant::now();
        if vm.send(&f).is_err() {
            break;
        }
        let give_up = t + Duration::from_millis(500);
        loop {
            if let Ok((n, from)) = consumer.recv_from(&mut eb) {
                let _ = consumer.send_to(&eb[..n], from);
            }
            if let Ok(n) = vm.recv(&mut vb) {
                if echo_of(&vb[..n], seq) {
                    record_since(t, &mut h, &mut all);
                    break;
                }
            }
            let now = Instant::now();
            if now > give_up || now > end {
                break 'samples;
            }
            std::hint::spin_loop();
        }
    }
    let _ = vm.set_nonblocking(false);
    (h, all)
}

/// The floor: round trips straight between two UDP sockets on loopback, nothing in between,
/// measured the same way (microseconds).
pub fn floor_round_trips(samples: u64) -> Histogram<u64> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()));
    let echo = Echo::start();
    let Ok(s) = UdpSocket::bind("127.0.0.1:0") else { return h };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut b = [0u8; 64];
    for seq in 0..samples {
        let t = Instant::now();
        if s.send_to(&seq.to_be_bytes(), ("127.0.0.1", echo.port)).is_err() || s.recv_from(&mut b).is_err() {
            continue;
        }
        let _ = h.record((t.elapsed().as_secs_f64() * 1e6).round().max(1.0) as u64);
    }
    h
}

/// Counts frames arriving at the VM's end until `stop`, reading as cheaply as the handle allows
/// (recvmmsg for datagrams, a buffered parse of the length-prefixed stream), so the reader is
/// not what limits a host-to-VM measurement. Frames shorter than `min_len` (ARP and such) are
/// not counted.
pub fn drain_vm(vm: VmSock, stop: Arc<AtomicBool>, min_len: usize) -> u64 {
    let mut n = 0u64;
    match vm {
        VmSock::Dgram(s) => {
            let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
            let mut bufs: Vec<Vec<u8>> = (0..sys::bench::MAX).map(|_| vec![0u8; 2048]).collect();
            let mut lens = [0usize; sys::bench::MAX];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(k) = sys::bench::recv_many(s.as_fd(), &mut bufs, &mut lens) {
                    n += lens.iter().take(k).filter(|l| **l >= min_len).count() as u64;
                }
            }
        }
        VmSock::Stream(mut s) => {
            let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
            let mut buf = vec![0u8; 1 << 20];
            let (mut start, mut end) = (0usize, 0usize);
            while !stop.load(Ordering::Relaxed) {
                if start > 0 {
                    buf.copy_within(start..end, 0);
                    end -= start;
                    start = 0;
                }
                match s.read(&mut buf[end..]) {
                    Ok(0) => break,
                    Ok(k) => end += k,
                    Err(_) => continue,
                }
                while end - start >= 4 {
                    let len = u32::from_be_bytes([buf[start], buf[start + 1], buf[start + 2], buf[start + 3]]) as usize;
                    if end - start < 4 + len {
                        break;
                    }
                    if len >= min_len {
                        n += 1;
                    }
                    start += 4 + len;
                }
            }
        }
    }
    n
}
