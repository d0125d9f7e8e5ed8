//! What the peer runners share: finding their binaries, a per-run directory that cannot
//! outlive the run, and how a finished peer process becomes a [`RunReport`].

use super::process::Finished;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use twinbox_spec::{BoxKind, Outcome, RunReport};

/// What a peer VMM that boots our kernel and image can do: disks as virtio-blk drives, a
/// tap link, the VM's time limit; its memory is read from its process
/// ([`super::process::run_vmm`]).
pub const KERNEL_VMM: super::Capabilities = super::Capabilities {
    guest: super::Guest::Kernel,
    memory_in_report: true,
    instance: None,
    disk_at: Some(super::DiskAt::VirtioBlk),
    host_binaries: false,
    time_limit: super::TimeLimit::Vm,
    net: super::NetAt::Link,
};

/// The note of every peer VMM's report.
pub const VMM_NOTE: &str = "process start to process exit; memory = its smaps without guest \
     RAM (RSS, PSS) and guest RAM touched, read while it runs and at its exit, as for every VMM";

/// Runs a peer VMM process for `spec` ([`super::process::run_vmm`]: its memory measured as
/// every VMM's, SIGKILL if the bench dies).
pub(crate) fn run_vmm_process(
    cmd: std::process::Command,
    spec: &twinbox_spec::RunSpec,
) -> Result<Finished, String> {
    super::process::run_vmm(
        cmd,
        nix::sys::signal::Signal::SIGKILL,
        spec.spawn_ns,
        true,
        spec.time_limit,
        u64::from(spec.memory_mib) * 1024,
    )
}

/// A link lease for a peer's box in `mode`, and with `--net nat` the NAT table, as
/// twinbox's own boxes get them; one line saying what failed otherwise.
pub(crate) fn lease_link(mode: twinbox_spec::NetMode) -> Result<hostnet::Lease, String> {
    let lease = hostnet::Lease::acquire(mode).map_err(|e| format!("network link: {e}"))?;
    if mode == twinbox_spec::NetMode::Nat {
        hostnet::nat::apply().map_err(|e| format!("network NAT: {e}"))?;
    }
    Ok(lease)
}

/// Finds `name` in PATH.
pub fn in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `path` made absolute when it names an executable regular file, else one line saying
/// why not. A bare name (`firecracker`) that is not in the working directory is looked
/// up in `PATH`. `what` names the binary in the message.
pub(crate) fn executable_file(path: &Path, what: &str) -> Result<PathBuf, String> {
    let bare = path.components().count() == 1 && !path.exists();
    let found = bare.then(|| in_path(&path.to_string_lossy())).flatten();
    let path = found.as_deref().unwrap_or(path);
    let meta = std::fs::metadata(path).map_err(|e| {
        let why = if e.kind() == std::io::ErrorKind::NotFound {
            "no such file".to_string()
        } else {
            e.to_string()
        };
        format!("{what} binary {}: {why}", path.display())
    })?;
    if !meta.is_file() {
        return Err(format!(
            "{what} binary {}: not a regular file",
            path.display()
        ));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(format!(
            "{what} binary {}: not executable (no x permission)",
            path.display()
        ));
    }
    std::path::absolute(path).map_err(|e| format!("{what} binary {}: {e}", path.display()))
}

/// A peer VMM's outcome: `Exited(0)` only when the process exited 0, else `Failed` with
/// how it ended and its output, trimmed.
pub(crate) fn peer_outcome(what: &str, outcome: Outcome, output: &str) -> Outcome {
    match outcome {
        Outcome::Exited(0) => Outcome::Exited(0),
        Outcome::Failed(why) => Outcome::Failed(format!("{what}: {why}: {}", output.trim())),
        other => Outcome::Failed(format!("{what} ended with {other:?}: {}", output.trim())),
    }
}

/// Whether `kernel` is the bench's tiny guest (which prints nothing and needs no disk).
pub(crate) fn is_tiny_guest(kernel: &Path) -> bool {
    std::fs::read(kernel).is_ok_and(|bytes| bytes == crate::tiny_guest::elf())
}

/// The outcome of a peer VMM that booted twinbox's kernel and image (`tiny`: the tiny
/// guest): such a VMM has no marker device, so the workload's status is the one init
/// printed on the console; a process that exited 0 without that line (a kernel panic also
/// ends in a reset) failed, except for the tiny guest, which prints nothing.
pub(crate) fn guest_outcome(what: &str, process: Outcome, console: &str, tiny: bool) -> Outcome {
    use twinbox_spec::proto::ExitCode;
    match (process, super::peer_qemu::exit_from_console(console)) {
        (Outcome::Exited(0), Some(ExitCode::Exited(status))) => Outcome::Exited(i32::from(status)),
        (Outcome::Exited(0), Some(ExitCode::Signaled(signal))) => {
            Outcome::Signaled(i32::from(signal))
        }
        (Outcome::Exited(0), None) if tiny => Outcome::Exited(0),
        (Outcome::Exited(0), None) => Outcome::Failed(format!(
            "{what} exited but init never reported the workload's end: {}",
            console.trim()
        )),
        (Outcome::Failed(why), _) => Outcome::Failed(why),
        (other, _) => Outcome::Failed(format!("{what} ended with {other:?}: {}", console.trim())),
    }
}

/// Prefix of every directory the bench makes under the system temp dir:
/// `twinbox-bench.<what>.<pid>.<n>` (dots, so no name a user or a test picks by hand,
/// like `twinbox-bench-results`, looks like one).
pub(crate) const RUN_DIR_PREFIX: &str = "twinbox-bench.";

/// The file in a [`RunDir`] its owner holds an exclusive `flock` on while it lives: once
/// the lock can be taken, the bench that made the directory is dead (see
/// [`super::sweep`]). A lock, not the pid in the name, because pids are reused.
pub(crate) const OWNER_FILE: &str = ".owner";

/// A fresh directory under the system temp dir for one run's files, removed (with its
/// contents) when dropped — on success, error and time-limit paths alike. If the bench is
/// killed and cannot drop it, the next bench's [`super::sweep`] removes it.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    /// Holds the owner lock (released when the bench dies, whatever kills it).
    _owner: std::fs::File,
}

impl RunDir {
    /// Creates `twinbox-bench.<what>.<pid>.<n>` (`create_dir` fails rather than reuse
    /// one) and takes its owner lock.
    pub fn create(what: &str) -> Result<Self, String> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let base = std::env::temp_dir();
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("{RUN_DIR_PREFIX}{what}.{}.{n}", std::process::id()));
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    let owner = path.join(OWNER_FILE);
                    let locked = std::fs::File::create(&owner).and_then(|f| {
                        f.try_lock().map_err(std::io::Error::from)?;
                        Ok(f)
                    });
                    return match locked {
                        Ok(f) => Ok(Self { path, _owner: f }),
                        Err(e) => {
                            let _ = std::fs::remove_dir_all(&path);
                            Err(format!("{}: {e}", owner.display()))
                        }
                    };
                }
                // Left by an earlier process with our pid: take the next number.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

/// The report of a peer process run: timed process start → exit, its output and usage,
/// one note on what was measured, and the outcome `judge` makes of the process's own
/// (given its output).
pub(crate) fn peer_report(
    name: &str,
    done: Finished,
    note: &str,
    judge: impl FnOnce(Outcome, &str) -> Outcome,
) -> RunReport {
    let outcome = judge(done.outcome, done.output.as_deref().unwrap_or(""));
    RunReport {
        box_kind: BoxKind::Peer(name.into()),
        outcome,
        timeline: done.timeline,
        output: done.output,
        usage: done.usage,
        notes: vec![note.into()],
        network: None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use twinbox_spec::clock::monotonic_ns;
    use twinbox_spec::RunSpec;

    pub(crate) fn tiny_spec(kernel: &Path) -> RunSpec {
        let mut spec = RunSpec::new("/unused.ext4", vec!["(tiny PVH guest)".into()]);
        spec.kernel = Some(kernel.into());
        spec.vcpus = 2;
        spec.memory_mib = 128;
        spec.spawn_ns = monotonic_ns();
        spec
    }

    /// A shell script at `dir/name` with `body`, mode `mode`.
    pub(crate) fn script(dir: &Path, name: &str, body: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn run_dirs_are_unique_and_removed_on_drop() {
        let a = RunDir::create("fc-test").unwrap();
        let b = RunDir::create("fc-test").unwrap();
        assert_ne!(a.path(), b.path());
        std::fs::write(a.path().join("f"), "x").unwrap();
        let p = a.path().to_path_buf();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("twinbox-bench.fc-test."), "{name}");
        // Held: nobody else can take the owner lock while the RunDir lives.
        let other = std::fs::File::open(p.join(OWNER_FILE)).unwrap();
        assert!(other.try_lock().is_err());
        drop(a);
        assert!(!p.exists());
    }
}
