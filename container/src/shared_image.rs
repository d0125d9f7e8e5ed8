//! One read-only mount of an ext4 image, shared by every container of that image that
//! runs at the same time (and by successive ones while an [`ImageHold`] is kept, as the
//! bench does), released when its last user is gone.
//!
//! Why: attaching a loop device and mounting ext4 cost a run milliseconds, and a fresh
//! mount starts with a cold page cache, so exec of every program in the box read the
//! image again. A shared lower is what runc and bubblewrap get from a pre-mounted root;
//! isolation is unchanged: the mount is read-only, nodev, nosuid, and each container
//! attaches its own clone of it (`open_tree`) under its own overlay upper.
//!
//! On the host, per image and mount namespace, a directory
//! `/run/twinbox/images/<key>` holds:
//! - `lock`: taken exclusively while the mount is made, looked at or taken down, so two
//!   runs starting at once, or one ending while another starts, never race;
//! - `refs`: every user holds a *shared* `flock` on its own open of it for as long as it
//!   uses the mount (close-on-exec, so nothing it starts inherits it; a SIGKILL drops it);
//! - `root`: the ext4 mount, on a private bind of the directory itself, so the mount does
//!   not propagate to other mount namespaces (a shared `/` would copy it into every peer)
//!   and nothing a container mounts comes back.
//!
//! A user that leaves takes `lock`, then tries to turn its `refs` lock exclusive: if that
//! succeeds it was the last, and it unmounts, lets the autoclear loop device go, and
//! removes the directory. A user SIGKILLed leaves a mount nobody holds: the next user of
//! the image adopts it, and the start-up sweep ([`sweep`]) removes any that nobody holds.
//!
//! The key is the image file's device, inode, size, mtime and ctime, so a changed or
//! replaced image never reuses the old mount, and the mount namespace of the calling
//! thread, so a process in a namespace of its own (the bench, `runner/peer_root.rs`) never
//! counts on a mount it cannot see.

use crate::{detached, Error};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use twinbox_spec::image::LoopDevice;

/// Where the shared image mounts live, one directory per image and mount namespace.
pub const IMAGES_ROOT: &str = "/run/twinbox/images";

/// How long a last user waits for the loop device to clear after the unmount (it is the
/// kernel's autoclear; a container still dying elsewhere can hold the filesystem a moment).
const LOOP_FREE_TIMEOUT: Duration = Duration::from_secs(2);

/// One user's hold on the shared mount of an image: the mount stays while any hold does.
#[derive(Debug)]
pub struct ImageHold {
    image: PathBuf,
    dir: PathBuf,
    root: PathBuf,
    refs: Option<Flock<File>>,
}

/// What releasing a hold did.
#[derive(Debug, PartialEq, Eq)]
pub enum Released {
    /// Others still use the mount; it stays.
    Shared,
    /// This was the last user: the mount, the loop device and the directory are gone.
    Freed,
    /// The last user unmounted, but this loop device was still attached after the wait.
    LoopStuck(PathBuf),
}

impl ImageHold {
    /// Holds the shared mount of the ext4 image at `image`, mounting it first if no user
    /// in this thread's mount namespace has. Needs root.
    pub fn acquire(image: &Path) -> Result<Self, Error> {
        twinbox_spec::image::check_ext4(image)?;
        let dir = Path::new(IMAGES_ROOT).join(key(image)?);
        let root = dir.join("root");
        let lock = lock_dir(&dir, true)?;
        if !is_mount_root(&root) {
            if let Err(e) = mount(&dir, &root, image) {
                take_down(&dir);
                return Err(e);
            }
        }
        let refs = open(&dir.join("refs"), true)
            .map_err(|e| Error::os(format!("open {}", dir.join("refs").display()), e))?;
        let refs = Flock::lock(refs, FlockArg::LockSharedNonblock).map_err(|(_, errno)| {
            Error::os(
                format!("hold {}", dir.join("refs").display()),
                std::io::Error::from(errno),
            )
        })?;
        drop(lock);
        Ok(Self {
            image: image.to_owned(),
            dir,
            root,
            refs: Some(refs),
        })
    }

    /// The image file this hold is for.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// Where the image is mounted (read-only) in this mount namespace.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Gives the hold up; the last user takes the mount down (and waits for the loop
    /// device to clear, so a run's teardown ends with everything released).
    pub fn release(mut self) -> Released {
        self.give_up()
    }

    fn give_up(&mut self) -> Released {
        let Some(refs) = self.refs.take() else {
            return Released::Shared;
        };
        let lock = match lock_dir(&self.dir, false) {
            Ok(lock) => lock,
            Err(e) => {
                // Our refs lock goes with the file; the sweep takes the mount down.
                tracing::warn!("release the shared image mount: {e}");
                return Released::Shared;
            }
        };
        // Converting a flock is not atomic: if it fails, our shared lock is gone too,
        // which is what leaving means. No new user can come in while we hold `lock`.
        if refs.relock(FlockArg::LockExclusiveNonblock).is_err() {
            return Released::Shared;
        }
        let device = loop_device_of(&self.root);
        take_down(&self.dir);
        drop(refs);
        drop(lock);
        match device {
            Some(device) if !wait_loop_free(&device) => Released::LoopStuck(device),
            _ => Released::Freed,
        }
    }
}

impl Drop for ImageHold {
    fn drop(&mut self) {
        self.give_up();
    }
}

/// Takes down every shared image mount nobody holds (users SIGKILLed, in this mount
/// namespace or one that is gone); returns one line per directory removed.
pub fn sweep() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(IMAGES_ROOT) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(lock) = open(&dir.join("lock"), false) else {
            continue;
        };
        // Busy: someone is setting it up or leaving; it is theirs.
        let Ok(lock) = Flock::lock(lock, FlockArg::LockExclusiveNonblock) else {
            continue;
        };
        if lock.metadata().map_or(true, |m| m.nlink() == 0) {
            continue;
        }
        let held = open(&dir.join("refs"), false)
            .ok()
            .map(|refs| Flock::lock(refs, FlockArg::LockExclusiveNonblock).is_err())
            .unwrap_or(false);
        if !held {
            take_down(&dir);
            removed.push(format!(
                "took down {}: the image mount nobody held",
                dir.display()
            ));
        }
    }
    removed
}

/// The directory name of `image` in this thread's mount namespace.
fn key(image: &Path) -> Result<String, Error> {
    let meta =
        std::fs::metadata(image).map_err(|e| Error::os(format!("stat {}", image.display()), e))?;
    let ns = std::fs::metadata("/proc/thread-self/ns/mnt")
        .map_err(|e| Error::os("stat /proc/thread-self/ns/mnt", e))?;
    Ok(format!(
        "{:x}-{}-{}-{}.{}-{}.{}-mnt{}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
        ns.ino()
    ))
}

/// Takes `dir`'s lock exclusively (making the directory and lock when `create`). A lock
/// file removed by a last user while we waited for it is left for a fresh one.
fn lock_dir(dir: &Path, create: bool) -> Result<Flock<File>, Error> {
    let path = dir.join("lock");
    loop {
        if create {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::os(format!("create {}", dir.display()), e))?;
        }
        let file = match open(&path, create) {
            Ok(file) => file,
            // Removed between the mkdir and the open: again.
            Err(e) if create && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::os(format!("open {}", path.display()), e)),
        };
        let lock = Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| {
            Error::os(
                format!("lock {}", path.display()),
                std::io::Error::from(errno),
            )
        })?;
        let gone = lock
            .metadata()
            .map_err(|e| Error::os(format!("stat {}", path.display()), e))?
            .nlink()
            == 0;
        if !gone {
            return Ok(lock);
        }
        if !create {
            return Err(Error::Setup(format!(
                "{} was removed while held",
                dir.display()
            )));
        }
    }
}

fn open(path: &Path, create: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(create)
        .create(create)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
}

/// Mounts `image` at `root` inside `dir`, which first becomes a private bind of itself.
fn mount(dir: &Path, root: &Path, image: &Path) -> Result<(), Error> {
    use nix::mount::{mount, MsFlags};
    let os = |what: String| move |e: Errno| Error::os(what, std::io::Error::from(e));
    if !is_mount_root(dir) {
        mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(os(format!("bind {} onto itself", dir.display())))?;
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(os(format!("make {} private", dir.display())))?;
    }
    match std::fs::create_dir(root) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(Error::os(format!("create {}", root.display()), e))
        }
        _ => {}
    }
    let device = LoopDevice::attach(image)?;
    let fs = detached::ext4(&device.path)?;
    detached::attach(&fs, root)?;
    // The mount holds the device now; autoclear detaches it when the mount goes.
    Ok(())
}

/// Unmounts and removes `dir` (its lock held, no user left). What is mounted there in
/// another mount namespace goes with the removal of its mount point.
fn take_down(dir: &Path) {
    use nix::mount::{umount2, MntFlags};
    let root = dir.join("root");
    if is_mount_root(&root) {
        if let Err(e) = umount2(&root, MntFlags::MNT_DETACH) {
            tracing::warn!("unmount {}: {e}", root.display());
        }
    }
    let _ = std::fs::remove_dir(&root);
    // A killed set-up may have bound it more than once.
    for _ in 0..8 {
        if !is_mount_root(dir) || umount2(dir, MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
    let _ = std::fs::remove_file(dir.join("refs"));
    let _ = std::fs::remove_file(dir.join("lock"));
    let _ = std::fs::remove_dir(dir);
}

/// Whether `path` is the root of a mount in this mount namespace (false if it is absent).
fn is_mount_root(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statx into a zeroed struct on the stack, with a NUL-terminated path.
    let (r, stx) = unsafe {
        let mut stx: libc::statx = std::mem::zeroed();
        let r = libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_STATX_DONT_SYNC,
            0,
            &mut stx,
        );
        (r, stx)
    };
    let flag = libc::STATX_ATTR_MOUNT_ROOT as u64;
    r == 0 && stx.stx_attributes_mask & flag != 0 && stx.stx_attributes & flag != 0
}

/// The loop device that backs the filesystem mounted at `root`, if it is one.
fn loop_device_of(root: &Path) -> Option<PathBuf> {
    let dev = std::fs::metadata(root).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let name = std::fs::read_link(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    let name = name.file_name()?.to_str()?;
    name.starts_with("loop")
        .then(|| PathBuf::from(format!("/dev/{name}")))
}

/// Waits until the autoclear loop device at `device` is detached.
fn wait_loop_free(device: &Path) -> bool {
    let backing = Path::new("/sys/block")
        .join(device.file_name().unwrap_or_default())
        .join("loop/backing_file");
    let start = Instant::now();
    while backing.exists() {
        if start.elapsed() > LOOP_FREE_TIMEOUT {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_image_gets_another_key() {
        let path = std::env::temp_dir().join(format!("twinbox-key-{}", std::process::id()));
        std::fs::write(&path, b"one").unwrap();
        let first = key(&path).unwrap();
        assert_eq!(key(&path).unwrap(), first, "the same file, the same key");
        std::fs::write(&path, b"two!").unwrap();
        assert_ne!(key(&path).unwrap(), first, "written: size, mtime, ctime");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn mount_roots_are_told_from_plain_directories() {
        assert!(is_mount_root(Path::new("/proc")));
        assert!(!is_mount_root(Path::new("/proc/self")));
        assert!(!is_mount_root(Path::new("/nonexistent/twinbox")));
    }
}
