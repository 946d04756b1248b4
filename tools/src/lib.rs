//! Helper programs for tests and demos (not yet implemented).
//!
//! This crate will hold the static guest helper that runs inside a test VM (UDP send, receive
//! and echo, ICMP ping, a port scan, a DNS query), the consumer side of the WireGuard tests
//! built on boringtun, and small traffic tools. None of them is part of the data plane.
#![forbid(unsafe_code)]
