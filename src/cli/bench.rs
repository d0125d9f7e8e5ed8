//! `twinbox bench`: runs the scenarios natively, in the container and in the microVM,
//! writes results.json, report.md and SVG charts, and prints the headline table.

use anyhow::Context as _;
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;
use twinbox_spec::artifacts;

/// Options of `twinbox bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Scenarios to run: startup, vmm, cpu, memory, density, membw, syscall, disk, net
    /// (default: all, in that order).
    pub scenarios: Vec<String>,
    /// Counted runs per box and scenario.
    #[arg(long, default_value_t = 5)]
    pub runs: u32,
    /// Warm-up runs per box and scenario (run, stored, not counted).
    #[arg(long, default_value_t = 1)]
    pub warmup: u32,
    /// vCPUs of the VM / CPUs of the container.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Memory of the VM / memory limit of the container, MiB.
    #[arg(long, default_value_t = 128)]
    pub memory: u32,
    /// Output directory (default: bench-results/<UTC timestamp>/).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also measure the peers found in PATH: runc and bubblewrap (the image's workloads,
    /// from the same image mounted read-only) and QEMU microvm (the tiny guest, and the
    /// same kernel and image as twinbox's VM). Peers sit out memory and density.
    #[arg(long)]
    pub peers: bool,
    /// Also measure this Firecracker binary as a peer VMM (the tiny guest, and our kernel
    /// and image where Linux boots). Without it: $TWINBOX_FIRECRACKER, or with `--peers`
    /// `firecracker` in PATH.
    #[arg(long, value_name = "PATH")]
    pub firecracker: Option<PathBuf>,
    /// Also measure this Cloud Hypervisor binary as a peer VMM (tiny guest). Without it:
    /// $TWINBOX_CLOUD_HYPERVISOR, or with `--peers` `cloud-hypervisor` in PATH.
    #[arg(long, value_name = "PATH")]
    pub cloud_hypervisor: Option<PathBuf>,
    /// Instances alive at once in the density scenario.
    #[arg(long, value_name = "K", default_value_t = 8)]
    pub density_instances: u32,
    /// Time limit of one VM or peer run, seconds; a VM failure skips the rest of that
    /// scenario's VM runs.
    #[arg(long, default_value_t = 30.0)]
    pub vm_timeout: f64,
    /// Run twinbox's VM box without the VMM's jail (the jail needs root).
    #[arg(long)]
    pub no_jail: bool,
    /// Run twinbox's VM boxes (`vm`, and `vm-snapshot`'s restores) without the VMM's own
    /// cgroup (`vm run --no-cgroup`): for a comparison with a peer VMM that runs in none,
    /// as Firecracker without its jailer.
    #[arg(long)]
    pub no_cgroup: bool,
    /// Boxes to measure, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "native,container,vm,vm-snapshot"
    )]
    pub boxes: Vec<String>,
    /// Root filesystem image (default: the cached artifact).
    #[arg(long)]
    pub rootfs: Option<PathBuf>,
    /// Run the container and VM boxes from an OCI/Docker image instead (as `ctr run
    /// --image` and `vm run --image` do: the container on its layers, the VM on the ext4
    /// built from them), for the scenarios whose program the image has (`startup`: its
    /// /bin/true); the others, native and the peers sit out, with why. The report names
    /// the image and its digest. Not with `--rootfs` or peers.
    #[arg(long, value_name = "PATH[@REF]")]
    pub image: Option<String>,
    /// Guest kernel (default: the cached vmlinux).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Run nothing: render report.md and the charts again from this results.json (into
    /// its directory, or --out).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["scenarios", "peers"])]
    pub render: Option<PathBuf>,
}

/// Runs the bench; exit status 0 when the results were written (failed runs are part of
/// the results, not an error of the bench).
pub fn main(args: BenchArgs) -> anyhow::Result<i32> {
    if let Some(file) = &args.render {
        let results = bench::results::Results::load(file)
            .with_context(|| format!("{}: not a readable results.json", file.display()))?;
        let dir = args.out.clone().unwrap_or_else(|| {
            file.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."))
                .to_path_buf()
        });
        let written = bench::write_outputs(&results, &dir)?;
        super::say(format_args!(
            "{}\nreport:  {}",
            bench::report::headline(&results),
            written.report.display()
        ));
        return Ok(0);
    }
    let scenarios = if args.scenarios.is_empty() {
        bench::scenario::ALL.to_vec()
    } else {
        args.scenarios
            .iter()
            .map(|s| {
                bench::scenario::by_name(s).with_context(|| {
                    format!("unknown scenario {s:?}: use {}", bench::scenario::names())
                })
            })
            .collect::<anyhow::Result<_>>()?
    };
    if !(args.vm_timeout.is_finite() && args.vm_timeout > 0.0) {
        anyhow::bail!(
            "--vm-timeout {}: must be a positive number of seconds",
            args.vm_timeout
        );
    }
    if !(1..=64).contains(&args.density_instances) {
        anyhow::bail!(
            "--density-instances {}: must be between 1 and 64",
            args.density_instances
        );
    }
    if args.runs == 0 {
        anyhow::bail!("--runs 0: need at least one counted run");
    }
    let probe = twinbox_spec::RunSpec {
        vcpus: args.vcpus,
        memory_mib: args.memory,
        ..twinbox_spec::RunSpec::new("/", vec!["/bin/true".into()])
    };
    probe.validate()?;
    for b in &args.boxes {
        if !bench::runner::BOX_NAMES.contains(&b.as_str()) {
            anyhow::bail!(
                "--boxes: unknown box {b:?}: use {}",
                bench::runner::BOX_NAMES.join(", ")
            );
        }
    }
    if args.image.is_some() {
        // Checked here, not by clap, so it is one line and exit 125 like other bad input.
        if args.rootfs.is_some() {
            anyhow::bail!("--image and --rootfs both name the boxes' root: give one of them");
        }
        if args.peers || args.firecracker.is_some() || args.cloud_hypervisor.is_some() {
            anyhow::bail!(
                "--image runs twinbox's container and VM only (the peers run the built-in image): drop --peers, --firecracker and --cloud-hypervisor"
            );
        }
    }
    let rootfs = args.rootfs.unwrap_or_else(artifacts::rootfs_image);
    let kernel = args.kernel.unwrap_or_else(artifacts::kernel_vmlinux);
    let needs_image =
        args.image.is_none() && args.boxes.iter().any(|b| b != bench::runner::native::NAME);
    if needs_image && !rootfs.is_file() {
        anyhow::bail!(
            "root filesystem image {} not found: build it (rootfs/build.sh) or pass --rootfs",
            rootfs.display()
        );
    }
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from("bench-results").join(bench::utc_now().replace(':', "")));
    let opts = bench::Options {
        scenarios,
        runs: args.runs,
        warmup: args.warmup,
        vcpus: args.vcpus,
        memory_mib: args.memory,
        out: out.clone(),
        peers: args.peers,
        vm_timeout: Duration::from_secs_f64(args.vm_timeout),
        boxes: args.boxes,
        vm_jail: !args.no_jail,
        vm_cgroup: !args.no_cgroup,
        rootfs,
        kernel,
        density_instances: args.density_instances,
        twinbox_exe: std::env::current_exe().context("finding the twinbox binary")?,
        image: args.image,
        firecracker: peer_vmm(
            args.firecracker,
            "TWINBOX_FIRECRACKER",
            "firecracker",
            args.peers,
        ),
        cloud_hypervisor: peer_vmm(
            args.cloud_hypervisor,
            "TWINBOX_CLOUD_HYPERVISOR",
            "cloud-hypervisor",
            args.peers,
        ),
    };
    let results = match bench::run(&opts) {
        Ok(results) => results,
        Err(bench::Error::Interrupted(signal)) => {
            super::complain(format_args!("twinbox: bench interrupted by signal {signal}; the run in progress was stopped and cleaned up, no results written\n"));
            return Ok(128 + signal);
        }
        Err(e) => return Err(e.into()),
    };
    let written = bench::write_outputs(&results, &out)?;
    super::say(format_args!(
        "{}\nreport:  {}\nresults: {}\ncharts:  {} {}",
        bench::report::headline(&results),
        written.report.display(),
        written.results.display(),
        written.startup_svg.display(),
        written.overhead_svg.display()
    ));
    Ok(0)
}

/// A peer VMM's binary: the flag, else the environment variable, else (with `--peers`)
/// the program in PATH. When `--peers` finds none, one line says its runs will not happen,
/// so a missing peer is never mistaken for a measured one.
fn peer_vmm(flag: Option<PathBuf>, env: &str, program: &str, peers: bool) -> Option<PathBuf> {
    let found = flag
        .or_else(|| std::env::var_os(env).map(PathBuf::from))
        .or_else(|| {
            peers
                .then(|| bench::runner::peer::in_path(program))
                .flatten()
        });
    if found.is_none() && peers {
        super::complain(format_args!(
            "twinbox: --peers: no {program} (give --{program} PATH, {env}, or put it in PATH): its runs do not happen\n"
        ));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[derive(clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        bench: BenchArgs,
    }

    #[test]
    fn help_names_every_scenario_in_order() {
        let help = Wrapper::command().render_long_help().to_string();
        let listed = help
            .lines()
            .find(|l| l.contains("Scenarios to run:"))
            .expect("the scenarios argument's help");
        let names: Vec<&str> = bench::scenario::ALL.iter().map(|s| s.name()).collect();
        assert!(
            listed.contains(&names.join(", ")),
            "help says {listed:?}, the bench has {names:?}"
        );
    }
}
