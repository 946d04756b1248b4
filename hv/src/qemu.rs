//! The Linux backend: QEMU (`qemu-system-x86_64`), one process per guest.
//!
//! The NIC's socket end is inherited by QEMU (`-netdev dgram,local.type=fd` or
//! `-netdev stream,addr.type=fd`); the serial console goes to a file that is kept for a failed
//! test. Verified flags for this machine kind are in `../shared/real-vm-notes.md`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{Accel, Backend, Exit, HvError, Nic, RunningVm, VmSpec};

/// QEMU's `-sandbox` setting for every guest.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// QEMU, found on the PATH.
#[derive(Debug)]
pub(crate) struct Qemu {
    program: PathBuf,
    accel: Accel,
}

impl Qemu {
    pub(crate) fn find(accel: Accel) -> Result<Self, HvError> {
        let program = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                HvError::VmmMissing("qemu-system-x86_64 is not installed (make setup installs qemu-system-x86)".into())
            })?;
        Ok(Self { program, accel })
    }
}

/// Makes the VMM's process, between fork and exec: a network namespace of its own with
/// nothing in it (its NIC is an inherited descriptor: it needs no network, and a guest that
/// escaped into it finds none), then no supplementary group, `gid` and `uid`; killed if the
/// process that started it dies (no VMM outlives its launcher).
fn isolate(cmd: &mut Command, uid: u32, gid: u32) {
    sys::isolate_before_exec(cmd, uid, gid);
}

impl Qemu {
    /// The group the VMM runs as: the user's own, or with KVM, the group of `/dev/kvm` when
    /// only its group may use it (`root:kvm 0660` on many distributions).
    fn vmm_gid(&self, u: &super::VmmUser) -> u32 {
        use std::os::unix::fs::MetadataExt;
        if self.accel.name != "kvm" {
            return u.gid;
        }
        match std::fs::metadata("/dev/kvm") {
            Ok(m) if m.mode() & 0o006 != 0o006 && m.uid() != u.uid && m.mode() & 0o060 == 0o060 => m.gid(),
            _ => u.gid,
        }
    }
}

impl Backend for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn accel(&self) -> &Accel {
        &self.accel
    }

    fn start(&self, spec: VmSpec) -> Result<Box<dyn RunningVm>, HvError> {
        let console =
            create_private(&spec.console).map_err(|e| HvError::Io(format!("{}: {e}", spec.console.display())))?;
        let mut cmd = match &spec.nic {
            // nsenter joins the namespace and execs QEMU: the pid stays QEMU's.
            Nic::UserNat(Some(ns)) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display()));
                // nsenter joins as root, then drops to the VMM's user (and no other group).
                if let Some(u) = &spec.user {
                    c.arg(format!("--setuid={}", u.uid)).arg(format!("--setgid={}", self.vmm_gid(u)));
                }
                c.arg("--").arg(&self.program);
                c
            }
            _ => {
                let mut c = Command::new(&self.program);
                if let Some(u) = &spec.user {
                    isolate(&mut c, u.uid, self.vmm_gid(u));
                }
                c
            }
        };
        // A process group of its own: a ^C at the terminal reaches the engine, which ends its
        // guests, not each VMM behind its back.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.args(["-M", "q35", "-nodefaults", "-no-user-config", "-display", "none"])
            // QEMU's own seccomp filter: no obsolete calls, no privilege changes, no new
            // processes, no scheduling or resource changes.
            .args(["-sandbox", SANDBOX])
            .args(["-accel", self.accel.name])
            .args(["-m", &spec.memory_mib.to_string(), "-smp", &spec.cpus.to_string()])
            .arg("-kernel")
            .arg(&spec.kernel)
            .arg("-initrd")
            .arg(&spec.initrd)
            .args(["-append", &spec.cmdline])
            .args(["-serial", "stdio"])
            .stdin(Stdio::null())
            .stdout(console.try_clone().map_err(|e| HvError::Io(e.to_string()))?)
            .stderr(console);
        // The NIC's descriptor must stay open until QEMU has started; it is dropped after spawn.
        let mut keep: Option<OwnedFd> = None;
        let nic = match spec.nic {
            Nic::DgramFd(fd) => {
                let arg = format!("dgram,id=n0,local.type=fd,local.str={}", fd.as_raw_fd());
                keep = Some(fd);
                Some(arg)
            }
            Nic::StreamFd(fd) => {
                let arg = format!("stream,id=n0,addr.type=fd,addr.str={}", fd.as_raw_fd());
                keep = Some(fd);
                Some(arg)
            }
            Nic::UserNat(_) => Some("user,id=n0".to_string()),
            Nic::None => None,
        };
        if !spec.reboot {
            cmd.arg("-no-reboot");
        }
        // Each descriptor stays open until QEMU has started, like the NIC's.
        let mut sets = Vec::new();
        for (k, fd) in spec.fdsets {
            cmd.arg("-add-fd").arg(format!("fd={},set={k}", fd.as_raw_fd()));
            sets.push(fd);
        }
        if let Some(fd) = spec.monitor {
            cmd.arg("-chardev")
                .arg(format!("socket,id=qmp,fd={},server=on,wait=off", fd.as_raw_fd()))
                .args(["-mon", "chardev=qmp,mode=control"]);
            sets.push(fd);
        }
        for d in &spec.disks {
            // A comma in a path would end QEMU's option: doubled, as QEMU reads it.
            let file = d.path.to_string_lossy().replace(',', ",,");
            let ro = if d.read_only { ",readonly=on" } else { "" };
            // A host that runs out of room pauses the guest (`werror=enospc`, QEMU's default,
            // written out): the guest never sees a host's full disk as its own I/O error.
            cmd.arg("-drive").arg(format!("file={file},if=virtio,format={}{ro},werror=enospc,rerror=report", d.format));
        }
        if let Some(netdev) = nic {
            cmd.args(["-netdev", &netdev]).args(["-device", &format!("virtio-net-pci,netdev=n0,mac={}", spec.mac)]);
        }
        // Inherited by QEMU alone: made inheritable only in its process, after the fork.
        let inherit = keep.iter().chain(&sets).map(AsRawFd::as_raw_fd).collect();
        sys::inherit_in_child(&mut cmd, inherit);
        let child = cmd.spawn().map_err(|e| HvError::Io(format!("starting {}: {e}", self.program.display())))?;
        drop((keep, sets));
        Ok(Box::new(QemuVm { child, console: spec.console, deadline: Instant::now() + spec.timeout, exit: None }))
    }
}

#[derive(Debug)]
struct QemuVm {
    child: Child,
    console: PathBuf,
    deadline: Instant,
    exit: Option<Exit>,
}

impl QemuVm {
    fn finish(&mut self, exit: Exit) -> Exit {
        self.exit = Some(exit.clone());
        exit
    }
}

impl RunningVm for QemuVm {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait(&mut self) -> Exit {
        if let Some(e) = &self.exit {
            return e.clone();
        }
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return self.finish(Exit::Exited(status.code()));
            }
            if Instant::now() >= self.deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return self.finish(Exit::TimedOut);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn stop(&mut self, grace: Duration) -> Exit {
        if let Some(e) = &self.exit {
            return e.clone();
        }
        // Not reaped yet (checked by `exit` above), so the pid is still our child's.
        sys::terminate_child(&self.child);
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return self.finish(Exit::Exited(status.code()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill()
    }

    fn kill(&mut self) -> Exit {
        if let Some(e) = &self.exit {
            return e.clone();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.finish(Exit::Killed)
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Creates `path` afresh, mode 0600, for this user only: an earlier file there is replaced only
/// if it is a regular file of ours; a symlink, a file of someone else or anything else is
/// refused (a console in a shared directory must not let a local user aim the engine's writes).
pub fn create_private(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() && m.uid() == effective_uid() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a regular file of this user; refusing to replace it",
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(path)
}

fn effective_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    // The owner of a file this process creates is its effective uid: ask /proc/self.
    std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid())
}

#[cfg(test)]
mod private_file_tests {
    use std::os::unix::fs::PermissionsExt;

    use super::create_private;

    #[test]
    fn a_console_is_for_its_user_only_and_never_written_through_a_symlink() {
        let dir = std::env::temp_dir().join(format!("omerta-console-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("target");
        std::fs::write(&target, b"keep").unwrap();
        let link = dir.join("vm.console");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(create_private(&link).is_err(), "a symlink is refused");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        std::fs::remove_file(&link).unwrap();
        // An old console of ours is replaced, mode 0600 whatever the umask.
        std::fs::write(&link, b"old boot").unwrap();
        std::fs::set_permissions(&link, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(create_private(&link).unwrap());
        let m = std::fs::metadata(&link).unwrap();
        assert_eq!((m.len(), m.permissions().mode() & 0o777), (0, 0o600));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
