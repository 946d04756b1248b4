//! FilteredNAT: the pure translation between a VM's frames and host datagrams. No I/O.
//!
//! VM to host: [`FilteredNat::vm_frame`] takes one Ethernet frame and returns one
//! [`VmAction`]: an ARP reply for the gateway, a UDP payload or an ICMP echo message to forward
//! (a slice of the received frame, never a copy), a drop with its reason, or a termination.
//!
//! Host to VM: [`FilteredNat::host_udp`] and [`FilteredNat::host_icmp`] take a datagram that
//! sits in a buffer with [`HEADROOM`](crate::wire::HEADROOM) free bytes in front of it, write the
//! frame headers there, and return the frame's range. Only allowed endpoints get through.
//!
//! The checks, in order, for a frame from the VM (each failure is its own [`DropReason`]):
//! frame length against the MTU, Ethernet header present, source MAC is the VM's, ethertype
//! (ARP handled, IPv6 and others dropped), destination MAC is the gateway (broadcast only for
//! ARP), IPv4 lengths, header checksum, source IP is the VM's, destination not broadcast or
//! multicast, not a fragment, TTL not zero, transport header present, then the strategy.
//! ARCHITECTURE.md explains each decision.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used, clippy::panic))]

use core::net::Ipv4Addr;
use core::ops::Range;
use std::sync::Arc;

use hashbrown::HashMap;

use crate::filter::{Allowlist, DropReason, Endpoint, Flow, Strategy, Transport, Verdict};
use crate::wire::{
    dhcp, emit_icmp_echo_reply, emit_udp, ArpOp, ArpPacket, ArpReplyFrame, DhcpMessage, DhcpReply, DhcpRequest,
    EtherType, EthernetHeader, FrameAddrs, IcmpEchoHeader, IcmpType, IpProtocol, Ipv4Header, Ipv4Packet, Mac,
    TcpHeader, UdpHeader,
};

/// Who the VM is on its virtual link: its own addresses, its gateway, its MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmIdentity {
    /// The VM NIC's MAC address.
    pub mac: Mac,
    /// The VM's IPv4 address.
    pub ip: Ipv4Addr,
    /// Prefix length of the VM's subnet.
    pub prefix_len: u8,
    /// The gateway the VM routes through (the engine answers ARP for it).
    pub gateway_ip: Ipv4Addr,
    /// The MAC the engine answers with and sends from.
    pub gateway_mac: Mac,
    /// The VM's IP MTU; frames may be up to `mtu + 14` bytes.
    pub mtu: u16,
    /// The consumer's alias on the VM's link: the gateway's address with this UDP port. The
    /// VM sends to it (its firewall and WireGuard peer name it, written before the consumer's
    /// endpoint is known); the engine sends to the allowlist's one endpoint instead, and
    /// datagrams from that endpoint reach the VM from the alias. `None`: no alias.
    pub alias_port: Option<u16>,
}

impl Default for VmIdentity {
    /// 52:54:00:12:34:56 at 10.0.2.15/24 via 10.0.2.2 (QEMU's user-mode defaults), MTU 1500.
    fn default() -> Self {
        Self {
            mac: Mac([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]),
            ip: Ipv4Addr::new(10, 0, 2, 15),
            prefix_len: 24,
            gateway_ip: Ipv4Addr::new(10, 0, 2, 2),
            gateway_mac: Mac([0x52, 0x55, 0x0a, 0x00, 0x02, 0x02]),
            mtu: 1500,
            alias_port: None,
        }
    }
}

/// A [`VmIdentity`] that cannot work; the message names the bad field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The VM's MAC is multicast or zero.
    #[error("VM MAC {0} is not a unicast address")]
    VmMac(Mac),
    /// The gateway's MAC is multicast, zero, or the VM's.
    #[error("gateway MAC {0} must be unicast and differ from the VM's")]
    GatewayMac(Mac),
    /// The prefix length leaves no room for a VM and a gateway.
    #[error("prefix length /{0} is not in /1../30")]
    Prefix(u8),
    /// The VM's address is not a usable unicast one.
    #[error("VM address {0} is not a usable unicast address")]
    VmAddress(Ipv4Addr),
    /// The gateway is the VM's address or off its subnet.
    #[error("gateway {gateway} must be another address in {ip}/{prefix}")]
    Gateway {
        /// The gateway.
        gateway: Ipv4Addr,
        /// The VM's address.
        ip: Ipv4Addr,
        /// Its prefix length.
        prefix: u8,
    },
    /// The VM or the gateway is the subnet's broadcast address.
    #[error("{0} is the broadcast address of the subnet")]
    Broadcast(Ipv4Addr),
    /// The MTU is out of range.
    #[error("MTU {0} is not in {min}..={max}", min = VmIdentity::MTU_MIN, max = VmIdentity::MTU_MAX)]
    Mtu(u16),
    /// The alias's port is 0.
    #[error("the consumer alias's port is 0")]
    AliasPort,
}

impl VmIdentity {
    /// Smallest accepted MTU (RFC 791's 576-byte datagram).
    pub const MTU_MIN: u16 = 576;
    /// Largest accepted MTU (jumbo frames).
    pub const MTU_MAX: u16 = 9000;

    /// Checks that the identity is usable; the message names the bad field.
    pub fn validate(&self) -> Result<(), IdentityError> {
        if !self.mac.is_unicast() {
            return Err(IdentityError::VmMac(self.mac));
        }
        if !self.gateway_mac.is_unicast() || self.gateway_mac == self.mac {
            return Err(IdentityError::GatewayMac(self.gateway_mac));
        }
        if !(1..=30).contains(&self.prefix_len) {
            return Err(IdentityError::Prefix(self.prefix_len));
        }
        if crate::filter::special_class(self.ip).is_some() {
            return Err(IdentityError::VmAddress(self.ip));
        }
        if self.gateway_ip == self.ip || !self.on_link(self.gateway_ip) {
            return Err(IdentityError::Gateway { gateway: self.gateway_ip, ip: self.ip, prefix: self.prefix_len });
        }
        if self.ip == self.subnet_broadcast() || self.gateway_ip == self.subnet_broadcast() {
            return Err(IdentityError::Broadcast(self.subnet_broadcast()));
        }
        if !(Self::MTU_MIN..=Self::MTU_MAX).contains(&self.mtu) {
            return Err(IdentityError::Mtu(self.mtu));
        }
        if self.alias_port == Some(0) {
            return Err(IdentityError::AliasPort);
        }
        Ok(())
    }

    fn netmask(&self) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(self.prefix_len.min(32))).unwrap_or(0)
    }

    /// True if `ip` is in the VM's subnet.
    pub fn on_link(&self, ip: Ipv4Addr) -> bool {
        (u32::from(ip) ^ u32::from(self.ip)) & self.netmask() == 0
    }

    /// The directed broadcast address of the VM's subnet.
    pub fn subnet_broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.ip) | !self.netmask())
    }

    /// Largest frame accepted from or built for the VM.
    pub fn max_frame_len(&self) -> usize {
        usize::from(self.mtu) + EthernetHeader::LEN
    }
}

/// What to do with one frame from the VM.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmAction<'a> {
    /// Write this frame back to the VM.
    ArpReply(ArpReplyFrame),
    /// Build this DHCP reply and write it to the VM ([`DhcpReply::emit`]).
    DhcpReply(DhcpReply),
    /// Send `payload` from the VM's host UDP socket to `to`.
    ForwardUdp {
        /// The allowed consumer endpoint.
        to: Endpoint,
        /// The UDP payload, a slice of the frame.
        payload: &'a [u8],
        /// The VM sent it to the consumer's alias (`to` is the endpoint it stands for).
        via_alias: bool,
    },
    /// Send this ICMP echo request message (header and data, a slice of the frame) to `to`.
    ForwardIcmpEcho {
        /// The allowed consumer address.
        to: Ipv4Addr,
        /// The ICMP message as the VM built it.
        message: &'a [u8],
    },
    /// Drop the frame and count the reason.
    Drop(DropReason),
    /// A policy violation: stop the VM (the frame is not forwarded).
    Terminate(DropReason),
}

/// The translation state of one VM. `S` is the filtering strategy, fixed for the VM's life.
#[derive(Debug)]
pub struct FilteredNat<S> {
    id: VmIdentity,
    subnet_broadcast: Ipv4Addr,
    max_frame_len: usize,
    allow: Arc<Allowlist>,
    strategy: S,
    // For each allowed UDP endpoint, and each allowed address with port 0 for ICMP, the guest
    // source port (or echo identifier) of the last packet forwarded there. Holds only allowed
    // peers, is rebuilt with the allowlist, so it never grows on the packet path.
    peers: HashMap<Endpoint, Option<u16>>,
    // The last (endpoint, guest port) recorded, so the common case skips the map.
    last_udp: Option<(Endpoint, u16)>,
    // With an alias: the allowlist's one endpoint it stands for (kept with the list, so the
    // packet path never looks it up).
    alias_target: Option<Endpoint>,
    // With an alias and no endpoint yet: the guest port that last sent to the alias.
    unbound_port: Option<u16>,
    terminated: Option<DropReason>,
    /// The lease DHCP gives (seconds); `None`: DHCP is off.
    dhcp_lease: Option<u32>,
}

/// The lease the engine's DHCP gives by default (an hour; clients renew at half of it).
pub const DHCP_LEASE: u32 = 3600;

impl<S: Strategy> FilteredNat<S> {
    /// A translator for a VM. `id` must have passed [`VmIdentity::validate`].
    pub fn new(id: VmIdentity, allow: Arc<Allowlist>, strategy: S) -> Self {
        let mut nat = Self {
            id,
            subnet_broadcast: id.subnet_broadcast(),
            max_frame_len: id.max_frame_len(),
            allow: Arc::new(Allowlist::empty()),
            strategy,
            peers: HashMap::new(),
            dhcp_lease: Some(DHCP_LEASE),
            last_udp: None,
            alias_target: None,
            unbound_port: None,
            terminated: None,
        };
        nat.set_allowlist(allow);
        nat
    }

    /// Replaces the allowlist. Call between batches: every later packet sees the new list.
    /// Known guest ports of endpoints that stay allowed are kept; with an alias, the guest
    /// port that talked to the alias carries over to the endpoint that replaces the old one
    /// (the consumer moved: the VM's flow to its alias goes on).
    pub fn set_allowlist(&mut self, allow: Arc<Allowlist>) {
        let mut peers = HashMap::with_capacity(allow.len() * 2);
        // A UDP guest port only: an ICMP echo identifier (port 0 keys) is not one.
        let aliased =
            self.alias().and(self.last_udp.filter(|(e, _)| e.port != 0).map(|(_, port)| port)).or_else(|| {
                self.alias()?;
                self.peers.iter().filter(|(e, _)| e.port != 0).find_map(|(_, p)| *p).or(self.unbound_port)
            });
        for e in allow.endpoints() {
            let kept = self.peers.get(&e).copied().flatten().or(aliased);
            peers.insert(e, kept);
            let icmp = Endpoint::new(e.ip, 0);
            peers.insert(icmp, self.peers.get(&icmp).copied().flatten());
        }
        self.peers = peers;
        self.alias_target = self.alias().and_then(|_| allow.endpoints().first().copied());
        self.allow = allow;
        self.last_udp = None;
        self.strategy.allowlist_changed();
    }

    /// With an alias: the one endpoint it stands for now, if any.
    #[inline]
    pub fn alias_target(&self) -> Option<Endpoint> {
        self.alias_target
    }

    /// The consumer's alias on the VM's link, if it has one.
    #[inline]
    pub fn alias(&self) -> Option<Endpoint> {
        self.id.alias_port.map(|p| Endpoint::new(self.id.gateway_ip, p))
    }

    /// The current allowlist.
    pub fn allowlist(&self) -> &Arc<Allowlist> {
        &self.allow
    }

    /// Turns the VM's DHCP server on with leases of `lease` seconds, or off (`None`).
    pub fn set_dhcp(&mut self, lease: Option<u32>) {
        self.dhcp_lease = lease;
    }

    /// The VM's identity.
    pub fn identity(&self) -> &VmIdentity {
        &self.id
    }

    /// The strategy (for its counters).
    pub fn strategy(&self) -> &S {
        &self.strategy
    }

    /// The reason the VM was terminated, once it was. From then on nothing flows.
    pub fn terminated(&self) -> Option<DropReason> {
        self.terminated
    }

    /// Translates one frame from the VM.
    #[inline]
    pub fn vm_frame<'a>(&mut self, frame: &'a [u8]) -> VmAction<'a> {
        if self.terminated.is_some() {
            return VmAction::Drop(DropReason::Terminated);
        }
        match self.vm_frame_inner(frame) {
            Ok(action) => action,
            Err(reason) => VmAction::Drop(reason),
        }
    }

    fn vm_frame_inner<'a>(&mut self, frame: &'a [u8]) -> Result<VmAction<'a>, DropReason> {
        if frame.len() > self.max_frame_len {
            return Err(DropReason::FrameTooBig);
        }
        let (eth, payload) = EthernetHeader::parse(frame)?;
        if eth.src != self.id.mac {
            return Err(DropReason::EthSrcSpoofed);
        }
        match eth.ethertype() {
            EtherType::Ipv4 => {}
            EtherType::Arp => return self.arp(eth, payload),
            EtherType::Ipv6 => return Err(DropReason::EthIpv6),
            EtherType::Unknown(_) => return Err(DropReason::EthNotIp),
        }
        // A broadcast DHCP client message (DISCOVER, REQUEST while selecting or rebooting):
        // broadcast frames are rare, so only they pay for this look. Renewals, unicast to the
        // gateway, are recognised in `ipv4`.
        if eth.dst.is_broadcast() {
            if let Some(answer) = self.dhcp(payload) {
                return answer;
            }
        }
        if eth.dst.is_multicast() {
            return Err(DropReason::EthMulticastDst);
        }
        if eth.dst != self.id.gateway_mac {
            return Err(DropReason::EthDstNotGateway);
        }
        self.ipv4(payload)
    }

    fn arp<'a>(&self, eth: &EthernetHeader, payload: &[u8]) -> Result<VmAction<'a>, DropReason> {
        if eth.dst.is_multicast() && !eth.dst.is_broadcast() {
            return Err(DropReason::EthMulticastDst);
        }
        if !eth.dst.is_broadcast() && eth.dst != self.id.gateway_mac {
            return Err(DropReason::EthDstNotGateway);
        }
        let arp = ArpPacket::parse(payload)?;
        if arp.op() != ArpOp::Request {
            return Err(DropReason::ArpNotRequest);
        }
        if arp.sha != self.id.mac || arp.sender_ip() != self.id.ip {
            return Err(DropReason::ArpSpoofed);
        }
        let target = arp.target_ip();
        if target != self.id.gateway_ip && !self.allow.permits_ip(target) {
            return Err(DropReason::ArpUnknownTarget);
        }
        Ok(VmAction::ArpReply(ArpReplyFrame::new(self.id.gateway_mac, target, self.id.mac, self.id.ip)))
    }

    /// A DHCP client message (UDP 68 to 67, to the limited broadcast or the gateway) in a frame
    /// to the Ethernet broadcast address is the engine's to answer, never forwarded and never a
    /// violation; `None` for anything else.
    fn dhcp<'a>(&self, bytes: &[u8]) -> Option<Result<VmAction<'a>, DropReason>> {
        let ip = Ipv4Packet::parse(bytes).ok()?;
        if ip.protocol() != IpProtocol::Udp || !(ip.dst().is_broadcast() || ip.dst() == self.id.gateway_ip) {
            return None;
        }
        let (udp, msg) = UdpHeader::parse(ip.payload()).ok()?;
        if (udp.src_port.get(), udp.dst_port.get()) != (dhcp::CLIENT_PORT, dhcp::SERVER_PORT) {
            return None;
        }
        Some(self.dhcp_answer(&ip, msg))
    }

    /// Answers a DHCP client message `msg` carried by `ip` (in a frame from the VM's MAC to the
    /// broadcast address or the gateway's).
    fn dhcp_answer<'a>(&self, ip: &Ipv4Packet<'_>, msg: &[u8]) -> Result<VmAction<'a>, DropReason> {
        let lease = self.dhcp_lease.ok_or(DropReason::DhcpOff)?;
        if !ip.checksum_ok() {
            return Err(DropReason::Ipv4BadChecksum);
        }
        if ip.is_fragment() {
            return Err(DropReason::Ipv4Fragment);
        }
        if !ip.src().is_unspecified() && ip.src() != self.id.ip {
            return Err(DropReason::Ipv4SrcSpoofed);
        }
        let req = DhcpRequest::parse(msg)?;
        if req.chaddr != self.id.mac {
            return Err(DropReason::DhcpForeignClient);
        }
        let mut reply = DhcpReply {
            kind: DhcpMessage::Offer,
            xid: req.xid,
            flags: req.flags,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: req.chaddr,
            yiaddr: self.id.ip,
            server: self.id.gateway_ip,
            server_mac: self.id.gateway_mac,
            prefix_len: self.id.prefix_len,
            mtu: self.id.mtu,
            lease,
        };
        match req.kind {
            DhcpMessage::Discover => {}
            DhcpMessage::Request => {
                if req.server_id.is_some_and(|s| s != self.id.gateway_ip) {
                    return Err(DropReason::DhcpOtherServer);
                }
                // Selecting or rebooting name the address in option 50; renewing and rebinding
                // in ciaddr. Only the VM's own address is ever confirmed.
                let wanted = req.requested.or((!req.ciaddr.is_unspecified()).then_some(req.ciaddr));
                reply.ciaddr = req.ciaddr;
                if wanted == Some(self.id.ip) {
                    reply.kind = DhcpMessage::Ack;
                } else {
                    reply = DhcpReply { kind: DhcpMessage::Nak, yiaddr: Ipv4Addr::UNSPECIFIED, lease: 0, ..reply };
                }
            }
            DhcpMessage::Inform => {
                // Configuration only, for a client that has its address already.
                reply = DhcpReply {
                    kind: DhcpMessage::Ack,
                    ciaddr: req.ciaddr,
                    yiaddr: Ipv4Addr::UNSPECIFIED,
                    lease: 0,
                    ..reply
                };
            }
            DhcpMessage::Release | DhcpMessage::Decline => return Err(DropReason::DhcpNoReply),
            DhcpMessage::Offer | DhcpMessage::Ack | DhcpMessage::Nak => return Err(DropReason::DhcpMalformed),
        }
        Ok(VmAction::DhcpReply(reply))
    }

    fn ipv4<'a>(&mut self, bytes: &'a [u8]) -> Result<VmAction<'a>, DropReason> {
        let ip = Ipv4Packet::parse(bytes)?;
        if !ip.checksum_ok() {
            return Err(DropReason::Ipv4BadChecksum);
        }
        if ip.src() != self.id.ip {
            return Err(DropReason::Ipv4SrcSpoofed);
        }
        let dst = ip.dst();
        if dst.is_broadcast() || dst == self.subnet_broadcast {
            return Err(DropReason::Ipv4Broadcast);
        }
        if dst.is_multicast() {
            return Err(DropReason::Ipv4Multicast);
        }
        if ip.is_fragment() {
            return Err(DropReason::Ipv4Fragment);
        }
        if ip.ttl() == 0 {
            return Err(DropReason::Ipv4TtlZero);
        }
        let (flow, action) = match ip.protocol() {
            IpProtocol::Udp => {
                let (udp, payload) = UdpHeader::parse(ip.payload())?;
                // A DHCP renewal, unicast to the gateway: the engine's to answer.
                if dst == self.id.gateway_ip
                    && (udp.src_port.get(), udp.dst_port.get()) == (dhcp::CLIENT_PORT, dhcp::SERVER_PORT)
                {
                    return self.dhcp_answer(&ip, payload);
                }
                let mut to = Endpoint::new(dst, udp.dst_port.get());
                let via_alias = Some(to) == self.alias();
                if via_alias {
                    // The one endpoint the alias stands for, checked below like any other.
                    // With none yet, the guest's port is kept for the first endpoint (proved
                    // later): the consumer's first datagram reaches the guest at once.
                    let Some(target) = self.alias_target else {
                        self.unbound_port = Some(udp.src_port.get());
                        return Err(DropReason::AliasUnbound);
                    };
                    to = target;
                }
                let flow = Flow { transport: Transport::Udp, src_port: udp.src_port.get(), dst: to };
                (flow, Some(VmAction::ForwardUdp { to, payload, via_alias }))
            }
            IpProtocol::Icmp => {
                let (icmp, _) = IcmpEchoHeader::parse(ip.payload())?;
                if !icmp.is_echo(IcmpType::EchoRequest) {
                    return Err(DropReason::IcmpNotEcho);
                }
                let flow =
                    Flow { transport: Transport::IcmpEcho, src_port: icmp.ident.get(), dst: Endpoint::new(dst, 0) };
                (flow, Some(VmAction::ForwardIcmpEcho { to: dst, message: ip.payload() }))
            }
            IpProtocol::Tcp => {
                let tcp = TcpHeader::parse(ip.payload())?;
                let dst = Endpoint::new(dst, tcp.dst_port.get());
                (Flow { transport: Transport::Other(6), src_port: tcp.src_port.get(), dst }, None)
            }
            IpProtocol::Unknown(p) => {
                (Flow { transport: Transport::Other(p), src_port: 0, dst: Endpoint::new(dst, 0) }, None)
            }
        };
        match self.strategy.check(&self.allow, &flow) {
            Verdict::Forward => {
                // The egress gate: whatever a strategy skipped (a sampling draw, a known flow
                // whose endpoint has since left the list), nothing leaves for a destination
                // off the allowlist. One hash probe (~3 ns); `Full` has made it already.
                if !S::CHECKS_EVERY_PACKET {
                    if let Err(r) = self.allow.check(&flow) {
                        if S::TERMINATES {
                            self.terminated = Some(r);
                            return Ok(VmAction::Terminate(r));
                        }
                        return Err(r);
                    }
                }
                let action = action.ok_or(DropReason::ProtocolNotAllowed)?;
                self.note_peer(&flow);
                Ok(action)
            }
            Verdict::Drop(r) => Err(r),
            Verdict::Terminate(r) => {
                self.terminated = Some(r);
                Ok(VmAction::Terminate(r))
            }
        }
    }

    /// Remembers which guest port (or echo identifier) talks to an allowed peer, so replies
    /// find their way back.
    #[inline]
    fn note_peer(&mut self, flow: &Flow) {
        let key = (flow.dst, flow.src_port);
        if self.last_udp == Some(key) {
            return;
        }
        if let Some(slot) = self.peers.get_mut(&flow.dst) {
            *slot = Some(flow.src_port);
            self.last_udp = Some(key);
        }
    }

    fn addrs(&self, from: Ipv4Addr) -> FrameAddrs {
        FrameAddrs { dst_mac: self.id.mac, src_mac: self.id.gateway_mac, src_ip: from, dst_ip: self.id.ip }
    }

    fn check_fits(&self, transport_payload: usize) -> Result<(), DropReason> {
        if transport_payload + Ipv4Header::LEN + UdpHeader::LEN > usize::from(self.id.mtu) {
            return Err(DropReason::InboundTooBig);
        }
        Ok(())
    }

    /// Builds the frame for a UDP datagram from `from` whose payload is `buf[payload]`. The
    /// headers are written into `buf[payload.start - HEADROOM..payload.start]`; the returned
    /// range is the whole frame.
    pub fn host_udp(
        &mut self,
        from: Endpoint,
        buf: &mut [u8],
        payload: Range<usize>,
    ) -> Result<Range<usize>, DropReason> {
        if self.terminated.is_some() {
            return Err(DropReason::Terminated);
        }
        let guest_port = match self.peers.get(&from) {
            Some(Some(p)) if from.port != 0 => *p,
            Some(_) if from.port != 0 => return Err(DropReason::InboundNoFlow),
            _ => return Err(DropReason::InboundNotAllowed),
        };
        self.check_fits(payload.len())?;
        // With an alias the VM hears its consumer from the alias, wherever the consumer is.
        let seen = self.alias().unwrap_or(from);
        emit_udp(buf, payload, &self.addrs(seen.ip), seen.port, guest_port)
    }

    /// Builds the frame for an ICMP message from `from` held in `buf[message]`, as a ping socket
    /// returns it (echo header, then data). Only echo replies pass; the identifier is set back
    /// to the one the VM used. `message.start` must leave `HEADROOM - 8` bytes in front.
    pub fn host_icmp(
        &mut self,
        from: Ipv4Addr,
        buf: &mut [u8],
        message: Range<usize>,
    ) -> Result<Range<usize>, DropReason> {
        if self.terminated.is_some() {
            return Err(DropReason::Terminated);
        }
        // The type first: a raw ICMP socket sees every ICMP message the host receives (errors
        // about our own datagrams included), and those are noise, not inbound traffic.
        let bytes = buf.get(message.clone()).ok_or(DropReason::InboundNoHeadroom)?;
        let (hdr, data) = IcmpEchoHeader::parse(bytes)?;
        if !hdr.is_echo(IcmpType::EchoReply) {
            return Err(DropReason::IcmpNotEcho);
        }
        let ident = match self.peers.get(&Endpoint::new(from, 0)) {
            Some(Some(id)) => *id,
            Some(None) => return Err(DropReason::InboundNoFlow),
            None => return Err(DropReason::InboundNotAllowed),
        };
        let seq = hdr.seq.get();
        self.check_fits(data.len())?;
        let data_range = (message.start + IcmpEchoHeader::LEN)..message.end;
        emit_icmp_echo_reply(buf, data_range, &self.addrs(from), ident, seq)
    }
}

#[cfg(test)]
mod tests;
