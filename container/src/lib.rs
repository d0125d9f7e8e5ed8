//! The twinbox container: the image on a read-only autoclear loop device (or an OCI
//! image's layers as overlayfs lower directories), an overlay with a tmpfs upper layer, `pivot_root` in new pid/mount/uts/ipc/net/cgroup namespaces, one
//! cgroup per run (cpu quota, memory without swap, pids, device allowlist), runc's masked
//! and read-only paths, moby's capabilities without MKNOD, a seccomp allowlist, and
//! twinbox-init as PID 1 reporting phases over a pipe; with `--net` a veth link to the
//! host (leased and made by `hostnet`, configured by init). `run.rs` tells the story.

mod caps;
pub mod cgroup;
mod channel;
mod child;
mod detached;
pub mod device_program;
mod error;
mod plan;
#[cfg(test)]
mod recording;
mod run;
pub mod seccomp;
pub mod shared_image;
pub mod sweep;
mod syscall;
mod tty;
mod userns;

pub use error::Error;
pub use run::{run, INIT};
pub use shared_image::ImageHold;
