//! Transitional: SIGINT/SIGTERM handling lives in `twinbox_spec::interrupt` (one module
//! for every box and the bench). This wrapper keeps the old `eventfd()` call shape for the
//! CLI until it calls `twinbox_spec::interrupt::Interrupt` and passes `Some(&i.fd())` to
//! [`crate::run_until`]; then this file goes.

use std::os::fd::{AsFd, AsRawFd, RawFd};

pub use twinbox_spec::interrupt::received;

/// The stop descriptor of an [`Interrupt`], as [`crate::run_until`] takes it.
pub struct WakeFd(RawFd);

impl AsRawFd for WakeFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// `twinbox_spec::interrupt::Interrupt` with the old accessor.
pub struct Interrupt {
    inner: twinbox_spec::interrupt::Interrupt,
    fd: WakeFd,
}

impl Interrupt {
    /// Installs the handlers (see `twinbox_spec::interrupt::Interrupt::install`).
    pub fn install() -> std::io::Result<Self> {
        let inner = twinbox_spec::interrupt::Interrupt::install()?;
        // The spec's wake fd lives for the whole process, so the raw number stays valid.
        let fd = WakeFd(inner.fd().as_fd().as_raw_fd());
        Ok(Self { inner, fd })
    }

    /// The descriptor to hand to [`crate::run_until`].
    pub fn eventfd(&self) -> &WakeFd {
        &self.fd
    }

    /// The signal that arrived, if any.
    pub fn signal(&self) -> Option<i32> {
        self.inner.signal()
    }
}
