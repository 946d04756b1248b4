//! The scenarios that are a measurement of their own (the rest are rows of [`crate::measure`]'s):
//! idle CPU, sustained and burst throughput, both directions at once, the engine's own
//! latency, memory over time, churn of VMs, concurrent VMs.
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::worker::Backend;
use omerta_perf::engine_proc::{EngineProc, Opts};
use omerta_perf::{generate, pct, round_trips, Dut, Echo, Kind, Sink};

use crate::measure::{h2v_trial, tput};
use crate::report::{median, Row};
use crate::{PORTABLE, URING};

/// The CPU an idle VM's worker uses in 3 s after some traffic (adaptive polling must cost
/// nothing once traffic stops).
pub(crate) fn idle_cpu(kind: Kind) -> Result<Row, String> {
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

pub(crate) fn sustained(secs: f64) -> Result<Row, String> {
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

pub(crate) fn burst() -> Vec<Row> {
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

pub(crate) fn bidirectional(secs: f64) -> Result<Vec<Row>, String> {
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
pub(crate) fn host_to_vm(kind: Kind, secs: f64) -> Result<Row, String> {
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

pub(crate) fn frame_latency(secs: f64, pps: u64) -> Result<Row, String> {
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

pub(crate) fn allowlist_latency() -> Row {
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

pub(crate) fn under_load(samples: u64, pps: u64) -> Result<Row, String> {
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

pub(crate) fn memory(frames: u64) -> Result<Row, String> {
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

pub(crate) fn long_running(secs: f64, pps: u64) -> Result<Row, String> {
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
pub(crate) fn churn(cycles: usize) -> Result<Row, String> {
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
        )))
        .map_err(|e| format!("vm add {name}: {e}"))?;
        eng.wait_running(&name)?;
        sock.connect(&theirs).map_err(|e| format!("{}: {e}", theirs.display()))?;
        let mut d = Dut::on_engine(&eng, &name, sock);
        generate(&mut d, sink.port, &[64], 0, 1.0, 100);
        eng.call(&api::Request::VmStop(name.clone())).map_err(|e| format!("vm stop {name}: {e}"))?;
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

pub(crate) fn concurrent(secs: f64) -> Result<Row, String> {
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
