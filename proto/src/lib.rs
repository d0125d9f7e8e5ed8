//! The wire protocol between the host (VMM or container runtime) and `twinbox-init`.
//!
//! It has three parts:
//! - [`job`]: how the host tells init what to run (one opaque token: in the VM a frame
//!   on the control port, or on the kernel command line when a peer VMM boots the image;
//!   in the container an environment variable);
//! - [`marker`]: how init tells the host which phase it reached (a 32-bit value written
//!   to an I/O port in the VM, to an inherited pipe in the container);
//! - [`stdio`]: the VM's named virtio-console ports (control, stdin, stdout, stderr); the
//!   container's workload gets its stdio as inherited fds instead.
//!
//! This crate depends on `std` only, because `twinbox-init` links it statically.

pub mod base64url;
pub mod job;
pub mod marker;
pub mod stdio;

pub use job::{Job, JobError, JobUser, MarkerChannel, NetConfig};
pub use marker::{ExitCode, Marker, MarkerError, PhaseCode, MARKER_PORT};
pub use stdio::{Frame, FrameError, FrameReader};
