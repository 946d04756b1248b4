//! Backends and capabilities: which backends a test runs against, and `require`, which fails a
//! test that lacks a capability under `CI=true` and skips it visibly elsewhere.
use engine::worker::Backend;

/// Both backends, each test runs against each.
pub const BACKENDS: [Backend; 2] = [Backend::Portable, Backend::Uring];

/// The backends to test: both, or those named in `OMERTA_TEST_BACKENDS` (comma-separated),
/// which CI never sets.
pub fn backends() -> Vec<Backend> {
    match std::env::var("OMERTA_TEST_BACKENDS") {
        Ok(v) if !v.is_empty() => {
            v.split(',').map(|b| b.parse().expect("OMERTA_TEST_BACKENDS: uring or portable")).collect()
        }
        _ => BACKENDS.to_vec(),
    }
}

/// The name a backend reports when it runs.
pub fn backend_name(b: Backend) -> &'static str {
    match b {
        Backend::Uring => "io_uring",
        _ => "portable",
    }
}

/// True under CI, where a missing capability is a failure.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Checks a capability. Under CI a missing one fails the test; elsewhere the test says it
/// skipped and why, and returns false.
pub fn require(what: &str, ok: Result<(), String>) -> bool {
    match ok {
        Ok(()) => true,
        Err(why) if ci() => panic!("CI=true and this test needs {what}: {why}"),
        Err(why) => {
            eprintln!("SKIPPED (needs {what}: {why})");
            false
        }
    }
}

/// [`require`] of the programs `commands` on `PATH` (`make setup` installs them).
pub fn require_commands(commands: &[&str]) -> bool {
    let missing: Vec<&str> = commands
        .iter()
        .copied()
        .filter(|c| {
            !std::process::Command::new("sh")
                .args(["-c", &format!("command -v {c}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    let what = format!("{} (make setup installs them)", commands.join(" and "));
    require(&what, if missing.is_empty() { Ok(()) } else { Err(format!("{} missing", missing.join(", "))) })
}
