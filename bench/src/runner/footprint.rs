//! The host memory of a VMM process, measured the same way for every VMM (twinbox's
//! `vm run`, Firecracker, Cloud Hypervisor, QEMU) from outside: `/proc/<pid>/smaps`, with
//! the guest's RAM told apart from the VMM's own memory, as Firecracker's own memory
//! monitor does (it sums smaps and leaves out the guest memory mapping).
//!
//! - **own RSS / PSS**: every mapping except guest RAM — code, heap, stacks, device
//!   buffers, page tables are not in smaps. PSS divides pages shared with other processes
//!   (the binary's and libraries' code) by their sharers, so K instances cost K × PSS.
//! - **guest RSS**: the resident pages of the guest RAM mapping(s) — the guest memory the
//!   host actually backed.
//!
//! Which mapping is guest RAM: every VMM maps it as one anonymous region the size of the
//! guest's memory (or, past the 32-bit MMIO gap, a few big ones), and nothing else a VMM
//! maps comes near that size. So a mapping at least as large as the guest's RAM — or as
//! [`GUEST_PART_KIB`], whichever is smaller, for RAM split around the gap — is guest RAM.
//! A heap piece the kernel merged into the guest mapping's VMA is then counted as guest;
//! that is a few KiB at most.

/// Mappings at least this large are guest RAM even when the guest's RAM is larger (split
/// around the MMIO gap, each part smaller than the whole). No VMM maps anything else this
/// large with pages in it.
pub const GUEST_PART_KIB: u64 = 512 * 1024;

/// What one reading of a process's smaps gave, KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    /// Resident pages outside guest RAM.
    pub own_rss_kib: u64,
    /// Proportional set size outside guest RAM.
    pub own_pss_kib: u64,
    /// Resident pages of guest RAM.
    pub guest_rss_kib: u64,
}

impl Footprint {
    /// Sums an smaps text, leaving out as guest RAM every mapping of at least
    /// `guest_ram_kib` (or [`GUEST_PART_KIB`]); `guest_ram_kib` 0: no guest, all is own.
    pub fn parse(smaps: &str, guest_ram_kib: u64) -> Self {
        let threshold = (guest_ram_kib > 0).then(|| guest_ram_kib.min(GUEST_PART_KIB));
        let mut total = Self::default();
        let mut guest = false;
        for line in smaps.lines() {
            // A mapping's header starts with its address range, `7f..-7f.. rw-p ...`; its
            // fields are `Name:   N kB`.
            let first = line.split_whitespace().next().unwrap_or_default();
            if first.contains('-') && first.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
                guest = false;
                continue;
            }
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let Some(kib) = value
                .trim()
                .strip_suffix("kB")
                .and_then(|v| v.trim().parse::<u64>().ok())
            else {
                continue;
            };
            match name {
                "Size" => guest = threshold.is_some_and(|t| kib >= t),
                "Rss" if guest => total.guest_rss_kib += kib,
                "Rss" => total.own_rss_kib += kib,
                "Pss" if !guest => total.own_pss_kib += kib,
                _ => {}
            }
        }
        total
    }

    /// Reads process `pid`'s smaps; `None` once it is gone (or its memory is: a zombie's
    /// smaps is empty) or unreadable.
    pub fn of(pid: u32, guest_ram_kib: u64) -> Option<Self> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
        (!text.is_empty()).then(|| Self::parse(&text, guest_ram_kib))
    }

    /// The larger of each figure (peaks over several readings).
    pub fn max(self, other: Self) -> Self {
        Self {
            own_rss_kib: self.own_rss_kib.max(other.own_rss_kib),
            own_pss_kib: self.own_pss_kib.max(other.own_pss_kib),
            guest_rss_kib: self.guest_rss_kib.max(other.guest_rss_kib),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two mappings: a 128 MiB guest RAM region with 2 MiB resident and a heap.
    const SMAPS: &str = "\
55d0c0000000-55d0c0021000 r-xp 00000000 08:01 1234    /usr/bin/vmm
Size:                132 kB
Rss:                 120 kB
Pss:                  60 kB
VmFlags: rd ex mr mw me dw
7f0000000000-7f0008000000 rw-p 00000000 00:00 0
Size:             131072 kB
KernelPageSize:        4 kB
Rss:                2048 kB
Pss:                2048 kB
Swap:                  0 kB
VmFlags: rd wr mr mw me ac
7f0008000000-7f0008100000 rw-p 00000000 00:00 0       [heap]
Size:               1024 kB
Rss:                 800 kB
Pss:                 700 kB
Pss_Dirty:           700 kB
";

    #[test]
    fn guest_ram_is_told_apart_from_the_vmms_own_memory() {
        let f = Footprint::parse(SMAPS, 128 * 1024);
        assert_eq!(
            f,
            Footprint {
                own_rss_kib: 920,
                own_pss_kib: 760,
                guest_rss_kib: 2048
            }
        );
        // No guest: everything is the process's own.
        let all = Footprint::parse(SMAPS, 0);
        assert_eq!((all.own_rss_kib, all.guest_rss_kib), (2968, 0));
        // Larger guest RAM than any mapping: still none of it found, nothing subtracted.
        let bigger = Footprint::parse(SMAPS, 256 * 1024);
        assert_eq!(bigger.guest_rss_kib, 0);
    }

    #[test]
    fn ram_split_around_the_gap_counts_every_big_part() {
        let split = "\
7f0000000000-7f00c0000000 rw-p 00000000 00:00 0
Size:            3145728 kB
Rss:                4096 kB
Pss:                4096 kB
7f00c0000000-7f0100000000 rw-p 00000000 00:00 0
Size:            1048576 kB
Rss:                1024 kB
Pss:                1024 kB
";
        let f = Footprint::parse(split, 4 * 1024 * 1024);
        assert_eq!((f.guest_rss_kib, f.own_rss_kib), (5120, 0));
    }

    #[test]
    fn peaks_take_each_figure_s_maximum() {
        let a = Footprint {
            own_rss_kib: 5,
            own_pss_kib: 1,
            guest_rss_kib: 9,
        };
        let b = Footprint {
            own_rss_kib: 3,
            own_pss_kib: 4,
            guest_rss_kib: 0,
        };
        assert_eq!(
            a.max(b),
            Footprint {
                own_rss_kib: 5,
                own_pss_kib: 4,
                guest_rss_kib: 9
            }
        );
    }

    #[test]
    fn a_process_that_is_gone_has_no_footprint() {
        assert_eq!(Footprint::of(u32::MAX / 2, 0), None);
    }
}
