//! The root filesystem image, the same for every box: checked to be ext4 (the one check
//! twinbox has), and for the container and the peer runtimes attached read-only to a loop
//! device that clears itself when its last user goes away.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Offset of the ext2/3/4 superblock magic (superblock at 1024 + `s_magic` at 0x38).
pub const EXT4_MAGIC_OFFSET: u64 = 1080;
/// The ext2/3/4 superblock magic.
pub const EXT4_MAGIC: u16 = 0xEF53;

/// Why an image cannot be used.
#[derive(Debug, Error)]
pub enum ImageError {
    /// The file cannot be opened or read.
    #[error("root filesystem {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file holds no ext2/3/4 filesystem.
    #[error(
        "root filesystem {0} is not an ext4 image (no ext2/3/4 superblock magic at byte 1080)"
    )]
    NotExt4(PathBuf),
    /// A loop device could not be attached.
    #[error("loop device for {path}: {what}: {source}")]
    Loop {
        path: PathBuf,
        what: String,
        source: std::io::Error,
    },
}

/// Fails unless `path` is a readable ext4 (ext2/3/4) image.
pub fn check_ext4(path: &Path) -> Result<(), ImageError> {
    let unreadable = |source| ImageError::Unreadable {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(unreadable)?;
    let mut magic = [0u8; 2];
    match file.read_exact_at(&mut magic, EXT4_MAGIC_OFFSET) {
        Ok(()) if u16::from_le_bytes(magic) == EXT4_MAGIC => Ok(()),
        Ok(()) => Err(ImageError::NotExt4(path.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(ImageError::NotExt4(path.to_owned()))
        }
        Err(e) => Err(unreadable(e)),
    }
}

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config` from `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// A read-only, autoclear loop device over an image. Holding it keeps the device bound;
/// once it is dropped (after the container mounted it) the mount is the last user and the
/// kernel detaches the device when the container's mount namespace dies.
#[derive(Debug)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub path: PathBuf,
    fd: OwnedFd,
}

impl LoopDevice {
    /// The open device.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Attaches `image` read-only with `LO_FLAGS_AUTOCLEAR`.
    pub fn attach(image: &Path) -> Result<Self, ImageError> {
        let err = |what: &str, source| ImageError::Loop {
            path: image.to_owned(),
            what: what.to_owned(),
            source,
        };
        let backing = File::open(image).map_err(|e| err("open image", e))?;
        let control =
            File::open("/dev/loop-control").map_err(|e| err("open /dev/loop-control", e))?;
        // Another process may take the free device between GET_FREE and CONFIGURE (EBUSY):
        // ask again a few times.
        let mut last = None;
        for _ in 0..16 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
            let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
            if n < 0 {
                return Err(err("LOOP_CTL_GET_FREE", std::io::Error::last_os_error()));
            }
            let path = PathBuf::from(format!("/dev/loop{n}"));
            let device = OpenOptions::new()
                .read(true)
                .open(&path)
                .map_err(|e| err(&format!("open {}", path.display()), e))?;
            match configure(&device, &backing) {
                Ok(()) => {
                    return Ok(Self {
                        path,
                        fd: device.into(),
                    })
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = Some(e),
                Err(e) => return Err(err(&format!("configure {}", path.display()), e)),
            }
        }
        Err(err(
            "no free loop device after 16 tries",
            last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EBUSY)),
        ))
    }
}

fn info() -> LoopInfo64 {
    LoopInfo64 {
        device: 0,
        inode: 0,
        rdevice: 0,
        offset: 0,
        sizelimit: 0,
        number: 0,
        encrypt_type: 0,
        encrypt_key_size: 0,
        flags: LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
        file_name: [0; 64],
        crypt_name: [0; 64],
        encrypt_key: [0; 32],
        init: [0; 2],
    }
}

/// LOOP_CONFIGURE (one ioctl, Linux 5.8+), else LOOP_SET_FD + LOOP_SET_STATUS64.
fn configure(device: &File, backing: &File) -> std::io::Result<()> {
    let config = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size: 0,
        info: info(),
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which `config` is laid out as.
    if unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CONFIGURE, &config) } == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() != Some(libc::EINVAL) && error.raw_os_error() != Some(libc::ENOTTY) {
        return Err(error);
    }
    // SAFETY: LOOP_SET_FD takes the backing file's descriptor as its argument.
    if unsafe { libc::ioctl(device.as_raw_fd(), LOOP_SET_FD, backing.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let status = info();
    // SAFETY: LOOP_SET_STATUS64 reads a `struct loop_info64`.
    if unsafe { libc::ioctl(device.as_raw_fd(), LOOP_SET_STATUS64, &status) } != 0 {
        let error = std::io::Error::last_os_error();
        // SAFETY: LOOP_CLR_FD takes no argument; undoes SET_FD.
        unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CLR_FD, 0) };
        return Err(error);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext4_magic_is_checked() {
        let dir = std::env::temp_dir().join(format!("twinbox-spec-ext4-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        let mut bytes = vec![0u8; 2048];
        bytes[1080..1082].copy_from_slice(&EXT4_MAGIC.to_le_bytes());
        std::fs::write(&good, &bytes).unwrap();
        let bad = dir.join("bad");
        std::fs::write(&bad, vec![0u8; 2048]).unwrap();
        let short = dir.join("short");
        std::fs::write(&short, b"abc").unwrap();
        assert!(check_ext4(&good).is_ok());
        assert!(matches!(check_ext4(&bad), Err(ImageError::NotExt4(_))));
        assert!(matches!(check_ext4(&short), Err(ImageError::NotExt4(_))));
        assert!(matches!(
            check_ext4(&dir.join("missing")),
            Err(ImageError::Unreadable { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
