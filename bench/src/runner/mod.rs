//! The boxes a scenario runs in. Each takes the same [`RunSpec`] and returns a
//! [`RunReport`] with host-stamped phases, or a reason it could not run at all.

use twinbox_spec::{RunReport, RunSpec};

pub mod container;
pub mod footprint;
pub mod native;
pub mod netns;
pub mod peer;
pub mod peer_bwrap;
pub mod peer_cloud_hypervisor;
pub mod peer_firecracker;
pub mod peer_qemu;
pub mod peer_root;
pub mod peer_runc;
pub mod process;
pub mod sweep;
pub mod vm;
pub mod vm_snapshot;

/// One box.
pub trait Runner {
    /// The box's name as shown in tables (`native`, `container`, `vm`, `qemu-microvm`).
    fn name(&self) -> &str;
    /// What the box can do; scenarios decide from this, never from the name, whether and
    /// how it takes part.
    fn capabilities(&self) -> Capabilities;
    /// Runs `spec` once. `Err` means the box could not run it at all; a run that ran but
    /// failed is an `Ok` report whose outcome says so.
    fn run(&self, spec: &RunSpec) -> Result<RunReport, String>;
}

/// What a box runs: host processes, a guest kernel booting the image, or only the tiny
/// guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guest {
    /// No guest: the workload is a process on the host's kernel (native, containers).
    None,
    /// A VMM that boots the guest kernel with the image, and the tiny guest.
    Kernel,
    /// A VMM wired here for the tiny guest only (no image, no disks).
    TinyOnly,
    /// A VMM that resumes a Linux guest saved after booting the image (a snapshot): the
    /// image's workloads, but no other kernel (not the tiny guest).
    Resumed,
}

/// Where the scratch disk of the `disk` scenario appears inside a box.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskAt {
    /// At its host path (no isolation).
    HostPath,
    /// A read-only bind mount at `/mnt/disk0`.
    Bind,
    /// The second virtio-blk disk, `/dev/vdb`.
    VirtioBlk,
}

impl DiskAt {
    /// The path the workload opens for the disk whose host path is `host`.
    pub fn path_inside(self, host: &std::path::Path) -> String {
        match self {
            DiskAt::HostPath => host.display().to_string(),
            DiskAt::Bind => "/mnt/disk0".into(),
            DiskAt::VirtioBlk => "/dev/vdb".into(),
        }
    }
}

/// How a box reaches the network, as the `net` scenario needs to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetAt {
    /// It is the host: servers listen on the host itself, clients reach them over
    /// loopback (the native baseline).
    Loopback,
    /// With `RunSpec::net` it gets `eth0` on a point-to-point link whose other end, its
    /// default gateway, is the host.
    Link,
    /// It cannot get a network; why.
    Missing(&'static str),
}

/// How one instance of a box is started as a host process of its own (the `density`
/// scenario starts K of them at once, as a user would).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Instance {
    /// The workload itself, from the host's PATH.
    HostProcess,
    /// `twinbox ctr run -- <workload>`.
    TwinboxCtr,
    /// `twinbox vm run -- <workload>`.
    TwinboxVm,
    /// `twinbox vm run --snapshot DIR -- <workload>`, all K from one snapshot the scenario
    /// takes before they start.
    TwinboxVmSnapshot,
}

/// Which time limit a run gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeLimit {
    /// A generous fixed limit that only stops a hang (native, twinbox's container).
    Host,
    /// `--vm-timeout` (VMs and peers, which on some hosts never finish).
    Vm,
}

/// What a box can do, as the scenarios need to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// What it runs.
    pub guest: Guest,
    /// Its report's usage holds the host memory of one instance (process RSS, VMM RSS +
    /// guest memory touched, cgroup peak + runtime RSS). False for the peer container
    /// runtimes, whose instance's memory is elsewhere (runc's container is not its child).
    pub memory_in_report: bool,
    /// How `density` starts one instance as its own process; `None` when it cannot.
    pub instance: Option<Instance>,
    /// Where an extra disk appears inside it; `None` when it takes no disks.
    pub disk_at: Option<DiskAt>,
    /// Workloads are the host's binaries, not the image's (`syscall` then runs the
    /// microbench copy published beside the image, so both run identical code).
    pub host_binaries: bool,
    /// Its time limit.
    pub time_limit: TimeLimit,
    /// How it reaches the network.
    pub net: NetAt,
}

/// What every peer VMM that boots only the tiny guest can do (its memory is read from
/// its process, [`process::run_vmm`]).
pub const TINY_GUEST_VMM: Capabilities = Capabilities {
    guest: Guest::TinyOnly,
    memory_in_report: true,
    instance: None,
    disk_at: None,
    host_binaries: false,
    time_limit: TimeLimit::Vm,
    net: NetAt::Missing("boots only the tiny guest, not the image"),
};

/// What the peer container runtimes (runc, bwrap) can do: the image's workloads over the
/// pre-mounted image, disks as binds; they are outside processes, so no memory figure.
/// runc also takes a network namespace with a link ([`peer_runc::CAPABILITIES`]).
pub const PEER_RUNTIME: Capabilities = Capabilities {
    guest: Guest::None,
    memory_in_report: false,
    instance: None,
    disk_at: Some(DiskAt::Bind),
    host_binaries: false,
    time_limit: TimeLimit::Vm,
    net: NetAt::Missing(
        "bubblewrap cannot join a network namespace made for it (--unshare-net gives only lo)",
    ),
};

/// The boxes `--boxes` accepts.
pub const BOX_NAMES: [&str; 4] = [native::NAME, container::NAME, vm::NAME, vm_snapshot::NAME];

/// The runner for a box name given on the command line; the VM boxes run `twinbox` (the
/// binary at `twinbox`) as a process, its VMM threads jailed when `vm_jail`, in its own
/// cgroup when `vm_cgroup`.
pub fn by_name(
    name: &str,
    twinbox: &std::path::Path,
    vm_jail: bool,
    vm_cgroup: bool,
) -> Option<Box<dyn Runner>> {
    match name {
        native::NAME => Some(Box::new(native::Native)),
        container::NAME => Some(Box::new(container::Container::default())),
        vm::NAME => Some(Box::new(vm::Vm {
            twinbox: twinbox.to_path_buf(),
            jail: vm_jail,
            cgroup: vm_cgroup,
        })),
        vm_snapshot::NAME => Some(Box::new(vm_snapshot::VmSnapshot::new(
            twinbox.to_path_buf(),
            vm_jail,
            vm_cgroup,
        ))),
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
    let baseline = twinbox_spec::host::self_status_kib("VmRSS");
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
