//! The registry's views: a VM as JSON, its counters (from the engine's counter vocabulary),
//! the Prometheus text, the log lines of the exit summary.
use super::*;

impl Registry {
    /// One log line per VM (every VM when `name` is `None`) with all its counters, from the
    /// same vocabulary as the other views.
    pub fn summaries(&mut self, name: Option<&str>) -> Vec<String> {
        self.vms
            .iter_mut()
            .filter(|(n, _)| name.is_none_or(|x| x == n.as_str()))
            .map(|(n, v)| {
                v.refresh();
                let l = &v.last;
                format!("vm {n}: {}", engine::stats::summary_line(&l.counters, &l.strategy, l.terminated))
            })
            .collect()
    }

    /// The Prometheus text exposition of every VM's counters and latency.
    pub fn metrics(&mut self) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, rows: &mut dyn Iterator<Item = (String, u64)>| {
            let _ = writeln!(out, "# HELP omerta_{name} {help}\n# TYPE omerta_{name} counter");
            for (labels, v) in rows {
                let _ = writeln!(out, "omerta_{name}{{{labels}}} {v}");
            }
        };
        for v in self.vms.values_mut() {
            v.refresh();
        }
        let vms: Vec<(&String, &Vm)> = self.vms.iter().collect();
        for k in engine::stats::COUNTERS {
            let rows =
                &mut vms.iter().map(|(n, v)| (format!("vm=\"{n}\""), (k.get)(&v.last.counters, &v.last.strategy)));
            counter(k.metric, k.help, rows);
        }
        counter(
            "drops_total",
            "Frames and datagrams dropped, by reason.",
            &mut vms.iter().flat_map(|(n, v)| {
                DropReason::ALL
                    .iter()
                    .map(move |r| (format!("vm=\"{n}\",reason=\"{}\"", r.name()), v.last.counters.drops_for(*r)))
            }),
        );
        let _ = writeln!(out, "# HELP omerta_vm_up 1 if the VM's worker is running.\n# TYPE omerta_vm_up gauge");
        for (n, v) in &vms {
            let _ = writeln!(
                out,
                "omerta_vm_up{{vm=\"{n}\",state=\"{}\"}} {}",
                v.state.name(),
                u8::from(v.worker.is_some())
            );
        }
        let _ = writeln!(
            out,
            "# HELP omerta_frame_latency_seconds Time a frame spends inside the engine.\n# TYPE omerta_frame_latency_seconds summary"
        );
        for (n, v) in &vms {
            for (dir, h) in [("vm_to_host", &v.latency_out), ("host_to_vm", &v.latency_in)] {
                for q in [0.5, 0.9, 0.99, 0.999] {
                    let s = h.value_at_quantile(q) as f64 / 1e9;
                    let _ = writeln!(
                        out,
                        "omerta_frame_latency_seconds{{vm=\"{n}\",direction=\"{dir}\",quantile=\"{q}\"}} {s:e}"
                    );
                }
                let _ =
                    writeln!(out, "omerta_frame_latency_seconds_count{{vm=\"{n}\",direction=\"{dir}\"}} {}", h.len());
            }
        }
        out
    }
}

pub(super) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

pub(super) fn vm_json(v: &mut Vm) -> Value {
    v.refresh();
    let c = &v.cfg;
    let (mode, rate) = match c.mode {
        Mode::Sampled(r) => ("sampled", Some(r.get())),
        m => (m.name(), None),
    };
    let mut out = json!({
        "name": c.name,
        "state": v.state.name(),
        "reason": v.state.reason(),
        "mode": mode,
        "sample_rate": rate,
        "strategy": if v.last.strategy_name.is_empty() { Value::Null } else { json!(v.last.strategy_name) },
        "backend": if v.last.backend.is_empty() { Value::Null } else { json!(v.last.backend) },
        "attachment": "file-handle",
        "handle": c.handle.to_string(),
        "mac": c.identity.mac.to_string(),
        "ip": format!("{}/{}", c.identity.ip, c.identity.prefix_len),
        "gateway": c.identity.gateway_ip.to_string(),
        "gateway_mac": c.identity.gateway_mac.to_string(),
        "mtu": c.identity.mtu,
        "dhcp_lease": c.dhcp,
        "cpu": c.cpu,
        "allow": v.allow.endpoints().iter().map(ToString::to_string).collect::<Vec<_>>(),
        "starts": v.starts,
        "guest": v.guest.as_ref().map(|g| {
            let (boot, ready_s, tail) = match &g.boot.state {
                BootState::Booting => ("booting", None, None),
                BootState::Ready(t) => ("ready", Some((t.as_secs_f64() * 10.0).round() / 10.0), None),
                BootState::Failed(tail) => ("failed", None, Some(tail.clone())),
            };
            let cloud = g.cloud.as_ref().map(|c| {
                // Public halves only: the private keys are in the seed and nowhere else.
                json!({
                    "image": c.image,
                    "network": if c.request.dhcp { "dhcp" } else { "static" },
                    "wireguard_public_key": c.keys.wg_public,
                    "wireguard_port": c.seed.wg_port,
                    "tunnel": format!("{}/{}", c.request.tunnel.0, c.request.tunnel.1),
                    "consumer_tunnel": c.request.consumer_tunnel.to_string(),
                    "consumer_key": c.request.consumer_key,
                    "ssh_user": c.request.ssh_user,
                    "ssh_host_key": c.keys.host_public,
                    "ssh_host_fingerprint": c.keys.host_fingerprint,
                })
            });
            json!({
                "pid": hv::RunningVm::pid(&g.vm),
                "kernel": g.kernel,
                "memory_mib": g.memory_mib,
                "cpus": g.cpus,
                "cloud": cloud,
                "console": g.console.display().to_string(),
                "boot": boot,
                "ready_after_s": ready_s,
                "boot_timeout_s": g.boot.timeout.as_secs(),
                "console_tail": tail,
            })
        }),
    });
    // A guest the engine started: while its network runs, the VM is booting until the guest
    // says it is ready.
    if let (Some(g), State::Running | State::Starting) = (&v.guest, &v.state) {
        out["state"] = json!(match g.boot.state {
            BootState::Booting => "booting",
            BootState::Ready(_) => "ready",
            BootState::Failed(_) => "failed",
        });
    }
    if let (Some(d), Some(o)) = (&v.direct, out.as_object_mut()) {
        o.insert("mode".into(), json!("direct"));
        o.insert("attachment".into(), json!("vmm-nat"));
        o.insert("handle".into(), json!("-"));
        o.insert("strategy".into(), Value::Null);
        o.insert("rogue_checks".into(), json!(d.checks));
        o.insert("rogue_connections".into(), json!(d.rogue));
        o.insert("rogue_blind".into(), json!(d.blind));
    }
    out
}

pub(super) fn stats_json(name: &str, s: &Snapshot) -> Value {
    let c = &s.counters;
    let mut out = serde_json::Map::new();
    out.insert("vm".into(), json!(name));
    for k in engine::stats::COUNTERS {
        out.insert(k.name.into(), json!((k.get)(c, &s.strategy)));
    }
    out.insert("dropped".into(), json!(c.dropped()));
    let drops: serde_json::Map<String, Value> =
        c.nonzero_drops().map(|(r, n)| (r.name().to_string(), json!(n))).collect();
    out.insert("drops".into(), Value::Object(drops));
    out.insert("terminated".into(), json!(s.terminated.map(|r| r.name())));
    Value::Object(out)
}
