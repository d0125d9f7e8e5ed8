//! The start-up conversation between the parent and the cloned child, as typed ends
//! instead of bytes on pipes (the shape of youki's `process/channel.rs`):
//!
//! - parent → child: [`ParentSide::release`] once the child is in its cgroup (and, with
//!   `--userns`, its maps are written);
//! - child → parent: [`ChildEnds::ready`] right before exec, or [`ChildEnds::failed`] with
//!   the step and errno; the channel closes on exec (close-on-exec), so [`FromChild::Closed`]
//!   after `Ready` means init runs.
//!
//! Two close-on-exec pipes carry it. The child's side ([`ChildEnds`]) is plain descriptor
//! numbers and its methods are raw system calls: it runs after `clone` in a copy of a
//! possibly multi-threaded parent, where allocating is not safe. The child closes the
//! parent's ends first ([`ParentSide::raw_fds`]): then the parent's death shows as EOF on
//! the release pipe and POLLERR on the status pipe.

use crate::Error;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// Record kind of [`FromChild::Ready`]; any other kind is the failed step's code.
const READY: u32 = 0;

/// What the parent hears from the child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FromChild {
    /// The sandbox is ready; exec of init comes next.
    Ready,
    /// Step `step` (a code of `child.rs`) failed with `errno`.
    Failed {
        /// Which step.
        step: u32,
        /// The errno it failed with.
        errno: i32,
    },
    /// The channel closed: the child executed init, or died.
    Closed,
}

/// The parent's side: it releases the child and hears its reports.
#[derive(Debug)]
pub struct ParentSide {
    release: Option<OwnedFd>,
    status: OwnedFd,
}

/// The child's side, owned by the parent until the child is cloned (then dropped there).
#[derive(Debug)]
pub struct ChildSide {
    release: OwnedFd,
    status: OwnedFd,
}

/// The child's side as the child uses it: descriptor numbers, no allocation.
#[derive(Clone, Copy, Debug)]
pub struct ChildEnds {
    release: RawFd,
    status: RawFd,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), Error> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::os("pipe", std::io::Error::from_raw_os_error(e as i32)))
}

/// A new channel: the parent's side and the child's.
pub fn channel() -> Result<(ParentSide, ChildSide), Error> {
    let (release_r, release_w) = pipe()?;
    let (status_r, status_w) = pipe()?;
    Ok((
        ParentSide {
            release: Some(release_w),
            status: status_r,
        },
        ChildSide {
            release: release_r,
            status: status_w,
        },
    ))
}

impl ParentSide {
    /// The parent's descriptors, which the child closes first thing.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.release
            .iter()
            .chain(std::iter::once(&self.status))
            .map(AsRawFd::as_raw_fd)
            .collect()
    }

    /// Lets the child go on. Once only; later calls do nothing. A child already gone
    /// (EPIPE) is not an error here: its report, or its silence, says what happened.
    pub fn release(&mut self) -> Result<(), Error> {
        let Some(fd) = self.release.take() else {
            return Ok(());
        };
        // SAFETY: one byte from a local into our pipe.
        let n = unsafe { libc::write(fd.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        let error = std::io::Error::last_os_error();
        if n != 1 && error.raw_os_error() != Some(libc::EPIPE) {
            return Err(Error::os("release the container's child", error));
        }
        Ok(())
    }

    /// The descriptor [`ParentSide::receive`] reads, to poll beside others.
    pub fn status_fd(&self) -> RawFd {
        self.status.as_raw_fd()
    }

    /// Waits for the child's next report.
    pub fn receive(&self) -> FromChild {
        let mut record = [0u8; 8];
        let mut got = 0;
        while got < record.len() {
            // SAFETY: reads into the unfilled tail of a local buffer.
            let n = unsafe {
                libc::read(
                    self.status.as_raw_fd(),
                    record[got..].as_mut_ptr().cast(),
                    record.len() - got,
                )
            };
            if n > 0 {
                got += n as usize;
            } else if n == 0
                || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
            {
                return FromChild::Closed;
            }
        }
        let [k0, k1, k2, k3, e0, e1, e2, e3] = record;
        match u32::from_le_bytes([k0, k1, k2, k3]) {
            READY => FromChild::Ready,
            step => FromChild::Failed {
                step,
                errno: i32::from_le_bytes([e0, e1, e2, e3]),
            },
        }
    }
}

impl ChildSide {
    /// The ends as the child will use them.
    pub fn ends(&self) -> ChildEnds {
        ChildEnds {
            release: self.release.as_raw_fd(),
            status: self.status.as_raw_fd(),
        }
    }
}

impl ChildEnds {
    /// Blocks until the parent releases the child; false when the parent died first.
    pub fn wait_for_release(&self) -> bool {
        let mut byte = 0u8;
        loop {
            // SAFETY: reads one byte into a local.
            let n = unsafe { libc::read(self.release, (&mut byte as *mut u8).cast(), 1) };
            if n == 1 {
                // The descriptor stays open until exec closes it (close-on-exec).
                return true;
            }
            if n == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return false;
            }
        }
    }

    /// Reports that init is executed next.
    pub fn ready(&self) {
        self.send(READY, 0);
    }

    /// Reports that `step` failed with `errno`.
    pub fn failed(&self, step: u32, errno: i32) {
        debug_assert_ne!(step, READY);
        self.send(step, errno);
    }

    /// Whether the parent still holds its end: a pipe's write end reports POLLERR once
    /// its last reader is gone.
    pub fn parent_alive(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.status,
            events: 0,
            revents: 0,
        };
        // SAFETY: poll of one pollfd on the stack, no waiting.
        let r = unsafe { libc::poll(&mut pfd, 1, 0) };
        r >= 0 && pfd.revents & libc::POLLERR == 0
    }

    fn send(&self, kind: u32, errno: i32) {
        let mut record = [0u8; 8];
        record[..4].copy_from_slice(&kind.to_le_bytes());
        record[4..].copy_from_slice(&errno.to_le_bytes());
        // SAFETY: 8 bytes from a local; a pipe write of at most PIPE_BUF is atomic. If the
        // parent is gone the write fails, and there is no one left to tell.
        unsafe { libc::write(self.status, record.as_ptr().cast(), record.len()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_then_reports_then_closed() {
        let (mut parent, child) = channel().unwrap();
        let ends = child.ends();
        parent.release().unwrap();
        parent.release().unwrap();
        assert!(ends.wait_for_release());
        assert!(ends.parent_alive());
        ends.failed(7, libc::ENOENT);
        ends.ready();
        // The child's side goes (exec, or the parent dropping its copy after clone).
        drop(child);
        assert_eq!(
            parent.receive(),
            FromChild::Failed {
                step: 7,
                errno: libc::ENOENT
            }
        );
        assert_eq!(parent.receive(), FromChild::Ready);
        assert_eq!(parent.receive(), FromChild::Closed);
    }

    #[test]
    fn the_child_sees_a_dead_parent() {
        let (parent, child) = channel().unwrap();
        let ends = child.ends();
        assert_eq!(parent.raw_fds().len(), 2);
        drop(parent);
        assert!(!ends.parent_alive(), "POLLERR once the reader is gone");
        assert!(!ends.wait_for_release(), "EOF instead of a release");
    }
}
