//! Admission of a VMM's disk: the launcher grants no disk the state directory cannot hold,
//! counting what it already granted as if every guest filled its disk. Arithmetic only; the
//! numbers come from `qemu-img measure`, `statvfs` and the files' allocated blocks.

/// What a VMM's files may take besides its disk: the seed volume (a few hundred KiB) and the
/// console, with room to spare.
pub(super) const FILES_ALLOWANCE: u64 = 8 << 20;

/// What is kept free in the state directory whatever the grants.
pub(super) const RESERVE: u64 = 256 << 20;

/// The room the state directory has, as the launcher counts it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Room {
    /// Bytes still free in its file system (`statvfs`).
    pub(super) available: u64,
    /// Bytes the files of the VMMs it holds take now (already out of `available`).
    pub(super) allocated: u64,
    /// Bytes it granted them: each one's most (a disk filled, its seed, its console).
    pub(super) granted: u64,
}

/// Why a disk was refused; the sentence goes back to whoever asked for the VM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the provider cannot hold this disk: {asked_mb} MB asked, {left_mb} MB not yet granted in {dir}{}", overcommit_note(*.ratio))]
pub struct Full {
    /// The disk's most, in MB.
    pub asked_mb: u64,
    /// What may still be granted, in MB.
    pub left_mb: u64,
    /// The state directory.
    pub dir: String,
    /// `--disk-overcommit`, in hundredths.
    pub ratio: u32,
}

fn overcommit_note(ratio: u32) -> String {
    if ratio == 100 {
        " (no overcommit)".into()
    } else {
        format!(" (overcommit {}.{:02}x)", ratio / 100, ratio % 100)
    }
}

/// Whether a new grant of `charge` bytes fits: everything granted, the new one included, within
/// `ratio` (hundredths) times the directory's capacity (its free bytes plus what the held
/// VMMs' files already take) less [`RESERVE`].
pub(super) fn admit(room: Room, charge: u64, ratio: u32, dir: &str) -> Result<(), Full> {
    let capacity = u128::from(room.available) + u128::from(room.allocated);
    let limit = (capacity * u128::from(ratio) / 100).saturating_sub(u128::from(RESERVE));
    let left = limit.saturating_sub(u128::from(room.granted));
    if u128::from(charge) <= left {
        return Ok(());
    }
    let mb = |b: u128| u64::try_from(b >> 20).unwrap_or(u64::MAX);
    Err(Full { asked_mb: mb(u128::from(charge)), left_mb: mb(left), dir: dir.into(), ratio })
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    #[test]
    fn grants_never_pass_the_room_times_the_ratio() {
        let empty = Room { available: 10 * G, allocated: 0, granted: 0 };
        assert!(admit(empty, 9 * G, 100, "/s").is_ok());
        // The reserve stays free.
        assert!(admit(empty, 10 * G, 100, "/s").is_err());
        // A guest that filled half its grant: the half it took is still capacity, its whole
        // grant still counted.
        let held = Room { available: 6 * G, allocated: 4 * G, granted: 8 * G };
        assert!(admit(held, G, 100, "/s").is_ok());
        let e = admit(held, 2 * G, 100, "/var/lib/omerta").unwrap_err();
        assert_eq!(
            e.to_string(),
            "the provider cannot hold this disk: 2048 MB asked, 1792 MB not yet granted in /var/lib/omerta (no overcommit)"
        );
        // An operator's ratio lets grants pass the room.
        assert!(admit(held, 2 * G, 150, "/s").is_ok());
        assert!(admit(held, 20 * G, 150, "/s").unwrap_err().to_string().ends_with("(overcommit 1.50x)"));
        // Absurd numbers do not overflow.
        assert!(
            admit(Room { available: u64::MAX, allocated: u64::MAX, granted: u64::MAX }, u64::MAX, 10_000, "/s").is_ok()
        );
        assert!(admit(Room { available: 0, allocated: 0, granted: u64::MAX }, 1, 100, "/s").is_err());
    }
}
