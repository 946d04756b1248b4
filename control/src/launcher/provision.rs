//! A cloud image's disks, made by the launcher in its state directory: the NoCloud seed
//! volume (from a checked `hv::cloud::Seed`) and a qcow2 overlay over the base image, each
//! opened and unlinked at once, so they exist only as the VMM's open files. Also the removal
//! of what a launcher that died mid-way left (seed files hold private keys).
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Why a cloud image's disks could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The base image's size could not be read.
    #[error("the base image: {0}")]
    Base(std::io::Error),
    /// A file or directory of the state directory.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// genisoimage or qemu-img failed.
    #[error("launcher: vm {vm}: {source}")]
    Make {
        /// The VM.
        vm: String,
        /// What `hv::cloud` said.
        source: hv::cloud::SeedError,
    },
}

/// A cloud image's disks: its overlay read-write and read-only (QEMU opens a writable disk
/// both ways) and its seed volume; 0600, unlinked, held by nobody but the VMM that gets them.
#[derive(Debug)]
pub(super) struct Disks {
    pub(super) overlay: OwnedFd,
    pub(super) overlay_ro: OwnedFd,
    pub(super) seed: OwnedFd,
}

/// Makes VM `name`'s overlay (over `base`, which QEMU is to know as `/dev/fdset/1`) and seed
/// in `dir`, opens them and unlinks them.
pub(super) fn make(dir: &Path, name: &str, seed: &hv::cloud::Seed, base: &OwnedFd) -> Result<Disks, ProvisionError> {
    use std::os::unix::fs::DirBuilderExt;
    let size =
        File::from(base.try_clone().map_err(ProvisionError::Base)?).metadata().map_err(ProvisionError::Base)?.len();
    let scratch = dir.join(format!("omerta-{name}.seed.d"));
    let overlay = dir.join(format!("omerta-{name}.overlay.qcow2"));
    let iso = dir.join(format!("omerta-{name}.seed.iso"));
    let file_error = |p: &Path| {
        let path = p.to_path_buf();
        move |source| ProvisionError::File { path, source }
    };
    let make_error = |source| ProvisionError::Make { vm: name.to_string(), source };
    // Leftovers of a launcher that died mid-way, never followed if they are links.
    let _ = std::fs::remove_dir_all(&scratch);
    let _ = std::fs::remove_file(&overlay);
    let _ = std::fs::remove_file(&iso);
    std::fs::DirBuilder::new().mode(0o700).create(&scratch).map_err(file_error(&scratch))?;
    let made = hv::cloud::write_iso(seed, &scratch, &iso);
    let _ = std::fs::remove_dir_all(&scratch);
    made.map_err(make_error)?;
    let open = |p: &Path, write: bool| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_NOFOLLOW)
            .open(p)
            .map_err(file_error(p))
    };
    let iso_file = open(&iso, false);
    let _ = std::fs::remove_file(&iso);
    let iso_file = iso_file?;
    hv::cloud::make_overlay("/dev/fdset/1", size, &overlay).map_err(make_error)?;
    let (rw, ro) = (open(&overlay, true), open(&overlay, false));
    let _ = std::fs::remove_file(&overlay);
    Ok(Disks { overlay: OwnedFd::from(rw?), overlay_ro: OwnedFd::from(ro?), seed: OwnedFd::from(iso_file) })
}

/// Removes what an earlier launcher that died mid-way may have left of a VM's provisioning in
/// `dir` (seed files hold private keys): `omerta-*.seed.iso`, `omerta-*.seed.d`,
/// `omerta-*.overlay.qcow2`. Links are removed, never followed.
pub(super) fn remove_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let ours = name.starts_with("omerta-")
            && (name.ends_with(".seed.iso") || name.ends_with(".seed.d") || name.ends_with(".overlay.qcow2"));
        if !ours {
            continue;
        }
        let path = e.path();
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {
                let _ = std::fs::remove_dir_all(&path);
            }
            Ok(_) => {
                let _ = std::fs::remove_file(&path);
            }
            Err(_) => {}
        }
        engine::warn!("launcher: removed {} (left by an earlier launcher)", path.display());
    }
}
