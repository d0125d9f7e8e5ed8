//! The filesystem of the container as data: every mount, directory, device node bind and
//! symlink the child makes under a staging directory before `pivot_root`. Built (and
//! every C string allocated) in the parent, so the child after `clone` only walks it.
//!
//! The lockdown follows runc's and moby's default spec: the [`MASKED`] paths of `/proc` and `/sys`
//! are hidden, the [`READ_ONLY`] ones cannot be written (a sysctl write checks only the
//! euid, and container root is host root without `--userns`), and every mount is `nodev`
//! except the bound device nodes themselves and devpts: a node the workload manages to
//! create anywhere cannot be opened.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

/// Host device nodes bind-mounted into the container's `/dev` (the cgroup's device
/// allowlist admits exactly these, plus devpts' ptmx and ptys).
pub const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// The masked paths of runc's and moby's default spec (moby's newer list: with
/// `/proc/interrupts` and `/sys/devices/virtual/powercap`, whose energy counters are a
/// side channel): `/dev/null` is bound over a file, an empty read-only tmpfs over a
/// directory; a path this kernel does not have is skipped.
pub const MASKED: [&str; 12] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// The read-only paths of the same specs: bound onto themselves, then remounted
/// read-only; a path this kernel does not have is skipped.
pub const READ_ONLY: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The directory of twinbox's own files inside the container: a small tmpfs of the
/// runtime's, read-only once its mount point is made, over whatever the image has there.
pub const INIT_DIR: &str = "/.twinbox";
/// Where the host's twinbox-init appears inside the container, bound read-only onto an
/// empty file of [`INIT_DIR`]: the image never supplies PID 1 and needs no mount point.
pub const INIT: &str = "/.twinbox/init";

/// The image's top-level entries the plan mounts over or creates in: each must be absent
/// or a directory in the image (`detached::check_mount_points`). The plan's paths are
/// resolved on the host's side of the child, before `pivot_root`, so a symlink of the
/// image there would steer a mount, or a file twinbox creates, onto a host path. `/mnt`
/// only with extra disks (a tmpfs of ours goes over it, then the disks' files).
pub fn image_mount_points(disks: usize) -> Vec<&'static str> {
    let mut names = vec![
        INIT_DIR.trim_start_matches('/'),
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
    ];
    if disks > 0 {
        names.push("mnt");
    }
    names
}

/// Where extra disk `n` appears inside the container: `/mnt/disk<n>` (a bind mount of the
/// host file, read-only for `:ro`), mirroring `/dev/vdb...` in the VM.
pub fn disk_path(n: usize) -> String {
    format!("/mnt/disk{n}")
}

/// One step of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// `mount(2)` with these arguments (an empty string stands for NULL).
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
    /// `link` pointing at `target` (an existing one is fine).
    Symlink { target: CString, link: CString },
    /// `move_mount` of a detached mount (an fd the parent made, `detached.rs`) onto
    /// `target`: how the image and the extra disks get in.
    Attach { fd: RawFd, target: CString },
    /// Hide this path: `/dev/null` over a file, an empty read-only tmpfs over a directory;
    /// skipped when the path does not exist.
    Mask(CString),
    /// Bind this path onto itself and remount it read-only (keeping nosuid, nodev,
    /// noexec); skipped when the path does not exist.
    ReadOnly(CString),
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

/// What the overlay's lower layer is made of: detached mounts the parent made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lower {
    /// The ext4 image, one read-only mount (`--rootfs`, the built-in image).
    Image(RawFd),
    /// An OCI image's layers, lowest first (`--image`): one read-only bind each, stacked
    /// as overlayfs lower directories as Docker's overlay2 does, no copy, no flattening.
    Layers(Vec<RawFd>),
    /// The same layers, idmapped into the child's user namespace (`--userns`): mounted by
    /// that namespace's root, the overlay takes `userxattr` and so reads the opaque
    /// markers from `user.overlay.opaque` (`trusted.*` is host root's alone).
    UsernsLayers(Vec<RawFd>),
}

/// The plan and where the new root ends up.
#[derive(Debug)]
pub struct Plan {
    /// In order; the child stops at the first that fails.
    pub steps: Vec<Step>,
    /// The directory to `pivot_root` into.
    pub new_root: CString,
}

/// Plans the container's filesystem under `staging` (an empty host directory) from the
/// detached mount(s) of the root (`lower`), the detached bind of the host's init and one
/// detached bind per extra disk, in order.
pub fn build(staging: &Path, lower: &Lower, init: RawFd, disks: &[RawFd]) -> Result<Plan, String> {
    let s = p(staging);
    if s.contains('\0') {
        return Err(format!("path {staging:?} contains a NUL byte"));
    }
    let root = format!("{s}/root");
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    let mut steps = vec![
        // Everything of the run lives on this tmpfs, in the child's mount namespace only;
        // the overlay's upper layer with it, fresh for every run.
        mount("twinbox", s.clone(), "tmpfs", nosuid_nodev, "mode=0755"),
        Step::Mkdir(c(format!("{s}/lower"))),
        Step::Mkdir(c(format!("{s}/upper"))),
        Step::Mkdir(c(format!("{s}/work"))),
        Step::Mkdir(c(&root)),
    ];
    let lowerdir = match lower {
        Lower::Image(fd) => {
            steps.push(Step::Attach {
                fd: *fd,
                target: c(format!("{s}/lower")),
            });
            format!("{s}/lower")
        }
        // lower/0 is the base layer; overlayfs takes the topmost first. Short names keep
        // the option well inside a page however long the cache's path is. An image without
        // layers gets the empty directory.
        Lower::Layers(fds) | Lower::UsernsLayers(fds) if fds.is_empty() => format!("{s}/lower"),
        Lower::Layers(fds) | Lower::UsernsLayers(fds) => {
            for (n, fd) in fds.iter().enumerate() {
                let target = format!("{s}/lower/{n}");
                steps.push(Step::Mkdir(c(&target)));
                steps.push(Step::Attach {
                    fd: *fd,
                    target: c(target),
                });
            }
            (0..fds.len())
                .rev()
                .map(|n| format!("{s}/lower/{n}"))
                .collect::<Vec<_>>()
                .join(":")
        }
    };
    let userxattr = if matches!(lower, Lower::UsernsLayers(_)) {
        ",userxattr"
    } else {
        ""
    };
    // Not nosuid: set-id programs of the image behave as in any container (and gain
    // nothing under no_new_privs); nodev: no device node of the image opens.
    steps.push(mount(
        "overlay",
        root.clone(),
        "overlay",
        libc::MS_NODEV,
        &format!("lowerdir={lowerdir},upperdir={s}/upper,workdir={s}/work{userxattr}"),
    ));
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
    // nodev: a node made here does not open; the bound nodes are mounts of their own and
    // keep the flags of the host's /dev.
    steps.push(mount(
        "tmpfs",
        format!("{root}/dev"),
        "tmpfs",
        nosuid_nodev | libc::MS_NOEXEC | libc::MS_STRICTATIME,
        "mode=0755,size=65536k",
    ));
    for dev in DEVICES {
        let target = format!("{root}/dev/{dev}");
        steps.push(Step::Touch(c(&target)));
        steps.push(mount(&format!("/dev/{dev}"), target, "", libc::MS_BIND, ""));
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
    // The host's init: its directory is made in the overlay's upper layer when the image
    // lacks it (the image is never written), then covered by a tmpfs of ours before
    // anything is created in it, so no symlink of the image can steer the file made
    // below onto a host path; the tmpfs goes read-only, and the bind on the file is
    // read-only, nosuid, nodev and private (detached.rs).
    let init_dir = format!("{root}{INIT_DIR}");
    steps.push(Step::Mkdir(c(&init_dir)));
    steps.push(mount(
        "twinbox",
        init_dir.clone(),
        "tmpfs",
        nosuid_nodev | libc::MS_NOEXEC,
        "mode=0755,size=4k",
    ));
    steps.push(Step::Touch(c(format!("{root}{INIT}"))));
    steps.push(mount(
        "",
        init_dir,
        "",
        libc::MS_REMOUNT | libc::MS_RDONLY | nosuid_nodev | libc::MS_NOEXEC,
        "",
    ));
    steps.push(Step::Attach {
        fd: init,
        target: c(format!("{root}{INIT}")),
    });
    // Extra disks: a tmpfs of ours over `/mnt` first, as for init, so nothing the image
    // has below `/mnt` can steer the files made for them; read-only once they exist.
    if !disks.is_empty() {
        steps.push(Step::Mkdir(c(format!("{root}/mnt"))));
        steps.push(mount(
            "twinbox",
            format!("{root}/mnt"),
            "tmpfs",
            nosuid_nodev | libc::MS_NOEXEC,
            "mode=0755,size=4k",
        ));
        for n in 0..disks.len() {
            steps.push(Step::Touch(c(format!("{root}{}", disk_path(n)))));
        }
        steps.push(mount(
            "",
            format!("{root}/mnt"),
            "",
            libc::MS_REMOUNT | libc::MS_RDONLY | nosuid_nodev | libc::MS_NOEXEC,
            "",
        ));
    }
    for (n, fd) in disks.iter().enumerate() {
        let target = format!("{root}{}", disk_path(n));
        steps.push(Step::Attach {
            fd: *fd,
            target: c(target),
        });
    }
    steps.extend(MASKED.iter().map(|m| Step::Mask(c(format!("{root}{m}")))));
    steps.extend(
        READ_ONLY
            .iter()
            .map(|r| Step::ReadOnly(c(format!("{root}{r}")))),
    );
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
            Step::Attach { target, .. } => format!("attach a detached mount on {}", s(target)),
            Step::Mask(path) => format!("mask {}", s(path)),
            Step::ReadOnly(path) => format!("make {} read-only", s(path)),
        }
    }
}

/// Directory the plan mounts its staging tmpfs over: the same for every run, as each child
/// mounts it in its own (private) mount namespace, where it vanishes with the namespace;
/// the host keeps one empty directory and no run ever makes or removes one.
pub fn staging_dir() -> PathBuf {
    PathBuf::from(crate::sweep::STAGING_ROOT)
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

    fn position(plan: &Plan, wanted: &Step) -> usize {
        plan.steps
            .iter()
            .position(|s| s == wanted)
            .unwrap_or_else(|| panic!("{wanted:?} not in the plan"))
    }

    /// Where the plan mounts its only filesystem of type `fstype`.
    fn mount_of(plan: &Plan, fstype: &str) -> usize {
        let mut at = plan.steps.iter().enumerate().filter(
            |(_, s)| matches!(s, Step::Mount { fstype: t, .. } if t.to_str() == Ok(fstype)),
        );
        let (first, _) = at
            .next()
            .unwrap_or_else(|| panic!("no {fstype} mount in the plan"));
        assert!(at.next().is_none(), "more than one {fstype} mount");
        first
    }

    #[test]
    fn overlay_over_the_detached_image_then_api_filesystems() {
        let plan = build(Path::new("/tmp/s"), &Lower::Image(7), 6, &[]).unwrap();
        let t = targets(&plan);
        assert_eq!(t[0], "tmpfs:/tmp/s");
        assert_eq!(t[1], "overlay:/tmp/s/root");
        assert_eq!(
            plan.steps[5],
            Step::Attach {
                fd: 7,
                target: c("/tmp/s/lower")
            }
        );
        let pos = |x: &str| {
            t.iter()
                .position(|m| m == x)
                .unwrap_or_else(|| panic!("{x} in {t:?}"))
        };
        assert!(pos("proc:/tmp/s/root/proc") > 1);
        assert!(pos("devpts:/tmp/s/root/dev/pts") > pos("tmpfs:/tmp/s/root/dev"));
        pos("sysfs:/tmp/s/root/sys");
        assert_eq!(plan.new_root.to_str().unwrap(), "/tmp/s/root");
        let sys = &plan.steps[mount_of(&plan, "sysfs")];
        assert!(matches!(sys, Step::Mount { flags, .. } if flags & libc::MS_RDONLY != 0));
        for dev in DEVICES {
            pos(&format!(":/tmp/s/root/dev/{dev}"));
        }
    }

    #[test]
    fn every_mount_is_nodev_but_the_bound_nodes_and_devpts() {
        for lower in [Lower::Image(3), Lower::Layers(vec![6, 7])] {
            every_mount_is_nodev_with(&lower);
        }
    }

    fn every_mount_is_nodev_with(lower: &Lower) {
        let plan = build(Path::new("/s"), lower, 5, &[4]).unwrap();
        let mut exempt = Vec::new();
        for step in &plan.steps {
            let Step::Mount {
                source,
                target,
                fstype,
                flags,
                ..
            } = step
            else {
                continue;
            };
            let source = source.to_string_lossy();
            let bound_node =
                *flags == libc::MS_BIND && DEVICES.iter().any(|d| source == format!("/dev/{d}"));
            if bound_node || fstype.to_str() == Ok("devpts") {
                exempt.push(target.to_string_lossy().into_owned());
                continue;
            }
            assert_ne!(flags & libc::MS_NODEV, 0, "{step:?} lacks nodev");
        }
        assert_eq!(exempt.len(), DEVICES.len() + 1, "{exempt:?}");
        assert!(exempt.iter().all(|t| t.starts_with("/s/root/dev/")));
    }

    #[test]
    fn runc_masked_and_read_only_paths_come_after_proc_and_sys() {
        let plan = build(Path::new("/s"), &Lower::Image(3), 5, &[]).unwrap();
        let sys = mount_of(&plan, "sysfs");
        for path in [
            "/proc/kcore",
            "/proc/keys",
            "/proc/sched_debug",
            "/sys/firmware",
        ] {
            assert!(position(&plan, &Step::Mask(c(format!("/s/root{path}")))) > sys);
        }
        for path in ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"] {
            assert!(position(&plan, &Step::ReadOnly(c(format!("/s/root{path}")))) > sys);
        }
        assert_eq!(
            plan.steps
                .iter()
                .filter(|s| matches!(s, Step::Mask(_) | Step::ReadOnly(_)))
                .count(),
            MASKED.len() + READ_ONLY.len()
        );
    }

    #[test]
    fn disks_are_attached_under_mnt_in_order_on_files_of_a_tmpfs_of_ours() {
        let plan = build(Path::new("/s"), &Lower::Image(7), 6, &[8, 9]).unwrap();
        let mnt = c("/s/root/mnt");
        let tmpfs = plan
            .steps
            .iter()
            .position(|s| matches!(s, Step::Mount { target, fstype, .. } if *target == mnt && fstype.to_str() == Ok("tmpfs")))
            .expect("a tmpfs over /mnt");
        let read_only = plan
            .steps
            .iter()
            .position(|s| matches!(s, Step::Mount { target, flags, .. } if *target == mnt && flags & libc::MS_REMOUNT != 0 && flags & libc::MS_RDONLY != 0))
            .expect("/mnt's tmpfs made read-only");
        for (n, fd) in [8, 9].into_iter().enumerate() {
            let target = c(format!("/s/root/mnt/disk{n}"));
            let touch = position(&plan, &Step::Touch(target.clone()));
            // The file is made on our tmpfs, never through the image's own `/mnt`.
            assert!(tmpfs < touch && touch < read_only);
            assert!(position(&plan, &Step::Attach { fd, target }) > touch);
        }
        assert_eq!(image_mount_points(2).last(), Some(&"mnt"));
        assert!(!image_mount_points(0).contains(&"mnt"));
        assert!(!targets(&plan).iter().any(|t| t.contains("/mnt/disk")));
    }

    #[test]
    fn the_host_init_is_bound_onto_a_file_of_a_read_only_tmpfs_of_ours() {
        let plan = build(Path::new("/s"), &Lower::Image(7), 6, &[]).unwrap();
        let dir = c("/s/root/.twinbox");
        let file = c("/s/root/.twinbox/init");
        let mkdir = position(&plan, &Step::Mkdir(dir.clone()));
        let tmpfs = plan
            .steps
            .iter()
            .position(|s| matches!(s, Step::Mount { target, fstype, .. } if *target == dir && fstype.to_str() == Ok("tmpfs")))
            .unwrap();
        let touch = position(&plan, &Step::Touch(file.clone()));
        let read_only = plan
            .steps
            .iter()
            .position(|s| matches!(s, Step::Mount { target, flags, .. } if *target == dir && flags & libc::MS_REMOUNT != 0))
            .unwrap();
        let attach = position(
            &plan,
            &Step::Attach {
                fd: 6,
                target: file,
            },
        );
        // The file is made only on our tmpfs, never through the image's own entries.
        assert!(mkdir < tmpfs && tmpfs < touch && touch < read_only && read_only < attach);
        let Step::Mount { flags, .. } = &plan.steps[read_only] else {
            unreachable!()
        };
        assert_ne!(flags & libc::MS_RDONLY, 0);
        let overlay = mount_of(&plan, "overlay");
        assert!(
            overlay < mkdir,
            "the directory goes into the overlay's upper layer"
        );
        assert_eq!(format!("/s/root{INIT}"), "/s/root/.twinbox/init");
    }

    #[test]
    fn image_layers_are_stacked_topmost_first_each_on_a_short_name_of_its_own() {
        let plan = build(Path::new("/s"), &Lower::Layers(vec![10, 11, 12]), 6, &[]).unwrap();
        let overlay = mount_of(&plan, "overlay");
        for (n, fd) in [10, 11, 12].into_iter().enumerate() {
            let target = c(format!("/s/lower/{n}"));
            let mkdir = position(&plan, &Step::Mkdir(target.clone()));
            let attach = position(&plan, &Step::Attach { fd, target });
            assert!(mkdir < attach && attach < overlay);
        }
        let Step::Mount { data, flags, .. } = &plan.steps[overlay] else {
            unreachable!()
        };
        assert_eq!(
            data.to_str().unwrap(),
            "lowerdir=/s/lower/2:/s/lower/1:/s/lower/0,upperdir=/s/upper,workdir=/s/work"
        );
        assert_ne!(flags & libc::MS_NODEV, 0);
        // Everything after the root is the same as for an ext4 image.
        let image = build(Path::new("/s"), &Lower::Image(7), 6, &[]).unwrap();
        let after = |plan: &Plan| {
            let at = mount_of(plan, "overlay");
            plan.steps[at + 1..].to_vec()
        };
        assert_eq!(after(&plan), after(&image));
        // No layers: the empty directory is the lower layer.
        let empty = build(Path::new("/s"), &Lower::Layers(vec![]), 6, &[]).unwrap();
        assert!(empty
            .steps
            .iter()
            .any(|s| matches!(s, Step::Mount { data, .. }
            if data.to_str() == Ok("lowerdir=/s/lower,upperdir=/s/upper,workdir=/s/work"))));
    }

    #[test]
    fn layers_in_a_user_namespace_are_stacked_alike_with_user_xattrs() {
        let host = build(Path::new("/s"), &Lower::Layers(vec![10, 11]), 6, &[]).unwrap();
        let userns = build(Path::new("/s"), &Lower::UsernsLayers(vec![10, 11]), 6, &[]).unwrap();
        let overlay = mount_of(&userns, "overlay");
        let Step::Mount { data, .. } = &userns.steps[overlay] else {
            unreachable!()
        };
        assert_eq!(
            data.to_str().unwrap(),
            "lowerdir=/s/lower/1:/s/lower/0,upperdir=/s/upper,workdir=/s/work,userxattr"
        );
        // Only the overlay's options differ.
        let mut same = userns.steps.clone();
        same[overlay] = host.steps[overlay].clone();
        assert_eq!(same, host.steps);
    }

    #[test]
    fn nul_in_paths_is_refused() {
        assert!(build(Path::new("/s\0x"), &Lower::Image(3), 5, &[]).is_err());
    }
}
