//! The boxes a scenario runs in. Each takes the same [`RunSpec`] and returns a
//! [`RunReport`] with host-stamped phases, or a reason it could not run at all.

use twinbox_spec::{RunReport, RunSpec};

pub mod container;
pub mod native;
pub mod peer;
pub mod peer_bwrap;
pub mod peer_cloud_hypervisor;
pub mod peer_firecracker;
pub mod peer_qemu;
pub mod peer_root;
pub mod peer_runc;
pub mod process;
pub mod vm;

/// One box.
pub trait Runner {
    /// The box's name as shown in tables (`native`, `container`, `vm`, `qemu-microvm`).
    fn name(&self) -> &str;
    /// Runs `spec` once. `Err` means the box could not run it at all; a run that ran but
    /// failed is an `Ok` report whose outcome says so.
    fn run(&self, spec: &RunSpec) -> Result<RunReport, String>;
}

/// The boxes `--boxes` accepts.
pub const BOX_NAMES: [&str; 3] = ["native", "container", "vm"];

/// The runner for a box name given on the command line; the VM's run stops early when
/// `stop` is written to.
pub fn by_name(
    name: &str,
    stop: Option<vmm_sys_util::eventfd::EventFd>,
) -> Option<Box<dyn Runner>> {
    match name {
        "native" => Some(Box::new(native::Native)),
        "container" => Some(Box::new(container::Container)),
        "vm" => Some(Box::new(vm::Vm { stop })),
        _ => None,
    }
}

/// Runs an in-process box (VMM or container runtime) so that the peak RSS it reports
/// (`VmHWM` of this process) counts only what the run added.
///
/// The boxes run inside the bench process, so their `runtime_peak_rss_kib` would also
/// hold the bench's own memory. Before the run the peak is reset to the current RSS
/// (`/proc/self/clear_refs`, value 5) and that baseline is subtracted after; if the reset
/// fails the figure is dropped rather than reported wrong. Free heap is first given back
/// to the kernel (`malloc_trim`), or the run would reuse pages earlier runs left resident
/// and seem to cost nothing. Code pages shared with the bench binary are not counted (a
/// standalone twinbox process would have them too).
pub fn marginal_rss(run: impl FnOnce() -> Result<RunReport, String>) -> Result<RunReport, String> {
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe { libc::malloc_trim(0) };
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let baseline = status_kib("VmRSS:");
    let mut report = run()?;
    match (reset, baseline, report.usage.runtime_peak_rss_kib) {
        (true, Some(base), Some(peak)) => {
            report.usage.runtime_peak_rss_kib = Some(peak.saturating_sub(base));
            report.notes.push(format!(
                "runtime_peak_rss_kib: peak RSS the in-process runtime added over the \
                 bench's own {base} KiB"
            ));
        }
        (_, _, None) => {}
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
