//! The bench's later scenarios and its peers, for real:
//! - `syscall`, `disk` and `density` end to end with runc and bubblewrap as peers: every
//!   box that runs them has numbers, and the run leaves no mount, loop device, cgroup,
//!   peer mount point, runc state or scratch disk behind;
//! - the QEMU microvm peer boots our kernel and image (under TCG, since this host's KVM
//!   may not run Linux guests): the workload's status comes from init's console line, and
//!   the extra disk is `/dev/vdb`, the same name the bench's fio reads.
//!
//! - SIGTERM stops a bench in any box (a VM run at once, a host process after SIGTERM),
//!   with exit status 143 and nothing left behind;
//! - SIGKILL of a bench while a runc container or QEMU runs: QEMU and runc die with it,
//!   and after the next bench's start-up sweep no process, mount, loop device, cgroup,
//!   runc state or bench directory is left.
//!
//! Needs root, the image, the kernel, runc, bwrap and qemu-system-x86_64.

mod common;

use bench::results::Results;
use bench::runner::peer_qemu::{Accel, QemuMicrovm};
use bench::runner::Runner;
use std::path::Path;
use std::process::Command;
use twinbox_spec::run_spec::DiskSpec;
use twinbox_spec::{Outcome, RunSpec};

fn require_tool(name: &str) {
    assert!(
        bench::runner::peer::in_path(name).is_some(),
        "{name} is not installed: run scripts/install-deps"
    );
}

/// The prefix of the bench's per-run directories in the temp dir (runc state and bundles,
/// the peers' mount point, Firecracker's config).
const BENCH_DIRS: &str = "twinbox-bench.";

fn leftovers(prefix: &str) -> Vec<String> {
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

#[test]
fn syscall_disk_density_with_runc_and_bwrap() {
    common::require_root("the bench's container boxes and peers");
    common::require_artifact(&twinbox_spec::artifacts::rootfs_image());
    require_tool("runc");
    require_tool("bwrap");
    let out = common::fresh_dir("twinbox-bench-scn");
    let dirs_before = leftovers(BENCH_DIRS);
    common::leaks::check_no_leaks("twinbox bench with peers", || {
        let status = Command::new(common::twinbox())
            .args(["bench", "syscall", "disk", "density", "--runs", "1"])
            .args(["--warmup", "0", "--boxes", "native,container", "--peers"])
            .args(["--density-instances", "3", "--vm-timeout", "5", "--out"])
            .arg(&out)
            .status()
            .expect("run twinbox bench");
        assert_eq!(status.code(), Some(0), "twinbox bench exit status");
    });
    assert_eq!(leftovers(BENCH_DIRS), dirs_before);
    assert!(
        !out.join("scratch-disk.img").exists(),
        "scratch disk removed"
    );

    let results = Results::load(&out.join("results.json")).expect("results.json parses");
    assert_eq!(results.params.density_instances, 3);
    for s in &results.scenarios {
        let measured: &[&str] = match s.name.as_str() {
            "syscall" | "disk" => &["native", "container", "runc", "bwrap"],
            "density" => &["native", "container"],
            other => panic!("unexpected scenario {other}"),
        };
        if s.name == "density" {
            assert!(!s.boxes.iter().any(|b| b == "runc" || b == "bwrap"));
        }
        for b in measured {
            for m in &s.metrics {
                let v = s.values(b, &m.key);
                assert_eq!(v.len(), 1, "{}/{b}/{}: {:?}", s.name, m.key, s.failures(b));
                // Density is a difference of host counters: noise can make it ~0 or
                // negative (see its description); the rest are times and rates.
                if s.name == "density" {
                    assert!(v[0].is_finite(), "{}/{b}/{}: {}", s.name, m.key, v[0]);
                } else {
                    assert!(v[0] > 0.0, "{}/{b}/{}: {}", s.name, m.key, v[0]);
                }
            }
        }
        // QEMU takes part in the workload scenarios (numbers, or a recorded reason), or,
        // on a host whose KVM cannot boot Linux, sits them out saying so.
        if s.name != "density" {
            if let Some(why) = results.host.kvm.linux_guest_obstacle() {
                let out = s.sat_out.iter().find(|o| o.box_name == "qemu-microvm");
                let reason = out.map(|o| o.reason.as_str()).unwrap_or_default();
                assert!(reason.contains(why), "{}: {:?}", s.name, s.sat_out);
            } else {
                assert!(s.boxes.iter().any(|b| b == "qemu-microvm"), "{:?}", s.boxes);
                let ok = !s.values("qemu-microvm", &s.metrics[0].key).is_empty();
                assert!(ok || !s.failures("qemu-microvm").is_empty());
            }
        }
    }
    std::fs::remove_dir_all(&out).unwrap();
}

/// twinbox's VM box is `twinbox vm run`, a process measured as Firecracker's is: both
/// have their own RSS and PSS (guest RAM excluded) and guest RAM touched, read from their
/// process — a run of a few milliseconds is read whole, never as the 4 KiB of a sample
/// that came too late. Where this host cannot boot Linux, `startup` skips both VMs at
/// once, saying so once, with the reason in the results; `vmm` still runs.
#[test]
fn the_vm_box_is_a_process_measured_like_firecracker_and_skips_where_linux_cannot_boot() {
    common::require_root("twinbox bench with the VM box");
    let kvm = common::kvm::require_kvm("the vmm scenario");
    let fc = common::peers::firecracker();
    let out = common::fresh_dir("twinbox-bench-vmproc");
    let stderr = common::leaks::check_no_leaks("twinbox bench vmm startup", || {
        let done = Command::new(common::twinbox())
            .args(["bench", "vmm", "startup", "--boxes", "vm", "--runs", "2"])
            .args(["--warmup", "0", "--vm-timeout", "600", "--firecracker"])
            .arg(&fc)
            .arg("--out")
            .arg(&out)
            .output()
            .expect("run twinbox bench");
        let stderr = String::from_utf8_lossy(&done.stderr).into_owned();
        assert_eq!(done.status.code(), Some(0), "{stderr}");
        stderr
    });
    let results = Results::load(&out.join("results.json")).expect("results.json parses");
    let vmm = results.scenario("vmm").expect("a vmm scenario");
    for b in ["vm", "firecracker"] {
        let mib = |key: &str| {
            let v = vmm.values(b, key);
            assert_eq!(v.len(), 2, "vmm/{b}/{key}: {v:?} {:?}", vmm.failures(b));
            v
        };
        let (rss, pss) = (mib("runtime_rss_mib"), mib("runtime_pss_mib"));
        let host = mib("host_memory_mib");
        for i in 0..2 {
            // A VMM process is at least its code and stacks: a MiB, never a page.
            assert!(
                rss[i] >= 1.0 && pss[i] > 0.0 && pss[i] <= rss[i],
                "{b}: {rss:?} {pss:?}"
            );
            assert!(host[i] >= rss[i], "{b}: host {host:?} rss {rss:?}");
        }
        let run = vmm.runs.iter().find(|r| r.box_name == b).unwrap();
        let report = run.report.as_ref().expect("the run's report");
        assert!(
            report.usage.guest_memory_touched_kib.is_some(),
            "{b}: {:?}",
            report.usage
        );
    }
    let startup = results.scenario("startup").expect("a startup scenario");
    match kvm.linux_guest_obstacle() {
        Some(why) => {
            for b in ["vm", "firecracker"] {
                let out = startup.sat_out.iter().find(|o| o.box_name == b);
                let reason = out.map(|o| o.reason.as_str()).unwrap_or_default();
                assert!(reason.contains(why), "startup/{b}: {:?}", startup.sat_out);
                assert!(startup.runs.iter().all(|r| r.box_name != b));
            }
            assert_eq!(stderr.matches(why).count(), 1, "said once:\n{stderr}");
            let report = std::fs::read_to_string(out.join("report.md")).unwrap();
            assert!(report.contains("- vm: skipped on this host"), "{report}");
        }
        None => {
            for b in ["vm", "firecracker"] {
                let v = startup.values(b, "to_torn_down_ms");
                assert_eq!(v.len(), 2, "startup/{b}: {:?}", startup.failures(b));
            }
        }
    }
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn qemu_peer_boots_our_kernel_and_image_with_the_disk_at_vdb() {
    require_tool("qemu-system-x86_64");
    let rootfs = common::require_artifact(&twinbox_spec::artifacts::rootfs_image());
    let kernel = common::require_artifact(&twinbox_spec::artifacts::kernel_vmlinux());
    let disk = std::env::temp_dir().join(format!("twinbox-qemu-disk-{}", std::process::id()));
    std::fs::write(&disk, vec![0x5a; 3 * 512]).unwrap();
    let qemu = QemuMicrovm {
        accel: Accel::Tcg,
        ..QemuMicrovm::find().unwrap()
    };
    let run = |script: &str| {
        let mut spec = RunSpec::new(&rootfs, vec!["/bin/sh".into(), "-c".into(), script.into()]);
        spec.kernel = Some(kernel.clone());
        spec.memory_mib = 256;
        spec.disks = vec![DiskSpec {
            path: disk.clone(),
            read_only: true,
        }];
        spec.time_limit = Some(std::time::Duration::from_secs(120));
        spec.spawn_ns = twinbox_spec::clock::monotonic_ns();
        qemu.run(&spec).expect("qemu starts")
    };
    let r = run("echo sectors=$(cat /sys/block/vdb/size); exit 3");
    let console = r.output.clone().unwrap_or_default();
    assert_eq!(r.outcome, Outcome::Exited(3), "console:\n{console}");
    assert!(
        console.contains("sectors=3"),
        "vdb is the extra disk:\n{console}"
    );
    assert!(r.timeline.is_ordered());
    let r = run("true");
    assert_eq!(r.outcome, Outcome::Exited(0), "{:?}", r.output);
    std::fs::remove_file(&disk).unwrap();
    assert!(Path::new(&rootfs).exists());
}

#[test]
fn sigterm_stops_the_bench_and_leaves_nothing_behind() {
    common::require_root("the bench's container boxes and peers");
    common::require_artifact(&twinbox_spec::artifacts::rootfs_image());
    common::require_artifact(&twinbox_spec::artifacts::kernel_vmlinux());
    let out = common::fresh_dir("twinbox-bench-int");
    let dirs_before = leftovers(BENCH_DIRS);
    common::leaks::check_no_leaks("an interrupted twinbox bench", || {
        // Long enough (20 rounds of 3 s cpu runs, VM limit 120 s) that only the signal
        // can end it soon.
        let mut child = Command::new(common::twinbox())
            .args(["bench", "startup", "cpu", "--runs", "20", "--peers"])
            .args(["--vm-timeout", "120", "--out"])
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("run twinbox bench");
        std::thread::sleep(std::time::Duration::from_secs(4));
        // SAFETY: the child is ours and not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("twinbox bench did not stop within 90 s of SIGTERM");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert_eq!(status.code(), Some(143), "exit status 128 + SIGTERM");
    });
    assert_eq!(leftovers(BENCH_DIRS), dirs_before);
    assert!(
        !out.join("results.json").exists(),
        "no results from an interrupted bench"
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// A process seen at one moment: pid, parent, name and start time (so a reused pid is not
/// taken for it).
#[derive(Clone, Debug, PartialEq)]
struct Proc {
    pid: i32,
    ppid: i32,
    comm: String,
    start: u64,
}

fn proc_of(pid: i32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, tail) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    let fields: Vec<&str> = tail.split_whitespace().collect();
    // After the name: state (field 3), ppid (4), ..., starttime (22).
    Some(Proc {
        pid,
        ppid: fields.get(1)?.parse().ok()?,
        comm,
        start: fields.get(19)?.parse().ok()?,
    })
}

/// Every process now.
fn all_procs() -> Vec<Proc> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter_map(proc_of)
        .collect()
}

/// The descendants of `root` now.
fn descendants(root: i32) -> Vec<Proc> {
    let procs = all_procs();
    let mut found: Vec<Proc> = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for p in procs.iter().filter(|p| p.ppid == parent) {
            frontier.push(p.pid);
            found.push(p.clone());
        }
    }
    found
}

/// Whether `p` (the very process, not a later one with its pid) is still alive (a zombie
/// counts as gone: it runs nothing and holds nothing but its pid).
fn alive(p: &Proc) -> bool {
    proc_of(p.pid).is_some_and(|now| now.start == p.start)
        && !std::fs::read_to_string(format!("/proc/{}/stat", p.pid))
            .unwrap_or_default()
            .rsplit_once(')')
            .is_some_and(|(_, t)| t.trim_start().starts_with('Z'))
}

/// Waits until `cond` holds, at most `secs` seconds; whether it did.
fn wait_for(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    cond()
}

/// Starts `twinbox bench SCENARIO --boxes native --peers` with `runs` counted runs, waits
/// until `target` finds its process among the bench's descendants, SIGSTOPs that process
/// when `freeze` (so it cannot end on its own), and SIGKILLs the bench. Returns the target
/// and every descendant the bench had just before.
fn kill_bench_while(
    out: &Path,
    (scenario, runs): (&str, &str),
    what: &str,
    freeze: bool,
    target: impl Fn(&[Proc]) -> Option<Proc>,
) -> (Proc, Vec<Proc>) {
    let mut bench = Command::new(common::twinbox())
        .args([
            "bench", scenario, "--boxes", "native", "--peers", "--runs", runs,
        ])
        .args(["--warmup", "0", "--vm-timeout", "120", "--out"])
        .arg(out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run twinbox bench");
    let pid = bench.id() as i32;
    let mut family = Vec::new();
    let mut found = None;
    wait_for(90, || {
        family = descendants(pid);
        found = target(&family);
        found.is_some()
    });
    if let (Some(p), true) = (&found, freeze) {
        // SAFETY: kill(2) of a process we just saw; a wrong pid only gets SIGSTOP.
        unsafe { libc::kill(p.pid, libc::SIGSTOP) };
    }
    // SAFETY: the child is ours and not yet reaped.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let status = bench.wait().unwrap();
    let found = found.unwrap_or_else(|| panic!("{what} never ran under the bench: {family:?}"));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    (found, family)
}

/// Runs a short bench in `boxes`, whose start sweeps what killed benches left (and the
/// container box's run, what killed container runs left); its log.
fn next_bench_start(out: &Path, boxes: &str) -> String {
    let run = Command::new(common::twinbox())
        .args(["bench", "startup", "--boxes", boxes, "--runs", "1"])
        .args(["--warmup", "0", "--out"])
        .arg(out)
        .output()
        .expect("run twinbox bench");
    let log = String::from_utf8_lossy(&run.stderr).into_owned();
    assert_eq!(run.status.code(), Some(0), "{log}");
    log
}

#[test]
fn sigkill_of_the_bench_leaves_nothing_after_the_next_start() {
    common::require_root("the bench's peers");
    common::require_artifact(&twinbox_spec::artifacts::rootfs_image());
    common::require_artifact(&twinbox_spec::artifacts::kernel_vmlinux());
    require_tool("runc");
    require_tool("bwrap");
    require_tool("qemu-system-x86_64");
    let out = common::fresh_dir("twinbox-bench-kill");
    let dirs_before = leftovers(BENCH_DIRS);
    let host_before = common::leaks::HostResources::snapshot();
    common::leaks::check_no_leaks("SIGKILLed benches, after the next start", || {
        // 1. Killed while runc's container runs the workload (stopped, so it cannot end
        //    by itself): runc, our child, dies with the bench; the container, runc's
        //    child, survives until the next bench's start deletes it through runc.
        let (container, in_runc) =
            kill_bench_while(&out, ("cpu", "10"), "a runc container", true, |family| {
                family
                    .iter()
                    .find(|p| {
                        p.comm == "sysbench"
                            && family
                                .iter()
                                .any(|q| q.pid == p.ppid && q.comm.starts_with("runc"))
                    })
                    .cloned()
            });
        let runc: Vec<&Proc> = in_runc.iter().filter(|p| p.comm == "runc").collect();
        assert!(!runc.is_empty(), "{in_runc:?}");
        assert!(
            wait_for(5, || runc.iter().all(|p| !alive(p))),
            "runc outlived the killed bench: {runc:?}"
        );
        assert!(
            alive(&container),
            "the container should outlive runc (else this test proves nothing)"
        );
        let log = next_bench_start(&out, "native");
        assert!(log.contains("deleted"), "no runc container deleted:\n{log}");
        assert!(
            wait_for(5, || !alive(&container)),
            "the next start did not end the runc container {container:?}:\n{log}"
        );
        // 2. Killed while QEMU runs: it dies with the bench, no sweep needed. The `vmm`
        //    scenario's tiny guest runs wherever KVM does (a Linux guest may be skipped on
        //    this host); hundreds of back-to-back runs keep a QEMU alive to be seen.
        let (qemu, in_qemu) = kill_bench_while(&out, ("vmm", "500"), "QEMU", false, |family| {
            family
                .iter()
                .find(|p| p.comm.starts_with("qemu-system"))
                .cloned()
        });
        assert!(
            wait_for(5, || !alive(&qemu)),
            "QEMU outlived the killed bench: {qemu:?}"
        );
        // 3. The next start removes the directories the second bench left.
        next_bench_start(&out, "native");
        let survivors: Vec<&Proc> = in_runc
            .iter()
            .chain(&in_qemu)
            .filter(|p| alive(p))
            .collect();
        assert!(survivors.is_empty(), "left running: {survivors:?}");
        // The peers' image mount goes with the last namespace that held it; the autoclear
        // loop device detaches right after, asynchronously.
        settle_to(&host_before);
    });
    assert_eq!(leftovers(BENCH_DIRS), dirs_before, "bench directories left");
    let _ = std::fs::remove_dir_all(&out);
}

/// Starts `twinbox ARGS --out OUT` (`args` split at spaces; output discarded), waits up
/// to 60 s until `running` holds of the bench's descendants, SIGSTOPs their `sleep`
/// workloads (so they cannot end on their own) and SIGKILLs the bench. Returns the
/// bench's pid, the descendants last seen and whether `running` held.
fn sigkill_bench_with_stopped_workloads(
    args: &str,
    out: &Path,
    running: impl Fn(&[Proc]) -> bool,
) -> (i32, Vec<Proc>, bool) {
    let mut bench = Command::new(common::twinbox())
        .args(args.split_whitespace())
        .arg("--out")
        .arg(out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run twinbox bench");
    let pid = bench.id() as i32;
    let mut family = Vec::new();
    let seen = wait_for(60, || {
        family = descendants(pid);
        running(&family)
    });
    for p in family.iter().filter(|p| p.comm == "sleep") {
        // SAFETY: kill(2) of a process we just saw; a wrong pid only gets SIGSTOP.
        unsafe { libc::kill(p.pid, libc::SIGSTOP) };
    }
    // SAFETY: the child is ours and not yet reaped.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    bench.wait().unwrap();
    (pid, family, seen)
}

/// Waits up to 10 s until the host's resources are what they were in `before` (autoclear
/// loop devices detach asynchronously after the last unmount); the leak check after it
/// judges.
fn settle_to(before: &common::leaks::HostResources) {
    wait_for(10, || common::leaks::HostResources::snapshot() == *before);
}

#[test]
fn sigkill_during_density_tears_down_the_twinbox_instances() {
    common::require_root("twinbox's container instances");
    common::require_artifact(&twinbox_spec::artifacts::rootfs_image());
    let out = common::fresh_dir("twinbox-bench-kill-d");
    let host_before = common::leaks::HostResources::snapshot();
    common::leaks::check_no_leaks("a SIGKILLed density bench", || {
        // All three `twinbox ctr run` instances have their workload running; stopped,
        // the workloads cannot end by themselves: only the instances' teardown (which
        // kills the container) can end them.
        let (pid, family, seen) = sigkill_bench_with_stopped_workloads(
            "bench density --boxes container --runs 5 --warmup 0 --density-instances 3",
            &out,
            |family| family.iter().filter(|p| p.comm == "sleep").count() == 3,
        );
        assert!(seen, "three container instances never ran: {family:?}");
        let instances: Vec<&Proc> = family.iter().filter(|p| p.ppid == pid).collect();
        assert_eq!(instances.len(), 3, "{family:?}");
        // SIGTERM from the parent-death signal: each instance stops its container and
        // tears it down (cgroup, mounts, loop device) before it exits.
        assert!(
            wait_for(20, || family.iter().all(|p| !alive(p))),
            "left running: {:?}",
            family.iter().filter(|p| alive(p)).collect::<Vec<_>>()
        );
        // The autoclear loop devices detach asynchronously after the last unmount.
        settle_to(&host_before);
    });
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn sigkill_during_an_in_process_container_run_leaves_nothing_after_the_next_start() {
    common::require_root("twinbox's container box");
    common::require_artifact(&twinbox_spec::artifacts::rootfs_image());
    let out = common::fresh_dir("twinbox-bench-kill-c");
    let host_before = common::leaks::HostResources::snapshot();
    common::leaks::check_no_leaks("a bench SIGKILLed in a container run", || {
        // The container runs in the bench's own process: its init is the bench's child.
        let (_, family, seen) = sigkill_bench_with_stopped_workloads(
            "bench memory --boxes container --runs 20 --warmup 0",
            &out,
            |family| family.iter().any(|p| p.comm == "sleep"),
        );
        assert!(seen, "the container never ran its workload: {family:?}");
        assert!(
            wait_for(10, || family.iter().all(|p| !alive(p))),
            "left running after the bench died: {:?}",
            family.iter().filter(|p| alive(p)).collect::<Vec<_>>()
        );
        // What only a sweep can remove (the run's cgroup) goes at the next container run
        // (container::run's own sweep).
        next_bench_start(&out, "container");
        settle_to(&host_before);
    });
    let _ = std::fs::remove_dir_all(&out);
}
