//! Where a VMM's files live, and a cloud image's disks.
//!
//! The launcher's own directory is `STATE/launcher` (its user's, 0700); each VMM it starts gets
//! `STATE/launcher/vms/<lid>` (0700), named by a launcher id of 128 random bits that the
//! engine never chooses, holding `console` and, for a cloud image, `disk.qcow2` (a qcow2
//! overlay over the base image, of the granted size) and `seed.iso` (the NoCloud seed, which
//! holds the VM's private keys). The directory goes when the VMM is released or removed, and
//! when the launcher ends: nothing of a tenant is left for the next one.
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a VMM's directory or a cloud image's disks could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The base image's size could not be read.
    #[error("the base image: {0}")]
    Base(std::io::Error),
    /// A file or directory of the state directory.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The state directory is not one only the launcher's user may change.
    #[error("the state directory {}: {why}", path.display())]
    Unsafe {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// Another launcher holds the state directory.
    #[error("the state directory {}: another engine's launcher uses it (one engine per state directory: --state-dir)", .0.display())]
    Taken(PathBuf),
    /// The disk asked for is smaller than the image.
    #[error("the image needs a disk of at least {0} MB")]
    TooSmall(u64),
    /// The OS gave no random bytes for the VMM's id.
    #[error("the OS random source: {0}")]
    Random(String),
    /// genisoimage or qemu-img failed.
    #[error("launcher: vm {vm}: {source}")]
    Make {
        /// The VM.
        vm: String,
        /// What `hv::cloud` said.
        source: hv::cloud::SeedError,
    },
}

fn file_error(p: &Path) -> impl FnOnce(std::io::Error) -> ProvisionError {
    let path = p.to_path_buf();
    move |source| ProvisionError::File { path, source }
}

/// The launcher's directories under a state directory.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    /// `STATE/launcher/vms`.
    vms: PathBuf,
    /// `STATE/launcher/lock`, held while this launcher lives: one launcher per state
    /// directory (another would remove this one's VMM directories as leftovers).
    _lock: std::sync::Arc<File>,
}

impl Layout {
    /// Makes (or checks) `STATE` (0755 when new), `STATE/launcher` and `STATE/launcher/vms`
    /// (0700, the launcher's user's). `STATE` and each directory above it must be owned by root or the launcher's user
    /// and writable by nobody else (unless sticky, as `/tmp`): no other user may swap a
    /// directory the launcher writes a tenant's disk into.
    pub(super) fn prepare(state: &Path) -> Result<Layout, ProvisionError> {
        let me = sys::effective_ids().0;
        let unsafe_dir = |path: &Path, why: String| ProvisionError::Unsafe { path: path.to_path_buf(), why };
        std::fs::DirBuilder::new().recursive(true).mode(0o755).create(state).map_err(file_error(state))?;
        // Its real path, links resolved once: each directory on it is then checked to be one
        // nobody else may swap.
        let state = std::fs::canonicalize(state).map_err(file_error(state))?;
        for dir in state.ancestors() {
            let m = std::fs::symlink_metadata(dir).map_err(file_error(dir))?;
            if !m.is_dir() {
                return Err(unsafe_dir(dir, "not a directory".into()));
            }
            if m.uid() != 0 && m.uid() != me {
                return Err(unsafe_dir(dir, format!("owned by uid {}, not root", m.uid())));
            }
            if m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0 {
                return Err(unsafe_dir(dir, format!("writable by others (mode {:o})", m.mode() & 0o7777)));
            }
        }
        let launcher = state.join("launcher");
        let vms = launcher.join("vms");
        for dir in [&launcher, &vms] {
            match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(file_error(dir)(e)),
            }
            let m = std::fs::symlink_metadata(dir).map_err(file_error(dir))?;
            if !m.is_dir() || m.uid() != me {
                return Err(unsafe_dir(dir, format!("not a directory of uid {me}")));
            }
            if m.mode() & 0o077 != 0 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(file_error(dir))?;
            }
        }
        let lock_path = launcher.join("lock");
        let lock = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&lock_path)
            .map_err(file_error(&lock_path))?;
        if !sys::try_lock_exclusive(std::os::fd::AsFd::as_fd(&lock)).map_err(file_error(&lock_path))? {
            return Err(ProvisionError::Taken(state));
        }
        Ok(Layout { vms, _lock: std::sync::Arc::new(lock) })
    }

    /// A new VMM's directory, `vms/<lid>` (0700), under a fresh id.
    pub(super) fn new_vm(&self) -> Result<VmDir, ProvisionError> {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).map_err(|e| ProvisionError::Random(e.to_string()))?;
        let lid: String = b.iter().map(|x| format!("{x:02x}")).collect();
        let path = self.vms.join(&lid);
        std::fs::DirBuilder::new().mode(0o700).create(&path).map_err(file_error(&path))?;
        Ok(VmDir { path, keep: false })
    }

    /// The VMM directories an earlier launcher kept (a cloud guest's, with its description,
    /// disk and seed): each with what it says of itself. Any other entry is removed, as
    /// [`Layout::remove_leftovers`] does.
    pub(super) fn kept(&self) -> Vec<(VmDir, KeptFile)> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.vms) else { return out };
        for path in entries.flatten().map(|e| e.path()) {
            let named = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.len() == 32 && n.bytes().all(|b| b.is_ascii_hexdigit()));
            let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
            let read = || -> Result<KeptFile, String> {
                for f in ["disk.qcow2", "seed.iso"] {
                    if !std::fs::symlink_metadata(path.join(f)).is_ok_and(|m| m.is_file()) {
                        return Err(format!("no {f}"));
                    }
                }
                let bytes = crate::state::read_own(&path.join(KEPT_FILE), 1 << 20)?;
                serde_json::from_slice(&bytes).map_err(|e| format!("{KEPT_FILE} does not parse ({e})"))
            };
            // Moved aside by a launcher before: left for the operator.
            if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains(".unread-")) {
                continue;
            }
            match (named && is_dir).then(read) {
                Some(Ok(k)) => out.push((VmDir { path, keep: false }, k)),
                // A description this launcher cannot read (another version's?): its disk is
                // moved aside for the operator, never deleted.
                Some(Err(why)) if path.join(KEPT_FILE).exists() => {
                    crate::state::quarantine(
                        &path,
                        "unread",
                        &format!("does not read ({why}); its guest's disk is kept"),
                    );
                }
                Some(Err(why)) => {
                    engine::warn!("launcher: removed {} (left by an earlier launcher: {why})", path.display());
                    remove_path(&path);
                }
                None => {
                    engine::warn!("launcher: removed {} (left by an earlier launcher)", path.display());
                    remove_path(&path);
                }
            }
        }
        out
    }

    /// `STATE/launcher/vms`, where VMM directories are.
    pub(super) fn vms(&self) -> &Path {
        &self.vms
    }

    /// Removes what an earlier launcher left (it ended without cleaning up: killed, or the
    /// host went down): every VMM directory, whose VMM is gone with that launcher; and, in
    /// `old`, what launchers before VMM directories left ([`Layout::remove_old_files`]).
    pub(super) fn remove_leftovers(&self, old: Option<&Path>) {
        if let Ok(entries) = std::fs::read_dir(&self.vms) {
            for path in entries.flatten().map(|e| e.path()) {
                remove_path(&path);
                engine::warn!("launcher: removed {} (left by an earlier launcher)", path.display());
            }
        }
        if let Some(old) = old {
            Self::remove_old_files(old);
        }
    }

    /// Removes the files launchers before VMM directories kept beside the control socket, in
    /// `dir` (seed files hold private keys): `omerta-*.seed.iso`, `omerta-*.seed.d`,
    /// `omerta-*.overlay.qcow2`. Links are removed, never followed.
    pub(super) fn remove_old_files(dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for path in entries.flatten().map(|e| e.path()) {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let ours = name.starts_with("omerta-")
                && (name.ends_with(".seed.iso") || name.ends_with(".seed.d") || name.ends_with(".overlay.qcow2"));
            if ours {
                remove_path(&path);
                engine::warn!("launcher: removed {} (left by an earlier launcher)", path.display());
            }
        }
    }
}

/// Removes a file, or a directory with what it holds, never following a link.
fn remove_path(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}

/// One VMM's directory; removed with all it holds when dropped, unless kept
/// ([`VmDir::keep`]).
#[derive(Debug)]
pub(super) struct VmDir {
    path: PathBuf,
    keep: bool,
}

/// What a cloud guest's directory says of itself (`vm.json`, root's, 0600), written before its
/// VMM first runs: how to boot it again from its disk after its launcher is gone (a reboot).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeptFile {
    /// The start as the launcher checked it (its seed, with the guest's keys, included).
    pub(super) spec: super::protocol::StartSpec,
    /// The base image it was made over: the same file is required to boot it again.
    pub(super) base: BaseId,
    /// SHA-256 of the kernel and the initrd it first booted (hex): only those boot its disk
    /// again (another initrd could read its disk and seed out).
    pub(super) kernel_sha256: String,
    pub(super) initrd_sha256: String,
    /// What its files may take (admission counts it while it is kept).
    pub(super) charge: u64,
}

/// A base image's identity: inode, size, modification time (not the device, which some file
/// systems number anew at each boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BaseId {
    pub(super) ino: u64,
    pub(super) size: u64,
    pub(super) mtime_ns: i64,
}

impl BaseId {
    /// The identity of the open file `base`.
    pub(super) fn of(base: &OwnedFd) -> Result<Self, ProvisionError> {
        let m = File::from(base.try_clone().map_err(ProvisionError::Base)?).metadata().map_err(ProvisionError::Base)?;
        Ok(BaseId {
            ino: m.ino(),
            size: m.len(),
            mtime_ns: m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec()),
        })
    }
}

/// The SHA-256 (hex) of the open file `f`, read through its descriptor from its start.
pub(super) fn sha256(f: &OwnedFd) -> Result<String, ProvisionError> {
    use sha2::Digest as _;
    use std::os::unix::fs::FileExt as _;
    let file = File::from(f.try_clone().map_err(ProvisionError::Base)?);
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = file.read_at(&mut buf, at).map_err(ProvisionError::Base)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        at = at.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The name of a kept directory's description.
const KEPT_FILE: &str = "vm.json";

impl VmDir {
    /// Its id: the directory's name (32 hex digits).
    pub(super) fn id(&self) -> String {
        self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// Writes what it takes to boot its guest again (`vm.json`, 0600, atomically).
    pub(super) fn describe(&self, kept: &KeptFile) -> Result<(), ProvisionError> {
        let path = self.path.join(KEPT_FILE);
        let json = serde_json::to_vec(kept)
            .map_err(|e| ProvisionError::File { path: path.clone(), source: std::io::Error::other(e) })?;
        crate::state::write_atomic(&path, &json, 0o600).map_err(file_error(&path))
    }

    /// Left in place when dropped (its guest is to boot again after its launcher).
    pub(super) fn keep(&mut self) {
        self.keep = true;
    }

    /// A kept guest's overlay and seed, opened again as [`make`] opens them.
    pub(super) fn reopen(&self) -> Result<Disks, ProvisionError> {
        open_disks(&self.path.join("disk.qcow2"), &self.path.join("seed.iso"))
    }

    /// The console QEMU writes.
    pub(super) fn console(&self) -> PathBuf {
        self.path.join("console")
    }

    /// The QMP monitor's socket, bound here by the launcher (0600) and served by QEMU on the
    /// descriptor it is given: only root reaches it.
    pub(super) fn monitor(&self) -> Result<(PathBuf, OwnedFd), ProvisionError> {
        let path = self.path.join("qmp.sock");
        // A kept guest's directory still has the socket of its VMM before (which was killed).
        if std::fs::symlink_metadata(&path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
            std::fs::remove_file(&path).map_err(file_error(&path))?;
        }
        let l = std::os::unix::net::UnixListener::bind(&path).map_err(file_error(&path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(file_error(&path))?;
        Ok((path, OwnedFd::from(l)))
    }

    /// Bytes its files take on the host now (allocated blocks, not their lengths).
    pub(super) fn allocated(&self) -> u64 {
        std::fs::read_dir(&self.path)
            .map(|entries| {
                entries.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.blocks().saturating_mul(512)).sum()
            })
            .unwrap_or(0)
    }
}

/// Keeps a console (which QEMU appends to) within `max` bytes on the host: everything before
/// its last `max` (in whole 4 KiB blocks) becomes a hole. Its length and offsets stay as they
/// were; readers skip to its last `max` bytes (`RemoteVm::console_from`). Returns the bytes
/// freed.
pub(super) fn bound_console(path: &Path, max: u64) -> std::io::Result<u64> {
    let m = std::fs::symlink_metadata(path)?;
    let end = m.len().saturating_sub(max) & !4095;
    // Nothing to free: short, or what lies before the kept part is already a hole.
    if end == 0 || m.blocks().saturating_mul(512) <= max.saturating_add(4096) {
        return Ok(0);
    }
    let f = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
    sys::punch_hole(std::os::fd::AsFd::as_fd(&f), 0, end)?;
    Ok(end)
}

impl Drop for VmDir {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                engine::warn!("launcher: removing {}: {e}", self.path.display());
            }
        }
    }
}

/// A cloud image's disks: its overlay read-write and read-only (QEMU opens a writable disk
/// both ways) and its seed volume; 0600, in the VMM's directory.
#[derive(Debug)]
pub(super) struct Disks {
    pub(super) overlay: OwnedFd,
    pub(super) overlay_ro: OwnedFd,
    pub(super) seed: OwnedFd,
}

/// The size of VM `name`'s disk: `disk_mb` MB (2^20 bytes), at least the base image's size;
/// the base's own size when none is asked.
pub(super) fn disk_bytes(base: &OwnedFd, disk_mb: Option<u32>) -> Result<u64, ProvisionError> {
    let base_size =
        File::from(base.try_clone().map_err(ProvisionError::Base)?).metadata().map_err(ProvisionError::Base)?.len();
    match disk_mb.map(|mb| u64::from(mb) << 20) {
        None => Ok(base_size),
        Some(b) if b < base_size => Err(ProvisionError::TooSmall(base_size.div_ceil(1 << 20))),
        Some(b) => Ok(b),
    }
}

/// Makes VM `name`'s overlay of `size` bytes (over `base`, which QEMU is to know as
/// `/dev/fdset/1`) and seed in `dir`, and opens them.
pub(super) fn make(dir: &VmDir, name: &str, seed: &hv::cloud::Seed, size: u64) -> Result<Disks, ProvisionError> {
    let scratch = dir.path.join("seed.d");
    let overlay = dir.path.join("disk.qcow2");
    let iso = dir.path.join("seed.iso");
    let make_error = |source| ProvisionError::Make { vm: name.to_string(), source };
    std::fs::DirBuilder::new().mode(0o700).create(&scratch).map_err(file_error(&scratch))?;
    let made = hv::cloud::write_iso(seed, &scratch, &iso);
    let _ = std::fs::remove_dir_all(&scratch);
    made.map_err(make_error)?;
    hv::cloud::make_overlay("/dev/fdset/1", size, &overlay).map_err(make_error)?;
    open_disks(&overlay, &iso)
}

/// Opens an overlay (both ways) and a seed volume, never through a link.
fn open_disks(overlay: &Path, iso: &Path) -> Result<Disks, ProvisionError> {
    let open = |p: &Path, write: bool| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_NOFOLLOW)
            .open(p)
            .map_err(file_error(p))
    };
    let iso_file = open(iso, false)?;
    let (rw, ro) = (open(overlay, true)?, open(overlay, false)?);
    Ok(Disks { overlay: OwnedFd::from(rw), overlay_ro: OwnedFd::from(ro), seed: OwnedFd::from(iso_file) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn private_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("omerta-provision-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::DirBuilder::new().mode(0o755).create(&d).unwrap();
        d
    }

    #[test]
    fn a_vmm_directory_is_private_fresh_and_gone_when_dropped() {
        let state = private_dir("layout");
        let layout = Layout::prepare(&state).unwrap();
        let m = std::fs::metadata(state.join("launcher")).unwrap();
        assert_eq!(m.mode() & 0o777, 0o700);
        let a = layout.new_vm().unwrap();
        let b = layout.new_vm().unwrap();
        assert_ne!(a.path, b.path, "each VMM has a directory of its own");
        assert_eq!(std::fs::metadata(&a.path).unwrap().mode() & 0o777, 0o700);
        std::fs::write(a.console(), vec![b'x'; 64 * 1024]).unwrap();
        assert!(a.allocated() >= 64 * 1024, "{}", a.allocated());
        let path = a.path.clone();
        drop(a);
        assert!(!path.exists(), "dropped: its files are gone");
        // What a launcher that was killed left is removed by the next one.
        let left = b.path.clone();
        std::mem::forget(b);
        layout.remove_leftovers(None);
        assert!(!left.exists());
        let _ = std::fs::remove_dir_all(&state);
    }

    #[test]
    fn a_described_directory_outlives_its_launcher_and_nothing_else_does() {
        let state = private_dir("kept");
        let layout = Layout::prepare(&state).unwrap();
        let spec = super::super::protocol::StartSpec {
            name: "vm".into(),
            cmdline: "x".into(),
            memory_mib: 64,
            cpus: 1,
            mac: "52:54:00:12:34:56".into(),
            uid_slot: None,
            image: None,
            disk_mb: Some(3000),
        };
        let base = BaseId { ino: 2, size: 3, mtime_ns: 4 };
        // Described, with its disk and seed: kept (as a launcher that stops leaves it).
        let mut kept = layout.new_vm().unwrap();
        let (kernel_sha256, initrd_sha256) = ("k".to_string(), "i".to_string());
        kept.describe(&KeptFile { spec, base, charge: 9, kernel_sha256, initrd_sha256 }).unwrap();
        for f in ["disk.qcow2", "seed.iso"] {
            std::fs::write(kept.path.join(f), b"x").unwrap();
        }
        assert_eq!(std::fs::metadata(kept.path.join(KEPT_FILE)).unwrap().mode() & 0o777, 0o600);
        kept.keep();
        let kept_path = kept.path.clone();
        drop(kept);
        assert!(kept_path.exists(), "a kept directory stays when dropped");
        // Not described (a plain guest's), described but without its disk, a stray file.
        let plain = layout.new_vm().unwrap();
        let plain_path = plain.path.clone();
        std::mem::forget(plain);
        let diskless = layout.new_vm().unwrap();
        std::fs::copy(kept_path.join(KEPT_FILE), diskless.path.join(KEPT_FILE)).unwrap();
        let diskless_path = diskless.path.clone();
        std::mem::forget(diskless);
        std::fs::write(layout.vms().join("stray"), b"x").unwrap();
        let found = layout.kept();
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].0.path.clone(), found[0].1.base, found[0].1.charge), (kept_path.clone(), base, 9));
        assert_eq!(found[0].1.spec.disk_mb, Some(3000));
        assert!(!plain_path.exists() && !diskless_path.exists() && !layout.vms().join("stray").exists());
        // Dropped without keeping (released, or its lease ran out): gone.
        drop(found);
        assert!(!kept_path.exists());
        let _ = std::fs::remove_dir_all(&state);
    }

    #[test]
    fn a_console_keeps_its_last_bytes_and_no_more_room() {
        use std::io::Write as _;
        let state = private_dir("console");
        let layout = Layout::prepare(&state).unwrap();
        let vm = layout.new_vm().unwrap();
        let max = 256 * 1024;
        // A guest that prints 4 MiB, in lines, while the bound is kept every 512 KiB.
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(vm.console()).unwrap();
        for i in 0..(4 << 20) / 64 {
            writeln!(f, "{i:063}").unwrap();
            if i % 8192 == 0 {
                bound_console(&vm.console(), max).unwrap();
            }
        }
        assert!(bound_console(&vm.console(), max).unwrap() > 0);
        let m = std::fs::metadata(vm.console()).unwrap();
        assert_eq!(m.len(), 4 << 20, "its length (the offsets readers hold) is kept");
        assert!(m.blocks() * 512 <= max + 8192, "{} bytes on the host, bound {max}", m.blocks() * 512);
        let text = std::fs::read(vm.console()).unwrap();
        let last = format!("{:063}\n", (4 << 20) / 64 - 1);
        assert!(text.ends_with(last.as_bytes()), "the latest output is kept");
        assert!(text[..1024].iter().all(|b| *b == 0), "the oldest is a hole");
        // Bounded already: nothing more to free.
        assert_eq!(bound_console(&vm.console(), max).unwrap(), 0);
        drop(vm);
        let _ = std::fs::remove_dir_all(&state);
    }

    #[test]
    fn one_launcher_per_state_directory() {
        let state = private_dir("taken");
        let first = Layout::prepare(&state).unwrap();
        let e = Layout::prepare(&state).unwrap_err().to_string();
        assert!(e.contains("another engine's launcher uses it"), "{e}");
        drop(first);
        assert!(Layout::prepare(&state).is_ok(), "free again once the first is gone");
        let _ = std::fs::remove_dir_all(&state);
    }

    #[test]
    fn a_state_directory_others_may_change_is_refused() {
        let state = private_dir("unsafe");
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = Layout::prepare(&state).unwrap_err().to_string();
        assert!(e.contains("writable by others"), "{e}");
        // Sticky, as /tmp: others may not rename what is ours in it.
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(Layout::prepare(&state).is_ok());
        let _ = std::fs::remove_dir_all(&state);
    }
}
