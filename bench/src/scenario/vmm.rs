//! `vmm`: the VMM alone, booting the tiny guest (no guest kernel), so its own cost is
//! measured even where guest kernels crawl (PVM).

use super::{memory_metrics, ms_to, Metrics, Scenario};
use crate::metric::{self, Metric};
use crate::runner::{Capabilities, Guest};
use twinbox_spec::{Phase, RunReport};

/// Its name.
pub const NAME: &str = "vmm";

/// The `vmm` scenario.
pub struct Vmm;

impl Scenario for Vmm {
    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> &'static str {
        "The VMM's own cost, free of guest-kernel time: a 232-byte PVH guest that \
         reports exit 0 on the marker port, asks for ACPI S5 power-off on port 0x600 \
         (Cloud Hypervisor's shutdown port) and resets through the i8042; spawn → \
         torn_down, and the host memory of that instance. twinbox's VMM runs as \
         `twinbox vm run`, a process like the peers (QEMU microvm, Firecracker, Cloud \
         Hypervisor), which boot the same file, timed process start → exit. No VMM \
         loads an initramfs for it (twinbox loads its own only for a Linux kernel). Every \
         VMM's memory is measured alike: its process's peak RSS and PSS outside guest \
         RAM (/proc/PID/smaps, read every 5 ms and at its exit, so a run of a few \
         milliseconds is read whole) + guest RAM touched."
    }

    fn workload(&self) -> Vec<String> {
        vec!["(tiny PVH guest)".into()]
    }

    fn metrics(&self) -> &'static [Metric] {
        &[
            metric::TO_TORN_DOWN_MS,
            metric::TO_WORKLOAD_EXITED_MS,
            metric::HOST_MEMORY_MIB,
            metric::RUNTIME_RSS_MIB,
            metric::RUNTIME_PSS_MIB,
        ]
    }

    fn sits_out(&self, caps: &Capabilities) -> Option<&'static str> {
        match caps.guest {
            Guest::None => Some("boots no guest: the tiny guest needs a VMM"),
            Guest::Resumed => Some("resumes a saved Linux guest: it boots no other kernel"),
            Guest::Kernel | Guest::TinyOnly => None,
        }
    }

    fn boots_tiny_guest(&self) -> bool {
        true
    }

    fn extract(&self, report: &RunReport) -> Result<Metrics, String> {
        let mut out = Metrics::from([
            (
                metric::TO_TORN_DOWN_MS.key.into(),
                ms_to(report, Phase::TornDown)?,
            ),
            (
                metric::TO_WORKLOAD_EXITED_MS.key.into(),
                ms_to(report, Phase::WorkloadExited)?,
            ),
        ]);
        // Optional: a VMM whose process could not be read has none.
        out.extend(memory_metrics(report));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::tests::report;
    use twinbox_spec::BoxKind;

    #[test]
    fn memory_is_optional_for_peers() {
        let tiny = Vmm.extract(&report(BoxKind::Vm, "")).unwrap();
        assert_eq!(tiny["host_memory_mib"], 3.0);
        let mut peer = report(BoxKind::Peer("qemu-microvm".into()), "");
        peer.usage.runtime_peak_rss_kib = None;
        let peer = Vmm.extract(&peer).unwrap();
        assert!(!peer.contains_key("host_memory_mib"));
        assert_eq!(peer["to_torn_down_ms"], 3.5);
    }
}
