//! The bare minimum of the i8042 keyboard controller: the guest's way to reset the machine.
//!
//! Linux with `reboot=k` (twinbox's cmdline) reboots — and twinbox-init ends the VM — by
//! writing command 0xFE (pulse reset line) to port 0x64. The VMM inserts this device on
//! the PIO bus at 0x60 with length 5 (ports 0x60..=0x64) and tears the VM down when
//! `reset` fires. No keyboard: reads of the data port return 0 and the status register
//! reads 0 (input and output buffers empty), which is what the kernel's reboot path and
//! its probe want to see.

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Number of ports from the base (0x60..=0x64).
pub const I8042_PORT_LEN: u64 = 5;
/// Offset of the command/status port (0x64) from the base (0x60).
const COMMAND_OFFSET: u64 = 4;
/// Command: pulse the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

/// The keyboard controller's reset line.
pub struct I8042 {
    reset: EventFd,
}

impl I8042 {
    /// A controller that writes to `reset` when the guest asks for a CPU reset.
    pub fn new(reset: EventFd) -> Self {
        Self { reset }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: no data for the guest, ready for commands. Data port: nothing.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            tracing::debug!("i8042: guest requested CPU reset");
            if let Err(e) = self.reset.write(1) {
                tracing::error!("i8042: cannot signal reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_fires_eventfd_and_nothing_else_does() {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(reset.try_clone().unwrap());
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);

        dev.write(0, &[CMD_RESET_CPU]); // data port: not a command
        dev.write(COMMAND_OFFSET, &[0xad]); // some other command
        assert!(reset.read().is_err(), "no reset yet (EAGAIN)");

        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(reset.read().unwrap(), 1);
    }
}
