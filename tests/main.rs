//! Integration tests of Omerta across crates. One binary; one module per area.
// Test data is built with small, known values: truncating casts are deliberate here.
#![allow(clippy::cast_possible_truncation)]
#![forbid(unsafe_code)]
mod anywhere;
mod cli;
mod cloud;
mod control;
mod dataplane;
mod mesh;
mod package;
mod realvm;
mod security;
mod tunnel;
