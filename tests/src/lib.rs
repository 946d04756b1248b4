//! Cross-crate integration tests (`omerta-it`): shared harness.
//!
//! - [`private_netns`] / [`sealed`]: run a closure on a thread inside a new network namespace
//!   that holds only a loopback interface (and its consumers' namespace), handing it the proof,
//!   a [`Netns`], so nothing the engine sends can leave the machine.
//! - [`SyntheticVm`]: the far end of a VM handle (the seed plan's `MockVMHandle`), sending
//!   frames built by `engine::testkit` and reading what the engine writes back.
//! - [`Consumer`]: a UDP socket on a documentation address (198.51.100.0/24) in the private
//!   namespace's consumers' namespace, playing the consumer.
//! - [`Sink`]: a listener on a forbidden address (8.8.8.8, 192.168.1.1, ...) added to the
//!   private namespace's `lo`: a datagram that gets past the filter is counted, not lost.
//! - [`require`]: a test that lacks a capability fails under `CI=true` and says why elsewhere.
//!
//! # No packet leaves the machine
//! Everything in this harness that can make the engine, a VMM or a consumer send ([`Rig`],
//! [`spawn_worker`], [`EngineProc`], [`engine_bin`], [`boot_guest`], [`WgConsumer`],
//! [`RealWgConsumer`], [`VethPeer`], [`Consumer`], [`Sink`], [`TcpSink`]) takes a `&`[`Netns`]:
//! the proof that the calling thread is in a fresh private network namespace. Its only
//! constructor enters one, and it cannot leave its thread (`!Send`, `!Sync`), so a test that
//! forgets the namespace does not compile. The namespaces hold only `lo` (and veth pairs to
//! other namespaces the test made), so a packet to any other address has no route; it is
//! impossible, not merely filtered.
//!
//! # Modules, by area
//! One module per job, everything re-exported here (tests write `omerta_it::Rig`): `caps`
//! (backends, `require`), `synthetic_vm`, `netns` (`Netns`, private and consumers' namespaces),
//! `sinks` (consumers, UDP and TCP sinks), `rig` (an in-process worker), `procs` (`EngineProc`,
//! a wrapper of the engine-process helper the tests share with `omerta-perf`; the workspace's
//! binaries), `guest` (images, booting guests), `peers` (veth peers, WireGuard consumers, SSH),
//! `pcapng`, `nat` (NAT routers between a consumer and its provider). `cli::the_harness_is_the_only_way_in` checks that no test starts something that
//! sends around the harness.
#![forbid(unsafe_code)]

#[allow(unused_imports)]
use hv as _;

mod caps;
mod guest;
mod nat;
mod netns;
mod pcapng;
mod peers;
mod procs;
mod rig;
mod sinks;
mod synthetic_vm;

pub use caps::{backend_name, backends, ci, require, require_commands, BACKENDS};
pub use guest::{
    boot_guest, boot_provider, cloud_image, guest_image, provider_image, write_test_initrd, GuestOpts, GuestRun,
    GuestSlot,
};
pub use nat::{Nat, NatPath};
pub use netns::{
    add_local_address, check_private_netns, consumer_address, consumer_socket, current_netns, in_consumers_ns,
    in_private_netns, ip, netns_of, private_netns, runner_netns, sealed, Netns,
};
pub use pcapng::{read_pcapng, PcapngFrame};
pub use peers::{ssh_options, RealWgConsumer, VethPeer, WgConsumer, CONSUMER_IP};
pub use procs::{
    bin_for_every_user, bind_vmm_socket, engine_bin, engine_user, mesh_bins, status_field, workspace_bin, EngineProc,
    LauncherProc,
};
pub use rig::{allow, ep, spawn_worker, Rig};
pub use sinks::{Consumer, ForbiddenSinks, Sink, TcpSink, CONSUMER_NET, FORBIDDEN};
pub use synthetic_vm::{SyntheticVm, VmEnd};
