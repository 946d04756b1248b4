//! The `omerta-engine` process: what its `main` runs once the command line is parsed.
//!
//! - `startup` — the phases, in the only order the types allow: [`startup::Initial`]
//!   (hardened, one thread) → [`startup::Forked`] (the launcher) → [`startup::Bound`] (the
//!   sockets that need root) → [`startup::Dropped`] (the engine's own user) →
//!   [`startup::Confined`] (the control thread's filter). The security argument is at the
//!   top of that file.
//! - `users` — who the engine and VMMs run as ([`Plan`]), and the directories made for them.
//! - `control_loop` — the control thread once confined: VMs, requests, worker events,
//!   signals, and the shutdown.
//! - `reload` — SIGHUP: the configuration file read again and its differences applied.
//! - `check` — `--check`: the configuration verified against this host and printed.
//!
//! It lives in the library, not beside the binary, so the phases' types are private to a
//! module whose unit tests run with the crate's (`cargo test -p omerta-control`), and the
//! binary is only its command line.
use std::path::PathBuf;
use std::process::ExitCode;

use engine::config::VmConfig;
use engine::worker::Backend;

use crate::config;

mod check;
pub mod control_loop;
pub mod reload;
pub mod startup;
mod users;

pub use check::check;
pub use reload::Configured;
pub use users::Plan;

/// Why the engine does not start: bad usage (exit status 2, said on stderr) or a failure
/// (exit status 1, logged).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The command line or the configuration is wrong.
    #[error("{0}")]
    Usage(String),
    /// Something the engine needs failed.
    #[error("{0}")]
    Failed(String),
}

impl StartError {
    /// Says it (usage on stderr, a failure in the log) and gives the exit status.
    pub fn report(self) -> ExitCode {
        match self {
            StartError::Usage(msg) => usage(&msg),
            StartError::Failed(msg) => {
                engine::error!("{msg}");
                ExitCode::from(1)
            }
        }
    }
}

/// Bad usage: one line on stderr, exit status 2.
pub fn usage(msg: &str) -> ExitCode {
    eprintln!("omerta-engine: {msg}");
    ExitCode::from(2)
}

/// What the command line asks of the engine beyond its VMs.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--runas`.
    pub runas: Option<String>,
    /// `--vmm-user`.
    pub vmm_user: Option<String>,
    /// `--vmm-uid-base`.
    pub vmm_uid_base: Option<u32>,
    /// `--image-dir`.
    pub image_dirs: Vec<PathBuf>,
    /// The control socket's path (`None`: `--no-control`).
    pub control: Option<PathBuf>,
    /// `--control-gid`.
    pub control_gid: Option<u32>,
    /// `--metrics-listen`.
    pub metrics_listen: Option<String>,
    /// `--stats-interval`, seconds (0: off).
    pub stats_interval: u64,
    /// `--kernel-fence` (on unless the command line says off).
    pub kernel_fence: bool,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--disk-overcommit`, as written.
    pub disk_overcommit: Option<String>,
    /// `--launcher`: the socket of a launcher that outlives this engine.
    pub launcher: Option<PathBuf>,
}

/// The configuration: the file (if any) with the `--vm` flags over it, validated, and the
/// backend (the flag, then `OMERTA_BACKEND`, then the file).
pub fn configuration(
    path: Option<&PathBuf>,
    vm_flags: &[String],
    backend: Option<&str>,
    no_control: bool,
) -> Result<(Configured, Vec<VmConfig>, Backend), StartError> {
    let bad = |e: String| StartError::Usage(e);
    let file = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
            config::parse_file(&text).map_err(|e| bad(format!("{}: {e}", path.display())))?
        }
        None => config::FileConfig::default(),
    };
    let flags = vm_flags
        .iter()
        .map(|s| config::VmDesc::from_pairs(&config::split_spec(s)?))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    let configured = Configured::new(path.cloned(), flags.clone());
    let vms = config::merge(&file.vms, &flags).map_err(|e| bad(e.to_string()))?;
    if vms.is_empty() && no_control {
        return Err(bad(
            "no VM to serve and no control socket: give --vm or a --config with [[vm]] tables (see --help)".into(),
        ));
    }
    // The flag wins, then OMERTA_BACKEND, then the file.
    let backend = match backend.map(str::parse::<Backend>) {
        Some(Ok(b)) => b,
        Some(Err(e)) => return Err(bad(format!("--backend: {e}"))),
        None => match Backend::from_env() {
            Ok(Some(b)) => b,
            Ok(None) => match file.backend.as_deref().map(str::parse::<Backend>) {
                Some(Ok(b)) => b,
                Some(Err(e)) => return Err(bad(format!("config file: backend: {e}"))),
                None => Backend::Auto,
            },
            Err(e) => return Err(bad(e.to_string())),
        },
    };
    Ok((configured, vms, backend))
}

/// Runs the engine: the startup phases in their order, then the control loop until a stop.
/// `initial` is the process as `main` hardened it, still one thread.
pub fn run(
    initial: startup::Initial,
    opts: &Options,
    configured: Configured,
    vms: Vec<VmConfig>,
    backend: Backend,
) -> ExitCode {
    let plan = match Plan::new(opts) {
        Ok(p) => p,
        Err(e) => return e.report(),
    };
    let mut registry = crate::registry::Registry::new(backend);
    if let Err(e) = plan.configure(&mut registry, opts) {
        return e.report();
    }
    let confined = initial
        .fork_launcher(&plan)
        .and_then(|forked| forked.bind(&plan))
        .and_then(|bound| bound.drop_privileges(&plan, &vms))
        .and_then(startup::Dropped::confine);
    match confined {
        Ok(confined) => control_loop::run(confined, registry, configured, vms, &plan, opts.stats_interval),
        Err(e) => e.report(),
    }
}

/// `--serve-launcher PATH`: runs only the launcher, as its own service: it serves engines
/// that connect with `--launcher PATH`, one at a time, and its VMMs outlive them. Set up from
/// the same options as the engine (its users, fence, state directory), so the engine unit and
/// the launcher unit read one configuration.
pub fn serve_launcher(initial: startup::Initial, opts: &Options, path: &std::path::Path) -> ExitCode {
    match Plan::new(opts).and_then(|plan| initial.serve_launcher(&plan, path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.report(),
    }
}
