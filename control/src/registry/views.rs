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

    /// The Prometheus text exposition (OpenMetrics) of every VM's counters, state and
    /// per-frame latency. Label sets never change over a VM's life (its state is a value);
    /// the latency is a histogram with fixed buckets, so VMs' histograms add up.
    pub fn metrics(&mut self) -> String {
        for v in self.vms.values_mut() {
            v.refresh();
        }
        let rows = self
            .vms
            .iter()
            .map(|(n, v)| MetricsRow {
                vm: n.clone(),
                counters: engine::stats::COUNTERS.iter().map(|k| (k.get)(&v.last.counters, &v.last.strategy)).collect(),
                drops: DropReason::ALL.iter().map(|r| v.last.counters.drops_for(*r)).collect(),
                up: v.worker().is_some(),
                state: v.state.code(),
                latency: [histogram_of(&v.latency_out), histogram_of(&v.latency_in)],
            })
            .collect();
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register_collector(Box::new(MetricsSnapshot(rows)));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &reg).is_err() {
            out.clear();
        }
        out
    }
}

/// The latency buckets' upper bounds in nanoseconds: 1 µs to 100 ms, 1-2-5 steps, then +Inf.
const LATENCY_BUCKETS_NS: [u64; 16] = [
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    20_000_000,
    50_000_000,
    100_000_000,
];

/// A histogram as the exposition's encoder wants it: sum (seconds), count, and each bucket's
/// own count (not cumulative).
#[derive(Debug, Clone)]
struct PromHistogram {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

/// The fixed buckets of an HDR histogram of nanoseconds (its sum is the mean times the count:
/// HDR keeps no exact sum, and the mean is exact to its 1% precision).
fn histogram_of(h: &Histogram<u64>) -> PromHistogram {
    // Each bucket's own count: the encoder makes them cumulative (`le`) itself.
    let mut below = 0;
    let mut buckets: Vec<(f64, u64)> = LATENCY_BUCKETS_NS
        .iter()
        .map(|ns| {
            let upto = h.count_between(0, *ns);
            let own = upto.saturating_sub(below);
            below = upto;
            (*ns as f64 / 1e9, own)
        })
        .collect();
    buckets.push((f64::INFINITY, h.len().saturating_sub(below)));
    PromHistogram { sum: h.mean() * h.len() as f64 / 1e9, count: h.len(), buckets }
}

/// One VM's figures at a scrape.
#[derive(Debug)]
struct MetricsRow {
    vm: String,
    counters: Vec<u64>,
    drops: Vec<u64>,
    up: bool,
    state: u8,
    latency: [PromHistogram; 2],
}

/// Every VM's figures, encoded on each scrape by the Prometheus client's encoder.
#[derive(Debug)]
struct MetricsSnapshot(Vec<MetricsRow>);

impl prometheus_client::collector::Collector for MetricsSnapshot {
    fn encode(&self, mut enc: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::{EncodeMetric, NoLabelSet};
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        use prometheus_client::metrics::MetricType;
        let vm = |r: &MetricsRow| vec![("vm".to_string(), r.vm.clone())];
        for (i, k) in engine::stats::COUNTERS.iter().enumerate() {
            // The client adds the counter's `_total` itself.
            let name = format!("omerta_{}", k.metric.trim_end_matches("_total"));
            let mut m = enc.encode_descriptor(&name, k.help, None, MetricType::Counter)?;
            for r in &self.0 {
                ConstCounter::new(r.counters.get(i).copied().unwrap_or(0)).encode(m.encode_family(&vm(r))?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "omerta_drops",
            "Frames and datagrams dropped, by reason.",
            None,
            MetricType::Counter,
        )?;
        for r in &self.0 {
            for (reason, n) in DropReason::ALL.iter().zip(&r.drops) {
                let labels = vec![("vm".to_string(), r.vm.clone()), ("reason".to_string(), reason.name().to_string())];
                ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m =
            enc.encode_descriptor("omerta_vm_up", "1 if the VM's worker is running.", None, MetricType::Gauge)?;
        for r in &self.0 {
            ConstGauge::new(i64::from(r.up)).encode(m.encode_family(&vm(r))?)?;
        }
        let mut m = enc.encode_descriptor(
            "omerta_vm_state",
            "The VM's state: 0 starting, 1 running, 2 stopped, 3 exited, 4 terminated, 5 failed.",
            None,
            MetricType::Gauge,
        )?;
        for r in &self.0 {
            ConstGauge::new(i64::from(r.state)).encode(m.encode_family(&vm(r))?)?;
        }
        let mut m = enc.encode_descriptor(
            "omerta_frame_latency_seconds",
            "Time a frame spends inside the engine, batch in hand to batch sent.",
            None,
            MetricType::Histogram,
        )?;
        for r in &self.0 {
            for (dir, h) in ["vm_to_host", "host_to_vm"].iter().zip(&r.latency) {
                let labels = vec![("vm".to_string(), r.vm.clone()), ("direction".to_string(), (*dir).to_string())];
                m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)?;
            }
        }
        Ok(())
    }
}

pub(super) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A VM as a reply.
pub(super) fn vm_reply(v: &mut Vm) -> Reply {
    Reply::Vm(Box::new(vm_view(v)))
}

/// A VM as every `vm` request answers it.
pub(super) fn vm_view(v: &mut Vm) -> view::Vm {
    v.refresh();
    let c = &v.cfg;
    let (mode, rate) = match c.mode {
        Mode::Sampled(r) => ("sampled", Some(r.get())),
        m => (m.name(), None),
    };
    let guest = v.guest.as_ref().map(|g| {
        let (boot, ready_after_s, console_tail) = match &g.boot.state {
            BootState::Booting => (view::BootState::Booting, None, None),
            BootState::Ready(t) => (view::BootState::Ready, Some((t.as_secs_f64() * 10.0).round() / 10.0), None),
            BootState::Failed(tail) => (view::BootState::Failed, None, Some(tail.clone())),
        };
        // Public halves only: the private keys are in the seed and nowhere else.
        let cloud = g.cloud.as_ref().map(|c| view::CloudGuest {
            image: c.image.clone(),
            network: if c.request.dhcp { view::Addressing::Dhcp } else { view::Addressing::Static },
            wireguard_public_key: c.keys.wg_public.clone(),
            wireguard_port: GUEST_WG_PORT,
            tunnel: format!("{}/{}", c.request.tunnel.0, c.request.tunnel.1),
            consumer_tunnel: c.request.consumer_tunnel.to_string(),
            consumer_key: c.request.consumer_key.clone(),
            ssh_user: c.request.ssh_user.clone(),
            ssh_host_key: c.keys.host_public.clone(),
            ssh_host_fingerprint: c.keys.host_fingerprint.clone(),
            proof_key: c.keys.proof_public.clone(),
        });
        view::Guest {
            pid: hv::RunningVm::pid(&g.vm),
            kernel: g.kernel.clone(),
            memory_mib: g.memory_mib,
            cpus: g.cpus,
            cloud,
            console: g.console.display().to_string(),
            boot,
            ready_after_s,
            boot_timeout_s: g.boot.timeout.as_secs(),
            console_tail,
            paused: g.vm.paused().map(str::to_string),
        }
    });
    // A guest the engine started: while its network runs, the VM is booting until the guest
    // says it is ready.
    let state = match (&v.guest, &v.state) {
        (Some(g), State::Running | State::Starting) => match g.boot.state {
            BootState::Booting => VmState::Booting,
            BootState::Ready(_) => VmState::Ready,
            BootState::Failed(_) => VmState::Failed,
        },
        (_, s) => s.view(),
    };
    let mut out = view::Vm {
        name: c.name.clone(),
        state,
        reason: v.state.reason(),
        mode: mode.to_string(),
        sample_rate: rate,
        strategy: (!v.last.strategy_name.is_empty()).then(|| v.last.strategy_name.to_string()),
        backend: (!v.last.backend.is_empty()).then(|| v.last.backend.to_string()),
        attachment: "file-handle".into(),
        handle: c.handle.to_string(),
        mac: c.identity.mac.to_string(),
        ip: format!("{}/{}", c.identity.ip, c.identity.prefix_len),
        gateway: c.identity.gateway_ip.to_string(),
        gateway_mac: c.identity.gateway_mac.to_string(),
        mtu: c.identity.mtu,
        dhcp_lease: c.dhcp,
        cpu: c.cpu,
        allow: v.allow.endpoints(),
        starts: v.starts,
        port: v.worker().filter(|w| !w.is_finished()).map(|w| w.host_port),
        guest,
        rogue_checks: None,
        rogue_connections: None,
        rogue_blind: None,
    };
    if let Some(d) = v.direct() {
        out.mode = "direct".into();
        out.attachment = "vmm-nat".into();
        out.handle = "-".into();
        out.strategy = None;
        out.rogue_checks = Some(d.checks);
        out.rogue_connections = Some(d.rogue.clone());
        out.rogue_blind = Some(d.blind.clone());
    }
    out
}

/// One VM's counters, named by the engine's counter vocabulary.
pub(super) fn stats_view(name: &str, s: &Snapshot) -> view::VmStats {
    let c = &s.counters;
    view::VmStats {
        vm: name.to_string(),
        counters: engine::stats::COUNTERS.iter().map(|k| (k.name.to_string(), (k.get)(c, &s.strategy))).collect(),
        dropped: c.dropped(),
        drops: c.nonzero_drops().map(|(r, n)| (r.name().to_string(), n)).collect(),
        terminated: s.terminated.map(|r| r.name().to_string()),
    }
}
