//! The I/O APIC, emulated in the VMM (KVM's split irqchip: the local APICs stay in the
//! kernel, the IOAPIC and the PIC/PIT do not exist there).
//!
//! Why: a VM with KVM's whole in-kernel irqchip and PIT costs 16–20 ms to destroy on a
//! virtualised host (the PIC, IOAPIC and PIT each leave the kernel's I/O bus behind a
//! grace period, the PIT stops a kernel thread); with a split irqchip the destroy takes
//! well under a millisecond. Cloud Hypervisor makes the same choice.
//!
//! How an interrupt travels: a device writes its eventfd, which is a KVM irqfd on the
//! device's GSI (= IOAPIC pin). KVM turns that GSI into the MSI the guest programmed into
//! the pin's redirection entry, through the GSI routing table this model keeps in step
//! with the guest's writes ([`RouteSink`]): a masked pin has no route, so its interrupts
//! are dropped as a masked edge-triggered pin drops them. The delivery itself never leaves
//! the kernel.
//!
//! What the guest sees is an 82093AA-style IOAPIC (version 0x11, 24 pins, no EOI register)
//! at `layout::IOAPIC_START` with the ID the MP table gives it: the MP table (and an ACPI
//! MADT, if there is one) must describe exactly this. Every pin's source is edge-triggered
//! (ISA bus default in the MP table; the devices pulse their irqfds), so the remote IRR of a
//! level-triggered entry never gets set and an EOI (KVM_EXIT_IOAPIC_EOI, which KVM sends
//! for the vectors of level-triggered routes) has nothing to clear.
//!
//! A guest can be hostile: any access size, offset, register index or entry value is taken
//! without a panic; what makes no sense is ignored (reads give all ones), and an entry that
//! cannot be delivered (a vector below 16, SMI/INIT/SIPI/ExtINT) gets no route.

use devices::bus::BusDevice;
use kvm_bindings::{kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQ_ROUTING_MSI};
use kvm_ioctls::VmFd;
use std::sync::Weak;

/// Number of pins (redirection entries); GSIs 0..NUM_PINS are the IOAPIC's.
pub const NUM_PINS: usize = 24;
/// The version register's version (82093AA, as KVM's in-kernel IOAPIC reports).
pub const VERSION: u32 = 0x11;
/// Bytes of MMIO the IOAPIC occupies (one page; registers at 0x00 and 0x10).
pub const WINDOW_LEN: u64 = 0x1000;

/// IOREGSEL: which register IOWIN reaches.
const IOREGSEL: u64 = 0x00;
/// IOWIN: the selected register.
const IOWIN: u64 = 0x10;
const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARBITRATION: u32 = 0x02;
/// First redirection table register (pin n: low word 0x10 + 2n, high word 0x11 + 2n).
const REG_REDIRECTION: u32 = 0x10;

// Redirection entry fields.
const RTE_VECTOR: u64 = 0xff;
const RTE_DELIVERY_MODE_SHIFT: u32 = 8;
const RTE_DEST_MODE_LOGICAL: u64 = 1 << 11;
const RTE_DELIVERY_STATUS: u64 = 1 << 12;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_TRIGGER_LEVEL: u64 = 1 << 15;
const RTE_MASKED: u64 = 1 << 16;
const RTE_DEST_SHIFT: u32 = 56;
/// Bits of the low word the guest cannot write.
const RTE_READ_ONLY: u64 = RTE_DELIVERY_STATUS | RTE_REMOTE_IRR;

// Delivery modes an IOAPIC pin may use and KVM can deliver as an MSI.
const DELIVERY_FIXED: u32 = 0;
const DELIVERY_LOWEST_PRIORITY: u32 = 1;
const DELIVERY_NMI: u32 = 4;

// MSI address and data (Intel SDM vol. 3, 11.11).
const MSI_ADDRESS_BASE: u32 = 0xfee0_0000;
const MSI_ADDRESS_DEST_SHIFT: u32 = 12;
const MSI_ADDRESS_REDIRECTION_HINT: u32 = 1 << 3;
const MSI_ADDRESS_DEST_MODE_LOGICAL: u32 = 1 << 2;
const MSI_DATA_LEVEL_ASSERT: u32 = 1 << 14;
const MSI_DATA_TRIGGER_LEVEL: u32 = 1 << 15;

/// One GSI → MSI route, as KVM_SET_GSI_ROUTING takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiRoute {
    /// The pin (= GSI of the irqfd that feeds it).
    pub gsi: u32,
    /// MSI address (low 32 bits; the high half is always 0 for an 8-bit destination).
    pub address: u32,
    /// MSI data: vector, delivery mode, trigger.
    pub data: u32,
}

/// Where the routing table goes: KVM in the VMM ([`KvmRoutes`]), a recorder in tests.
pub trait RouteSink: Send {
    /// Replaces every route of the VM by `routes`.
    fn set_routes(&mut self, routes: &[MsiRoute]) -> Result<(), String>;
}

/// KVM_SET_GSI_ROUTING on the VM. A weak reference: the run closes the VM before it drops
/// the devices (closing a device's irqfd eventfds first would make KVM retire each one
/// behind a grace period of its own, which the VM's close then waits for).
pub struct KvmRoutes(pub Weak<VmFd>);

impl RouteSink for KvmRoutes {
    fn set_routes(&mut self, routes: &[MsiRoute]) -> Result<(), String> {
        let vm = self.0.upgrade().ok_or("the VM is gone")?;
        let mut table = KvmIrqRouting::new(0).map_err(|e| format!("{e:?}"))?;
        for route in routes {
            let mut entry = kvm_irq_routing_entry {
                gsi: route.gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            entry.u.msi.address_lo = route.address;
            entry.u.msi.data = route.data;
            table.push(entry).map_err(|e| format!("{e:?}"))?;
        }
        vm.set_gsi_routing(&table).map_err(|e| e.to_string())
    }
}

/// The MSI that redirection entry `entry` of pin `gsi` sends, or `None` when the pin is
/// masked or the entry cannot be delivered.
pub fn route_of(gsi: u32, entry: u64) -> Option<MsiRoute> {
    if entry & RTE_MASKED != 0 {
        return None;
    }
    let vector = (entry & RTE_VECTOR) as u32;
    let mode = ((entry >> RTE_DELIVERY_MODE_SHIFT) & 0x7) as u32;
    match mode {
        // Vectors 0–15 are reserved: a local APIC refuses them (illegal vector error).
        DELIVERY_FIXED | DELIVERY_LOWEST_PRIORITY if vector >= 16 => {}
        DELIVERY_NMI => {}
        // SMI, INIT, ExtINT (there is no PIC) and the reserved modes: nothing to send.
        _ => return None,
    }
    let dest = (entry >> RTE_DEST_SHIFT) as u32;
    let mut address = MSI_ADDRESS_BASE | (dest << MSI_ADDRESS_DEST_SHIFT);
    if entry & RTE_DEST_MODE_LOGICAL != 0 {
        address |= MSI_ADDRESS_DEST_MODE_LOGICAL;
    }
    if mode == DELIVERY_LOWEST_PRIORITY {
        address |= MSI_ADDRESS_REDIRECTION_HINT;
    }
    let mut data = vector | (mode << 8);
    if entry & RTE_TRIGGER_LEVEL != 0 {
        // KVM sends the vectors of level-triggered routes back as KVM_EXIT_IOAPIC_EOI.
        data |= MSI_DATA_TRIGGER_LEVEL | MSI_DATA_LEVEL_ASSERT;
    }
    Some(MsiRoute { gsi, address, data })
}

/// The IOAPIC's registers and the routes they imply.
pub struct Ioapic<S: RouteSink> {
    /// APIC ID (bits 24–27 of the ID register).
    id: u32,
    /// The register IOWIN reaches.
    select: u32,
    /// Redirection entries, all masked at reset.
    table: [u64; NUM_PINS],
    /// The routes KVM has now.
    routes: Vec<MsiRoute>,
    sink: S,
}

impl<S: RouteSink> Ioapic<S> {
    /// An IOAPIC with APIC ID `id` (the MP table's), every pin masked, routes sent to `sink`.
    pub fn new(id: u8, sink: S) -> Self {
        Self {
            id: u32::from(id) & 0xf,
            select: 0,
            table: [RTE_MASKED; NUM_PINS],
            routes: Vec::new(),
            sink,
        }
    }

    /// An end of interrupt for `vector` (KVM_EXIT_IOAPIC_EOI). Every source is
    /// edge-triggered, so no entry's remote IRR is ever set and there is nothing to clear
    /// or to deliver again (module docs).
    pub fn end_of_interrupt(&mut self, vector: u8) {
        tracing::trace!("IOAPIC: EOI for vector {vector:#x}");
    }

    fn read_register(&self) -> u32 {
        match self.select {
            REG_ID | REG_ARBITRATION => self.id << 24,
            REG_VERSION => ((NUM_PINS as u32 - 1) << 16) | VERSION,
            reg => match Self::pin_of(reg) {
                Some((pin, false)) => self.table[pin] as u32,
                Some((pin, true)) => (self.table[pin] >> 32) as u32,
                None => u32::MAX,
            },
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.select {
            REG_ID => self.id = (value >> 24) & 0xf,
            reg => {
                let Some((pin, high)) = Self::pin_of(reg) else {
                    return; // version, arbitration, unknown: read-only or nothing
                };
                let old = self.table[pin];
                self.table[pin] = if high {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                } else {
                    (old & (0xffff_ffff_0000_0000 | RTE_READ_ONLY))
                        | (u64::from(value) & !RTE_READ_ONLY)
                };
                if self.table[pin] != old {
                    self.update_routes();
                }
            }
        }
    }

    /// Pin and half (true = high word) of redirection register `reg`.
    fn pin_of(reg: u32) -> Option<(usize, bool)> {
        let index = reg.checked_sub(REG_REDIRECTION)? as usize;
        let pin = index / 2;
        (pin < NUM_PINS).then_some((pin, index % 2 == 1))
    }

    /// Sends the routes to KVM when the guest's entries changed them. Linux writes an entry
    /// as two words, high then low, so most writes change no route and cost no ioctl.
    fn update_routes(&mut self) {
        let routes: Vec<MsiRoute> = (0..NUM_PINS)
            .filter_map(|pin| route_of(pin as u32, self.table[pin]))
            .collect();
        if routes == self.routes {
            return;
        }
        match self.sink.set_routes(&routes) {
            Ok(()) => self.routes = routes,
            // The old routes stay in force; the next change tries again.
            Err(e) => tracing::warn!("IOAPIC: KVM refused the interrupt routes: {e}"),
        }
    }
}

impl<S: RouteSink> BusDevice for Ioapic<S> {
    fn save(
        &self,
    ) -> Result<Option<devices::snapshot::BusDeviceSnapshot>, devices::snapshot::SnapshotError>
    {
        Ok(Some(devices::snapshot::BusDeviceSnapshot::Ioapic(
            devices::snapshot::IoapicSnapshot {
                id: self.id,
                select: self.select,
                table: self.table.to_vec(),
            },
        )))
    }

    /// Saved registers back, and the routes they imply sent to KVM (a snapshot's entries
    /// are untrusted: the read-only bits are cleared and the ID cut to 4 bits as if the
    /// guest had written them).
    fn restore(
        &mut self,
        saved: &devices::snapshot::BusDeviceSnapshot,
    ) -> Result<(), devices::snapshot::SnapshotError> {
        let mismatch = |why: &str| devices::snapshot::SnapshotError::Mismatch {
            device: "IOAPIC",
            why: why.into(),
        };
        let devices::snapshot::BusDeviceSnapshot::Ioapic(state) = saved else {
            return Err(mismatch("another kind of device saved at its address"));
        };
        let table: [u64; NUM_PINS] = state
            .table
            .as_slice()
            .try_into()
            .map_err(|_| mismatch("not 24 redirection entries"))?;
        self.id = state.id & 0xf;
        self.select = state.select;
        self.table = table.map(|entry| entry & !RTE_READ_ONLY);
        self.routes.clear();
        self.update_routes();
        Ok(())
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Only aligned 32-bit accesses of the two registers mean anything.
        let value = match (offset, data.len()) {
            (IOREGSEL, 4) => self.select,
            (IOWIN, 4) => self.read_register(),
            _ => u32::MAX,
        };
        let bytes = value.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = bytes.get(i).copied().unwrap_or(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            IOREGSEL => self.select = value & 0xff,
            IOWIN => self.write_register(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Keeps every routing table the IOAPIC sent; fails when told to.
    #[derive(Clone, Default)]
    struct Recorder {
        tables: Arc<Mutex<Vec<Vec<MsiRoute>>>>,
        refuse: Arc<Mutex<bool>>,
    }

    impl RouteSink for Recorder {
        fn set_routes(&mut self, routes: &[MsiRoute]) -> Result<(), String> {
            if *self.refuse.lock().unwrap() {
                return Err("refused".into());
            }
            self.tables.lock().unwrap().push(routes.to_vec());
            Ok(())
        }
    }

    fn ioapic() -> (Ioapic<Recorder>, Recorder) {
        let recorder = Recorder::default();
        (Ioapic::new(1, recorder.clone()), recorder)
    }

    fn write32(io: &mut Ioapic<Recorder>, offset: u64, value: u32) {
        io.write(offset, &value.to_le_bytes());
    }

    fn read_reg(io: &mut Ioapic<Recorder>, reg: u32) -> u32 {
        write32(io, IOREGSEL, reg);
        let mut data = [0u8; 4];
        io.read(IOWIN, &mut data);
        u32::from_le_bytes(data)
    }

    fn write_reg(io: &mut Ioapic<Recorder>, reg: u32, value: u32) {
        write32(io, IOREGSEL, reg);
        write32(io, IOWIN, value);
    }

    /// Programs pin `pin` as Linux does: high word (destination), then low word.
    fn program(io: &mut Ioapic<Recorder>, pin: u32, low: u32, dest: u8) {
        write_reg(io, 0x11 + 2 * pin, u32::from(dest) << 24);
        write_reg(io, 0x10 + 2 * pin, low);
    }

    #[test]
    fn identifies_as_the_mp_tables_24_pin_version_0x11_ioapic() {
        let (mut io, _) = ioapic();
        assert_eq!(read_reg(&mut io, 0x00), 1 << 24, "ID");
        assert_eq!(read_reg(&mut io, 0x01), (23 << 16) | 0x11, "version");
        assert_eq!(read_reg(&mut io, 0x02), 1 << 24, "arbitration ID");
        write_reg(&mut io, 0x00, 0x0700_0000);
        assert_eq!(
            read_reg(&mut io, 0x00),
            7 << 24,
            "the guest may renumber it"
        );
        write_reg(&mut io, 0x01, 0);
        assert_eq!(
            read_reg(&mut io, 0x01),
            (23 << 16) | 0x11,
            "version is read-only"
        );
    }

    #[test]
    fn every_pin_starts_masked_and_routes_nothing() {
        let (mut io, recorder) = ioapic();
        for pin in 0..24 {
            assert_eq!(read_reg(&mut io, 0x10 + 2 * pin), 1 << 16, "pin {pin}");
            assert_eq!(read_reg(&mut io, 0x11 + 2 * pin), 0, "pin {pin}");
        }
        assert!(recorder.tables.lock().unwrap().is_empty());
    }

    #[test]
    fn an_unmasked_edge_entry_becomes_the_msi_the_lapic_expects() {
        let (mut io, recorder) = ioapic();
        // Linux: fixed delivery, physical destination APIC 0, vector 0x22, edge, high.
        program(&mut io, 5, 0x22, 0);
        let tables = recorder.tables.lock().unwrap();
        assert_eq!(tables.len(), 1, "one routing update for the two words");
        assert_eq!(
            tables[0],
            vec![MsiRoute {
                gsi: 5,
                address: 0xfee0_0000,
                data: 0x22
            }]
        );
    }

    #[test]
    fn destination_logical_mode_lowest_priority_and_level_reach_the_msi() {
        let (mut io, recorder) = ioapic();
        // Lowest priority (1 << 8), logical (1 << 11), level (1 << 15), to APICs 0b11.
        program(&mut io, 7, 0x31 | (1 << 8) | (1 << 11) | (1 << 15), 3);
        let last = recorder.tables.lock().unwrap().last().cloned().unwrap();
        assert_eq!(
            last,
            vec![MsiRoute {
                gsi: 7,
                address: 0xfee0_0000 | (3 << 12) | (1 << 3) | (1 << 2),
                data: 0x31 | (1 << 8) | (1 << 14) | (1 << 15)
            }]
        );
    }

    #[test]
    fn masking_a_pin_removes_its_route_and_unmasking_restores_it() {
        let (mut io, recorder) = ioapic();
        program(&mut io, 4, 0x24, 0);
        program(&mut io, 5, 0x25, 0);
        write_reg(&mut io, 0x10 + 2 * 4, 0x24 | (1 << 16));
        let routes = recorder.tables.lock().unwrap().last().cloned().unwrap();
        assert_eq!(routes.iter().map(|r| r.gsi).collect::<Vec<_>>(), vec![5]);
        write_reg(&mut io, 0x10 + 2 * 4, 0x24);
        let routes = recorder.tables.lock().unwrap().last().cloned().unwrap();
        assert_eq!(routes.iter().map(|r| r.gsi).collect::<Vec<_>>(), vec![4, 5]);
    }

    #[test]
    fn rewriting_the_same_entry_costs_no_routing_update() {
        let (mut io, recorder) = ioapic();
        program(&mut io, 5, 0x22, 0);
        program(&mut io, 5, 0x22, 0);
        // Polarity changes the entry but not the MSI: no new table either.
        write_reg(&mut io, 0x10 + 2 * 5, 0x22 | (1 << 13));
        assert_eq!(recorder.tables.lock().unwrap().len(), 1);
    }

    #[test]
    fn delivery_status_and_remote_irr_are_read_only() {
        let (mut io, _) = ioapic();
        write_reg(&mut io, 0x10, 0x22 | (1 << 12) | (1 << 14));
        assert_eq!(read_reg(&mut io, 0x10), 0x22);
    }

    #[test]
    fn entries_that_cannot_be_delivered_get_no_route() {
        // Reserved vectors, SMI, INIT, ExtINT, reserved modes: nothing.
        for low in [
            0x0fu32,
            0x22 | (2 << 8),
            0x22 | (5 << 8),
            0x22 | (7 << 8),
            0x22 | (3 << 8),
        ] {
            assert_eq!(route_of(3, u64::from(low)), None, "{low:#x}");
        }
        // NMI ignores the vector.
        assert_eq!(
            route_of(3, 4 << 8).map(|r| r.data),
            Some(4 << 8),
            "an NMI entry is delivered"
        );
    }

    #[test]
    fn a_hostile_guest_gets_no_panic_and_no_route_from_nonsense() {
        let (mut io, recorder) = ioapic();
        // Every register index, every access size at every offset of the window.
        for reg in 0..=0xffu32 {
            write_reg(&mut io, reg, 0xffff_ffff);
            let _ = read_reg(&mut io, reg);
        }
        for offset in [
            0u64, 1, 3, 4, 0x0f, 0x10, 0x11, 0x13, 0x20, 0x40, 0xffc, 0xfff,
        ] {
            for len in 0..=8 {
                let mut data = vec![0xa5u8; len];
                io.read(offset, &mut data);
                io.write(offset, &data);
            }
        }
        // IOREGSEL keeps only its low byte; an index past the table reads all ones.
        write32(&mut io, IOREGSEL, 0xdead_beef);
        let mut data = [0u8; 4];
        io.read(IOREGSEL, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0xef);
        assert_eq!(read_reg(&mut io, 0x40), u32::MAX);
        // A short read gets all ones, a short write changes nothing.
        let mut short = [0u8; 2];
        io.read(IOWIN, &mut short);
        assert_eq!(short, [0xff, 0xff]);
        // All-ones entries are masked: KVM never got a route from any of it.
        assert!(recorder.tables.lock().unwrap().iter().all(|t| t.is_empty()));
        io.end_of_interrupt(0);
        io.end_of_interrupt(0xff);
    }

    #[test]
    fn a_refused_update_keeps_the_old_routes_and_is_tried_again() {
        let (mut io, recorder) = ioapic();
        *recorder.refuse.lock().unwrap() = true;
        program(&mut io, 5, 0x22, 0);
        assert!(recorder.tables.lock().unwrap().is_empty());
        *recorder.refuse.lock().unwrap() = false;
        program(&mut io, 6, 0x23, 0);
        let last = recorder.tables.lock().unwrap().last().cloned().unwrap();
        assert_eq!(last.iter().map(|r| r.gsi).collect::<Vec<_>>(), vec![5, 6]);
    }
}
