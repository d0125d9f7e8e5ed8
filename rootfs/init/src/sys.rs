//! Thin helpers around raw libc calls: one error type that carries which call failed on
//! what, plus conversions to the C strings the kernel wants.

use std::ffi::CString;
use std::fmt;
use std::io;

/// A failed system call, with what it was doing and the errno it returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysError {
    /// What was being done, e.g. `mount proc on /proc`.
    pub what: String,
    /// The errno (positive).
    pub errno: i32,
}

impl SysError {
    /// Captures the current `errno` for `what`.
    pub fn last(what: impl Into<String>) -> Self {
        let errno = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        Self {
            what: what.into(),
            errno,
        }
    }

    /// An error with an explicit errno (for failures that are not a syscall's).
    pub fn new(what: impl Into<String>, errno: i32) -> Self {
        Self {
            what: what.into(),
            errno,
        }
    }
}

impl fmt::Display for SysError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, strerror(self.errno))
    }
}

impl std::error::Error for SysError {}

/// The kernel's text for an errno, without Rust's "(os error N)" suffix.
pub fn strerror(errno: i32) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    match text.find(" (os error") {
        Some(end) => text[..end].to_owned(),
        None => text,
    }
}

/// Turns a `-1` return into a [`SysError`] naming `what`.
pub fn check(ret: libc::c_int, what: impl FnOnce() -> String) -> Result<libc::c_int, SysError> {
    if ret == -1 {
        Err(SysError::last(what()))
    } else {
        Ok(ret)
    }
}

/// A C string from Rust text; text with an interior NUL (which the job decoder already
/// refuses) is reported as `EINVAL` instead of panicking.
pub fn cstring(text: &str) -> Result<CString, SysError> {
    CString::new(text)
        .map_err(|_| SysError::new(format!("{text:?} contains a NUL byte"), libc::EINVAL))
}
