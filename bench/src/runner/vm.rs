//! The microVM box: twinbox's own VMM as a user starts it, `twinbox vm run --json`, a
//! process of its own — so its memory is measured from outside exactly as the peer VMMs'
//! are ([`process::run_vmm`]: own RSS and PSS without guest RAM, guest RAM touched), and
//! its start-up counts what a user's pays (exec, loading, its cgroup and jail).
//!
//! The phases inside come from the `RunReport` it prints as JSON after the workload's
//! stdout: they are stamped on the host's CLOCK_MONOTONIC, the bench's clock too. `spawn`
//! is the bench's (before the fork) and `torn_down` is the process reaped, as for the
//! peers. A bench interrupted by SIGINT/SIGTERM sends it SIGTERM, on which it stops its VM
//! and tears down; a bench that dies does too (parent-death signal).

use super::{process, Capabilities, DiskAt, Guest, Instance, NetAt, Runner, TimeLimit};
use nix::sys::signal::Signal;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use twinbox_spec::{Outcome, Phase, RunReport, RunSpec, Timeline};

/// Name of this box in tables and on the command line.
pub const NAME: &str = "vm";

/// What twinbox's VM can do.
pub const CAPABILITIES: Capabilities = Capabilities {
    guest: Guest::Kernel,
    memory_in_report: true,
    instance: Some(Instance::TwinboxVm),
    disk_at: Some(DiskAt::VirtioBlk),
    host_binaries: false,
    time_limit: TimeLimit::Vm,
    // virtio-net over a tap the VMM makes in the host's namespace before its jail.
    net: NetAt::Link,
};

/// How much longer than the VM's own time limit the bench waits for the process: the
/// VMM stops its VM at its limit and reports; this only stops a VMM that hangs.
pub(super) const PROCESS_GRACE: Duration = Duration::from_secs(5);

/// The note of every report of this box.
pub const NOTE: &str = "twinbox vm run as a process: spawn (bench, before the fork) to process \
     reaped; memory = its smaps without guest RAM (RSS, PSS) and guest RAM touched, \
     read while it runs and at its exit, as for every VMM";

/// twinbox microVM runner.
pub struct Vm {
    /// The twinbox binary.
    pub twinbox: PathBuf,
    /// Start the VMM's guest-facing threads in its jail (`--no-jail` otherwise).
    pub jail: bool,
    /// Run the VMM in its own cgroup (`--no-cgroup` otherwise).
    pub cgroup: bool,
}

/// `twinbox`'s arguments that run `spec` (`--json`: the report comes after the
/// workload's stdout); one line saying what cannot be passed otherwise.
pub fn arguments(spec: &RunSpec, jail: bool) -> Result<Vec<OsString>, String> {
    if spec.user.is_some() || spec.rootfs_layers.is_some() || spec.tty {
        return Err(
            "the vm box runs `twinbox vm run`, which takes no workload user, layer \
             directories or terminal from the bench"
                .into(),
        );
    }
    let mut a: Vec<OsString> = vec!["vm".into(), "run".into(), "--json".into()];
    let mut pair = |flag: &str, value: OsString| {
        a.push(flag.into());
        a.push(value);
    };
    pair("--rootfs", spec.rootfs.clone().into());
    if let Some(kernel) = &spec.kernel {
        pair("--kernel", kernel.into());
    }
    pair("--vcpus", spec.vcpus.to_string().into());
    pair("--memory", spec.memory_mib.to_string().into());
    for disk in &spec.disks {
        let mut value = disk.path.clone().into_os_string();
        value.push(if disk.read_only { ":ro" } else { ":rw" });
        pair("--disk", value);
    }
    if let Some(initrd) = &spec.initrd {
        pair("--initrd", initrd.into());
    }
    if let Some(extra) = &spec.cmdline_extra {
        pair("--cmdline-extra", extra.into());
    }
    if let Some(log) = &spec.console_log {
        pair("--console-log", log.into());
    }
    if let Some(net) = spec.net {
        pair("--net", net.to_string().into());
    }
    if let Some(limit) = spec.time_limit {
        pair("--timeout", limit.as_secs_f64().to_string().into());
    }
    if let Some(name) = &spec.hostname {
        pair("--hostname", name.into());
    }
    for var in &spec.env {
        pair("--env", var.into());
    }
    pair("--workdir", spec.cwd.clone().into());
    if !jail {
        a.push("--no-jail".into());
    }
    if spec.verbose {
        a.push("--verbose".into());
    }
    a.push("--".into());
    a.extend(spec.argv.iter().map(OsString::from));
    Ok(a)
}

/// Splits what `twinbox vm run --json` wrote on stdout into the workload's output and the
/// report that follows it (pretty JSON, its first field `box_kind`); `None` when there is
/// no report (twinbox failed before running anything).
pub fn split_report(stdout: &str) -> Option<(&str, RunReport)> {
    let at = stdout.rfind("{\n  \"box_kind\"")?;
    let report = serde_json::from_str(&stdout[at..]).ok()?;
    Some((&stdout[..at], report))
}

impl Vm {
    /// This box's `twinbox` arguments for `spec`: [`arguments`], and `--no-cgroup` unless
    /// [`Vm::cgroup`].
    fn arguments(&self, spec: &RunSpec) -> Result<Vec<OsString>, String> {
        let mut args = arguments(spec, self.jail)?;
        if !self.cgroup {
            // Among the options, before the `--` that ends them (right after `vm run`).
            args.insert(2, "--no-cgroup".into());
        }
        Ok(args)
    }
}

impl Runner for Vm {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn run(&self, spec: &RunSpec) -> Result<RunReport, String> {
        run_twinbox_vm(&self.twinbox, self.arguments(spec)?, spec)
    }
}

/// Runs `twinbox ARGS` (a `vm run --json` of `spec`) as a VMM process measured like every
/// peer VMM, and its report with the bench's own spawn and teardown stamps.
pub(super) fn run_twinbox_vm(
    twinbox: &std::path::Path,
    args: Vec<OsString>,
    spec: &RunSpec,
) -> Result<RunReport, String> {
    let mut cmd = Command::new(twinbox);
    cmd.args(args);
    let limit = spec.time_limit.map(|l| l + PROCESS_GRACE);
    let guest_ram_kib = u64::from(spec.memory_mib) * 1024;
    let done = process::run_vmm(
        cmd,
        Signal::SIGTERM,
        spec.spawn_ns,
        true,
        limit,
        guest_ram_kib,
    )?;
    Ok(report_of(spec, done))
}

/// The run's report: the VMM's own phases, outcome, notes and link, with the bench's
/// spawn and reaping stamps, its measured memory and the process's CPU time.
pub(super) fn report_of(spec: &RunSpec, done: process::Finished) -> RunReport {
    let all = done.output.unwrap_or_default();
    let (stdout, stderr) = all.split_at(done.stdout_len.min(all.len()));
    let Some((workload_stdout, inner)) = split_report(stdout) else {
        let outcome = match done.outcome {
            Outcome::Failed(why) => Outcome::Failed(format!("twinbox vm run: {why}")),
            other => Outcome::Failed(format!(
                "twinbox vm run ended with {other:?} and no report: {}",
                stderr.trim()
            )),
        };
        return RunReport {
            box_kind: twinbox_spec::BoxKind::Vm,
            outcome,
            timeline: done.timeline,
            output: Some(all.clone()),
            usage: done.usage,
            notes: vec![NOTE.into()],
            network: None,
        };
    };
    let mut timeline = Timeline::starting_at(spec.spawn_ns);
    // A restored VM's report also has `restored` (the vm-snapshot box).
    for phase in Phase::WITH_RESTORED {
        if !matches!(phase, Phase::Spawn | Phase::TornDown) {
            if let Some(at) = inner.timeline.get(phase) {
                timeline.record(phase, at);
            }
        }
    }
    if let Some(at) = done.timeline.get(Phase::TornDown) {
        timeline.record(Phase::TornDown, at);
    }
    // The process killed at the bench's limit says more than the report it never wrote.
    let outcome = match done.outcome {
        Outcome::Failed(why) => Outcome::Failed(why),
        _ => inner.outcome,
    };
    let mut usage = done.usage;
    // The VMM counts its guest RAM's resident pages at teardown, exactly; the bench's
    // readings of the same mapping can only be lower or equal.
    usage.guest_memory_touched_kib = inner
        .usage
        .guest_memory_touched_kib
        .max(usage.guest_memory_touched_kib);
    let mut notes = inner.notes;
    notes.push(NOTE.into());
    if !done.exit_read {
        notes.push("its memory was not read at its exit (the trace failed)".into());
    }
    RunReport {
        box_kind: inner.box_kind,
        outcome,
        timeline,
        output: Some(format!("{workload_stdout}{stderr}")),
        usage,
        notes,
        network: inner.network,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinbox_spec::DiskSpec;

    #[test]
    fn the_spec_becomes_vm_run_arguments() {
        let mut spec = RunSpec::new(
            "/img/rootfs.ext4",
            vec!["sh".into(), "-c".into(), "x y".into()],
        );
        spec.kernel = Some("/k/vmlinux".into());
        spec.vcpus = 2;
        spec.memory_mib = 256;
        spec.disks = vec![DiskSpec {
            path: "/scratch.img".into(),
            read_only: true,
        }];
        spec.net = Some(twinbox_spec::NetMode::Link);
        spec.time_limit = Some(Duration::from_millis(1500));
        spec.env = vec!["A=b c".into()];
        let a = arguments(&spec, false).unwrap();
        let a: Vec<&str> = a.iter().map(|s| s.to_str().unwrap()).collect();
        assert_eq!(
            a,
            [
                "vm",
                "run",
                "--json",
                "--rootfs",
                "/img/rootfs.ext4",
                "--kernel",
                "/k/vmlinux",
                "--vcpus",
                "2",
                "--memory",
                "256",
                "--disk",
                "/scratch.img:ro",
                "--net",
                "link",
                "--timeout",
                "1.5",
                "--env",
                "A=b c",
                "--workdir",
                "/",
                "--no-jail",
                "--",
                "sh",
                "-c",
                "x y"
            ]
        );
        spec.tty = true;
        let e = arguments(&spec, true).unwrap_err();
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn the_vm_box_without_its_cgroup_says_so_among_the_options() {
        let spec = RunSpec::new("/img/rootfs.ext4", vec!["--no-cgroup".into()]);
        let vm = |cgroup| Vm {
            twinbox: "twinbox".into(),
            jail: true,
            cgroup,
        };
        let with = vm(true).arguments(&spec).unwrap();
        assert_eq!(with, arguments(&spec, true).unwrap());
        let without = vm(false).arguments(&spec).unwrap();
        let options = without.iter().position(|a| a == "--").unwrap();
        assert_eq!(
            without[..options]
                .iter()
                .filter(|a| *a == "--no-cgroup")
                .count(),
            1,
            "{without:?}"
        );
        assert_eq!(without[..2], ["vm", "run"]);
        assert_eq!(without[options + 1..], ["--no-cgroup"]);
    }

    #[test]
    fn the_report_is_found_after_any_workload_output() {
        let report = RunReport {
            box_kind: twinbox_spec::BoxKind::Vm,
            outcome: Outcome::Exited(3),
            timeline: Timeline::starting_at(5),
            output: None,
            usage: Default::default(),
            notes: vec![],
            network: None,
        };
        let json = report.to_json();
        // Output that ends without a newline, and that itself looks like a report.
        let out = format!("{json}\nevents per second: 12{json}\n");
        let (before, found) = split_report(&out).unwrap();
        assert_eq!(found, report);
        assert_eq!(before, format!("{json}\nevents per second: 12"));
        assert!(split_report("twinbox: /dev/kvm: no such file\n").is_none());
    }
}
