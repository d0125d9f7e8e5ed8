//! One virtio-blk request: checking a descriptor chain from a possibly hostile driver,
//! and doing the I/O between the disk file and guest memory.
//!
//! Chain layout accepted (what Linux and every other driver produce):
//! `[header: readable, ≥16 bytes] [data: 0..n descriptors] [status: writable, ≥1 byte]`.
//! Every check happens before any I/O: descriptor directions, every data buffer inside
//! guest memory, the total length a whole number of sectors and inside the disk
//! (`sector * 512` overflow included). The descriptor iterator of virtio-queue stops a
//! chain after queue-size descriptors (loops) and at 4 GiB total (huge lengths).
//!
//! Outcome: a valid request completes with OK; a bad request with a usable status
//! descriptor completes with IOERR (UNSUPP for unknown types); a chain without a usable
//! status descriptor is returned as used with length 0 and nothing written.

use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{ID_BYTES, SECTOR_SIZE};

/// Size of the request header (type u32, reserved u32, sector u64).
const HEADER_LEN: u32 = 16;
/// Bounce buffer size for copies between the file and guest memory.
const BOUNCE_LEN: usize = 128 << 10;

/// The backing store of a block device.
pub struct Disk {
    /// The image.
    pub file: File,
    /// Its size in bytes, fixed at creation (a multiple of 512).
    pub size: u64,
    /// Writes are refused.
    pub read_only: bool,
    /// The GET_ID answer, NUL-padded.
    pub id: [u8; ID_BYTES],
    /// Bounce buffer between the file and guest memory, kept across requests (grows up
    /// to [`BOUNCE_LEN`]) so a request costs no allocation.
    pub(super) bounce: RefCell<Vec<u8>>,
}

/// Why a request failed (logged; the guest sees IOERR or UNSUPP).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The first descriptor is write-only or shorter than the header.
    #[error("bad header descriptor (len {len}, write-only {write_only})")]
    BadHeader {
        /// Its length.
        len: u32,
        /// Its direction.
        write_only: bool,
    },
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// A data descriptor goes the wrong way for the request type.
    #[error("data descriptor {index} has the wrong direction for request type {kind}")]
    WrongDirection {
        /// Position in the chain (header = 0).
        index: usize,
        /// Request type.
        kind: u32,
    },
    /// The data length is not a whole number of sectors.
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    /// The request reaches past the end of the disk (or overflows computing it).
    #[error("sector {sector} + {len} bytes is beyond the disk ({disk_size} bytes)")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Data length.
        len: u64,
        /// Disk size.
        disk_size: u64,
    },
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// GET_ID without a writable buffer.
    #[error("GET_ID without a writable buffer")]
    NoIdBuffer,
    /// The host file or guest memory access failed.
    #[error("I/O at disk offset {offset}: {source}")]
    Io {
        /// Byte offset in the disk.
        offset: u64,
        /// The failure.
        source: std::io::Error,
    },
    /// Guest memory access failed (after checks: memory changed under us?).
    #[error("guest memory access at {addr:#x}: {source}")]
    Memory {
        /// Guest address.
        addr: u64,
        /// The failure.
        source: vm_memory::GuestMemoryError,
    },
    /// A request type this device does not implement.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl RequestError {
    /// The status byte the guest gets.
    pub fn status(&self) -> u8 {
        match self {
            Self::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// Executes the request in `chain`; returns the used length (bytes written to the guest,
/// status byte included; 0 if the chain had no usable status descriptor).
pub fn handle_chain(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> u32 {
    let head = chain.head_index();
    // Bounded: at most queue-size descriptors (virtio-queue's ttl), ≤ 4 GiB in total.
    let descs: Vec<Descriptor> = chain.collect();
    let status_addr = match descs.split_last() {
        Some((last, rest))
            if !rest.is_empty()
                && last.is_write_only()
                && last.len() >= 1
                && mem.check_range(last.addr(), 1) =>
        {
            last.addr()
        }
        _ => {
            tracing::warn!("virtio-blk: chain {head} has no usable status descriptor; dropped");
            return 0;
        }
    };
    let (status, written) = match execute(disk, mem, &descs[..descs.len() - 1]) {
        Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
        Err(e) => {
            tracing::warn!("virtio-blk: request in chain {head} failed: {e}");
            (e.status(), 0)
        }
    };
    match mem.write_obj(status, status_addr) {
        Ok(()) => written.saturating_add(1),
        Err(e) => {
            tracing::warn!("virtio-blk: cannot write status of chain {head}: {e}");
            0
        }
    }
}

/// Checks and runs the request made of `descs` (header + data, status excluded);
/// returns how many bytes were written into guest memory.
fn execute(disk: &Disk, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Result<u32, RequestError> {
    let Some((header, data)) = descs.split_first() else {
        // handle_chain only calls with the header present; be safe anyway.
        return Err(RequestError::BadHeader {
            len: 0,
            write_only: false,
        });
    };
    if header.is_write_only() || header.len() < HEADER_LEN {
        return Err(RequestError::BadHeader {
            len: header.len(),
            write_only: header.is_write_only(),
        });
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut raw, header.addr())
        .map_err(|source| RequestError::Memory {
            addr: header.addr().0,
            source,
        })?;
    let kind = u32::from_le_bytes(raw[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes"));

    match kind {
        VIRTIO_BLK_T_IN => {
            let (offset, _) = check_data(disk, mem, data, true, kind, sector)?;
            read_into_guest(disk, mem, data, offset)
        }
        VIRTIO_BLK_T_OUT => {
            if disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            let (offset, _) = check_data(disk, mem, data, false, kind, sector)?;
            write_from_guest(disk, mem, data, offset)?;
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            // Flush carries no data; any descriptors are ignored.
            disk.file
                .sync_data()
                .map_err(|source| RequestError::Io { offset: 0, source })?;
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let buf = data
                .first()
                .filter(|d| d.is_write_only())
                .ok_or(RequestError::NoIdBuffer)?;
            let n = (buf.len() as usize).min(ID_BYTES);
            check_in_memory(mem, buf)?;
            mem.write_slice(&disk.id[..n], buf.addr())
                .map_err(|source| RequestError::Memory {
                    addr: buf.addr().0,
                    source,
                })?;
            Ok(n as u32)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

fn check_in_memory(mem: &GuestMemoryMmap, desc: &Descriptor) -> Result<(), RequestError> {
    // A zero-length buffer touches nothing; check_range would refuse it at odd addresses.
    if desc.len() == 0 || mem.check_range(desc.addr(), desc.len() as usize) {
        Ok(())
    } else {
        Err(RequestError::OutsideMemory {
            addr: desc.addr().0,
            len: desc.len(),
        })
    }
}

/// Checks directions, memory and range of the data buffers; returns the disk byte offset
/// and the total length.
fn check_data(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    data: &[Descriptor],
    write_only: bool,
    kind: u32,
    sector: u64,
) -> Result<(u64, u64), RequestError> {
    let mut total = 0u64;
    for (i, desc) in data.iter().enumerate() {
        if desc.is_write_only() != write_only {
            return Err(RequestError::WrongDirection { index: i + 1, kind });
        }
        check_in_memory(mem, desc)?;
        total += u64::from(desc.len()); // ≤ queue size × 4 GiB: no overflow
    }
    if !total.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::UnalignedLength(total));
    }
    let out_of_range = || RequestError::OutOfRange {
        sector,
        len: total,
        disk_size: disk.size,
    };
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(out_of_range)?;
    match offset.checked_add(total) {
        Some(end) if end <= disk.size => Ok((offset, total)),
        _ => Err(out_of_range()),
    }
}

/// Bounce buffer size for `data`: its largest buffer, capped at [`BOUNCE_LEN`].
fn bounce_len(data: &[Descriptor]) -> usize {
    data.iter()
        .map(|d| d.len() as usize)
        .max()
        .unwrap_or(0)
        .min(BOUNCE_LEN)
}

/// IN: file → guest, through a bounce buffer.
fn read_into_guest(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    data: &[Descriptor],
    mut offset: u64,
) -> Result<u32, RequestError> {
    let chunk = bounce_len(data);
    let mut bounce = disk.bounce.borrow_mut();
    if bounce.len() < chunk {
        bounce.resize(chunk, 0);
    }
    let mut written = 0u32;
    for desc in data {
        let mut done = 0usize;
        let len = desc.len() as usize;
        while done < len {
            let n = (len - done).min(chunk);
            disk.file
                .read_exact_at(&mut bounce[..n], offset)
                .map_err(|source| RequestError::Io { offset, source })?;
            let addr = GuestAddress(desc.addr().0 + done as u64);
            mem.write_slice(&bounce[..n], addr)
                .map_err(|source| RequestError::Memory {
                    addr: addr.0,
                    source,
                })?;
            done += n;
            offset += n as u64;
            written = written.saturating_add(n as u32);
        }
    }
    Ok(written)
}

/// OUT: guest → file, through a bounce buffer.
fn write_from_guest(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    data: &[Descriptor],
    mut offset: u64,
) -> Result<(), RequestError> {
    let chunk = bounce_len(data);
    let mut bounce = disk.bounce.borrow_mut();
    if bounce.len() < chunk {
        bounce.resize(chunk, 0);
    }
    for desc in data {
        let mut done = 0usize;
        let len = desc.len() as usize;
        while done < len {
            let n = (len - done).min(chunk);
            let addr = GuestAddress(desc.addr().0 + done as u64);
            mem.read_slice(&mut bounce[..n], addr)
                .map_err(|source| RequestError::Memory {
                    addr: addr.0,
                    source,
                })?;
            disk.file
                .write_all_at(&bounce[..n], offset)
                .map_err(|source| RequestError::Io { offset, source })?;
            done += n;
            offset += n as u64;
        }
    }
    Ok(())
}
