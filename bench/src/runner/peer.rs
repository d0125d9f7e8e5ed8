//! What the peer runners share: finding their binaries, a per-run directory that cannot
//! outlive the run, and how a finished peer process becomes a [`RunReport`].

use super::process::Finished;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use twinbox_spec::{BoxKind, Outcome, RunReport};

/// The note of every peer VMM's report.
pub const VMM_NOTE: &str = "process start to process exit; peak RSS includes guest RAM touched";

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

/// A fresh directory under the system temp dir for one run's files, removed (with its
/// contents) when dropped — on success, error and time-limit paths alike.
#[derive(Debug)]
pub(crate) struct RunDir(PathBuf);

impl RunDir {
    /// Creates `twinbox-<what>-<pid>-<n>` (`create_dir` fails rather than reuse one).
    pub(crate) fn create(what: &str) -> Result<Self, String> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let base = std::env::temp_dir();
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("twinbox-{what}-{}-{n}", std::process::id()));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(Self(path)),
                // Left by an earlier process with our pid: take the next number.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
        }
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!("cannot remove {}: {e}", self.0.display());
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
        drop(a);
        assert!(!p.exists());
    }
}
