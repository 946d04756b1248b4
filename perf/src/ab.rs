//! `omerta-perf ab --base REV`: two builds of the engine in one run. REV's source is exported
//! with `git archive` under `target/ab/REV/` and its `omerta-engine` binary built there
//! (release, a target directory of its own, kept for the next run); then this harness runs
//! the scenarios against REV's engine and this build's in turn (`OMERTA_ENGINE_BIN`),
//! `--rounds` times (alternating which goes first), and the report gives each build's median
//! and the ratio this/REV per scenario and target. Only the engine differs between the two
//! runs: the generator, the sinks and the measurements are the same code. The machine's speed
//! drifts within seconds: interleaving in one run is what makes the ratio mean something.
//! Every run is started in a network namespace of its own (a build may seal itself further).
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// What `ab` was asked.
#[derive(Debug)]
pub struct AbArgs {
    /// The base revision (anything `git rev-parse` takes).
    pub base: String,
    /// Rounds of both builds.
    pub rounds: usize,
    /// Only this scenario (`--only`).
    pub only: Option<String>,
}

/// Runs `cmd`: its stdout, or `what` failed with the last line it wrote on stderr.
fn run(cmd: &mut Command, what: &str) -> Result<String, String> {
    crate::command::run(cmd).map_err(|e| format!("{what} failed: {}", e.lines().last().unwrap_or("")))
}

/// Exports and builds REV's `omerta-engine`; returns its path.
fn build_base(top: &Path, rev: &str) -> Result<PathBuf, String> {
    let commit = run(Command::new("git").arg("-C").arg(top).args(["rev-parse", "--verify", rev]), "git rev-parse")?;
    let commit = commit.trim().to_string();
    let dir = top.join("target/ab").join(commit.get(..12).unwrap_or(&commit));
    if !dir.join("Cargo.toml").exists() {
        eprintln!("ab: exporting {rev} ({commit}) to {}", dir.display());
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let archive = Command::new("git")
            .arg("-C")
            .arg(top)
            .args(["archive", "--format=tar", &commit])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("git archive: {e}"))?;
        let stdout = archive.stdout.ok_or("git archive: no output")?;
        let st = Command::new("tar").arg("-x").arg("-C").arg(&dir).stdin(stdout).status();
        if !st.is_ok_and(|s| s.success()) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!("unpacking {rev} failed"));
        }
    }
    eprintln!("ab: building {rev}'s omerta-engine (release)");
    run(
        Command::new("cargo")
            .args(["build", "--release", "-q", "-p", "omerta-control", "--bin", "omerta-engine"])
            .current_dir(&dir)
            .env("CARGO_TARGET_DIR", dir.join("target")),
        "cargo build",
    )?;
    Ok(dir.join("target/release/omerta-engine"))
}

/// One run of this harness against the engine `engine`: the rows of the report it wrote to
/// `report`.
fn one(harness: &Path, engine: &Path, report: &Path, only: Option<&str>) -> Result<Vec<Value>, String> {
    let _ = std::fs::remove_file(report);
    // In a network namespace of our own from the start (the harness seals itself too).
    let mut cmd = Command::new("unshare");
    cmd.args(["--net", "--", "sh", "-c", "ip link set lo up && exec \"$0\" \"$@\""]).arg(harness);
    cmd.env("OMERTA_ENGINE_BIN", engine);
    if let Some(s) = only {
        cmd.args(["--only", s]);
    }
    run(&mut cmd, &engine.display().to_string())?;
    let text = std::fs::read_to_string(report).map_err(|e| format!("{}: {e}", report.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", report.display()))?;
    Ok(v["rows"].as_array().cloned().unwrap_or_default())
}

/// (scenario, target, metric), then the base build's samples and this build's.
type Samples = ((String, String, &'static str), Vec<f64>, Vec<f64>);

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// Runs the A/B; prints the table; returns false on failure (said in one line).
pub fn ab(args: &AbArgs) -> bool {
    let top = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let base_bin = match build_base(&top, &args.base) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("omerta-perf ab: {e}");
            return false;
        }
    };
    let harness = std::env::current_exe().unwrap_or_default();
    let this_bin = match crate::engine_proc::engine_bin() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("omerta-perf ab: {e}");
            return false;
        }
    };
    let report = top.join("target/perf/latest.json");
    let mut samples: Vec<Samples> = Vec::new();
    for round in 0..args.rounds {
        let order = if round % 2 == 0 { [true, false] } else { [false, true] };
        for is_base in order {
            let bin = if is_base { &base_bin } else { &this_bin };
            eprintln!("ab: round {}/{}: {}", round + 1, args.rounds, if is_base { &args.base } else { "this build" });
            let rows = match one(&harness, bin, &report, args.only.as_deref()) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("omerta-perf ab: {e}");
                    return false;
                }
            };
            for r in rows {
                let key = |m| {
                    (
                        r["scenario"].as_str().unwrap_or("").to_string(),
                        r["target"].as_str().unwrap_or("").to_string(),
                        m,
                    )
                };
                for (m, v) in
                    [("kpps", &r["kpps"]), ("p50_us", &r["latency_us"]["p50"]), ("p99_us", &r["latency_us"]["p99"])]
                {
                    let Some(x) = v.as_f64() else { continue };
                    let k = key(m);
                    let i = samples.iter().position(|(kk, _, _)| *kk == k).unwrap_or_else(|| {
                        samples.push((k, Vec::new(), Vec::new()));
                        samples.len() - 1
                    });
                    if is_base {
                        samples[i].1.push(x);
                    } else {
                        samples[i].2.push(x);
                    }
                }
            }
        }
    }
    println!("A/B in one run, {} round(s), medians: base = {}, this = the working tree", args.rounds, args.base);
    println!("| scenario | target | metric | base | this | this/base |");
    println!("|---|---|---|---:|---:|---:|");
    for ((sc, target, m), b, t) in samples {
        if let (Some(b), Some(t)) = (median(b), median(t)) {
            println!("| {sc} | {target} | {m} | {b:.1} | {t:.1} | {:.2} |", t / b.max(1e-9));
        }
    }
    true
}
