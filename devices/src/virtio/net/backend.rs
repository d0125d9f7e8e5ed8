//! The host end of a virtio-net device: a tap (production) or a datagram socket (tests,
//! or any user-space switch), either way one read or write per Ethernet frame, each frame
//! preceded by the 12-byte `virtio_net_hdr_v1`.
//!
//! A tap must be opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and `TUNSETVNETHDRSZ`
//! 12 (crate hostnet does that); the device then sets its offloads (`TUNSETOFFLOAD`) to
//! what the guest negotiated. A socket stands in for the tap with the same framing:
//! `SOCK_SEQPACKET` or `SOCK_DGRAM`, one datagram per header + frame.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use crate::virtio::iov::{self, IoBuf};

/// What kind of file the backend is; reads and writes differ in their details.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// A tap character device: `readv`/`writev`, offloads through `TUNSETOFFLOAD`.
    Tap,
    /// A datagram socket: `readv` as for a tap, `sendmsg(MSG_NOSIGNAL)` to write (a
    /// closed peer must not raise SIGPIPE in the VMM); offloads cannot be set and need
    /// not be.
    Socket,
}

/// The host end of the link, non-blocking, owned by the device (closing it removes a
/// non-persistent tap from the host).
#[derive(Debug)]
pub struct NetBackend {
    fd: OwnedFd,
    kind: BackendKind,
}

impl NetBackend {
    /// A tap opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a vnet header size of
    /// 12 bytes. Refuses anything that is not a character device; sets O_NONBLOCK.
    pub fn tap(fd: OwnedFd) -> io::Result<Self> {
        Self::checked(
            fd,
            BackendKind::Tap,
            libc::S_IFCHR,
            "a tap must be a character device",
        )
    }

    /// A `SOCK_SEQPACKET` or `SOCK_DGRAM` socket carrying one header + frame per datagram.
    /// Refuses anything that is not a socket; sets O_NONBLOCK.
    pub fn socket(fd: OwnedFd) -> io::Result<Self> {
        Self::checked(fd, BackendKind::Socket, libc::S_IFSOCK, "not a socket")
    }

    fn checked(fd: OwnedFd, kind: BackendKind, want: u32, what: &str) -> io::Result<Self> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat writes a `struct stat` into the buffer we own; fd is open.
        if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fstat succeeded, so it filled the whole structure.
        let mode = unsafe { st.assume_init() }.st_mode;
        if mode & libc::S_IFMT != want {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, what.to_owned()));
        }
        // SAFETY: F_GETFL/F_SETFL on an fd we own; no memory is passed.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0
            || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd, kind })
    }

    /// Tap or socket.
    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// Sets the tap's offloads (`TUN_F_*`, see [`super::tap_offloads`]): what the
    /// kernel may hand us unsegmented or with a partial checksum. No-op for a socket.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        if self.kind != BackendKind::Tap {
            return Ok(());
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned int in the
        // pointer-sized slot); nothing is read from or written to our memory.
        let ret = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD as _,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one frame (header included) into `bufs`; returns the bytes copied (a
    /// frame longer than `bufs` is cut, the rest lost, for a tap and a socket alike).
    /// `Ok(0)` means the peer of a socket hung up.
    pub(crate) fn read_frame(&self, bufs: &[IoBuf]) -> io::Result<usize> {
        iov::readv(self.fd.as_fd(), bufs)
    }

    /// Sends `bufs` (header + frame) as one frame; returns the bytes taken.
    pub(crate) fn write_frame(&self, bufs: &[IoBuf]) -> io::Result<usize> {
        if self.kind == BackendKind::Tap {
            return iov::writev(self.fd.as_fd(), bufs);
        }
        // SAFETY: all-zero is a valid msghdr.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = bufs.as_ptr().cast::<libc::iovec>().cast_mut();
        msg.msg_iovlen = bufs.len() as _;
        // SAFETY: as for `iov::writev` (entries in guest memory kept mapped, or the TX
        // header copy alive on the caller's stack across this call; the kernel only reads
        // the buffers); msg lives across the call.
        let n = unsafe {
            libc::sendmsg(
                self.fd.as_raw_fd(),
                &msg,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for NetBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for NetBackend {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
