//! Cross-crate integration tests (`omerta-it`).
//!
//! This crate will hold the end-to-end suites that need more than one crate: a running
//! `omerta-engine` with a synthetic VM on the far end of its handle, the control socket, and
//! real guests under QEMU. Tests that could send a packet to a non-loopback address run in a
//! network namespace the test creates. The engine core's own tests live beside its code in
//! `engine/`.
#![forbid(unsafe_code)]
