//! VM records: what an engine whose VMMs outlive it (`--launcher`) keeps of each guest it
//! started, so the next engine takes the guest over (`restore`) with its network as it was.
//!
//! One file per guest, `STATE/engine/<name>.json` (the engine's user's, 0600, replaced
//! atomically: `crate::state`), written before `vm start` answers, after every allowlist
//! change (`allow set`, a proved endpoint), when the guest becomes ready, and at `vm
//! restart`; deleted by `vm remove`. It holds the start request as the control socket took
//! it (restored through the same parser and checks), the launcher's number and pid of the
//! VMM, the allowlist, the host port, the proof key and the guest's public keys. No private
//! key: those are in the guest's seed, which only the launcher keeps.
//!
//! Restoring: each record whose VMM the launcher still runs is attached (its NIC's engine end
//! comes back over `SCM_RIGHTS`) and added as a VM with its allowlist and port before its
//! worker reads a frame; the fence's share comes first, as for any VM. A record that does
//! not parse is quarantined; one whose VMM is gone, or that cannot be restored, is removed
//! with its VMM (said in one line each); a VMM held without a record is removed.
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::*;

/// How the guest was started: the request's text, as the control socket took it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(super) enum Start {
    /// `vm start KEY=VALUE,...` (a kernel and an initrd).
    Guest(String),
    /// `vm start image=...` (a cloud image).
    Image(String),
}

/// A cloud guest's public keys (the private halves are in its seed alone).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PublicKeys {
    pub(super) wg_public: String,
    pub(super) host_public: String,
    pub(super) host_fingerprint: String,
    /// The engine's endpoint-proof public key, for a proof rental.
    pub(super) proof_public: Option<String>,
}

/// One guest's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Record {
    pub(super) start: Start,
    /// The launcher's number for its VMM, and the VMM's pid (both must match to attach).
    pub(super) launcher_id: u64,
    pub(super) pid: u32,
    /// The allowlist as it is now.
    pub(super) allow: Vec<SocketAddrV4>,
    /// The host UDP port its worker had bound.
    pub(super) port: u16,
    /// The endpoint-proof key (hex), for a proof rental.
    pub(super) proof: Option<String>,
    pub(super) keys: Option<PublicKeys>,
    pub(super) uid_slot: Option<u32>,
    /// Seconds the guest took to become ready, once it has.
    pub(super) ready_after_s: Option<f64>,
    pub(super) boot_timeout_s: u64,
    /// Its VMM's directory id at the launcher (a kept guest is found by it after a reboot).
    #[serde(default)]
    pub(super) dir: Option<String>,
}

/// A kept guest, as the registry holds it until `vm resume` or `vm remove`.
#[derive(Debug)]
pub(super) struct KeptGuest {
    /// The launcher's number for it.
    pub(super) launcher_id: u64,
    pub(super) record: Record,
}

/// How long a restored VM waits for its port to be let go by the engine before.
const PORT_WAIT: Duration = Duration::from_secs(5);

/// Waits (up to `max`) until UDP `at` can be bound.
fn wait_port_free(at: SocketAddrV4, max: Duration) {
    let end = Instant::now() + max;
    while std::net::UdpSocket::bind(at).is_err() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The most a record may take.
const MAX_RECORD: u64 = 64 * 1024;

/// The records' directory must be the engine's own, and no one else's to read or write.
fn own_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let m = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    if !m.is_dir() || m.uid() != sys::effective_ids().0 || m.mode() & 0o077 != 0 {
        return Err(format!(
            "not a directory of the engine's own user with mode 0700 (uid {}, mode {:o})",
            m.uid(),
            m.mode() & 0o7777
        ));
    }
    Ok(())
}

/// A record, read without following a link or blocking on a FIFO, a regular file of the
/// engine's user of at most [`MAX_RECORD`] bytes.
fn read_record(file: &Path) -> Result<Record, String> {
    let bytes = crate::state::read_own(file, MAX_RECORD)?;
    serde_json::from_slice::<Record>(&bytes).map_err(|e| format!("does not parse ({e})"))
}

/// The record file of VM `name` in `dir`.
fn path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json"))
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

impl Registry {
    /// VM records go in `dir` (the engine's VMMs outlive it: `--launcher`), and the next
    /// engine restores from them.
    pub fn set_records(&mut self, dir: PathBuf) {
        self.records = Some(dir);
    }

    /// Writes VM `name`'s record (a guest on an engine NIC, when records are kept). A failure
    /// is said: that guest would not survive an engine restart.
    pub(super) fn save_record(&self, name: &str) {
        let Some(dir) = &self.records else { return };
        let Some(vm) = self.vms.get(name) else { return };
        let Some(g) = vm.guest.as_ref().filter(|_| vm.direct().is_none()) else { return };
        let rec = Record {
            start: g.request.clone(),
            launcher_id: g.vm.id(),
            pid: hv::RunningVm::pid(&g.vm),
            allow: vm.allow.endpoints().iter().map(|e| SocketAddrV4::new(e.ip, e.port)).collect(),
            port: vm.worker().map_or(vm.cfg.bind.port(), |w| w.host_port),
            proof: vm.cfg.proof.map(|k| hex(&k.0)),
            keys: g.cloud.as_ref().map(|c| c.keys.clone()),
            uid_slot: g.uid_slot,
            ready_after_s: match &g.boot.state {
                BootState::Ready(t) => Some(t.as_secs_f64()),
                _ => None,
            },
            boot_timeout_s: g.boot.timeout.as_secs(),
            dir: Some(g.vm.dir().to_string()),
        };
        let written = serde_json::to_vec_pretty(&rec)
            .map_err(std::io::Error::other)
            .and_then(|json| crate::state::write_atomic(&path(dir, name), &json, 0o600));
        if let Err(e) = written {
            engine::error!("vm {name}: its record {}: {e}: it would not survive an engine restart", dir.display());
        }
    }

    /// Deletes VM `name`'s record (it was removed).
    pub(super) fn drop_record(&self, name: &str) {
        if let Some(dir) = &self.records {
            match std::fs::remove_file(path(dir, name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => engine::warn!("vm {name}: its record: {e}"),
            }
        }
    }

    /// Takes over every guest a previous engine left running (see the module's text). Call
    /// once, before any other VM is added; returns how many were restored.
    pub fn restore(&mut self) -> usize {
        let (Some(dir), Some(launcher)) = (self.records.clone(), self.launcher.clone()) else { return 0 };
        let held = match launcher.held() {
            Ok(h) => h,
            Err(e) => {
                engine::error!("restoring VMs: the launcher: {e}; none restored");
                return 0;
            }
        };
        if let Err(why) = own_private_dir(&dir) {
            engine::error!("restoring VMs: {}: {why}; none restored", dir.display());
            return 0;
        }
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
            Err(e) => {
                engine::error!("restoring VMs: {}: {e}; none restored", dir.display());
                return 0;
            }
        };
        let mut attached = Vec::new();
        // VMs whose record was moved aside: their VMMs stay with the launcher, untouched.
        let mut unread = Vec::new();
        let mut restored = 0;
        for entry in entries.flatten() {
            let file = entry.path();
            let Some(fname) = file.file_name().and_then(|n| n.to_str()) else { continue };
            // A write a kill cut short: the record it was to replace is still whole.
            if fname.starts_with('.') && fname.ends_with(".tmp") {
                let _ = std::fs::remove_file(&file);
                continue;
            }
            let Some(name) = fname.strip_suffix(".json").filter(|n| !n.starts_with('.')) else { continue };
            let name = name.to_string();
            let rec = match read_record(&file) {
                Ok(r) => r,
                Err(why) => {
                    crate::state::quarantine(
                        &file,
                        "corrupt",
                        &format!(
                            "{why}; VM {name} is not restored (its guest stays with the launcher, without network)"
                        ),
                    );
                    unread.push(name);
                    continue;
                }
            };
            let found = held.iter().find(|h| h.id == rec.launcher_id && h.name == name && h.pid == rec.pid && !h.kept);
            // Its VMM ended with a launcher before this one, its disk kept (a reboot): kept
            // here too, without network, until `vm resume` (omertad resumes a valid lease).
            let kept = held.iter().find(|h| h.kept && h.name == name && rec.dir.as_deref() == Some(h.dir.as_str()));
            if let (None, Some(h)) = (found, kept) {
                attached.push(h.id);
                self.restore_kept(&name, rec, h.id);
                continue;
            }
            let Some(h) = found else {
                engine::warn!("vm {name}: its VMM (pid {}) is gone: not restored, record removed", rec.pid);
                let _ = std::fs::remove_file(&file);
                continue;
            };
            attached.push(h.id);
            let a = match launcher.attach(h.id) {
                Ok(a) => a,
                Err(e) => {
                    engine::error!("vm {name}: cannot take its VMM over: {e}");
                    continue;
                }
            };
            if !h.running {
                engine::warn!("vm {name}: its guest ended while no engine ran: removed");
                a.vm.remove();
                let _ = std::fs::remove_file(&file);
                continue;
            }
            if self.restore_one(&name, rec, a) {
                restored += 1;
            }
        }
        for h in held.iter().filter(|h| (h.attachable || h.kept) && !attached.contains(&h.id)) {
            if unread.contains(&h.name) {
                engine::warn!(
                    "vm {}: its VMM (pid {}) is left to the launcher: its record did not read",
                    h.name,
                    h.pid
                );
                continue;
            }
            // Started for an engine that ended before it wrote the record (and answered).
            engine::warn!("vm {}: a VMM (pid {}, {}) with no record: removed", h.name, h.pid, h.dir);
            if h.kept {
                let _ = launcher.forget(h.id);
                continue;
            }
            if let Ok(a) = launcher.attach(h.id) {
                a.vm.remove();
            }
        }
        restored
    }

    /// Adds VM `name` from its record on the NIC of the guest `a` the launcher held; true
    /// when its worker runs. A record that no longer makes a VM removes the guest; a VM whose
    /// worker cannot start (its port taken meanwhile) stays, `failed`, its guest held without
    /// network and its record kept for the next start (`vm remove` ends it).
    fn restore_one(&mut self, name: &str, rec: Record, a: crate::launcher::Attached) -> bool {
        let crate::launcher::Attached { vm: remote, nic } = a;
        if self.vms.contains_key(name) {
            engine::error!("vm {name}: not restored: a VM of that name exists already; its guest is removed");
            remote.remove();
            return false;
        }
        match self.rebuild(name, &rec) {
            Ok(parts) => self.install(name, rec, remote, nic, parts, false),
            Err(f) => {
                engine::error!("vm {name}: not restored: {}; its guest is removed", f.message);
                remote.remove();
                self.drop_record(name);
                false
            }
        }
    }

    /// A kept guest (launcher number `id`) held as VM `name` in state `kept`, without network,
    /// until `vm resume` boots it or `vm remove` deletes its disk.
    fn restore_kept(&mut self, name: &str, rec: Record, id: u64) {
        match self.rebuild(name, &rec) {
            Ok((vm, _, _)) if !self.vms.contains_key(name) => {
                let mut v = Vm::new(vm.never_attached(), Carrier::Engine(None), State::Kept);
                v.kept = Some(KeptGuest { launcher_id: id, record: rec });
                self.vms.insert(name.to_string(), v);
                engine::info!("vm {name}: kept: its disk waits to boot again (vm resume)");
            }
            Ok(_) => engine::error!("vm {name}: not kept: a VM of that name exists already"),
            Err(f) => {
                // Its record no longer makes a VM: its disk would be no one's.
                engine::error!("vm {name}: not kept: {}; its disk is deleted", f.message);
                if let Some(l) = &self.launcher {
                    let _ = l.forget(id);
                }
                self.drop_record(name);
            }
        }
    }

    /// `vm resume NAME`: a kept guest booted again from its disk (same keys, MAC, address,
    /// port and allowlist), through the same checks as its start's files.
    pub(super) fn vm_resume(&mut self, name: &str) -> Result<Reply, Failure> {
        let launcher = self.launcher.clone().ok_or_else(|| refused("this engine starts no guests (no launcher)"))?;
        let vm = self.vm(name)?;
        let Some(k) = vm.kept.take() else {
            return Err(refused(format!("VM '{name}' is not kept ({}): only a kept guest resumes", vm.state.view())));
        };
        let booted = self.boot_kept(name, &launcher, &k);
        match booted {
            Ok((remote, nic, parts)) => {
                self.vms.remove(name);
                let rec = k.record;
                if !self.install(name, rec, remote, nic, parts, true) {
                    return Err(refused(format!("vm '{name}': booted, but its network did not start (see vm show)")));
                }
                engine::info!("vm {name}: resumed: its guest boots again from its disk");
                Ok(vm_reply(self.vm(name)?))
            }
            Err(f) => {
                if let Some(vm) = self.vms.get_mut(name) {
                    vm.kept = Some(k);
                }
                Err(f)
            }
        }
    }

    /// Opens a kept guest's files as its start did and has the launcher boot it.
    #[allow(clippy::type_complexity)]
    fn boot_kept(
        &self,
        name: &str,
        launcher: &Arc<crate::launcher::Client>,
        k: &KeptGuest,
    ) -> Result<
        (crate::launcher::RemoteVm, std::os::fd::OwnedFd, (crate::config::Unattached, GuestArgs, Option<Cloud>)),
        Failure,
    > {
        let parts = self.rebuild(name, &k.record)?;
        let image = parts.2.as_ref().map(|c| c.image.clone()).ok_or_else(|| refused("only a cloud guest is kept"))?;
        let user = self.slot_user(k.record.uid_slot);
        let kernel = guests::open_for(&self.image(&parts.1.kernel)?, self.client, user.as_ref())?;
        let initrd = guests::open_for(&self.image(&parts.1.initrd)?, self.client, user.as_ref())?;
        let base = guests::open_for(&self.image(&format!("{image}/disk.raw"))?, self.client, None)?;
        let (nic, engine_end) = guests::dgram_nic()?;
        let remote = launcher.boot(k.launcher_id, nic, &kernel, &initrd, &base).map_err(|e| refused(e.to_string()))?;
        Ok((remote, engine_end, parts))
    }

    /// Adds VM `name` from its record on `nic`, the engine's end of guest `remote`'s NIC
    /// (`fresh`: the guest boots anew, not ready yet); true when its worker runs. A VM whose
    /// worker cannot start (its port taken meanwhile) stays, `failed`, its guest held without
    /// network and its record kept for the next start (`vm remove` ends it).
    fn install(
        &mut self,
        name: &str,
        rec: Record,
        remote: crate::launcher::RemoteVm,
        nic: std::os::fd::OwnedFd,
        parts: (crate::config::Unattached, GuestArgs, Option<Cloud>),
        fresh: bool,
    ) -> bool {
        let (unattached, g, cloud) = parts;
        let mut cfg = unattached.attach(HandleSpec::DgramFd(std::os::fd::IntoRawFd::into_raw_fd(nic)));
        cfg.bind = SocketAddrV4::new(*cfg.bind.ip(), rec.port);
        // The recorded list, if this VM's request may have it (checked as `allow set` checks);
        // else the request's own.
        let recorded: Vec<Endpoint> = rec.allow.iter().map(|a| Endpoint::new(*a.ip(), a.port())).collect();
        let one = cfg.identity.alias_port.is_none() || recorded.len() <= 1;
        match Allowlist::under(recorded.iter().copied(), &cfg.policy(self.host_addrs.clone())) {
            Ok(_) if one => cfg.consumers = recorded,
            Ok(_) => {
                engine::warn!("vm {name}: its record's allowlist has more than its alias allows; its request's is used")
            }
            Err(e) => engine::warn!("vm {name}: its record's allowlist is refused ({e}); its request's is used"),
        }
        // No proof that could have been made before this engine started is accepted (one
        // made ahead of the clock by up to the skew included).
        cfg.proof_floor_ms = engine::log::unix_ms().saturating_add(engine::proof::SKEW_MS);
        // The engine before may still hold the port a moment after it ended (an io_uring
        // ring's sockets are let go after the process).
        wait_port_free(cfg.bind, PORT_WAIT);
        let failed = self.add(cfg.clone()).err();
        let console = remote.console_path().to_path_buf();
        let mut boot = Boot::new(Duration::from_secs(rec.boot_timeout_s));
        if let Some(t) = rec.ready_after_s.and_then(|s| Duration::try_from_secs_f64(s).ok()).filter(|_| !fresh) {
            boot.state = BootState::Ready(t);
        }
        let guest = Guest {
            vm: remote,
            kernel: g.kernel,
            initrd: g.initrd,
            memory_mib: g.memory_mib,
            cpus: g.cpus,
            firewall: g.firewall,
            cloud,
            console,
            uid_slot: rec.uid_slot,
            boot,
            request: g.request,
        };
        if let Some(f) = &failed {
            engine::error!(
                "vm {name}: not restored: {}; its guest is held without network (vm remove ends it, the next engine start tries again)",
                f.message
            );
            let mut vm = Vm::new(cfg, Carrier::Engine(None), State::Failed(f.message.clone()));
            vm.guest = Some(guest);
            self.vms.insert(name.to_string(), vm);
            self.save_record(name);
            return false;
        }
        if let Some(vm) = self.vms.get_mut(name) {
            vm.guest = Some(guest);
        }
        // Its launcher number and pid are new after a boot.
        self.save_record(name);
        if !fresh {
            engine::info!("vm {name}: restored: its guest ran on while the engine was away");
        }
        true
    }

    /// The VM and guest settings a record's request makes, through the same parsers and
    /// checks as the request itself (the keys and the proof are the record's, not new ones).
    fn rebuild(
        &self,
        name: &str,
        rec: &Record,
    ) -> Result<(crate::config::Unattached, GuestArgs, Option<Cloud>), Failure> {
        match &rec.start {
            Start::Guest(spec) => {
                let req = crate::config::GuestStart::parse(spec).map_err(|e| refused(e.to_string()))?;
                let vm = req.validate().map_err(|e| refused(e.to_string()))?;
                if vm.name() != name || req.direct {
                    return Err(refused("the record names another VM"));
                }
                let g = GuestArgs {
                    kernel: self.image(&req.kernel).unwrap_or(req.kernel.clone()),
                    initrd: self.image(&req.initrd).unwrap_or(req.initrd.clone()),
                    memory_mib: req.memory_mib,
                    cpus: 1,
                    firewall: req.firewall,
                    boot_timeout: req.boot_timeout.unwrap_or(BOOT_TIMEOUT),
                    cloud: None,
                    request: rec.start.clone(),
                };
                Ok((vm, g, None))
            }
            Start::Image(spec) => {
                let s = api::ImageStart::parse(spec)?;
                let proof = match (&rec.proof, &s.proof_key) {
                    (Some(k), Some(_)) => {
                        Some(engine::proof::Key(unhex32(k).ok_or_else(|| refused("its proof key does not read"))?))
                    }
                    (None, None) => None,
                    _ => return Err(refused("its proof key does not match its request")),
                };
                let vm = image_desc(&s, proof)?.validate_unattached().map_err(|e| refused(e.to_string()))?;
                if vm.name() != name {
                    return Err(refused("the record names another VM"));
                }
                let keys = rec.keys.clone().ok_or_else(|| refused("a cloud guest's record without its keys"))?;
                let image = self.image(&s.image).unwrap_or(s.image.clone());
                let g = GuestArgs { request: rec.start.clone(), ..guests::image_guest(&image, &s) };
                Ok((vm, g, Some(Cloud { request: s, image, seed: None, keys })))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_and_refuses_what_it_does_not_know() {
        let rec = Record {
            start: Start::Image("image=/x,name=vm".into()),
            launcher_id: 7,
            pid: 42,
            allow: vec!["192.0.2.1:51820".parse().unwrap()],
            port: 40000,
            proof: Some(hex(&[7; 32])),
            keys: None,
            uid_slot: Some(1),
            ready_after_s: Some(12.5),
            boot_timeout_s: 300,
            dir: None,
        };
        let text = serde_json::to_string(&rec).unwrap();
        let back: Record = serde_json::from_str(&text).unwrap();
        assert_eq!((back.launcher_id, back.pid, back.port, back.allow.len()), (7, 42, 40000, 1));
        assert_eq!(unhex32(back.proof.as_deref().unwrap()), Some([7; 32]));
        assert_eq!(unhex32("zz"), None);
        // A field it does not know (a path to open, say) is refused, not ignored.
        let smuggled = text.replacen('{', r#"{"kernel_path":"/etc/shadow","#, 1);
        assert!(serde_json::from_str::<Record>(&smuggled).is_err());
    }

    #[test]
    fn only_a_small_regular_file_of_the_engines_own_is_read_as_a_record() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("omerta-records-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(own_private_dir(&dir).is_err(), "others may read it");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(own_private_dir(&dir), Ok(()));
        let rec = dir.join("vm.json");
        let text = r#"{"start":{"guest":"name=vm"},"launcher_id":2,"pid":9,"allow":[],"port":0,"proof":null,"keys":null,"uid_slot":null,"ready_after_s":1e300,"boot_timeout_s":300}"#;
        std::fs::write(&rec, text).unwrap();
        assert_eq!(read_record(&rec).map(|r| r.launcher_id), Ok(2));
        // A ready time no Duration holds does not panic a restore: it reads as not ready.
        assert!(Duration::try_from_secs_f64(read_record(&rec).unwrap().ready_after_s.unwrap()).is_err());
        // Too large, a link, a FIFO (which would block a plain read forever).
        std::fs::write(&rec, vec![b' '; 65 * 1024]).unwrap();
        assert!(read_record(&rec).is_err());
        std::fs::remove_file(&rec).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", &rec).unwrap();
        assert!(read_record(&rec).is_err());
        std::fs::remove_file(&rec).unwrap();
        assert!(std::process::Command::new("mkfifo").arg(&rec).status().unwrap().success());
        assert!(read_record(&rec).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
