//! The jail: where the VMM's guest-facing threads (vCPUs, event loop, console) live once
//! everything the VM needs is open. They are started from a helper thread, `vmm-jail`,
//! which first puts itself — and so every thread it starts — in:
//!
//! - new mount, IPC and network namespaces, with an empty, read-only tmpfs as its root
//!   (`pivot_root`, old root detached): no host path exists there;
//! - no capabilities (bounding set emptied, then the uid change clears the rest);
//! - an unprivileged uid/gid ([`JAIL_ID`], "nobody") with no supplementary groups;
//! - no_new_privs.
//!
//! All of it is per thread: namespaces through `unshare` of this thread, credentials
//! through the raw system calls (glibc's wrappers would change every thread of the
//! process). The caller's thread keeps its root and credentials, which is what lets the
//! bench run a jailed VM in its own process and go on with containers afterwards; it
//! handles no guest input.
//!
//! Not done here: a pid namespace (`unshare(CLONE_NEWPID)` only applies to children, and
//! the VMM forks none) and a cgroup for the VMM (a cgroup holds processes, not threads,
//! outside cgroup v2's threaded mode) — both belong to a VMM in a process of its own.

use std::ffi::CString;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;
use thiserror::Error;

/// The uid and gid jailed threads run as ("nobody" on Debian and most distributions).
pub const JAIL_ID: u32 = 65534;

/// Why the jail could not be entered.
#[derive(Debug, Error)]
pub enum JailError {
    #[error("cannot jail the VMM's threads (which needs root): {step}: {source}")]
    Step {
        step: &'static str,
        source: std::io::Error,
    },
    #[error("cannot start the jail thread: {0}")]
    Thread(std::io::Error),
    #[error("the jail thread ended before it could start the VMM's threads")]
    Gone,
}

type Job = Box<dyn FnOnce() + Send>;

/// The `vmm-jail` thread, jailed, starting threads on request. Dropping it lets the
/// thread end (the threads it started live on, jailed).
pub struct Jail {
    jobs: Option<Sender<Job>>,
    handle: Option<JoinHandle<()>>,
}

impl Jail {
    /// Starts the thread and waits until it is jailed.
    pub fn enter() -> Result<Self, JailError> {
        Self::start()?.ready()
    }

    /// Starts the thread, which jails itself while the caller goes on: entering the jail
    /// (a network namespace to set up, mounts) overlaps the caller's own set-up of the VM
    /// on another CPU. [`PendingJail::ready`] waits for it.
    pub fn start() -> Result<PendingJail, JailError> {
        let (ready_tx, ready_rx) = channel();
        let (jobs, jobs_rx) = channel::<Job>();
        let handle = std::thread::Builder::new()
            .name("vmm-jail".into())
            .spawn(move || {
                let entered = lock_this_thread();
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    for job in jobs_rx {
                        job();
                    }
                }
            })
            .map_err(JailError::Thread)?;
        Ok(PendingJail {
            jail: Self {
                jobs: Some(jobs),
                handle: Some(handle),
            },
            ready: ready_rx,
        })
    }

    /// Runs `start` on the jailed thread (so whatever thread it starts is jailed too) and
    /// returns its result.
    pub fn run<T: Send + 'static>(
        &self,
        start: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, JailError> {
        let (tx, rx) = channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(start());
        });
        self.jobs
            .as_ref()
            .ok_or(JailError::Gone)?
            .send(job)
            .map_err(|_| JailError::Gone)?;
        rx.recv().map_err(|_| JailError::Gone)
    }
}

/// A jail thread still jailing itself ([`Jail::start`]). Dropped unready, it lets the
/// thread end and joins it.
pub struct PendingJail {
    jail: Jail,
    ready: Receiver<Result<(), JailError>>,
}

impl PendingJail {
    /// Waits until the thread is jailed; its error if it could not be.
    pub fn ready(self) -> Result<Jail, JailError> {
        self.ready.recv().map_err(|_| JailError::Gone)??;
        Ok(self.jail)
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn check(step: &'static str, rc: libc::c_long) -> Result<(), JailError> {
    if rc < 0 {
        return Err(JailError::Step {
            step,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in a literal path")
}

/// Jails the calling thread (see the module docs). Only this thread: every call here is
/// per task.
fn lock_this_thread() -> Result<(), JailError> {
    // SAFETY (all blocks below): plain system calls with constant flags and NUL-terminated
    // paths that outlive the calls; none touches memory we do not own.
    check("unshare", unsafe {
        libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWNET) as libc::c_long
    })?;
    // Nothing mounted from here on may reach the host's mount table.
    let root = cstr("/");
    check("make mounts private", unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) as libc::c_long
    })?;
    // The new root: an empty tmpfs over /tmp (only in this namespace).
    let new_root = cstr("/tmp");
    let tmpfs = cstr("tmpfs");
    let options = cstr("size=4k,nr_inodes=16,mode=0555");
    check("mount the empty root", unsafe {
        libc::mount(
            tmpfs.as_ptr(),
            new_root.as_ptr(),
            tmpfs.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            options.as_ptr().cast(),
        ) as libc::c_long
    })?;
    let dot = cstr(".");
    check("enter the empty root", unsafe {
        libc::chdir(new_root.as_ptr()) as libc::c_long
    })?;
    // SAFETY: as above.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } == 0 {
        // The old root is stacked on "." now: detach it, and the host's tree is gone.
        check("detach the host's root", unsafe {
            libc::umount2(dot.as_ptr(), libc::MNT_DETACH) as libc::c_long
        })?;
    } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // The host's root is an initramfs, which cannot be pivoted away from (the lab's
        // is). chroot instead: the host's tree stays mounted in this namespace, out of
        // reach of a thread that has no directory fd outside, no CAP_SYS_CHROOT and no
        // way back to uid 0.
        check("chroot", unsafe {
            libc::chroot(dot.as_ptr()) as libc::c_long
        })?;
    } else {
        check("pivot_root", -1)?;
    }
    check("chdir /", unsafe {
        libc::chdir(root.as_ptr()) as libc::c_long
    })?;
    check("make the root read-only", unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT
                | libc::MS_BIND
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | libc::MS_NOEXEC,
            std::ptr::null(),
        ) as libc::c_long
    })?;
    // Capabilities: empty the bounding set while we still may (CAP_SETPCAP), then the
    // switch away from uid 0 clears permitted, effective and ambient.
    for cap in 0..=libc::c_ulong::from(CAP_MAX) {
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } == 0 {
            continue;
        }
        let error = std::io::Error::last_os_error();
        // Capabilities are numbered without gaps: EINVAL (after the first) means past this
        // kernel's last one, and so the end of the set. Anything else (EPERM without
        // CAP_SETPCAP) would leave the set whole: refused, not ignored.
        if cap > 0 && error.raw_os_error() == Some(libc::EINVAL) {
            break;
        }
        return Err(JailError::Step {
            step: "empty the capability bounding set",
            source: error,
        });
    }
    let id = libc::c_long::from(JAIL_ID);
    check("drop supplementary groups", unsafe {
        libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>())
    })?;
    check("setresgid", unsafe {
        libc::syscall(libc::SYS_setresgid, id, id, id)
    })?;
    check("setresuid", unsafe {
        libc::syscall(libc::SYS_setresuid, id, id, id)
    })?;
    check("no_new_privs", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as libc::c_long
    })?;
    Ok(())
}

/// Capability numbers tried when emptying the bounding set: the kernel's 64-bit masks leave
/// no room above 63 (today's last is 40, CAP_CHECKPOINT_RESTORE).
const CAP_MAX: u8 = 63;

#[cfg(test)]
mod tests {
    use super::*;

    /// The names of this process's threads, as the host lists them.
    fn thread_names() -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|name| name.trim().to_owned())
            .collect()
    }

    #[test]
    fn a_jail_dropped_before_it_is_ready_ends_its_thread() {
        // Jailed (as root, as the suite runs: then the thread waits for work, and only the
        // drop closing its job channel ends it) or not (the jail's error is never asked
        // for), the thread ends and is joined by the drop: nothing of it stays in this
        // process. Dropped on a thread of its own, so a drop that never returns fails here
        // instead of hanging the test.
        let pending = Jail::start().expect("the jail thread starts");
        let (dropped, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(pending);
            let _ = dropped.send(());
        });
        assert!(
            done.recv_timeout(std::time::Duration::from_secs(10))
                .is_ok(),
            "dropping a jail before it was ready did not return within 10 s"
        );
        // The kernel wakes a joiner a moment before the joined thread leaves /proc.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while thread_names().iter().any(|name| name == "vmm-jail") {
            assert!(
                std::time::Instant::now() < deadline,
                "a vmm-jail thread outlived its dropped jail: {:?}",
                thread_names()
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
