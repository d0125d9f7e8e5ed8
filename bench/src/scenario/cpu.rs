//! `cpu`: `sysbench cpu`, events per second.

use super::{argv, number_after, output, tail, Metrics, Scenario};
use crate::metric::{self, Metric};
use crate::runner::{Capabilities, Guest};
use twinbox_spec::RunReport;

/// Its name.
pub const NAME: &str = "cpu";

/// The `cpu` scenario.
pub struct Cpu;

impl Scenario for Cpu {
    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> &'static str {
        "`sysbench cpu --time=3 --threads=1 run` events per second (native runs the \
         host's sysbench, the boxes the image's)."
    }

    fn workload(&self) -> Vec<String> {
        argv(&["sysbench", "cpu", "--time=3", "--threads=1", "run"])
    }

    fn metrics(&self) -> &'static [Metric] {
        &[metric::EVENTS_PER_S]
    }

    fn sits_out(&self, caps: &Capabilities) -> Option<&'static str> {
        (caps.guest == Guest::TinyOnly).then_some("boots only the tiny guest, not the image")
    }

    fn extract(&self, report: &RunReport) -> Result<Metrics, String> {
        let out = output(report);
        let v = number_after(out, "events per second:")
            .ok_or_else(|| format!("no events/s in output: {}", tail(out)))?;
        Ok(Metrics::from([(metric::EVENTS_PER_S.key.into(), v)]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::tests::report;
    use twinbox_spec::BoxKind;

    #[test]
    fn sysbench_output_parses() {
        let cpu = "CPU speed:\n    events per second:  1234.56\n";
        let m = Cpu.extract(&report(BoxKind::Vm, cpu)).unwrap();
        assert_eq!(m["events_per_s"], 1234.56);
        let err = Cpu.extract(&report(BoxKind::Vm, "garbage")).unwrap_err();
        assert!(err.contains("garbage"), "{err}");
    }
}
