//! `twinbox ctr run`: one workload in a container made from the same image the VM boots.

use super::common::{ImageForm, RunArgs};
use clap::{Args, Subcommand};
use twinbox_spec::DiskSpec;

/// `twinbox ctr ...`
#[derive(Subcommand, Debug)]
pub enum CtrCommand {
    /// Run CMD in a container from the image, exit with CMD's status.
    Run(CtrRunArgs),
}

/// `twinbox ctr run` options.
#[derive(Args, Debug)]
pub struct CtrRunArgs {
    /// CPU limit in CPUs (cgroup CFS quota; e.g. 0.5). Default: one CPU, like the VM's one
    /// vCPU.
    #[arg(long, value_name = "N")]
    pub cpus: Option<f64>,
    /// Maximum number of tasks in the container (cgroup pids.max).
    #[arg(long, value_name = "N")]
    pub pids: Option<u32>,
    /// Extra disk: the host file is bind-mounted at /mnt/disk0, /mnt/disk1, ... inside
    /// the container, read-write unless `:ro` (repeatable; the VM sees /dev/vdb...).
    #[arg(long = "disk", value_name = "PATH[:ro]")]
    pub disks: Vec<DiskSpec>,
    /// Run in a user namespace: container ids 0-65535 are a range of host ids leased for
    /// this run alone (from 1879048192 up, none of /etc/subuid, /etc/subgid, passwd, group).
    ///
    /// Only those four files are read: ids that another name service hands out (SSSD's AD
    /// id mapping covers 200000-2000200000 by default; LDAP, winbind, nsswitch's subid) are
    /// not seen. On such a host keep 1879048192-2147352575 out of that service's ranges, or
    /// list the ids it uses there in /etc/subuid and /etc/subgid (e.g.
    /// `sssd:1879048192:1000000`), which twinbox then skips.
    #[arg(long)]
    pub userns: bool,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Runs a `ctr` subcommand.
pub fn main(command: CtrCommand, spawn_ns: u64) -> anyhow::Result<i32> {
    match command {
        CtrCommand::Run(args) => run(args, spawn_ns),
    }
}

fn run(args: CtrRunArgs, spawn_ns: u64) -> anyhow::Result<i32> {
    // `_image` holds the layers in the cache until the run is over.
    let (mut spec, _image) = args.run.to_spec(spawn_ns, ImageForm::Layers)?;
    spec.cpus = args.cpus;
    spec.pids_limit = args.pids;
    spec.disks = args.disks.clone();
    spec.user_namespace = args.userns;
    // SIGINT/SIGTERM kill the container and tear it down (container::run holds a
    // twinbox_spec::interrupt::Interrupt); we then exit like a shell would (130/143).
    let report = match container::run(&spec) {
        Ok(report) => report,
        // Stopped during start-up: the box is already torn down; exit as the signal says.
        Err(error) => match twinbox_spec::interrupt::received() {
            Some(signal) => {
                super::complain(format_args!("twinbox: {error}\n"));
                return Ok(128 + signal);
            }
            None => return Err(error.into()),
        },
    };
    let status = args.run.finish(&report);
    Ok(match twinbox_spec::interrupt::received() {
        Some(signal) => 128 + signal,
        None => status,
    })
}
