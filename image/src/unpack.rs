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
//!   `.wh..wh..opq` becomes `trusted.overlay.opaque=y` on its directory; other `.wh..wh.`
//!   names (aufs bookkeeping) are skipped.
//! - Device nodes and FIFOs are created (this needs root, as all of unpacking does). They
//!   are harmless here: the container mounts its root `nodev` and allows only its bound
//!   nodes in the device cgroup, and in the VM they are the guest kernel's business.
//! - Ownership, setuid/setgid/sticky bits and mtimes are kept: the container maps owners
//!   with `--userns`, and its mounts are `nosuid` where the project says so.
//! - xattrs: `security.capability` and `user.*` are kept; `trusted.*` are dropped because
//!   overlayfs would read its own `trusted.overlay.*` from them, and every other namespace
//!   (`security.selinux`, ACLs) belongs to the host's policy, not the image's.

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
    let mut u = Unpacker {
        root,
        label,
        stats: UnpackStats::default(),
        dir_times: Vec::new(),
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
        let dir = fsat::walk(&u.root, &comps, false).map_err(|e| u.walk_error(&path, e))?;
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
            rfs::fsetxattr(&parent, OPAQUE_XATTR, b"y", XattrFlags::empty())
                .map_err(|e| self.sys(&path, "cannot mark the directory opaque", e))?;
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
                // mknod's mode went through the umask; this sets the one the layer says.
                // The parent is a no-symlink fd and the name was just made: no follow.
                rfs::chmodat(
                    &parent,
                    name,
                    Mode::from_raw_mode(meta.mode),
                    AtFlags::empty(),
                )
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
                    if xattr == "security.capability" || xattr.starts_with("user.") {
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
