//! SIGINT/SIGTERM during a run: the handler only records the signal; the run loop sees it
//! within one poll period, kills the container and tears down. The previous handlers are
//! restored when the run ends.

use std::sync::atomic::{AtomicI32, Ordering};

static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn record(signal: libc::c_int) {
    SIGNAL.store(signal, Ordering::SeqCst);
}

/// The signal that interrupted the last run, if any (the CLI exits 128 + it).
pub fn signal() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Handlers installed for the duration of a run.
pub struct Guard {
    old: [libc::sigaction; 2],
}

const SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

impl Guard {
    /// Installs the recording handlers (and clears a previous run's signal).
    pub fn install() -> Self {
        SIGNAL.store(0, Ordering::SeqCst);
        // SAFETY: sigaction with a handler that only stores to an atomic.
        unsafe {
            let mut old: [libc::sigaction; 2] = std::mem::zeroed();
            for (i, sig) in SIGNALS.iter().enumerate() {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = record as extern "C" fn(libc::c_int) as usize;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(*sig, &action, &mut old[i]);
            }
            Self { old }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for (i, sig) in SIGNALS.iter().enumerate() {
            // SAFETY: restores the handler saved in `install`.
            unsafe { libc::sigaction(*sig, &self.old[i], std::ptr::null_mut()) };
        }
    }
}
