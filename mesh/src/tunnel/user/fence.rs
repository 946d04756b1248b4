//! The userspace fence: what a rented VM may put into this consumer's TCP/IP stack. It sits
//! between WireGuard's decryption and smoltcp, as the root modes' firewall sits on their
//! interface: the VM may answer connections this daemon opened, and nothing else. Everything
//! else is dropped silently (no RST, no ICMP: the VM learns nothing, as with the root modes'
//! DROP) and counted by reason. Pure: the caller passes the flows it opened.
use std::net::Ipv4Addr;

use engine::wire::{IpProtocol, Ipv4Packet, TcpHeader};

/// Why a packet from the VM was kept out of the stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceDrop {
    /// Not a whole IPv4 packet.
    Malformed,
    /// A fragment (the stack is never given one).
    Fragment,
    /// Not from the VM's own address, or not to ours.
    Spoofed,
    /// A connection attempt (SYN without ACK): the VM opens nothing toward the consumer.
    Syn,
    /// UDP.
    Udp,
    /// ICMP.
    Icmp,
    /// Another protocol.
    OtherProto,
    /// TCP on a flow this daemon did not open.
    UnknownFlow,
}

impl FenceDrop {
    /// Every reason, in counter order.
    pub const ALL: [Self; 8] = [
        Self::Malformed,
        Self::Fragment,
        Self::Spoofed,
        Self::Syn,
        Self::Udp,
        Self::Icmp,
        Self::OtherProto,
        Self::UnknownFlow,
    ];

    /// Its counter's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Fragment => "fragment",
            Self::Spoofed => "spoofed",
            Self::Syn => "syn",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
            Self::OtherProto => "other_proto",
            Self::UnknownFlow => "unknown_flow",
        }
    }

    /// Its index in [`Self::ALL`].
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Whether the decrypted packet `pkt` may enter the stack: from `vm` to `me`, TCP, no SYN
/// without ACK, on a flow `(our port, the VM's port)` for which `opened` says yes.
pub fn admit(pkt: &[u8], vm: Ipv4Addr, me: Ipv4Addr, opened: impl Fn(u16, u16) -> bool) -> Result<(), FenceDrop> {
    let ip = Ipv4Packet::parse(pkt).map_err(|_| FenceDrop::Malformed)?;
    if ip.src() != vm || ip.dst() != me {
        return Err(FenceDrop::Spoofed);
    }
    if ip.is_fragment() {
        return Err(FenceDrop::Fragment);
    }
    match ip.protocol() {
        IpProtocol::Tcp => {}
        IpProtocol::Udp => return Err(FenceDrop::Udp),
        IpProtocol::Icmp => return Err(FenceDrop::Icmp),
        _ => return Err(FenceDrop::OtherProto),
    }
    let tcp = TcpHeader::parse(ip.payload()).map_err(|_| FenceDrop::Malformed)?;
    if tcp.is_syn() && !tcp.is_ack() {
        return Err(FenceDrop::Syn);
    }
    if !opened(tcp.dst_port.get(), tcp.src_port.get()) {
        return Err(FenceDrop::UnknownFlow);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::wire::Ipv4Header;
    use zerocopy::IntoBytes;

    const VM: Ipv4Addr = Ipv4Addr::new(10, 60, 3, 2);
    const ME: Ipv4Addr = Ipv4Addr::new(10, 60, 3, 1);

    fn packet(src: Ipv4Addr, dst: Ipv4Addr, proto: IpProtocol, sport: u16, dport: u16, flags: u16) -> Vec<u8> {
        let mut l4 = vec![0u8; 20];
        l4[..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        l4[12..14].copy_from_slice(&(0x5000 | flags).to_be_bytes());
        let mut p = Ipv4Header::new(src, dst, proto, 20, 64).as_bytes().to_vec();
        p.extend_from_slice(&l4);
        p
    }

    /// The one flow we opened: our port 49200 to the VM's 22.
    fn ours(local: u16, remote: u16) -> bool {
        (local, remote) == (49200, 22)
    }

    #[test]
    fn the_vm_may_answer_our_connections_and_nothing_else() {
        let tcp = IpProtocol::Tcp;
        let cases: [(Vec<u8>, Result<(), FenceDrop>); 10] = [
            (packet(VM, ME, tcp, 22, 49200, 0x12), Ok(())), // SYN+ACK to our SYN
            (packet(VM, ME, tcp, 22, 49200, 0x10), Ok(())), // data, ACK
            (packet(VM, ME, tcp, 22, 49200, 0x04), Ok(())), // RST of our flow
            (packet(VM, ME, tcp, 22, 49200, 0x02), Err(FenceDrop::Syn)), // a SYN even on our ports
            (packet(VM, ME, tcp, 2222, 49200, 0x10), Err(FenceDrop::UnknownFlow)),
            (packet(VM, ME, tcp, 40000, 2222, 0x02), Err(FenceDrop::Syn)),
            (packet(VM, ME, IpProtocol::Udp, 5000, 5000, 0), Err(FenceDrop::Udp)),
            (packet(VM, ME, IpProtocol::Icmp, 0, 0, 0), Err(FenceDrop::Icmp)),
            (packet(Ipv4Addr::new(10, 60, 3, 9), ME, tcp, 22, 49200, 0x10), Err(FenceDrop::Spoofed)),
            (packet(VM, Ipv4Addr::new(10, 60, 4, 1), tcp, 22, 49200, 0x10), Err(FenceDrop::Spoofed)),
        ];
        for (i, (p, want)) in cases.iter().enumerate() {
            assert_eq!(admit(p, VM, ME, ours), *want, "case {i}");
        }
    }

    #[test]
    fn fragments_other_protocols_and_garbage_stay_out() {
        let mut frag = packet(VM, ME, IpProtocol::Tcp, 22, 49200, 0x10);
        frag[6] = 0x20; // more fragments
        assert_eq!(admit(&frag, VM, ME, ours), Err(FenceDrop::Fragment));
        let gre = packet(VM, ME, IpProtocol::from(47), 22, 49200, 0x10);
        assert_eq!(admit(&gre, VM, ME, ours), Err(FenceDrop::OtherProto));
        let whole = packet(VM, ME, IpProtocol::Tcp, 22, 49200, 0x10);
        for len in 0..whole.len() {
            assert!(admit(&whole[..len], VM, ME, |_, _| true).is_err(), "length {len}");
        }
        let mut v6 = whole.clone();
        v6[0] = 0x60;
        assert_eq!(admit(&v6, VM, ME, ours), Err(FenceDrop::Malformed));
    }
}
