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
//! With `RunSpec::net` the guest gets a link like twinbox's VM: the bench makes a tap
//! (`hostnet`: leased /30, `tbt<i>` on the host, owned by the bench's fd, so it vanishes
//! when the run ends or the bench dies), hands it to QEMU as an inherited fd
//! (`-netdev tap,fd=3`, `-device virtio-net-device`, the MAC twinbox would give), and puts
//! the link's addresses in the job, from which init configures `eth0`.
//!
//! QEMU ignores the writes to twinbox's marker port and to port 0x600, so the workload's
//! status comes from init's console line; a Linux boot that never printed it (a panic
//! also ends in a reset) is a failure, not a success.

use super::peer::{guest_outcome, is_tiny_guest, peer_report, VMM_NOTE};
use super::Runner;
use linux_loader::cmdline::Cmdline;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use twinbox_spec::guest_cmdline;
use twinbox_spec::proto::{job::JOB_CMDLINE_KEY, ExitCode, NetConfig};
use twinbox_spec::{RunReport, RunSpec};

/// Name of this peer in tables.
pub const NAME: &str = "qemu-microvm";

/// What the QEMU peer can do: it boots the kernel and image like twinbox's VM; its
/// memory is a sampled RSS of an outside process, not comparable with the boxes' figures.
pub const CAPABILITIES: super::Capabilities = super::peer::KERNEL_VMM;

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

/// The kernel command line: the guest command line contract ([`guest_cmdline`]: the
/// base, the PVM extras when twinbox's VM gets them) and the job (with `net`, the link
/// init configures), as twinbox's VMM passes them (minus its own device entries, which
/// QEMU adds for its devices).
pub fn kernel_cmdline(spec: &RunSpec, pvm: bool, net: Option<NetConfig>) -> Result<String, String> {
    let mut job = spec.job();
    job.net = net;
    job.overlay_root = true;
    job.power_off = true;
    // A peer has no marker device: the workload's status is init's closing console line,
    // which init prints only for a verbose job.
    job.verbose = true;
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

/// The fd number QEMU gets the tap on.
pub const TAP_FD: i32 = 3;

/// QEMU's arguments for one run; with `mac`, a virtio-net device on the tap at
/// [`TAP_FD`].
pub fn args(
    spec: &RunSpec,
    kernel: &Path,
    cmdline: &str,
    accel: Accel,
    mac: Option<&str>,
) -> Vec<String> {
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
    if let Some(mac) = mac {
        a.push("-netdev".into());
        a.push(format!("tap,id=net0,fd={TAP_FD},vhost=off"));
        a.push("-device".into());
        a.push(format!("virtio-net-device,netdev=net0,mac={mac}"));
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
        // Lives until QEMU has exited: the tap goes with the last fd.
        let tap = match spec.net {
            Some(mode) => {
                let lease = super::peer::lease_link(mode)?;
                Some(hostnet::Tap::create(lease).map_err(|e| format!("tap: {e}"))?)
            }
            None => None,
        };
        let cmdline = kernel_cmdline(spec, pvm, tap.as_ref().map(|t| t.lease().net_config(None)))?;
        let mac = tap.as_ref().map(|t| hostnet::format_mac(&t.mac()));
        let mut cmd = Command::new(&self.qemu);
        cmd.args(args(spec, kernel, &cmdline, self.accel, mac.as_deref()));
        if let Some(tap) = &tap {
            inherit_as(&mut cmd, tap.file().as_raw_fd(), TAP_FD);
        }
        let done = super::peer::run_vmm_process(cmd, spec)?;
        let tiny = is_tiny_guest(kernel);
        let mut report = peer_report(NAME, done, VMM_NOTE, |process, console| {
            guest_outcome("qemu", process, console, tiny)
        });
        report.network = tap
            .as_ref()
            .map(|t| t.link_info(spec.net == Some(twinbox_spec::NetMode::Nat)));
        Ok(report)
    }
}

/// Makes `fd` (close-on-exec here) the child's fd `target`, open across exec.
fn inherit_as(cmd: &mut Command, fd: RawFd, target: RawFd) {
    // SAFETY: the closure runs in the child between fork and exec and makes only
    // async-signal-safe calls (dup2, fcntl) on fds that are open in the child.
    unsafe {
        cmd.pre_exec(move || {
            if fd == target {
                // dup2 onto itself keeps FD_CLOEXEC: clear it instead.
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
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
        let line = kernel_cmdline(&spec, false, None).unwrap();
        assert!(line.starts_with(guest_cmdline::BASE), "{line}");
        assert!(line.contains(" twinbox.job="), "{line}");
        let a = args(&spec, Path::new("/vmlinux"), &line, Accel::Kvm, None);
        assert!(!a.iter().any(|x| x.contains("netdev")));
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
        assert!(kernel_cmdline(&spec, true, None)
            .unwrap()
            .contains(guest_cmdline::PVM_EXTRA));
        spec.cmdline_extra = Some("x".repeat(guest_cmdline::MAX_LEN));
        assert!(kernel_cmdline(&spec, false, None)
            .unwrap_err()
            .contains("kernel command line"));
    }

    #[test]
    fn a_link_is_a_virtio_net_device_on_the_inherited_tap_and_in_the_job() {
        let spec = RunSpec::new("/img.ext4", vec!["/bin/true".into()]);
        let net = NetConfig {
            address: [10, 201, 0, 6].into(),
            prefix_len: 30,
            gateway: [10, 201, 0, 5].into(),
            resolver: None,
        };
        let line = kernel_cmdline(&spec, false, Some(net)).unwrap();
        let token = line.rsplit_once("twinbox.job=").unwrap().1;
        let job = twinbox_spec::proto::Job::decode(token).unwrap();
        assert_eq!(job.net, Some(net));
        assert!(
            job.verbose,
            "without it init prints no closing line to read the status from"
        );
        let a = args(
            &spec,
            Path::new("/k"),
            &line,
            Accel::Tcg,
            Some("02:74:62:00:00:01"),
        );
        assert!(a
            .windows(2)
            .any(|w| w == ["-netdev", "tap,id=net0,fd=3,vhost=off"]));
        assert!(a.windows(2).any(|w| w
            == [
                "-device",
                "virtio-net-device,netdev=net0,mac=02:74:62:00:00:01"
            ]));
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
