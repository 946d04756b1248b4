//! Text for people: each reply as `omertactl` prints it without `--json`.
use std::time::Duration;

use api::reply::{self, Reply};

pub(crate) fn human_duration(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs} s"),
        60..=3599 => format!("{} min {} s", secs / 60, secs % 60),
        3600..=86_399 => format!("{} h {} min", secs / 3600, secs % 3600 / 60),
        _ => format!("{} d {} h", secs / 86_400, secs % 86_400 / 3600),
    }
}

/// Bytes in binary units, as `wg show` writes them: `512 B`, `1.50 KiB`, `3.20 MiB`.
pub(crate) fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.2} {unit}")
}

pub(crate) fn list(eps: &[engine::Endpoint]) -> String {
    eps.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ")
}

pub(crate) fn print_vm(v: &reply::Vm) {
    let rows: [(&str, Option<String>); 16] = [
        ("name", Some(v.name.clone())),
        ("state", Some(v.state.to_string())),
        ("reason", v.reason.clone()),
        ("mode", Some(v.mode.clone())),
        ("strategy", v.strategy.clone()),
        ("sample_rate", v.sample_rate.map(|r| serde_json::json!(r).to_string())),
        ("backend", v.backend.clone()),
        ("attachment", Some(v.attachment.clone())),
        ("handle", Some(v.handle.clone())),
        ("mac", Some(v.mac.clone())),
        ("ip", Some(v.ip.clone())),
        ("gateway", Some(v.gateway.clone())),
        ("gateway_mac", Some(v.gateway_mac.clone())),
        ("mtu", Some(v.mtu.to_string())),
        ("cpu", v.cpu.map(|c| c.to_string())),
        ("starts", Some(v.starts.to_string())),
    ];
    for (k, x) in rows {
        if let Some(x) = x {
            println!("{k:12} {x}");
        }
    }
    println!("{:12} {}", "allow", list(&v.allow));
}

pub(crate) fn print_stats(v: &reply::VmStats) {
    // Every counter of the vocabulary, in its order, then the drops and the termination.
    println!("{}", v.vm);
    for k in engine::stats::COUNTERS {
        let value = v.counter(k.name);
        if k.name.contains("bytes") && value >= 1024 {
            println!("  {:24} {value} ({})", k.name, human_bytes(value));
        } else {
            println!("  {:24} {value}", k.name);
        }
    }
    println!("  {:24} {}", "dropped", v.dropped);
    for (reason, c) in &v.drops {
        println!("    {reason:22} {c}");
    }
    println!("  {:24} {}", "terminated", v.terminated.as_deref().unwrap_or("no"));
}

/// Prints a reply as text.
pub(crate) fn print(r: Reply) {
    match r {
        Reply::Status(v) => {
            let states = v.states.iter().map(|(k, c)| format!("{c} {k}")).collect::<Vec<_>>().join(", ");
            println!(
                "omerta-engine {} up {}, backend {}, {} VM(s){}",
                v.version,
                human_duration(v.uptime_s),
                v.backend,
                v.vms,
                if states.is_empty() { String::new() } else { format!(": {states}") }
            );
        }
        Reply::Vms(vms) => {
            println!("{:16} {:11} {:10} {:34} ALLOW", "NAME", "STATE", "MODE", "HANDLE");
            for vm in vms {
                println!("{:16} {:11} {:10} {:34} {}", vm.name, vm.state.name(), vm.mode, vm.handle, list(&vm.allow));
            }
        }
        Reply::Vm(v) => print_vm(&v),
        Reply::Allow(v) => println!("{}: {}", v.vm, list(&v.allow)),
        Reply::Stats(v) => v.iter().for_each(print_stats),
        Reply::Latency(rows) => {
            println!(
                "{:16} {:11} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
                "VM", "DIRECTION", "FRAMES", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "max µs"
            );
            for row in rows {
                for (dir, d) in [("vm_to_host", row.vm_to_host), ("host_to_vm", row.host_to_vm)] {
                    println!(
                        "{:16} {:11} {:>10} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                        row.vm, dir, d.count, d.p50_us, d.p90_us, d.p99_us, d.p999_us, d.max_us
                    );
                }
            }
        }
        Reply::Log(events) => {
            for e in events {
                let at = std::time::UNIX_EPOCH + Duration::from_millis(e.time_ms);
                println!("{} {} {} {} {}", engine::log::rfc3339(at), e.vm, e.direction.name(), e.reason, e.headers);
            }
        }
        Reply::Metrics(text) => print!("{text}"),
        Reply::CaptureStarted(_) | Reply::Captured(_) | Reply::CaptureStopped(_) => {}
    }
}
