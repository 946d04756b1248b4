//! The control thread, once confined: it starts the configured VMs, serves the control socket
//! and the metrics endpoint, and waits in one `select!` on control requests, worker events
//! and signals (SIGHUP reloads, SIGINT and SIGTERM stop) until a stop; then it stops every
//! VM and has the launcher end its VMMs.
use std::collections::HashSet;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use engine::config::VmConfig;
use engine::worker::EventKind;
use engine::{error, info, warn};

use super::reload::{reload, Configured};
use super::startup::{Confined, Running};
use super::Plan;
use crate::registry::Registry;
use crate::server;

/// Runs the engine until a stop signal (or, without a control socket, until its last VM
/// ends). Exit status 1 when a VM could not start or failed.
pub fn run(
    confined: Confined,
    mut registry: Registry,
    mut configured: Configured,
    vms: Vec<VmConfig>,
    plan: &Plan,
    stats_interval: u64,
) -> ExitCode {
    let Running { notify, launcher, signals, control, metrics } = confined.into_running();
    if let Some(l) = &launcher {
        registry.set_launcher(std::sync::Arc::clone(l));
        registry.set_kernel_fence(plan.fence.is_some());
    }
    // Guests an engine before this one left running, taken over before anything else.
    if plan.launcher_at.is_some() {
        let n = registry.restore();
        info!("{n} VM(s) restored from the records of the engine before");
    }
    configured.running(&vms);
    for vm in vms {
        let (name, handle, mode, n) = (vm.name.clone(), vm.handle.to_string(), vm.mode.name(), vm.consumers.len());
        if let Err(e) = registry.add(vm) {
            error!("{}", e.message);
            // Guests taken over from an engine before stay with the launcher.
            registry.detach_all();
            return ExitCode::from(1);
        }
        info!("vm {name}: serving {handle} in {mode} mode, {n} consumer(s)");
    }
    let (jobs_tx, jobs) = crossbeam_channel::bounded::<server::Job>(64);
    // Clients are checked against the user the engine was started as (and its group).
    let started_as = plan.started_as;
    let metrics = match metrics.map(|l| {
        let me = server::Peer { uid: started_as, gid: 0 };
        crate::metrics_http::MetricsServer::start(l, jobs_tx.clone(), me)
    }) {
        Some(Ok(m)) => Some(m),
        Some(Err(e)) => {
            error!("{e}");
            // Guests taken over from an engine before stay with the launcher.
            registry.detach_all();
            return ExitCode::from(1);
        }
        None => None,
    };
    let server = control.map(|(l, path)| {
        server::Server::start(l, path, jobs_tx, server::Policy { uid: started_as, gid: plan.control_gid })
    });
    let (sig_tx, sig_rx) = crossbeam_channel::bounded(4);
    let sig_handle = signals.handle();
    std::thread::spawn(move || {
        let mut signals = signals;
        for sig in signals.forever() {
            // SIGHUPs arriving faster than reloads are one reload.
            if sig_tx.try_send(sig).is_err() && sig != signal_hook::consts::SIGHUP {
                let _ = sig_tx.send(sig);
            }
        }
    });

    // Requests, worker events, signals, periodic counters.
    let interval = (stats_interval > 0).then(|| Duration::from_secs(stats_interval));
    let mut next_stats = interval.map(|i| Instant::now() + i);
    let mut host_check = Instant::now();
    let events = registry.events().clone();
    let mut failed = false;
    // Ready (for systemd) once the control socket is up (it is) and every configured VM's
    // worker runs or has failed to: not when guests have booted.
    let mut pending: HashSet<String> = configured.names().map(String::from).collect();
    let mut ready_sent = false;
    loop {
        if !ready_sent && pending.is_empty() {
            let n = registry.running().len();
            notify.send(&format!("READY=1\nSTATUS=serving {n} VM(s)"));
            ready_sent = true;
        }
        crossbeam_channel::select! {
            recv(jobs) -> job => {
                if let Ok((req, peer, answer)) = job {
                    let _ = answer.send(registry.handle_for(req, (peer.uid, peer.gid)));
                }
            }
            recv(events) -> ev => {
                if let Ok(ev) = ev {
                    failed |= matches!(ev.kind, EventKind::Failed(_));
                    if matches!(ev.kind, EventKind::Started(_) | EventKind::Failed(_)) {
                        pending.remove(&*ev.vm);
                    }
                    match &ev.kind {
                        EventKind::Started(b) => info!("vm {}: running, {b} backend", ev.vm),
                        EventKind::HandleClosed(why) => info!("vm {}: handle closed ({why})", ev.vm),
                        _ => {}
                    }
                    let name = ev.vm.to_string();
                    let was_running = registry.running().contains(&name);
                    registry.on_event(ev);
                    if was_running && !registry.running().contains(&name) {
                        for line in registry.summaries(Some(&name)) {
                            info!("{line}");
                        }
                    }
                }
            }
            recv(sig_rx) -> sig => {
                if sig == Ok(signal_hook::consts::SIGHUP) {
                    notify.send("RELOADING=1");
                    match reload(&mut registry, &mut configured) {
                        Ok(done) => info!("SIGHUP: configuration reloaded: {done}"),
                        Err((e, true)) => warn!("SIGHUP: {e}; the running configuration is kept"),
                        Err((e, false)) => warn!("SIGHUP: configuration partly reloaded: {e}"),
                    }
                    notify.send(&format!("READY=1\nSTATUS=serving {} VM(s)", registry.running().len()));
                    continue;
                }
                notify.send("STOPPING=1");
                info!("signal {}: stopping {} VM(s)", sig.unwrap_or(0), registry.running().len());
                break;
            }
            default(Duration::from_millis(500)) => {}
        }
        registry.tick();
        // The host's addresses change (DHCP, a new interface): no allowlist may name one.
        if host_check.elapsed() >= Duration::from_secs(2) {
            registry.check_host_addresses();
            host_check = Instant::now();
            // Fails closed: without its launcher the engine has no fence and starts no guest.
            if let Some(l) = launcher.as_ref().filter(|l| l.gone()) {
                error!("the launcher (pid {}) is gone, and the kernel fence with it: stopping", l.pid());
                failed = true;
                break;
            }
        }
        if server.is_none() && registry.running().is_empty() {
            break;
        }
        if let (Some(at), Some(every)) = (next_stats, interval) {
            if Instant::now() >= at {
                for line in registry.summaries(None) {
                    info!("{line}");
                }
                next_stats = Some(at + every);
            }
        }
    }

    // The shutdown: every VM stopped and summed up (with a launcher that outlives the engine,
    // its guests are left running to it), the servers ended, then the launcher.
    let running = registry.running();
    let durable = plan.launcher_at.is_some();
    if durable {
        registry.detach_all();
    } else {
        registry.stop_all();
    }
    for name in running {
        for line in registry.summaries(Some(&name)) {
            info!("{line}");
        }
    }
    drop(metrics);
    if let Some(s) = server {
        s.shutdown();
    }
    // The launcher ends its VMMs and namespaces and removes the control socket, then answers
    // (one that outlives the engine notices the engine has gone and keeps its guests).
    if let Some(l) = launcher.as_ref().filter(|_| !durable) {
        if let Err(e) = l.finish() {
            warn!("launcher: {e}");
        }
    }
    sig_handle.close();
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
