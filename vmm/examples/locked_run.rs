//! Runs one command in a microVM the way a locked-down CLI would: the guest-facing threads
//! jailed, every thread (the caller's too) under its seccomp filter, SIGINT/SIGTERM
//! honoured. For trying the lockdown on a real kernel and image (e.g. in the lab) before
//! the CLI exposes it:
//!
//! ```text
//! cargo run -p vmm --example locked_run -- [--vcpus N] [--disk PATH] -- CMD [ARGS...]
//! ```
//!
//! Uses the built kernel and image (`TWINBOX_CACHE`). Exits with the workload's status,
//! 128+N on a signal, 125 on bad input or a VMM error.

use twinbox_spec::interrupt::Interrupt;
use twinbox_spec::{DiskSpec, Outcome, RunSpec};

fn main() {
    let spawn_ns = twinbox_spec::clock::monotonic_ns();
    let mut args = std::env::args().skip(1);
    let mut vcpus = 1;
    let mut disks = Vec::new();
    let mut argv = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--vcpus" => vcpus = args.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            "--disk" => disks.push(DiskSpec {
                path: args.next().unwrap_or_default().into(),
                read_only: false,
            }),
            "--" => {
                argv.extend(args.by_ref());
            }
            other => {
                eprintln!("locked_run: unknown argument {other}");
                std::process::exit(125);
            }
        }
    }
    let mut spec = RunSpec::new(twinbox_spec::artifacts::rootfs_image(), argv);
    spec.vcpus = vcpus;
    spec.disks = disks;
    spec.spawn_ns = spawn_ns;
    let interrupt = match Interrupt::install() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("locked_run: cannot install signal handlers: {e}");
            std::process::exit(125);
        }
    };
    let options = vmm::RunOptions {
        lock_caller_thread: true,
        jail: true,
        seccomp: None,
    };
    let status = match vmm::run_with(&spec, Some(&interrupt.fd()), options) {
        Ok(report) => {
            for note in &report.notes {
                eprintln!("locked_run: note: {note}");
            }
            match &report.outcome {
                Outcome::Failed(why) => {
                    eprintln!("locked_run: vm failed: {why}");
                    1
                }
                other => other.exit_status(),
            }
        }
        Err(e) => {
            eprintln!("locked_run: {e}");
            125
        }
    };
    std::process::exit(interrupt.signal().map_or(status, |s| 128 + s));
}
