//! The report's rows and the printed tables: a row per scenario and configuration, medians,
//! percentiles, and the ratios against passt, against the floor, and of the userspace tunnel
//! against wireguard-go.
use omerta_perf::Kind;
use serde_json::{json, Value};

use crate::{tunnel, URING};

#[derive(Debug, Clone, Default)]
pub(crate) struct Row {
    pub(crate) scenario: &'static str,
    pub(crate) target: String,
    pub(crate) kpps: Option<f64>,
    pub(crate) gbps: Option<f64>,
    pub(crate) loss_pct: Option<f64>,
    pub(crate) cpu_pct: Option<f64>,
    pub(crate) rss_kib: Option<f64>,
    pub(crate) lat_us: Option<[f64; 5]>,
    pub(crate) note: String,
}

impl Row {
    pub(crate) fn json(&self) -> Value {
        json!({"scenario": self.scenario, "target": self.target, "kpps": self.kpps, "gbps": self.gbps,
               "loss_pct": self.loss_pct, "cpu_pct": self.cpu_pct, "rss_kib": self.rss_kib,
               "latency_us": self.lat_us.map(|l| json!({"p50": l[0], "p90": l[1], "p99": l[2], "p999": l[3], "max": l[4]})),
               "note": self.note})
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// p50, p90, p99, p99.9 and max of samples.
pub(crate) fn percentiles(v: &[f64]) -> [f64; 5] {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let at = |q: f64| s.get(((s.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
    [at(0.5), at(0.9), at(0.99), at(0.999), s.last().copied().unwrap_or(0.0)]
}

pub(crate) fn stddev(v: &[f64]) -> f64 {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt()
}

pub(crate) fn print(rows: &[Row]) {
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
    // The userspace tunnel against wireguard-go on TUN, same run, and the bar.
    let get = |t: &str| rows.iter().find(|r| r.scenario == tunnel::NAME && r.target == t);
    if let (Some(a), Some(b)) = (get(tunnel::TUN), get(tunnel::USER)) {
        if let (Some(x), Some(y)) = (a.gbps, b.gbps) {
            let r = y / x.max(1e-9);
            let verdict = if r >= tunnel::BAR { "holds" } else { "MISSED" };
            println!(
                "ratio {}: userspace / wireguard-go = {r:.2}x bulk Mbit/s ({:.0} vs {:.0}); bar >= {:.2}x {verdict} ({:+.0}% of the bar)",
                tunnel::NAME,
                y * 1e3,
                x * 1e3,
                tunnel::BAR,
                100.0 * (r / tunnel::BAR - 1.0)
            );
        }
        if let (Some(x), Some(y)) = (a.lat_us, b.lat_us) {
            println!(
                "ratio {}: userspace / wireguard-go round trip p50 {:.2}x ({:.1} vs {:.1} µs), p99 {:.2}x ({:.1} vs {:.1} µs)",
                tunnel::NAME,
                y[0] / x[0].max(1e-9),
                y[0],
                x[0],
                y[2] / x[2].max(1e-9),
                y[2],
                x[2]
            );
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
