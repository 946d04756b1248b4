//! Any bytes as decrypted packets from a hostile VM into a userspace tunnel: the fence, then
//! the consumer's TCP/IP stack, with the invariants checked after every packet (body:
//! `mesh::fuzzing::tunnel`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh::fuzzing::tunnel(data));
