//! The microVM box: twinbox's own VMM (`vmm::run_with`), in this process (see
//! [`super::marginal_rss`] for its peak RSS), its guest-facing threads in the VMM's jail
//! unless the bench was told otherwise, so the bench measures the VMM as it ships. The
//! bench's interrupt fd ([`twinbox_spec::interrupt::Interrupt::fd`]) stops a run in
//! progress, so Ctrl-C does not wait for a VM that will only end at its time limit.

use super::{Capabilities, DiskAt, Guest, Instance, NetAt, Runner, TimeLimit};
use std::os::fd::OwnedFd;
use twinbox_spec::{RunReport, RunSpec};

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
    // virtio-net over a tap the VMM makes in the host's namespace before its jail.
    net: NetAt::Link,
};

/// twinbox microVM runner.
pub struct Vm {
    /// Readable once the bench is interrupted.
    pub stop: Option<OwnedFd>,
    /// Start the VMM's guest-facing threads in its jail (needs root).
    pub jail: bool,
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
            let options = vmm::RunOptions {
                jail: self.jail,
                // The bench goes on after the run: its thread stays unfiltered.
                lock_caller_thread: false,
                ..vmm::RunOptions::default()
            };
            vmm::run_with(spec, self.stop.as_ref(), options).map_err(|e| format!("vmm: {e}"))
        })
    }
}
