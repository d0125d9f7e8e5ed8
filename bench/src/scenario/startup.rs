//! `startup`: `/bin/true`, spawn → workload exit → teardown, phase by phase.

use super::{argv, ms_to, Metrics, Scenario};
use crate::metric::{self, Metric};
use crate::runner::{Capabilities, Guest};
use twinbox_spec::{Phase, RunReport};

/// Its name.
pub const NAME: &str = "startup";

/// The `startup` scenario.
pub struct Startup;

impl Scenario for Startup {
    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> &'static str {
        "`/bin/true` in each box: host-clock time from the run request (spawn) to the \
         workload's exit and to the end of teardown, with every phase the box reports. \
         Costs differ by box: twinbox's container runs as a call in the bench's own process \
         (`container::run`), so it does not pay the exec and loading of the `twinbox` \
         binary that a `twinbox ctr run` from a shell pays (`twinbox --version`, that start \
         alone: 1.07 ms and 141 page faults on a PVM host), while runc, bwrap and every \
         VMM, twinbox's too, are timed from their process's start. Here twinbox's \
         container, runc and bwrap all get the image already mounted by the bench \
         (twinbox's container holds its shared image mount for the whole bench, while a \
         lone `twinbox ctr run` attaches a loop device and mounts the ext4 itself), and \
         twinbox's container and runc make and remove a cgroup on every run, bwrap none. \
         The vm-snapshot box resumes a VM saved once, before the counted runs, where init \
         waits for its job (`twinbox vm snapshot`): its runs pay the restore (`restored` \
         stands for the kernel boot) and map the saved memory copy-on-write."
    }

    fn workload(&self) -> Vec<String> {
        argv(&["/bin/true"])
    }

    fn metrics(&self) -> &'static [Metric] {
        &[metric::TO_TORN_DOWN_MS, metric::TO_WORKLOAD_EXITED_MS]
    }

    fn sits_out(&self, caps: &Capabilities) -> Option<&'static str> {
        (caps.guest == Guest::TinyOnly).then_some("boots only the tiny guest, not the image")
    }

    fn extract(&self, report: &RunReport) -> Result<Metrics, String> {
        Ok(Metrics::from([
            (
                metric::TO_TORN_DOWN_MS.key.into(),
                ms_to(report, Phase::TornDown)?,
            ),
            (
                metric::TO_WORKLOAD_EXITED_MS.key.into(),
                ms_to(report, Phase::WorkloadExited)?,
            ),
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::tests::report;
    use twinbox_spec::BoxKind;

    #[test]
    fn times_come_from_the_timeline() {
        let m = Startup.extract(&report(BoxKind::Native, "")).unwrap();
        assert_eq!(m["to_workload_exited_ms"], 2.0);
        assert_eq!(m["to_torn_down_ms"], 3.5);
        let mut r = report(BoxKind::Native, "");
        r.timeline = twinbox_spec::Timeline::starting_at(1);
        assert!(Startup.extract(&r).unwrap_err().contains("torn_down"));
    }
}
