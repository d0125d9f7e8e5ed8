//! Checks on the files a run is given, before any VM exists: readable, and the root image
//! really an ext4 filesystem.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Offset of the ext2/3/4 superblock magic (superblock at 1024 + `s_magic` at 0x38).
pub const EXT4_MAGIC_OFFSET: u64 = 1080;
/// The ext2/3/4 superblock magic.
pub const EXT4_MAGIC: u16 = 0xef53;

/// A file that cannot be used.
#[derive(Debug, Error)]
pub enum FileError {
    #[error("{what} {path}: {source}")]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "root filesystem {path} is not an ext4 image (no ext2/3/4 superblock magic at byte 1080)"
    )]
    NotExt4 { path: PathBuf },
}

/// Checks that `path` can be opened (read-only or read-write as asked).
pub fn check_openable(what: &'static str, path: &Path, write: bool) -> Result<(), FileError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map(drop)
        .map_err(|source| FileError::Unreadable {
            what,
            path: path.into(),
            source,
        })
}

/// Checks that `path` holds an ext2/3/4 filesystem.
pub fn check_ext4(path: &Path) -> Result<(), FileError> {
    let err = |source| FileError::Unreadable {
        what: "root filesystem",
        path: path.into(),
        source,
    };
    let mut file = File::open(path).map_err(err)?;
    let mut magic = [0u8; 2];
    file.seek(SeekFrom::Start(EXT4_MAGIC_OFFSET)).map_err(err)?;
    if file.read_exact(&mut magic).is_err() || u16::from_le_bytes(magic) != EXT4_MAGIC {
        return Err(FileError::NotExt4 { path: path.into() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext4_magic_is_checked() {
        let dir = std::env::temp_dir();
        let good = dir.join(format!("twinbox-vmm-ext4-{}", std::process::id()));
        let mut bytes = vec![0u8; 2048];
        bytes[1080..1082].copy_from_slice(&EXT4_MAGIC.to_le_bytes());
        std::fs::write(&good, &bytes).unwrap();
        assert!(check_ext4(&good).is_ok());
        std::fs::write(&good, b"short").unwrap();
        assert!(matches!(check_ext4(&good), Err(FileError::NotExt4 { .. })));
        std::fs::remove_file(&good).unwrap();
        assert!(matches!(
            check_ext4(&good),
            Err(FileError::Unreadable { .. })
        ));
    }
}
