//! The KVM probe: is hardware virtualization really usable here?
use std::fs::OpenOptions;
use std::os::fd::AsFd;

use super::Accel;

pub(crate) fn probe() -> Accel {
    let tcg = |why: String| Accel { name: "tcg", reason: why };
    let kvm = match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(f) => f,
        Err(e) => return tcg(format!("/dev/kvm: {e}")),
    };
    let version = sys::kvm_api_version(kvm.as_fd());
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
