//! Arguments and output shared by `vm run` and `ctr run`, so the two print comparable
//! lines.

use clap::Args;
use std::path::PathBuf;
use twinbox_spec::{RunReport, RunSpec};

/// Options every `run` subcommand takes.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Root filesystem image (ext4). Default: the one built by scripts/build-artifacts.
    #[arg(long, value_name = "IMG")]
    pub rootfs: Option<PathBuf>,
    /// Memory in MiB (VM: guest RAM; container: memory limit).
    #[arg(long, value_name = "MiB", default_value_t = 128)]
    pub memory: u32,
    /// Hostname inside the box.
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// Environment variable for the workload (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory of the workload inside the box.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub workdir: String,
    /// Kill the box after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
    /// Print the host-stamped phases with deltas on stderr when done.
    #[arg(long)]
    pub timings: bool,
    /// Print the RunReport as JSON on stdout when done.
    #[arg(long)]
    pub json: bool,
    /// Network: `--net` links the box with the host, `--net nat` also NATs it out.
    ///
    /// `--net` (or `--net link`) gives the box `eth0` on a point-to-point link with the host
    /// (the container: one end of a veth pair, the host's end `tb<N>`; the VM: a virtio-net
    /// card on a tap `tbt<N>` owned by the VMM): a /30 from 10.201.0.0/16 (or
    /// TWINBOX_NET_POOL), a default route via the host's end, and the host's name server in
    /// /etc/resolv.conf. `--timings` and `--json` print the link, so the host can reach the
    /// box. `--net nat` also masquerades the box's traffic out of the host's default route
    /// (the nftables table `ip twinbox`, and ip_forward on). Without `--net` the box has only
    /// `lo`. Needs CAP_NET_ADMIN (and /dev/net/tun for the VM). Put the command after `--`.
    #[arg(
        long,
        value_name = "link|nat",
        num_args = 0..=1,
        default_missing_value = "link"
    )]
    pub net: Option<String>,
    /// The command to run and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

impl RunArgs {
    /// A RunSpec from these options; box-specific fields are filled in by the caller.
    pub fn to_spec(&self, spawn_ns: u64) -> anyhow::Result<RunSpec> {
        let rootfs = match &self.rootfs {
            Some(path) => path.clone(),
            None => twinbox_spec::artifacts::require(
                &twinbox_spec::artifacts::rootfs_image(),
                "root filesystem image",
            )
            .map_err(anyhow::Error::msg)?,
        };
        let mut spec = RunSpec::new(rootfs, self.command.clone());
        spec.spawn_ns = spawn_ns;
        spec.memory_mib = self.memory;
        spec.hostname = self.hostname.clone();
        spec.env = self.env.clone();
        spec.cwd = self.workdir.clone();
        // Parsed here, not by clap, so a bad value is one line and exit 125 like other bad
        // input (clap's own errors exit 2 with a usage screen).
        spec.net = self
            .net
            .as_deref()
            .map(str::parse::<twinbox_spec::NetMode>)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        if let Some(seconds) = self.timeout {
            anyhow::ensure!(
                seconds.is_finite() && seconds > 0.0,
                "--timeout {seconds}: must be a positive number of seconds"
            );
            spec.time_limit = Some(std::time::Duration::from_secs_f64(seconds));
        }
        Ok(spec)
    }

    /// Prints what `--timings`/`--json` asked for and returns the workload's status.
    pub fn finish(&self, report: &RunReport) -> i32 {
        for note in &report.notes {
            eprintln!("twinbox: note: {note}");
        }
        if let twinbox_spec::Outcome::Failed(reason) = &report.outcome {
            eprintln!("twinbox: {} failed: {reason}", report.box_kind);
        }
        if self.timings {
            eprint!("{}", report.timeline.render());
            if let Some(link) = &report.network {
                eprintln!("network: {link}");
            }
        }
        if self.json {
            super::say(format_args!("{}", report.to_json()));
        }
        report.outcome.exit_status()
    }
}
