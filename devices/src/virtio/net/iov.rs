//! Guest buffers as host iovecs, so frames move between guest memory and the backend in
//! one `readv`/`writev` with no copy through a bounce buffer and no allocation.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Most iovecs in one read or write: two per descriptor of a full queue (a buffer may
/// straddle two adjacent memory regions), well under the kernel's IOV_MAX (1024).
pub(crate) const MAX_IOVS: usize = 2 * super::QUEUE_SIZE as usize;

/// One host-virtual range inside guest memory, laid out exactly as `struct iovec` so a
/// slice of them is passed to the kernel as is. Plain integers rather than a pointer, so
/// the device stays `Send`; built by [`push_guest_range`] from a mapping of the
/// `GuestMemoryMmap` that the device holds for as long as it holds these (plain mmap
/// regions: a Xen grant mapping would be unmapped when its guard drops), or by
/// [`IoBuf::host`] / [`IoBuf::host_mut`] for a buffer of the device's own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct IoBuf {
    base: usize,
    len: usize,
}

const _: () = {
    assert!(std::mem::size_of::<IoBuf>() == std::mem::size_of::<libc::iovec>());
    assert!(std::mem::align_of::<IoBuf>() == std::mem::align_of::<libc::iovec>());
    assert!(std::mem::offset_of!(IoBuf, base) == std::mem::offset_of!(libc::iovec, iov_base));
    assert!(std::mem::offset_of!(IoBuf, len) == std::mem::offset_of!(libc::iovec, iov_len));
};

impl IoBuf {
    /// An entry for a host buffer of the device's own that the kernel reads (the TX
    /// header copy); valid only while `buf` lives, so made right before the call.
    pub(crate) fn host(buf: &[u8]) -> Self {
        Self {
            base: buf.as_ptr() as usize,
            len: buf.len(),
        }
    }

    /// Likewise for a buffer the kernel writes (the RX spill byte).
    pub(crate) fn host_mut(buf: &mut [u8]) -> Self {
        Self {
            base: buf.as_mut_ptr() as usize,
            len: buf.len(),
        }
    }
}

/// Why a guest range cannot be turned into iovecs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RangeError {
    /// Some byte of it is not guest RAM (or the end overflows).
    OutsideMemory,
    /// `out` is full.
    TooManySegments,
}

/// Appends iovecs covering guest `[addr, addr + len)` to `out` (one per memory region it
/// touches), refusing to grow `out` past `limit`. On error `out` may hold part of the
/// range; the caller truncates it back.
pub(crate) fn push_guest_range(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: u32,
    out: &mut Vec<IoBuf>,
    limit: usize,
) -> Result<(), RangeError> {
    // get_slices checks every byte against the regions (and the end against overflow),
    // so nothing outside guest RAM ever reaches the kernel.
    for slice in mem.get_slices(addr, len as usize) {
        let slice = slice.map_err(|_| RangeError::OutsideMemory)?;
        if out.len() >= limit {
            return Err(RangeError::TooManySegments);
        }
        out.push(IoBuf {
            base: slice.ptr_guard_mut().as_ptr() as usize,
            len: slice.len(),
        });
    }
    Ok(())
}
