//! The consumer role: the VMs this node rents. It makes the WireGuard interface before the
//! request leaves, checks the provider's answer like anything else from a peer, pins the VM's
//! host key, answers heartbeats, follows its own address. Its leases outlive it: saved with
//! their tunnels' keys (0600), their tunnels made again at the next start; given back only on
//! release or `omertad stop --release`. Its state has a lock of its own.
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::peers::{local_ip_toward, Link};
use super::store::{ActiveVm, KeptTunnel, KnownHosts, LeaseFile};
use super::Options;
use crate::check::{self, Invalid};
use crate::ipc::{Released, RentedView, VmGranted};
use crate::net::{Home, HomeError};
use crate::tunnel::{self, user, Mode, Route, Tunnel, TunnelError, UserTunnel, Way};
use crate::wire::{Message, Requirements, VmRequest};
use crate::RandomError;
use ::engine::filter::private_class;

/// How long a consumer waits for `vm_created`.
const REQUEST_WAIT: Duration = Duration::from_secs(90);

/// Why a request, a release or the SSH key failed (each message one line, as the CLI prints
/// it).
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// Not a peer ID.
    #[error("'{0}' is not a peer ID (16 hex characters)")]
    NotPeerId(String),
    /// A peer this daemon cannot reach.
    #[error("Provider endpoint not available: {0} is not a bootstrap peer of this network and has not been seen (omerta peers lists those known)")]
    UnknownPeer(String),
    /// The provider of a rented VM is not known any more.
    #[error("Provider endpoint not available")]
    ProviderGone,
    /// No answer.
    #[error("No response from provider")]
    NoResponse,
    /// No free tunnel /24.
    #[error("no free tunnel /24 in 10.50-249.x")]
    NoSubnet,
    /// No free port.
    #[error("no free UDP port from 51900 for the tunnel")]
    NoPort,
    /// No route.
    #[error("no route to the provider at {0}")]
    NoRoute(SocketAddrV4),
    /// The provider said no.
    #[error("the provider refused: {0}")]
    Refused(String),
    /// The provider's answer to a release: its error.
    #[error("{0}")]
    ReleaseRefused(String),
    /// Another message than the answer.
    #[error("the provider answered with another message")]
    WrongAnswer,
    /// The answer does not check.
    #[error("the provider's answer was refused: {0}")]
    BadAnswer(String),
    /// No such rented VM.
    #[error("no VM {0} is rented here")]
    NoSuchVm(String),
    /// A rented VM without a tunnel (a dry run, or failed).
    #[error("VM {0} has no tunnel ({1})")]
    NoTunnel(String, String),
    /// The userspace tunnel's socket or thread.
    #[error("the userspace tunnel: {0}")]
    UserTunnel(std::io::Error),
    /// A connection to the VM through it.
    #[error("{0}")]
    Connect(String),
    /// A field (the VM ID asked for, or this node's own SSH key).
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The tunnel.
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    /// A file.
    #[error(transparent)]
    Home(#[from] HomeError),
    /// Keys could not be made.
    #[error("{0}")]
    Keys(control::provision::KeyError),
    /// The SSH key could not be encoded.
    #[error("SSH key: {0}")]
    SshKey(ssh_key::Error),
    /// No randomness.
    #[error(transparent)]
    Random(#[from] RandomError),
}

/// Keepalives after the first on which a moved endpoint is told again.
const TELL_AGAIN: u8 = 3;

/// A VM this node rents.
#[derive(Debug)]
struct Lease {
    vm_id: String,
    provider: String,
    vm_ip: Ipv4Addr,
    consumer_ip: Ipv4Addr,
    port: u16,
    endpoint_ip: Ipv4Addr,
    /// Keepalives on which the provider is told of a moved endpoint again (it acts on a
    /// message from our new address only once we answered its challenge there).
    tell_again: u8,
    fingerprint: String,
    created: u64,
    created_at: Instant,
    dry_run: bool,
    error: Option<String>,
    tunnel: Option<Way>,
    interface: String,
    /// The provider's UDP port for this VM, if it said.
    vm_port: Option<u16>,
    /// Its tunnel proves our endpoint to the provider's engine (no `vm_endpoint_update`).
    proof: bool,
    /// What makes its tunnel again after a restart (none for a dry run).
    kept: Option<KeptTunnel>,
    /// Why its provider says its guest is paused, while it is.
    paused: Option<String>,
}

impl Lease {
    /// Its state as `vm list` and `vm show` print it.
    fn state(&self) -> String {
        match (&self.error, &self.paused) {
            (Some(e), _) => format!("failed: {e}"),
            (None, Some(p)) => format!("paused: {p}"),
            (None, None) => "active".into(),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    leases: HashMap<String, Lease>,
    /// Tunnel /24s and ports chosen for requests still in flight.
    reserved: Vec<(Ipv4Addr, u16)>,
}

/// The consumer role.
#[derive(Debug)]
pub(super) struct Consumer {
    link: Arc<Link>,
    home: Home,
    dry_run: bool,
    /// How tunnels are made (never `Auto`: resolved at start).
    mode: Mode,
    /// Connections through all of this daemon's userspace tunnels.
    streams: user::streams::Shared,
    file: LeaseFile,
    known_hosts: KnownHosts,
    state: Mutex<State>,
}

impl Consumer {
    pub fn new(link: Arc<Link>, home: Home, opts: &Options) -> Self {
        Self {
            file: LeaseFile::new(&home, link.network_id()),
            known_hosts: KnownHosts::new(&home),
            link,
            home,
            dry_run: opts.dry_run,
            mode: opts.tunnel.resolve(),
            streams: Default::default(),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn save(&self) {
        let network = self.link.network_id().to_string();
        self.file.save(|| {
            self.lock()
                .leases
                .values()
                .map(|l| ActiveVm {
                    network: network.clone(),
                    vm_id: l.vm_id.clone(),
                    provider: l.provider.clone(),
                    vm_ip: l.vm_ip.to_string(),
                    interface: l.interface.clone(),
                    created: l.created,
                    dry_run: l.dry_run,
                    kept: l.kept.clone(),
                })
                .collect()
        });
    }

    /// VMs rented.
    pub fn count(&self) -> usize {
        self.lock().leases.len()
    }

    /// The providers of VMs rented here (their peer entries are kept).
    pub fn providers_with_vms(&self) -> HashSet<String> {
        self.lock().leases.values().map(|l| l.provider.clone()).collect()
    }

    /// The VMs rented, by ID.
    pub fn list(&self) -> Vec<RentedView> {
        let rows: Vec<(RentedView, Option<tunnel::Probe>)> = self
            .lock()
            .leases
            .values()
            .map(|l| {
                let view = RentedView {
                    vm_id: l.vm_id.clone(),
                    provider: l.provider.clone(),
                    vm_ip: l.vm_ip.to_string(),
                    interface: l.interface.clone(),
                    created: l.created,
                    dry_run: l.dry_run,
                    ssh_host_fingerprint: l.fingerprint.clone(),
                    state: l.state(),
                    last_handshake: None,
                };
                (view, l.tunnel.as_ref().map(Way::probe))
            })
            .collect();
        // Read with the lock released: an interface's state comes from running `wg`.
        let mut v: Vec<RentedView> = rows
            .into_iter()
            .map(|(mut view, probe)| {
                view.last_handshake = probe.map(|p| p.peer().0);
                view
            })
            .collect();
        v.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
        v
    }

    /// Takes back the leases a daemon before this one left (stopped, killed or crashed), as
    /// `vms/active.json` holds them: each tunnel is made again with its kept keys, port and
    /// addresses (an interface left by a crash is removed first), so the VM's WireGuard
    /// handshakes again and `omerta ssh` works with no command. A lease saved without its
    /// keys (by an older daemon), or whose tunnel cannot be made, loses its tunnel: one line.
    pub fn restore(&self) {
        let mut any = false;
        for a in self.file.load() {
            any = true;
            if tunnel_name_ok(&a.interface) {
                tunnel::remove_interface(&a.interface);
            }
            match self.restored(&a) {
                Ok(lease) => {
                    ::engine::info!(
                        "VM {} from {}: lease kept, tunnel {} made again",
                        a.vm_id,
                        a.provider,
                        lease.tunnel.as_ref().map_or("none (dry run)", Way::kind)
                    );
                    self.lock().leases.insert(a.vm_id.clone(), lease);
                }
                Err(why) => ::engine::warn!(
                    "VM {} from {}: its tunnel cannot be made again ({why}); the lease is dropped",
                    a.vm_id,
                    a.provider
                ),
            }
        }
        if any {
            self.save();
        }
    }

    /// A saved lease as a live one, its tunnel made again.
    fn restored(&self, a: &ActiveVm) -> Result<Lease, String> {
        let vm_ip: Ipv4Addr = a.vm_ip.parse().map_err(|_| format!("bad VM address '{}'", a.vm_ip))?;
        let mut lease = Lease {
            vm_id: a.vm_id.clone(),
            provider: a.provider.clone(),
            vm_ip,
            consumer_ip: Ipv4Addr::UNSPECIFIED,
            port: 0,
            endpoint_ip: Ipv4Addr::UNSPECIFIED,
            tell_again: 0,
            fingerprint: String::new(),
            created: a.created,
            // A heartbeat round's grace, as for a new lease.
            created_at: Instant::now(),
            dry_run: a.dry_run,
            error: None,
            tunnel: None,
            interface: a.interface.clone(),
            vm_port: None,
            proof: false,
            kept: a.kept.clone(),
            paused: None,
        };
        if a.dry_run {
            return Ok(lease);
        }
        let k = a.kept.as_ref().ok_or("saved without its keys, by an older daemon")?;
        (lease.consumer_ip, lease.port, lease.endpoint_ip) = (k.consumer_ip, k.port, k.endpoint_ip);
        lease.fingerprint = k.fingerprint.clone();
        lease.vm_port = k.vm_port;
        let key = api::keys::wg_key_bytes;
        let (Some(private), Some(peer)) = (key(&k.private), key(&k.vm_public)) else {
            return Err("its WireGuard keys do not decode".into());
        };
        match k.kind.as_str() {
            "user" => {
                let proof = match &k.proof {
                    Some(hex) => Some(engine::proof::Key(crate::unhex32(hex).ok_or("its proof key does not decode")?)),
                    None => None,
                };
                lease.proof = proof.is_some();
                // Another port if ours was taken meanwhile: a proof moves the VM's endpoint to
                // it; without proofs the VM keeps dialling the old one.
                let socket = user::bind(k.port).or_else(|_| user::bind(0)).map_err(|e| e.to_string())?;
                lease.port = socket.local_addr().map_err(|e| e.to_string())?.port();
                let spec = user::Spec {
                    name: a.vm_id.clone(),
                    private,
                    peer,
                    me: k.consumer_ip,
                    vm: vm_ip,
                    endpoint: k.vm_endpoint.map(SocketAddr::from),
                    proof,
                    streams: self.streams.clone(),
                };
                lease.tunnel = Some(Way::User(Arc::new(UserTunnel::start(socket, spec).map_err(|e| e.to_string())?)));
            }
            "iface" if tunnel_name_ok(&a.interface) => {
                if self.mode == Mode::Userspace {
                    return Err("its tunnel was an interface and this daemon makes userspace tunnels".into());
                }
                let key_file = self.home.sub("run").map_err(|e| e.to_string())?.join(format!("{}.key", a.interface));
                crate::net::write_private(&key_file, k.private.as_bytes()).map_err(|e| e.to_string())?;
                let (kernel, go) = (self.mode != Mode::WireguardGo, self.mode != Mode::Kernel);
                let made = Tunnel::create(&a.interface, &key_file, k.port, k.consumer_ip, kernel, go);
                let _ = std::fs::remove_file(&key_file);
                let mut t = Way::Iface(made.map_err(|e| e.to_string())?);
                if let Way::Iface(i) = &t {
                    // Where the VM is, when the provider said: this side then starts the new
                    // session itself (the VM's still holds the old one's keys).
                    let peered = i.add_peer(&k.vm_public, vm_ip).and_then(|()| match k.vm_endpoint {
                        Some(ep) => i.set_peer_endpoint(&k.vm_public, ep),
                        None => Ok(()),
                    });
                    if let Err(e) = peered {
                        t.remove();
                        return Err(e.to_string());
                    }
                }
                lease.tunnel = Some(t);
            }
            other => return Err(format!("unknown tunnel kind '{}'", crate::net::printable(other, 20))),
        }
        Ok(lease)
    }

    /// The daemon stops. With `release`, every rented VM is given back (not waiting for the
    /// answer) and its tunnel removed; without, tunnels are removed and the leases kept with
    /// their keys, for the next start to make the tunnels again.
    pub fn shutdown(&self, release: bool) {
        let leases: Vec<Lease> = if release {
            self.lock().leases.drain().map(|(_, l)| l).collect()
        } else {
            // Taken out under the lock, removed without it (an interface's removal runs `ip`).
            let tunnels: Vec<Way> = self.lock().leases.values_mut().filter_map(|l| l.tunnel.take()).collect();
            tunnels.into_iter().for_each(|mut t| t.remove());
            let n = self.count();
            if n > 0 {
                ::engine::info!("{n} lease(s) kept: their tunnels come back at the next start (omertad stop --release gives them back)");
            }
            Vec::new()
        };
        for mut l in leases {
            if let Some(ep) = self.link.peer_endpoint(&l.provider) {
                self.link.send(&l.provider, ep, Message::VmRelease { vm_id: l.vm_id.clone() });
            }
            if let Some(t) = l.tunnel.as_mut() {
                t.remove();
            }
        }
        self.save();
    }

    /// A `vm_error` for a VM rented here: it failed at its provider.
    pub fn vm_failed(&self, from_id: &str, vm_id: &str, error: &str) {
        let tunnel = {
            let mut st = self.lock();
            let Some(l) = st.leases.get_mut(vm_id).filter(|l| l.provider == from_id) else { return };
            l.error = Some(crate::net::printable(error, 200));
            l.tunnel.take()
        };
        ::engine::warn!("VM {vm_id} failed at its provider: {}", crate::net::printable(error, 200));
        if let Some(mut t) = tunnel {
            t.remove();
        }
    }

    /// A `vm_status` from a VM's provider: its guest paused (its host ran out of room) or
    /// running again. From anyone else, or for a VM not rented here, ignored.
    pub fn vm_status(&self, from_id: &str, vm_id: &str, state: crate::wire::RunState, reason: &str) {
        let mut st = self.lock();
        let Some(l) = st.leases.get_mut(vm_id).filter(|l| l.provider == from_id) else { return };
        let now = match state {
            crate::wire::RunState::Paused => Some(crate::net::printable(reason, 200)),
            crate::wire::RunState::Running => None,
        };
        if l.paused == now {
            return;
        }
        l.paused = now;
        match &l.paused {
            Some(why) => ::engine::warn!("VM {vm_id} is paused by its provider: {why}"),
            None => ::engine::info!("VM {vm_id} runs again"),
        }
    }

    /// A provider's heartbeat: the VMs still wanted go back; those it no longer lists go.
    pub fn heartbeat_from_provider(&self, from_id: &str, from: SocketAddrV4, vm_ids: &[String]) {
        let (wanted, dropped) = {
            let mut st = self.lock();
            let wanted: Vec<String> = vm_ids
                .iter()
                .filter(|v| st.leases.get(*v).is_some_and(|l| l.provider == from_id && l.error.is_none()))
                .cloned()
                .collect();
            // Leases of this provider that it no longer lists (a grace period for a lease
            // made while the heartbeat was on its way).
            let stale: Vec<String> = st
                .leases
                .values()
                .filter(|l| {
                    l.provider == from_id
                        && !vm_ids.contains(&l.vm_id)
                        && l.created_at.elapsed() > Duration::from_secs(5)
                })
                .map(|l| l.vm_id.clone())
                .collect();
            let dropped: Vec<Lease> = stale.iter().filter_map(|id| st.leases.remove(id)).collect();
            (wanted, dropped)
        };
        let any = !dropped.is_empty();
        for mut l in dropped {
            ::engine::info!("VM {} is no longer listed by its provider {from_id}: tunnel removed", l.vm_id);
            if let Some(t) = l.tunnel.as_mut() {
                t.remove();
            }
        }
        if any {
            self.save();
        }
        self.link.send(from_id, from, Message::VmHeartbeatResponse { vm_ids: wanted });
    }

    /// Sends `vm_endpoint_update` for each VM whose provider now sees us from elsewhere, on
    /// this keepalive and the next [`TELL_AGAIN`] (the first ones may arrive before we have
    /// answered the provider's challenge of our new address, and are then not acted on).
    pub fn check_endpoints(&self) {
        let leases: Vec<(String, String, Ipv4Addr, u16, u8)> = self
            .lock()
            .leases
            .values()
            .filter(|l| l.error.is_none() && !l.proof)
            .map(|l| (l.vm_id.clone(), l.provider.clone(), l.endpoint_ip, l.port, l.tell_again))
            .collect();
        for (vm_id, provider, old_ip, port, again) in leases {
            let Some(ep) = self.link.peer_endpoint(&provider) else { continue };
            let Some(ip) = local_ip_toward(ep) else { continue };
            if ip == old_ip && again == 0 {
                continue;
            }
            let new = SocketAddrV4::new(ip, port);
            if ip != old_ip {
                ::engine::info!("VM {vm_id}: our endpoint moved from {old_ip} to {new}: telling its provider");
            }
            self.link.send(
                &provider,
                ep,
                Message::VmEndpointUpdate { vm_id: vm_id.clone(), consumer_endpoint: new.to_string() },
            );
            if let Some(l) = self.lock().leases.get_mut(&vm_id) {
                l.tell_again = if ip != old_ip { TELL_AGAIN } else { l.tell_again.saturating_sub(1) };
                l.endpoint_ip = ip;
            }
        }
    }

    /// The consumer's SSH key (`ssh/id_ed25519`), made on first use; its public line.
    pub fn ensure_ssh_key(&self) -> Result<String, ConsumerError> {
        let dir = self.home.sub("ssh")?;
        let private = dir.join("id_ed25519");
        let public = dir.join("id_ed25519.pub");
        if let Ok(text) = std::fs::read_to_string(&public) {
            if private.exists() {
                return Ok(check::ssh_public_key(text.trim())?);
            }
        }
        let pair = ssh_key::private::Ed25519Keypair::from_seed(&crate::random::<32>()?);
        let key = ssh_key::PrivateKey::from(pair);
        let text = key.to_openssh(ssh_key::LineEnding::LF).map_err(ConsumerError::SshKey)?;
        crate::net::write_private(&private, text.as_bytes())?;
        let pub_line = key.public_key().to_openssh().map_err(ConsumerError::SshKey)?;
        crate::net::write_private(&public, format!("{pub_line} omerta\n").as_bytes())?;
        ::engine::info!("made the SSH key {}", private.display());
        Ok(check::ssh_public_key(&pub_line)?)
    }

    /// The endpoint of `peer`, or why not.
    fn reach(&self, peer: &str) -> Result<SocketAddrV4, ConsumerError> {
        if !crate::net::valid_id(peer) {
            return Err(ConsumerError::NotPeerId(crate::net::printable(peer, 40)));
        }
        self.link.peer_endpoint(peer).ok_or_else(|| ConsumerError::UnknownPeer(peer.into()))
    }

    /// Pings `peer`: where the answer came from and the round trip.
    pub fn ping(&self, peer: &str, wait: Duration) -> Result<(SocketAddrV4, Duration), ConsumerError> {
        let ep = self.reach(peer)?;
        let nonce = crate::random_id()?;
        let t0 = Instant::now();
        match self.link.ask(peer, ep, format!("ping:{nonce}"), Message::Ping { nonce }, wait) {
            Some((_, from)) => Ok((from, t0.elapsed())),
            None => Err(ConsumerError::NoResponse),
        }
    }

    /// Asks `peer` for a VM (a dry run if `dry_run` or this daemon is in one).
    pub fn request_vm(
        &self,
        peer: &str,
        requirements: Requirements,
        timeout_minutes: Option<u32>,
        dry_run: bool,
    ) -> Result<VmGranted, ConsumerError> {
        let dry_run = dry_run || self.dry_run;
        let ep = self.reach(peer)?;
        let ssh_key = self.ensure_ssh_key()?;
        // A provider that does not answer a ping (down, unreachable, or on another network
        // key) is told at once, not after the wait for a VM.
        let nonce = crate::random_id()?;
        if self.link.ask(peer, ep, format!("ping:{nonce}"), Message::Ping { nonce }, Duration::from_secs(3)).is_none() {
            return Err(ConsumerError::NoResponse);
        }
        // The /24 and the port are reserved while the request is in flight, so two requests
        // at once never pick the same.
        let seed = crate::random::<2>()?;
        let (consumer_ip, vm_ip, port) = {
            let mut st = self.lock();
            let mut taken: Vec<(Ipv4Addr, u16)> = st.leases.values().map(|l| (l.consumer_ip, l.port)).collect();
            taken.extend(st.reserved.iter().copied());
            let (ips, ports): (Vec<Ipv4Addr>, Vec<u16>) = taken.into_iter().unzip();
            let (c, v) = tunnel::pick_addresses(&ips, seed).ok_or(ConsumerError::NoSubnet)?;
            let port = tunnel::free_port(&ports).ok_or(ConsumerError::NoPort)?;
            st.reserved.push((c, port));
            (c, v, port)
        };
        let ask = Ask { peer, ep, ssh_key, consumer_ip, vm_ip, port, requirements, timeout_minutes, dry_run };
        let r = self.request_vm_with(ask);
        self.lock().reserved.retain(|x| *x != (consumer_ip, port));
        r
    }

    /// Why `vm_id` cannot be a new lease: it is one already (and whose).
    fn leased_elsewhere(&self, vm_id: &str) -> Option<String> {
        crate::lease::claim(self.lock().leases.get(vm_id).map(|l| l.provider.as_str()), vm_id).err()
    }

    fn request_vm_with(&self, a: Ask<'_>) -> Result<VmGranted, ConsumerError> {
        let Ask { peer, ep, ssh_key, consumer_ip, vm_ip, port, requirements, timeout_minutes, dry_run } = a;
        let my_ip = local_ip_toward(ep).ok_or(ConsumerError::NoRoute(ep))?;
        let request_id = crate::random_id()?;
        let interface = format!("wg{}", request_id.get(..8).unwrap_or_default());
        let (wg_private, wg_public) = control::provision::wg_keypair().map_err(ConsumerError::Keys)?;
        let mut tunnel = None;
        let mut socket = None;
        // Behind NAT (our address toward the provider is private, its is not) the provider
        // cannot reach an interface's port, and only a userspace tunnel can prove where it is
        // from its own socket: that rental's tunnel is userspace, whatever the mode.
        let behind_nat = private_class(my_ip).is_some() && private_class(*ep.ip()).is_none();
        let userspace = self.mode == Mode::Userspace || behind_nat;
        if self.mode != Mode::Userspace && behind_nat && !dry_run {
            ::engine::info!(
                "VM request to {peer}: we are behind NAT ({my_ip} is private): a {} tunnel cannot prove its endpoint from its port, so this rental's tunnel is userspace",
                self.mode
            );
        }
        // A userspace tunnel proves its endpoint: the provider learns it after any NAT. A dry
        // run makes no tunnel, so it has nothing to prove from: it names its endpoint.
        let proof = match userspace && !dry_run {
            true => Some(control::provision::ProofSecret::generate().map_err(ConsumerError::Keys)?),
            false => None,
        };
        if !dry_run && userspace {
            socket = Some(user::bind(port).map_err(ConsumerError::UserTunnel)?);
        } else if !dry_run {
            let key_file = self.home.sub("run")?.join(format!("{interface}.key"));
            crate::net::write_private(&key_file, wg_private.as_bytes())?;
            let (kernel, go) = (self.mode != Mode::WireguardGo, self.mode != Mode::Kernel);
            let made = Tunnel::create(&interface, &key_file, port, consumer_ip, kernel, go);
            let _ = std::fs::remove_file(&key_file);
            tunnel = Some(Way::Iface(made?));
        }
        let req = VmRequest {
            request_id: request_id.clone(),
            requirements,
            consumer_public_key: wg_public,
            consumer_endpoint: SocketAddrV4::new(my_ip, port).to_string(),
            consumer_vpn_ip: consumer_ip.to_string(),
            vm_vpn_ip: vm_ip.to_string(),
            ssh_public_key: ssh_key,
            ssh_user: check::SSH_USER.into(),
            timeout_minutes,
            dry_run,
            consumer_proof_key: proof.as_ref().map(|(_, public)| public.clone()),
        };
        let answer =
            self.link.ask(peer, ep, format!("request:{request_id}"), Message::VmRequest(Box::new(req)), REQUEST_WAIT);
        let fail = |mut t: Option<Way>, why: ConsumerError| {
            if let Some(t) = t.as_mut() {
                t.remove();
            }
            Err(why)
        };
        let created = match answer {
            None => return fail(tunnel, ConsumerError::NoResponse),
            Some((Message::VmError { error, .. }, _)) => {
                return fail(tunnel, ConsumerError::Refused(crate::net::printable(&error, 200)))
            }
            Some((Message::VmCreated(c), _)) => c,
            Some(_) => return fail(tunnel, ConsumerError::WrongAnswer),
        };
        // The provider's answer is checked like anything else from a peer.
        let checked = (|| -> Result<(String, String, String), String> {
            let id = check::vm_id(&created.vm_id).map_err(|e| e.to_string())?;
            if created.vm_ip != vm_ip.to_string() {
                return Err(format!(
                    "the provider gave the VM {} instead of the address proposed, {vm_ip}",
                    crate::net::printable(&created.vm_ip, 20)
                ));
            }
            check::wg_key(&created.vm_public_key).map_err(|e| e.to_string())?;
            let host = check::ssh_public_key(&created.ssh_host_key).map_err(|e| e.to_string())?;
            let fp = check::fingerprint(&created.ssh_host_fingerprint).map_err(|e| e.to_string())?;
            let real = ssh_key::PublicKey::from_openssh(&host)
                .map_err(|e| e.to_string())?
                .fingerprint(ssh_key::HashAlg::Sha256)
                .to_string();
            if real != fp {
                return Err("the VM's SSH host key does not match its fingerprint".into());
            }
            Ok((id, host, fp))
        })();
        let (vm_id, host_key, fingerprint) = match checked {
            Ok(x) => x,
            Err(e) => return fail(tunnel, ConsumerError::BadAnswer(e)),
        };
        // A VM ID names one lease: a provider that answers with the ID of a VM this consumer
        // rents (from it or from anyone: every member can read `vm_created`) would take that
        // lease over, its releases and its tunnel.
        if let Some(why) = self.leased_elsewhere(&vm_id) {
            ::engine::warn!("VM request to {peer}: its answer refused: {why}");
            return fail(tunnel, ConsumerError::BadAnswer(why));
        }
        if let Some(Way::Iface(t)) = &tunnel {
            if let Err(e) = t.add_peer(&created.vm_public_key, vm_ip) {
                return fail(tunnel, e.into());
            }
        }
        let mut proved = false;
        // A userspace tunnel's proof key (hex), kept for a restart.
        let mut kept_user: Option<Option<String>> = None;
        if let Some(socket) = socket {
            // The VM dials this socket (its WireGuard peer names our endpoint).
            let key = api::keys::wg_key_bytes;
            let (Some(private), Some(peer)) = (key(&wg_private), key(&created.vm_public_key)) else {
                return fail(tunnel, ConsumerError::BadAnswer("the VM's WireGuard key does not decode".into()));
            };
            // With the engine's half of the proof exchange we dial the VM's port and prove
            // our endpoint there; without (an older provider) the VM dials us.
            let (endpoint, proof) = match (&proof, &created.engine_proof_key, created.vm_port) {
                (Some((ours, _)), Some(theirs), Some(port)) => {
                    match ours.key(theirs, control::provision::ProofSide::Consumer) {
                        Ok(k) => (Some(SocketAddr::from(SocketAddrV4::new(*ep.ip(), port))), Some(k)),
                        Err(e) => return fail(tunnel, ConsumerError::BadAnswer(format!("engineProofKey: {e}"))),
                    }
                }
                // An older provider (no engine half): the VM dials us, which works where we
                // are reachable.
                (_, None, _) if !behind_nat => (None, None),
                // Anything else cannot be used: the VM would start with no endpoint and nobody
                // would tell it one.
                _ => {
                    return fail(
                        tunnel,
                        ConsumerError::BadAnswer(
                            "the provider's answer lacks the engineProofKey and vmPort a consumer behind NAT needs"
                                .into(),
                        ),
                    )
                }
            };
            proved = proof.is_some();
            kept_user = Some(proof.as_ref().map(|k| crate::hex(&k.0)));
            let spec = user::Spec {
                name: vm_id.clone(),
                private,
                peer,
                me: consumer_ip,
                vm: vm_ip,
                endpoint,
                proof,
                streams: self.streams.clone(),
            };
            match UserTunnel::start(socket, spec) {
                Ok(u) => tunnel = Some(Way::User(Arc::new(u))),
                Err(e) => return fail(tunnel, ConsumerError::UserTunnel(e)),
            }
        }
        self.known_hosts.pin(vm_ip, &host_key)?;
        let ssh_dir = self.home.dir.join("ssh");
        let kind = tunnel.as_ref().map_or("none (dry run)", Way::kind);
        // The raw line works where the tunnel is an interface of this host.
        let ssh_command = match &tunnel {
            Some(Way::User(_)) => String::new(),
            _ => format!(
                "ssh -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes -i {} {}@{vm_ip}",
                self.known_hosts.path().display(),
                ssh_dir.join("id_ed25519").display(),
                check::SSH_USER
            ),
        };
        let interface = if matches!(tunnel, Some(Way::User(_))) { String::new() } else { interface };
        ::engine::info!("VM {vm_id} from {peer}: {vm_ip} through {interface} ({kind}), host key {fingerprint}");
        let mut st = self.lock();
        // Checked again under the lock that inserts: two answers at once cannot both pass.
        if let Err(why) = crate::lease::claim(st.leases.get(&vm_id).map(|l| l.provider.as_str()), &vm_id) {
            drop(st);
            ::engine::warn!("VM request to {peer}: its answer refused: {why}");
            if let Some(t) = tunnel.as_mut() {
                t.remove();
            }
            return Err(ConsumerError::BadAnswer(why));
        }
        st.leases.insert(
            vm_id.clone(),
            Lease {
                vm_id: vm_id.clone(),
                provider: peer.into(),
                vm_ip,
                consumer_ip,
                port,
                endpoint_ip: my_ip,
                tell_again: 0,
                fingerprint: fingerprint.clone(),
                created: crate::now_s(),
                created_at: Instant::now(),
                dry_run,
                error: None,
                tunnel,
                interface: interface.clone(),
                vm_port: created.vm_port,
                proof: proved,
                paused: None,
                kept: (!dry_run).then(|| KeptTunnel {
                    kind: if kept_user.is_some() { "user" } else { "iface" }.into(),
                    private: wg_private.to_string(),
                    vm_public: created.vm_public_key.clone(),
                    consumer_ip,
                    port,
                    endpoint_ip: my_ip,
                    vm_port: created.vm_port,
                    vm_endpoint: created.vm_port.map(|p| SocketAddrV4::new(*ep.ip(), p)),
                    proof: kept_user.clone().flatten(),
                    fingerprint: fingerprint.clone(),
                }),
            },
        );
        drop(st);
        self.save();
        Ok(VmGranted {
            omerta_ssh: format!("omerta ssh {vm_id}"),
            vm_id,
            vm_ip: vm_ip.to_string(),
            consumer_ip: consumer_ip.to_string(),
            interface,
            tunnel_kind: kind.to_string(),
            listen_port: port,
            ssh_command,
            ssh_host_fingerprint: fingerprint,
            provider: peer.into(),
            dry_run,
            heartbeat_timeout_minutes: created
                .heartbeat_timeout_s
                .map_or(u64::from(timeout_minutes.unwrap_or(10)), |s| s.div_ceil(60)),
        })
    }

    /// Where a connection to a port of the rented `vm_id` goes.
    pub fn route(&self, vm_id: &str) -> Result<Route, ConsumerError> {
        let vm_id = check::vm_id(vm_id)?;
        let st = self.lock();
        let l = st.leases.get(&vm_id).ok_or_else(|| ConsumerError::NoSuchVm(vm_id.clone()))?;
        match &l.tunnel {
            Some(Way::User(u)) => Ok(Route::User(u.clone())),
            Some(Way::Iface(_)) => Ok(Route::Direct(l.vm_ip)),
            None if l.dry_run => Err(ConsumerError::NoTunnel(vm_id, "a dry run".into())),
            None => Err(ConsumerError::NoTunnel(vm_id, l.error.clone().unwrap_or_else(|| "gone".into()))),
        }
    }

    /// What `omerta vm show` prints of a rented VM: its tunnel, and how to log in.
    pub fn show(&self, vm_id: &str) -> Result<crate::ipc::TunnelView, ConsumerError> {
        use std::sync::atomic::Ordering::Relaxed;
        let vm_id = check::vm_id(vm_id)?;
        let st = self.lock();
        let l = st.leases.get(&vm_id).ok_or_else(|| ConsumerError::NoSuchVm(vm_id.clone()))?;
        let mut v = crate::ipc::TunnelView {
            vm_id: vm_id.clone(),
            provider: l.provider.clone(),
            vm_ip: l.vm_ip.to_string(),
            consumer_ip: l.consumer_ip.to_string(),
            mode: l.tunnel.as_ref().map_or("none", Way::kind).to_string(),
            interface: l.interface.clone(),
            listen_port: l.port,
            vm_port: l.vm_port,
            state: l.state(),
            ssh_user: check::SSH_USER.into(),
            ssh_identity: self.home.dir.join("ssh").join("id_ed25519").display().to_string(),
            known_hosts: self.known_hosts.path().display().to_string(),
            ..Default::default()
        };
        let probe = l.tunnel.as_ref().map(Way::probe);
        drop(st);
        // Read with the lock released: an interface's state comes from running `wg`.
        if let Some(p) = probe {
            (v.latest_handshake, v.rx_bytes, v.tx_bytes, v.endpoint) = p.peer();
            if let tunnel::Probe::User(u) = p {
                let s = u.stats();
                v.streams = Some(s.streams.load(Relaxed));
                v.fenced = s.fence_drops().into_iter().map(|(k, n)| (k.to_string(), n)).collect();
            }
        }
        Ok(v)
    }

    /// Gives a rented VM back: once its provider says so, its tunnel and pinned key go.
    pub fn release(&self, vm_id: &str) -> Result<Released, ConsumerError> {
        let vm_id = check::vm_id(vm_id)?;
        let provider = self
            .lock()
            .leases
            .get(&vm_id)
            .map(|l| l.provider.clone())
            .ok_or_else(|| ConsumerError::NoSuchVm(vm_id.clone()))?;
        let ep = self.link.peer_endpoint(&provider).ok_or(ConsumerError::ProviderGone)?;
        let answer = self.link.ask(
            &provider,
            ep,
            format!("release:{vm_id}"),
            Message::VmRelease { vm_id: vm_id.clone() },
            Duration::from_secs(30),
        );
        match answer {
            Some((Message::VmReleased { .. }, _)) => {
                let lease = self.lock().leases.remove(&vm_id);
                if let Some(ip) = lease.as_ref().map(|l| l.vm_ip) {
                    let _ = self.known_hosts.unpin(ip);
                }
                if let Some(mut t) = lease.and_then(|l| l.tunnel) {
                    t.remove();
                }
                self.save();
                ::engine::info!("VM {vm_id} released");
                Ok(Released { vm_id, released: true })
            }
            Some((Message::VmError { error, .. }, _)) => {
                Err(ConsumerError::ReleaseRefused(crate::net::printable(&error, 200)))
            }
            Some(_) => Err(ConsumerError::WrongAnswer),
            None => Err(ConsumerError::NoResponse),
        }
    }
}

/// A request on its way: the provider, the keys and addresses chosen, what was asked.
struct Ask<'a> {
    peer: &'a str,
    ep: SocketAddrV4,
    ssh_key: String,
    consumer_ip: Ipv4Addr,
    vm_ip: Ipv4Addr,
    port: u16,
    requirements: Requirements,
    timeout_minutes: Option<u32>,
    dry_run: bool,
}

fn tunnel_name_ok(s: &str) -> bool {
    s.len() == 10 && s.starts_with("wg") && s.bytes().skip(2).all(|b| b.is_ascii_hexdigit())
}
