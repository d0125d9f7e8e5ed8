//! Guest RAM: anonymous host mappings laid out around the 32-bit MMIO gap.

use crate::layout::{MMIO_GAP_START, RAM_ABOVE_GAP_START};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use thiserror::Error;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// The guest's RAM.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Why guest memory could not be set up.
#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    MapAligned { mib: u64, source: std::io::Error },
    #[error(
        "{mib} MiB of guest memory is more than this host's {host_mib} MiB of RAM (MemTotal): \
         ask for at most {host_mib}"
    )]
    MoreThanHost { mib: u32, host_mib: u64 },
    #[error("cannot read the host's memory size from /proc/meminfo: {0}")]
    HostSize(String),
    #[error("cannot start the thread that registers guest memory: {0}")]
    Thread(std::io::Error),
    #[error("the thread that registers guest memory panicked")]
    ThreadPanicked,
    #[error("cannot register guest memory slot {slot} at {addr:#x} with KVM: {source}")]
    Register {
        slot: u32,
        addr: u64,
        source: kvm_ioctls::Error,
    },
}

/// The RAM ranges (guest address, size) of a guest with `size` bytes: below the gap, then
/// the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let below = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), below as usize)];
    if size > MMIO_GAP_START {
        ranges.push((
            GuestAddress(RAM_ABOVE_GAP_START),
            (size - MMIO_GAP_START) as usize,
        ));
    }
    ranges
}

/// Checks `mib` against the host's RAM (`MemTotal`, in KiB). Guest RAM is mapped lazily,
/// so a bigger guest would start — and then be killed by the OOM killer, or take the host
/// with it, once its pages are touched. (The spec's own limit, 1 TiB, only catches typos.)
pub fn check_size(mib: u32, host_total_kib: u64) -> Result<(), MemoryError> {
    let host_mib = host_total_kib >> 10;
    if u64::from(mib) > host_mib {
        return Err(MemoryError::MoreThanHost { mib, host_mib });
    }
    Ok(())
}

/// This host's `MemTotal`, in KiB.
pub fn host_total_kib() -> Result<u64, MemoryError> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| MemoryError::HostSize(e.to_string()))?;
    twinbox_spec::host::status_field_kib(&meminfo, "MemTotal")
        .ok_or_else(|| MemoryError::HostSize("no MemTotal line".into()))
}

/// Maps `mib` MiB of anonymous guest RAM.
pub fn create(mib: u32) -> Result<GuestMemoryMmap, MemoryError> {
    let size = u64::from(mib) << 20;
    GuestMemoryMmap::from_ranges(&ram_ranges(size)).map_err(|source| MemoryError::Map {
        mib: u64::from(mib),
        source,
    })
}

/// The size of a host huge page (x86-64's 2 MiB): the alignment guest RAM's host mappings
/// get from [`create_aligned`].
pub const HUGE_PAGE: usize = 2 << 20;

/// The host mappings behind guest RAM made by [`create_aligned`], unmapped when this is
/// dropped. It must outlive every clone of that guest memory and the VM it is registered
/// with: declare it before them, so that it drops after them.
#[derive(Debug)]
pub struct RamMappings(Vec<(usize, usize)>);

impl Drop for RamMappings {
    fn drop(&mut self) {
        for &(addr, len) in &self.0 {
            // SAFETY: our own mapping from `map_aligned`; by this type's contract nothing
            // refers to it any more (the guest memory and the VM went first).
            unsafe { libc::munmap(addr as *mut libc::c_void, len) };
        }
    }
}

/// Maps `mib` MiB of anonymous guest RAM as [`create`] does, but with each range's host
/// address 2 MiB aligned, as Firecracker maps it. Guest RAM ranges start 2 MiB aligned, so
/// host and guest addresses then agree modulo 2 MiB, which is what KVM needs to map a
/// transparent huge page of the host as one 2 MiB page of the guest: where the host's THP
/// policy gives guest RAM huge pages, a booting guest takes one nested page fault per 2 MiB
/// instead of one per 4 KiB (in the lab: ~1,000 instead of ~6,400 per boot). Where it does
/// not, nothing changes. The pages are the same anonymous private memory either way.
pub fn create_aligned(mib: u32) -> Result<(RamMappings, GuestMemoryMmap), MemoryError> {
    let err = |source| MemoryError::MapAligned {
        mib: u64::from(mib),
        source,
    };
    let mut mappings = RamMappings(Vec::new());
    let mut regions = Vec::new();
    for (guest, len) in ram_ranges(u64::from(mib) << 20) {
        let addr = map_aligned(len).map_err(err)?;
        mappings.0.push((addr, len));
        // SAFETY: `addr..addr + len` is the read-write anonymous mapping just made, which
        // `mappings` keeps until the memory built on it is gone (see `RamMappings`).
        let region = unsafe {
            vm_memory::mmap::MmapRegionBuilder::new(len)
                .with_raw_mmap_pointer(addr as *mut u8)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(GUEST_RAM_FLAGS)
                .build()
        }
        .map_err(|e| err(std::io::Error::other(e.to_string())))?;
        regions.push(
            vm_memory::GuestRegionMmap::new(region, guest)
                .ok_or_else(|| err(std::io::Error::other("guest range overflows")))?,
        );
    }
    let memory = GuestMemoryMmap::from_regions(regions)
        .map_err(|e| err(std::io::Error::other(e.to_string())))?;
    Ok((mappings, memory))
}

/// How guest RAM is mapped: private anonymous memory, committed only as it is touched.
const GUEST_RAM_FLAGS: i32 = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

/// Maps `len` bytes of guest RAM at a 2 MiB-aligned host address: reserves `len` plus 2 MiB
/// of address space, maps the aligned part over it and gives back the rest.
fn map_aligned(len: usize) -> std::io::Result<usize> {
    let reserve = len + HUGE_PAGE;
    // SAFETY: a fresh inaccessible mapping where the kernel chooses; nothing refers to it.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_NONE,
            GUEST_RAM_FLAGS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let base = base as usize;
    let start = base.next_multiple_of(HUGE_PAGE);
    // SAFETY: `start..start + len` lies inside the reservation just made, which only this
    // function knows of; MAP_FIXED replaces exactly that part of it.
    let mapped = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            GUEST_RAM_FLAGS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    let failure = (mapped == libc::MAP_FAILED).then(std::io::Error::last_os_error);
    // The reservation's head and tail (or all of it, on failure) go back.
    let unused = match failure {
        Some(_) => vec![(base, reserve)],
        None => vec![
            (base, start - base),
            (start + len, base + reserve - start - len),
        ],
    };
    for (addr, size) in unused.into_iter().filter(|&(_, size)| size > 0) {
        // SAFETY: parts of the reservation above that nothing maps or refers to.
        unsafe { libc::munmap(addr as *mut libc::c_void, size) };
    }
    failure.map_or(Ok(start), Err)
}

/// Tells KVM about every RAM region, one memory slot each.
pub fn register(vm: &VmFd, memory: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in memory.iter().enumerate() {
        let slot = slot as u32;
        let host = memory
            .get_host_address(region.start_addr())
            .expect("a region's own start address is mapped");
        let entry = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region stays mapped for as long as the VM fd lives: the caller keeps
        // `memory` alive until after the VM is dropped (see `Vm` field order in lib.rs).
        unsafe { vm.set_user_memory_region(entry) }.map_err(|source| MemoryError::Register {
            slot,
            addr: region.start_addr().raw_value(),
            source,
        })?;
    }
    Ok(())
}

/// Guest memory being registered with KVM on a thread of its own.
///
/// KVM_SET_USER_MEMORY_REGION waits for a grace period of the VM's SRCU, 3–12 ms on a
/// virtualised host, while the VMM could be loading the kernel and building devices: those
/// touch only the host mapping (or wait for KVM's slot lock themselves), so the two go on
/// side by side. [`Registration::wait`] before the first vCPU runs; a drop waits too, so
/// the thread never outlives an early return.
pub struct Registration(Option<JoinHandle<Result<(), MemoryError>>>);

impl Registration {
    /// Starts registering `memory` with `vm`.
    pub fn start(vm: Arc<VmFd>, memory: GuestMemoryMmap) -> Result<Self, MemoryError> {
        let handle = std::thread::Builder::new()
            .name("vmm-memslots".into())
            .spawn(move || register(&vm, &memory))
            .map_err(MemoryError::Thread)?;
        Ok(Self(Some(handle)))
    }

    /// Waits until KVM has every slot, and says whether it took them.
    pub fn wait(mut self) -> Result<(), MemoryError> {
        self.join()
    }

    fn join(&mut self) -> Result<(), MemoryError> {
        match self.0.take() {
            Some(handle) => handle.join().map_err(|_| MemoryError::ThreadPanicked)?,
            None => Ok(()),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = self.join();
    }
}

/// Host address ranges (start, length) of guest RAM, to tell guest pages from the VMM's
/// own when measuring resident memory.
pub fn host_ranges(memory: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    memory
        .iter()
        .map(|r| {
            let host = memory.get_host_address(r.start_addr()).expect("mapped") as u64;
            (host, r.len())
        })
        .collect()
}

/// Total guest RAM in bytes.
pub fn total_size(memory: &GuestMemoryMmap) -> u64 {
    memory.iter().map(|r| r.len()).sum()
}

/// Last RAM address + 1 below the gap (for e820).
pub fn end_below_gap(memory: &GuestMemoryMmap) -> u64 {
    memory
        .iter()
        .filter(|r| r.start_addr().raw_value() < MMIO_GAP_START)
        .map(|r| r.last_addr().unchecked_add(1).raw_value())
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_guest_ram_starts_on_2_mib_and_is_usable_and_zeroed() {
        use vm_memory::Bytes;
        let (mappings, memory) = create_aligned(130).unwrap();
        assert_eq!(total_size(&memory), 130 << 20);
        for (host, len) in host_ranges(&memory) {
            assert_eq!(host as usize % HUGE_PAGE, 0, "host address {host:#x}");
            assert_eq!(len, 130 << 20);
        }
        let last = GuestAddress((130 << 20) - 8);
        assert_eq!(memory.read_obj::<u64>(last).unwrap(), 0);
        memory.write_obj(0x1234_5678_u64, last).unwrap();
        assert_eq!(memory.read_obj::<u64>(last).unwrap(), 0x1234_5678);
        drop(memory);
        drop(mappings);
    }

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(64 << 20), vec![(GuestAddress(0), 64 << 20)]);
    }

    #[test]
    fn big_guest_skips_the_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), 0xc000_0000));
        assert_eq!(r[1], (GuestAddress(0x1_0000_0000), 0x4000_0000));
    }

    #[test]
    fn exactly_gap_sized_guest_has_no_high_range() {
        assert_eq!(ram_ranges(MMIO_GAP_START).len(), 1);
    }

    #[test]
    fn guest_memory_is_bounded_by_host_ram() {
        let host_kib = 4 << 20; // 4 GiB
        assert!(check_size(4096, host_kib).is_ok());
        let err = check_size(4097, host_kib).unwrap_err();
        assert!(matches!(
            err,
            MemoryError::MoreThanHost {
                mib: 4097,
                host_mib: 4096
            }
        ));
        assert!(err.to_string().contains("at most 4096"), "{err}");
        assert!(
            check_size(1 << 20, host_kib).is_err(),
            "1 TiB on a 4 GiB host"
        );
        assert!(host_total_kib().unwrap() > 0, "this host's MemTotal");
    }

    #[test]
    fn memory_maps_and_reports_size() {
        let m = create(64).unwrap();
        assert_eq!(total_size(&m), 64 << 20);
        assert_eq!(end_below_gap(&m), 64 << 20);
        assert_eq!(host_ranges(&m).len(), 1);
    }
}
