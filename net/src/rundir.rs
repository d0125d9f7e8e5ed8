//! /run/twinbox, the directory of twinbox's host-wide state of this boot (lease locks, the
//! NAT note and lock), shared with the container runtime: root's, 0755.
//!
//! `DirBuilder::mode` is masked by the umask, so a root shell with umask 027 or 077 would
//! make it 0750 or 0700, and a `--userns` box (a host uid with no rights over root's
//! inodes) could then not reach its staging directory below it. So the mode is set after
//! the creation, and set again on a directory of ours the umask narrowed before.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// The mode of /run/twinbox and of the directories made in it that others must traverse.
pub const MODE: u32 = 0o755;

/// Creates `dir` and its missing parents, then gives `dir` [`MODE`] if it is a directory of
/// this user with another mode. A symlink or a file there is an error.
pub fn ensure(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(MODE)
        .create(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
    }
    if meta.uid() == nix::unistd::geteuid().as_raw() && meta.mode() & 0o7777 != MODE {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(MODE))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_is_0755_whatever_the_umask_left() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("twinbox");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        ensure(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o755, "{mode:o}");
        let link = top.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(
            ensure(&link).is_err(),
            "a symlink was taken for the directory"
        );
    }
}
