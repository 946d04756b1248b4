//! The floor: a bare forwarder with the engine's hand-offs and none of its work. One thread, as
//! the engine has per VM, waiting in `poll` on both sockets, reading what came with one
//! `recvmmsg` and writing it with one `sendmmsg`: VM frames
//! lose their 42 header bytes and go to the consumer on a connected UDP socket; the consumer's
//! datagrams get a fixed Ethernet/IPv4/UDP header and go to the VM's datagram socket. No
//! checks, no translation, no allowlist: what Omerta costs above moving datagrams between two
//! sockets is what it adds over this.
use std::net::UdpSocket;
use std::os::fd::AsFd;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A running floor forwarder.
#[derive(Debug)]
pub struct Floor {
    /// Where the consumer sends to reach the VM (the forwarder's UDP socket).
    pub addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Its thread's name, for its CPU time.
    pub name: String,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// The header put in front of each datagram for the VM: Ethernet, IPv4 (no options), UDP.
fn header(payload: usize) -> [u8; 42] {
    let mut h = [0u8; 42];
    h[0..6].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    h[6..12].copy_from_slice(&[0x52, 0x55, 10, 0, 2, 2]);
    h[12..14].copy_from_slice(&[0x08, 0x00]);
    let total = u16::try_from(20 + 8 + payload).unwrap_or(u16::MAX);
    h[14] = 0x45;
    h[16..18].copy_from_slice(&total.to_be_bytes());
    h[22] = 64;
    h[23] = 17;
    h[26..30].copy_from_slice(&[127, 0, 0, 1]);
    h[30..34].copy_from_slice(&[10, 0, 2, 15]);
    let sum = engine::wire::csum::checksum(&h[14..34]);
    h[24..26].copy_from_slice(&sum.to_be_bytes());
    h[34..36].copy_from_slice(&4000u16.to_be_bytes());
    h[36..38].copy_from_slice(&4000u16.to_be_bytes());
    h[38..40].copy_from_slice(&u16::try_from(8 + payload).unwrap_or(u16::MAX).to_be_bytes());
    h
}

impl Floor {
    /// Forwards between `vm` (the engine's end of the VM's socketpair) and the consumer on
    /// 127.0.0.1:`consumer_port`, until dropped; `busy`: polls without sleeping (as the engine's
    /// `busy-poll=yes`); `gro`: UDP GRO on its UDP socket, each coalesced buffer cut into
    /// frames again (a header and a slice of the buffer each, no copy); `cpu`: its thread
    /// pinned there.
    pub fn start(
        vm: UnixDatagram,
        consumer_port: u16,
        busy: bool,
        gro: bool,
        cpu: Option<usize>,
    ) -> Result<Self, String> {
        let udp = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        udp.connect(("127.0.0.1", consumer_port)).map_err(|e| e.to_string())?;
        sys::grow_buffers(udp.as_fd(), 8 << 20);
        sys::grow_buffers(vm.as_fd(), 8 << 20);
        if gro {
            sys::bench::enable_udp_gro(udp.as_fd()).map_err(|e| format!("UDP GRO: {e}"))?;
        }
        let addr = udp.local_addr().map_err(|e| e.to_string())?;
        for s in [
            udp.set_read_timeout(Some(Duration::from_millis(100))),
            vm.set_read_timeout(Some(Duration::from_millis(100))),
        ] {
            s.map_err(|e| e.to_string())?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("floor-fwd-{n}");
        let s1 = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                if let Some(c) = cpu {
                    let _ = sys::pin_current_thread(c);
                }
                let wait_ms = if busy { 0 } else { 100 };
                let mut bufs: Vec<Vec<u8>> = (0..sys::bench::MAX).map(|_| vec![0u8; 2048]).collect();
                let mut lens = [0usize; sys::bench::MAX];
                let mut gro_bufs = if gro { (0..GRO_BUFS).map(|_| vec![0u8; 65536]).collect() } else { Vec::new() };
                while !s1.load(Ordering::Relaxed) {
                    let Ok([vm_r, udp_r]) = sys::bench::wait_readable(vm.as_fd(), udp.as_fd(), wait_ms) else {
                        continue;
                    };
                    if vm_r {
                        if let Ok(k) = sys::bench::recv_many(vm.as_fd(), &mut bufs, &mut lens) {
                            let mut out: [&[u8]; sys::bench::MAX] = [&[]; sys::bench::MAX];
                            for i in 0..k {
                                out[i] = bufs[i].get(42..lens[i]).unwrap_or_default();
                            }
                            send_all(&udp, &out[..k]);
                        }
                    }
                    if udp_r && gro {
                        gro_forward(&udp, &vm, &mut gro_bufs);
                    } else if udp_r {
                        // Received 42 bytes in, so the header is written in place (no copy).
                        if let Ok(k) = sys::bench::recv_many_at(udp.as_fd(), &mut bufs, 42, &mut lens) {
                            for i in 0..k {
                                bufs[i][..42].copy_from_slice(&header(lens[i]));
                            }
                            let mut out: [&[u8]; sys::bench::MAX] = [&[]; sys::bench::MAX];
                            for i in 0..k {
                                out[i] = &bufs[i][..42 + lens[i]];
                            }
                            send_all(&vm, &out[..k]);
                        }
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(Self { addr, stop, threads: vec![thread], name })
    }

    /// CPU seconds its thread used.
    pub fn cpu_seconds(&self) -> f64 {
        crate::thread_cpu_of("/proc/self/task", &self.name)
    }
}

/// Coalesced buffers per receive with UDP GRO (64 KiB each).
const GRO_BUFS: usize = 8;

/// One `recvmmsg` of coalesced buffers, each cut at its segment size into frames that go to the
/// VM as a fixed header and a slice of the buffer.
fn gro_forward(udp: &UdpSocket, vm: &UnixDatagram, bufs: &mut [Vec<u8>]) {
    let (mut lens, mut segs, mut size) = ([0usize; GRO_BUFS], [0usize; GRO_BUFS], [0usize; GRO_BUFS]);
    let Ok(k) = sys::bench::recv_many_gro(udp.as_fd(), bufs, &mut lens, &mut segs, &mut size) else { return };
    let mut slices: [&[u8]; sys::bench::MAX] = [&[]; sys::bench::MAX];
    let mut n = 0;
    for i in 0..k {
        let seg = if size[i] == 0 { lens[i].max(1) } else { size[i] };
        for chunk in bufs[i][..lens[i]].chunks(seg) {
            if n == sys::bench::MAX {
                send_frames(vm, &slices[..n]);
                n = 0;
            }
            slices[n] = chunk;
            n += 1;
        }
    }
    send_frames(vm, &slices[..n]);
}

/// Writes each of `slices` to the VM behind its header (a full socket buffer waits, as
/// `send_all`).
fn send_frames(vm: &UnixDatagram, slices: &[&[u8]]) {
    let mut heads = [[0u8; 42]; sys::bench::MAX];
    for (h, s) in heads.iter_mut().zip(slices) {
        *h = header(s.len());
    }
    let mut parts: [[&[u8]; 2]; sys::bench::MAX] = [[&[], &[]]; sys::bench::MAX];
    for ((p, h), s) in parts.iter_mut().zip(heads.iter()).zip(slices) {
        *p = [h, s];
    }
    let mut off = 0;
    while off < slices.len() {
        match sys::bench::send_many_parts(vm.as_fd(), &parts[off..slices.len()]) {
            Ok(m) => off += m.max(1),
            Err(_) => break,
        }
    }
}

/// Writes every datagram of `out` (a full socket buffer waits: the floor drops nothing itself).
fn send_all(fd: &impl AsFd, out: &[&[u8]]) {
    let mut off = 0;
    while off < out.len() {
        match sys::bench::send_many(fd.as_fd(), &out[off..]) {
            Ok(m) => off += m.max(1),
            Err(_) => break,
        }
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
