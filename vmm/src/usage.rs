//! What the VMM process cost: peak resident memory without guest RAM, guest pages touched,
//! CPU time.
//!
//! Guest RAM is an anonymous mapping of this process, so `VmHWM` (peak RSS) counts every
//! guest page the guest touched. The guest never gives pages back (no balloon), so the
//! guest mapping's `Rss` in /proc/self/smaps at the end of the run is its peak too, and
//! `VmHWM - guest Rss` is the VMM's own peak: code, heap, thread stacks, device buffers.
//! (`VmHWM` is per process: a caller that ran bigger things earlier in the same process
//! raises it; the CLI runs one VM per process.)

use std::fs::File;
use std::os::unix::fs::FileExt;

/// /proc/self/status and /proc/self/smaps, opened at the start of a run so the end of the
/// run reads them without opening files (the caller's thread may be under a seccomp
/// filter by then). procfs regenerates both on every read from offset 0.
pub struct Probe {
    status: File,
    smaps: File,
}

impl Probe {
    /// Opens both files.
    pub fn open() -> std::io::Result<Self> {
        Ok(Self {
            status: File::open("/proc/self/status")?,
            smaps: File::open("/proc/self/smaps")?,
        })
    }

    /// Peak RSS of this process in KiB (`VmHWM`).
    pub fn peak_rss_kib(&self) -> Option<u64> {
        twinbox_spec::host::status_field_kib(&read_all(&self.status)?, "VmHWM")
    }

    /// Resident KiB of the mappings that start at one of `starts` (host addresses of guest
    /// RAM regions).
    pub fn resident_kib_of(&self, starts: &[u64]) -> Option<u64> {
        Some(smaps_rss(&read_all(&self.smaps)?, starts))
    }
}

/// The whole current text of a procfs file, read from offset 0.
fn read_all(file: &File) -> Option<String> {
    let mut text = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match file.read_at(&mut buf, text.len() as u64) {
            Ok(0) => break,
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    String::from_utf8(text).ok()
}

fn status_field(line: &str, name: &str) -> Option<u64> {
    line.strip_prefix(name)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
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
    // SAFETY: rusage is plain integers; all-zero is a valid value.
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
    fn own_peak_rss_and_mappings_are_readable_through_the_probe() {
        let probe = Probe::open().unwrap();
        let peak = probe.peak_rss_kib().unwrap();
        assert!(peak > 0);
        // A fresh mapping, touched: its Rss shows up on the next read of the same fd.
        let len = 4 << 20;
        // SAFETY: a fresh anonymous private mapping, unmapped below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        // SAFETY: writes inside the mapping just made.
        unsafe { std::ptr::write_bytes(ptr.cast::<u8>(), 1, len) };
        let rss = probe.resident_kib_of(&[ptr as u64]).unwrap();
        assert_eq!(rss, 4096, "4 MiB touched");
        assert!(probe.peak_rss_kib().unwrap() >= peak);
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(ptr, len) };
    }
}
