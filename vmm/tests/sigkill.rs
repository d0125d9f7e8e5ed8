//! A VMM SIGKILLed at any point of its start-up or run leaves nothing behind on the host:
//! no mount (the jail's empty root lives in a mount namespace that dies with its threads),
//! no process, no file. Swept over kill delays from 0 to 30 ms after the start, then once
//! mid-run.
//!
//! NEEDS root and /dev/kvm (any flavour: PVM is fine, no Linux guest involved).

mod common;

use common::{child_dir, child_test, guest_files, require_kvm, require_root, TempDir, FLOOD};
use std::process::Stdio;
use std::time::Duration;
use twinbox_spec::RunSpec;

/// Env var that turns this test binary into the child below (value: its directory).
const CHILD_ENV: &str = "TWINBOX_SIGKILL_CHILD";

/// Not a test on its own: a jailed VMM that runs until it is killed (time limit 60 s).
#[test]
#[ignore = "runs only as the child of the SIGKILL test"]
fn child_vmm_to_kill() {
    let dir = child_dir(CHILD_ENV, "SIGKILL test");
    let mut spec = RunSpec::new(dir.join("root.img"), vec!["/bin/true".into()]);
    spec.kernel = Some(dir.join("guest.elf"));
    spec.memory_mib = 64;
    spec.vcpus = 2;
    spec.time_limit = Some(Duration::from_secs(60));
    let options = vmm::RunOptions {
        jail: true,
        ..Default::default()
    };
    let _ = vmm::run_with::<std::fs::File>(&spec, None, options);
}

fn mountinfo() -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

#[test]
fn a_killed_vmm_leaves_no_mount_process_or_file() {
    require_kvm();
    require_root();
    let dir = TempDir::new("sigkill");
    guest_files(&dir.0, FLOOD);
    let files_before = std::fs::read_dir(&dir.0).unwrap().count();
    let mounts_before = mountinfo();
    for delay_ms in [0u64, 1, 2, 5, 10, 15, 20, 30, 500] {
        let mut child = child_test("child_vmm_to_kill")
            .env(CHILD_ENV, &dir.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(
            status.code().is_none(),
            "after {delay_ms} ms: the child ended by itself ({status}) instead of being killed"
        );
        assert!(
            !std::path::Path::new(&format!("/proc/{}", child.id())).exists(),
            "after {delay_ms} ms: process {} still exists",
            child.id()
        );
        let mounts_after = mountinfo();
        let new: Vec<&String> = mounts_after
            .iter()
            .filter(|m| !mounts_before.contains(m))
            .collect();
        assert!(
            new.is_empty(),
            "after {delay_ms} ms: new host mounts {new:?}"
        );
        assert_eq!(
            std::fs::read_dir(&dir.0).unwrap().count(),
            files_before,
            "after {delay_ms} ms: the VMM left files in its directory"
        );
    }
}
