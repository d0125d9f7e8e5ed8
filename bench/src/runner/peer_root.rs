//! The image, mounted once for the peer container runtimes (runc, bubblewrap), which take
//! a root directory rather than an ext4 image.
//!
//! The mount lives in a mount namespace of the bench's own: [`PeerRoot::mount`] first
//! moves the calling thread (and every thread and child it starts afterwards) into a new
//! one with private propagation. So the host never sees the mount, and if the bench is
//! killed the namespace dies with it, taking the mount and then the autoclear loop device
//! along. On a normal end [`Drop`] unmounts and removes the (empty) mount point.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use twinbox_spec::image::LoopDevice;

/// The mounted image.
#[derive(Debug)]
pub struct PeerRoot {
    dir: PathBuf,
}

fn cpath(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| format!("{}: NUL in path", p.display()))
}

fn last_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

impl PeerRoot {
    /// Mounts `image` read-only on a new temporary directory, in a private mount
    /// namespace of this thread (see the module docs).
    pub fn mount(image: &Path) -> Result<Self, String> {
        // SAFETY: unshare only changes this thread's namespace membership.
        if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
            return Err(last_error(
                "unshare(CLONE_NEWNS) for the peers' image mount",
            ));
        }
        let root = cpath(Path::new("/"))?;
        // SAFETY: valid C strings; null fstype and data are allowed for a propagation change.
        let r = unsafe {
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        };
        if r != 0 {
            return Err(last_error("making the bench's mounts private"));
        }
        let template = std::env::temp_dir().join("twinbox-peer-root-XXXXXX");
        let mut buf = cpath(&template)?.into_bytes_with_nul();
        // SAFETY: `buf` is a writable NUL-terminated template ending in XXXXXX.
        if unsafe { libc::mkdtemp(buf.as_mut_ptr().cast()) }.is_null() {
            return Err(last_error("creating the peers' mount point"));
        }
        buf.pop();
        let dir = PathBuf::from(std::ffi::OsStr::from_bytes(&buf));
        let peer_root = Self { dir };
        let device = LoopDevice::attach(image).map_err(|e| e.to_string())?;
        let source = cpath(&device.path)?;
        let target = cpath(&peer_root.dir)?;
        let fstype = CString::new("ext4").expect("no NUL");
        // SAFETY: valid C strings; ext4 takes no data here.
        let r = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                libc::MS_RDONLY | libc::MS_NODEV,
                std::ptr::null(),
            )
        };
        if r != 0 {
            return Err(last_error(&format!(
                "mounting {} on {}",
                image.display(),
                peer_root.dir.display()
            )));
        }
        // The mount now holds the loop device; dropping ours lets autoclear detach it
        // when the mount goes.
        drop(device);
        Ok(peer_root)
    }

    /// The image's root directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PeerRoot {
    fn drop(&mut self) {
        if let Ok(target) = cpath(&self.dir) {
            // SAFETY: valid C string; a failure leaves a mount that dies with our namespace.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
