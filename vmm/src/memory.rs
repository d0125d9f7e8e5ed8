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
