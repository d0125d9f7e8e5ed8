//! The microVM box: twinbox's own VMM (`vmm::run`), in this process.
//!
//! The VMM runs inside the bench process, so the process's peak RSS that `vmm::run`
//! reports also holds the bench's own memory. Before each run the peak is reset to the
//! current RSS (`/proc/self/clear_refs`, value 5) and that baseline is subtracted after,
//! leaving the memory the VM instance itself added.

use super::Runner;
use twinbox_spec::{RunReport, RunSpec};

/// twinbox microVM runner.
pub struct Vm;

impl Runner for Vm {
    fn name(&self) -> &str {
        "vm"
    }

    fn run(&self, spec: &RunSpec) -> Result<RunReport, String> {
        let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        let baseline = status_kib("VmRSS:");
        let mut report = vmm::run(spec).map_err(|e| format!("vmm: {e}"))?;
        match (reset, baseline, report.usage.runtime_peak_rss_kib) {
            (true, Some(base), Some(peak)) => {
                report.usage.runtime_peak_rss_kib = Some(peak.saturating_sub(base));
                report.notes.push(format!(
                    "runtime_peak_rss_kib: peak RSS added by the in-process VMM over the \
                     bench's own {base} KiB (guest RAM excluded)"
                ));
            }
            _ => {
                report.usage.runtime_peak_rss_kib = None;
                report.notes.push(
                    "runtime_peak_rss_kib dropped: the peak RSS could not be reset, so it \
                     would include the bench process"
                        .into(),
                );
            }
        }
        Ok(report)
    }
}

/// A `/proc/self/status` field in KiB.
fn status_kib(name: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(name))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
