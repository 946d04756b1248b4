//! Any bytes as a datagram from a peer and as its plaintext (body: `mesh::fuzzing::datagram`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh::fuzzing::datagram(data));
