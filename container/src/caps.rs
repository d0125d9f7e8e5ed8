//! The capabilities the container keeps. Everything else leaves the bounding set before
//! init is executed, so neither init nor the workload can regain it. The one exception
//! is `--net`: CAP_NET_ADMIN is lent to init for configuring `eth0`, and init drops it
//! from the bounding set and its own sets before the workload exists ([`for_init`]).
//!
//! Reference: moby's default set (`oci/caps/defaults.go`, what `docker run` grants; the
//! config `runc spec` writes keeps only three and is not what containers run with), minus
//! CAP_MKNOD, as podman's default does. moby keeps MKNOD and relies on the device cgroup to
//! make a created node useless; this container has that allowlist too (v1 controller or
//! v2 BPF program), but none of the workloads makes device nodes, so one more layer costs
//! nothing: a node cannot be created at all, even if an allowlist were missing. (Every
//! mount but the bound nodes is `nodev` too: `plan.rs`.)

/// The capabilities kept (CAP_* numbers from `<linux/capability.h>`).
pub const DEFAULT: [(u32, &str); 13] = [
    (0, "CHOWN"),
    (1, "DAC_OVERRIDE"),
    (3, "FOWNER"),
    (4, "FSETID"),
    (5, "KILL"),
    (6, "SETGID"),
    (7, "SETUID"),
    (8, "SETPCAP"),
    (10, "NET_BIND_SERVICE"),
    (13, "NET_RAW"),
    (18, "SYS_CHROOT"),
    (29, "AUDIT_WRITE"),
    (31, "SETFCAP"),
];

/// CAP_NET_ADMIN: lent to init with `--net` so it can configure `eth0`; init drops it
/// from the bounding set and its own sets before it forks the workload
/// (`rootfs/init/src/net.rs`), so the workload's capabilities do not change with `--net`.
pub const NET_ADMIN: u32 = 12;

/// What the child keeps for init: the bounding-set drops (up to `last_cap`) and the
/// capset words; with `lend_net_admin`, CAP_NET_ADMIN on top of [`DEFAULT`].
pub fn for_init(last_cap: u32, lend_net_admin: bool) -> (Vec<u32>, [u32; 2]) {
    let mut drop = to_drop(last_cap);
    let mut keep = default_mask();
    if lend_net_admin {
        drop.retain(|cap| *cap != NET_ADMIN);
        keep[(NET_ADMIN / 32) as usize] |= 1 << (NET_ADMIN % 32);
    }
    (drop, keep)
}

/// The default set as the two 32-bit words `capset` takes.
pub fn default_mask() -> [u32; 2] {
    let mut words = [0u32; 2];
    for (cap, _) in DEFAULT {
        words[(cap / 32) as usize] |= 1 << (cap % 32);
    }
    words
}

/// Capabilities to drop from the bounding set, up to the kernel's last one.
pub fn to_drop(last_cap: u32) -> Vec<u32> {
    (0..=last_cap)
        .filter(|c| !DEFAULT.iter().any(|(d, _)| d == c))
        .collect()
}

/// The kernel's highest capability number (`/proc/sys/kernel/cap_last_cap`), 40 if unknown.
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sys_admin_and_mknod_are_dropped_and_defaults_kept() {
        let drop = to_drop(40);
        assert!(drop.contains(&21), "CAP_SYS_ADMIN");
        assert!(drop.contains(&16), "CAP_SYS_MODULE");
        assert!(drop.contains(&27), "CAP_MKNOD");
        assert!(!drop.contains(&5), "CAP_KILL");
        assert_eq!(drop.len(), 41 - DEFAULT.len());
        let mask = default_mask();
        assert_eq!(mask[0] & (1 << 21), 0);
        assert_eq!(mask[0] & (1 << 27), 0);
        assert_ne!(mask[0] & (1 << 31), 0);
        assert_eq!(mask[1], 0);
        assert_eq!(mask[0].count_ones() as usize, DEFAULT.len());
    }

    #[test]
    fn net_admin_is_lent_only_with_a_network() {
        let (drop, keep) = for_init(40, false);
        assert!(drop.contains(&NET_ADMIN));
        assert_eq!(keep, default_mask());
        let (drop, keep) = for_init(40, true);
        assert!(!drop.contains(&NET_ADMIN));
        assert_eq!(drop.len(), 41 - DEFAULT.len() - 1);
        assert_eq!(keep[0], default_mask()[0] | 1 << 12);
        assert_eq!(keep[1], 0);
    }
}
