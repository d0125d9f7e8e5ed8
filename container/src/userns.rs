//! `--userns`: the container gets its own user namespace in which root is host uid/gid
//! [`HOST_BASE`] (and the next [`SIZE`] - 1 ids), so container root is not host root.
//!
//! The image (or an OCI image's layer binds) and the extra disks arrive as detached mounts
//! made by the parent (`detached.rs`); here they are idmapped to the container's user
//! namespace once that exists (host uid 0 in the image then shows as uid 0 inside, not as
//! `nobody`). Everything else of the plan (tmpfs, overlay, proc, sysfs, devpts, binds) is
//! allowed to the namespace's root; over layers the overlay takes `userxattr`
//! (`plan::Lower::UsernsLayers`), since that root cannot read `trusted.overlay.*`.

use crate::detached::{self, MountAttr, MOUNT_ATTR_IDMAP};
use crate::Error;
use std::os::fd::{AsRawFd, OwnedFd};

/// First host uid/gid of the container's range: container id 0 is host id 100000.
pub const HOST_BASE: u32 = 100_000;
/// Number of ids mapped.
pub const SIZE: u32 = 65_536;

/// The `uid_map`/`gid_map` line: container 0.. → host [`HOST_BASE`]...
pub fn map_line() -> String {
    format!("0 {HOST_BASE} {SIZE}\n")
}

/// One detached mount to idmap: what it is (for errors) and its fd.
pub struct Detached<'a> {
    /// Names the mount in error messages.
    pub what: String,
    /// The detached mount (read-only, nodev, nosuid already where they belong).
    pub fd: &'a OwnedFd,
}

/// Writes the child's uid and gid maps, then idmaps the detached mounts (the image or its
/// layers, the extra disks) to the child's user namespace so their files keep their owners inside.
pub fn map(pid: i32, mounts: &[Detached<'_>]) -> Result<(), Error> {
    for file in ["uid_map", "gid_map"] {
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, map_line()).map_err(|e| Error::os(format!("write {path}"), e))?;
    }
    let path = format!("/proc/{pid}/ns/user");
    let ns = std::fs::File::open(&path).map_err(|e| Error::os(format!("open {path}"), e))?;
    for mount in mounts {
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_IDMAP,
            attr_clr: 0,
            propagation: 0,
            userns_fd: ns.as_raw_fd() as u64,
        };
        detached::set_attr(
            mount.fd,
            &attr,
            &format!("idmap {} to the container's user namespace", mount.what),
        )?;
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
