//! SIGINT/SIGTERM during a run, for every box and the bench: the one place twinbox handles
//! them. The handler only records the signal and makes an eventfd readable, so a run loop
//! that polls [`Interrupt::fd`] (the VMM's main loop, the container's marker loop, the
//! bench's host-process waits) sees it at once and tears its box down cleanly; the CLI then
//! exits 128 + the signal.
//!
//! Not signal-hook: its handlers stay installed after their actions are unregistered, so
//! a CLI could no longer be stopped by Ctrl-C once a run ended; here each [`Interrupt`]
//! saves the dispositions it replaced and restores them on drop. Interrupts nest (the bench
//! holds one while `container::run` installs its own): a signal seen by the inner one stays
//! visible to the outer one.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The signals a run stops on.
pub const SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

/// The last signal recorded since the outermost [`Interrupt`] was installed (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// The eventfd the handler writes to, once created (-1 before).
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// How many [`Interrupt`]s are alive.
static DEPTH: AtomicUsize = AtomicUsize::new(0);
/// The eventfd itself: created once per process and never closed, so a handler running
/// on another thread can never write to a reused descriptor number.
static WAKE: OnceLock<OwnedFd> = OnceLock::new();

extern "C" fn on_signal(signal: libc::c_int) {
    SIGNAL.store(signal, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `fd` is the process-lifetime eventfd; the
        // buffer is 8 bytes of a local u64. A full counter (EAGAIN) is fine: it is readable.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// The signal an [`Interrupt`] of this process recorded, if any: for code that runs
/// under one but does not hold it.
pub fn received() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

fn wake_fd() -> std::io::Result<&'static OwnedFd> {
    if let Some(fd) = WAKE.get() {
        return Ok(fd);
    }
    // SAFETY: eventfd(2) with valid flags; the result is checked before use.
    let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // A racing first install may have won: then ours is dropped (closed) here.
    let fd = WAKE.get_or_init(|| fd);
    WAKE_FD.store(fd.as_raw_fd(), Ordering::SeqCst);
    Ok(fd)
}

/// Empties the eventfd so it polls readable only after the next signal.
fn drain(fd: &OwnedFd) {
    let mut value = 0u64;
    // SAFETY: reads 8 bytes into a local u64 from our non-blocking eventfd.
    unsafe { libc::read(fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
}

/// SIGINT and SIGTERM are recorded while this lives; the replaced dispositions come back
/// on drop.
pub struct Interrupt {
    wake: &'static OwnedFd,
    old: [libc::sigaction; 2],
}

impl Interrupt {
    /// Installs the recording handlers. The outermost install forgets any earlier run's
    /// signal; nested ones keep it.
    pub fn install() -> std::io::Result<Self> {
        let wake = wake_fd()?;
        if DEPTH.fetch_add(1, Ordering::SeqCst) == 0 {
            SIGNAL.store(0, Ordering::SeqCst);
            drain(wake);
        }
        // SAFETY: an all-zero sigaction is a valid value to be overwritten by sigaction(2).
        let mut old: [libc::sigaction; 2] = unsafe { std::mem::zeroed() };
        for (slot, signal) in old.iter_mut().zip(SIGNALS) {
            // SAFETY: as above, then filled in field by field.
            let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            // SA_RESTART would hide the signal from a blocking poll/read; the loops that
            // wait retry EINTR themselves.
            action.sa_flags = 0;
            // SAFETY: sigemptyset on a local set; sigaction with a handler that only does
            // async-signal-safe work, saving the old disposition into `slot`.
            let rc = unsafe {
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(signal, &action, slot)
            };
            if rc != 0 {
                let error = std::io::Error::last_os_error();
                DEPTH.fetch_sub(1, Ordering::SeqCst);
                return Err(error);
            }
        }
        Ok(Self { wake, old })
    }

    /// Readable once a signal arrived: poll it beside the run's own descriptors.
    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.wake.as_fd()
    }

    /// The signal that arrived, if any.
    pub fn signal(&self) -> Option<i32> {
        received()
    }
}

impl Drop for Interrupt {
    fn drop(&mut self) {
        for (old, signal) in self.old.iter().zip(SIGNALS) {
            // SAFETY: restores the disposition saved by `install`.
            unsafe { libc::sigaction(signal, old, std::ptr::null_mut()) };
        }
        DEPTH.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Signal dispositions are per process: the tests take turns.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn readable(fd: BorrowedFd<'_>) -> bool {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    fn disposition(signal: libc::c_int) -> usize {
        // SAFETY: queries the current disposition into a zeroed sigaction.
        unsafe {
            let mut now: libc::sigaction = std::mem::zeroed();
            libc::sigaction(signal, std::ptr::null(), &mut now);
            now.sa_sigaction
        }
    }

    #[test]
    fn a_signal_is_recorded_and_wakes_the_fd() {
        let _serial = SERIAL.lock().unwrap();
        let interrupt = Interrupt::install().unwrap();
        assert!(!readable(interrupt.fd()));
        assert_eq!(interrupt.signal(), None);
        // SAFETY: raise(2) of a signal our handler records.
        unsafe { libc::raise(libc::SIGTERM) };
        assert!(readable(interrupt.fd()));
        assert_eq!(interrupt.signal(), Some(libc::SIGTERM));
        assert_eq!(received(), Some(libc::SIGTERM));
    }

    #[test]
    fn nested_interrupts_keep_the_signal_and_restore_dispositions() {
        let _serial = SERIAL.lock().unwrap();
        let before = disposition(libc::SIGINT);
        let outer = Interrupt::install().unwrap();
        {
            let inner = Interrupt::install().unwrap();
            // SAFETY: raise(2) of a signal our handler records.
            unsafe { libc::raise(libc::SIGINT) };
            assert_eq!(inner.signal(), Some(libc::SIGINT));
        }
        assert_eq!(
            outer.signal(),
            Some(libc::SIGINT),
            "the outer run must see it too"
        );
        assert!(readable(outer.fd()));
        drop(outer);
        assert_eq!(disposition(libc::SIGINT), before);
        let fresh = Interrupt::install().unwrap();
        assert_eq!(fresh.signal(), None, "a new outermost run starts clean");
        assert!(!readable(fresh.fd()));
    }
}
