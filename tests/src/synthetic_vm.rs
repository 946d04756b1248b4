//! The synthetic VM: the test's end of a VM handle (the seed plan's `MockVMHandle`), sending
//! frames built by `engine::testkit` and reading what the engine writes back.
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::{Duration, Instant};

use engine::testkit::{arp_request, FrameSpec};
use engine::{Endpoint, VmIdentity};

/// The far end of a VM handle.
#[derive(Debug)]
pub enum VmEnd {
    /// A datagram socketpair end.
    Dgram(UnixDatagram),
    /// A stream socketpair end (u32 big-endian length framing).
    Stream(UnixStream),
}

/// A synthetic VM: the test's end of the handle, and the identity the engine expects.
#[derive(Debug)]
pub struct SyntheticVm {
    /// The socket.
    pub end: VmEnd,
    /// The VM's identity (defaults).
    pub id: VmIdentity,
}

impl SyntheticVm {
    /// Sends one frame.
    pub fn send(&self, frame: &[u8]) {
        match &self.end {
            VmEnd::Dgram(s) => {
                s.send(frame).expect("send a frame to the engine");
            }
            VmEnd::Stream(s) => {
                use std::io::Write;
                let mut w = s;
                let mut buf = u32::try_from(frame.len()).expect("frame fits u32").to_be_bytes().to_vec();
                buf.extend_from_slice(frame);
                w.write_all(&buf).expect("write a frame to the engine");
            }
        }
    }

    /// Waits up to `timeout` for the next frame from the engine.
    pub fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        match &self.end {
            VmEnd::Dgram(s) => {
                s.set_read_timeout(Some(timeout)).ok()?;
                let mut buf = vec![0u8; 65536];
                let n = s.recv(&mut buf).ok()?;
                buf.truncate(n);
                Some(buf)
            }
            VmEnd::Stream(s) => {
                use std::io::Read;
                s.set_read_timeout(Some(timeout)).ok()?;
                let mut r = s;
                let mut len = [0u8; 4];
                r.read_exact(&mut len).ok()?;
                let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
                r.read_exact(&mut buf).ok()?;
                Some(buf)
            }
        }
    }

    /// Receives frames until one matches `pred`, for up to `timeout`.
    pub fn recv_matching(&self, timeout: Duration, pred: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let end = Instant::now() + timeout;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.recv(left.max(Duration::from_millis(1))) {
                Some(f) if pred(&f) => return Some(f),
                Some(_) => {}
                None => return None,
            }
        }
        None
    }

    /// A UDP frame from the VM to `to` with `payload`.
    pub fn udp(&self, to: Endpoint, payload: &[u8]) -> Vec<u8> {
        FrameSpec::udp(&self.id, to, payload).build()
    }

    /// An ARP request for the gateway.
    pub fn arp_for_gateway(&self) -> Vec<u8> {
        arp_request(&self.id, self.id.gateway_ip)
    }
}
