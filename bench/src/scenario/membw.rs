//! `membw`: `sysbench memory`, memory bandwidth.

use super::{argv, output, tail, Metrics, Scenario};
use crate::metric::{self, Metric};
use crate::runner::{Capabilities, Guest};
use twinbox_spec::RunReport;

/// Its name.
pub const NAME: &str = "membw";

/// The `membw` scenario.
pub struct Membw;

impl Scenario for Membw {
    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> &'static str {
        "`sysbench memory --memory-block-size=1M --memory-total-size=2G run` MiB/s."
    }

    fn workload(&self) -> Vec<String> {
        argv(&[
            "sysbench",
            "memory",
            "--memory-block-size=1M",
            "--memory-total-size=2G",
            "run",
        ])
    }

    fn metrics(&self) -> &'static [Metric] {
        &[metric::MIB_PER_S]
    }

    fn sits_out(&self, caps: &Capabilities) -> Option<&'static str> {
        (caps.guest == Guest::TinyOnly).then_some("boots only the tiny guest, not the image")
    }

    fn extract(&self, report: &RunReport) -> Result<Metrics, String> {
        let out = output(report);
        // "2048.00 MiB transferred (9876.54 MiB/sec)"
        let v = out
            .split('(')
            .filter_map(|s| s.split_once(" MiB/sec)"))
            .find_map(|(n, _)| n.trim().parse::<f64>().ok())
            .ok_or_else(|| format!("no MiB/sec in output: {}", tail(out)))?;
        Ok(Metrics::from([(metric::MIB_PER_S.key.into(), v)]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::tests::report;
    use twinbox_spec::BoxKind;

    #[test]
    fn sysbench_output_parses() {
        let mem = "Total operations: 2048\n\n2048.00 MiB transferred (9876.54 MiB/sec)\n";
        let m = Membw.extract(&report(BoxKind::Vm, mem)).unwrap();
        assert_eq!(m["mib_per_s"], 9876.54);
        assert!(Membw.extract(&report(BoxKind::Vm, "(oops)")).is_err());
    }
}
