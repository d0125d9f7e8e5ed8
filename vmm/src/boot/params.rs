//! Boot information for the kernel: the e820 memory map, and its two carriers — the zero
//! page (`boot_params`, 64-bit protocol) and `hvm_start_info` (PVH).

use super::{BootError, InitrdPlacement, KernelEntry};
use crate::layout::{
    CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_START, PVH_INFO_START, PVH_MEMMAP_START,
    PVH_MODLIST_START, RAM_ABOVE_GAP_START, ZERO_PAGE_START,
};
use crate::memory::GuestMemoryMmap;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{ByteValued, Bytes, GuestAddress};

/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;
/// `hvm_start_info.magic` ("xEn3" with the top bit set).
pub const PVH_MAGIC: u32 = 0x336e_c578;
/// Zero-page header magic "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;
/// Zero-page boot flag.
const BOOT_FLAG: u16 = 0xaa55;
/// `type_of_loader` for a loader without an assigned ID.
const LOADER_UNDEFINED: u8 = 0xff;
/// `loadflags.CAN_USE_HEAP`.
const CAN_USE_HEAP: u8 = 0x80;
/// Kernel alignment to claim for a vmlinux (CONFIG_PHYSICAL_ALIGN default).
const KERNEL_ALIGNMENT: u32 = 0x100_0000;

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map of a guest with `ram_size` bytes of RAM: low RAM up to the EBDA, the
/// legacy hole reserved, RAM from 1 MiB to the gap, the rest above 4 GiB.
pub fn e820_map(ram_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    let below = ram_size.min(MMIO_GAP_START);
    map.push(E820Entry {
        addr: HIMEM_START,
        size: below - HIMEM_START,
        kind: E820_RAM,
    });
    if ram_size > MMIO_GAP_START {
        map.push(E820Entry {
            addr: RAM_ABOVE_GAP_START,
            size: ram_size - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

fn write<T: ByteValued>(memory: &GuestMemoryMmap, addr: u64, value: T) -> Result<(), BootError> {
    memory
        .write_obj(value, GuestAddress(addr))
        .map_err(|source| BootError::Write { addr, source })
}

/// Writes the command line (NUL terminated) at `CMDLINE_START`.
pub fn write_cmdline(memory: &GuestMemoryMmap, line: &str) -> Result<(), BootError> {
    let mut bytes = line.as_bytes().to_vec();
    bytes.push(0);
    memory
        .write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|source| BootError::Write {
            addr: CMDLINE_START,
            source,
        })
}

/// Builds the zero page for the 64-bit protocol.
pub fn zero_page(
    entry: &KernelEntry,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    ram_size: u64,
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(header) = entry.setup_header {
        params.hdr = header;
    } else {
        params.hdr.boot_flag = BOOT_FLAG;
        params.hdr.header = HDRS_MAGIC;
        params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    }
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let map = e820_map(ram_size);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    params
}

/// Writes the boot information for `entry` and returns the pointer the boot vCPU gets.
pub fn write_boot_info(
    memory: &GuestMemoryMmap,
    entry: &KernelEntry,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    ram_size: u64,
) -> Result<u64, BootError> {
    match entry.mode {
        crate::regs::EntryMode::Linux64 => {
            write(
                memory,
                ZERO_PAGE_START,
                zero_page(entry, cmdline_len, initrd, ram_size),
            )?;
            Ok(ZERO_PAGE_START)
        }
        crate::regs::EntryMode::Pvh => {
            let map = e820_map(ram_size);
            for (i, e) in map.iter().enumerate() {
                let item = hvm_memmap_table_entry {
                    addr: e.addr,
                    size: e.size,
                    type_: e.kind,
                    reserved: 0,
                };
                write(
                    memory,
                    PVH_MEMMAP_START + (i * std::mem::size_of_val(&item)) as u64,
                    item,
                )?;
            }
            let mut info = hvm_start_info {
                magic: PVH_MAGIC,
                version: 1,
                cmdline_paddr: CMDLINE_START,
                memmap_paddr: PVH_MEMMAP_START,
                memmap_entries: map.len() as u32,
                ..Default::default()
            };
            if let Some(initrd) = initrd {
                let module = hvm_modlist_entry {
                    paddr: initrd.addr,
                    size: initrd.size,
                    ..Default::default()
                };
                write(memory, PVH_MODLIST_START, module)?;
                info.nr_modules = 1;
                info.modlist_paddr = PVH_MODLIST_START;
            }
            write(memory, PVH_INFO_START, info)?;
            Ok(PVH_INFO_START)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regs::EntryMode;

    #[test]
    fn e820_of_a_small_guest() {
        let map = e820_map(128 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: 1
            }
        );
        assert_eq!(map[1].kind, E820_RESERVED);
        assert_eq!(
            map[2],
            E820Entry {
                addr: 0x10_0000,
                size: (128 << 20) - 0x10_0000,
                kind: 1
            }
        );
    }

    #[test]
    fn e820_of_a_big_guest_resumes_above_4g() {
        let map = e820_map(6 << 30);
        assert_eq!(map[2].addr + map[2].size, 0xc000_0000);
        assert_eq!(
            map[3],
            E820Entry {
                addr: 1 << 32,
                size: 3 << 30,
                kind: 1
            }
        );
    }

    #[test]
    fn zero_page_points_at_cmdline_and_initrd() {
        let entry = KernelEntry {
            mode: EntryMode::Linux64,
            rip: 0x100_0000,
            setup_header: None,
        };
        let p = zero_page(
            &entry,
            100,
            Some(InitrdPlacement {
                addr: 0x700_0000,
                size: 4096,
            }),
            128 << 20,
        );
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.cmdline_size }, 100);
        assert_eq!({ p.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!(p.e820_entries, 3);
    }

    #[test]
    fn pvh_start_info_is_written_with_magic() {
        let memory = crate::memory::create(64).unwrap();
        let entry = KernelEntry {
            mode: EntryMode::Pvh,
            rip: 0x100_0000,
            setup_header: None,
        };
        let at = write_boot_info(&memory, &entry, 10, None, 64 << 20).unwrap();
        assert_eq!(at, PVH_INFO_START);
        let info: hvm_start_info = memory.read_obj(GuestAddress(at)).unwrap();
        assert_eq!(
            (info.magic, info.memmap_entries, info.cmdline_paddr),
            (PVH_MAGIC, 3, 0x20000)
        );
    }
}
