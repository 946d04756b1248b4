//! Fuzz bodies, shared by `engine/fuzz` (cargo fuzz) and the tests that replay its corpus.
//!
//! Each function drives the public translation API with arbitrary bytes and asserts the
//! invariants that must hold for any input. A panic here is a bug in the engine.
#![forbid(unsafe_code)]

use core::net::Ipv4Addr;
use std::sync::Arc;

use crate::filter::{Allowlist, Conntrack, Endpoint, Full, SampleRate, Sampled, Strategy};
use crate::nat::{FilteredNat, VmAction, VmIdentity};
use crate::wire::{EthernetHeader, IpProtocol, Ipv4Packet, HEADROOM};

/// The consumer endpoint the fuzz NATs allow.
pub const CONSUMER: Endpoint = Endpoint::new(Ipv4Addr::new(203, 0, 113, 7), 51820);

fn allow() -> Arc<Allowlist> {
    Arc::new(Allowlist::new([CONSUMER]).unwrap_or_default())
}

fn check_vm<S: Strategy>(nat: &mut FilteredNat<S>, frame: &[u8], strict: bool) {
    let id = *nat.identity();
    let action = nat.vm_frame(frame);
    let inside = |s: &[u8]| {
        let (start, end) = (frame.as_ptr() as usize, frame.as_ptr() as usize + frame.len());
        let p = s.as_ptr() as usize;
        p >= start && p + s.len() <= end
    };
    match action {
        VmAction::ForwardUdp { to, payload, .. } => {
            assert!(inside(payload), "forwarded payload must be a slice of the frame");
            assert!(!strict || to == CONSUMER, "filtered/conntrack forwarded to {to}");
            let (_, ip) = EthernetHeader::parse(frame).unwrap_or_else(|_| panic!("forwarded a runt"));
            let ip = Ipv4Packet::parse(ip).unwrap_or_else(|r| panic!("forwarded a bad packet: {r}"));
            assert_eq!(ip.src(), id.ip);
            assert_eq!(ip.protocol(), IpProtocol::Udp);
            assert!(!ip.is_fragment());
        }
        VmAction::ForwardIcmpEcho { to, message } => {
            assert!(inside(message));
            assert!(!strict || to == CONSUMER.ip, "filtered/conntrack pinged {to}");
        }
        VmAction::DhcpReply(r) => {
            // Only ever for the VM's own hardware address, with its own address, and it builds.
            assert_eq!(r.chaddr, id.mac);
            assert!(r.yiaddr == id.ip || r.yiaddr.is_unspecified());
            let mut buf = [0u8; crate::wire::DhcpReply::FRAME_LEN];
            assert!(r.emit(&mut buf).is_some(), "a DHCP reply that cannot be built");
        }
        VmAction::ArpReply(_) | VmAction::Drop(_) | VmAction::Terminate(_) => {}
    }
}

/// One arbitrary frame through all three strategies.
pub fn vm_frame(data: &[u8]) {
    let id = VmIdentity::default();
    check_vm(&mut FilteredNat::new(id, allow(), Full::new()), data, true);
    check_vm(&mut FilteredNat::new(id, allow(), Conntrack::new(4)), data, true);
    check_vm(&mut FilteredNat::new(id, allow(), Sampled::new(SampleRate::DEFAULT, 1)), data, false);
}

/// One arbitrary host datagram. Byte 0 picks UDP or ICMP and the source, byte 1 the headroom,
/// the rest is the payload (UDP) or message (ICMP).
pub fn host_datagram(data: &[u8]) {
    let (Some(&sel), Some(&room)) = (data.first(), data.get(1)) else { return };
    let body = data.get(2..).unwrap_or_default();
    let id = VmIdentity::default();
    let mut nat = FilteredNat::new(id, allow(), Full::new());
    // Open the flows first, as a VM would, so replies have somewhere to go.
    if sel & 2 == 0 {
        let udp = crate::testkit::FrameSpec::udp(&id, CONSUMER, b"hi").build();
        let icmp = crate::testkit::FrameSpec::icmp_echo(&id, CONSUMER.ip, 9, 1, b"hi").build();
        let _ = nat.vm_frame(&udp);
        let _ = nat.vm_frame(&icmp);
    }
    let from = if sel & 4 == 0 { CONSUMER } else { Endpoint::new(Ipv4Addr::new(8, 8, 8, 8), 53) };
    let start = usize::from(room % 64);
    let mut buf = vec![0u8; start + body.len()];
    if let Some(dst) = buf.get_mut(start..) {
        dst.copy_from_slice(body);
    }
    let range = start..start + body.len();
    let result =
        if sel & 1 == 0 { nat.host_udp(from, &mut buf, range) } else { nat.host_icmp(from.ip, &mut buf, range) };
    if let Ok(frame) = result {
        assert!(from == CONSUMER, "accepted a datagram from {from}");
        assert!(frame.start + HEADROOM <= start + 8 + HEADROOM);
        let bytes = buf.get(frame).unwrap_or_else(|| panic!("frame range outside the buffer"));
        assert!(bytes.len() <= id.max_frame_len());
        let (eth, ip) = EthernetHeader::parse(bytes).unwrap_or_else(|_| panic!("built a runt"));
        assert_eq!(eth.dst, id.mac);
        let ip = Ipv4Packet::parse(ip).unwrap_or_else(|r| panic!("built a bad packet: {r}"));
        assert!(ip.checksum_ok());
        assert_eq!((ip.src(), ip.dst()), (CONSUMER.ip, id.ip));
    }
}
