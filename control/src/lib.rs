//! Omerta control plane: the control thread's registry and the control socket. The requests,
//! replies and the client are the `api` crate's.
//!
//! - [`registry`]: the VMs, their workers and their state; answers requests. Owned by the
//!   control thread alone.
//! - [`server`]: the unix control socket: permissions, peer credentials, bounded handlers.
//! - [`pcap`]: writing captured frames as a pcap file.
//! - [`launcher`]: the privileged process that starts VMMs for an engine that dropped root,
//!   and direct mode's namespaces.
//! - [`caps`]: capabilities by name.
//! - [`daemon`]: the `omerta-engine` process: its startup phases, control loop and reload.
//! - [`provision`]: the keys the engine makes for a cloud-image VM.
//! - [`notify`]: systemd's readiness protocol (`Type=notify`).
//! - [`metrics_http`]: the optional Prometheus scrape endpoint (`--metrics-listen`).
//! - [`state`]: state files written atomically, a bad one moved aside.
//! - [`cli`]: `--version` and the exit statuses of every binary's command line.
#![forbid(unsafe_code)]

pub mod caps;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod launcher;
pub mod metrics_http;
pub mod notify;
pub mod pcap;
pub mod provision;
pub mod registry;
pub mod rogue;
pub mod server;
pub mod state;
