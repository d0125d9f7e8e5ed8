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
