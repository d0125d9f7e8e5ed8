//! What a killed bench leaves behind, removed by the next bench at its start.
//!
//! A bench that dies by SIGKILL runs no cleanup. Its own children die with it (see
//! [`super::process::die_with_bench`]) and the peers' image mount dies with its mount
//! namespace, but two things outlive it:
//! - its per-run directories ([`RunDir`]s: runc's state and bundles, Firecracker's
//!   config, the peers' mount point);
//! - a runc container that was running: runc forks the container's init, which is not
//!   our child, so runc's death does not end it, and its cgroup and runc state stay;
//! - the persistent tap of a Firecracker run (Firecracker opens its tap by name, so no fd
//!   of ours holds it): `hostnet::tap::sweep_persistent` deletes it once its link's
//!   lease is free, which the bench's death makes it.
//!
//! Every [`RunDir`] holds an owner lock while its bench lives. [`sweep`] looks at the
//! bench directories in the temp dir, and for each whose lock it can take (its owner is
//! dead) it has runc kill and delete every container in the runc state there (which also
//! removes the container's cgroup), then removes the directory.
//!
//! [`RunDir`]: super::peer::RunDir

use super::peer::{in_path, OWNER_FILE, RUN_DIR_PREFIX};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where runc keeps its state (`runc --root`) inside the runc peer's [`RunDir`].
///
/// [`RunDir`]: super::peer::RunDir
pub const RUNC_STATE: &str = "state";

/// Removes what dead benches left in the system temp dir (runc from PATH cleans their
/// runc containers) and the persistent taps of Firecracker runs whose bench is dead;
/// returns one line per directory or tap removed or kept, for the log.
pub fn sweep() -> Vec<String> {
    let mut done = sweep_in(&std::env::temp_dir(), in_path("runc").as_deref());
    done.extend(hostnet::tap::sweep_persistent());
    done
}

/// [`sweep`] of the bench directories in `dir`, with `runc` as the runc binary.
pub fn sweep_in(dir: &Path, runc: Option<&Path>) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut done = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        let path = entry.path();
        // Held while we clean, so two benches starting at once do not both clean.
        let Some(_lock) = dead_owner(&path, pid) else {
            continue;
        };
        let state = path.join(RUNC_STATE);
        if state.is_dir() {
            match runc {
                Some(runc) => delete_containers(runc, &state, &mut done),
                None => {
                    done.push(format!(
                        "kept {}: runc state of a dead bench, but runc is not installed",
                        path.display()
                    ));
                    continue;
                }
            }
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => done.push(format!("removed {} (its bench is dead)", path.display())),
            Err(e) => done.push(format!("cannot remove {}: {e}", path.display())),
        }
    }
    done
}

/// The pid in a bench directory's name (`twinbox-bench.<what>.<pid>.<n>`), `None` for
/// any other name.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(RUN_DIR_PREFIX)?;
    let mut parts = rest.rsplitn(3, '.');
    let n = parts.next()?;
    let pid = parts.next()?;
    let what = parts.next()?;
    if what.is_empty() || n.parse::<u64>().is_err() {
        return None;
    }
    pid.parse().ok()
}

/// The owner lock of `dir`, taken, when the bench that made it is dead; `None` while it
/// lives. A directory without an owner file (its bench died between making it and
/// creating the file) counts as dead once no process has the pid in its name.
fn dead_owner(dir: &Path, pid: u32) -> Option<Option<File>> {
    match File::open(dir.join(OWNER_FILE)) {
        Ok(f) => f.try_lock().ok().map(|()| Some(f)),
        Err(_) => (!Path::new(&format!("/proc/{pid}")).exists()).then_some(None),
    }
}

/// `runc delete --force` (SIGKILL to the container, then its state and cgroup removed)
/// of every container in the runc state directory `state`.
fn delete_containers(runc: &Path, state: &Path, done: &mut Vec<String>) {
    let ids: Vec<PathBuf> = std::fs::read_dir(state)
        .map(|e| e.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    for id in ids.iter().filter(|p| p.is_dir()) {
        let Some(name) = id.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let result = Command::new(runc)
            .arg("--root")
            .arg(state)
            .args(["delete", "--force", name])
            .stdin(Stdio::null())
            .output();
        match result {
            Ok(out) if out.status.success() => {
                done.push(format!("runc container {name} of a dead bench deleted"))
            }
            Ok(out) => done.push(format!(
                "runc delete --force {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => done.push(format!("runc delete --force {name}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::peer::tests::script;
    use crate::runner::peer::RunDir;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sweep-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A pid that no process has (a child, reaped).
    fn dead_pid() -> u32 {
        let mut child = Command::new("/bin/true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn names_are_recognised_strictly() {
        assert_eq!(owner_pid("twinbox-bench.runc.123.4"), Some(123));
        assert_eq!(owner_pid("twinbox-bench.runc-bundle.77.0"), Some(77));
        assert_eq!(owner_pid("twinbox-bench.peer-root.9.12"), Some(9));
        for other in [
            "twinbox-bench-e2e-123",
            "twinbox-bench.123.4",
            "twinbox-bench.x.y.4",
            "twinbox-bench.x.1.z",
            "twinbox-runc-1-2",
            "twinbox-123-4",
        ] {
            assert_eq!(owner_pid(other), None, "{other}");
        }
    }

    #[test]
    fn only_directories_of_dead_benches_go() {
        let tmp = scratch("dirs");
        let dead = dead_pid();
        let me = std::process::id();
        // Dead owner: the owner file exists but nobody holds its lock.
        let unlocked = tmp.join(format!("twinbox-bench.fc.{me}.90"));
        std::fs::create_dir(&unlocked).unwrap();
        std::fs::write(unlocked.join(OWNER_FILE), "").unwrap();
        std::fs::write(unlocked.join("vm-config.json"), "{}").unwrap();
        // Died before it made the owner file, and its pid is free.
        let bare_dead = tmp.join(format!("twinbox-bench.fc.{dead}.0"));
        std::fs::create_dir(&bare_dead).unwrap();
        // No owner file yet, but the pid is alive: it may be making it right now.
        let bare_live = tmp.join(format!("twinbox-bench.fc.{me}.91"));
        std::fs::create_dir(&bare_live).unwrap();
        // Alive and locked.
        let live = tmp.join(format!("twinbox-bench.fc.{me}.92"));
        std::fs::create_dir(&live).unwrap();
        let held = File::create(live.join(OWNER_FILE)).unwrap();
        held.try_lock().unwrap();
        // Not ours at all.
        let foreign = tmp.join(format!("twinbox-bench-results-{dead}"));
        std::fs::create_dir(&foreign).unwrap();

        let log = sweep_in(&tmp, None);
        assert!(!unlocked.exists(), "{log:?}");
        assert!(!bare_dead.exists(), "{log:?}");
        assert!(bare_live.exists() && live.exists() && foreign.exists());
        assert_eq!(log.len(), 2, "{log:?}");
        drop(held);
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn a_live_run_dir_is_never_swept() {
        let dir = RunDir::create("sweep-test").unwrap();
        let log = sweep();
        assert!(dir.path().exists(), "{log:?}");
    }

    #[test]
    fn runc_containers_of_a_dead_bench_are_deleted_first() {
        let tmp = scratch("runc");
        let calls = tmp.join("calls");
        let runc = script(
            &tmp,
            "fake-runc",
            &format!("echo \"$@\" >> {}", calls.display()),
            0o755,
        );
        let dead = tmp.join(format!("twinbox-bench.runc.{}.7", std::process::id()));
        let state = dead.join(RUNC_STATE);
        std::fs::create_dir_all(state.join("twinbox-bench-1-0")).unwrap();
        std::fs::write(dead.join(OWNER_FILE), "").unwrap();
        let log = sweep_in(&tmp, Some(&runc));
        let calls = std::fs::read_to_string(&calls).unwrap();
        assert_eq!(
            calls.trim(),
            format!(
                "--root {} delete --force twinbox-bench-1-0",
                state.display()
            )
        );
        assert!(!dead.exists(), "{log:?}");
        // Without runc the state is kept: removing it would lose the container.
        let again = tmp.join(format!("twinbox-bench.runc.{}.8", std::process::id()));
        std::fs::create_dir_all(again.join(RUNC_STATE).join("c")).unwrap();
        std::fs::write(again.join(OWNER_FILE), "").unwrap();
        let log = sweep_in(&tmp, None);
        assert!(
            again.exists() && log[0].contains("runc is not installed"),
            "{log:?}"
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
