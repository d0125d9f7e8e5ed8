//! Peer: QEMU's `microvm` machine (Debian's qemu-system-x86), timed from process start to
//! process exit (QEMU has no twinbox marker device, so no inner phases).
//!
//! It boots what twinbox's VM boots: the tiny guest in the `vmm` scenario, else the same
//! kernel with the same image as a read-only virtio-blk root, extra disks as further
//! virtio-blk devices, and twinbox's own kernel command line and job. Options, from QEMU's
//! docs/system/i386/microvm.rst, each one needed:
//! - `acpi=off`: only then does QEMU add `virtio_mmio.device=` entries to the command
//!   line (our kernel has no ACPI, so it would not find the disks);
//! - `pit=on,pic=on,rtc=on`: without a PIT the kernel panics "IO-APIC + timer doesn't
//!   work";
//! - `-device i8042`: microvm has no keyboard controller, and both guests end the run by
//!   the i8042 reset (`reboot=k`), which `-no-reboot` turns into QEMU's exit 0;
//! - `-serial stdio`: the guest console, where twinbox-init prints the workload's exit.
//!
//! QEMU ignores the writes to twinbox's marker port and to port 0x600, so the workload's
//! status comes from init's console line; a Linux boot that never printed it (a panic
//! also ends in a reset) is a failure, not a success.

use super::peer::{peer_report, VMM_NOTE};
use super::{process, Runner};
use linux_loader::cmdline::Cmdline;
use std::path::{Path, PathBuf};
use std::process::Command;
use twinbox_spec::guest_cmdline;
use twinbox_spec::proto::{job::JOB_CMDLINE_KEY, ExitCode};
use twinbox_spec::{Outcome, RunReport, RunSpec};

/// Name of this peer in tables.
pub const NAME: &str = "qemu-microvm";

/// What the QEMU peer can do: it boots the kernel and image like twinbox's VM; its
/// memory is a sampled RSS of an outside process, not comparable with the boxes' figures.
pub const CAPABILITIES: super::Capabilities = super::Capabilities {
    guest: super::Guest::Kernel,
    memory_in_report: false,
    instance: None,
    disk_at: Some(super::DiskAt::VirtioBlk),
    host_binaries: false,
    time_limit: super::TimeLimit::Vm,
    net: super::NetAt::Missing("the QEMU peer gets no tap and virtio-net-device yet"),
};

/// How QEMU runs guest code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// KVM, like every VMM compared here (`-cpu host`).
    Kvm,
    /// QEMU's software CPU (`-cpu max`): for tests on hosts whose KVM cannot run Linux.
    Tcg,
}

/// QEMU microvm runner.
pub struct QemuMicrovm {
    /// The qemu-system-x86_64 binary.
    pub qemu: PathBuf,
    /// KVM, or TCG in tests.
    pub accel: Accel,
}

impl QemuMicrovm {
    /// Finds `qemu-system-x86_64` in PATH (with KVM).
    pub fn find() -> Option<Self> {
        super::peer::in_path("qemu-system-x86_64").map(|qemu| Self {
            qemu,
            accel: Accel::Kvm,
        })
    }
}

/// Whether `kernel` is the bench's tiny guest (which prints nothing).
fn is_tiny_guest(kernel: &Path) -> bool {
    std::fs::read(kernel).is_ok_and(|bytes| bytes == crate::tiny_guest::elf())
}

/// The kernel command line: the guest command line contract ([`guest_cmdline`]: the
/// base, the PVM extras when twinbox's VM gets them) and the job, as twinbox's VMM passes
/// them (minus its own device entries, which QEMU adds for its devices).
pub fn kernel_cmdline(spec: &RunSpec, pvm: bool) -> Result<String, String> {
    let mut job = spec.job();
    job.overlay_root = true;
    job.power_off = true;
    let token = job.encode().map_err(|e| format!("job: {e}"))?;
    let job_arg = format!("{JOB_CMDLINE_KEY}={token}");
    let mut parts = vec![guest_cmdline::BASE];
    if pvm {
        parts.push(guest_cmdline::PVM_EXTRA);
    }
    parts.extend(
        spec.cmdline_extra
            .as_deref()
            .filter(|p| !p.trim().is_empty()),
    );
    parts.push(&job_arg);
    let err = |e: linux_loader::cmdline::Error| format!("kernel command line: {e}");
    let mut line = Cmdline::new(guest_cmdline::MAX_LEN).map_err(err)?;
    for part in parts {
        line.insert_str(part).map_err(err)?;
    }
    let line = line.as_cstring().map_err(err)?;
    line.into_string()
        .map_err(|_| "kernel command line: not UTF-8".into())
}

/// QEMU's arguments for one run.
pub fn args(spec: &RunSpec, kernel: &Path, cmdline: &str, accel: Accel) -> Vec<String> {
    let mut a: Vec<String> = vec!["-M".into(), "microvm,acpi=off,pit=on,pic=on,rtc=on".into()];
    match accel {
        Accel::Kvm => {
            a.extend(["-enable-kvm", "-cpu", "host,arch-capabilities=off"].map(String::from))
        }
        Accel::Tcg => a.extend(["-accel", "tcg", "-cpu", "max"].map(String::from)),
    }
    a.extend([
        "-m".into(),
        spec.memory_mib.to_string(),
        "-smp".into(),
        spec.vcpus.to_string(),
    ]);
    a.extend(
        [
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
            "-device",
            "i8042",
        ]
        .map(String::from),
    );
    let disks = std::iter::once((&spec.rootfs, true))
        .chain(spec.disks.iter().map(|d| (&d.path, d.read_only)));
    for (n, (path, read_only)) in disks.enumerate() {
        a.push("-drive".into());
        a.push(format!(
            "id=disk{n},file={},format=raw,if=none,readonly={}",
            path.display(),
            if read_only { "on" } else { "off" }
        ));
        a.push("-device".into());
        a.push(format!("virtio-blk-device,drive=disk{n}"));
    }
    a.push("-kernel".into());
    a.push(kernel.display().to_string());
    a.push("-append".into());
    a.push(cmdline.into());
    a
}

/// The workload's end as init printed it on the console.
pub fn exit_from_console(output: &str) -> Option<ExitCode> {
    output.lines().rev().find_map(|l| {
        let rest = l.trim().strip_prefix("twinbox-init: workload ")?;
        if let Some(s) = rest.strip_prefix("exited with status ") {
            s.trim().parse().ok().map(ExitCode::Exited)
        } else {
            rest.strip_prefix("killed by signal ")?
                .trim()
                .parse()
                .ok()
                .map(ExitCode::Signaled)
        }
    })
}

impl Runner for QemuMicrovm {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> super::Capabilities {
        CAPABILITIES
    }

    fn run(&self, spec: &RunSpec) -> Result<RunReport, String> {
        let kernel = spec.kernel.as_ref().ok_or("qemu peer needs a kernel")?;
        let pvm = twinbox_spec::host::is_pvm() && self.accel == Accel::Kvm;
        let cmdline = kernel_cmdline(spec, pvm)?;
        let mut cmd = Command::new(&self.qemu);
        cmd.args(args(spec, kernel, &cmdline, self.accel));
        let done = process::run(cmd, spec.spawn_ns, true, spec.time_limit)?;
        let tiny = is_tiny_guest(kernel);
        Ok(peer_report(
            NAME,
            done,
            VMM_NOTE,
            |process, console| match (process, exit_from_console(console)) {
                (Outcome::Exited(0), Some(ExitCode::Exited(status))) => {
                    Outcome::Exited(i32::from(status))
                }
                (Outcome::Exited(0), Some(ExitCode::Signaled(signal))) => {
                    Outcome::Signaled(i32::from(signal))
                }
                (Outcome::Exited(0), None) if tiny => Outcome::Exited(0),
                (Outcome::Exited(0), None) => Outcome::Failed(format!(
                    "qemu exited but init never reported the workload's end: {}",
                    console.trim()
                )),
                (Outcome::Failed(why), _) => Outcome::Failed(why),
                (other, _) => {
                    Outcome::Failed(format!("qemu ended with {other:?}: {}", console.trim()))
                }
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinbox_spec::run_spec::DiskSpec;

    #[test]
    fn console_exit_lines_parse() {
        let out = "[ 0.1] boot\ntwinbox-init: workload exited with status 7\r\n";
        assert_eq!(exit_from_console(out), Some(ExitCode::Exited(7)));
        let out = "twinbox-init: workload killed by signal 9\n";
        assert_eq!(exit_from_console(out), Some(ExitCode::Signaled(9)));
        assert_eq!(exit_from_console("Kernel panic - not syncing"), None);
    }

    #[test]
    fn root_first_then_disks_and_twinbox_cmdline() {
        let mut spec = RunSpec::new("/img.ext4", vec!["/bin/true".into()]);
        spec.disks = vec![DiskSpec {
            path: "/d.img".into(),
            read_only: false,
        }];
        let line = kernel_cmdline(&spec, false).unwrap();
        assert!(line.starts_with(guest_cmdline::BASE), "{line}");
        assert!(line.contains(" twinbox.job="), "{line}");
        let a = args(&spec, Path::new("/vmlinux"), &line, Accel::Kvm);
        let drives: Vec<_> = a.iter().filter(|x| x.starts_with("id=disk")).collect();
        assert_eq!(
            drives,
            [
                "id=disk0,file=/img.ext4,format=raw,if=none,readonly=on",
                "id=disk1,file=/d.img,format=raw,if=none,readonly=off"
            ]
        );
        assert!(a.windows(2).any(|w| w == ["-device", "i8042"]));
        assert!(a.contains(&"-enable-kvm".to_string()));
        assert_eq!(a[a.len() - 1], line);
        assert!(kernel_cmdline(&spec, true)
            .unwrap()
            .contains(guest_cmdline::PVM_EXTRA));
        spec.cmdline_extra = Some("x".repeat(guest_cmdline::MAX_LEN));
        assert!(kernel_cmdline(&spec, false)
            .unwrap_err()
            .contains("kernel command line"));
    }

    #[test]
    fn only_the_tiny_guest_may_end_silently() {
        let dir = std::env::temp_dir().join(format!("twinbox-qemu-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tiny = dir.join("tiny.elf");
        crate::tiny_guest::write_to(&tiny).unwrap();
        let other = dir.join("other.elf");
        std::fs::write(&other, b"\x7fELF not ours").unwrap();
        assert!(is_tiny_guest(&tiny));
        assert!(!is_tiny_guest(&other));
        assert!(!is_tiny_guest(&dir.join("missing")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
