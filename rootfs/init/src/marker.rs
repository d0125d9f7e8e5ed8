//! The marker channel writer: how init tells the host which phase it reached.
//!
//! VM: `outl` of the encoded marker to an I/O port, which exits to the VMM; access is
//! granted once with `ioperm` (the TSS I/O bitmap), which needs no IOPL change.
//! Container: the same 4 little-endian bytes written to an inherited pipe fd, which is
//! marked close-on-exec so that the workload never inherits it.

use crate::console::say;
use crate::sys::{check, SysError};
use twinbox_proto::{Marker, MarkerChannel};

/// An opened marker channel.
#[derive(Debug)]
pub struct MarkerWriter {
    channel: MarkerChannel,
    /// Set after the first failed write, so a broken channel is reported once.
    broken: bool,
}

impl MarkerWriter {
    /// Prepares `channel`: `ioperm` for a port, `FD_CLOEXEC` for an fd.
    pub fn open(channel: MarkerChannel) -> Result<Self, SysError> {
        match channel {
            MarkerChannel::None => {}
            MarkerChannel::Port(port) => enable_port(port)?,
            MarkerChannel::Fd(fd) => {
                // SAFETY: F_SETFD on a descriptor number only edits our fd table flags.
                check(
                    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) },
                    || format!("marker fd {fd}: set close-on-exec"),
                )?;
            }
        }
        Ok(Self {
            channel,
            broken: false,
        })
    }

    /// A writer that writes nowhere (for failures before the job is known).
    pub fn none() -> Self {
        Self {
            channel: MarkerChannel::None,
            broken: false,
        }
    }

    /// Reports `marker`. A failure is printed once and otherwise ignored: the workload
    /// must still run and its status must still be returned when the host stopped
    /// listening.
    pub fn send(&mut self, marker: Marker) {
        if self.broken {
            return;
        }
        let result = match self.channel {
            MarkerChannel::None => Ok(()),
            MarkerChannel::Port(port) => {
                outl(port, marker.encode());
                Ok(())
            }
            MarkerChannel::Fd(fd) => write_all(fd, &marker.encode().to_le_bytes()),
        };
        if let Err(err) = result {
            self.broken = true;
            say(&format!("marker channel broken: {err}"));
        }
    }
}

fn write_all(fd: i32, mut bytes: &[u8]) -> Result<(), SysError> {
    while !bytes.is_empty() {
        // SAFETY: bytes is a valid buffer of bytes.len() bytes.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n < 0 {
            let err = SysError::last(format!("write marker to fd {fd}"));
            if err.errno == libc::EINTR {
                continue;
            }
            return Err(err);
        }
        bytes = &bytes[n as usize..];
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
fn enable_port(port: u16) -> Result<(), SysError> {
    // SAFETY: ioperm only changes this process's I/O permission bitmap for 4 ports.
    check(
        unsafe { libc::ioperm(libc::c_ulong::from(port), 4, 1) },
        || format!("ioperm marker port {port:#x}"),
    )?;
    Ok(())
}

#[cfg(target_arch = "x86_64")]
fn outl(port: u16, value: u32) {
    // SAFETY: ioperm granted this port in `open`; the write goes to the VMM's marker
    // device (or, under a VMM without one, to an unclaimed port that ignores it). It
    // touches no memory.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") value,
            options(nomem, nostack, preserves_flags));
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn enable_port(port: u16) -> Result<(), SysError> {
    Err(SysError::new(
        format!("marker port {port:#x}: port I/O exists only on x86_64"),
        libc::ENOSYS,
    ))
}

#[cfg(not(target_arch = "x86_64"))]
fn outl(_port: u16, _value: u32) {}

#[cfg(test)]
mod tests {
    use super::*;
    use twinbox_proto::ExitCode;

    fn pipe() -> (i32, i32) {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid array of two ints.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        (fds[0], fds[1])
    }

    fn read_u32s(fd: i32, count: usize) -> Vec<u32> {
        let mut buf = vec![0u8; count * 4];
        let mut got = 0;
        while got < buf.len() {
            // SAFETY: reading into the unfilled tail of buf.
            let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
            assert!(n > 0);
            got += n as usize;
        }
        buf.chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn markers_arrive_on_the_pipe_as_le_u32() {
        let (r, w) = pipe();
        let mut writer = MarkerWriter::open(MarkerChannel::Fd(w)).unwrap();
        // SAFETY: querying flags of our own fd.
        let flags = unsafe { libc::fcntl(w, libc::F_GETFD) };
        assert_eq!(
            flags & libc::FD_CLOEXEC,
            libc::FD_CLOEXEC,
            "workload must not inherit it"
        );
        let sent = [
            Marker::InitStarted,
            Marker::WorkloadStarted,
            Marker::WorkloadExited(ExitCode::Signaled(9)),
        ];
        for m in sent {
            writer.send(m);
        }
        let got: Vec<Marker> = read_u32s(r, 3)
            .into_iter()
            .map(|v| Marker::decode(v).unwrap())
            .collect();
        assert_eq!(got, sent);
        // SAFETY: closing our own fds.
        unsafe {
            libc::close(r);
            libc::close(w);
        }
    }

    #[test]
    fn a_closed_reader_breaks_the_channel_without_panicking() {
        let (r, w) = pipe();
        // SAFETY: closing our own fd.
        unsafe { libc::close(r) };
        let mut writer = MarkerWriter::open(MarkerChannel::Fd(w)).unwrap();
        writer.send(Marker::InitStarted); // EPIPE (SIGPIPE is ignored by Rust's runtime)
        assert!(writer.broken);
        writer.send(Marker::WorkloadStarted);
        // SAFETY: closing our own fd.
        unsafe { libc::close(w) };
    }

    #[test]
    fn a_bad_fd_is_refused_at_open() {
        let err = MarkerWriter::open(MarkerChannel::Fd(987_654)).unwrap_err();
        assert_eq!(err.errno, libc::EBADF);
        assert!(err.to_string().contains("marker fd 987654"));
    }
}
