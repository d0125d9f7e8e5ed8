//! The VM's root disk: the layers applied in order into one staging tree (whiteouts delete,
//! opaque directories empty what lower layers put there), then `mkfs.ext4 -d`.
//!
//! Regular files are hard-linked from the layer directories into the tree instead of
//! copied (the tree lives in the same cache filesystem and mkfs only reads it), so staging
//! costs metadata, not data. Directories are made fresh, so overlayfs' `trusted.overlay.*`
//! never reaches the disk; mkfs copies the xattrs the layers kept (`security.capability`,
//! `user.*`).

use crate::error::{ImageError, Result};
use crate::fsat;
use crate::unpack::OPAQUE_XATTR;
use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;
use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Applies `layers` (lowest first) into the empty directory `tree`.
pub(crate) fn merge(layers: &[PathBuf], tree: &Path) -> Result<()> {
    let dst = fsat::open_dir(tree).map_err(|e| ImageError::Io {
        path: tree.to_owned(),
        what: "cannot open staging tree",
        source: e,
    })?;
    for layer in layers {
        let src = fsat::open_dir(layer).map_err(|e| ImageError::Io {
            path: layer.clone(),
            what: "cannot open layer",
            source: e,
        })?;
        merge_dir(&src, &dst, layer, &mut Vec::new())?;
    }
    Ok(())
}

/// A failed step: what was being done and the errno.
type Step<T> = std::result::Result<T, (&'static str, Errno)>;

fn merge_dir(src: &OwnedFd, dst: &OwnedFd, layer: &Path, at: &mut Vec<String>) -> Result<()> {
    let fail = |at: &[String], name: &OsStr, (what, e): (&str, Errno)| ImageError::Malformed {
        path: layer.to_owned(),
        what: format!(
            "staging the VM disk: /{}{}{}: {what}: {}",
            at.join("/"),
            if at.is_empty() { "" } else { "/" },
            name.to_string_lossy(),
            std::io::Error::from(e)
        ),
    };
    let names = fsat::names(src).map_err(|e| fail(at, OsStr::new("."), ("list", e)))?;
    for name in &names {
        let name = name.as_os_str();
        let Some((sd, dd, st)) = merge_entry(src, dst, name).map_err(|e| fail(at, name, e))? else {
            continue;
        };
        at.push(name.to_string_lossy().into_owned());
        merge_dir(&sd, &dd, layer, at)?;
        at.pop();
        // Last: writing the children moved it.
        rfs::futimens(&dd, &times_of(&st)).map_err(|e| fail(at, name, ("mtime", e)))?;
    }
    Ok(())
}

/// Applies one entry of a layer onto the tree; a directory is returned (layer fd, tree
/// fd, its stat) for the caller to descend into.
fn merge_entry(
    src: &OwnedFd,
    dst: &OwnedFd,
    name: &OsStr,
) -> Step<Option<(OwnedFd, OwnedFd, rfs::Stat)>> {
    fn f(what: &'static str) -> impl Fn(Errno) -> (&'static str, Errno) {
        move |e| (what, e)
    }
    let st = rfs::statat(src, name, AtFlags::SYMLINK_NOFOLLOW).map_err(f("stat"))?;
    let kind = FileType::from_raw_mode(st.st_mode);
    let owner = (
        Some(rfs::Uid::from_raw(st.st_uid)),
        Some(rfs::Gid::from_raw(st.st_gid)),
    );
    match kind {
        // A whiteout: what lower layers put here is gone.
        FileType::CharacterDevice if st.st_rdev == 0 => {
            fsat::remove_at(dst, name).map_err(f("whiteout"))?;
            Ok(None)
        }
        FileType::Directory => {
            match fsat::kind_at(dst, name).map_err(f("stat"))? {
                Some(d) if FileType::from_raw_mode(d.st_mode) == FileType::Directory => {}
                existing => {
                    if existing.is_some() {
                        fsat::remove_at(dst, name).map_err(f("replace"))?;
                    }
                    rfs::mkdirat(dst, name, Mode::from_raw_mode(0o700)).map_err(f("mkdir"))?;
                }
            }
            let sd = fsat::open_child_dir(src, name).map_err(f("open"))?;
            let dd = fsat::open_child_dir(dst, name).map_err(f("open"))?;
            if fsat::get_xattr(&sd, OPAQUE_XATTR)
                .map_err(f("xattr"))?
                .as_deref()
                == Some(b"y")
            {
                for n in fsat::names(&dd).map_err(f("list"))? {
                    fsat::remove_at(&dd, &n).map_err(f("opaque"))?;
                }
            }
            rfs::fchown(&dd, owner.0, owner.1).map_err(f("chown"))?;
            rfs::fchmod(&dd, Mode::from_raw_mode(st.st_mode & 0o7777)).map_err(f("chmod"))?;
            copy_xattrs(&sd, &dd).map_err(f("xattr"))?;
            Ok(Some((sd, dd, st)))
        }
        FileType::RegularFile => {
            fsat::remove_at(dst, name).map_err(f("replace"))?;
            match rfs::linkat(src, name, dst, name, AtFlags::empty()) {
                Ok(()) => Ok(None),
                // Another filesystem, or too many links: copy instead.
                Err(Errno::XDEV | Errno::MLINK) => copy_file(src, dst, name, &st).map(|()| None),
                Err(e) => Err(("link", e)),
            }
        }
        FileType::Symlink => {
            fsat::remove_at(dst, name).map_err(f("replace"))?;
            let target = rfs::readlinkat(src, name, Vec::new()).map_err(f("readlink"))?;
            rfs::symlinkat(target.as_c_str(), dst, name).map_err(f("symlink"))?;
            rfs::chownat(dst, name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(f("chown"))?;
            rfs::utimensat(dst, name, &times_of(&st), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(f("mtime"))?;
            Ok(None)
        }
        other => {
            fsat::remove_at(dst, name).map_err(f("replace"))?;
            rfs::mknodat(dst, name, other, Mode::empty(), st.st_rdev).map_err(f("mknod"))?;
            rfs::chownat(dst, name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(f("chown"))?;
            // On the node itself, never through a symlink at its name.
            fsat::chmod_nofollow(dst, name, st.st_mode & 0o7777).map_err(f("chmod"))?;
            Ok(None)
        }
    }
}

/// Copies a regular file with its owner, mode, kept xattrs and mtime.
fn copy_file(src: &OwnedFd, dst: &OwnedFd, name: &OsStr, st: &rfs::Stat) -> Step<()> {
    let from = rfs::openat(
        src,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ("open", e))?;
    let to = rfs::openat(
        dst,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| ("create", e))?;
    let (mut from, mut to) = (File::from(from), File::from(to));
    std::io::copy(&mut from, &mut to)
        .map_err(|e| ("copy", Errno::from_io_error(&e).unwrap_or(Errno::IO)))?;
    rfs::fchown(
        &to,
        Some(rfs::Uid::from_raw(st.st_uid)),
        Some(rfs::Gid::from_raw(st.st_gid)),
    )
    .map_err(|e| ("chown", e))?;
    rfs::fchmod(&to, Mode::from_raw_mode(st.st_mode & 0o7777)).map_err(|e| ("chmod", e))?;
    copy_xattrs(&from, &to).map_err(|e| ("xattr", e))?;
    rfs::futimens(&to, &times_of(st)).map_err(|e| ("mtime", e))
}

/// Copies xattrs except `trusted.*` and `user.overlay.*` (overlayfs' own markers stay out
/// of the disk).
fn copy_xattrs(from: impl AsFd, to: impl AsFd) -> std::result::Result<(), Errno> {
    for name in fsat::list_xattrs(&from)? {
        if name.starts_with("trusted.") || name.starts_with("user.overlay.") {
            continue;
        }
        if let Some(value) = fsat::get_xattr(&from, &name)? {
            rfs::fsetxattr(&to, name.as_str(), &value, XattrFlags::empty())?;
        }
    }
    Ok(())
}

fn times_of(st: &rfs::Stat) -> Timestamps {
    let t = Timespec {
        tv_sec: st.st_mtime,
        tv_nsec: st.st_mtime_nsec as _,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// What the tree holds, for the disk's size: data blocks and inodes.
#[derive(Debug, Default)]
pub(crate) struct TreeSize {
    /// Bytes of data rounded up to 4 KiB blocks (each inode once).
    pub(crate) block_bytes: u64,
    /// Inodes (each once).
    pub(crate) inodes: u64,
}

/// Walks the tree without following symlinks.
pub(crate) fn measure(tree: &Path) -> std::io::Result<TreeSize> {
    let mut size = TreeSize::default();
    let mut seen = HashSet::new();
    let mut stack = vec![tree.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.path().symlink_metadata()?;
            if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            size.inodes += 1;
            if meta.is_dir() {
                size.block_bytes += 4096;
                stack.push(entry.path());
            } else if meta.is_file() || meta.file_type().is_symlink() {
                // Symlinks under 60 bytes live in the inode; a block for the rest.
                let len = if meta.is_file() || meta.len() >= 60 {
                    meta.len()
                } else {
                    0
                };
                size.block_bytes += len.div_ceil(4096) * 4096;
            }
        }
    }
    Ok(size)
}

/// The disk's size in MiB: content + 20% + 16 MiB for ext4's metadata (as
/// rootfs/build.sh sizes the built-in image, with room for the 256-byte inodes), rounded
/// up. Both boxes write into an overlay or a scratch disk, never this one, so it needs no
/// free space of its own.
pub(crate) fn size_mib(size: &TreeSize) -> u64 {
    let bytes = size.block_bytes + size.block_bytes / 5 + size.inodes * 256 + (16 << 20);
    bytes.div_ceil(1 << 20)
}

/// Makes the ext4 file `disk` from `tree`.
pub(crate) fn mkfs(tree: &Path, disk: &Path) -> Result<()> {
    let size = measure(tree).map_err(|e| ImageError::Io {
        path: tree.to_owned(),
        what: "cannot measure the staging tree",
        source: e,
    })?;
    let mib = size_mib(&size);
    let inodes = size.inodes + size.inodes / 5 + 1024;
    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-O",
            "^has_journal",
            "-m",
            "0",
            "-b",
            "4096",
            "-E",
            "root_owner=0:0",
        ])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-L")
        .arg("twinbox-image")
        .arg("-d")
        .arg(tree)
        .arg(disk)
        .arg(format!("{mib}M"))
        // mkfs.ext4 lives in /sbin, which a non-login root shell may lack.
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .output()
        .map_err(|e| ImageError::Mkfs {
            path: disk.to_owned(),
            what: format!("cannot run mkfs.ext4 (install e2fsprogs: scripts/install-deps): {e}"),
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(ImageError::Mkfs {
            path: disk.to_owned(),
            what: format!(
                "mkfs.ext4 -d failed ({}): {}",
                out.status,
                err.lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("no message")
            ),
        });
    }
    Ok(())
}
