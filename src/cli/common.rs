//! Arguments and output shared by `vm run` and `ctr run`, so the two print comparable
//! lines.

use clap::Args;
use std::io::IsTerminal;
use std::path::PathBuf;
use twinbox_spec::{RunReport, RunSpec, StdinMode};

/// Where the workload's stdin comes from: twinbox's own, unless it is a terminal nobody
/// asked to attach (`-i`/`-t`).
fn stdin_mode(attach_terminal: bool, stdin_is_terminal: bool) -> StdinMode {
    if stdin_is_terminal && !attach_terminal {
        StdinMode::Null
    } else {
        StdinMode::Inherit
    }
}

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
    /// Keep stdin attached even when it is a terminal.
    ///
    /// The workload reads twinbox's stdin in both boxes (`... | twinbox vm run -- wc -l`);
    /// its end is the workload's end of input. When stdin is a terminal and neither `-i`
    /// nor `-t` is given, the workload gets end of input at once instead, so a command that
    /// reads stdin does not silently take over the terminal.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Run the workload on a pseudo-terminal inside the box (`-it -- /bin/sh`: a shell).
    ///
    /// The box gets a pty of its own (the container: a pty of its devpts as the workload's
    /// controlling terminal; the VM: init allocates it in the guest), relayed to this
    /// terminal in raw mode: window size passed in and resizes forwarded, Ctrl-C goes to the
    /// workload, not to twinbox. stdout and stderr arrive merged on stdout, as on any
    /// terminal. The terminal is restored when the run ends.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Print twinbox-init's own lines on stderr (and, for the VM, the serial console with
    /// the kernel log); without it stdout and stderr carry the workload's output alone.
    #[arg(short = 'v', long)]
    pub verbose: bool,
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
        spec.tty = self.tty;
        spec.verbose = self.verbose;
        spec.stdin = stdin_mode(self.interactive || self.tty, std::io::stdin().is_terminal());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminal_is_attached_only_when_asked_and_anything_else_always() {
        assert_eq!(stdin_mode(false, true), StdinMode::Null);
        assert_eq!(stdin_mode(true, true), StdinMode::Inherit);
        assert_eq!(stdin_mode(false, false), StdinMode::Inherit);
        assert_eq!(stdin_mode(true, false), StdinMode::Inherit);
    }
}
