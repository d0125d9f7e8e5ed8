//! The microVM box: twinbox's own VMM (`vmm::run`), in this process (see
//! [`super::marginal_rss`] for its peak RSS).

use super::Runner;
use twinbox_spec::{RunReport, RunSpec};

/// twinbox microVM runner.
pub struct Vm;

impl Runner for Vm {
    fn name(&self) -> &str {
        "vm"
    }

    fn run(&self, spec: &RunSpec) -> Result<RunReport, String> {
        super::marginal_rss(|| vmm::run(spec).map_err(|e| format!("vmm: {e}")))
    }
}
