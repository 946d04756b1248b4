//! Per-frame cost of the engine core: the allowlist check and the translation, in ns.
//!
//! Back of the envelope: an allowlist check is one hash of a u64 and one probe (~5-15 ns); a
//! 64-byte VM frame is three header views, a 20-byte checksum and that lookup (~30-60 ns).
//! The host direction adds the UDP checksum over the payload (~1400 B: 100-200 ns).
//!
//! The machine's speed drifts by up to 2x within seconds, so the cases run interleaved, round
//! after round, and the table reports the median and the spread over rounds, not one figure.
//! Usage: `microbench [--rounds N] [--iters N]`.
// Reports turn counts and durations into rates and back: truncating casts are deliberate here.
#![allow(clippy::cast_possible_truncation)]
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Instant;

use engine::filter::{Conntrack, Flow, Full, SampleRate, Sampled, Strategy, Transport};
use engine::testkit::generate_test_packet;
use engine::wire::HEADROOM;
use engine::{Allowlist, Endpoint, FilteredNat, VmAction, VmIdentity};

const CONSUMER: Endpoint = Endpoint::new(Ipv4Addr::new(203, 0, 113, 7), 51820);

type Case = (&'static str, Box<dyn FnMut(u64) -> u64>);

fn translate<S: Strategy + 'static>(nat: FilteredNat<S>, frame: Vec<u8>) -> Box<dyn FnMut(u64) -> u64> {
    let mut nat = nat;
    Box::new(move |iters| {
        let mut n = 0u64;
        for _ in 0..iters {
            if let VmAction::ForwardUdp { payload, .. } = nat.vm_frame(black_box(&frame)) {
                n += payload.len() as u64;
            }
        }
        n
    })
}

fn host(size: usize) -> Box<dyn FnMut(u64) -> u64> {
    let id = VmIdentity::default();
    let allow = Arc::new(Allowlist::new([CONSUMER]).expect("valid"));
    let mut nat = FilteredNat::new(id, allow, Full::new());
    let _ = nat.vm_frame(&generate_test_packet(&id, CONSUMER, 64));
    let mut buf = vec![0xabu8; HEADROOM + size];
    Box::new(move |iters| {
        let mut n = 0u64;
        for _ in 0..iters {
            let end = buf.len();
            if let Ok(r) = nat.host_udp(CONSUMER, black_box(&mut buf), HEADROOM..end) {
                n += r.len() as u64;
            }
        }
        n
    })
}

fn lookup(list: Arc<Allowlist>, flow: Flow) -> Box<dyn FnMut(u64) -> u64> {
    Box::new(move |iters| {
        let mut n = 0u64;
        for _ in 0..iters {
            n += u64::from(list.check(black_box(&flow)).is_ok());
        }
        n
    })
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let rounds = arg("--rounds", 15);
    let iters = arg("--iters", 200_000);
    let id = VmIdentity::default();
    let one = Arc::new(Allowlist::new([CONSUMER]).expect("valid"));
    let many = Arc::new(
        Allowlist::new((0..1000u16).map(|i| Endpoint::new(Ipv4Addr::new(198, 51, 100, (i % 250) as u8 + 1), 1000 + i)))
            .expect("valid"),
    );
    let hit = Flow { transport: Transport::Udp, src_port: 40000, dst: CONSUMER };
    let miss = Flow { transport: Transport::Udp, src_port: 40000, dst: Endpoint::new(Ipv4Addr::new(8, 8, 8, 8), 53) };
    let f64b = generate_test_packet(&id, CONSUMER, 64);
    let f1400 = generate_test_packet(&id, CONSUMER, 1400);
    let blocked = generate_test_packet(&id, Endpoint::new(Ipv4Addr::new(8, 8, 8, 8), 53), 64);
    let sampled = Sampled::new(SampleRate::DEFAULT, 1);

    let mut cases: Vec<Case> = vec![
        ("filter/allowlist_check/hit_1_rule", lookup(one.clone(), hit)),
        ("filter/allowlist_check/miss_1_rule", lookup(one.clone(), miss)),
        ("filter/allowlist_check/miss_1k_rules", lookup(many, miss)),
        ("nat/vm_frame/udp_64B/filtered", translate(FilteredNat::new(id, one.clone(), Full::new()), f64b.clone())),
        (
            "nat/vm_frame/udp_64B/conntrack",
            translate(FilteredNat::new(id, one.clone(), Conntrack::default()), f64b.clone()),
        ),
        ("nat/vm_frame/udp_64B/sampled", translate(FilteredNat::new(id, one.clone(), sampled), f64b)),
        ("nat/vm_frame/udp_1400B/filtered", translate(FilteredNat::new(id, one.clone(), Full::new()), f1400)),
        ("nat/vm_frame/blocked_64B/filtered", translate(FilteredNat::new(id, one, Full::new()), blocked)),
        ("nat/host_udp/64B_payload", host(64)),
        ("nat/host_udp/1400B_payload", host(1400)),
    ];

    // The direct-mode rogue-connection detector: one check of this process, holding 32 TCP
    // connections and 32 UDP sockets (a busy VMM), as ns per check.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let held: Vec<_> = (0..32)
        .map(|_| {
            let c = std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
            let a = listener.accept().expect("accept");
            let u = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
            (c, a, u)
        })
        .collect();
    let pid = std::process::id();
    let consumer: Endpoint = "203.0.113.7:51820".parse().expect("endpoint");
    cases.push((
        "rogue/check/64_sockets (per check)",
        Box::new(move |iters| {
            let mut n = 0u64;
            for _ in 0..iters {
                let conns = control::rogue::connections(pid).unwrap_or_default();
                n += control::rogue::rogue(&conns, &[consumer]).len() as u64;
            }
            n
        }),
    ));
    let rogue_case = cases.len() - 1;

    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for (i, (_, f)) in cases.iter_mut().enumerate() {
        black_box(f(if i == rogue_case { 10 } else { iters / 10 })); // warm up
    }
    for _ in 0..rounds {
        for (i, (_, f)) in cases.iter_mut().enumerate() {
            // A detector check costs tens of microseconds: fewer iterations keep rounds short.
            let n = if i == rogue_case { (iters / 1000).max(10) } else { iters };
            let t = Instant::now();
            black_box(f(n));
            samples[i].push(t.elapsed().as_nanos() as f64 / n as f64);
        }
    }
    drop(held);
    println!("{rounds} interleaved rounds of {iters} iterations; ns per operation");
    println!("| case | median ns | min ns | max ns |");
    println!("|---|---:|---:|---:|");
    for ((name, _), s) in cases.iter().zip(samples.iter_mut()) {
        s.sort_by(f64::total_cmp);
        let median = s[s.len() / 2];
        println!("| {name} | {median:.1} | {:.1} | {:.1} |", s[0], s[s.len() - 1]);
    }
    let check = samples[rogue_case][samples[rogue_case].len() / 2];
    println!(
        "rogue-connection detector: {:.1} µs per check; at one check every 5 s that is {:.4}% of one core",
        check / 1e3,
        check / 5e9 * 100.0
    );
}
