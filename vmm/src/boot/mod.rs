//! Putting a Linux kernel into guest memory: the image (ELF vmlinux or bzImage), the
//! command line, the initrd, and the boot information of the entry protocol it uses
//! (PVH `hvm_start_info` or the 64-bit protocol's zero page), each with its e820 map.

pub mod cmdline;
pub mod params;

use crate::layout::{HIMEM_START, MMIO_GAP_START};
use crate::memory::GuestMemoryMmap;
use crate::regs::EntryMode;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, KernelLoader};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use thiserror::Error;
use vm_memory::volatile_memory::Error as VolatileError;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, ReadVolatile};

/// Why the kernel, initrd or boot information could not be loaded.
#[derive(Debug, Error)]
pub enum BootError {
    #[error("kernel {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {path}: neither an ELF vmlinux nor a bzImage (first bytes {magic:02x?})")]
    UnknownFormat { path: PathBuf, magic: Vec<u8> },
    #[error("kernel {path}: cannot load it: {source}")]
    Load {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("initrd {path}: {source}")]
    Initrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {path}: {size} bytes do not fit in guest memory below {limit:#x}")]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error(transparent)]
    Cmdline(#[from] cmdline::CmdlineError),
    #[error("cannot write boot information at {addr:#x}: {source}")]
    Write {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

/// The kernel image formats we boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// Uncompressed ELF (vmlinux).
    Elf,
    /// Compressed bzImage.
    BzImage,
}

/// Where and how the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug)]
pub struct KernelEntry {
    /// Entry protocol.
    pub mode: EntryMode,
    /// Entry address.
    pub rip: u64,
    /// `setup_header` of a bzImage (copied into the zero page).
    pub setup_header: Option<setup_header>,
}

/// An initrd placed in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Recognises the format from the first bytes: ELF magic, or "HdrS" at 0x202 of a bzImage.
pub fn detect_format(path: &Path) -> Result<KernelFormat, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::Open {
        path: path.into(),
        source,
    })?;
    let mut head = vec![0u8; 0x206];
    let n = read_up_to(&mut file, &mut head).map_err(|source| BootError::Open {
        path: path.into(),
        source,
    })?;
    head.truncate(n);
    if head.starts_with(b"\x7fELF") {
        Ok(KernelFormat::Elf)
    } else if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        Ok(KernelFormat::BzImage)
    } else {
        Err(BootError::UnknownFormat {
            path: path.into(),
            magic: head.into_iter().take(4).collect(),
        })
    }
}

/// Whether the kernel at `path` is Linux: any bzImage, or an ELF vmlinux with a note owned
/// by "Linux" (every vmlinux since 4.17 carries its build-salt note). Decides whether a run
/// without `--initrd` gets twinbox's initramfs: another kernel (the bench's tiny guest, a
/// unikernel) boots with none, as under any other VMM. An ELF that cannot be read as
/// ELF64 counts as not Linux (loading it reports what is wrong).
pub fn is_linux(path: &Path) -> Result<bool, BootError> {
    if detect_format(path)? == KernelFormat::BzImage {
        return Ok(true);
    }
    let file = File::open(path).map_err(|source| BootError::Open {
        path: path.into(),
        source,
    })?;
    Ok(elf_has_linux_note(&file))
}

/// Reads the program headers of an ELF64 file and looks for a "Linux" note in its
/// PT_NOTE segments; anything malformed is "no".
fn elf_has_linux_note(file: &File) -> bool {
    use std::os::unix::fs::FileExt;
    /// ELF64 header fields and program header layout (the ELF specification).
    const EI_CLASS: usize = 4;
    const ELFCLASS64: u8 = 2;
    const E_PHOFF: usize = 0x20;
    const E_PHENTSIZE: usize = 0x36;
    const E_PHNUM: usize = 0x38;
    const PHDR_LEN: usize = 56;
    const PT_NOTE: u32 = 4;
    /// Notes are small; a larger segment is not a kernel's.
    const MAX_NOTES_LEN: u64 = 64 * 1024;
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());

    let mut header = [0u8; 64];
    if file.read_exact_at(&mut header, 0).is_err() || header[EI_CLASS] != ELFCLASS64 {
        return false;
    }
    let phoff = u64_at(&header, E_PHOFF);
    let phentsize = usize::from(u16_at(&header, E_PHENTSIZE));
    let phnum = usize::from(u16_at(&header, E_PHNUM));
    if phentsize < PHDR_LEN {
        return false;
    }
    let mut phdrs = vec![0u8; phentsize * phnum];
    if file.read_exact_at(&mut phdrs, phoff).is_err() {
        return false;
    }
    phdrs.chunks_exact(phentsize).any(|phdr| {
        if u32_at(phdr, 0) != PT_NOTE {
            return false;
        }
        let (offset, size) = (u64_at(phdr, 8), u64_at(phdr, 0x20));
        let mut notes = vec![0u8; size.min(MAX_NOTES_LEN) as usize];
        file.read_exact_at(&mut notes, offset).is_ok() && notes_name(&notes, b"Linux\0")
    })
}

/// Whether a note in `notes` (namesz, descsz, type, name and desc each padded to 4 bytes)
/// is owned by `name` (with its NUL).
fn notes_name(mut notes: &[u8], name: &[u8]) -> bool {
    let pad = |n: usize| n.div_ceil(4) * 4;
    while notes.len() >= 12 {
        let word = |at: usize| u32::from_le_bytes(notes[at..at + 4].try_into().unwrap()) as usize;
        let (namesz, descsz) = (word(0), word(4));
        let name_end = 12usize.saturating_add(namesz);
        if notes.get(12..name_end) == Some(name) {
            return true;
        }
        let next = 12usize
            .saturating_add(pad(namesz))
            .saturating_add(pad(descsz));
        if next > notes.len() {
            return false;
        }
        notes = &notes[next..];
    }
    false
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Loads the kernel at `path` and picks the entry protocol: PVH when a vmlinux carries the
/// PVH note (32-bit entry, no page tables needed), else the 64-bit boot protocol.
pub fn load_kernel(memory: &GuestMemoryMmap, path: &Path) -> Result<KernelEntry, BootError> {
    let format = detect_format(path)?;
    let mut file = File::open(path).map_err(|source| BootError::Open {
        path: path.into(),
        source,
    })?;
    let load_err = |source| BootError::Load {
        path: path.into(),
        source,
    };
    match format {
        KernelFormat::Elf => {
            let result = Elf::load(memory, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let (mode, rip) = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => (EntryMode::Pvh, addr.raw_value()),
                _ => (EntryMode::Linux64, result.kernel_load.raw_value()),
            };
            Ok(KernelEntry {
                mode,
                rip,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let result = BzImage::load(memory, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            Ok(KernelEntry {
                mode: EntryMode::Linux64,
                rip: result.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
                setup_header: result.setup_header,
            })
        }
    }
}

/// Copies the initrd, page aligned, to the top of RAM below the MMIO gap (the kernel reads
/// it after building its own page tables, so the boot identity map need not cover it).
pub fn load_initrd(memory: &GuestMemoryMmap, path: &Path) -> Result<InitrdPlacement, BootError> {
    let err = |source| BootError::Initrd {
        path: path.into(),
        source,
    };
    let mut file = File::open(path).map_err(err)?;
    let size = file.seek(SeekFrom::End(0)).map_err(err)?;
    file.seek(SeekFrom::Start(0)).map_err(err)?;
    let top = crate::memory::end_below_gap(memory).min(MMIO_GAP_START);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= HIMEM_START)
        .ok_or(BootError::InitrdTooBig {
            path: path.into(),
            size,
            limit: top,
        })?;
    // Read straight into guest memory: no heap copy of the whole file on the way (in the
    // lab ~10 ms of a boot for twinbox's 1.4 MiB initramfs).
    let mut guest = memory
        .get_slice(GuestAddress(addr), size as usize)
        .map_err(|source| BootError::Write { addr, source })?;
    file.read_exact_volatile(&mut guest).map_err(|e| match e {
        VolatileError::IOError(source) => err(source),
        _ => err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the file shrank while it was read",
        )),
    })?;
    Ok(InitrdPlacement { addr, size })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ELF64 file whose one PT_NOTE segment holds `notes`.
    fn elf_with_notes(notes: &[(&[u8], u32, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (name, kind, desc) in notes {
            body.extend((name.len() as u32).to_le_bytes());
            body.extend((desc.len() as u32).to_le_bytes());
            body.extend(kind.to_le_bytes());
            body.extend(*name);
            body.resize(body.len().div_ceil(4) * 4, 0);
            body.extend(*desc);
            body.resize(body.len().div_ceil(4) * 4, 0);
        }
        let mut f = vec![0u8; 64 + 56];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // ELFCLASS64
        f[5] = 1; // little-endian
        f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        f[64..68].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        f[64 + 8..64 + 16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        f[64 + 0x20..64 + 0x28].copy_from_slice(&(body.len() as u64).to_le_bytes()); // p_filesz
        f.extend(body);
        f
    }

    fn is_linux_bytes(bytes: &[u8]) -> bool {
        let path = std::env::temp_dir().join(format!(
            "twinbox-is-linux-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, bytes).unwrap();
        let linux = is_linux(&path);
        std::fs::remove_file(&path).unwrap();
        linux.unwrap()
    }

    #[test]
    fn a_vmlinux_is_known_by_its_linux_note_and_a_bzimage_by_its_header() {
        // Like Linux 6.1's vmlinux: build id, the two "Linux" notes, the Xen PVH entry.
        let vmlinux = elf_with_notes(&[
            (b"GNU\0", 3, &[0xab; 20]),
            (b"Linux\0", 0x100, &[0; 4]),
            (b"Linux\0", 0x101, &[0]),
            (b"Xen\0", 18, &[0; 8]),
        ]);
        assert!(is_linux_bytes(&vmlinux));
        // The bench's tiny guest: a PVH entry note and nothing else.
        assert!(!is_linux_bytes(&elf_with_notes(&[(b"Xen\0", 18, &[0; 4])])));
        assert!(!is_linux_bytes(&elf_with_notes(&[(b"Linuxish\0", 1, &[])])));
        let mut bzimage = vec![0u8; 0x1000];
        bzimage[0x202..0x206].copy_from_slice(b"HdrS");
        assert!(is_linux_bytes(&bzimage));
    }

    #[test]
    fn a_malformed_elf_is_not_linux_and_never_panics() {
        let good = elf_with_notes(&[(b"Linux\0", 0x100, &[0; 4])]);
        for cut in [5, 64, 100, 130, good.len() - 1] {
            assert!(!is_linux_bytes(&good[..cut]), "cut at {cut}");
        }
        let mut huge_name = good.clone();
        huge_name[120..124].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(!is_linux_bytes(&huge_name));
        let mut far_phdrs = good.clone();
        far_phdrs[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(!is_linux_bytes(&far_phdrs));
        let mut elf32 = good;
        elf32[4] = 1;
        assert!(!is_linux_bytes(&elf32));
    }

    #[test]
    fn an_initrd_lands_whole_and_page_aligned_at_the_top_of_ram() {
        let memory = crate::memory::create(16).unwrap();
        let bytes: Vec<u8> = (0..300_001u32).map(|i| (i % 251) as u8).collect();
        let path = std::env::temp_dir().join(format!("twinbox-initrd-{}", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let placed = load_initrd(&memory, &path);
        std::fs::remove_file(&path).unwrap();
        let placed = placed.unwrap();
        assert_eq!(placed.size, bytes.len() as u64);
        assert_eq!(placed.addr % 0x1000, 0);
        assert!(placed.addr + placed.size <= 16 << 20);
        assert!((16 << 20) - (placed.addr + placed.size) < 0x1000);
        let mut back = vec![0u8; bytes.len()];
        vm_memory::Bytes::read_slice(&memory, &mut back, GuestAddress(placed.addr)).unwrap();
        assert!(back == bytes, "the guest holds other bytes than the file");
    }
}
