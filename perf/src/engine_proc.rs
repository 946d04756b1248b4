//! The engine under test: the real `omerta-engine` binary, started as production starts it
//! (`--vm` descriptions, a control socket), one process per device under test.
//!
//! The one engine-process helper of the workspace: the integration tests (`omerta-it`) wrap
//! it in their own `EngineProc`, which takes the proof of a private network namespace and adds
//! `omertactl` for the tests of the CLI.
//!
//! Which binary: `$OMERTA_ENGINE_BIN`, else the `omerta-engine` next to this program (`make
//! perf` builds both). `omerta-perf ab` points `OMERTA_ENGINE_BIN` at another build's binary,
//! so both builds run under the same harness.
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use api::reply::{Reply, VmState};
use api::{Client, ClientError, Request};
use engine::worker::Backend;

/// The binary the harness starts.
pub fn engine_bin() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("OMERTA_ENGINE_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe().map_err(|e| format!("locating omerta-perf: {e}"))?;
    let bin = me.with_file_name("omerta-engine");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!(
            "{} is missing: build it with `cargo build --release -p omerta-control --bin omerta-engine` (make perf does)",
            bin.display()
        ))
    }
}

/// A file descriptor made inheritable for one child: held under this lock from the moment it
/// loses close-on-exec until the child is spawned and the parent's copy is closed, so a child
/// spawned by another thread meanwhile cannot inherit it.
static SPAWN: Mutex<()> = Mutex::new(());
static SEQ: AtomicU64 = AtomicU64::new(0);

/// How the engine is started.
#[derive(Debug, Clone, Copy)]
pub struct Opts {
    /// `OMERTA_BACKEND`.
    pub backend: Backend,
    /// UDP GSO (`OMERTA_GSO=0` turns it off).
    pub gso: bool,
}

/// How to start an engine process: the binary, its scratch directory (made afresh, given to
/// the engine's user; the control socket is `<dir>/ctl/engine.sock` and its stderr
/// `<dir>/stderr`), its arguments (`--control` is added last), extra environment variables, and
/// a descriptor to hand it (named in a description as `fd:N` or `stream-fd:N`).
#[derive(Debug)]
pub struct Launch {
    /// The binary ([`engine_bin`] for `omerta-perf`; the tests' build for the tests).
    pub bin: PathBuf,
    /// The scratch directory, removed on drop.
    pub dir: PathBuf,
    /// The engine's arguments, before `--control`.
    pub args: Vec<std::ffi::OsString>,
    /// Environment variables set for it.
    pub env: Vec<(String, String)>,
    /// A descriptor made inheritable for this child only.
    pub fd: Option<OwnedFd>,
}

/// A running `omerta-engine` process with its control socket in a directory of its own, asked
/// through the typed control API ([`EngineProc::call`]); ended (by its pid) and cleaned up when
/// dropped. The one engine-process helper of the workspace: `omerta-perf` starts it with
/// [`EngineProc::start`], the integration tests (`omerta-it`) with [`EngineProc::launch`] from
/// inside their private network namespace.
#[derive(Debug)]
pub struct EngineProc {
    child: Child,
    control: PathBuf,
    dir: PathBuf,
    /// How it was started (without its descriptor), to start it again ([`EngineProc::restart`]).
    how: Launch,
}

impl EngineProc {
    /// Starts the engine with the VMs `vms` (`--vm` descriptions; none is allowed), handing it
    /// `fd` (named in a description as `fd:N` or `stream-fd:N`) if given, and waits for its
    /// control socket to answer.
    pub fn start(opts: Opts, vms: &[String], fd: Option<OwnedFd>) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!(
            "omerta-perf-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let backend = match opts.backend {
            Backend::Uring => "uring",
            Backend::Portable => "portable",
            Backend::Auto => "auto",
        };
        let env =
            [("OMERTA_BACKEND", backend), ("OMERTA_GSO", if opts.gso { "1" } else { "0" }), ("OMERTA_LOG", "warn")];
        Self::launch(Launch {
            bin: engine_bin()?,
            dir,
            args: vms.iter().flat_map(|v| ["--vm".into(), v.into()]).collect(),
            env: env.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect(),
            fd,
        })
    }

    /// Starts the engine as `how` says and waits (up to 10 s) for its control socket to answer
    /// `status`; why not in one line (with the last line it wrote) otherwise.
    pub fn launch(mut how: Launch) -> Result<Self, String> {
        let dir = how.dir.clone();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // The engine drops root to its own user, who makes the VMs' sockets here.
        control::launcher::give_to_engine_user(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // Guests' disks and consoles in a state directory of this engine's own (beside `dir`,
        // which is the engine user's: the launcher's must be root's), never the host's.
        let state = state_dir(&dir);
        if !how.args.iter().any(|a| a == "--state-dir") {
            let _ = std::fs::remove_dir_all(&state);
            std::fs::create_dir_all(&state).map_err(|e| format!("{}: {e}", state.display()))?;
            how.args.splice(0..0, ["--state-dir".into(), state.into_os_string()]);
        }
        let fd = how.fd.take();
        let child = Self::spawn(&how, fd)?;
        let e = Self { child, control: dir.join("ctl/engine.sock"), dir, how };
        e.ready()
    }

    /// Starts the process `how` describes (its log appended to `<dir>/stderr`).
    fn spawn(how: &Launch, fd: Option<OwnedFd>) -> Result<Child, String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(how.dir.join("stderr"))
            .map_err(|e| format!("engine log: {e}"))?;
        let mut cmd = Command::new(&how.bin);
        cmd.args(&how.args).arg("--control").arg(how.dir.join("ctl/engine.sock")).envs(how.env.iter().cloned());
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let _held = SPAWN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(fd) = &fd {
            sys::set_inheritable(fd.as_fd()).map_err(|e| format!("handle fd: {e}"))?;
        }
        let child = cmd.spawn().map_err(|e| format!("{}: {e}", how.bin.display()))?;
        drop(fd);
        Ok(child)
    }

    /// Ends the engine with `signal` (`TERM`, `KILL`; by its pid) and starts it again as it
    /// was started (no descriptor is handed twice), in the same directory; waits for its
    /// control socket as [`EngineProc::launch`] does.
    pub fn restart(&mut self, signal: &str) -> Result<(), String> {
        self.end(signal);
        self.child = Self::spawn(&self.how, None)?;
        self.wait_ready()
    }

    /// Sends `signal` to the engine (by its pid) and waits for it to end; its exit code.
    pub fn end(&mut self, signal: &str) -> Option<i32> {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill").args([format!("-{signal}"), self.child.id().to_string()]).status();
        }
        self.child.wait().ok().and_then(|s| s.code())
    }

    fn ready(mut self) -> Result<Self, String> {
        self.wait_ready()?;
        Ok(self)
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let e = self;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = e.child.try_wait() {
                return Err(format!("omerta-engine exited ({st}): {}", e.last_log_line()));
            }
            if e.call(&Request::Status).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("omerta-engine's control socket never answered: {}", e.last_log_line()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn last_log_line(&self) -> String {
        let text = self.stderr();
        text.lines().last().unwrap_or("(nothing on stderr)").to_string()
    }

    /// What the engine wrote on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    /// Sends one control request; its typed answer, or why there is none (the engine's
    /// refusal, with its `ErrorCode`, is `ClientError::Failed`).
    pub fn call(&self, req: &Request) -> Result<Reply, ClientError> {
        Client::connect(&self.control)?.call(req)
    }

    /// Stops the engine with SIGTERM (by its pid), waits for it, and returns its exit code
    /// and everything it wrote on stderr.
    pub fn stop(mut self) -> (Option<i32>, String) {
        let code = self.end("TERM");
        (code, self.stderr())
    }

    /// Its control socket.
    pub fn control(&self) -> &Path {
        &self.control
    }

    /// Waits until VM `name`'s worker runs (its state is `running`).
    pub fn wait_running(&self, name: &str) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let Reply::Vm(v) = self.call(&Request::VmShow(name.into())).map_err(|e| format!("vm show {name}: {e}"))?
            else {
                return Err(format!("vm show {name}: not a VM in the answer"));
            };
            match v.state {
                VmState::Running => return Ok(()),
                VmState::Starting => {}
                other => return Err(format!("vm {name} is {other}: {}", v.reason.unwrap_or_default())),
            }
            if Instant::now() > deadline {
                return Err(format!("vm {name} did not start: {}", v.state));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The directory the engine's sockets and log live in (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The engine's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the engine process.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    /// Threads and open file descriptors of the engine process.
    pub fn threads_and_fds(&self) -> (usize, usize) {
        let count = |d: String| std::fs::read_dir(d).map(Iterator::count).unwrap_or(0);
        (count(format!("/proc/{}/task", self.pid())), count(format!("/proc/{}/fd", self.pid())))
    }

    /// CPU seconds used so far by the engine's thread named `name`.
    pub fn thread_cpu(&self, name: &str) -> f64 {
        crate::thread_cpu_of(&format!("/proc/{}/task", self.pid()), name)
    }

    /// VM `name`'s in-engine latency from the control socket: frames measured and the
    /// percentiles p50, p90, p99, p99.9 and max of the VM-to-host direction, in µs.
    pub fn latency(&self, name: &str) -> Option<(u64, [f64; 5])> {
        let Reply::Latency(rows) = self.call(&Request::Latency(Some(name.into()))).ok()? else { return None };
        let p = rows.first()?.vm_to_host;
        Some((p.count, [p.p50_us, p.p90_us, p.p99_us, p.p999_us, p.max_us]))
    }
}

impl Drop for EngineProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(state_dir(&self.dir));
    }
}

/// The state directory [`EngineProc::launch`] gives an engine whose files are in `dir`.
pub fn state_dir(dir: &Path) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(".state");
    PathBuf::from(name)
}
