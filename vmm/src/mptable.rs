//! The Intel MultiProcessor Specification 1.4 table: how a kernel without ACPI learns the
//! CPUs, the IOAPIC and how ISA interrupts are wired. Built as bytes, then copied in.

use crate::layout::{APIC_START, IOAPIC_START, IRQ_MAX};

const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
/// Size of the floating pointer structure.
const MPF_SIZE: usize = 16;
/// Size of the configuration table header.
const MPC_HEADER_SIZE: usize = 44;

fn checksum_fix(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The MP floating pointer followed by the configuration table for `cpus` CPUs, to be
/// placed at guest address `base`.
pub fn build(base: u64, cpus: u8) -> Vec<u8> {
    let ioapic_id = cpus; // APIC IDs 0..cpus-1 belong to the CPUs.
    let mut table = Vec::new();
    // Header, patched below once the length is known.
    table.extend_from_slice(MPC_SIGNATURE);
    table.extend_from_slice(&[0, 0]); // length
    table.push(4); // spec revision 1.4
    table.push(0); // checksum
    table.extend_from_slice(b"TWINBOX ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // oem table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // oem table size
    table.extend_from_slice(&0u16.to_le_bytes()); // entry count, patched below
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended length + checksum + reserved
    debug_assert_eq!(table.len(), MPC_HEADER_SIZE);
    let mut entries: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        table.extend_from_slice(&[MP_PROCESSOR, id, APIC_VERSION, flags]);
        // CPU signature (family 6) and feature flags (FPU | APIC), as firmware reports.
        table.extend_from_slice(&0x600u32.to_le_bytes());
        table.extend_from_slice(&0x201u32.to_le_bytes());
        table.extend_from_slice(&[0; 8]);
        entries += 1;
    }
    table.extend_from_slice(&[MP_BUS, 0]);
    table.extend_from_slice(b"ISA   ");
    table.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    table.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entries += 2;
    for irq in 0..=IRQ_MAX as u8 {
        // ISA IRQ n → IOAPIC pin n, bus-default polarity and trigger.
        table.extend_from_slice(&[MP_INTSRC, MP_IRQ_INT, 0, 0, 0, irq, ioapic_id, irq]);
        entries += 1;
    }
    // LINT0 of every LAPIC is ExtINT (the PIC), LINT1 is NMI.
    table.extend_from_slice(&[MP_LINTSRC, MP_IRQ_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    table.extend_from_slice(&[MP_LINTSRC, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    entries += 2;
    let len = table.len() as u16;
    table[4..6].copy_from_slice(&len.to_le_bytes());
    table[34..36].copy_from_slice(&entries.to_le_bytes());
    table[7] = checksum_fix(&table);

    let mut mpf = Vec::with_capacity(MPF_SIZE);
    mpf.extend_from_slice(MPF_SIGNATURE);
    mpf.extend_from_slice(&((base + MPF_SIZE as u64) as u32).to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(4); // spec revision
    mpf.push(0); // checksum
    mpf.extend_from_slice(&[0; 5]); // feature bytes: 0 = a configuration table is present
    mpf[10] = checksum_fix(&mpf);
    mpf.extend_from_slice(&table);
    mpf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_are_zero_and_pointer_points_at_table() {
        let t = build(0x9fc00, 4);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 0x9fc10);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
    }

    #[test]
    fn lists_every_cpu_with_the_first_as_boot_processor() {
        let t = build(0x9fc00, 3);
        let table = &t[16..];
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 3 + 2 + 24 + 2);
        let cpu = |i: usize| &table[44 + 20 * i..44 + 20 * (i + 1)];
        assert_eq!(&cpu(0)[..4], &[0, 0, 0x14, 3]);
        assert_eq!(&cpu(2)[..4], &[0, 2, 0x14, 1]);
        // The IOAPIC follows the bus and takes the first free APIC ID.
        let ioapic = &table[44 + 60 + 8..44 + 60 + 16];
        assert_eq!(&ioapic[..4], &[2, 3, 0x11, 1]);
    }
}
