//! One error type for the whole crate: every message is one line that names the input (which
//! archive, which blob, which tar entry) so the CLI can print it as is and exit 125.

use std::path::PathBuf;
use thiserror::Error;

/// Why an image cannot be opened, verified, unpacked or built.
#[derive(Debug, Error)]
pub enum ImageError {
    /// A file of the input or of the cache cannot be read or written.
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    /// The input is none of the three supported forms.
    #[error("{0}: not an OCI image layout, oci-archive or docker-archive ({1})")]
    UnknownFormat(PathBuf, String),
    /// The input is malformed (bad JSON, a missing file, an unsupported media type).
    #[error("{path}: {what}")]
    Malformed { path: PathBuf, what: String },
    /// A blob's content does not match its digest or size.
    #[error("{path}: blob {digest} is corrupt: {what}")]
    Corrupt {
        path: PathBuf,
        digest: String,
        what: String,
    },
    /// A path inside the input or a layer would leave its directory.
    #[error("{path}: {what}")]
    Unsafe { path: PathBuf, what: String },
    /// No image, or more than one, matches the selector.
    #[error("{path}: {what}")]
    Selection { path: PathBuf, what: String },
    /// The image is for another platform.
    #[error("{path}: {what}")]
    Platform { path: PathBuf, what: String },
    /// The image's User cannot be resolved.
    #[error("image user {user:?}: {what}")]
    User { user: String, what: String },
    /// `mkfs.ext4` failed or is missing.
    #[error("building the VM disk {path}: {what}")]
    Mkfs { path: PathBuf, what: String },
    /// A cache entry named by the user does not exist or is ambiguous.
    #[error("image cache {root}: {what}")]
    Cache { root: PathBuf, what: String },
}

/// Shorthand for this crate's results.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// Builds an [`ImageError::Io`] from a path and a short description of the operation.
pub(crate) fn io(
    path: impl Into<PathBuf>,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.into();
    move |source| ImageError::Io { path, what, source }
}

/// Builds an [`ImageError::Io`] from a rustix errno.
pub(crate) fn errno(
    path: impl Into<PathBuf>,
    what: &'static str,
) -> impl FnOnce(rustix::io::Errno) -> ImageError {
    let path = path.into();
    move |e| ImageError::Io {
        path,
        what,
        source: e.into(),
    }
}

/// Builds an [`ImageError::Malformed`].
pub(crate) fn malformed(path: impl Into<PathBuf>, what: impl Into<String>) -> ImageError {
    ImageError::Malformed {
        path: path.into(),
        what: what.into(),
    }
}
