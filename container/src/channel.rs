//! The start-up conversation between the parent and the cloned child, as typed ends
//! instead of bytes on pipes (the shape of youki's `process/channel.rs`):
//!
//! - parent → child: [`ParentSide::release`] once the child is in its cgroup (and, with
//!   `--userns`, its maps are written);
//! - child → parent: with `-t`, [`ChildEnds::send_terminal`] hands over the master of the
//!   pty the child made on the container's devpts; then [`ChildEnds::ready`] right before
//!   exec, or [`ChildEnds::failed`] with the step and errno; the channel closes on exec
//!   (close-on-exec), so [`FromChild::Closed`] after `Ready` means init runs.
//!
//! Two close-on-exec pipes carry it, and a Unix socket pair for the one descriptor that
//! crosses (`SCM_RIGHTS`): the child sends the master there, then a record on the status
//! pipe saying so, so the parent reads the two in order. The child's side ([`ChildEnds`]) is plain descriptor
//! numbers and its methods are raw system calls: it runs after `clone` in a copy of a
//! possibly multi-threaded parent, where allocating is not safe. The child closes the
//! parent's ends first ([`ParentSide::raw_fds`]): then the parent's death shows as EOF on
//! the release pipe and POLLERR on the status pipe.

use crate::Error;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Bytes of one record on the status pipe: kind (u32), errno (i32), the child's
/// `CLOCK_MONOTONIC` in ns (u64), little-endian.
const RECORD: usize = 16;
/// Record kind of [`FromChild::Ready`]; any other kind is the failed step's code.
const READY: u32 = 0;
/// Record kind of [`FromChild::Terminal`] (no step has this code).
const TERMINAL: u32 = u32::MAX;

/// What the parent hears from the child.
#[derive(Debug)]
pub enum FromChild {
    /// The master of the container's pty (`-t`), or why it did not arrive.
    Terminal(std::io::Result<OwnedFd>),
    /// The sandbox is ready; exec of init comes next. `at_ns`: when, on the child's
    /// `CLOCK_MONOTONIC` (the parent may read it only after the exec: it is suspended
    /// while a child on its memory sets up, `syscall::SHARED_MEMORY`).
    Ready {
        /// The child's clock when it was ready.
        at_ns: u64,
    },
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
    terminal: OwnedFd,
}

/// The child's side, owned by the parent until the child is cloned (then dropped there).
#[derive(Debug)]
pub struct ChildSide {
    release: OwnedFd,
    status: OwnedFd,
    terminal: OwnedFd,
}

/// The child's side as the child uses it: descriptor numbers, no allocation.
#[derive(Clone, Copy, Debug)]
pub struct ChildEnds {
    release: RawFd,
    status: RawFd,
    terminal: RawFd,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), Error> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::os("pipe", std::io::Error::from_raw_os_error(e as i32)))
}

/// A close-on-exec Unix seqpacket pair (a datagram per message, descriptors attached).
fn socket_pair() -> Result<(OwnedFd, OwnedFd), Error> {
    let mut fds = [-1; 2];
    // SAFETY: socketpair writes two descriptors into our array, owned from here on.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(Error::os("socketpair", std::io::Error::last_os_error()));
    }
    // SAFETY: two fresh descriptors nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A new channel: the parent's side and the child's.
pub fn channel() -> Result<(ParentSide, ChildSide), Error> {
    let (release_r, release_w) = pipe()?;
    let (status_r, status_w) = pipe()?;
    let (terminal_r, terminal_w) = socket_pair()?;
    Ok((
        ParentSide {
            release: Some(release_w),
            status: status_r,
            terminal: terminal_r,
        },
        ChildSide {
            release: release_r,
            status: status_w,
            terminal: terminal_w,
        },
    ))
}

/// Room for one `SCM_RIGHTS` message with one descriptor (`CMSG_SPACE(sizeof(int))`, 24
/// bytes on 64-bit), as u64s for the alignment `cmsghdr` needs.
type FdSpace = [u64; 4];

impl ParentSide {
    /// The parent's descriptors, which the child closes first thing.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.release
            .iter()
            .chain([&self.status, &self.terminal])
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
        let mut record = [0u8; RECORD];
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
        let [k0, k1, k2, k3, e0, e1, e2, e3, t @ ..] = record;
        match u32::from_le_bytes([k0, k1, k2, k3]) {
            READY => FromChild::Ready {
                at_ns: u64::from_le_bytes(t),
            },
            TERMINAL => FromChild::Terminal(self.receive_fd()),
            step => FromChild::Failed {
                step,
                errno: i32::from_le_bytes([e0, e1, e2, e3]),
            },
        }
    }
}

impl ParentSide {
    /// The descriptor the child sent on the socket (it is there before the record that
    /// announced it), close-on-exec.
    fn receive_fd(&self) -> std::io::Result<OwnedFd> {
        let mut byte = 0u8;
        let mut iov = libc::iovec {
            iov_base: (&mut byte as *mut u8).cast(),
            iov_len: 1,
        };
        let mut space: FdSpace = [0; 4];
        // SAFETY: an all-zero msghdr is valid; it then points at our iovec and buffer.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = space.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of::<FdSpace>();
        // SAFETY: recvmsg into the buffers `msg` describes, all ours and alive.
        let n = unsafe {
            libc::recvmsg(
                self.terminal.as_raw_fd(),
                &mut msg,
                libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel filled `msg`; the CMSG macros walk the buffer it points at,
        // and only a full SCM_RIGHTS header of one descriptor is read.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            if !cmsg.is_null()
                && (*cmsg).cmsg_level == libc::SOL_SOCKET
                && (*cmsg).cmsg_type == libc::SCM_RIGHTS
                && (*cmsg).cmsg_len == libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize
            {
                let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
                return Ok(OwnedFd::from_raw_fd(fd));
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the child announced its terminal but sent no descriptor",
        ))
    }
}

impl ChildSide {
    /// The ends as the child will use them.
    pub fn ends(&self) -> ChildEnds {
        ChildEnds {
            release: self.release.as_raw_fd(),
            status: self.status.as_raw_fd(),
            terminal: self.terminal.as_raw_fd(),
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

    /// Hands the pty master `fd` to the parent (the child keeps its own copy; closing it
    /// is the caller's business). No allocation: the message is built on the stack.
    pub fn send_terminal(&self, fd: RawFd) -> Result<(), crate::syscall::Errno> {
        let byte = 0u8;
        let mut iov = libc::iovec {
            iov_base: (&byte as *const u8).cast_mut().cast(),
            iov_len: 1,
        };
        let mut space: FdSpace = [0; 4];
        // SAFETY: an all-zero msghdr is valid; it then points at our iovec and buffer, in
        // which one SCM_RIGHTS header and descriptor are written through the CMSG macros
        // (CMSG_SPACE of one int fits FdSpace); sendmsg reads them while they live.
        let sent = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = space.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
            // MSG_NOSIGNAL: a parent gone is EPIPE here, not a SIGPIPE.
            libc::sendmsg(self.terminal, &msg, libc::MSG_NOSIGNAL)
        };
        crate::syscall::Errno::result(sent)?;
        self.send(TERMINAL, 0);
        Ok(())
    }

    /// Reports that init is executed next.
    pub fn ready(&self) {
        self.send(READY, 0);
    }

    /// Reports that `step` failed with `errno`.
    pub fn failed(&self, step: u32, errno: i32) {
        debug_assert!(step != READY && step != TERMINAL);
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
        let mut record = [0u8; RECORD];
        record[..4].copy_from_slice(&kind.to_le_bytes());
        record[4..8].copy_from_slice(&errno.to_le_bytes());
        // clock_gettime through the vDSO: no allocation, no lock.
        record[8..].copy_from_slice(&twinbox_spec::clock::monotonic_ns().to_le_bytes());
        // SAFETY: a record from a local; a pipe write of at most PIPE_BUF is atomic. If the
        // parent is gone the write fails, and there is no one left to tell.
        unsafe { libc::write(self.status, record.as_ptr().cast(), record.len()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn release_then_reports_then_closed() {
        let (mut parent, child) = channel().unwrap();
        let ends = child.ends();
        parent.release().unwrap();
        parent.release().unwrap();
        assert!(ends.wait_for_release());
        assert!(ends.parent_alive());
        ends.failed(7, libc::ENOENT);
        let before = twinbox_spec::clock::monotonic_ns();
        ends.ready();
        // The child's side goes (exec, or the parent dropping its copy after clone).
        drop(child);
        assert!(matches!(
            parent.receive(),
            FromChild::Failed {
                step: 7,
                errno: libc::ENOENT
            }
        ));
        // Ready carries the child's own clock (a parent suspended until exec reads late).
        let FromChild::Ready { at_ns } = parent.receive() else {
            panic!("no ready record");
        };
        assert!((before..=twinbox_spec::clock::monotonic_ns()).contains(&at_ns));
        assert!(matches!(parent.receive(), FromChild::Closed));
    }

    #[test]
    fn the_terminal_crosses_as_a_descriptor_of_its_own_before_ready() {
        let (parent, child) = channel().unwrap();
        let ends = child.ends();
        let (r, w) = nix::unistd::pipe().unwrap();
        ends.send_terminal(w.as_raw_fd()).unwrap();
        ends.ready();
        drop(child);
        let FromChild::Terminal(Ok(received)) = parent.receive() else {
            panic!("no terminal");
        };
        // The sender's copy goes, as in the child: the received one is a descriptor of
        // its own, close-on-exec.
        drop(w);
        assert_ne!(received.as_raw_fd(), r.as_raw_fd());
        // SAFETY: F_GETFD on a descriptor of ours.
        let flags = unsafe { libc::fcntl(received.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        std::fs::File::from(received).write_all(b"pty").unwrap();
        let mut got = String::new();
        std::fs::File::from(r).read_to_string(&mut got).unwrap();
        assert_eq!(got, "pty");
        assert!(matches!(parent.receive(), FromChild::Ready { .. }));
        assert!(matches!(parent.receive(), FromChild::Closed));
    }

    #[test]
    fn the_child_sees_a_dead_parent() {
        let (parent, child) = channel().unwrap();
        let ends = child.ends();
        assert_eq!(parent.raw_fds().len(), 3);
        drop(parent);
        assert!(!ends.parent_alive(), "POLLERR once the reader is gone");
        assert!(!ends.wait_for_release(), "EOF instead of a release");
        let (_r, w) = nix::unistd::pipe().unwrap();
        assert_eq!(
            ends.send_terminal(w.as_raw_fd()),
            Err(crate::syscall::Errno::EPIPE)
        );
    }
}
