//! The VMM's own cgroup (`vmm::run_in_own_cgroup`, `vmm/src/cgroup.rs`): a guest that touches
//! all its RAM runs to its end inside the limit; a VMM that grows beyond guest RAM plus the
//! overhead is OOM-killed; the killed VMM's cgroup is removed by the next sweep.
//!
//! These tests move the test process itself into a cgroup and back (the run is in-process),
//! or run a child of it: run them one at a time (`--test-threads=1`).
//!
//! NEEDS root, /dev/kvm (any flavour: PVM is fine, no Linux guest involved) and the memory
//! and pids cgroup controllers.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use twinbox_spec::RunSpec;
use vmm::cgroup::{overhead_mib, Limits, VmmCgroup};

/// Writes one byte to every 4 KiB page from 2 MiB to `end`, then resets the machine
/// through the i8042 (which ends the run) and halts.
fn touch_all(end: u32) -> Vec<u8> {
    let mut code = vec![0x48, 0xc7, 0xc0, 0x00, 0x00, 0x20, 0x00]; // mov rax, 0x200000
    code.extend([0xc6, 0x00, 0x01]); // loop: mov byte [rax], 1
    code.extend([0x48, 0x05, 0x00, 0x10, 0x00, 0x00]); // add rax, 0x1000
    code.extend([0x48, 0x3d]); // cmp rax, end
    code.extend(end.to_le_bytes());
    code.extend([0x72, 0xef]); // jb loop
    code.extend([0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
    code.extend([0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    code
}

/// A directory of its own under the temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tbcg-{what}-{}-{:x}",
            std::process::id(),
            twinbox_spec::clock::monotonic_ns()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A run in its own cgroup moves this whole process — every test thread, and any child
/// process started meanwhile — into that cgroup, so these tests must not overlap: one
/// test's child or directory would otherwise land in, or keep busy, another's cgroup.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Checks root and KVM, and holds the lock above for the rest of the test.
fn require_root_and_kvm() -> std::sync::MutexGuard<'static, ()> {
    common::require_root();
    common::require_kvm();
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// This process's memory cgroup (from /proc/self/cgroup).
fn memory_cgroup() -> String {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    vmm::cgroup::own_cgroup(&text, Some("memory"))
        .unwrap()
        .to_owned()
}

/// Every `twinbox-*` cgroup directory of this process, in any hierarchy.
fn own_leftovers() -> Vec<PathBuf> {
    leftovers_of(std::process::id())
}

fn leftovers_of(pid: u32) -> Vec<PathBuf> {
    twinbox_spec::cgroup_run::dirs_of(pid, std::path::Path::new("/sys/fs/cgroup"))
}

/// What a watcher thread saw of the run's memory cgroup while it ran.
#[derive(Default, Debug, Clone)]
struct Seen {
    cgroup: Option<String>,
    limit: Option<u64>,
    peak: Option<u64>,
    /// Most threads of this process seen inside at once.
    threads_inside: usize,
    /// A thread seen outside the run's memory cgroup while the process was in it.
    outside: Option<(String, String)>,
}

/// Whether thread `tid` of this process is still there a moment later: a thread that is
/// exiting (the VMM's memory-registration and jail threads end during the run) is moved to
/// the root cgroup by the kernel (`cgroup_exit`) before it is gone, which is no escape.
fn still_there(tid: &str) -> bool {
    std::thread::sleep(Duration::from_millis(50));
    Path::new("/proc/self/task").join(tid).exists()
}

/// The memory cgroup of each thread of this process, by its own
/// `/proc/self/task/<tid>/cgroup` (a thread gone meanwhile is left out).
fn thread_memory_cgroups() -> Vec<(String, String)> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| {
            let tid = e.ok()?.file_name().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/cgroup")).ok()?;
            let group = vmm::cgroup::own_cgroup(&text, Some("memory"))?.to_owned();
            Some((tid, group))
        })
        .collect()
}

#[test]
fn a_guest_touching_all_its_ram_runs_to_its_end_in_its_cgroup() {
    let _one_at_a_time = require_root_and_kvm();
    const GUEST_MIB: u32 = 256;
    let dir = TempDir::new("touch");
    let kernel = dir.0.join("guest.elf");
    std::fs::write(&kernel, common::elf(&touch_all(GUEST_MIB << 20))).unwrap();
    common::fake_root(&dir.0.join("root.img"));
    let mut spec = RunSpec::new(dir.0.join("root.img"), vec!["/bin/true".into()]);
    spec.kernel = Some(kernel);
    spec.memory_mib = GUEST_MIB;
    spec.time_limit = Some(Duration::from_secs(120));
    let before = memory_cgroup();
    assert!(!before.contains("twinbox-"), "{before}");

    // The watcher is a thread of this process: it moves with it and reads its cgroup.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (seen, done) = (seen.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                let now = memory_cgroup();
                if now.contains("twinbox-") {
                    let dir = Path::new("/sys/fs/cgroup/memory").join(now.trim_start_matches('/'));
                    let read = |f: &str| {
                        std::fs::read_to_string(dir.join(f))
                            .ok()
                            .and_then(|v| v.trim().parse().ok())
                    };
                    let threads = thread_memory_cgroups();
                    let mut seen = seen.lock().unwrap();
                    if let Some(out) = threads
                        .iter()
                        .find(|(tid, g)| *g != now && still_there(tid))
                    {
                        seen.outside.get_or_insert(out.clone());
                    }
                    seen.threads_inside = seen.threads_inside.max(threads.len());
                    seen.cgroup = Some(now.clone());
                    seen.limit = read("memory.limit_in_bytes").or(seen.limit);
                    seen.peak = read("memory.max_usage_in_bytes").or(seen.peak);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let options = vmm::RunOptions {
        jail: true,
        ..Default::default()
    };
    let report = vmm::run_in_own_cgroup::<std::fs::File>(&spec, None, options).unwrap();
    done.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    let seen = seen.lock().unwrap().clone();

    // It ran to its end: the guest reset after its last page, not a limit or a kill.
    let why = format!("{:?}", report.outcome);
    assert!(why.contains("reset"), "{why}");
    let touched = report.usage.guest_memory_touched_kib.unwrap();
    assert!(
        touched >= u64::from(GUEST_MIB - 3) * 1024,
        "guest touched only {touched} KiB"
    );
    // It ran in its cgroup, with the limit guest RAM + overhead.
    let name = seen
        .cgroup
        .expect("the run was never seen in a twinbox cgroup");
    // With all its threads: the caller's, this watcher, the VMM's vCPU and event loop.
    assert_eq!(seen.outside, None, "a thread outside {name}");
    assert!(
        seen.threads_inside >= 4,
        "saw {} threads inside",
        seen.threads_inside
    );
    let owner = twinbox_spec::cgroup_run::owner_of(name.trim_start_matches('/')).unwrap();
    assert_eq!(owner.pid, std::process::id());
    assert_eq!(
        seen.limit,
        Some(Limits::for_vm(GUEST_MIB, 1).memory_bytes),
        "{name}"
    );
    let peak_kib = seen.peak.unwrap() / 1024;
    eprintln!(
        "cgroup peak {peak_kib} KiB, guest touched {touched} KiB: VMM overhead charged {} KiB \
         (limit allows {} KiB)",
        peak_kib.saturating_sub(touched),
        overhead_mib(GUEST_MIB) * 1024
    );
    assert!(
        peak_kib >= touched,
        "the guest's pages were not charged to the cgroup"
    );
    // And it left: back where it was, nothing of it left.
    assert_eq!(memory_cgroup(), before);
    assert_eq!(own_leftovers(), Vec::<PathBuf>::new());
}

/// Env var that turns this test binary into the growing VMM below.
const GROW_ENV: &str = "TWINBOX_CGROUP_GROW_CHILD";

/// Not a test on its own: a process in a VMM cgroup for a 16 MiB guest that then
/// allocates (and touches) well past guest RAM plus overhead.
#[test]
#[ignore = "runs only as the child of the OOM test"]
fn child_vmm_that_grows() {
    if std::env::var_os(GROW_ENV).is_none() {
        panic!("run only as the child of the OOM test ({GROW_ENV} unset)");
    }
    let _group = VmmCgroup::enter(Limits::for_vm(16, 1)).unwrap();
    println!("entered");
    let mut held: Vec<Vec<u8>> = Vec::new();
    for _ in 0..(16 + overhead_mib(16) as usize + 256) {
        held.push(vec![1u8; 1 << 20]);
    }
    println!("survived {} MiB", held.len());
}

#[test]
fn a_vmm_growing_past_its_limit_is_oom_killed_and_its_cgroup_swept() {
    let _one_at_a_time = require_root_and_kvm();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_vmm_that_grows",
            "--nocapture",
        ])
        .env(GROW_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("entered"),
        "the child never entered: {stdout}"
    );
    assert!(!stdout.contains("survived"), "{stdout}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{:?}", out.status);
    // Killed, it could not remove its cgroups: the next run's sweep does.
    let left = leftovers_of(pid);
    assert_eq!(left.len(), 2, "memory and pids: {left:?}");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    vmm::cgroup::sweep(&mountinfo);
    assert_eq!(leftovers_of(pid), Vec::<PathBuf>::new());
}

#[test]
fn a_cgroup_that_cannot_be_made_leaves_nothing_and_names_the_fix() {
    let _one_at_a_time = require_root_and_kvm();
    let before = memory_cgroup();
    // A layout whose pids hierarchy does not exist: the memory directory is made, then
    // the pids one fails; the error names --no-cgroup and the memory one is gone again.
    let layout = vmm::cgroup::Layout::V1 {
        memory: "/sys/fs/cgroup/memory".into(),
        pids: "/nonexistent-twinbox-pids".into(),
    };
    let name = twinbox_spec::cgroup_run::next_run_name().unwrap();
    let proc_cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let err = VmmCgroup::enter_in(&layout, &name, Limits::for_vm(16, 1), &proc_cgroup)
        .err()
        .expect("a missing hierarchy must fail");
    let text = err.to_string();
    assert!(
        text.contains("--no-cgroup") && !text.contains('\n'),
        "{text}"
    );
    assert_eq!(memory_cgroup(), before);
    assert_eq!(own_leftovers(), Vec::<PathBuf>::new());
}
