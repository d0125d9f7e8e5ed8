//! The guest physical memory map: every address the VMM puts something at, in one place.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)            0x0000_0520  IDT (empty)
//! 0x0000_6000  PVH hvm_start_info         0x0000_6040  PVH module list (initrd)
//! 0x0000_7000  zero page (boot_params) or PVH e820 memmap
//! 0x0000_8ff0  boot stack top             0x0000_9000  PML4, 0xa000 PDPT, 0xb000 PD
//! 0x0002_0000  kernel command line (2 KiB)
//! 0x0009_fc00  MP table (the "EBDA" area the kernel scans)
//! 0x000a_0000  legacy VGA/BIOS hole up to 1 MiB (reported reserved)
//! 0x000e_0000  ACPI RSDP (in the BIOS area the kernel scans), tables from 0xe_0040
//! 0x0010_0000  kernel (HIMEM_START) ... RAM ... up to MMIO_GAP_START
//! 0xc000_0000  32-bit MMIO gap: virtio-mmio devices, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above 4 GiB, if the guest has more than 3 GiB
//! ```

/// GDT location (x86 boot protocols only need a flat GDT somewhere in low memory).
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT location: empty, the kernel installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, handed to the kernel in %ebx.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (one entry: the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// Linux `boot_params` ("zero page"), handed to the kernel in %rsi.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// PVH memory map (`hvm_memmap_table_entry` array); the PVH path has no zero page.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table of the identity map (64-bit boot protocol).
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of the identity map (512 × 2 MiB = the first 1 GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line, including the NUL (the x86 kernel's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = twinbox_spec::guest_cmdline::MAX_LEN;
/// MP floating pointer + configuration table.
pub const MPTABLE_START: u64 = 0x9fc00;
/// ACPI Root System Description Pointer: the kernel scans 0xE0000–0xFFFFF for it.
pub const ACPI_RSDP_START: u64 = 0xe_0000;
/// First ACPI table (DSDT, then FADT, MADT, XSDT), right after the RSDP.
pub const ACPI_TABLES_START: u64 = 0xe_0040;
/// End of the ACPI tables' room (the top of the legacy BIOS area).
pub const ACPI_TABLES_END: u64 = 0x10_0000;
/// End of usable low RAM (start of the EBDA/VGA/BIOS hole).
pub const EBDA_START: u64 = 0x9fc00;
/// First address above the legacy hole; kernels load here.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap: RAM stops here and resumes at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Where RAM continues above the gap.
pub const RAM_ABOVE_GAP_START: u64 = MMIO_GAP_END;

/// First virtio-mmio device window (inside the MMIO gap).
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of each virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// GSI of the first virtio-mmio device; following devices take the next ones.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last usable GSI (the IOAPIC has 24 pins).
pub const IRQ_MAX: u32 = 23;

/// IOAPIC MMIO base (KVM's in-kernel IOAPIC lives here).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;

/// Legacy serial port COM1.
pub const SERIAL_PORT: u16 = 0x3f8;
/// I/O ports COM1 occupies.
pub const SERIAL_PORT_LEN: u64 = 8;
/// COM1's interrupt line.
pub const SERIAL_IRQ: u32 = 4;
/// i8042 keyboard controller (data port 0x60, command/status port 0x64).
pub const I8042_PORT: u16 = 0x60;
/// I/O ports the i8042 occupies.
pub const I8042_PORT_LEN: u64 = 5;
/// KVM's TSS (three pages) placed just below the IOAPIC, as other VMMs do.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
