//! The microVM box restored from a snapshot: `twinbox vm run --snapshot DIR --json`, a
//! process of its own measured exactly as the `vm` box is ([`super::vm`]), but where that
//! box boots the kernel, this one resumes a VM saved at "init waits for its job".
//!
//! The snapshot is taken once (`twinbox vm snapshot`) for the root image, kernel, vCPUs
//! and memory the runs ask for, by the first run that needs it and before its clock
//! starts: that run is stamped again after the snapshot is written, so no counted time
//! holds a boot. It lives in a directory of the temporary directory named after the bench's
//! pid, removed when the box is dropped; one a killed bench left behind is removed by the
//! next bench that takes a snapshot.

use super::{process, vm, Capabilities, Guest, Instance, NetAt, Runner, TimeLimit};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;
use twinbox_spec::{Outcome, RunReport, RunSpec};

/// Name of this box in tables and on the command line.
pub const NAME: &str = "vm-snapshot";

/// What a VM restored from a snapshot can do: the `vm` box's workloads and memory figures,
/// and `density` instances (K restores of one snapshot), but no extra disk or network (a
/// snapshot is taken without them, and `vm run --snapshot` refuses `--disk` and `--net`).
pub const CAPABILITIES: Capabilities = Capabilities {
    guest: Guest::Resumed,
    memory_in_report: true,
    instance: Some(Instance::TwinboxVmSnapshot),
    disk_at: None,
    host_binaries: false,
    time_limit: TimeLimit::Vm,
    net: NetAt::Missing("a VM restored from a snapshot has no network yet"),
};

/// The start of the snapshot directories' names; the bench's pid follows.
const DIR_PREFIX: &str = "twinbox-bench-snapshot-";

/// How long taking the snapshot (one Linux boot) may take at most, whatever the runs'
/// own limit: a software-emulated CPU boots in tens of seconds.
const TAKE_LIMIT: Duration = Duration::from_secs(600);

/// The note of every report of this box, after the `vm` box's.
pub const NOTE: &str = "restored from a snapshot taken once before the counted runs \
     (twinbox vm snapshot: booted to init waiting for its job); the memory file is mapped \
     copy-on-write, so guest RAM touched counts the page-cache pages the run read";

/// What a snapshot was taken for: a run with other values needs another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    /// The root image.
    pub rootfs: PathBuf,
    /// The kernel booted (twinbox's default when `None`).
    pub kernel: Option<PathBuf>,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory, MiB.
    pub memory_mib: u32,
}

impl Machine {
    fn of(spec: &RunSpec) -> Self {
        Self {
            rootfs: spec.rootfs.clone(),
            kernel: spec.kernel.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
        }
    }
}

/// A snapshot on disk, removed when dropped.
pub struct Taken {
    machine: Machine,
    dir: PathBuf,
}

impl Taken {
    /// Takes a snapshot of `machine` for the `density` scenario's instances, in a
    /// directory of its own beside the box's (`...-<pid>-density`, swept as the box's is
    /// when a killed bench leaves it), with `twinbox` (`--no-jail` unless `jail`).
    pub fn for_instances(twinbox: &Path, machine: Machine, jail: bool) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}-density", std::process::id()));
        let t = Taken { machine, dir };
        take(twinbox, &t, jail)?;
        Ok(t)
    }

    /// Its directory (`twinbox vm run --snapshot DIR`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!("cannot remove the snapshot {}: {e}", self.dir.display())
            }
            _ => {}
        }
    }
}

/// twinbox microVM runner, restoring a snapshot.
pub struct VmSnapshot {
    /// The twinbox binary.
    pub twinbox: PathBuf,
    /// Start the VMM's guest-facing threads in its jail (`--no-jail` otherwise).
    pub jail: bool,
    /// Restore in the VMM's own cgroup (`--no-cgroup` otherwise), as the `vm` box runs.
    pub cgroup: bool,
    taken: Mutex<Option<Taken>>,
}

impl VmSnapshot {
    /// The box, with no snapshot yet.
    pub fn new(twinbox: PathBuf, jail: bool, cgroup: bool) -> Self {
        Self {
            twinbox,
            jail,
            cgroup,
            taken: Mutex::new(None),
        }
    }

    /// The directory of a snapshot for `spec`'s machine, and whether it was taken now.
    fn snapshot_for(&self, spec: &RunSpec) -> Result<(PathBuf, bool), String> {
        let machine = Machine::of(spec);
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = taken.as_ref().filter(|t| t.machine == machine) {
            return Ok((t.dir.clone(), false));
        }
        // Another machine: the old snapshot goes first.
        *taken = None;
        let parent = std::env::temp_dir();
        sweep(&parent);
        let dir = parent.join(format!("{DIR_PREFIX}{}", std::process::id()));
        // The directory is removed on every path from here (a failed take may leave part).
        let t = Taken { machine, dir };
        take(&self.twinbox, &t, self.jail)?;
        let dir = t.dir.clone();
        *taken = Some(t);
        Ok((dir, true))
    }
}

/// Runs `twinbox vm snapshot` for `t`.
fn take(twinbox: &Path, t: &Taken, jail: bool) -> Result<(), String> {
    let mut cmd = Command::new(twinbox);
    cmd.args(snapshot_arguments(&t.machine, &t.dir, jail));
    let start = twinbox_spec::clock::monotonic_ns();
    let done = process::run(cmd, start, true, Some(TAKE_LIMIT))?;
    match done.outcome {
        Outcome::Exited(0) => Ok(()),
        other => {
            let output = done.output.unwrap_or_default();
            Err(format!(
                "twinbox vm snapshot: {other:?}: {}",
                output.trim().lines().last().unwrap_or("no output")
            ))
        }
    }
}

/// Removes the snapshot directories of benches that are gone (killed before they could).
fn sweep(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|p| p.split('-').next()?.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// `twinbox vm snapshot`'s arguments for `machine` into `dir`.
fn snapshot_arguments(machine: &Machine, dir: &Path, jail: bool) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["vm".into(), "snapshot".into(), "--out".into()];
    a.push(dir.into());
    a.push("--rootfs".into());
    a.push(machine.rootfs.clone().into());
    if let Some(kernel) = &machine.kernel {
        a.push("--kernel".into());
        a.push(kernel.into());
    }
    a.push("--vcpus".into());
    a.push(machine.vcpus.to_string().into());
    a.push("--memory".into());
    a.push(machine.memory_mib.to_string().into());
    if !jail {
        a.push("--no-jail".into());
    }
    a
}

/// `twinbox vm run --snapshot DIR`'s arguments for `spec`: the `vm` box's, without the
/// kernel (the snapshot's is already running), `--no-cgroup` unless `cgroup`; one line for
/// what a restore cannot take.
pub fn arguments(
    spec: &RunSpec,
    dir: &Path,
    jail: bool,
    cgroup: bool,
) -> Result<Vec<OsString>, String> {
    if spec.initrd.is_some() || spec.cmdline_extra.is_some() {
        return Err(
            "the vm-snapshot box resumes a booted kernel: it takes no initrd or kernel \
             command line"
                .into(),
        );
    }
    let mut spec = spec.clone();
    spec.kernel = None;
    let mut a = vm::arguments(&spec, jail)?;
    // After `vm run --json`.
    a.splice(3..3, ["--snapshot".into(), dir.into()]);
    if !cgroup {
        // Among the options, before the `--` that ends them.
        a.insert(3, "--no-cgroup".into());
    }
    Ok(a)
}

impl Runner for VmSnapshot {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn run(&self, spec: &RunSpec) -> Result<RunReport, String> {
        let (dir, taken_now) = self.snapshot_for(spec)?;
        let mut spec = spec.clone();
        if taken_now {
            // The clock of this run starts after the snapshot, as every other run's does.
            spec.spawn_ns = twinbox_spec::clock::monotonic_ns();
        }
        let mut report = vm::run_twinbox_vm(
            &self.twinbox,
            arguments(&spec, &dir, self.jail, self.cgroup)?,
            &spec,
        )?;
        report.notes.push(NOTE.into());
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_gets_the_vm_boxs_arguments_after_the_snapshot_without_a_kernel() {
        let mut spec = RunSpec::new("/img/rootfs.ext4", vec!["/bin/true".into()]);
        spec.kernel = Some("/k/vmlinux".into());
        spec.vcpus = 2;
        spec.memory_mib = 256;
        let a = arguments(&spec, Path::new("/tmp/snap"), true, true).unwrap();
        let a: Vec<&str> = a.iter().map(|s| s.to_str().unwrap()).collect();
        assert_eq!(&a[..5], ["vm", "run", "--json", "--snapshot", "/tmp/snap"]);
        assert!(!a.contains(&"--kernel"), "{a:?}");
        assert!(!a.contains(&"--no-cgroup"), "{a:?}");
        assert_eq!(&a[a.len() - 2..], ["--", "/bin/true"]);
        // Without its cgroup, as the vm box with `bench --no-cgroup`: an option, before `--`.
        let a = arguments(&spec, Path::new("/tmp/snap"), true, false).unwrap();
        let a: Vec<&str> = a.iter().map(|s| s.to_str().unwrap()).collect();
        let end = a.iter().position(|s| *s == "--").unwrap();
        assert!(a[..end].contains(&"--no-cgroup"), "{a:?}");
        spec.cmdline_extra = Some("quiet".into());
        let e = arguments(&spec, Path::new("/tmp/snap"), true, true).unwrap_err();
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn the_snapshot_is_taken_for_the_runs_machine() {
        let mut spec = RunSpec::new("/img/rootfs.ext4", vec!["/bin/true".into()]);
        spec.kernel = Some("/k/vmlinux".into());
        spec.memory_mib = 192;
        let a = snapshot_arguments(&Machine::of(&spec), Path::new("/tmp/snap"), false);
        let a: Vec<&str> = a.iter().map(|s| s.to_str().unwrap()).collect();
        assert_eq!(
            a,
            [
                "vm",
                "snapshot",
                "--out",
                "/tmp/snap",
                "--rootfs",
                "/img/rootfs.ext4",
                "--kernel",
                "/k/vmlinux",
                "--vcpus",
                "1",
                "--memory",
                "192",
                "--no-jail"
            ]
        );
    }

    #[test]
    fn the_sweep_removes_only_snapshots_of_benches_that_are_gone() {
        let parent =
            std::env::temp_dir().join(format!("twinbox-sweep-test-{}", std::process::id()));
        let gone = parent.join(format!("{DIR_PREFIX}{}", u32::MAX - 1));
        // Our parent (the test harness's) is alive.
        let alive = parent.join(format!(
            "{DIR_PREFIX}{}",
            std::os::unix::process::parent_id()
        ));
        let gone_density = parent.join(format!("{DIR_PREFIX}{}-density", u32::MAX - 1));
        let other = parent.join("something-else-4242");
        for d in [&gone, &gone_density, &alive, &other] {
            std::fs::create_dir_all(d).unwrap();
        }
        sweep(&parent);
        assert!(!gone.exists() && !gone_density.exists());
        assert!(alive.exists() && other.exists());
        std::fs::remove_dir_all(&parent).unwrap();
    }
}
