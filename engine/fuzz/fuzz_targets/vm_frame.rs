//! Any bytes as a frame from the VM, through every strategy (body: `engine::fuzzing::vm_frame`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| engine::fuzzing::vm_frame(data));
