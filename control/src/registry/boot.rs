//! A started guest's readiness, read from its serial console.
use std::time::{Duration, Instant};

/// A started guest's readiness, read from its console: guest input, so read in bounded
/// pieces and matched strictly (a whole line that is exactly [`READY_LINE`]).
#[derive(Debug)]
pub(super) struct Boot {
    pub(super) state: BootState,
    pub(super) started: Instant,
    pub(super) timeout: Duration,
    /// How far the console has been read.
    pub(super) offset: u64,
    /// The unfinished last line (at most [`MAX_LINE`] bytes are kept).
    pub(super) partial: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum BootState {
    Booting,
    Ready(Duration),
    /// Not ready in time; the console's last lines (printable ASCII only).
    Failed(Vec<String>),
}

/// The line a guest prints on its serial console when its setup is complete.
pub const READY_LINE: &str = "OMERTA-READY";
/// How long a guest may take to become ready by default.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest console line looked at; the console bytes read per check.
pub(super) const MAX_LINE: usize = 256;
pub(super) const READ_PER_CHECK: usize = 64 * 1024;

impl Boot {
    pub(super) fn new(timeout: Duration) -> Self {
        Self { state: BootState::Booting, started: Instant::now(), timeout, offset: 0, partial: Vec::new() }
    }

    /// Reads what the guest printed since the last check; true once it is ready.
    pub(super) fn check(&mut self, vm: &crate::launcher::RemoteVm) -> bool {
        let (bytes, next) = vm.console_from(self.offset, READ_PER_CHECK);
        self.offset = next;
        for &b in &bytes {
            if b == b'\n' {
                let line = std::mem::take(&mut self.partial);
                let line = line.strip_suffix(b"\r").unwrap_or(&line);
                if line == READY_LINE.as_bytes() {
                    return true;
                }
            } else if self.partial.len() < MAX_LINE {
                self.partial.push(b);
            }
        }
        false
    }
}

/// The last `n` lines of a console, reduced to printable ASCII, each at most [`MAX_LINE`].
pub(super) fn console_tail(text: &str, n: usize) -> Vec<String> {
    let mut lines: Vec<String> = text
        .lines()
        .rev()
        .filter(|l| !l.trim().is_empty())
        .take(n)
        .map(|l| l.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(MAX_LINE).collect())
        .collect();
    lines.reverse();
    lines
}
