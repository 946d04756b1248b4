//! State files, the one way every daemon writes them: a whole file replaced at once (written
//! beside it, synced, renamed over it, its directory synced), so after a kill or a power cut
//! the file is the old one or the new one, never torn or missing; and a file that does not
//! parse moved aside for the operator ([`quarantine`]), never silently dropped.
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Replaces `path` with `data` atomically; the file gets `mode` (`0o600` for anything that
/// holds a key).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| std::io::Error::other(format!("the OS random source: {e}")))?;
    let nonce: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = path.with_file_name(format!(".{name}.{nonce}.tmp"));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| f.write_all(data).and_then(|()| f.sync_all()));
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // The rename reaches the disk with its directory.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir).and_then(|d| d.sync_all())?;
    }
    Ok(())
}

/// Reads a state file that only this process's user may have written: opened without
/// following a link or blocking on a FIFO, refused unless it is a regular file of this user
/// of at most `max` bytes.
pub fn read_own(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    use std::os::unix::fs::MetadataExt as _;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| e.to_string())?;
    let m = f.metadata().map_err(|e| e.to_string())?;
    if !m.is_file() || m.uid() != sys::effective_ids().0 || m.len() > max {
        return Err(format!("not a regular file of this user of at most {max} bytes"));
    }
    let mut bytes = Vec::new();
    f.take(max).read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// Where a state file that cannot be used is moved: `NAME.WHAT-<unix seconds>` beside it.
pub fn quarantine_path(path: &Path, what: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    path.with_file_name(format!("{name}.{what}-{now}"))
}

/// Moves `path` aside (see [`quarantine_path`]) and says so in one line with `why`; returns
/// where it went.
pub fn quarantine(path: &Path, what: &str, why: &str) -> Option<PathBuf> {
    let to = quarantine_path(path, what);
    match std::fs::rename(path, &to) {
        Ok(()) => {
            engine::error!("state file {} {why}: moved to {} for the operator", path.display(), to.display());
            Some(to)
        }
        Err(e) => {
            engine::error!("state file {} {why}, and cannot be moved aside: {e}", path.display());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_state_file_is_replaced_whole_with_its_mode_and_a_bad_one_moved_aside() {
        let dir = std::env::temp_dir().join(format!("omerta-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("vm.json");
        write_atomic(&f, b"{\"a\":1}", 0o600).unwrap();
        write_atomic(&f, b"{\"a\":2}", 0o600).unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"{\"a\":2}");
        assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600);
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        // A symlink in the temporary name's place is not followed (create_new).
        let to = quarantine(&f, "corrupt", "does not parse").unwrap();
        assert!(!f.exists() && to.exists(), "{}", to.display());
        assert!(to.file_name().unwrap().to_string_lossy().starts_with("vm.json.corrupt-"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
