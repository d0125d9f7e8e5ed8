//! The cgroups and directories of one run, named so that a killed twinbox's leftovers can
//! be told from a live run's, and the sweep that removes the dead ones. Shared by both
//! boxes: the container's run cgroups and staging directory (`container`), and the VMM's own
//! cgroup (`vmm`, `twinbox vm run`), so one naming and one sweep cover both, whichever
//! kind of run starts next.
//!
//! Two things a run makes are named objects on the host and outlive a SIGKILL of the CLI:
//! its cgroups (one per controller hierarchy) and, for a container, its staging directory
//! (an empty mount point). Both carry the run's name, `twinbox-<pid>-<start>-<pidns>-<n>`:
//! the owner's pid, its start time in clock ticks after boot (field 22 of
//! `/proc/<pid>/stat`, so a reused pid is not mistaken for the owner), its pid namespace
//! (the inode of `/proc/self/ns/pid`) and the run's number in that process (one counter
//! for both boxes, [`next_run_name`], so a process running both never reuses a name). A
//! name whose owner is gone is swept: the tasks still in its cgroups are killed and the
//! cgroups removed, the directory removed (only when empty: nothing is deleted
//! recursively). A run of another pid namespace sharing the cgroup hierarchies is never
//! judged from here: its pids mean nothing in ours.
//!
//! Also here: where the cgroup hierarchies are mounted ([`Hierarchies`], from
//! `/proc/self/mountinfo`), which both boxes' layout detection starts from, and which
//! controllers a run's parent must still enable on cgroup2 ([`controllers_to_enable`]).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// The prefix of every run name (and of nothing else twinbox makes in these places).
const PREFIX: &str = "twinbox-";

/// Where the container's staging directories live: one fixed place, so the sweep (of either
/// box) finds them whatever `TMPDIR` the killed run had.
pub const STAGING_ROOT: &str = "/run/twinbox/ctr";

/// The process that made a run, as recorded in the run's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// Its pid.
    pub pid: u32,
    /// Its start time (clock ticks after boot); None in the older `twinbox-<pid>-<n>`
    /// names, which can only be swept once the pid is free.
    pub start: Option<u64>,
    /// Its pid namespace; None in older names (taken to be ours).
    pub pid_namespace: Option<u64>,
}

/// The name of run `n` of the process `pid` started at `start` in `pid_namespace`.
pub fn run_name(pid: u32, start: u64, pid_namespace: u64, n: u32) -> String {
    format!("{PREFIX}{pid}-{start}-{pid_namespace}-{n}")
}

/// Run numbers of this process, shared by the container's runs and the VMM's.
static RUNS: AtomicU32 = AtomicU32::new(0);

/// Every run directory of process `pid` (named as [`run_name`] names them) directly under
/// any hierarchy in `cgroup_root` (`/sys/fs/cgroup`), sorted: what a run of that process
/// made and has not removed yet.
pub fn dirs_of(pid: u32, cgroup_root: &Path) -> Vec<PathBuf> {
    let prefix = format!("{PREFIX}{pid}-");
    let mut found: Vec<PathBuf> = std::fs::read_dir(cgroup_root)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|hierarchy| {
            std::fs::read_dir(hierarchy.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
        .map(|entry| entry.path())
        .collect();
    found.sort();
    found
}

/// The name of this process's next run: its pid, start time and pid namespace (for the
/// sweep), and a counter shared by every run of this process. The error says what could
/// not be read.
pub fn next_run_name() -> Result<String, String> {
    let proc = Path::new("/proc");
    let pid = std::process::id();
    let start = start_time(proc, pid)
        .ok_or("cannot read this process's start time from /proc/self/stat")?;
    let pid_namespace = pid_namespace(proc)
        .ok_or("cannot read this process's pid namespace from /proc/self/ns/pid")?;
    Ok(run_name(
        pid,
        start,
        pid_namespace,
        RUNS.fetch_add(1, Ordering::SeqCst),
    ))
}

/// Kills every task listed in `<dir>/cgroup.procs` until it is empty, then removes `dir`
/// (retrying the EBUSY a cgroup gives for a moment after its last task died). A missing
/// `dir` is fine.
pub fn kill_and_remove(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let procs = dir.join("cgroup.procs");
    for _ in 0..500 {
        let pids: Vec<i32> = fs::read_to_string(&procs)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: plain kill(2) of a task of the cgroup being removed.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let mut last = None;
    for _ in 0..200 {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Err(last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EBUSY)))
}

/// Where this host mounts its cgroup hierarchies, from a `/proc/self/mountinfo` text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hierarchies {
    /// cgroup2 when it is mounted at `/sys/fs/cgroup` (a pure v2 host; a hybrid host's
    /// cgroup2 elsewhere, e.g. `/sys/fs/cgroup/unified`, holds no controllers).
    pub unified: Option<PathBuf>,
    /// Each v1 controller's mount point (co-mounted controllers share one).
    pub v1: BTreeMap<String, PathBuf>,
}

impl Hierarchies {
    /// Parses `mountinfo`.
    pub fn parse(mountinfo: &str) -> Self {
        let mut found = Self::default();
        for line in mountinfo.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let Some(sep) = fields.iter().position(|f| *f == "-") else {
                continue;
            };
            let (Some(point), Some(fstype), Some(options)) =
                (fields.get(4), fields.get(sep + 1), fields.get(sep + 3))
            else {
                continue;
            };
            match *fstype {
                "cgroup2" if *point == "/sys/fs/cgroup" => {
                    found.unified = Some(PathBuf::from(point))
                }
                "cgroup" => {
                    for option in options.split(',') {
                        found.v1.insert(option.to_owned(), PathBuf::from(point));
                    }
                }
                _ => {}
            }
        }
        found
    }

    /// The v1 hierarchy of `controller`, if mounted.
    pub fn v1(&self, controller: &str) -> Option<&Path> {
        self.v1.get(controller).map(PathBuf::as_path)
    }
}

/// The pid namespace of the process reading `proc` (the inode `<proc>/self/ns/pid`
/// links to, `pid:[N]`).
pub fn pid_namespace(proc: &Path) -> Option<u64> {
    let link = fs::read_link(proc.join("self/ns/pid")).ok()?;
    link.to_str()?
        .strip_prefix("pid:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The owner recorded in a run name, or None for any other name.
pub fn owner_of(name: &str) -> Option<Owner> {
    let numbers: Vec<u64> = name
        .strip_prefix(PREFIX)?
        .split('-')
        .map(|part| {
            (!part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
                .then(|| part.parse().ok())
                .flatten()
        })
        .collect::<Option<_>>()?;
    let pid = u32::try_from(*numbers.first()?).ok()?;
    let (start, pid_namespace) = match numbers.len() {
        2 => (None, None),
        3 => (Some(numbers[1]), None),
        4 => (Some(numbers[1]), Some(numbers[2])),
        _ => return None,
    };
    Some(Owner {
        pid,
        start,
        pid_namespace,
    })
}

/// Start time of `pid` (field 22 of `<proc>/<pid>/stat`), None when it does not exist.
pub fn start_time(proc: &Path, pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(proc.join(pid.to_string()).join("stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Whether the owner of a run may still run: yes unless it is of our pid namespace and
/// its pid is free or taken by a process started at another time.
fn alive(places: &Places, owner: Owner) -> bool {
    if owner.pid_namespace.is_some() && owner.pid_namespace != places.pid_namespace {
        return true;
    }
    match (start_time(&places.proc, owner.pid), owner.start) {
        (None, _) => false,
        (Some(now), Some(recorded)) => now == recorded,
        // An old-style name: the pid is taken, perhaps by its owner.
        (Some(_), None) => true,
    }
}

/// The places a sweep looks at.
#[derive(Clone, Debug)]
pub struct Places {
    /// procfs, to tell live owners from dead ones.
    pub proc: PathBuf,
    /// The sweeper's pid namespace: runs of others are left alone.
    pub pid_namespace: Option<u64>,
    /// The root of every cgroup hierarchy (v1 controllers, cgroup2).
    pub cgroup_roots: Vec<PathBuf>,
    /// The directory holding the staging directories.
    pub staging: PathBuf,
}

impl Places {
    /// This host's places: every cgroup and cgroup2 mount point in `mountinfo`.
    pub fn host(mountinfo: &str) -> Self {
        let cgroup_roots = mountinfo
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                let sep = fields.iter().position(|f| *f == "-")?;
                let point = fields.get(4)?;
                matches!(*fields.get(sep + 1)?, "cgroup" | "cgroup2").then(|| PathBuf::from(point))
            })
            .collect();
        let proc = PathBuf::from("/proc");
        Self {
            pid_namespace: pid_namespace(&proc),
            proc,
            cgroup_roots,
            staging: PathBuf::from(STAGING_ROOT),
        }
    }
}

/// What a sweep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Cgroups and directories removed.
    pub removed: Vec<PathBuf>,
    /// Leftovers that could not be removed, with why.
    pub failed: Vec<String>,
}

/// Entries of `dir` named for a run whose owner is dead.
fn orphans(dir: &Path, places: &Places) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| {
            owner_of(&e.file_name().to_string_lossy()).is_some_and(|owner| !alive(places, owner))
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// Removes the cgroups and staging directories of runs whose owner is dead.
pub fn sweep(places: &Places) -> Swept {
    let mut swept = Swept::default();
    for root in &places.cgroup_roots {
        for dir in orphans(root, places) {
            match kill_and_remove(&dir) {
                Ok(()) => swept.removed.push(dir),
                Err(e) => swept
                    .failed
                    .push(format!("cgroup {}: remove: {e}", dir.display())),
            }
        }
    }
    for dir in orphans(&places.staging, places) {
        match fs::remove_dir(&dir) {
            Ok(()) => swept.removed.push(dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => swept.failed.push(format!("remove {}: {e}", dir.display())),
        }
    }
    swept
}

/// The `cgroup.subtree_control` write (cgroup2) that enables those of `wanted` its text
/// `enabled` lacks; `None` when none is missing. Written only then: any write to that
/// file, even one that changes nothing, makes the kernel revisit every task below the
/// parent (`cgroup_update_dfl_csses`) under the global threadgroup rwsem — for the root
/// cgroup, every task on the host, behind an RCU grace period (0.6–4.6 ms a run in the
/// lab).
pub fn controllers_to_enable(enabled: &str, wanted: &[&str]) -> Option<String> {
    let missing: Vec<String> = wanted
        .iter()
        .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
        .map(|c| format!("+{c}"))
        .collect();
    (!missing.is_empty()).then(|| missing.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_missing_controllers_are_enabled() {
        let wanted = ["memory", "pids"];
        assert_eq!(
            controllers_to_enable("cpuset cpu io memory hugetlb pids rdma\n", &wanted),
            None
        );
        assert_eq!(controllers_to_enable("memory pids", &wanted), None);
        assert_eq!(
            controllers_to_enable("cpu memory\n", &wanted).as_deref(),
            Some("+pids")
        );
        assert_eq!(
            controllers_to_enable("\n", &["cpu", "memory", "pids"]).as_deref(),
            Some("+cpu +memory +pids")
        );
        // A name that merely contains another's is not it.
        assert_eq!(
            controllers_to_enable("memory_x pidsy", &wanted).as_deref(),
            Some("+memory +pids")
        );
    }

    #[test]
    fn dirs_of_finds_a_pids_runs_in_every_hierarchy_and_nothing_else() {
        let root = std::env::temp_dir().join(format!("twinbox-dirs-of-{}", std::process::id()));
        for dir in [
            "memory/twinbox-42-1-2-0",
            "pids/twinbox-42-1-2-0",
            "pids/twinbox-420-1-2-0",
            "memory/other",
        ] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        let found = dirs_of(42, &root);
        let want = vec![
            root.join("memory/twinbox-42-1-2-0"),
            root.join("pids/twinbox-42-1-2-0"),
        ];
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(found, want);
    }

    #[test]
    fn run_names_carry_their_owner() {
        assert_eq!(run_name(42, 1234, 77, 3), "twinbox-42-1234-77-3");
        assert_eq!(
            owner_of("twinbox-42-1234-77-3"),
            Some(Owner {
                pid: 42,
                start: Some(1234),
                pid_namespace: Some(77),
            })
        );
        assert_eq!(
            owner_of("twinbox-42-1234-3"),
            Some(Owner {
                pid: 42,
                start: Some(1234),
                pid_namespace: None,
            })
        );
        assert_eq!(
            owner_of("twinbox-42-0"),
            Some(Owner {
                pid: 42,
                start: None,
                pid_namespace: None,
            })
        );
        assert!(pid_namespace(Path::new("/proc")).is_some());
        for other in [
            "twinbox",
            "twinbox-",
            "twinbox-ext4-42",
            "twinbox-ctr-bad-42",
            "twinbox-42",
            "twinbox-42-1-2-3-4",
            "twinbox-42--3",
            "twinbox-+4-1-2",
            "twinbox-99999999999-1-2",
            "other-42-1-2",
        ] {
            assert_eq!(owner_of(other), None, "{other}");
        }
    }

    #[test]
    fn start_time_is_field_22_even_with_parentheses_in_the_name() {
        let root = FakeRoot::new("stat");
        root.process(
            7,
            "7 (a) b (c)) S 1 7 7 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 98765 0 0",
        );
        assert_eq!(start_time(&root.proc(), 7), Some(98765));
        assert_eq!(start_time(&root.proc(), 8), None);
        // And this process's own start time reads.
        assert!(start_time(Path::new("/proc"), std::process::id()).is_some());
    }

    /// A directory standing in for `/`: proc, two cgroup hierarchies, the staging root.
    struct FakeRoot(PathBuf);

    impl FakeRoot {
        fn new(what: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("twinbox-sweep-test-{what}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            for sub in ["proc", "cgroup/cpu", "cgroup/unified", "staging"] {
                fs::create_dir_all(dir.join(sub)).unwrap();
            }
            Self(dir)
        }

        fn proc(&self) -> PathBuf {
            self.0.join("proc")
        }

        fn process(&self, pid: u32, stat: &str) {
            let dir = self.proc().join(pid.to_string());
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("stat"), stat).unwrap();
        }

        fn started(&self, pid: u32, start: u64) {
            let fields =
                format!("{pid} (twinbox) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0");
            self.process(pid, &fields);
        }

        fn places(&self) -> Places {
            Places {
                proc: self.proc(),
                pid_namespace: Some(NS),
                cgroup_roots: vec![self.0.join("cgroup/cpu"), self.0.join("cgroup/unified")],
                staging: self.0.join("staging"),
            }
        }

        fn make(&self, sub: &str) -> PathBuf {
            let path = self.0.join(sub);
            fs::create_dir_all(&path).unwrap();
            path
        }
    }

    impl Drop for FakeRoot {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// The fake sweeper's pid namespace.
    const NS: u64 = 4026531836;

    #[test]
    fn dead_owners_runs_go_live_owners_runs_and_other_names_stay() {
        let root = FakeRoot::new("sweep");
        root.started(100, 5000); // alive, its runs stay
        root.started(200, 7777); // pid reused: the run recorded start 6000
        root.started(300, 1); // alive, old-style name: cannot tell, stays
        let gone = [
            root.make("cgroup/cpu/twinbox-999-4000-0"),
            root.make("cgroup/unified/twinbox-999-4000-0"),
            root.make("cgroup/cpu/twinbox-200-6000-1"),
            root.make("cgroup/cpu/twinbox-998-0"),
            root.make("staging/twinbox-999-4000-0"),
            root.make(&format!("cgroup/unified/twinbox-997-1-{NS}-0")),
        ];
        let kept = [
            root.make("cgroup/cpu/twinbox-100-5000-0"),
            root.make("staging/twinbox-100-5000-2"),
            root.make("cgroup/cpu/twinbox-300-0"),
            root.make("cgroup/cpu/twinbox-vm-999-1"),
            root.make("cgroup/cpu/system.slice"),
            root.make("staging/twinbox-ext4-999"),
            // pid 996 is not in our namespace's proc, but the run is another namespace's.
            root.make("cgroup/cpu/twinbox-996-1-12345-0"),
            root.make(&format!("cgroup/cpu/twinbox-100-5000-{NS}-1")),
        ];
        let swept = sweep(&root.places());
        assert!(swept.failed.is_empty(), "{swept:?}");
        let mut removed = swept.removed.clone();
        removed.sort();
        let mut expected = gone.to_vec();
        expected.sort();
        assert_eq!(removed, expected);
        for path in gone {
            assert!(!path.exists(), "{} left behind", path.display());
        }
        for path in kept {
            assert!(path.exists(), "{} swept", path.display());
        }
        // Nothing left to do the second time.
        assert_eq!(sweep(&root.places()), Swept::default());
    }

    #[test]
    fn a_staging_directory_that_is_not_empty_is_reported_not_deleted() {
        let root = FakeRoot::new("busy");
        let dir = root.make("staging/twinbox-999-1-0");
        fs::write(dir.join("something"), "x").unwrap();
        let swept = sweep(&root.places());
        assert!(swept.removed.is_empty(), "{swept:?}");
        assert_eq!(swept.failed.len(), 1, "{swept:?}");
        assert!(swept.failed[0].contains("twinbox-999-1-0"), "{swept:?}");
        assert!(dir.join("something").exists());
    }

    #[test]
    fn host_places_are_every_cgroup_hierarchy() {
        let mountinfo = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        let places = Places::host(mountinfo);
        assert_eq!(
            places.cgroup_roots,
            [
                "/sys/fs/cgroup/cpu",
                "/sys/fs/cgroup/devices",
                "/sys/fs/cgroup/unified"
            ]
            .map(PathBuf::from)
        );
        assert_eq!(places.staging, Path::new(STAGING_ROOT));
    }

    #[test]
    fn hierarchies_of_a_hybrid_and_a_pure_v2_host() {
        let hybrid = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        let found = Hierarchies::parse(hybrid);
        assert_eq!(found.unified, None);
        assert_eq!(
            found.v1("cpu"),
            Some(Path::new("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert_eq!(
            found.v1("cpuacct"),
            Some(Path::new("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert_eq!(found.v1("memory"), Some(Path::new("/sys/fs/cgroup/memory")));
        assert_eq!(found.v1("pids"), None);
        let v2 = Hierarchies::parse("30 23 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        assert_eq!(v2.unified.as_deref(), Some(Path::new("/sys/fs/cgroup")));
        assert!(v2.v1.is_empty());
    }

    #[test]
    fn next_names_are_this_process_and_never_repeat() {
        let (a, b) = (next_run_name().unwrap(), next_run_name().unwrap());
        assert_ne!(a, b);
        for name in [&a, &b] {
            let owner = owner_of(name).unwrap();
            assert_eq!(owner.pid, std::process::id());
            assert_eq!(owner.start, start_time(Path::new("/proc"), owner.pid));
            assert_eq!(owner.pid_namespace, pid_namespace(Path::new("/proc")));
        }
    }

    #[test]
    fn kill_and_remove_of_a_missing_or_plain_empty_directory() {
        let dir = std::env::temp_dir().join(format!("twinbox-kar-test-{}", std::process::id()));
        assert!(kill_and_remove(&dir).is_ok());
        fs::create_dir_all(&dir).unwrap();
        assert!(kill_and_remove(&dir).is_ok());
        assert!(!dir.exists());
    }
}
