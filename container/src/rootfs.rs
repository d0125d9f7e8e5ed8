//! The container's root as a plan of mount-namespace operations: built (and unit-tested)
//! in the parent, executed in the child after `clone`, where nothing may allocate — every
//! path is a prebuilt `CString`.
//!
//! Layout, all inside the child's private mount namespace under a staging directory:
//! tmpfs at `staging`; the image's ext4 (read-only loop device) at `staging/lower`;
//! overlay with upper/work on that tmpfs at `staging/root`; then a minimal `/dev`, `/proc`,
//! `/sys` (ro), `/dev/pts`, `/dev/shm`, `/tmp`, `/run` and the extra disks inside it.
//! twinbox-init finds them mounted and skips its own mounts, so it needs no
//! `CAP_SYS_ADMIN`. Extra disks are bind-mounted at `/mnt/disk0`, `/mnt/disk1`, ... in the
//! order given (the VM sees the same files as `/dev/vdb`, `/dev/vdc`, ...).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use twinbox_spec::DiskSpec;

/// One step of the plan.
#[derive(Debug, PartialEq, Eq)]
pub enum Op {
    /// `mount(2)`.
    Mount {
        source: CString,
        target: CString,
        fstype: CString,
        flags: libc::c_ulong,
        data: CString,
    },
    /// `mkdir(2)` (an existing directory is fine).
    Mkdir { path: CString, mode: libc::mode_t },
    /// A character device node, mode 0666.
    CharDev {
        path: CString,
        major: u32,
        minor: u32,
    },
    /// `symlink(target, link)`.
    Symlink { target: CString, link: CString },
    /// An empty file to bind a non-directory onto.
    Touch { path: CString },
}

/// Where a disk is bound, and whether its source is a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    pub spec: DiskSpec,
    pub is_dir: bool,
}

fn c(path: impl AsRef<Path>) -> CString {
    CString::new(path.as_ref().as_os_str().as_bytes()).expect("paths built here have no NUL")
}

fn mount(source: &str, target: &Path, fstype: &str, flags: libc::c_ulong, data: &str) -> Op {
    Op::Mount {
        source: c(source),
        target: c(target),
        fstype: c(fstype),
        flags,
        data: c(data),
    }
}

/// The mount point of disk `index` inside the container.
pub fn disk_target(index: usize) -> PathBuf {
    PathBuf::from(format!("/mnt/disk{index}"))
}

/// The new root (to `pivot_root` into) for a staging directory.
pub fn new_root(staging: &Path) -> PathBuf {
    staging.join("root")
}

/// Every mount-namespace step from an empty staging directory to a complete root at
/// [`new_root`].
pub fn plan(staging: &Path, loop_device: &Path, disks: &[Disk]) -> Vec<Op> {
    use libc::{MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REC, MS_REMOUNT};
    let root = new_root(staging);
    let lower = staging.join("lower");
    let upper = staging.join("upper");
    let work = staging.join("work");
    let mut ops = vec![mount("tmpfs", staging, "tmpfs", MS_NOSUID | MS_NODEV, "mode=700")];
    for dir in [&lower, &upper, &work, &root] {
        ops.push(Op::Mkdir {
            path: c(dir),
            mode: 0o755,
        });
    }
    ops.push(mount(
        &loop_device.to_string_lossy(),
        &lower,
        "ext4",
        MS_RDONLY,
        "",
    ));
    ops.push(mount(
        "overlay",
        &root,
        "overlay",
        0,
        &format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        ),
    ));
    let dev = root.join("dev");
    ops.push(mount("tmpfs", &dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=64k"));
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        ops.push(Op::CharDev {
            path: c(dev.join(name)),
            major,
            minor,
        });
    }
    for (target, link) in [
        ("pts/ptmx", "ptmx"),
        ("/proc/self/fd", "fd"),
        ("/proc/self/fd/0", "stdin"),
        ("/proc/self/fd/1", "stdout"),
        ("/proc/self/fd/2", "stderr"),
    ] {
        ops.push(Op::Symlink {
            target: c(target),
            link: c(dev.join(link)),
        });
    }
    for dir in ["pts", "shm"] {
        ops.push(Op::Mkdir {
            path: c(dev.join(dir)),
            mode: 0o755,
        });
    }
    ops.push(mount(
        "devpts",
        &dev.join("pts"),
        "devpts",
        MS_NOSUID | MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620,gid=5",
    ));
    ops.push(mount(
        "shm",
        &dev.join("shm"),
        "tmpfs",
        MS_NOSUID | MS_NODEV | MS_NOEXEC,
        "mode=1777",
    ));
    ops.push(mount("proc", &root.join("proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""));
    ops.push(mount(
        "sysfs",
        &root.join("sys"),
        "sysfs",
        MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
        "",
    ));
    ops.push(mount("tmpfs", &root.join("tmp"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"));
    ops.push(mount("tmpfs", &root.join("run"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=755"));
    if !disks.is_empty() {
        ops.push(Op::Mkdir {
            path: c(root.join("mnt")),
            mode: 0o755,
        });
    }
    for (index, disk) in disks.iter().enumerate() {
        let target = root.join(disk_target(index).strip_prefix("/").expect("absolute"));
        ops.push(if disk.is_dir {
            Op::Mkdir {
                path: c(&target),
                mode: 0o755,
            }
        } else {
            Op::Touch { path: c(&target) }
        });
        ops.push(mount(
            &disk.spec.path.to_string_lossy(),
            &target,
            "",
            MS_BIND | MS_REC,
            "",
        ));
        if disk.spec.read_only {
            ops.push(mount(
                "",
                &target,
                "",
                MS_BIND | MS_REMOUNT | MS_RDONLY,
                "",
            ));
        }
    }
    ops
}

/// A short description of a step, for error messages.
pub fn describe(op: &Op) -> String {
    match op {
        Op::Mount {
            source,
            target,
            fstype,
            ..
        } => format!(
            "mount {} ({}) on {}",
            source.to_string_lossy(),
            fstype.to_string_lossy(),
            target.to_string_lossy()
        ),
        Op::Mkdir { path, .. } => format!("mkdir {}", path.to_string_lossy()),
        Op::CharDev { path, .. } => format!("mknod {}", path.to_string_lossy()),
        Op::Symlink { link, .. } => format!("symlink {}", link.to_string_lossy()),
        Op::Touch { path } => format!("create {}", path.to_string_lossy()),
    }
}

/// Executes one step. Called in the cloned child: no allocation.
pub fn execute(op: &Op) -> Result<(), i32> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        }
    };
    match op {
        Op::Mount {
            source,
            target,
            fstype,
            flags,
            data,
        } => {
            let opt = |s: &CString| {
                if s.as_bytes().is_empty() {
                    std::ptr::null()
                } else {
                    s.as_ptr()
                }
            };
            // SAFETY: every pointer is a NUL-terminated string owned by the plan, or null.
            check(unsafe {
                libc::mount(
                    opt(source),
                    target.as_ptr(),
                    opt(fstype),
                    *flags,
                    opt(data).cast(),
                )
            })
        }
        Op::Mkdir { path, mode } => {
            // SAFETY: path is NUL-terminated.
            match check(unsafe { libc::mkdir(path.as_ptr(), *mode) }) {
                Err(libc::EEXIST) => Ok(()),
                other => other,
            }
        }
        Op::CharDev { path, major, minor } => {
            // SAFETY: path is NUL-terminated; makedev is pure arithmetic.
            check(unsafe {
                libc::mknod(
                    path.as_ptr(),
                    libc::S_IFCHR | 0o666,
                    libc::makedev(*major, *minor),
                )
            })?;
            // The umask may have cleared bits: devices must be usable by anyone.
            // SAFETY: path is NUL-terminated.
            check(unsafe { libc::chmod(path.as_ptr(), 0o666) })
        }
        Op::Symlink { target, link } => {
            // SAFETY: both NUL-terminated.
            check(unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) })
        }
        Op::Touch { path } => {
            // SAFETY: path is NUL-terminated; the descriptor is closed right away.
            let fd = unsafe {
                libc::open(
                    path.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o644,
                )
            };
            if fd < 0 {
                return check(-1);
            }
            // SAFETY: fd was just opened here.
            unsafe { libc::close(fd) };
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(ops: &[Op]) -> Vec<String> {
        ops.iter()
            .filter_map(|op| match op {
                Op::Mount { target, fstype, .. } => Some(format!(
                    "{}:{}",
                    fstype.to_string_lossy(),
                    target.to_string_lossy()
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn plan_mounts_in_order() {
        let ops = plan(Path::new("/s"), Path::new("/dev/loop3"), &[]);
        assert_eq!(
            targets(&ops),
            [
                "tmpfs:/s",
                "ext4:/s/lower",
                "overlay:/s/root",
                "tmpfs:/s/root/dev",
                "devpts:/s/root/dev/pts",
                "tmpfs:/s/root/dev/shm",
                "proc:/s/root/proc",
                "sysfs:/s/root/sys",
                "tmpfs:/s/root/tmp",
                "tmpfs:/s/root/run",
            ]
        );
        let Op::Mount {
            source, flags, data, ..
        } = &ops[5]
        else {
            panic!("ext4 mount expected at step 5: {:?}", ops[5]);
        };
        assert_eq!(source.to_str().unwrap(), "/dev/loop3");
        assert_eq!(*flags & libc::MS_RDONLY, libc::MS_RDONLY);
        assert!(data.as_bytes().is_empty());
        assert!(ops.iter().any(|op| matches!(op,
            Op::Mount { data, .. } if data.to_str().unwrap()
                == "lowerdir=/s/lower,upperdir=/s/upper,workdir=/s/work")));
        // /sys is read-only.
        assert!(ops.iter().any(|op| matches!(op,
            Op::Mount { fstype, flags, .. } if fstype.to_str().unwrap() == "sysfs"
                && flags & libc::MS_RDONLY != 0)));
        let devices: Vec<_> = ops
            .iter()
            .filter_map(|op| match op {
                Op::CharDev { path, .. } => Some(path.to_str().unwrap().to_owned()),
                _ => None,
            })
            .collect();
        assert_eq!(devices.len(), 6);
        assert!(devices.contains(&"/s/root/dev/null".to_owned()));
    }

    #[test]
    fn disks_bind_in_order_and_read_only_is_remounted() {
        let disks = [
            Disk {
                spec: "/data/a.img".parse().unwrap(),
                is_dir: false,
            },
            Disk {
                spec: "/data/dir:ro".parse().unwrap(),
                is_dir: true,
            },
        ];
        let ops = plan(Path::new("/s"), Path::new("/dev/loop0"), &disks);
        let tail = &targets(&ops)[10..];
        assert_eq!(tail, [":/s/root/mnt/disk0", ":/s/root/mnt/disk1", ":/s/root/mnt/disk1"]);
        assert!(ops.contains(&Op::Touch {
            path: c("/s/root/mnt/disk0")
        }));
        assert!(ops.contains(&Op::Mkdir {
            path: c("/s/root/mnt/disk1"),
            mode: 0o755
        }));
        let Some(Op::Mount { flags, .. }) = ops.last() else {
            panic!("remount expected last");
        };
        assert_eq!(
            *flags,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY
        );
        assert_eq!(disk_target(1), PathBuf::from("/mnt/disk1"));
    }
}
