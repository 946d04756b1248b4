//! Omerta engine: the data plane that keeps a rented VM's network to one consumer endpoint.
//!
//! This crate is the engine core: pure, allocation-free translation with no I/O.
//! - [`wire`]: zero-copy header views (Ethernet, ARP, IPv4, UDP, ICMP echo, TCP ports) and the
//!   in-place emission of frames towards the VM.
//! - [`filter`]: the [`Allowlist`](filter::Allowlist), [`Verdict`](filter::Verdict) and
//!   [`DropReason`](filter::DropReason), and the strategies `Full`, `Conntrack`, `Sampled`.
//! - [`nat`]: [`FilteredNat`](nat::FilteredNat), one VM frame in, one action out; one host
//!   datagram in, one VM frame out.
//! - [`stats`]: the per-VM counter block, indexed by drop reason.
//!
//! See ARCHITECTURE.md at the repository root for a frame's path and the invariants.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod filter;
#[doc(hidden)]
pub mod fuzzing;
pub mod io;
#[macro_use]
pub mod log;
pub mod nat;
pub mod proof;
pub mod stats;
pub mod testkit;
pub mod vmcore;
pub mod wire;
pub mod worker;

pub use filter::{Allowlist, DropReason, Endpoint, Verdict};
pub use nat::{FilteredNat, VmAction, VmIdentity};
