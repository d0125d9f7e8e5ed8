//! Kept only for the CLI's `container::interrupt::signal()`: the one SIGINT/SIGTERM module
//! is `twinbox_spec::interrupt`, which `container::run` uses. Remove once `src/cli/ctr.rs`
//! calls `twinbox_spec::interrupt::received()` itself.

/// The signal that interrupted the last run, if any (the CLI exits 128 + it).
pub fn signal() -> Option<i32> {
    twinbox_spec::interrupt::received()
}
