//! The phase-marker port: twinbox-init `outl`s one little-endian u32 to
//! [`twinbox_proto::MARKER_PORT`] at each phase; this device decodes it and hands the
//! result to the VMM's callback, which stamps the host clock.
//!
//! The VMM inserts it on the PIO bus at `MARKER_PORT` with length [`MARKER_PORT_LEN`].
//! - A 4-byte write at offset 0 is decoded; undecodable values reach the callback as
//!   `Err(MarkerError(value))` (a hostile guest can write anything).
//! - Writes of any other size or at any other offset cannot be a marker (init only ever
//!   does `outl` to the base); they are ignored and logged at debug level, never passed to
//!   the callback, so a confused guest cannot fake or break the timeline with byte pokes.
//! - Reads return zeros.

use twinbox_proto::{Marker, MarkerError};

use crate::bus::BusDevice;

/// Number of ports the marker occupies (one 32-bit port).
pub const MARKER_PORT_LEN: u64 = 4;

/// What the device calls for each 4-byte write.
pub type MarkerCallback = Box<dyn FnMut(Result<Marker, MarkerError>) + Send>;

/// The phase-marker port.
pub struct PhaseMarker {
    on_marker: MarkerCallback,
}

impl PhaseMarker {
    /// A marker port that reports each decoded (or undecodable) write to `on_marker`.
    pub fn new(on_marker: MarkerCallback) -> Self {
        Self { on_marker }
    }
}

impl BusDevice for PhaseMarker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, <[u8; 4]>::try_from(data)) {
            (0, Ok(bytes)) => (self.on_marker)(Marker::decode(u32::from_le_bytes(bytes))),
            _ => tracing::debug!(
                "marker: ignoring {}-byte write at offset {offset}",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use twinbox_proto::ExitCode;

    #[test]
    fn four_byte_writes_decode_and_garbage_is_reported() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let mut dev = PhaseMarker::new(Box::new(move |m| sink.lock().unwrap().push(m)));

        let exited = Marker::WorkloadExited(ExitCode::Exited(3));
        dev.write(0, &Marker::InitStarted.encode().to_le_bytes());
        dev.write(0, &exited.encode().to_le_bytes());
        dev.write(0, &0xdead_beefu32.to_le_bytes());
        dev.write(0, &[1]); // outb: ignored
        dev.write(0, &[1, 0]); // outw: ignored
        dev.write(1, &Marker::InitStarted.encode().to_le_bytes()); // not at the base

        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                Ok(Marker::InitStarted),
                Ok(exited),
                Err(MarkerError(0xdead_beef))
            ]
        );
        let mut data = [0xffu8; 4];
        dev.read(0, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
