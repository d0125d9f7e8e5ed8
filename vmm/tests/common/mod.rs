//! What the tiny-guest integration tests share: a minimal ELF "kernel" around a few bytes
//! of 64-bit code, and a stand-in root image that passes the VMM's ext4 check.
//!
//! The ELF has one PT_LOAD segment at 1 MiB and no PVH note, so `vmm::run` enters it in
//! long mode at `e_entry` through the 64-bit boot protocol (the VMM's GDT, identity map of
//! the first GiB, interrupts off).

#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};

/// Guest-physical address of the segment (and of the code: the entry point).
pub const LOAD: u64 = 0x10_0000;
/// File offset of the code.
const CODE: usize = 0x100;

/// An ELF64 executable whose single segment holds `code` at its entry point.
pub fn elf(code: &[u8]) -> Vec<u8> {
    let len = CODE + code.len();
    let mut f = vec![0u8; len];
    let mut put = |at: usize, v: &[u8]| f[at..at + v.len()].copy_from_slice(v);
    put(0, b"\x7fELF\x02\x01\x01");
    put(16, &2u16.to_le_bytes()); // ET_EXEC
    put(18, &62u16.to_le_bytes()); // EM_X86_64
    put(20, &1u32.to_le_bytes()); // e_version
    put(24, &(LOAD + CODE as u64).to_le_bytes()); // e_entry
    put(32, &0x40u64.to_le_bytes()); // e_phoff
    put(52, &64u16.to_le_bytes()); // e_ehsize
    put(54, &56u16.to_le_bytes()); // e_phentsize
    put(56, &1u16.to_le_bytes()); // e_phnum
    put(58, &64u16.to_le_bytes()); // e_shentsize
                                   // PT_LOAD, RWX, the whole file at LOAD.
    put(0x40, &1u32.to_le_bytes());
    put(0x44, &7u32.to_le_bytes());
    put(0x48, &0u64.to_le_bytes()); // p_offset
    put(0x50, &LOAD.to_le_bytes()); // p_vaddr
    put(0x58, &LOAD.to_le_bytes()); // p_paddr
    put(0x60, &(len as u64).to_le_bytes()); // p_filesz
    put(0x68, &(len as u64).to_le_bytes()); // p_memsz
    put(0x70, &4u64.to_le_bytes()); // p_align
    put(CODE, code);
    f
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir, named after `what`.
    pub fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "twinbox-{what}-{}-{:x}",
            std::process::id(),
            twinbox_spec::clock::monotonic_ns()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a 4 KiB file that passes the VMM's root image check (the ext2/3/4 superblock
/// magic at byte 1080) and is a valid virtio-blk backing file; no guest here reads it.
pub fn fake_root(path: &Path) {
    let mut bytes = vec![0u8; 4096];
    bytes[1080..1082].copy_from_slice(&0xef53u16.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

/// Panics naming /dev/kvm when this host cannot run a guest.
pub fn require_kvm() {
    kvm_ioctls::Kvm::new()
        .unwrap_or_else(|e| panic!("this test needs a usable /dev/kvm (root or kvm group): {e}"));
}

/// Names of this process's threads (from /proc/self/task/*/comm).
pub fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_owned())
        .collect()
}

/// Panics naming root when the test needs it.
pub fn require_root() {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root (new namespaces, mounts, uid changes)");
    }
}
