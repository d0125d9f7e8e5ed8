//! Peer: QEMU's `microvm` machine booting the same tiny guest, timed from process start
//! to process exit (QEMU has no twinbox marker device, so no inner phases).
//!
//! QEMU ignores the write to the unknown marker port, then the i8042 reset (an `i8042`
//! device is added: microvm has none) makes it exit because of `-no-reboot`.

use super::{process, Runner};
use std::path::PathBuf;
use std::process::Command;
use twinbox_spec::{BoxKind, Outcome, RunReport, RunSpec};

/// Name of this peer in tables.
pub const NAME: &str = "qemu-microvm";

/// QEMU microvm runner (used with the tiny guest only).
pub struct QemuMicrovm {
    /// The qemu-system-x86_64 binary.
    pub qemu: PathBuf,
}

impl QemuMicrovm {
    /// Finds `qemu-system-x86_64` in PATH.
    pub fn find() -> Option<Self> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|p| p.is_file())
            .map(|qemu| Self { qemu })
    }
}

impl Runner for QemuMicrovm {
    fn name(&self) -> &str {
        NAME
    }

    fn run(&self, spec: &RunSpec) -> Result<RunReport, String> {
        let kernel = spec.kernel.as_ref().ok_or("qemu peer needs a kernel")?;
        let mut cmd = Command::new(&self.qemu);
        cmd.args([
            "-M",
            "microvm",
            "-enable-kvm",
            "-cpu",
            "host,arch-capabilities=off",
            "-m",
            &spec.memory_mib.to_string(),
            "-smp",
            &spec.vcpus.to_string(),
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            // microvm has no keyboard controller of its own; without one the guest's
            // reset request goes nowhere and QEMU never exits.
            "-device",
            "i8042",
            "-kernel",
        ]);
        cmd.arg(kernel);
        let done = process::run(cmd, spec.spawn_ns, true, spec.time_limit)?;
        let outcome = match done.outcome {
            Outcome::Exited(0) => Outcome::Exited(0),
            other => Outcome::Failed(format!(
                "qemu ended with {other:?}: {}",
                done.output.as_deref().unwrap_or("").trim()
            )),
        };
        Ok(RunReport {
            box_kind: BoxKind::Peer(NAME.into()),
            outcome,
            timeline: done.timeline,
            output: done.output,
            usage: done.usage,
            notes: vec![
                "process start to process exit; peak RSS includes guest RAM touched".into(),
            ],
        })
    }
}
