//! Leak checks around a run: what a run may create on the host (mounts, loop devices,
//! cgroups, network namespaces, tap devices, staging directories) must all be gone after it.

use std::fs;

/// The host resources a run could leak, at one moment.
#[derive(Debug, PartialEq, Eq)]
pub struct HostResources {
    pub mounts: Vec<String>,
    pub loop_devices: Vec<String>,
    pub twinbox_cgroups: Vec<String>,
    pub netns: Vec<String>,
    pub links: Vec<String>,
    /// The container's per-run staging directories.
    pub staging: Vec<String>,
}

fn mount_points() -> Vec<String> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<String> = text
        .lines()
        .filter_map(|line| line.split(' ').nth(4).map(str::to_owned))
        .collect();
    points.sort();
    points
}

fn attached_loop_devices() -> Vec<String> {
    let mut devices = Vec::new();
    if let Ok(entries) = fs::read_dir("/sys/block") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("loop") && entry.path().join("loop/backing_file").exists() {
                devices.push(name);
            }
        }
    }
    devices.sort();
    devices
}

fn twinbox_cgroups() -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![std::path::PathBuf::from("/sys/fs/cgroup")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            if entry.file_name().to_string_lossy().starts_with("twinbox") {
                found.push(path.display().to_string());
            } else if path.components().count() < 7 {
                stack.push(path);
            }
        }
    }
    found.sort();
    found
}

fn dir_names(path: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

impl HostResources {
    /// Takes a snapshot now.
    pub fn snapshot() -> Self {
        Self {
            mounts: mount_points(),
            loop_devices: attached_loop_devices(),
            twinbox_cgroups: twinbox_cgroups(),
            netns: dir_names("/run/netns"),
            links: dir_names("/sys/class/net"),
            staging: dir_names("/run/twinbox/ctr"),
        }
    }

    /// Panics with the difference if `after` holds anything this snapshot did not.
    pub fn assert_nothing_leaked(&self, after: &HostResources, what: &str) {
        let new = |before: &[String], after: &[String]| -> Vec<String> {
            after
                .iter()
                .filter(|item| !before.contains(item))
                .cloned()
                .collect()
        };
        let leaks = [
            ("mounts", new(&self.mounts, &after.mounts)),
            ("loop devices", new(&self.loop_devices, &after.loop_devices)),
            (
                "cgroups",
                new(&self.twinbox_cgroups, &after.twinbox_cgroups),
            ),
            ("network namespaces", new(&self.netns, &after.netns)),
            ("network links", new(&self.links, &after.links)),
            ("staging directories", new(&self.staging, &after.staging)),
        ];
        let leaked: Vec<String> = leaks
            .iter()
            .filter(|(_, items)| !items.is_empty())
            .map(|(kind, items)| format!("{kind}: {items:?}"))
            .collect();
        assert!(leaked.is_empty(), "{what} leaked {}", leaked.join("; "));
    }
}

/// The `--userns` id lease lock files (`/run/twinbox/userns/*.lock`) no process holds: a
/// run that ended unlinks its own while still holding it, so one left is a leak — unless
/// the run was SIGKILLed (then the next lease sweeps it), which is why
/// [`HostResources::assert_nothing_leaked`], used after kills too, does not look here.
pub fn unheld_userns_leases() -> Vec<String> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let mut unheld: Vec<String> = dir_names("/run/twinbox/userns")
        .into_iter()
        .filter(|name| {
            let Ok(file) = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(format!("/run/twinbox/userns/{name}"))
            else {
                return false; // gone meanwhile: released
            };
            // SAFETY: flock on an fd we own; closing it (drop) releases the lock we took.
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
        })
        .collect();
    unheld.sort();
    unheld
}

/// Runs `body` and asserts that it left no host resource behind, and no `--userns` lease
/// lock file nobody holds.
pub fn check_no_leaks<T>(what: &str, body: impl FnOnce() -> T) -> T {
    let before = HostResources::snapshot();
    let leases_before = unheld_userns_leases();
    let result = body();
    let after = HostResources::snapshot();
    before.assert_nothing_leaked(&after, what);
    let left: Vec<String> = unheld_userns_leases()
        .into_iter()
        .filter(|name| !leases_before.contains(name))
        .collect();
    assert!(
        left.is_empty(),
        "{what} left --userns lease lock files nobody holds under /run/twinbox/userns: {left:?}"
    );
    result
}
