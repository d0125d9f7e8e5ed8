//! Where the guest's serial console goes: our stdout, or a buffer for the report.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// A captured console, shared between the serial device and the report.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// The text so far (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("console lock")).into_owned()
    }
}

/// Turns the tty's `\r\n` line ends back into `\n` so guest output reads like a host
/// program's output (the guest's serial tty has ONLCR on).
pub struct Console<W: Write + Send> {
    inner: W,
}

impl<W: Write + Send> Console<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        Self { inner }
    }
}

impl<W: Write + Send> Write for Console<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let cleaned: Vec<u8> = buf.iter().copied().filter(|b| *b != b'\r').collect();
        self.inner.write_all(&cleaned)?;
        // The serial device writes one byte at a time; flushing keeps the guest's output
        // interleaved correctly with ours.
        self.inner.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("console lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carriage_returns_are_dropped() {
        let captured = Captured::default();
        let mut console = Console::new(captured.clone());
        console.write_all(b"hi\r\nthere\r\n").unwrap();
        assert_eq!(captured.text(), "hi\nthere\n");
    }
}
