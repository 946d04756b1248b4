//! Who runs what: the user an engine started as root drops to, the user a VMM runs as (the
//! one configured at the fork, or a uid of the `--vmm-uid-base` range by slot; never one a
//! request names, never root), and what test harnesses need to know of both.
use super::Setup;

/// How many uids `--vmm-uid-base` spans: a slot is below this.
pub const VMM_UID_RANGE: u32 = 65536;

/// The user an engine started as root drops to when `--runas` names none: `omerta` where it
/// exists, else `nobody` (as passt does).
pub fn default_engine_user() -> Option<hv::VmmUser> {
    hv::VmmUser::lookup("omerta").or_else(|| hv::VmmUser::lookup("nobody"))
}

/// The user this process's engines run as when started without `--runas`: the default one
/// when this process is root, else none (an engine keeps its user). For test harnesses, which
/// make the directories engines write in.
pub fn engine_user_for_children() -> Option<hv::VmmUser> {
    (sys::effective_ids().0 == 0).then(default_engine_user).flatten()
}

/// Makes `path` (a directory an engine makes sockets in, or a VMM's socket it writes to) the
/// user's of engines this process starts (see [`engine_user_for_children`]).
pub fn give_to_engine_user(path: &std::path::Path) -> std::io::Result<()> {
    match engine_user_for_children() {
        Some(u) => std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid)),
        None => Ok(()),
    }
}

/// Why the launcher will not choose a user for a VMM.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The slot is beyond the range or another VMM holds it.
    #[error("launcher: uid slot {0} is not free")]
    SlotTaken(u32),
    /// The base plus the slot overflows.
    #[error("launcher: bad slot")]
    BadSlot,
    /// As root, no user (or root) was configured.
    #[error("launcher: VMMs never run as root")]
    Root,
}

/// The user a VMM runs as: slot `slot` of the configured range when there is one (it must
/// be below [`VMM_UID_RANGE`] and not `taken`), else the user configured at the fork; never
/// root when the launcher is root.
pub(super) fn vmm_user(
    setup: &Setup,
    slot: Option<u32>,
    taken: impl Fn(u32) -> bool,
) -> Result<Option<hv::VmmUser>, UserError> {
    let user = match (setup.vmm_uid_base, slot) {
        (Some(base), Some(k)) => {
            if k >= VMM_UID_RANGE || taken(k) {
                return Err(UserError::SlotTaken(k));
            }
            let id = base.checked_add(k).ok_or(UserError::BadSlot)?;
            Some(hv::VmmUser { name: format!("uid {id}"), uid: id, gid: id })
        }
        _ => setup.vmm_user.clone(),
    };
    if sys::effective_ids().0 == 0 && user.as_ref().is_none_or(|u| u.uid == 0 || u.gid == 0) {
        return Err(UserError::Root);
    }
    Ok(user)
}
