//! Guest buffers as host iovecs, so bytes move between guest memory and a host fd (a
//! tap, a pipe) in one `readv`/`writev`, with no bounce buffer and no allocation per
//! transfer. Shared by virtio-net and virtio-console; each device sets its own limit on
//! the entries of one call (`MAX_IOVS` in each), passed to [`push_guest_range`].

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// One host-virtual range inside guest memory, laid out exactly as `struct iovec` so a
/// slice of them goes to the kernel as is. Plain integers rather than a pointer, so the
/// device stays `Send`; built by [`push_guest_range`] from a mapping of the
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
    /// An entry for a host buffer of the device's own that the kernel reads (virtio-net's
    /// TX header copy); valid only while `buf` lives, so made right before the call.
    pub(crate) fn host(buf: &[u8]) -> Self {
        Self {
            base: buf.as_ptr() as usize,
            len: buf.len(),
        }
    }

    /// Likewise for a buffer the kernel writes (virtio-net's RX spill byte).
    pub(crate) fn host_mut(buf: &mut [u8]) -> Self {
        Self {
            base: buf.as_mut_ptr() as usize,
            len: buf.len(),
        }
    }

    /// Drops the first `n` bytes (`n` ≤ len): the rest of a buffer partly written.
    fn advance(&mut self, n: usize) {
        debug_assert!(n <= self.len);
        self.base += n;
        self.len -= n;
    }
}

/// Why a guest range cannot be turned into iovecs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RangeError {
    /// Some byte of it is not guest RAM (or the end overflows).
    OutsideMemory,
    /// `out` already holds `limit` entries.
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

/// Removes the first `n` bytes from the front of `iovs` (whole entries, then part of
/// the next one); `n` is at most their total.
pub(crate) fn consume_front(iovs: &mut Vec<IoBuf>, mut n: usize) {
    let mut whole = 0;
    for iov in iovs.iter_mut() {
        if n == 0 {
            break;
        }
        if iov.len <= n {
            n -= iov.len;
            whole += 1;
        } else {
            iov.advance(n);
            n = 0;
        }
    }
    iovs.drain(..whole);
}

/// `iovs.len()` as the kernel's count; callers never pass more than their device's
/// `MAX_IOVS` (plus virtio-net's spill byte), well below the kernel's IOV_MAX (1024).
fn count(iovs: &[IoBuf]) -> libc::c_int {
    libc::c_int::try_from(iovs.len()).unwrap_or(libc::c_int::MAX)
}

/// `readv(fd, iovs)`: fills the guest buffers (and any [`IoBuf::host_mut`] entry) from
/// the host end.
pub(crate) fn readv(fd: BorrowedFd<'_>, iovs: &[IoBuf]) -> io::Result<usize> {
    // SAFETY: IoBuf has the layout of iovec (checked above); every entry covers guest
    // RAM checked by push_guest_range and mapped by the GuestMemoryMmap the caller holds
    // (the device's Active, which owns these iovecs), or a buffer of the caller's that
    // is borrowed across this call; the kernel writes at most each entry's length, and
    // what it writes into guest memory is only ever read as guest bytes.
    let n = unsafe { libc::readv(fd.as_raw_fd(), iovs.as_ptr().cast(), count(iovs)) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `writev(fd, iovs)`: hands guest bytes (and any [`IoBuf::host`] entry) to the host end.
pub(crate) fn writev(fd: BorrowedFd<'_>, iovs: &[IoBuf]) -> io::Result<usize> {
    // SAFETY: as for readv; the kernel only reads the ranges, which are guest RAM mapped
    // for as long as the caller holds the memory, or the caller's own borrowed buffers.
    let n = unsafe { libc::writev(fd.as_raw_fd(), iovs.as_ptr().cast(), count(iovs)) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consume_front_drops_whole_entries_then_part_of_one() {
        let mut iovs = vec![
            IoBuf { base: 100, len: 10 },
            IoBuf { base: 200, len: 5 },
            IoBuf { base: 300, len: 8 },
        ];
        consume_front(&mut iovs, 12);
        assert_eq!(
            iovs,
            vec![IoBuf { base: 202, len: 3 }, IoBuf { base: 300, len: 8 }]
        );
        consume_front(&mut iovs, 3);
        assert_eq!(iovs, vec![IoBuf { base: 300, len: 8 }]);
        consume_front(&mut iovs, 8);
        assert!(iovs.is_empty());
    }
}
