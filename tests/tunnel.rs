//! The consumer's userspace tunnel (boringtun and smoltcp in one process, no TUN, no root
//! needed) against real WireGuard software: a `wireguard-go` (or kernel WireGuard) peer in a
//! namespace of its own stands in for the VM, with TCP servers behind it.
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mesh::tunnel::user::{self, Spec, UserTunnel};
use omerta_it::{private_netns, RealWgConsumer};

const ME: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const VM: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

fn key(b64: &str) -> [u8; 32] {
    omerta_tools::unbase64(b64).and_then(|k| k.try_into().ok()).expect("a 32-byte key")
}

/// A stand-in VM (a WireGuard peer at 203.0.113.2:51820 with tunnel address [`VM`]) and a
/// userspace tunnel to it, started toward its endpoint.
fn tunnel_to_stand_in(ns: &omerta_it::Netns, tag: &str) -> Option<(RealWgConsumer, UserTunnel)> {
    tunnel_and_key(ns, tag).map(|(vm, t, _)| (vm, t))
}

/// [`tunnel_to_stand_in`], and the tunnel's public key.
fn tunnel_and_key(ns: &omerta_it::Netns, tag: &str) -> Option<(RealWgConsumer, UserTunnel, [u8; 32])> {
    tunnel_sharing(ns, tag, Default::default())
}

/// [`tunnel_and_key`], its connections counted in the daemon-wide `shared`.
fn tunnel_sharing(
    ns: &omerta_it::Netns,
    tag: &str,
    shared: user::streams::Shared,
) -> Option<(RealWgConsumer, UserTunnel, [u8; 32])> {
    let vm = RealWgConsumer::start(ns, tag, &[&format!("{VM}/24")])?;
    let (private, public) = control::provision::wg_keypair().expect("keys");
    vm.add_peer(&public, &format!("{ME}/32"));
    let spec = Spec {
        name: "standin0".into(),
        private: key(&private),
        peer: key(&vm.public),
        me: ME,
        vm: VM,
        endpoint: Some(SocketAddr::from(([203, 0, 113, 2], 51820))),
        proof: None,
        streams: shared,
    };
    let t = UserTunnel::start(user::bind(0).expect("bind"), spec).expect("start the tunnel");
    Some((vm, t, key(&public)))
}

/// Opens `port` on the stand-in through the tunnel, joined to one end of a unix pair: the
/// other end, as a CLI would hold it.
fn connect(t: &UserTunnel, port: u16) -> Result<UnixStream, String> {
    let id = t.open(port)?;
    let (ours, cli) = UnixStream::pair().expect("socketpair");
    t.attach(id, ours);
    Ok(cli)
}

/// Sends `count` ICMP echo requests to `to` (a raw socket: the test runs as root) and counts
/// the answers from `to` seen within a second of each.
fn ping(to: Ipv4Addr, count: u16) -> usize {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)).expect("a raw ICMP socket");
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut replies = 0;
    for seq in 0..count {
        let mut echo = [8u8, 0, 0, 0, 0x4f, 0x4d, 0, 0, b'p', b'i', b'n', b'g'];
        echo[6..8].copy_from_slice(&seq.to_be_bytes());
        let c = engine::wire::csum::checksum(&echo);
        echo[2..4].copy_from_slice(&c.to_be_bytes());
        s.send_to(&echo, &SocketAddr::from((to, 0)).into()).expect("send an echo request");
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
        let end = Instant::now() + Duration::from_secs(1);
        while Instant::now() < end {
            match s.recv_from(&mut buf) {
                // Anything ICMP back from `to` (a reply or an error) counts as an answer.
                Ok((n, from)) if n > 20 && from.as_socket_ipv4().is_some_and(|a| *a.ip() == to) => {
                    replies += 1;
                    break;
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
    }
    replies
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn a_userspace_tunnel_carries_tcp_both_ways_with_half_closes() {
    private_netns(|ns| {
        let Some((vm, t)) = tunnel_to_stand_in(ns, "tcp") else { return };
        // The VM's server: reads everything the client sends until its FIN, then sends back
        // a different 6 MiB and closes.
        let listener = vm.run(|| TcpListener::bind((VM, 5000)).expect("listen on the stand-in"));
        let upload = pattern(6 << 20, 7);
        let download = pattern(6 << 20, 11);
        let (up, down) = (upload.clone(), download.clone());
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut got = Vec::new();
            s.read_to_end(&mut got).expect("read until the client's FIN");
            s.write_all(&down).expect("send back");
            got == up
        });
        let mut cli = connect(&t, 5000).expect("the stand-in accepts");
        cli.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let writer = {
            let mut w = cli.try_clone().unwrap();
            std::thread::spawn(move || {
                w.write_all(&upload).expect("upload");
                w.shutdown(std::net::Shutdown::Write).expect("half close");
            })
        };
        let mut got = Vec::new();
        cli.read_to_end(&mut got).expect("read until the VM's FIN");
        writer.join().unwrap();
        assert!(server.join().unwrap(), "the VM received every byte sent, in order");
        assert_eq!(got.len(), download.len(), "bytes from the VM");
        assert!(got == download, "the VM's bytes arrive intact, in order");
        assert!(t.stats().last_handshake.load(Ordering::Relaxed) > 0, "a handshake is noted");
        assert_eq!(t.stats().fence_drops(), vec![], "nothing of ours was fenced");
    });
}

#[test]
fn a_port_with_nothing_behind_it_is_refused_in_one_line() {
    private_netns(|ns| {
        let Some((_vm, t)) = tunnel_to_stand_in(ns, "refused") else { return };
        let e = connect(&t, 5999).expect_err("nothing listens on 5999");
        assert!(e.contains("refused") && !e.contains('\n'), "{e}");
        assert_eq!(t.stats().streams_refused.load(Ordering::Relaxed), 1);
    });
}

#[test]
fn the_vm_behind_a_userspace_tunnel_reaches_nothing_on_our_side() {
    private_netns(|ns| {
        let Some((vm, t)) = tunnel_to_stand_in(ns, "fence") else { return };
        // A connection of ours is open (so the tunnel is up and one flow is allowed).
        let listener = vm.run(|| TcpListener::bind((VM, 22)).expect("listen on the stand-in"));
        let _cli = connect(&t, 22).expect("the stand-in accepts");
        let _conn = listener.accept().expect("accept");
        // The VM tries: TCP to our address (on the port of our open flow and others), UDP,
        // ping. Each must time out: not refused (that would be a reset from our stack).
        let tries = vm.run(move || {
            let mut refused = 0;
            for port in [22u16, 49152, 2222] {
                let to = SocketAddr::from((ME, port));
                match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                    Ok(_) => panic!("the VM connected to {to}"),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
                    Err(_) => {}
                }
            }
            let u = std::net::UdpSocket::bind((VM, 0)).unwrap();
            for _ in 0..3 {
                let _ = u.send_to(b"hello consumer", (ME, 5353));
            }
            refused
        });
        assert_eq!(tries, 0, "our stack answered the VM's SYN with a reset");
        let answered = vm.run(|| ping(ME, 2));
        assert_eq!(answered, 0, "the VM's pings were answered");
        let deadline = Instant::now() + Duration::from_secs(5);
        let drops = loop {
            let d = t.stats().fence_drops();
            let n = |k| d.iter().find(|(name, _)| *name == k).map_or(0, |x| x.1);
            if (n("syn") >= 3 && n("udp") >= 3 && n("icmp") >= 2) || Instant::now() > deadline {
                break d;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let n = |k| drops.iter().find(|(name, _)| *name == k).map_or(0, |x| x.1);
        assert!(n("syn") >= 3, "the VM's connection attempts are counted as fenced: {drops:?}");
        assert!(n("udp") >= 3, "the VM's datagrams are counted as fenced: {drops:?}");
        assert!(n("icmp") >= 2, "the VM's pings are counted as fenced: {drops:?}");
    });
}

/// Anyone who knows the tunnel's public key can make handshake initiations with a valid mac1;
/// past boringtun's rate (10 a tick) it answers them with cookies. None of that proves the
/// VM's key: the tunnel's endpoint stays where the VM is, and its connections go on.
#[test]
fn a_flood_of_handshakes_from_elsewhere_moves_nothing() {
    private_netns(|ns| {
        let Some((vm, t, ours)) = tunnel_and_key(ns, "flood") else { return };
        let listener = vm.run(|| TcpListener::bind((VM, 22)).expect("listen on the stand-in"));
        let mut cli = connect(&t, 22).expect("the stand-in accepts");
        let (mut conn, _) = listener.accept().expect("accept");
        let at = *t.stats().endpoint.lock().unwrap();
        // The attacker: its own static key, our public key as its peer.
        let mut seed = [0u8; 32];
        seed[0] = 9;
        let mut attacker = boringtun::noise::Tunn::new(
            boringtun::x25519::StaticSecret::from(seed),
            boringtun::x25519::PublicKey::from(ours),
            None,
            None,
            1,
            None,
        );
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("the attacker's socket");
        let mut buf = [0u8; 256];
        for _ in 0..300 {
            if let boringtun::noise::TunnResult::WriteToNetwork(d) =
                attacker.format_handshake_initiation(&mut buf, true)
            {
                let _ = s.send_to(d, ("127.0.0.1", t.port()));
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(*t.stats().endpoint.lock().unwrap(), at, "the endpoint moved to the flooder");
        assert_eq!(t.stats().endpoint_moves.load(Ordering::Relaxed), 0);
        // And the connection is still the VM's.
        cli.write_all(b"still here").unwrap();
        let mut got = [0u8; 10];
        conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        conn.read_exact(&mut got).expect("the VM still hears us");
        assert_eq!(&got, b"still here");
    });
}

/// A CLI that went away takes its connection with it, even from a VM that never closes its
/// side: the VM gets a reset, and the connection no longer counts against the VM's limit.
#[test]
fn a_cli_that_goes_away_resets_its_connection() {
    private_netns(|ns| {
        let Some((vm, t)) = tunnel_to_stand_in(ns, "gone") else { return };
        let listener = vm.run(|| TcpListener::bind((VM, 22)).expect("listen on the stand-in"));
        let cli = connect(&t, 22).expect("the stand-in accepts");
        let (mut conn, _) = listener.accept().expect("accept");
        conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        drop(cli);
        // The VM hears the end: a reset, or (when the tunnel read the CLI's end of file
        // before it saw the CLI gone) a FIN and then the reset.
        let mut b = [0u8; 8];
        let got = conn.read(&mut b);
        assert!(
            matches!(got, Ok(0)) || got.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "the VM hears the connection end: {got:?}"
        );
        // The VM never closes its side, yet the connection goes (before: it stayed, half open,
        // holding its place under the limits for as long as the VM answered keepalives).
        let end = Instant::now() + Duration::from_secs(5);
        while t.stats().streams.load(Ordering::Relaxed) != 0 {
            assert!(Instant::now() < end, "the connection still counts");
            std::thread::sleep(Duration::from_millis(50));
        }
        // It was reset: what the VM sends now is refused.
        let end = Instant::now() + Duration::from_secs(5);
        while conn.write(b"anyone?").is_ok() {
            assert!(Instant::now() < end, "the VM's side was left open");
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}

/// The daemon's limit holds across its tunnels, counted when a connection opens: with 127
/// held elsewhere one more opens, the next is refused in one line, and a closed one frees its
/// place.
#[test]
fn the_daemons_connection_limit_holds_across_its_tunnels() {
    use mesh::tunnel::user::streams::MAX_PER_DAEMON;
    private_netns(|ns| {
        let shared = user::streams::Shared::default();
        shared.store(MAX_PER_DAEMON - 1, Ordering::SeqCst);
        let Some((vm, t, _)) = tunnel_sharing(ns, "limit", shared.clone()) else { return };
        let listener = vm.run(|| TcpListener::bind((VM, 22)).expect("listen on the stand-in"));
        let first = connect(&t, 22).expect("the 128th connection opens");
        let _conn = listener.accept().expect("accept");
        let e = connect(&t, 22).expect_err("the 129th is refused");
        assert!(e.contains("busy") && !e.contains('\n'), "{e}");
        drop(first);
        let end = Instant::now() + Duration::from_secs(5);
        while shared.load(Ordering::SeqCst) != MAX_PER_DAEMON - 1 {
            assert!(Instant::now() < end, "a closed connection keeps its place");
            std::thread::sleep(Duration::from_millis(50));
        }
        let _again = connect(&t, 22).expect("its place is free again");
    });
}
