//! The host clock that stamps every phase: `CLOCK_MONOTONIC`, in nanoseconds.

/// Nanoseconds of `CLOCK_MONOTONIC` now. Comparable across processes of one host, which
/// is what lets the CLI's `spawn` stamp and a library's later stamps share a timeline.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
