//! The bench's later scenarios and its peers, for real:
//! - `syscall`, `disk` and `density` end to end with runc and bubblewrap as peers: every
//!   box that runs them has numbers, and the run leaves no mount, loop device, cgroup,
//!   peer mount point, runc state or scratch disk behind;
//! - the QEMU microvm peer boots our kernel and image (under TCG, since this host's KVM
//!   may not run Linux guests): the workload's status comes from init's console line, and
//!   the extra disk is `/dev/vdb`, the same name the bench's fio reads.
//!
//! - SIGTERM stops a bench in any box (a VM run at once, a host process after SIGTERM),
//!   with exit status 143 and nothing left behind.
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
    let out = std::env::temp_dir().join(format!("twinbox-bench-scn-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let peer_dirs_before = leftovers("twinbox-peer-root-");
    let runc_dirs_before = leftovers("twinbox-runc-");
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
    assert_eq!(leftovers("twinbox-peer-root-"), peer_dirs_before);
    assert_eq!(leftovers("twinbox-runc-"), runc_dirs_before);
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
        // QEMU takes part in the workload scenarios: numbers, or a recorded reason (on a
        // host whose KVM cannot boot Linux it hits the 5 s limit).
        if s.name != "density" {
            assert!(s.boxes.iter().any(|b| b == "qemu-microvm"), "{:?}", s.boxes);
            let ok = !s.values("qemu-microvm", &s.metrics[0].key).is_empty();
            assert!(ok || !s.failures("qemu-microvm").is_empty());
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
    let out = std::env::temp_dir().join(format!("twinbox-bench-int-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let peer_dirs_before = leftovers("twinbox-peer-root-");
    let runc_dirs_before = leftovers("twinbox-runc-");
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
    assert_eq!(leftovers("twinbox-peer-root-"), peer_dirs_before);
    assert_eq!(leftovers("twinbox-runc-"), runc_dirs_before);
    assert!(
        !out.join("results.json").exists(),
        "no results from an interrupted bench"
    );
    let _ = std::fs::remove_dir_all(&out);
}
