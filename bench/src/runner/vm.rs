//! The microVM box: twinbox's own VMM (`vmm::run_until`), in this process (see
//! [`super::marginal_rss`] for its peak RSS). The bench's interrupt eventfd stops a run in
//! progress, so Ctrl-C does not wait for a VM that will only end at its time limit.

use super::{Capabilities, DiskAt, Guest, Instance, Runner, TimeLimit};
use twinbox_spec::{RunReport, RunSpec};
use vmm_sys_util::eventfd::EventFd;

/// Name of this box in tables and on the command line.
pub const NAME: &str = "vm";

/// What twinbox's VM can do.
pub const CAPABILITIES: Capabilities = Capabilities {
    guest: Guest::Kernel,
    memory_in_report: true,
    instance: Some(Instance::TwinboxVm),
    disk_at: Some(DiskAt::VirtioBlk),
    host_binaries: false,
    time_limit: TimeLimit::Vm,
};

/// twinbox microVM runner.
pub struct Vm {
    /// Written to when the bench is interrupted.
    pub stop: Option<EventFd>,
}

impl Runner for Vm {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn run(&self, spec: &RunSpec) -> Result<RunReport, String> {
        super::marginal_rss(|| {
            vmm::run_until(spec, self.stop.as_ref()).map_err(|e| format!("vmm: {e}"))
        })
    }
}
