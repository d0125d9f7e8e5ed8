//! COM1: an 8250 UART (vm-superio's `Serial`) as the guest console.
//!
//! The VMM inserts it on the PIO bus at 0x3f8 (8 ports) and wires `interrupt` to IRQ 4
//! through an irqfd. Everything the guest transmits is written to `out`.

use std::io::Write;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Number of I/O ports the UART occupies.
pub const SERIAL_PORT_LEN: u64 = 8;

/// Turns vm-superio's interrupt requests into eventfd writes.
pub struct EventFdTrigger(EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The guest console UART.
pub struct SerialConsole {
    serial: Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    /// A UART that raises `interrupt` and writes guest output to `out`.
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            serial: Serial::new(EventFdTrigger(interrupt), out),
        }
    }

    /// Queues bytes for the guest to read (as if typed); returns how many fit in the
    /// receive FIFO.
    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn snapshot(&self) -> crate::snapshot::SerialSnapshot {
        let s = self.serial.state();
        crate::snapshot::SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Puts the UART back in a saved state, keeping its interrupt and output.
    pub fn restore(
        &mut self,
        saved: &crate::snapshot::SerialSnapshot,
    ) -> Result<(), crate::snapshot::SnapshotError> {
        let mismatch = |why: String| crate::snapshot::SnapshotError::Mismatch {
            device: "serial",
            why,
        };
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: saved.baud_divisor_low,
            baud_divisor_high: saved.baud_divisor_high,
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        // vm-superio's FIFO holds 64 bytes; checked here, before the writer is moved.
        if saved.in_buffer.len() > 64 {
            return Err(mismatch(format!(
                "{} bytes in a 64-byte receive FIFO",
                saved.in_buffer.len()
            )));
        }
        let interrupt = self
            .serial
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(|e| mismatch(format!("cannot duplicate its interrupt: {e}")))?;
        // from_state takes the writer by value: swap a placeholder in while it is rebuilt.
        let placeholder = Serial::new(
            EventFdTrigger(
                interrupt
                    .try_clone()
                    .map_err(|e| mismatch(format!("cannot duplicate its interrupt: {e}")))?,
            ),
            Box::new(std::io::sink()) as Box<dyn Write + Send>,
        );
        let old = std::mem::replace(&mut self.serial, placeholder);
        let out = old.into_writer();
        match Serial::from_state(
            &state,
            EventFdTrigger(interrupt),
            vm_superio::serial::NoEvents,
            out,
        ) {
            Ok(serial) => {
                self.serial = serial;
                Ok(())
            }
            Err(e) => Err(mismatch(format!("{e:?}"))),
        }
    }

    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let room = self.serial.fifo_capacity().min(input.len());
        match self.serial.enqueue_raw_bytes(&input[..room]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial: cannot queue input: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialConsole {
    fn save(
        &self,
    ) -> Result<Option<crate::snapshot::BusDeviceSnapshot>, crate::snapshot::SnapshotError> {
        Ok(Some(crate::snapshot::BusDeviceSnapshot::Serial(
            self.snapshot(),
        )))
    }

    fn restore(
        &mut self,
        saved: &crate::snapshot::BusDeviceSnapshot,
    ) -> Result<(), crate::snapshot::SnapshotError> {
        match saved {
            crate::snapshot::BusDeviceSnapshot::Serial(s) => SerialConsole::restore(self, s),
            _ => Err(crate::snapshot::SnapshotError::Mismatch {
                device: "serial",
                why: "another kind of device saved at its address".into(),
            }),
        }
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte-wide registers only; anything else reads as zeros.
        match (u8::try_from(offset), data.len()) {
            (Ok(offset), 1) if u64::from(offset) < SERIAL_PORT_LEN => {
                data[0] = self.serial.read(offset)
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [value]) = (u8::try_from(offset), data) {
            if u64::from(offset) < SERIAL_PORT_LEN {
                // Output errors (closed stdout, full pipe) must not stop the guest.
                if let Err(e) = self.serial.write(offset, *value) {
                    tracing::debug!("serial: write failed: {e:?}");
                }
                // Console output is for humans watching: do not sit in a buffer.
                if offset == 0 {
                    let _ = self.serial.writer_mut().flush();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A `Write` whose contents the test can still see after handing it over.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmitted_bytes_reach_out_and_input_is_readable() {
        let capture = Capture::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut serial = SerialConsole::new(irq.try_clone().unwrap(), Box::new(capture.clone()));
        for b in b"hello\n" {
            serial.write(0, &[*b]);
        }
        assert_eq!(capture.0.lock().unwrap().as_slice(), b"hello\n");

        // Enable the "received data available" interrupt, then type a byte.
        serial.write(1, &[0x01]);
        assert_eq!(serial.enqueue_input(b"x"), 1);
        assert_eq!(irq.read().unwrap(), 1, "input raises the interrupt");
        let mut lsr = [0u8];
        serial.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "LSR says data ready");
        let mut rbr = [0u8];
        serial.read(0, &mut rbr);
        assert_eq!(rbr, *b"x");

        // Wrong sizes and offsets are ignored.
        let mut wide = [0xffu8; 2];
        serial.read(0, &mut wide);
        assert_eq!(wide, [0, 0]);
        serial.write(9, b"z");
        serial.write(0, b"zz");
        assert_eq!(capture.0.lock().unwrap().as_slice(), b"hello\n");
    }
}
