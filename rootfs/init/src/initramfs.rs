//! Init started from twinbox's initramfs: mount the real root and switch to it, so the
//! root image need not carry init at all.
//!
//! The VMM boots every VM with the cached initramfs (`rootfs/build-init.sh`), which holds
//! this binary as `/init` (see `initramfs_layout.rs`). The kernel runs it as PID 1 on the
//! initramfs, before any root is mounted; init notices ([`decide`]: PID 1, no job in the
//! environment, the marker file at `/`) and, first thing after `/proc`:
//!
//! 1. reads the root device and its type from the command line (`root=`, default
//!    `/dev/vda`; `rootfstype=`, default `ext4`: [`RootDisk::from_cmdline`]);
//! 2. mounts devtmpfs on `/dev` and waits up to [`DEVICE_WAIT`] for the device node (the
//!    disk may be probed after init starts);
//! 3. mounts it read-only at [`IMAGE`], a tmpfs at [`LAYER`] and an overlay of the two at
//!    [`NEW_ROOT`] — the same writable root `overlay_root` makes when init starts from
//!    the image, made here because a read-only image may lack even `/proc` or `/dev`,
//!    which the overlay can create in its upper layer;
//! 4. moves `/dev` and `/proc` into the new root and does what `switch_root` does:
//!    `chdir` into it, moves it onto `/` (`MS_MOVE`) and `chroot`s there (`pivot_root`
//!    cannot leave the initramfs, the kernel's rootfs).
//!
//! From there init goes on exactly as when the kernel started it from the image, minus
//! `overlay_root`, which is done already. The initramfs's own files stay under the new
//! root, unreachable: they are this binary (whose pages the running init holds anyway),
//! the marker and a few empty directories, so there is nothing worth freeing.

use crate::initramfs_layout::{IMAGE, LAYER, MARKER, NEW_ROOT};
use crate::mounts::{self, mkdir, mount, move_under, stage_tmpfs};
use crate::sys::{check, cstring, SysError};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long init waits for the root device's node to appear in devtmpfs.
pub const DEVICE_WAIT: Duration = Duration::from_secs(10);
/// How often it looks.
const DEVICE_STEP: Duration = Duration::from_millis(5);

/// Where this init started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// On a root that is already the box's: the image (VM) or the container's root.
    OnRoot,
    /// As PID 1 on twinbox's initramfs: the root must be mounted and switched to.
    OnInitramfs,
}

/// Decides where init started from facts gathered by [`detect`]: only PID 1 without a job
/// in its environment (a container runtime sets one) and with the initramfs's marker at
/// `/` is on the initramfs. Anything else — a container, a test running init on a host,
/// the image's own init booted by `init=` — is left as it was.
pub fn decide(pid: i32, job_in_env: bool, marker_at_root: bool) -> Start {
    if pid == 1 && !job_in_env && marker_at_root {
        Start::OnInitramfs
    } else {
        Start::OnRoot
    }
}

/// [`decide`] for this process.
pub fn detect() -> Start {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let job_in_env = std::env::var_os(twinbox_proto::job::JOB_ENV_VAR).is_some();
    decide(pid, job_in_env, Path::new(MARKER).exists())
}

/// The root disk named on the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootDisk {
    /// Device node, e.g. `/dev/vda`.
    pub device: String,
    /// Filesystem type, e.g. `ext4`.
    pub fstype: String,
}

impl RootDisk {
    /// `root=` and `rootfstype=` from a command line (last one wins, as in the kernel);
    /// without them `/dev/vda` and `ext4`, what twinbox's VMM attaches. Only a device path
    /// is understood (no `UUID=`/`LABEL=`: that needs a udev-like lookup).
    pub fn from_cmdline(cmdline: &str) -> Result<Self, SysError> {
        let mut disk = Self {
            device: "/dev/vda".to_owned(),
            fstype: "ext4".to_owned(),
        };
        for word in cmdline.split_ascii_whitespace() {
            if let Some(device) = word.strip_prefix("root=") {
                disk.device = device.to_owned();
            } else if let Some(fstype) = word.strip_prefix("rootfstype=") {
                disk.fstype = fstype.to_owned();
            }
        }
        if !disk.device.starts_with("/dev/") || disk.device.contains("/../") {
            return Err(SysError::new(
                format!(
                    "root={}: twinbox's initramfs mounts a /dev path only",
                    disk.device
                ),
                libc::EINVAL,
            ));
        }
        Ok(disk)
    }
}

/// Waits until `path` exists, looking every few milliseconds for at most `limit`.
pub fn wait_for(path: &Path, limit: Duration) -> Result<(), SysError> {
    let started = Instant::now();
    loop {
        if path.exists() {
            return Ok(());
        }
        if started.elapsed() >= limit {
            return Err(SysError::new(
                format!(
                    "root device {} did not appear within {} s",
                    path.display(),
                    limit.as_secs()
                ),
                libc::ENODEV,
            ));
        }
        std::thread::sleep(DEVICE_STEP);
    }
}

/// The overlay's options for the layout above.
pub fn overlay_options() -> String {
    format!("lowerdir={IMAGE},upperdir={LAYER}/upper,workdir={LAYER}/work")
}

/// Mounts the root disk under an overlay and switches to it (see the module docs).
/// `/proc` must be mounted.
pub fn switch_root() -> Result<(), SysError> {
    let cmdline = std::fs::read_to_string("/proc/cmdline")
        .map_err(|e| SysError::new("read /proc/cmdline", e.raw_os_error().unwrap_or(libc::EIO)))?;
    let disk = RootDisk::from_cmdline(&cmdline)?;
    mounts::ensure(&mounts::DEV_VM)?;
    crate::console::adopt_console_if_stdio_closed();
    wait_for(Path::new(&disk.device), DEVICE_WAIT)?;
    for dir in [IMAGE, LAYER, NEW_ROOT] {
        mkdir(dir)?;
    }
    mount(&disk.device, IMAGE, &disk.fstype, libc::MS_RDONLY, "")?;
    stage_tmpfs(LAYER)?;
    mkdir(&format!("{LAYER}/upper"))?;
    mkdir(&format!("{LAYER}/work"))?;
    mount("overlay", NEW_ROOT, "overlay", 0, &overlay_options())?;
    // /proc last: a MountTable reads /proc/self/mountinfo.
    move_under(NEW_ROOT, ["/dev", "/proc"])?;
    let new_root = cstring(NEW_ROOT)?;
    // SAFETY: plain syscalls on valid NUL-terminated paths; results are checked.
    unsafe {
        check(libc::chdir(new_root.as_ptr()), || {
            format!("chdir {NEW_ROOT}")
        })?;
    }
    mount(".", "/", "", libc::MS_MOVE, "")?;
    // SAFETY: as above.
    unsafe {
        check(libc::chroot(c".".as_ptr()), || {
            format!("chroot into {NEW_ROOT}")
        })?;
        check(libc::chdir(c"/".as_ptr()), || "chdir /".to_owned())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::initramfs_layout::DIRS;

    #[test]
    fn only_pid_1_without_a_job_and_with_the_marker_is_on_the_initramfs() {
        assert_eq!(decide(1, false, true), Start::OnInitramfs);
        // A container: the runtime put the job in the environment.
        assert_eq!(decide(1, true, true), Start::OnRoot);
        // The image's own init (init=/sbin/twinbox-init), or a plain ext4 root.
        assert_eq!(decide(1, false, false), Start::OnRoot);
        // Not PID 1: a test or a person running the binary by hand.
        assert_eq!(decide(4242, false, true), Start::OnRoot);
    }

    #[test]
    fn the_root_disk_comes_from_the_command_line_with_twinbox_defaults() {
        let ours = "console=ttyS0 reboot=k panic=-1 quiet root=/dev/vda ro rootfstype=ext4 \
                    init=/sbin/twinbox-init twinbox.ports=1";
        assert_eq!(
            RootDisk::from_cmdline(ours).unwrap(),
            RootDisk {
                device: "/dev/vda".into(),
                fstype: "ext4".into()
            }
        );
        assert_eq!(
            RootDisk::from_cmdline("console=ttyS0").unwrap(),
            RootDisk::from_cmdline(ours).unwrap()
        );
        let other = RootDisk::from_cmdline("root=/dev/vdb rootfstype=xfs root=/dev/vdc").unwrap();
        assert_eq!(
            (other.device.as_str(), other.fstype.as_str()),
            ("/dev/vdc", "xfs")
        );
        for bad in ["root=UUID=1234", "root=vda", "root=/dev/../etc/x"] {
            let err = RootDisk::from_cmdline(bad).unwrap_err();
            assert_eq!(err.errno, libc::EINVAL, "{bad}");
            assert!(err.to_string().contains("/dev path only"), "{err}");
        }
    }

    #[test]
    fn the_device_is_waited_for_but_not_forever() {
        let dir = std::env::temp_dir().join(format!("twinbox-init-wait-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let late = dir.join("vda");
        let maker = {
            let late = late.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                std::fs::write(late, b"").unwrap();
            })
        };
        wait_for(&late, Duration::from_secs(5)).unwrap();
        maker.join().unwrap();
        let started = Instant::now();
        let err = wait_for(&dir.join("never"), Duration::from_millis(60)).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(60));
        assert_eq!(err.errno, libc::ENODEV);
        assert!(err.to_string().contains("did not appear within"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_overlay_and_its_mount_points_are_in_the_archive() {
        assert_eq!(
            overlay_options(),
            "lowerdir=/twinbox/image,upperdir=/twinbox/layer/upper,workdir=/twinbox/layer/work"
        );
        for dir in [IMAGE, LAYER, NEW_ROOT, "/dev", "/proc"] {
            assert!(DIRS.contains(&&dir[1..]), "{dir} not in {DIRS:?}");
        }
    }
}
