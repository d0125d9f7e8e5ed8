//! Checks on the files a run is given, before any VM exists: each one can be opened the
//! way the VM will open it. (Whether the root image is ext4 is `twinbox_spec::image`'s
//! one check, shared with the container.)

use std::path::{Path, PathBuf};
use thiserror::Error;

/// A file that cannot be used.
#[derive(Debug, Error)]
pub enum FileError {
    #[error("{what} {path}: {source}")]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_read_only_files_are_named() {
        let missing = Path::new("/nonexistent/twinbox-disk");
        let err = check_openable("disk", missing, false).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("disk /nonexistent/twinbox-disk: "));
        assert!(check_openable("kernel", Path::new("/proc/self/status"), false).is_ok());
        // A directory cannot be opened for writing, by root either (EISDIR).
        let err = check_openable("disk", Path::new("/"), true).unwrap_err();
        assert!(err.to_string().starts_with("disk /: "), "{err}");
    }
}
