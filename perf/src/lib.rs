//! Benchmarks for Omerta.
//!
//! Today this holds the engine-core micro-benchmark (`microbench`: the allowlist check and the
//! VM-frame translation in nanoseconds per frame). The `make perf` scenarios of the seed plan
//! (throughput, latency, stress, side by side with passt) will live here too.
#![forbid(unsafe_code)]
