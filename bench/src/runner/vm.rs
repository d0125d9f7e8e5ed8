//! The microVM box: twinbox's own VMM (`vmm::run_until`), in this process (see
//! [`super::marginal_rss`] for its peak RSS). The bench's interrupt eventfd stops a run in
//! progress, so Ctrl-C does not wait for a VM that will only end at its time limit.

use super::Runner;
use twinbox_spec::{RunReport, RunSpec};
use vmm_sys_util::eventfd::EventFd;

/// twinbox microVM runner.
pub struct Vm {
    /// Written to when the bench is interrupted.
    pub stop: Option<EventFd>,
}

impl Runner for Vm {
    fn name(&self) -> &str {
        "vm"
    }

    fn run(&self, spec: &RunSpec) -> Result<RunReport, String> {
        super::marginal_rss(|| {
            vmm::run_until(spec, self.stop.as_ref()).map_err(|e| format!("vmm: {e}"))
        })
    }
}
