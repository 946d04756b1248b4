//! The timer thread: keepalives (and, with them, the consumer's check of its own address),
//! the provider's heartbeats, reclaims, and the wire's tick (the replay journal synced, the
//! peers that rent or provide here noted), every 250 ms at most.
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::consumer::Consumer;
use super::peers::Link;
use super::provider::Provider;
use super::Options;

/// Runs until `stop`.
pub(super) fn run(link: &Link, provider: &Provider, consumer: &Consumer, opts: &Options, stop: &AtomicBool) {
    let mut last_keepalive = Instant::now();
    let mut last_heartbeat = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(250));
        if last_keepalive.elapsed() >= opts.keepalive {
            last_keepalive = Instant::now();
            link.keepalive();
            consumer.check_endpoints();
        }
        if opts.provider && last_heartbeat.elapsed() >= opts.heartbeat {
            last_heartbeat = Instant::now();
            provider.send_heartbeats();
        }
        provider.reclaim_silent();
        // Peers that rent or provide here are never evicted for a newcomer.
        let mut kept = provider.consumers_with_vms();
        kept.extend(consumer.providers_with_vms());
        link.tick(kept);
    }
}
