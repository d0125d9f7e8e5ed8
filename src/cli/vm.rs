//! `twinbox vm run`: one workload in a microVM booted by twinbox's own VMM.

use super::common::{ImageForm, RunArgs};
use anyhow::Context;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use twinbox_spec::DiskSpec;

/// `twinbox vm ...`
#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Boot the image in a microVM, run CMD as its workload, exit with CMD's status.
    Run(Box<VmRunArgs>),
    /// Boot the image to "init waits for its job" and save the VM into DIR, for `vm run
    /// --snapshot DIR`.
    Snapshot(VmSnapshotArgs),
}

/// `twinbox vm snapshot` options.
#[derive(Args, Debug)]
pub struct VmSnapshotArgs {
    /// The snapshot's directory (created; must be empty).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 128)]
    pub memory: u32,
    /// Root filesystem image (ext4). Default: the one built by scripts/build-artifacts.
    #[arg(long, value_name = "IMG")]
    pub rootfs: Option<PathBuf>,
    /// Guest kernel. Default: the one built by scripts/build-artifacts.
    #[arg(long, value_name = "KERNEL")]
    pub kernel: Option<PathBuf>,
    /// Save the serial console to FILE.
    #[arg(long, value_name = "FILE")]
    pub console_log: Option<PathBuf>,
    /// Run the guest-facing threads outside the jail (debugging).
    #[arg(long)]
    pub no_jail: bool,
}

/// `twinbox vm run` options.
#[derive(Args, Debug)]
pub struct VmRunArgs {
    /// Guest kernel: ELF vmlinux (PVH entry when it has the note) or bzImage. Default: the
    /// one built by scripts/build-artifacts.
    #[arg(long, value_name = "KERNEL")]
    pub kernel: Option<PathBuf>,
    /// Number of vCPUs (default 1; with --snapshot, the snapshot's).
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,
    /// Resume the VM saved by `twinbox vm snapshot --out DIR` instead of booting, and hand
    /// it CMD as its job (with its env, workdir, hostname, stdin and output, `-t`).
    /// --memory, --vcpus and the root image default to the snapshot's; the root image
    /// must be the one it was taken with, unchanged. Not with --net, --disk, --initrd,
    /// --cmdline-extra or another --kernel: the guest resumes with the machine it was
    /// saved with.
    #[arg(long, value_name = "DIR")]
    pub snapshot: Option<PathBuf>,
    /// Extra disk as a virtio-blk device (/dev/vdb, /dev/vdc...), read-write unless `:ro`
    /// (repeatable).
    #[arg(long = "disk", value_name = "PATH[:ro]")]
    pub disks: Vec<DiskSpec>,
    /// Initial ramdisk. Without it a Linux kernel (a bzImage, or a vmlinux with its
    /// "Linux" ELF note) boots through twinbox's own initramfs, which mounts the image and
    /// starts twinbox-init; any other kernel boots with none.
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Appended to the kernel command line.
    #[arg(long, value_name = "ARGS")]
    pub cmdline_extra: Option<String>,
    /// Save the serial console (the kernel log and twinbox-init's own lines) to FILE. It is
    /// never mixed into the workload's stdout; without this (or `--verbose`) it is dropped.
    #[arg(long, value_name = "FILE")]
    pub console_log: Option<PathBuf>,
    /// Run the VMM's guest-facing threads (vCPUs, event loop, console) outside its jail.
    ///
    /// By default they run jailed once the VM's files are open: an empty root in new
    /// mount/IPC/network namespaces, no capabilities, uid/gid 65534. Use this only to debug
    /// (the jail needs root). Every thread stays under its seccomp filter either way
    /// (TWINBOX_VMM_SECCOMP=log|off relaxes those, for debugging).
    #[arg(long)]
    pub no_jail: bool,
    /// Run the VMM outside a cgroup of its own.
    ///
    /// By default (as root) the VMM process moves into a fresh cgroup for the run: memory
    /// limited to guest RAM plus an overhead (32 MiB + 1/64 of guest RAM), no swap, a few
    /// tasks, so a VMM that grows beyond its guest is OOM-killed instead of eating the host.
    /// It moves back and removes the cgroup when the run ends; a killed run's cgroup is
    /// removed by the next twinbox run. Use this where no cgroup can be made (no writable memory and pids
    /// hierarchies).
    #[arg(long)]
    pub no_cgroup: bool,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Runs a `vm` subcommand.
pub fn main(command: VmCommand, spawn_ns: u64) -> anyhow::Result<i32> {
    match command {
        VmCommand::Run(args) => run(*args, spawn_ns),
        VmCommand::Snapshot(args) => snapshot(args, spawn_ns),
    }
}

fn snapshot(args: VmSnapshotArgs, spawn_ns: u64) -> anyhow::Result<i32> {
    let rootfs = match args.rootfs {
        Some(path) => path,
        None => twinbox_spec::artifacts::require(
            &twinbox_spec::artifacts::rootfs_image(),
            "root filesystem image",
        )
        .map_err(anyhow::Error::msg)?,
    };
    // The job is handed over at each restore; this one is never sent.
    let mut spec = twinbox_spec::RunSpec::new(rootfs, vec!["/bin/true".into()]);
    spec.spawn_ns = spawn_ns;
    spec.vcpus = args.vcpus;
    spec.memory_mib = args.memory;
    spec.kernel = args.kernel;
    spec.console_log = args.console_log;
    let options = vmm::RunOptions {
        jail: !args.no_jail,
        ..vmm::RunOptions::default()
    };
    let taken = vmm::snapshot::take(&spec, &args.out, options)?;
    let ms = |ns: u64| ns.saturating_sub(taken.spawn_ns) as f64 / 1e6;
    super::say(format_args!(
        "snapshot {}: {} vCPU, {} MiB ({:.1} MiB of it written), init ready at {:.0} ms, saved at {:.0} ms",
        taken.dir.display(),
        taken.header.vcpus,
        taken.header.memory_mib,
        taken.memory_written as f64 / f64::from(1 << 20),
        ms(taken.ready_ns),
        ms(taken.written_ns),
    ));
    Ok(0)
}

fn run(mut args: VmRunArgs, spawn_ns: u64) -> anyhow::Result<i32> {
    // The snapshot's state is read and checked once, here; the restore takes it from us.
    let snapshot = args
        .snapshot
        .as_deref()
        .map(vmm::snapshot::Snapshot::open)
        .transpose()?;
    if let Some(snapshot) = &snapshot {
        // The root the user left out is the snapshot's (it must still be that very file,
        // unchanged: the restore checks).
        if args.run.rootfs.is_none() && args.run.image.is_none() {
            // Only from a snapshot no one else could have written (see `is_private`).
            snapshot.is_private().context(
                "give --rootfs: twinbox takes the root image a snapshot names only from \
                 one that is this user's own",
            )?;
            args.run.rootfs = Some(snapshot.header().rootfs.path.clone());
        }
    }
    // `_image` holds the image's disk in the cache until the run is over.
    let (mut spec, _image) = args.run.to_spec(spawn_ns, ImageForm::Ext4)?;
    spec.kernel = args.kernel.clone();
    spec.vcpus = args.vcpus.unwrap_or(1);
    if let Some(snapshot) = &snapshot {
        // Sizes the user left out are the snapshot's.
        let header = snapshot.header();
        spec.vcpus = args.vcpus.unwrap_or(header.vcpus);
        if args.run.memory.is_none() {
            spec.memory_mib = header.memory_mib;
        }
    }
    spec.disks = args.disks.clone();
    spec.initrd = args.initrd.clone();
    spec.cmdline_extra = args.cmdline_extra.clone();
    spec.console_log = args.console_log.clone();
    // SIGINT/SIGTERM stop the VM cleanly; we then exit like a shell would (130/143).
    let interrupt =
        twinbox_spec::interrupt::Interrupt::install().context("cannot install signal handlers")?;
    let options = vmm::RunOptions {
        jail: !args.no_jail,
        // After the run the CLI only prints the report and exits: its thread can stay
        // under the caller's filter for good.
        lock_caller_thread: true,
        ..vmm::RunOptions::default()
    };
    // This process is the VMM alone: it may move itself into the run's cgroup. Root only:
    // another user cannot make cgroups, and keeps hearing first about what it lacks
    // (/dev/kvm, CAP_NET_ADMIN).
    // SAFETY: geteuid has no arguments and cannot fail.
    let own_cgroup = !args.no_cgroup && unsafe { libc::geteuid() } == 0;
    let report = if let Some(snapshot) = snapshot {
        vmm::snapshot::restore(&spec, snapshot, Some(&interrupt.fd()), options, own_cgroup)?
    } else if own_cgroup {
        vmm::run_in_own_cgroup(&spec, Some(&interrupt.fd()), options)?
    } else {
        vmm::run_with(&spec, Some(&interrupt.fd()), options)?
    };
    let status = args.run.finish(&report);
    Ok(match interrupt.signal() {
        Some(signal) => 128 + signal,
        None => status,
    })
}
