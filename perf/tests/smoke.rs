//! `make test` keeps the benchmark harness from rotting: every scenario for a moment.
#[test]
fn every_scenario_runs_in_smoke_mode() {
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_omerta-perf")).arg("--smoke").output().expect("run omerta-perf");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let plan = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/plan-cases.tsv"))
        .expect("docs/plan-cases.tsv");
    let mut names: Vec<&str> = plan
        .lines()
        .filter(|l| l.ends_with("perf scenario (make perf)"))
        .filter_map(|l| l.split('\t').nth(1))
        .collect();
    assert!(names.len() >= 18, "docs/plan-cases.tsv lists the plan's perf scenarios");
    // Issue 14's: zero-loss rates beside the bare forwarder, an idle worker's CPU.
    names.extend(["ndr_small_packet", "ndr_large_packet", "ndr_host_to_vm", "idle_cpu"]);
    // The busy harness's round trips and the GRO bound, each beside its floor.
    names.extend(["e2e_latency_busy", "ndr_host_to_vm_gso"]);
    for n in names {
        assert!(text.contains(&format!("| {n} |")), "scenario {n} missing from the report:\n{text}");
    }
    for (n, floor) in [
        ("ndr_small_packet", "floor (bare forwarder)"),
        ("ndr_host_to_vm", "floor (bare forwarder)"),
        ("ndr_host_to_vm_gso", "floor (bare forwarder)/gro"),
        ("e2e_latency_busy", "floor (bare forwarder)/busy-poll"),
    ] {
        assert!(text.contains(&format!("| {n} | {floor} |")), "{n}: no {floor} row beside Omerta's:\n{text}");
    }
    // The userspace tunnel beside wireguard-go on TUN, where wireguard-go is installed (make
    // setup installs it; without it the scenario is skipped, or fails the run under CI=true).
    if omerta_perf::wg::available().is_ok() {
        for t in ["wireguard-go (TUN, kernel TCP)", "userspace tunnel (boringtun+smoltcp, unix stream)"] {
            assert!(text.contains(&format!("| userspace_tunnel | {t} |")), "userspace_tunnel: no {t} row:\n{text}");
        }
    }
    // Every row of the two VM-to-host throughput scenarios moved traffic and lost none of it.
    for scenario in ["small_packet_throughput", "large_packet_throughput"] {
        let rows: Vec<Vec<&str>> = text
            .lines()
            .filter(|l| l.starts_with(&format!("| {scenario} |")))
            .map(|l| l.split('|').map(str::trim).collect())
            .collect();
        assert!(!rows.is_empty(), "no {scenario} rows:\n{text}");
        for cells in rows {
            // | scenario | target | kpps | Gbps | loss % | ...
            let kpps: f64 = cells[3].parse().unwrap_or(0.0);
            assert!(kpps > 0.0, "{scenario} {}: nothing received:\n{text}", cells[2]);
            assert_eq!(cells[5], "0.00", "{scenario} {}: loss:\n{text}", cells[2]);
        }
    }
}
