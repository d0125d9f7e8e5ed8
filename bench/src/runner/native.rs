//! The baseline: the workload as a plain host process (the host's own binaries, found
//! through PATH), no isolation at all.

use super::{process, Capabilities, DiskAt, Guest, Instance, NetAt, Runner, TimeLimit};
use std::process::Command;
use twinbox_spec::run_spec::OutputMode;
use twinbox_spec::{BoxKind, RunReport, RunSpec};

/// Name of this box in tables and on the command line.
pub const NAME: &str = "native";

/// What a plain host process can do.
pub const CAPABILITIES: Capabilities = Capabilities {
    guest: Guest::None,
    memory_in_report: true,
    instance: Some(Instance::HostProcess),
    disk_at: Some(DiskAt::HostPath),
    host_binaries: true,
    time_limit: TimeLimit::Host,
    net: NetAt::Loopback,
};

/// Host process runner.
pub struct Native;

impl Runner for Native {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn run(&self, spec: &RunSpec) -> Result<RunReport, String> {
        let (program, args) = spec.argv.split_first().ok_or("no command given")?;
        let mut cmd = Command::new(program);
        cmd.args(args);
        // No parent-death signal: the baseline start stays a posix_spawn (see
        // process::run_dying_with).
        let done = process::run_dying_with(
            cmd,
            None,
            spec.spawn_ns,
            spec.output == OutputMode::Capture,
            spec.time_limit,
        )?;
        Ok(RunReport {
            box_kind: BoxKind::Native,
            outcome: done.outcome,
            timeline: done.timeline,
            output: done.output,
            usage: done.usage,
            notes: vec!["host binary from PATH; peak RSS is the process's own".into()],
            network: None,
        })
    }
}
