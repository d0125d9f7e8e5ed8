//! `density`: what K instances alive at once cost the host, per instance.
//!
//! The instances are separate processes, started together, as a user would start them:
//! K `sleep`s natively, K `twinbox ctr run -- sleep`, K `twinbox vm run -- sleep`, K
//! `twinbox vm run --snapshot DIR -- sleep` from one snapshot taken before the memory is
//! first sampled (so its memory file, which the K restores map copy-on-write and share
//! through the page cache, is in the baseline, and what each instance adds is what it
//! does not share). While
//! they live, the host's `MemAvailable` is sampled every few milliseconds. The figure is
//! the drop, divided by K, from the mean of the medians just before and just after (which
//! cancels a steady drift of the host's memory) to the median of the samples in the middle
//! half of the instances' lifetime (when all have started and none has ended). It counts
//! everything the kernel has to give an instance (page tables, tmpfs and page cache, the
//! runtime's memory, guest RAM touched), which per-process RSS misses; the price is that
//! anything else the host does at the same time is counted too, hence the median over
//! several runs.

use super::{argv, Context, Measured, Metrics, Scenario};
use crate::metric::{self, Metric};
use crate::runner::vm_snapshot;
use crate::runner::{process, Capabilities, Instance, Runner, TimeLimit};
use nix::sys::signal::Signal;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use twinbox_spec::RunReport;

/// Its name.
pub const NAME: &str = "density";

/// The `density` scenario.
pub struct Density;

impl Scenario for Density {
    fn name(&self) -> &'static str {
        NAME
    }

    fn description(&self) -> &'static str {
        "Host memory per instance when several are alive at once: K instances of \
         `sleep 2` are started together as separate processes (`sleep`, `twinbox ctr \
         run`, `twinbox vm run`, `twinbox vm run --snapshot` of one snapshot taken before \
         the first sample, so the memory file the restores share is not counted per \
         instance) while the host's MemAvailable is sampled every 5 ms. \
         Per instance = (median before + median after) / 2 − median over the middle \
         half of their lifetime, / K. Unlike `memory` this counts everything an \
         instance costs the host, but MemAvailable treats page cache as available: \
         the image pages a loop device caches while a container runs raise it, so \
         the figure can even be negative. `memfree_mib_per_instance` is the same \
         computation on MemFree, which counts that cache as taken. Other activity on \
         the host adds noise of a few MiB (divided by K)."
    }

    fn workload(&self) -> Vec<String> {
        argv(&["sleep", "2"])
    }

    fn metrics(&self) -> &'static [Metric] {
        &[metric::MIB_PER_INSTANCE, metric::MEMFREE_MIB_PER_INSTANCE]
    }

    fn recorded(&self) -> &'static [Metric] {
        &[metric::INSTANCES, metric::BASELINE_AVAILABLE_MIB]
    }

    fn sits_out(&self, caps: &Capabilities) -> Option<&'static str> {
        if caps.instance.is_none() {
            Some("cannot be started as a process of its own, K at once")
        } else if !caps.memory_in_report {
            Some("its instance's memory is not its own process's")
        } else {
            None
        }
    }

    fn extract(&self, _report: &RunReport) -> Result<Metrics, String> {
        Err("density runs K instances at once as processes; it has no single report".into())
    }

    fn measure(&self, runner: &dyn Runner, ctx: &Context) -> Measured {
        match run(&runner.capabilities(), ctx, &self.workload()) {
            Ok(metrics) => Measured {
                metrics,
                ..Measured::default()
            },
            Err(e) => Measured {
                error: Some(e),
                ..Measured::default()
            },
        }
    }
}

/// How often `MemAvailable` is sampled while the instances live.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);

/// The two host counters sampled, KiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemSample {
    /// `MemAvailable`: free memory plus what the kernel could reclaim (clean page cache,
    /// reclaimable slab).
    pub available: u64,
    /// `MemFree`: pages nobody uses, not even the page cache.
    pub free: u64,
}

/// `MemAvailable` and `MemFree` of `/proc/meminfo`.
pub fn sample() -> Result<MemSample, String> {
    let text =
        std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("/proc/meminfo: {e}"))?;
    parse_meminfo(&text).ok_or_else(|| "/proc/meminfo has no MemAvailable or MemFree".into())
}

fn parse_meminfo(meminfo: &str) -> Option<MemSample> {
    let field = |key: &str| -> Option<u64> {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some(MemSample {
        available: field("MemAvailable:")?,
        free: field("MemFree:")?,
    })
}

/// The command line of one instance of `workload`, started as `instance` says (a restore
/// from the snapshot in `snapshot`).
pub fn instance_command(
    instance: Instance,
    ctx: &Context,
    workload: &[String],
    snapshot: Option<&Path>,
) -> Result<Command, String> {
    let mut cmd = match instance {
        Instance::HostProcess => {
            let (program, args) = workload.split_first().ok_or("no workload")?;
            let mut c = Command::new(program);
            c.args(args);
            return Ok(c);
        }
        Instance::TwinboxCtr => {
            let mut c = Command::new(&ctx.twinbox_exe);
            c.args(["ctr", "run"]);
            c
        }
        Instance::TwinboxVm | Instance::TwinboxVmSnapshot => {
            let mut c = Command::new(&ctx.twinbox_exe);
            c.args(["vm", "run"]);
            if instance == Instance::TwinboxVmSnapshot {
                // The snapshot's kernel is already running.
                let dir = snapshot.ok_or("density: a restored VM needs its snapshot")?;
                c.arg("--snapshot").arg(dir);
            } else {
                c.arg("--kernel").arg(&ctx.kernel);
            }
            c.args(["--vcpus", &ctx.vcpus.to_string()]);
            c.args(["--timeout", &ctx.vm_timeout.as_secs_f64().to_string()]);
            if !ctx.vm_jail {
                c.arg("--no-jail");
            }
            c
        }
    };
    cmd.arg("--rootfs").arg(&ctx.rootfs);
    cmd.args(["--memory", &ctx.memory_mib.to_string(), "--"]);
    cmd.args(workload);
    Ok(cmd)
}

/// Starts `ctx.density_instances` instances of `workload` at once in a box that can do
/// `caps` and returns `mib_per_instance` (and `instances`, `baseline_available_mib`).
pub fn run(caps: &Capabilities, ctx: &Context, workload: &[String]) -> Result<Metrics, String> {
    let instance = caps
        .instance
        .ok_or("density: this box cannot be started as a process")?;
    let k = ctx.density_instances.max(1);
    // A VM instance has its own time limit; this one only stops a hang beyond it.
    let limit = match caps.time_limit {
        TimeLimit::Vm => ctx.vm_timeout + Duration::from_secs(5),
        TimeLimit::Host => Duration::from_secs(60),
    };
    // One snapshot for all K restores, taken (one boot) before the host is first sampled
    // and removed after the last has ended.
    let snapshot = match instance {
        Instance::TwinboxVmSnapshot => Some(vm_snapshot::Taken::for_instances(
            &ctx.twinbox_exe,
            vm_snapshot::Machine {
                rootfs: ctx.rootfs.clone(),
                kernel: Some(ctx.kernel.clone()),
                vcpus: ctx.vcpus,
                memory_mib: ctx.memory_mib,
            },
            ctx.vm_jail,
        )?),
        _ => None,
    };
    let mut commands = Vec::new();
    for _ in 0..k {
        commands.push(instance_command(
            instance,
            ctx,
            workload,
            snapshot.as_ref().map(|t| t.dir()),
        )?);
    }
    // If the bench dies, twinbox's own instances get SIGTERM, on which they tear their
    // box down (cgroup, mounts, loop device) as on Ctrl-C; a plain process is killed.
    // (Start-up speed does not matter here, so native instances get one too.)
    let death = Some(match instance {
        Instance::HostProcess => Signal::SIGKILL,
        Instance::TwinboxCtr | Instance::TwinboxVm | Instance::TwinboxVmSnapshot => Signal::SIGTERM,
    });
    let before = quiet()?;
    let mut during: Vec<MemSample> = Vec::new();
    let finished = std::thread::scope(|scope| {
        let handles: Vec<_> = commands
            .into_iter()
            .map(|cmd| {
                scope.spawn(move || {
                    process::run_dying_with(
                        cmd,
                        death,
                        twinbox_spec::clock::monotonic_ns(),
                        true,
                        Some(limit),
                    )
                })
            })
            .collect();
        while handles.iter().any(|h| !h.is_finished()) {
            if let Ok(now) = sample() {
                during.push(now);
            }
            std::thread::sleep(SAMPLE_EVERY);
        }
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("instance thread panicked".into()))
            })
            .collect::<Vec<_>>()
    });
    let after = quiet()?;
    for (i, done) in finished.into_iter().enumerate() {
        let done = done?;
        if done.outcome != twinbox_spec::Outcome::Exited(0) {
            return Err(format!(
                "instance {} of {k} ended with {:?}: {}",
                i + 1,
                done.outcome,
                last_words(done.output.as_deref().unwrap_or_default())
            ));
        }
    }
    let plateau = |f: fn(&MemSample) -> u64| {
        middle_half_median(&during.iter().map(f).collect::<Vec<_>>())
            .ok_or("the instances ended before the host's memory was sampled")
    };
    Ok(Metrics::from([
        (
            metric::MIB_PER_INSTANCE.key.into(),
            per_instance_mib(
                before.available,
                after.available,
                plateau(|m| m.available)?,
                k,
            ),
        ),
        (
            metric::MEMFREE_MIB_PER_INSTANCE.key.into(),
            per_instance_mib(before.free, after.free, plateau(|m| m.free)?, k),
        ),
        (metric::INSTANCES.key.into(), f64::from(k)),
        (
            metric::BASELINE_AVAILABLE_MIB.key.into(),
            before.available as f64 / 1024.0,
        ),
    ]))
}

/// (before + after) / 2 − loaded, per instance, MiB; negative when the host freed more
/// memory meanwhile than the instances took (reported as is: it is noise, not a cost).
fn per_instance_mib(before: u64, after: u64, loaded: u64, k: u32) -> f64 {
    let idle = (before as f64 + after as f64) / 2.0;
    (idle - loaded as f64) / 1024.0 / f64::from(k)
}

/// The median of the samples in the middle half of the list (samples are evenly spaced in
/// time, so this is the middle half of the instances' lifetime).
fn middle_half_median(samples: &[u64]) -> Option<u64> {
    let n = samples.len();
    median(samples[n / 4..n - n / 4].to_vec())
}

/// The median (upper middle for an even count) of `values`.
fn median(mut values: Vec<u64>) -> Option<u64> {
    values.sort_unstable();
    values.get(values.len() / 2).copied()
}

/// An instance's output on one line, without twinbox's advisory notes (on PVM every VM
/// prints one), so the reason for a failure is what a report's one-line summary shows.
fn last_words(output: &str) -> String {
    output
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("twinbox: note:"))
        .collect::<Vec<_>>()
        .join(" | ")
}

/// The medians of a few samples: one reading can catch a passing spike.
fn quiet() -> Result<MemSample, String> {
    let mut samples = Vec::new();
    for _ in 0..5 {
        samples.push(sample()?);
        std::thread::sleep(SAMPLE_EVERY);
    }
    let median_of = |f: fn(&MemSample) -> u64| median(samples.iter().map(f).collect());
    Ok(MemSample {
        available: median_of(|m| m.available).ok_or("no memory samples")?,
        free: median_of(|m| m.free).ok_or("no memory samples")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner;
    use crate::scenario::tests::ctx;

    fn cmdline(cmd: &Command) -> Vec<String> {
        std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn drift_is_cancelled_and_the_plateau_is_the_middle() {
        // The host drifted down by 100 KiB while 2 instances took 1024 KiB each.
        assert_eq!(per_instance_mib(10_000, 9_900, 9_950 - 2048, 2), 1.0);
        // Start-up and teardown samples at the edges do not count.
        let samples = [9_000, 5_000, 5_000, 5_100, 4_900, 5_000, 5_000, 9_000];
        assert_eq!(middle_half_median(&samples), Some(5_000));
        assert_eq!(middle_half_median(&[]), None);
        assert_eq!(middle_half_median(&[7]), Some(7));
    }

    #[test]
    fn failure_reason_skips_notes() {
        let out = "twinbox: note: host KVM is PVM\ntwinbox: vm failed: time limit\n";
        assert_eq!(last_words(out), "twinbox: vm failed: time limit");
    }

    #[test]
    fn meminfo_parses() {
        let text = "MemTotal:  24000000 kB\nMemFree:  999 kB\nMemAvailable:   12345 kB\n";
        let m = parse_meminfo(text).unwrap();
        assert_eq!((m.available, m.free), (12345, 999));
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
        assert!(sample().unwrap().available > 0);
    }

    #[test]
    fn instances_are_twinbox_processes_of_the_same_size() {
        let w = vec!["sleep".to_string(), "2".to_string()];
        let c = ctx();
        assert_eq!(
            cmdline(&instance_command(Instance::HostProcess, &c, &w, None).unwrap()),
            ["sleep", "2"]
        );
        assert_eq!(
            cmdline(&instance_command(Instance::TwinboxCtr, &c, &w, None).unwrap()),
            [
                "/usr/bin/twinbox",
                "ctr",
                "run",
                "--rootfs",
                "/img",
                "--memory",
                "64",
                "--",
                "sleep",
                "2"
            ]
        );
        let vm = cmdline(&instance_command(Instance::TwinboxVm, &c, &w, None).unwrap());
        assert_eq!(&vm[..4], ["/usr/bin/twinbox", "vm", "run", "--kernel"]);
        assert!(vm.windows(2).any(|p| p == ["--vcpus", "2"]));
        assert!(vm.windows(2).any(|p| p == ["--timeout", "7"]));
        assert!(
            !vm.contains(&"--no-jail".to_string()),
            "jailed like the bench's own VM"
        );
        let unjailed = Context {
            vm_jail: false,
            ..ctx()
        };
        let vm = cmdline(&instance_command(Instance::TwinboxVm, &unjailed, &w, None).unwrap());
        assert!(vm.contains(&"--no-jail".to_string()), "{vm:?}");
        // A restore: the snapshot instead of the kernel, the same size and limit.
        let snap = Path::new("/tmp/snap");
        let restored = instance_command(Instance::TwinboxVmSnapshot, &c, &w, Some(snap));
        let restored = cmdline(&restored.unwrap());
        assert_eq!(
            &restored[..5],
            ["/usr/bin/twinbox", "vm", "run", "--snapshot", "/tmp/snap"]
        );
        assert!(!restored.contains(&"--kernel".to_string()), "{restored:?}");
        assert!(restored.windows(2).any(|p| p == ["--vcpus", "2"]));
        assert!(restored.windows(2).any(|p| p == ["--memory", "64"]));
        assert!(restored.windows(2).any(|p| p == ["--timeout", "7"]));
        assert!(instance_command(Instance::TwinboxVmSnapshot, &c, &w, None).is_err());
        assert!(run(&runner::PEER_RUNTIME, &c, &w).is_err());
    }

    #[test]
    fn native_instances_run_and_report_per_instance_memory() {
        let m = run(
            &runner::native::CAPABILITIES,
            &ctx(),
            &["sleep".into(), "0.2".into()],
        )
        .unwrap();
        assert_eq!(m["instances"], 3.0);
        assert!(m["mib_per_instance"].is_finite() && m["memfree_mib_per_instance"].is_finite());
        assert!(m["baseline_available_mib"] > 0.0);
        let err = run(&runner::native::CAPABILITIES, &ctx(), &["false".into()]).unwrap_err();
        assert!(err.contains("instance 1 of 3"), "{err}");
    }
}
