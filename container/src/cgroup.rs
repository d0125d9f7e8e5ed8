//! One cgroup per run: limits (cpu quota, memory without swap, pids), the device
//! allowlist, membership, usage and OOM readout, removal.
//!
//! Devices: on v1 the devices controller denies everything (`devices.deny a`) and then
//! allows only read and write of the nodes the plan binds into `/dev` plus devpts' ptmx
//! and ptys, without `m`: no node can be created, and a node that exists anyway does not
//! open. On cgroup v2 the same rules are a BPF device program attached to the run's
//! cgroup (`device_program.rs`).
//!
//! Written here rather than taken from `libcgroups`/`cgroups-rs`: this host is *hybrid*
//! (v1 controllers under `/sys/fs/cgroup/<ctrl>` plus an empty cgroup2 at
//! /sys/fs/cgroup/unified) and the run needs only three controllers and a handful of files,
//! so a small [`CgroupManager`] with a v1 and a v2 backend is less code to trust than
//! wiring a general manager (and its systemd/dbus features) into the deadline.

use crate::Error;
use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use twinbox_spec::cgroup_run::{self, Hierarchies};

/// CFS period used for `--cpus` (the kernel default, 100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;

/// Where the controllers this run needs are mounted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// cgroup2 mounted here with the controllers available.
    V2(PathBuf),
    /// v1 hierarchies for cpu, memory, pids and devices (hybrid hosts land here too: their
    /// cgroup2 is empty).
    V1 {
        /// The cpu controller's hierarchy.
        cpu: PathBuf,
        /// The memory controller's hierarchy.
        memory: PathBuf,
        /// The pids controller's hierarchy.
        pids: PathBuf,
        /// The devices controller's hierarchy.
        devices: PathBuf,
    },
}

/// Finds the layout from a `/proc/self/mountinfo` text (parsed by
/// `twinbox_spec::cgroup_run::Hierarchies`, which the VMM's cgroup reads too). A cgroup2
/// mount is used when it is at `/sys/fs/cgroup` (pure v2); otherwise every needed v1
/// controller must be mounted.
pub fn detect(mountinfo: &str) -> Result<Layout, Error> {
    let found = Hierarchies::parse(mountinfo);
    if let Some(root) = found.unified {
        return Ok(Layout::V2(root));
    }
    let get = |c: &str| found.v1(c).map(Path::to_path_buf);
    match (get("cpu"), get("memory"), get("pids"), get("devices")) {
        (Some(cpu), Some(memory), Some(pids), Some(devices)) => Ok(Layout::V1 {
            cpu,
            memory,
            pids,
            devices,
        }),
        (cpu, memory, pids, devices) => {
            let missing: Vec<&str> = [
                ("cpu", cpu),
                ("memory", memory),
                ("pids", pids),
                ("devices", devices),
            ]
            .into_iter()
            .filter(|(_, p)| p.is_none())
            .map(|(n, _)| n)
            .collect();
            Err(Error::CgroupLayout(format!(
                "no cgroup2 at /sys/fs/cgroup and no v1 hierarchy for {}",
                missing.join(", ")
            )))
        }
    }
}

/// One rule of the device allowlist: read and write of a character device (never `m`,
/// mknod), a whole major when `minor` is None.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceRule {
    /// The device's major number.
    pub major: u32,
    /// The device's minor number, or every minor.
    pub minor: Option<u32>,
}

impl std::fmt::Display for DeviceRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.minor {
            Some(minor) => write!(f, "c {}:{minor} rw", self.major),
            None => write!(f, "c {}:* rw", self.major),
        }
    }
}

/// devpts of the container: its `ptmx` (5:2) and the Unix98 pty slaves (major 136).
pub const DEVPTS_RULES: [DeviceRule; 2] = [
    DeviceRule {
        major: 5,
        minor: Some(2),
    },
    DeviceRule {
        major: 136,
        minor: None,
    },
];

/// The allowlist for nodes bound from `dev` (the host's `/dev`) under `names`, plus
/// devpts: the numbers are read from the nodes themselves, so the rules admit exactly
/// what the plan binds.
pub fn device_allowlist(dev: &Path, names: &[&str]) -> Result<Vec<DeviceRule>, Error> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut rules = Vec::new();
    for name in names {
        let path = dev.join(name);
        let meta =
            fs::metadata(&path).map_err(|e| Error::os(format!("stat {}", path.display()), e))?;
        if !meta.file_type().is_char_device() {
            return Err(Error::Setup(format!(
                "{} is not a character device",
                path.display()
            )));
        }
        rules.push(DeviceRule {
            major: libc::major(meta.rdev()),
            minor: Some(libc::minor(meta.rdev())),
        });
    }
    rules.extend(DEVPTS_RULES);
    Ok(rules)
}

/// The limits of one run, as the values the kernel files take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// CFS quota per [`CPU_PERIOD_US`].
    pub cpu_quota_us: u64,
    /// Memory limit (swap is held at zero beside it).
    pub memory_bytes: u64,
    /// Most tasks at once, if limited.
    pub pids: Option<u32>,
    /// The devices the container may open (v1 rules, or the v2 device program).
    pub devices: Vec<DeviceRule>,
}

impl Limits {
    /// From `--cpus` (a fraction of CPUs), `--memory` MiB and `--pids`, with no device
    /// allowed (add them with [`Limits::with_devices`]).
    pub fn new(cpus: f64, memory_mib: u32, pids: Option<u32>) -> Self {
        Self {
            // At least 1 ms: the kernel refuses smaller quotas.
            cpu_quota_us: ((cpus * CPU_PERIOD_US as f64).round() as u64).max(1000),
            memory_bytes: u64::from(memory_mib) * 1024 * 1024,
            pids,
            devices: Vec::new(),
        }
    }

    /// The same limits with `devices` as the allowlist.
    pub fn with_devices(mut self, devices: Vec<DeviceRule>) -> Self {
        self.devices = devices;
        self
    }
}

/// What the cgroup saw of the run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Peak memory use, KiB.
    pub memory_peak_kib: Option<u64>,
    /// The OOM killer struck in the cgroup.
    pub oom_killed: bool,
}

/// How the run's child is born inside its cgroup, instead of being moved there after
/// `clone`: a move of another task takes the global threadgroup lock for writing, which
/// waits for an RCU grace period (5–17 ms measured on a virtualised host) on every run.
pub enum Birth {
    /// v1: the calling thread has joined the run's cgroups, so what it clones is born
    /// there; [`Joined::leave`] takes it back out.
    Thread(Joined),
    /// v2: the cgroup's directory, for `clone3`'s `CLONE_INTO_CGROUP`.
    Into(OwnedFd),
}

/// A cgroup of one run: limits set, tasks added, read, removed.
pub trait CgroupManager {
    /// Puts `pid` into the cgroup (a move: the fallback when [`CgroupManager::birth`]
    /// could not be used).
    fn add(&self, pid: i32) -> Result<(), Error>;
    /// Makes ready for a child born inside the cgroup (see [`Birth`]).
    fn birth(&self) -> Result<Birth, Error>;
    /// Peak memory and whether the OOM killer struck.
    fn stats(&self) -> Stats;
    /// Kills what still runs in it and removes it (idempotent).
    fn destroy(&mut self) -> Result<(), Error>;
}

fn write(path: &Path, value: &str) -> Result<(), Error> {
    fs::write(path, value).map_err(|source| Error::Cgroup {
        path: path.to_owned(),
        what: format!("write {value:?}"),
        source,
    })
}

/// Writes each of `values` to `path` with a write(2) of its own, through one open: a
/// cgroup v1 control file such as `devices.allow` takes one rule per write.
fn write_each(path: &Path, values: &[impl std::fmt::Display]) -> Result<(), Error> {
    use std::io::Write;
    let failed = |value: String| {
        let path = path.to_owned();
        move |source| Error::Cgroup {
            path,
            what: format!("write {value:?}"),
            source,
        }
    };
    let Some(first) = values.first() else {
        return Ok(());
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(failed(first.to_string()))?;
    for value in values {
        let value = value.to_string();
        // One write_all of a short rule is one write(2) to a kernfs file.
        file.write_all(value.as_bytes())
            .map_err(failed(value.clone()))?;
    }
    Ok(())
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A `key value` line from a flat-keyed file (memory.events, memory.oom_control).
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
}

fn mkdir(path: &Path) -> Result<(), Error> {
    fs::create_dir(path).map_err(|source| Error::Cgroup {
        path: path.to_owned(),
        what: "create".into(),
        source,
    })
}

/// Kills every task listed in `procs` until it is empty, then removes `dir` (the sweep's
/// own removal, `twinbox_spec::cgroup_run::kill_and_remove`).
pub(crate) fn kill_and_remove(dir: &Path) -> Result<(), Error> {
    cgroup_run::kill_and_remove(dir).map_err(|source| Error::Cgroup {
        path: dir.to_owned(),
        what: "remove".into(),
        source,
    })
}

/// Removes `dir` at once when it is empty — the usual end of a run: the child's pid
/// namespace died with its init, which the caller reaped — and only otherwise lists and
/// kills what is left first ([`kill_and_remove`]).
fn remove_or_kill_and_remove(dir: &Path) -> Result<(), Error> {
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        // EBUSY: tasks left (or another error, which the slow way reports).
        Err(_) => kill_and_remove(dir),
    }
}

/// v1: one directory per controller hierarchy.
pub struct V1 {
    cpu: PathBuf,
    memory: PathBuf,
    pids: PathBuf,
    devices: PathBuf,
    /// `pids.max`, written once no thread of ours counts in the cgroup (see [`Joined`]).
    pids_max: Option<u32>,
    removed: bool,
}

/// v2: one directory in the unified hierarchy.
pub struct V2 {
    dir: PathBuf,
    removed: bool,
}

/// A run's cgroup being made on a thread of its own, while the run's other steps before
/// the clone go on beside it: making one on v1 (four directories and their limits) takes
/// ~0.12 ms on a PVM host, about what those steps take. Dropped without [`Self::wait`]
/// (an earlier step failed), it waits for the thread and removes what it made.
pub struct PendingCgroup(Option<Pending>);

enum Pending {
    /// Made (or failed) already.
    Made(Result<Box<dyn CgroupManager>, Error>),
    /// Being made by this thread.
    Making(std::thread::JoinHandle<Result<Box<dyn CgroupManager + Send>, Error>>),
}

impl PendingCgroup {
    /// Starts making the cgroup `name` with `limits` in `layout` ([`create`]) on a thread
    /// of its own (here, if no thread can be had).
    pub fn start(layout: &Layout, name: &str, limits: Limits) -> Self {
        let (layout, name) = (layout.clone(), name.to_owned());
        Self::start_with(move || create(&layout, &name, limits))
    }

    /// Runs `make` on a thread of its own (here, if no thread can be had).
    fn start_with(
        make: impl FnOnce() -> Result<Box<dyn CgroupManager + Send>, Error> + Clone + Send + 'static,
    ) -> Self {
        match std::thread::Builder::new()
            .name("twinbox-cgroup".into())
            .spawn(make.clone())
        {
            Ok(thread) => Self(Some(Pending::Making(thread))),
            Err(e) => {
                tracing::debug!("cgroup made in line: no thread: {e}");
                Self::made(make().map(|group| group as Box<dyn CgroupManager>))
            }
        }
    }

    /// A cgroup made (or failed) already.
    pub fn made(result: Result<Box<dyn CgroupManager>, Error>) -> Self {
        Self(Some(Pending::Made(result)))
    }

    /// The cgroup, once made.
    pub fn wait(mut self) -> Result<Box<dyn CgroupManager>, Error> {
        match self.0.take() {
            Some(Pending::Made(result)) => result,
            Some(Pending::Making(thread)) => match thread.join() {
                Ok(result) => result.map(|group| group as Box<dyn CgroupManager>),
                Err(_) => Err(Error::Setup("the thread making the cgroup panicked".into())),
            },
            None => Err(Error::Setup("the cgroup was taken already".into())),
        }
    }
}

impl Drop for PendingCgroup {
    fn drop(&mut self) {
        // What the thread made goes with its result (the groups' own drop removes them).
        if let Some(Pending::Making(thread)) = self.0.take() {
            let _ = thread.join();
        }
    }
}

/// Creates the cgroup `name` with `limits` in `layout`. On error nothing is left behind
/// (a panic halfway, which no path of it has, could leave directories).
pub fn create(
    layout: &Layout,
    name: &str,
    limits: Limits,
) -> Result<Box<dyn CgroupManager + Send>, Error> {
    match layout {
        Layout::V1 {
            cpu,
            memory,
            pids,
            devices,
        } => {
            let mut group = V1 {
                cpu: cpu.join(name),
                memory: memory.join(name),
                pids: pids.join(name),
                devices: devices.join(name),
                pids_max: limits.pids,
                removed: false,
            };
            // Drop removes whatever was made if a step fails.
            for dir in [
                group.cpu.clone(),
                group.memory.clone(),
                group.pids.clone(),
                group.devices.clone(),
            ] {
                if let Err(e) = mkdir(&dir) {
                    group.destroy()?;
                    return Err(e);
                }
            }
            let set = || -> Result<(), Error> {
                write(
                    &group.cpu.join("cpu.cfs_period_us"),
                    &CPU_PERIOD_US.to_string(),
                )?;
                write(
                    &group.cpu.join("cpu.cfs_quota_us"),
                    &limits.cpu_quota_us.to_string(),
                )?;
                write(
                    &group.memory.join("memory.limit_in_bytes"),
                    &limits.memory_bytes.to_string(),
                )?;
                // Swap off: memsw == mem (only exists with swap accounting).
                let memsw = group.memory.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, &limits.memory_bytes.to_string())?;
                }
                let _ = fs::write(group.memory.join("memory.swappiness"), "0");
                // pids.max comes once the child is in and our thread out: the thread
                // that clones it counts while it is inside.
                // Deny first, then allow: the cgroup never admits more than the list.
                write(&group.devices.join("devices.deny"), "a")?;
                write_each(&group.devices.join("devices.allow"), &limits.devices)?;
                Ok(())
            };
            if let Err(e) = set() {
                group.destroy()?;
                return Err(e);
            }
            Ok(Box::new(group))
        }
        Layout::V2(root) => {
            let wanted = ["cpu", "memory", "pids"];
            let available = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            for c in wanted {
                if !available.split_whitespace().any(|a| a == c) {
                    return Err(Error::CgroupLayout(format!(
                        "cgroup2 at {} lacks the {c} controller",
                        root.display()
                    )));
                }
            }
            let control = root.join("cgroup.subtree_control");
            let enabled = fs::read_to_string(&control)
                .map_err(|e| Error::os(format!("read {}", control.display()), e))?;
            if let Some(missing) = cgroup_run::controllers_to_enable(&enabled, &wanted) {
                write(&control, &missing)?;
            }
            let mut group = V2 {
                dir: root.join(name),
                removed: false,
            };
            mkdir(&group.dir)?;
            let set = || -> Result<(), Error> {
                write(
                    &group.dir.join("cpu.max"),
                    &format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us),
                )?;
                write(
                    &group.dir.join("memory.max"),
                    &limits.memory_bytes.to_string(),
                )?;
                let swap = group.dir.join("memory.swap.max");
                if swap.exists() {
                    write(&swap, "0")?;
                }
                if let Some(pids) = limits.pids {
                    write(&group.dir.join("pids.max"), &pids.to_string())?;
                }
                // Before any task joins: the allowlist is there from the first open.
                crate::device_program::attach(&group.dir, &limits.devices)
            };
            if let Err(e) = set() {
                group.destroy()?;
                return Err(e);
            }
            Ok(Box::new(group))
        }
    }
}

impl V1 {
    /// The hierarchies, devices first: a task is never outside its allowlist while in
    /// the others.
    fn dirs(&self) -> [&PathBuf; 4] {
        [&self.devices, &self.cpu, &self.memory, &self.pids]
    }

    fn limit_pids(&self) -> Result<(), Error> {
        match self.pids_max {
            Some(max) => write(&self.pids.join("pids.max"), &max.to_string()),
            None => Ok(()),
        }
    }
}

impl CgroupManager for V1 {
    fn add(&self, pid: i32) -> Result<(), Error> {
        for dir in self.dirs() {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        self.limit_pids()
    }

    fn birth(&self) -> Result<Birth, Error> {
        // Where this thread is now, per hierarchy, to come back to.
        let own = crate::syscall::read_proc_file(Path::new("/proc/thread-self/cgroup"))
            .map_err(|e| Error::os("read /proc/thread-self/cgroup", e))?;
        let mut back = Vec::new();
        for (dir, controller) in self
            .dirs()
            .into_iter()
            .zip(["devices", "cpu", "memory", "pids"])
        {
            let mount = dir.parent().unwrap_or(Path::new("/"));
            let here = own_v1_cgroup(&own, controller).ok_or_else(|| {
                Error::Setup(format!("this thread's {controller} cgroup is not listed"))
            })?;
            back.push(mount.join(here.trim_start_matches('/')).join("tasks"));
        }
        let joined = Joined {
            back,
            pids_limit: self.pids_max.map(|max| (self.pids.join("pids.max"), max)),
            left: false,
        };
        // The limit holds from the child's first instant: while this thread is inside it
        // counts too, so it is one higher until the thread leaves. The child may run — and
        // exec init — before this thread is back (it is suspended while a child on its
        // memory sets up, `syscall::SHARED_MEMORY`).
        if let Some((file, max)) = &joined.pids_limit {
            write(file, &max.saturating_add(1).to_string())?;
        }
        // "0" in `tasks` moves the writing thread alone: the kernel skips the global
        // threadgroup lock for it (cgroup_procs_write_start), so no grace period.
        for dir in self.dirs() {
            if let Err(e) = write(&dir.join("tasks"), "0") {
                // Back out of those joined (the guard's drop); the caller falls back.
                drop(joined);
                return Err(e);
            }
        }
        Ok(Birth::Thread(joined))
    }

    fn stats(&self) -> Stats {
        let control =
            fs::read_to_string(self.memory.join("memory.oom_control")).unwrap_or_default();
        let failcnt = read_u64(&self.memory.join("memory.failcnt")).unwrap_or(0);
        Stats {
            memory_peak_kib: read_u64(&self.memory.join("memory.max_usage_in_bytes"))
                .map(|b| b / 1024),
            oom_killed: keyed(&control, "oom_kill").unwrap_or(0) > 0
                || keyed(&control, "under_oom").unwrap_or(0) > 0
                || (keyed(&control, "oom_kill").is_none() && failcnt > 0),
        }
    }

    fn destroy(&mut self) -> Result<(), Error> {
        if self.removed {
            return Ok(());
        }
        // The pids hierarchy lists every task; killing them empties the others too.
        let mut first = Ok(());
        for dir in [&self.pids, &self.memory, &self.cpu, &self.devices] {
            if let Err(e) = remove_or_kill_and_remove(dir) {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        self.removed = first.is_ok();
        first
    }
}

impl CgroupManager for V2 {
    fn add(&self, pid: i32) -> Result<(), Error> {
        write(&self.dir.join("cgroup.procs"), &pid.to_string())
    }

    fn birth(&self) -> Result<Birth, Error> {
        let dir = fs::File::open(&self.dir).map_err(|source| Error::Cgroup {
            path: self.dir.clone(),
            what: "open for CLONE_INTO_CGROUP".into(),
            source,
        })?;
        Ok(Birth::Into(dir.into()))
    }

    fn stats(&self) -> Stats {
        let events = fs::read_to_string(self.dir.join("memory.events")).unwrap_or_default();
        Stats {
            memory_peak_kib: read_u64(&self.dir.join("memory.peak")).map(|b| b / 1024),
            oom_killed: keyed(&events, "oom_kill").unwrap_or(0) > 0,
        }
    }

    fn destroy(&mut self) -> Result<(), Error> {
        if self.removed {
            return Ok(());
        }
        let kill = self.dir.join("cgroup.kill");
        if kill.exists() {
            let _ = fs::write(&kill, "1");
        }
        kill_and_remove(&self.dir)?;
        self.removed = true;
        Ok(())
    }
}

/// The calling thread inside the run's v1 cgroups, for the `clone` of the child. The thread
/// must neither open devices nor fork anything else until it leaves.
pub struct Joined {
    /// The `tasks` files of the cgroups the thread came from.
    back: Vec<PathBuf>,
    /// `pids.max` and its value, written once the thread is out.
    pids_limit: Option<(PathBuf, u32)>,
    left: bool,
}

impl Joined {
    /// Takes the thread back to where it was, then sets the pids limit to the run's own
    /// (one lower than while the thread counted inside).
    pub fn leave(mut self) -> Result<(), Error> {
        self.left = true;
        for tasks in &self.back {
            write(tasks, "0")?;
        }
        match &self.pids_limit {
            Some((file, max)) => write(file, &max.to_string()),
            None => Ok(()),
        }
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        if !self.left {
            for tasks in &self.back {
                if let Err(e) = write(tasks, "0") {
                    tracing::warn!("{e}");
                }
            }
        }
    }
}

/// This thread's cgroup path in the v1 hierarchy of `controller` (alone or co-mounted),
/// from a `/proc/<pid>/cgroup` text.
fn own_v1_cgroup<'t>(text: &'t str, controller: &str) -> Option<&'t str> {
    text.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, listed, path) = (fields.next()?, fields.next()?, fields.next()?);
        listed.split(',').any(|c| c == controller).then_some(path)
    })
}

impl Drop for V1 {
    fn drop(&mut self) {
        if let Err(e) = self.destroy() {
            tracing::warn!("{e}");
        }
    }
}

impl Drop for V2 {
    fn drop(&mut self) {
        if let Err(e) = self.destroy() {
            tracing::warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A cgroup that notes its removal (its drop, as the real groups' drop removes them).
    struct Noted(Arc<AtomicBool>);

    impl CgroupManager for Noted {
        fn add(&self, _: i32) -> Result<(), Error> {
            Ok(())
        }
        fn birth(&self) -> Result<Birth, Error> {
            Err(Error::Setup("no real cgroup".into()))
        }
        fn stats(&self) -> Stats {
            Stats::default()
        }
        fn destroy(&mut self) -> Result<(), Error> {
            Ok(())
        }
    }

    impl Drop for Noted {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_pending_cgroup_dropped_unwaited_waits_for_its_thread_and_removes_the_group() {
        let removed = Arc::new(AtomicBool::new(false));
        let noted = removed.clone();
        let pending = PendingCgroup::start_with(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            Ok(Box::new(Noted(noted.clone())) as Box<dyn CgroupManager + Send>)
        });
        drop(pending);
        assert!(
            removed.load(Ordering::SeqCst),
            "the group the thread made outlived the run that gave up on it"
        );
    }

    #[test]
    fn a_pending_cgroup_gives_its_group_its_error_or_its_threads_panic_as_one_error() {
        let removed = Arc::new(AtomicBool::new(false));
        let noted = removed.clone();
        let group = PendingCgroup::start_with(move || {
            Ok(Box::new(Noted(noted.clone())) as Box<dyn CgroupManager + Send>)
        })
        .wait();
        assert!(group.is_ok() && !removed.load(Ordering::SeqCst));
        drop(group);
        assert!(removed.load(Ordering::SeqCst));
        let failed = PendingCgroup::start_with(|| Err(Error::Setup("no room".into())));
        let error = failed.wait().err().expect("the make's error").to_string();
        assert!(error.contains("no room"), "{error}");
        let panicked = PendingCgroup::start_with(|| panic!("halfway"));
        let error = panicked.wait().err().expect("an error").to_string();
        assert!(error.contains("panicked"), "{error}");
    }

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_uses_v1_controllers() {
        assert_eq!(
            detect(HYBRID).unwrap(),
            Layout::V1 {
                cpu: "/sys/fs/cgroup/cpu".into(),
                memory: "/sys/fs/cgroup/memory".into(),
                pids: "/sys/fs/cgroup/pids".into(),
                devices: "/sys/fs/cgroup/devices".into(),
            }
        );
    }

    #[test]
    fn co_mounted_v1_and_pure_v2() {
        let comounted =
            "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                         35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                         36 31 0:33 / /sys/fs/cgroup/devices rw - cgroup cgroup rw,devices\n\
                         39 31 0:36 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n";
        assert!(
            matches!(detect(comounted).unwrap(), Layout::V1 { cpu, .. } if cpu == Path::new("/sys/fs/cgroup/cpu,cpuacct"))
        );
        let v2 = "30 23 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(detect(v2).unwrap(), Layout::V2("/sys/fs/cgroup".into()));
    }

    #[test]
    fn missing_controllers_are_named() {
        let only_cpu = "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        let err = detect(only_cpu).unwrap_err().to_string();
        assert!(err.contains("memory, pids, devices"), "{err}");
        assert!(detect("").is_err());
    }

    #[test]
    fn limits_in_kernel_units() {
        let l = Limits::new(0.5, 64, Some(20));
        assert_eq!(l.cpu_quota_us, 50_000);
        assert_eq!(l.memory_bytes, 64 << 20);
        assert_eq!(l.pids, Some(20));
        assert_eq!(Limits::new(2.0, 128, None).cpu_quota_us, 200_000);
        assert_eq!(Limits::new(0.001, 128, None).cpu_quota_us, 1000);
    }

    #[test]
    fn device_rules_read_and_write_only_never_mknod() {
        let rules = device_allowlist(Path::new("/dev"), &["null", "zero"]).unwrap();
        let text: Vec<String> = rules.iter().map(ToString::to_string).collect();
        assert_eq!(text, ["c 1:3 rw", "c 1:5 rw", "c 5:2 rw", "c 136:* rw"]);
        let err = device_allowlist(Path::new("/dev"), &["no-such-node"]).unwrap_err();
        assert!(err.to_string().contains("/dev/no-such-node"), "{err}");
        let err = device_allowlist(Path::new("/"), &["tmp"]).unwrap_err();
        assert!(err.to_string().contains("not a character device"), "{err}");
    }

    #[test]
    fn own_cgroup_per_hierarchy_co_mounted_or_not() {
        let own = "12:pids:/user.slice/x\n4:cpu,cpuacct:/a\n3:memory:/\n1:name=systemd:/s\n0::/u\n";
        assert_eq!(own_v1_cgroup(own, "pids"), Some("/user.slice/x"));
        assert_eq!(own_v1_cgroup(own, "cpu"), Some("/a"));
        assert_eq!(own_v1_cgroup(own, "cpuacct"), Some("/a"));
        assert_eq!(own_v1_cgroup(own, "memory"), Some("/"));
        assert_eq!(own_v1_cgroup(own, "systemd"), None);
        assert_eq!(own_v1_cgroup(own, "devices"), None);
    }

    #[test]
    fn keyed_files() {
        let control = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed(control, "oom_kill"), Some(3));
        assert_eq!(keyed(control, "under_oom"), Some(0));
        assert_eq!(keyed(control, "missing"), None);
    }
}
