//! The wire protocol between the host (VMM or container runtime) and `twinbox-init`.
//!
//! It has exactly two parts, and both boxes use them identically:
//! - [`job`]: how the host tells init what to run (one opaque token on the kernel
//!   command line in the VM, in an environment variable in the container);
//! - [`marker`]: how init tells the host which phase it reached (a 32-bit value written
//!   to an I/O port in the VM, to an inherited pipe in the container).
//!
//! This crate depends on `std` only, because `twinbox-init` links it statically.

pub mod base64url;
pub mod job;
pub mod marker;

pub use job::{Job, JobError, MarkerChannel, NetConfig};
pub use marker::{ExitCode, Marker, MarkerError, PhaseCode, MARKER_PORT};
