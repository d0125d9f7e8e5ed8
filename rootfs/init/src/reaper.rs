//! PID 1 duties: forward signals to the workload, reap every orphan, and clean up after
//! the workload.
//!
//! The kernel drops signals to PID 1 whose disposition is the default, but it queues
//! *blocked* ones. So init blocks SIGCHLD and the signals it forwards and reads them from
//! a `signalfd` (the approach of tini, with a descriptor instead of `sigwaitinfo` so the
//! VM's tty relay shares the same `poll`): no handlers, no async-signal safety concerns,
//! and no race between "child exited" and "start waiting".

use crate::sys::{self, SysError};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr;
use twinbox_proto::ExitCode;

/// The signals passed on to the workload.
pub const FORWARDED: [libc::c_int; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// The blocked signals init waits on, readable from a descriptor.
pub struct Signals {
    fd: OwnedFd,
}

impl Signals {
    /// Blocks SIGCHLD and [`FORWARDED`] in init and opens a non-blocking, close-on-exec
    /// `signalfd` for them. The workload unblocks them after fork.
    pub fn block() -> Result<Self, SysError> {
        // SAFETY: sigset manipulation on a local, then sigprocmask/signal on our process.
        let set = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGCHLD);
            for signal in FORWARDED {
                libc::sigaddset(&mut set, signal);
            }
            // A runtime may have left SIGCHLD ignored, which would make the kernel reap
            // children itself and hide the workload's status.
            libc::signal(libc::SIGCHLD, libc::SIG_DFL);
            if libc::sigprocmask(libc::SIG_BLOCK, &set, ptr::null_mut()) != 0 {
                return Err(SysError::last("block signals"));
            }
            set
        };
        // SAFETY: set is an initialised sigset; the result is checked.
        let fd = sys::check(
            unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) },
            || "open a signalfd".to_owned(),
        )?;
        // SAFETY: signalfd just returned this fresh descriptor; it gets one owner. Above
        // stdio: init may start with 0-2 closed (VM without /dev/console).
        let fd = sys::above_stdio(unsafe { OwnedFd::from_raw_fd(fd) })?;
        Ok(Self { fd })
    }

    /// Takes every pending signal; calls `each` with its number.
    fn take(&self, mut each: impl FnMut(libc::c_int)) -> Result<(), SysError> {
        // SAFETY: an all-zero signalfd_siginfo is a valid value of this plain C struct.
        let mut infos: [libc::signalfd_siginfo; 8] = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: infos is a writable buffer of exactly this many bytes.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    infos.as_mut_ptr().cast(),
                    std::mem::size_of_val(&infos),
                )
            };
            if n < 0 {
                let err = SysError::last("read the signalfd");
                match err.errno {
                    libc::EINTR => continue,
                    libc::EAGAIN => return Ok(()),
                    _ => return Err(err),
                }
            }
            let count = n as usize / std::mem::size_of::<libc::signalfd_siginfo>();
            for info in &infos[..count] {
                each(info.ssi_signo as libc::c_int);
            }
            if count < infos.len() {
                return Ok(());
            }
        }
    }
}

/// Descriptors the wait loop polls besides the signals (the VM's tty relay), so init
/// relays and reaps in one thread.
pub trait Watch {
    /// Appends the `pollfd`s for the next `poll` (`fd` -1 for a slot with nothing to do).
    fn interest(&self, fds: &mut Vec<libc::pollfd>);
    /// Acts on their results: the entries [`Watch::interest`] appended, in order.
    fn ready(&mut self, fds: &[libc::pollfd]);
}

/// Nothing to watch: the workload has its stdio directly.
pub struct Nothing;

impl Watch for Nothing {
    fn interest(&self, _: &mut Vec<libc::pollfd>) {}
    fn ready(&mut self, _: &[libc::pollfd]) {}
}

/// Reaps children until `workload` exits, forwarding signals to it and serving `watch`
/// meanwhile. Other children (orphans re-parented to PID 1) are reaped and forgotten.
pub fn wait_for(
    workload: libc::pid_t,
    signals: &Signals,
    watch: &mut dyn Watch,
) -> Result<ExitCode, SysError> {
    let mut fds = Vec::new();
    loop {
        // SIGCHLDs coalesce: reap everything that is dead before waiting again.
        loop {
            let mut status = 0;
            // SAFETY: status is a valid out pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid == workload {
                return Ok(ExitCode::from_wait_status(status));
            }
            if pid == 0 {
                break;
            }
            if pid < 0 {
                let err = SysError::last(format!("wait for workload pid {workload}"));
                if err.errno == libc::EINTR {
                    continue;
                }
                return Err(err);
            }
        }
        fds.clear();
        fds.push(libc::pollfd {
            fd: signals.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        watch.interest(&mut fds);
        sys::poll(&mut fds, -1)?;
        if fds[0].revents != 0 {
            signals.take(|signal| {
                if signal != libc::SIGCHLD {
                    // SAFETY: sending a signal to our own child; ESRCH if it just died
                    // is fine.
                    unsafe { libc::kill(workload, signal) };
                }
            })?;
        }
        watch.ready(&fds[1..]);
    }
}

/// After the workload: SIGKILL everything else in the box and reap it all. Only as PID 1,
/// where `kill(-1)` means "everything in my PID namespace"; anywhere else it would mean
/// every process of the user, so then only the already-dead children are reaped.
pub fn kill_all_and_reap() {
    // SAFETY: getpid has no preconditions.
    let is_pid1 = unsafe { libc::getpid() } == 1;
    if is_pid1 {
        // SAFETY: as PID 1, -1 addresses every other process of our PID namespace.
        unsafe { libc::kill(-1, libc::SIGKILL) };
    }
    let flags = if is_pid1 { 0 } else { libc::WNOHANG };
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, flags) };
        if pid > 0 {
            continue;
        }
        if pid < 0 && SysError::last("").errno == libc::EINTR {
            continue;
        }
        break; // ECHILD: nobody left (or nobody dead yet, when not PID 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_signals_exclude_the_unblockable_and_sigchld() {
        for signal in FORWARDED {
            assert!(![libc::SIGKILL, libc::SIGSTOP, libc::SIGCHLD].contains(&signal));
        }
    }
}
