//! Who the engine and its VMMs run as, decided once before the launcher is forked ([`Plan`]),
//! and the directories of handle sockets, made for the user that binds them.
use std::path::{Path, PathBuf};

use super::{Options, StartError};
use crate::launcher;
use crate::registry::Registry;

/// The state directory when the engine runs as root and `--state-dir` is not given.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/omerta";

/// What startup decided from the command line: the users, the control socket, the state
/// directory. Read by every phase; it grants nothing itself.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The user the engine drops to (`None`: it keeps its own, `--runas self` or not root).
    pub runas: Option<hv::VmmUser>,
    /// The user VMMs run as (`None`: the launcher's own; never root when that is root).
    pub vmm: Option<hv::VmmUser>,
    /// `--vmm-uid-base`, checked.
    pub vmm_uid_base: Option<u32>,
    /// The control socket (`None`: `--no-control`).
    pub control: Option<PathBuf>,
    /// `--control-gid`.
    pub control_gid: Option<u32>,
    /// `--metrics-listen`.
    pub metrics_listen: Option<String>,
    /// The state directory (`--state-dir`): guests' consoles and disks go in its `launcher/`.
    /// Without a control socket there is none (no `vm start`), and no launcher but for the
    /// fence.
    pub state_dir: Option<PathBuf>,
    /// `--disk-overcommit`, in hundredths.
    pub disk_overcommit: u32,
    /// The effective uid the engine was started as.
    pub started_as: u32,
    /// The engine's user, whom the kernel fence holds (`None`: `--kernel-fence=off`).
    pub fence: Option<u32>,
    /// `--launcher`: the socket of a launcher that outlives the engine (none: it is forked).
    pub launcher_at: Option<PathBuf>,
    /// Where guests' records go (`STATE/engine`), when their VMMs outlive the engine.
    pub records: Option<PathBuf>,
}

impl Plan {
    /// Decides the users (refusing a VMM user that is root) and the paths.
    pub fn new(opts: &Options) -> Result<Plan, StartError> {
        let usage = StartError::Usage;
        let runas = runas_user(opts.runas.as_deref()).map_err(usage)?;
        let started_as = sys::effective_ids().0;
        let vmm = vmm_user(opts.vmm_user.as_deref()).map_err(usage)?;
        if let Some(u) = &vmm {
            engine::info!("guests' VMMs run as {} (uid {}, gid {})", u.name, u.uid, u.gid);
        }
        // As root, VMMs never run as root: `self` is the engine's own user after the drop.
        let vmm = match (vmm, opts.vmm_user.as_deref(), &runas) {
            (_, Some("self"), Some(u)) => Some(u.clone()),
            (None, _, _) if started_as == 0 && opts.vmm_uid_base.is_none() => {
                return Err(usage(
                    "guests' VMMs would run as root: name their user with --vmm-user (or create omerta-vmm), or use --vmm-uid-base".into(),
                ))
            }
            (Some(u), _, _) if u.uid == 0 || u.gid == 0 => {
                return Err(usage(format!("--vmm-user {}: VMMs never run as root", u.name)))
            }
            (v, _, _) => v,
        };
        if let (Some(v), Some(r)) = (&vmm, &runas) {
            if v.uid == r.uid && opts.vmm_uid_base.is_none() {
                engine::warn!(
                    "the engine and guests' VMMs share uid {} ({}): a VMM taken over could replace handle sockets; create the omerta-vmm user or use --vmm-uid-base",
                    v.uid,
                    v.name
                );
            }
        }
        match opts.vmm_uid_base {
            Some(n) if !(1000..=u32::MAX - launcher::VMM_UID_RANGE).contains(&n) => {
                return Err(usage("--vmm-uid-base: a uid from 1000 up, below 2^32 - 65536".into()))
            }
            Some(_) if started_as != 0 => return Err(usage("--vmm-uid-base needs the engine to run as root".into())),
            Some(n) => engine::info!("each guest's VMM runs as a uid of its own from {n} up"),
            None => {}
        }
        // By default /var/lib/omerta as root; else beside the control socket (a lab's engine).
        let state_dir = opts.control.as_ref().and_then(|p| p.parent()).map(|beside| match &opts.state_dir {
            Some(d) => d.clone(),
            None if started_as == 0 => PathBuf::from(DEFAULT_STATE_DIR),
            None => beside.to_path_buf(),
        });
        let disk_overcommit = match opts.disk_overcommit.as_deref() {
            None => 100,
            Some(r) => hundredths(r).filter(|h| (100..=10_000).contains(h)).ok_or_else(|| {
                usage(format!("--disk-overcommit {r}: a ratio from 1 (none, the default) to 100, at most two decimals"))
            })?,
        };
        let fence = fence_user(opts.kernel_fence, started_as, runas.as_ref()).map_err(usage)?;
        if opts.launcher.is_some() && started_as != 0 {
            return Err(usage("--launcher needs the engine to start as root (the launcher serves root alone)".into()));
        }
        let records = opts.launcher.as_ref().and(state_dir.as_ref()).map(|s| s.join("engine"));
        Ok(Plan {
            runas,
            vmm,
            vmm_uid_base: opts.vmm_uid_base,
            control: opts.control.clone(),
            control_gid: opts.control_gid,
            metrics_listen: opts.metrics_listen.clone(),
            state_dir,
            disk_overcommit,
            started_as,
            fence,
            launcher_at: opts.launcher.clone(),
            records,
        })
    }

    /// The launcher's setup (`durable`: it outlives its engines, `--serve-launcher`).
    pub fn launcher_setup(&self, durable: bool) -> launcher::Setup {
        launcher::Setup {
            state_dir: self.state_dir.clone(),
            disk_overcommit: self.disk_overcommit,
            vmm_user: self.vmm.clone(),
            vmm_uid_base: self.vmm_uid_base,
            control: self.control.clone(),
            fence: self.fence,
            durable,
        }
    }

    /// Tells the registry who VMMs run as and where their images may come from.
    pub fn configure(&self, registry: &mut Registry, opts: &Options) -> Result<(), StartError> {
        if let Some(dir) = &self.records {
            registry.set_records(dir.clone());
        }
        registry.set_vmm_user(self.vmm.clone());
        registry.set_vmm_uid_base(self.vmm_uid_base);
        registry.set_image_dirs(&opts.image_dirs).map_err(StartError::Usage)
    }
}

/// A decimal with at most two decimals (`1`, `1.5`, `2.25`) in hundredths.
fn hundredths(s: &str) -> Option<u32> {
    let (int, frac) = s.split_once('.').unwrap_or((s, "0"));
    if int.is_empty()
        || frac.is_empty()
        || frac.len() > 2
        || !(int.bytes().chain(frac.bytes())).all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let frac: u32 = format!("{frac:0<2}").parse().ok()?;
    int.parse::<u32>().ok()?.checked_mul(100)?.checked_add(frac)
}

/// The user the engine drops to: the one named, none for `self` (or when not started as
/// root); by default `omerta` where it exists, else `nobody` (as passt does).
fn runas_user(name: Option<&str>) -> Result<Option<hv::VmmUser>, String> {
    let root = sys::effective_ids().0 == 0;
    let user = match name {
        Some("self") => return Ok(None),
        Some(_) if !root => return Err("--runas needs the engine to start as root".into()),
        Some(n) => hv::VmmUser::lookup(n).ok_or_else(|| format!("--runas: no user named '{n}'"))?,
        None if !root => return Ok(None),
        None => {
            launcher::default_engine_user().ok_or("--runas: neither an omerta nor a nobody user exists; name one")?
        }
    };
    if user.uid == 0 {
        return Err(format!("--runas {}: that is root; use --runas self to keep root", user.name));
    }
    Ok(Some(user))
}

/// The uid the kernel fence holds: the engine's own, dedicated user. Refused (one line naming
/// `--kernel-fence=off`) when the engine cannot have one: not started as root (no launcher may
/// keep the fence), keeping root (`--runas self`: every root process of the namespace would be
/// fenced), or dropping to `nobody`, which other programs share.
fn fence_user(on: bool, started_as: u32, runas: Option<&hv::VmmUser>) -> Result<Option<u32>, String> {
    const OFF: &str = "or run without the fence: --kernel-fence=off";
    if !on {
        engine::warn!("kernel fence off (--kernel-fence=off): only the engine's own code keeps its sockets to the allowlisted endpoints");
        return Ok(None);
    }
    if started_as != 0 {
        return Err(format!(
            "the kernel fence needs the engine started as root (its launcher keeps the nftables fence); {OFF}"
        ));
    }
    match runas {
        None => Err(format!("--runas self keeps root, which the kernel fence cannot hold apart from the host's other root processes; {OFF}")),
        Some(u) if u.name == "nobody" || u.uid == 65534 => Err(format!(
            "the kernel fence holds the engine's user, and {} is shared with other programs: create the omerta user (make setup) or name a dedicated one with --runas; {OFF}",
            u.name
        )),
        Some(u) => Ok(Some(u.uid)),
    }
}

/// The user VMMs run as: the one named, none for `self`; by default, as root, `omerta-vmm`
/// where it exists, else `nobody` (as passt does); otherwise the engine's own user.
fn vmm_user(name: Option<&str>) -> Result<Option<hv::VmmUser>, String> {
    match name {
        Some("self") => Ok(None),
        Some(n) => hv::VmmUser::lookup(n).map(Some).ok_or_else(|| format!("--vmm-user: no user named '{n}'")),
        None if sys::effective_ids().0 == 0 => {
            Ok(hv::VmmUser::lookup("omerta-vmm").or_else(|| hv::VmmUser::lookup("nobody")))
        }
        None => Ok(None),
    }
}

/// The directory a path handle's socket goes in.
pub(super) fn handle_dir(h: &engine::config::HandleSpec) -> Option<PathBuf> {
    match h {
        engine::config::HandleSpec::Dgram { path, .. } | engine::config::HandleSpec::Stream(path) => {
            path.parent().filter(|p| !p.as_os_str().is_empty()).map(Path::to_path_buf)
        }
        _ => None,
    }
}

/// Makes `dir` and its missing parents as the engine's own user, 0700 (an existing one is left
/// as it is): where a handle socket goes when no other user is to own it.
pub(super) fn make_own_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Makes `dir` (and missing parents, root's) if it does not exist, the last one `user`'s, 0700:
/// made, then opened without following a symlink and checked to be the directory just made by
/// root before its owner and mode change through that descriptor (a link swapped in meanwhile
/// is refused, never followed).
pub(super) fn make_dir_for(dir: &Path, user: &hv::VmmUser) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    if std::fs::symlink_metadata(dir).is_ok() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::create_dir(dir)?;
    let d = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW).open(dir)?;
    let m = d.metadata()?;
    if !m.is_dir() || m.uid() != 0 {
        return Err(std::io::Error::other("not the directory just made; left alone"));
    }
    d.set_permissions(std::fs::Permissions::from_mode(0o700))?;
    std::os::unix::fs::fchown(&d, Some(user.uid), Some(user.gid))
}

#[cfg(test)]
mod tests {
    use super::hundredths;

    #[test]
    fn a_ratio_reads_in_hundredths_or_not_at_all() {
        assert_eq!(hundredths("1"), Some(100));
        assert_eq!(hundredths("1.5"), Some(150));
        assert_eq!(hundredths("2.25"), Some(225));
        for bad in ["", ".5", "1.", "1.234", "-1", "1e3", "x", "99999999999"] {
            assert_eq!(hundredths(bad), None, "{bad}");
        }
    }
}
