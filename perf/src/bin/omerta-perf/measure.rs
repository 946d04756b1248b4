//! The measurements the scenarios are made of: a throughput run (flat out or paced), rounds of
//! them interleaved over configurations, round trips, and the trials of a zero-loss search.
use std::sync::Arc;
use std::time::{Duration, Instant};

use omerta_perf::ndr::{self, Search, Trial};
use omerta_perf::{generate, pct, round_trips, Dut, Echo, Kind, Sink};

use crate::report::{median, Row};

pub(crate) struct Cfg {
    pub(crate) secs: f64,
    pub(crate) rounds: usize,
    pub(crate) sustained: f64,
    pub(crate) long_running: f64,
    pub(crate) rtt_samples: u64,
    pub(crate) churn: usize,
    pub(crate) mem_frames: u64,
    pub(crate) passt: bool,
    /// Seconds of each bulk run through a tunnel (`userspace_tunnel`; OMERTA_PERF_TUNNEL_SECS).
    pub(crate) tunnel_secs: f64,
    /// Round trips in each round-trip run through a tunnel.
    pub(crate) tunnel_rtts: u64,
}

pub(crate) struct Tput {
    pub(crate) reordered: u64,
    pub(crate) offered: f64,
    pub(crate) other_cpu: f64,
    pub(crate) pps: f64,
    pub(crate) gbps: f64,
    pub(crate) loss: f64,
    pub(crate) cpu: f64,
    pub(crate) rss: Option<f64>,
}

/// One throughput run: `mix` frame sizes, flat out or paced.
pub(crate) fn tput(kind: Kind, mix: &[usize], secs: f64, pps: u64) -> Result<Tput, String> {
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
pub(crate) fn tput_rows(scenario: &'static str, kinds: &[Kind], mix: &[usize], cfg: &Cfg, note: &str) -> Vec<Row> {
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
pub(crate) fn rtt_cpus() -> (Option<usize>, Option<usize>) {
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
pub(crate) fn rtt_row(scenario: &'static str, kind: Kind, samples: u64, busy: bool) -> Result<(Row, Vec<f64>), String> {
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
pub(crate) type Pooled = Option<(Row, Vec<f64>, Vec<f64>)>;

/// `rounds` interleaved rounds of `samples` round trips through each of `kinds` (the machine's
/// speed drifts within seconds), run on a thread pinned to the harness's CPU: per kind, its
/// first row, every sample, and each round's median.
pub(crate) fn rtt_rounds(kinds: &[Kind], samples: u64, rounds: usize, busy: bool) -> Vec<Pooled> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // A busy harness is not pinned: on a 2-CPU machine a thread spinning pinned to one
            // CPU starves the kernel's work queued there (round trips of 16 ms, measured).
            if let Some(c) = rtt_cpus().0.filter(|_| !busy) {
                let _ = sys::pin_current_thread(c);
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

/// A VM-to-host trial for the NDR search.
pub(crate) fn v2h_trial(kind: Kind, mix: &[usize], secs: f64, pps: u64) -> Result<Trial, String> {
    let t = tput(kind, mix, secs, pps)?;
    Ok(Trial { offered: t.offered, forwarded: t.pps, loss_pct: t.loss, cpu: t.cpu, other_cpu: t.other_cpu })
}

/// A host-to-VM trial: the consumer sends 1400 B frames' payloads to the forwarder's address,
/// in batches of 32 on a connected socket, paced to `pps` (0: flat out); a reader counts the
/// frames reaching the VM.
pub(crate) fn h2v_trial(kind: Kind, secs: f64, pps: u64) -> Result<Trial, String> {
    h2v_trial_with(kind, secs, pps, false)
}

/// [`h2v_trial`]; `gso`: the consumer sends each batch of 32 as one UDP GSO send (as a
/// WireGuard that uses GSO does), which a socket with UDP GRO on receives as one buffer.
pub(crate) fn h2v_trial_with(kind: Kind, secs: f64, pps: u64, gso: bool) -> Result<Trial, String> {
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
    sys::grow_buffers(consumer.as_fd(), 8 << 20);
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
            sys::bench::send_gso(consumer.as_fd(), &gso_buf, 1358).map(|b| b / 1358)
        } else {
            sys::bench::send_many(consumer.as_fd(), &batch)
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
pub(crate) fn ndr_rows(
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
