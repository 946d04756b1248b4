//! The macOS backend: Apple's Virtualization.framework, with the NIC attached through a
//! `VZFileHandleNetworkDeviceAttachment` over the engine's socketpair (the same one-frame-per-
//! datagram handle the Linux backend gives QEMU). Compiled only on macOS; our machines cannot
//! build it, so it stays small and its behaviour is covered by the portable engine paths.
//!
//! Not implemented yet: `start` reports it. The Objective-C calls (VZVirtualMachineConfiguration,
//! VZLinuxBootLoader, VZVirtioNetworkDeviceConfiguration with the file-handle attachment) are
//! the next step; applevisor gives the Hypervisor.framework side.
use super::{Accel, Backend, HvError, RunningVm, VmSpec};

#[derive(Debug)]
pub(crate) struct VirtualizationFramework {
    accel: Accel,
}

impl VirtualizationFramework {
    pub(crate) fn new() -> Result<Self, HvError> {
        Ok(Self { accel: Accel { name: "hvf", reason: "Virtualization.framework".into() } })
    }
}

impl Backend for VirtualizationFramework {
    fn name(&self) -> &'static str {
        "virtualization.framework"
    }

    fn accel(&self) -> &Accel {
        &self.accel
    }

    fn start(&self, _spec: VmSpec) -> Result<Box<dyn RunningVm>, HvError> {
        Err(HvError::Unsupported("the Virtualization.framework backend is not implemented yet".into()))
    }
}
