//! Translation-level tests: the plan's FilteredNAT, bypass and filtered-isolation cases.
//!
//! Over 500 lines on purpose: the plan's translation cases, one independent test each.
use super::*;
use crate::filter::{Conntrack, Full, SampleRate, Sampled};
use crate::testkit::{arp_request, corpus, generate_test_packet, raw_frame, FrameSpec, L4};
use crate::wire::{ArpPacket, Ipv4Packet, HEADROOM};

const CONSUMER: Endpoint = Endpoint::new(Ipv4Addr::new(203, 0, 113, 7), 51820);
const CONSUMER2: Endpoint = Endpoint::new(Ipv4Addr::new(198, 51, 100, 20), 443);

fn id() -> VmIdentity {
    VmIdentity::default()
}
fn list(eps: &[Endpoint]) -> Arc<Allowlist> {
    Arc::new(Allowlist::new(eps.iter().copied()).unwrap())
}
fn full(eps: &[Endpoint]) -> FilteredNat<Full> {
    FilteredNat::new(id(), list(eps), Full::new())
}
fn udp_to(dst: Endpoint) -> Vec<u8> {
    FrameSpec::udp(&id(), dst, b"payload").build()
}
fn ep(a: [u8; 4], port: u16) -> Endpoint {
    Endpoint::new(Ipv4Addr::from(a), port)
}
fn forwarded_to<S: Strategy>(nat: &mut FilteredNat<S>, frame: &[u8]) -> Option<Endpoint> {
    match nat.vm_frame(frame) {
        VmAction::ForwardUdp { to, .. } => Some(to),
        _ => None,
    }
}
/// Sends a datagram from `from` through `host_udp` with proper headroom; returns the frame.
fn inbound<S: Strategy>(nat: &mut FilteredNat<S>, from: Endpoint, payload: &[u8]) -> Result<Vec<u8>, DropReason> {
    let mut buf = vec![0u8; HEADROOM + payload.len()];
    buf[HEADROOM..].copy_from_slice(payload);
    let end = buf.len();
    let r = nat.host_udp(from, &mut buf, HEADROOM..end)?;
    Ok(buf[r].to_vec())
}

// ---- FilteredNATTests -----------------------------------------------------------------------

/// seed: testAllowedEndpointPasses
#[test]
fn allowed_endpoint_passes() {
    let mut nat = full(&[CONSUMER]);
    let frame = udp_to(CONSUMER);
    match nat.vm_frame(&frame) {
        VmAction::ForwardUdp { to, payload, .. } => {
            assert_eq!(to, CONSUMER);
            assert_eq!(payload, b"payload");
            // Zero copy: the payload is the frame's own bytes at offset 42.
            assert_eq!(payload.as_ptr(), frame[42..].as_ptr());
        }
        other => panic!("expected a forward, got {other:?}"),
    }
}

/// seed: testBlockedEndpointDropped
#[test]
fn blocked_endpoint_dropped() {
    let mut nat = full(&[CONSUMER]);
    assert_eq!(nat.vm_frame(&udp_to(ep([203, 0, 113, 99], 51820))), VmAction::Drop(DropReason::NotAllowed));
    assert_eq!(nat.terminated(), None, "filtered mode drops, it does not terminate");
    assert_eq!(nat.strategy().stats().allowlist_checks, 1);
}

/// seed: testEmptyAllowlistBlocksAll
#[test]
fn empty_allowlist_blocks_all() {
    let mut nat = FilteredNat::new(id(), Arc::new(Allowlist::empty()), Full::new());
    for f in [udp_to(CONSUMER), udp_to(CONSUMER2), FrameSpec::icmp_echo(&id(), CONSUMER.ip, 1, 1, b"x").build()] {
        assert_eq!(nat.vm_frame(&f), VmAction::Drop(DropReason::NotAllowed));
    }
    assert_eq!(nat.vm_frame(&arp_request(&id(), CONSUMER.ip)), VmAction::Drop(DropReason::ArpUnknownTarget));
    assert_eq!(inbound(&mut nat, CONSUMER, b"x"), Err(DropReason::InboundNotAllowed));
}

/// seed: testMultipleAllowedEndpoints
#[test]
fn multiple_allowed_endpoints() {
    let mut nat = full(&[CONSUMER, CONSUMER2]);
    assert_eq!(forwarded_to(&mut nat, &udp_to(CONSUMER)), Some(CONSUMER));
    assert_eq!(forwarded_to(&mut nat, &udp_to(CONSUMER2)), Some(CONSUMER2));
    // Cross combinations of the two are not endpoints of the list.
    assert_eq!(
        nat.vm_frame(&udp_to(Endpoint::new(CONSUMER.ip, CONSUMER2.port))),
        VmAction::Drop(DropReason::NotAllowed)
    );
    assert_eq!(
        nat.vm_frame(&udp_to(Endpoint::new(CONSUMER2.ip, CONSUMER.port))),
        VmAction::Drop(DropReason::NotAllowed)
    );
    assert_eq!(nat.vm_frame(&udp_to(ep([8, 8, 8, 8], 53))), VmAction::Drop(DropReason::NotAllowed));
}

/// seed: testPortMismatchBlocked
#[test]
fn port_mismatch_blocked() {
    let mut nat = full(&[CONSUMER]);
    for port in [1, 53, 51819, 51821, 65535] {
        assert_eq!(nat.vm_frame(&udp_to(Endpoint::new(CONSUMER.ip, port))), VmAction::Drop(DropReason::NotAllowed));
    }
}

/// seed: testIPMismatchBlocked
#[test]
fn ip_mismatch_blocked() {
    let mut nat = full(&[CONSUMER]);
    for ip in [[203, 0, 113, 6], [203, 0, 113, 8], [7, 0, 113, 203], [10, 0, 2, 2]] {
        assert_eq!(nat.vm_frame(&udp_to(ep(ip, CONSUMER.port))), VmAction::Drop(DropReason::NotAllowed));
    }
}

/// seed: testInboundFromAllowed
#[test]
fn inbound_from_allowed() {
    let mut nat = full(&[CONSUMER]);
    let mut out = FrameSpec::udp(&id(), CONSUMER, b"hs-init");
    if let L4::Udp { src_port, .. } = &mut out.l4 {
        *src_port = 51821;
    }
    let _ = nat.vm_frame(&out.build());
    let frame = inbound(&mut nat, CONSUMER, b"hs-response").unwrap();
    let (eth, rest) = EthernetHeader::parse(&frame).unwrap();
    assert_eq!((eth.dst, eth.src), (id().mac, id().gateway_mac));
    let ip = Ipv4Packet::parse(rest).unwrap();
    assert!(ip.checksum_ok());
    assert_eq!((ip.src(), ip.dst()), (CONSUMER.ip, id().ip));
    assert_eq!(ip.ports(), Some((CONSUMER.port, 51821)), "replies go to the guest's source port");
    assert_eq!(ip.udp_payload(), Some(&b"hs-response"[..]));
}

/// seed: testInboundFromUnknown
#[test]
fn inbound_from_unknown() {
    let mut nat = full(&[CONSUMER]);
    let _ = nat.vm_frame(&udp_to(CONSUMER));
    for from in
        [ep([8, 8, 8, 8], 53), ep([192, 168, 1, 1], 51820), Endpoint::new(CONSUMER.ip, 51821), ep([10, 0, 2, 2], 51820)]
    {
        assert_eq!(inbound(&mut nat, from, b"x"), Err(DropReason::InboundNotAllowed), "{from}");
    }
    // ICMP from an unknown address is refused as well.
    let mut buf = vec![0u8; 64];
    buf[34..42].copy_from_slice(&[0, 0, 0, 0, 0, 1, 0, 1]);
    assert_eq!(nat.host_icmp(Ipv4Addr::new(8, 8, 8, 8), &mut buf, 34..64), Err(DropReason::InboundNotAllowed));
}

#[test]
fn inbound_before_any_outbound_has_no_flow() {
    let mut nat = full(&[CONSUMER]);
    assert_eq!(inbound(&mut nat, CONSUMER, b"x"), Err(DropReason::InboundNoFlow));
}

#[test]
fn inbound_too_big_for_the_mtu() {
    let mut nat = full(&[CONSUMER]);
    let _ = nat.vm_frame(&udp_to(CONSUMER));
    assert!(inbound(&mut nat, CONSUMER, &[0; 1472]).is_ok());
    assert_eq!(inbound(&mut nat, CONSUMER, &[0; 1473]), Err(DropReason::InboundTooBig));
}

/// seed: testSetAllowedEndpoint
#[test]
fn set_allowed_endpoint() {
    let mut nat = full(&[CONSUMER]);
    assert_eq!(nat.vm_frame(&udp_to(CONSUMER2)), VmAction::Drop(DropReason::NotAllowed));
    nat.set_allowlist(list(&[CONSUMER2]));
    assert_eq!(forwarded_to(&mut nat, &udp_to(CONSUMER2)), Some(CONSUMER2));
    assert_eq!(nat.vm_frame(&udp_to(CONSUMER)), VmAction::Drop(DropReason::NotAllowed), "the old endpoint is gone");
}

#[test]
fn consumer_reconnect_at_the_nat() {
    // The consumer moves to a new address; replies from the old one stop, the new one works,
    // and a port learned for an endpoint that stays allowed is kept.
    let moved = Endpoint::new(Ipv4Addr::new(198, 51, 100, 77), CONSUMER.port);
    let mut nat = FilteredNat::new(id(), list(&[CONSUMER, CONSUMER2]), Conntrack::default());
    assert!(forwarded_to(&mut nat, &udp_to(CONSUMER)).is_some());
    assert!(forwarded_to(&mut nat, &udp_to(CONSUMER2)).is_some());
    nat.set_allowlist(list(&[moved, CONSUMER2]));
    assert_eq!(inbound(&mut nat, CONSUMER, b"old"), Err(DropReason::InboundNotAllowed));
    assert!(inbound(&mut nat, CONSUMER2, b"kept").is_ok());
    assert_eq!(inbound(&mut nat, moved, b"new"), Err(DropReason::InboundNoFlow));
    assert_eq!(forwarded_to(&mut nat, &udp_to(moved)), Some(moved));
    assert!(inbound(&mut nat, moved, b"new").is_ok());
    // Conntrack: the old consumer's cached flow was flushed, so reaching it now terminates.
    assert_eq!(nat.vm_frame(&udp_to(CONSUMER)), VmAction::Terminate(DropReason::NotAllowed));
}

// ---- Strategies through the NAT -------------------------------------------------------------

/// seed: testConntrackAllowsRepeatedGoodTraffic
#[test]
fn conntrack_allows_repeated_good_traffic() {
    let mut nat = FilteredNat::new(id(), list(&[CONSUMER]), Conntrack::default());
    let frame = udp_to(CONSUMER);
    for _ in 0..10_000 {
        assert_eq!(forwarded_to(&mut nat, &frame), Some(CONSUMER));
    }
    assert_eq!(nat.terminated(), None);
    assert_eq!(nat.strategy().stats().allowlist_checks, 1);
    assert_eq!(nat.strategy().stats().fast_path, 9_999);
}

#[test]
fn conntrack_violation_terminates_and_stops_everything() {
    let mut nat = FilteredNat::new(id(), list(&[CONSUMER]), Conntrack::default());
    assert!(forwarded_to(&mut nat, &udp_to(CONSUMER)).is_some());
    assert_eq!(nat.vm_frame(&udp_to(ep([8, 8, 8, 8], 53))), VmAction::Terminate(DropReason::NotAllowed));
    assert_eq!(nat.terminated(), Some(DropReason::NotAllowed));
    // From now on nothing flows, in either direction, not even to the consumer.
    assert_eq!(nat.vm_frame(&udp_to(CONSUMER)), VmAction::Drop(DropReason::Terminated));
    assert_eq!(inbound(&mut nat, CONSUMER, b"x"), Err(DropReason::Terminated));
    // A TCP connection attempt is a violation as well.
    let mut nat = FilteredNat::new(id(), list(&[CONSUMER]), Conntrack::default());
    assert_eq!(
        nat.vm_frame(&FrameSpec::tcp_syn(&id(), CONSUMER).build()),
        VmAction::Terminate(DropReason::ProtocolNotAllowed)
    );
}

#[test]
fn structural_drops_never_terminate() {
    // Malformed or non-IPv4 frames are dropped in every mode; only policy violations terminate.
    let mut nat = FilteredNat::new(id(), list(&[CONSUMER]), Conntrack::default());
    let mut bcast = FrameSpec::udp(&id(), ep([255, 255, 255, 255], 67), b"dhcp");
    bcast.eth_dst = Mac::BROADCAST;
    for f in [raw_frame(&id(), 0x86dd, &[0x60; 40]), bcast.build(), vec![0u8; 10]] {
        assert!(matches!(nat.vm_frame(&f), VmAction::Drop(_)));
    }
    assert_eq!(nat.terminated(), None);
}

#[test]
fn sampled_mode_terminates_on_a_checked_violation() {
    let mut nat = FilteredNat::new(id(), list(&[CONSUMER]), Sampled::new(SampleRate::new(1.0).unwrap(), 5));
    assert_eq!(nat.vm_frame(&udp_to(ep([192, 168, 1, 1], 80))), VmAction::Terminate(DropReason::NotAllowed));
    // A packet the draw does not check meets the egress gate all the same: TCP, or a
    // destination off the list, terminates the VM; nothing is forwarded unchecked.
    for (frame, reason) in [
        (FrameSpec::tcp_syn(&id(), CONSUMER).build(), DropReason::ProtocolNotAllowed),
        (udp_to(ep([127, 0, 0, 1], 53)), DropReason::NotAllowed),
        (udp_to(ep([0, 0, 0, 0], 53)), DropReason::NotAllowed),
    ] {
        let mut nat =
            FilteredNat::new(id(), list(&[CONSUMER]), Sampled::new(SampleRate::new(f64::MIN_POSITIVE).unwrap(), 5));
        assert!(matches!(nat.vm_frame(&udp_to(CONSUMER)), VmAction::ForwardUdp { .. }));
        assert_eq!(nat.vm_frame(&frame), VmAction::Terminate(reason));
        assert_eq!(nat.strategy().stats().allowlist_checks, 0, "the draw checked nothing");
    }
}

#[test]
fn conntrack_never_forwards_to_an_endpoint_that_left_the_list() {
    let other = ep([198, 51, 100, 9], 4000);
    let mut nat = FilteredNat::new(id(), list(&[CONSUMER, other]), Conntrack::new(16));
    assert!(matches!(nat.vm_frame(&udp_to(other)), VmAction::ForwardUdp { .. }));
    nat.set_allowlist(list(&[CONSUMER]));
    assert_eq!(nat.vm_frame(&udp_to(other)), VmAction::Terminate(DropReason::NotAllowed));
}

// ---- ARP and ICMP ---------------------------------------------------------------------------

#[test]
fn arp_for_the_gateway_is_answered() {
    let mut nat = full(&[CONSUMER]);
    let VmAction::ArpReply(reply) = nat.vm_frame(&arp_request(&id(), id().gateway_ip)) else { panic!("no ARP reply") };
    let bytes = zerocopy::IntoBytes::as_bytes(&reply);
    let (eth, rest) = EthernetHeader::parse(bytes).unwrap();
    assert_eq!((eth.dst, eth.src), (id().mac, id().gateway_mac));
    let arp = ArpPacket::parse(rest).unwrap();
    assert_eq!((arp.sha, arp.sender_ip()), (id().gateway_mac, id().gateway_ip));
    assert_eq!((arp.tha, arp.target_ip()), (id().mac, id().ip));
    // An allowed consumer's address is answered too (the VM may reach it); nothing else is.
    assert!(matches!(nat.vm_frame(&arp_request(&id(), CONSUMER.ip)), VmAction::ArpReply(_)));
    for other in [Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(10, 0, 2, 16), Ipv4Addr::new(192, 168, 1, 1)] {
        assert_eq!(nat.vm_frame(&arp_request(&id(), other)), VmAction::Drop(DropReason::ArpUnknownTarget));
    }
}

#[test]
fn arp_spoofing_and_replies_are_dropped() {
    let mut nat = full(&[CONSUMER]);
    let mut f = arp_request(&id(), id().gateway_ip);
    f[28..32].copy_from_slice(&[10, 0, 2, 99]); // sender IP
    assert_eq!(nat.vm_frame(&f), VmAction::Drop(DropReason::ArpSpoofed));
    let mut f = arp_request(&id(), id().gateway_ip);
    f[21] = 2; // a reply
    assert_eq!(nat.vm_frame(&f), VmAction::Drop(DropReason::ArpNotRequest));
    let mut f = arp_request(&id(), id().gateway_ip);
    f[0..6].copy_from_slice(&[0x01, 0, 0x5e, 0, 0, 1]);
    assert_eq!(nat.vm_frame(&f), VmAction::Drop(DropReason::EthMulticastDst));
    let f = arp_request(&id(), id().gateway_ip);
    assert_eq!(nat.vm_frame(&f[..30]), VmAction::Drop(DropReason::ArpMalformed));
}

#[test]
fn icmp_echo_round_trip() {
    let mut nat = full(&[CONSUMER]);
    let frame = FrameSpec::icmp_echo(&id(), CONSUMER.ip, 0x4242, 3, b"ping-data").build();
    match nat.vm_frame(&frame) {
        VmAction::ForwardIcmpEcho { to, message } => {
            assert_eq!(to, CONSUMER.ip);
            assert_eq!(&message[..1], &[8]);
            assert_eq!(&message[8..], b"ping-data");
        }
        other => panic!("expected an ICMP forward, got {other:?}"),
    }
    // The reply arrives from a ping socket with the socket's own identifier (77).
    let mut buf = vec![0u8; 34 + 8 + 9];
    buf[34..42].copy_from_slice(&[0, 0, 0, 0, 0, 77, 0, 3]);
    buf[42..].copy_from_slice(b"ping-data");
    let r = nat.host_icmp(CONSUMER.ip, &mut buf, 34..51).unwrap();
    let ip = Ipv4Packet::parse(&buf[r][14..]).unwrap();
    assert!(ip.checksum_ok());
    let (h, data) = IcmpEchoHeader::parse(ip.payload()).unwrap();
    assert!(h.is_echo(IcmpType::EchoReply));
    assert_eq!((h.ident.get(), h.seq.get(), data), (0x4242, 3, &b"ping-data"[..]));
    assert!(crate::wire::csum::verifies(ip.payload()));
    // Only echo replies come back.
    let mut buf = vec![0u8; 50];
    buf[34..42].copy_from_slice(&[3, 1, 0, 0, 0, 0, 0, 0]);
    assert_eq!(nat.host_icmp(CONSUMER.ip, &mut buf, 34..50), Err(DropReason::IcmpNotEcho));
    // ICMP other than echo request from the VM is dropped.
    let mut spec = FrameSpec::icmp_echo(&id(), CONSUMER.ip, 1, 1, b"");
    spec.l4 = L4::Icmp { kind: 13, code: 0, ident: 1, seq: 1, data: vec![] };
    assert_eq!(nat.vm_frame(&spec.build()), VmAction::Drop(DropReason::IcmpNotEcho));
}

// ---- SecurityBypassTests --------------------------------------------------------------------

/// seed: testSpoofedSourceIP
#[test]
fn spoofed_source_ip() {
    let mut nat = full(&[CONSUMER]);
    for src in [
        Ipv4Addr::new(10, 0, 2, 16),
        Ipv4Addr::new(203, 0, 113, 7),
        Ipv4Addr::new(0, 0, 0, 0),
        Ipv4Addr::new(127, 0, 0, 1),
    ] {
        let mut f = FrameSpec::udp(&id(), CONSUMER, b"x");
        f.ip_src = src;
        assert_eq!(nat.vm_frame(&f.build()), VmAction::Drop(DropReason::Ipv4SrcSpoofed), "{src}");
    }
}

/// seed: testSpoofedSourceMAC
#[test]
fn spoofed_source_mac() {
    let mut nat = full(&[CONSUMER]);
    for mac in [Mac([0x52, 0x54, 0, 0x12, 0x34, 0x57]), id().gateway_mac, Mac([0; 6]), Mac::BROADCAST] {
        let mut f = FrameSpec::udp(&id(), CONSUMER, b"x");
        f.eth_src = mac;
        assert_eq!(nat.vm_frame(&f.build()), VmAction::Drop(DropReason::EthSrcSpoofed), "{mac}");
        let mut arp = arp_request(&id(), id().gateway_ip);
        arp[6..12].copy_from_slice(&mac.0);
        assert_eq!(nat.vm_frame(&arp), VmAction::Drop(DropReason::EthSrcSpoofed));
    }
}

/// seed: testFragmentedPacket
#[test]
fn fragmented_packet() {
    let mut nat = full(&[CONSUMER]);
    // First fragment (MF set, offset 0: it even carries the right port), a middle and a last one.
    for flags in [Ipv4Header::MORE_FRAGMENTS, Ipv4Header::MORE_FRAGMENTS | 185, 185] {
        let mut f = FrameSpec::udp(&id(), CONSUMER, b"fragment");
        f.flags_frag = flags;
        assert_eq!(nat.vm_frame(&f.build()), VmAction::Drop(DropReason::Ipv4Fragment), "{flags:#x}");
    }
}

/// seed: testOversizedPacket
#[test]
fn oversized_packet() {
    let mut nat = full(&[CONSUMER]);
    assert!(forwarded_to(&mut nat, &generate_test_packet(&id(), CONSUMER, 1514)).is_some());
    for size in [1515, 9018, 65_000] {
        assert_eq!(nat.vm_frame(&generate_test_packet(&id(), CONSUMER, size)), VmAction::Drop(DropReason::FrameTooBig));
    }
    // A jumbo MTU, configured on purpose, accepts jumbo frames.
    let jumbo = VmIdentity { mtu: 9000, ..id() };
    let mut nat = FilteredNat::new(jumbo, list(&[CONSUMER]), Full::new());
    assert!(forwarded_to(&mut nat, &generate_test_packet(&jumbo, CONSUMER, 9014)).is_some());
}

/// seed: testMalformedIPHeader
#[test]
fn malformed_ip_header() {
    let mut nat = full(&[CONSUMER]);
    let good = udp_to(CONSUMER);
    let cases: [(usize, u8, DropReason); 6] = [
        (14, 0x65, DropReason::Ipv4BadVersion),
        (14, 0x44, DropReason::Ipv4BadIhl),
        (14, 0x4f, DropReason::Ipv4BadIhl),
        (16, 0xff, DropReason::Ipv4BadTotalLen),
        (22, 0, DropReason::Ipv4TtlZero),
        (24, 0x00, DropReason::Ipv4BadChecksum),
    ];
    for (at, value, reason) in cases {
        let mut f = good.clone();
        f[at] = value;
        if reason == DropReason::Ipv4TtlZero {
            // Keep the checksum right so the TTL check is what trips.
            f[24] = 0;
            f[25] = 0;
            let c = crate::wire::csum::checksum(&f[14..34]);
            f[24..26].copy_from_slice(&c.to_be_bytes());
        }
        assert_eq!(nat.vm_frame(&f), VmAction::Drop(reason), "byte {at} = {value:#x}");
    }
    // UDP length beyond the IP payload.
    let mut f = good.clone();
    f[38..40].copy_from_slice(&500u16.to_be_bytes());
    assert_eq!(nat.vm_frame(&f), VmAction::Drop(DropReason::UdpBadLength));
    // Header present but the transport header cut short (total length adjusted, checksum fixed).
    let mut spec = FrameSpec::udp(&id(), CONSUMER, b"");
    spec.l4 = L4::Raw { protocol: 17, data: vec![1, 2, 3] };
    assert_eq!(nat.vm_frame(&spec.build()), VmAction::Drop(DropReason::UdpTruncated));
}

/// seed: testMalformedEthernetFrame
#[test]
fn malformed_ethernet_frame() {
    let mut nat = full(&[CONSUMER]);
    let good = udp_to(CONSUMER);
    for len in 0..14 {
        assert_eq!(nat.vm_frame(&good[..len]), VmAction::Drop(DropReason::EthTruncated), "len {len}");
    }
    assert_eq!(nat.vm_frame(&good[..14]), VmAction::Drop(DropReason::Ipv4Truncated));
    // Unicast to a MAC that is not the gateway: there is no one else on the link.
    let mut f = good.clone();
    f[0..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 9]);
    assert_eq!(nat.vm_frame(&f), VmAction::Drop(DropReason::EthDstNotGateway));
    let mut f = good;
    f[0..6].copy_from_slice(&[0xff; 6]);
    assert_eq!(nat.vm_frame(&f), VmAction::Drop(DropReason::EthMulticastDst));
}

#[test]
fn rapid_endpoint_changes_at_the_nat() {
    // The list changes between every packet; each packet is judged by the list in force at
    // that moment, never by a mix or a stale cache, in both directions and in every mode.
    let a = CONSUMER;
    let b = CONSUMER2;
    let lists = [list(&[a]), list(&[b]), list(&[a, b]), Arc::new(Allowlist::empty())];
    let mut full_nat = full(&[a]);
    let mut ct_nat = FilteredNat::new(id(), list(&[a, b]), Conntrack::default());
    for i in 0..4_000 {
        let l = &lists[i % lists.len()];
        full_nat.set_allowlist(l.clone());
        for dst in [a, b] {
            let got = forwarded_to(&mut full_nat, &udp_to(dst));
            assert_eq!(got.is_some(), l.permits(dst), "round {i}, {dst}");
            if got.is_some() {
                assert!(inbound(&mut full_nat, dst, b"r").is_ok());
            } else {
                assert!(inbound(&mut full_nat, dst, b"r").is_err());
            }
        }
        if l.len() == 2 {
            ct_nat.set_allowlist(l.clone());
            assert!(forwarded_to(&mut ct_nat, &udp_to(a)).is_some());
        }
    }
    assert_eq!(ct_nat.terminated(), None);
}

/// seed: testIPv6Blocked
#[test]
fn ipv6_blocked() {
    let mut nat = full(&[CONSUMER]);
    // A neighbour solicitation to a multicast MAC and a unicast IPv6 UDP packet to the gateway.
    let mut ns = raw_frame(&id(), 0x86dd, &[0x60, 0, 0, 0, 0, 32, 58, 255]);
    ns[0..6].copy_from_slice(&[0x33, 0x33, 0xff, 0, 0, 2]);
    assert_eq!(nat.vm_frame(&ns), VmAction::Drop(DropReason::EthIpv6));
    let mut v6 = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
    v6.extend_from_slice(&[0; 40]);
    assert_eq!(nat.vm_frame(&raw_frame(&id(), 0x86dd, &v6)), VmAction::Drop(DropReason::EthIpv6));
}

/// seed: testNonIPProtocol
#[test]
fn non_ip_protocol() {
    let mut nat = full(&[CONSUMER]);
    for et in [0x88b5u16, 0x8100, 0x88cc, 0x8035, 0x0000, 0x05dc, 0xffff] {
        assert_eq!(
            nat.vm_frame(&raw_frame(&id(), et, b"raw ethernet")),
            VmAction::Drop(DropReason::EthNotIp),
            "{et:#06x}"
        );
    }
    // IP protocols other than UDP and ICMP are not forwarded either (GRE, ESP, SCTP).
    for p in [47u8, 50, 132] {
        let mut f = FrameSpec::udp(&id(), CONSUMER, b"");
        f.l4 = L4::Raw { protocol: p, data: vec![0; 16] };
        assert_eq!(nat.vm_frame(&f.build()), VmAction::Drop(DropReason::ProtocolNotAllowed));
    }
}

// ---- SecurityIsolationTests (filtered mode, translation level) -------------------------------

fn assert_blocked(nat: &mut FilteredNat<Full>, dst: Ipv4Addr) {
    for port in [53, 80, 443, 22, CONSUMER.port] {
        assert_eq!(
            nat.vm_frame(&udp_to(Endpoint::new(dst, port))),
            VmAction::Drop(DropReason::NotAllowed),
            "{dst}:{port}"
        );
        assert_eq!(
            nat.vm_frame(&FrameSpec::tcp_syn(&id(), Endpoint::new(dst, port)).build()),
            VmAction::Drop(DropReason::ProtocolNotAllowed)
        );
    }
    assert_eq!(
        nat.vm_frame(&FrameSpec::icmp_echo(&id(), dst, 1, 1, b"p").build()),
        VmAction::Drop(DropReason::NotAllowed)
    );
    // Nothing can come back from it either.
    assert_eq!(inbound(nat, Endpoint::new(dst, 53), b"r"), Err(DropReason::InboundNotAllowed));
}

/// seed: testFilteredVMCannotReachInternet
#[test]
fn filtered_vm_cannot_reach_internet() {
    let mut nat = full(&[CONSUMER]);
    assert_blocked(&mut nat, Ipv4Addr::new(8, 8, 8, 8));
    assert_blocked(&mut nat, Ipv4Addr::new(1, 1, 1, 1));
}

/// seed: testFilteredVMCannotReachProviderLAN
#[test]
fn filtered_vm_cannot_reach_provider_lan() {
    let mut nat = full(&[CONSUMER]);
    for ip in [[192, 168, 1, 1], [192, 168, 0, 10], [10, 0, 0, 1], [172, 16, 0, 1]] {
        assert_blocked(&mut nat, Ipv4Addr::from(ip));
    }
}

/// seed: testFilteredVMCannotReachProviderHost
#[test]
fn filtered_vm_cannot_reach_provider_host() {
    let mut nat = full(&[CONSUMER]);
    // The gateway address stands for the host; loopback and the metadata service too.
    assert_blocked(&mut nat, id().gateway_ip);
    assert_blocked(&mut nat, Ipv4Addr::new(127, 0, 0, 1));
    assert_blocked(&mut nat, Ipv4Addr::new(169, 254, 169, 254));
    let mut f = FrameSpec::udp(&id(), Endpoint::new(Ipv4Addr::new(0, 0, 0, 0), 22), b"x");
    f.ip_dst = Ipv4Addr::UNSPECIFIED;
    assert_eq!(nat.vm_frame(&f.build()), VmAction::Drop(DropReason::NotAllowed));
}

/// seed: testFilteredVMCannotReachOtherVMs
#[test]
fn filtered_vm_cannot_reach_other_vms() {
    let mut nat = full(&[CONSUMER]);
    // Neighbours in the same subnet, by IP and by MAC, and the subnet broadcast.
    assert_blocked(&mut nat, Ipv4Addr::new(10, 0, 2, 16));
    let mut f = FrameSpec::udp(&id(), Endpoint::new(Ipv4Addr::new(10, 0, 2, 16), 51820), b"x");
    f.eth_dst = Mac([0x52, 0x54, 0, 0x12, 0x34, 0x57]);
    assert_eq!(nat.vm_frame(&f.build()), VmAction::Drop(DropReason::EthDstNotGateway));
    assert_eq!(nat.vm_frame(&udp_to(ep([10, 0, 2, 255], 51820))), VmAction::Drop(DropReason::Ipv4Broadcast));
    assert_eq!(nat.vm_frame(&udp_to(ep([224, 0, 0, 251], 5353))), VmAction::Drop(DropReason::Ipv4Multicast));
    assert_eq!(
        nat.vm_frame(&arp_request(&id(), Ipv4Addr::new(10, 0, 2, 16))),
        VmAction::Drop(DropReason::ArpUnknownTarget)
    );
}

/// seed: testFilteredVMCannotScanPorts
#[test]
fn filtered_vm_cannot_scan_ports() {
    let mut nat = full(&[CONSUMER]);
    let mut forwarded = 0;
    for port in 1..=u16::MAX {
        for dst in [CONSUMER.ip, Ipv4Addr::new(192, 168, 1, 1)] {
            if forwarded_to(&mut nat, &udp_to(Endpoint::new(dst, port))).is_some() {
                forwarded += 1;
            }
        }
        if port % 64 == 0 {
            assert!(matches!(
                nat.vm_frame(&FrameSpec::tcp_syn(&id(), Endpoint::new(CONSUMER.ip, port)).build()),
                VmAction::Drop(DropReason::ProtocolNotAllowed)
            ));
        }
    }
    assert_eq!(forwarded, 1, "only the consumer's own port answers the scan");
}

/// seed: testFilteredDNSBlocked
#[test]
fn filtered_dns_blocked() {
    let mut nat = full(&[CONSUMER]);
    // A DNS query for example.com to public resolvers, the gateway, and the subnet broadcast.
    let query = [
        0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 3, b'c', b'o', b'm', 0,
        0, 1, 0, 1,
    ];
    for dst in [[8, 8, 8, 8], [1, 1, 1, 1], [10, 0, 2, 2], [10, 0, 2, 3]] {
        let f = FrameSpec::udp(&id(), ep(dst, 53), &query).build();
        assert_eq!(nat.vm_frame(&f), VmAction::Drop(DropReason::NotAllowed));
    }
}

// ---- Negative space -------------------------------------------------------------------------

#[test]
fn every_corpus_frame_cut_at_every_length_is_dropped_without_panic() {
    let mut nat = full(&[CONSUMER]);
    for frame in corpus(&id(), CONSUMER) {
        let whole = nat.vm_frame(&frame);
        for len in 0..frame.len() {
            let cut = &frame[..len];
            match nat.vm_frame(cut) {
                VmAction::Drop(_) => {}
                // A cut that only removes bytes past a shorter declared length is still the
                // same packet (cannot happen for our corpus, whose lengths are exact).
                other => panic!(
                    "frame {:02x?} cut to {len} gave {other:?} (whole: {whole:?})",
                    &frame[..14.min(frame.len())]
                ),
            }
        }
    }
}

#[test]
fn every_length_field_at_its_edges() {
    // Each length field set to 0, 1, max, and one off either way of its true value.
    let mut nat = full(&[CONSUMER]);
    let good = udp_to(CONSUMER);
    let ip_total = u16::from_be_bytes([good[16], good[17]]);
    let udp_len = u16::from_be_bytes([good[38], good[39]]);
    for (at, truth) in [(16usize, ip_total), (38, udp_len)] {
        for v in [0, 1, truth - 1, truth + 1, u16::MAX] {
            let mut f = good.clone();
            f[at..at + 2].copy_from_slice(&v.to_be_bytes());
            if at == 16 {
                f[24] = 0;
                f[25] = 0;
                let c = crate::wire::csum::checksum(&f[14..34]);
                f[24..26].copy_from_slice(&c.to_be_bytes());
            }
            let got = nat.vm_frame(&f);
            // UDP length one short just trims a byte: still a forward, but of a shorter payload.
            if at == 38 && v == truth - 1 {
                assert!(matches!(got, VmAction::ForwardUdp { payload, .. } if payload.len() == usize::from(v) - 8));
            } else {
                assert!(matches!(got, VmAction::Drop(_)), "field at {at} = {v}: {got:?}");
            }
        }
    }
}

#[test]
fn identity_validation() {
    assert_eq!(id().validate(), Ok(()));
    let bad = [
        VmIdentity { mac: Mac::BROADCAST, ..id() },
        VmIdentity { gateway_mac: id().mac, ..id() },
        VmIdentity { prefix_len: 0, ..id() },
        VmIdentity { prefix_len: 31, ..id() },
        VmIdentity { gateway_ip: Ipv4Addr::new(10, 0, 3, 2), ..id() },
        VmIdentity { gateway_ip: id().ip, ..id() },
        VmIdentity { ip: Ipv4Addr::new(127, 0, 0, 2), ..id() },
        VmIdentity { gateway_ip: Ipv4Addr::new(10, 0, 2, 255), ..id() },
        VmIdentity { mtu: 575, ..id() },
        VmIdentity { mtu: 9001, ..id() },
    ];
    for b in bad {
        let e = b.validate().unwrap_err();
        assert!(!e.to_string().is_empty());
    }
    assert_eq!(id().subnet_broadcast(), Ipv4Addr::new(10, 0, 2, 255));
    assert!(id().on_link(Ipv4Addr::new(10, 0, 2, 200)) && !id().on_link(Ipv4Addr::new(10, 0, 3, 1)));
}

// ---- Model-based property test --------------------------------------------------------------

mod model {
    use super::*;
    use proptest::prelude::*;
    use proptest::strategy::Strategy as Gen;

    fn arb_spec() -> impl Gen<Value = FrameSpec> {
        let macs = prop_oneof![Just(id().mac), Just(Mac([0x52, 0x54, 0, 0, 0, 9])), Just(Mac::BROADCAST)];
        let dst_macs = prop_oneof![4 => Just(id().gateway_mac), 1 => Just(Mac::BROADCAST), 1 => Just(Mac([0x52, 0x54, 0, 0, 0, 9])), 1 => Just(Mac([1, 0, 0x5e, 0, 0, 1]))];
        let srcs = prop_oneof![4 => Just(id().ip), 1 => Just(Ipv4Addr::new(10, 0, 2, 16))];
        let dsts = prop_oneof![
            4 => Just(CONSUMER.ip),
            1 => Just(Ipv4Addr::new(8, 8, 8, 8)),
            1 => Just(Ipv4Addr::new(192, 168, 1, 1)),
            1 => Just(Ipv4Addr::new(255, 255, 255, 255)),
            1 => Just(Ipv4Addr::new(10, 0, 2, 255)),
            1 => Just(Ipv4Addr::new(239, 1, 2, 3)),
            1 => any::<u32>().prop_map(Ipv4Addr::from),
        ];
        let ports = prop_oneof![4 => Just(CONSUMER.port), 1 => any::<u16>()];
        let l4 = prop_oneof![
            4 => (any::<u16>(), ports.clone(), proptest::collection::vec(any::<u8>(), 0..64))
                .prop_map(|(s, d, p)| L4::Udp { src_port: s, dst_port: d, payload: p }),
            2 => (prop_oneof![4 => Just(8u8), 1 => any::<u8>()], prop_oneof![4 => Just(0u8), 1 => any::<u8>()], any::<u16>(), any::<u16>())
                .prop_map(|(k, c, i, s)| L4::Icmp { kind: k, code: c, ident: i, seq: s, data: b"data".to_vec() }),
            1 => (any::<u16>(), ports).prop_map(|(s, d)| L4::TcpSyn { src_port: s, dst_port: d }),
        ];
        let frags =
            prop_oneof![6 => Just(Ipv4Header::DONT_FRAGMENT), 1 => Just(Ipv4Header::MORE_FRAGMENTS), 1 => Just(3u16)];
        let ttls = prop_oneof![6 => Just(64u8), 1 => Just(0u8), 1 => Just(1u8)];
        (macs, dst_macs, srcs, dsts, ttls, frags, l4, proptest::collection::vec(any::<u8>(), 0..3)).prop_map(
            |(eth_src, eth_dst, ip_src, ip_dst, ttl, flags_frag, l4, opt)| FrameSpec {
                eth_src,
                eth_dst,
                ip_src,
                ip_dst,
                ttl,
                flags_frag,
                options: if opt.len() == 2 { vec![1, 1, 1, 0] } else { vec![] },
                l4,
            },
        )
    }

    /// What filtered mode must do with a well-formed frame, written as plainly as possible.
    fn expected(s: &FrameSpec) -> Result<Endpoint, DropReason> {
        let vm = id();
        if s.eth_src != vm.mac {
            return Err(DropReason::EthSrcSpoofed);
        }
        if s.eth_dst.0[0] & 1 == 1 {
            return Err(DropReason::EthMulticastDst);
        }
        if s.eth_dst != vm.gateway_mac {
            return Err(DropReason::EthDstNotGateway);
        }
        if s.ip_src != vm.ip {
            return Err(DropReason::Ipv4SrcSpoofed);
        }
        if s.ip_dst == Ipv4Addr::BROADCAST || s.ip_dst == Ipv4Addr::new(10, 0, 2, 255) {
            return Err(DropReason::Ipv4Broadcast);
        }
        if s.ip_dst.octets()[0] >= 224 && s.ip_dst.octets()[0] < 240 {
            return Err(DropReason::Ipv4Multicast);
        }
        if s.flags_frag != Ipv4Header::DONT_FRAGMENT {
            return Err(DropReason::Ipv4Fragment);
        }
        if s.ttl == 0 {
            return Err(DropReason::Ipv4TtlZero);
        }
        match &s.l4 {
            L4::Udp { dst_port, .. } if s.ip_dst == CONSUMER.ip && *dst_port == CONSUMER.port => Ok(CONSUMER),
            L4::Udp { .. } => Err(DropReason::NotAllowed),
            L4::Icmp { kind: 8, code: 0, .. } if s.ip_dst == CONSUMER.ip => Ok(Endpoint::new(CONSUMER.ip, 0)),
            L4::Icmp { kind: 8, code: 0, .. } => Err(DropReason::NotAllowed),
            L4::Icmp { .. } => Err(DropReason::IcmpNotEcho),
            L4::TcpSyn { .. } | L4::Raw { .. } => Err(DropReason::ProtocolNotAllowed),
        }
    }

    fn actual(action: VmAction<'_>) -> Result<Endpoint, DropReason> {
        match action {
            VmAction::ForwardUdp { to, .. } => Ok(to),
            VmAction::ForwardIcmpEcho { to, .. } => Ok(Endpoint::new(to, 0)),
            VmAction::Drop(r) | VmAction::Terminate(r) => Err(r),
            VmAction::ArpReply(_) => Err(DropReason::EthNotIp),
            VmAction::DhcpReply(_) => Err(DropReason::DhcpNoReply),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn valid_frames_match_the_model(spec in arb_spec()) {
            let mut nat = full(&[CONSUMER]);
            let frame = spec.build();
            prop_assert_eq!(actual(nat.vm_frame(&frame)), expected(&spec), "{:?}", spec);
        }

        #[test]
        fn mutated_frames_never_panic_or_leak(spec in arb_spec(), at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
            let mut frame = spec.build();
            let i = at.index(frame.len());
            frame[i] = byte;
            let len = cut.index(frame.len() + 1);
            crate::fuzzing::vm_frame(&frame);
            crate::fuzzing::vm_frame(&frame[..len]);
        }

        #[test]
        fn host_datagrams_never_panic(data in proptest::collection::vec(any::<u8>(), 0..1600)) {
            crate::fuzzing::host_datagram(&data);
        }
    }
}

mod dhcp {
    //! The engine's DHCP server: what each client message gets, in every mode.
    use super::*;
    use crate::testkit::dhcp::{dhclient_request, frame, message, networkd_discover, renewal, udhcpc_discover, MAC};
    use crate::wire::DhcpMessage;

    const ANY: Ipv4Addr = Ipv4Addr::UNSPECIFIED;
    const ALL: Ipv4Addr = Ipv4Addr::BROADCAST;
    const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
    const VM: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

    fn reply<S: Strategy>(nat: &mut FilteredNat<S>, f: &[u8]) -> Result<DhcpReply, DropReason> {
        match nat.vm_frame(f) {
            VmAction::DhcpReply(r) => Ok(r),
            VmAction::Drop(r) => Err(r),
            other => panic!("a DHCP message got {other:?}"),
        }
    }

    #[test]
    fn a_discover_gets_the_vms_own_configuration() {
        let mut nat = full(&[CONSUMER]);
        let r = reply(&mut nat, &frame(&id(), &udhcpc_discover(), ANY, ALL)).unwrap();
        assert_eq!((r.kind, r.xid, r.chaddr, r.yiaddr, r.server), (DhcpMessage::Offer, 0x1234_5678, MAC, VM, GW));
        assert_eq!((r.prefix_len, r.mtu, r.lease), (24, 1500, DHCP_LEASE));
        // Built into a frame for the VM: unicast to its MAC unless it asked for broadcast.
        let mut buf = [0u8; 600];
        let n = r.emit(&mut buf).unwrap();
        let (eth, _) = EthernetHeader::parse(&buf[..n]).unwrap();
        assert_eq!((eth.dst, eth.src), (MAC, id().gateway_mac));
        let b = reply(&mut nat, &frame(&id(), &networkd_discover(), ANY, ALL)).unwrap();
        let n = b.emit(&mut buf).unwrap();
        assert_eq!(EthernetHeader::parse(&buf[..n]).unwrap().0.dst, Mac([0xff; 6]));
    }

    #[test]
    fn a_request_for_the_vms_address_is_acknowledged_any_other_refused() {
        let mut nat = full(&[CONSUMER]);
        let ack = reply(&mut nat, &frame(&id(), &dhclient_request(GW.octets(), VM.octets()), ANY, ALL)).unwrap();
        assert_eq!((ack.kind, ack.yiaddr, ack.lease), (DhcpMessage::Ack, VM, DHCP_LEASE));
        let other = dhclient_request(GW.octets(), [10, 0, 2, 99]);
        let nak = reply(&mut nat, &frame(&id(), &other, ANY, ALL)).unwrap();
        assert_eq!((nak.kind, nak.yiaddr, nak.lease), (DhcpMessage::Nak, ANY, 0));
        // A request that chose another server is not ours to answer.
        let elsewhere = dhclient_request([10, 0, 2, 3], VM.octets());
        assert_eq!(reply(&mut nat, &frame(&id(), &elsewhere, ANY, ALL)), Err(DropReason::DhcpOtherServer));
        // Renewing: unicast from the VM's address to the gateway; answered at ciaddr.
        let renew = reply(&mut nat, &frame(&id(), &renewal(VM.octets()), VM, GW)).unwrap();
        assert_eq!((renew.kind, renew.ciaddr, renew.yiaddr), (DhcpMessage::Ack, VM, VM));
        let renew_other = reply(&mut nat, &frame(&id(), &renewal([10, 0, 2, 99]), VM, GW)).unwrap();
        assert_eq!(renew_other.kind, DhcpMessage::Nak);
        // INFORM: configuration, no lease; RELEASE and DECLINE: nothing to answer.
        let inform = message(MAC, 7, 0, VM.octets(), &[53, 1, 8], 300);
        let i = reply(&mut nat, &frame(&id(), &inform, VM, GW)).unwrap();
        assert_eq!((i.kind, i.yiaddr, i.lease), (DhcpMessage::Ack, ANY, 0));
        for t in [4u8, 7] {
            let m = message(MAC, 7, 0, VM.octets(), &[53, 1, t], 300);
            assert_eq!(reply(&mut nat, &frame(&id(), &m, VM, GW)), Err(DropReason::DhcpNoReply), "type {t}");
        }
    }

    #[test]
    fn only_the_vm_itself_is_answered() {
        let mut nat = full(&[CONSUMER]);
        let foreign = message(Mac([0x52, 0x54, 0, 0, 0, 9]), 1, 0, [0; 4], &[53, 1, 1], 300);
        assert_eq!(reply(&mut nat, &frame(&id(), &foreign, ANY, ALL)), Err(DropReason::DhcpForeignClient));
        assert_eq!(
            reply(&mut nat, &frame(&id(), &udhcpc_discover(), Ipv4Addr::new(10, 0, 2, 77), ALL)),
            Err(DropReason::Ipv4SrcSpoofed)
        );
        let mut spoofed = frame(&id(), &udhcpc_discover(), ANY, ALL);
        spoofed[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 9]);
        assert_eq!(reply(&mut nat, &spoofed), Err(DropReason::EthSrcSpoofed));
        // Truncated at every length: a drop, never a reply or a panic.
        let good = frame(&id(), &udhcpc_discover(), ANY, ALL);
        for len in 0..good.len() {
            assert!(!matches!(nat.vm_frame(&good[..len]), VmAction::DhcpReply(_)), "length {len}");
        }
    }

    #[test]
    fn dhcp_off_answers_nothing_and_forwards_nothing() {
        let mut nat = full(&[CONSUMER]);
        nat.set_dhcp(None);
        assert_eq!(reply(&mut nat, &frame(&id(), &udhcpc_discover(), ANY, ALL)), Err(DropReason::DhcpOff));
    }

    #[test]
    fn dhcp_is_never_a_violation_in_the_terminating_modes() {
        let sampled = || Sampled::new(SampleRate::new(1.0).unwrap(), 1);
        let mut ct = FilteredNat::new(id(), list(&[CONSUMER]), Conntrack::new(16));
        let mut sp = FilteredNat::new(id(), list(&[CONSUMER]), sampled());
        let bad = frame(&id(), &message(MAC, 1, 0, [0; 4], &[12, 1, b'x'], 0), ANY, ALL);
        for _ in 0..3 {
            assert!(reply(&mut ct, &frame(&id(), &udhcpc_discover(), ANY, ALL)).is_ok());
            assert!(reply(&mut sp, &frame(&id(), &renewal(VM.octets()), VM, GW)).is_ok());
            assert_eq!(reply(&mut ct, &bad), Err(DropReason::DhcpMalformed));
            assert_eq!(reply(&mut sp, &bad), Err(DropReason::DhcpMalformed));
        }
        assert_eq!((ct.terminated(), sp.terminated()), (None, None));
    }

    #[test]
    fn udp_from_port_68_to_a_consumer_is_ordinary_traffic() {
        let mut nat = full(&[Endpoint::new(CONSUMER.ip, 67)]);
        let f = frame(&id(), &udhcpc_discover(), VM, CONSUMER.ip);
        // Not to the broadcast address nor the gateway: the allowlist decides, as for any UDP.
        let mut f = f;
        f[0..6].copy_from_slice(&id().gateway_mac.0);
        assert!(matches!(nat.vm_frame(&f), VmAction::ForwardUdp { .. }));
    }
}

// ---- The consumer's alias (issue 25) ------------------------------------------------------

fn aliased<S: Strategy>(eps: &[Endpoint], strategy: S) -> FilteredNat<S> {
    FilteredNat::new(VmIdentity { alias_port: Some(51820), ..id() }, list(eps), strategy)
}

/// The alias: the gateway's address on the WireGuard port.
const ALIAS: Endpoint = Endpoint::new(Ipv4Addr::new(10, 0, 2, 2), 51820);

#[test]
fn the_alias_stands_for_the_one_endpoint_both_ways() {
    let mut nat = aliased(&[CONSUMER], Full::new());
    match nat.vm_frame(&FrameSpec::udp(&id(), ALIAS, b"handshake").build()) {
        VmAction::ForwardUdp { to, payload, via_alias } => {
            assert_eq!((to, payload, via_alias), (CONSUMER, &b"handshake"[..], true));
        }
        other => panic!("expected a forward to the consumer, got {other:?}"),
    }
    // The answer reaches the VM from the alias, never from the consumer's real address.
    let frame = inbound(&mut nat, CONSUMER, b"reply").expect("the consumer's answer");
    let ip = Ipv4Packet::parse(&frame[14..]).unwrap();
    let (udp, payload) = UdpHeader::parse(ip.payload()).unwrap();
    assert_eq!((ip.src(), udp.src_port.get(), payload), (ALIAS.ip, ALIAS.port, &b"reply"[..]));
    // Straight to the real endpoint works too (the policy is the same); nothing else does.
    assert_eq!(forwarded_to(&mut nat, &udp_to(CONSUMER)), Some(CONSUMER));
    assert_eq!(nat.vm_frame(&udp_to(Endpoint::new(ALIAS.ip, 53))), VmAction::Drop(DropReason::NotAllowed));
    assert_eq!(inbound(&mut nat, CONSUMER2, b"x").unwrap_err(), DropReason::InboundNotAllowed);
}

#[test]
fn an_alias_with_no_endpoint_yet_sends_nothing() {
    let mut nat = aliased(&[], Full::new());
    assert_eq!(nat.vm_frame(&FrameSpec::udp(&id(), ALIAS, b"x").build()), VmAction::Drop(DropReason::AliasUnbound));
    // In a terminating mode too: the VM did nothing wrong, its consumer is not known yet.
    let mut nat = aliased(&[], Conntrack::default());
    assert_eq!(nat.vm_frame(&FrameSpec::udp(&id(), ALIAS, b"x").build()), VmAction::Drop(DropReason::AliasUnbound));
    assert_eq!(nat.terminated(), None);
}

#[test]
fn a_consumer_that_moves_keeps_the_vms_flow_to_its_alias() {
    let mut nat = aliased(&[CONSUMER], Conntrack::default());
    assert_eq!(forwarded_to(&mut nat, &FrameSpec::udp(&id(), ALIAS, b"x").build()), Some(CONSUMER));
    // The consumer's NAT mapping changed: its new endpoint replaces the old one.
    let moved = ep([198, 51, 100, 77], 40001);
    nat.set_allowlist(list(&[moved]));
    // Its datagrams reach the VM at once (the guest port carried over), from the alias...
    assert!(inbound(&mut nat, moved, b"after the move").is_ok());
    assert_eq!(inbound(&mut nat, CONSUMER, b"old").unwrap_err(), DropReason::InboundNotAllowed);
    // ...and the VM's next datagram to the alias goes to the new endpoint, in conntrack mode
    // without terminating the VM (the old endpoint is gone from the list).
    assert_eq!(forwarded_to(&mut nat, &FrameSpec::udp(&id(), ALIAS, b"y").build()), Some(moved));
    nat.set_allowlist(list(&[CONSUMER]));
    assert!(inbound(&mut nat, CONSUMER, b"and back").is_ok(), "a second move keeps the flow too");
    assert_eq!(nat.terminated(), None);
}

#[test]
fn an_alias_port_of_zero_is_refused() {
    assert_eq!(VmIdentity { alias_port: Some(0), ..id() }.validate(), Err(IdentityError::AliasPort));
}

#[test]
fn a_ping_last_before_a_move_does_not_take_the_aliass_flow() {
    let mut nat = aliased(&[CONSUMER], Full::new());
    assert_eq!(forwarded_to(&mut nat, &FrameSpec::udp(&id(), ALIAS, b"x").build()), Some(CONSUMER));
    let ping = FrameSpec::icmp_echo(&id(), CONSUMER.ip, 777, 1, b"abcdefgh").build();
    assert!(matches!(nat.vm_frame(&ping), VmAction::ForwardIcmpEcho { .. }));
    let moved = ep([198, 51, 100, 77], 40001);
    nat.set_allowlist(list(&[moved]));
    let frame = inbound(&mut nat, moved, b"after").expect("delivered");
    let ip = Ipv4Packet::parse(&frame[14..]).unwrap();
    let (udp, _) = UdpHeader::parse(ip.payload()).unwrap();
    let sent_from = FrameSpec::udp(&id(), ALIAS, b"x");
    let L4::Udp { src_port, .. } = sent_from.l4 else { panic!("a UDP spec") };
    assert_eq!(udp.dst_port.get(), src_port, "to the guest port that talked to the alias, not the echo id");
}
