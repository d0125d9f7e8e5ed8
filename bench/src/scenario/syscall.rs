//! `syscall`: `twinbox-microbench`, the cost of a system call, a fork and an exec.

use super::{argv, number_after, output, tail, Context, Metrics, Scenario};
use crate::metric::{self, Metric};
use crate::runner::{Capabilities, Guest};
use twinbox_spec::{RunReport, RunSpec};

/// Its name.
pub const NAME: &str = "syscall";

/// The `syscall` scenario.
pub struct Syscall;

/// What the microbench prints, `<key>: <value>` per line.
const PRINTED: [Metric; 3] = [metric::SYSCALL_NS, metric::FORK_US, metric::EXEC_US];

impl Scenario for Syscall {
    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> &'static str {
        "`twinbox-microbench` (a static binary in the image; native runs the same \
         file from beside the image): mean cost of `syscall(SYS_getppid)`, of \
         fork + `_exit` + wait, and of fork + exec of itself + wait, each repeated \
         for at least 0.5 s."
    }

    fn workload(&self) -> Vec<String> {
        argv(&["twinbox-microbench"])
    }

    fn metrics(&self) -> &'static [Metric] {
        &PRINTED
    }

    fn sits_out(&self, caps: &Capabilities) -> Option<&'static str> {
        (caps.guest == Guest::TinyOnly).then_some("boots only the tiny guest, not the image")
    }

    fn adjust(&self, spec: &mut RunSpec, ctx: &Context, caps: &Capabilities) {
        if caps.host_binaries {
            // The host has no microbench of its own: the copy beside the image is the
            // very file the boxes run.
            spec.argv[0] = ctx.microbench.display().to_string();
        }
    }

    fn extract(&self, report: &RunReport) -> Result<Metrics, String> {
        let out = output(report);
        PRINTED
            .iter()
            .map(|m| {
                number_after(out, &format!("{}:", m.key))
                    .map(|v| (m.key.to_string(), v))
                    .ok_or_else(|| format!("no {} in output: {}", m.key, tail(out)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner;
    use crate::scenario::tests::{ctx, report};
    use twinbox_spec::BoxKind;

    #[test]
    fn native_runs_the_copy_beside_the_image() {
        let c = ctx();
        let native = Syscall.spec(&c, &runner::native::CAPABILITIES);
        assert_eq!(native.argv, ["/beside/twinbox-microbench"]);
        let ctr = Syscall.spec(&c, &runner::container::CAPABILITIES);
        assert_eq!(ctr.argv, ["twinbox-microbench"]);
    }

    #[test]
    fn all_three_numbers_or_an_error() {
        let out = "syscall_ns: 61.5\nfork_us: 90.1\nexec_us: 400.2\n";
        let m = Syscall.extract(&report(BoxKind::Container, out)).unwrap();
        assert_eq!(
            (m["syscall_ns"], m["fork_us"], m["exec_us"]),
            (61.5, 90.1, 400.2)
        );
        let err = Syscall
            .extract(&report(BoxKind::Container, "syscall_ns: 1\n"))
            .unwrap_err();
        assert!(err.contains("fork_us"), "{err}");
    }
}
