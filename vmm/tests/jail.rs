//! The jailed VMM (`RunOptions::jail`): during a run, every guest-facing thread (vCPUs,
//! event loop, console writer) runs as uid/gid 65534 with no capabilities (an empty
//! bounding set too) and no_new_privs, in mount, IPC and network namespaces of its own,
//! and sees an empty root — a host path it was not given does not exist for it — while
//! the guest still runs and the run ends normally. The caller's thread stays outside.
//!
//! NEEDS root and /dev/kvm (any flavour: PVM is fine, no Linux guest involved).

mod common;

use common::{
    child_dir, child_test, console_log_bytes, drain_stdout, flooding_spec, read_stderr,
    require_kvm, TempDir, GUEST_FACING_THREADS,
};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use twinbox_spec::Outcome;

/// Env var that turns this test binary into the child below (value: its directory).
const CHILD_ENV: &str = "TWINBOX_JAIL_CHILD";

/// Not a test on its own: the jailed VMM the test below inspects (4 s, two vCPUs).
#[test]
#[ignore = "runs only as the child of the jail test"]
fn child_jailed_vmm() {
    let dir = child_dir(CHILD_ENV, "jail test");
    let spec = flooding_spec(&dir);
    let options = vmm::RunOptions {
        jail: true,
        ..Default::default()
    };
    let report = vmm::run_with::<std::fs::File>(&spec, None, options).expect("vmm::run_with");
    match &report.outcome {
        Outcome::Failed(why) if why.contains("time limit") => eprintln!("RUN-ENDED-CLEANLY"),
        other => eprintln!("unexpected outcome {other:?}"),
    }
}

/// One thread of the child, as the host sees it.
#[derive(Debug)]
struct Task {
    name: String,
    dir: PathBuf,
    status: String,
}

impl Task {
    fn field(&self, name: &str) -> String {
        self.status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} missing for {}", self.name))
            .trim()
            .to_owned()
    }
    fn ns(&self, kind: &str) -> PathBuf {
        std::fs::read_link(self.dir.join("ns").join(kind)).unwrap()
    }
}

fn tasks(pid: u32) -> Vec<Task> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    entries
        .filter_map(|e| {
            let dir = e.ok()?.path();
            Some(Task {
                name: std::fs::read_to_string(dir.join("comm"))
                    .ok()?
                    .trim()
                    .to_owned(),
                status: std::fs::read_to_string(dir.join("status")).ok()?,
                dir,
            })
        })
        .collect()
}

#[test]
fn the_guest_facing_threads_run_jailed() {
    require_kvm();
    common::require_root();
    let dir = TempDir::new("jail");
    let mut child = child_test("child_jailed_vmm")
        .env(CHILD_ENV, &dir.0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = drain_stdout(&mut child);
    let jailed = GUEST_FACING_THREADS;
    let started = Instant::now();
    let (snapshot, caller) = loop {
        let all = tasks(child.id());
        let found: Vec<&Task> = jailed
            .iter()
            .filter_map(|w| all.iter().find(|t| &t.name == w))
            .collect();
        // Filters are installed first thing; give the last thread a moment.
        if found.len() == jailed.len() && found.iter().all(|t| t.field("Seccomp:") == "2") {
            let checks: Vec<(String, String, String, String, PathBuf, PathBuf, bool)> = found
                .iter()
                .map(|t| {
                    (
                        t.name.clone(),
                        t.field("Uid:"),
                        // Effective and bounding sets: nothing now, nothing to regain.
                        format!("{} {}", t.field("CapEff:"), t.field("CapBnd:")),
                        t.field("NoNewPrivs:"),
                        t.ns("mnt"),
                        t.ns("net"),
                        // A host path the VMM was not given, through the thread's own root.
                        t.dir.join("root/etc/passwd").exists()
                            || t.dir.join("root/dev/kvm").exists(),
                    )
                })
                .collect();
            let caller = all
                .iter()
                .find(|t| t.dir.ends_with(child.id().to_string()))
                .map(|t| (t.field("Uid:"), t.ns("mnt")));
            break (checks, caller);
        }
        if started.elapsed() > Duration::from_secs(30) || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!(
                "the jailed threads never all appeared under their filters; saw {:?}",
                all.iter().map(|t| &t.name).collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let status = child.wait().unwrap();
    drain.join().unwrap();
    let console_bytes = console_log_bytes(&dir.0);
    let stderr = read_stderr(&mut child);

    let host_mnt = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let host_net = std::fs::read_link("/proc/self/ns/net").unwrap();
    for (name, uid, cap_eff, nnp, mnt, net, sees_host) in &snapshot {
        assert_eq!(uid, "65534\t65534\t65534\t65534", "{name} uids");
        assert_eq!(
            cap_eff, "0000000000000000 0000000000000000",
            "{name} keeps capabilities (effective, bounding)"
        );
        assert_eq!(nnp, "1", "{name} without no_new_privs");
        assert_ne!(mnt, &host_mnt, "{name} shares the host's mount namespace");
        assert_ne!(net, &host_net, "{name} shares the host's network namespace");
        assert!(
            !sees_host,
            "{name} can see host files (/etc/passwd or /dev/kvm)"
        );
    }
    let (caller_uid, caller_mnt) = caller.expect("the caller thread");
    assert!(
        caller_uid.starts_with("0\t"),
        "caller thread stays root: {caller_uid}"
    );
    assert_eq!(
        caller_mnt, host_mnt,
        "caller thread stays in the host's namespace"
    );
    assert!(
        status.success() && stderr.contains("RUN-ENDED-CLEANLY"),
        "the jailed VMM did not finish its run normally ({status}): {stderr}"
    );
    assert!(console_bytes > 0, "the jailed console wrote nothing");
}
