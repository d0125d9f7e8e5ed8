//! The container box: twinbox's own container runtime (`container` crate).

use super::Runner;
use twinbox_spec::{RunReport, RunSpec};

/// twinbox container runner.
pub struct Container;

impl Runner for Container {
    fn name(&self) -> &str {
        "container"
    }

    fn run(&self, _spec: &RunSpec) -> Result<RunReport, String> {
        // The container crate has no `run` yet in this tree; say so rather than measure
        // something else under this name.
        Err("not available: the container runtime (container::run) is not built yet".into())
    }
}
