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

/// Like [`say`] but with one raw `write(2)`, taking no lock: for the forked child, where
/// a lock held by another thread of the parent at fork time would never be released.
pub fn write_stderr(message: &str) {
    let line = format!("twinbox-init: {message}\n");
    // SAFETY: line is a valid buffer; a short or failed write is acceptable here.
    unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
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
