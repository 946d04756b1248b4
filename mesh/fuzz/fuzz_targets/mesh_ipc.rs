//! Any bytes as an IPC request body or an invite link (body: `mesh::fuzzing::ipc`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh::fuzzing::ipc(data));
