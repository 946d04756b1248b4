//! The workspace's binaries as processes: `EngineProc` (the real engine with its control socket),
//! the mesh binaries, the engine's user, and fields of `/proc/PID/status`.
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::Netns;

/// A binary of this workspace (`omertactl`, `omerta-consumer`...), built beside the tests. Not
/// the engine: that one is [`engine_bin`]'s, which takes the namespace's proof.
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    assert_ne!(name, "omerta-engine", "the engine's binary is omerta_it::engine_bin(ns)'s: it could send");
    built(name)
}

/// The `omerta-engine` binary, for a test that runs it itself (its command line, `--check`):
/// from the private namespace `ns` proves only, since whatever it is asked to do, it could send.
pub fn engine_bin(_ns: &Netns) -> std::path::PathBuf {
    built("omerta-engine")
}

fn built(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target directory");
    let bin = dir.join(name);
    assert!(bin.exists(), "{} is missing: run `cargo build --workspace --bins` (make test does)", bin.display());
    bin
}

/// The user an engine started as root runs as by default (`--runas`): `omerta` where it
/// exists, else `nobody`; `None` when the tests do not run as root (the engine keeps its user).
pub fn engine_user() -> Option<hv::VmmUser> {
    control::launcher::engine_user_for_children()
}

/// Binds a datagram socket at `path` that a VMM (or an intruder) uses to talk to an engine's
/// `dgram:PATH` handle; the engine's user may write to it, as to a real VMM's socket.
pub fn bind_vmm_socket(path: &std::path::Path) -> UnixDatagram {
    let s = UnixDatagram::bind(path).expect("bind a VMM socket");
    control::launcher::give_to_engine_user(path).expect("a VMM socket for the engine's user");
    s
}

/// A running `omerta-engine` process with a control socket in its own directory: the
/// workspace's one engine-process helper (`omerta_perf::engine_proc::EngineProc`, whose typed
/// [`call`](omerta_perf::engine_proc::EngineProc::call) and the rest it derefs to), started only
/// from a private network namespace, with `omertactl` beside it for the tests of the CLI. Ended
/// by pid when dropped.
#[derive(Debug)]
pub struct EngineProc {
    inner: omerta_perf::engine_proc::EngineProc,
    /// Its control socket.
    pub control: std::path::PathBuf,
    /// A scratch directory for this engine (sockets, files).
    pub dir: std::path::PathBuf,
    /// The state directory its arguments named, if they did.
    state: Option<std::path::PathBuf>,
}

impl std::ops::Deref for EngineProc {
    type Target = omerta_perf::engine_proc::EngineProc;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl EngineProc {
    /// Its state directory (`--state-dir`, the one given or its own): the launcher's
    /// `launcher/vms/<id>` are there.
    pub fn state_dir(&self) -> std::path::PathBuf {
        self.state.clone().unwrap_or_else(|| omerta_perf::engine_proc::state_dir(&self.dir))
    }

    /// Sends `signal` to the engine (by its pid) and waits for it to end; its exit code. It
    /// may be started again ([`EngineProc::restart`]).
    pub fn end(&mut self, signal: &str) -> Option<i32> {
        self.inner.end(signal)
    }

    /// Ends the engine with `signal` (`TERM`, `KILL`) and starts it again as it was started,
    /// waiting for its control socket (an engine restart, an upgrade, a crash).
    pub fn restart(&mut self, signal: &str) {
        let dir = self.dir.clone();
        let inner = &mut self.inner;
        inner.restart(signal).unwrap_or_else(|e| panic!("engine {}: restarting: {e}", dir.display()));
    }

    /// Starts the engine with `args` (and `--control`) in the private namespace `ns` proves,
    /// and waits until its control socket answers. Descriptors the caller made inheritable
    /// stay open in the child.
    pub fn start(ns: &Netns, tag: &str, args: &[String]) -> Self {
        Self::try_start(ns, tag, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`EngineProc::start`] with extra environment variables (`OMERTA_ICMP=raw`, say).
    pub fn start_env(ns: &Netns, tag: &str, args: &[String], env: &[(&str, &str)]) -> Self {
        Self::try_start_env(ns, tag, args, env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// An engine started with one VM `t` on an inherited datagram socketpair (`fd:N`) whose
    /// consumer is `consumer` (`extra`: more `,key=value` of the VM), environment `env`: the
    /// engine, the test's end of the handle as a synthetic VM, and the engine's end (the
    /// caller's copy, to drop once the engine has its own).
    pub fn with_fd_vm(
        ns: &Netns,
        tag: &str,
        consumer: impl std::fmt::Display,
        extra: &str,
        env: &[(&str, &str)],
    ) -> (Self, crate::SyntheticVm, std::os::fd::OwnedFd) {
        use std::os::fd::{AsFd, AsRawFd};
        let (ours, theirs) = sys::socketpair(libc::SOCK_DGRAM).expect("socketpair");
        sys::set_inheritable(theirs.as_fd()).expect("inheritable");
        let spec = format!("name=t,handle=fd:{},consumer={consumer}{extra}", theirs.as_raw_fd());
        let e = Self::start_env(ns, tag, &["--vm".to_string(), spec], env);
        let vm = crate::SyntheticVm {
            end: crate::VmEnd::Dgram(UnixDatagram::from(ours)),
            id: engine::VmIdentity::default(),
        };
        (e, vm, theirs)
    }

    /// [`EngineProc::start`], or why the engine did not start.
    pub fn try_start(ns: &Netns, tag: &str, args: &[String]) -> Result<Self, String> {
        Self::try_start_env(ns, tag, args, &[])
    }

    fn try_start_env(ns: &Netns, tag: &str, args: &[String], env: &[(&str, &str)]) -> Result<Self, String> {
        let dir = engine_dir(tag);
        let state = args.iter().position(|a| a == "--state-dir").and_then(|i| args.get(i + 1)).map(Into::into);
        // Guests come from the test image and the engine's own scratch directory.
        let guests = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest");
        let _ = std::fs::create_dir_all(&guests);
        let mut all: Vec<std::ffi::OsString> =
            vec!["--image-dir".into(), guests.into(), "--image-dir".into(), dir.clone().into()];
        all.extend(args.iter().map(Into::into));
        let inner = omerta_perf::engine_proc::EngineProc::launch(omerta_perf::engine_proc::Launch {
            bin: engine_bin(ns),
            dir,
            args: all,
            env: env.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect(),
            fd: None,
        })?;
        Ok(Self { control: inner.control().to_path_buf(), dir: inner.dir().to_path_buf(), inner, state })
    }

    /// Polls `omertactl --json args` until `pred` holds (up to `secs`), returning that answer;
    /// fails the test with the last answer when it never does.
    pub fn wait_json(
        &self,
        what: &str,
        args: &[&str],
        secs: u64,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.json(args);
            if pred(&v) {
                return v;
            }
            assert!(Instant::now() < end, "timed out waiting for {what}; omertactl {args:?}: {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `omertactl --socket <ours> args...`: (exit code, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let mut c = std::process::Command::new(workspace_bin("omertactl"));
        c.arg("--socket").arg(&self.control).args(args);
        omerta_perf::command::output(&mut c).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Adds VM `name` on a datagram handle at `<dir>/<name>.sock` with the further keys
    /// `keys` (`consumer=...` among them): `omertactl vm add`'s (exit code, stdout, stderr).
    pub fn add_vm(&self, name: &str, keys: &str) -> (i32, String, String) {
        let spec = format!("name={name},handle=dgram:{},{keys}", self.dir.join(format!("{name}.sock")).display());
        self.ctl(&["vm", "add", &spec])
    }

    /// `omertactl --json vm start SPEC --kernel KERNEL --initrd INITRD`: (exit code, the VM
    /// object as JSON text, stderr).
    pub fn vm_start(&self, spec: &str, kernel: &std::path::Path, initrd: &std::path::Path) -> (i32, String, String) {
        let (k, i) = (kernel.to_string_lossy(), initrd.to_string_lossy());
        self.ctl(&["--json", "vm", "start", spec, "--kernel", &k, "--initrd", &i])
    }

    /// Runs `omertactl --json ...` and parses its output.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let (code, out, err) = self.ctl(&a);
        assert_eq!(code, 0, "omertactl {args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("omertactl {args:?} printed no JSON ({e}): {out}"))
    }

    /// Stops the engine with SIGTERM (by its pid) and returns its exit code and stderr.
    pub fn stop(self) -> (Option<i32>, String) {
        self.inner.stop()
    }
}

/// The scratch directory of the engine tagged `tag` (its control socket is `ctl/engine.sock`
/// there).
fn engine_dir(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("omerta-eng-{tag}-{}", std::process::id()))
}

/// A launcher that outlives its engines (`omerta-engine --serve-launcher`), for the engine
/// tagged `tag` (whose control socket it owns), with the state directory `state`; started
/// only from the private namespace `ns` proves. Ended with SIGTERM (by its pid) when dropped,
/// which ends its VMMs.
#[derive(Debug)]
pub struct LauncherProc {
    child: std::process::Child,
    /// Its socket, for the engine's `--launcher`.
    pub socket: std::path::PathBuf,
    /// The state directory.
    pub state: std::path::PathBuf,
    dir: std::path::PathBuf,
    tag: String,
}

impl LauncherProc {
    /// Starts it and waits (10 s at most) for its socket.
    pub fn start(ns: &Netns, tag: &str, state: &std::path::Path) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("omerta-launcher-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("the launcher's directory");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        std::fs::create_dir_all(state).expect("the state directory");
        let socket = dir.join("launcher.sock");
        let child = Self::spawn(ns, tag, &dir, &socket, state);
        let l = Self { child, socket, state: state.to_path_buf(), dir, tag: tag.to_string() };
        l.ready()
    }

    fn spawn(
        ns: &Netns,
        tag: &str,
        dir: &std::path::Path,
        socket: &std::path::Path,
        state: &std::path::Path,
    ) -> std::process::Child {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(dir.join("stderr")).expect("the launcher's log");
        std::process::Command::new(engine_bin(ns))
            .arg("--serve-launcher")
            .arg(socket)
            .arg("--state-dir")
            .arg(state)
            .arg("--control")
            .arg(engine_dir(tag).join("ctl/engine.sock"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("omerta-engine --serve-launcher")
    }

    /// Ends it with `signal` (`KILL`: as a host going down; its VMMs die with it), empties
    /// its runtime directory (its socket) and starts it again on the same state directory.
    pub fn restart(&mut self, ns: &Netns, signal: &str) {
        if let Ok(None) = self.child.try_wait() {
            let _ =
                std::process::Command::new("kill").args([format!("-{signal}"), self.child.id().to_string()]).status();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        self.child = Self::spawn(ns, &self.tag, &self.dir, &self.socket, &self.state);
        self.wait_listening();
    }

    fn ready(mut self) -> Self {
        self.wait_listening();
        self
    }

    /// Waits (10 s at most) for its socket; fails the test if it exits or never listens.
    fn wait_listening(&mut self) {
        let end = Instant::now() + Duration::from_secs(10);
        while !self.socket.exists() {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("the launcher exited ({st}): {}", self.log());
            }
            assert!(Instant::now() < end, "the launcher never listened: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The engine's arguments that make it use this launcher and its state directory.
    pub fn engine_args(&self) -> Vec<String> {
        let s = |p: &std::path::Path| p.display().to_string();
        vec!["--launcher".into(), s(&self.socket), "--state-dir".into(), s(&self.state)]
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops it with SIGTERM (by its pid; every VMM ends) and returns its exit code.
    pub fn stop(&mut self) -> Option<i32> {
        if let Ok(None) = self.child.try_wait() {
            let _ = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        }
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for LauncherProc {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The value of `key` (`"Uid:"`, `"Seccomp:"`...) in a `/proc/PID/status` text, trimmed;
/// empty when it is not there.
pub fn status_field(status: &str, key: &str) -> String {
    status.lines().find_map(|l| l.strip_prefix(key)).map(str::trim).unwrap_or_default().to_string()
}

/// `omertad` and `omerta`, copied where every user may run them (see [`bin_for_every_user`]),
/// so that the mesh tests can run them as `nobody` wherever the checkout is: (omertad, omerta).
pub fn mesh_bins() -> (std::path::PathBuf, std::path::PathBuf) {
    (bin_for_every_user("omertad"), bin_for_every_user("omerta"))
}

/// A binary of this workspace copied once into a directory every user may read, so that a test
/// can run it as another user (the engine's, `nobody`) wherever the checkout is.
pub fn bin_for_every_user(name: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    static DIR: std::sync::Mutex<Option<std::path::PathBuf>> = std::sync::Mutex::new(None);
    let mut held = DIR.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = held.get_or_insert_with(|| {
        let dir = std::env::temp_dir().join(format!("omerta-bin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a directory for shared binaries");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        dir
    });
    let to = dir.join(name);
    if !to.exists() {
        std::fs::copy(workspace_bin(name), &to).expect("copy a binary");
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    to
}
