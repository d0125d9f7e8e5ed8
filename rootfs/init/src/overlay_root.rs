//! Makes the VM's read-only root writable, the way the container runtime does on the host.
//!
//! The VM boots with `root=/dev/vda ro`: the image is never written, so one image serves
//! any number of boxes. The workload still expects a writable `/`, so init stacks an
//! overlay over it and moves into that:
//!
//! 1. `/` becomes recursively private, so nothing below propagates anywhere.
//! 2. A tmpfs at `/run` (the image has the empty directory) holds the upper layer
//!    (`/run/twinbox/upper`), overlay's work dir (`/run/twinbox/work`) and the new root's
//!    mount point (`/run/twinbox/root`).
//! 3. `overlay lowerdir=/,upperdir=...,workdir=...` is mounted at the new root. Overlay
//!    sees the lower root filesystem itself, not the mounts stacked on it.
//! 4. `/sys`, `/dev` and `/proc` (whichever are mounted) are moved (`MS_MOVE`) into the
//!    new root, so they need not be made again.
//! 5. `pivot_root(".", ".")` from inside the new root stacks the old root on top of the
//!    new one at `/`, and `umount2(".", MNT_DETACH)` peels it off (the trick runc uses; it
//!    needs no put-old directory). The tmpfs holding the upper layer stays alive because
//!    the overlay holds a reference to it, but is no longer reachable by any path, so the
//!    workload cannot tamper with overlay's internals.
//!
//! Afterwards init mounts a fresh `/run`, `/tmp` etc. inside the new root as usual.

use crate::mounts::{mkdir, mount, move_under, stage_tmpfs, MountTable};
use crate::sys::{check, cstring, SysError};

const STAGE: &str = "/run";
const UPPER: &str = "/run/twinbox/upper";
const WORK: &str = "/run/twinbox/work";
const NEW_ROOT: &str = "/run/twinbox/root";
/// Mounts carried from the old root into the new one. `/proc` goes last: once it is
/// moved, `/proc/self/mountinfo` is no longer there to ask.
const CARRIED: [&str; 3] = ["/sys", "/dev", "/proc"];

/// The overlay options for the layers above.
pub fn overlay_options() -> String {
    format!("lowerdir=/,upperdir={UPPER},workdir={WORK}")
}

/// Stacks a tmpfs-backed overlay over `/` and pivots into it (see the module docs).
pub fn enter() -> Result<(), SysError> {
    mount("none", "/", "", libc::MS_REC | libc::MS_PRIVATE, "")?;
    stage_tmpfs(STAGE)?;
    for dir in [UPPER, WORK, NEW_ROOT] {
        mkdir(dir)?;
    }
    mount("overlay", NEW_ROOT, "overlay", 0, &overlay_options())?;
    let table = MountTable::now();
    let present: Vec<&str> = CARRIED.into_iter().filter(|m| table.has(m)).collect();
    move_under(NEW_ROOT, present)?;
    let new_root = cstring(NEW_ROOT)?;
    let dot = c".";
    // SAFETY: plain syscalls on valid NUL-terminated paths; results are checked.
    unsafe {
        check(libc::chdir(new_root.as_ptr()), || {
            format!("chdir {NEW_ROOT}")
        })?;
        check(
            libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as libc::c_int,
            || format!("pivot_root into {NEW_ROOT}"),
        )?;
        check(libc::umount2(dot.as_ptr(), libc::MNT_DETACH), || {
            "detach the old root".to_owned()
        })?;
        check(libc::chdir(c"/".as_ptr()), || "chdir /".to_owned())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_live_inside_the_stage_tmpfs() {
        for dir in [UPPER, WORK, NEW_ROOT] {
            assert!(dir.starts_with(&format!("{STAGE}/")), "{dir}");
        }
        assert_eq!(
            overlay_options(),
            "lowerdir=/,upperdir=/run/twinbox/upper,workdir=/run/twinbox/work"
        );
    }

    #[test]
    fn proc_is_moved_last_because_mountinfo_lives_there() {
        assert_eq!(CARRIED.last(), Some(&"/proc"));
    }
}
