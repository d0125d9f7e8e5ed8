//! One layer tar → one directory in overlayfs form.
//!
//! What a layer may say, and what becomes of it:
//! - `..` in an entry's path or a hard link's target: the layer is refused. A leading `/` is
//!   dropped (layer paths are relative to the image root whatever they say).
//! - Symlinks are created as they are, target untouched, and never followed: every path is
//!   walked from the layer directory's fd one name at a time with `O_NOFOLLOW`
//!   ([`crate::fsat`]), so `a -> /etc` then `a/passwd` is refused instead of writing the
//!   host's `/etc/passwd`.
//! - Hard links must name an entry already in this layer (walked the same way).
//! - Whiteouts `.wh.NAME` become overlayfs whiteouts, a 0:0 character device `NAME`;
//!   `.wh..wh..opq` becomes `trusted.overlay.opaque=y` on its directory, and
//!   `user.overlay.opaque=y` too, which overlayfs reads instead when it is mounted with
//!   `userxattr` (by the root of a user namespace: `ctr run --userns`); other `.wh..wh.`
//!   names (aufs bookkeeping) are skipped.
//! - Device nodes and FIFOs are created (this needs root, as all of unpacking does). They
//!   are harmless here: the container mounts its root `nodev` and allows only its bound
//!   nodes in the device cgroup, and in the VM they are the guest kernel's business.
//! - Ownership, setuid/setgid/sticky bits and mtimes are kept: the container maps owners
//!   with `--userns`, and its mounts are `nosuid` where the project says so.
//! - xattrs: `security.capability` and `user.*` are kept; `trusted.*` and `user.overlay.*`
//!   are dropped because overlayfs would read its own markers from them (`trusted.overlay.*`,
//!   or `user.overlay.*` under `userxattr`), and every other namespace (`security.selinux`,
//!   ACLs) belongs to the host's policy, not the image's.

use crate::error::{ImageError, Result};
use crate::fsat::{self, WalkError};
use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use tar::EntryType;

/// The overlayfs xattr marking a directory opaque.
pub(crate) const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// The same marker as overlayfs reads it when mounted with `userxattr`.
pub(crate) const USER_OPAQUE_XATTR: &str = "user.overlay.opaque";
/// The prefix of overlayfs' markers under `userxattr`: never taken from a layer.
const USER_OVERLAY_PREFIX: &str = "user.overlay.";
/// Prefix of a whiteout's name in an OCI/Docker layer.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Prefix of names the layer format reserves (`.wh..wh..opq` and aufs' own).
const META_PREFIX: &[u8] = b".wh..wh.";
/// The opaque-directory marker.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// Counts of what a layer held, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UnpackStats {
    /// Entries written (files, directories, links, nodes).
    pub entries: u64,
    /// Whiteouts converted to 0:0 character devices.
    pub whiteouts: u64,
    /// Directories marked opaque.
    pub opaque_dirs: u64,
    /// xattrs dropped (trusted.*, security.* other than capability, ...).
    pub xattrs_dropped: u64,
}

/// Unpacks the tar stream `layer` into the existing empty directory `dest`. `label` names
/// the layer in errors. On error `dest` holds a partial tree: the caller removes it.
pub(crate) fn unpack(layer: impl Read, dest: &Path, label: &str) -> Result<UnpackStats> {
    let root = fsat::open_dir(dest).map_err(|e| ImageError::Io {
        path: dest.to_owned(),
        what: "cannot open layer directory",
        source: e,
    })?;
    let room = room_for_files(&root).map_err(|e| ImageError::Io {
        path: dest.to_owned(),
        what: "cannot look at the free space of",
        source: e.into(),
    })?;
    let mut u = Unpacker {
        root,
        label,
        stats: UnpackStats::default(),
        dir_times: Vec::new(),
        room,
    };
    let mut archive = tar::Archive::new(layer);
    let entries = archive.entries().map_err(|e| u.bad_tar(e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| u.bad_tar(e))?;
        u.entry(&mut entry)?;
    }
    // Directory mtimes last: creating their children moved them.
    for (path, time) in std::mem::take(&mut u.dir_times).into_iter().rev() {
        let comps = fsat::components(&path).unwrap_or_default();
        let dir = match fsat::walk(&u.root, &comps, false) {
            Ok(dir) => dir,
            // A later entry replaced the directory: nothing to date.
            Err(WalkError::NotDir(_) | WalkError::Missing(_)) => continue,
            Err(e) => return Err(u.walk_error(&path, e)),
        };
        rfs::futimens(&dir, &time).map_err(|e| u.sys(&path, "cannot set mtime", e))?;
    }
    Ok(u.stats)
}

/// One entry's metadata, taken from the header and its PAX records.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Timestamps,
    xattrs: Vec<(String, Vec<u8>)>,
    xattrs_dropped: u64,
}

struct Unpacker<'a> {
    root: OwnedFd,
    label: &'a str,
    stats: UnpackStats,
    /// Directories whose mtime is set at the end, in creation order.
    dir_times: Vec<(Vec<u8>, Timestamps)>,
    /// Bytes the layer's files may still take (see [`room_for_files`]).
    room: u64,
}

/// What one layer's files may take of the filesystem under `dir`: what is free to us,
/// less a reserve of 1/20 of the filesystem, so a layer can never fill the host's disk —
/// a ~2 KB tar can declare a sparse file of a terabyte, whose holes are written out as
/// zeros, and a compressed layer can expand without limit.
fn room_for_files(dir: &OwnedFd) -> rustix::io::Result<u64> {
    let st = rustix::fs::fstatvfs(dir)?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    let reserve = st.f_blocks.saturating_mul(st.f_frsize) / 20;
    Ok(free.saturating_sub(reserve))
}

impl Unpacker<'_> {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader | EntryType::XHeader) {
            return Ok(());
        }
        let path = entry.path_bytes().into_owned();
        let Some(comps) = fsat::components(&path) else {
            return Err(self.unsafe_entry(&path, "its path holds '..'"));
        };
        let meta = self.meta(entry, &path)?;
        self.stats.xattrs_dropped += meta.xattrs_dropped;
        let Some((&name, parents)) = comps.split_last() else {
            // The layer's root ("./"): only its metadata matters.
            if kind == EntryType::Directory {
                let root = self.root.try_clone().map_err(|e| self.io(&path, e))?;
                self.set_dir_meta(&root, &path, &meta)?;
            }
            return Ok(());
        };
        let parent =
            fsat::walk(&self.root, parents, true).map_err(|e| self.walk_error(&path, e))?;
        let name_bytes = name.as_bytes();

        if name_bytes == OPAQUE_MARKER {
            for marker in [OPAQUE_XATTR, USER_OPAQUE_XATTR] {
                rfs::fsetxattr(&parent, marker, b"y", XattrFlags::empty())
                    .map_err(|e| self.sys(&path, "cannot mark the directory opaque", e))?;
            }
            self.stats.opaque_dirs += 1;
            return Ok(());
        }
        if name_bytes.starts_with(META_PREFIX) {
            return Ok(());
        }
        if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT_PREFIX) {
            let hidden = OsStr::from_bytes(hidden);
            self.replace(&parent, hidden, &path)?;
            rfs::mknodat(&parent, hidden, FileType::CharacterDevice, Mode::empty(), 0)
                .map_err(|e| self.sys(&path, "cannot create the whiteout", e))?;
            rfs::chownat(
                &parent,
                hidden,
                Some(rfs::Uid::ROOT),
                Some(rfs::Gid::ROOT),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| self.sys(&path, "cannot chown the whiteout", e))?;
            self.stats.whiteouts += 1;
            return Ok(());
        }

        match kind {
            EntryType::Directory => {
                match fsat::kind_at(&parent, name).map_err(|e| self.sys(&path, "stat", e))? {
                    Some(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                    existing => {
                        if existing.is_some() {
                            self.replace(&parent, name, &path)?;
                        }
                        rfs::mkdirat(&parent, name, Mode::from_raw_mode(0o700))
                            .map_err(|e| self.sys(&path, "cannot create directory", e))?;
                    }
                }
                let dir = fsat::open_child_dir(&parent, name)
                    .map_err(|e| self.sys(&path, "cannot open directory", e))?;
                self.set_dir_meta(&dir, &path, &meta)?;
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                // The size the file will have once written (a sparse entry's holes included).
                let size = entry.size();
                if size > self.room {
                    return Err(self.unsafe_entry(
                        &path,
                        &format!(
                            "a file of {size} bytes, more than the {} bytes the cache's \
                             filesystem can spare for this layer",
                            self.room
                        ),
                    ));
                }
                self.room -= size;
                self.replace(&parent, name, &path)?;
                let fd = rfs::openat(
                    &parent,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| self.sys(&path, "cannot create file", e))?;
                let mut file = File::from(fd);
                std::io::copy(entry, &mut file).map_err(|e| self.bad_tar(e))?;
                self.set_owner_mode(&file, &path, &meta)?;
                self.set_xattrs(&file, &path, &meta)?;
                rfs::futimens(&file, &meta.mtime).map_err(|e| self.sys(&path, "mtime", e))?;
            }
            EntryType::Symlink => {
                let Some(target) = entry.link_name_bytes() else {
                    return Err(self.unsafe_entry(&path, "a symlink without a target"));
                };
                self.replace(&parent, name, &path)?;
                rfs::symlinkat(OsStr::from_bytes(&target), &parent, name)
                    .map_err(|e| self.sys(&path, "cannot create symlink", e))?;
                self.chown_at(&parent, name, &path, &meta)?;
                rfs::utimensat(&parent, name, &meta.mtime, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| self.sys(&path, "mtime", e))?;
            }
            EntryType::Link => {
                let Some(target) = entry.link_name_bytes() else {
                    return Err(self.unsafe_entry(&path, "a hard link without a target"));
                };
                self.hard_link(&parent, name, &path, &target)?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let (file_type, dev) = match kind {
                    EntryType::Fifo => (FileType::Fifo, 0),
                    _ => {
                        let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                        let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                        let t = if kind == EntryType::Char {
                            FileType::CharacterDevice
                        } else {
                            FileType::BlockDevice
                        };
                        (t, rfs::makedev(major, minor))
                    }
                };
                self.replace(&parent, name, &path)?;
                rfs::mknodat(&parent, name, file_type, Mode::empty(), dev)
                    .map_err(|e| self.sys(&path, "cannot create node", e))?;
                self.chown_at(&parent, name, &path, &meta)?;
                // mknod's mode went through the umask; this sets the one the layer says, on
                // the node itself even if something put a symlink at its name meanwhile.
                fsat::chmod_nofollow(&parent, name, meta.mode)
                    .map_err(|e| self.sys(&path, "chmod", e))?;
                rfs::utimensat(&parent, name, &meta.mtime, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| self.sys(&path, "mtime", e))?;
            }
            other => {
                return Err(
                    self.unsafe_entry(&path, &format!("unsupported tar entry type {other:?}"))
                );
            }
        }
        self.stats.entries += 1;
        Ok(())
    }

    /// Makes a hard link `parent/name` to `target`, which must already be in this layer.
    fn hard_link(&self, parent: &OwnedFd, name: &OsStr, path: &[u8], target: &[u8]) -> Result<()> {
        let Some(tcomps) = fsat::components(target) else {
            return Err(self.unsafe_entry(path, "its hard link target holds '..'"));
        };
        let Some((&tname, tparents)) = tcomps.split_last() else {
            return Err(self.unsafe_entry(path, "a hard link to the layer's root"));
        };
        let outside = || {
            self.unsafe_entry(
                path,
                &format!(
                    "hard link to '{}', which is not an earlier entry of this layer",
                    String::from_utf8_lossy(target)
                ),
            )
        };
        let tparent = match fsat::walk(&self.root, tparents, false) {
            Ok(fd) => fd,
            Err(WalkError::Missing(_)) => return Err(outside()),
            Err(e) => return Err(self.walk_error(target, e)),
        };
        let Some(st) = fsat::kind_at(&tparent, tname).map_err(|e| self.sys(path, "stat", e))?
        else {
            return Err(outside());
        };
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            return Err(self.unsafe_entry(path, "a hard link to a directory"));
        }
        if let Some(existing) =
            fsat::kind_at(parent, name).map_err(|e| self.sys(path, "stat", e))?
        {
            if existing.st_ino == st.st_ino && existing.st_dev == st.st_dev {
                return Ok(());
            }
        }
        self.replace(parent, name, path)?;
        // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
        rfs::linkat(&tparent, tname, parent, name, AtFlags::empty())
            .map_err(|e| self.sys(path, "cannot create hard link", e))
    }

    /// Removes what an earlier entry of this layer put at `name` (a later entry wins).
    fn replace(&self, parent: &OwnedFd, name: &OsStr, path: &[u8]) -> Result<()> {
        fsat::remove_at(parent, name)
            .map_err(|e| self.sys(path, "cannot replace the earlier entry", e))
    }

    fn set_dir_meta(&mut self, dir: &OwnedFd, path: &[u8], meta: &Meta) -> Result<()> {
        self.set_owner_mode(dir, path, meta)?;
        self.set_xattrs(dir, path, meta)?;
        self.dir_times.push((path.to_vec(), meta.mtime.clone()));
        Ok(())
    }

    /// chown before chmod: chown clears setuid/setgid.
    fn set_owner_mode(&self, fd: impl AsFd, path: &[u8], meta: &Meta) -> Result<()> {
        rfs::fchown(
            &fd,
            Some(rfs::Uid::from_raw(meta.uid)),
            Some(rfs::Gid::from_raw(meta.gid)),
        )
        .map_err(|e| self.sys(path, "cannot chown (unpacking needs root)", e))?;
        rfs::fchmod(&fd, Mode::from_raw_mode(meta.mode)).map_err(|e| self.sys(path, "chmod", e))
    }

    fn chown_at(&self, parent: &OwnedFd, name: &OsStr, path: &[u8], meta: &Meta) -> Result<()> {
        rfs::chownat(
            parent,
            name,
            Some(rfs::Uid::from_raw(meta.uid)),
            Some(rfs::Gid::from_raw(meta.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.sys(path, "cannot chown (unpacking needs root)", e))
    }

    /// Sets the kept xattrs, after chown (chown clears `security.capability`).
    fn set_xattrs(&self, fd: impl AsFd, path: &[u8], meta: &Meta) -> Result<()> {
        for (name, value) in &meta.xattrs {
            rfs::fsetxattr(&fd, name.as_str(), value, XattrFlags::empty())
                .map_err(|e| self.sys(path, "cannot set xattr", e))?;
        }
        Ok(())
    }

    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>, path: &[u8]) -> Result<Meta> {
        let h = entry.header();
        let bad = |what: &str| self.unsafe_entry(path, &format!("bad header: {what}"));
        let mode = h.mode().map_err(|_| bad("mode"))? & 0o7777;
        let mut uid = h.uid().map_err(|_| bad("uid"))?;
        let mut gid = h.gid().map_err(|_| bad("gid"))?;
        let mtime = h.mtime().unwrap_or(0);
        let mut xattrs = Vec::new();
        let mut dropped = 0;
        if let Some(pax) = entry.pax_extensions().map_err(|_| bad("pax records"))? {
            for ext in pax {
                let ext = ext.map_err(|_| bad("pax records"))?;
                let Ok(key) = ext.key() else { continue };
                if let Some(xattr) = key.strip_prefix("SCHILY.xattr.") {
                    let kept = xattr == "security.capability"
                        || (xattr.starts_with("user.") && !xattr.starts_with(USER_OVERLAY_PREFIX));
                    if kept {
                        xattrs.push((xattr.to_owned(), ext.value_bytes().to_vec()));
                    } else {
                        dropped += 1;
                    }
                } else if key == "uid" {
                    uid = ext
                        .value()
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| bad("pax uid"))?;
                } else if key == "gid" {
                    gid = ext
                        .value()
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| bad("pax gid"))?;
                }
            }
        }
        let uid = u32::try_from(uid).map_err(|_| bad("uid above 2^32"))?;
        let gid = u32::try_from(gid).map_err(|_| bad("gid above 2^32"))?;
        let t = Timespec {
            tv_sec: i64::try_from(mtime).unwrap_or(0),
            tv_nsec: 0,
        };
        Ok(Meta {
            mode,
            uid,
            gid,
            mtime: Timestamps {
                last_access: t,
                last_modification: t,
            },
            xattrs,
            xattrs_dropped: dropped,
        })
    }

    fn unsafe_entry(&self, path: &[u8], what: &str) -> ImageError {
        ImageError::Unsafe {
            path: self.label.into(),
            what: format!("entry '{}': {what}", String::from_utf8_lossy(path)),
        }
    }

    fn walk_error(&self, path: &[u8], e: WalkError) -> ImageError {
        match e {
            WalkError::NotDir(c) => self.unsafe_entry(
                path,
                &format!(
                    "goes through '{}', a symlink or non-directory (never followed)",
                    c.to_string_lossy()
                ),
            ),
            WalkError::Missing(c) => {
                self.unsafe_entry(path, &format!("'{}' is missing", c.to_string_lossy()))
            }
            WalkError::Sys(c, errno) => self
                .sys(path, "cannot open directory", errno)
                .with_detail(&c),
        }
    }

    fn sys(&self, path: &[u8], what: &str, e: Errno) -> ImageError {
        ImageError::Malformed {
            path: self.label.into(),
            what: format!(
                "entry '{}': {what}: {}",
                String::from_utf8_lossy(path),
                std::io::Error::from(e)
            ),
        }
    }

    fn io(&self, path: &[u8], e: std::io::Error) -> ImageError {
        ImageError::Malformed {
            path: self.label.into(),
            what: format!("entry '{}': {e}", String::from_utf8_lossy(path)),
        }
    }

    fn bad_tar(&self, e: std::io::Error) -> ImageError {
        ImageError::Malformed {
            path: self.label.into(),
            what: format!("unreadable layer tar: {e}"),
        }
    }
}

impl ImageError {
    /// Adds a component name to a message (which directory of a walk failed).
    fn with_detail(self, component: &OsStr) -> Self {
        match self {
            ImageError::Malformed { path, what } => ImageError::Malformed {
                path,
                what: format!("{what} (at '{}')", component.to_string_lossy()),
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{layer, require_root, E};
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::path::PathBuf;

    /// A scratch directory with the layer directory inside it, so a test can check that
    /// nothing appeared beside the layer.
    fn scratch() -> (tempfile::TempDir, PathBuf) {
        require_root();
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("layer");
        std::fs::create_dir(&dest).unwrap();
        (t, dest)
    }

    fn run(entries: &[E<'_>]) -> (tempfile::TempDir, PathBuf, Result<UnpackStats>) {
        let (t, dest) = scratch();
        let r = unpack(&layer(entries)[..], &dest, "test layer");
        (t, dest, r)
    }

    fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
        let fd = rustix::fs::open(path, OFlags::RDONLY | OFlags::NOFOLLOW, Mode::empty()).unwrap();
        crate::fsat::get_xattr(&fd, name).unwrap()
    }

    /// Only `layer` (and nothing else) exists beside the layer directory.
    fn nothing_beside(t: &tempfile::TempDir) {
        let names: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("layer")]);
    }

    #[test]
    fn files_dirs_owners_modes_and_mtimes_are_kept() {
        let (_t, d, r) = run(&[
            E::Dir("usr/", 0o755),
            E::Dir("usr/bin/", 0o750),
            E::FileX("usr/bin/su", b"#!", 0o4755, (0, 0), &[]),
            E::FileX("home/app/data", b"x", 0o2640, (1000, 1001), &[]),
            E::Dir("/abs/", 0o700),
        ]);
        r.unwrap();
        let su = std::fs::metadata(d.join("usr/bin/su")).unwrap();
        assert_eq!(su.permissions().mode() & 0o7777, 0o4755, "setuid kept");
        assert_eq!(su.mtime(), 1_600_000_000);
        let data = std::fs::metadata(d.join("home/app/data")).unwrap();
        assert_eq!((data.uid(), data.gid()), (1000, 1001));
        assert_eq!(
            data.permissions().mode() & 0o7777,
            0o2640,
            "setgid kept after chown"
        );
        let bin = std::fs::metadata(d.join("usr/bin")).unwrap();
        assert_eq!(bin.permissions().mode() & 0o7777, 0o750);
        assert_eq!(
            bin.mtime(),
            1_600_000_000,
            "directory mtime set after its children"
        );
        // A leading '/' is relative to the layer.
        assert!(d.join("abs").is_dir());
    }

    #[test]
    fn dot_dot_paths_are_refused_and_nothing_escapes() {
        for path in ["../escape", "a/../../escape", "./../escape"] {
            let (t, _d, r) = run(&[E::File(path, b"pwned", 0o644)]);
            let e = r.unwrap_err().to_string();
            assert!(e.contains("'..'"), "{path}: {e}");
            nothing_beside(&t);
        }
    }

    #[test]
    fn symlinks_are_created_as_is_and_never_followed() {
        let before = std::fs::read("/etc/passwd").unwrap();
        let (t, d, r) = run(&[
            E::Sym("a", "/etc"),
            E::File("a/passwd", b"root::0:0::/:/bin/sh\n", 0o644),
        ]);
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("entry 'a/passwd'") && e.contains("never followed"),
            "{e}"
        );
        assert_eq!(
            std::fs::read("/etc/passwd").unwrap(),
            before,
            "host /etc/passwd untouched"
        );
        assert_eq!(
            std::fs::read_link(d.join("a")).unwrap(),
            PathBuf::from("/etc")
        );
        nothing_beside(&t);

        // Relative escapes through a symlink fail the same way.
        let (t, _d, r) = run(&[E::Sym("up", "../../.."), E::File("up/tmp/x", b"x", 0o644)]);
        assert!(r.unwrap_err().to_string().contains("never followed"));
        nothing_beside(&t);

        // A file replacing a symlink replaces the link, never writes its target.
        let (t, d, r) = run(&[E::Sym("f", "/etc/passwd"), E::File("f", b"mine", 0o644)]);
        r.unwrap();
        assert_eq!(std::fs::read(d.join("f")).unwrap(), b"mine");
        assert_eq!(std::fs::read("/etc/passwd").unwrap(), before);
        nothing_beside(&t);
    }

    #[test]
    fn hard_links_only_to_earlier_entries_of_the_layer() {
        let (_t, d, r) = run(&[E::File("bin/a", b"same", 0o755), E::Hard("bin/b", "bin/a")]);
        r.unwrap();
        let (a, b) = (
            std::fs::metadata(d.join("bin/a")).unwrap(),
            std::fs::metadata(d.join("bin/b")).unwrap(),
        );
        assert_eq!(a.ino(), b.ino());

        // '/etc/passwd' means the layer's own etc/passwd, which is not there.
        let (t, _d, r) = run(&[E::Hard("stolen", "/etc/passwd")]);
        assert!(r.unwrap_err().to_string().contains("not an earlier entry"));
        nothing_beside(&t);
        let (t, _d, r) = run(&[E::Hard("stolen", "../../etc/passwd")]);
        assert!(r.unwrap_err().to_string().contains("'..'"));
        nothing_beside(&t);
        let (t, _d, r) = run(&[E::Sym("etc", "/etc"), E::Hard("stolen", "etc/passwd")]);
        assert!(r.unwrap_err().to_string().contains("never followed"));
        nothing_beside(&t);
    }

    #[test]
    fn whiteouts_and_opaque_dirs_take_overlayfs_form() {
        let (_t, d, r) = run(&[
            E::Dir("etc/", 0o755),
            E::File("etc/.wh.motd", b"", 0o644),
            E::Dir("var/cache/", 0o755),
            E::File("var/cache/.wh..wh..opq", b"", 0o644),
            E::File("var/cache/new", b"n", 0o644),
            E::File("x/.wh..wh.plnk", b"", 0o644),
        ]);
        let stats = r.unwrap();
        let w = std::fs::symlink_metadata(d.join("etc/motd")).unwrap();
        assert!(w.file_type().is_char_device());
        assert_eq!((w.rdev(), w.uid(), w.gid()), (0, 0, 0));
        assert!(!d.join("etc/.wh.motd").exists());
        // Both forms: host root's overlay reads trusted.*, a user namespace's (userxattr)
        // user.*.
        for marker in [OPAQUE_XATTR, USER_OPAQUE_XATTR] {
            assert_eq!(
                xattr(&d.join("var/cache"), marker).as_deref(),
                Some(&b"y"[..]),
                "{marker}"
            );
        }
        assert!(!d.join("var/cache/.wh..wh..opq").exists());
        assert!(d.join("var/cache/new").is_file());
        assert!(
            !d.join("x/.wh..wh.plnk").exists(),
            "aufs bookkeeping skipped"
        );
        assert_eq!((stats.whiteouts, stats.opaque_dirs), (1, 1));
    }

    #[test]
    fn device_nodes_and_fifos_are_made() {
        let (_t, d, r) = run(&[
            E::Node("dev/null", EntryType::Char, 1, 3),
            E::Node("dev/loop0", EntryType::Block, 7, 0),
            E::Node("run/fifo", EntryType::Fifo, 0, 0),
        ]);
        r.unwrap();
        let null = std::fs::symlink_metadata(d.join("dev/null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
        assert_eq!(
            null.permissions().mode() & 0o7777,
            0o620,
            "mode despite the umask"
        );
        assert!(std::fs::symlink_metadata(d.join("dev/loop0"))
            .unwrap()
            .file_type()
            .is_block_device());
        assert!(std::fs::symlink_metadata(d.join("run/fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
    }

    /// An entry at a name where an earlier entry planted a symlink replaces the symlink (a
    /// node, a directory, a file) or is refused (a path through it), and never follows it:
    /// the targets outside the root keep their mode and content. The unpacker removes the
    /// symlink before it makes the entry, so this does not reach the nofollow chmod itself
    /// (a symlink where the mode is set): `fsat`'s
    /// `chmod_nofollow_changes_the_entry_and_never_a_symlink_s_target` tests that.
    #[test]
    fn an_entry_where_an_earlier_one_planted_a_symlink_replaces_it_and_never_follows_it() {
        let outside = tempfile::tempdir().unwrap();
        let file = outside.path().join("file");
        std::fs::write(&file, b"host").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let dir = outside.path().join("dir");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let (file_s, dir_s) = (file.to_str().unwrap(), dir.to_str().unwrap());
        // Each name first a symlink out of the root, then an entry that sets a mode there.
        let (t, d, r) = run(&[
            E::Sym("node", file_s),
            E::Node("node", EntryType::Fifo, 0, 0),
            E::Sym("dir", dir_s),
            E::Dir("dir", 0o4777),
            E::Sym("file", file_s),
            E::File("file", b"mine", 0o4755),
            E::Sym("dev", dir_s),
            E::Node("dev/null", EntryType::Char, 1, 3),
        ]);
        let e = r.unwrap_err().to_string();
        assert!(e.contains("entry 'dev/null'"), "{e}");
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(
            mode(&file),
            0o600,
            "the planted symlink's file target changed"
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"host");
        assert_eq!(
            mode(&dir),
            0o700,
            "the planted symlink's directory target changed"
        );
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let node = std::fs::symlink_metadata(d.join("node")).unwrap();
        assert!(node.file_type().is_fifo() && mode(&d.join("node")) == 0o620);
        assert!(d.join("dir").is_dir() && !d.join("dir").is_symlink());
        assert_eq!(mode(&d.join("dir")), 0o4777);
        assert_eq!(mode(&d.join("file")), 0o4755);
        nothing_beside(&t);
    }

    #[test]
    fn xattrs_keep_capability_and_user_drop_overlay_markers_trusted_and_others() {
        // vfs_cap_data revision 2, effective, CAP_NET_RAW (13) permitted.
        let mut cap = Vec::new();
        for word in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
            cap.extend_from_slice(&word.to_le_bytes());
        }
        let (_t, d, r) = run(&[E::FileX(
            "bin/ping",
            b"elf",
            0o755,
            (0, 0),
            &[
                ("security.capability", &cap),
                ("user.origin", b"test"),
                ("trusted.overlay.opaque", b"y"),
                ("user.overlay.redirect", b"/etc"),
                ("security.selinux", b"system_u:object_r:bin_t:s0"),
            ],
        )]);
        let stats = r.unwrap();
        let p = d.join("bin/ping");
        assert_eq!(
            xattr(&p, "security.capability"),
            Some(cap),
            "set after chown, so kept"
        );
        assert_eq!(xattr(&p, "user.origin").as_deref(), Some(&b"test"[..]));
        assert_eq!(xattr(&p, "trusted.overlay.opaque"), None);
        // A layer cannot plant overlayfs markers for a userxattr mount either.
        assert_eq!(xattr(&p, "user.overlay.redirect"), None);
        assert_eq!(stats.xattrs_dropped, 3);
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let (_t, d, r) = run(&[
            E::File("p", b"file", 0o644),
            E::Dir("p/", 0o755),
            E::File("p/inner", b"i", 0o644),
            E::Dir("q/", 0o755),
            E::File("q/inner", b"i", 0o644),
            E::File("q", b"now a file", 0o644),
        ]);
        r.unwrap();
        assert!(d.join("p/inner").is_file());
        assert_eq!(std::fs::read(d.join("q")).unwrap(), b"now a file");
    }

    #[test]
    fn a_file_larger_than_the_disk_can_spare_is_refused_before_a_byte_is_written() {
        let (_t, dest) = scratch();
        // A header declaring a petabyte (as a sparse entry's expanded size can, from a
        // tar of a few KiB): refused from the header, nothing created.
        let mut header = tar::Header::new_gnu();
        header.set_path("huge").unwrap();
        header.set_size(1 << 50);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_entry_type(EntryType::Regular);
        header.set_cksum();
        let mut tar = header.as_bytes().to_vec();
        tar.extend_from_slice(&[0u8; 4096]);
        let e = unpack(&tar[..], &dest, "test layer")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("entry 'huge'") && e.contains("can spare for this layer"),
            "{e}"
        );
        assert!(!dest.join("huge").exists());
    }

    #[test]
    fn a_truncated_layer_is_an_error() {
        let (_t, dest) = scratch();
        let full = layer(&[E::File("big", &[7u8; 10_000], 0o644)]);
        let e = unpack(&full[..5000], &dest, "test layer")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("test layer: "), "{e}");
    }
}
