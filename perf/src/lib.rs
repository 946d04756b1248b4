//! Benchmarks for Omerta: the harness behind `make perf`.
//!
//! A [`Dut`] (device under test) is either the `omerta-engine` binary (a process per device,
//! started with a `--vm` description as production starts it, either backend, GSO on or off;
//! see [`engine_proc`]) or a passt process, with the socket that plays the VM's NIC. Around it:
//! a generator that plays the VM (pre-built frames written in batches, flat out or paced, each
//! with a sequence number), a sink that plays the consumer (recvmmsg, counting sequence numbers
//! so loss and reordering are exact), and an echo consumer for round trips. Everything runs on
//! loopback; every run is bounded in time and count.
//!
//! By job: `dut` (the device under test: [`Kind`], [`Dut`]), `traffic` (generator, sinks,
//! echo, round trips, the VM-side reader), [`engine_proc`] (the engine process, shared with the
//! integration tests), [`floor`] (the bare forwarder), [`ndr`] (zero-loss searches), [`ab`]
//! (two builds in one run), [`command`] (running a program and keeping what it said),
//! [`netns`] (namespaces a benchmark makes, and its refusal to send anywhere else), [`wg`]
//! (wireguard-go on a TUN device in one of them).
#![forbid(unsafe_code)]
// Reports turn counts and durations into rates and back: truncating casts are deliberate here.
#![allow(clippy::cast_possible_truncation)]

pub mod ab;
pub mod command;
mod dut;
pub mod engine_proc;
pub mod floor;
pub mod ndr;
pub mod netns;
mod traffic;
pub mod wg;

pub use dut::{thread_cpu_of, Dut, Kind, VmSock};
pub use traffic::{
    drain_vm, floor_round_trips, generate, port_of, round_trips, round_trips_busy, Echo, GenCount, Sink, SinkCount,
};

use std::process::Command;

use hdrhistogram::Histogram;

/// Whether this is a CI run (`CI=true` or `CI=1`): there a scenario missing what it needs fails
/// the run instead of being skipped.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Checks what a scenario needs (`what`, and `ok`: whether it is here or why not). `Ok(true)`:
/// it is; `Ok(false)`: it is not, and the scenario is skipped (said on stderr); `Err`: it is
/// not and this is CI, where a skipped scenario must fail the run.
pub fn require(scenario: &str, what: &str, ok: Result<(), String>) -> Result<bool, String> {
    match ok {
        Ok(()) => Ok(true),
        Err(why) if ci() => Err(format!("{scenario}: CI=true and it needs {what}: {why}")),
        Err(why) => {
            eprintln!("{scenario}: SKIPPED (needs {what}: {why})");
            Ok(false)
        }
    }
}

/// Process resident memory in KiB.
pub fn self_rss_kib() -> u64 {
    sys::bench::rss_bytes().unwrap_or(0) / 1024
}

/// Threads and open descriptors of this process.
pub fn threads_and_fds() -> (usize, usize) {
    let count = |p: &str| std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0);
    (count("/proc/self/task"), count("/proc/self/fd"))
}

/// Percentiles of a histogram in its unit, for reports.
pub fn pct(h: &Histogram<u64>) -> [f64; 5] {
    [0.5, 0.9, 0.99, 0.999]
        .map(|q| h.value_at_quantile(q) as f64)
        .into_iter()
        .chain([h.max() as f64])
        .collect::<Vec<_>>()
        .try_into()
        .unwrap_or([0.0; 5])
}

/// The machine and build a run was made on.
pub fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string());
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    serde_json::json!({
        "commit": commit,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": model,
        "batch": 64,
    })
}
