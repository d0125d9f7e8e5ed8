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
use vm_memory::{Address, Bytes, GuestAddress};

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
    let mut data = Vec::with_capacity(size as usize);
    file.read_to_end(&mut data).map_err(err)?;
    memory
        .write_slice(&data, GuestAddress(addr))
        .map_err(|source| BootError::Write { addr, source })?;
    Ok(InitrdPlacement { addr, size })
}
