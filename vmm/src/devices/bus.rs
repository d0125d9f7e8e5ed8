//! An I/O bus: address ranges mapped to devices, for port I/O and for MMIO.
//!
//! Interim: twinbox's `devices` crate is to provide this (`devices::bus`); until it lands
//! the VMM carries this small version so VMs can boot.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus: reads and writes at an offset from its base.
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Ranges overlap.
#[derive(Debug, PartialEq, Eq)]
pub struct Overlap;

/// Address ranges → devices.
#[derive(Default)]
pub struct Bus {
    /// base → (len, device)
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), Overlap> {
        let end = base.checked_add(len).ok_or(Overlap)?;
        if len == 0 {
            return Err(Overlap);
        }
        let before = self.ranges.range(..end).next_back();
        if before.is_some_and(|(b, (l, _))| b + l > base) {
            return Err(Overlap);
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (base, (len, device)) = self.ranges.range(..=addr).next_back()?;
        (addr < base + len).then_some((addr - base, device))
    }

    /// Reads from the device at `addr`; false if none is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                device.lock().expect("device lock").read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; false if none is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                device.lock().expect("device lock").write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, u8)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn dispatches_by_range_and_refuses_overlaps() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(0x10, 8, dev.clone()).unwrap();
        assert_eq!(bus.insert(0x17, 2, dev.clone()), Err(Overlap));
        assert_eq!(bus.insert(0x8, 9, dev.clone()), Err(Overlap));
        bus.insert(0x18, 1, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x13, &mut b));
        assert_eq!(b[0], 3);
        assert!(!bus.read(0x19, &mut b));
        assert!(!bus.write(0x0f, &[1]));
        assert!(bus.write(0x17, &[9]));
        assert_eq!(dev.lock().unwrap().0, vec![(7, 9)]);
    }
}
