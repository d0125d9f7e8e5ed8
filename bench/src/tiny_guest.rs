//! A minimal guest "kernel" for measuring a VMM free of guest-kernel time.
//!
//! It is an ELF64 file that Linux-style loaders boot through the PVH entry (the Xen ELF
//! note `XEN_ELFNOTE_PHYS32_ENTRY`): the vCPU starts in 32-bit protected mode, flat
//! segments, paging off, at the address in the note. Its code reports "workload exited
//! with status 0" on twinbox's marker port, then ends the machine twice over, because the
//! VMMs it is compared in end a VM in different ways:
//!
//! 1. an ACPI S5 power-off written to I/O port [`ACPI_SHUTDOWN_PORT`] (0x600): Cloud
//!    Hypervisor's shutdown device on x86 sits there and exits on
//!    `SLP_TYP = 5, SLP_EN` (byte `5 << 2 | 1 << 5` = 0x34, one-byte write only). Cloud
//!    Hypervisor must get this first: it answers an i8042 reset by *rebooting* the VM,
//!    which would rerun the guest forever;
//! 2. a reset through the i8042 (port 0x64, command 0xFE), which twinbox's VMM, QEMU
//!    `microvm` (with `-no-reboot` and an i8042 added) and Firecracker turn into the end
//!    of the run. Those three have no device at 0x600, so the write before it is ignored.
//!
//! So the whole run is: VMM start-up, one guest instruction stream of nine instructions,
//! teardown — on PVM too, since the guest does nearly nothing at CPL0. The file is 232
//! bytes.
//!
//! File layout (all little-endian; the file is loaded as one segment at [`LOAD_ADDR`]):
//!
//! | offset | size | what |
//! |---|---|---|
//! | 0x00 | 64 | ELF64 header, `e_entry` = `LOAD_ADDR + CODE_OFFSET` |
//! | 0x40 | 56 | program header 0: `PT_LOAD`, the whole file at `LOAD_ADDR` (RWX) |
//! | 0x78 | 56 | program header 1: `PT_NOTE`, the note below |
//! | 0xb0 | 20 | note: namesz 4, descsz 4, type 18, name `"Xen\0"`, desc = entry (u32) |
//! | 0xd0 | 24 | code |
//!
//! Code (32-bit):
//!
//! ```text
//! b8 <imm32>      mov  eax, Marker::WorkloadExited(Exited(0)).encode()
//! 66 ba 20 01     mov  dx, 0x0120          ; MARKER_PORT
//! ef              out  dx, eax
//! 66 ba 00 06     mov  dx, 0x0600          ; ACPI_SHUTDOWN_PORT
//! b0 34           mov  al, 0x34            ; SLP_TYP = S5 (5 << 2) | SLP_EN (1 << 5)
//! ee              out  dx, al
//! b0 fe           mov  al, 0xfe            ; i8042 "pulse reset line"
//! e6 64           out  0x64, al
//! f4              hlt                      ; not reached when either end is honoured
//! eb fd           jmp  hlt
//! ```

use std::path::Path;
use twinbox_spec::proto::{ExitCode, Marker, MARKER_PORT};

/// Guest-physical address the file is loaded at (1 MiB, where loaders put kernels).
pub const LOAD_ADDR: u64 = 0x10_0000;
/// File offset of the program headers.
pub const PHDR_OFFSET: usize = 0x40;
/// File offset of the PVH note.
pub const NOTE_OFFSET: usize = 0xb0;
/// File offset of the code.
pub const CODE_OFFSET: usize = 0xd0;
/// ELF note type of the PVH 32-bit entry point.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// I/O port of Cloud Hypervisor's x86 ACPI shutdown device (its FADT sleep control
/// register).
pub const ACPI_SHUTDOWN_PORT: u16 = 0x600;
/// ACPI sleep control value for "enter S5" (soft off): `SLP_TYP` = 5 in bits 2..4,
/// `SLP_EN` = bit 5.
pub const ACPI_S5_SLEEP: u8 = (5 << 2) | (1 << 5);

const EHDR_SIZE: u16 = 64;
const PHDR_SIZE: u16 = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const EM_X86_64: u16 = 62;
const NOTE_SIZE: usize = 12 + 4 + 4;

/// The guest's machine code (see the module docs).
pub fn code() -> Vec<u8> {
    let marker = Marker::WorkloadExited(ExitCode::Exited(0)).encode();
    let mut code = vec![0xb8];
    code.extend_from_slice(&marker.to_le_bytes());
    code.extend_from_slice(&[0x66, 0xba]);
    code.extend_from_slice(&MARKER_PORT.to_le_bytes());
    code.push(0xef);
    code.extend_from_slice(&[0x66, 0xba]);
    code.extend_from_slice(&ACPI_SHUTDOWN_PORT.to_le_bytes());
    code.extend_from_slice(&[0xb0, ACPI_S5_SLEEP, 0xee]);
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]);
    code
}

/// The guest-physical entry address.
pub fn entry() -> u64 {
    LOAD_ADDR + CODE_OFFSET as u64
}

/// The whole ELF file.
pub fn elf() -> Vec<u8> {
    let code = code();
    let size = CODE_OFFSET + code.len();
    let mut f = vec![0u8; size];
    // ELF header.
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // ELFCLASS64
    f[5] = 1; // ELFDATA2LSB
    f[6] = 1; // EV_CURRENT
    put16(&mut f, 16, 2); // ET_EXEC
    put16(&mut f, 18, EM_X86_64);
    put32(&mut f, 20, 1); // e_version
    put64(&mut f, 24, entry());
    put64(&mut f, 32, PHDR_OFFSET as u64); // e_phoff
    put64(&mut f, 40, 0); // e_shoff: no sections
    put32(&mut f, 48, 0); // e_flags
    put16(&mut f, 52, EHDR_SIZE);
    put16(&mut f, 54, PHDR_SIZE);
    put16(&mut f, 56, 2); // e_phnum
    put16(&mut f, 58, 64); // e_shentsize
    put16(&mut f, 60, 0); // e_shnum
    put16(&mut f, 62, 0); // e_shstrndx
                          // PT_LOAD: the whole file.
    phdr(
        &mut f,
        PHDR_OFFSET,
        PT_LOAD,
        7,
        0,
        LOAD_ADDR,
        size as u64,
        0x1000,
    );
    // PT_NOTE: the PVH entry note.
    phdr(
        &mut f,
        PHDR_OFFSET + PHDR_SIZE as usize,
        PT_NOTE,
        4,
        NOTE_OFFSET as u64,
        LOAD_ADDR + NOTE_OFFSET as u64,
        NOTE_SIZE as u64,
        4,
    );
    put32(&mut f, NOTE_OFFSET, 4); // namesz
    put32(&mut f, NOTE_OFFSET + 4, 4); // descsz
    put32(&mut f, NOTE_OFFSET + 8, XEN_ELFNOTE_PHYS32_ENTRY);
    f[NOTE_OFFSET + 12..NOTE_OFFSET + 16].copy_from_slice(b"Xen\0");
    put32(&mut f, NOTE_OFFSET + 16, entry() as u32);
    f[CODE_OFFSET..].copy_from_slice(&code);
    f
}

/// Writes the ELF to `path`.
pub fn write_to(path: &Path) -> std::io::Result<()> {
    std::fs::write(path, elf())
}

#[allow(clippy::too_many_arguments)]
fn phdr(
    f: &mut [u8],
    at: usize,
    kind: u32,
    flags: u32,
    offset: u64,
    addr: u64,
    size: u64,
    align: u64,
) {
    put32(f, at, kind);
    put32(f, at + 4, flags);
    put64(f, at + 8, offset);
    put64(f, at + 16, addr); // p_vaddr
    put64(f, at + 24, addr); // p_paddr
    put64(f, at + 32, size); // p_filesz
    put64(f, at + 40, size); // p_memsz
    put64(f, at + 48, align);
}

fn put16(f: &mut [u8], at: usize, v: u16) {
    f[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(f: &mut [u8], at: usize, v: u32) {
    f[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(f: &mut [u8], at: usize, v: u64) {
    f[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(f: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(f[at..at + 2].try_into().unwrap())
    }
    fn u32_at(f: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(f[at..at + 4].try_into().unwrap())
    }
    fn u64_at(f: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(f[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn header_is_a_64_bit_x86_executable() {
        let f = elf();
        assert_eq!(&f[0..4], b"\x7fELF");
        assert_eq!((f[4], f[5], f[6]), (2, 1, 1));
        assert_eq!(u16_at(&f, 16), 2);
        assert_eq!(u16_at(&f, 18), 62);
        assert_eq!(u64_at(&f, 24), LOAD_ADDR + 0xd0);
        assert_eq!(u64_at(&f, 32), 0x40);
        assert_eq!(
            (u16_at(&f, 52), u16_at(&f, 54), u16_at(&f, 56)),
            (64, 56, 2)
        );
    }

    #[test]
    fn program_headers_load_the_file_and_point_at_the_note() {
        let f = elf();
        let load = PHDR_OFFSET;
        assert_eq!(u32_at(&f, load), 1);
        assert_eq!(u64_at(&f, load + 8), 0);
        assert_eq!(u64_at(&f, load + 24), LOAD_ADDR);
        assert_eq!(u64_at(&f, load + 32), f.len() as u64);
        let note = PHDR_OFFSET + 56;
        assert_eq!(u32_at(&f, note), 4);
        assert_eq!(u64_at(&f, note + 8), NOTE_OFFSET as u64);
        assert_eq!(u64_at(&f, note + 32), 20);
        // The note lies inside the file and ends before the code.
        const { assert!(NOTE_OFFSET + NOTE_SIZE <= CODE_OFFSET) };
        assert!(NOTE_OFFSET + NOTE_SIZE <= f.len());
    }

    #[test]
    fn note_carries_the_pvh_entry() {
        let f = elf();
        assert_eq!(u32_at(&f, NOTE_OFFSET), 4);
        assert_eq!(u32_at(&f, NOTE_OFFSET + 4), 4);
        assert_eq!(u32_at(&f, NOTE_OFFSET + 8), 18);
        assert_eq!(&f[NOTE_OFFSET + 12..NOTE_OFFSET + 16], b"Xen\0");
        assert_eq!(u64::from(u32_at(&f, NOTE_OFFSET + 16)), entry());
    }

    #[test]
    fn size_matches_the_scenario_description() {
        assert_eq!(elf().len(), 232);
        use crate::scenario::Scenario;
        assert!(crate::scenario::Vmm.description().contains("232-byte"));
    }

    #[test]
    fn code_reports_exit_zero_then_powers_off_then_resets() {
        let f = elf();
        let c = &f[CODE_OFFSET..];
        assert_eq!(c[0], 0xb8);
        let marker = u32_at(c, 1);
        assert_eq!(
            Marker::decode(marker),
            Ok(Marker::WorkloadExited(ExitCode::Exited(0)))
        );
        assert_eq!(&c[5..9], &[0x66, 0xba, 0x20, 0x01]);
        assert_eq!(c[9], 0xef);
        // out dx, al with dx = 0x600, al = 0x34: a one-byte write, the only size Cloud
        // Hypervisor's shutdown device accepts.
        assert_eq!(&c[10..17], &[0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee]);
        assert_eq!(ACPI_S5_SLEEP, 0x34);
        assert_eq!(&c[17..], &[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]);
        assert_eq!(c.len(), 24);
    }
}
