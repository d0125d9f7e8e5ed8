//! The VMM's own cgroup ([`crate::run_in_own_cgroup`], `twinbox vm run`): the whole VMM
//! process, guest RAM included (the VMM allocates it), moves into a fresh cgroup whose
//! memory limit is guest RAM plus an overhead ([`overhead_mib`]: 32 MiB and 1/64 of guest
//! RAM, from measurement) and whose pids limit is its threads plus a margin. A guest that
//! touches all its RAM fits; a VMM that grows beyond that is OOM-killed inside its cgroup
//! instead of eating the host.
//!
//! Only the memory and pids controllers: cpu is the vCPUs' count already, and the VMM
//! opens no device nodes after setup (the jail closed `/dev/kvm`). The cgroup is named and
//! swept as the container's runs are (`twinbox_spec::cgroup_run`): a SIGKILLed VMM leaves
//! an empty cgroup that the next `twinbox vm run` or `ctr run` removes.
//!
//! Own code rather than the container's `CgroupManager`: that one puts another process
//! (the container's child) into a cgroup with cpu and devices, and kills what is in it on
//! removal; this one moves the calling process itself and back, in two controllers. What
//! both need — where the hierarchies are, the names, the sweep — is shared through
//! `twinbox_spec::cgroup_run`.
//!
//! How the process moves, and why so: writing a pid to `cgroup.procs` moves a whole
//! thread group under the kernel's global threadgroup rwsem, whose writer waits for an RCU
//! grace period — 5–14 ms in and 10–11 ms back out on a virtualised host. On cgroup v1 a
//! thread that writes "0" to a hierarchy's `tasks` file moves itself alone, and the kernel
//! skips that lock (it cannot exit or exec under its own write). So, on v1, the VMM moves
//! while it is still single-threaded (`/proc/self/task` has one entry): every thread it
//! starts later is born inside, and the memory controller charges the mm's owner, the
//! thread that moved. At the end, once every other thread is joined, the same thread moves
//! back the same way. Where that cannot hold — the process already has threads on the way
//! in, or a cgroup still holds a task after the way back (its rmdir says EBUSY) — it falls
//! back to `cgroup.procs`. cgroup v2 has no per-thread move for domain controllers such as
//! memory (`cgroup.threads` only works inside a threaded subtree), and CLONE_INTO_CGROUP
//! needs a child, which the VMM is not: there it writes `cgroup.procs`.
//!
//! The way out works under the caller's seccomp filter (the CLI's thread is filtered
//! while the VM runs): the original cgroups' `tasks` and `cgroup.procs` are opened on the
//! way in, so moving back is a write(2), and removal is rmdir(2), which the caller's list
//! holds when the run has a cgroup (see `seccomp.rs`). Nothing else on the way out opens a
//! file.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use thiserror::Error;
use twinbox_spec::cgroup_run::{self, Hierarchies};

/// Memory the VMM may use beyond guest RAM, fixed part: its own heap, stacks and the
/// pages of its binary it faults in, the console capture, the page cache of the images it
/// reads (reclaimable). Measured on this PVM host: `twinbox vm run` (release, 1 vCPU,
/// 128 MiB, real kernel until its 3 s limit) peaks at `VmHWM` 20.3 MiB with 15.0 MiB of
/// guest pages touched, so 5.2 MiB of its own (most of it file pages of the binary and
/// libc, which stay charged where they were first read, so the cgroup saw 1.8 MiB beyond
/// the guest); a tiny guest touching all of 256 MiB: cgroup peak 2.3 MiB beyond the guest.
/// 32 MiB is six times the worst of these.
pub const OVERHEAD_MIB: u64 = 32;

/// Memory the VMM may use beyond guest RAM, per guest MiB: what grows with guest RAM is
/// kernel memory charged to the VMM — the page tables of its own mapping of guest RAM and
/// KVM's per-page structures (memslot rmap, shadow or EPT tables), 8 bytes per 4 KiB page
/// each. Measured: a tiny guest touching all of 256 MiB charged 2.3 MiB beyond its pages,
/// all of 900 MiB 5.2 MiB, so 4.6 KiB per guest MiB; 1/64 (16 KiB per MiB) is three
/// times that, and keeps a guest of host size (bounded by MemTotal) inside its limit.
pub const OVERHEAD_PER_GUEST_MIB_DIVISOR: u64 = 64;

/// The whole overhead for a guest of `memory_mib` MiB, MiB.
pub fn overhead_mib(memory_mib: u32) -> u64 {
    OVERHEAD_MIB + u64::from(memory_mib).div_ceil(OVERHEAD_PER_GUEST_MIB_DIVISOR)
}

/// Tasks the VMM may have besides its vCPUs: the caller's thread, the jail's, the event
/// loop, two serial-console writers, four stdio pumps; and as many again for the
/// short-lived (a thread being joined while its successor starts, a helper a library may
/// start).
pub const EXTRA_TASKS: u32 = 20;

/// The limits of a VM's cgroup, in the units the kernel files take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Memory (and memory plus swap: no swap), bytes.
    pub memory_bytes: u64,
    /// Most tasks (threads) at once.
    pub pids: u32,
}

impl Limits {
    /// For a guest of `memory_mib` MiB and `vcpus` vCPUs.
    pub fn for_vm(memory_mib: u32, vcpus: u32) -> Self {
        Self {
            memory_bytes: (u64::from(memory_mib) + overhead_mib(memory_mib)) << 20,
            pids: vcpus.saturating_add(EXTRA_TASKS),
        }
    }
}

/// Why the cgroup could not be made or entered. One line naming the fix.
#[derive(Debug, Error)]
pub enum CgroupError {
    #[error("the VMM's cgroup: {0} (it needs root and writable memory and pids cgroups; --no-cgroup runs without one)")]
    Layout(String),
    #[error("the VMM's cgroup: {what} {path}: {source} (it needs root and writable memory and pids cgroups; --no-cgroup runs without one)")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where the memory and pids controllers are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// cgroup2 at this root, with both controllers.
    V2(PathBuf),
    /// v1 hierarchies (hybrid hosts land here: their cgroup2 has no controllers).
    V1 { memory: PathBuf, pids: PathBuf },
}

/// Finds the layout from a `/proc/self/mountinfo` text, as the container does: cgroup2
/// at `/sys/fs/cgroup`, else the v1 memory and pids hierarchies.
pub fn detect(mountinfo: &str) -> Result<Layout, CgroupError> {
    let found = Hierarchies::parse(mountinfo);
    if let Some(root) = found.unified {
        return Ok(Layout::V2(root));
    }
    match (found.v1("memory"), found.v1("pids")) {
        (Some(memory), Some(pids)) => Ok(Layout::V1 {
            memory: memory.to_owned(),
            pids: pids.to_owned(),
        }),
        (memory, _) => Err(CgroupError::Layout(format!(
            "no cgroup2 at /sys/fs/cgroup and no v1 hierarchy for {}",
            if memory.is_none() { "memory" } else { "pids" }
        ))),
    }
}

/// The files a cgroup directory gets, in order: `(file, value, required)`.
pub fn settings(layout: &Layout, limits: Limits) -> Vec<(PathBuf, &'static str, String, bool)> {
    let memory = limits.memory_bytes.to_string();
    let pids = limits.pids.to_string();
    match layout {
        Layout::V1 { memory: m, pids: p } => vec![
            (m.clone(), "memory.limit_in_bytes", memory.clone(), true),
            // Swap off: memsw == mem (the file exists only with swap accounting).
            (m.clone(), "memory.memsw.limit_in_bytes", memory, false),
            (m.clone(), "memory.swappiness", "0".into(), false),
            (p.clone(), "pids.max", pids, true),
        ],
        Layout::V2(root) => vec![
            (root.clone(), "memory.max", memory, true),
            (root.clone(), "memory.swap.max", "0".into(), false),
            (root.clone(), "pids.max", pids, true),
        ],
    }
}

/// The controllers of the VMM's cgroup.
const CONTROLLERS: [&str; 2] = ["memory", "pids"];

/// The original cgroup of this process in the hierarchy of `controller` (v1) or in the
/// unified one (`None`), from a `/proc/self/cgroup` text.
pub fn own_cgroup<'a>(proc_cgroup: &'a str, controller: Option<&str>) -> Option<&'a str> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = match controller {
            None => controllers.is_empty(),
            Some(c) => controllers.split(',').any(|x| x == c),
        };
        matches.then_some(path)
    })
}

/// The VMM process inside its cgroup. Dropping it moves the process back to its original
/// cgroups and removes the run's directories, with nothing but write(2) and rmdir(2).
pub struct VmmCgroup {
    name: String,
    /// The way back to each original cgroup, in the order of `dirs`.
    backs: Vec<Back>,
    /// The run's directories, and each as a C string for rmdir(2) on the way out.
    dirs: Vec<(PathBuf, CString)>,
    /// How the process moved in, and so how it moves back first.
    moved: Move,
}

/// How the process entered its cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Move {
    /// The one thread it had wrote "0" to v1 `tasks` files: moved alone, no global lock.
    OwnThread,
    /// Its pid went to `cgroup.procs`: the whole thread group, under the global lock.
    ThreadGroup,
}

/// An original cgroup's files, open for writing before the move in.
struct Back {
    /// `tasks` (v1 only): "0" there moves the writing thread.
    tasks: Option<File>,
    /// `cgroup.procs`: a pid there moves its whole thread group.
    procs: File,
}

impl VmmCgroup {
    /// Sweeps dead runs' leftovers, then makes this run's cgroup with `limits` and moves
    /// this process (every thread of it) in. On error nothing is left and the process is
    /// where it was.
    pub fn enter(limits: Limits) -> Result<Self, CgroupError> {
        let read = |path: &str| {
            fs::read_to_string(path).map_err(|source| CgroupError::Io {
                what: "read",
                path: path.into(),
                source,
            })
        };
        let mountinfo = read("/proc/self/mountinfo")?;
        sweep(&mountinfo);
        let layout = detect(&mountinfo)?;
        let name = cgroup_run::next_run_name().map_err(CgroupError::Layout)?;
        Self::enter_in(&layout, &name, limits, &read("/proc/self/cgroup")?)
    }

    /// [`VmmCgroup::enter`] in `layout`, as `name`, from the cgroups `proc_cgroup` lists.
    pub fn enter_in(
        layout: &Layout,
        name: &str,
        limits: Limits,
        proc_cgroup: &str,
    ) -> Result<Self, CgroupError> {
        let roots: Vec<(&Path, Option<&str>)> = match layout {
            Layout::V1 { memory, pids } => vec![(memory, Some("memory")), (pids, Some("pids"))],
            Layout::V2(root) => {
                let control = root.join("cgroup.subtree_control");
                let enabled = fs::read_to_string(&control).map_err(|source| CgroupError::Io {
                    what: "read",
                    path: control.clone(),
                    source,
                })?;
                if let Some(missing) = cgroup_run::controllers_to_enable(&enabled, &CONTROLLERS) {
                    write(&control, &missing)?;
                }
                vec![(root, None)]
            }
        };
        // Alone before anything here starts a thread: then no thread of the run can be
        // born outside the cgroup.
        let moved = if matches!(layout, Layout::V1 { .. }) && single_threaded() {
            Move::OwnThread
        } else {
            Move::ThreadGroup
        };
        let mut group = Self {
            name: name.to_owned(),
            backs: Vec::new(),
            dirs: Vec::new(),
            // Until the move in, nothing needs moving back; `group`'s drop on an error
            // before it writes "0", which the kernel takes as a move to where it already is.
            moved,
        };
        // Every way back opened and every directory made with its limits before the move:
        // the process is never in a cgroup without its limit. On error, `group`'s drop
        // undoes what was done.
        for (root, controller) in &roots {
            let original = own_cgroup(proc_cgroup, *controller).ok_or_else(|| {
                CgroupError::Layout(format!(
                    "/proc/self/cgroup lists no {} cgroup",
                    controller.unwrap_or("unified")
                ))
            })?;
            let original = root.join(original.trim_start_matches('/'));
            let tasks = match moved {
                Move::OwnThread => Some(open_for_writing(&original.join("tasks"))?),
                Move::ThreadGroup => None,
            };
            let procs = open_for_writing(&original.join("cgroup.procs"))?;
            group.backs.push(Back { tasks, procs });
            let dir = root.join(name);
            let c_dir = CString::new(dir.as_os_str().as_bytes())
                .map_err(|_| CgroupError::Layout(format!("{} holds a NUL", dir.display())))?;
            fs::create_dir(&dir).map_err(|source| CgroupError::Io {
                what: "create",
                path: dir.clone(),
                source,
            })?;
            group.dirs.push((dir, c_dir));
        }
        for (root, file, value, required) in settings(layout, limits) {
            let path = root.join(name).join(file);
            if required || path.exists() {
                write(&path, &value)?;
            }
        }
        for (dir, _) in &group.dirs {
            match moved {
                Move::OwnThread => write(&dir.join("tasks"), "0")?,
                Move::ThreadGroup => write(&dir.join("cgroup.procs"), &own_pid())?,
            }
        }
        tracing::debug!(name, ?moved, "the VMM entered its cgroup");
        Ok(group)
    }

    /// How the process moved in.
    pub fn moved(&self) -> Move {
        self.moved
    }

    /// The run's name (`twinbox-<pid>-<start>-<pidns>-<n>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The run's cgroup directories (one per hierarchy).
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|(dir, _)| dir.as_path())
    }
}

impl Drop for VmmCgroup {
    fn drop(&mut self) {
        let pid = own_pid();
        for (back, (dir, c_dir)) in self.backs.iter_mut().zip(&self.dirs) {
            // The thread that moved in alone moves back alone: every other thread of the
            // run is joined by now. Should one still be inside after a short wait (rmdir:
            // EBUSY), the whole thread group follows through `cgroup.procs`.
            let alone = match (&mut back.tasks, self.moved) {
                (Some(tasks), Move::OwnThread) => tasks.write_all(b"0").is_ok(),
                _ => false,
            };
            if alone && removed_once_exited(c_dir) {
                continue;
            }
            if alone {
                tracing::debug!(dir = %dir.display(), "a task stays in the VMM's cgroup: moving the thread group");
            }
            if let Err(e) = back.procs.write_all(pid.as_bytes()) {
                tracing::warn!("cannot move the VMM back to its cgroup: {e}");
            }
            remove(c_dir, dir);
        }
    }
}

/// Whether this process has one thread, the caller's.
fn single_threaded() -> bool {
    fs::read_dir("/proc/self/task").is_ok_and(|tasks| tasks.take(2).count() == 1)
}

/// This process's pid, as the cgroup files take it.
fn own_pid() -> String {
    // SAFETY: getpid has no arguments and cannot fail.
    unsafe { libc::getpid() }.to_string()
}

fn open_for_writing(path: &Path) -> Result<File, CgroupError> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|source| CgroupError::Io {
            what: "open",
            path: path.to_owned(),
            source,
        })
}

/// One rmdir(2) of `dir`: `None` when it is gone, else the errno.
fn rmdir(dir: &CString) -> Option<i32> {
    // SAFETY: `dir` is a NUL-terminated path that lives across the call.
    if unsafe { libc::rmdir(dir.as_ptr()) } == 0 {
        return None;
    }
    match std::io::Error::last_os_error().raw_os_error().unwrap_or(0) {
        libc::ENOENT => None,
        errno => Some(errno),
    }
}

/// rmdir(2) of `dir` once the threads that left it finished exiting: a joined thread may
/// still be in its cgroup for a moment (the kernel wakes its joiner before it unlinks the
/// thread from its cgroups), so EBUSY is retried for up to ~25 ms. `false`: not removed.
fn removed_once_exited(dir: &CString) -> bool {
    let mut pause = std::time::Duration::from_micros(100);
    for _ in 0..8 {
        match rmdir(dir) {
            None => return true,
            Some(libc::EBUSY) => std::thread::sleep(pause),
            // Another error: the caller's removal reports it.
            Some(_) => return false,
        }
        pause *= 2;
    }
    rmdir(dir).is_none()
}

/// rmdir(2) of `dir`, retried while the kernel still says EBUSY (a cgroup stays busy for
/// a moment after its last task left); a failure is logged and left to the next sweep.
fn remove(dir: &CString, shown: &Path) {
    let mut last = 0;
    for _ in 0..200 {
        match rmdir(dir) {
            None => return,
            Some(libc::EBUSY) => {
                last = libc::EBUSY;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Some(errno) => {
                last = errno;
                break;
            }
        }
    }
    tracing::warn!(
        "cannot remove the VMM's cgroup {} ({}); the next twinbox run sweeps it",
        shown.display(),
        std::io::Error::from_raw_os_error(last)
    );
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Io {
        what: "write",
        path: path.to_owned(),
        source,
    })
}

/// Removes what killed runs (of either box) left in the cgroup hierarchies and the
/// container's staging root.
pub fn sweep(mountinfo: &str) {
    let swept = cgroup_run::sweep(&cgroup_run::Places::host(mountinfo));
    for path in &swept.removed {
        tracing::info!(path = %path.display(), "removed a leftover of a killed run");
    }
    for failure in &swept.failed {
        tracing::warn!("leftover of a killed run: {failure}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_guest_ram_plus_overhead_and_threads_plus_margin() {
        let l = Limits::for_vm(128, 1);
        assert_eq!(l.memory_bytes, (128 + 32 + 2) * 1024 * 1024);
        assert_eq!(l.pids, 1 + EXTRA_TASKS);
        assert_eq!(overhead_mib(0), OVERHEAD_MIB);
        assert_eq!(overhead_mib(1), OVERHEAD_MIB + 1); // rounded up
        assert_eq!(overhead_mib(64), OVERHEAD_MIB + 1);
        assert_eq!(overhead_mib(65), OVERHEAD_MIB + 2);
        assert_eq!(Limits::for_vm(4096, 2).memory_bytes, (4096 + 32 + 64) << 20);
        assert_eq!(
            Limits::for_vm(24 * 1024, 2).memory_bytes,
            (24 * 1024 + 32 + 384) << 20
        );
        assert_eq!(Limits::for_vm(u32::MAX, u32::MAX).pids, u32::MAX);
        let max = u64::from(u32::MAX);
        assert_eq!(
            Limits::for_vm(u32::MAX, 1).memory_bytes,
            (max + OVERHEAD_MIB + max.div_ceil(64)) << 20
        );
    }

    const HYBRID: &str = "\
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn layouts() {
        assert_eq!(
            detect(HYBRID).unwrap(),
            Layout::V1 {
                memory: "/sys/fs/cgroup/memory".into(),
                pids: "/sys/fs/cgroup/pids".into(),
            }
        );
        let v2 = "30 23 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(detect(v2).unwrap(), Layout::V2("/sys/fs/cgroup".into()));
        let err = detect("35 31 0:32 / /m rw - cgroup cgroup rw,memory\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pids") && err.contains("--no-cgroup"), "{err}");
    }

    #[test]
    fn settings_in_kernel_files() {
        let l = Limits::for_vm(64, 2);
        let v1: Vec<(String, String, bool)> = settings(&detect(HYBRID).unwrap(), l)
            .into_iter()
            .map(|(root, file, value, required)| {
                (root.join(file).display().to_string(), value, required)
            })
            .collect();
        let bytes = ((64u64 + 32 + 1) << 20).to_string();
        assert_eq!(
            v1,
            [
                (
                    "/sys/fs/cgroup/memory/memory.limit_in_bytes".into(),
                    bytes.clone(),
                    true
                ),
                (
                    "/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes".into(),
                    bytes.clone(),
                    false
                ),
                (
                    "/sys/fs/cgroup/memory/memory.swappiness".into(),
                    "0".into(),
                    false
                ),
                ("/sys/fs/cgroup/pids/pids.max".into(), "22".into(), true),
            ]
        );
        let v2: Vec<(&str, String)> = settings(&Layout::V2("/c".into()), l)
            .into_iter()
            .map(|(_, file, value, _)| (file, value))
            .collect();
        assert_eq!(
            v2,
            [
                ("memory.max", bytes),
                ("memory.swap.max", "0".into()),
                ("pids.max", "22".into())
            ]
        );
    }

    #[test]
    fn own_cgroups_from_proc_self_cgroup() {
        let text = "9:name=systemd:/\n8:pids:/a\n4:memory:/process_api/x\n2:cpu,cpuacct:/\n0::/u\n";
        assert_eq!(own_cgroup(text, Some("memory")), Some("/process_api/x"));
        assert_eq!(own_cgroup(text, Some("pids")), Some("/a"));
        assert_eq!(own_cgroup(text, Some("cpuacct")), Some("/"));
        assert_eq!(own_cgroup(text, None), Some("/u"));
        assert_eq!(own_cgroup(text, Some("devices")), None);
    }

    #[test]
    fn names_are_the_sweeps() {
        let name = cgroup_run::next_run_name().unwrap();
        let owner = cgroup_run::owner_of(&name).unwrap();
        assert_eq!(owner.pid, std::process::id());
        assert!(owner.start.is_some() && owner.pid_namespace.is_some());
    }
}
