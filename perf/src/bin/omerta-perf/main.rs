//! `omerta-perf`: the seed plan's performance scenarios (`make perf`), with passt beside
//! Omerta where the issue asks for it.
//!
//! Usage: `omerta-perf [--long] [--smoke] [--only NAME[,NAME...]]`, `omerta-perf compare A.json
//! B.json`, `omerta-perf ab --base REV`; `--help` lists the scenarios (the table in
//! `scenarios.rs`). Short by default (about 8 minutes, the zero-loss (NDR/PDR) searches
//! included); `--long` uses the seed's durations (10 s, 60 s, 1 hour). `--smoke` runs every
//! scenario for a moment, Omerta only: it keeps the harness from rotting (`make test` runs it).
//! Configurations run interleaved and tables report medians; results go to
//! `target/perf/run-<time>.json` and `target/perf/latest.json`.
//!
//! Back of the envelope: on loopback every datagram costs the kernel ~1-2 µs in each of
//! recvmmsg, sendmmsg and the delivery to the sink, on 2 shared cores; the engine's own work is
//! ~30 ns a frame. Expect a few hundred kpps, a few Gbps at 1400 B, and round trips dominated
//! by wake-ups (tens of µs).
//!
//! By job: `scenarios` (the table, and the scenarios made of rows of `measure`), `measure`
//! (throughput runs, round trips, zero-loss searches), `cases` (the scenarios that are a
//! measurement of their own), `report` (rows, tables); here the command line, `compare` and
//! the network namespace every run seals itself in; `tunnel` (the userspace WireGuard tunnel
//! beside wireguard-go, in namespaces of its own inside that one).
// Reports turn counts and durations into rates and back: truncating casts are deliberate here.
#![allow(clippy::cast_possible_truncation)]
use std::process::ExitCode;
use std::time::Instant;

use argh::FromArgs;
use engine::worker::Backend;
use omerta_perf::Kind;
use serde_json::{json, Value};

mod cases;
mod measure;
mod report;
mod scenarios;
mod tunnel;

use report::{print, Row};

const URING: Kind = Kind::Omerta(Backend::Uring, true);
const PORTABLE: Kind = Kind::Omerta(Backend::Portable, true);

/// Runs the benchmark scenarios (docs/PERFORMANCE.md names them) in a network namespace of its
/// own; OMERTA_PERF_TRIALS=1 prints every NDR trial, OMERTA_PERF_TUNNEL_SECS=S sets the
/// seconds of each bulk run of userspace_tunnel (3; 10 with --long).
#[derive(FromArgs)]
struct Args {
    /// every scenario for a moment, Omerta only (make test)
    #[argh(switch)]
    smoke: bool,
    /// the seed's durations (10 s, 60 s, 1 hour)
    #[argh(switch)]
    long: bool,
    /// only these scenarios, comma-separated (listed below)
    #[argh(option)]
    only: Option<String>,
    #[argh(subcommand)]
    cmd: Option<Sub>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Sub {
    Compare(CompareArgs),
    Ab(AbArgs),
}

/// Compares two runs' JSON reports, row by row.
#[derive(FromArgs)]
#[argh(subcommand, name = "compare")]
struct CompareArgs {
    /// the first run's JSON
    #[argh(positional)]
    a: String,
    /// the second run's JSON
    #[argh(positional)]
    b: String,
}

/// Runs the scenarios against REV's engine and this build's, interleaved (medians, ratios).
#[derive(FromArgs)]
#[argh(subcommand, name = "ab")]
struct AbArgs {
    /// the base revision (anything git rev-parse takes)
    #[argh(option)]
    base: String,
    /// rounds of both builds, 1 to 20 (default 3)
    #[argh(option, default = "3", from_str_fn(rounds))]
    rounds: usize,
    /// only this scenario
    #[argh(option)]
    only: Option<String>,
}

fn rounds(v: &str) -> Result<usize, String> {
    v.parse().ok().filter(|n| (1..=20).contains(n)).ok_or_else(|| "--rounds: 1 to 20".to_string())
}

/// The command line, as control's binaries read theirs (0 for `--help`, 2 for bad usage), the
/// help followed by the table of scenarios; an `--only` naming no scenario is bad usage too.
fn parse() -> Args {
    let all: Vec<String> = std::env::args().collect();
    let args = match control::cli::parse_from::<Args>(&all) {
        Ok(a) => a,
        Err((text, code)) if code == ExitCode::SUCCESS => {
            if text.starts_with("Usage:") {
                println!("{text}\n\n{}", scenarios::help().trim_end());
            } else {
                println!("{text}");
            }
            std::process::exit(0);
        }
        Err((text, _)) => {
            eprintln!("{text}");
            std::process::exit(2);
        }
    };
    let only = match &args.cmd {
        Some(Sub::Ab(a)) => a.only.as_deref(),
        _ => args.only.as_deref(),
    };
    let unknown = only.map(scenarios::unknown).unwrap_or_default();
    if !unknown.is_empty() {
        eprintln!("omerta-perf: no scenario {unknown:?}; --help lists them");
        std::process::exit(2);
    }
    args
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
    // Before anything runs: a typo must not start a 10-minute benchmark.
    let parsed = parse();
    match parsed.cmd {
        Some(Sub::Compare(c)) => return compare(&c.a, &c.b),
        // Each build's run seals itself in a namespace of its own.
        Some(Sub::Ab(a)) => {
            let a = omerta_perf::ab::AbArgs { base: a.base, rounds: a.rounds, only: a.only };
            return if omerta_perf::ab::ab(&a) { ExitCode::SUCCESS } else { ExitCode::from(1) };
        }
        None => {}
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(code) = sealed(&args) {
        return code;
    }
    let (long, smoke, only) = (parsed.long, parsed.smoke, parsed.only.as_deref());
    let passt_ok = std::process::Command::new("passt").arg("--version").output().is_ok();
    if !smoke && !passt_ok {
        eprintln!("omerta-perf: passt is not installed (make perf installs it); comparing without it");
    }
    let cfg = if smoke {
        measure::Cfg {
            secs: 0.2,
            rounds: 1,
            sustained: 1.0,
            long_running: 1.0,
            rtt_samples: 200,
            churn: 4,
            mem_frames: 5_000,
            passt: false,
            tunnel_secs: tunnel_secs(0.3),
            tunnel_rtts: 200,
        }
    } else if long {
        measure::Cfg {
            secs: 10.0,
            rounds: 3,
            sustained: 60.0,
            long_running: 3600.0,
            rtt_samples: 100_000,
            churn: 1000,
            mem_frames: 1_000_000,
            passt: passt_ok,
            tunnel_secs: tunnel_secs(10.0),
            tunnel_rtts: 10_000,
        }
    } else {
        measure::Cfg {
            secs: 2.0,
            rounds: 3,
            sustained: 10.0,
            long_running: 20.0,
            rtt_samples: 10_000,
            churn: 100,
            mem_frames: 1_000_000,
            passt: passt_ok,
            tunnel_secs: tunnel_secs(3.0),
            tunnel_rtts: 2_000,
        }
    };
    let started = Instant::now();
    let (rows, failures) = scenarios::run(&cfg, only);
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
    if !failures.is_empty() {
        eprintln!("omerta-perf: failed: {}", failures.join("; "));
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

/// Seconds of each bulk run through a tunnel: `default`, or OMERTA_PERF_TUNNEL_SECS (0.1 to
/// 600).
fn tunnel_secs(default: f64) -> f64 {
    std::env::var("OMERTA_PERF_TUNNEL_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| (0.1..=600.0).contains(s))
        .unwrap_or(default)
}
