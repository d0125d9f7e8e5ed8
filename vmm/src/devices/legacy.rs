//! The legacy port-I/O devices: COM1 serial console, the i8042 (only for its reset line)
//! and the phase-marker port init writes to.
//!
//! Interim: twinbox's `devices` crate is to provide these; until it lands the VMM wraps
//! vm-superio's serial and i8042 models here.

use super::bus::BusDevice;
use std::io::Write;
use twinbox_spec::proto::{Marker, MarkerError};
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// An eventfd as a vm-superio interrupt/reset trigger.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// A 16550A UART whose output goes to `out`; input is not connected.
pub struct SerialConsole(
    Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
);

impl SerialConsole {
    /// A console raising `interrupt` and writing to `out`.
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self(Serial::new(EventFdTrigger(interrupt), out))
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.0.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = self.0.write(offset as u8, data[0]) {
                tracing::debug!("serial write failed: {e:?}");
            }
        }
    }
}

/// The i8042 controller: the guest resets the machine by writing 0xfe to port 0x64.
pub struct I8042(I8042Device<EventFdTrigger>);

impl I8042 {
    /// A controller that writes `reset` when the guest asks for a CPU reset.
    pub fn new(reset: EventFd) -> Self {
        Self(I8042Device::new(EventFdTrigger(reset)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset <= 4 {
            data[0] = self.0.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset <= 4 {
            if let Err(e) = self.0.write(offset as u8, data[0]) {
                tracing::warn!("i8042 reset trigger failed: {e:?}");
            }
        }
    }
}

/// The phase-marker port: init `outl`s one encoded [`Marker`] per phase.
pub struct PhaseMarker {
    on_marker: Box<dyn FnMut(Result<Marker, MarkerError>) + Send>,
}

impl PhaseMarker {
    /// A marker port that hands each decoded value to `on_marker`.
    pub fn new(on_marker: Box<dyn FnMut(Result<Marker, MarkerError>) + Send>) -> Self {
        Self { on_marker }
    }
}

impl BusDevice for PhaseMarker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        // Only a whole 32-bit write at the port is a marker; anything else is ignored.
        if offset == 0 && data.len() == 4 {
            let value = u32::from_le_bytes(data.try_into().expect("4 bytes"));
            (self.on_marker)(Marker::decode(value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use twinbox_spec::proto::ExitCode;

    #[test]
    fn marker_decodes_whole_words_only() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut m = PhaseMarker::new(Box::new(move |r| s.lock().unwrap().push(r)));
        m.write(0, &0x703u32.to_le_bytes());
        m.write(0, &[3]);
        m.write(0, &0xffu32.to_le_bytes());
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0], Ok(Marker::WorkloadExited(ExitCode::Exited(7))));
        assert!(seen[1].is_err());
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn i8042_reset_writes_the_eventfd() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn serial_output_reaches_the_writer() {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let mut s = SerialConsole::new(EventFd::new(0).unwrap(), Box::new(buf.clone()));
        s.write(0, b"o");
        s.write(0, b"k");
        assert_eq!(buf.0.lock().unwrap().as_slice(), b"ok");
    }
}
