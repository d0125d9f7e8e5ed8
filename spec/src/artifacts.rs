//! Where the built artifacts live: one cache directory outside any clone, so CI and later
//! runs reuse a kernel or image until its inputs change.
//!
//! Layout (each `current` is a symlink to the newest content-keyed build):
//! ```text
//! $TWINBOX_CACHE (default /var/cache/twinbox)
//! ├── kernel/current/{vmlinux,bzImage,config}   guest-kernel/build.sh
//! ├── init/current/{twinbox-init,initramfs.cpio} rootfs/build-init.sh
//! ├── rootfs/current/rootfs.ext4                rootfs/build.sh
//! └── lab/current/{vmlinuz,initramfs-base...}   lab/build.sh
//! ```

use std::path::{Path, PathBuf};

/// Environment variable that moves the cache.
pub const CACHE_ENV: &str = "TWINBOX_CACHE";
/// The cache when `TWINBOX_CACHE` is unset.
pub const DEFAULT_CACHE: &str = "/var/cache/twinbox";

/// The cache directory.
pub fn cache_dir() -> PathBuf {
    std::env::var_os(CACHE_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_CACHE), PathBuf::from)
}

/// The built uncompressed guest kernel (ELF with the PVH note).
pub fn kernel_vmlinux() -> PathBuf {
    cache_dir().join("kernel/current/vmlinux")
}

/// The built compressed guest kernel.
pub fn kernel_bzimage() -> PathBuf {
    cache_dir().join("kernel/current/bzImage")
}

/// twinbox's static init, which the container binds read-only into every box (the
/// image need not carry one).
pub fn init_binary() -> PathBuf {
    cache_dir().join("init/current/twinbox-init")
}

/// The initramfs holding [`init_binary`] as `/init`, which the VMM boots every VM with
/// unless given another initrd: it mounts the root disk and switches to it.
pub fn initramfs() -> PathBuf {
    cache_dir().join("init/current/initramfs.cpio")
}

/// The built root filesystem image.
pub fn rootfs_image() -> PathBuf {
    cache_dir().join("rootfs/current/rootfs.ext4")
}

/// The lab's directory (stock kernel, kvm modules).
pub fn lab_dir() -> PathBuf {
    cache_dir().join("lab/current")
}

/// `Ok(path)` if the artifact exists, else a one-line message saying how to build it.
pub fn require(path: &Path, what: &str) -> Result<PathBuf, String> {
    if path.exists() {
        Ok(path.to_path_buf())
    } else {
        Err(format!(
            "{what} not found at {} — build it with `scripts/build-artifacts` (or pass its path)",
            path.display()
        ))
    }
}
