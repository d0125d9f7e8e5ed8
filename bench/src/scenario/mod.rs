//! The scenarios: what runs in each box and which numbers come out of a run. One module
//! per scenario, each implementing [`Scenario`]; [`ALL`] lists them in the default order.
//!
//! To add a scenario: write a module with a unit struct implementing [`Scenario`] (name,
//! description, workload, the [`crate::metric`] constants it records, which boxes sit it
//! out and why, how its numbers come out of a [`RunReport`]) and add it to [`ALL`].

pub mod cpu;
pub mod density;
pub mod disk;
pub mod membw;
pub mod memory;
pub mod net;
pub mod startup;
pub mod syscall;
pub mod vmm;

pub use cpu::Cpu;
pub use density::Density;
pub use disk::Disk;
pub use membw::Membw;
pub use memory::Memory;
pub use net::Net;
pub use startup::Startup;
pub use syscall::Syscall;
pub use vmm::Vmm;

use crate::metric::Metric;
use crate::runner::{Capabilities, Runner, TimeLimit};
use std::any::Any;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use twinbox_spec::run_spec::OutputMode;
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
    /// The scratch disk of the `disk` scenario (see [`disk`]).
    pub disk: PathBuf,
    /// Instances alive at once in the `density` scenario.
    pub density_instances: u32,
    /// The twinbox binary (the `density` scenario starts instances as processes).
    pub twinbox_exe: PathBuf,
    /// Whether twinbox's VM runs its VMM threads jailed (also `density`'s `vm run`s).
    pub vm_jail: bool,
}

/// Time limit of one native or container run: generous, it only stops a hang.
const HOST_TIME_LIMIT: Duration = Duration::from_secs(120);

/// Measured values by metric key.
pub type Metrics = BTreeMap<String, f64>;

/// What one measurement of a scenario in a box gave.
#[derive(Debug, Default)]
pub struct Measured {
    /// The numbers; empty when the run failed.
    pub metrics: Metrics,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// The box's report, when it produced one.
    pub report: Option<RunReport>,
}

/// Something a scenario keeps alive while it runs (dropped, and so cleaned up, after it).
pub type Guard = Box<dyn Any>;

/// One scenario: what runs, which boxes take part, and which numbers come out.
pub trait Scenario: Sync {
    /// Its name on the command line and in results.
    fn name(&self) -> &'static str;

    /// One paragraph for the report.
    fn description(&self) -> &'static str;

    /// The workload's argv (or what stands for it in the report).
    fn workload(&self) -> Vec<String>;

    /// The metrics shown in the report, headline first.
    fn metrics(&self) -> &'static [Metric];

    /// The metrics the overhead chart shows (box / native), by default the headline.
    fn charted(&self) -> &'static [Metric] {
        &self.metrics()[..1]
    }

    /// Further metrics it records beside [`Scenario::metrics`] (kept in results.json,
    /// not tabled).
    fn recorded(&self) -> &'static [Metric] {
        &[]
    }

    /// Why a box that can do `caps` sits this scenario out; `None` when it takes part.
    fn sits_out(&self, caps: &Capabilities) -> Option<&'static str>;

    /// Whether it boots the tiny guest instead of the kernel and image.
    fn boots_tiny_guest(&self) -> bool {
        false
    }

    /// Sets up what every run needs (e.g. the scratch disk), before the first run.
    fn prepare(&self, _ctx: &Context) -> std::io::Result<Option<Guard>> {
        Ok(None)
    }

    /// Changes the common spec of one run for this scenario (argv, disks).
    fn adjust(&self, _spec: &mut RunSpec, _ctx: &Context, _caps: &Capabilities) {}

    /// The numbers of a successful run (see [`succeeded`]); `Err` with the reason when
    /// they are not in it.
    fn extract(&self, report: &RunReport) -> Result<Metrics, String>;

    /// One measurement in `runner`: by default one run of [`Scenario::spec`], its
    /// numbers through [`Scenario::extract`].
    fn measure(&self, runner: &dyn Runner, ctx: &Context) -> Measured {
        let spec = self.spec(ctx, &runner.capabilities());
        match runner.run(&spec) {
            Ok(mut report) => {
                // Numbers first (fio's JSON is longer than what is kept), then trim.
                let extracted = succeeded(&report).and_then(|()| self.extract(&report));
                trim_output(&mut report);
                match extracted {
                    Ok(metrics) => Measured {
                        metrics,
                        error: None,
                        report: Some(report),
                    },
                    Err(e) => Measured {
                        error: Some(e),
                        report: Some(report),
                        ..Measured::default()
                    },
                }
            }
            Err(e) => Measured {
                error: Some(e),
                ..Measured::default()
            },
        }
    }

    /// The spec of one run in a box that can do `caps`, stamped now.
    fn spec(&self, ctx: &Context, caps: &Capabilities) -> RunSpec {
        let mut spec = RunSpec::new(&ctx.rootfs, self.workload());
        spec.kernel = Some(if self.boots_tiny_guest() {
            ctx.tiny_kernel.clone()
        } else {
            ctx.kernel.clone()
        });
        spec.vcpus = ctx.vcpus;
        spec.memory_mib = ctx.memory_mib;
        spec.output = OutputMode::Capture;
        spec.time_limit = Some(match caps.time_limit {
            TimeLimit::Host => HOST_TIME_LIMIT,
            TimeLimit::Vm => ctx.vm_timeout,
        });
        self.adjust(&mut spec, ctx, caps);
        spec.spawn_ns = twinbox_spec::clock::monotonic_ns();
        spec
    }
}

impl std::fmt::Debug for dyn Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl PartialEq for dyn Scenario {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

/// All scenarios, in the default order.
pub const ALL: [&dyn Scenario; 9] = [
    &Startup, &Vmm, &Cpu, &Memory, &Density, &Membw, &Syscall, &Disk, &Net,
];

/// The scenario called `name`.
pub fn by_name(name: &str) -> Option<&'static dyn Scenario> {
    ALL.into_iter().find(|s| s.name() == name)
}

/// The names of all scenarios, comma-separated, for messages.
pub fn names() -> String {
    ALL.map(|s| s.name()).join(", ")
}

/// Most workload output kept per run in results.json.
const OUTPUT_KEEP: usize = 4096;

/// Cuts the report's output to its last [`OUTPUT_KEEP`] bytes.
fn trim_output(report: &mut RunReport) {
    if let Some(out) = report.output.as_mut() {
        if out.len() > OUTPUT_KEEP {
            let mut cut = out.len() - OUTPUT_KEEP;
            while !out.is_char_boundary(cut) {
                cut += 1;
            }
            *out = format!("[...]{}", &out[cut..]);
        }
    }
}

/// `Ok` when the workload exited 0 with its phases in order; else the reason.
pub fn succeeded(report: &RunReport) -> Result<(), String> {
    match &report.outcome {
        Outcome::Exited(0) => {}
        Outcome::Failed(why) => return Err(why.clone()),
        other => {
            return Err(format!(
                "workload ended with {other:?}; output: {}",
                tail(output(report))
            ))
        }
    }
    if !report.timeline.is_ordered() {
        return Err(format!(
            "phases out of order:\n{}",
            report.timeline.render()
        ));
    }
    Ok(())
}

/// The run's output, empty when none was captured.
fn output(report: &RunReport) -> &str {
    report.output.as_deref().unwrap_or("")
}

/// Milliseconds from spawn to `to` on the run's timeline.
fn ms_to(report: &RunReport, to: Phase) -> Result<f64, String> {
    report
        .timeline
        .between(Phase::Spawn, to)
        .map(|ns| ns as f64 / 1e6)
        .ok_or_else(|| format!("no {to} stamp"))
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

/// The memory figures every box that reports them gives: host memory of the instance, and
/// the runtime's or VMM's own peak RSS and PSS (guest RAM excluded), MiB; those it lacks
/// are left out.
fn memory_metrics(report: &RunReport) -> Metrics {
    let u = &report.usage;
    [
        (crate::metric::HOST_MEMORY_MIB, memory_kib(report)),
        (crate::metric::RUNTIME_RSS_MIB, u.runtime_peak_rss_kib),
        (crate::metric::RUNTIME_PSS_MIB, u.runtime_peak_pss_kib),
    ]
    .into_iter()
    .filter_map(|(m, kib)| Some((m.key.to_string(), kib? as f64 / 1024.0)))
    .collect()
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

/// `argv` as owned strings.
fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::runner::{self, Guest};
    use twinbox_spec::{BoxKind, Timeline, Usage};

    /// A successful report: workload exited 2 ms and torn down 3.5 ms after spawn.
    pub(crate) fn report(kind: BoxKind, output: &str) -> RunReport {
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
                runtime_peak_pss_kib: Some(1536),
                guest_memory_touched_kib: Some(1024),
                cgroup_memory_peak_kib: Some(512),
                ..Usage::default()
            },
            notes: vec![],
            network: None,
        }
    }

    pub(crate) fn ctx() -> Context {
        Context {
            rootfs: "/img".into(),
            kernel: "/vmlinux".into(),
            tiny_kernel: "/tiny".into(),
            vcpus: 2,
            memory_mib: 64,
            vm_timeout: Duration::from_secs(7),
            microbench: "/beside/twinbox-microbench".into(),
            disk: "/scratch.img".into(),
            density_instances: 3,
            twinbox_exe: PathBuf::from("/usr/bin/twinbox"),
            vm_jail: true,
        }
    }

    /// Every box the bench knows, by name, with what it can do.
    pub(crate) fn every_box() -> [(&'static str, Capabilities); 8] {
        [
            (runner::native::NAME, runner::native::CAPABILITIES),
            (runner::container::NAME, runner::container::CAPABILITIES),
            (runner::vm::NAME, runner::vm::CAPABILITIES),
            (runner::peer_runc::NAME, runner::peer_runc::CAPABILITIES),
            (runner::peer_bwrap::NAME, runner::PEER_RUNTIME),
            (runner::peer_qemu::NAME, runner::peer_qemu::CAPABILITIES),
            (
                runner::peer_firecracker::NAME,
                runner::peer_firecracker::CAPABILITIES,
            ),
            (runner::peer_cloud_hypervisor::NAME, runner::TINY_GUEST_VMM),
        ]
    }

    fn takes_part(s: &dyn Scenario, box_name: &str) -> bool {
        let (_, caps) = every_box()
            .into_iter()
            .find(|(n, _)| *n == box_name)
            .unwrap();
        s.sits_out(&caps).is_none()
    }

    #[test]
    fn names_round_trip_and_are_unique() {
        for (i, s) in ALL.iter().enumerate() {
            assert_eq!(by_name(s.name()).map(|x| x.name()), Some(s.name()));
            assert!(ALL[i + 1..].iter().all(|o| o.name() != s.name()));
        }
        assert!(by_name("nope").is_none());
        assert_eq!(
            names(),
            "startup, vmm, cpu, memory, density, membw, syscall, disk, net"
        );
    }

    #[test]
    fn every_scenario_declares_itself_fully() {
        for s in ALL {
            assert!(!s.metrics().is_empty(), "{}: no metrics", s.name());
            assert!(
                s.description().len() > 40,
                "{}: description too short",
                s.name()
            );
            assert!(!s.workload().is_empty(), "{}: no workload", s.name());
            for m in s.metrics().iter().chain(s.recorded()) {
                assert!(
                    crate::metric::ALL.contains(m),
                    "{}: {} is not in metric::ALL",
                    s.name(),
                    m.key
                );
            }
            // Native, which can do everything a host process can, and twinbox's VM, which
            // boots a kernel, between them take part in every scenario.
            let native = s.sits_out(&runner::native::CAPABILITIES).is_none();
            let vm = s.sits_out(&runner::vm::CAPABILITIES).is_none();
            // Until the VMM wires virtio-net, the VM has no network and says so.
            let no_net_yet = s.name() == net::NAME
                && matches!(runner::vm::CAPABILITIES.net, runner::NetAt::Missing(_));
            assert!(vm || no_net_yet, "{}: twinbox's VM sits out", s.name());
            for m in s.charted() {
                assert!(
                    s.metrics().contains(m),
                    "{}: charts {} untabled",
                    s.name(),
                    m.key
                );
            }
            assert!(
                native || s.boots_tiny_guest(),
                "{}: native sits out",
                s.name()
            );
        }
    }

    #[test]
    fn who_sits_out_what_and_says_why() {
        let table: Vec<(&str, Vec<&str>)> = ALL
            .iter()
            .map(|s| {
                let boxes = every_box()
                    .into_iter()
                    .filter(|(_, caps)| s.sits_out(caps).is_none())
                    .map(|(n, _)| n)
                    .collect();
                (s.name(), boxes)
            })
            .collect();
        let image = [
            "native",
            "container",
            "vm",
            "runc",
            "bwrap",
            "qemu-microvm",
            "firecracker",
        ];
        let expected: Vec<(&str, Vec<&str>)> = vec![
            ("startup", image.to_vec()),
            (
                "vmm",
                vec!["vm", "qemu-microvm", "firecracker", "cloud-hypervisor"],
            ),
            ("cpu", image.to_vec()),
            (
                "memory",
                vec!["native", "container", "vm", "qemu-microvm", "firecracker"],
            ),
            ("density", vec!["native", "container", "vm"]),
            ("membw", image.to_vec()),
            ("syscall", image.to_vec()),
            ("disk", image.to_vec()),
            (
                "net",
                vec![
                    "native",
                    "container",
                    "vm",
                    "runc",
                    "qemu-microvm",
                    "firecracker",
                ],
            ),
        ];
        assert_eq!(table, expected);
        for s in ALL {
            for (name, caps) in every_box() {
                if let Some(why) = s.sits_out(&caps) {
                    assert!(why.len() > 10, "{} / {name}: reason {why:?}", s.name());
                }
            }
        }
        assert!(takes_part(&Cpu, "firecracker"));
        assert!(!takes_part(&Cpu, "cloud-hypervisor"));
        assert!(takes_part(&Disk, "bwrap"));
    }

    #[test]
    fn extracted_numbers_are_the_declared_ones() {
        let outputs = [
            (&Startup as &dyn Scenario, ""),
            (&Vmm, ""),
            (&Cpu, "    events per second:  1234.56\n"),
            (&Memory, ""),
            (&Membw, "2048.00 MiB transferred (9876.54 MiB/sec)\n"),
            (
                &Syscall,
                "syscall_ns: 61.5\nfork_us: 90.1\nexec_us: 400.2\n",
            ),
            (&Disk, disk::tests::FIO_JSON),
        ];
        for (s, out) in outputs {
            let m = s.extract(&report(BoxKind::Vm, out)).unwrap();
            let declared: Vec<&str> = s
                .metrics()
                .iter()
                .chain(s.recorded())
                .map(|m| m.key)
                .collect();
            for k in m.keys() {
                assert!(
                    declared.contains(&k.as_str()),
                    "{}: {k} undeclared",
                    s.name()
                );
            }
            for d in s.metrics() {
                assert!(m.contains_key(d.key), "{}: {} missing", s.name(), d.key);
            }
        }
    }

    #[test]
    fn failures_carry_their_reason() {
        let mut r = report(BoxKind::Vm, "");
        r.outcome = Outcome::Failed("time limit of 5.0 s reached".into());
        assert_eq!(succeeded(&r).unwrap_err(), "time limit of 5.0 s reached");
        r.outcome = Outcome::Exited(1);
        assert!(succeeded(&r).unwrap_err().contains("Exited(1)"));
        let mut r = report(BoxKind::Vm, "");
        r.timeline.record(Phase::SandboxReady, 9_000_000);
        assert!(succeeded(&r).unwrap_err().contains("out of order"));
    }

    #[test]
    fn spec_follows_the_box() {
        let c = ctx();
        let native = Startup.spec(&c, &runner::native::CAPABILITIES);
        assert_eq!(native.time_limit, Some(HOST_TIME_LIMIT));
        assert_eq!(native.kernel.as_deref(), Some(c.kernel.as_path()));
        assert_eq!(native.vcpus, 2);
        assert_eq!(native.memory_mib, 64);
        assert_eq!(native.output, OutputMode::Capture);
        let vm = Vmm.spec(&c, &runner::vm::CAPABILITIES);
        assert_eq!(vm.time_limit, Some(c.vm_timeout));
        assert_eq!(vm.kernel.as_deref(), Some(c.tiny_kernel.as_path()));
        assert!(vm.spawn_ns > 0);
        assert_eq!(runner::TINY_GUEST_VMM.guest, Guest::TinyOnly);
    }

    #[test]
    fn long_output_is_cut_from_the_front() {
        let mut r = report(BoxKind::Native, &"é".repeat(3000));
        trim_output(&mut r);
        let out = r.output.unwrap();
        assert!(out.starts_with("[...]"));
        assert!(out.len() <= OUTPUT_KEEP + 8);
    }
}
