//! An address bus: non-overlapping ranges `[base, base + len)` mapped to devices.
//!
//! The VMM keeps one for port I/O and one for MMIO; a vCPU exit at an address is routed
//! to the device owning it, with the offset relative to the device's base.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::snapshot::{BusDeviceSnapshot, SnapshotError};

/// A device reachable through a [`Bus`].
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset` (relative to the device's base).
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` (relative to the device's base).
    fn write(&mut self, offset: u64, data: &[u8]);
    /// Its state for a snapshot of the paused VM; `None`: a device with nothing to keep.
    fn save(&self) -> Result<Option<BusDeviceSnapshot>, SnapshotError> {
        Ok(None)
    }
    /// Puts back what [`BusDevice::save`] returned, on a freshly built device.
    fn restore(&mut self, _saved: &BusDeviceSnapshot) -> Result<(), SnapshotError> {
        Err(SnapshotError::Unsupported("bus device"))
    }
}

/// A device shared between the bus and whoever else needs it.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

/// Why a range could not be inserted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A zero-length range owns nothing and is certainly a caller bug.
    #[error("bus range at {base:#x} has zero length")]
    ZeroLength {
        /// Base of the rejected range.
        base: u64,
    },
    /// `base + len` does not fit in 64 bits.
    #[error("bus range {base:#x}+{len:#x} overflows the address space")]
    Overflow {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps {other_base:#x}+{other_len:#x}")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Base of the range already there.
        other_base: u64,
        /// Length of the range already there.
        other_len: u64,
    },
}

/// Address ranges → devices.
#[derive(Default)]
pub struct Bus {
    /// base → (len, device); ranges never overlap.
    ranges: BTreeMap<u64, (u64, SharedBusDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `[base, base + len)`; rejects zero length, overflow and overlap.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedBusDevice) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        // `end` is exclusive, so a range ending exactly at 2^64 is refused too: simpler
        // arithmetic everywhere else, and nothing real lives there.
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overflow { base, len })?;
        // The only candidates for overlap: the last range starting before `end`.
        if let Some((&other_base, &(other_len, _))) = self.ranges.range(..end).next_back() {
            if other_base + other_len > base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base,
                    other_len,
                });
            }
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    /// Every device with its base address, in address order (for snapshots).
    pub fn devices(&self) -> impl Iterator<Item = (u64, &SharedBusDevice)> {
        self.ranges
            .iter()
            .map(|(&base, (_, device))| (base, device))
    }

    /// The device owning `addr` and the offset of `addr` inside it.
    fn find(&self, addr: u64) -> Option<(u64, &SharedBusDevice)> {
        let (&base, (len, device)) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < *len).then_some((offset, device))
    }

    /// Reads from the device at `addr`; `false` if no device is there (`data` untouched).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                // A poisoned lock means a device panicked on another thread; its state is
                // still the best we have, and the VM should not die twice for it.
                let mut device = device.lock().unwrap_or_else(|e| e.into_inner());
                device.read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; `false` if no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                let mut device = device.lock().unwrap_or_else(|e| e.into_inner());
                device.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access.
    #[derive(Default)]
    struct Probe {
        last_read: Option<u64>,
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.last_read = Some(offset);
            data.fill(0xab);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn probe() -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe::default()))
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, probe()).unwrap();
        // Same start, inside, straddling either edge, enclosing.
        for (base, len) in [
            (0x100, 1),
            (0x108, 1),
            (0xf8, 0x9),
            (0x10f, 4),
            (0x0, 0x1000),
        ] {
            assert!(
                matches!(
                    bus.insert(base, len, probe()),
                    Err(BusError::Overlap { .. })
                ),
                "{base:#x}+{len:#x} must overlap"
            );
        }
        // Touching ranges on both sides are fine.
        bus.insert(0xf0, 0x10, probe()).unwrap();
        bus.insert(0x110, 0x10, probe()).unwrap();
        assert_eq!(
            bus.insert(0x200, 0, probe()),
            Err(BusError::ZeroLength { base: 0x200 })
        );
        assert!(matches!(
            bus.insert(u64::MAX, 2, probe()),
            Err(BusError::Overflow { .. })
        ));
        bus.insert(u64::MAX - 1, 1, probe()).unwrap();
    }

    #[test]
    fn routes_with_relative_offsets_and_reports_holes() {
        let mut bus = Bus::new();
        let a = probe();
        let b = probe();
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x400, 4, b.clone()).unwrap();

        let mut data = [0u8; 1];
        assert!(bus.read(0x3f8, &mut data));
        assert_eq!(a.lock().unwrap().last_read, Some(0));
        assert_eq!(data, [0xab]);
        assert!(bus.write(0x3ff, &[7]));
        assert_eq!(a.lock().unwrap().last_write, Some((7, vec![7])));
        assert!(bus.write(0x403, &[1, 2]));
        assert_eq!(b.lock().unwrap().last_write, Some((3, vec![1, 2])));

        let mut data = [0x55u8; 2];
        assert!(!bus.read(0x3f7, &mut data));
        assert!(!bus.read(0x404, &mut data));
        assert!(!bus.write(0, &[1]));
        assert_eq!(data, [0x55, 0x55], "a miss leaves the buffer alone");
    }
}
