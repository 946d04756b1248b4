//! `omerta-consumer`: the consumer's end of a WireGuard tunnel, in userspace (boringtun), for
//! tests and the demo. It answers ICMP echo and echoes UDP inside the tunnel, and prints one
//! line per event for the caller to read:
//!
//! ```text
//! omerta-consumer LISTEN_IP:PORT PRIVATE_B64 PEER_PUBLIC_B64 TUNNEL_IP SECONDS
//! omerta-consumer genkey        # prints a new key pair: PRIVATE_B64 PUBLIC_B64
//! ```
//!
//! Lines: `LISTENING`, `HANDSHAKE from IP:PORT` (each answered initiation), `TUNNEL-PING from IP`, `TUNNEL-UDP <payload>`
//! followed by `CIPHERTEXT-CLEAN` (the datagram that carried it did not contain the payload in
//! clear) or `PLAINTEXT-SEEN`.
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use engine::wire::{csum, IcmpEchoHeader, IcmpType, IpProtocol, Ipv4Header, Ipv4Packet, UdpHeader};
use zerocopy::IntoBytes;

fn key(b64: &str) -> Option<[u8; 32]> {
    omerta_tools::unbase64(b64)?.try_into().ok()
}

/// The reply to an inner packet, if it deserves one: ICMP echo reply, or a UDP echo.
fn answer(packet: &[u8], me: Ipv4Addr, seen: &mut Vec<Vec<u8>>) -> Option<Vec<u8>> {
    let ip = Ipv4Packet::parse(packet).ok()?;
    if ip.dst() != me {
        return None;
    }
    match ip.protocol() {
        IpProtocol::Icmp => {
            let (h, data) = IcmpEchoHeader::parse(ip.payload()).ok()?;
            if !h.is_echo(IcmpType::EchoRequest) {
                return None;
            }
            println!("TUNNEL-PING from {}", ip.src());
            let mut reply = *h;
            reply.kind = IcmpType::EchoReply.into();
            reply.checksum = zerocopy::network_endian::U16::new(engine::wire::icmp::checksum(&reply, data));
            let len = u16::try_from(8 + data.len()).ok()?;
            let mut out = Ipv4Header::new(me, ip.src(), IpProtocol::Icmp, len, 64).as_bytes().to_vec();
            out.extend_from_slice(reply.as_bytes());
            out.extend_from_slice(data);
            Some(out)
        }
        IpProtocol::Udp => {
            let (h, payload) = UdpHeader::parse(ip.payload()).ok()?;
            println!("TUNNEL-UDP {}", String::from_utf8_lossy(payload));
            seen.push(payload.to_vec());
            let mut body = b"tunnel-echo:".to_vec();
            body.extend_from_slice(payload);
            let udp_len = u16::try_from(8 + body.len()).ok()?;
            let mut uh = UdpHeader { src_port: h.dst_port, dst_port: h.src_port, len: h.len, checksum: h.checksum };
            uh.len = zerocopy::network_endian::U16::new(udp_len);
            uh.checksum = zerocopy::network_endian::U16::new(engine::wire::udp::checksum(me, ip.src(), &uh, &body));
            let mut out = Ipv4Header::new(me, ip.src(), IpProtocol::Udp, udp_len, 64).as_bytes().to_vec();
            out.extend_from_slice(uh.as_bytes());
            out.extend_from_slice(&body);
            let _ = csum::checksum(&out);
            Some(out)
        }
        _ => None,
    }
}

fn run(args: &[String]) -> Result<(), String> {
    if args.first().map(String::as_str) == Some("genkey") {
        let mut seed = [0u8; 32];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").map_err(|e| e.to_string())?, &mut seed)
            .map_err(|e| e.to_string())?;
        let (private, public) = omerta_tools::wg_keypair(seed);
        println!("{private} {public}");
        return Ok(());
    }
    let [listen, private, peer, tunnel_ip, seconds] = args else {
        return Err("usage: omerta-consumer LISTEN_IP:PORT PRIVATE_B64 PEER_PUBLIC_B64 TUNNEL_IP SECONDS".into());
    };
    let listen: SocketAddr = listen.parse().map_err(|_| "bad LISTEN_IP:PORT")?;
    let me: Ipv4Addr = tunnel_ip.parse().map_err(|_| "bad TUNNEL_IP")?;
    let secs: u64 = seconds.parse().map_err(|_| "bad SECONDS")?;
    let private = StaticSecret::from(key(private).ok_or("bad private key")?);
    let peer = PublicKey::from(key(peer).ok_or("bad peer key")?);
    let mut tunn = Tunn::new(private, peer, None, None, 1, None);
    let sock = UdpSocket::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(100))).map_err(|e| e.to_string())?;
    println!("LISTENING");
    let _ = std::io::stdout().flush();
    let end = Instant::now() + Duration::from_secs(secs.min(600));
    let (mut buf, mut out) = (vec![0u8; 65536], vec![0u8; 65536]);
    let (mut datagrams, mut plaintext) = (0u64, false);
    let mut seen: Vec<Vec<u8>> = Vec::new();
    let mut peer_addr: Option<SocketAddr> = None;
    while Instant::now() < end {
        if let TunnResult::WriteToNetwork(p) = tunn.update_timers(&mut out) {
            if let Some(a) = peer_addr {
                let _ = sock.send_to(p, a);
            }
        }
        let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
        datagrams += 1;
        peer_addr = Some(from);
        let datagram = buf.get(..n).unwrap_or_default().to_vec();
        let mut input = datagram.clone();
        loop {
            match tunn.decapsulate(Some(from.ip()), &input, &mut out) {
                TunnResult::WriteToNetwork(p) => {
                    let _ = sock.send_to(p, from);
                    // Each answered handshake initiation (message type 1), the first and every
                    // new one after (a rekey, a peer that lost its session or moved).
                    if datagram.first() == Some(&1) && input.len() == datagram.len() {
                        println!("HANDSHAKE from {from}");
                    }
                    input.clear();
                }
                TunnResult::WriteToTunnelV4(p, _) => {
                    let p = p.to_vec();
                    let before = seen.len();
                    let reply = answer(&p, me, &mut seen);
                    // The payload just decrypted must not be readable in the datagram that
                    // carried it.
                    if let (true, Some(clear)) = (seen.len() > before, seen.last()) {
                        if clear.len() >= 4 && datagram.windows(clear.len()).any(|w| w == &clear[..]) {
                            plaintext = true;
                            println!("PLAINTEXT-SEEN");
                        } else {
                            println!("CIPHERTEXT-CLEAN");
                        }
                    }
                    if let Some(reply) = reply {
                        if let TunnResult::WriteToNetwork(enc) = tunn.encapsulate(&reply, &mut out) {
                            let _ = sock.send_to(enc, from);
                        }
                    }
                    break;
                }
                _ => break,
            }
        }
        let _ = std::io::stdout().flush();
    }
    println!("SUMMARY datagrams={datagrams} plaintext-seen={}", if plaintext { "yes" } else { "no" });
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("omerta-consumer: {e}");
            ExitCode::from(2)
        }
    }
}
