//! SIGINT/SIGTERM for a CLI that runs one VM: the handler only writes to an eventfd the
//! VMM's main loop waits on, so the VM is torn down cleanly and the CLI can exit 130/143.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use vmm_sys_util::eventfd::EventFd;

static STOP_FD: AtomicI32 = AtomicI32::new(-1);
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    SIGNAL.store(signal, Ordering::SeqCst);
    let fd = STOP_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; fd is an eventfd kept open by `Interrupt`
        // for as long as the handler is installed; 8 bytes from a local u64.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// The signal an [`Interrupt`] of this process recorded, if any: for code that runs under
/// one but cannot hold it (the bench's host-process runs poll this to stop their child).
pub fn received() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Routes SIGINT and SIGTERM to an eventfd while it lives.
pub struct Interrupt {
    evt: EventFd,
}

impl Interrupt {
    /// Installs the handlers.
    pub fn install() -> std::io::Result<Self> {
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        STOP_FD.store(evt.as_raw_fd(), Ordering::SeqCst);
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: installs a handler that only does async-signal-safe work.
            unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
        }
        Ok(Self { evt })
    }

    /// The eventfd to hand to [`crate::run_until`].
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// The signal that arrived, if any.
    pub fn signal(&self) -> Option<i32> {
        received()
    }
}

impl Drop for Interrupt {
    fn drop(&mut self) {
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: restores the default disposition.
            unsafe { libc::signal(signal, libc::SIG_DFL) };
        }
        STOP_FD.store(-1, Ordering::SeqCst);
    }
}
