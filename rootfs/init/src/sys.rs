//! Thin helpers around raw libc calls: one error type that carries which call failed on
//! what, plus conversions to the C strings the kernel wants.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

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

/// The C library's text for an errno (what Rust's `io::Error` prints before its
/// "(os error N)").
pub fn strerror(errno: i32) -> String {
    String::from_utf8_lossy(errno_text(errno, &mut [0; ERRNO_TEXT])).into_owned()
}

/// Room for any errno's text.
pub const ERRNO_TEXT: usize = 128;

/// [`strerror`] into `buf`, without allocating: for the workload's child before its exec,
/// which runs on init's memory.
pub fn errno_text(errno: i32, buf: &mut [u8; ERRNO_TEXT]) -> &[u8] {
    // SAFETY: strerror_r (the XSI one) writes at most buf.len() bytes, NUL included.
    let failed = unsafe { libc::strerror_r(errno, buf.as_mut_ptr().cast(), buf.len()) } != 0;
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if failed || len == 0 {
        return b"unknown error";
    }
    &buf[..len]
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

/// Moves `fd` to a number of 3 or more (close-on-exec), so that putting the workload's
/// stdio in place with `dup2` onto 0-2 can never overwrite another of its sources: in
/// the VM, fds 0-2 of init are closed when the kernel found no `/dev/console`.
pub fn above_stdio(fd: OwnedFd) -> Result<OwnedFd, SysError> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own returns a new one or -1.
    let moved = check(
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) },
        || format!("move fd {} above stdio", fd.as_raw_fd()),
    )?;
    // SAFETY: fcntl just returned this fresh descriptor; it gets exactly one owner.
    Ok(unsafe { OwnedFd::from_raw_fd(moved) })
}

/// Opens `path` with `flags` (close-on-exec and no controlling terminal added), above
/// stdio.
pub fn open(path: &str, flags: libc::c_int) -> Result<OwnedFd, SysError> {
    let c_path = cstring(path)?;
    // SAFETY: c_path is NUL-terminated; the result is checked.
    let fd = check(
        unsafe { libc::open(c_path.as_ptr(), flags | libc::O_CLOEXEC | libc::O_NOCTTY) },
        || format!("open {path}"),
    )?;
    // SAFETY: open just returned this fresh descriptor; it gets exactly one owner.
    above_stdio(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets `O_NONBLOCK` on `fd`'s open file (shared with every dup of it).
pub fn set_nonblocking(fd: &impl AsRawFd) -> Result<(), SysError> {
    let raw = fd.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL only read and edit the open file's status flags.
    unsafe {
        let flags = check(libc::fcntl(raw, libc::F_GETFL), || {
            format!("get flags of fd {raw}")
        })?;
        check(
            libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK),
            || format!("make fd {raw} non-blocking"),
        )?;
    }
    Ok(())
}

/// `poll(2)` over `fds`, retried on `EINTR`; returns how many have events.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> Result<usize, SysError> {
    loop {
        // SAFETY: fds is a valid, exclusively borrowed slice of pollfd of this length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = SysError::last("poll");
        if err.errno != libc::EINTR {
            return Err(err);
        }
    }
}

/// A `pollfd` waiting for `events` on `fd`, or an ignored slot (`fd` -1) when there is
/// nothing to wait for, so a caller's slots keep fixed positions.
pub fn pollfd(fd: Option<&impl AsRawFd>, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd: match fd {
            Some(fd) if events != 0 => fd.as_raw_fd(),
            _ => -1,
        },
        events,
        revents: 0,
    }
}
