//! Guests the engine starts itself: `vm start` with a kernel and initrd, a cloud image for one
//! consumer, direct mode; the files they take (checked against the image directories and the
//! client's rights) and their start through the launcher.
use super::*;

/// The guest's WireGuard port, and the consumer alias's port on its link.
pub(super) const GUEST_WG_PORT: u16 = 51820;

/// A guest the engine started itself (`vm start`), with what it takes to start it again.
pub(super) struct Guest {
    pub(super) vm: crate::launcher::RemoteVm,
    pub(super) kernel: String,
    pub(super) initrd: String,
    pub(super) memory_mib: u32,
    pub(super) cpus: u32,
    pub(super) firewall: bool,
    /// A cloud image's provisioning (its keys stay the same across restarts).
    pub(super) cloud: Option<Cloud>,
    pub(super) console: std::path::PathBuf,
    /// Its VMM's place in the uid range (`--vmm-uid-base`), if one is set.
    pub(super) uid_slot: Option<u32>,
    /// Whether it has said it is ready.
    pub(super) boot: Boot,
    /// The request that started it (its record's).
    pub(super) request: Start,
}

/// A cloud image VM: the request, the image directory, the seed and the public keys.
#[derive(Clone)]
pub(super) struct Cloud {
    pub(super) request: api::ImageStart,
    /// The image directory (canonical).
    pub(super) image: String,
    /// The seed, with the guest's private keys, kept for `vm restart` (none for a guest
    /// restored after an engine restart: only the launcher keeps its seed then).
    pub(super) seed: Option<hv::cloud::Seed>,
    /// The public halves of its keys, and the engine's endpoint-proof public key.
    pub(super) keys: PublicKeys,
}

/// The files of an image directory, as `make image` builds it.
pub(super) const IMAGE_FILES: [&str; 3] = ["disk.raw", "vmlinuz", "initrd.img"];

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest").field("pid", &hv::RunningVm::pid(&self.vm)).field("kernel", &self.kernel).finish()
    }
}

/// The guest settings `vm start` was given, kept for `vm restart`.
pub(super) struct GuestArgs {
    pub(super) kernel: String,
    pub(super) initrd: String,
    pub(super) memory_mib: u32,
    pub(super) cpus: u32,
    pub(super) firewall: bool,
    pub(super) boot_timeout: Duration,
    pub(super) cloud: Option<Cloud>,
    pub(super) request: Start,
}

impl Registry {
    /// The file a `kernel=`/`initrd=` value names, if it lies in an image directory: a file
    /// name is looked up in the first directory, an absolute path must resolve (symlinks
    /// followed) inside one; any other relative path is refused (the engine's directory means
    /// nothing to its client; omertactl sends such paths made absolute).
    pub(super) fn image(&self, value: &str) -> Result<String, Failure> {
        let Some(first) = self.image_dirs.first() else {
            return Err(refused(
                "vm start takes kernels and initrds from --image-dir directories only, and this engine has none",
            ));
        };
        let p = std::path::Path::new(value);
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else if p.components().count() == 1 {
            first.join(p)
        } else {
            return Err(refused(format!(
                "{value}: a relative path; give an absolute path or a file name in {}",
                first.display()
            )));
        };
        let real = p.canonicalize().map_err(|e| refused(format!("{}: {e}", p.display())))?;
        if !self.image_dirs.iter().any(|d| real.starts_with(d)) {
            return Err(refused(format!("{value} is not in an image directory (--image-dir)")));
        }
        Ok(real.to_string_lossy().into_owned())
    }
}

/// Opens `path` to read for a client (uid, gid): refused unless it is a regular file that user
/// could read by its mode (root and the engine's own requests are not checked). The launcher
/// gets the open file; the VMM reads it as `/proc/self/fd/N`, as its own user.
pub(super) fn open_for(
    path: &str,
    client: Option<(u32, u32)>,
    vmm: Option<&hv::VmmUser>,
) -> Result<std::fs::File, Failure> {
    use std::os::unix::fs::MetadataExt;
    let f = std::fs::File::open(path).map_err(|e| refused(format!("{path}: {e}")))?;
    let m = f.metadata().map_err(|e| refused(format!("{path}: {e}")))?;
    if !m.is_file() {
        return Err(refused(format!("{path} is not a regular file")));
    }
    if let Some((uid, gid)) = client.filter(|(uid, _)| *uid != 0 && *uid != sys::effective_ids().0) {
        let mode = m.mode();
        let readable =
            (m.uid() == uid && mode & 0o400 != 0) || (m.gid() == gid && mode & 0o040 != 0) || mode & 0o004 != 0;
        if !readable {
            return Err(refused(format!("{path} is not readable by uid {uid}, who asked for it")));
        }
    }
    // The VMM opens it again (by /proc/self/fd) as its own user.
    if let Some(u) = vmm.filter(|u| !u.can_read(&m)) {
        return Err(refused(format!(
            "{path} is not readable by the VMM's user {} (uid {}); make it readable by that user or choose another with --vmm-user",
            u.name, u.uid
        )));
    }
    Ok(f)
}

impl Registry {
    /// Starts a guest for `cfg` (whose handle is the engine's end of a fresh socketpair).
    pub(super) fn start_guest(
        &mut self,
        name: &str,
        nic: crate::launcher::Nic,
        g: GuestArgs,
    ) -> Result<Guest, Failure> {
        let launcher = self.launcher.clone().ok_or_else(|| refused("this engine starts no guests (no launcher)"))?;
        // Opened here, as the engine, but only if the client may read them (a control-group
        // member must not make a root VMM read a root-only file); QEMU gets the open files,
        // so nothing can be swapped in between the check and its use.
        // With a uid range, each guest's VMM gets a uid (and gid) of its own: the lowest no
        // other guest of this engine holds.
        let uid_slot = self.vmm_uid_base.map(|_| {
            // A kept guest's slot is its own still: it boots again with it.
            let taken: Vec<u32> = self
                .vms
                .values()
                .filter_map(|v| {
                    v.guest.as_ref().map(|g| g.uid_slot).unwrap_or(v.kept.as_ref().and_then(|k| k.record.uid_slot))
                })
                .collect();
            (0..).find(|k| !taken.contains(k)).unwrap_or(0)
        });
        let user = self.slot_user(uid_slot);
        let kernel = open_for(&self.image(&g.kernel)?, self.client, user.as_ref())?;
        let initrd = open_for(&self.image(&g.initrd)?, self.client, user.as_ref())?;
        // A cloud image's base disk reaches the VMM as an open file it never opens again
        // itself (`/dev/fdset`): only the client's right to read it is checked.
        let base = match &g.cloud {
            Some(c) => Some(open_for(&self.image(&format!("{}/disk.raw", c.image))?, self.client, None)?),
            None => None,
        };
        let vm = self.vms.get(name).ok_or_else(|| not_found(name))?;
        let id = vm.cfg.identity;
        let consumer = vm.cfg.consumers.first().map(ToString::to_string).unwrap_or_default();
        let spec = crate::launcher::StartSpec {
            name: name.to_string(),
            cmdline: format!(
                "console=ttyS0 quiet panic=-1 reboot=t omerta.ip={}/{} omerta.gw={} omerta.consumer={consumer} omerta.fw={}",
                id.ip,
                id.prefix_len,
                id.gateway_ip,
                u8::from(g.firewall)
            ),
            memory_mib: g.memory_mib,
            cpus: g.cpus,
            mac: id.mac.to_string(),
            uid_slot,
            image: None,
            disk_mb: None,
        };
        let files = crate::launcher::BootFiles { kernel: &kernel, initrd: &initrd, base: None };
        let running = match (&g.cloud, &base) {
            (Some(c), Some(base)) => {
                // Its own root disk, the serial console, no quiet: the firewall's LOG lines and
                // cloud-init's progress reach the console.
                let cmdline = "root=/dev/vda rw console=ttyS0".into();
                let seed = c.seed.clone().ok_or_else(|| {
                    refused(format!(
                        "vm '{name}' was taken over from an engine before this one, which kept its seed: remove it and start it again"
                    ))
                })?;
                let image = Some(Box::new(seed));
                let spec = crate::launcher::StartSpec { cmdline, image, disk_mb: c.request.disk_mb, ..spec };
                launcher.start(spec, nic, crate::launcher::BootFiles { base: Some(base), ..files })
            }
            _ => launcher.start(spec, nic, files),
        };
        let running = running.map_err(|e| refused(e.to_string()))?;
        let console = running.console_path().to_path_buf();
        Ok(Guest {
            vm: running,
            kernel: g.kernel,
            initrd: g.initrd,
            memory_mib: g.memory_mib,
            cpus: g.cpus,
            firewall: g.firewall,
            cloud: g.cloud,
            console,
            uid_slot,
            boot: Boot::new(g.boot_timeout),
            request: g.request,
        })
    }

    /// The user a guest's VMM runs as: its uid slot's, with a uid range, else the VMM user.
    pub(super) fn slot_user(&self, slot: Option<u32>) -> Option<hv::VmmUser> {
        match (self.vmm_uid_base, slot) {
            (Some(base), Some(k)) => {
                let id = base.saturating_add(k);
                Some(hv::VmmUser { name: format!("uid {id}"), uid: id, gid: id })
            }
            _ => self.vmm_user.clone(),
        }
    }

    /// `vm start` in direct mode: the guest on the VMM's own user-mode NAT, no engine in the
    /// path, the guest firewall as the barrier and the rogue-connection detector watching.
    fn start_direct(&mut self, cfg: VmConfig, g: GuestArgs, interval: Duration) -> Result<Reply, Failure> {
        let name = cfg.name.clone();
        if self.vms.contains_key(&name) {
            return Err(refused(format!("a VM named '{name}' exists already")));
        }
        let launcher = self.launcher.clone().ok_or_else(|| refused("this engine starts no guests (no launcher)"))?;
        let net = launcher.direct_net(&name, cfg.private).map_err(|e| refused(e.to_string()))?;
        let netns = net.id();
        let direct = Direct { interval, next: Instant::now(), rogue: Vec::new(), blind: Vec::new(), checks: 0, net };
        self.vms.insert(name.clone(), Vm::new(cfg, Carrier::Direct(direct), State::Running));
        match self.start_guest(&name, crate::launcher::Nic::Direct(netns), g) {
            Ok(guest) => {
                if let Some(vm) = self.vms.get_mut(&name) {
                    vm.guest = Some(guest);
                }
                Ok(vm_reply(self.vm(&name)?))
            }
            Err(e) => {
                self.vms.remove(&name);
                Err(e)
            }
        }
    }

    /// `vm start`: a socketpair, a worker on one end, a guest on the other (or, in direct
    /// mode, the guest on its VMM's NAT). The request was read by `config::GuestStart`.
    pub(super) fn vm_start(&mut self, spec: &str) -> Result<Reply, Failure> {
        let req = crate::config::GuestStart::parse(spec).map_err(|e| refused(e.to_string()))?;
        // Resolved in the image directories now, so a bad path is refused before anything
        // is made; opened (as the client may) only when the guest starts.
        let (kernel, initrd) = (self.image(&req.kernel)?, self.image(&req.initrd)?);
        for p in [&kernel, &initrd] {
            if !std::path::Path::new(p).is_file() {
                return Err(refused(format!("{p} is not a file")));
            }
        }
        // Everything is checked before the socketpair exists, so a refusal leaves no
        // descriptor behind; from `add` on, the worker owns the engine's end.
        let vm = req.validate().map_err(|e| refused(e.to_string()))?;
        if self.vms.contains_key(vm.name()) {
            return Err(refused(format!("a VM named '{}' exists already", vm.name())));
        }
        let g = GuestArgs {
            kernel,
            initrd,
            memory_mib: req.memory_mib,
            cpus: 1,
            firewall: req.firewall,
            boot_timeout: req.boot_timeout.unwrap_or(BOOT_TIMEOUT),
            cloud: None,
            request: Start::Guest(spec.to_string()),
        };
        if req.direct {
            return self.start_direct(vm.never_attached(), g, req.rogue_interval);
        }
        self.add_with_guest(vm, g)
    }

    /// Adds `cfg` on a fresh socketpair (its worker on the engine's end) and starts its guest
    /// with `g` on the other; a guest that fails to start takes the VM with it. Call once
    /// everything is checked, so a refusal leaves no descriptor behind: from `add` on, the
    /// worker owns the engine's end (and closes it if it fails).
    fn add_with_guest(&mut self, vm: crate::config::Unattached, g: GuestArgs) -> Result<Reply, Failure> {
        let name = vm.name().to_string();
        let (nic, engine_end) = dgram_nic()?;
        let cfg = vm.attach(HandleSpec::DgramFd(std::os::fd::IntoRawFd::into_raw_fd(engine_end)));
        self.add(cfg)?;
        match self.start_guest(&name, nic, g) {
            Ok(g) => {
                if let Some(vm) = self.vms.get_mut(&name) {
                    vm.guest = Some(g);
                }
                self.save_record(&name);
            }
            Err(e) => {
                if let Some(mut vm) = self.vms.remove(&name) {
                    vm.stop_worker();
                }
                return Err(e);
            }
        }
        Ok(vm_reply(self.vm(&name)?))
    }

    /// `vm start image=...`: a stock cloud image for one consumer. The engine makes the VM's
    /// WireGuard key pair and SSH host key; the launcher makes its overlay and seed.
    #[allow(clippy::too_many_lines)]
    pub(super) fn vm_start_image(&mut self, s: api::ImageStart) -> Result<Reply, Failure> {
        let image = self.image(&s.image)?;
        for f in IMAGE_FILES {
            if !std::path::Path::new(&image).join(f).is_file() {
                return Err(refused(format!(
                    "image {}: no {f} (an image directory holds {}, as make image builds it)",
                    s.image,
                    IMAGE_FILES.join(", ")
                )));
            }
        }
        // A proof rental: our half of the exchange, the key, and the secret forgotten here.
        let (proof, proof_public) = match &s.proof_key {
            Some(theirs) => {
                let (ours, public) = crate::provision::ProofSecret::generate().map_err(|e| refused(e.to_string()))?;
                let key = ours.key(theirs, crate::provision::ProofSide::Engine).map_err(|e| refused(e.to_string()))?;
                (Some(key), Some(public))
            }
            None => (None, None),
        };
        let vm = image_desc(&s, proof)?.validate_unattached().map_err(|e| refused(e.to_string()))?;
        let name = vm.name().to_string();
        if self.vms.contains_key(&name) {
            return Err(refused(format!("a VM named '{name}' exists already")));
        }
        let keys = crate::provision::generate().map_err(|e| refused(e.to_string()))?;
        let id = vm.config().identity;
        let mut nonce = [0u8; 4];
        getrandom::fill(&mut nonce).map_err(|e| refused(format!("the OS random source: {e}")))?;
        let seed = hv::cloud::Seed {
            instance_id: format!("omerta-{}", hex(&nonce)),
            hostname: name.replace('_', "-").trim_start_matches(['-', '.']).chars().take(63).collect::<String>(),
            mac: id.mac.to_string(),
            addressing: if s.dhcp {
                hv::cloud::Addressing::Dhcp
            } else {
                hv::cloud::Addressing::Static {
                    address: id.ip,
                    prefix: id.prefix_len,
                    gateway: id.gateway_ip,
                    mtu: id.mtu,
                }
            },
            user: s.ssh_user.clone(),
            ssh_authorized_key: s.ssh_key.clone(),
            host_key_private: keys.host_private.clone(),
            host_key_public: keys.host_public.clone(),
            wg_private_key: keys.wg_private.clone(),
            wg_address: s.tunnel,
            wg_port: GUEST_WG_PORT,
            consumer_key: s.consumer_key.clone(),
            // With an alias the guest names its consumer there, whatever its endpoint becomes.
            consumer_endpoint: match (s.alias, s.consumer) {
                (false, Some(c)) => std::net::SocketAddrV4::new(c.ip, c.port),
                _ => std::net::SocketAddrV4::new(id.gateway_ip, GUEST_WG_PORT),
            },
            consumer_tunnel: s.consumer_tunnel,
        };
        seed.check().map_err(|e| refused(e.to_string()))?;
        let mut g = image_guest(&image, &s);
        g.cloud = Some(Cloud {
            request: s,
            image: image.clone(),
            seed: Some(seed),
            keys: PublicKeys {
                wg_public: keys.wg_public.clone(),
                host_public: keys.host_public.clone(),
                host_fingerprint: keys.host_fingerprint.clone(),
                proof_public,
            },
        });
        let shown = self.add_with_guest(vm, g)?;
        engine::info!("vm {name}: started image {image}");
        Ok(shown)
    }
}

/// The VM a `vm start image=...` request describes (its endpoint-proof key, `proof`, made
/// for it at its start and kept in its record).
pub(super) fn image_desc(
    s: &api::ImageStart,
    proof: Option<engine::proof::Key>,
) -> Result<crate::config::VmDesc, Failure> {
    Ok(crate::config::VmDesc {
        name: Some(s.name.clone()),
        consumer: s.consumer.map(|c| vec![c]),
        proof,
        alias: s.alias.then_some(GUEST_WG_PORT),
        bind: s.port.map(|p| crate::config::Bind(std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, p))),
        mode: s.mode.as_deref().map(str::parse).transpose().map_err(|e: String| refused(format!("mode: {e}")))?,
        ..Default::default()
    })
}

/// A guest's NIC: a datagram socketpair, the VMM's end and a copy of the engine's for the
/// launcher (which keeps it when it outlives the engine), and the engine's end.
pub(super) fn dgram_nic() -> Result<(crate::launcher::Nic, std::os::fd::OwnedFd), Failure> {
    let (engine_end, vmm) = sys::socketpair(libc_dgram()).map_err(|e| refused(format!("socketpair: {e}")))?;
    let engine = engine_end.try_clone().map_err(|e| refused(format!("socketpair: {e}")))?;
    Ok((crate::launcher::Nic::Dgram { vmm, engine }, engine_end))
}

/// The guest settings of a `vm start image=...` request whose image directory is `image`
/// (its cloud part, keys and seed, is the caller's).
pub(super) fn image_guest(image: &str, s: &api::ImageStart) -> GuestArgs {
    let dir = std::path::Path::new(image);
    GuestArgs {
        kernel: dir.join("vmlinuz").to_string_lossy().into_owned(),
        initrd: dir.join("initrd.img").to_string_lossy().into_owned(),
        memory_mib: s.memory_mib,
        cpus: s.cpus,
        firewall: true,
        boot_timeout: s.boot_timeout_s.map_or(BOOT_TIMEOUT, Duration::from_secs),
        cloud: None,
        request: Start::Image(s.to_string()),
    }
}
