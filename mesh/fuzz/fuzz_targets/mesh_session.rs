//! Any bytes as a session: sealed, signed messages from several identities and sources
//! through admission and the dispatch's state, on a fake clock, with the invariants of issue
//! 24 checked after every step (body: `mesh::fuzzing::session`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh::fuzzing::session(data));
