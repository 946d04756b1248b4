//! The KVM probe: is hardware virtualization really usable here?
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use super::Accel;

/// `KVM_GET_API_VERSION`: `_IO(KVMIO, 0x00)` with `KVMIO = 0xAE`.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;

pub(crate) fn probe() -> Accel {
    let tcg = |why: String| Accel { name: "tcg", reason: why };
    let kvm = match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(f) => f,
        Err(e) => return tcg(format!("/dev/kvm: {e}")),
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an integer; the fd is a
    // valid open /dev/kvm for the duration of the call.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION) };
    if version != kvm_bindings::KVM_API_VERSION as libc::c_int {
        return tcg(format!("/dev/kvm answers API version {version}, not {}", kvm_bindings::KVM_API_VERSION));
    }
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        return tcg("/dev/kvm is the nested paravirtual KVM (kvm_pvm), under which stock kernels hang".into());
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hw {
        return tcg("the CPU flags show neither vmx nor svm".into());
    }
    Accel { name: "kvm", reason: format!("/dev/kvm (API {version}) with hardware virtualization") }
}
