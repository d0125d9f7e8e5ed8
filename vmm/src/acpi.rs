//! The ACPI tables: how a kernel with ACPI (every distribution kernel; Debian's cloud
//! kernel has no MP-table parser at all) learns the CPUs, the interrupt controllers and
//! the devices. A hardware-reduced ACPI platform, as Firecracker and Cloud Hypervisor
//! describe theirs: no PM timer, SCI or sleep registers, only
//!
//! * RSDP at [`ACPI_RSDP_START`], where the kernel scans for it (0xE0000–0xFFFFF);
//! * XSDT → FADT (hardware-reduced; no VGA, 8042, CMOS RTC or MSI) → DSDT, and MADT;
//! * MADT: one local APIC per vCPU (APIC ID = vCPU index, as CPUID says) and the IOAPIC
//!   (its ID follows the CPUs', as in the MP table);
//! * DSDT: COM1 and every virtio-mmio device (`LNRO0005`, the ID Linux's virtio_mmio
//!   driver matches), so a kernel built without `VIRTIO_MMIO_CMDLINE_DEVICES` finds its
//!   disks; a kernel that also reads the command line's `virtio_mmio.device=` entries
//!   only sees each device's second registration fail as busy.
//!
//! The tables live in the reserved range below 1 MiB (see layout.rs), next to the MP
//! table that kernels without ACPI (twinbox's own) read instead.

use crate::boot::cmdline::VirtioMmioEntry;
use crate::layout::{
    ACPI_RSDP_START, ACPI_TABLES_END, ACPI_TABLES_START, APIC_START, IOAPIC_START, SERIAL_IRQ,
    SERIAL_PORT, SERIAL_PORT_LEN,
};
use crate::memory::GuestMemoryMmap;
use acpi_tables::{aml, fadt, madt, rsdp::Rsdp, sdt::Sdt, xsdt::XSDT, Aml};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

/// The OEM ID in every table.
const OEM_ID: [u8; 6] = *b"TWINBX";
/// The OEM revision in every table.
const OEM_REVISION: u32 = 1;
/// DSDT revision 2: integers are 64 bits.
const DSDT_REVISION: u8 = 2;
/// FADT IA-PC boot architecture flags (ACPI 6.5, 5.2.9.3): no VGA, MSI not supported,
/// ASPM not to be touched, no CMOS RTC. Bits 0 (legacy devices) and 1 (8042) are clear:
/// with them Linux would probe a PS/2 controller and an RTC that are not there.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// Why the ACPI tables could not be written.
#[derive(Debug, Error)]
pub enum AcpiError {
    #[error("the ACPI tables ({size} bytes) do not fit below {limit:#x}")]
    TooBig { size: usize, limit: u64 },
    #[error("cannot write the ACPI tables at {addr:#x}: {source}")]
    Memory {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

/// Serialises an AML object (a table, or a piece of one) to bytes.
fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

/// A device object with its hardware ID, unique ID and current resources, as AML bytes.
fn device(name: &str, hid: &dyn Aml, uid: u32, resources: Vec<&dyn Aml>) -> Vec<u8> {
    bytes_of(&aml::Device::new(
        name.into(),
        vec![
            &aml::Name::new("_HID".into(), hid),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(resources)),
        ],
    ))
}

/// The DSDT's definition block: COM1 and the virtio-mmio devices under `\_SB`.
fn dsdt_body(devices: &[VirtioMmioEntry]) -> Vec<u8> {
    let mut children = device(
        "COM1",
        &aml::EISAName::new("PNP0501"),
        1,
        vec![
            &aml::IO::new(SERIAL_PORT, SERIAL_PORT, 1, SERIAL_PORT_LEN as u8),
            &aml::Interrupt::new(true, true, false, false, SERIAL_IRQ),
        ],
    );
    for (i, d) in devices.iter().enumerate() {
        // The windows live in the 32-bit MMIO gap; edge-triggered, as their irqfds are.
        children.extend(device(
            &format!("VR{i:02X}"),
            &"LNRO0005",
            i as u32,
            vec![
                &aml::Memory32Fixed::new(true, d.base as u32, d.size as u32),
                &aml::Interrupt::new(true, true, false, false, d.irq),
            ],
        ));
    }
    aml::Scope::raw("_SB_".into(), children)
}

/// The DSDT.
fn dsdt(devices: &[VirtioMmioEntry]) -> Vec<u8> {
    let mut table = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        *b"TBXDSDT ",
        OEM_REVISION,
    );
    table.append_slice(&dsdt_body(devices));
    table.as_slice().to_vec()
}

/// The FADT of a hardware-reduced platform, pointing at the DSDT.
fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut builder = fadt::FADTBuilder::new(OEM_ID, *b"TBXFACP ", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(fadt::Flags::HwReducedAcpi)
        .flag(fadt::Flags::PwrButton)
        .flag(fadt::Flags::SlpButton);
    builder.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT
        | IAPC_MSI_NOT_SUPPORTED
        | IAPC_PCIE_ASPM_CONTROLS
        | IAPC_CMOS_RTC_NOT_PRESENT)
        .into();
    builder.hypervisor_vendor_identity = u64::from_le_bytes(*b"TWINBOX ").into();
    bytes_of(&builder.finalize())
}

/// The MADT: `vcpus` local APICs (IDs 0..vcpus) and the IOAPIC with ID `vcpus`.
fn madt(vcpus: u8) -> Vec<u8> {
    let mut table = madt::MADT::new(
        OEM_ID,
        *b"TBXAPIC ",
        OEM_REVISION,
        madt::LocalInterruptController::Address(APIC_START as u32),
    );
    for id in 0..vcpus {
        table.add_structure(madt::ProcessorLocalApic::new(
            id,
            id,
            madt::EnabledStatus::Enabled,
        ));
    }
    table.add_structure(madt::IoApic::new(vcpus, IOAPIC_START as u32, 0));
    bytes_of(&table)
}

/// Every table, laid out from [`ACPI_TABLES_START`]: `(address, bytes)` pairs, the RSDP
/// first.
pub fn build(vcpus: u8, devices: &[VirtioMmioEntry]) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    let mut placed = Vec::new();
    let mut next = ACPI_TABLES_START;
    let mut place = |bytes: Vec<u8>| {
        let addr = next;
        // Tables start on 8-byte boundaries, as the XSDT's 64-bit pointers like them.
        next = (addr + bytes.len() as u64).next_multiple_of(8);
        placed.push((addr, bytes));
        addr
    };
    let dsdt_addr = place(dsdt(devices));
    let fadt_addr = place(fadt(dsdt_addr));
    let madt_addr = place(madt(vcpus));
    let mut xsdt = XSDT::new(OEM_ID, *b"TBXXSDT ", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(bytes_of(&xsdt));
    if next > ACPI_TABLES_END {
        return Err(AcpiError::TooBig {
            size: (next - ACPI_TABLES_START) as usize,
            limit: ACPI_TABLES_END,
        });
    }
    placed.insert(
        0,
        (ACPI_RSDP_START, bytes_of(&Rsdp::new(OEM_ID, xsdt_addr))),
    );
    Ok(placed)
}

/// Writes the tables for `vcpus` vCPUs and `devices` into guest memory.
pub fn write(
    memory: &GuestMemoryMmap,
    vcpus: u32,
    devices: &[VirtioMmioEntry],
) -> Result<(), AcpiError> {
    for (addr, bytes) in build(vcpus.min(255) as u8, devices)? {
        memory
            .write_slice(&bytes, GuestAddress(addr))
            .map_err(|source| AcpiError::Memory { addr, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    fn virtio(count: u32) -> Vec<VirtioMmioEntry> {
        (0..count)
            .map(|i| VirtioMmioEntry {
                size: 0x1000,
                base: 0xd000_0000 + u64::from(i) * 0x1000,
                irq: 5 + i,
            })
            .collect()
    }

    /// The tables by signature, following the pointers from the RSDP as a kernel does.
    fn walk(tables: &[(u64, Vec<u8>)]) -> std::collections::HashMap<String, Vec<u8>> {
        let at = |addr: u64| {
            tables
                .iter()
                .find(|(a, _)| *a == addr)
                .unwrap_or_else(|| panic!("no table at {addr:#x}"))
                .1
                .clone()
        };
        let rsdp = at(ACPI_RSDP_START);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP 1.0 checksum");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        let xsdt = at(u64_at(&rsdp, 24));
        let mut found = std::collections::HashMap::new();
        let entries = (u32_at(&xsdt, 4) as usize - 36) / 8;
        for i in 0..entries {
            let table = at(u64_at(&xsdt, 36 + 8 * i));
            if &table[..4] == b"FACP" {
                found.insert("DSDT".to_owned(), at(u64_at(&table, 140)));
            }
            found.insert(String::from_utf8_lossy(&table[..4]).into_owned(), table);
        }
        found.insert("XSDT".to_owned(), xsdt);
        for (name, table) in &found {
            assert_eq!(u32_at(table, 4) as usize, table.len(), "{name} length");
            assert_eq!(sum(table), 0, "{name} checksum");
        }
        found
    }

    #[test]
    fn rsdp_leads_to_every_table_with_valid_checksums() {
        let tables = build(2, &virtio(3)).unwrap();
        let found = walk(&tables);
        let mut names: Vec<_> = found.keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["APIC", "DSDT", "FACP", "XSDT"]);
        for (addr, bytes) in &tables {
            assert!(*addr >= ACPI_RSDP_START && addr + bytes.len() as u64 <= ACPI_TABLES_END);
        }
    }

    #[test]
    fn fadt_is_hardware_reduced_without_legacy_devices() {
        let found = walk(&build(1, &[]).unwrap());
        let fadt = &found["FACP"];
        assert_ne!(u32_at(fadt, 112) & (1 << 20), 0, "HW_REDUCED_ACPI");
        let iapc = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_eq!(iapc, 0b11_1100, "no VGA, MSI, ASPM, CMOS RTC; no 8042");
    }

    #[test]
    fn madt_lists_each_vcpu_and_the_ioapic_after_them() {
        let found = walk(&build(4, &[]).unwrap());
        let madt = &found["APIC"];
        assert_eq!(u32_at(madt, 36), 0xfee0_0000);
        let mut at = 44;
        let mut lapics = Vec::new();
        let mut ioapics = Vec::new();
        while at < madt.len() {
            let (kind, len) = (madt[at], madt[at + 1] as usize);
            match kind {
                0 => lapics.push((madt[at + 2], madt[at + 3], u32_at(madt, at + 4))),
                1 => ioapics.push((madt[at + 2], u32_at(madt, at + 4), u32_at(madt, at + 8))),
                other => panic!("unexpected MADT structure type {other}"),
            }
            at += len;
        }
        assert_eq!(lapics, [(0, 0, 1), (1, 1, 1), (2, 2, 1), (3, 3, 1)]);
        assert_eq!(ioapics, [(4, 0xfec0_0000, 0)]);
    }

    #[test]
    fn dsdt_describes_com1_and_every_virtio_device() {
        let found = walk(&build(1, &virtio(3)).unwrap());
        let dsdt = &found["DSDT"];
        let count = |needle: &[u8]| dsdt.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(count(b"LNRO0005"), 3);
        for i in 0..3u32 {
            assert_eq!(count(format!("VR{i:02X}").as_bytes()), 1);
            // Memory32Fixed: tag 0x86, length 9, read-write, base, size.
            let mut window = vec![0x86, 9, 0, 1];
            window.extend_from_slice(&(0xd000_0000 + i * 0x1000).to_le_bytes());
            window.extend_from_slice(&0x1000u32.to_le_bytes());
            assert_eq!(count(&window), 1, "window of device {i}");
            // Extended interrupt: tag 0x89, length 6, consumer + edge, one GSI.
            let mut irq = vec![0x89, 6, 0, 0b11, 1];
            irq.extend_from_slice(&(5 + i).to_le_bytes());
            assert_eq!(count(&irq), 1, "interrupt of device {i}");
        }
        assert_eq!(count(b"COM1"), 1);
        assert_eq!(
            count(&[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]),
            1,
            "COM1's 8 ports"
        );
    }

    #[test]
    fn the_largest_machine_fits() {
        let tables = build(255, &virtio(19)).unwrap();
        walk(&tables);
    }
}
