//! Directory-fd file operations that never follow a symlink: every path is walked one
//! plain name at a time from a directory fd with `O_NOFOLLOW|O_DIRECTORY`, so a hostile
//! layer holding `a -> /etc` cannot make a later `a/passwd` land outside the tree being
//! written, and no component can be `..`.

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Flags for a directory this module walks through or writes into.
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Why a walk stopped.
#[derive(Debug)]
pub(crate) enum WalkError {
    /// A component is a symlink or not a directory.
    NotDir(OsString),
    /// A component is missing (only when not creating).
    Missing(OsString),
    /// Any other failure.
    Sys(OsString, Errno),
}

/// Opens a directory given as an ordinary path (the cache's own directories).
pub(crate) fn open_dir(path: &Path) -> std::io::Result<OwnedFd> {
    Ok(rfs::open(path, DIR_FLAGS, Mode::empty())?)
}

/// Opens the directory `dir`/`name` without following a symlink.
pub(crate) fn open_child_dir(dir: impl AsFd, name: &OsStr) -> Result<OwnedFd, Errno> {
    rfs::openat(dir, name, DIR_FLAGS, Mode::empty())
}

/// Walks `components` (plain names) below `root`; missing directories are created 0755
/// owned by the caller when `create` is set.
pub(crate) fn walk(
    root: impl AsFd,
    components: &[&OsStr],
    create: bool,
) -> Result<OwnedFd, WalkError> {
    let mut dir = rfs::openat(root, ".", DIR_FLAGS, Mode::empty())
        .map_err(|e| WalkError::Sys(".".into(), e))?;
    for &name in components {
        let next = match open_child_dir(&dir, name) {
            Err(Errno::NOENT) if create => {
                match rfs::mkdirat(&dir, name, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(WalkError::Sys(name.into(), e)),
                }
                open_child_dir(&dir, name)
            }
            other => other,
        };
        dir = match next {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Err(WalkError::Missing(name.into())),
            Err(Errno::LOOP | Errno::NOTDIR) => return Err(WalkError::NotDir(name.into())),
            Err(e) => return Err(WalkError::Sys(name.into(), e)),
        };
    }
    Ok(dir)
}

/// The file type of `dir`/`name` without following a symlink; `None` when it is missing.
pub(crate) fn kind_at(dir: impl AsFd, name: &OsStr) -> Result<Option<rfs::Stat>, Errno> {
    match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sets the mode of `dir`/`name` itself, never of what a symlink there points to. The
/// kernel's `fchmodat(AT_SYMLINK_NOFOLLOW)` is `fchmodat2` (Linux 6.6; the lab's and
/// Debian 12's 6.1 lack it) and rustix's `chmodat` refuses the flag, so this does what
/// glibc does there: open the entry `O_PATH|O_NOFOLLOW` (which opens no device and no
/// fifo) and chmod the fd's own /proc link, which names that inode whatever the path
/// says by then. A symlink gives `OPNOTSUPP`, as glibc's (a symlink's mode means nothing).
pub(crate) fn chmod_nofollow(dir: impl AsFd, name: &OsStr, mode: u32) -> Result<(), Errno> {
    let fd = rfs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    if FileType::from_raw_mode(rfs::fstat(&fd)?.st_mode) == FileType::Symlink {
        return Err(Errno::OPNOTSUPP);
    }
    let link = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
    rfs::chmod(link.as_str(), Mode::from_raw_mode(mode))
}

/// Removes `dir`/`name` whatever it is; a directory goes with everything below it, walked
/// through fds so a symlink inside is removed, never followed.
pub(crate) fn remove_at(dir: impl AsFd, name: &OsStr) -> Result<(), Errno> {
    let Some(st) = kind_at(&dir, name)? else {
        return Ok(());
    };
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        let child = open_child_dir(&dir, name)?;
        for entry in names(&child)? {
            remove_at(&child, &entry)?;
        }
        rfs::unlinkat(&dir, name, AtFlags::REMOVEDIR)
    } else {
        rfs::unlinkat(&dir, name, AtFlags::empty())
    }
}

/// The names in a directory, without `.` and `..`.
pub(crate) fn names(dir: impl AsFd) -> Result<Vec<OsString>, Errno> {
    let mut out = Vec::new();
    for entry in rfs::Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push(OsStr::from_bytes(name).to_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// Reads an xattr of an open file, `None` when it is not set.
pub(crate) fn get_xattr(fd: impl AsFd, name: &str) -> Result<Option<Vec<u8>>, Errno> {
    let len = match rfs::fgetxattr_query(&fd, name) {
        Ok(len) => len,
        Err(Errno::NODATA) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut buf = vec![0u8; len];
    let n = rfs::fgetxattr(&fd, name, &mut buf[..])?;
    buf.truncate(n);
    Ok(Some(buf))
}

/// The names of an open file's xattrs.
pub(crate) fn list_xattrs(fd: impl AsFd) -> Result<Vec<String>, Errno> {
    let len = rfs::flistxattr_query(&fd)?;
    if len == 0 {
        return Ok(Vec::new());
    }
    let mut buf = vec![0u8; len];
    let n = rfs::flistxattr(&fd, &mut buf[..])?;
    Ok(buf[..n]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

/// Splits a `/`-separated path into plain names: empty and `.` components are dropped,
/// a leading `/` too (a layer's paths are relative to its root whatever they say).
/// `None` when a component is `..`.
pub(crate) fn components(path: &[u8]) -> Option<Vec<&OsStr>> {
    let mut out = Vec::new();
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return None,
            p => out.push(OsStr::from_bytes(p)),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    fn mode_of(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn chmod_nofollow_changes_the_entry_and_never_a_symlink_s_target() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::write(&outside, b"x").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o600)).unwrap();
        let tree = t.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("link")).unwrap();
        rfs::mknodat(
            rfs::CWD,
            tree.join("fifo"),
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let dir = open_dir(&tree).unwrap();

        assert_eq!(
            chmod_nofollow(&dir, OsStr::new("link"), 0o4777),
            Err(Errno::OPNOTSUPP)
        );
        assert_eq!(mode_of(&outside), 0o600, "the symlink's target changed");

        chmod_nofollow(&dir, OsStr::new("fifo"), 0o741).unwrap();
        assert!(std::fs::symlink_metadata(tree.join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
        assert_eq!(mode_of(&tree.join("fifo")), 0o741);
        assert_eq!(
            chmod_nofollow(&dir, OsStr::new("missing"), 0o644),
            Err(Errno::NOENT)
        );
    }
}
