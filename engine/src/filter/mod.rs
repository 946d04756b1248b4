//! The policy: which endpoints a VM may reach, and how much of its traffic is checked.
//!
//! [`Allowlist`] holds exact IPv4 endpoints; [`Strategy`] implementations ([`Full`],
//! [`Conntrack`], [`Sampled`]) turn a [`Flow`] into a [`Verdict`]. Nothing here parses frames
//! or does I/O, and nothing allocates per packet.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used, clippy::panic))]

mod allowlist;
mod strategy;
mod verdict;

pub use allowlist::{
    private_class, special_class, Allowlist, AllowlistError, Endpoint, Flow, Policy, SpecialAddresses, Transport,
};
pub use strategy::{Conntrack, Full, SampleRate, SampleRateError, Sampled, Strategy, StrategyStats};
pub use verdict::{DropReason, Verdict};
