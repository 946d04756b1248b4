//! `omerta-perf`: the seed plan's performance scenarios (`make perf`), with passt beside
//! Omerta where the issue asks for it.
//!
//! Usage: `omerta-perf [--long] [--smoke] [--only NAME[,NAME...]]`, `omerta-perf compare A.json B.json`.
//! Short by default (about 8 minutes, the zero-loss (NDR/PDR) searches included); `--long` uses the seed's durations (10 s, 60 s, 1 hour).
//! `--smoke` runs every scenario for a moment, Omerta only: it keeps the harness from rotting
//! (`make test` runs it). Configurations run interleaved and tables report medians; results go
//! to `target/perf/run-<time>.json` and `target/perf/latest.json`.
//!
//! Back of the envelope: on loopback every datagram costs the kernel ~1-2 µs in each of
//! recvmmsg, sendmmsg and the delivery to the sink, on 2 shared cores; the engine's own work is
//! ~30 ns a frame. Expect a few hundred kpps, a few Gbps at 1400 B, and round trips dominated
//! by wake-ups (tens of µs).
//!
//! Over 500 lines on purpose: one function per scenario of the seed plan, in the plan's order.
// Reports turn counts and durations into rates and back: truncating casts are deliberate here.
#![allow(clippy::cast_possible_truncation)]
use std::os::unix::net::UnixDatagram;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::worker::Backend;
use omerta_perf::engine_proc::{EngineProc, Opts};
use omerta_perf::ndr::{self, Search, Trial};
use omerta_perf::{generate, pct, round_trips, Dut, Echo, Kind, Sink};
use serde_json::{json, Value};

const URING: Kind = Kind::Omerta(Backend::Uring, true);
const PORTABLE: Kind = Kind::Omerta(Backend::Portable, true);

#[derive(Debug, Clone, Default)]
struct Row {
    scenario: &'static str,
    target: String,
    kpps: Option<f64>,
    gbps: Option<f64>,
    loss_pct: Option<f64>,
    cpu_pct: Option<f64>,
    rss_kib: Option<f64>,
    lat_us: Option<[f64; 5]>,
    note: String,
}

impl Row {
    fn json(&self) -> Value {
        json!({"scenario": self.scenario, "target": self.target, "kpps": self.kpps, "gbps": self.gbps,
               "loss_pct": self.loss_pct, "cpu_pct": self.cpu_pct, "rss_kib": self.rss_kib,
               "latency_us": self.lat_us.map(|l| json!({"p50": l[0], "p90": l[1], "p99": l[2], "p999": l[3], "max": l[4]})),
               "note": self.note})
    }
}

struct Cfg {
    secs: f64,
    rounds: usize,
    sustained: f64,
    long_running: f64,
    rtt_samples: u64,
    churn: usize,
    mem_frames: u64,
    passt: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

struct Tput {
    reordered: u64,
    offered: f64,
    other_cpu: f64,
    pps: f64,
    gbps: f64,
    loss: f64,
    cpu: f64,
    rss: Option<f64>,
}

/// One throughput run: `mix` frame sizes, flat out or paced.
fn tput(kind: Kind, mix: &[usize], secs: f64, pps: u64) -> Result<Tput, String> {
    let sink = Sink::start();
    let mut dut = Dut::start(kind, &[sink.port])?;
    let cpu0 = dut.cpu_seconds();
    let (load, ours0) = (ndr::Load::start(), ndr::self_cpu() + dut.process_cpu_seconds());
    let g = generate(&mut dut, sink.port, mix, pps, secs, u64::MAX);
    let other_cpu = load.other(ndr::self_cpu() + dut.process_cpu_seconds() - ours0);
    let c = sink.finish();
    let cpu = (dut.cpu_seconds() - cpu0) / g.secs;
    let rss = dut.rss_kib().map(|r| r as f64);
    let avg = mix.iter().sum::<usize>() as f64 / mix.len() as f64;
    let pps = c.received as f64 / g.secs;
    Ok(Tput {
        reordered: c.reordered,
        offered: g.sent as f64 / g.secs.max(1e-9),
        other_cpu,
        pps,
        gbps: pps * avg * 8.0 / 1e9,
        loss: 100.0 * g.sent.saturating_sub(c.received) as f64 / g.sent.max(1) as f64,
        cpu,
        rss,
    })
}

/// Interleaved throughput rounds over `kinds`; one row per kind with medians.
fn tput_rows(scenario: &'static str, kinds: &[Kind], mix: &[usize], cfg: &Cfg, note: &str) -> Vec<Row> {
    let mut runs: Vec<Vec<Tput>> = kinds.iter().map(|_| Vec::new()).collect();
    for _ in 0..cfg.rounds {
        for (i, k) in kinds.iter().enumerate() {
            match tput(*k, mix, cfg.secs, 0) {
                Ok(t) => runs[i].push(t),
                Err(e) => eprintln!("{scenario}: {}: {e}", k.label()),
            }
        }
    }
    kinds
        .iter()
        .zip(runs)
        .filter(|(_, r)| !r.is_empty())
        .map(|(k, r)| Row {
            scenario,
            target: k.label(),
            kpps: Some(median(r.iter().map(|t| t.pps / 1e3).collect())),
            gbps: Some(median(r.iter().map(|t| t.gbps).collect())),
            loss_pct: Some(median(r.iter().map(|t| t.loss).collect())),
            cpu_pct: Some(median(r.iter().map(|t| t.cpu * 100.0).collect())),
            rss_kib: r.first().and_then(|t| t.rss),
            lat_us: None,
            note: format!("{note}; reordered {}", r.iter().map(|t| t.reordered).sum::<u64>()),
        })
        .collect()
}

/// The CPUs of the round-trip runs: the harness's (client and echo) and the forwarder's, apart
/// (none where there is one CPU).
/// `OMERTA_PERF_PIN=0`: nothing pinned (the A/B of pinning); `harness`, `forwarder`: only that.
fn rtt_cpus() -> (Option<usize>, Option<usize>) {
    let (h, f) = match std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) {
        1 => (None, None),
        _ => (Some(0), Some(1)),
    };
    match std::env::var("OMERTA_PERF_PIN").as_deref() {
        Ok("0") => (None, None),
        Ok("harness") => (h, None),
        Ok("forwarder") => (None, f),
        _ => (h, f),
    }
}

/// Round trips through `kind`, the client on this thread and the echo consumer pinned to one
/// CPU and the forwarder to another. `busy`: the harness never sleeps (one thread plays both
/// ends, see `round_trips_busy`).
fn rtt_row(scenario: &'static str, kind: Kind, samples: u64, busy: bool) -> Result<(Row, Vec<f64>), String> {
    let (harness, fwd) = rtt_cpus();
    let (h, all, dut) = if busy {
        let consumer = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let mut dut = Dut::start_on(kind, &[omerta_perf::port_of(&consumer)], fwd)?;
        let (h, all) = omerta_perf::round_trips_busy(&mut dut, &consumer, samples, 60.0);
        (h, all, dut)
    } else {
        let echo = Echo::start_on(harness);
        let mut dut = Dut::start_on(kind, &[echo.port], fwd)?;
        let (h, all) = round_trips(&mut dut, echo.port, samples, 60.0);
        (h, all, dut)
    };
    let row = Row {
        scenario,
        target: kind.label(),
        lat_us: Some(pct(&h)),
        rss_kib: dut.rss_kib().map(|r| r as f64),
        note: format!("{} round trips, one frame at a time", all.len()),
        ..Row::default()
    };
    Ok((row, all))
}

/// A configuration's round trips so far: its first row, every sample, each round's median.
type Pooled = Option<(Row, Vec<f64>, Vec<f64>)>;

/// `rounds` interleaved rounds of `samples` round trips through each of `kinds` (the machine's
/// speed drifts within seconds), run on a thread pinned to the harness's CPU: per kind, its
/// first row, every sample, and each round's median.
fn rtt_rounds(kinds: &[Kind], samples: u64, rounds: usize, busy: bool) -> Vec<Pooled> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // A busy harness is not pinned: on a 2-CPU machine a thread spinning pinned to one
            // CPU starves the kernel's work queued there (round trips of 16 ms, measured).
            if let Some(c) = rtt_cpus().0.filter(|_| !busy) {
                let _ = engine::io::pin_current_thread(c);
            }
            let mut pooled: Vec<Pooled> = kinds.iter().map(|_| None).collect();
            for _ in 0..rounds {
                for (k, acc) in kinds.iter().zip(pooled.iter_mut()) {
                    match rtt_row("e2e_latency", *k, samples, busy) {
                        Ok((row, all)) => {
                            let p50 = median(all.clone());
                            let e = acc.get_or_insert_with(|| (row, Vec::new(), Vec::new()));
                            e.1.extend(all);
                            e.2.push(p50);
                        }
                        Err(e) => eprintln!("e2e_latency: {}: {e}", k.label()),
                    }
                }
            }
            pooled
        })
        .join()
        .unwrap_or_default()
    })
}

/// p50, p90, p99, p99.9 and max of samples.
fn percentiles(v: &[f64]) -> [f64; 5] {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let at = |q: f64| s.get(((s.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
    [at(0.5), at(0.9), at(0.99), at(0.999), s.last().copied().unwrap_or(0.0)]
}

fn stddev(v: &[f64]) -> f64 {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt()
}

fn run(cfg: &Cfg, only: Option<&str>) -> Vec<Row> {
    let want = |name: &str| only.is_none_or(|o| o.split(',').any(|x| x == name));
    let mut rows = Vec::new();
    let passt = |k: Vec<Kind>| if cfg.passt { [k, vec![Kind::Passt]].concat() } else { k };
    let small_kinds = passt(vec![PORTABLE, URING]);
    let large_kinds =
        passt(vec![Kind::Omerta(Backend::Portable, false), Kind::Omerta(Backend::Uring, false), PORTABLE, URING]);

    let ndr_trials = if cfg.secs < 1.0 { 3 } else { 8 };
    let ndr_secs = if cfg.secs < 1.0 { 0.2 } else { cfg.secs.clamp(2.0, 5.0) };
    let with_floor = |k: Vec<Kind>| [k, vec![Kind::Floor]].concat();
    for (scenario, size, note) in
        [("ndr_small_packet", 64, "64 B, VM to host"), ("ndr_large_packet", 1400, "1400 B, VM to host")]
    {
        if want(scenario) {
            let t = |k: Kind, pps: u64| v2h_trial(k, &[size], ndr_secs, pps);
            let kinds = with_floor(passt(vec![PORTABLE, URING]));
            rows.extend(ndr_rows(scenario, &kinds, ndr_trials, ndr_secs, note, &t));
        }
    }
    if want("ndr_host_to_vm") {
        let t = |k: Kind, pps: u64| h2v_trial(k, ndr_secs, pps);
        // With adaptive polling off beside it: on 2 cores the spin competes with the sender
        // and the VM's reader.
        let kinds = with_floor(passt(vec![PORTABLE, Kind::OmertaNoSpin(Backend::Portable), URING, Kind::OmertaStream]));
        rows.extend(ndr_rows("ndr_host_to_vm", &kinds, ndr_trials, ndr_secs, "1400 B, host to VM", &t));
    }
    if want("ndr_host_to_vm_gso") {
        // The UDP GRO lever's A/B: the consumer sends with GSO; the floor with GRO on its
        // socket is the most GRO could give the engine, the floor without it what it has.
        let t = |k: Kind, pps: u64| h2v_trial_with(k, ndr_secs, pps, true);
        let kinds = [PORTABLE, URING, Kind::Floor, Kind::FloorGro];
        rows.extend(ndr_rows("ndr_host_to_vm_gso", &kinds, ndr_trials, ndr_secs, "1400 B, host to VM, GSO sender", &t));
    }
    if want("idle_cpu") {
        for k in [PORTABLE, URING] {
            match idle_cpu(k) {
                Ok(r) => rows.push(r),
                Err(e) => eprintln!("idle_cpu: {}: {e}", k.label()),
            }
        }
    }
    let mut small_max = 300_000.0;
    if want("small_packet_throughput") {
        let r = tput_rows("small_packet_throughput", &small_kinds, &[64], cfg, "64 B frames, VM to host");
        small_max = r.iter().filter(|r| r.target == URING.label()).filter_map(|r| r.kpps).next().unwrap_or(300.0) * 1e3;
        rows.extend(r);
    }
    let mut large_max = 250_000.0;
    if want("large_packet_throughput") {
        let r = tput_rows("large_packet_throughput", &large_kinds, &[1400], cfg, "1400 B frames, VM to host");
        large_max = r.iter().filter(|r| r.target == URING.label()).filter_map(|r| r.kpps).next().unwrap_or(250.0) * 1e3;
        rows.extend(r);
    }
    if want("mixed_size_throughput") {
        // A simple IMIX: 7 x 64 B, 4 x 576 B, 1 x 1400 B (about 340 B on average).
        let mix = [64, 64, 64, 64, 64, 64, 64, 576, 576, 576, 576, 1400];
        rows.extend(tput_rows("mixed_size_throughput", &[PORTABLE, URING], &mix, cfg, "IMIX 7x64/4x576/1x1400"));
    }
    if want("sustained_throughput") {
        if let Ok(r) = sustained(cfg.sustained) {
            rows.push(r);
        }
    }
    if want("burst_throughput") {
        rows.extend(burst());
    }
    if want("bidirectional_throughput") {
        if let Ok(r) = bidirectional(cfg.secs) {
            rows.extend(r);
        }
    }
    if want("bidirectional_throughput") || want("host_to_vm_throughput") {
        for k in passt(vec![PORTABLE, URING, Kind::OmertaStream]) {
            match host_to_vm(k, cfg.secs) {
                Ok(r) => rows.push(r),
                Err(e) => eprintln!("host_to_vm_throughput: {}: {e}", k.label()),
            }
        }
    }
    if want("frame_processing_latency") {
        if let Ok(r) = frame_latency(cfg.secs, (small_max * 0.5) as u64) {
            rows.push(r);
        }
    }
    if want("allowlist_check_latency") {
        rows.push(allowlist_latency());
    }
    if want("e2e_latency") || want("latency_percentiles") || want("jitter") {
        // The busy-polling rows are reported separately: each costs a core while idle.
        let kinds = vec![
            PORTABLE,
            URING,
            Kind::OmertaNoSpin(Backend::Portable),
            Kind::OmertaNoSpin(Backend::Uring),
            Kind::OmertaBusy(Backend::Portable),
            Kind::OmertaBusy(Backend::Uring),
            Kind::Floor,
        ];
        let kinds = passt(kinds);
        let rounds = if cfg.rounds > 1 { 5 } else { 1 };
        let pooled = rtt_rounds(&kinds, cfg.rtt_samples / rounds as u64, rounds, false);
        for (k, acc) in kinds.iter().zip(pooled) {
            let Some((row, all, p50s)) = acc else { continue };
            let lat = percentiles(&all);
            let lo = p50s.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = p50s.iter().copied().fold(0.0, f64::max);
            let row = Row {
                lat_us: Some(lat),
                note: format!(
                    "{} round trips, one frame at a time, in {rounds} interleaved rounds (p50 per round {lo:.0}-{hi:.0} µs)",
                    all.len()
                ),
                ..row
            };
            if want("jitter") {
                rows.push(Row {
                    scenario: "jitter",
                    target: k.label(),
                    note: format!("stddev of the e2e round trips: {:.1} µs", stddev(&all)),
                    lat_us: row.lat_us,
                    ..Row::default()
                });
            }
            if *k == URING && want("latency_percentiles") {
                rows.push(Row {
                    scenario: "latency_percentiles",
                    note: format!("{} samples (io_uring run)", all.len()),
                    ..row.clone()
                });
            }
            rows.push(row);
        }
    }
    if want("e2e_latency_busy") {
        // Every party polls without sleeping: the forwarder (busy-poll) on one CPU, the
        // harness's one thread (VM and echo consumer) on another.
        let kinds = [Kind::OmertaBusy(Backend::Portable), Kind::OmertaBusy(Backend::Uring), Kind::FloorBusy];
        let rounds = if cfg.rounds > 1 { 5 } else { 1 };
        let pooled = rtt_rounds(&kinds, cfg.rtt_samples / rounds as u64, rounds, true);
        for (k, acc) in kinds.iter().zip(pooled) {
            let Some((row, all, p50s)) = acc else { continue };
            let lo = p50s.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = p50s.iter().copied().fold(0.0, f64::max);
            rows.push(Row {
                scenario: "e2e_latency_busy",
                target: k.label(),
                lat_us: Some(percentiles(&all)),
                note: format!(
                    "{} round trips, harness busy-polling, {rounds} interleaved rounds (p50 per round {lo:.0}-{hi:.0} µs), stddev {:.1} µs",
                    all.len(),
                    stddev(&all)
                ),
                ..row
            });
        }
    }
    if want("e2e_latency") {
        let h = omerta_perf::floor_round_trips(cfg.rtt_samples);
        rows.push(Row {
            scenario: "e2e_latency",
            target: "two sockets (no forwarder)".into(),
            lat_us: Some(pct(&h)),
            note: format!("{} round trips between two sockets, same harness", h.len()),
            ..Row::default()
        });
    }
    if want("latency_under_load") {
        if let Ok(r) = under_load(cfg.rtt_samples / 2, (small_max * 0.5) as u64) {
            rows.push(r);
        }
    }
    if want("high_packet_rate") {
        let rate = (small_max * 0.9) as u64;
        if let Ok(t) = tput(URING, &[64], cfg.secs * 2.0, rate) {
            rows.push(Row {
                scenario: "high_packet_rate",
                target: URING.label(),
                kpps: Some(t.pps / 1e3),
                loss_pct: Some(t.loss),
                cpu_pct: Some(t.cpu * 100.0),
                note: format!("paced at 90% of the measured maximum ({:.0} kpps)", rate as f64 / 1e3),
                ..Row::default()
            });
        }
    }
    if want("memory_stability") {
        if let Ok(r) = memory(cfg.mem_frames) {
            rows.push(r);
        }
    }
    if want("cpu_utilization") {
        let two_gbps = (2e9 / 8.0 / 1400.0) as u64;
        for (pps, note) in [(0, "at the maximum rate, 64 B"), (two_gbps, "at a fixed 2 Gbps, 1400 B")] {
            let mix: &[usize] = if pps == 0 { &[64] } else { &[1400] };
            if let Ok(t) = tput(URING, mix, cfg.secs, pps) {
                rows.push(Row {
                    scenario: "cpu_utilization",
                    target: URING.label(),
                    kpps: Some(t.pps / 1e3),
                    gbps: Some(t.gbps),
                    cpu_pct: Some(t.cpu * 100.0),
                    note: note.into(),
                    ..Row::default()
                });
            }
        }
    }
    if want("long_running") {
        if let Ok(r) = long_running(cfg.long_running, (large_max * 0.5) as u64) {
            rows.push(r);
        }
    }
    if want("connection_churn") {
        match churn(cfg.churn) {
            Ok(r) => rows.push(r),
            Err(e) => eprintln!("connection_churn: {e}"),
        }
    }
    if want("concurrent_vms") {
        if let Ok(r) = concurrent(cfg.secs) {
            rows.push(r);
        }
    }
    rows
}

/// A VM-to-host trial for the NDR search.
fn v2h_trial(kind: Kind, mix: &[usize], secs: f64, pps: u64) -> Result<Trial, String> {
    let t = tput(kind, mix, secs, pps)?;
    Ok(Trial { offered: t.offered, forwarded: t.pps, loss_pct: t.loss, cpu: t.cpu, other_cpu: t.other_cpu })
}

/// A host-to-VM trial: the consumer sends 1400 B frames' payloads to the forwarder's address,
/// in batches of 32 on a connected socket, paced to `pps` (0: flat out); a reader counts the
/// frames reaching the VM.
fn h2v_trial(kind: Kind, secs: f64, pps: u64) -> Result<Trial, String> {
    h2v_trial_with(kind, secs, pps, false)
}

/// [`h2v_trial`]; `gso`: the consumer sends each batch of 32 as one UDP GSO send (as a
/// WireGuard that uses GSO does), which a socket with UDP GRO on receives as one buffer.
fn h2v_trial_with(kind: Kind, secs: f64, pps: u64, gso: bool) -> Result<Trial, String> {
    use std::net::UdpSocket;
    use std::os::fd::AsFd;
    let consumer = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = omerta_perf::port_of(&consumer);
    let mut dut = Dut::start(kind, &[port])?;
    let f = dut.frame(port, 100);
    dut.send(&f)?;
    consumer.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
    let mut b = [0u8; 2048];
    let (_, forwarder) = consumer.recv_from(&mut b).map_err(|e| format!("no first datagram: {e}"))?;
    consumer.connect(forwarder).map_err(|e| e.to_string())?;
    engine::io::grow_buffers(consumer.as_fd(), 8 << 20);
    // The learning phase (RFC 2544): 200 datagrams at 10 kpps, drained and not counted, so
    // that what a forwarder does once per flow (passt's flow table, ARP) is not taken for loss.
    {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (vm, s2) = (dut.reader().ok_or("no reader")?, stop.clone());
        let warm = std::thread::spawn(move || omerta_perf::drain_vm(vm, s2, 1000));
        for _ in 0..200 {
            let _ = consumer.send(&[7u8; 1358]);
            std::thread::sleep(Duration::from_micros(100));
        }
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = warm.join();
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (vm, stop) = (dut.reader().ok_or("no reader")?, stop.clone());
        std::thread::spawn(move || omerta_perf::drain_vm(vm, stop, 1000))
    };
    let cpu0 = dut.cpu_seconds();
    let (load, ours0) = (ndr::Load::start(), ndr::self_cpu() + dut.process_cpu_seconds());
    let payload = [7u8; 1358];
    let batch: [&[u8]; 32] = [&payload; 32];
    let gso_buf = vec![7u8; 1358 * 32];
    let (t0, mut sent) = (Instant::now(), 0u64);
    while t0.elapsed().as_secs_f64() < secs {
        let r = if gso {
            support::send_gso(consumer.as_fd(), &gso_buf, 1358).map(|b| b / 1358)
        } else {
            support::send_many(consumer.as_fd(), &batch)
        };
        match r {
            Ok(n) => sent += n as u64,
            Err(_) => continue,
        }
        if pps > 0 {
            let due = t0 + Duration::from_secs_f64(sent as f64 / pps as f64);
            while Instant::now() < due {
                std::hint::spin_loop();
            }
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let other_cpu = load.other(ndr::self_cpu() + dut.process_cpu_seconds() - ours0);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let got = reader.join().unwrap_or(0);
    let cpu = (dut.cpu_seconds() - cpu0) / elapsed;
    if std::env::var_os("OMERTA_PERF_TRIALS").is_some() {
        if let Some(api::Reply::Stats(v)) = dut.engine().and_then(|e| e.call(&api::Request::Stats(None)).ok()) {
            if let Some(c) = v.first() {
                eprintln!(
                    "  engine: to_vm {} dropped {} drops {:?} overflows {} waits {}",
                    c.counter("frames_to_vm"),
                    c.dropped,
                    c.drops,
                    c.counter("queue_overflows"),
                    c.counter("backpressure_waits")
                );
            }
        }
    }
    Ok(Trial {
        offered: sent as f64 / elapsed,
        forwarded: got as f64 / elapsed,
        loss_pct: 100.0 * sent.saturating_sub(got) as f64 / sent.max(1) as f64,
        cpu,
        other_cpu,
    })
}

/// NDR and PDR of each of `kinds` by `trial(kind, pps)` (pps 0: unpaced), configurations
/// interleaved trial by trial, at most `max_trials` each (the unpaced one and the NDR's
/// repeat included). One row per kind: kpps at the NDR, the PDR and the maximum offered in
/// the note; then each Omerta row's ratio to passt at the NDR.
fn ndr_rows(
    scenario: &'static str,
    kinds: &[Kind],
    max_trials: usize,
    secs: f64,
    note: &str,
    trial: &dyn Fn(Kind, u64) -> Result<Trial, String>,
) -> Vec<Row> {
    let mut searches: Vec<Option<Search>> = kinds
        .iter()
        .map(|k| match trial(*k, 0) {
            Ok(t) => Some(Search::new(t)),
            Err(e) => {
                eprintln!("{scenario}: {}: {e}", k.label());
                None
            }
        })
        .collect();
    for _ in 0..max_trials.saturating_sub(2) {
        let mut any = false;
        for (k, s) in kinds.iter().zip(searches.iter_mut()) {
            let Some(s) = s else { continue };
            let Some(rate) = s.next(0.03) else { continue };
            any = true;
            match trial(*k, rate as u64) {
                Ok(t) => {
                    if std::env::var_os("OMERTA_PERF_TRIALS").is_some() {
                        eprintln!(
                            "{scenario} {}: asked {:.0} offered {:.0} forwarded {:.0} lost {:.3}%",
                            k.label(),
                            rate,
                            t.offered,
                            t.forwarded,
                            t.loss_pct
                        );
                    }
                    s.record(rate, t)
                }
                Err(e) => eprintln!("{scenario}: {}: {e}", k.label()),
            }
        }
        if !any {
            break;
        }
    }
    for (k, s) in kinds.iter().zip(searches.iter_mut()) {
        let Some(s) = s else { continue };
        if let Some(rate) = s.to_confirm() {
            if let Ok(t) = trial(*k, rate as u64) {
                s.confirm(rate, t);
            }
        }
    }
    let passt_ndr = kinds
        .iter()
        .zip(&searches)
        .find(|(k, _)| **k == Kind::Passt)
        .and_then(|(_, s)| s.as_ref())
        .map(|s| s.result().0);
    let mut rows = Vec::new();
    for (k, s) in kinds.iter().zip(&searches) {
        let Some(s) = s else { continue };
        let (ndr_pps, pdr_pps) = s.result();
        let max = s.max();
        let at = s
            .trials
            .iter()
            .filter(|(r, t)| *r > 0.0 && t.loss_pct <= 0.0)
            .map(|(_, t)| *t)
            .max_by(|a, b| a.offered.total_cmp(&b.offered));
        let others = median(s.trials.iter().map(|(_, t)| t.other_cpu * 100.0).collect());
        let ratio = match (passt_ndr, *k) {
            (Some(p), k) if k != Kind::Passt && p > 0.0 => format!("; {:.2}x passt at NDR", ndr_pps / p),
            _ => String::new(),
        };
        rows.push(Row {
            scenario,
            target: k.label(),
            kpps: Some(ndr_pps / 1e3),
            gbps: None,
            loss_pct: Some(0.0),
            cpu_pct: at.map(|t| t.cpu * 100.0),
            note: format!(
                "{note}: NDR; PDR ({}% loss) {:.0} kpps; max offered {:.0} kpps, {:.0} forwarded ({:.1}% lost); {} trials of {secs} s; other CPU {others:.0}% (median), load {:.2}{ratio}",
                ndr::PDR_LOSS_PCT,
                pdr_pps / 1e3,
                max.offered / 1e3,
                max.forwarded / 1e3,
                max.loss_pct,
                s.trials.len(),
                ndr::loadavg()
            ),
            ..Row::default()
        });
    }
    rows
}

/// The CPU an idle VM's worker uses in 3 s after some traffic (adaptive polling must cost
/// nothing once traffic stops).
fn idle_cpu(kind: Kind) -> Result<Row, String> {
    let echo = Echo::start();
    let mut dut = Dut::start(kind, &[echo.port])?;
    let _ = round_trips(&mut dut, echo.port, 200, 5.0);
    std::thread::sleep(Duration::from_millis(200));
    let cpu0 = dut.cpu_seconds();
    std::thread::sleep(Duration::from_secs(3));
    let cpu = (dut.cpu_seconds() - cpu0) / 3.0;
    Ok(Row {
        scenario: "idle_cpu",
        target: kind.label(),
        cpu_pct: Some(cpu * 100.0),
        note: "the VM's worker over 3 s without traffic, after 200 round trips".into(),
        ..Row::default()
    })
}

fn sustained(secs: f64) -> Result<Row, String> {
    let sink = Sink::start();
    let mut dut = Dut::start(URING, &[sink.port])?;
    let mut rates = Vec::new();
    let windows = secs.ceil() as usize;
    let mut sent = 0;
    for _ in 0..windows {
        let before = sink.received();
        let g = generate(&mut dut, sink.port, &[1400], 0, 1.0, u64::MAX);
        sent += g.sent;
        rates.push((sink.received() - before) as f64 / g.secs);
    }
    let c = sink.finish();
    let (lo, hi) = (rates.iter().copied().fold(f64::MAX, f64::min), rates.iter().copied().fold(0.0, f64::max));
    Ok(Row {
        scenario: "sustained_throughput",
        target: URING.label(),
        kpps: Some(median(rates.clone()) / 1e3),
        gbps: Some(median(rates) * 1400.0 * 8.0 / 1e9),
        loss_pct: Some(100.0 * sent.saturating_sub(c.received) as f64 / sent.max(1) as f64),
        note: format!("{windows} one-second windows at 1400 B; slowest/fastest = {:.2}", lo / hi.max(1.0)),
        ..Row::default()
    })
}

fn burst() -> Vec<Row> {
    let mut rows = Vec::new();
    for kind in [PORTABLE, URING] {
        let sink = Sink::start();
        let Ok(mut dut) = Dut::start(kind, &[sink.port]) else { continue };
        let mut worst = 0.0f64;
        let mut sent = 0;
        for _ in 0..5 {
            let g = generate(&mut dut, sink.port, &[64], 0, 10.0, 1000);
            worst = worst.max(g.secs * 1e3);
            sent += g.sent;
            std::thread::sleep(Duration::from_millis(100));
        }
        let c = sink.finish();
        rows.push(Row {
            scenario: "burst_throughput",
            target: kind.label(),
            loss_pct: Some(100.0 * sent.saturating_sub(c.received) as f64 / sent.max(1) as f64),
            note: format!("5 bursts of 1000 x 64 B; slowest burst written in {worst:.2} ms (target < 10 ms, no drops)"),
            ..Row::default()
        });
    }
    rows
}

fn bidirectional(secs: f64) -> Result<Vec<Row>, String> {
    use std::net::UdpSocket;
    let sink = Sink::start();
    let blaster = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let bport = omerta_perf::port_of(&blaster);
    let mut dut = Dut::start(URING, &[sink.port, bport])?;
    // Open the flow the host side sends back on.
    let f = dut.frame(bport, 100);
    dut.send(&f)?;
    blaster.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    let mut b = [0u8; 2048];
    let (_, engine_addr) = blaster.recv_from(&mut b).map_err(|e| format!("no first datagram: {e}"))?;
    let mut tx = dut.sender().ok_or("no sender")?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (s1, s2) = (stop.clone(), stop.clone());
    let down = std::thread::spawn(move || {
        let payload = [7u8; 1358];
        let mut n = 0u64;
        while !s1.load(std::sync::atomic::Ordering::Relaxed) {
            if blaster.send_to(&payload, engine_addr).is_ok() {
                n += 1;
            }
        }
        n
    });
    let reader = std::thread::spawn(move || {
        let mut n = 0u64;
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(fr) = dut.recv(Duration::from_millis(100)) {
                if fr.len() > 1000 {
                    n += 1;
                }
            }
        }
        n
    });
    let g = generate(&mut tx, sink.port, &[1400], 0, secs, u64::MAX);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent_down, got_down) = (down.join().unwrap_or(0), reader.join().unwrap_or(0));
    let c = sink.finish();
    let up = c.received as f64 / g.secs;
    let dn = got_down as f64 / g.secs;
    Ok(vec![
        Row {
            scenario: "bidirectional_throughput",
            target: format!("{} VM->host", URING.label()),
            kpps: Some(up / 1e3),
            gbps: Some(up * 1400.0 * 8.0 / 1e9),
            note: "1400 B both ways at once".into(),
            ..Row::default()
        },
        Row {
            scenario: "bidirectional_throughput",
            target: format!("{} host->VM", URING.label()),
            kpps: Some(dn / 1e3),
            gbps: Some(dn * 1400.0 * 8.0 / 1e9),
            loss_pct: Some(100.0 * sent_down.saturating_sub(got_down) as f64 / sent_down.max(1) as f64),
            note: "the host-side sender is not paced: its excess is dropped by the kernel at the engine's socket"
                .into(),
            ..Row::default()
        },
    ])
}

/// Host to VM flat out: the consumer sends 1400 B frames' payloads as fast as it can
/// (batches of 32 on one thread); a reader counts the frames reaching the VM.
fn host_to_vm(kind: Kind, secs: f64) -> Result<Row, String> {
    let t = h2v_trial(kind, secs, 0)?;
    Ok(Row {
        scenario: "host_to_vm_throughput",
        target: kind.label(),
        kpps: Some(t.forwarded / 1e3),
        gbps: Some(t.forwarded * 1400.0 * 8.0 / 1e9),
        loss_pct: Some(t.loss_pct),
        cpu_pct: Some(t.cpu * 100.0),
        note: "1400 B frames to the VM from one unpaced sender thread (sendmmsg, 32 a call)".into(),
        ..Row::default()
    })
}

fn frame_latency(secs: f64, pps: u64) -> Result<Row, String> {
    let sink = Sink::start();
    let mut dut = Dut::start(URING, &[sink.port])?;
    generate(&mut dut, sink.port, &[64], pps, secs, u64::MAX);
    // The worker publishes its telemetry every 100 ms.
    std::thread::sleep(Duration::from_millis(250));
    let (count, lat) = dut.engine_latency().ok_or("no latency from the engine's control socket")?;
    let _ = sink.finish();
    Ok(Row {
        scenario: "frame_processing_latency",
        target: URING.label(),
        lat_us: Some(lat),
        note: format!("inside the engine, batch in hand to batch sent; {count} frames at {} kpps", pps / 1000),
        ..Row::default()
    })
}

fn allowlist_latency() -> Row {
    use engine::filter::{Flow, Transport};
    let list = engine::Allowlist::new(["203.0.113.7:51820".parse().expect("endpoint")]).expect("list");
    let flow = Flow { transport: Transport::Udp, src_port: 1, dst: "203.0.113.7:51820".parse().expect("endpoint") };
    let mut ns = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let mut ok = 0u64;
        for _ in 0..2_000_000 {
            ok += u64::from(list.check(std::hint::black_box(&flow)).is_ok());
        }
        std::hint::black_box(ok);
        ns.push(t.elapsed().as_nanos() as f64 / 2e6);
    }
    Row {
        scenario: "allowlist_check_latency",
        target: "engine".into(),
        note: format!("{:.1} ns per check (median of 7 x 2M)", median(ns)),
        ..Row::default()
    }
}

fn under_load(samples: u64, pps: u64) -> Result<Row, String> {
    let sink = Sink::start();
    let echo = Echo::start();
    let mut dut = Dut::start(URING, &[sink.port, echo.port])?;
    let mut tx = dut.sender().ok_or("no sender")?;
    let port = sink.port;
    let bg = std::thread::spawn(move || generate(&mut tx, port, &[64], pps, 30.0, u64::MAX));
    std::thread::sleep(Duration::from_millis(200));
    let (h, all) = round_trips(&mut dut, echo.port, samples, 25.0);
    drop(dut);
    let _ = bg.join();
    let _ = sink.finish();
    Ok(Row {
        scenario: "latency_under_load",
        target: URING.label(),
        lat_us: Some(pct(&h)),
        note: format!(
            "{} round trips beside 64 B load at {} kpps (50% of the measured maximum)",
            all.len(),
            pps / 1000
        ),
        ..Row::default()
    })
}

fn memory(frames: u64) -> Result<Row, String> {
    let sink = Sink::start();
    let mut dut = Dut::start(URING, &[sink.port])?;
    generate(&mut dut, sink.port, &[64], 0, 60.0, 20_000);
    std::thread::sleep(Duration::from_millis(200));
    let before = dut.rss_kib().ok_or("no engine RSS")?;
    let g = generate(&mut dut, sink.port, &[64], 0, 120.0, frames);
    std::thread::sleep(Duration::from_millis(200));
    let after = dut.rss_kib().ok_or("no engine RSS")?;
    let _ = sink.finish();
    Ok(Row {
        scenario: "memory_stability",
        target: URING.label(),
        rss_kib: Some(after as f64),
        note: format!(
            "{} frames: engine RSS {before} KiB before, {after} KiB after ({:+} KiB)",
            g.sent,
            after as i64 - before as i64
        ),
        ..Row::default()
    })
}

fn long_running(secs: f64, pps: u64) -> Result<Row, String> {
    let sink = Sink::start();
    let echo = Echo::start();
    let mut dut = Dut::start(URING, &[sink.port, echo.port])?;
    let mut tx = dut.sender().ok_or("no sender")?;
    let port = sink.port;
    let (r0, t0) = (sink.received(), Instant::now());
    let bg = std::thread::spawn(move || generate(&mut tx, port, &[1400], pps, secs, u64::MAX));
    let (h_first, _) = round_trips(&mut dut, echo.port, 500, 5.0);
    std::thread::sleep(Duration::from_secs_f64((secs / 2.0 - t0.elapsed().as_secs_f64()).max(0.0)));
    let (r1, t1) = (sink.received(), Instant::now());
    let g = bg.join().unwrap_or_default();
    let (r2, t2) = (sink.received(), Instant::now());
    let (h_last, _) = round_trips(&mut dut, echo.port, 500, 5.0);
    let _ = sink.finish();
    let first = (r1 - r0) as f64 / (t1 - t0).as_secs_f64();
    let second = (r2 - r1) as f64 / (t2 - t1).as_secs_f64();
    Ok(Row {
        scenario: "long_running",
        target: URING.label(),
        kpps: Some(second / 1e3),
        lat_us: Some(pct(&h_last)),
        note: format!(
            "{secs:.0} s at {} kpps of 1400 B ({} sent): second half {:.1}% of the first; RTT p50 {:.0} -> {:.0} µs",
            pps / 1000,
            g.sent,
            100.0 * second / first.max(1.0),
            h_first.value_at_quantile(0.5),
            h_last.value_at_quantile(0.5)
        ),
        ..Row::default()
    })
}

/// VMs added to one engine over its control socket, used and stopped, again and again: what
/// the engine process holds afterwards (threads, descriptors, memory) against before.
fn churn(cycles: usize) -> Result<Row, String> {
    let sink = Sink::start();
    let eng = Arc::new(EngineProc::start(Opts { backend: Backend::Auto, gso: true }, &[], None)?);
    let cycle = |i: usize| -> Result<(), String> {
        let name = format!("c{i}");
        let theirs = eng.dir().join(format!("{name}.sock"));
        let ours = eng.dir().join(format!("{name}.vm"));
        let sock = UnixDatagram::bind(&ours).map_err(|e| format!("{}: {e}", ours.display()))?;
        control::launcher::give_to_engine_user(&ours).map_err(|e| format!("{}: {e}", ours.display()))?;
        eng.call(&api::Request::VmAdd(format!(
            "name={name},handle=dgram:{},consumer=127.0.0.1:{},allow-special=yes",
            theirs.display(),
            sink.port
        )))?;
        eng.wait_running(&name)?;
        sock.connect(&theirs).map_err(|e| format!("{}: {e}", theirs.display()))?;
        let mut d = Dut::on_engine(&eng, &name, sock);
        generate(&mut d, sink.port, &[64], 0, 1.0, 100);
        eng.call(&api::Request::VmStop(name.clone()))?;
        let _ = std::fs::remove_file(&ours);
        Ok(())
    };
    cycle(0)?;
    std::thread::sleep(Duration::from_millis(200));
    let ((t0, f0), m0) = (eng.threads_and_fds(), eng.rss_kib().unwrap_or(0));
    let start = Instant::now();
    for i in 1..=cycles {
        cycle(i)?;
    }
    let secs = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    let ((t1, f1), m1) = (eng.threads_and_fds(), eng.rss_kib().unwrap_or(0));
    let _ = sink.finish();
    Ok(Row {
        scenario: "connection_churn",
        target: "omerta".into(),
        rss_kib: Some(m1 as f64),
        note: format!(
            "{cycles} VMs added to one engine, used and stopped in {secs:.1} s: engine threads {t0} -> {t1}, fds {f0} -> {f1}, RSS {m0} -> {m1} KiB"
        ),
        ..Row::default()
    })
}

fn concurrent(secs: f64) -> Result<Row, String> {
    let mut handles = Vec::new();
    for _ in 0..4 {
        handles.push(std::thread::spawn(move || tput(URING, &[64], secs, 0).map(|t| t.pps)));
    }
    let rates: Vec<f64> = handles.into_iter().filter_map(|h| h.join().ok()?.ok()).collect();
    if rates.len() != 4 {
        return Err("a VM failed".into());
    }
    let (lo, hi) = (rates.iter().copied().fold(f64::MAX, f64::min), rates.iter().copied().fold(0.0, f64::max));
    Ok(Row {
        scenario: "concurrent_vms",
        target: URING.label(),
        kpps: Some(rates.iter().sum::<f64>() / 1e3),
        note: format!(
            "4 VMs at once, 64 B: {} kpps each; fairness min/max = {:.2}",
            rates.iter().map(|r| format!("{:.0}", r / 1e3)).collect::<Vec<_>>().join("/"),
            lo / hi.max(1.0)
        ),
        ..Row::default()
    })
}

fn print(rows: &[Row]) {
    let f = |v: Option<f64>, d: usize| v.map_or("-".to_string(), |x| format!("{x:.d$}"));
    println!(
        "| scenario | target | kpps | Gbps | loss % | CPU % | RSS KiB | p50 µs | p90 | p99 | p99.9 | max | note |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        let l = r
            .lat_us
            .map(|l| l.map(|x| format!("{x:.1}")))
            .unwrap_or_else(|| ["-".into(), "-".into(), "-".into(), "-".into(), "-".into()]);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.target,
            f(r.kpps, 0),
            f(r.gbps, 2),
            f(r.loss_pct, 2),
            f(r.cpu_pct, 0),
            f(r.rss_kib, 0),
            l[0],
            l[1],
            l[2],
            l[3],
            l[4],
            r.note
        );
    }
    // At the NDR: each configuration against passt and against the bare forwarder.
    for sc in ["ndr_small_packet", "ndr_large_packet", "ndr_host_to_vm", "ndr_host_to_vm_gso"] {
        let get = |t: &str| rows.iter().find(|r| r.scenario == sc && r.target == t).and_then(|r| r.kpps);
        let (p, f) = (get("passt"), get(&Kind::Floor.label()));
        for r in rows.iter().filter(|r| r.scenario == sc && r.target.starts_with("omerta")) {
            let Some(k) = r.kpps else { continue };
            let vs = |b: Option<f64>| b.filter(|b| *b > 0.0).map_or("-".to_string(), |b| format!("{:.2}x", k / b));
            println!("ratio {sc}: {} / passt = {}, / floor = {} (NDR kpps)", r.target, vs(p), vs(f));
        }
        if let (Some(g), Some(f)) = (get(&Kind::FloorGro.label()), f.filter(|f| *f > 0.0)) {
            println!("ratio {sc}: floor with GRO / floor = {:.2}x (NDR kpps)", g / f);
        }
    }
    // RTT above the bare forwarder's, sleeping and busy.
    for (sc, floor) in [("e2e_latency", Kind::Floor), ("e2e_latency_busy", Kind::FloorBusy)] {
        let p50 =
            |t: &str| rows.iter().find(|r| r.scenario == sc && r.target == t).and_then(|r| r.lat_us).map(|l| l[0]);
        let Some(floor) = p50(&floor.label()) else { continue };
        for r in rows.iter().filter(|r| r.scenario == sc && r.target.starts_with("omerta")) {
            if let Some(l) = r.lat_us {
                println!("rtt {sc}: {} p50 = floor {:+.1} µs ({:.1} vs {:.1})", r.target, l[0] - floor, l[0], floor);
            }
        }
    }
    // Omerta / passt, for the scenarios where both ran.
    for sc in ["small_packet_throughput", "large_packet_throughput", "host_to_vm_throughput", "e2e_latency"] {
        let get = |t: &str| rows.iter().find(|r| r.scenario == sc && r.target == t);
        if let (Some(o), Some(p)) = (get(&URING.label()), get("passt")) {
            match (o.kpps, p.kpps, o.lat_us, p.lat_us) {
                (Some(a), Some(b), _, _) => {
                    println!("ratio {sc}: omerta/io_uring/gso / passt = {:.2}x pps", a / b.max(1e-9))
                }
                (_, _, Some(a), Some(b)) => println!(
                    "ratio {sc}: omerta/io_uring/gso / passt = {:.2}x p50 round trip ({:.1} vs {:.1} µs)",
                    a[0] / b[0].max(1e-9),
                    a[0],
                    b[0]
                ),
                _ => {}
            }
        }
    }
}

fn compare(a: &str, b: &str) -> ExitCode {
    let load = |p: &str| -> Option<Value> { serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok() };
    let (Some(a), Some(b)) = (load(a), load(b)) else {
        eprintln!("omerta-perf: cannot read both JSON files");
        return ExitCode::from(2);
    };
    println!("A: {}\nB: {}", a["machine"], b["machine"]);
    println!("| scenario | target | metric | A | B | B/A |");
    println!("|---|---|---|---:|---:|---:|");
    for rb in b["rows"].as_array().into_iter().flatten() {
        let ra = a["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["scenario"] == rb["scenario"] && r["target"] == rb["target"]);
        let Some(ra) = ra else { continue };
        let metrics: Vec<(&str, &Value, &Value)> = vec![
            ("kpps", &ra["kpps"], &rb["kpps"]),
            ("gbps", &ra["gbps"], &rb["gbps"]),
            ("p50_us", &ra["latency_us"]["p50"], &rb["latency_us"]["p50"]),
            ("p99_us", &ra["latency_us"]["p99"], &rb["latency_us"]["p99"]),
        ];
        for (m, x, y) in metrics {
            if let (Some(x), Some(y)) = (x.as_f64(), y.as_f64()) {
                println!(
                    "| {} | {} | {m} | {x:.2} | {y:.2} | {:.2} |",
                    rb["scenario"].as_str().unwrap_or(""),
                    rb["target"].as_str().unwrap_or(""),
                    y / x.max(1e-9)
                );
            }
        }
    }
    ExitCode::SUCCESS
}

/// Every scenario runs in a network namespace of its own, holding only `lo`: the engine
/// under test, passt and every socket of the harness, so a frame naming any other address
/// has no route and cannot leave the machine. The first call re-runs this program under
/// `unshare --net` and returns its exit status as `Err`; inside, it brings `lo` up, adds the
/// black-hole pair passt needs, checks that no other interface exists, and returns `Ok`.
fn sealed(args: &[String]) -> Result<(), ExitCode> {
    const INSIDE: &str = "OMERTA_PERF_NETNS";
    let netns_of = |pid: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino()).unwrap_or(0)
    };
    let netns = || netns_of("self");
    // The variable names the namespace we were started from, that of our parent (which waits
    // for us): inside, ours must differ from it before anything is changed.
    let outer: Option<u64> = std::env::var(INSIDE).ok().map(|v| v.parse().unwrap_or(0));
    if let Some(o) = outer {
        let parent = netns_of(&std::os::unix::process::parent_id().to_string());
        if o == 0 || o != parent || parent == netns() {
            eprintln!("omerta-perf: {INSIDE} is set but this is not a new network namespace; refusing to run");
            return Err(ExitCode::from(1));
        }
    }
    if outer.is_none() {
        let exe = std::env::current_exe().map_err(|e| {
            eprintln!("omerta-perf: cannot find its own binary: {e}");
            ExitCode::from(1)
        })?;
        let st = std::process::Command::new("unshare")
            .arg("--net")
            .arg("--")
            .arg(exe)
            .args(args)
            .env(INSIDE, netns().to_string())
            .status();
        return Err(match st {
            Ok(s) => ExitCode::from(u8::try_from(s.code().unwrap_or(1)).unwrap_or(1)),
            Err(e) => {
                eprintln!("omerta-perf: needs a private network namespace (unshare from util-linux, root): {e}");
                ExitCode::from(1)
            }
        });
    }
    // passt wants an interface with a default route to take its addresses from: a veth pair
    // whose both ends are in this namespace. What is routed there reaches `om1`, which has no
    // address and forwards nothing: a black hole.
    let setup: [&[&str]; 6] = [
        &["link", "set", "lo", "up"],
        &["link", "add", "om0", "type", "veth", "peer", "name", "om1"],
        &["addr", "add", "192.0.2.1/24", "dev", "om0"],
        &["link", "set", "om1", "up"],
        &["link", "set", "om0", "up"],
        &["route", "add", "default", "via", "192.0.2.2", "dev", "om0"],
    ];
    for args in setup {
        let st = std::process::Command::new("ip").args(args).status();
        if !st.is_ok_and(|s| s.success()) {
            eprintln!("omerta-perf: ip {} failed in its network namespace", args.join(" "));
            return Err(ExitCode::from(1));
        }
    }
    // `ip` asks the kernel about this namespace (sysfs still shows the host's).
    let listing = std::process::Command::new("ip").args(["-o", "link", "show"]).output();
    let links: Vec<String> = listing
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split(": ").nth(1))
                .map(|n| n.split('@').next().unwrap_or(n).to_string())
                .collect()
        })
        .unwrap_or_default();
    if links.iter().any(|l| !["lo", "om0", "om1"].contains(&l.as_str())) {
        eprintln!("omerta-perf: its network namespace has other interfaces ({links:?}); refusing to run");
        return Err(ExitCode::from(1));
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("compare") {
        return match (args.get(1), args.get(2)) {
            (Some(a), Some(b)) => compare(a, b),
            _ => {
                eprintln!("usage: omerta-perf compare A.json B.json");
                ExitCode::from(2)
            }
        };
    }
    if args.first().map(String::as_str) == Some("ab") {
        // Each build's run seals itself in a namespace of its own.
        return match omerta_perf::ab::AbArgs::parse(&args[1..]) {
            Ok(a) if omerta_perf::ab::ab(&a) => ExitCode::SUCCESS,
            Ok(_) => ExitCode::from(1),
            Err(e) => {
                eprintln!("usage: omerta-perf ab --base REV [--rounds N] [--only SCENARIO]: {e}");
                ExitCode::from(2)
            }
        };
    }
    // Before anything runs: a typo must not start a 10-minute benchmark.
    const USAGE: &str = "usage: omerta-perf [--smoke | --long] [--only SCENARIO[,SCENARIO...]]\n       \
                         omerta-perf ab --base REV [--rounds N] [--only SCENARIO]\n       \
                         omerta-perf compare A.json B.json\n\
                         Runs the benchmark scenarios (docs/PERFORMANCE.md names them) in a network namespace of\n\
                         its own; OMERTA_PERF_TRIALS=1 prints every NDR trial.";
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--long" | "--smoke" => {}
            "--only" if it.next().is_some() => {}
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("omerta-perf: unexpected argument '{other}'\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    if let Err(code) = sealed(&args) {
        return code;
    }
    let long = args.iter().any(|a| a == "--long");
    let smoke = args.iter().any(|a| a == "--smoke");
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).map(String::as_str);
    let passt_ok = std::process::Command::new("passt").arg("--version").output().is_ok();
    if !smoke && !passt_ok {
        eprintln!("omerta-perf: passt is not installed (make perf installs it); comparing without it");
    }
    let cfg = if smoke {
        Cfg {
            secs: 0.2,
            rounds: 1,
            sustained: 1.0,
            long_running: 1.0,
            rtt_samples: 200,
            churn: 4,
            mem_frames: 5_000,
            passt: false,
        }
    } else if long {
        Cfg {
            secs: 10.0,
            rounds: 3,
            sustained: 60.0,
            long_running: 3600.0,
            rtt_samples: 100_000,
            churn: 1000,
            mem_frames: 1_000_000,
            passt: passt_ok,
        }
    } else {
        Cfg {
            secs: 2.0,
            rounds: 3,
            sustained: 10.0,
            long_running: 20.0,
            rtt_samples: 10_000,
            churn: 100,
            mem_frames: 1_000_000,
            passt: passt_ok,
        }
    };
    let started = Instant::now();
    let rows = run(&cfg, only);
    print(&rows);
    let report = json!({
        "machine": omerta_perf::machine(),
        "mode": if smoke { "smoke" } else if long { "long" } else { "short" },
        "seconds": started.elapsed().as_secs_f64(),
        "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/perf");
    let _ = std::fs::create_dir_all(&dir);
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let name = if smoke { "smoke.json".to_string() } else { format!("run-{stamp}.json") };
    let text = serde_json::to_string_pretty(&report).unwrap_or_default();
    let _ = std::fs::write(dir.join(&name), &text);
    if !smoke {
        let _ = std::fs::write(dir.join("latest.json"), &text);
    }
    println!("({} scenarios' rows in {:.0} s; JSON: target/perf/{name})", rows.len(), started.elapsed().as_secs_f64());
    ExitCode::SUCCESS
}
