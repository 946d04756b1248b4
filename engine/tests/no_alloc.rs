//! Zero heap allocations per packet on the translation path (DHCP answers and their frames
//! included), shown with a counting allocator.
//!
//! This is a test binary without the libtest harness, so nothing else allocates while the
//! measured loops run.
// A counting global allocator is unsafe by nature (test only).
#![allow(unsafe_code)]
use std::alloc::{GlobalAlloc, Layout, System};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use engine::filter::{Conntrack, Full, SampleRate, Sampled, Strategy};
use engine::testkit::{arp_request, corpus, generate_test_packet, FrameSpec};
use engine::wire::HEADROOM;
use engine::{Allowlist, DropReason, Endpoint, FilteredNat, VmAction, VmIdentity};

struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call unchanged to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const CONSUMER: Endpoint = Endpoint::new(Ipv4Addr::new(203, 0, 113, 7), 51820);

fn run<S: Strategy>(name: &str, mut nat: FilteredNat<S>, frames: &[Vec<u8>]) -> u64 {
    let mut buf = vec![0u8; 2048];
    let before = ALLOCS.load(Ordering::Relaxed);
    let mut forwarded = 0u64;
    for round in 0..2_000u16 {
        for f in frames {
            match nat.vm_frame(f) {
                VmAction::ForwardUdp { payload, .. } => forwarded += payload.len() as u64,
                // DHCP replies are built in a frame buffer, as the worker does.
                VmAction::DhcpReply(r) => {
                    let _ = r.emit(&mut buf);
                }
                _ => {}
            }
        }
        // Host side: a reply from the consumer and one from a stranger.
        let len = 64 + usize::from(round % 1000);
        let _ = nat.host_udp(CONSUMER, &mut buf, HEADROOM..HEADROOM + len);
        let _ = nat.host_udp(Endpoint::new(Ipv4Addr::new(8, 8, 8, 8), 53), &mut buf, HEADROOM..HEADROOM + len);
        let _ = nat.host_icmp(CONSUMER.ip, &mut buf, HEADROOM - 8..HEADROOM + 56);
    }
    let allocs = ALLOCS.load(Ordering::Relaxed) - before;
    assert!(nat.terminated().is_none(), "{name}: terminated, so the loop measured nothing");
    println!(
        "{name}: {allocs} allocations over {} frames ({forwarded} payload bytes forwarded)",
        2_000 * (frames.len() + 3)
    );
    allocs
}

fn main() {
    let id = VmIdentity::default();
    let allow = Arc::new(Allowlist::new([CONSUMER]).expect("valid list"));
    let mut frames = corpus(&id, CONSUMER);
    frames.push(arp_request(&id, id.gateway_ip));
    frames.push(FrameSpec::icmp_echo(&id, CONSUMER.ip, 5, 1, b"abcdefgh").build());
    frames.push(generate_test_packet(&id, CONSUMER, 1514));
    // Many source ports so the conntrack table fills and evicts on the measured path.
    for port in 0..300u16 {
        let mut f = FrameSpec::udp(&id, CONSUMER, b"x");
        if let engine::testkit::L4::Udp { src_port, .. } = &mut f.l4 {
            *src_port = 10_000 + port;
        }
        frames.push(f.build());
    }
    // Conntrack and sampled terminate on the first violation, after which every frame is a
    // cheap `Terminated` drop; feed them only traffic that stays within policy.
    let mut probe = FilteredNat::new(id, allow.clone(), Full::new());
    let within_policy: Vec<Vec<u8>> = frames
        .iter()
        .filter(|f| {
            !matches!(probe.vm_frame(f), VmAction::Drop(DropReason::NotAllowed | DropReason::ProtocolNotAllowed))
        })
        .cloned()
        .collect();
    assert!(within_policy.len() + 2 <= frames.len(), "the corpus should hold violations");
    let total = run("filtered", FilteredNat::new(id, allow.clone(), Full::new()), &frames)
        + run("conntrack", FilteredNat::new(id, allow.clone(), Conntrack::new(64)), &within_policy)
        + run(
            "sampled",
            FilteredNat::new(id, allow, Sampled::new(SampleRate::new(0.3).expect("rate"), 9)),
            &within_policy,
        );
    // The consumer's alias: every datagram to it is translated on the same path.
    let aliased = VmIdentity { alias_port: Some(51820), ..id };
    let mut to_alias = frames.clone();
    to_alias.push(FrameSpec::udp(&aliased, Endpoint::new(aliased.gateway_ip, 51820), b"wireguard").build());
    let total = total
        + run(
            "alias",
            FilteredNat::new(aliased, Arc::new(Allowlist::new([CONSUMER]).expect("valid list")), Full::new()),
            &to_alias,
        );
    if total != 0 {
        eprintln!("FAIL: the translation path allocated {total} times");
        std::process::exit(1);
    }
    println!("1 passed, 0 failed");
}
