//! Images and guests: the test guest and the cloud image, built once per run, and booting a
//! guest (two at a time, hard timeouts) with its NIC on an engine handle.
use std::time::Duration;

use engine::{Endpoint, VmIdentity};
use omerta_perf::command::run;

use crate::{require, Netns};

/// An image of `scripts/cloud-image.sh`: (base disk, kernel, initrd).
type Image = (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf);

/// Builds (or finds cached) the image `variant` of `scripts/cloud-image.sh`, once per run in
/// `cell`; `None` (after `require`) when it cannot be built.
fn built_image(cell: &'static std::sync::OnceLock<Result<Image, String>>, variant: &str) -> Option<Image> {
    let r = cell.get_or_init(|| {
        let top = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        run(std::process::Command::new(top.join("scripts/cloud-image.sh")).arg(variant))?;
        let dir = top.join(format!("target/{variant}-image"));
        Ok((dir.join("disk.raw"), dir.join("vmlinuz"), dir.join("initrd.img")))
    });
    match r {
        Ok(v) => Some(v.clone()),
        Err(e) => {
            require(&format!("the {variant} test image (mmdebstrap, Debian's mirror)"), Err(e.clone()));
            None
        }
    }
}

/// The Debian cloud-style image built by `scripts/cloud-image.sh`: (base disk, kernel,
/// initrd), built once per test run (a few minutes on a fresh machine, cached under
/// `target/cloud-image`). `None` (after `require`) when it cannot be built.
pub fn cloud_image() -> Option<Image> {
    static BUILT: std::sync::OnceLock<Result<Image, String>> = std::sync::OnceLock::new();
    built_image(&BUILT, "cloud")
}

/// The provider image (`scripts/cloud-image.sh provider`): the cloud image plus the omerta
/// package's dependencies and a boot hook that runs `run.sh` from a disk labelled
/// `OMERTA-PKG` (cached under `target/provider-image`).
pub fn provider_image() -> Option<Image> {
    static BUILT: std::sync::OnceLock<Result<Image, String>> = std::sync::OnceLock::new();
    built_image(&BUILT, "provider")
}

/// QEMU, or `None` after `require` says it is missing.
fn vm_backend() -> Option<Box<dyn hv::Backend>> {
    hv::new().map_err(|e| require("QEMU", Err(e.to_string()))).ok()
}

/// A fresh scratch directory for guest `tag` of `kind` (`guest`, `cloud`).
fn guest_dir(kind: &str, tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("omerta-{kind}-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("guest scratch dir");
    dir
}

/// Starts `spec` on `backend`: the running guest and its scratch directory `dir`, or `None`
/// after `require`.
fn start_guest(
    backend: &dyn hv::Backend,
    spec: hv::VmSpec,
    dir: std::path::PathBuf,
) -> Option<(Box<dyn hv::RunningVm>, std::path::PathBuf)> {
    match backend.start(spec) {
        Ok(vm) => Some((vm, dir)),
        Err(e) => {
            require("QEMU", Err(e.to_string()));
            None
        }
    }
}

/// The test guest built by `scripts/guest-image.sh` (kernel, base initramfs), built once per
/// test run. `None` (after `require`) when it cannot be built.
pub fn guest_image() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    static BUILT: std::sync::OnceLock<Result<(std::path::PathBuf, std::path::PathBuf), String>> =
        std::sync::OnceLock::new();
    let r = BUILT.get_or_init(|| {
        let top = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        run(&mut std::process::Command::new(top.join("scripts/guest-image.sh")))?;
        let dir = top.join("target/guest");
        Ok((dir.join("vmlinuz"), dir.join("initrd.cpio")))
    });
    match r {
        Ok(v) => Some(v.clone()),
        Err(e) => {
            require("the test guest image (QEMU, Debian packages)", Err(e.clone()));
            None
        }
    }
}

/// At most two guests at a time on this 2-core machine.
static GUEST_SLOTS: std::sync::Mutex<usize> = std::sync::Mutex::new(0);
static GUEST_FREED: std::sync::Condvar = std::sync::Condvar::new();

/// A slot for one guest; released on drop.
#[derive(Debug)]
pub struct GuestSlot(());

impl GuestSlot {
    /// Waits for a free slot.
    pub fn take() -> Self {
        let mut n = GUEST_SLOTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while *n >= 2 {
            n = GUEST_FREED.wait(n).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *n += 1;
        Self(())
    }

    /// Waits until no guest runs and takes every slot: for a test that loads the machine on
    /// purpose (a flood as fast as a core can seal) and must not starve a guest, nor be
    /// starved by one.
    pub fn all() -> (Self, Self) {
        let mut n = GUEST_SLOTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while *n > 0 {
            n = GUEST_FREED.wait(n).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *n = 2;
        (Self(()), Self(()))
    }
}

impl Drop for GuestSlot {
    fn drop(&mut self) {
        let mut n = GUEST_SLOTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *n -= 1;
        GUEST_FREED.notify_one();
    }
}

/// How to boot a test guest.
#[derive(Debug, Clone)]
pub struct GuestOpts {
    /// The guest's shell script (run as /test.sh after the network is up).
    pub script: String,
    /// The consumer endpoint (for the guest firewall and the script).
    pub consumer: Endpoint,
    /// Apply the guest firewall at boot.
    pub firewall: bool,
    /// Keep IPv6 enabled in the guest (it then sends MLD and solicitations by itself).
    pub ipv6: bool,
    /// Try DHCP (briefly) before the static address.
    pub dhcp: bool,
    /// Hard timeout.
    pub timeout: Duration,
}

/// A finished guest: how it ended and what it printed.
#[derive(Debug)]
pub struct GuestRun {
    /// How the VMM ended.
    pub exit: hv::Exit,
    /// The serial console.
    pub console: String,
}

impl GuestRun {
    /// The exit status of `/test.sh`, from the console marker.
    pub fn rc(&self) -> Option<i32> {
        self.console
            .lines()
            .find_map(|l| l.trim().strip_prefix("OMERTA-RESULT rc="))
            .and_then(|v| v.trim().parse().ok())
    }

    /// True if the console has a line containing `s`.
    pub fn saw(&self, s: &str) -> bool {
        self.console.contains(s)
    }
}

/// Writes the base initramfs `base` followed by an archive holding `/test.sh` = `script`.
pub fn write_test_initrd(base: &std::path::Path, script: &str, out: &std::path::Path) {
    let mut initrd = std::fs::read(base).expect("base initramfs");
    hv::initramfs::write(
        &mut initrd,
        &[hv::initramfs::Entry::File {
            path: "test.sh".into(),
            mode: 0o755,
            data: format!("#!/bin/sh\n{script}\n").into_bytes(),
        }],
    )
    .expect("append /test.sh");
    std::fs::write(out, initrd).expect("write initrd");
}

/// Boots a guest whose NIC is `nic`, in the private namespace `ns` proves, and returns it running (the caller waits or kills it).
pub fn boot_guest(
    _ns: &Netns,
    opts: &GuestOpts,
    nic: hv::Nic,
    tag: &str,
) -> Option<(Box<dyn hv::RunningVm>, std::path::PathBuf)> {
    let (kernel, base) = guest_image()?;
    let backend = vm_backend()?;
    let dir = guest_dir("guest", tag);
    let initrd_path = dir.join("initrd");
    write_test_initrd(&base, &opts.script, &initrd_path);
    let id = VmIdentity::default();
    let cmdline = format!(
        "console=ttyS0 quiet panic=-1 reboot=t {}{}omerta.ip={}/{} omerta.gw={} omerta.fw={} omerta.consumer={}",
        if opts.ipv6 { "" } else { "ipv6.disable=1 " },
        if opts.dhcp { "omerta.dhcp=1 " } else { "" },
        id.ip,
        id.prefix_len,
        id.gateway_ip,
        u8::from(opts.firewall),
        opts.consumer
    );
    let console = dir.join("console.log");
    let spec = hv::VmSpec {
        name: tag.into(),
        kernel,
        initrd: initrd_path,
        cmdline,
        memory_mib: 128,
        cpus: 1,
        nic,
        mac: id.mac.to_string(),
        console: console.clone(),
        timeout: opts.timeout,
        user: None,
        disks: Vec::new(),
        fdsets: Vec::new(),
        monitor: None,
        reboot: false,
    };
    start_guest(backend.as_ref(), spec, dir)
}

/// Boots the provider image with no NIC, its disk a fresh overlay and `files` on a second,
/// read-only disk labelled `OMERTA-PKG` (ext4, made with `mkfs.ext4 -d`): its boot hook runs
/// `run.sh` from there as root under the image's own systemd, prints on the console, then
/// powers off. In the private namespace `ns` proves; returns the running guest (the caller
/// waits) and its scratch directory.
pub fn boot_provider(
    _ns: &Netns,
    files: &std::path::Path,
    timeout: Duration,
    tag: &str,
) -> Option<(Box<dyn hv::RunningVm>, std::path::PathBuf)> {
    let (disk, kernel, initrd) = provider_image()?;
    let backend = vm_backend()?;
    let dir = guest_dir("provider", tag);
    let overlay = dir.join("disk.qcow2");
    let pkg = dir.join("pkg.raw");
    let made = run(std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&disk)
        .arg(&overlay))
    .and_then(|_| {
        run(std::process::Command::new("mkfs.ext4")
            .args(["-q", "-L", "OMERTA-PKG", "-d"])
            .arg(files)
            .arg(&pkg)
            .arg("256M"))
    });
    if let Err(e) = made {
        require("qemu-img and mkfs.ext4 (make setup installs them)", Err(e));
        return None;
    }
    // No cloud-init (no seed), nothing waits for a network it does not have, no SSH server
    // (no host keys without a seed), no login prompt on the console the test reads.
    let cmdline = "root=/dev/vda rw console=ttyS0 quiet cloud-init=disabled \
                   systemd.mask=systemd-networkd-wait-online.service systemd.mask=ssh.service \
                   systemd.mask=serial-getty@ttyS0.service omerta.pkgtest";
    let spec = hv::VmSpec {
        name: tag.into(),
        kernel,
        initrd,
        cmdline: cmdline.split_whitespace().collect::<Vec<_>>().join(" "),
        memory_mib: 1024,
        cpus: 1,
        nic: hv::Nic::None,
        mac: VmIdentity::default().mac.to_string(),
        console: dir.join("console.log"),
        timeout,
        user: None,
        disks: vec![
            hv::Disk { path: overlay, format: "qcow2", read_only: false },
            hv::Disk { path: pkg, format: "raw", read_only: true },
        ],
        fdsets: Vec::new(),
        monitor: None,
        reboot: false,
    };
    start_guest(backend.as_ref(), spec, dir)
}
