//! The data plane end to end: a synthetic VM on one end of a real socketpair, the engine's
//! worker in between, real UDP/ICMP sockets on loopback. Every test runs on both backends.
//! Every test runs in a private network namespace (`private_netns`), where nothing can leave
//! the machine; consumers are on documentation addresses of its `lo`.
//!
//! Over 500 lines on purpose: one file per area of the test plan; every case is independent.
use std::time::Duration;

use engine::testkit::{generate_test_packet, raw_frame, FrameSpec, L4};
use engine::wire::{ArpOp, ArpPacket, EtherType, EthernetHeader, IcmpEchoHeader, IcmpType, Ipv4Packet};
use engine::worker::{Backend, EventKind};
use engine::DropReason;
use omerta_it::{allow, ep, require, Consumer, Rig};

const WAIT: Duration = Duration::from_secs(3);
const QUIET: Duration = Duration::from_millis(300);

/// Runs `test` once per backend, each time in a new private network namespace (the harness
/// refuses to start a worker anywhere else) with sinks on the forbidden destinations, which
/// must receive nothing.
fn each(test: impl Fn(&omerta_it::Netns, Backend) + Send + Sync + 'static) {
    let test = std::sync::Arc::new(test);
    for b in omerta_it::backends() {
        eprintln!("-- backend {b:?}");
        let t = test.clone();
        omerta_it::sealed(move |ns| t(ns, b));
    }
}

fn parse_udp(frame: &[u8]) -> (Ipv4Packet<'_>, Vec<u8>) {
    let (eth, rest) = EthernetHeader::parse(frame).expect("an Ethernet frame");
    assert_eq!(eth.ethertype(), EtherType::Ipv4);
    let ip = Ipv4Packet::parse(rest).expect("an IPv4 packet");
    assert!(ip.checksum_ok());
    let payload = ip.udp_payload().expect("a UDP datagram").to_vec();
    (ip, payload)
}

/// seed: testVMSendsFrames
#[test]
fn vm_sends_frames() {
    each(|ns, b| {
        let c = Consumer::new(ns);
        let mut rig = Rig::start(ns, &allow(&[c.endpoint()]), b, false);
        rig.vm.send(&rig.vm.udp(c.endpoint(), b"from the vm"));
        let (data, from) = c.recv(WAIT).expect("the consumer receives the payload");
        assert_eq!(data, b"from the vm");
        assert_ne!(from.ip(), std::net::IpAddr::V4(rig.vm.id.ip), "from the engine's host socket, translated");
        let s = rig.wait_for("one forward", |s| s.counters.forwarded_udp == 1);
        assert_eq!(s.counters.vm_frames, 1);
        rig.stop();
    });
}

/// seed: testVMReceivesFrames
#[test]
fn vm_receives_frames() {
    each(|ns, b| {
        let c = Consumer::new(ns);
        let rig = Rig::start(ns, &allow(&[c.endpoint()]), b, false);
        rig.vm.send(&rig.vm.udp(c.endpoint(), b"hello"));
        let (_, engine_addr) = c.recv(WAIT).expect("first datagram");
        c.sock.send_to(b"reply from consumer", engine_addr).unwrap();
        let frame = rig.vm.recv(WAIT).expect("the VM receives a frame");
        let (eth, _) = EthernetHeader::parse(&frame).unwrap();
        assert_eq!((eth.dst, eth.src), (rig.vm.id.mac, rig.vm.id.gateway_mac));
        let (ip, payload) = parse_udp(&frame);
        assert_eq!(ip.src(), c.endpoint().ip);
        assert_eq!(ip.dst(), rig.vm.id.ip);
        assert_eq!(ip.ports(), Some((c.endpoint().port, 40000)), "delivered to the guest's source port");
        assert_eq!(payload, b"reply from consumer");
    });
}

/// seed: testARPResolution
#[test]
fn arp_resolution() {
    each(|ns, b| {
        let c = Consumer::new(ns);
        let rig = Rig::start(ns, &allow(&[c.endpoint()]), b, false);
        rig.vm.send(&rig.vm.arp_for_gateway());
        let reply = rig.vm.recv(WAIT).expect("an ARP reply");
        let (eth, rest) = EthernetHeader::parse(&reply).unwrap();
        assert_eq!(eth.ethertype(), EtherType::Arp);
        let arp = ArpPacket::parse(rest).unwrap();
        assert_eq!(arp.op(), ArpOp::Reply);
        assert_eq!((arp.sha, arp.sender_ip()), (rig.vm.id.gateway_mac, rig.vm.id.gateway_ip));
        // Another VM's address in the same subnet is not answered.
        rig.vm.send(&engine::testkit::arp_request(&rig.vm.id, [10, 0, 2, 3].into()));
        assert!(rig.vm.recv(QUIET).is_none(), "no reply for a neighbour");
        rig.wait_for("one refused ARP", |s| s.counters.drops_for(DropReason::ArpUnknownTarget) == 1);
    });
}

/// seed: testVMToConsumerUDP
#[test]
fn vm_to_consumer_udp() {
    each(|ns, b| {
        let c = Consumer::new(ns);
        let rig = Rig::start(ns, &allow(&[c.endpoint()]), b, false);
        let sizes = [0usize, 1, 18, 100, 512, 1000, 1472];
        for (i, size) in sizes.iter().enumerate() {
            let payload: Vec<u8> = (0..*size).map(|j| (i * 31 + j) as u8).collect();
            rig.vm.send(&rig.vm.udp(c.endpoint(), &payload));
            let (got, _) = c.recv(WAIT).expect("datagram");
            assert_eq!(got, payload, "payload of {size} bytes arrives intact");
        }
    });
}

/// seed: testVMToConsumerPing
#[test]
fn vm_to_consumer_ping() {
    each(|ns, b| {
        let c = Consumer::new(ns);
        let rig = Rig::start(ns, &allow(&[c.endpoint()]), b, false);
        let ping = FrameSpec::icmp_echo(&rig.vm.id, c.endpoint().ip, 0x4242, 7, b"ping payload").build();
        rig.vm.send(&ping);
        let reply = rig.vm.recv_matching(WAIT, |f| {
            Ipv4Packet::parse(&f[14..]).is_ok_and(|ip| ip.protocol() == engine::wire::IpProtocol::Icmp)
        });
        let s = rig.worker().snapshot();
        if !require(
            "an ICMP socket (ping_group_range or CAP_NET_RAW)",
            if s.counters.drops_for(DropReason::IcmpUnavailable) > 0 {
                Err("none could be opened".into())
            } else {
                Ok(())
            },
        ) {
            return;
        }
        let reply = reply.expect("an echo reply");
        let ip = Ipv4Packet::parse(&reply[14..]).unwrap();
        assert!(ip.checksum_ok());
        assert_eq!((ip.src(), ip.dst()), (c.endpoint().ip, rig.vm.id.ip));
        let (h, data) = IcmpEchoHeader::parse(ip.payload()).unwrap();
        assert!(h.is_echo(IcmpType::EchoReply));
        assert_eq!((h.ident.get(), h.seq.get(), data), (0x4242, 7, &b"ping payload"[..]));
        assert!(engine::wire::csum::verifies(ip.payload()));
    });
}

/// seed: testBidirectionalTraffic
#[test]
fn bidirectional_traffic() {
    each(|ns, b| {
        let c = Consumer::new(ns);
        let rig = Rig::start(ns, &allow(&[c.endpoint()]), b, false);
        for i in 0..200u32 {
            rig.vm.send(&rig.vm.udp(c.endpoint(), &i.to_be_bytes()));
            let (got, from) = c.recv(WAIT).expect("request");
            assert_eq!(got, i.to_be_bytes());
            c.sock.send_to(&(i + 1_000_000).to_be_bytes(), from).unwrap();
            let frame = rig.vm.recv(WAIT).expect("response");
            assert_eq!(parse_udp(&frame).1, (i + 1_000_000).to_be_bytes());
        }
        let s = rig.wait_for("all counted", |s| s.counters.to_vm_frames == 200);
        assert_eq!(s.counters.forwarded_udp, 200);
        assert_eq!(s.counters.dropped(), 0);
    });
}

#[test]
fn burst_of_1000_frames_forwarded_without_loss() {
    each(|ns, b| {
        let c = Consumer::new(ns);
        let rig = Rig::start(ns, &allow(&[c.endpoint()]), b, false);
        let frames: Vec<Vec<u8>> = (0..1000u32).map(|i| rig.vm.udp(c.endpoint(), &i.to_be_bytes())).collect();
        // The consumer reads while the burst arrives, as a real one does; its socket buffer
        // alone holds only a few hundred small datagrams.
        let reader = std::thread::spawn(move || c.drain(Duration::from_millis(500)));
        let start = std::time::Instant::now();
        for f in &frames {
            rig.vm.send(f);
        }
        eprintln!("burst of 1000 frames written in {:?}", start.elapsed());
        let got = reader.join().unwrap();
        let seqs: Vec<u32> = got.iter().map(|d| u32::from_be_bytes([d[0], d[1], d[2], d[3]])).collect();
        assert_eq!(seqs.len(), 1000, "every frame of the burst arrives");
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order");
        let s = rig.wait_for("all counted", |s| s.counters.forwarded_udp == 1000);
        assert_eq!((s.counters.host_send_errors, s.counters.queue_overflows, s.counters.dropped()), (0, 0, 0));
    });
}

#[test]
fn a_burst_to_the_vm_on_the_stream_framing_arrives_whole() {
    each(|ns, b| {
        // Downloads into a VM on QEMU's stream framing: bursts of 64 datagrams of 1358 bytes
        // (one sendmmsg each, as a WireGuard peer sends) reach the VM whole. The engine's
        // stream buffer once held 64 KiB and dropped the tail of every batch it read.
        let c = Consumer::new(ns);
        let rig = Rig::start(ns, &allow(&[c.endpoint()]), b, true);
        rig.vm.send(&rig.vm.udp(c.endpoint(), b"open"));
        let (_, engine_addr) = c.recv(WAIT).expect("the flow is open");
        c.sock.connect(engine_addr).unwrap();
        let payload = [9u8; 1358];
        let burst: [&[u8]; 64] = [&payload; 64];
        let mut sent = 0;
        for _ in 0..4 {
            let mut off = 0;
            while off < burst.len() {
                off += sys::bench::send_many(std::os::fd::AsFd::as_fd(&c.sock), &burst[off..]).unwrap();
            }
            sent += burst.len();
        }
        let mut got = 0;
        while got < sent {
            match rig.vm.recv(WAIT) {
                Some(f) if f.len() > 1000 => got += 1,
                Some(_) => {}
                None => break,
            }
        }
        let s = rig.wait_for("the counters", |s| s.counters.to_vm_frames >= got as u64);
        assert_eq!((got, s.counters.queue_overflows), (sent, 0), "frames to the VM: {:?}", s.counters);
    });
}

/// seed: testInvalidFrameRecovery
#[test]
fn invalid_frame_recovery() {
    each(|ns, b| {
        let c = Consumer::new(ns);
        let rig = Rig::start(ns, &allow(&[c.endpoint()]), b, false);
        let id = rig.vm.id;
        let good = rig.vm.udp(c.endpoint(), b"valid");
        let mut invalid: Vec<Vec<u8>> = vec![
            vec![],
            vec![0u8; 5],
            good[..20].to_vec(),
            raw_frame(&id, 0x86dd, &[0x60; 48]),
            raw_frame(&id, 0x88b5, b"raw"),
            vec![0xff; 1514],
            generate_test_packet(&id, ep([8, 8, 8, 8], 53), 80),
        ];
        let mut bad_sum = good.clone();
        bad_sum[24] ^= 0xff;
        invalid.push(bad_sum);
        let mut frag = FrameSpec::udp(&id, c.endpoint(), b"frag");
        frag.flags_frag = 0x2000;
        invalid.push(frag.build());
        let mut tcp = FrameSpec::tcp_syn(&id, c.endpoint());
        tcp.l4 = L4::TcpSyn { src_port: 1, dst_port: 22 };
        invalid.push(tcp.build());
        for round in 0..50 {
            for f in &invalid {
                rig.vm.send(f);
            }
            if round % 10 == 0 {
                rig.vm.send(&good);
            }
        }
        rig.vm.send(&good);
        let got = c.drain(Duration::from_millis(500));
        assert_eq!(got.len(), 6, "valid frames keep flowing between invalid ones");
        assert!(got.iter().all(|d| d == b"valid"));
        let s = rig.wait_for("all drops counted", |s| s.counters.dropped() == 50 * invalid.len() as u64);
        assert_eq!(s.counters.drops_for(DropReason::EthTruncated), 100);
        assert_eq!(s.counters.drops_for(DropReason::EthIpv6), 50);
    });
}

/// seed: testPartialRead
#[test]
fn partial_read() {
    each(|ns, b| {
        use std::io::Write;
        let c = Consumer::new(ns);
        let rig = Rig::start(ns, &allow(&[c.endpoint()]), b, true);
        let omerta_it::VmEnd::Stream(s) = &rig.vm.end else { unreachable!() };
        let mut bytes = Vec::new();
        for i in 0..20u8 {
            let f = rig.vm.udp(c.endpoint(), &[i; 37]);
            bytes.extend_from_slice(&u32::try_from(f.len()).unwrap().to_be_bytes());
            bytes.extend_from_slice(&f);
        }
        // Odd-sized writes with pauses, so reads end inside prefixes and frames.
        let mut w = s;
        for (k, chunk) in bytes.chunks(7).enumerate() {
            w.write_all(chunk).unwrap();
            if k % 25 == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let got = c.drain(Duration::from_millis(500));
        assert_eq!(got.len(), 20);
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d, &vec![i as u8; 37]);
        }
        // Frames to the VM come back framed on the stream too.
        rig.vm.send(&rig.vm.arp_for_gateway());
        let reply = rig.vm.recv(WAIT).expect("a framed ARP reply");
        assert_eq!(reply.len(), 42);
    });
}

/// seed: testVMHandleClose
#[test]
fn vm_handle_close() {
    each(|ns, b| {
        // Stream handle: the VMM closing its end is end-of-stream.
        let c = Consumer::new(ns);
        let mut rig = Rig::start(ns, &allow(&[c.endpoint()]), b, true);
        rig.vm.send(&rig.vm.udp(c.endpoint(), b"x"));
        c.recv(WAIT).expect("traffic before the close");
        drop(std::mem::replace(
            &mut rig.vm.end,
            omerta_it::VmEnd::Dgram(std::os::unix::net::UnixDatagram::unbound().unwrap()),
        ));
        assert!(matches!(rig.next_event(), EventKind::HandleClosed(_)));
        rig.wait_for("the thread to end", |_| rig.worker().is_finished());
        // Datagram socketpair: a dead peer shows when the engine next writes to it.
        let c = Consumer::new(ns);
        let mut rig = Rig::start(ns, &allow(&[c.endpoint()]), b, false);
        rig.vm.send(&rig.vm.udp(c.endpoint(), b"x"));
        let (_, engine_addr) = c.recv(WAIT).expect("traffic before the close");
        drop(std::mem::replace(
            &mut rig.vm.end,
            omerta_it::VmEnd::Dgram(std::os::unix::net::UnixDatagram::unbound().unwrap()),
        ));
        // Another thread of this process may be starting a child right now (the real-guest
        // tests do), which holds a copy of every descriptor until it execs: the VM's end is
        // gone only once that copy is. The consumer goes on sending until the engine notices
        // (each datagram is a write to the dead handle), a datagram every 100 ms for 15 s.
        let mut closed = None;
        for _ in 0..150 {
            c.sock.send_to(b"to a closed VM", engine_addr).unwrap();
            if let Ok(e) = rig.events.recv_timeout(Duration::from_millis(100)) {
                closed = Some(e.kind);
                break;
            }
        }
        assert!(matches!(closed, Some(EventKind::HandleClosed(_))), "the worker ends: {closed:?}");
        rig.wait_for("the thread to end", |_| rig.worker().is_finished());
        rig.stop();
    });
}

#[test]
fn inbound_from_unknown_end_to_end() {
    each(|ns, b| {
        let c = Consumer::new(ns);
        let stranger = Consumer::new(ns);
        let rig = Rig::start(ns, &allow(&[c.endpoint()]), b, false);
        rig.vm.send(&rig.vm.udp(c.endpoint(), b"open"));
        let (_, engine_addr) = c.recv(WAIT).unwrap();
        for _ in 0..10 {
            stranger.sock.send_to(b"let me in", engine_addr).unwrap();
        }
        c.sock.send_to(b"legit", engine_addr).unwrap();
        let frame = rig.vm.recv(WAIT).expect("the consumer's datagram");
        assert_eq!(parse_udp(&frame).1, b"legit");
        assert!(rig.vm.recv(QUIET).is_none(), "nothing from the stranger");
        rig.wait_for("ten refusals", |s| s.counters.drops_for(DropReason::InboundNotAllowed) == 10);
    });
}

/// seed: testNetworkSocketError
#[test]
fn network_socket_error() {
    each(|ns, b| {
        // In this namespace 203.0.113.7 has no route: the send fails at once.
        let c = Consumer::new(ns);
        let unreachable = ep([203, 0, 113, 7], 51820);
        let rig = Rig::start(ns, &allow(&[c.endpoint(), unreachable]), b, false);
        for _ in 0..5 {
            rig.vm.send(&rig.vm.udp(unreachable, b"nowhere"));
        }
        rig.vm.send(&rig.vm.udp(c.endpoint(), b"still works"));
        let got = c.recv(WAIT).map(|d| d.0);
        let s = rig.wait_for("send errors counted", |s| s.counters.host_send_errors >= 5);
        assert_eq!(got.as_deref(), Some(&b"still works"[..]), "the loop goes on after send errors");
        assert_eq!(s.counters.forwarded_udp, 6);
    });
}

#[test]
fn conntrack_terminates_end_to_end() {
    each(|ns, b| {
        let c = Consumer::new(ns);
        let rig = Rig::start(ns, &format!("{},mode=conntrack", allow(&[c.endpoint()])), b, false);
        for _ in 0..20 {
            rig.vm.send(&rig.vm.udp(c.endpoint(), b"good"));
        }
        let before = c.drain(Duration::from_millis(300)).len();
        // The violation and ten good datagrams right behind it, in one sendmmsg: the ones
        // behind it reach the engine (often in the violation's own batch) and are dropped.
        let mut burst = vec![rig.vm.udp(ep([8, 8, 8, 8], 53), b"dns?")];
        burst.extend((0..10).map(|_| rig.vm.udp(c.endpoint(), b"after")));
        let refs: Vec<&[u8]> = burst.iter().map(Vec::as_slice).collect();
        let omerta_it::VmEnd::Dgram(sock) = &rig.vm.end else { unreachable!() };
        assert_eq!(sys::bench::send_many(std::os::fd::AsFd::as_fd(sock), &refs).unwrap(), 11);
        let event = rig.next_event();
        let after = c.drain(Duration::from_millis(300)).len();
        let s = rig.wait_for("the ten behind it dropped", |s| s.counters.drops_for(DropReason::Terminated) == 10);
        assert_eq!(before, 20, "repeated good traffic is forwarded");
        assert_eq!(event, EventKind::Terminated(DropReason::NotAllowed));
        assert_eq!(after, 0, "nothing is forwarded after the violation");
        assert_eq!(s.counters.forwarded_udp, 20);
        assert_eq!(s.counters.terminations, 1);
        assert_eq!(s.strategy.allowlist_checks, 2, "one check for the good flow, one for the bad");
    });
}

#[test]
fn sampled_terminates_end_to_end() {
    each(|ns, b| {
        // Sampled mode with a known seed (tests only) and forbidden destinations on this
        // namespace's `lo`: whatever the draw, the first datagram off the list terminates the
        // VM (the egress gate), so nothing reaches them, and nothing is forwarded after.
        let c = Consumer::new(ns);
        let spec = format!("{},mode=sampled,sample-rate=0.1,seed=11,allow-special=yes", allow(&[c.endpoint()]));
        let rig = Rig::start(ns, &spec, b, false);
        for to in [ep([8, 8, 8, 8], 53), ep([127, 0, 0, 1], 53), ep([0, 0, 0, 0], 53), ep([192, 168, 1, 1], 80)] {
            for _ in 0..50 {
                rig.vm.send(&rig.vm.udp(to, b"dns?"));
            }
        }
        assert_eq!(rig.next_event(), EventKind::Terminated(DropReason::NotAllowed));
        rig.vm.send(&rig.vm.udp(c.endpoint(), b"after"));
        assert_eq!(c.drain(Duration::from_millis(300)).len(), 0, "nothing is forwarded after the violation");
        let s = rig.wait_for("termination published", |s| s.terminated.is_some());
        assert_eq!((s.counters.forwarded_udp, s.counters.terminations), (0, 1), "{:?}", s.counters);
    });
}

#[test]
fn resource_exhaustion_at_start() {
    each(|ns, b| {
        // The engine binary under open-files limits too small for what it needs at start (its
        // signal pipe, the VM's sockets, its doorbell): always a clear one-line error naming
        // the limit and exit status 1, never a crash.
        for limit in 4..=7 {
            let (ours, theirs) = sys::socketpair(libc::SOCK_DGRAM).unwrap();
            use std::os::fd::AsRawFd;
            let fd = theirs.as_raw_fd();
            sys::set_inheritable(std::os::fd::AsFd::as_fd(&theirs)).unwrap();
            let out = std::process::Command::new("prlimit")
                .arg(format!("--nofile={limit}:{limit}"))
                .arg(omerta_it::engine_bin(ns))
                .arg("--no-control")
                .arg("--vm")
                .arg(format!("name=tight,handle=fd:{fd},consumer=127.0.0.1:9,allow-special=yes"))
                .env("OMERTA_BACKEND", omerta_it::backend_name(b).replace("io_", ""))
                .output();
            drop((ours, theirs));
            let out = match out {
                Ok(o) => o,
                Err(e) => {
                    require("prlimit (util-linux)", Err(e.to_string()));
                    return;
                }
            };
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "limit {limit}: {stderr}");
            assert!(stderr.contains("out of file descriptors (limit"), "limit {limit}: {stderr}");
            assert!(!stderr.contains("panicked"), "limit {limit}: {stderr}");
        }
    });
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("omerta-it-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn dgram_path_handle_learns_the_vmm_address() {
    each(|ns, b| {
        // QEMU `-netdev dgram` with unix paths: the engine binds E, the VMM binds Q and sends.
        let dir = temp_dir(&format!("dgram-{b:?}"));
        let (e, q) = (dir.join("engine.sock"), dir.join("qemu.sock"));
        let c = Consumer::new(ns);
        let cfg =
            control::config::vm_from_spec(&format!("name=p,handle=dgram:{},{}", e.display(), allow(&[c.endpoint()])))
                .unwrap();
        let (tx, events) = crossbeam_channel::unbounded();
        let w = omerta_it::spawn_worker(ns, &cfg, b, tx).unwrap();
        assert!(matches!(events.recv_timeout(WAIT).unwrap().kind, EventKind::Started(_)));
        let vmm = std::os::unix::net::UnixDatagram::bind(&q).unwrap();
        vmm.set_read_timeout(Some(WAIT)).unwrap();
        vmm.send_to(&engine::testkit::arp_request(&cfg.identity, cfg.identity.gateway_ip), &e).unwrap();
        let mut buf = [0u8; 2048];
        let (n, from) = vmm.recv_from(&mut buf).expect("the ARP reply reaches the VMM's own path");
        assert_eq!(n, 42);
        assert_eq!(from.as_pathname(), Some(e.as_path()));
        w.stop();
        assert!(!e.exists(), "the engine removes its socket file when the VM stops");
        let _ = std::fs::remove_dir_all(dir);
    });
}

#[test]
fn stream_listen_handle_accepts_the_vmm() {
    each(|ns, b| {
        // QEMU `-netdev stream,server=off`: the engine listens, the VMM connects later.
        let dir = temp_dir(&format!("stream-{b:?}"));
        let path = dir.join("engine.sock");
        let c = Consumer::new(ns);
        let cfg = control::config::vm_from_spec(&format!(
            "name=s,handle=stream:{},{}",
            path.display(),
            allow(&[c.endpoint()])
        ))
        .unwrap();
        let (tx, _events) = crossbeam_channel::unbounded();
        let w = omerta_it::spawn_worker(ns, &cfg, b, tx).unwrap();
        // The socket listens once spawn returns; the VMM connects whenever it starts.
        let vm = omerta_it::SyntheticVm {
            end: omerta_it::VmEnd::Stream(std::os::unix::net::UnixStream::connect(&path).unwrap()),
            id: cfg.identity,
        };
        vm.send(&vm.udp(c.endpoint(), b"over a stream"));
        assert_eq!(c.recv(WAIT).map(|d| d.0).as_deref(), Some(&b"over a stream"[..]));
        w.stop();
        let _ = std::fs::remove_dir_all(dir);
    });
}

/// seed: testProviderNetworkFlap
#[test]
fn provider_network_flap() {
    each(|ns, b| {
        // The consumer is across a veth pair. The provider's link goes down (sends fail and are
        // counted), comes back with another address (as after a new lease), and both
        // directions recover through the same worker: the VM reaches the consumer from the new
        // address, and the consumer's replies and its own datagrams reach the VM.
        let peer = omerta_it::VethPeer::new(ns, "flap");
        let consumer = peer.run(|| std::net::UdpSocket::bind("203.0.113.2:51820").expect("consumer"));
        consumer.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let c_ep = ep([203, 0, 113, 2], 51820);
        let rig = Rig::start(ns, &allow(&[c_ep]), b, false);
        let mut buf = [0u8; 2048];
        let mut round_trip = |tag: &[u8]| -> Option<std::net::SocketAddr> {
            // A few tries: the first datagram after a link comes up may wait for ARP.
            for _ in 0..25 {
                rig.vm.send(&rig.vm.udp(c_ep, tag));
                if let Ok((n, from)) = consumer.recv_from(&mut buf) {
                    if &buf[..n] == tag {
                        consumer.send_to(b"reply", from).unwrap();
                        let f = rig.vm.recv_matching(WAIT, |f| parse_udp(f).1 == b"reply")?;
                        assert_eq!(parse_udp(&f).1, b"reply");
                        return Some(from);
                    }
                }
            }
            None
        };
        let before = round_trip(b"before").expect("both directions work before the flap");
        assert_eq!(before.ip().to_string(), "203.0.113.1");
        omerta_it::ip(&["link", "set", "vp0", "down"]);
        for _ in 0..5 {
            rig.vm.send(&rig.vm.udp(c_ep, b"during"));
        }
        rig.wait_for("send errors while the link is down", |s| s.counters.host_send_errors >= 5);
        omerta_it::ip(&["addr", "del", "203.0.113.1/24", "dev", "vp0"]);
        omerta_it::ip(&["addr", "add", "203.0.113.9/24", "dev", "vp0"]);
        omerta_it::ip(&["link", "set", "vp0", "up"]);
        let after = round_trip(b"after").expect("VM to consumer and back after the flap");
        assert_eq!(after.ip().to_string(), "203.0.113.9", "from the provider's new address");
        // The consumer starts a flow of its own towards the engine's new address.
        consumer.send_to(b"unprompted", after).unwrap();
        let f = rig.vm.recv_matching(WAIT, |f| parse_udp(f).1 == b"unprompted");
        assert!(f.is_some(), "consumer to VM works after the flap");
        assert!(!rig.worker().is_finished(), "the worker survived the flap");
        let s = rig.wait_for("nothing refused", |s| s.counters.to_vm_frames >= 3);
        assert_eq!(s.counters.dropped(), 0, "{s:?}");
        drop(peer);
    });
}

/// CPU seconds a thread of this process has used, by its name.
fn thread_cpu(name: &str) -> f64 {
    for t in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        if std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim() == name {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let f: Vec<f64> =
                stat.rsplit(')').next().unwrap_or_default().split_whitespace().filter_map(|v| v.parse().ok()).collect();
            // utime and stime (fields 14 and 15 of the line), in clock ticks of 1/100 s.
            return (f.get(10).unwrap_or(&0.0) + f.get(11).unwrap_or(&0.0)) / 100.0;
        }
    }
    0.0
}

#[test]
fn a_full_vm_socket_does_not_make_the_worker_spin() {
    each(|ns, b| {
        // A guest whose NIC does not read yet (it is booting) while its consumer already sends:
        // the VMM's socket (QEMU `-netdev dgram` on unix paths, whose queue holds only
        // net.unix.max_dgram_qlen datagrams) stays full for 2 s. The worker waits for it to
        // drain instead of retrying flat out, and drops (counted) what cannot wait.
        let dir = temp_dir(&format!("full-{b:?}"));
        let (e, q) = (dir.join("engine.sock"), dir.join("qemu.sock"));
        let c = Consumer::new(ns);
        let cfg = control::config::vm_from_spec(&format!(
            "name=full,handle=dgram:{},{}",
            e.display(),
            allow(&[c.endpoint()])
        ))
        .unwrap();
        let (tx, events) = crossbeam_channel::unbounded();
        let w = omerta_it::spawn_worker(ns, &cfg, b, tx).unwrap();
        assert!(matches!(events.recv_timeout(WAIT).unwrap().kind, EventKind::Started(_)));
        let vmm = std::os::unix::net::UnixDatagram::bind(&q).unwrap();
        let frame = FrameSpec::udp(&cfg.identity, c.endpoint(), b"open the flow").build();
        vmm.send_to(&frame, &e).unwrap();
        let (_, engine) = c.recv(WAIT).expect("the flow is open");
        let before = thread_cpu("omerta-vm-full");
        let start = std::time::Instant::now();
        let mut sent = 0u32;
        // Bounded: 2 s, at most 200 000 datagrams.
        while start.elapsed() < Duration::from_secs(2) && sent < 200_000 {
            let _ = c.sock.send_to(&[0u8; 200], engine);
            sent += 1;
            if sent.is_multiple_of(64) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let cpu = thread_cpu("omerta-vm-full") - before;
        let wall = start.elapsed().as_secs_f64();
        std::thread::sleep(engine::worker::PUBLISH_EVERY * 2);
        let s = w.snapshot();
        eprintln!("worker CPU {cpu:.3} s in {wall:.2} s; {:?}", s.counters);
        assert!(cpu < 0.05 * wall, "the worker used {cpu:.3} s of CPU in {wall:.2} s with a full VM socket");
        assert!(s.counters.queue_overflows > 0, "what could not wait was dropped and counted: {:?}", s.counters);
        let c2 = &s.counters;
        assert!(
            c2.to_vm_frames + c2.queue_overflows <= c2.host_datagrams,
            "a dropped frame is not also counted as sent: {c2:?}"
        );
        // The VMM reads again: frames flow.
        vmm.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut buf = [0u8; 2048];
        while vmm.recv(&mut buf).is_ok() {}
        c.sock.send_to(b"after", engine).unwrap();
        vmm.set_read_timeout(Some(WAIT)).unwrap();
        let mut resumed = false;
        while let Ok(n) = vmm.recv(&mut buf) {
            if buf[..n].ends_with(b"after") {
                resumed = true;
                break;
            }
        }
        assert!(resumed, "delivery resumes once the VMM reads");
        w.stop();
        let _ = std::fs::remove_dir_all(dir);
    });
}

#[test]
fn a_full_stream_handle_drops_whole_frames_and_does_not_spin() {
    each(|ns, b| {
        // The same guest on QEMU's stream framing: a VMM that stops reading leaves the stream
        // full. Within 100 ms what has not started to go out is dropped (counted), the frame
        // partly out is kept whole, and the worker keeps reading its consumer without spinning.
        use std::io::{Read, Write};
        let (ours, theirs) = sys::socketpair(libc::SOCK_STREAM).unwrap();
        let c = Consumer::new(ns);
        let fd = std::os::fd::IntoRawFd::into_raw_fd(theirs);
        let cfg =
            control::config::vm_from_spec(&format!("name=sfull,handle=stream-fd:{fd},{}", allow(&[c.endpoint()])))
                .unwrap();
        let (tx, events) = crossbeam_channel::unbounded();
        let w = omerta_it::spawn_worker(ns, &cfg, b, tx).unwrap();
        assert!(matches!(events.recv_timeout(WAIT).unwrap().kind, EventKind::Started(_)));
        let mut vmm = std::os::unix::net::UnixStream::from(ours);
        let frame = FrameSpec::udp(&cfg.identity, c.endpoint(), b"open the flow").build();
        vmm.write_all(&u32::try_from(frame.len()).unwrap().to_be_bytes()).unwrap();
        vmm.write_all(&frame).unwrap();
        let (_, engine) = c.recv(WAIT).expect("the flow is open");
        // Bounded: until the stream is full (the worker counts a refused write; megabytes of
        // socket buffers first, which is real work, not waiting), at most 10 s, then 2 s with
        // it full; at most 400 000 datagrams in all.
        let mut sent = 0u32;
        let mut send_for = |d: Duration, until_full: bool| {
            let start = std::time::Instant::now();
            while start.elapsed() < d && sent < 400_000 {
                let _ = c.sock.send_to(&[0u8; 1000], engine);
                sent += 1;
                if sent.is_multiple_of(64) {
                    std::thread::sleep(Duration::from_millis(1));
                    if until_full && w.snapshot().counters.queue_overflows > 0 {
                        return;
                    }
                }
            }
        };
        send_for(Duration::from_secs(10), true);
        let before = thread_cpu("omerta-vm-sfull");
        let start = std::time::Instant::now();
        send_for(Duration::from_secs(2), false);
        let cpu = thread_cpu("omerta-vm-sfull") - before;
        let wall = start.elapsed().as_secs_f64();
        std::thread::sleep(engine::worker::PUBLISH_EVERY * 2);
        let s = w.snapshot();
        eprintln!("worker CPU {cpu:.3} s in {wall:.2} s; {:?}", s.counters);
        // Spinning is a whole core; waiting costs the reads of the consumer's datagrams it
        // drops, a few percent, more on a loaded machine (a guest booting beside it).
        assert!(cpu < 0.2 * wall, "the worker used {cpu:.3} s of CPU in {wall:.2} s with a full stream");
        assert!(s.counters.queue_overflows > 0, "what could not wait was dropped and counted: {:?}", s.counters);
        // The consumer kept being read while the stream stayed full: drops in window after
        // window, more than the engine's own stream buffer holds (64 KiB, ~60 of these frames).
        assert!(s.counters.queue_overflows > 120, "the worker kept reading its consumer: {:?}", s.counters);
        let c2 = &s.counters;
        assert!(
            c2.to_vm_frames + c2.queue_overflows <= c2.host_datagrams,
            "a dropped frame is not also counted as sent: {c2:?}"
        );
        // The VMM reads again: every frame it gets is whole (the framing survived the drops),
        // and new traffic arrives.
        vmm.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let read_frame = |vmm: &mut std::os::unix::net::UnixStream| -> Option<Vec<u8>> {
            let mut len = [0u8; 4];
            vmm.read_exact(&mut len).ok()?;
            let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
            vmm.read_exact(&mut f).ok()?;
            Some(f)
        };
        let mut whole = 0u64;
        let mut resumed = false;
        let mut sent_after = false;
        for _ in 0..1_000_000 {
            let Some(f) = read_frame(&mut vmm) else {
                if sent_after {
                    break;
                }
                c.sock.send_to(b"after", engine).unwrap();
                sent_after = true;
                vmm.set_read_timeout(Some(WAIT)).unwrap();
                continue;
            };
            let p = Ipv4Packet::parse(&f[14..]).expect("a whole IPv4 frame");
            assert_eq!(f.len(), 14 + p.total_len(), "frame length matches its IP header");
            if f.ends_with(b"after") {
                resumed = true;
                break;
            }
            whole += 1;
        }
        eprintln!("{whole} whole frames read after the stall");
        assert!(resumed, "delivery resumes once the VMM reads");
        w.stop();
    });
}

#[test]
fn busy_poll_forwards_and_stops() {
    // With busy-poll the worker never sleeps; it must still forward both ways and obey stop.
    each(|ns, b| {
        let c = Consumer::new(ns);
        let mut rig = Rig::start(ns, &format!("{},busy-poll=yes", allow(&[c.endpoint()])), b, false);
        for i in 0..50u32 {
            rig.vm.send(&rig.vm.udp(c.endpoint(), &i.to_be_bytes()));
            let (_, from) = c.recv(WAIT).expect("forwarded");
            c.sock.send_to(b"back", from).unwrap();
            assert!(rig.vm.recv(WAIT).is_some(), "reply {i} reached the VM");
        }
        let start = std::time::Instant::now();
        rig.stop();
        assert!(start.elapsed() < Duration::from_secs(2), "a busy worker still stops promptly");
    });
}

/// The consumer's alias (issue 25): the VM talks to 10.0.2.2:51820 whatever its consumer's
/// endpoint is; when the allowlist's one endpoint changes, the new endpoint's datagrams reach
/// the VM at once (from the alias) and the VM's next ones go there.
#[test]
fn a_vm_talks_to_its_consumers_alias_wherever_the_consumer_is() {
    each(|ns, b| {
        let (first, moved) = (Consumer::new(ns), Consumer::new(ns));
        let rig = Rig::start(ns, &format!("{},alias=51820", allow(&[first.endpoint()])), b, false);
        let alias = ep([10, 0, 2, 2], 51820);
        let from_alias = |frame: &[u8], want: &[u8]| {
            let (ip, payload) = parse_udp(frame);
            let udp = engine::wire::UdpHeader::parse(ip.payload()).expect("UDP").0;
            assert_eq!((ip.src(), udp.src_port.get(), payload.as_slice()), (alias.ip, alias.port, want));
        };
        rig.vm.send(&rig.vm.udp(alias, b"hello"));
        let (got, engine_port) = first.recv(WAIT).expect("the consumer hears what the VM sent its alias");
        assert_eq!(got, b"hello");
        first.sock.send_to(b"answer", engine_port).unwrap();
        from_alias(&rig.vm.recv(WAIT).expect("the consumer's answer"), b"answer");
        // The consumer moves: the VM is not told, and need not send first.
        let list = engine::filter::Allowlist::new([moved.endpoint()]).expect("a list");
        assert!(rig.worker().set_allowlist(std::sync::Arc::new(list), WAIT), "the new list applied");
        moved.sock.send_to(b"from my new address", engine_port).unwrap();
        from_alias(&rig.vm.recv(WAIT).expect("the moved consumer's datagram"), b"from my new address");
        rig.vm.send(&rig.vm.udp(alias, b"again"));
        assert_eq!(moved.recv(WAIT).expect("the VM's next datagram").0, b"again");
        assert!(first.drain(QUIET).is_empty(), "the old endpoint hears nothing more");
        first.sock.send_to(b"stale", engine_port).unwrap();
        let s = rig.wait_for("counted", |s| s.counters.drops_for(DropReason::InboundNotAllowed) == 1);
        assert_eq!((s.counters.alias_out, s.counters.alias_in), (2, 2));
    });
}

#[test]
fn an_alias_with_no_consumer_yet_drops_and_counts() {
    each(|ns, b| {
        let c = Consumer::new(ns);
        let rig = Rig::start(ns, &format!("{},alias=51820", allow(&[c.endpoint()])), b, false);
        let none = engine::filter::Allowlist::new([]).expect("an empty list");
        assert!(rig.worker().set_allowlist(std::sync::Arc::new(none), WAIT));
        rig.vm.send(&rig.vm.udp(ep([10, 0, 2, 2], 51820), b"anyone?"));
        let s = rig.wait_for("counted", |s| s.counters.drops_for(DropReason::AliasUnbound) == 1);
        assert_eq!(s.counters.forwarded_udp, 0);
        assert!(c.drain(QUIET).is_empty());
    });
}

/// A proof rental: the engine learns its consumer's endpoint from a proof sent from it (after
/// any NAT), and from nothing else: not a forgery, not a replay from elsewhere, not a proof
/// outside the clock's bounds. Proofs never reach the guest; the consumer's first datagram
/// after the move does, on the guest port that spoke to the alias before (no send first).
#[test]
fn a_proof_moves_an_alias_vms_endpoint_and_nothing_else_does() {
    use engine::proof;
    each(|ns, b| {
        let key = proof::derive(&[5; 32], &[6; 32], &[7; 32]);
        let (c, stranger) = (Consumer::new(ns), Consumer::new(ns));
        let rig = Rig::start_edited(ns, &format!("{},alias=51820", allow(&[c.endpoint()])), b, false, |cfg| {
            cfg.consumers.clear();
            cfg.proof = Some(key);
        });
        // The private namespace's end of the link to the consumers' (netns.rs).
        let engine_at = std::net::SocketAddr::from(([192, 0, 2, 253], rig.worker().host_port));
        let now_ms = engine::log::unix_ms;
        let alias = ep([10, 0, 2, 2], 51820);
        // The guest speaks to its alias before anyone proved anything.
        rig.vm.send(&rig.vm.udp(alias, b"anyone?"));
        rig.wait_for("unbound", |s| s.counters.drops_for(DropReason::AliasUnbound) == 1);
        // A proof with another key (a member guessing), one from the future, one from the past.
        let t = now_ms();
        stranger.sock.send_to(&proof::seal(&proof::derive(&[1; 32], &[6; 32], &[7; 32]), t), engine_at).unwrap();
        stranger.sock.send_to(&proof::seal(&key, t + 10 * proof::SKEW_MS), engine_at).unwrap();
        rig.wait_for("refused", |s| {
            s.counters.drops_for(DropReason::ProofBadMac) == 1 && s.counters.drops_for(DropReason::ProofStale) == 1
        });
        assert!(rig.events.try_recv().is_err(), "nothing moved");
        // The consumer's proof, from its own socket.
        let good = proof::seal(&key, now_ms());
        c.sock.send_to(&good, engine_at).unwrap();
        match rig.events.recv_timeout(WAIT) {
            Ok(engine::worker::Event { kind: EventKind::EndpointProved(to), .. }) => {
                assert_eq!(to, c.endpoint())
            }
            other => panic!("no move asked for: {other:?}"),
        }
        // The same proof replayed from elsewhere moves nothing.
        stranger.sock.send_to(&good, engine_at).unwrap();
        rig.wait_for("replay", |s| s.counters.drops_for(DropReason::ProofReplayed) == 1);
        assert!(rig.events.try_recv().is_err(), "a replay moved the endpoint");
        // What the control thread does with the event; then the consumer is heard at once.
        let list = engine::filter::Allowlist::new([c.endpoint()]).expect("a list");
        assert!(rig.worker().set_allowlist(std::sync::Arc::new(list), WAIT));
        c.sock.send_to(&proof::seal(&key, now_ms() + 1), engine_at).unwrap();
        c.sock.send_to(b"hello", engine_at).unwrap();
        let frame = rig.vm.recv(WAIT).expect("the consumer's datagram reaches the guest");
        let (ip, payload) = parse_udp(&frame);
        assert_eq!((ip.src(), payload.as_slice()), (alias.ip, &b"hello"[..]), "from the alias, not a proof");
        assert!(rig.vm.recv(QUIET).is_none(), "no proof reaches the guest");
        let s = rig.wait_for("counted", |s| s.counters.proofs_accepted == 2);
        assert_eq!((s.counters.endpoint_proved, s.counters.alias_in), (1, 1));
    });
}
