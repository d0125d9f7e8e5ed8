//! Every thread of the VMM runs under its seccomp filter during a run: the kernel shows
//! `Seccomp: 2` (filter mode) in /proc/<pid>/task/<tid>/status for each vCPU, the event
//! loop, the console writer and the caller's thread (opted in, as the CLI does), and the
//! run still ends normally (teardown, measurements, report) with the default kill-process
//! action.
//!
//! NEEDS /dev/kvm (any flavour: PVM is fine, no Linux guest involved).

mod common;

use common::{
    child_dir, child_test, console_log_bytes, drain_stdout, flooding_spec, read_stderr,
    require_kvm, TempDir, CALLER_THREAD, GUEST_FACING_THREADS,
};
use std::process::Stdio;
use std::time::{Duration, Instant};
use twinbox_spec::Outcome;

/// Env var that turns this test binary into the child below (value: its directory).
const CHILD_ENV: &str = "TWINBOX_SECCOMP_CHILD";
/// Set for a child whose run asks for no filters through `RunOptions::seccomp`.
const OFF_ENV: &str = "TWINBOX_SECCOMP_CHILD_OFF";

/// Not a test on its own: the VMM process the test below inspects. Boots the flooding
/// guest on two vCPUs with its console on stdout for 4 s, then prints the outcome.
#[test]
#[ignore = "runs only as the child of the seccomp test"]
fn child_vmm() {
    let dir = child_dir(CHILD_ENV, "seccomp test");
    // The parent made the directory and removes it: this process may open nothing after
    // the run.
    let spec = flooding_spec(&dir);
    // The caller's thread gets its filter too, as the CLI's does: a named thread, so the
    // parent can find it, which after the run only prints and exits, as the CLI does.
    let caller = std::thread::Builder::new()
        .name("vmm-caller".into())
        .spawn(move || {
            let options = vmm::RunOptions {
                lock_caller_thread: true,
                // The escape hatch a CLI's --no-seccomp would set.
                seccomp: std::env::var_os(OFF_ENV).map(|_| vmm::seccomp::Mode::Off),
                ..Default::default()
            };
            let report =
                vmm::run_with::<std::fs::File>(&spec, None, options).expect("vmm::run_with");
            match (&report.outcome, report.usage.guest_memory_touched_kib) {
                (Outcome::Failed(why), Some(kib)) if why.contains("time limit") && kib > 0 => {
                    eprintln!("RUN-ENDED-CLEANLY")
                }
                (other, kib) => eprintln!("unexpected outcome {other:?}, guest memory {kib:?}"),
            }
            std::process::exit(0);
        })
        .unwrap();
    let _ = caller.join();
    unreachable!("the caller thread exits the process");
}

/// (thread name, Seccomp mode) of every thread of `pid`.
fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    tasks
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let name = std::fs::read_to_string(dir.join("comm")).ok()?;
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            let mode = status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))?
                .trim()
                .to_owned();
            Some((name.trim().to_owned(), mode))
        })
        .collect()
}

/// The VMM threads of one child run, as (name, Seccomp mode) once all are up with the
/// expected mode (or 3 s after they are all up), and whether the run ended normally.
fn observe(filters_off: bool) -> (Vec<(String, String)>, bool, String, u64) {
    require_kvm();
    let dir = TempDir::new("seccomp");
    let mut command = child_test("child_vmm");
    command
        .env(CHILD_ENV, &dir.0)
        .env_remove(vmm::seccomp::MODE_ENV)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if filters_off {
        command.env(OFF_ENV, "1");
    }
    let mut child = command.spawn().unwrap();
    // Drain the console so the guest keeps running (and the console thread keeps writing).
    let drain = drain_stdout(&mut child);
    // Wait until all the VMM threads exist and have had time to install their filters
    // (each does so first thing), then take that snapshot.
    let expected = if filters_off { "0" } else { "2" };
    let started = Instant::now();
    let modes = loop {
        let modes = seccomp_modes(child.id());
        let all_there = wanted().all(|w| modes.iter().any(|(n, _)| n == w));
        let all_set = wanted().all(|w| modes.iter().any(|(n, m)| n == w && m == expected));
        if all_set || (all_there && started.elapsed() > Duration::from_secs(3)) {
            break modes;
        }
        if started.elapsed() > Duration::from_secs(30) || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("the VMM threads never all appeared; saw {modes:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let status = child.wait().unwrap();
    drain.join().unwrap();
    let console_bytes = console_log_bytes(&dir.0);
    let stderr = read_stderr(&mut child);
    let ended = status.success() && stderr.contains("RUN-ENDED-CLEANLY");
    (modes, ended, format!("{status}: {stderr}"), console_bytes)
}

/// The threads a run has: the guest-facing ones (two vCPUs, the event loop, the console
/// writer, the stdio pumps, the control thread) and the caller.
fn wanted() -> impl Iterator<Item = &'static str> {
    GUEST_FACING_THREADS.into_iter().chain([CALLER_THREAD])
}

#[test]
fn every_vmm_thread_runs_under_a_seccomp_filter() {
    let (modes, ended, how, console_bytes) = observe(false);
    for want in wanted() {
        let (_, mode) = modes.iter().find(|(n, _)| n == want).unwrap();
        assert_eq!(
            mode, "2",
            "thread {want} runs with Seccomp: {mode}, not 2 (filter); all: {modes:?}"
        );
    }
    assert!(
        ended,
        "the filtered VMM did not finish its run normally ({how})"
    );
    assert!(
        console_bytes > 0,
        "the console thread wrote nothing under its filter"
    );
}

/// The escape hatch: `RunOptions::seccomp = Some(Mode::Off)` runs without filters.
#[test]
fn run_options_can_turn_the_filters_off() {
    let (modes, ended, how, _) = observe(true);
    for want in wanted() {
        let (_, mode) = modes.iter().find(|(n, _)| n == want).unwrap();
        assert_eq!(mode, "0", "thread {want} filtered although asked not to");
    }
    assert!(ended, "the unfiltered VMM did not finish normally ({how})");
}
