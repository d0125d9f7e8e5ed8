//! The image's root as overlayfs will show its layers, read without mounting: what a path
//! names (the topmost layer that has it decides; a whiteout or an opaque directory above
//! hides the layers below), and where a program is, following the image's own symlinks
//! inside the image, never the host's.

use crate::error::{ImageError, Result};
use crate::fsat;
use rustix::fs::FileType;
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// Symlinks followed in one resolution at most, as the kernel's limit.
const MAX_SYMLINKS: usize = 40;

/// One entry of the merged root, in the layer that shows it.
pub(crate) struct Entry {
    /// The directory holding it (opened without following symlinks).
    pub dir: OwnedFd,
    /// Its kind.
    pub kind: FileType,
}

enum Lookup {
    Found(Entry),
    /// A whiteout or opaque directory hides lower layers.
    Hidden,
    NotHere,
}

/// What `parents`/`name` is in the merged `layers` (lowest first), when no symlink is
/// among `parents`: a symlink, file or whiteout on the way hides what lower layers hold
/// there. `None` when absent or hidden.
pub(crate) fn entry(layers: &[PathBuf], parents: &[&OsStr], name: &OsStr) -> Result<Option<Entry>> {
    for layer in layers.iter().rev() {
        match lookup(layer, parents, name)? {
            Lookup::Found(entry) => return Ok(Some(entry)),
            Lookup::Hidden => return Ok(None),
            Lookup::NotHere => {}
        }
    }
    Ok(None)
}

fn lookup(layer: &Path, parents: &[&OsStr], name: &OsStr) -> Result<Lookup> {
    let io = |e: std::io::Error| ImageError::Io {
        path: layer.to_owned(),
        what: "cannot read layer",
        source: e,
    };
    let errno = |e: rustix::io::Errno| io(e.into());
    let mut dir = fsat::open_dir(layer).map_err(io)?;
    // An opaque directory on the way hides the lower layers below it; this layer counts.
    let mut opaque = false;
    for &c in parents {
        match fsat::kind_at(&dir, c).map_err(errno)? {
            None if opaque => return Ok(Lookup::Hidden),
            None => return Ok(Lookup::NotHere),
            Some(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
            Some(_) => return Ok(Lookup::Hidden),
        }
        dir = fsat::open_child_dir(&dir, c).map_err(errno)?;
        opaque |= fsat::get_xattr(&dir, crate::unpack::OPAQUE_XATTR)
            .map_err(errno)?
            .as_deref()
            == Some(b"y");
    }
    match fsat::kind_at(&dir, name).map_err(errno)? {
        None if opaque => Ok(Lookup::Hidden),
        None => Ok(Lookup::NotHere),
        Some(st) => {
            let kind = FileType::from_raw_mode(st.st_mode);
            // A 0:0 character device is a whiteout: the name is deleted here.
            if kind == FileType::CharacterDevice && st.st_rdev == 0 {
                return Ok(Lookup::Hidden);
            }
            Ok(Lookup::Found(Entry { dir, kind }))
        }
    }
}

/// The regular file `path` (absolute in the image) names, its symlinks followed inside the
/// image (an absolute target starts again at the image's root, `..` stops at it):
/// `Some(resolved path)`, or `None` when it names nothing, a directory or a loop.
pub fn resolve_file(layers: &[PathBuf], path: &str) -> Result<Option<String>> {
    let mut todo: Vec<OsString> = split(path.as_bytes());
    todo.reverse();
    let mut at: Vec<OsString> = Vec::new();
    let mut links = 0;
    while let Some(c) = todo.pop() {
        if c == ".." {
            at.pop();
            continue;
        }
        let parents: Vec<&OsStr> = at.iter().map(OsString::as_os_str).collect();
        let Some(found) = entry(layers, &parents, &c)? else {
            return Ok(None);
        };
        match found.kind {
            FileType::Directory => at.push(c),
            FileType::Symlink => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Ok(None);
                }
                let target = rustix::fs::readlinkat(&found.dir, c.as_os_str(), Vec::new())
                    .map_err(|e| ImageError::Io {
                        path: PathBuf::from(path),
                        what: "cannot read a symlink of the image",
                        source: e.into(),
                    })?;
                let target = target.as_bytes();
                if target.starts_with(b"/") {
                    at.clear();
                }
                todo.extend(split(target).into_iter().rev());
            }
            FileType::RegularFile if todo.is_empty() => {
                at.push(c);
                let parts: Vec<String> = at.iter().map(|p| p.to_string_lossy().into()).collect();
                return Ok(Some(format!("/{}", parts.join("/"))));
            }
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// Where the image has `program`: a path is resolved as it is, a bare name is looked up
/// in Docker's default `PATH` ([`crate::DEFAULT_PATH`]) as a box's init would.
pub fn find_program(layers: &[PathBuf], program: &str) -> Result<Option<String>> {
    if program.contains('/') {
        return resolve_file(layers, &absolute(program));
    }
    let dirs = crate::DEFAULT_PATH.trim_start_matches("PATH=");
    for dir in dirs.split(':') {
        if let Some(found) = resolve_file(layers, &format!("{dir}/{program}"))? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

fn absolute(path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    }
}

/// The names of a path, `.` and empty ones dropped (`..` kept: resolution handles it).
fn split(path: &[u8]) -> Vec<OsString> {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(|c| OsString::from_vec(c.to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Two layers: busybox with applet links (one relative, one absolute, one through a
    /// linked directory), a whiteout, an opaque directory, a loop.
    fn layers() -> (tempfile::TempDir, Vec<PathBuf>) {
        let t = tempfile::tempdir().unwrap();
        let (low, top) = (t.path().join("low"), t.path().join("top"));
        for d in [
            "low/bin",
            "low/usr/bin",
            "low/opt/old",
            "top/bin",
            "top/opt",
        ] {
            std::fs::create_dir_all(t.path().join(d)).unwrap();
        }
        std::fs::write(low.join("bin/busybox"), b"elf").unwrap();
        symlink("busybox", low.join("bin/true")).unwrap();
        symlink("/bin/busybox", low.join("bin/sh")).unwrap();
        symlink("../../bin/busybox", low.join("usr/bin/env")).unwrap();
        symlink("bin", low.join("sbin")).unwrap();
        std::fs::write(low.join("bin/gone"), b"x").unwrap();
        std::fs::write(low.join("opt/old/tool"), b"x").unwrap();
        symlink("loop2", low.join("bin/loop1")).unwrap();
        symlink("loop1", low.join("bin/loop2")).unwrap();
        symlink("/etc/passwd", low.join("bin/host")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            top.join("bin/gone"),
            FileType::CharacterDevice,
            rustix::fs::Mode::empty(),
            0,
        )
        .unwrap();
        rustix::fs::setxattr(
            top.join("opt"),
            crate::unpack::OPAQUE_XATTR,
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        (t, vec![low, top])
    }

    #[test]
    fn programs_resolve_through_the_image_s_own_symlinks() {
        let (_t, l) = layers();
        let found = |p: &str| find_program(&l, p).unwrap();
        assert_eq!(found("/bin/true").as_deref(), Some("/bin/busybox"));
        assert_eq!(found("sh").as_deref(), Some("/bin/busybox"));
        assert_eq!(found("env").as_deref(), Some("/bin/busybox"));
        assert_eq!(found("/sbin/true").as_deref(), Some("/bin/busybox"));
        // Deleted by the top layer, hidden by an opaque directory, a loop, a directory,
        // absent, or only on the host: not in the image.
        for missing in [
            "/bin/gone",
            "/opt/old/tool",
            "loop1",
            "/bin",
            "sysbench",
            "/bin/host",
        ] {
            assert_eq!(found(missing), None, "{missing}");
        }
    }
}
