//! `twinbox vm run` puts its VMM process in a cgroup of its own (`vmm/src/cgroup.rs`):
//! while it runs, `/proc/<pid>/cgroup` names a `twinbox-<pid>-...` memory and pids cgroup
//! with the limit guest RAM plus overhead, no swap, a few tasks; after it exits the cgroup
//! is gone; after a SIGKILL the next `vm run` removes the leftover; `--no-cgroup` runs
//! without one; a cgroup that cannot be made is one line naming `--no-cgroup`, exit 125.
//!
//! Uses the real kernel with `--timeout 3`: on a PVM host Linux does not boot and the run
//! ends at its time limit, but the VMM's setup, threads and teardown run for real.
//!
//! NEEDS root, /dev/kvm, the built artifacts and the v1 memory and pids hierarchies (this
//! host's hybrid layout). Run with `--test-threads=1` under the shared lock.

mod common;

use common::{describe, require_artifact, require_root, twinbox};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Guest RAM of every run here, MiB.
const MEMORY_MIB: u32 = 64;

/// `twinbox vm run --memory 64 --timeout <secs> [extra] -- /bin/true`, output discarded.
fn spawn_vm(timeout_secs: u32, extra: &[&str]) -> Child {
    require_root("vm run's cgroup");
    let rootfs = require_artifact(&twinbox_spec::artifacts::rootfs_image());
    require_artifact(&twinbox_spec::artifacts::kernel_vmlinux());
    Command::new(twinbox())
        .args(["vm", "run", "--rootfs"])
        .arg(rootfs)
        .args(["--memory", &MEMORY_MIB.to_string()])
        .args(["--timeout", &timeout_secs.to_string()])
        .args(extra)
        .args(["--", "/bin/true"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The memory cgroup `/proc/<pid>/cgroup` names, if the process exists.
fn memory_cgroup_of(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    vmm::cgroup::own_cgroup(&text, Some("memory")).map(str::to_owned)
}

/// Waits (up to 10 s) until `pid` is in a `twinbox-` memory cgroup; returns its name.
fn wait_for_own_cgroup(pid: u32) -> String {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if let Some(group) = memory_cgroup_of(pid).filter(|g| g.contains("twinbox-")) {
            return group.trim_start_matches('/').to_owned();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "vm run {pid} never entered a twinbox cgroup (it is in {:?})",
        memory_cgroup_of(pid)
    );
}

/// Waits (up to 10 s) until `pid` runs its VM (vCPU and event-loop threads started), then
/// checks that every one of its threads is in the run's memory and pids cgroups `name`,
/// by each thread's own `/proc/<pid>/task/<tid>/cgroup` and by the cgroups' `tasks`
/// files. Returns how many threads it checked.
fn all_threads_in(pid: u32, name: &str) -> usize {
    let task_dir = PathBuf::from(format!("/proc/{pid}/task"));
    let tids = || -> Vec<u32> {
        let mut tids: Vec<u32> = std::fs::read_dir(&task_dir)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        tids.sort();
        tids
    };
    let start = Instant::now();
    while tids().len() < 3 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Threads come and go during set-up (the jail's, the memory registration's): a
    // thread gone before it is read is not counted.
    let mut checked = 0;
    for tid in tids() {
        let Ok(text) = std::fs::read_to_string(task_dir.join(tid.to_string()).join("cgroup"))
        else {
            continue;
        };
        for controller in ["memory", "pids"] {
            let group = vmm::cgroup::own_cgroup(&text, Some(controller)).unwrap_or_default();
            assert_eq!(
                group.trim_start_matches('/'),
                name,
                "thread {tid} of the VMM {pid} is outside its {controller} cgroup"
            );
        }
        checked += 1;
    }
    for controller in ["memory", "pids"] {
        let tasks = Path::new("/sys/fs/cgroup")
            .join(controller)
            .join(name)
            .join("tasks");
        // Compared while no thread starts or ends (the same threads before and after).
        let mut compared = false;
        for _ in 0..100 {
            let before = tids();
            let listed: Vec<u32> = std::fs::read_to_string(&tasks)
                .unwrap()
                .lines()
                .map(|l| l.trim().parse().unwrap())
                .collect();
            if tids() != before {
                continue;
            }
            assert!(
                before.iter().all(|t| listed.contains(t)),
                "{}: lists {listed:?}, the VMM's threads are {before:?}",
                tasks.display()
            );
            compared = true;
            break;
        }
        assert!(compared, "the VMM's threads never held still to compare");
    }
    checked
}

/// Every `twinbox-<pid>-*` directory in any cgroup hierarchy.
fn leftovers_of(pid: u32) -> Vec<PathBuf> {
    twinbox_spec::cgroup_run::dirs_of(pid, std::path::Path::new("/sys/fs/cgroup"))
}

fn read_u64(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn vm_run_is_in_its_sized_cgroup_while_it_runs_and_leaves_nothing() {
    let child = spawn_vm(3, &[]);
    let pid = child.id();
    let name = wait_for_own_cgroup(pid);
    // Named for the sweep: this pid, its start time, our pid namespace.
    let owner = twinbox_spec::cgroup_run::owner_of(&name).unwrap();
    assert_eq!(owner.pid, pid, "{name}");
    assert_eq!(
        owner.start,
        twinbox_spec::cgroup_run::start_time(Path::new("/proc"), pid)
    );
    // Its limits: guest RAM plus overhead, no swap, the VMM's threads.
    let limits = vmm::cgroup::Limits::for_vm(MEMORY_MIB, 1);
    let memory = Path::new("/sys/fs/cgroup/memory").join(&name);
    assert_eq!(
        read_u64(&memory.join("memory.limit_in_bytes")),
        limits.memory_bytes
    );
    if memory.join("memory.memsw.limit_in_bytes").exists() {
        assert_eq!(
            read_u64(&memory.join("memory.memsw.limit_in_bytes")),
            limits.memory_bytes
        );
    }
    let pids = Path::new("/sys/fs/cgroup/pids").join(&name);
    let pids_max = std::fs::read_to_string(pids.join("pids.max")).unwrap();
    assert_eq!(pids_max.trim(), limits.pids.to_string());
    // It is the whole process, and every thread of the VMM is in it: the VMM moves in as
    // a lone thread (v1 `tasks`), so each thread started later must be born inside.
    let procs = std::fs::read_to_string(pids.join("cgroup.procs")).unwrap();
    assert_eq!(procs.trim(), pid.to_string());
    let threads = all_threads_in(pid, &name);
    assert!(
        threads >= 3,
        "saw only {threads} threads of the VMM (main, vCPU, event loop at least)"
    );
    let out = child.wait_with_output().unwrap();
    // The time limit ends it here (PVM); either way, not a twinbox error.
    assert_ne!(out.status.code(), Some(125), "{}", describe(&out));
    assert!(out.status.code().is_some(), "{}", describe(&out));
    assert_eq!(
        leftovers_of(pid),
        Vec::<PathBuf>::new(),
        "{}",
        describe(&out)
    );
}

#[test]
fn a_killed_vm_runs_cgroup_is_removed_by_the_next_vm_run() {
    let mut killed = spawn_vm(30, &[]);
    let pid = killed.id();
    wait_for_own_cgroup(pid);
    killed.kill().unwrap();
    killed.wait().unwrap();
    let left = leftovers_of(pid);
    assert_eq!(left.len(), 2, "memory and pids: {left:?}");

    let next = spawn_vm(1, &[]);
    let next_pid = next.id();
    let out = next.wait_with_output().unwrap();
    assert_ne!(out.status.code(), Some(125), "{}", describe(&out));
    assert_eq!(
        leftovers_of(pid),
        Vec::<PathBuf>::new(),
        "{}",
        describe(&out)
    );
    assert_eq!(leftovers_of(next_pid), Vec::<PathBuf>::new());
}

#[test]
fn no_cgroup_runs_where_it_is() {
    let before = memory_cgroup_of(std::process::id()).unwrap();
    let child = spawn_vm(2, &["--no-cgroup"]);
    let pid = child.id();
    // Well into the run (past setup), it is still where it started.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        if let Some(group) = memory_cgroup_of(pid) {
            assert!(!group.contains("twinbox-"), "--no-cgroup yet in {group}");
            assert_eq!(group, before);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert_ne!(out.status.code(), Some(125), "{}", describe(&out));
    assert_eq!(leftovers_of(pid), Vec::<PathBuf>::new());
}

#[test]
fn a_cgroup_that_cannot_be_made_is_one_line_naming_no_cgroup() {
    require_root("vm run's cgroup");
    let rootfs = require_artifact(&twinbox_spec::artifacts::rootfs_image());
    require_artifact(&twinbox_spec::artifacts::kernel_vmlinux());
    // In a mount namespace of its own where the memory hierarchy is read-only.
    let script = format!(
        "mount -o remount,bind,ro /sys/fs/cgroup/memory && exec {} vm run --rootfs {} \
         --memory {MEMORY_MIB} --timeout 3 -- /bin/true",
        twinbox().display(),
        rootfs.display()
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("unshare (util-linux) is needed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("cgroup") && lines[0].contains("--no-cgroup"),
        "{stderr}"
    );
    // And the same host with --no-cgroup runs.
    let script = script.replace("vm run", "vm run --no-cgroup");
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(125), "{}", describe(&out));
}

#[test]
fn a_killed_vm_runs_cgroup_is_removed_by_the_next_ctr_run_too() {
    let mut killed = spawn_vm(30, &[]);
    let pid = killed.id();
    wait_for_own_cgroup(pid);
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert_eq!(leftovers_of(pid).len(), 2, "memory and pids");

    // The container's start-up sweep judges the VM's names as its own.
    let rootfs = require_artifact(&twinbox_spec::artifacts::rootfs_image());
    let out = Command::new(twinbox())
        .args(["ctr", "run", "--rootfs"])
        .arg(rootfs)
        .args(["--", "/bin/true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(
        leftovers_of(pid),
        Vec::<PathBuf>::new(),
        "{}",
        describe(&out)
    );
}
