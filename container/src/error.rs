//! What can go wrong while starting or running a container.

use std::path::PathBuf;
use thiserror::Error;

/// A container run that could not be set up or supervised. The workload's own failures
/// are not errors: they are the `Outcome` of the report.
#[derive(Debug, Error)]
pub enum Error {
    /// Not run as root.
    #[error("twinbox ctr run needs root (loop devices, mounts, cgroups) — run as root")]
    NotRoot,
    /// The run spec is invalid.
    #[error(transparent)]
    Spec(#[from] twinbox_spec::SpecError),
    /// The image is unusable or its loop device could not be attached.
    #[error(transparent)]
    Image(#[from] twinbox_spec::image::ImageError),
    /// The host's twinbox-init, which every box runs as PID 1, is not built.
    #[error("twinbox-init not found at {} — build it with scripts/build-artifacts (the container runs the host's init, never the image's)", .0.display())]
    NoInit(PathBuf),
    /// An extra disk cannot be used.
    #[error("disk {path}: {source}")]
    Disk {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The host lacks the cgroup controllers a run needs.
    #[error("cgroups: {0}")]
    CgroupLayout(String),
    /// A cgroup file or directory could not be written, made or removed.
    #[error("cgroup {path}: {what}: {source}")]
    Cgroup {
        path: PathBuf,
        what: String,
        source: std::io::Error,
    },
    /// The seccomp profile did not compile.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// `--net` without CAP_NET_ADMIN, found before anything is made.
    #[error("--net needs CAP_NET_ADMIN (it makes a veth pair and host addresses), which this process lacks — run as root with it")]
    NoNetAdmin,
    /// The box's network (`--net`): no lease, no veth, no NAT table.
    #[error(transparent)]
    Net(#[from] hostnet::Error),
    /// A setup step failed (in the child: which step, and the errno).
    #[error("container setup failed: {0}")]
    Setup(String),
    /// A system call of the parent failed.
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
