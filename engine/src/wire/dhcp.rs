//! DHCP (RFC 2131, options from RFC 2132) for the one client on a VM's link: the client
//! messages the engine answers, and the replies it builds. The engine is the only DHCP server
//! a VM can reach; it never relays and never forwards a DHCP message anywhere.
//!
//! A message is BOOTP's fixed 236 bytes, the magic cookie and options (`code`, `len`, value;
//! 0 pads, 255 ends). Only what the engine needs is read: the message type (53), the
//! requested address (50) and the server identifier (54). A relayed message (`hops` or
//! `giaddr` set), a BOOTP message without a type, an option running past the end or a
//! hardware address other than Ethernet's is malformed.
use core::net::Ipv4Addr;
use core::ops::Range;

use super::emit::{emit_udp, FrameAddrs};
use super::eth::Mac;
use crate::filter::DropReason;

/// The server's (the engine's) UDP port.
pub const SERVER_PORT: u16 = 67;
/// The client's UDP port.
pub const CLIENT_PORT: u16 = 68;

/// BOOTP's fixed part: op .. file.
const FIXED: usize = 236;
/// The magic cookie that starts the options.
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// The broadcast bit of `flags`: the client cannot take unicast before it has an address.
const BROADCAST: u16 = 0x8000;
/// Length of the BOOTP message of every reply (the minimum BOOTP length; options fit).
const REPLY_LEN: usize = 300;

/// DHCP message types (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// A client looks for servers.
    Discover,
    /// A server offers an address.
    Offer,
    /// A client asks for (or renews) an address.
    Request,
    /// A client found the address in use.
    Decline,
    /// A server confirms a lease.
    Ack,
    /// A server refuses a request.
    Nak,
    /// A client gives its address back.
    Release,
    /// A client with an address asks for configuration only.
    Inform,
}

impl MessageType {
    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::Discover,
            2 => Self::Offer,
            3 => Self::Request,
            4 => Self::Decline,
            5 => Self::Ack,
            6 => Self::Nak,
            7 => Self::Release,
            8 => Self::Inform,
            _ => return None,
        })
    }

    fn code(self) -> u8 {
        match self {
            Self::Discover => 1,
            Self::Offer => 2,
            Self::Request => 3,
            Self::Decline => 4,
            Self::Ack => 5,
            Self::Nak => 6,
            Self::Release => 7,
            Self::Inform => 8,
        }
    }
}

/// What a client's message says, as far as the engine needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DhcpRequest {
    /// Its type: one a client sends.
    pub kind: MessageType,
    /// The transaction id the reply repeats.
    pub xid: u32,
    /// Flags (the broadcast bit).
    pub flags: u16,
    /// The client's address when it has one (renewals, INFORM).
    pub ciaddr: Ipv4Addr,
    /// The client's hardware address.
    pub chaddr: Mac,
    /// The address it asks for (option 50).
    pub requested: Option<Ipv4Addr>,
    /// The server it answers (option 54).
    pub server_id: Option<Ipv4Addr>,
}

fn ip_at(b: &[u8], at: usize) -> Option<Ipv4Addr> {
    let o: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(o))
}

impl DhcpRequest {
    /// Parses a client message (the UDP payload).
    pub fn parse(b: &[u8]) -> Result<Self, DropReason> {
        let bad = DropReason::DhcpMalformed;
        let fixed = b.get(..FIXED + MAGIC.len()).ok_or(bad)?;
        // op BOOTREQUEST, Ethernet addresses of 6 bytes, not relayed, the magic cookie.
        if fixed.get(..4) != Some(&[1, 1, 6, 0][..]) || fixed.get(FIXED..) != Some(&MAGIC[..]) {
            return Err(bad);
        }
        let be32 = |r: Range<usize>| fixed.get(r).and_then(|s| <[u8; 4]>::try_from(s).ok()).map(u32::from_be_bytes);
        let xid = be32(4..8).ok_or(bad)?;
        let flags = fixed.get(10..12).and_then(|s| <[u8; 2]>::try_from(s).ok()).map(u16::from_be_bytes).ok_or(bad)?;
        let ciaddr = ip_at(fixed, 12).ok_or(bad)?;
        if ip_at(fixed, 24) != Some(Ipv4Addr::UNSPECIFIED) {
            return Err(bad);
        }
        let chaddr = Mac(fixed.get(28..34).and_then(|s| <[u8; 6]>::try_from(s).ok()).ok_or(bad)?);
        let (mut kind, mut requested, mut server_id) = (None, None, None);
        let mut i = FIXED + MAGIC.len();
        while let Some(&code) = b.get(i) {
            match code {
                0 => i += 1,
                255 => break,
                _ => {
                    let len = usize::from(*b.get(i + 1).ok_or(bad)?);
                    let value = b.get(i + 2..i + 2 + len).ok_or(bad)?;
                    // The first of each wins; a length that is not the option's own is malformed.
                    match code {
                        53 => {
                            let [t] = value else { return Err(bad) };
                            if kind.is_none() {
                                kind = Some(MessageType::from_code(*t).ok_or(bad)?);
                            }
                        }
                        50 | 54 => {
                            let ip = ip_at(value, 0).filter(|_| value.len() == 4).ok_or(bad)?;
                            let slot = if code == 50 { &mut requested } else { &mut server_id };
                            slot.get_or_insert(ip);
                        }
                        _ => {}
                    }
                    i += 2 + len;
                }
            }
        }
        let kind = kind.ok_or(bad)?;
        if matches!(kind, MessageType::Offer | MessageType::Ack | MessageType::Nak) {
            return Err(bad);
        }
        Ok(Self { kind, xid, flags, ciaddr, chaddr, requested, server_id })
    }

    /// Whether the client asked for replies by broadcast.
    pub fn wants_broadcast(&self) -> bool {
        self.flags & BROADCAST != 0
    }
}

/// A reply the engine sends the VM: everything it carries, so that building it needs nothing
/// else (and no allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DhcpReply {
    /// OFFER, ACK or NAK.
    pub kind: MessageType,
    /// The request's transaction id.
    pub xid: u32,
    /// The request's flags.
    pub flags: u16,
    /// The request's `ciaddr` (renewals and INFORM are answered there).
    pub ciaddr: Ipv4Addr,
    /// The client's hardware address.
    pub chaddr: Mac,
    /// The address given (`0.0.0.0` for NAK and INFORM).
    pub yiaddr: Ipv4Addr,
    /// The server's (the gateway's) address: option 54, and the packet's source.
    pub server: Ipv4Addr,
    /// The gateway's MAC, the frame's source.
    pub server_mac: Mac,
    /// The subnet's prefix length (option 1).
    pub prefix_len: u8,
    /// The interface MTU (option 26).
    pub mtu: u16,
    /// The lease in seconds (options 51, 58, 59); 0 for none (NAK, INFORM).
    pub lease: u32,
}

impl DhcpReply {
    /// Length of every reply frame: Ethernet, IPv4, UDP and a 300-byte BOOTP message.
    pub const FRAME_LEN: usize = super::emit::HEADROOM + REPLY_LEN;

    /// Where the reply goes (RFC 2131 4.1): to `ciaddr` when the client has an address, by
    /// broadcast when it asked for that (and for every NAK), else to the address given, at the
    /// client's MAC.
    fn destination(&self) -> (Mac, Ipv4Addr) {
        if self.kind == MessageType::Nak || (self.ciaddr.is_unspecified() && self.flags & BROADCAST != 0) {
            (Mac([0xff; 6]), Ipv4Addr::BROADCAST)
        } else if !self.ciaddr.is_unspecified() {
            (self.chaddr, self.ciaddr)
        } else {
            (self.chaddr, self.yiaddr)
        }
    }

    /// Builds the reply frame at the start of `buf`: its length, or `None` if `buf` is shorter
    /// than [`DhcpReply::FRAME_LEN`].
    pub fn emit(&self, buf: &mut [u8]) -> Option<usize> {
        let frame = buf.get_mut(..Self::FRAME_LEN)?;
        frame.fill(0);
        let msg = frame.get_mut(super::emit::HEADROOM..)?;
        msg.get_mut(..4)?.copy_from_slice(&[2, 1, 6, 0]);
        msg.get_mut(4..8)?.copy_from_slice(&self.xid.to_be_bytes());
        msg.get_mut(10..12)?.copy_from_slice(&self.flags.to_be_bytes());
        msg.get_mut(12..16)?.copy_from_slice(&self.ciaddr.octets());
        msg.get_mut(16..20)?.copy_from_slice(&self.yiaddr.octets());
        msg.get_mut(28..34)?.copy_from_slice(&self.chaddr.0);
        msg.get_mut(FIXED..FIXED + 4)?.copy_from_slice(&MAGIC);
        let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix_len)).unwrap_or(0);
        let mut opts = Options { buf: msg.get_mut(FIXED + 4..)?, at: 0 };
        opts.put(53, &[self.kind.code()])?;
        opts.put(54, &self.server.octets())?;
        if self.kind != MessageType::Nak {
            if self.lease > 0 {
                opts.put(51, &self.lease.to_be_bytes())?;
                opts.put(58, &(self.lease / 2).to_be_bytes())?;
                opts.put(59, &(self.lease / 8 * 7).to_be_bytes())?;
            }
            opts.put(1, &mask.to_be_bytes())?;
            opts.put(3, &self.server.octets())?;
            opts.put(26, &self.mtu.to_be_bytes())?;
        }
        opts.put_end()?;
        let (dst_mac, dst_ip) = self.destination();
        let addrs = FrameAddrs { dst_mac, src_mac: self.server_mac, src_ip: self.server, dst_ip };
        let range = emit_udp(buf, super::emit::HEADROOM..Self::FRAME_LEN, &addrs, SERVER_PORT, CLIENT_PORT).ok()?;
        Some(range.len())
    }
}

/// Options being written.
struct Options<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Options<'_> {
    fn put(&mut self, code: u8, value: &[u8]) -> Option<()> {
        let len = u8::try_from(value.len()).ok()?;
        let end = self.at + 2 + value.len();
        let dst = self.buf.get_mut(self.at..end)?;
        dst.get_mut(..2)?.copy_from_slice(&[code, len]);
        dst.get_mut(2..)?.copy_from_slice(value);
        self.at = end;
        Some(())
    }

    fn put_end(&mut self) -> Option<()> {
        *self.buf.get_mut(self.at)? = 255;
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testkit::dhcp::{dhclient_request, message, networkd_discover, renewal, udhcpc_discover, MAC};

    #[test]
    fn parses_what_real_clients_send() {
        let d = DhcpRequest::parse(&udhcpc_discover()).unwrap();
        assert_eq!(
            (d.kind, d.xid, d.chaddr, d.requested, d.server_id),
            (MessageType::Discover, 0x1234_5678, MAC, None, None)
        );
        assert!(!d.wants_broadcast());
        let r = DhcpRequest::parse(&dhclient_request([10, 0, 2, 2], [10, 0, 2, 15])).unwrap();
        assert_eq!(r.kind, MessageType::Request);
        assert_eq!((r.requested, r.server_id), (Some(Ipv4Addr::new(10, 0, 2, 15)), Some(Ipv4Addr::new(10, 0, 2, 2))));
        let n = DhcpRequest::parse(&networkd_discover()).unwrap();
        assert!(n.wants_broadcast());
        let w = DhcpRequest::parse(&renewal([10, 0, 2, 15])).unwrap();
        assert_eq!((w.kind, w.ciaddr, w.requested), (MessageType::Request, Ipv4Addr::new(10, 0, 2, 15), None));
    }

    #[test]
    fn refuses_what_is_not_a_client_message_of_ours() {
        let good = udhcpc_discover();
        // Every truncation of the fixed part and cookie.
        for len in 0..FIXED + 4 {
            assert_eq!(DhcpRequest::parse(&good[..len]), Err(DropReason::DhcpMalformed), "length {len}");
        }
        // BOOTREPLY, another hardware type or length, relayed (hops, giaddr), no cookie.
        for (i, v) in [(0, 2u8), (1, 6), (2, 16), (3, 1), (24, 10), (FIXED, 0)] {
            let mut m = good.clone();
            m[i] = v;
            assert_eq!(DhcpRequest::parse(&m), Err(DropReason::DhcpMalformed), "byte {i} = {v}");
        }
        // No type (plain BOOTP), a server's type, an unknown type, an option past the end.
        let no_type = message(MAC, 1, 0, [0; 4], &[12, 1, b'x'], 0);
        let offer = message(MAC, 1, 0, [0; 4], &[53, 1, 2], 0);
        let unknown = message(MAC, 1, 0, [0; 4], &[53, 1, 99], 0);
        let mut past_end = message(MAC, 1, 0, [0; 4], &[53, 1, 1], 0);
        past_end.truncate(past_end.len() - 1);
        past_end.extend_from_slice(&[12, 40, b'x']);
        for (what, m) in [("no type", no_type), ("offer", offer), ("unknown", unknown), ("past end", past_end)] {
            assert_eq!(DhcpRequest::parse(&m), Err(DropReason::DhcpMalformed), "{what}");
        }
    }

    #[test]
    fn a_reply_is_a_well_formed_frame_with_the_vms_configuration() {
        let reply = DhcpReply {
            kind: MessageType::Offer,
            xid: 0x1234_5678,
            flags: 0,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: MAC,
            yiaddr: Ipv4Addr::new(10, 0, 2, 15),
            server: Ipv4Addr::new(10, 0, 2, 2),
            server_mac: Mac([0x52, 0x55, 10, 0, 2, 2]),
            prefix_len: 24,
            mtu: 1400,
            lease: 3600,
        };
        let mut buf = [0xaau8; 600];
        let n = reply.emit(&mut buf).unwrap();
        assert_eq!(n, DhcpReply::FRAME_LEN);
        let (eth, ip) = super::super::EthernetHeader::parse(&buf[..n]).unwrap();
        assert_eq!((eth.dst, eth.src), (MAC, reply.server_mac));
        let ip = super::super::Ipv4Packet::parse(ip).unwrap();
        assert!(ip.checksum_ok());
        assert_eq!((ip.src(), ip.dst()), (reply.server, reply.yiaddr));
        let (udp, msg) = super::super::UdpHeader::parse(ip.payload()).unwrap();
        assert_eq!((udp.src_port.get(), udp.dst_port.get()), (SERVER_PORT, CLIENT_PORT));
        assert_eq!(msg.len(), REPLY_LEN);
        assert_eq!(&msg[..4], &[2, 1, 6, 0]);
        assert_eq!(&msg[4..8], &0x1234_5678u32.to_be_bytes());
        assert_eq!(&msg[16..20], &[10, 0, 2, 15]);
        assert_eq!(&msg[28..34], &MAC.0);
        let opts = &msg[FIXED + 4..];
        let want: &[u8] = &[
            53, 1, 2, 54, 4, 10, 0, 2, 2, 51, 4, 0, 0, 0x0e, 0x10, 58, 4, 0, 0, 0x07, 0x08, 59, 4, 0, 0, 0x0c, 0x4e, 1,
            4, 255, 255, 255, 0, 3, 4, 10, 0, 2, 2, 26, 2, 0x05, 0x78, 255,
        ];
        assert_eq!(&opts[..want.len()], want);
        // Broadcast when asked; a NAK always, and without configuration.
        let b = DhcpReply { flags: BROADCAST, ..reply };
        assert_eq!(b.destination(), (Mac([0xff; 6]), Ipv4Addr::BROADCAST));
        let nak = DhcpReply { kind: MessageType::Nak, yiaddr: Ipv4Addr::UNSPECIFIED, lease: 0, ..reply };
        let n = nak.emit(&mut buf).unwrap();
        assert_eq!(&buf[n - REPLY_LEN + FIXED + 4..][..10], &[53, 1, 6, 54, 4, 10, 0, 2, 2, 255]);
        // Too small a buffer: no frame.
        assert_eq!(reply.emit(&mut [0u8; 100]), None);
    }
}
