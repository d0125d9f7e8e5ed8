//! The exclusive lock on a lease's file: how twinbox's runs share a pool (hostnet's link
//! leases under `/run/twinbox/net`, the container's `--userns` id leases under
//! `/run/twinbox/userns`) without a daemon.
//!
//! A lease is an exclusive `flock` on `<dir>/<n>.lock`. The kernel drops it when the holder
//! dies, so a SIGKILLed run frees its lease at once; the file is opened close-on-exec, so
//! no child the run starts keeps it. A holder releases by unlinking the file while still
//! locked; whoever opened that inode meanwhile and then gets the lock finds the path gone
//! or replaced, and must not count it as a lease (two runs would then hold "the same"
//! lease on two inodes): [`try_lock`] checks for that and, when asked to create, starts
//! over on the new path.

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// What [`try_lock`] does when the lock file is not there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfMissing {
    /// Create it (mode 0600): taking a new lease.
    Create,
    /// Give up (`Ok(None)`): sweeping or reusing only the files that exist.
    Skip,
}

/// Locks `path` exclusively without waiting: `Some` holds the lease until dropped; `None`
/// when another process holds it, or the file is missing (with [`IfMissing::Skip`]), or it
/// was unlinked or replaced while we locked it and we were not to create it. A symbolic
/// link at `path` is refused (`ELOOP`), never followed.
pub fn try_lock(path: &Path, if_missing: IfMissing) -> io::Result<Option<Flock<File>>> {
    let create = if_missing == IfMissing::Create;
    loop {
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(file) => file,
            Err(e) if !create && e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, errno)) => return Err(errno.into()),
        };
        // The holder may have unlinked (released) the file between our open and our lock:
        // then our lock is on an orphan inode and the path is free, or already someone
        // else's new file.
        if still_at(path, &locked)? {
            return Ok(Some(locked));
        }
        if !create {
            return Ok(None);
        }
    }
}

/// Whether `path` still names the file `locked` is on (not unlinked, not replaced).
fn still_at(path: &Path, locked: &File) -> io::Result<bool> {
    let ours = locked.metadata()?;
    match std::fs::symlink_metadata(path) {
        Ok(now) => Ok(now.dev() == ours.dev() && now.ino() == ours.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_on_a_file_unlinked_or_replaced_meanwhile_is_not_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.lock");
        let file = File::create(&path).unwrap();
        assert!(still_at(&path, &file).unwrap(), "the file at its path");
        std::fs::remove_file(&path).unwrap();
        assert!(
            !still_at(&path, &file).unwrap(),
            "unlinked: an orphan inode"
        );
        File::create(&path).unwrap();
        assert!(
            !still_at(&path, &file).unwrap(),
            "replaced: someone else's file"
        );
    }

    #[test]
    fn a_held_lock_is_not_taken_twice_and_is_free_once_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.lock");
        let held = try_lock(&path, IfMissing::Create)
            .unwrap()
            .expect("a new file locks");
        assert!(path.exists(), "the lock file was not created");
        assert!(
            try_lock(&path, IfMissing::Create).unwrap().is_none(),
            "locked twice while held"
        );
        assert!(
            try_lock(&path, IfMissing::Skip).unwrap().is_none(),
            "an existing held file locked again"
        );
        drop(held);
        assert!(
            try_lock(&path, IfMissing::Skip).unwrap().is_some(),
            "a released lock stays taken"
        );
    }

    #[test]
    fn a_missing_file_is_skipped_or_created_as_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.lock");
        assert!(try_lock(&path, IfMissing::Skip).unwrap().is_none());
        assert!(!path.exists(), "Skip created the file");
        let lock = try_lock(&path, IfMissing::Create).unwrap();
        assert!(lock.is_some() && path.exists());
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "lock file readable by others: {mode:o}");
    }

    #[test]
    fn the_lock_is_not_inherited_across_exec() {
        let dir = tempfile::tempdir().unwrap();
        let lock = try_lock(&dir.path().join("2.lock"), IfMissing::Create)
            .unwrap()
            .unwrap();
        // SAFETY: F_GETFD on an fd this test owns has no side effects.
        let flags = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&*lock), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC, "no FD_CLOEXEC");
    }

    #[test]
    fn racing_takers_and_releasers_never_hold_one_lease_twice() {
        use std::sync::atomic::{AtomicU32, Ordering};
        // Threads take the lease and release it the way a lease does (unlink while still
        // locked), as fast as they can: a taker that opened the file just before a release
        // and locked it just after holds an orphan inode, and must not count it as the
        // lease while the next taker holds the new file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("3.lock");
        let holders = AtomicU32::new(0);
        let taken = AtomicU32::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..2_000 {
                        let Some(lock) = try_lock(&path, IfMissing::Create).unwrap() else {
                            continue;
                        };
                        let others = holders.fetch_add(1, Ordering::SeqCst);
                        assert_eq!(others, 0, "two holders of one lease at once");
                        taken.fetch_add(1, Ordering::SeqCst);
                        std::thread::yield_now();
                        holders.fetch_sub(1, Ordering::SeqCst);
                        // An orphan's holder would find the path gone or someone else's:
                        // the count above, not this unlink, is what tells.
                        let _ = std::fs::remove_file(&path);
                        drop(lock);
                    }
                });
            }
        });
        assert!(
            taken.load(Ordering::SeqCst) > 0,
            "no thread ever took the lease"
        );
    }

    #[test]
    fn a_symbolic_link_is_refused_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        let path = dir.path().join("4.lock");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let error = try_lock(&path, IfMissing::Create).expect_err("a symlink was locked");
        assert_eq!(error.raw_os_error(), Some(libc::ELOOP));
        assert!(!target.exists(), "the link's target was created");
    }
}
