//! The scenarios of `make perf`, as a table: each one's name (the seed plan's, which
//! `docs/test-plan.md` and `tests/plan.rs` name), what it measures, and the function that runs
//! it. `--only` and `--help` are read from [`SCENARIOS`]; [`run`] runs the ones asked for in
//! the table's order (the seed plan's).
use engine::worker::Backend;
use omerta_perf::Kind;

use crate::measure::{h2v_trial, h2v_trial_with, ndr_rows, rtt_rounds, tput, tput_rows, v2h_trial, Cfg};
use crate::report::{percentiles, stddev, Row};
use crate::{cases, tunnel};
use crate::{PORTABLE, URING};

/// One scenario of the table.
pub(crate) struct Scenario {
    /// Its name: `--only NAME`, the report's `scenario`, the seed plan's case.
    pub(crate) name: &'static str,
    /// What it measures, for `--help`.
    pub(crate) measures: &'static str,
    /// It also runs when one of these is asked for: its rows come from their measurement.
    pub(crate) with: &'static [&'static str],
    /// Runs it: its rows of the report.
    pub(crate) run: fn(&mut Ctx<'_>) -> Vec<Row>,
}

/// Every scenario, in the order they run.
pub(crate) const SCENARIOS: &[Scenario] = &[
    Scenario { name: "ndr_small_packet", measures: "zero-loss rate, 64 B VM to host", with: &[], run: ndr_small },
    Scenario { name: "ndr_large_packet", measures: "zero-loss rate, 1400 B VM to host", with: &[], run: ndr_large },
    Scenario { name: "ndr_host_to_vm", measures: "zero-loss rate, 1400 B host to VM", with: &[], run: ndr_h2v },
    Scenario {
        name: "ndr_host_to_vm_gso",
        measures: "zero-loss rate host to VM from a GSO sender, beside the floor with and without GRO",
        with: &[],
        run: ndr_h2v_gso,
    },
    Scenario { name: "idle_cpu", measures: "an idle VM's worker CPU after traffic", with: &[], run: idle_cpu },
    Scenario { name: "small_packet_throughput", measures: "64 B frames VM to host, flat out", with: &[], run: small },
    Scenario {
        name: "large_packet_throughput",
        measures: "1400 B frames VM to host, flat out, GSO on and off",
        with: &[],
        run: large,
    },
    Scenario { name: "mixed_size_throughput", measures: "an IMIX VM to host, flat out", with: &[], run: mixed },
    Scenario { name: "sustained_throughput", measures: "1400 B in one-second windows", with: &[], run: sustained },
    Scenario { name: "burst_throughput", measures: "bursts of 1000 x 64 B", with: &[], run: burst },
    Scenario { name: "bidirectional_throughput", measures: "both directions at once", with: &[], run: bidirectional },
    Scenario {
        name: "host_to_vm_throughput",
        measures: "1400 B host to VM, flat out",
        with: &["bidirectional_throughput"],
        run: host_to_vm,
    },
    Scenario {
        name: "frame_processing_latency",
        measures: "the engine's own per-frame latency at half the 64 B maximum",
        with: &[],
        run: frame_latency,
    },
    Scenario { name: "allowlist_check_latency", measures: "one allowlist check", with: &[], run: allowlist },
    Scenario {
        name: "e2e_latency",
        measures: "round trips through the forwarder, one frame at a time, beside two bare sockets",
        with: &["latency_percentiles", "jitter"],
        run: e2e,
    },
    Scenario {
        name: "latency_percentiles",
        measures: "the io_uring run's round-trip percentiles (e2e_latency's rounds)",
        with: &[],
        run: in_e2e,
    },
    Scenario {
        name: "jitter",
        measures: "the round trips' standard deviation (e2e_latency's rounds)",
        with: &[],
        run: in_e2e,
    },
    Scenario {
        name: "e2e_latency_busy",
        measures: "round trips with every party busy-polling",
        with: &[],
        run: e2e_busy,
    },
    Scenario { name: "latency_under_load", measures: "round trips beside a 64 B load", with: &[], run: under_load },
    Scenario { name: "high_packet_rate", measures: "64 B paced at 90% of the maximum", with: &[], run: high_rate },
    Scenario { name: "memory_stability", measures: "the engine's memory over many frames", with: &[], run: memory },
    Scenario { name: "cpu_utilization", measures: "CPU at the maximum rate and at 2 Gbps", with: &[], run: cpu },
    Scenario { name: "long_running", measures: "a long paced run with round trips", with: &[], run: long_running },
    Scenario { name: "connection_churn", measures: "VMs added and stopped over one engine", with: &[], run: churn },
    Scenario { name: "concurrent_vms", measures: "several VMs' engines at once", with: &[], run: concurrent },
    Scenario {
        name: "userspace_tunnel",
        measures: "bulk TCP and round trips through the userspace WireGuard tunnel beside wireguard-go on TUN",
        with: &[],
        run: userspace_tunnel,
    },
];

/// What the scenarios share in one run: its configuration, what was asked, and the maxima the
/// throughput scenarios measured (the later ones pace themselves from them).
pub(crate) struct Ctx<'a> {
    cfg: &'a Cfg,
    only: Option<Vec<String>>,
    /// 64 B frames per second VM to host, io_uring (small_packet_throughput's, else a guess).
    small_max: f64,
    /// 1400 B frames per second VM to host, io_uring (large_packet_throughput's, else a guess).
    large_max: f64,
    /// Why scenarios that must not be skipped here (CI) could not run: the run fails.
    failures: Vec<String>,
}

impl Ctx<'_> {
    fn want(&self, name: &str) -> bool {
        self.only.as_ref().is_none_or(|o| o.iter().any(|x| x == name))
    }

    /// `kinds`, and passt when it runs.
    fn passt(&self, k: Vec<Kind>) -> Vec<Kind> {
        if self.cfg.passt {
            [k, vec![Kind::Passt]].concat()
        } else {
            k
        }
    }

    /// Trials of a zero-loss search, and the seconds of each.
    fn ndr(&self) -> (usize, f64) {
        let cfg = self.cfg;
        (if cfg.secs < 1.0 { 3 } else { 8 }, if cfg.secs < 1.0 { 0.2 } else { cfg.secs.clamp(2.0, 5.0) })
    }
}

/// The scenarios `only` names (comma-separated) that the table lacks.
pub(crate) fn unknown(only: &str) -> Vec<&str> {
    only.split(',').filter(|n| !SCENARIOS.iter().any(|s| s.name == *n)).collect()
}

/// The table for `--help`.
pub(crate) fn help() -> String {
    let mut s = String::from("Scenarios (--only NAME[,NAME...]):\n");
    for sc in SCENARIOS {
        s.push_str(&format!("  {:<26} {}\n", sc.name, sc.measures));
    }
    s
}

/// Runs the scenarios `only` names (all without it), in the table's order: their rows, and
/// why any that had to run could not (the run fails).
pub(crate) fn run(cfg: &Cfg, only: Option<&str>) -> (Vec<Row>, Vec<String>) {
    let only = only.map(|o| o.split(',').map(String::from).collect());
    let mut ctx = Ctx { cfg, only, small_max: 300_000.0, large_max: 250_000.0, failures: Vec::new() };
    let mut rows = Vec::new();
    for s in SCENARIOS {
        if ctx.want(s.name) || s.with.iter().any(|w| ctx.want(w)) {
            rows.extend((s.run)(&mut ctx));
        }
    }
    (rows, ctx.failures)
}

fn with_floor(k: Vec<Kind>) -> Vec<Kind> {
    [k, vec![Kind::Floor]].concat()
}

fn ndr_v2h(ctx: &mut Ctx<'_>, scenario: &'static str, size: usize, note: &str) -> Vec<Row> {
    let (trials, secs) = ctx.ndr();
    let t = |k: Kind, pps: u64| v2h_trial(k, &[size], secs, pps);
    let kinds = with_floor(ctx.passt(vec![PORTABLE, URING]));
    ndr_rows(scenario, &kinds, trials, secs, note, &t)
}

fn ndr_small(ctx: &mut Ctx<'_>) -> Vec<Row> {
    ndr_v2h(ctx, "ndr_small_packet", 64, "64 B, VM to host")
}

fn ndr_large(ctx: &mut Ctx<'_>) -> Vec<Row> {
    ndr_v2h(ctx, "ndr_large_packet", 1400, "1400 B, VM to host")
}

fn ndr_h2v(ctx: &mut Ctx<'_>) -> Vec<Row> {
    let (trials, secs) = ctx.ndr();
    let t = |k: Kind, pps: u64| h2v_trial(k, secs, pps);
    // With adaptive polling off beside it: on 2 cores the spin competes with the sender
    // and the VM's reader.
    let kinds = with_floor(ctx.passt(vec![PORTABLE, Kind::OmertaNoSpin(Backend::Portable), URING, Kind::OmertaStream]));
    ndr_rows("ndr_host_to_vm", &kinds, trials, secs, "1400 B, host to VM", &t)
}

fn ndr_h2v_gso(ctx: &mut Ctx<'_>) -> Vec<Row> {
    // The UDP GRO lever's A/B: the consumer sends with GSO; the floor with GRO on its
    // socket is the most GRO could give the engine, the floor without it what it has.
    let (trials, secs) = ctx.ndr();
    let t = |k: Kind, pps: u64| h2v_trial_with(k, secs, pps, true);
    let kinds = [PORTABLE, URING, Kind::Floor, Kind::FloorGro];
    ndr_rows("ndr_host_to_vm_gso", &kinds, trials, secs, "1400 B, host to VM, GSO sender", &t)
}

fn idle_cpu(_: &mut Ctx<'_>) -> Vec<Row> {
    let mut rows = Vec::new();
    for k in [PORTABLE, URING] {
        match cases::idle_cpu(k) {
            Ok(r) => rows.push(r),
            Err(e) => eprintln!("idle_cpu: {}: {e}", k.label()),
        }
    }
    rows
}

fn small(ctx: &mut Ctx<'_>) -> Vec<Row> {
    let kinds = ctx.passt(vec![PORTABLE, URING]);
    let r = tput_rows("small_packet_throughput", &kinds, &[64], ctx.cfg, "64 B frames, VM to host");
    ctx.small_max = r.iter().filter(|r| r.target == URING.label()).filter_map(|r| r.kpps).next().unwrap_or(300.0) * 1e3;
    r
}

fn large(ctx: &mut Ctx<'_>) -> Vec<Row> {
    let kinds =
        ctx.passt(vec![Kind::Omerta(Backend::Portable, false), Kind::Omerta(Backend::Uring, false), PORTABLE, URING]);
    let r = tput_rows("large_packet_throughput", &kinds, &[1400], ctx.cfg, "1400 B frames, VM to host");
    ctx.large_max = r.iter().filter(|r| r.target == URING.label()).filter_map(|r| r.kpps).next().unwrap_or(250.0) * 1e3;
    r
}

fn mixed(ctx: &mut Ctx<'_>) -> Vec<Row> {
    // A simple IMIX: 7 x 64 B, 4 x 576 B, 1 x 1400 B (about 340 B on average).
    let mix = [64, 64, 64, 64, 64, 64, 64, 576, 576, 576, 576, 1400];
    tput_rows("mixed_size_throughput", &[PORTABLE, URING], &mix, ctx.cfg, "IMIX 7x64/4x576/1x1400")
}

fn sustained(ctx: &mut Ctx<'_>) -> Vec<Row> {
    cases::sustained(ctx.cfg.sustained).into_iter().collect()
}

fn burst(_: &mut Ctx<'_>) -> Vec<Row> {
    cases::burst()
}

fn bidirectional(ctx: &mut Ctx<'_>) -> Vec<Row> {
    cases::bidirectional(ctx.cfg.secs).unwrap_or_default()
}

fn host_to_vm(ctx: &mut Ctx<'_>) -> Vec<Row> {
    let mut rows = Vec::new();
    for k in ctx.passt(vec![PORTABLE, URING, Kind::OmertaStream]) {
        match cases::host_to_vm(k, ctx.cfg.secs) {
            Ok(r) => rows.push(r),
            Err(e) => eprintln!("host_to_vm_throughput: {}: {e}", k.label()),
        }
    }
    rows
}

fn frame_latency(ctx: &mut Ctx<'_>) -> Vec<Row> {
    cases::frame_latency(ctx.cfg.secs, (ctx.small_max * 0.5) as u64).into_iter().collect()
}

fn allowlist(_: &mut Ctx<'_>) -> Vec<Row> {
    vec![cases::allowlist_latency()]
}

/// Round trips through every configuration, in interleaved rounds: the rows of e2e_latency,
/// and of latency_percentiles and jitter where they are asked for; then two bare sockets'.
fn e2e(ctx: &mut Ctx<'_>) -> Vec<Row> {
    let cfg = ctx.cfg;
    let mut rows = Vec::new();
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
    let kinds = ctx.passt(kinds);
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
        if ctx.want("jitter") {
            rows.push(Row {
                scenario: "jitter",
                target: k.label(),
                note: format!("stddev of the e2e round trips: {:.1} µs", stddev(&all)),
                lat_us: row.lat_us,
                ..Row::default()
            });
        }
        if *k == URING && ctx.want("latency_percentiles") {
            rows.push(Row {
                scenario: "latency_percentiles",
                note: format!("{} samples (io_uring run)", all.len()),
                ..row.clone()
            });
        }
        rows.push(row);
    }
    if ctx.want("e2e_latency") {
        let h = omerta_perf::floor_round_trips(cfg.rtt_samples);
        rows.push(Row {
            scenario: "e2e_latency",
            target: "two sockets (no forwarder)".into(),
            lat_us: Some(omerta_perf::pct(&h)),
            note: format!("{} round trips between two sockets, same harness", h.len()),
            ..Row::default()
        });
    }
    rows
}

/// latency_percentiles and jitter: their rows come from e2e_latency's rounds (see [`e2e`]).
fn in_e2e(_: &mut Ctx<'_>) -> Vec<Row> {
    Vec::new()
}

fn e2e_busy(ctx: &mut Ctx<'_>) -> Vec<Row> {
    // Every party polls without sleeping: the forwarder (busy-poll) on one CPU, the
    // harness's one thread (VM and echo consumer) on another.
    let cfg = ctx.cfg;
    let kinds = [Kind::OmertaBusy(Backend::Portable), Kind::OmertaBusy(Backend::Uring), Kind::FloorBusy];
    let rounds = if cfg.rounds > 1 { 5 } else { 1 };
    let pooled = rtt_rounds(&kinds, cfg.rtt_samples / rounds as u64, rounds, true);
    let mut rows = Vec::new();
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
    rows
}

fn under_load(ctx: &mut Ctx<'_>) -> Vec<Row> {
    cases::under_load(ctx.cfg.rtt_samples / 2, (ctx.small_max * 0.5) as u64).into_iter().collect()
}

fn high_rate(ctx: &mut Ctx<'_>) -> Vec<Row> {
    let rate = (ctx.small_max * 0.9) as u64;
    let Ok(t) = tput(URING, &[64], ctx.cfg.secs * 2.0, rate) else { return Vec::new() };
    vec![Row {
        scenario: "high_packet_rate",
        target: URING.label(),
        kpps: Some(t.pps / 1e3),
        loss_pct: Some(t.loss),
        cpu_pct: Some(t.cpu * 100.0),
        note: format!("paced at 90% of the measured maximum ({:.0} kpps)", rate as f64 / 1e3),
        ..Row::default()
    }]
}

fn memory(ctx: &mut Ctx<'_>) -> Vec<Row> {
    cases::memory(ctx.cfg.mem_frames).into_iter().collect()
}

fn cpu(ctx: &mut Ctx<'_>) -> Vec<Row> {
    let two_gbps = (2e9 / 8.0 / 1400.0) as u64;
    let mut rows = Vec::new();
    for (pps, note) in [(0, "at the maximum rate, 64 B"), (two_gbps, "at a fixed 2 Gbps, 1400 B")] {
        let mix: &[usize] = if pps == 0 { &[64] } else { &[1400] };
        if let Ok(t) = tput(URING, mix, ctx.cfg.secs, pps) {
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
    rows
}

fn long_running(ctx: &mut Ctx<'_>) -> Vec<Row> {
    cases::long_running(ctx.cfg.long_running, (ctx.large_max * 0.5) as u64).into_iter().collect()
}

fn churn(ctx: &mut Ctx<'_>) -> Vec<Row> {
    match cases::churn(ctx.cfg.churn) {
        Ok(r) => vec![r],
        Err(e) => {
            eprintln!("connection_churn: {e}");
            Vec::new()
        }
    }
}

fn concurrent(ctx: &mut Ctx<'_>) -> Vec<Row> {
    cases::concurrent(ctx.cfg.secs).into_iter().collect()
}

/// The userspace tunnel beside wireguard-go on TUN (see `tunnel.rs`). Without wireguard-go it
/// is skipped, with a reason; under CI=true that, or any error, fails the run.
fn userspace_tunnel(ctx: &mut Ctx<'_>) -> Vec<Row> {
    let name = tunnel::NAME;
    match omerta_perf::require(name, "wireguard-go and wg (make setup installs them)", omerta_perf::wg::available()) {
        Ok(true) => {}
        Ok(false) => return Vec::new(),
        Err(e) => {
            eprintln!("{e}");
            ctx.failures.push(e);
            return Vec::new();
        }
    }
    let cfg = ctx.cfg;
    match tunnel::run(cfg.tunnel_secs, cfg.rounds, cfg.tunnel_rtts) {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("{name}: {e}");
            if omerta_perf::ci() {
                ctx.failures.push(format!("{name}: {e}"));
            }
            Vec::new()
        }
    }
}
