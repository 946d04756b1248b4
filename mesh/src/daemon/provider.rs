//! The provider role: the VMs this node rents out. It checks a request (who, how much, every
//! field's grammar), starts the VM through the engine on a thread of its own, follows its
//! boot, sends heartbeats, reclaims VMs whose consumer went silent, applies endpoint changes.
//! Its rentals outlive it: saved (a start written ahead), adopted by the next daemon, ended
//! only when released, reclaimed, or on `omertad stop --release`. Its state has a lock of its own; engine work a peer
//! asks for waits in a bounded queue, never in the receiver.
use std::collections::{HashMap, HashSet};
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::engine::{Engine, EngineError, ImageVm, StartedVm, VmState};
use super::peers::Link;
use super::store::{Rental, RentalFile, RentalState, ACK_SAVED_EVERY};
use super::{spawn, Options, MAX_STARTING};
use crate::check;
use crate::ipc::ProvidedView;
use crate::net::Home;
use crate::wire::{self, Message, VmCreated, VmRequest};

/// A piece of engine work.
type Job = Box<dyn FnOnce() + Send>;

/// Engine jobs queued at most.
const MAX_JOBS: usize = 64;

#[derive(Debug, Default)]
struct State {
    rentals: HashMap<String, Rental>,
    /// Rentals the engine is being asked to start (saved with the others, listed nowhere).
    starting: HashMap<String, Rental>,
    /// Consumers that rented here since this daemon (or a predecessor that died) started:
    /// heartbeats go to them even when they have nothing left, so that they drop VMs this
    /// provider no longer has.
    consumers: HashSet<String>,
}

/// The provider role.
pub(super) struct Provider {
    link: Arc<Link>,
    opts: Options,
    engine: Engine,
    file: RentalFile,
    state: Mutex<State>,
    starting: AtomicUsize,
    /// Engine work asked for by peers, done on a thread of its own (the receiver never waits
    /// for the engine).
    jobs: mpsc::SyncSender<Job>,
    jobs_rx: Mutex<Option<mpsc::Receiver<Job>>>,
    /// `vm_endpoint_update`s refused: from another peer than the renter, naming another
    /// address than their source, or for a rental whose endpoint its proofs give.
    pub endpoint_updates_refused: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider").field("state", &self.state).field("starting", &self.starting).finish()
    }
}

impl Provider {
    pub fn new(link: Arc<Link>, home: &Home, opts: &Options) -> Self {
        let (jobs, jobs_rx) = mpsc::sync_channel(MAX_JOBS);
        Self {
            file: RentalFile::new(home, link.network_id()),
            link,
            opts: opts.clone(),
            engine: Engine::new(opts.engine_socket.clone()),
            state: Mutex::new(State::default()),
            starting: AtomicUsize::new(0),
            jobs,
            jobs_rx: Mutex::new(Some(jobs_rx)),
            endpoint_updates_refused: Default::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn save(&self) {
        self.file.save(|| {
            let st = self.lock();
            st.rentals.values().chain(st.starting.values()).cloned().collect()
        });
    }

    /// VMs provided.
    pub fn count(&self) -> usize {
        self.lock().rentals.len()
    }

    /// The consumers of VMs here (their peer entries are kept).
    pub fn consumers_with_vms(&self) -> HashSet<String> {
        self.lock().rentals.values().map(|r| r.consumer.clone()).collect()
    }

    /// The VMs provided, by ID.
    pub fn list(&self) -> Vec<ProvidedView> {
        let mut v: Vec<ProvidedView> = self
            .lock()
            .rentals
            .values()
            .map(|r| ProvidedView {
                vm_id: r.vm_id.clone(),
                consumer: r.consumer.clone(),
                vm_ip: r.vm_ip.clone(),
                engine_name: r.engine_name.clone(),
                consumer_endpoint: r.endpoint.clone(),
                state: r.state,
                started: r.started,
                dry_run: r.dry_run,
                cpus: r.cpus,
                memory_mb: r.memory_mb,
            })
            .collect();
        v.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
        v
    }

    /// Runs queued engine work until `stop`; then what was queued before the stop.
    pub fn run_jobs(&self, stop: &AtomicBool) {
        let Some(rx) = self.jobs_rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() else { return };
        while !stop.load(Ordering::SeqCst) {
            if let Ok(job) = rx.recv_timeout(Duration::from_millis(250)) {
                job();
            }
        }
        // What was queued before the stop still runs (releases, endpoint changes).
        while let Ok(job) = rx.try_recv() {
            job();
        }
    }

    /// Queues engine work; `false` (and a log line) when the queue is full.
    fn queue(&self, what: &str, job: Job) -> bool {
        match self.jobs.try_send(job) {
            Ok(()) => true,
            Err(_) => {
                ::engine::warn!("{what}: the engine queue is full ({MAX_JOBS}); not done");
                false
            }
        }
    }

    /// Takes over the rentals a daemon before this one left (stopped, killed or crashed), as
    /// `provider/<network>.json` holds them: a VM the engine still runs is adopted (its
    /// heartbeats resume, its silence counted from the last answer saved); one the engine no
    /// longer has is ended and its consumer told; one still starting is ended (its consumer
    /// never heard of it); with the engine unreachable, kept as it was.
    pub fn adopt(&self) {
        let old = self.file.load();
        let now = crate::now_s();
        for mut r in old {
            if crate::net::valid_id(&r.consumer) {
                self.lock().consumers.insert(r.consumer.clone());
            }
            // Names are the daemon's own (`mesh-<vm id>`): a file edited to name another VM of
            // the engine is not acted on.
            if r.engine_name != format!("mesh-{}", r.vm_id) || !crate::net::valid_id(&r.vm_id) {
                ::engine::warn!(
                    "rental {} names the engine VM '{}', which this daemon never makes: left alone",
                    crate::net::printable(&r.vm_id, 20),
                    crate::net::printable(&r.engine_name, 40)
                );
                continue;
            }
            if r.state == RentalState::Starting {
                // Its consumer never heard of it: the VM, if the engine made it, goes.
                if let Err(e) = self.engine.remove(&r.engine_name) {
                    ::engine::debug!("{}: {e}", r.engine_name);
                }
                ::engine::info!(
                    "rental dropped: VM {} ({}) of peer {} was still starting when the daemon before this one ended",
                    r.vm_id,
                    r.engine_name,
                    r.consumer
                );
                continue;
            }
            if !r.dry_run {
                match self.engine.vm_state(&r.engine_name) {
                    Ok(VmState::Booting | VmState::Starting) => r.state = RentalState::Booting,
                    Ok(VmState::Ready | VmState::Running) => r.state = RentalState::Ready,
                    // Its VMM ended with the host (a reboot), its disk kept: a lease still valid
                    // boots again, one that ran out meanwhile ends (its disk deleted).
                    Ok(VmState::Kept) => {
                        let last = if r.last_ack_s == 0 { now } else { r.last_ack_s };
                        if now.saturating_sub(last) > r.timeout_s {
                            self.end_gone(&r, "its lease ran out while its provider was down");
                            continue;
                        }
                        // A refusal may pass (the launcher not back yet): tried again each
                        // heartbeat round until its timeout.
                        match self.engine.resume(&r.engine_name) {
                            Ok(()) => ::engine::info!("VM {} ({}) boots again from its disk", r.vm_id, r.engine_name),
                            Err(e) => {
                                ::engine::warn!("VM {} ({}) does not boot again yet: {e}", r.vm_id, r.engine_name);
                                r.resume_failing = Some(Instant::now());
                            }
                        }
                        r.state = RentalState::Booting;
                    }
                    Ok(state) => {
                        self.end_gone(&r, &format!("its VM is gone (engine state {state})"));
                        continue;
                    }
                    Err(EngineError::NotFound(e)) => {
                        self.end_gone(&r, &format!("its VM is gone ({e})"));
                        continue;
                    }
                    // The engine may be restarting: kept as it was, followed as any other.
                    Err(e) => ::engine::warn!("VM {}: {e}; its rental is kept as it was", r.vm_id),
                }
            }
            // Its silence counts from the last answer saved, but leaves its consumer at least
            // two heartbeat rounds to answer this daemon's first; `since` gives it a round's
            // grace before an answer that leaves it out ends it.
            let last = if r.last_ack_s == 0 { now } else { r.last_ack_s };
            let rounds = 2 * self.opts.heartbeat.as_secs() + 5;
            let silent = Duration::from_secs(now.saturating_sub(last).min(r.timeout_s.saturating_sub(rounds)));
            r.last_ack = Some(Instant::now().checked_sub(silent).unwrap_or_else(Instant::now));
            r.since = Some(Instant::now());
            ::engine::info!(
                "rental adopted: VM {} ({}) of peer {}, {}, silent for {} s of {} s",
                r.vm_id,
                r.engine_name,
                r.consumer,
                r.state,
                silent.as_secs(),
                r.timeout_s
            );
            self.lock().rentals.insert(r.vm_id.clone(), r);
        }
        self.save();
    }

    /// A rental whose VM the engine no longer runs: ended (what the engine still holds of it,
    /// its disk above all, removed), its consumer told (if this daemon knows where it is;
    /// else the next heartbeat, which leaves the VM out, tells it).
    fn end_gone(&self, r: &Rental, why: &str) {
        self.end_rental(r, why);
        self.tell_consumer(r, why);
    }

    /// The daemon stops: with `release`, every VM it provides is stopped and its consumer
    /// told; without, rentals are saved as they are and their VMs keep running for the next
    /// daemon to adopt.
    pub fn shutdown(&self, release: bool) {
        if !release {
            let n = self.count();
            self.save();
            if n > 0 {
                ::engine::info!("{n} rental(s) kept running for the next start (omertad stop --release ends them)");
            }
            return;
        }
        let rentals: Vec<Rental> = self.lock().rentals.drain().map(|(_, r)| r).collect();
        for r in rentals {
            self.end_rental(&r, "the provider released its rentals");
            self.tell_consumer(&r, "the provider released its rentals");
        }
        self.save();
    }

    fn refuse(&self, from_id: &str, from: SocketAddrV4, request_id: &str, why: String) {
        ::engine::warn!("vm_request from {from_id} refused: {why}");
        self.link.send(
            from_id,
            from,
            Message::VmError { request_id: Some(request_id.into()), vm_id: None, error: why },
        );
    }

    /// A `vm_request`: checked, then started on a thread of its own.
    pub fn provide(self: &Arc<Self>, from_id: String, from: SocketAddrV4, req: VmRequest) {
        if !crate::net::valid_id(&req.request_id) {
            return self.link.dropped(&wire::Drop::Malformed("a request ID".into()), from, 0);
        }
        if let Err(why) = self.policy(&from_id, from, &req) {
            return self.refuse(&from_id, from, &req.request_id, why);
        }
        if self.starting.fetch_add(1, Ordering::SeqCst) >= MAX_STARTING {
            self.starting.fetch_sub(1, Ordering::SeqCst);
            return self.refuse(
                &from_id,
                from,
                &req.request_id,
                "the provider is busy starting other VMs; try again".into(),
            );
        }
        let (p, asker, request_id) = (self.clone(), from_id.clone(), req.request_id.clone());
        let spawned = spawn("mesh-start", move || {
            let answer = p.start_vm(&from_id, &req);
            p.starting.fetch_sub(1, Ordering::SeqCst);
            match answer {
                Ok(created) => p.link.send(&from_id, from, Message::VmCreated(Box::new(created))),
                Err(why) => p.refuse(&from_id, from, &req.request_id, why),
            }
        });
        if let Err(e) = spawned {
            self.starting.fetch_sub(1, Ordering::SeqCst);
            self.refuse(&asker, from, &request_id, format!("the provider cannot start a thread ({e}); try again"));
        }
    }

    /// Who may rent, how much, and every field's grammar.
    fn policy(&self, from_id: &str, from: SocketAddrV4, req: &VmRequest) -> Result<(), String> {
        if !self.opts.provider {
            return Err("this node does not provide VMs".into());
        }
        if !self.opts.allow_peers.is_empty() && !self.opts.allow_peers.iter().any(|p| p == from_id) {
            return Err(format!("peer {from_id} may not rent from this provider"));
        }
        if req.timeout_minutes == Some(0) {
            return Err("timeoutMinutes is at least 1".into());
        }
        if req.dry_run && !self.opts.dry_run {
            return Err("this provider is not in dry run: ask without --dry-run".into());
        }
        check::ssh_user(&req.ssh_user).map_err(|e| e.to_string())?;
        check::ssh_public_key(&req.ssh_public_key).map_err(|e| e.to_string())?;
        check::wg_key(&req.consumer_public_key).map_err(|e| e.to_string())?;
        let ep = check::endpoint(&req.consumer_endpoint).map_err(|e| e.to_string())?;
        if let Some(k) = &req.consumer_proof_key {
            // Behind NAT the endpoint named is a private one: the engine learns the real one
            // from the consumer's proofs, so the request's is never an allowlist entry.
            check::wg_key(k).map_err(|e| format!("consumerProofKey: {e}"))?;
        } else {
            if ep.ip().is_loopback() || ep.ip().is_link_local() {
                return Err(format!("the consumer endpoint {ep} is not an address a VM may be sent to"));
            }
            if ep.ip() != from.ip() {
                return Err(format!(
                    "the consumer endpoint {ep} is not the request's source address {} (a consumer behind NAT sends a consumerProofKey)",
                    from.ip()
                ));
            }
        }
        check::tunnel_pair(&req.consumer_vpn_ip, &req.vm_vpn_ip).map_err(|e| e.to_string())?;
        let r = &req.requirements;
        if r.cpu_architecture != wire::Arch::X86_64 || r.gpu {
            return Err("this provider offers x86_64 VMs without GPUs only".into());
        }
        if r.cpu_cores == 0 || r.cpu_cores > self.opts.max_cpus {
            return Err(format!("{} vCPUs asked; this provider gives 1 to {}", r.cpu_cores, self.opts.max_cpus));
        }
        if !(256..=self.opts.max_memory_mb).contains(&r.memory_mb) {
            return Err(format!(
                "{} MB of memory asked; this provider gives 256 to {}",
                r.memory_mb, self.opts.max_memory_mb
            ));
        }
        if r.storage_mb > self.opts.max_disk_mb {
            return Err(format!(
                "{} MB of disk asked; this provider gives up to {}",
                r.storage_mb, self.opts.max_disk_mb
            ));
        }
        let st = self.lock();
        if st.rentals.len() + self.starting.load(Ordering::SeqCst) >= self.opts.max_vms {
            return Err(format!("the provider runs its limit of {} VMs", self.opts.max_vms));
        }
        if st.rentals.values().any(|x| x.vm_ip == req.vm_vpn_ip && x.consumer == from_id) {
            return Err(format!("{} is the address of another of your VMs here", req.vm_vpn_ip));
        }
        Ok(())
    }

    fn start_vm(&self, from_id: &str, req: &VmRequest) -> Result<VmCreated, String> {
        let vm_id = crate::random_id().map_err(|e| e.to_string())?;
        let engine_name = format!("mesh-{vm_id}");
        let (consumer_ip, vm_ip) =
            check::tunnel_pair(&req.consumer_vpn_ip, &req.vm_vpn_ip).map_err(|e| e.to_string())?;
        let endpoint = check::endpoint(&req.consumer_endpoint).map_err(|e| e.to_string())?;
        let ssh_key = check::ssh_public_key(&req.ssh_public_key).map_err(|e| e.to_string())?;
        let dry_run = self.opts.dry_run;
        let timeout_s = req
            .timeout_minutes
            .map_or(self.opts.heartbeat_timeout.as_secs(), |m| {
                (u64::from(m.max(1)) * 60).min(self.opts.heartbeat_timeout.as_secs())
            })
            // Never shorter than two heartbeat rounds: one late answer is not a dead consumer.
            .max(2 * self.opts.heartbeat.as_secs() + 5);
        let mut rental = Rental {
            vm_id: vm_id.clone(),
            engine_name: engine_name.clone(),
            consumer: from_id.into(),
            // A proof rental's endpoint is the engine's to learn: the request's is not shown.
            endpoint: if req.consumer_proof_key.is_some() {
                "learned from proofs".into()
            } else {
                endpoint.to_string()
            },
            vm_ip: vm_ip.to_string(),
            cpus: req.requirements.cpu_cores,
            memory_mb: req.requirements.memory_mb,
            disk_mb: req.requirements.storage_mb,
            started: crate::now_s(),
            dry_run,
            state: RentalState::Starting,
            last_ack: Some(Instant::now()),
            since: Some(Instant::now()),
            last_update: None,
            paused: None,
            resume_failing: None,
            timeout_s,
            last_ack_s: crate::now_s(),
            port: None,
            proof: req.consumer_proof_key.is_some(),
        };
        // Written ahead: a daemon that dies while the engine starts the VM leaves a rental its
        // successor finds (and ends: its consumer never heard of it), never a VM nobody knows.
        if !dry_run {
            self.lock().starting.insert(vm_id.clone(), rental.clone());
            self.save();
        }
        let started = self.start_engine_vm(req, &rental, endpoint, &ssh_key, consumer_ip, vm_ip);
        let (vm_public_key, host_key, fingerprint, port, engine_proof_key) = match started {
            Ok(s) => s,
            Err(e) => {
                // An error after the engine made it (a timeout, a lost answer) must not leave a
                // VM nobody knows: removed (a VM never made is "not found", and nothing more).
                if !dry_run {
                    let _ = self.engine.remove(&engine_name);
                }
                self.lock().starting.remove(&vm_id);
                self.save();
                return Err(e);
            }
        };
        rental.port = port;
        rental.state = if dry_run { RentalState::Ready } else { RentalState::Booting };
        ::engine::info!(
            "rental start: VM {vm_id} ({engine_name}) for peer {from_id} at {}, image {}, {} vCPU, {} MB memory, {} MB disk, tunnel {vm_ip}{}",
            if rental.proof { "the endpoint its proofs name" } else { &rental.endpoint },
            self.opts.image,
            rental.cpus,
            rental.memory_mb,
            rental.disk_mb,
            if dry_run { " (dry run)" } else { "" }
        );
        {
            // From starting to started under one lock: no save in between misses it.
            let mut st = self.lock();
            st.starting.remove(&vm_id);
            st.consumers.insert(from_id.to_string());
            st.rentals.insert(vm_id.clone(), rental);
        }
        self.save();
        Ok(VmCreated {
            request_id: req.request_id.clone(),
            vm_id,
            vm_ip: vm_ip.to_string(),
            vm_public_key,
            ssh_host_key: host_key.split(' ').take(2).collect::<Vec<_>>().join(" "),
            ssh_host_fingerprint: fingerprint,
            heartbeat_timeout_s: Some(timeout_s),
            vm_port: port,
            engine_proof_key,
        })
    }

    /// Starts the VM of `rental` at the engine (a dry run: makes keys of the same kind and
    /// throws them away): its WireGuard public key, SSH host key and fingerprint, port and
    /// proof key.
    #[allow(clippy::type_complexity)]
    fn start_engine_vm(
        &self,
        req: &VmRequest,
        rental: &Rental,
        endpoint: SocketAddrV4,
        ssh_key: &str,
        consumer_ip: std::net::Ipv4Addr,
        vm_ip: std::net::Ipv4Addr,
    ) -> Result<(String, String, String, Option<u16>, Option<String>), String> {
        if rental.dry_run {
            let k = control::provision::generate().map_err(|e| e.to_string())?;
            let proof = match req.consumer_proof_key {
                Some(_) => Some(control::provision::ProofSecret::generate().map_err(|e| e.to_string())?.1),
                None => None,
            };
            return Ok((k.wg_public, k.host_public, k.host_fingerprint, None, proof));
        }
        let vm = ImageVm {
            name: &rental.engine_name,
            image: &self.opts.image,
            consumer: endpoint,
            consumer_key: &req.consumer_public_key,
            proof_key: req.consumer_proof_key.as_deref(),
            ssh_key,
            vm_ip,
            consumer_ip,
            cpus: req.requirements.cpu_cores,
            memory_mib: req.requirements.memory_mb,
            boot_timeout_s: self.opts.boot_timeout_s,
            port: None,
            // The disk granted: its file system grows to it, and it takes no more.
            disk_mb: Some(req.requirements.storage_mb).filter(|mb| *mb > 0),
        };
        let started = self.start_in_range(vm)?;
        if req.consumer_proof_key.is_some() && (started.proof_key.is_none() || started.port.is_none()) {
            let _ = self.engine.remove(&rental.engine_name);
            return Err("the engine gave no proof key or port for a request behind NAT".into());
        }
        Ok((
            started.wireguard_public_key,
            started.ssh_host_key,
            started.ssh_host_fingerprint,
            started.port,
            started.proof_key,
        ))
    }

    /// Starts `vm` on a port of `--port-range` no rental of ours holds (the next one when
    /// another program holds it: the engine refuses a port in use), or on any port without a
    /// range.
    fn start_in_range(&self, mut vm: ImageVm<'_>) -> Result<StartedVm, String> {
        let Some(range) = self.opts.port_range.clone() else {
            return self.engine.start_image(&vm).map_err(|e| e.to_string());
        };
        let ours: Vec<u16> = self.lock().rentals.values().filter_map(|r| r.port).collect();
        let mut tried = 0;
        for port in range.clone().filter(|p| !ours.contains(p)) {
            vm.port = Some(port);
            match self.engine.start_image(&vm) {
                Err(e) if e.to_string().contains("in use") && tried < 32 => tried += 1,
                r => return r.map_err(|e| e.to_string()),
            }
        }
        Err(format!("no free UDP port in this provider's range {}-{}", range.start(), range.end()))
    }

    fn end_rental(&self, r: &Rental, why: &str) {
        if !r.dry_run {
            if let Err(e) = self.engine.remove(&r.engine_name) {
                ::engine::warn!("removing {}: {e}", r.engine_name);
            }
        }
        let secs = crate::now_s().saturating_sub(r.started);
        ::engine::info!("rental end: VM {} ({}) of peer {} after {secs} s: {why}", r.vm_id, r.engine_name, r.consumer);
    }

    /// Tells a VM's consumer that the provider ended it (best effort: it may be gone).
    fn tell_consumer(&self, r: &Rental, why: &str) {
        if let Some(ep) = self.link.peer_endpoint(&r.consumer) {
            let msg = Message::VmError { request_id: None, vm_id: Some(r.vm_id.clone()), error: why.into() };
            self.link.send(&r.consumer, ep, msg);
        }
    }

    /// A `vm_release` from `from_id`.
    pub fn release(self: &Arc<Self>, from_id: &str, from: SocketAddrV4, vm_id: &str) {
        let owner = self.lock().rentals.get(vm_id).map(|r| r.consumer.clone());
        match owner {
            None => self.link.send(from_id, from, Message::VmReleased { vm_id: vm_id.into() }),
            Some(o) if o != from_id => self.link.send(
                from_id,
                from,
                Message::VmError {
                    request_id: None,
                    vm_id: Some(vm_id.into()),
                    error: "Not authorized to release this VM".into(),
                },
            ),
            Some(_) => {
                let Some(r) = self.lock().rentals.remove(vm_id) else { return };
                let keep = r.clone();
                let (p, to, id) = (self.clone(), from_id.to_string(), vm_id.to_string());
                let queued = self.queue(
                    "a release",
                    Box::new(move || {
                        p.end_rental(&r, "released by its consumer");
                        p.save();
                        p.link.send(&to, from, Message::VmReleased { vm_id: id });
                    }),
                );
                if !queued {
                    // Not done: it stays, and the consumer may ask again.
                    self.lock().rentals.insert(keep.vm_id.clone(), keep);
                    let error = "the provider is busy; release again in a moment".to_string();
                    let msg = Message::VmError { request_id: None, vm_id: Some(vm_id.into()), error };
                    self.link.send(from_id, from, msg);
                }
            }
        }
    }

    /// Lists each consumer's VMs to it, then follows the VMs at the engine.
    pub fn send_heartbeats(&self) {
        let mut by_consumer: HashMap<String, Vec<String>> = HashMap::new();
        {
            let st = self.lock();
            for c in &st.consumers {
                by_consumer.insert(c.clone(), Vec::new());
            }
            for r in st.rentals.values() {
                by_consumer.entry(r.consumer.clone()).or_default().push(r.vm_id.clone());
            }
        }
        for (consumer, mut vm_ids) in by_consumer {
            vm_ids.sort();
            if let Some(ep) = self.link.peer_endpoint(&consumer) {
                self.link.send(&consumer, ep, Message::VmHeartbeat { vm_ids, timestamp: crate::now_s() });
            }
        }
        self.refresh_boot_states();
    }

    /// Follows every VM at the engine: a booting one that became ready is marked so; one that
    /// failed to boot, or that the engine no longer runs (it ended, or the engine restarted
    /// without it), is removed and its consumer told why. An engine that does not answer
    /// changes nothing.
    fn refresh_boot_states(&self) {
        let rentals: Vec<(String, String, RentalState)> = self
            .lock()
            .rentals
            .values()
            .filter(|r| !r.dry_run)
            .map(|r| (r.vm_id.clone(), r.engine_name.clone(), r.state))
            .collect();
        for (vm_id, name, was) in rentals {
            let why = match self.engine.vm_status(&name) {
                Ok((VmState::Booting | VmState::Starting, paused)) => {
                    self.follow_pause(&vm_id, paused);
                    continue;
                }
                Ok((VmState::Ready | VmState::Running, paused)) => {
                    if was == RentalState::Booting {
                        if let Some(r) = self.lock().rentals.get_mut(&vm_id) {
                            r.state = RentalState::Ready;
                            ::engine::info!("VM {vm_id} ({name}) is ready");
                        }
                    }
                    self.follow_pause(&vm_id, paused);
                    continue;
                }
                // Its launcher restarted under this daemon: its lease is live, it boots again.
                Ok((VmState::Kept, _)) => match self.engine.resume(&name) {
                    Ok(()) => {
                        ::engine::info!("VM {vm_id} ({name}) boots again from its disk");
                        if let Some(r) = self.lock().rentals.get_mut(&vm_id) {
                            r.state = RentalState::Booting;
                            r.resume_failing = None;
                        }
                        continue;
                    }
                    Err(e) => {
                        let mut st = self.lock();
                        let Some(r) = st.rentals.get_mut(&vm_id) else { continue };
                        let since = *r.resume_failing.get_or_insert_with(Instant::now);
                        if since.elapsed() < Duration::from_secs(r.timeout_s) {
                            ::engine::warn!("VM {vm_id} ({name}) does not boot again yet: {e}");
                            continue;
                        }
                        format!("the VM could not boot again ({e})")
                    }
                },
                Ok((state, _)) if was == RentalState::Booting => format!("the VM did not boot (engine state {state})"),
                Ok((state, _)) => format!("the VM ended (engine state {state})"),
                // Only an engine that says it has no such VM ends a rental: busy, refused or
                // unreachable changes nothing.
                Err(EngineError::NotFound(e)) => format!("the VM is gone ({e})"),
                Err(_) => continue,
            };
            let Some(r) = self.lock().rentals.remove(&vm_id) else { continue };
            self.end_rental(&r, &why);
            self.save();
            if let Some(ep) = self.link.peer_endpoint(&r.consumer) {
                let msg = Message::VmError { request_id: None, vm_id: Some(vm_id), error: why };
                self.link.send(&r.consumer, ep, msg);
            }
        }
    }

    /// A rental's guest paused by its host (out of room) or running again, as the engine
    /// says: a change is logged and its consumer told (`vm_status`).
    fn follow_pause(&self, vm_id: &str, paused: Option<String>) {
        let consumer = {
            let mut st = self.lock();
            let Some(r) = st.rentals.get_mut(vm_id).filter(|r| r.paused != paused) else { return };
            r.paused = paused.clone();
            r.consumer.clone()
        };
        let (state, reason) = match paused {
            Some(why) => {
                ::engine::warn!("VM {vm_id} is paused: {why}; its consumer is told");
                (wire::RunState::Paused, why)
            }
            None => {
                ::engine::info!("VM {vm_id} runs again; its consumer is told");
                (wire::RunState::Running, String::new())
            }
        };
        if let Some(ep) = self.link.peer_endpoint(&consumer) {
            self.link.send(&consumer, ep, Message::VmStatus { vm_id: vm_id.into(), state, reason });
        }
    }

    /// A consumer's `vm_heartbeat_response`: the VMs it still wants; the others go.
    pub fn heartbeat_answer(self: &Arc<Self>, from_id: &str, vm_ids: &[String]) {
        // A VM made after the heartbeat left may be missing from its answer: it is judged by
        // the next one.
        let grace = self.opts.heartbeat + Duration::from_secs(5);
        let mut ack_moved = false;
        let gone: Vec<Rental> = {
            let mut st = self.lock();
            let mut gone = Vec::new();
            let mine: Vec<String> =
                st.rentals.values().filter(|r| r.consumer == from_id).map(|r| r.vm_id.clone()).collect();
            if mine.is_empty() {
                // It heard that it has nothing here: no more heartbeats until it rents again.
                st.consumers.remove(from_id);
            }
            let now_s = crate::now_s();
            for id in mine {
                let young = st.rentals.get(&id).and_then(|r| r.since).is_some_and(|t| t.elapsed() < grace);
                if vm_ids.contains(&id) {
                    if let Some(r) = st.rentals.get_mut(&id) {
                        r.last_ack = Some(Instant::now());
                        if now_s.saturating_sub(r.last_ack_s) >= ACK_SAVED_EVERY {
                            r.last_ack_s = now_s;
                            ack_moved = true;
                        }
                    }
                } else if !young {
                    if let Some(r) = st.rentals.remove(&id) {
                        gone.push(r);
                    }
                }
            }
            gone
        };
        if gone.is_empty() {
            if ack_moved {
                self.save();
            }
            return;
        }
        let p = self.clone();
        let keep = gone.clone();
        let queued = self.queue(
            "ending VMs a heartbeat answer left out",
            Box::new(move || {
                for r in &gone {
                    p.end_rental(r, "its consumer no longer wants it (heartbeat answer)");
                }
                p.save();
            }),
        );
        if !queued {
            let mut st = self.lock();
            for r in keep {
                st.rentals.insert(r.vm_id.clone(), r);
            }
        }
    }

    /// Reclaims the VMs whose consumer answered no heartbeat for their timeout.
    pub fn reclaim_silent(&self) {
        let gone: Vec<Rental> = {
            let mut st = self.lock();
            let silent: Vec<String> = st
                .rentals
                .values()
                .filter(|r| r.last_ack.is_some_and(|t| t.elapsed() > Duration::from_secs(r.timeout_s)))
                .map(|r| r.vm_id.clone())
                .collect();
            silent.iter().filter_map(|id| st.rentals.remove(id)).collect()
        };
        for r in &gone {
            let why = format!("reclaimed: its consumer answered no heartbeat for {} s", r.timeout_s);
            self.end_rental(r, &why);
            self.tell_consumer(r, &why);
        }
        if !gone.is_empty() {
            self.save();
        }
    }

    /// The rental a `vm_endpoint_update` from `from_id` at `from` is for, and the endpoint it
    /// names; or why it is refused.
    fn updatable(
        &self,
        from_id: &str,
        from: SocketAddrV4,
        vm_id: &str,
        endpoint: &str,
    ) -> Result<(Rental, SocketAddrV4), String> {
        let rental = self.lock().rentals.get(vm_id).cloned();
        let r = rental.filter(|r| r.consumer == from_id).ok_or("it names a VM it does not rent here")?;
        let ep = check::endpoint(endpoint).map_err(|e| e.to_string())?;
        if ep.ip() != from.ip() {
            return Err(format!("{ep} is not its source address {}", from.ip()));
        }
        if r.proof {
            return Err(format!("VM {vm_id}'s endpoint is learned from its proofs"));
        }
        Ok((r, ep))
    }

    /// A `vm_endpoint_update`: from the VM's renter, its new IP the datagram's source.
    pub fn endpoint_update(self: &Arc<Self>, from_id: &str, from: SocketAddrV4, vm_id: &str, endpoint: &str) {
        let (r, ep) = match self.updatable(from_id, from, vm_id, endpoint) {
            Ok(x) => x,
            Err(why) => {
                self.endpoint_updates_refused.fetch_add(1, Ordering::Relaxed);
                return ::engine::warn!("vm_endpoint_update from {from_id} refused: {why}");
            }
        };
        if r.endpoint == ep.to_string() {
            return;
        }
        if r.last_update.is_some_and(|t| t.elapsed() < Duration::from_secs(5)) {
            return ::engine::warn!("VM {vm_id}: endpoint changes come too fast; {ep} ignored");
        }
        if let Some(x) = self.lock().rentals.get_mut(vm_id) {
            x.last_update = Some(Instant::now());
        }
        let (p, vm_id) = (self.clone(), vm_id.to_string());
        self.queue(
            "an endpoint change",
            Box::new(move || {
                if !r.dry_run {
                    if let Err(e) = p.engine.allow_set(&r.engine_name, ep) {
                        return ::engine::warn!("VM {vm_id}: the new endpoint {ep} could not be applied: {e}");
                    }
                }
                if let Some(x) = p.lock().rentals.get_mut(&vm_id) {
                    x.endpoint = ep.to_string();
                }
                ::engine::info!("VM {vm_id}: consumer endpoint now {ep}");
                p.save();
            }),
        );
    }
}
