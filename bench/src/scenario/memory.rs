//! `memory`: the host memory cost of one idle instance.

use super::{argv, memory_metrics, Metrics, Scenario};
use crate::metric::{self, Metric};
use crate::runner::{Capabilities, Guest};
use twinbox_spec::RunReport;

/// Its name.
pub const NAME: &str = "memory";

/// The `memory` scenario.
pub struct Memory;

impl Scenario for Memory {
    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> &'static str {
        "Host memory cost of one idle instance running `sleep 1`: native = the \
         process's peak RSS; a VMM (twinbox's `vm run` and every peer VMM alike) = the \
         peak RSS of its process outside guest RAM + guest RAM touched, read from \
         /proc/PID/smaps while it runs and at its exit, with its peak PSS beside; \
         container = cgroup memory peak + runtime peak RSS (over the bench's own)."
    }

    fn workload(&self) -> Vec<String> {
        argv(&["sleep", "1"])
    }

    fn metrics(&self) -> &'static [Metric] {
        &[
            metric::HOST_MEMORY_MIB,
            metric::RUNTIME_RSS_MIB,
            metric::RUNTIME_PSS_MIB,
        ]
    }

    fn sits_out(&self, caps: &Capabilities) -> Option<&'static str> {
        if caps.guest == Guest::TinyOnly {
            return Some("boots only the tiny guest, not the image");
        }
        (!caps.memory_in_report).then_some(
            "its instance is a separate process the bench can only sample from outside \
             (runc's container is not even its child), so its figure would not be \
             comparable",
        )
    }

    fn extract(&self, report: &RunReport) -> Result<Metrics, String> {
        let metrics = memory_metrics(report);
        if !metrics.contains_key(metric::HOST_MEMORY_MIB.key) {
            return Err("the box reported no memory usage".into());
        }
        Ok(metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::tests::report;
    use twinbox_spec::BoxKind;

    #[test]
    fn memory_cost_depends_on_the_box() {
        let vm = Memory.extract(&report(BoxKind::Vm, "")).unwrap();
        assert_eq!(vm["host_memory_mib"], 3.0);
        let ctr = Memory.extract(&report(BoxKind::Container, "")).unwrap();
        assert_eq!(ctr["host_memory_mib"], 2.5);
        let mut none = report(BoxKind::Native, "");
        none.usage.runtime_peak_rss_kib = None;
        assert!(Memory.extract(&none).unwrap_err().contains("no memory"));
    }
}
