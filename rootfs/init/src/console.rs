//! Where init's own words go, and the fixed text of its last line.
//!
//! In the VM, fds 0-2 of PID 1 are `/dev/console` (ttyS0) when the kernel could open it;
//! in the container they are whatever the runtime handed over. Init writes to stderr and
//! never panics on a broken console.

use std::io::Write;
use twinbox_proto::ExitCode;

/// Prints one line prefixed with `twinbox-init: ` on stderr, ignoring write errors (there
/// is nobody to report them to).
pub fn say(message: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "twinbox-init: {message}");
    let _ = err.flush();
}

/// Like [`say`], the line given in parts, with one raw `writev(2)`: no lock and no
/// allocation, for the workload's child before its exec, which runs on init's memory
/// (and in the tests beside other threads, which may hold the allocator's lock). At most
/// [`MAX_PARTS`] parts are written.
pub fn write_stderr(parts: &[&[u8]]) {
    let empty = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    let mut iov = [empty; MAX_PARTS + 2];
    let prefix: &[u8] = b"twinbox-init: ";
    let line = std::iter::once(prefix)
        .chain(parts.iter().copied().take(MAX_PARTS))
        .chain(std::iter::once(&b"\n"[..]));
    let mut count = 0;
    for (slot, part) in iov.iter_mut().zip(line) {
        *slot = libc::iovec {
            iov_base: part.as_ptr().cast_mut().cast(),
            iov_len: part.len(),
        };
        count += 1;
    }
    // SAFETY: the first `count` iovecs point at live slices; a short or failed write is
    // acceptable here.
    unsafe { libc::writev(2, iov.as_ptr(), count) };
}

/// How many parts [`write_stderr`] writes.
pub const MAX_PARTS: usize = 8;

/// `n` in decimal, in `buf`: for [`write_stderr`]'s parts.
pub fn decimal(mut n: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[start..];
        }
    }
}

/// The line init prints when the workload has ended. Other tests grep this exact text,
/// so it is formatted here and nowhere else.
pub fn exit_line(code: ExitCode) -> String {
    match code {
        ExitCode::Exited(status) => format!("workload exited with status {status}"),
        ExitCode::Signaled(signal) => format!("workload killed by signal {signal}"),
    }
}

/// What init says when the workload has ended: the exit line, only with `verbose`, so
/// that without it the workload's streams (in the container, init's stderr is the
/// workload's) carry the workload alone. Failures are printed whatever `verbose` says.
pub fn closing_line(verbose: bool, code: ExitCode) -> Option<String> {
    verbose.then(|| exit_line(code))
}

/// In the VM, the kernel leaves fds 0-2 closed when the root filesystem had no
/// `/dev/console` when init started. Once `/dev` is mounted, open the console onto any of
/// them that is still closed so init's messages are seen.
pub fn adopt_console_if_stdio_closed() {
    for fd in 0..=2 {
        // SAFETY: F_GETFD only queries the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            continue;
        }
        let path = c"/dev/console";
        // SAFETY: path is a valid NUL-terminated string; the result is checked.
        let opened = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
        if opened < 0 {
            return;
        }
        if opened != fd {
            // SAFETY: both descriptors are ours; dup2 onto a closed slot.
            unsafe {
                libc::dup2(opened, fd);
                libc::close(opened);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_in_decimal() {
        for n in [0, 7, 10, 65534, u32::MAX] {
            assert_eq!(decimal(n, &mut [0; 10]), n.to_string().as_bytes());
        }
    }

    #[test]
    fn exit_line_text_is_stable() {
        assert_eq!(
            exit_line(ExitCode::Exited(0)),
            "workload exited with status 0"
        );
        assert_eq!(
            exit_line(ExitCode::Exited(42)),
            "workload exited with status 42"
        );
        assert_eq!(
            exit_line(ExitCode::Signaled(9)),
            "workload killed by signal 9"
        );
    }

    #[test]
    fn the_exit_line_is_said_only_when_verbose() {
        assert_eq!(closing_line(false, ExitCode::Exited(3)), None);
        assert_eq!(
            closing_line(true, ExitCode::Exited(3)).as_deref(),
            Some("workload exited with status 3")
        );
        assert_eq!(
            closing_line(true, ExitCode::Signaled(9)).as_deref(),
            Some("workload killed by signal 9")
        );
    }
}
