//! Every privileged call the parent makes for a run, behind one trait (the shape of
//! youki's `syscall/syscall.rs`): [`Real`] makes them; the recording double in the tests of
//! `run.rs` writes each call to a log and plays a scripted child, so the orchestration —
//! the order of the steps, the error paths, the order of cleanup — is tested without root.
//!
//! What is not here is unprivileged and runs as is in the tests too: reading the image's
//! superblock, stat of `/dev` nodes, the pipes of the channel, compiling the seccomp
//! filter. The child's own calls after `clone` are in `child.rs`.

use crate::cgroup::{self, CgroupManager, Layout, Limits};
use crate::child::{self, Prepared};
use crate::{detached, sweep, userns, Error};
use nix::sched::CloneFlags;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use twinbox_spec::image::LoopDevice;

/// The image attached to a loop device: its path, and (for real) the device, which
/// clears itself once this and every mount of it are gone.
#[derive(Debug)]
pub struct Loop {
    /// `/dev/loopN`.
    pub path: PathBuf,
    /// Held (never read) until the child attached its mount; None in the tests' double.
    pub _device: Option<LoopDevice>,
}

/// How the child process ended, as `wait4` told.
#[derive(Clone, Copy)]
pub struct Reaped {
    /// The wait status.
    pub status: i32,
    /// Its resource usage (the whole container: init reaps its descendants).
    pub usage: libc::rusage,
}

/// The privileged calls of one container run, in the order the run makes them.
pub trait Syscall {
    /// Whether the caller is root (loop devices, mounts and cgroups need it).
    fn is_root(&self) -> bool;
    /// The text of `/proc/self/mountinfo` (cgroup layout, sweep places).
    fn mountinfo(&self) -> Result<String, Error>;
    /// Removes the cgroups and staging directories of runs whose twinbox died.
    fn sweep(&self, mountinfo: &str);
    /// Creates the run's cgroup with its limits; on error nothing is left.
    fn create_cgroup(
        &self,
        layout: &Layout,
        name: &str,
        limits: Limits,
    ) -> Result<Box<dyn CgroupManager>, Error>;
    /// Creates `path` (its parents if missing).
    fn create_dir(&self, path: &Path) -> Result<(), Error>;
    /// Removes the empty directory `path`; a failure is only logged.
    fn remove_dir(&self, path: &Path);
    /// Attaches `image` to a read-only autoclear loop device.
    fn attach_loop(&self, image: &Path) -> Result<Loop, Error>;
    /// Mounts the ext4 on `device` as a detached mount (read-only, nodev, nosuid).
    fn mount_image(&self, device: &Path) -> Result<OwnedFd, Error>;
    /// A detached bind of the disk file `path` (nodev, nosuid, read-only when asked).
    fn bind_disk(&self, path: &Path, read_only: bool) -> Result<OwnedFd, Error>;
    /// Clones the child into new namespaces (`flags`); it runs `child::main(prepared)`.
    fn spawn(&self, prepared: &Prepared, flags: CloneFlags) -> Result<i32, Error>;
    /// Writes the child's uid/gid maps and idmaps the detached mounts to its namespace.
    fn map_user_namespace(&self, pid: i32, mounts: &[userns::Detached<'_>]) -> Result<(), Error>;
    /// SIGKILL to the child (as PID 1 of its namespace, that ends the container).
    fn kill(&self, pid: i32);
    /// Reaps the child.
    fn wait(&self, pid: i32) -> Result<Reaped, Error>;
    /// Waits (up to 2 s) until the loop device at `device` is free again.
    fn wait_loop_free(&self, device: &Path) -> bool;
}

/// The calls, made.
pub struct Real;

impl Syscall for Real {
    fn is_root(&self) -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn mountinfo(&self) -> Result<String, Error> {
        std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| Error::os("read /proc/self/mountinfo", e))
    }

    fn sweep(&self, mountinfo: &str) {
        let swept = sweep::sweep(&sweep::Places::host(mountinfo));
        for path in &swept.removed {
            tracing::info!(path = %path.display(), "removed a leftover of a killed run");
        }
        for failure in &swept.failed {
            tracing::warn!("leftover of a killed run: {failure}");
        }
    }

    fn create_cgroup(
        &self,
        layout: &Layout,
        name: &str,
        limits: Limits,
    ) -> Result<Box<dyn CgroupManager>, Error> {
        cgroup::create(layout, name, limits)
    }

    fn create_dir(&self, path: &Path) -> Result<(), Error> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::os(format!("create {}", parent.display()), e))?;
        }
        std::fs::create_dir(path).map_err(|e| Error::os(format!("create {}", path.display()), e))
    }

    fn remove_dir(&self, path: &Path) {
        if let Err(e) = std::fs::remove_dir(path) {
            tracing::warn!(path = %path.display(), "remove the staging directory: {e}");
        }
    }

    fn attach_loop(&self, image: &Path) -> Result<Loop, Error> {
        let device = LoopDevice::attach(image)?;
        Ok(Loop {
            path: device.path.clone(),
            _device: Some(device),
        })
    }

    fn mount_image(&self, device: &Path) -> Result<OwnedFd, Error> {
        detached::ext4(device)
    }

    fn bind_disk(&self, path: &Path, read_only: bool) -> Result<OwnedFd, Error> {
        detached::bind(path, read_only)
    }

    fn spawn(&self, prepared: &Prepared, flags: CloneFlags) -> Result<i32, Error> {
        // Without CLONE_VM the child runs on its own copy of this stack: ours may go as
        // soon as clone returns.
        let mut stack = vec![0u8; 256 * 1024];
        // SAFETY: the child only runs `child::main`, which walks pre-allocated data and
        // makes raw system calls until it execs or exits.
        let pid = unsafe {
            nix::sched::clone(
                Box::new(|| child::main(prepared)),
                &mut stack,
                flags,
                Some(libc::SIGCHLD),
            )
        }
        .map_err(|e| {
            Error::os(
                "clone the container",
                std::io::Error::from_raw_os_error(e as i32),
            )
        })?;
        Ok(pid.as_raw())
    }

    fn map_user_namespace(&self, pid: i32, mounts: &[userns::Detached<'_>]) -> Result<(), Error> {
        userns::map(pid, mounts)
    }

    fn kill(&self, pid: i32) {
        // SIGKILL to the namespace's init ends the whole namespace. ESRCH: already gone.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    fn wait(&self, pid: i32) -> Result<Reaped, Error> {
        let mut status = 0;
        // SAFETY: a zeroed rusage is a valid out-parameter.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: wait4 on our own child with valid out-pointers.
            let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            if r == pid {
                return Ok(Reaped { status, usage });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::os("wait for the container", e));
            }
        }
    }

    fn wait_loop_free(&self, device: &Path) -> bool {
        // Autoclear detaches the device right after its last user goes, asynchronously.
        let backing = Path::new("/sys/block")
            .join(device.file_name().unwrap_or_default())
            .join("loop/backing_file");
        for _ in 0..10_000 {
            if !backing.exists() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        false
    }
}
