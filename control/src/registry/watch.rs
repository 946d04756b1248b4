//! What the control loop calls periodically: the host's addresses kept out of every allowlist,
//! guests that ended or became ready on their own.
use super::*;

impl Registry {
    /// Keeps every allowlist clear of the host's own addresses as they change: an endpoint that
    /// has become one is removed from the lists that name it (said in a log line). Call
    /// periodically.
    pub fn check_host_addresses(&mut self) {
        let Ok(host) = sys::local_ipv4_addrs() else { return };
        if host != self.host_addrs {
            // The kernel chose each connected ICMP socket's source address when it connected:
            // let every worker open them again.
            if !self.host_addrs.is_empty() {
                for w in self.vms.values().filter_map(Vm::worker) {
                    w.command(worker::Command::AddressesChanged);
                }
            }
            self.host_addrs.clone_from(&host);
        }
        // Direct-mode VMMs: their namespace rejects this host's addresses as they are now
        // (each compares with what it rejects; nothing to do when they agree).
        for (name, d) in self.vms.iter_mut().filter_map(|(n, vm)| Some((n, vm.direct_mut()?))) {
            d.net.refence(name, &host);
        }
        let hit: Vec<(String, Vec<Endpoint>)> = self
            .vms
            .iter()
            .filter(|(_, vm)| vm.cfg.special == engine::filter::SpecialAddresses::Refuse)
            .filter_map(|(name, vm)| {
                let eps = vm.allow.endpoints();
                let keep: Vec<Endpoint> = eps.iter().copied().filter(|e| !host.contains(&e.ip)).collect();
                (keep.len() < eps.len()).then(|| (name.clone(), keep))
            })
            .collect();
        for (name, keep) in hit {
            engine::error!(
                "vm {name}: an allowed endpoint is now an address of this host; removed from its allowlist (now {} endpoint(s))",
                keep.len()
            );
            if let Err(f) = self.set_list(&name, keep) {
                engine::error!("vm {name}: {}", f.message);
            }
        }
    }

    /// Notices guests that ended on their own (a datagram socketpair gives no sign of that):
    /// their VM becomes `exited` and its worker is stopped. Call periodically.
    pub fn tick(&mut self) {
        let launcher = self.launcher.clone();
        let mut ready = Vec::new();
        for (name, vm) in &mut self.vms {
            let active = vm.worker().is_some() || (vm.direct().is_some() && vm.state == State::Running);
            let Some(g) = vm.guest.as_mut() else { continue };
            if !active {
                continue;
            }
            if g.boot.state == BootState::Booting {
                if g.boot.check(&g.vm) {
                    let took = g.boot.started.elapsed();
                    engine::info!("vm {name}: its guest is ready ({:.1} s after it started)", took.as_secs_f64());
                    g.boot.state = BootState::Ready(took);
                    ready.push(name.clone());
                } else if g.boot.started.elapsed() >= g.boot.timeout {
                    let tail = console_tail(&hv::RunningVm::console(&g.vm), 10);
                    engine::warn!(
                        "vm {name}: its guest was not ready within {} s; stopping it",
                        g.boot.timeout.as_secs()
                    );
                    g.boot.state = BootState::Failed(tail);
                    let _ = hv::RunningVm::kill(&mut g.vm);
                    let why = format!("the guest was not ready within {} s", g.boot.timeout.as_secs());
                    vm.stop_worker();
                    vm.state = State::Failed(why);
                    continue;
                }
            }
            if let Some(status) = hv::RunningVm::try_wait(&mut g.vm) {
                // Its launcher gone, every guest looks ended: the engine stops instead (the
                // control loop), and its records stay for the next one.
                if launcher.as_ref().is_some_and(|l| l.gone()) {
                    break;
                }
                engine::info!("vm {name}: its guest exited ({status}); stopping its network");
                vm.stop_worker();
                vm.state = State::Exited(format!("guest exited ({status})"));
                continue;
            }
            if let Carrier::Direct(d) = &mut vm.net {
                if Instant::now() >= d.next {
                    d.next = Instant::now() + d.interval;
                    d.checks += 1;
                    let conns = g.vm.sockets();
                    if let Err(e) = &conns {
                        // Said once per VM: the check runs every few seconds.
                        if d.checks == 1 {
                            engine::warn!("vm {name}: the rogue detector cannot list the VMM's sockets: {e}");
                        }
                    }
                    if let Ok(conns) = conns {
                        for c in crate::rogue::rogue(&conns, &vm.cfg.consumers) {
                            let line = c.to_string();
                            if !d.rogue.contains(&line) && d.rogue.len() < 64 {
                                engine::warn!("vm {name}: rogue connection from the VMM: {line} (not the consumer)");
                                d.rogue.push(line);
                            }
                        }
                        for c in crate::rogue::blind(&conns) {
                            let line = c.to_string();
                            if !d.blind.contains(&line) && d.blind.len() < 64 {
                                engine::warn!("vm {name}: the detector is blind to the VMM's socket {line}");
                                d.blind.push(line);
                            }
                        }
                    }
                }
            }
        }
        for name in ready {
            self.save_record(&name);
        }
    }
}
