//! The mounts a Linux userland expects, made only where nothing is mounted yet: a
//! container runtime may already have provided some (always `/dev`, often `/proc`), the
//! kernel may have automounted devtmpfs.

use crate::console::say;
use crate::job_source::Origin;
use crate::sys::{check, cstring, SysError};
use std::ffi::CString;
use std::path::Path;

/// One filesystem to mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// Where.
    pub target: &'static str,
    /// Filesystem type (also used as the source name).
    pub fstype: &'static str,
    /// `MS_*` flags.
    pub flags: libc::c_ulong,
    /// Filesystem-specific options.
    pub data: &'static str,
    /// Whether init cannot go on without it.
    pub required: bool,
}

const NOSUID_NODEV: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;

/// `/proc`: needed first of all, to read `/proc/cmdline` and `/proc/self/mountinfo`.
pub const PROC: MountSpec = MountSpec {
    target: "/proc",
    fstype: "proc",
    flags: NOSUID_NODEV | libc::MS_NOEXEC,
    data: "",
    required: true,
};

/// `/dev` in the VM: the kernel's devtmpfs (the image's `/dev` only holds `console` and
/// `null`). In a container the runtime provides `/dev`; mounting devtmpfs there would
/// expose the host's devices, so it is never done.
pub const DEV_VM: MountSpec = MountSpec {
    target: "/dev",
    fstype: "devtmpfs",
    flags: libc::MS_NOSUID,
    data: "mode=0755",
    required: true,
};

/// `/sys`, read-only in a container, because sysfs there would otherwise let the workload
/// retune the host's devices. The VM with ports mounts it early, to find the ports.
pub fn sys(origin: Origin) -> MountSpec {
    let sys_ro = if origin == Origin::Container {
        libc::MS_RDONLY
    } else {
        0
    };
    MountSpec {
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV | libc::MS_NOEXEC | sys_ro,
        data: "",
        required: false,
    }
}

/// The rest, in mount order.
pub fn userland(origin: Origin) -> Vec<MountSpec> {
    vec![
        sys(origin),
        MountSpec {
            target: "/dev/pts",
            fstype: "devpts",
            flags: libc::MS_NOSUID | libc::MS_NOEXEC,
            data: "newinstance,ptmxmode=0666,mode=0620,gid=5",
            required: false,
        },
        MountSpec {
            target: "/dev/shm",
            fstype: "tmpfs",
            flags: NOSUID_NODEV,
            data: "mode=1777",
            required: false,
        },
        MountSpec {
            target: "/tmp",
            fstype: "tmpfs",
            flags: NOSUID_NODEV,
            data: "mode=1777",
            required: false,
        },
        MountSpec {
            target: "/run",
            fstype: "tmpfs",
            flags: NOSUID_NODEV,
            data: "mode=0755",
            required: false,
        },
    ]
}

/// Mount points listed in a `/proc/self/mountinfo` text (field 5, octal escapes undone).
pub fn mount_points(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_octal)
        .collect()
}

/// Undoes the kernel's `\ooo` escaping of space, tab, newline and backslash.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount points of init's mount namespace at one moment, from one read of
/// `/proc/self/mountinfo` (none when it cannot be read, e.g. before `/proc` is mounted).
pub struct MountTable {
    points: Vec<String>,
}

impl MountTable {
    /// Reads the table now. One read serves a whole list of mounts: a container's
    /// runtime made dozens, and each read of its mountinfo costs the kernel a walk of all
    /// of them (init used to read it once per mount it checked).
    pub fn now() -> Self {
        Self {
            points: read_mountinfo().map_or_else(Vec::new, |info| mount_points(&info)),
        }
    }

    /// Whether `target` is a mount point. `/proc` is recognised by its content because
    /// mountinfo itself lives there.
    pub fn has(&self, target: &str) -> bool {
        if target == "/proc" {
            return Path::new("/proc/self/stat").exists();
        }
        self.points.iter().any(|p| p == target)
    }
}

/// `/proc/self/mountinfo` in one go: the buffer is sized for a container's table up front
/// (procfs files report size 0, so a plain `read_to_string` starts at 32 bytes and
/// doubles, a system call per step).
fn read_mountinfo() -> Option<String> {
    use std::io::Read;
    let mut info = String::with_capacity(16 * 1024);
    std::fs::File::open("/proc/self/mountinfo")
        .and_then(|mut file| file.read_to_string(&mut info))
        .ok()?;
    Some(info)
}

/// Raw `mount(2)`.
pub fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), SysError> {
    let what = || format!("mount {fstype} on {target}");
    let source = cstring(source)?;
    let target_c = cstring(target)?;
    let fstype_c = cstring(fstype)?;
    let data: Option<CString> = if data.is_empty() {
        None
    } else {
        Some(cstring(data)?)
    };
    let data_ptr = data
        .as_ref()
        .map_or(std::ptr::null(), |d| d.as_ptr().cast());
    // SAFETY: all pointers are valid NUL-terminated strings (or null data) for the call.
    check(
        unsafe {
            libc::mount(
                source.as_ptr(),
                target_c.as_ptr(),
                fstype_c.as_ptr(),
                flags,
                data_ptr,
            )
        },
        what,
    )?;
    Ok(())
}

/// Creates the directory `path` and its parents.
pub fn mkdir(path: &str) -> Result<(), SysError> {
    std::fs::create_dir_all(path).map_err(|e| {
        SysError::new(
            format!("create {path}"),
            e.raw_os_error().unwrap_or(libc::EIO),
        )
    })
}

/// Mounts a `nosuid`, `nodev` tmpfs at `target` to stage a new root's directories in.
pub fn stage_tmpfs(target: &str) -> Result<(), SysError> {
    mount(
        "tmpfs",
        target,
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    )
}

/// Moves (`MS_MOVE`) each of `mounts`, in order, to the same path under `new_root`.
pub fn move_under<'a>(
    new_root: &str,
    mounts: impl IntoIterator<Item = &'a str>,
) -> Result<(), SysError> {
    for carried in mounts {
        let target = format!("{new_root}{carried}");
        mkdir(&target)?;
        mount(carried, &target, "", libc::MS_MOVE, "")?;
    }
    Ok(())
}

/// Mounts `spec` unless something is mounted there already; creates the directory if it
/// is missing and the parent is writable (e.g. `/dev/pts` on a fresh devtmpfs).
pub fn ensure(spec: &MountSpec) -> Result<(), SysError> {
    if spec.target == "/proc" {
        // Not from mountinfo, which needs /proc: no read of it.
        ensure_in(spec, &MountTable { points: Vec::new() })
    } else {
        ensure_in(spec, &MountTable::now())
    }
}

/// [`ensure`] against a table read before: right as long as no mount made since then is
/// at `spec`'s target or above it.
fn ensure_in(spec: &MountSpec, table: &MountTable) -> Result<(), SysError> {
    if table.has(spec.target) {
        return Ok(());
    }
    if !Path::new(spec.target).is_dir() {
        mkdir(spec.target)?;
    }
    mount(spec.fstype, spec.target, spec.fstype, spec.flags, spec.data)
}

/// Mounts every spec; a failed optional mount is a warning, a failed required one ends
/// the boot. The table is read once for all of them: a mount made here adds its own
/// target only, which no later spec shares.
pub fn ensure_all(specs: &[MountSpec]) -> Result<(), SysError> {
    let table = MountTable::now();
    for spec in specs {
        match ensure_in(spec, &table) {
            Ok(()) => {}
            Err(err) if spec.required => return Err(err),
            Err(err) => say(&format!("warning: {err}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_is_parsed_with_escapes() {
        let info = "22 1 8:1 / / ro,relatime shared:1 - ext4 /dev/vda ro\n\
                    23 22 0:5 / /dev rw,nosuid - devtmpfs devtmpfs rw\n\
                    24 22 0:30 / /mnt/with\\040space rw - tmpfs tmpfs rw\n";
        assert_eq!(mount_points(info), ["/", "/dev", "/mnt/with space"]);
    }

    #[test]
    fn container_sys_is_read_only_and_vm_sys_is_not() {
        let sys = |o| {
            userland(o)
                .into_iter()
                .find(|s| s.target == "/sys")
                .unwrap()
        };
        assert_ne!(sys(Origin::Container).flags & libc::MS_RDONLY, 0);
        assert_eq!(sys(Origin::Vm).flags & libc::MS_RDONLY, 0);
    }

    #[test]
    fn nested_mounts_come_after_their_parents() {
        let order: Vec<_> = userland(Origin::Vm).iter().map(|s| s.target).collect();
        for (i, target) in order.iter().enumerate() {
            for earlier_child in &order[..i] {
                assert!(
                    !earlier_child.starts_with(&format!("{target}/")),
                    "{earlier_child} before {target}"
                );
            }
        }
    }
}
