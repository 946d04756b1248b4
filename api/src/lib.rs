//! Omerta's control API: the one typed vocabulary between the engine and its clients
//! (`omertactl`, `omertad`, the tests, `perf`).
//!
//! - [`request`]: every control request as a [`Request`], with its one-line text grammar (what
//!   people type and the socket carries); [`image`]: `vm start image=...` typed.
//! - [`reply`]: every request's result as types ([`Reply`]), VM and guest states as enums.
//! - [`error`]: the engine's refusals ([`Failure`], [`ErrorCode`]) and the client's
//!   ([`ClientError`], keeping the `io::Error` source).
//! - [`wire`]: the reply line's JSON envelope.
//! - [`client`]: the blocking client ([`Client::call`]).
//! - [`keys`]: the rules a key in a request meets.
//!
//! A new request is one variant of [`Request`] (its words in [`request::parse`] and its
//! `Display`), one [`ReplyKind`], and one arm in the engine's registry (`control/src/registry`).
//! docs/control-protocol.md is the reference of the wire form.
#![forbid(unsafe_code)]

pub mod client;
pub mod error;
pub mod image;
pub mod keys;
pub mod reply;
pub mod request;
pub mod wire;

pub use client::{default_socket_path, Client};
pub use error::{ClientError, ErrorCode, Failure};
pub use image::ImageStart;
pub use reply::{Reply, ReplyKind, VmState};
pub use request::{parse, Request, MAX_REQUEST};
