//! The VMM's threads stop when asked, whatever the guest is doing, and none outlives a run:
//! - a vCPU spinning in the guest stops on one kick, even when the kick lands before its
//!   first KVM_RUN (the race `immediate_exit` closes);
//! - a guest flooding a console nobody reads (the vCPU waits for room in the console
//!   queue) still ends at the time limit, and on SIGTERM;
//! - after `vmm::run` returns, no vCPU, event-loop or console thread is left.
//!
//! NEEDS /dev/kvm (any flavour: PVM is fine, no Linux guest involved).

mod common;

use common::{child_test, read_stderr, require_kvm, spec_in, thread_names, TempDir, FLOOD};
use std::process::Stdio;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::{Duration, Instant};
use twinbox_spec::run_spec::OutputMode;
use twinbox_spec::Outcome;
use vm_memory::{Bytes, GuestAddress};
use vmm::cpuid::Profile;
use vmm::machine::{self, BootEntry};
use vmm::regs::{self, EntryMode};
use vmm::seccomp::{Filters, Mode};
use vmm::vcpu::{IoHandler, VcpuContext, VcpuThread};
use vmm_sys_util::eventfd::EventFd;

/// `eb fe`: jmp $ — never exits to the VMM on its own.
const SPIN: &[u8] = &[0xeb, 0xfe];

/// Resets the machine at once through the i8042: `b0 fe e6 64` (mov al, 0xfe; out 0x64,
/// al), then `f4 eb fd` (hlt; jmp hlt).
const RESET: &[u8] = &[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

/// Ignores all I/O.
struct Nothing;

impl IoHandler for Nothing {
    fn pio_read(&self, _: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pio_write(&self, _: u16, _: &[u8]) {}
    fn mmio_read(&self, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, _: u64, _: &[u8]) {}
}

/// Runs `f` on a helper thread and fails the test if it takes longer than `limit` (a hang
/// of the code under test must fail, not hang the suite).
fn within(limit: Duration, what: &str, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    if rx.recv_timeout(limit).is_err() {
        panic!("{what} did not finish within {limit:?}");
    }
}

#[test]
fn dropping_a_vcpu_thread_stops_a_spinning_guest_even_before_its_first_run() {
    require_kvm();
    let kvm = machine::open_kvm().unwrap();
    let profile = if twinbox_spec::host::is_pvm() {
        Profile::Pvm
    } else {
        Profile::Host
    };
    let memory = vmm::memory::create(16).unwrap();
    memory.write_slice(SPIN, GuestAddress(0x10_0000)).unwrap();
    // Round 0 drops at once (the kick usually lands before the first KVM_RUN); the others
    // let the guest spin a little first.
    for round in 0..40u64 {
        let vm = machine::create_vm(&kvm).unwrap();
        vmm::memory::register(&vm, &memory).unwrap();
        regs::write_boot_tables(&memory, EntryMode::Linux64).unwrap();
        let entry = BootEntry {
            mode: EntryMode::Linux64,
            rip: 0x10_0000,
            boot_info: 0x7000,
        };
        let fd = machine::create_vcpus(&kvm, &vm, 1, profile, entry)
            .unwrap()
            .pop()
            .unwrap();
        let (reasons, _rx) = channel();
        let ctx = VcpuContext {
            id: 0,
            io: Arc::new(Nothing),
            memory: memory.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            reasons,
            on_first_run: None,
            pvm_workarounds: false,
            // The real vCPU filter: the kick and the exit must work under it.
            seccomp: Filters::new(Mode::Kill).unwrap(),
        };
        let thread = VcpuThread::spawn(fd, ctx).unwrap();
        std::thread::sleep(Duration::from_micros((round % 8) * 250));
        within(
            Duration::from_secs(10),
            "dropping a spinning vCPU",
            move || drop(thread),
        );
        assert!(
            !thread_names().iter().any(|n| n == "vcpu0"),
            "round {round}: a vcpu0 thread is still alive after the drop"
        );
    }
}

#[test]
fn no_vmm_thread_outlives_a_run() {
    require_kvm();
    let dir = TempDir::new("teardown-threads");
    let mut spec = spec_in(&dir.0, RESET);
    spec.vcpus = 2;
    spec.output = OutputMode::Inherit; // starts the console writer thread too
    spec.time_limit = Some(Duration::from_secs(60));
    let report = vmm::run(&spec).expect("vmm::run");
    // The guest resets without an exit marker: a failed outcome, and a clean teardown.
    assert!(
        matches!(&report.outcome, Outcome::Failed(why) if why.contains("reset")),
        "{:?}",
        report.outcome
    );
    let left: Vec<String> = thread_names()
        .into_iter()
        .filter(|n| n.starts_with("vcpu") || n.starts_with("vmm-"))
        .collect();
    assert!(left.is_empty(), "threads left after vmm::run: {left:?}");
}

/// Env var that turns this test binary into the child of the console tests.
const CHILD_ENV: &str = "TWINBOX_TEARDOWN_CHILD";

/// Not a test on its own: the body of the child process of the two console tests below,
/// run with `--ignored` and `TWINBOX_TEARDOWN_CHILD=<time limit in s, or "none">`. Boots
/// the flooding guest with its console on our stdout (a pipe the parent never reads),
/// prints the outcome to stderr and exits 128+signal when a signal stopped it.
#[test]
#[ignore = "runs only as the child of the console tests"]
fn child_flooding_guest() {
    let Ok(limit) = std::env::var(CHILD_ENV) else {
        panic!("run only as the child of the console tests ({CHILD_ENV} unset)");
    };
    let dir = TempDir::new("teardown-flood");
    let mut spec = spec_in(&dir.0, FLOOD);
    spec.output = OutputMode::Inherit;
    spec.time_limit = limit.parse().ok().map(Duration::from_secs);
    let interrupt = twinbox_spec::interrupt::Interrupt::install().unwrap();
    let report = vmm::run_until(&spec, Some(&interrupt.fd())).expect("vmm::run_until");
    eprintln!("outcome: {:?}", report.outcome);
    drop(dir);
    std::process::exit(interrupt.signal().map_or(0, |s| 128 + s));
}

/// Starts the child with its stdout on a pipe nobody reads; returns it and the pipe.
fn start_child(limit: &str) -> (std::process::Child, std::process::ChildStdout) {
    let mut child = child_test("child_flooding_guest")
        .env(CHILD_ENV, limit)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    (child, stdout)
}

/// Waits up to `limit` for the child; kills it and fails if it is still running.
fn wait_child(mut child: std::process::Child, limit: Duration) -> (i32, String) {
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the VMM did not stop within {limit:?} with its console pipe full");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = read_stderr(&mut child);
    (status.code().unwrap_or(-1), stderr)
}

#[test]
fn a_guest_flooding_a_console_nobody_reads_stops_at_the_time_limit() {
    require_kvm();
    let (child, _unread) = start_child("3");
    let (code, stderr) = wait_child(child, Duration::from_secs(60));
    assert_eq!(code, 0, "child failed: {stderr}");
    assert!(
        stderr.contains("time limit of 3.0 s reached"),
        "the run did not end at its time limit: {stderr}"
    );
}

#[test]
fn a_guest_flooding_a_console_nobody_reads_stops_on_sigterm() {
    require_kvm();
    let (child, _unread) = start_child("none");
    // Long enough for the pipe and the console queue to fill on any KVM.
    std::thread::sleep(Duration::from_secs(4));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let (code, stderr) = wait_child(child, Duration::from_secs(30));
    assert_eq!(
        code,
        128 + libc::SIGTERM,
        "child did not stop on SIGTERM: {stderr}"
    );
    assert!(stderr.contains("stopped by a signal"), "{stderr}");
}
