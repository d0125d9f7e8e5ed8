//! `--userns`: the container gets its own user namespace in which root is host uid/gid
//! [`HOST_BASE`] (and the next [`SIZE`] - 1 ids), so container root is not host root.
//!
//! ext4 cannot be mounted from inside a user namespace (it has no `FS_USERNS_MOUNT`), so
//! the parent, still host root, mounts the image with the new mount API as a *detached*
//! mount (`fsopen`/`fsconfig`/`fsmount`), makes it idmapped to the container's user
//! namespace once that exists (host uid 0 in the image then shows as uid 0 inside, not as
//! `nobody`), and the child `move_mount`s it under the overlay. Everything else of the
//! plan (tmpfs, overlay, proc, sysfs, devpts, binds) is allowed to the namespace's root.

use crate::Error;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// First host uid/gid of the container's range: container id 0 is host id 100000.
pub const HOST_BASE: u32 = 100_000;
/// Number of ids mapped.
pub const SIZE: u32 = 65_536;

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const MOUNT_ATTR_RDONLY: libc::c_uint = 0x1;
const MOUNT_ATTR_IDMAP: u64 = 0x10_0000;
const OPEN_TREE_CLONE: libc::c_uint = 1;

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn last(what: String) -> Error {
    Error::os(what, std::io::Error::last_os_error())
}

/// The `uid_map`/`gid_map` line: container 0.. → host [`HOST_BASE`]...
pub fn map_line() -> String {
    format!("0 {HOST_BASE} {SIZE}\n")
}

/// Mounts the ext4 image on `device` read-only as a detached mount (close-on-exec fd).
pub fn detached_ext4(device: &Path) -> Result<OwnedFd, Error> {
    let source = CString::new(device.to_string_lossy().as_bytes())
        .map_err(|_| Error::Setup(format!("{} contains a NUL byte", device.display())))?;
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
            MOUNT_ATTR_RDONLY,
        )
    };
    if mnt < 0 {
        return Err(last(what()));
    }
    // SAFETY: fsmount returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(mnt as i32) })
}

/// A detached copy of the bind mount of `path` (an extra disk file), close-on-exec.
pub fn detached_bind(path: &Path) -> Result<OwnedFd, Error> {
    let c = CString::new(path.to_string_lossy().as_bytes())
        .map_err(|_| Error::Setup(format!("{} contains a NUL byte", path.display())))?;
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

/// One detached mount to idmap: what it is (for errors), the fd, read-only or not.
pub struct Detached<'a> {
    pub what: String,
    pub fd: &'a OwnedFd,
    pub read_only: bool,
}

/// Writes the child's uid and gid maps, then idmaps the detached mounts (the image, the
/// extra disks) to the child's user namespace so their files keep their owners inside.
pub fn map(pid: i32, mounts: &[Detached<'_>]) -> Result<(), Error> {
    for file in ["uid_map", "gid_map"] {
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, map_line()).map_err(|e| Error::os(format!("write {path}"), e))?;
    }
    let path = format!("/proc/{pid}/ns/user");
    let ns = std::fs::File::open(&path).map_err(|e| Error::os(format!("open {path}"), e))?;
    for mount in mounts {
        let rdonly = if mount.read_only {
            u64::from(MOUNT_ATTR_RDONLY)
        } else {
            0
        };
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_IDMAP | rdonly,
            attr_clr: 0,
            propagation: 0,
            userns_fd: ns.as_raw_fd() as u64,
        };
        // SAFETY: mount_setattr on our detached mount with a valid mount_attr of its size.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                mount.fd.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                &attr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if r != 0 {
            return Err(last(format!(
                "idmap {} to the container's user namespace",
                mount.what
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_root_maps_to_an_unprivileged_host_range() {
        assert_eq!(map_line(), "0 100000 65536\n");
    }
}
