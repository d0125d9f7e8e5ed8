//! The container box: twinbox's own container runtime (`container::run`), in this
//! process (see [`super::marginal_rss`] for its peak RSS).

use super::{Capabilities, DiskAt, Guest, Instance, NetAt, Runner, TimeLimit};
use twinbox_spec::{RunReport, RunSpec};

/// Name of this box in tables and on the command line.
pub const NAME: &str = "container";

/// What twinbox's container can do.
pub const CAPABILITIES: Capabilities = Capabilities {
    guest: Guest::None,
    memory_in_report: true,
    instance: Some(Instance::TwinboxCtr),
    disk_at: Some(DiskAt::Bind),
    host_binaries: false,
    time_limit: TimeLimit::Host,
    net: NetAt::Link,
};

/// twinbox container runner.
pub struct Container;

impl Runner for Container {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn run(&self, spec: &RunSpec) -> Result<RunReport, String> {
        super::marginal_rss(|| container::run(spec).map_err(|e| format!("container: {e}")))
    }
}
