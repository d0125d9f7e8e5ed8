//! The container box: twinbox's own container runtime (`container::run`), in this
//! process (see [`super::marginal_rss`] for its peak RSS).

use super::Runner;
use twinbox_spec::{RunReport, RunSpec};

/// twinbox container runner.
pub struct Container;

impl Runner for Container {
    fn name(&self) -> &str {
        "container"
    }

    fn run(&self, spec: &RunSpec) -> Result<RunReport, String> {
        super::marginal_rss(|| container::run(spec).map_err(|e| format!("container: {e}")))
    }
}
