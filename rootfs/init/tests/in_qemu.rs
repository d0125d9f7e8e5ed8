//! twinbox-init's VM path on a real kernel: the built image booted under QEMU's microvm
//! machine (TCG, so it needs no KVM) with the built guest kernel and the job on the
//! kernel command line. Proves the job is found in `/proc/cmdline`, devtmpfs and the
//! console are set up, the overlay makes the read-only root writable, the hostname is
//! set, and `reboot(RB_AUTOBOOT)` ends the machine (QEMU `-no-reboot` exits).
//!
//! QEMU's port I/O has no device at the marker port, so markers are not checked here
//! (the VMM's tests do that).
//!
//! Needs qemu-system-x86_64, the image (`rootfs/build.sh`) and the guest kernel
//! (`guest-kernel/build.sh`; `TWINBOX_KERNEL` may name another bzImage). Without them
//! the tests fail with a message naming what is missing.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use twinbox_proto::{Job, MarkerChannel, MARKER_PORT};

fn cache() -> PathBuf {
    std::env::var_os("TWINBOX_CACHE")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("/var/cache/twinbox"), PathBuf::from)
}

fn require(path: PathBuf, how: &str) -> PathBuf {
    assert!(path.exists(), "{} not found — {how}", path.display());
    path
}

/// Boots `job` and returns the serial console output once the guest has rebooted.
fn boot(job: &Job) -> String {
    let kernel = std::env::var_os("TWINBOX_KERNEL").map_or_else(
        || {
            require(
                cache().join("kernel/current/bzImage"),
                "build it with guest-kernel/build.sh",
            )
        },
        PathBuf::from,
    );
    let image = require(
        cache().join("rootfs/current/rootfs.ext4"),
        "build it with rootfs/build.sh",
    );
    let cmdline = format!(
        "console=ttyS0 reboot=t panic=-1 quiet root=/dev/vda ro rootfstype=ext4 \
         init=/sbin/twinbox-init twinbox.job={}",
        job.encode().unwrap()
    );
    let output = Command::new("timeout")
        // A hung guest fails the test instead of hanging the suite.
        .args(["600", "qemu-system-x86_64", "-M"])
        .arg("microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&kernel)
        .args(["-append", &cmdline, "-drive"])
        .arg(format!(
            "id=root,file={},format=raw,if=none,readonly=on",
            image.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root"])
        .stdin(Stdio::null())
        .output()
        .expect("run qemu-system-x86_64 (scripts/install-deps installs it)");
    let console = String::from_utf8_lossy(&output.stdout).replace('\r', "");
    assert!(
        output.status.success(),
        "QEMU failed ({}): {}\nconsole:\n{console}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    console
}

fn vm_job(argv: &[&str]) -> Job {
    Job {
        env: vec!["PATH=/bin:/sbin:/usr/bin:/usr/sbin".into()],
        marker: MarkerChannel::Port(MARKER_PORT),
        power_off: true,
        overlay_root: true,
        hostname: Some("vmbox".into()),
        // The tests read the exit line, which init prints only when verbose.
        verbose: true,
        ..Job::new(argv.iter().copied())
    }
}

#[test]
fn the_vm_path_runs_the_job_on_a_writable_overlay_and_powers_off() {
    let script = r#"printf '<%s>' "$@"; echo; echo "host=$(hostname) tty=$(tty)";
        echo x > /etc/written && echo writable; grep -q '^overlay / overlay' /proc/mounts && echo overlay;
        grep -q '^devtmpfs /dev ' /proc/mounts && echo devtmpfs; sleep 1000 & exit 5"#;
    let console = boot(&vm_job(&["sh", "-c", script, "sh", "a  b", "naïve 'q'"]));
    for expected in [
        "<a  b><naïve 'q'>\n",
        "host=vmbox tty=/dev/console\n",
        "writable\n",
        "overlay\n",
        "devtmpfs\n",
        "twinbox-init: workload exited with status 5\n",
    ] {
        assert!(
            console.contains(expected),
            "missing {expected:?} in console:\n{console}"
        );
    }
}

#[test]
fn a_missing_command_is_reported_on_the_console() {
    let console = boot(&Job {
        overlay_root: false,
        ..vm_job(&["no-such-command"])
    });
    assert!(
        console.contains("twinbox-init: no-such-command: not found\n"),
        "{console}"
    );
    assert!(
        console.contains("twinbox-init: workload exited with status 127\n"),
        "{console}"
    );
}
