//! How init ends: the VM powers off, the container exits with the workload's status.

use crate::console::say;

/// Exit status of init when it could not set up or start the job (the container case;
/// 126/127 belong to the workload's exec failures, like shells).
pub const EXIT_INIT_FAILED: i32 = 125;

/// Ends init. With `power_off` (the VM): `sync` and `reboot(RB_AUTOBOOT)`. With the
/// guest kernel's `reboot=k` that is a keyboard-controller reset that the VMM turns into
/// a VM exit; under QEMU `reboot=t` plus `-no-reboot` makes QEMU exit. Otherwise: exit
/// with `status`.
pub fn finish(power_off: bool, status: i32) -> ! {
    if power_off {
        drain_console();
        // SAFETY: sync and reboot take no pointers; reboot only returns on failure.
        let err = unsafe {
            libc::sync();
            libc::reboot(libc::RB_AUTOBOOT);
            std::io::Error::last_os_error()
        };
        // If PID 1 now exits, the kernel panics and `panic=-1` reboots: still an end.
        say(&format!("reboot failed: {err}"));
    }
    std::process::exit(status)
}

/// Waits until everything written to the console has left the serial port, for at most
/// [`DRAIN_LIMIT_MS`].
///
/// The workload's last lines may still sit in the serial driver's buffer when it exits:
/// the 8250 driver sends them from its transmit interrupt, and `reboot` does not wait for
/// that. `TIOCOUTQ` says how many bytes are still queued; polling it (rather than a
/// blocking `tcdrain`) bounds the wait, so a console that stopped transmitting cannot keep
/// the VM from ending.
fn drain_console() {
    let path = c"/dev/console";
    // SAFETY: path is NUL-terminated; the descriptor is closed below.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_WRONLY | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return;
    }
    for _ in 0..DRAIN_LIMIT_MS / DRAIN_POLL_MS {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int through the valid pointer.
        let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
        if r != 0 || queued == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(DRAIN_POLL_MS));
    }
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
}

/// Longest wait for the console to drain before power-off.
const DRAIN_LIMIT_MS: u64 = 2000;
/// How often the console's output queue is looked at.
const DRAIN_POLL_MS: u64 = 5;
