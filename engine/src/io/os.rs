//! The engine's one choice by OS: io_uring, which only Linux has. Elsewhere a probe that says
//! no, and the portable loop runs. (Every other difference between OSes is the `sys` crate's.)
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
#[path = "uring/mod.rs"]
mod uring;

#[cfg(target_os = "linux")]
pub(crate) use uring::{probe as uring_probe, run as uring_run};

/// io_uring is Linux's: the portable backend runs instead.
#[cfg(not(target_os = "linux"))]
pub(crate) fn uring_probe() -> Result<(), String> {
    Err("io_uring exists on Linux only".into())
}

/// Never called (the probe fails); the portable loop, should it be.
#[cfg(not(target_os = "linux"))]
pub(crate) fn uring_run<S: crate::filter::Strategy>(
    core: &mut crate::vmcore::Core<S>,
    res: crate::io::Resources,
) -> crate::io::End {
    crate::io::portable::run(core, res)
}
