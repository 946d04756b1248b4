//! VM backends for Omerta (not yet implemented).
//!
//! This crate will hold a small VM-backend trait (start from a spec, stop, kill, wait, console
//! output, exit status) with one implementation per host OS behind a single module boundary:
//! QEMU on Linux, with its NIC attached to the engine through an inherited socketpair end and
//! the accelerator chosen by a KVM probe (TCG otherwise), and Apple's Virtualization.framework
//! file-handle attachment on macOS, compiled only there. Until then it is empty on purpose.
#![forbid(unsafe_code)]
