//! The filesystem of the container as data: every mount, directory, device node bind and
//! symlink the child makes under a staging directory before `pivot_root`. Built (and
//! every C string allocated) in the parent, so the child after `clone` only walks it.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use twinbox_spec::DiskSpec;

/// Host device nodes bind-mounted into the container's `/dev`.
pub const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Where extra disk `n` appears inside the container: `/mnt/disk<n>` (a bind mount of the
/// host file, read-only for `:ro`), mirroring `/dev/vdb...` in the VM.
pub fn disk_path(n: usize) -> String {
    format!("/mnt/disk{n}")
}

/// One step of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Mount {
        source: CString,
        target: CString,
        fstype: CString,
        flags: libc::c_ulong,
        data: CString,
    },
    /// Directory (an existing one is fine).
    Mkdir(CString),
    /// Empty file to bind a device or disk onto (an existing one is fine).
    Touch(CString),
    Symlink {
        target: CString,
        link: CString,
    },
    /// `move_mount` of a detached mount (an fd the parent made with `fsmount`) onto
    /// `target`: how the image gets in under `--userns`, where ext4 cannot be mounted.
    Attach {
        fd: std::os::fd::RawFd,
        target: CString,
    },
}

/// Where the read-only image layer comes from.
#[derive(Clone, Copy, Debug)]
pub enum Lower<'a> {
    /// Mount this block device as ext4 (the default path, host user namespace).
    Device(&'a Path),
    /// Attach this detached, already mounted ext4 (`--userns`); the extra disks are
    /// attached from these detached binds too (one per disk, in order, read-only already
    /// where asked).
    Detached {
        image: std::os::fd::RawFd,
        disks: &'a [std::os::fd::RawFd],
    },
}

fn c(s: impl AsRef<str>) -> CString {
    // Paths come from our own format strings and host paths without NULs (checked in
    // `build`), so this cannot fail.
    CString::new(s.as_ref()).unwrap_or_default()
}

fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn mount(source: &str, target: String, fstype: &str, flags: libc::c_ulong, data: &str) -> Step {
    Step::Mount {
        source: c(source),
        target: c(target),
        fstype: c(fstype),
        flags,
        data: c(data),
    }
}

fn bind(source: &str, target: String, read_only: bool) -> Vec<Step> {
    let mut steps = vec![mount(source, target.clone(), "", libc::MS_BIND, "")];
    if read_only {
        steps.push(mount(
            "",
            target,
            "",
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            "",
        ));
    }
    steps
}

/// The plan and where the new root ends up.
#[derive(Debug)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// The directory to `pivot_root` into.
    pub new_root: CString,
}

/// Plans the container's filesystem under `staging` (an empty host directory) from the
/// loop device holding the image and the extra disks.
pub fn build(staging: &Path, loop_device: &Path, disks: &[DiskSpec]) -> Result<Plan, String> {
    build_with(staging, Lower::Device(loop_device), disks)
}

/// [`build`] with the image layer given as a [`Lower`].
pub fn build_with(staging: &Path, lower: Lower<'_>, disks: &[DiskSpec]) -> Result<Plan, String> {
    let device = match lower {
        Lower::Device(d) => Some(d),
        Lower::Detached { disks: fds, .. } => {
            if fds.len() != disks.len() {
                return Err(format!(
                    "{} disks but {} detached binds",
                    disks.len(),
                    fds.len()
                ));
            }
            None
        }
    };
    for path in [staging]
        .into_iter()
        .chain(device)
        .chain(disks.iter().map(|d| d.path.as_path()))
    {
        if p(path).contains('\0') {
            return Err(format!("path {path:?} contains a NUL byte"));
        }
    }
    let s = p(staging);
    let root = format!("{s}/root");
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    let mut steps = vec![
        // Everything of the run lives on this tmpfs, in the child's mount namespace only.
        mount("twinbox", s.clone(), "tmpfs", nosuid_nodev, "mode=0755"),
        Step::Mkdir(c(format!("{s}/lower"))),
        Step::Mkdir(c(format!("{s}/upper"))),
        Step::Mkdir(c(format!("{s}/work"))),
        Step::Mkdir(c(&root)),
        match lower {
            Lower::Device(device) => mount(
                &p(device),
                format!("{s}/lower"),
                "ext4",
                libc::MS_RDONLY,
                "",
            ),
            Lower::Detached { image, .. } => Step::Attach {
                fd: image,
                target: c(format!("{s}/lower")),
            },
        },
        mount(
            "overlay",
            root.clone(),
            "overlay",
            0,
            &format!("lowerdir={s}/lower,upperdir={s}/upper,workdir={s}/work"),
        ),
    ];
    for dir in ["proc", "sys", "dev", "tmp", "run"] {
        steps.push(Step::Mkdir(c(format!("{root}/{dir}"))));
    }
    steps.push(mount(
        "proc",
        format!("{root}/proc"),
        "proc",
        nosuid_nodev | libc::MS_NOEXEC,
        "",
    ));
    steps.push(mount(
        "tmpfs",
        format!("{root}/dev"),
        "tmpfs",
        libc::MS_NOSUID | libc::MS_STRICTATIME,
        "mode=0755,size=65536k",
    ));
    for dev in DEVICES {
        steps.push(Step::Touch(c(format!("{root}/dev/{dev}"))));
        steps.extend(bind(
            &format!("/dev/{dev}"),
            format!("{root}/dev/{dev}"),
            false,
        ));
    }
    steps.push(Step::Mkdir(c(format!("{root}/dev/pts"))));
    steps.push(Step::Mkdir(c(format!("{root}/dev/shm"))));
    steps.push(mount(
        "devpts",
        format!("{root}/dev/pts"),
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    ));
    steps.push(mount(
        "shm",
        format!("{root}/dev/shm"),
        "tmpfs",
        nosuid_nodev | libc::MS_NOEXEC,
        "mode=1777,size=65536k",
    ));
    for (target, link) in [
        ("pts/ptmx", "ptmx"),
        ("/proc/self/fd", "fd"),
        ("/proc/self/fd/0", "stdin"),
        ("/proc/self/fd/1", "stdout"),
        ("/proc/self/fd/2", "stderr"),
    ] {
        steps.push(Step::Symlink {
            target: c(target),
            link: c(format!("{root}/dev/{link}")),
        });
    }
    steps.push(mount(
        "sysfs",
        format!("{root}/sys"),
        "sysfs",
        nosuid_nodev | libc::MS_NOEXEC | libc::MS_RDONLY,
        "",
    ));
    steps.push(mount(
        "tmpfs",
        format!("{root}/tmp"),
        "tmpfs",
        nosuid_nodev,
        "mode=1777",
    ));
    steps.push(mount(
        "tmpfs",
        format!("{root}/run"),
        "tmpfs",
        nosuid_nodev,
        "mode=0755",
    ));
    if !disks.is_empty() {
        steps.push(Step::Mkdir(c(format!("{root}/mnt"))));
    }
    for (n, disk) in disks.iter().enumerate() {
        let target = format!("{root}{}", disk_path(n));
        steps.push(Step::Touch(c(&target)));
        match lower {
            Lower::Detached { disks: fds, .. } => steps.push(Step::Attach {
                fd: fds[n],
                target: c(target),
            }),
            Lower::Device(_) => steps.extend(bind(&p(&disk.path), target, disk.read_only)),
        }
    }
    Ok(Plan {
        steps,
        new_root: c(root),
    })
}

impl Step {
    /// A one-line description for error messages.
    pub fn describe(&self) -> String {
        let s = |c: &CString| c.to_string_lossy().into_owned();
        match self {
            Step::Mount {
                source,
                target,
                fstype,
                ..
            } => format!("mount {} ({}) on {}", s(source), s(fstype), s(target)),
            Step::Mkdir(path) => format!("mkdir {}", s(path)),
            Step::Touch(path) => format!("create {}", s(path)),
            Step::Symlink { target, link } => format!("symlink {} -> {}", s(link), s(target)),
            Step::Attach { target, .. } => format!("attach the image (ext4) on {}", s(target)),
        }
    }
}

/// Directory the plan uses for the staging tmpfs of run `name`.
pub fn staging_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(plan: &Plan) -> Vec<String> {
        plan.steps
            .iter()
            .filter_map(|s| match s {
                Step::Mount { target, fstype, .. } => Some(format!(
                    "{}:{}",
                    fstype.to_string_lossy(),
                    target.to_string_lossy()
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn overlay_over_read_only_image_then_api_filesystems() {
        let plan = build(Path::new("/tmp/s"), Path::new("/dev/loop7"), &[]).unwrap();
        let t = targets(&plan);
        assert_eq!(t[0], "tmpfs:/tmp/s");
        assert_eq!(t[1], "ext4:/tmp/s/lower");
        assert_eq!(t[2], "overlay:/tmp/s/root");
        let pos = |x: &str| {
            t.iter()
                .position(|m| m == x)
                .unwrap_or_else(|| panic!("{x} in {t:?}"))
        };
        assert!(pos("proc:/tmp/s/root/proc") > 2);
        assert!(pos("devpts:/tmp/s/root/dev/pts") > pos("tmpfs:/tmp/s/root/dev"));
        pos("sysfs:/tmp/s/root/sys");
        assert_eq!(plan.new_root.to_str().unwrap(), "/tmp/s/root");
        let ext4 = &plan.steps[5];
        assert!(
            matches!(ext4, Step::Mount { flags, source, .. } if flags & libc::MS_RDONLY != 0 && source.to_str() == Ok("/dev/loop7"))
        );
        let sys = plan
            .steps
            .iter()
            .find(|s| matches!(s, Step::Mount { fstype, .. } if fstype.to_str() == Ok("sysfs")))
            .unwrap();
        assert!(matches!(sys, Step::Mount { flags, .. } if flags & libc::MS_RDONLY != 0));
        for dev in DEVICES {
            pos(&format!(":/tmp/s/root/dev/{dev}"));
        }
    }

    #[test]
    fn disks_are_bound_under_mnt_read_only_when_asked() {
        let disks = vec![
            DiskSpec {
                path: "/data/a.img".into(),
                read_only: false,
            },
            DiskSpec {
                path: "/data/b.img".into(),
                read_only: true,
            },
        ];
        let plan = build(Path::new("/s"), Path::new("/dev/loop0"), &disks).unwrap();
        let binds: Vec<&Step> = plan
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Mount { target, .. } if target.to_string_lossy().contains("/mnt/disk")))
            .collect();
        assert_eq!(binds.len(), 3, "{binds:?}");
        assert!(
            matches!(binds[0], Step::Mount { source, flags, .. } if source.to_str() == Ok("/data/a.img") && *flags == libc::MS_BIND)
        );
        assert!(
            matches!(binds[2], Step::Mount { flags, target, .. } if flags & libc::MS_RDONLY != 0 && target.to_str() == Ok("/s/root/mnt/disk1"))
        );
    }

    #[test]
    fn detached_image_is_attached_instead_of_mounted() {
        let disks = vec![DiskSpec {
            path: "/data/a.img".into(),
            read_only: true,
        }];
        let lower = Lower::Detached {
            image: 7,
            disks: &[8],
        };
        let plan = build_with(Path::new("/s"), lower, &disks).unwrap();
        assert_eq!(
            plan.steps[5],
            Step::Attach {
                fd: 7,
                target: c("/s/lower")
            }
        );
        assert_eq!(
            plan.steps.last(),
            Some(&Step::Attach {
                fd: 8,
                target: c("/s/root/mnt/disk0")
            })
        );
        let t = targets(&plan);
        assert!(!t
            .iter()
            .any(|t| t.starts_with("ext4:") || t.contains("disk0")));
        let lower = Lower::Detached {
            image: 7,
            disks: &[],
        };
        assert!(build_with(Path::new("/s"), lower, &disks).is_err());
    }

    #[test]
    fn nul_in_paths_is_refused() {
        assert!(build(Path::new("/s\0x"), Path::new("/dev/loop0"), &[]).is_err());
    }
}
