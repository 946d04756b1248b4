//! `omerta-guest`: the test helper inside a guest VM (built static, copied into the initramfs).
//!
//! Every command is bounded in count and time and prints one result line the host test reads
//! from the serial console:
//!
//! ```text
//! omerta-guest udp-rr IP:PORT MSG [TIMEOUT_MS]   send MSG, wait for a reply   REPLY:<text> | NO-REPLY
//! omerta-guest udp-send IP:PORT MSG [COUNT]      fire and forget              SENT <n>
//! omerta-guest udp-seq IP:PORT PFX COUNT [AT BAD] PFX-0.. back to back; one   SENT-SEQ <n> BAD <0|1>
//!                                                 datagram to BAD before PFX-AT
//! omerta-guest ping IP [COUNT]                   ICMP echo (raw socket)       PING-REPLIES <n>
//! omerta-guest scan IP FIRST LAST                UDP probes + TCP connects    SCAN-ANSWERS <n>
//! omerta-guest dns IP                            DNS query for example.com    DNS-ANSWER | DNS-NO-ANSWER
//! omerta-guest udp-echo PORT COUNT MS [TO MSG]   echo COUNT datagrams back    ECHOED <n>
//!                                                 (first MSG to TO from PORT)
//! omerta-guest raw-udp IP:PORT MSG               one UDP frame by AF_PACKET   RAW-SENT <bytes>
//! omerta-guest raw-seq IP:PORT PFX COUNT AT BAD   udp-seq as raw frames in one RAW-SEQ <n>
//!                                                 sendmmsg batch after another
//! omerta-guest tcp-hold IP:PORT SECONDS          connect and stay connected   TCP-CONNECTED | TCP-FAILED
//! omerta-guest udp-join IP:PORT PEER MS           bind with SO_REUSEPORT,      JOIN-REFUSED <why> |
//!                                                 connect to PEER, count       JOINED, then RECEIVED <n>
//! ```
//!
//! `udp-join` is a host-side command: a local process that tries to share a port the engine
//! holds (`SO_REUSEPORT`) and to be handed the datagrams PEER sends to it.
//!
//! `raw-udp` writes a whole Ethernet frame below the guest's own firewall, as a root user in a
//! rented VM always can: only the engine stands in its way.
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T, String> {
    args.get(i).ok_or_else(|| format!("missing {what}"))?.parse().map_err(|_| format!("bad {what}"))
}

fn udp_rr(target: SocketAddr, msg: &str, timeout: Duration) -> std::io::Result<Option<String>> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(timeout))?;
    s.send_to(msg.as_bytes(), target)?;
    let mut buf = [0u8; 2048];
    match s.recv_from(&mut buf) {
        Ok((n, _)) => Ok(Some(String::from_utf8_lossy(buf.get(..n).unwrap_or_default()).into_owned())),
        Err(_) => Ok(None),
    }
}

fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in b.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !u16::try_from(s).unwrap_or(u16::MAX)
}

fn ping(ip: Ipv4Addr, count: u16) -> std::io::Result<u32> {
    // A raw ICMP socket (the guest runs tests as root), used through std's datagram calls:
    // sendto/recvfrom work on any datagram-like socket and take initialized buffers.
    let s: UdpSocket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?.into();
    s.set_read_timeout(Some(Duration::from_millis(700)))?;
    let mut replies = 0;
    for seq in 1..=count {
        let mut m = vec![8u8, 0, 0, 0, 0x0b, 0xad];
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(b"omerta-ping");
        let c = checksum(&m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        s.send_to(&m, SocketAddrV4::new(ip, 0))?;
        let deadline = Instant::now() + Duration::from_millis(700);
        while Instant::now() < deadline {
            let mut buf = [0u8; 1500];
            let Ok((n, _)) = s.recv_from(&mut buf) else { break };
            let bytes = buf.get(..n).unwrap_or_default();
            let ihl = usize::from(bytes.first().copied().unwrap_or(0) & 0x0f) * 4;
            let src = bytes.get(12..16).map(|a| Ipv4Addr::new(a[0], a[1], a[2], a[3]));
            if bytes.get(ihl) == Some(&0)
                && src == Some(ip)
                && bytes.get(ihl + 6..ihl + 8) == Some(&seq.to_be_bytes()[..])
            {
                replies += 1;
                break;
            }
        }
    }
    Ok(replies)
}

fn scan(ip: Ipv4Addr, first: u16, last: u16) -> u32 {
    let mut answers = 0;
    let udp = UdpSocket::bind("0.0.0.0:0").ok();
    for port in first..=last.min(first.saturating_add(1023)) {
        if let Some(u) = &udp {
            let _ = u.send_to(b"probe", (ip, port));
        }
        if TcpStream::connect_timeout(&SocketAddr::from((ip, port)), Duration::from_millis(30)).is_ok() {
            answers += 1;
        }
    }
    if let Some(u) = &udp {
        let _ = u.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 512];
        while u.recv_from(&mut buf).is_ok() {
            answers += 1;
        }
    }
    answers
}

fn dns(ip: Ipv4Addr) -> bool {
    let q = [
        0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 3, b'c', b'o', b'm', 0,
        0, 1, 0, 1,
    ];
    let Ok(s) = UdpSocket::bind("0.0.0.0:0") else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = s.send_to(&q, (ip, 53));
    let mut buf = [0u8; 512];
    s.recv_from(&mut buf).is_ok()
}

fn run(args: &[String]) -> Result<bool, String> {
    let cmd = args.first().map(String::as_str).unwrap_or("");
    let io = |e: std::io::Error| e.to_string();
    match cmd {
        "udp-rr" => {
            let target: SocketAddr = arg(args, 1, "IP:PORT")?;
            let msg: String = arg(args, 2, "message")?;
            let ms: u64 = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(2000);
            match udp_rr(target, &msg, Duration::from_millis(ms)).map_err(io)? {
                Some(r) => {
                    println!("REPLY:{r}");
                    Ok(true)
                }
                None => {
                    println!("NO-REPLY");
                    Ok(false)
                }
            }
        }
        "udp-send" => {
            let target: SocketAddr = arg(args, 1, "IP:PORT")?;
            let msg: String = arg(args, 2, "message")?;
            let count: u32 = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(1).min(100_000);
            let s = UdpSocket::bind("0.0.0.0:0").map_err(io)?;
            let mut sent = 0;
            for _ in 0..count {
                if s.send_to(msg.as_bytes(), target).is_ok() {
                    sent += 1;
                }
            }
            println!("SENT {sent}");
            Ok(true)
        }
        "udp-seq" => {
            let target: SocketAddr = arg(args, 1, "IP:PORT")?;
            let prefix: String = arg(args, 2, "prefix")?;
            let count: u32 = arg::<u32>(args, 3, "count")?.min(100_000);
            let bad: Option<(u32, SocketAddr)> = match (args.get(4), args.get(5)) {
                (Some(_), Some(_)) => Some((arg(args, 4, "index")?, arg(args, 5, "bad IP:PORT")?)),
                _ => None,
            };
            let s = UdpSocket::bind("0.0.0.0:0").map_err(io)?;
            let (mut sent, mut bad_sent) = (0, 0);
            for i in 0..count {
                if let Some((_, to)) = bad.filter(|(at, _)| *at == i) {
                    bad_sent += u32::from(s.send_to(b"violation", to).is_ok());
                }
                if s.send_to(format!("{prefix}-{i}").as_bytes(), target).is_ok() {
                    sent += 1;
                }
            }
            println!("SENT-SEQ {sent} BAD {bad_sent}");
            Ok(true)
        }
        "ping" => {
            let ip: Ipv4Addr = arg(args, 1, "IP")?;
            let count: u16 = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(3).min(100);
            let n = ping(ip, count).map_err(io)?;
            println!("PING-REPLIES {n}");
            Ok(n > 0)
        }
        "scan" => {
            let ip: Ipv4Addr = arg(args, 1, "IP")?;
            let (a, b): (u16, u16) = (arg(args, 2, "first port")?, arg(args, 3, "last port")?);
            let n = scan(ip, a, b);
            println!("SCAN-ANSWERS {n}");
            Ok(n == 0)
        }
        "dns" => {
            let ip: Ipv4Addr = arg(args, 1, "IP")?;
            let ok = dns(ip);
            println!("{}", if ok { "DNS-ANSWER" } else { "DNS-NO-ANSWER" });
            Ok(!ok)
        }
        "udp-echo" => {
            let port: u16 = arg(args, 1, "port")?;
            let count: u32 = arg(args, 2, "count")?;
            let ms: u64 = arg(args, 3, "timeout ms")?;
            let s = UdpSocket::bind(("0.0.0.0", port)).map_err(io)?;
            s.set_read_timeout(Some(Duration::from_millis(ms))).map_err(io)?;
            if let (Some(_), Some(msg)) = (args.get(4), args.get(5)) {
                let to: SocketAddr = arg(args, 4, "announce IP:PORT")?;
                s.send_to(msg.as_bytes(), to).map_err(io)?;
            }
            let mut n = 0;
            let mut buf = [0u8; 2048];
            while n < count.min(100_000) {
                let Ok((len, from)) = s.recv_from(&mut buf) else { break };
                let _ = s.send_to(buf.get(..len).unwrap_or_default(), from);
                n += 1;
            }
            println!("ECHOED {n}");
            Ok(n == count)
        }
        "tcp-hold" => {
            let target: SocketAddr = arg(args, 1, "IP:PORT")?;
            let secs: u64 = arg(args, 2, "seconds")?;
            match TcpStream::connect_timeout(&target, Duration::from_secs(3)) {
                Ok(s) => {
                    println!("TCP-CONNECTED");
                    std::thread::sleep(Duration::from_secs(secs.min(60)));
                    drop(s);
                    Ok(true)
                }
                Err(e) => {
                    println!("TCP-FAILED {e}");
                    Ok(false)
                }
            }
        }
        "udp-join" => {
            let at: SocketAddrV4 = arg(args, 1, "IP:PORT")?;
            let peer: SocketAddrV4 = arg(args, 2, "peer IP:PORT")?;
            let ms: u64 = arg::<u64>(args, 3, "ms")?.min(10_000);
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(io)?;
            s.set_reuse_port(true).map_err(io)?;
            if let Err(e) = s.bind(&at.into()) {
                println!("JOIN-REFUSED {e}");
                return Ok(false);
            }
            // Connected to PEER: the kernel prefers a connected socket for PEER's datagrams.
            s.connect(&peer.into()).map_err(io)?;
            println!("JOINED");
            let s = UdpSocket::from(s);
            let end = Instant::now() + Duration::from_millis(ms);
            let (mut n, mut buf) = (0u64, [0u8; 2048]);
            while let Some(left) = end.checked_duration_since(Instant::now()).filter(|l| !l.is_zero()) {
                s.set_read_timeout(Some(left)).map_err(io)?;
                if s.recv(&mut buf).is_ok() {
                    n += 1;
                }
            }
            println!("RECEIVED {n}");
            Ok(true)
        }
        "raw-udp" => {
            let target: SocketAddrV4 = arg(args, 1, "IP:PORT")?;
            let msg: String = arg(args, 2, "message")?;
            let id = engine::VmIdentity::default();
            let frame = engine::testkit::FrameSpec::udp(&id, engine::Endpoint::from(target), msg.as_bytes()).build();
            let n = sys::bench::send_raw_frame(&nic(), &frame).map_err(io)?;
            println!("RAW-SENT {n}");
            Ok(true)
        }
        "raw-seq" => {
            let target: SocketAddrV4 = arg(args, 1, "IP:PORT")?;
            let prefix: String = arg(args, 2, "prefix")?;
            let count: u32 = arg::<u32>(args, 3, "count")?.min(10_000);
            let at: u32 = arg(args, 4, "index")?;
            let bad: SocketAddrV4 = arg(args, 5, "bad IP:PORT")?;
            let id = engine::VmIdentity::default();
            let frame = |to: SocketAddrV4, payload: &[u8]| {
                engine::testkit::FrameSpec::udp(&id, engine::Endpoint::from(to), payload).build()
            };
            let mut frames = Vec::new();
            for i in 0..count {
                if i == at {
                    frames.push(frame(bad, b"violation"));
                }
                frames.push(frame(target, format!("{prefix}-{i}").as_bytes()));
            }
            let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
            let n = sys::bench::send_raw_frames(&nic(), &refs).map_err(io)?;
            println!("RAW-SEQ {n}");
            Ok(true)
        }
        _ => Err(
            "usage: omerta-guest udp-rr|udp-send|udp-seq|ping|scan|dns|udp-echo|tcp-hold|udp-join|raw-udp|raw-seq ... (see the source)"
                .into(),
        ),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("omerta-guest: {e}");
            ExitCode::from(2)
        }
    }
}

/// The NIC raw frames leave by: `eth0` (the test guest), or `$OMERTA_NIC` (a cloud image names
/// its NIC after its slot, `enp0s2`).
fn nic() -> String {
    std::env::var("OMERTA_NIC").ok().filter(|n| !n.is_empty() && n.len() < 16).unwrap_or_else(|| "eth0".into())
}
