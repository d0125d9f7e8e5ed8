//! The scenarios: what runs in each box and which numbers come out of a run.

use crate::results::MetricDef;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use twinbox_spec::run_spec::{DiskSpec, OutputMode};
use twinbox_spec::{Outcome, Phase, RunReport, RunSpec};

/// Everything a scenario needs to build a run.
#[derive(Clone, Debug)]
pub struct Context {
    /// The root filesystem image.
    pub rootfs: PathBuf,
    /// The guest kernel (vmlinux).
    pub kernel: PathBuf,
    /// The tiny PVH guest (see [`crate::tiny_guest`]).
    pub tiny_kernel: PathBuf,
    /// vCPUs / CPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u32,
    /// Time limit of one VM or peer run.
    pub vm_timeout: Duration,
    /// The host copy of the image's `twinbox-microbench` (native runs of `syscall`).
    pub microbench: PathBuf,
    /// The scratch disk of the `disk` scenario (see [`crate::disk`]).
    pub disk: PathBuf,
    /// Instances alive at once in the `density` scenario.
    pub density_instances: u32,
    /// The twinbox binary (the `density` scenario starts instances as processes).
    pub twinbox_exe: PathBuf,
}

/// Time limit of one native or container run: generous, it only stops a hang.
const HOST_TIME_LIMIT: Duration = Duration::from_secs(120);

/// A scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// `/bin/true`: spawn → workload exit → teardown, phase by phase.
    Startup,
    /// The VMM alone: the tiny guest, no guest kernel.
    Vmm,
    /// `sysbench cpu`: events per second.
    Cpu,
    /// Host memory cost of one idle instance.
    Memory,
    /// `sysbench memory`: memory bandwidth.
    Membw,
    /// Host memory per instance with several instances alive at once.
    Density,
    /// `twinbox-microbench`: system call, fork and exec cost.
    Syscall,
    /// fio on an extra disk: 4k random and 1M sequential reads, O_DIRECT.
    Disk,
}

impl Scenario {
    /// All scenarios, in the default order.
    pub const ALL: [Scenario; 8] = [
        Scenario::Startup,
        Scenario::Vmm,
        Scenario::Cpu,
        Scenario::Memory,
        Scenario::Density,
        Scenario::Membw,
        Scenario::Syscall,
        Scenario::Disk,
    ];

    /// The scenario called `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Its name on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Startup => "startup",
            Scenario::Vmm => "vmm",
            Scenario::Cpu => "cpu",
            Scenario::Memory => "memory",
            Scenario::Membw => "membw",
            Scenario::Density => "density",
            Scenario::Syscall => "syscall",
            Scenario::Disk => "disk",
        }
    }

    /// One paragraph for the report.
    pub fn description(self) -> &'static str {
        match self {
            Scenario::Startup => {
                "`/bin/true` in each box: host-clock time from the run request (spawn) to the \
                 workload's exit and to the end of teardown, with every phase the box reports."
            }
            Scenario::Vmm => {
                "The VMM's own cost, free of guest-kernel time: a 232-byte PVH guest that \
                 reports exit 0 on the marker port, asks for ACPI S5 power-off on port 0x600 \
                 (Cloud Hypervisor's shutdown port) and resets through the i8042; spawn → \
                 torn_down, and the host memory of that instance (VMM peak RSS over the \
                 bench's baseline + guest memory touched). Peers (QEMU microvm, Firecracker, \
                 Cloud Hypervisor) boot the same file, timed process start → exit (their RSS \
                 is sampled every 10 ms, a lower bound)."
            }
            Scenario::Cpu => {
                "`sysbench cpu --time=3 --threads=1 run` events per second (native runs the \
                 host's sysbench, the boxes the image's)."
            }
            Scenario::Memory => {
                "Host memory cost of one idle instance running `sleep 1`: native = the \
                 process's peak RSS; vm = VMM peak RSS (guest RAM excluded) + guest memory \
                 touched; container = cgroup memory peak + runtime peak RSS."
            }
            Scenario::Membw => {
                "`sysbench memory --memory-block-size=1M --memory-total-size=2G run` MiB/s."
            }
            Scenario::Density => {
                "Host memory per instance when several are alive at once: K instances of \
                 `sleep 2` are started together as separate processes (`sleep`, `twinbox ctr \
                 run`, `twinbox vm run`) while the host's MemAvailable is sampled every 5 ms. \
                 Per instance = (median before + median after) / 2 − median over the middle \
                 half of their lifetime, / K. Unlike `memory` this counts everything an \
                 instance costs the host, but MemAvailable treats page cache as available: \
                 the image pages a loop device caches while a container runs raise it, so \
                 the figure can even be negative. `memfree_mib_per_instance` is the same \
                 computation on MemFree, which counts that cache as taken. Other activity on \
                 the host adds noise of a few MiB (divided by K)."
            }
            Scenario::Syscall => {
                "`twinbox-microbench` (a static binary in the image; native runs the same \
                 file from beside the image): mean cost of `syscall(SYS_getppid)`, of \
                 fork + `_exit` + wait, and of fork + exec of itself + wait, each repeated \
                 for at least 0.5 s."
            }
            Scenario::Disk => {
                "fio, O_DIRECT, psync, queue depth 1: 4 KiB random reads, then 1 MiB \
                 sequential reads, 2 s each, over a 256 MiB file of random bytes that the \
                 bench writes once. Native reads the file, the container a read-only bind \
                 mount of it (`/mnt/disk0`), the VM a read-only virtio-blk disk (`/dev/vdb`). \
                 O_DIRECT skips the guest's page cache but not the host's: twinbox's \
                 virtio-blk reads the file with buffered I/O (as Firecracker does by \
                 default), so VM reads may be served from host memory where native and \
                 container reads go to the device."
            }
        }
    }

    /// The workload's argv.
    pub fn workload(self) -> Vec<String> {
        let v: &[&str] = match self {
            Scenario::Startup => &["/bin/true"],
            Scenario::Vmm => &["(tiny PVH guest)"],
            Scenario::Cpu => &["sysbench", "cpu", "--time=3", "--threads=1", "run"],
            Scenario::Memory => &["sleep", "1"],
            Scenario::Membw => &[
                "sysbench",
                "memory",
                "--memory-block-size=1M",
                "--memory-total-size=2G",
                "run",
            ],
            Scenario::Density => &["sleep", "2"],
            Scenario::Syscall => &["twinbox-microbench"],
            Scenario::Disk => return crate::disk::fio_argv(crate::disk::DISK_PLACEHOLDER),
        };
        v.iter().map(|s| s.to_string()).collect()
    }

    /// The metrics, headline first.
    pub fn metrics(self) -> Vec<MetricDef> {
        let m = |key: &str, unit: &str, higher_is_better| MetricDef {
            key: key.into(),
            unit: unit.into(),
            higher_is_better,
        };
        match self {
            Scenario::Startup => vec![
                m("to_torn_down_ms", "ms", false),
                m("to_workload_exited_ms", "ms", false),
            ],
            Scenario::Vmm => vec![
                m("to_torn_down_ms", "ms", false),
                m("to_workload_exited_ms", "ms", false),
                m("host_memory_mib", "MiB", false),
            ],
            Scenario::Cpu => vec![m("events_per_s", "events/s", true)],
            Scenario::Memory => vec![m("host_memory_mib", "MiB", false)],
            Scenario::Membw => vec![m("mib_per_s", "MiB/s", true)],
            Scenario::Density => vec![
                m("mib_per_instance", "MiB", false),
                m("memfree_mib_per_instance", "MiB", false),
            ],
            Scenario::Syscall => vec![
                m("syscall_ns", "ns", false),
                m("fork_us", "µs", false),
                m("exec_us", "µs", false),
            ],
            Scenario::Disk => vec![
                m("randread_4k_iops", "IOPS", true),
                m("seqread_1m_mib_s", "MiB/s", true),
            ],
        }
    }

    /// Whether `box_name` takes part: the tiny guest only boots in VMMs; QEMU also boots
    /// the image's workloads, Firecracker and Cloud Hypervisor only the tiny guest; peer
    /// runtimes and QEMU sit out the memory scenarios (their own process is not where
    /// their instance's memory is, so the figure would not be comparable).
    pub fn applies_to(self, box_name: &str) -> bool {
        use crate::runner::{
            peer_bwrap, peer_cloud_hypervisor, peer_firecracker, peer_qemu, peer_runc,
        };
        let vmm_only = [peer_firecracker::NAME, peer_cloud_hypervisor::NAME].contains(&box_name);
        let peer =
            vmm_only || [peer_qemu::NAME, peer_runc::NAME, peer_bwrap::NAME].contains(&box_name);
        match self {
            Scenario::Vmm => box_name == "vm" || box_name == peer_qemu::NAME || vmm_only,
            Scenario::Memory | Scenario::Density => !peer,
            _ => !vmm_only,
        }
    }

    /// The spec of one run in `box_name`, stamped now.
    pub fn spec(self, ctx: &Context, box_name: &str) -> RunSpec {
        let mut spec = RunSpec::new(&ctx.rootfs, self.workload());
        spec.kernel = Some(match self {
            Scenario::Vmm => ctx.tiny_kernel.clone(),
            _ => ctx.kernel.clone(),
        });
        spec.vcpus = ctx.vcpus;
        spec.memory_mib = ctx.memory_mib;
        spec.output = OutputMode::Capture;
        spec.time_limit = Some(if box_name == "native" || box_name == "container" {
            HOST_TIME_LIMIT
        } else {
            ctx.vm_timeout
        });
        match self {
            Scenario::Syscall if box_name == "native" => {
                spec.argv[0] = ctx.microbench.display().to_string();
            }
            Scenario::Disk => {
                spec.argv = crate::disk::fio_argv(&crate::disk::disk_path_in(box_name, &ctx.disk));
                spec.disks = vec![DiskSpec {
                    path: ctx.disk.clone(),
                    read_only: true,
                }];
            }
            _ => {}
        }
        spec.spawn_ns = twinbox_spec::clock::monotonic_ns();
        spec
    }

    /// The numbers of a run; `Err` with the reason when it did not succeed.
    pub fn extract(self, report: &RunReport) -> Result<BTreeMap<String, f64>, String> {
        match &report.outcome {
            Outcome::Exited(0) => {}
            Outcome::Failed(why) => return Err(why.clone()),
            other => {
                return Err(format!(
                    "workload ended with {other:?}; output: {}",
                    tail(report.output.as_deref().unwrap_or(""))
                ))
            }
        }
        if !report.timeline.is_ordered() {
            return Err(format!(
                "phases out of order:\n{}",
                report.timeline.render()
            ));
        }
        let output = report.output.as_deref().unwrap_or("");
        let ms = |to: Phase| {
            report
                .timeline
                .between(Phase::Spawn, to)
                .map(|ns| ns as f64 / 1e6)
                .ok_or_else(|| format!("no {to} stamp"))
        };
        let mut out = BTreeMap::new();
        match self {
            Scenario::Startup | Scenario::Vmm => {
                out.insert("to_torn_down_ms".into(), ms(Phase::TornDown)?);
                out.insert("to_workload_exited_ms".into(), ms(Phase::WorkloadExited)?);
                if self == Scenario::Vmm {
                    // Optional: a peer that exited before its RSS was sampled has none.
                    if let Some(kib) = memory_kib(report) {
                        out.insert("host_memory_mib".into(), kib as f64 / 1024.0);
                    }
                }
            }
            Scenario::Cpu => {
                let v = number_after(output, "events per second:")
                    .ok_or_else(|| format!("no events/s in output: {}", tail(output)))?;
                out.insert("events_per_s".into(), v);
            }
            Scenario::Memory => {
                let kib = memory_kib(report).ok_or("the box reported no memory usage")?;
                out.insert("host_memory_mib".into(), kib as f64 / 1024.0);
            }
            Scenario::Membw => {
                // "2048.00 MiB transferred (9876.54 MiB/sec)"
                let v = output
                    .split('(')
                    .filter_map(|s| s.split_once(" MiB/sec)"))
                    .find_map(|(n, _)| n.trim().parse::<f64>().ok())
                    .ok_or_else(|| format!("no MiB/sec in output: {}", tail(output)))?;
                out.insert("mib_per_s".into(), v);
            }
            Scenario::Density => {
                return Err("density runs K instances at once; see crate::density".into())
            }
            Scenario::Syscall => {
                for key in ["syscall_ns", "fork_us", "exec_us"] {
                    let v = number_after(output, &format!("{key}:"))
                        .ok_or_else(|| format!("no {key} in output: {}", tail(output)))?;
                    out.insert(key.into(), v);
                }
            }
            Scenario::Disk => out.extend(crate::disk::parse_fio(output)?),
        }
        Ok(out)
    }
}

/// Host memory of one instance, KiB: container = cgroup peak + runtime peak RSS;
/// others = runtime peak RSS + guest memory touched (none for a process).
fn memory_kib(report: &RunReport) -> Option<u64> {
    let u = &report.usage;
    match report.box_kind {
        twinbox_spec::BoxKind::Container => u
            .cgroup_memory_peak_kib
            .map(|c| c + u.runtime_peak_rss_kib.unwrap_or(0)),
        _ => u
            .runtime_peak_rss_kib
            .map(|r| r + u.guest_memory_touched_kib.unwrap_or(0)),
    }
}

/// The number following `label` on its line.
fn number_after(text: &str, label: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.split_once(label))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
}

/// The last few hundred bytes of a text, for error messages.
fn tail(text: &str) -> String {
    let t = text.trim();
    let start = t.char_indices().rev().nth(300).map_or(0, |(i, _)| i);
    t[start..].replace('\n', " | ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinbox_spec::{BoxKind, Timeline, Usage};

    fn report(kind: BoxKind, output: &str) -> RunReport {
        let mut timeline = Timeline::starting_at(1_000_000);
        timeline.record(Phase::WorkloadExited, 3_000_000);
        timeline.record(Phase::TornDown, 4_500_000);
        RunReport {
            box_kind: kind,
            outcome: Outcome::Exited(0),
            timeline,
            output: Some(output.into()),
            usage: Usage {
                runtime_peak_rss_kib: Some(2048),
                guest_memory_touched_kib: Some(1024),
                cgroup_memory_peak_kib: Some(512),
                ..Usage::default()
            },
            notes: vec![],
        }
    }

    #[test]
    fn names_round_trip() {
        for s in Scenario::ALL {
            assert_eq!(Scenario::parse(s.name()), Some(s));
        }
        assert_eq!(Scenario::parse("nope"), None);
    }

    #[test]
    fn startup_times_come_from_the_timeline() {
        let m = Scenario::Startup
            .extract(&report(BoxKind::Native, ""))
            .unwrap();
        assert_eq!(m["to_workload_exited_ms"], 2.0);
        assert_eq!(m["to_torn_down_ms"], 3.5);
    }

    #[test]
    fn sysbench_outputs_parse() {
        let cpu = "CPU speed:\n    events per second:  1234.56\n";
        let m = Scenario::Cpu.extract(&report(BoxKind::Vm, cpu)).unwrap();
        assert_eq!(m["events_per_s"], 1234.56);
        let mem = "Total operations: 2048\n\n2048.00 MiB transferred (9876.54 MiB/sec)\n";
        let m = Scenario::Membw.extract(&report(BoxKind::Vm, mem)).unwrap();
        assert_eq!(m["mib_per_s"], 9876.54);
        assert!(Scenario::Cpu
            .extract(&report(BoxKind::Vm, "garbage"))
            .is_err());
    }

    #[test]
    fn memory_cost_depends_on_the_box() {
        let vm = Scenario::Memory.extract(&report(BoxKind::Vm, "")).unwrap();
        assert_eq!(vm["host_memory_mib"], 3.0);
        let ctr = Scenario::Memory
            .extract(&report(BoxKind::Container, ""))
            .unwrap();
        assert_eq!(ctr["host_memory_mib"], 2.5);
        let tiny = Scenario::Vmm.extract(&report(BoxKind::Vm, "")).unwrap();
        assert_eq!(tiny["host_memory_mib"], 3.0);
        let mut peer = report(BoxKind::Peer("qemu-microvm".into()), "");
        peer.usage.runtime_peak_rss_kib = None;
        let peer = Scenario::Vmm.extract(&peer).unwrap();
        assert!(!peer.contains_key("host_memory_mib"));
        assert_eq!(peer["to_torn_down_ms"], 3.5);
    }

    #[test]
    fn failures_carry_their_reason() {
        let mut r = report(BoxKind::Vm, "");
        r.outcome = Outcome::Failed("time limit of 5.0 s reached".into());
        assert_eq!(
            Scenario::Startup.extract(&r).unwrap_err(),
            "time limit of 5.0 s reached"
        );
        r.outcome = Outcome::Exited(1);
        assert!(Scenario::Startup.extract(&r).is_err());
    }

    #[test]
    fn tiny_guest_only_boots_in_vmms() {
        assert!(Scenario::Vmm.applies_to("vm"));
        assert!(Scenario::Vmm.applies_to("qemu-microvm"));
        assert!(!Scenario::Vmm.applies_to("native"));
        assert!(Scenario::Cpu.applies_to("container"));
        assert!(Scenario::Cpu.applies_to("qemu-microvm"));
        assert!(!Scenario::Cpu.applies_to("firecracker"));
        assert!(Scenario::Vmm.applies_to("cloud-hypervisor"));
        assert!(!Scenario::Vmm.applies_to("runc"));
        assert!(Scenario::Disk.applies_to("bwrap"));
        assert!(!Scenario::Memory.applies_to("runc"));
        assert!(!Scenario::Density.applies_to("qemu-microvm"));
    }
}
