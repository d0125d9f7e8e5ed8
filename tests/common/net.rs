//! What a `--net` run (container, VM or bench) may leave on the host's network: links,
//! IPv4 addresses, lease lock files and the locks on them, nftables rules; and lease
//! helpers (sweeping stale lock files, holding leases as concurrent runs would).

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::process::Command;

/// Where hostnet keeps its lease lock files.
pub const LEASE_DIR: &str = "/run/twinbox/net";

/// Runs `program ARGS`, which must succeed; its stdout.
pub fn run_tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} (needed by these tests): {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        super::describe(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Interfaces on the host (/sys/class/net).
pub fn host_links() -> BTreeSet<String> {
    std::fs::read_dir("/sys/class/net")
        .expect("/sys/class/net")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// `interface address/prefix` of every IPv4 address on the host (`ip -4 -o addr`).
pub fn host_addresses() -> BTreeSet<String> {
    run_tool("ip", &["-4", "-o", "addr", "show"])
        .lines()
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            Some(format!("{} {}", words.get(1)?, words.get(3)?))
        })
        .collect()
}

/// Inodes (`maj:min:ino` as /proc/locks prints them, device in hex) with a lock on them.
pub fn locked_inodes() -> BTreeSet<u64> {
    std::fs::read_to_string("/proc/locks")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let field = line
                .split_whitespace()
                .find(|w| w.matches(':').count() == 2)?;
            field.rsplit(':').next()?.parse().ok()
        })
        .collect()
}

/// The lease lock files in [`LEASE_DIR`], and which of them some process holds locked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Leases {
    pub files: BTreeSet<String>,
    pub held: BTreeSet<String>,
}

impl Leases {
    pub fn now() -> Self {
        let locked = locked_inodes();
        let mut leases = Self::default();
        for entry in std::fs::read_dir(LEASE_DIR).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.metadata().is_ok_and(|m| locked.contains(&m.ino())) {
                leases.held.insert(name.clone());
            }
            leases.files.insert(name);
        }
        leases
    }

    /// What `after` holds that this snapshot did not: held locks, and lock files unless
    /// the run was `killed` (a SIGKILLed run cannot unlink its lock file; the next
    /// acquisition of that index reuses it).
    pub fn leaks(&self, after: &Leases, killed: bool) -> Vec<String> {
        let mut leaks = Vec::new();
        let held = added(&self.held, &after.held);
        if !held.is_empty() {
            leaks.push(format!("held lease locks {held:?}"));
        }
        let files = added(&self.files, &after.files);
        if !killed && !files.is_empty() {
            leaks.push(format!("lease lock files {files:?}"));
        }
        leaks
    }
}

/// The host before a `--net` run: the common leak check's snapshot and the test's own
/// network snapshot, taken after sweeping stale lease files.
pub struct Before<N> {
    pub host: super::leaks::HostResources,
    pub net: N,
}

impl<N> Before<N> {
    pub fn take(net_snapshot: impl FnOnce() -> N) -> Self {
        sweep_stale_leases();
        Self {
            host: super::leaks::HostResources::snapshot(),
            net: net_snapshot(),
        }
    }
}

/// Removes lease lock files no process holds (left by SIGKILLed runs, which cannot unlink
/// theirs), the way hostnet releases a lease (lock, unlink, unlock), so a file after a
/// normal run is that run's leak.
pub fn sweep_stale_leases() {
    for entry in std::fs::read_dir(LEASE_DIR).into_iter().flatten().flatten() {
        let Ok(file) = std::fs::File::open(entry.path()) else {
            continue;
        };
        // SAFETY: flock on a descriptor we own; it is released when `file` closes.
        let locked = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        if locked == 0 {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Takes the lease locks of links 0..count as runs would (4: a /28 pool's every link),
/// and frees them like hostnet does (unlink while locked) on drop.
pub struct HeldLeases(Vec<(String, std::fs::File)>);

impl HeldLeases {
    pub fn take(count: u32) -> Self {
        std::fs::create_dir_all(LEASE_DIR).unwrap();
        let held = (0..count)
            .map(|i| {
                let path = format!("{LEASE_DIR}/{i}.lock");
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .unwrap();
                // SAFETY: flock on a descriptor we own.
                let r = unsafe {
                    libc::flock(
                        std::os::fd::AsRawFd::as_raw_fd(&file),
                        libc::LOCK_EX | libc::LOCK_NB,
                    )
                };
                assert_eq!(r, 0, "{path} is held by another process");
                (path, file)
            })
            .collect();
        Self(held)
    }
}

impl Drop for HeldLeases {
    fn drop(&mut self) {
        for (path, _) in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// `nft list ruleset` without the `ip twinbox` table, which `--net nat` may leave by
/// design (documented in net/src/nat.rs).
pub fn ruleset_without_ours() -> String {
    without_our_table(&run_tool("nft", &["list", "ruleset"]))
}

/// The ruleset text with the `table ip twinbox { ... }` block cut out.
pub fn without_our_table(ruleset: &str) -> String {
    let mut kept = String::new();
    let mut depth = 0usize;
    let mut skipping = false;
    for line in ruleset.lines() {
        if !skipping && line.trim_start().starts_with("table ip twinbox ") {
            skipping = true;
            depth = 0;
        }
        if skipping {
            depth += line.matches('{').count();
            depth -= line.matches('}').count().min(depth);
            if depth == 0 {
                skipping = false;
            }
            continue;
        }
        kept.push_str(line);
        kept.push('\n');
    }
    kept
}

/// What `after` has that `before` had not, in order.
pub fn added<T: Ord + Clone>(before: &BTreeSet<T>, after: &BTreeSet<T>) -> Vec<T> {
    after.difference(before).cloned().collect()
}
