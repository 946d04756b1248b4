//! The io_uring backend (Linux). See `run`.
use super::{End, Resources};
use crate::filter::Strategy;
use crate::worker::Core;

/// Checks that the kernel has the io_uring operations the loop needs.
pub(crate) fn probe() -> Result<(), String> {
    Err("not built yet".into())
}

/// Runs the loop until the worker ends.
pub(crate) fn run<S: Strategy>(core: &mut Core<S>, res: Resources) -> End {
    super::portable::run(core, res)
}
