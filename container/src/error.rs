//! What can go wrong while starting or running a container.

use std::path::PathBuf;
use thiserror::Error;

/// A container run that could not be set up or supervised. The workload's own failures
/// are not errors: they are the `Outcome` of the report.
#[derive(Debug, Error)]
pub enum Error {
    #[error("twinbox ctr run needs root (loop devices, mounts, cgroups) — run as root")]
    NotRoot,
    #[error(transparent)]
    Spec(#[from] twinbox_spec::SpecError),
    #[error("root filesystem image {path}: {source}")]
    Image {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "root filesystem image {0}: not an ext4 image (no 0xEF53 superblock magic at byte 1080)"
    )]
    NotExt4(PathBuf),
    #[error("disk {path}: {source}")]
    Disk {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loop device for {path}: {what}: {source}")]
    Loop {
        path: PathBuf,
        what: String,
        source: std::io::Error,
    },
    #[error("cgroups: {0}")]
    CgroupLayout(String),
    #[error("cgroup {path}: {what}: {source}")]
    Cgroup {
        path: PathBuf,
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("container setup failed: {0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Os {
        what: String,
        source: std::io::Error,
    },
}

impl Error {
    /// An OS error with what was being done.
    pub(crate) fn os(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Os {
            what: what.into(),
            source,
        }
    }
}
