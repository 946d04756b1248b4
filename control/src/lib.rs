//! Omerta control plane (not yet implemented).
//!
//! This crate will hold the control thread's VM registry (start, stop, terminate on a
//! violation), the line-based request/response protocol of the blocking unix control socket
//! (parse and encode only, no sockets, in `protocol.rs`), the server loop, and the `omertactl`
//! command-line client. The data plane never waits on anything in here: statistics are
//! published by the VM threads between batches and read by the control thread.
#![forbid(unsafe_code)]
