//! The container box: twinbox's own container runtime (`container::run`), in this
//! process (see [`super::marginal_rss`] for its peak RSS).
//!
//! The runner holds the image's shared mount (`container::ImageHold`) from its first run
//! until the bench drops it, as the bench pre-mounts the image for runc and bubblewrap
//! (`peer_root.rs`): every run then takes a clone of that mount instead of attaching a
//! loop device and mounting ext4 anew. A lone `twinbox ctr run` pays for both.

use super::{Capabilities, DiskAt, Guest, Instance, NetAt, Runner, TimeLimit};
use std::sync::Mutex;
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
#[derive(Default)]
pub struct Container {
    /// The hold on the image of the latest run (none before the first, or for an OCI
    /// image's layers, which need no mount).
    image: Mutex<Option<container::ImageHold>>,
}

impl Container {
    /// Holds the shared mount of `spec`'s ext4 image, unless it is held already.
    fn hold_image(&self, spec: &RunSpec) -> Result<(), String> {
        if spec.rootfs_layers.is_some() {
            return Ok(());
        }
        let mut held = self.image.lock().unwrap_or_else(|e| e.into_inner());
        if held.as_ref().is_some_and(|h| h.image() == spec.rootfs) {
            return Ok(());
        }
        // Another image: the old hold goes first (its mount too, if it was the last).
        *held = None;
        *held = Some(
            container::ImageHold::acquire(&spec.rootfs)
                .map_err(|e| format!("container: hold the image mount: {e}"))?,
        );
        Ok(())
    }
}

impl Runner for Container {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn run(&self, spec: &RunSpec) -> Result<RunReport, String> {
        self.hold_image(spec)?;
        super::marginal_rss(|| container::run(spec).map_err(|e| format!("container: {e}")))
    }
}
