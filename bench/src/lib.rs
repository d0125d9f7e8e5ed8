//! twinbox bench: the same workloads, from the same root filesystem image, run natively,
//! in twinbox's container and in twinbox's microVM, measured side by side.
//!
//! The story of a bench:
//! 0. [`runner::sweep`] removes what a killed bench left (a runc container, per-run
//!    directories); every runtime and peer this bench starts gets a parent-death signal,
//!    so it dies with the bench ([`runner::process::die_with_bench`]);
//! 1. [`scenario`] says what runs (`/bin/true`, the tiny guest, sysbench ...), which
//!    boxes sit it out (decided from each runner's [`runner::Capabilities`]) and which
//!    [`metric`]s come out of a [`twinbox_spec::RunReport`];
//! 2. [`schedule`] interleaves the boxes round by round (A B C A B C), warm-ups first and
//!    discarded;
//! 3. [`runner`] runs each slot in its box (native process, container, VM, peer VMMs) —
//!    a box that fails a scenario is skipped for the rest of it, with the reason kept;
//! 4. everything lands in [`results::Results`] (`results.json`, the source of truth);
//! 5. [`report`] and [`charts`] render `report.md`, `startup.svg`, `overhead.svg` from the
//!    stored results only, with [`stats`] (median, p10, p90).
//!
//! [`tiny_guest`] builds the guest of the `vmm` scenario: a few instructions that report
//! exit 0 and reset, so the VMM's own cost is measured even where guest kernels crawl (PVM).

pub mod charts;
pub mod image;
pub mod metric;
pub mod report;
pub mod results;
pub mod runner;
pub mod scenario;
pub mod schedule;
pub mod sizes;
pub mod stats;
pub mod tiny_guest;

use indicatif::{ProgressBar, ProgressStyle};
use results::{Params, Results, RunRecord, SatOut, ScenarioResult, Skip};
use runner::Runner;
use scenario::{Context, Scenario};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// What the user asked for.
#[derive(Clone, Debug)]
pub struct Options {
    /// Scenarios, in order.
    pub scenarios: Vec<&'static dyn Scenario>,
    /// Counted runs per box and scenario.
    pub runs: u32,
    /// Warm-up runs per box and scenario.
    pub warmup: u32,
    /// vCPUs / CPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u32,
    /// Output directory (created).
    pub out: PathBuf,
    /// Also measure peer VMMs.
    pub peers: bool,
    /// Time limit of one VM/peer run.
    pub vm_timeout: Duration,
    /// Boxes: `native`, `container`, `vm`.
    pub boxes: Vec<String>,
    /// Run twinbox's VMM threads in its jail (as `twinbox vm run` does; needs root).
    pub vm_jail: bool,
    /// Run the vm box's VMM in its own cgroup (as `twinbox vm run` does as root).
    pub vm_cgroup: bool,
    /// The root filesystem image.
    pub rootfs: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// Instances alive at once in the `density` scenario.
    pub density_instances: u32,
    /// The twinbox binary (`density` starts instances with it).
    pub twinbox_exe: PathBuf,
    /// A Firecracker binary to measure as a peer VMM.
    pub firecracker: Option<PathBuf>,
    /// A Cloud Hypervisor binary to measure as a peer VMM.
    pub cloud_hypervisor: Option<PathBuf>,
    /// An OCI/Docker image (`PATH[@REF]`) the container and VM run from instead of
    /// `rootfs` ([`image`]); no peers then.
    pub image: Option<String>,
}

/// A bench that could not run or could not write its results.
#[derive(Debug, Error)]
pub enum Error {
    /// An unknown box name.
    #[error("unknown box {0:?}: use native, container, vm")]
    UnknownBox(String),
    /// Nothing to do.
    #[error("--runs must be at least 1")]
    NoRuns,
    /// Writing an output file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A peer that was asked for by path cannot be used, or the peers' image mount failed.
    #[error("peer: {0}")]
    Peer(String),
    /// SIGINT or SIGTERM arrived; the run in progress was stopped and cleaned up.
    #[error("interrupted by signal {0}")]
    Interrupted(i32),
    /// Setting up the interrupt handling.
    #[error("installing the SIGINT/SIGTERM handler: {0}")]
    Signals(std::io::Error),
    /// Setting up what a scenario needs (e.g. its scratch disk).
    #[error("preparing scenario {0}: {1}")]
    Prepare(&'static str, std::io::Error),
    /// The `--image` cannot be opened, verified or unpacked.
    #[error("{0}")]
    Image(String),
    /// Drawing a chart.
    #[error(transparent)]
    Chart(#[from] charts::ChartError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.into(),
        source,
    }
}

/// Where the outputs went.
#[derive(Debug)]
pub struct Outputs {
    /// results.json
    pub results: PathBuf,
    /// report.md
    pub report: PathBuf,
    /// startup.svg
    pub startup_svg: PathBuf,
    /// overhead.svg
    pub overhead_svg: PathBuf,
}

/// Runs the bench (progress bar on stderr) and returns every run.
pub fn run(opts: &Options) -> Result<Results, Error> {
    if opts.runs == 0 {
        return Err(Error::NoRuns);
    }
    std::fs::create_dir_all(&opts.out).map_err(io_err(&opts.out))?;
    // 1. What a killed bench left (a runc container, per-run directories) goes first.
    for line in runner::sweep::sweep() {
        tracing::warn!("{line}");
    }
    // 2. The image mounted for runc and bwrap; declared before the runners, so dropped
    //    after them.
    let peer_root = mount_peer_root(opts)?;
    // 2b. An --image: its layers (and the VM's disk) in the cache, held until the runners
    //     are gone.
    let image = match &opts.image {
        Some(reference) => {
            let vm = opts.boxes.iter().any(|b| b == runner::vm::NAME);
            Some(image::BenchImage::open(reference, vm).map_err(Error::Image)?)
        }
        None => None,
    };
    // 3. SIGINT/SIGTERM for the whole bench: recorded; process waits (the VM box and the
    //    peers are processes) check it and pass SIGTERM on. A box that installs its own
    //    (nested) handler for its run leaves the signal visible here too.
    let interrupt = twinbox_spec::interrupt::Interrupt::install().map_err(Error::Signals)?;
    // 4. The boxes asked for, then the peers.
    let mut runners: Vec<Box<dyn Runner>> = Vec::new();
    for b in &opts.boxes {
        let runner = runner::by_name(b, &opts.twinbox_exe, opts.vm_jail, opts.vm_cgroup)
            .ok_or_else(|| Error::UnknownBox(b.clone()))?;
        runners.push(match &image {
            Some(image) => image.wrap(runner),
            None => runner,
        });
    }
    if image.is_none() {
        runners.extend(peers(opts, peer_root.as_ref())?);
    }
    // 5. What every run needs.
    let tiny = opts.out.join("tiny-guest.elf");
    tiny_guest::write_to(&tiny).map_err(io_err(&tiny))?;
    let ctx = Context {
        rootfs: opts.rootfs.clone(),
        kernel: opts.kernel.clone(),
        tiny_kernel: tiny,
        vcpus: opts.vcpus,
        memory_mib: opts.memory_mib,
        vm_timeout: opts.vm_timeout,
        microbench: opts.rootfs.with_file_name("twinbox-microbench"),
        disk: opts.out.join("scratch-disk.img"),
        density_instances: opts.density_instances,
        twinbox_exe: opts.twinbox_exe.clone(),
        vm_jail: opts.vm_jail,
    };
    let started_utc = utc_now();
    let host = twinbox_spec::host::describe();
    // 6. Per scenario, the boxes that take part and those that sit it out (and why) —
    //    also VMs this host's KVM cannot run, said once here instead of a time limit
    //    spent per box and scenario.
    let plan: Vec<Plan> = opts
        .scenarios
        .iter()
        .map(|&scenario| Plan::new(scenario, &runners, host.kvm).on_image(image.as_ref()))
        .collect();
    if let Some(why) = host.kvm.linux_guest_obstacle() {
        if plan.iter().any(|p| p.host_cannot) {
            tracing::warn!(
                "{why}: the Linux-VM runs are skipped (recorded as not taking part); \
                 the `vmm` scenario's tiny guest still runs where KVM does"
            );
        }
    }
    let total: usize = plan
        .iter()
        .map(|p| p.boxes.len() * (opts.runs + opts.warmup) as usize)
        .sum();
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let interrupted = || interrupt.signal();
    // 7. Scenario by scenario, the boxes interleaved round by round.
    let mut scenarios = Vec::new();
    for p in plan {
        // What the scenario sets up (the scratch disk) lives while it runs, no longer.
        let _prepared = p
            .scenario
            .prepare(&ctx)
            .map_err(|e| Error::Prepare(p.scenario.name(), e))?;
        scenarios.push(run_scenario(p, &ctx, opts, &bar, &interrupted));
        if let Some(signal) = interrupted() {
            bar.finish_and_clear();
            return Err(Error::Interrupted(signal));
        }
    }
    bar.finish_and_clear();
    // 8. Image sizes: the image on disk, what one instance of each box adds.
    let sizes = scenarios
        .iter()
        .find(|s| s.name == scenario::startup::NAME)
        .and_then(|startup| {
            let bytes = match &image {
                Some(i) => sizes::ImageBytes {
                    what: format!(
                        "the image's {} layers unpacked in the cache",
                        i.sizes.layer_count
                    ),
                    bytes: i.sizes.layers_bytes_on_disk,
                    vm_disk_bytes: i.sizes.ext4_bytes_on_disk,
                    vm_disk: i.disk().map(Path::to_owned),
                },
                None => sizes::ImageBytes::builtin(&opts.rootfs),
            };
            let boxes: Vec<&dyn Runner> = runners.iter().map(|r| r.as_ref()).collect();
            sizes::measure(&ctx, &boxes, startup, bytes)
        });
    if let Some(signal) = interrupted() {
        return Err(Error::Interrupted(signal));
    }
    Ok(Results {
        schema_version: results::SCHEMA_VERSION,
        twinbox_version: env!("CARGO_PKG_VERSION").into(),
        started_utc,
        host,
        params: Params {
            runs: opts.runs,
            warmup: opts.warmup,
            vcpus: opts.vcpus,
            memory_mib: opts.memory_mib,
            vm_timeout_s: opts.vm_timeout.as_secs_f64(),
            boxes: runners.iter().map(|r| r.name().to_string()).collect(),
            peers: opts.peers,
            rootfs: opts.rootfs.display().to_string(),
            kernel: opts.kernel.display().to_string(),
            density_instances: opts.density_instances,
            vm_jail: opts.vm_jail,
            vm_cgroup: opts.vm_cgroup,
            image: image.as_ref().map(|i| i.used.clone()),
        },
        scenarios,
        sizes,
    })
}

/// The image mounted for the peer container runtimes, when `--peers` finds runc or bwrap
/// and a scenario they take part in is asked for.
fn mount_peer_root(opts: &Options) -> Result<Option<runner::peer_root::PeerRoot>, Error> {
    let wanted = opts.peers
        && opts.scenarios.iter().any(|s| {
            [runner::PEER_RUNTIME, runner::peer_runc::CAPABILITIES]
                .iter()
                .any(|caps| s.sits_out(caps).is_none())
        })
        && [runner::peer_runc::NAME, runner::peer_bwrap::NAME]
            .iter()
            .any(|b| runner::peer::in_path(b).is_some());
    if !wanted {
        return Ok(None);
    }
    runner::peer_root::PeerRoot::mount(&opts.rootfs)
        .map(Some)
        .map_err(Error::Peer)
}

/// The peers asked for: with `--peers` those found in PATH (runc and bwrap over
/// `peer_root`, QEMU microvm), and Firecracker and Cloud Hypervisor given by path. Adding a
/// peer: its `runner/peer_<name>.rs`, and one entry here.
fn peers(
    opts: &Options,
    peer_root: Option<&runner::peer_root::PeerRoot>,
) -> Result<Vec<Box<dyn Runner>>, Error> {
    let mut found: Vec<Box<dyn Runner>> = Vec::new();
    let missing = |what: &str| tracing::warn!("--peers: {what} not in PATH, peer skipped");
    if let Some(root) = peer_root {
        match runner::peer_runc::Runc::find(root.dir()).map_err(Error::Peer)? {
            Some(r) => found.push(Box::new(r)),
            None => missing(runner::peer_runc::NAME),
        }
        match runner::peer_bwrap::Bwrap::find(root.dir()) {
            Some(b) => found.push(Box::new(b)),
            None => missing(runner::peer_bwrap::NAME),
        }
    }
    if opts.peers {
        match runner::peer_qemu::QemuMicrovm::find() {
            Some(q) => found.push(Box::new(q)),
            None => missing("qemu-system-x86_64"),
        }
    }
    if let Some(path) = &opts.firecracker {
        let fc = runner::peer_firecracker::Firecracker::new(path).map_err(Error::Peer)?;
        found.push(Box::new(fc));
    }
    if let Some(path) = &opts.cloud_hypervisor {
        let ch = runner::peer_cloud_hypervisor::CloudHypervisor::new(path).map_err(Error::Peer)?;
        found.push(Box::new(ch));
    }
    Ok(found)
}

/// One scenario and the boxes that take part in it or sit it out.
struct Plan<'a> {
    scenario: &'static dyn Scenario,
    boxes: Vec<&'a dyn Runner>,
    sat_out: Vec<SatOut>,
    /// Some box sits out because this host's KVM cannot run its guest.
    host_cannot: bool,
}

impl<'a> Plan<'a> {
    /// Asks `scenario` about each of `runners`' capabilities, then the host: a VMM sits
    /// out where `kvm` cannot run its guest (no KVM at all, or a Linux guest on PVM).
    fn new(
        scenario: &'static dyn Scenario,
        runners: &'a [Box<dyn Runner>],
        kvm: twinbox_spec::host::KvmFlavor,
    ) -> Self {
        let mut boxes = Vec::new();
        let mut sat_out = Vec::new();
        let mut host_cannot = false;
        for r in runners {
            let caps = r.capabilities();
            let host_says = match (caps.guest, scenario.boots_tiny_guest()) {
                (runner::Guest::None, _) => None,
                (_, true) => kvm.vm_obstacle(),
                (_, false) => kvm.linux_guest_obstacle(),
            };
            let why = match scenario.sits_out(&caps) {
                Some(why) => Some(why.to_string()),
                None => host_says.map(|why| {
                    host_cannot = true;
                    format!("skipped on this host: {why}")
                }),
            };
            match why {
                None => boxes.push(r.as_ref()),
                Some(reason) => sat_out.push(SatOut {
                    box_name: r.name().into(),
                    reason,
                }),
            }
        }
        Self {
            scenario,
            boxes,
            sat_out,
            host_cannot,
        }
    }

    /// With `--image`, only twinbox's container and VM run from it, and only scenarios
    /// whose program the image has: every other box and scenario sits out, with why.
    fn on_image(mut self, image: Option<&image::BenchImage>) -> Self {
        let Some(image) = image else {
            return self;
        };
        let scenario_says = if self.scenario.name() == scenario::density::NAME {
            Some("--image: density starts its instances from the built-in image".to_string())
        } else if self.scenario.boots_tiny_guest() {
            None
        } else {
            image.lacks(&self.scenario.workload())
        };
        for b in std::mem::take(&mut self.boxes) {
            let why = if image::BenchImage::runs_in(b.name()) {
                scenario_says.clone()
            } else {
                Some(format!("--image: {} does not run the image", b.name()))
            };
            match why {
                None => self.boxes.push(b),
                Some(reason) => self.sat_out.push(SatOut {
                    box_name: b.name().into(),
                    reason,
                }),
            }
        }
        self
    }
}

fn run_scenario(
    plan: Plan<'_>,
    ctx: &Context,
    opts: &Options,
    bar: &ProgressBar,
    interrupted: &dyn Fn() -> Option<i32>,
) -> ScenarioResult {
    let Plan {
        scenario,
        boxes,
        sat_out,
        ..
    } = plan;
    let mut result = ScenarioResult {
        name: scenario.name().into(),
        description: scenario.description().into(),
        workload: scenario.workload(),
        metrics: scenario.metrics().iter().map(|m| m.def()).collect(),
        boxes: boxes.iter().map(|b| b.name().to_string()).collect(),
        runs: Vec::new(),
        skipped: Vec::new(),
        sat_out,
    };
    // A box that failed once is not run again in this scenario: on PVM a VM run that
    // timed out would time out every time, and a missing runtime stays missing.
    let mut failed: Vec<Option<String>> = vec![None; boxes.len()];
    let mut skipped = vec![0u32; boxes.len()];
    for slot in schedule::interleave(boxes.len(), opts.warmup, opts.runs) {
        if interrupted().is_some() {
            break;
        }
        let runner = boxes[slot.box_index];
        bar.set_message(format!(
            "{} / {} #{}",
            scenario.name(),
            runner.name(),
            slot.round
        ));
        if failed[slot.box_index].is_some() {
            skipped[slot.box_index] += 1;
            bar.inc(1);
            continue;
        }
        let scenario::Measured {
            metrics,
            error,
            report,
        } = scenario.measure(runner, ctx);
        if let Some(e) = &error {
            bar.println(format!(
                "{} / {}: {}",
                scenario.name(),
                runner.name(),
                e.lines().next().unwrap_or_default()
            ));
            failed[slot.box_index] = Some(e.clone());
        }
        result.runs.push(RunRecord {
            box_name: runner.name().into(),
            round: slot.round,
            warmup: slot.warmup,
            metrics,
            error,
            report,
        });
        bar.inc(1);
    }
    for (i, reason) in failed.into_iter().enumerate() {
        if let (Some(reason), n) = (reason, skipped[i]) {
            if n > 0 {
                result.skipped.push(Skip {
                    box_name: boxes[i].name().into(),
                    runs_skipped: n,
                    reason,
                });
            }
        }
    }
    result
}

/// Writes results.json, report.md and the two SVGs into `dir`.
pub fn write_outputs(results: &Results, dir: &Path) -> Result<Outputs, Error> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let out = Outputs {
        results: dir.join("results.json"),
        report: dir.join("report.md"),
        startup_svg: dir.join("startup.svg"),
        overhead_svg: dir.join("overhead.svg"),
    };
    results.save(&out.results).map_err(io_err(&out.results))?;
    std::fs::write(&out.report, report::report_from_results(results))
        .map_err(io_err(&out.report))?;
    charts::startup(results, &out.startup_svg)?;
    charts::overhead(results, &out.overhead_svg)?;
    Ok(out)
}

/// Now, UTC, as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_from_unix(secs)
}

/// Formats Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, proleptic Gregorian).
pub fn utc_from_unix(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A box that only says what it can do.
    struct Fake(&'static str, runner::Capabilities);

    impl Runner for Fake {
        fn name(&self) -> &str {
            self.0
        }
        fn capabilities(&self) -> runner::Capabilities {
            self.1
        }
        fn run(&self, _: &twinbox_spec::RunSpec) -> Result<twinbox_spec::RunReport, String> {
            Err("not run in this test".into())
        }
    }

    #[test]
    fn the_plan_asks_each_scenario_about_each_box() {
        let runners: Vec<Box<dyn Runner>> = vec![
            Box::new(Fake("native", runner::native::CAPABILITIES)),
            Box::new(Fake("a-runtime", runner::PEER_RUNTIME)),
            Box::new(Fake("a-vmm", runner::TINY_GUEST_VMM)),
        ];
        fn names(p: &Plan) -> Vec<String> {
            p.boxes.iter().map(|b| b.name().to_string()).collect()
        }
        let hw = twinbox_spec::host::KvmFlavor::Hardware {
            vendor: twinbox_spec::host::CpuVendor::Amd,
        };
        let memory = Plan::new(&scenario::Memory, &runners, hw);
        assert_eq!(names(&memory), ["native"]);
        let out: Vec<&str> = memory.sat_out.iter().map(|s| s.box_name.as_str()).collect();
        assert_eq!(out, ["a-runtime", "a-vmm"]);
        assert!(memory.sat_out.iter().all(|s| !s.reason.is_empty()));
        let vmm = Plan::new(&scenario::Vmm, &runners, hw);
        assert_eq!(names(&vmm), ["a-vmm"]);
        let disk = Plan::new(&scenario::Disk, &runners, hw);
        assert_eq!(names(&disk), ["native", "a-runtime"]);
        assert_eq!(
            disk.sat_out[0].reason,
            "boots only the tiny guest, not the image"
        );
        assert!(!memory.host_cannot && !vmm.host_cannot && !disk.host_cannot);
    }

    #[test]
    fn a_host_that_cannot_boot_linux_sits_the_linux_vms_out_with_its_reason() {
        use twinbox_spec::host::KvmFlavor;
        let runners: Vec<Box<dyn Runner>> = vec![
            Box::new(Fake("native", runner::native::CAPABILITIES)),
            Box::new(Fake("vm", runner::vm::CAPABILITIES)),
            Box::new(Fake("a-vmm", runner::peer::KERNEL_VMM)),
        ];
        fn names(p: &Plan) -> Vec<String> {
            p.boxes.iter().map(|b| b.name().to_string()).collect()
        }
        let startup = Plan::new(&scenario::Startup, &runners, KvmFlavor::Pvm);
        assert_eq!(names(&startup), ["native"]);
        assert!(startup.host_cannot);
        for s in &startup.sat_out {
            assert!(
                s.reason.starts_with("skipped on this host: ") && s.reason.contains("PVM"),
                "{}: {}",
                s.box_name,
                s.reason
            );
        }
        // The tiny guest needs KVM, not a Linux boot: it still runs on PVM...
        let vmm = Plan::new(&scenario::Vmm, &runners, KvmFlavor::Pvm);
        assert_eq!(names(&vmm), ["vm", "a-vmm"]);
        assert!(!vmm.host_cannot);
        // ...but not without KVM, where the native box still runs everything it can.
        let vmm = Plan::new(&scenario::Vmm, &runners, KvmFlavor::Absent);
        assert!(names(&vmm).is_empty() && vmm.host_cannot);
        let cpu = Plan::new(&scenario::Cpu, &runners, KvmFlavor::Absent);
        assert_eq!(names(&cpu), ["native"]);
        assert!(cpu.sat_out[0].reason.contains("no /dev/kvm"));
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(utc_from_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_from_unix(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_from_unix(1_795_444_496), "2026-11-23T14:34:56Z");
    }
}
