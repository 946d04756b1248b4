//! Any bytes as a datagram from the host side (body: `engine::fuzzing::host_datagram`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| engine::fuzzing::host_datagram(data));
