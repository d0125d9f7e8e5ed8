//! Guest RAM to and from the snapshot's memory file.
//!
//! The file holds the RAM regions one after the other (below the MMIO gap, then above
//! 4 GiB), at their offsets in guest RAM order. Saving writes only the 4 KiB pages that are
//! not all zero, at their offsets, and sets the file's length: the zero pages stay holes,
//! so a 128 MiB guest that touched 20 MiB takes about 20 MiB on disk. Restoring maps the
//! file `MAP_PRIVATE`: nothing is read up front, each page is faulted in from the page
//! cache when the guest touches it, a write copies only that page, and every VM restored
//! from the same file shares the unmodified pages of one page cache.

use crate::memory::{ram_ranges, GuestMemoryMmap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::FileOffset;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

/// The unit of "touched or not".
const PAGE: usize = 4096;

/// Writes guest RAM into `path` (a new file: never an existing one, nor through a
/// symlink), skipping zero pages; returns the bytes written.
pub fn save(memory: &GuestMemoryMmap, path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = File::options()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(path)?;
    let mut offset = 0u64;
    let mut written = 0u64;
    for region in memory.iter() {
        let len = region.len() as usize;
        let host = memory
            .get_host_address(region.start_addr())
            .map_err(|e| std::io::Error::other(format!("{e}")))?;
        // SAFETY: `host..host+len` is this region's mapping, alive while `memory` is; the
        // vCPUs are paused and the event loop stopped, so nothing writes it meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        // Runs of non-zero pages go out in one write each.
        let mut page = 0;
        while page < len {
            if is_zero(&bytes[page..page + PAGE]) {
                page += PAGE;
                continue;
            }
            let start = page;
            while page < len && !is_zero(&bytes[page..page + PAGE]) {
                page += PAGE;
            }
            file.write_all_at(&bytes[start..page], offset + start as u64)?;
            written += (page - start) as u64;
        }
        offset += len as u64;
    }
    file.set_len(offset)?;
    file.sync_all()?;
    Ok(written)
}

fn is_zero(page: &[u8]) -> bool {
    // Compared as u64 words: the compiler vectorises this.
    page.chunks_exact(8)
        .all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
}

/// Maps `file` copy-on-write as the RAM of a guest of `mib` MiB. The file must be exactly
/// that long (checked by the caller).
pub fn map(file: &File, mib: u32) -> std::io::Result<GuestMemoryMmap> {
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(u64::from(mib) << 20) {
        let mapping = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(file.try_clone()?, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| std::io::Error::other(format!("mmap of the memory file: {e}")))?;
        regions.push(
            GuestRegionMmap::new(mapping, start)
                .ok_or_else(|| std::io::Error::other("guest region overflows"))?,
        );
        offset += len as u64;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| std::io::Error::other(format!("{e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn only_touched_pages_take_room_and_the_map_is_copy_on_write() {
        let dir = std::env::temp_dir().join(format!("twinbox-memfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory");
        let memory = crate::memory::create(64).unwrap();
        memory
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        memory
            .write_slice(&[7u8; 3 * PAGE], GuestAddress(32 << 20))
            .unwrap();
        let written = save(&memory, &path).unwrap();
        assert_eq!(written, 4 * PAGE as u64);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "sparse: {} blocks",
            meta.blocks()
        );

        let file = File::open(&path).unwrap();
        let restored = map(&file, 64).unwrap();
        assert_eq!(
            restored.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(
            restored
                .read_obj::<u8>(GuestAddress((32 << 20) + 5))
                .unwrap(),
            7
        );
        assert_eq!(restored.read_obj::<u64>(GuestAddress(60 << 20)).unwrap(), 0);
        restored.write_obj(1u32, GuestAddress(0x1000)).unwrap();
        drop(restored);
        let again = map(&File::open(&path).unwrap(), 64).unwrap();
        assert_eq!(
            again.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef,
            "the guest's writes never reach the file"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
