//! Answering control requests: one `match` over [`Request`], each arm a short call into the
//! lifecycle (`mod.rs`) or the views (`views.rs`).
use super::*;

impl Registry {
    /// Answers one request from a control client with user and group ids `client`: the files
    /// a request names (a guest's kernel and initrd) are used only if that user may read them.
    pub fn handle_for(&mut self, req: Request, client: (u32, u32)) -> Result<Reply, Failure> {
        self.client = Some(client);
        let answer = self.handle(req);
        self.client = None;
        answer
    }

    /// Answers one request (from the engine itself: its own files are its own).
    pub fn handle(&mut self, req: Request) -> Result<Reply, Failure> {
        match req {
            Request::Status => {
                let mut states: BTreeMap<String, usize> = BTreeMap::new();
                for vm in self.vms.values() {
                    *states.entry(vm.state.view().name().to_string()).or_default() += 1;
                }
                Ok(Reply::Status(view::Status {
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    uptime_s: self.started.elapsed().as_secs(),
                    backend: format!("{:?}", self.backend).to_lowercase(),
                    vms: self.vms.len(),
                    states,
                }))
            }
            Request::VmList => Ok(Reply::Vms(self.vms.values_mut().map(vm_view).collect())),
            Request::VmShow(name) => Ok(vm_reply(self.vm(&name)?)),
            Request::VmAdd(spec) => {
                let cfg = crate::config::vm_from_spec(&spec).map_err(|e| refused(e.to_string()))?;
                if matches!(cfg.handle, HandleSpec::DgramFd(_) | HandleSpec::StreamFd(_)) {
                    return Err(refused(
                        "an fd handle cannot be passed over the control socket; use dgram:PATH or stream:PATH",
                    ));
                }
                let name = cfg.name.clone();
                self.add(cfg)?;
                Ok(vm_reply(self.vm(&name)?))
            }
            Request::VmRemove(name) => {
                let mut vm = self.vms.remove(&name).ok_or_else(|| not_found(&name))?;
                vm.stop_guest(Duration::from_secs(2));
                vm.stop_worker();
                let mut out = vm_view(&mut vm);
                out.state = VmState::Removed;
                // The launcher forgets the guest and deletes its console; the worker's end
                // removed its socket files; the namespace of a direct-mode VM goes with it.
                if let Some(g) = vm.guest.take() {
                    g.vm.remove();
                }
                // A kept guest: its directory (disk, seed) goes at the launcher.
                if let (Some(k), Some(l)) = (vm.kept.take(), self.launcher.as_ref()) {
                    if let Err(e) = l.forget(k.launcher_id) {
                        engine::warn!("vm {name}: its kept disk: {e}");
                    }
                }
                self.drop_record(&name);
                engine::info!("vm {name}: removed");
                Ok(Reply::Vm(Box::new(out)))
            }
            Request::VmStop(name) => {
                let vm = self.vm(&name)?;
                let direct_running = vm.direct().is_some() && vm.state == State::Running;
                if vm.worker().is_none() && !direct_running {
                    return Err(refused(format!("VM '{name}' is not running ({})", vm.state.view())));
                }
                vm.stop_guest(Duration::from_secs(2));
                vm.stop_worker();
                vm.state = State::Stopped;
                Ok(vm_reply(vm))
            }
            Request::VmRestart(name) if self.vms.get(&name).is_some_and(|v| v.guest.is_some()) => {
                let vm = self.vm(&name)?;
                // Refused before anything stops: only the launcher keeps that guest's seed.
                if vm.guest.as_ref().and_then(|g| g.cloud.as_ref()).is_some_and(|c| c.seed.is_none()) {
                    return Err(refused(format!(
                        "vm '{name}' was taken over from an engine before this one, which kept its seed: remove it and start it again"
                    )));
                }
                vm.stop_guest(Duration::from_secs(2));
                vm.stop_worker();
                let g = vm.guest.take().map(|g| GuestArgs {
                    kernel: g.kernel,
                    initrd: g.initrd,
                    memory_mib: g.memory_mib,
                    cpus: g.cpus,
                    firewall: g.firewall,
                    boot_timeout: g.boot.timeout,
                    cloud: g.cloud,
                    request: g.request,
                });
                let Some(g) = g else { return Err(refused("no guest")) };
                if let Some(netns) = vm.direct().map(|d| d.net.id()) {
                    // Direct mode: the VMM's NAT again, in the same namespace; no engine.
                    vm.starts += 1;
                    let guest = self.start_guest(&name, crate::launcher::Nic::Direct(netns), g)?;
                    let vm = self.vm(&name)?;
                    vm.guest = Some(guest);
                    vm.state = State::Running;
                    return Ok(vm_reply(vm));
                }
                let (nic, engine_end) = guests::dgram_nic()?;
                let fd = std::os::fd::IntoRawFd::into_raw_fd(engine_end);
                let (backend, events) = (self.backend, self.events_tx.clone());
                let vm = self.vm(&name)?;
                vm.cfg.handle = HandleSpec::DgramFd(fd);
                if let Err(f) = vm.fence_in() {
                    worker::release_handle(&vm.cfg.handle);
                    return Err(f);
                }
                let w = worker::spawn(&vm.cfg, backend, events).map_err(|e| {
                    if let Some(f) = vm.fence.as_mut() {
                        f.clear();
                    }
                    refused(e.to_string())
                })?;
                vm.set_worker(w);
                vm.state = State::Starting;
                vm.starts += 1;
                vm.last = Snapshot::default();
                let guest = self.start_guest(&name, nic, g)?;
                self.vm(&name)?.guest = Some(guest);
                self.save_record(&name);
                Ok(vm_reply(self.vm(&name)?))
            }
            Request::VmStart(spec) => self.vm_start(&spec),
            Request::VmResume(name) => self.vm_resume(&name),
            Request::VmStartImage(s) => self.vm_start_image(*s),
            Request::VmRestart(name) => {
                let backend = self.backend;
                let events = self.events_tx.clone();
                let vm = self.vm(&name)?;
                if matches!(vm.cfg.handle, HandleSpec::DgramFd(_) | HandleSpec::StreamFd(_)) {
                    return Err(refused(format!(
                        "VM '{name}' has an inherited fd handle, which cannot be reopened; its launcher must add it again"
                    )));
                }
                vm.stop_worker();
                vm.fence_in()?;
                let w = worker::spawn(&vm.cfg, backend, events).map_err(|e| {
                    if let Some(f) = vm.fence.as_mut() {
                        f.clear();
                    }
                    vm.state = State::Failed(e.to_string());
                    refused(e.to_string())
                })?;
                vm.set_worker(w);
                vm.state = State::Starting;
                vm.starts += 1;
                vm.last = Snapshot::default();
                Ok(vm_reply(vm))
            }
            Request::AllowList(name) => {
                let vm = self.vm(&name)?;
                Ok(Reply::Allow(view::Allowlist { vm: name, allow: vm.allow.endpoints() }))
            }
            Request::AllowSet(name, eps) => self.set_list(&name, eps),
            Request::AllowAdd(name, ep) => {
                let mut eps = self.vm(&name)?.allow.endpoints();
                if !eps.contains(&ep) {
                    eps.push(ep);
                }
                self.set_list(&name, eps)
            }
            Request::AllowRemove(name, ep) => {
                let mut eps = self.vm(&name)?.allow.endpoints();
                if !eps.contains(&ep) {
                    return Err(refused(format!("{ep} is not on VM '{name}''s allowlist")));
                }
                eps.retain(|e| *e != ep);
                self.set_list(&name, eps)
            }
            Request::Stats(name) => {
                let vms = self.selected(name.as_deref())?;
                Ok(Reply::Stats(
                    vms.into_iter()
                        .map(|v| {
                            v.refresh();
                            stats_view(&v.cfg.name, &v.last)
                        })
                        .collect(),
                ))
            }
            Request::Latency(name) => {
                let all = name.is_none();
                let vms = self.selected(name.as_deref())?;
                let mut out = Vec::new();
                let (mut merged_out, mut merged_in) = (worker::latency_histogram(), worker::latency_histogram());
                for v in vms {
                    v.refresh();
                    let _ = merged_out.add(&v.latency_out);
                    let _ = merged_in.add(&v.latency_in);
                    out.push(view::Latency {
                        vm: v.cfg.name.clone(),
                        vm_to_host: percentiles(&v.latency_out),
                        host_to_vm: percentiles(&v.latency_in),
                    });
                }
                if all {
                    out.push(view::Latency {
                        vm: "*".into(),
                        vm_to_host: percentiles(&merged_out),
                        host_to_vm: percentiles(&merged_in),
                    });
                }
                Ok(Reply::Latency(out))
            }
            Request::Log(name) => {
                let vms = self.selected(name.as_deref())?;
                let mut events = Vec::new();
                for v in vms {
                    v.refresh();
                    for e in &v.recent {
                        events.push((e.unix_ms, v.cfg.name.clone(), *e));
                    }
                }
                events.sort_by_key(|(t, _, _)| *t);
                Ok(Reply::Log(
                    events
                        .into_iter()
                        .map(|(t, vm, e)| view::Blocked {
                            time_ms: t,
                            vm,
                            reason: e.reason.name().to_string(),
                            direction: if e.from_vm { view::Direction::FromVm } else { view::Direction::ToVm },
                            headers: e.summary.to_string(),
                        })
                        .collect(),
                ))
            }
            Request::Metrics => Ok(Reply::Metrics(self.metrics())),
            Request::CaptureStart { vm, count, snaplen, all } => {
                if count == 0 || count > CAPTURE_MAX.0 {
                    return Err(refused(format!("count must be 1..={}", CAPTURE_MAX.0)));
                }
                let v = self.vm(&vm)?;
                let w = v.worker().ok_or_else(|| refused(format!("VM '{vm}' is not running")))?;
                // In progress from the reply on: a fetch right after it sees an empty capture,
                // not "no capture", whether or not the worker has taken the command yet.
                w.with_telemetry(|t| t.capture = Some(Capture::default()));
                let snaplen = snaplen.clamp(64, CAPTURE_MAX.1);
                w.command(worker::Command::Capture { count, snaplen, all });
                Ok(Reply::CaptureStarted(view::CaptureStarted { vm, count, snaplen, all }))
            }
            Request::CaptureFetch(vm) => {
                let v = self.vm(&vm)?;
                // A running worker's capture, or the one a stopped worker held at its end.
                let cap = match v.worker() {
                    Some(w) => w.with_telemetry(|t| t.capture.clone()).flatten(),
                    None => v.capture.clone(),
                }
                .ok_or_else(|| refused(format!("no capture on VM '{vm}'")))?;
                let frames = cap
                    .frames
                    .iter()
                    .map(|f| view::CapturedFrame {
                        time_us: f.unix_us,
                        len: f.len,
                        hex: hex(&f.bytes),
                        to_vm: f.to_vm,
                        dropped: f.dropped.map(|r| r.to_string()),
                    })
                    .collect();
                Ok(Reply::Captured(view::Captured { vm, done: cap.done, frames }))
            }
            Request::CaptureStop(vm) => {
                let v = self.vm(&vm)?;
                let w = v.worker().ok_or_else(|| refused(format!("VM '{vm}' is not running")))?;
                w.command(worker::Command::Capture { count: 0, snaplen: 0, all: false });
                Ok(Reply::CaptureStopped(view::CaptureStopped { vm }))
            }
        }
    }
}
