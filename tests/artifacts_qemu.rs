//! The QEMU oracle: boots the built guest kernel and root filesystem under Debian's QEMU
//! (microvm machine, TCG), independently of our VMM. If these tests fail, the artifacts are
//! broken; if they pass and a twinbox VM test fails, the fault is in our VMM.
//!
//! Needs `qemu-system-x86_64` and the artifacts (`scripts/build-artifacts`); fails saying
//! which is missing. No root and no KVM needed. `TWINBOX_QEMU_BOOTS=N` repeats the vmlinux
//! boot N times (each one checked) and prints every boot-to-userspace time, which is how
//! the boot time is measured; it is printed, never asserted.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use twinbox_spec::artifacts;
use twinbox_spec::proto::{Job, MarkerChannel};

/// TCG boots in seconds here; the limit only catches a hung guest.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const QEMU: &str = "qemu-system-x86_64";

/// The workload's own first line: the first output of user space after init.
const HELLO: &str = "hello from twinbox-init";

/// What one QEMU boot printed and how it ended.
struct Boot {
    /// Everything on the serial console (and QEMU's stderr, after it).
    output: String,
    /// QEMU's exit status (it exits on the guest's reboot because of `-no-reboot`).
    status: ExitStatus,
    /// Each console line with the time from spawning QEMU to its arrival.
    timed_lines: Vec<(Duration, String)>,
}

impl Boot {
    /// Time from spawning QEMU to the first console line containing [`HELLO`].
    fn to_userspace(&self) -> Option<Duration> {
        self.timed_lines
            .iter()
            .find(|(_, line)| line.contains(HELLO))
            .map(|(at, _)| *at)
    }

    /// The value of the first `KEY=value` console line, and when it arrived.
    fn value(&self, key: &str) -> (String, Duration) {
        let prefix = format!("{key}=");
        self.timed_lines
            .iter()
            .find_map(|(at, line)| {
                let value = line.trim_end_matches('\r').strip_prefix(&prefix)?;
                Some((value.to_owned(), *at))
            })
            .unwrap_or_else(|| panic!("{key} missing from the console:\n{}", self.output))
    }

    fn has_line(&self, wanted: &str) -> bool {
        self.output
            .lines()
            .any(|line| line.trim_end_matches('\r') == wanted)
    }
}

/// The artifact at `path`, or a test failure saying how to build it.
fn artifact(path: PathBuf, what: &str) -> PathBuf {
    artifacts::require(&path, what).unwrap_or_else(|message| panic!("{message}"))
}

fn require_qemu() {
    let found = Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|status| status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{QEMU} not found: install qemu-system-x86 (scripts/install-deps)"
    );
}

/// Kills and reaps QEMU when dropped, so a failing assertion leaks no process.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Boots `kernel` with the root image read-only on virtio-mmio block and `job` for init.
fn boot(kernel: &Path, job: &Job, smp: u32) -> Boot {
    require_qemu();
    let rootfs = artifact(artifacts::rootfs_image(), "root filesystem image");
    let token = job.encode().expect("the test job encodes");
    // Why each choice (each was tried without):
    // - `acpi=off`: only then does QEMU append the `virtio_mmio.device=` words for the
    //   disk (the kernel has no ACPI), else "Unable to mount root fs".
    // - `pit=on`: without a PIT the kernel panics "IO-APIC + timer doesn't work".
    // - `reboot=t`: microvm has no i8042, so reset by triple fault; `-no-reboot` turns the
    //   reset into QEMU's exit 0. `panic=-1`: a panic ends QEMU too instead of hanging.
    // - no `tsc_early_khz=`: a wrong value makes guest time race ahead (2000 made `sleep 3`
    //   take 0.03 s); without it the kernel calibrates the TSC against the PIT or, when
    //   TCG is too slow for that, falls back to the jiffies clocksource — correct either way.
    let cmdline = format!(
        "console=ttyS0 reboot=t panic=-1 quiet root=/dev/vda ro rootfstype=ext4 \
         init=/sbin/twinbox-init twinbox.job={token}"
    );
    let started = Instant::now();
    let child = Command::new(QEMU)
        .args([
            "-M",
            "microvm,acpi=off,pit=on,pic=on,rtc=on",
            "-accel",
            "tcg",
            "-cpu",
            "max",
        ])
        .args(["-m", "256", "-smp", &smp.to_string()])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=raw,if=none,readonly=on",
            rootfs.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", &cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {QEMU}: {err}"));
    let mut qemu = Reaped(child);

    // Lines arrive on a channel so the wait can time out while QEMU hangs.
    let (sender, lines) = mpsc::channel::<(Instant, String)>();
    let stdout = qemu.0.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line).into_owned();
            if sender.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let mut stderr = qemu.0.stderr.take().expect("piped stderr");
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });

    let deadline = started + BOOT_TIMEOUT;
    let mut output = String::new();
    let mut timed_lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok((at, line)) => {
                output.push_str(&line);
                output.push('\n');
                timed_lines.push((at - started, line));
            }
            // QEMU closed its stdout: it has exited (or is about to).
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                drop(qemu);
                panic!(
                    "QEMU did not exit within {} s (the guest hung); console so far:\n{output}",
                    BOOT_TIMEOUT.as_secs()
                );
            }
        }
    }
    let _ = reader.join();
    let status = qemu.0.wait().expect("wait for QEMU");
    let errors = stderr_reader.join().unwrap_or_default();
    if !errors.is_empty() {
        output.push_str("--- QEMU stderr ---\n");
        output.push_str(&errors);
    }
    Boot {
        output,
        status,
        timed_lines,
    }
}

/// A VM job as the VMM would send it, but without a marker device (QEMU has none).
fn vm_job(script: &str) -> Job {
    Job {
        power_off: true,
        overlay_root: true,
        marker: MarkerChannel::None,
        // The exit line these tests read is one of init's own lines.
        verbose: true,
        ..Job::new(["/bin/sh", "-c", script])
    }
}

fn check_hello_and_status(boot: &Boot, kernel: &str) {
    assert!(
        boot.has_line(HELLO),
        "{kernel}: the workload's line is missing:\n{}",
        boot.output
    );
    assert!(
        boot.has_line("twinbox-init: workload exited with status 7"),
        "{kernel}: init did not report status 7:\n{}",
        boot.output
    );
    assert!(
        boot.status.success(),
        "{kernel}: QEMU ended with {} instead of exiting on the guest's reboot:\n{}",
        boot.status,
        boot.output
    );
    match boot.to_userspace() {
        Some(time) => eprintln!("{kernel}: QEMU start to first workload line {time:.2?}"),
        None => unreachable!("the line was found above"),
    }
}

#[test]
fn vmlinux_pvh_boots_runs_the_job_and_powers_off() {
    let vmlinux = artifact(artifacts::kernel_vmlinux(), "guest kernel vmlinux");
    let boots: u32 = std::env::var("TWINBOX_QEMU_BOOTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let job = vm_job(&format!("echo {HELLO}; exit 7"));
    let mut times = Vec::new();
    for _ in 0..boots.max(1) {
        let boot = boot(&vmlinux, &job, 1);
        check_hello_and_status(&boot, "vmlinux");
        times.extend(boot.to_userspace());
    }
    if times.len() > 1 {
        times.sort();
        eprintln!(
            "vmlinux: {} boots, QEMU start to first workload line min {:.2?} median {:.2?} max {:.2?}",
            times.len(),
            times[0],
            times[times.len() / 2],
            times[times.len() - 1]
        );
    }
}

#[test]
fn bzimage_boots_runs_the_job_and_powers_off() {
    let bzimage = artifact(artifacts::kernel_bzimage(), "guest kernel bzImage");
    let boot = boot(&bzimage, &vm_job(&format!("echo {HELLO}; exit 7")), 1);
    check_hello_and_status(&boot, "bzImage");
}

/// The guest features the workloads rely on, checked from inside one SMP boot: both CPUs
/// (MP table, no ACPI), a writable overlay root over the read-only image, the kernel
/// filesystems init mounts, cgroup v2, namespaces, a guest clock that does not run ahead of
/// real time, and a signal death reported as such.
#[test]
fn guest_sees_cpus_writable_overlay_root_cgroups_namespaces_and_a_sane_clock() {
    let vmlinux = artifact(artifacts::kernel_vmlinux(), "guest kernel vmlinux");
    let script = r#"
        echo UPTIME=$(cut -d' ' -f1 /proc/uptime)
        echo CPUS=$(grep -c ^processor /proc/cpuinfo)
        echo written > /written-by-guest && echo ROOT_WRITABLE=$(cat /written-by-guest)
        echo ROOT_FS=$(awk '$2 == "/" {print $3}' /proc/mounts | tail -n 1)
        for fs in ext4 overlay tmpfs devtmpfs proc sysfs cgroup2; do
            grep -qw "$fs" /proc/filesystems && echo "FS_$fs=yes"
        done
        for ns in pid net uts ipc user cgroup mnt; do
            [ -e /proc/self/ns/$ns ] && echo "NS_$ns=yes"
        done
        kill -9 $$
    "#;
    let boot = boot(&vmlinux, &vm_job(script), 2);
    let out = &boot.output;
    // A wrong TSC frequency (e.g. a made-up `tsc_early_khz=`) makes guest time race ahead:
    // the guest then claims more uptime than QEMU has existed. 1 s covers rounding.
    let (uptime, seen_at) = boot.value("UPTIME");
    let uptime: f64 = uptime
        .parse()
        .unwrap_or_else(|_| panic!("uptime {uptime:?}:\n{out}"));
    assert!(
        uptime <= seen_at.as_secs_f64() + 1.0,
        "guest clock runs ahead: {uptime} s of uptime {seen_at:.2?} after QEMU started:\n{out}"
    );
    assert_eq!(
        boot.value("CPUS").0,
        "2",
        "the guest sees both vCPUs:\n{out}"
    );
    assert_eq!(boot.value("ROOT_WRITABLE").0, "written", "{out}");
    assert_eq!(
        boot.value("ROOT_FS").0,
        "overlay",
        "init stacks an overlay on /:\n{out}"
    );
    for fs in [
        "ext4", "overlay", "tmpfs", "devtmpfs", "proc", "sysfs", "cgroup2",
    ] {
        assert_eq!(
            boot.value(&format!("FS_{fs}")).0,
            "yes",
            "filesystem {fs} built in"
        );
    }
    for ns in ["pid", "net", "uts", "ipc", "user", "cgroup", "mnt"] {
        assert_eq!(
            boot.value(&format!("NS_{ns}")).0,
            "yes",
            "namespace {ns} built in"
        );
    }
    assert!(
        boot.has_line("twinbox-init: workload killed by signal 9"),
        "init reports the signal death:\n{out}"
    );
    assert!(
        boot.status.success(),
        "QEMU ended with {}:\n{out}",
        boot.status
    );
}
