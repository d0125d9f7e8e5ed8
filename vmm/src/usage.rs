//! What the VMM process cost: peak resident memory without guest RAM, guest pages touched,
//! CPU time.
//!
//! Guest RAM is an anonymous mapping of this process, so `VmHWM` (peak RSS) counts every
//! guest page the guest touched. The guest never gives pages back (no balloon), so the
//! guest mapping's `Rss` in /proc/self/smaps at the end of the run is its peak too, and
//! `VmHWM - guest Rss` is the VMM's own peak: code, heap, thread stacks, device buffers.
//! (`VmHWM` is per process: a caller that ran bigger things earlier in the same process
//! raises it; the CLI runs one VM per process.)

use std::fs;

/// Peak RSS of this process in KiB (`VmHWM`).
pub fn peak_rss_kib() -> Option<u64> {
    status_field(&fs::read_to_string("/proc/self/status").ok()?, "VmHWM:")
}

fn status_field(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Resident KiB of the mappings that start at one of `starts` (host addresses of guest
/// RAM regions), from /proc/self/smaps.
pub fn resident_kib_of(starts: &[u64]) -> Option<u64> {
    let smaps = fs::read_to_string("/proc/self/smaps").ok()?;
    Some(smaps_rss(&smaps, starts))
}

fn smaps_rss(smaps: &str, starts: &[u64]) -> u64 {
    let mut total = 0;
    let mut inside = false;
    for line in smaps.lines() {
        let head = line.split_whitespace().next().unwrap_or("");
        if let Some((start, _end)) = head.split_once('-') {
            if let Ok(start) = u64::from_str_radix(start, 16) {
                inside = starts.contains(&start);
                continue;
            }
        }
        if inside {
            if let Some(kib) = status_field(line, "Rss:") {
                total += kib;
            }
        }
    }
    total
}

/// User and system CPU time of this process so far, in microseconds.
pub fn cpu_times_us() -> (u64, u64) {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the rusage we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    (us(usage.ru_utime), us(usage.ru_stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_rss_sums_only_guest_mappings() {
        let smaps =
            "7f0000000000-7f0008000000 rw-p 00000000 00:00 0\nSize: 131072 kB\nRss: 2048 kB\n\
                     7f0010000000-7f0010001000 rw-p 00000000 00:00 0\nRss: 4 kB\n";
        assert_eq!(smaps_rss(smaps, &[0x7f00_0000_0000]), 2048);
        assert_eq!(smaps_rss(smaps, &[]), 0);
    }

    #[test]
    fn own_peak_rss_is_readable() {
        assert!(peak_rss_kib().unwrap() > 0);
    }
}
