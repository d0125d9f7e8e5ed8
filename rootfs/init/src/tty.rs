//! `-t` in the VM: the workload runs on a pty that init allocates, and init relays it to
//! the ports: stdin port → pty master, pty master → stdout port, window sizes from the
//! control port → `TIOCSWINSZ` on the master (the kernel then sends `SIGWINCH` to the
//! foreground process group). The pty's line discipline does the rest, as on any
//! terminal: echo, line editing, and Ctrl-C (byte 0x03 from the host) as `SIGINT` to the
//! foreground process group.
//!
//! The relay runs inside init's wait loop ([`crate::reaper::Watch`]), so init keeps
//! reaping and forwarding signals with no second thread. Every descriptor is
//! non-blocking and each direction holds at most one buffer: a side is read only when
//! its buffer has been written on, so a host that stops reading stops the workload's
//! output at the pty (back-pressure) instead of growing init's memory.
//!
//! End of stdin (the host closed the port) does not end the session: an interactive shell
//! ends by itself. It is typed into the pty as the terminal's end-of-file character
//! (VEOF, twice after an unfinished line, as script(1) does), so a workload reading a
//! piped stdin (`echo hi | twinbox vm run -t -- cat`) sees its input end. When the workload has exited, what is left on the master goes to the
//! stdout port until the master reports `EIO` (every slave closed), and closing init's
//! copy of the stdout port is the host's EOF.

use crate::console::say;
use crate::ports::{Control, WinSize};
use crate::reaper::Watch;
use crate::sys::{self, check, SysError};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// A pty pair: init keeps the master, the workload gets the slave.
#[derive(Debug)]
pub struct Pty {
    pub master: File,
    pub slave: OwnedFd,
}

impl Pty {
    /// Allocates a pair from `/dev/ptmx` (devtmpfs's node, which finds the devpts
    /// instance mounted at `/dev/pts` beside it) or `/dev/pts/ptmx`.
    pub fn open() -> Result<Self, SysError> {
        let master = match sys::open("/dev/ptmx", libc::O_RDWR) {
            Ok(fd) => fd,
            Err(first) => sys::open("/dev/pts/ptmx", libc::O_RDWR).map_err(|_| first)?,
        };
        let unlock: libc::c_int = 0;
        // SAFETY: TIOCSPTLCK reads one int through the valid pointer.
        check(
            unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) },
            || "unlock the pty".to_owned(),
        )?;
        let slave = open_slave(&master)?;
        Ok(Self {
            master: File::from(master),
            slave,
        })
    }
}

/// The slave of `master`: `TIOCGPTPEER` (Linux 4.13+) opens it without a path lookup;
/// older kernels go through `/dev/pts/<n>`.
fn open_slave(master: &OwnedFd) -> Result<OwnedFd, SysError> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes the open flags by value and returns a new fd or -1.
    let fd = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if fd >= 0 {
        // SAFETY: the ioctl just returned this fresh descriptor; it gets one owner.
        return sys::above_stdio(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let mut number: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes one unsigned int through the valid pointer.
    check(
        unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut number) },
        || "find the pty's number".to_owned(),
    )?;
    sys::open(&format!("/dev/pts/{number}"), libc::O_RDWR)
}

/// Sets the terminal size on a pty (either end).
pub fn set_size(pty: &impl AsRawFd, size: WinSize) -> Result<(), SysError> {
    let winsize = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize through the valid pointer.
    check(
        unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &winsize) },
        || format!("set the pty's size to {}x{}", size.cols, size.rows),
    )?;
    Ok(())
}

/// Largest chunk moved at once in either direction.
const CHUNK: usize = 64 << 10;

/// Bytes read from one side and not yet all written to the other.
#[derive(Debug, Default)]
struct Pending {
    bytes: Vec<u8>,
    start: usize,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.start == self.bytes.len()
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.start = 0;
    }

    /// One read into the (empty) buffer; `Ok(0)` is end of stream.
    fn fill(&mut self, from: &mut File) -> io::Result<usize> {
        self.clear();
        self.bytes.resize(CHUNK, 0);
        let read = from.read(&mut self.bytes);
        self.bytes.truncate(*read.as_ref().unwrap_or(&0));
        read
    }

    /// Holds `bytes` to write (the buffer is empty).
    fn load(&mut self, bytes: &[u8]) {
        self.clear();
        self.bytes.extend_from_slice(bytes);
    }

    /// One write of what is left.
    fn flush(&mut self, to: &mut File) -> io::Result<()> {
        let n = to.write(&self.bytes[self.start..])?;
        self.start += n;
        if self.is_empty() {
            self.clear();
        }
        Ok(())
    }
}

/// The terminal's end-of-file character (Ctrl-D unless the workload changed it), as a
/// keyboard types it to end a reader's input in canonical mode: twice after an unfinished
/// line, whose first only hands the line over. Nothing if the settings cannot be read or
/// the workload disabled VEOF.
fn end_of_file(master: &File, line_open: bool) -> Vec<u8> {
    // SAFETY: an all-zero termios is valid; tcgetattr fills it from an open descriptor.
    let mut settings: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::tcgetattr(master.as_raw_fd(), &mut settings) } != 0 {
        return Vec::new();
    }
    match settings.c_cc[libc::VEOF] {
        // _POSIX_VDISABLE: the workload turned end-of-file off; a NUL would be only data.
        0 => Vec::new(),
        eof => vec![eof; if line_open { 2 } else { 1 }],
    }
}

/// An I/O error's text without Rust's "(os error N)" suffix, like init's other lines.
fn describe(err: &io::Error) -> String {
    err.raw_os_error()
        .map_or_else(|| err.to_string(), sys::strerror)
}

/// Whether an I/O error only means "not now".
fn transient(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// The poll slots of a [`Relay`], in this order.
const STDIN: usize = 0;
const MASTER: usize = 1;
const STDOUT: usize = 2;
const CONTROL: usize = 3;
const SLOTS: usize = 4;

/// A readable end: data, end of stream, or an error, all to be read.
const READABLE: libc::c_short = libc::POLLIN | libc::POLLHUP | libc::POLLERR;

/// The relay between the pty master and the ports (see the module docs).
#[derive(Debug)]
pub struct Relay {
    master: File,
    /// False once the master read `EIO` or end of file: no slave is open any more.
    output_open: bool,
    /// The stdin port; dropped (closed) at its end of stream.
    stdin: Option<File>,
    /// Whether the last byte from the stdin port left a line unfinished.
    line_open: bool,
    /// The stdout port; dropped when the host is gone, output is then discarded.
    stdout: Option<File>,
    /// The control port; dropped at its end of stream.
    control: Option<Control<File>>,
    to_master: Pending,
    to_stdout: Pending,
}

impl Relay {
    /// Makes every descriptor non-blocking (none of them is shared with the workload)
    /// and starts relaying.
    pub fn new(
        master: File,
        stdin: File,
        stdout: File,
        control: Control<File>,
    ) -> Result<Self, SysError> {
        sys::set_nonblocking(&master)?;
        sys::set_nonblocking(&stdin)?;
        sys::set_nonblocking(&stdout)?;
        sys::set_nonblocking(control.source())?;
        Ok(Self {
            master,
            output_open: true,
            stdin: Some(stdin),
            line_open: false,
            stdout: Some(stdout),
            control: Some(control),
            to_master: Pending::default(),
            to_stdout: Pending::default(),
        })
    }

    /// Applies window sizes to the pty, the last one winning. A failure is printed and
    /// otherwise ignored: the workload runs on with the previous size.
    pub fn apply(&self, sizes: &[WinSize]) {
        if let Some(&size) = sizes.last() {
            if let Err(err) = set_size(&self.master, size) {
                say(&err.to_string());
            }
        }
    }

    /// Applies the sizes that came with the job, or waits up to `limit` for the first
    /// one (see [`Control::await_size`]); before the workload starts.
    pub fn settle_size(&mut self, sizes: &[WinSize], limit: Duration) {
        if !sizes.is_empty() {
            self.apply(sizes);
            return;
        }
        if let Some(control) = &mut self.control {
            let late = control.await_size(limit);
            self.apply(&late);
        }
    }

    fn slots(&self) -> [libc::pollfd; SLOTS] {
        let master_events = if self.output_open && self.to_stdout.is_empty() {
            libc::POLLIN
        } else {
            0
        } | if self.to_master.is_empty() {
            0
        } else {
            libc::POLLOUT
        };
        let mut slots = [sys::pollfd(None::<&File>, 0); SLOTS];
        slots[STDIN] = sys::pollfd(
            self.stdin.as_ref(),
            if self.to_master.is_empty() {
                libc::POLLIN
            } else {
                0
            },
        );
        slots[MASTER] = sys::pollfd(Some(&self.master), master_events);
        slots[STDOUT] = sys::pollfd(
            self.stdout.as_ref(),
            if self.to_stdout.is_empty() {
                0
            } else {
                libc::POLLOUT
            },
        );
        slots[CONTROL] = sys::pollfd(self.control.as_ref().map(Control::source), libc::POLLIN);
        slots
    }

    /// Acts on poll results for [`Relay::slots`]; returns whether anything moved.
    fn handle(&mut self, slots: &[libc::pollfd]) -> bool {
        let ready = |slot: usize, mask: libc::c_short| slots[slot].revents & mask != 0;
        let mut moved = false;
        // stdin port → buffer.
        if ready(STDIN, READABLE) {
            if let Some(stdin) = &mut self.stdin {
                match self.to_master.fill(stdin) {
                    // The host closed stdin: typed as end of file; the session goes on.
                    Ok(0) => {
                        self.stdin = None;
                        self.to_master
                            .load(&end_of_file(&self.master, self.line_open));
                    }
                    Ok(_) if !self.output_open => self.to_master.clear(), // nobody reads
                    Ok(_) => self.line_open = self.to_master.bytes.last() != Some(&b'\n'),
                    Err(err) if transient(&err) => {}
                    Err(err) => {
                        say(&format!("read the stdin port: {}", describe(&err)));
                        self.stdin = None;
                    }
                }
                moved = true;
            }
        }
        // buffer → master (the workload's input).
        if ready(MASTER, libc::POLLOUT | libc::POLLERR | libc::POLLHUP)
            && !self.to_master.is_empty()
        {
            match self.to_master.flush(&mut self.master) {
                Ok(()) => moved = true,
                Err(err) if transient(&err) => {}
                Err(_) => {
                    self.to_master.clear(); // no slave to read it any more
                    moved = true;
                }
            }
        }
        // master → buffer (the workload's output).
        if ready(MASTER, READABLE) && self.output_open && self.to_stdout.is_empty() {
            match self.to_stdout.fill(&mut self.master) {
                Ok(0) => self.output_open = false,
                Ok(_) if self.stdout.is_none() => self.to_stdout.clear(),
                Ok(_) => {}
                Err(err) if transient(&err) => {}
                // EIO: the last slave is closed and everything it wrote has been read.
                Err(_) => self.output_open = false,
            }
            moved = true;
        }
        // buffer → stdout port.
        if ready(STDOUT, libc::POLLOUT | libc::POLLERR | libc::POLLHUP) {
            if let Some(stdout) = &mut self.stdout {
                // The port polls HUP without OUT when the host has closed it: writes
                // would only ever say EAGAIN.
                let host_gone = !ready(STDOUT, libc::POLLOUT);
                let result = if host_gone {
                    Err(io::Error::from_raw_os_error(libc::ENODEV))
                } else {
                    self.to_stdout.flush(stdout)
                };
                match result {
                    Ok(()) => {}
                    Err(err) if transient(&err) => {}
                    Err(err) => {
                        say(&format!(
                            "write the stdout port: {}; the workload's output is discarded",
                            describe(&err)
                        ));
                        self.stdout = None;
                        self.to_stdout.clear();
                    }
                }
                moved = true;
            }
        }
        // control port → window sizes.
        if ready(CONTROL, READABLE) {
            if let Some(control) = &mut self.control {
                let sizes = control.read_sizes();
                if control.is_closed() {
                    self.control = None;
                }
                self.apply(&sizes);
                moved = true;
            }
        }
        moved
    }

    /// After the workload has exited: moves what is left on the master to the stdout
    /// port until the master reports that every slave is closed (`true`), or until
    /// nothing has moved for `idle` (`false`: a leftover process still holds the slave,
    /// or the host stopped reading). Input is no longer relayed.
    pub fn drain(&mut self, idle: Duration) -> bool {
        self.stdin = None;
        self.to_master.clear();
        let mut last_move = Instant::now();
        loop {
            if !self.output_open && (self.to_stdout.is_empty() || self.stdout.is_none()) {
                return true;
            }
            let left = idle.saturating_sub(last_move.elapsed());
            if left.is_zero() {
                return false;
            }
            let mut slots = self.slots();
            slots[CONTROL].fd = -1; // resizes no longer matter
            match sys::poll(&mut slots, left.as_millis().max(1) as libc::c_int) {
                Ok(0) => return false,
                Ok(_) => {
                    if self.handle(&slots) {
                        last_move = Instant::now();
                    }
                }
                Err(err) => {
                    say(&err.to_string());
                    return false;
                }
            }
        }
    }
}

impl Watch for Relay {
    fn interest(&self, fds: &mut Vec<libc::pollfd>) {
        fds.extend_from_slice(&self.slots());
    }

    fn ready(&mut self, fds: &[libc::pollfd]) {
        self.handle(fds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{Prepared, Stdio};
    use std::os::unix::net::UnixStream;
    use twinbox_proto::{ExitCode, Frame, Job};

    /// The host's ends of the fake ports and the relay holding the guest's ends.
    struct Rig {
        stdin: Option<File>,
        stdout: File,
        control: UnixStream,
        relay: Relay,
        slave: Option<OwnedFd>,
        output: Vec<u8>,
    }

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid array of two ints.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe2 just returned these two fresh descriptors; each gets one owner.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    fn rig(size: Option<WinSize>) -> Rig {
        let pty = Pty::open().expect("a pty (openpty works unprivileged)");
        let (stdin_guest, stdin_host) = pipe();
        let (stdout_host, stdout_guest) = pipe();
        let (control_host, control_guest) = UnixStream::pair().unwrap();
        let control = Control::new(File::from(OwnedFd::from(control_guest)));
        let mut relay = Relay::new(pty.master, stdin_guest, stdout_guest, control).unwrap();
        relay.settle_size(&size.into_iter().collect::<Vec<_>>(), Duration::ZERO);
        sys::set_nonblocking(&stdout_host).unwrap();
        Rig {
            stdin: Some(stdin_host),
            stdout: stdout_host,
            control: control_host,
            relay,
            slave: Some(pty.slave),
            output: Vec::new(),
        }
    }

    impl Rig {
        fn spawn(&mut self, script: &str) -> libc::pid_t {
            let slave = self.slave.take().unwrap();
            let job = Job {
                env: vec!["PATH=/usr/bin:/bin".into()],
                ..Job::new(["sh", "-c", script])
            };
            let pid = Prepared::new(&job, Stdio::Terminal(slave.as_raw_fd()))
                .unwrap()
                .spawn()
                .unwrap();
            drop(slave); // as init does: the master's EIO then means the workload's end
            pid
        }

        /// Relays (as init's wait loop would) until `pid` exits or `until` shows up in
        /// the output; returns the exit if it came.
        fn relay_until(&mut self, pid: libc::pid_t, until: Option<&str>) -> Option<ExitCode> {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                let mut status = 0;
                // SAFETY: waiting for our own child without blocking.
                if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                    return Some(ExitCode::from_wait_status(status));
                }
                let mut fds = Vec::new();
                self.relay.interest(&mut fds);
                sys::poll(&mut fds, 50).unwrap();
                self.relay.ready(&fds);
                self.collect();
                if until.is_some_and(|u| self.text().contains(u)) {
                    return None;
                }
            }
            panic!("timed out; output so far: {:?}", self.text());
        }

        fn collect(&mut self) {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = self.stdout.read(&mut buf) {
                self.output.extend_from_slice(&buf[..n]);
            }
        }

        fn text(&self) -> String {
            String::from_utf8_lossy(&self.output).replace('\r', "")
        }

        /// After the exit: drain, then the stdout port's EOF once init drops its copy.
        fn finish(mut self) -> String {
            assert!(self.relay.drain(Duration::from_secs(5)), "master EIO");
            drop(self.relay);
            let mut rest = Vec::new();
            // SAFETY: F_SETFL on our own pipe end.
            unsafe { libc::fcntl(self.stdout.as_raw_fd(), libc::F_SETFL, 0) };
            self.stdout.read_to_end(&mut rest).unwrap(); // ends: init's copy is closed
            self.output.extend_from_slice(&rest);
            String::from_utf8_lossy(&self.output).replace('\r', "")
        }
    }

    #[test]
    fn a_session_gets_a_controlling_terminal_its_size_and_its_input() {
        let mut rig = rig(Some(WinSize { rows: 33, cols: 99 }));
        let pid = rig.spawn(
            "stty size; test -t 0 && test -t 1 && test -t 2 && echo all-ttys; \
             (: </dev/tty) 2>/dev/null && echo has-ctty; \
             read line; echo \"got $line\"; exit 3",
        );
        rig.stdin.as_mut().unwrap().write_all(b"hello\n").unwrap();
        let code = rig.relay_until(pid, None);
        assert_eq!(code, Some(ExitCode::Exited(3)));
        let out = rig.finish();
        for expected in [
            "33 99\n",
            "all-ttys\n",
            "has-ctty\n",
            "hello\n",
            "got hello\n",
        ] {
            assert!(out.contains(expected), "{expected:?} missing from {out:?}");
        }
    }

    #[test]
    fn the_end_of_stdin_is_the_workload_s_end_of_input_after_a_line_or_a_part_of_one() {
        for (input, count) in [(&b"one\ntwo\n"[..], "2"), (b"one\ntwo", "1")] {
            let mut rig = rig(None);
            let pid = rig.spawn("wc -l; echo after-eof");
            let mut stdin = rig.stdin.take().unwrap();
            stdin.write_all(input).unwrap();
            drop(stdin);
            assert_eq!(rig.relay_until(pid, None), Some(ExitCode::Exited(0)));
            let out = rig.finish();
            assert!(out.ends_with(&format!("{count}\nafter-eof\n")), "{out:?}");
        }
    }

    #[test]
    fn end_of_file_is_the_terminal_s_veof_and_nothing_when_it_is_disabled() {
        let pty = Pty::open().expect("a pty");
        assert_eq!(
            end_of_file(&pty.master, false),
            vec![4],
            "Ctrl-D by default"
        );
        assert_eq!(end_of_file(&pty.master, true), vec![4, 4]);
        // SAFETY: an all-zero termios is valid; tcgetattr fills it from an open pty.
        let mut settings: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: as above; tcsetattr reads the termios we own.
        unsafe {
            assert_eq!(libc::tcgetattr(pty.slave.as_raw_fd(), &mut settings), 0);
            settings.c_cc[libc::VEOF] = 0;
            assert_eq!(
                libc::tcsetattr(pty.slave.as_raw_fd(), libc::TCSANOW, &settings),
                0
            );
        }
        assert_eq!(
            end_of_file(&pty.master, true),
            Vec::<u8>::new(),
            "`stty eof undef`"
        );
    }

    #[test]
    fn the_end_of_stdin_does_not_end_the_session() {
        let mut rig = rig(None);
        drop(rig.stdin.take()); // EOF on the stdin port right away
        let pid = rig.spawn("sleep 0.3; echo still-here; exit 0");
        assert_eq!(rig.relay_until(pid, None), Some(ExitCode::Exited(0)));
        assert!(
            rig.relay.stdin.is_none(),
            "the stdin port was closed at EOF"
        );
        assert!(rig.finish().contains("still-here\n"));
    }

    #[test]
    fn ctrl_c_from_the_host_interrupts_the_foreground_and_resizes_reach_it() {
        let mut rig = rig(Some(WinSize { rows: 24, cols: 80 }));
        let pid = rig.spawn(
            "trap 'stty size; echo winch-done' WINCH; trap 'echo interrupted; exit 7' INT; \
             echo ready; while :; do sleep 0.05; done",
        );
        assert_eq!(rig.relay_until(pid, Some("ready\n")), None);
        let resize = Frame::WindowSize {
            rows: 50,
            cols: 132,
        };
        rig.control.write_all(&resize.encode().unwrap()).unwrap();
        assert_eq!(rig.relay_until(pid, Some("winch-done\n")), None);
        rig.stdin.as_mut().unwrap().write_all(&[0x03]).unwrap();
        assert_eq!(rig.relay_until(pid, None), Some(ExitCode::Exited(7)));
        let out = rig.finish();
        assert!(out.contains("50 132\n"), "{out:?}");
        assert!(out.contains("interrupted\n"), "{out:?}");
    }

    #[test]
    fn output_larger_than_any_buffer_arrives_whole_after_the_exit() {
        let mut rig = rig(None);
        // 1 MiB written by a workload that exits at once: most of it is still on the
        // master (or blocked behind the host) when the exit is seen.
        let pid = rig.spawn("head -c 1048576 /dev/zero | tr '\\0' x; exit 0");
        assert_eq!(rig.relay_until(pid, None), Some(ExitCode::Exited(0)));
        let out = rig.finish();
        assert_eq!(out.len(), 1 << 20);
        assert!(out.bytes().all(|b| b == b'x'));
    }

    #[test]
    fn a_host_that_closed_stdout_does_not_stall_the_workload() {
        let mut rig = rig(None);
        let pid = rig.spawn("head -c 300000 /dev/zero; echo done >/dev/null; exit 5");
        // Closing the host's read end: writes to the port now fail (EPIPE for a pipe).
        let (dead, _) = pipe();
        rig.stdout = dead;
        assert_eq!(rig.relay_until(pid, None), Some(ExitCode::Exited(5)));
        assert!(rig.relay.stdout.is_none());
        assert!(rig.relay.drain(Duration::from_secs(5)));
    }
}
