//! Peer: Cloud Hypervisor booting the same tiny guest, timed from process start to
//! process exit (Cloud Hypervisor has no twinbox marker device, so no inner phases).
//!
//! Cloud Hypervisor is given the VM on its command line and boots at once:
//!
//! ```text
//! cloud-hypervisor --kernel <spec.kernel> --cpus boot=<spec.vcpus>
//!                  --memory size=<spec.memory_mib>M --serial null --console off
//! ```
//!
//! - `--kernel`: an ELF with a PVH note is booted through it (x86 direct kernel boot).
//! - `--cpus boot=N`, `--memory size=NM`: the same vCPUs and memory as every other box.
//! - `--serial null --console off`: the tiny guest prints nothing, and its defaults
//!   (`--serial null`, `--console tty`) would attach a virtio-console to our stdout; with
//!   the console off there is no virtio device at all, the closest to twinbox's
//!   marker-only VM. No `--cmdline`: the guest has no command-line parser.
//! - No `--api-socket`: none is created. Everything else is the default, seccomp
//!   included. Its log (warnings and errors, on stderr) is captured and shown when a run
//!   fails; it writes no file.
//!
//! How the run ends: the guest writes the marker (Cloud Hypervisor logs "Guest PIO write
//! to unregistered address 0x120" and goes on), then the ACPI S5 byte 0x34 to port 0x600
//! — Cloud Hypervisor's x86 shutdown device, which signals its exit event; the VMM shuts
//! the VM down and the process exits 0. Its i8042 reset would *reboot* the VM instead,
//! which is why the guest powers off through the ACPI port first. (Releases from before
//! the shutdown device moved to 0x600 had it at 0x3c0; those would reboot here and end
//! on the time limit, reported as a failure.)
//!
//! Sources: Cloud Hypervisor `docs/` and README (`--kernel`, `--cpus boot=`, `--memory
//! size=`, `--serial`, `--console` options), `devices/src/acpi.rs` (`AcpiShutdownDevice`:
//! one-byte write, `S5 << 2 | 1 << 5` = shutdown, 1 = reboot), `vmm/src/device_manager.rs`
//! (`add_acpi_devices`: the device at port 0x600), `devices/src/legacy/i8042.rs` and the
//! `vmm/src/lib.rs` control loop (i8042 reset = reboot), `vmm/src/vm.rs` (`pio_write` to an
//! unregistered port only logs).

use super::peer::{executable_file, peer_outcome, peer_report, VMM_NOTE};
use super::Runner;
use std::path::{Path, PathBuf};
use std::process::Command;
use twinbox_spec::{RunReport, RunSpec};

/// Name of this peer in tables.
pub const NAME: &str = "cloud-hypervisor";

/// Cloud Hypervisor runner (used with the tiny guest only).
#[derive(Debug, Clone)]
pub struct CloudHypervisor {
    /// The cloud-hypervisor binary, absolute.
    binary: PathBuf,
}

impl CloudHypervisor {
    /// A runner for the Cloud Hypervisor binary at `path`; one line saying why when it is
    /// not an executable file.
    pub fn new(path: &Path) -> Result<Self, String> {
        Ok(Self {
            binary: executable_file(path, NAME)?,
        })
    }

    /// The binary this runner starts.
    pub fn binary(&self) -> &Path {
        &self.binary
    }
}

/// Cloud Hypervisor's arguments for `spec`.
pub fn args(spec: &RunSpec) -> Result<Vec<std::ffi::OsString>, String> {
    let kernel = spec
        .kernel
        .as_ref()
        .ok_or("cloud-hypervisor peer needs a kernel")?;
    Ok(vec![
        "--kernel".into(),
        kernel.as_os_str().to_owned(),
        "--cpus".into(),
        format!("boot={}", spec.vcpus).into(),
        "--memory".into(),
        format!("size={}M", spec.memory_mib).into(),
        "--serial".into(),
        "null".into(),
        "--console".into(),
        "off".into(),
    ])
}

impl Runner for CloudHypervisor {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> super::Capabilities {
        super::TINY_GUEST_VMM
    }

    fn run(&self, spec: &RunSpec) -> Result<RunReport, String> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(args(spec)?);
        let done = super::peer::run_vmm_process(cmd, spec)?;
        Ok(peer_report(NAME, done, VMM_NOTE, |o, out| {
            peer_outcome(NAME, o, out)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::peer::tests::{script, tiny_spec};
    use crate::runner::peer::RunDir;
    use twinbox_spec::{BoxKind, Outcome};

    #[test]
    fn argv_carries_kernel_vcpus_memory_and_quiet_consoles() {
        let spec = tiny_spec(Path::new("/cache/tiny-guest.elf"));
        assert_eq!(
            args(&spec).unwrap(),
            [
                "--kernel",
                "/cache/tiny-guest.elf",
                "--cpus",
                "boot=2",
                "--memory",
                "size=128M",
                "--serial",
                "null",
                "--console",
                "off",
            ]
        );
        let mut no_kernel = spec;
        no_kernel.kernel = None;
        assert!(args(&no_kernel).is_err());
    }

    #[test]
    fn new_rejects_missing_and_non_executable_files() {
        let dir = RunDir::create("ch-test").unwrap();
        let e = CloudHypervisor::new(&dir.path().join("cloud-hypervisor")).unwrap_err();
        assert!(e.starts_with("cloud-hypervisor binary "), "{e}");
        assert!(e.contains("no such file") && !e.contains('\n'), "{e}");
        let plain = script(dir.path(), "plain", "exit 0", 0o600);
        let e = CloudHypervisor::new(&plain).unwrap_err();
        assert!(e.contains("not executable") && !e.contains('\n'), "{e}");
        let ok = script(dir.path(), "ch", "exit 0", 0o700);
        assert_eq!(CloudHypervisor::new(&ok).unwrap().binary(), ok);
    }

    /// The fake cloud-hypervisor echoes its arguments, then exits with the status given.
    fn fake(dir: &Path, status: u8) -> CloudHypervisor {
        let body = format!("echo \"args: $*\"; echo boom >&2; exit {status}");
        CloudHypervisor::new(&script(dir, &format!("ch-{status}"), &body, 0o755)).unwrap()
    }

    #[test]
    fn exit_zero_is_success() {
        let dir = RunDir::create("ch-test").unwrap();
        let report = fake(dir.path(), 0)
            .run(&tiny_spec(Path::new("/k/tiny.elf")))
            .unwrap();
        assert_eq!(report.outcome, Outcome::Exited(0));
        assert_eq!(report.box_kind, BoxKind::Peer("cloud-hypervisor".into()));
        assert!(report.timeline.is_ordered());
        let out = report.output.as_deref().unwrap();
        assert!(
            out.contains("args: --kernel /k/tiny.elf --cpus boot=2 --memory size=128M"),
            "{out}"
        );
    }

    #[test]
    fn non_zero_exit_fails_with_the_output() {
        let dir = RunDir::create("ch-test").unwrap();
        let report = fake(dir.path(), 3)
            .run(&tiny_spec(Path::new("/k/tiny.elf")))
            .unwrap();
        match &report.outcome {
            Outcome::Failed(why) => {
                assert!(
                    why.starts_with("cloud-hypervisor ended with Exited(3)"),
                    "{why}"
                );
                assert!(
                    why.contains("boom") && why.contains("--console off"),
                    "{why}"
                );
            }
            other => panic!("expected Failed, got {other:?}"),
        }
    }
}
