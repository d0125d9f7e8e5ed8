//! PID 1 duties: forward signals to the workload, reap every orphan, and clean up after
//! the workload.
//!
//! The kernel drops signals to PID 1 whose disposition is the default, but it queues
//! *blocked* ones. So init blocks SIGCHLD and the signals it forwards, and takes them one
//! at a time with `sigwaitinfo` (the approach of tini): no handlers, no async-signal
//! safety concerns, and no race between "child exited" and "start waiting".

use crate::sys::SysError;
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

/// The blocked signal set init waits on.
pub struct Signals {
    set: libc::sigset_t,
}

impl Signals {
    /// Blocks SIGCHLD and [`FORWARDED`] in init. The workload unblocks them after fork.
    pub fn block() -> Result<Self, SysError> {
        // SAFETY: sigset manipulation on a local, then sigprocmask/signal on our process.
        unsafe {
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
            Ok(Self { set })
        }
    }

    /// Waits for the next blocked signal.
    fn next(&self) -> Result<libc::c_int, SysError> {
        loop {
            // SAFETY: self.set is an initialised sigset; no siginfo is requested.
            let signal = unsafe { libc::sigwaitinfo(&self.set, ptr::null_mut()) };
            if signal >= 0 {
                return Ok(signal);
            }
            let err = SysError::last("wait for signals");
            if err.errno != libc::EINTR {
                return Err(err);
            }
        }
    }
}

/// Reaps children until `workload` exits, forwarding signals to it meanwhile. Other
/// children (orphans re-parented to PID 1) are reaped and forgotten.
pub fn wait_for(workload: libc::pid_t, signals: &Signals) -> Result<ExitCode, SysError> {
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
        let signal = signals.next()?;
        if signal != libc::SIGCHLD {
            // SAFETY: sending a signal to our own child; ESRCH if it just died is fine.
            unsafe { libc::kill(workload, signal) };
        }
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
