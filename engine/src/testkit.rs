//! Frame generators for tests, fuzzing and benchmarks: the seed plan's `generateTestPacket`.
//!
//! These build owned `Vec<u8>` frames and allocate freely; the data plane never calls them.
#![forbid(unsafe_code)]

use core::net::Ipv4Addr;

use zerocopy::network_endian::U16;
use zerocopy::IntoBytes;

use crate::filter::Endpoint;
use crate::nat::VmIdentity;
use crate::wire::{csum, udp, EtherType, EthernetHeader, IpProtocol, Ipv4Header, Mac, UdpHeader};

/// The transport part of a test frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L4 {
    /// UDP with a valid checksum.
    Udp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
        /// Payload.
        payload: Vec<u8>,
    },
    /// ICMP with a valid checksum (type 8 is an echo request).
    Icmp {
        /// Type.
        kind: u8,
        /// Code.
        code: u8,
        /// Identifier.
        ident: u16,
        /// Sequence.
        seq: u16,
        /// Data.
        data: Vec<u8>,
    },
    /// A TCP SYN (20-byte header, no checksum).
    TcpSyn {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
    },
    /// Any protocol number with raw bytes.
    Raw {
        /// IP protocol number.
        protocol: u8,
        /// Bytes after the IP header.
        data: Vec<u8>,
    },
}

/// A test frame from the VM's point of view, with every field open to mutation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameSpec {
    /// Ethernet source.
    pub eth_src: Mac,
    /// Ethernet destination.
    pub eth_dst: Mac,
    /// IP source.
    pub ip_src: Ipv4Addr,
    /// IP destination.
    pub ip_dst: Ipv4Addr,
    /// TTL.
    pub ttl: u8,
    /// Flags and fragment offset field.
    pub flags_frag: u16,
    /// IP options (padded to a multiple of 4 by the builder).
    pub options: Vec<u8>,
    /// Transport.
    pub l4: L4,
}

impl FrameSpec {
    /// A UDP frame from the VM `id` to `dst`, source port 40000.
    pub fn udp(id: &VmIdentity, dst: Endpoint, payload: &[u8]) -> Self {
        Self::base(id, dst.ip, L4::Udp { src_port: 40000, dst_port: dst.port, payload: payload.to_vec() })
    }

    /// An ICMP echo request from the VM `id` to `dst`.
    pub fn icmp_echo(id: &VmIdentity, dst: Ipv4Addr, ident: u16, seq: u16, data: &[u8]) -> Self {
        Self::base(id, dst, L4::Icmp { kind: 8, code: 0, ident, seq, data: data.to_vec() })
    }

    /// A TCP SYN from the VM `id` to `dst`.
    pub fn tcp_syn(id: &VmIdentity, dst: Endpoint) -> Self {
        Self::base(id, dst.ip, L4::TcpSyn { src_port: 50000, dst_port: dst.port })
    }

    fn base(id: &VmIdentity, dst: Ipv4Addr, l4: L4) -> Self {
        Self {
            eth_src: id.mac,
            eth_dst: id.gateway_mac,
            ip_src: id.ip,
            ip_dst: dst,
            ttl: 64,
            flags_frag: Ipv4Header::DONT_FRAGMENT,
            options: Vec::new(),
            l4,
        }
    }

    /// The frame's bytes, checksums valid.
    pub fn build(&self) -> Vec<u8> {
        let (protocol, l4) = match &self.l4 {
            L4::Udp { src_port, dst_port, payload } => {
                let len = u16::try_from(payload.len() + 8).unwrap_or(u16::MAX);
                let mut h = UdpHeader {
                    src_port: U16::new(*src_port),
                    dst_port: U16::new(*dst_port),
                    len: U16::new(len),
                    checksum: U16::new(0),
                };
                h.checksum = U16::new(udp::checksum(self.ip_src, self.ip_dst, &h, payload));
                let mut v = h.as_bytes().to_vec();
                v.extend_from_slice(payload);
                (IpProtocol::Udp, v)
            }
            L4::Icmp { kind, code, ident, seq, data } => {
                let mut v = vec![*kind, *code, 0, 0];
                v.extend_from_slice(&ident.to_be_bytes());
                v.extend_from_slice(&seq.to_be_bytes());
                v.extend_from_slice(data);
                let c = csum::checksum(&v);
                v[2..4].copy_from_slice(&c.to_be_bytes());
                (IpProtocol::Icmp, v)
            }
            L4::TcpSyn { src_port, dst_port } => {
                let mut v = Vec::with_capacity(20);
                v.extend_from_slice(&src_port.to_be_bytes());
                v.extend_from_slice(&dst_port.to_be_bytes());
                v.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
                (IpProtocol::Tcp, v)
            }
            L4::Raw { protocol, data } => (IpProtocol::from(*protocol), data.clone()),
        };
        let mut options = self.options.clone();
        while !options.len().is_multiple_of(4) {
            options.push(0);
        }
        let options_len = options.len().min(40);
        options.truncate(options_len);
        let mut ip = Ipv4Header::new(self.ip_src, self.ip_dst, protocol, 0, self.ttl);
        ip.ver_ihl = 0x40 | u8::try_from(5 + options_len / 4).unwrap_or(15);
        ip.total_len = U16::new(u16::try_from(20 + options_len + l4.len()).unwrap_or(u16::MAX));
        ip.flags_frag = U16::new(self.flags_frag);
        ip.checksum = U16::new(0);
        let mut header = ip.as_bytes().to_vec();
        header.extend_from_slice(&options);
        let c = csum::checksum(&header);
        header[10..12].copy_from_slice(&c.to_be_bytes());

        let mut frame = EthernetHeader::new(self.eth_dst, self.eth_src, EtherType::Ipv4).as_bytes().to_vec();
        frame.extend_from_slice(&header);
        frame.extend_from_slice(&l4);
        frame
    }
}

/// An ARP request from the VM `id` for `target`.
pub fn arp_request(id: &VmIdentity, target: Ipv4Addr) -> Vec<u8> {
    let mut f = EthernetHeader::new(Mac::BROADCAST, id.mac, EtherType::Arp).as_bytes().to_vec();
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&id.mac.0);
    f.extend_from_slice(&id.ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// A frame of another ethertype carrying `payload`.
pub fn raw_frame(id: &VmIdentity, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = EthernetHeader::new(id.gateway_mac, id.mac, EtherType::from(ethertype)).as_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

/// A UDP frame of exactly `size` bytes (at least 42) from the VM to `dst`, like the seed plan's
/// `generateTestPacket(destIP:destPort:size:)`. The payload counts up from 0.
pub fn generate_test_packet(id: &VmIdentity, dst: Endpoint, size: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..size.saturating_sub(42)).map(|i| u8::try_from(i % 251).unwrap_or(0)).collect();
    FrameSpec::udp(id, dst, &payload).build()
}

/// Every frame kind the tests use, for corpus-style checks (cut at every length, fuzz seeds).
pub fn corpus(id: &VmIdentity, consumer: Endpoint) -> Vec<Vec<u8>> {
    let mut with_options = FrameSpec::udp(id, consumer, b"opts");
    with_options.options = vec![1, 1, 1, 0];
    let mut fragment = FrameSpec::udp(id, consumer, b"frag");
    fragment.flags_frag = Ipv4Header::MORE_FRAGMENTS;
    vec![
        generate_test_packet(id, consumer, 64),
        generate_test_packet(id, consumer, 1400),
        with_options.build(),
        fragment.build(),
        FrameSpec::icmp_echo(id, consumer.ip, 7, 1, b"ping-data").build(),
        FrameSpec::tcp_syn(id, consumer).build(),
        FrameSpec::udp(id, Endpoint::new(Ipv4Addr::new(8, 8, 8, 8), 53), b"dns?").build(),
        arp_request(id, id.gateway_ip),
        raw_frame(id, 0x86dd, &[0x60, 0, 0, 0, 0, 0, 17, 64]),
        raw_frame(id, 0x88b5, b"raw"),
        dhcp::frame(id, &dhcp::udhcpc_discover(), Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST),
        dhcp::frame(
            id,
            &dhcp::dhclient_request(id.gateway_ip.octets(), id.ip.octets()),
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
        ),
        dhcp::frame(id, &dhcp::renewal(id.ip.octets()), id.ip, id.gateway_ip),
    ]
}

/// DHCP client messages shaped as real clients send them (the order and options of their
/// messages), for tests and the fuzz corpus.
pub mod dhcp {
    use crate::wire::Mac;

    /// A client message: BOOTREQUEST from `mac` with transaction `xid`, `flags`, `ciaddr`
    /// and the options given (each `code, len, value...`), then END, padded with zeros to
    /// `pad_to`. The option sets below follow what each client sends.
    pub fn message(mac: Mac, xid: u32, flags: u16, ciaddr: [u8; 4], options: &[u8], pad_to: usize) -> Vec<u8> {
        let mut m = vec![0u8; 236];
        m[..4].copy_from_slice(&[1, 1, 6, 0]);
        m[4..8].copy_from_slice(&xid.to_be_bytes());
        m[10..12].copy_from_slice(&flags.to_be_bytes());
        m[12..16].copy_from_slice(&ciaddr);
        m[28..34].copy_from_slice(&mac.0);
        m.extend_from_slice(&[99, 130, 83, 99]);
        m.extend_from_slice(options);
        m.push(255);
        if m.len() < pad_to {
            m.resize(pad_to, 0);
        }
        m
    }

    /// The default VM's MAC, as these messages carry it.
    pub const MAC: Mac = Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

    /// busybox udhcpc's DISCOVER: type, client id, max size, parameter list, vendor class
    /// (`udhcp 1.35.0`); broadcast flag clear; the message padded to 548 bytes.
    pub fn udhcpc_discover() -> Vec<u8> {
        let mut o = vec![53, 1, 1, 61, 7, 1];
        o.extend_from_slice(&MAC.0);
        o.extend_from_slice(&[57, 2, 0x02, 0x40, 55, 7, 1, 3, 6, 12, 15, 28, 42, 60, 12]);
        o.extend_from_slice(b"udhcp 1.35.0");
        message(MAC, 0x1234_5678, 0, [0; 4], &o, 548)
    }

    /// ISC dhclient's REQUEST after an OFFER: type, requested address, server identifier,
    /// host name, parameter list; broadcast flag clear; no padding beyond 300 bytes.
    pub fn dhclient_request(server: [u8; 4], requested: [u8; 4]) -> Vec<u8> {
        let mut o = vec![53, 1, 3, 50, 4];
        o.extend_from_slice(&requested);
        o.extend_from_slice(&[54, 4]);
        o.extend_from_slice(&server);
        o.extend_from_slice(&[12, 2, b'v', b'm', 55, 13, 1, 28, 2, 3, 15, 6, 119, 12, 44, 47, 26, 121, 42]);
        message(MAC, 0xdead_beef, 0, [0; 4], &o, 300)
    }

    /// systemd-networkd's DISCOVER: broadcast flag set, type, client id (type 255, IAID and
    /// DUID), max size, parameter list; no padding.
    pub fn networkd_discover() -> Vec<u8> {
        let mut o = vec![53, 1, 1, 61, 19, 255, 0x12, 0x34, 0x56, 0x78, 0, 4];
        o.extend_from_slice(&[0xab; 12]);
        o.extend_from_slice(&[57, 2, 0x05, 0xdc, 55, 9, 1, 3, 6, 15, 26, 28, 42, 108, 121]);
        message(MAC, 0x0bad_cafe, 0x8000, [0; 4], &o, 0)
    }

    /// A renewal: REQUEST unicast from the client's address, `ciaddr` set, no option 50 or 54.
    pub fn renewal(ciaddr: [u8; 4]) -> Vec<u8> {
        message(MAC, 0x0101_0101, 0, ciaddr, &[53, 1, 3, 55, 3, 1, 3, 26], 300)
    }

    /// `msg` as a frame from the VM `id`: UDP 68 to 67, from `src` to `dst` (the limited
    /// broadcast, at the broadcast MAC, or the gateway, at its MAC).
    pub fn frame(id: &crate::VmIdentity, msg: &[u8], src: core::net::Ipv4Addr, dst: core::net::Ipv4Addr) -> Vec<u8> {
        let mut s = super::FrameSpec::udp(id, crate::Endpoint::new(dst, 67), msg);
        s.ip_src = src;
        if dst.is_broadcast() {
            s.eth_dst = Mac([0xff; 6]);
        }
        if let super::L4::Udp { src_port, .. } = &mut s.l4 {
            *src_port = 68;
        }
        s.build()
    }
}
