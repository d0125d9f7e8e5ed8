//! The image, the host's init and the extra disks as *detached* mounts, made by the parent (still host
//! root, in the host's mount namespace) and attached by the child with `move_mount`.
//!
//! Why the parent and not the child: the child runs inside the run's cgroup, whose device
//! allowlist (`cgroup.rs`) admits only the nodes bound into `/dev`, so the child could not
//! open the loop device to mount it; and under `--userns` ext4 cannot be mounted from a
//! user namespace at all (no `FS_USERNS_MOUNT`). A detached mount belongs to no mount
//! namespace: if the parent dies before the child attached it, closing the fd unmounts it,
//! so nothing reaches the host's mount table.

use crate::Error;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
/// `MOUNT_ATTR_*` of `<linux/mount.h>`.
pub(crate) const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub(crate) const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub(crate) const MOUNT_ATTR_NODEV: u64 = 0x4;
pub(crate) const MOUNT_ATTR_IDMAP: u64 = 0x10_0000;

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
pub(crate) struct MountAttr {
    pub attr_set: u64,
    pub attr_clr: u64,
    pub propagation: u64,
    pub userns_fd: u64,
}

fn last(what: String) -> Error {
    Error::os(what, std::io::Error::last_os_error())
}

fn c_path(path: &Path) -> Result<CString, Error> {
    CString::new(path.to_string_lossy().as_bytes())
        .map_err(|_| Error::Setup(format!("{} contains a NUL byte", path.display())))
}

/// Sets mount attributes on the detached mount `fd` (what: for the error message).
pub(crate) fn set_attr(fd: &OwnedFd, attr: &MountAttr, what: &str) -> Result<(), Error> {
    // SAFETY: mount_setattr on our detached mount with a valid mount_attr of its size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            attr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r != 0 {
        return Err(last(what.to_owned()));
    }
    Ok(())
}

/// Mounts the ext4 image on `device` as a detached mount: read-only, `nodev`, `nosuid`
/// (no device node or set-id file of the image works inside), close-on-exec.
pub fn ext4(device: &Path) -> Result<OwnedFd, Error> {
    let source = c_path(device)?;
    // SAFETY: fsopen with a static C string; the fd is owned right after.
    let fs = unsafe { libc::syscall(libc::SYS_fsopen, c"ext4".as_ptr(), FSOPEN_CLOEXEC) };
    if fs < 0 {
        return Err(last("fsopen ext4".into()));
    }
    // SAFETY: fsopen returned this fd and nothing else owns it.
    let fs = unsafe { OwnedFd::from_raw_fd(fs as i32) };
    let what = || format!("mount {} (ext4, detached)", device.display());
    // SAFETY: fsconfig on our fs context with valid C strings / NULLs as the kernel expects.
    let ok = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_SET_STRING,
            c"source".as_ptr(),
            source.as_ptr(),
            0,
        ) == 0
            && libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                FSCONFIG_SET_FLAG,
                c"ro".as_ptr(),
                std::ptr::null::<libc::c_char>(),
                0,
            ) == 0
            && libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                FSCONFIG_CMD_CREATE,
                std::ptr::null::<libc::c_char>(),
                std::ptr::null::<libc::c_char>(),
                0,
            ) == 0
    };
    if !ok {
        return Err(last(what()));
    }
    // SAFETY: fsmount of our configured context.
    let mnt = unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            fs.as_raw_fd(),
            FSMOUNT_CLOEXEC,
            (MOUNT_ATTR_RDONLY | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID) as libc::c_uint,
        )
    };
    if mnt < 0 {
        return Err(last(what()));
    }
    // SAFETY: fsmount returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(mnt as i32) })
}

/// Attaches the detached mount `fd` at `target` in the caller's mount namespace
/// (`move_mount(2)`): how the shared image mount gets its place (`shared_image.rs`).
pub fn attach(fd: &OwnedFd, target: &Path) -> Result<(), Error> {
    let c = c_path(target)?;
    // SAFETY: move_mount of our detached mount (the fd itself is the source) onto a
    // NUL-terminated path.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(last(format!("mount the image at {}", target.display())));
    }
    Ok(())
}

/// A detached clone of the mount at `path` (`open_tree(OPEN_TREE_CLONE)`, that mount
/// alone), close-on-exec: a container's own view of the shared image mount, which keeps
/// its flags (read-only, nodev, nosuid) and can be idmapped for `--userns`.
pub fn clone(path: &Path) -> Result<OwnedFd, Error> {
    open_tree(path)
}

/// A detached bind of the host's twinbox-init (one file, nothing around it): read-only,
/// `nosuid`, `nodev`, and private, so no later mount on the host's side of that file
/// propagates into the box (a plain clone would join the peer group of a shared host
/// mount). The child attaches it at `run::INIT`.
pub fn init(path: &Path) -> Result<OwnedFd, Error> {
    read_only_private_bind(path, &path.display().to_string())
}

/// A detached bind of `path` made read-only, `nodev`, `nosuid` and private; `what` names
/// it in the error.
fn read_only_private_bind(path: &Path, what: &str) -> Result<OwnedFd, Error> {
    let fd = open_tree(path)?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID,
        attr_clr: 0,
        propagation: libc::MS_PRIVATE,
        userns_fd: 0,
    };
    set_attr(
        &fd,
        &attr,
        &format!("make the bind of {what} read-only and private"),
    )?;
    Ok(fd)
}

/// Checks that the image (its detached mount `image`) leaves each of `names` (top-level
/// entries, [`crate::plan::image_mount_points`]) to twinbox: absent or a directory. A
/// symlink there would make the plan mount, or create a file, wherever it points (the
/// plan's paths are resolved on the host side, before `pivot_root`, and the image is never
/// trusted to steer them); a file would fail later with a less telling error. The image
/// is read-only, so the answer cannot change.
pub fn check_mount_points(image: &OwnedFd, names: &[&str]) -> Result<(), Error> {
    names
        .iter()
        .try_for_each(|name| check_mount_point(image, name))
}

/// [`check_mount_points`] for one name.
fn check_mount_point(image: &OwnedFd, name: &str) -> Result<(), Error> {
    let c_name = CString::new(name).unwrap_or_default();
    // SAFETY: fstatat relative to our mount fd, into a zeroed stat on the stack.
    let (r, st) = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        let r = libc::fstatat(
            image.as_raw_fd(),
            c_name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        );
        (r, st)
    };
    if r != 0 {
        let err = std::io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOENT) => Ok(()),
            _ => Err(Error::os(format!("look at the image's /{name}"), err)),
        };
    }
    match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => Ok(()),
        kind => Err(refused(name, kind == libc::S_IFLNK, None)),
    }
}

/// The one line refusing an image whose `/name` is a symlink or a non-directory.
fn refused(name: &str, symlink: bool, layer: Option<&Path>) -> Error {
    let kind = if symlink { "symlink" } else { "non-directory" };
    let at = layer.map_or(String::new(), |l| format!(" (layer {})", l.display()));
    Error::Setup(format!(
        "the image has /{name} as a {kind}{at}: twinbox mounts its own /{name} in the box, \
         and will not follow the image's entry there — make it a directory in the image"
    ))
}

/// A detached bind of one unpacked layer directory of an OCI image (`--image`): read-only,
/// `nodev`, `nosuid` like the ext4 image's mount, and private, so nothing mounted later
/// on the host's side of the cache reaches the box. The child attaches it as one of the
/// overlay's lower directories (`plan::Lower::Layers`).
pub fn layer(path: &Path) -> Result<OwnedFd, Error> {
    read_only_private_bind(path, &format!("layer {}", path.display()))
}

/// [`check_mount_points`] for an image given as layers (lowest first): what the overlay
/// will show at each name is the topmost layer's entry of that name, unless a layer above
/// has a whiteout there (a 0:0 character device) or an opaque root. Absent, whited out or
/// a directory is fine; a symlink or a file is refused, before the child exists.
pub fn check_layers_mount_points(
    layers: &[std::path::PathBuf],
    names: &[&str],
) -> Result<(), Error> {
    names
        .iter()
        .try_for_each(|name| check_layers_mount_point(layers, name))
}

/// [`check_layers_mount_points`] for one name.
fn check_layers_mount_point(layers: &[std::path::PathBuf], name: &str) -> Result<(), Error> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    for layer in layers.iter().rev() {
        match std::fs::symlink_metadata(layer.join(name)) {
            Ok(meta) => {
                let kind = meta.file_type();
                if kind.is_dir() || (kind.is_char_device() && meta.rdev() == 0) {
                    return Ok(());
                }
                return Err(refused(name, kind.is_symlink(), Some(layer)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::os(
                    format!("look at /{name} in layer {}", layer.display()),
                    e,
                ))
            }
        }
        // An opaque root hides every layer below it.
        if is_opaque(layer) {
            return Ok(());
        }
    }
    Ok(())
}

/// Whether `dir` carries overlayfs's `trusted.overlay.opaque=y`.
fn is_opaque(dir: &Path) -> bool {
    let Ok(path) = c_path(dir) else {
        return false;
    };
    let mut value = [0u8; 1];
    // SAFETY: lgetxattr into a one-byte buffer of ours with its length.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    n == 1 && value[0] == b'y'
}

/// `open_tree(OPEN_TREE_CLONE)` of `path`: a detached bind, close-on-exec.
fn open_tree(path: &Path) -> Result<OwnedFd, Error> {
    let c = c_path(path)?;
    // SAFETY: open_tree with a valid C string; the fd is owned right after.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(last(format!("bind {} (detached)", path.display())));
    }
    // SAFETY: open_tree returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A detached bind of `path` (an extra disk file): `nodev`, `nosuid`, read-only when
/// asked, close-on-exec.
pub fn bind(path: &Path, read_only: bool) -> Result<OwnedFd, Error> {
    let fd = open_tree(path)?;
    let rdonly = if read_only { MOUNT_ATTR_RDONLY } else { 0 };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID | rdonly,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    set_attr(
        &fd,
        &attr,
        &format!("set nodev,nosuid on the bind of {}", path.display()),
    )?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_topmost_layer_with_a_twinbox_entry_decides() {
        let base = std::env::temp_dir().join(format!("twinbox-layers-{}", std::process::id()));
        let layer = |name: &str| {
            let dir = base.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            dir
        };
        let (low, mid, top) = (layer("low"), layer("mid"), layer("top"));
        let names = crate::plan::image_mount_points(0);
        // None has it: fine.
        assert!(
            check_layers_mount_points(&[low.clone(), mid.clone(), top.clone()], &names).is_ok()
        );
        // A symlink low, a directory above it: the overlay shows the directory.
        std::os::unix::fs::symlink("/etc", low.join(".twinbox")).unwrap();
        std::fs::create_dir(mid.join(".twinbox")).unwrap();
        assert!(
            check_layers_mount_points(&[low.clone(), mid.clone(), top.clone()], &names).is_ok()
        );
        // The symlink alone, or a file on top, is refused in one line naming the layer.
        let err = check_layers_mount_points(&[low.clone(), top.clone()], &names)
            .unwrap_err()
            .to_string();
        assert!(err.contains("symlink") && err.contains("low"), "{err}");
        std::fs::write(top.join(".twinbox"), "").unwrap();
        let err = check_layers_mount_points(&[low.clone(), mid.clone(), top.clone()], &names)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("non-directory") && !err.contains('\n'),
            "{err}"
        );
        std::fs::remove_file(top.join(".twinbox")).unwrap();
        // Every other mount point alike: an image's `/mnt -> /tmp/x` would have steered the
        // disks' files onto the host (only checked when disks are given).
        std::os::unix::fs::symlink("/tmp", mid.join("mnt")).unwrap();
        assert!(
            check_layers_mount_points(&[low.clone(), mid.clone(), top.clone()], &names).is_ok()
        );
        let with_disks = crate::plan::image_mount_points(1);
        let err = check_layers_mount_points(&[low.clone(), mid.clone(), top.clone()], &with_disks)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/mnt as a symlink"), "{err}");
        std::os::unix::fs::symlink("/", top.join("proc")).unwrap();
        let err = check_layers_mount_points(&[low, mid, top], &names)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/proc as a symlink"), "{err}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
