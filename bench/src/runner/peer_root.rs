//! The image, mounted once for the peer container runtimes (runc, bubblewrap), which take
//! a root directory rather than an ext4 image.
//!
//! The mount lives in a mount namespace of the bench's own: [`PeerRoot::mount`] first
//! moves the calling thread (and every thread and child it starts afterwards) into a new
//! one with private propagation. So the host never sees the mount, and if the bench is
//! killed the namespace dies with it, taking the mount and then the autoclear loop device
//! along (once no runc container, which got the mount in its own namespace, is left: see
//! [`super::sweep`]). The mount point is `root/` in a [`RunDir`]; on a normal end
//! [`Drop`] unmounts it and the directory goes.

use super::peer::RunDir;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use std::path::{Path, PathBuf};
use twinbox_spec::image::LoopDevice;

/// The mounted image.
#[derive(Debug)]
pub struct PeerRoot {
    root: PathBuf,
    // Dropped after the unmount in `Drop::drop`, which removes the directory.
    _dir: RunDir,
}

impl PeerRoot {
    /// Mounts `image` read-only on a new temporary directory, in a private mount
    /// namespace of this thread (see the module docs).
    pub fn mount(image: &Path) -> Result<Self, String> {
        unshare(CloneFlags::CLONE_NEWNS)
            .map_err(|e| format!("unshare(CLONE_NEWNS) for the peers' image mount: {e}"))?;
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(|e| format!("making the bench's mounts private: {e}"))?;
        let dir = RunDir::create("peer-root")?;
        let root = dir.path().join("root");
        std::fs::create_dir(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        let device = LoopDevice::attach(image).map_err(|e| e.to_string())?;
        mount(
            Some(&device.path),
            &root,
            Some("ext4"),
            MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
            None::<&str>,
        )
        .map_err(|e| format!("mounting {} on {}: {e}", image.display(), root.display()))?;
        // The mount now holds the loop device; dropping ours lets autoclear detach it
        // when the mount goes.
        drop(device);
        Ok(Self { root, _dir: dir })
    }

    /// The image's root directory.
    pub fn dir(&self) -> &Path {
        &self.root
    }
}

impl Drop for PeerRoot {
    fn drop(&mut self) {
        // A failure leaves a mount that dies with our namespace.
        if let Err(e) = umount2(&self.root, MntFlags::MNT_DETACH) {
            tracing::warn!("unmounting {}: {e}", self.root.display());
        }
    }
}
