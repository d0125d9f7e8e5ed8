//! The baseline: the workload as a plain host process (the host's own binaries, found
//! through PATH), no isolation at all.

use super::{process, Runner};
use std::process::Command;
use twinbox_spec::run_spec::OutputMode;
use twinbox_spec::{BoxKind, RunReport, RunSpec};

/// Host process runner.
pub struct Native;

impl Runner for Native {
    fn name(&self) -> &str {
        "native"
    }

    fn run(&self, spec: &RunSpec) -> Result<RunReport, String> {
        let (program, args) = spec.argv.split_first().ok_or("no command given")?;
        let mut cmd = Command::new(program);
        cmd.args(args);
        let done = process::run(
            cmd,
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
        })
    }
}
