//! VM backends for Omerta: start a guest with its NIC attached to the engine, watch it, stop it.
//!
//! One trait, [`Backend`], and [`new`] picking the implementation for this OS: QEMU on Linux
//! (`qemu` module, accelerator chosen by [`probe_accel`]), Apple's Virtualization.framework on
//! macOS (`macos` module, compiled only there). Shared code has no `cfg(target_os)`.
//! [`initramfs`] writes the cpio archives the test guests boot from.
#![forbid(unsafe_code)]

pub mod cloud;
pub mod initramfs;
#[cfg(target_os = "linux")]
mod kvm;
#[cfg(target_os = "macos")]
mod macos;
#[cfg(target_os = "linux")]
mod qemu;

use std::fmt;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// How the guest's NIC is attached.
#[derive(Debug)]
pub enum Nic {
    /// A unix datagram socket, one frame per datagram: the VMM's end of the engine's
    /// socketpair (QEMU `-netdev dgram,local.type=fd`; VZFileHandleNetworkDeviceAttachment).
    DgramFd(OwnedFd),
    /// A unix stream socket with u32 length framing (QEMU `-netdev stream,addr.type=fd`).
    StreamFd(OwnedFd),
    /// The VMM's own user-mode NAT (direct mode: no engine in the path), the VMM run in the
    /// network namespace at this path (`/run/netns/NAME`) when one is given. QEMU maps the
    /// guest's 10.0.2.2 to the loopback of the namespace it runs in.
    UserNat(Option<PathBuf>),
    /// No NIC.
    None,
}

/// What to boot.
#[derive(Debug)]
pub struct VmSpec {
    /// A name for logs.
    pub name: String,
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The kernel command line.
    pub cmdline: String,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub cpus: u32,
    /// The NIC.
    pub nic: Nic,
    /// The NIC's MAC address.
    pub mac: String,
    /// Where the serial console is written.
    pub console: PathBuf,
    /// Hard limit on the guest's life; it is killed after this.
    pub timeout: Duration,
    /// The user the VMM runs as (`None`: the caller's own). Its kernel and initrd must be
    /// readable by that user.
    pub user: Option<VmmUser>,
    /// Virtio block devices, in order (`/dev/vda`, `/dev/vdb`, ...).
    pub disks: Vec<Disk>,
    /// Open files the VMM takes as `/dev/fdset/K`, as (K, descriptor): a disk or a qcow2
    /// backing file of that name is this very file, never a path opened again as the VMM's
    /// user (so a file only the launcher could open, or one already unlinked, works). A set
    /// holds one descriptor per access mode the VMM opens it with (QEMU opens a writable disk
    /// read-only first, then read-write).
    pub fdsets: Vec<(u32, OwnedFd)>,
    /// A listening unix socket on which the VMM serves its QMP monitor (one client at a
    /// time), made by the caller where only it may connect.
    pub monitor: Option<OwnedFd>,
    /// A reboot inside the guest restarts it in the same VMM process (cloud images); else the
    /// VMM exits when the guest reboots (the test guest's `reboot -f` ends its run).
    pub reboot: bool,
}

/// A virtio disk of a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The image file.
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: &'static str,
    /// The guest may not write it.
    pub read_only: bool,
}

/// An unprivileged user for VMMs: the VMM drops to it (and to no supplementary group) before
/// it runs, so a guest that escaped into it holds none of the provider's privileges (with a
/// handle NIC it also starts in an empty network namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmUser {
    /// Its name, for messages.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its gid.
    pub gid: u32,
}

impl VmmUser {
    /// The user named `name`, from the system's user database.
    pub fn lookup(name: &str) -> Option<Self> {
        let (uid, gid) = sys::user_ids(name)?;
        Some(Self { name: name.to_string(), uid, gid })
    }

    /// Whether this user may read a file with `meta`data.
    pub fn can_read(&self, meta: &std::fs::Metadata) -> bool {
        use std::os::unix::fs::MetadataExt;
        let mode = meta.mode();
        (meta.uid() == self.uid && mode & 0o400 != 0)
            || (meta.gid() == self.gid && mode & 0o040 != 0)
            || mode & 0o004 != 0
    }
}

/// How a guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The VMM exited (the guest powered off or rebooted with `-no-reboot`).
    Exited(Option<i32>),
    /// Killed at the hard timeout.
    TimedOut,
    /// Killed on request.
    Killed,
}

/// Errors of this crate; one line each.
#[derive(Debug)]
pub enum HvError {
    /// The VMM program is not installed.
    VmmMissing(String),
    /// Starting or talking to the VMM failed.
    Io(String),
    /// The platform has no backend.
    Unsupported(String),
}

impl fmt::Display for HvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HvError::VmmMissing(s) | HvError::Io(s) | HvError::Unsupported(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for HvError {}

/// A running guest.
pub trait RunningVm: fmt::Debug + Send {
    /// The VMM's process id.
    fn pid(&self) -> u32;
    /// Waits until the guest ends or its hard timeout passes (then kills it).
    fn wait(&mut self) -> Exit;
    /// The exit status if the guest has ended.
    fn try_wait(&mut self) -> Option<ExitStatus>;
    /// Asks the VMM to end (SIGTERM), then kills it after `grace`.
    fn stop(&mut self, grace: Duration) -> Exit;
    /// Kills the VMM at once.
    fn kill(&mut self) -> Exit;
    /// Everything the guest printed on its serial console so far.
    fn console(&self) -> String;
}

/// A VM backend.
pub trait Backend: fmt::Debug {
    /// A short name (`qemu`, `virtualization.framework`).
    fn name(&self) -> &'static str;
    /// The accelerator this backend uses and why.
    fn accel(&self) -> &Accel;
    /// Boots a guest.
    fn start(&self, spec: VmSpec) -> Result<Box<dyn RunningVm>, HvError>;
}

/// Hardware acceleration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accel {
    /// `kvm`, `tcg` or `hvf`.
    pub name: &'static str,
    /// Why it was chosen.
    pub reason: String,
}

/// Chooses the accelerator: KVM only when it can really run a guest (a `/dev/kvm` that
/// answers its API-version ioctl, real VT-x/AMD-V in the CPU flags, and not the nested
/// paravirtual KVM, `kvm_pvm`, under which stock kernels hang), else TCG. `OMERTA_ACCEL=tcg|kvm`
/// overrides.
pub fn probe_accel() -> Accel {
    match std::env::var("OMERTA_ACCEL").as_deref() {
        Ok("tcg") => return Accel { name: "tcg", reason: "forced by OMERTA_ACCEL".into() },
        Ok("kvm") => return Accel { name: "kvm", reason: "forced by OMERTA_ACCEL".into() },
        _ => {}
    }
    #[cfg(target_os = "linux")]
    {
        kvm::probe()
    }
    #[cfg(not(target_os = "linux"))]
    {
        Accel { name: "hvf", reason: "the platform hypervisor".into() }
    }
}

/// The backend for this OS.
pub fn new() -> Result<Box<dyn Backend>, HvError> {
    #[cfg(target_os = "linux")]
    {
        Ok(Box::new(qemu::Qemu::find(probe_accel())?))
    }
    #[cfg(target_os = "macos")]
    {
        macos::VirtualizationFramework::new().map(|b| Box::new(b) as Box<dyn Backend>)
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    {
        Err(HvError::Unsupported("no VM backend for this OS".into()))
    }
}
