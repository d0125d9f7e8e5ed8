//! The caller's terminal for `-t`, the same for both boxes: is a descriptor a terminal,
//! its window size, raw mode held by a guard ([`RawMode`]), a SIGWINCH watcher that wakes
//! a poll loop ([`ResizeWatcher`]), and a [`Relay`] that moves bytes between the caller's
//! descriptors and the box's (a pty master in the container, ports or pipes in the VM).
//!
//! Restoring the terminal on every path: [`RawMode`] restores the saved settings on drop,
//! and it can only be made while an [`Interrupt`] is alive (and is dropped before it), so
//! SIGINT and SIGTERM reach the run loop as a normal return instead of killing the process
//! with the terminal left raw. In raw mode the terminal itself sends no signals (Ctrl-C
//! is byte 0x03, relayed to the box's pty, whose line discipline makes it the workload's
//! SIGINT).

use crate::interrupt::Interrupt;
use nix::sys::termios::{self, SetArg, Termios};
use std::io::{self, IsTerminal};
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Whether `fd` is a terminal.
pub fn is_terminal(fd: BorrowedFd<'_>) -> bool {
    fd.is_terminal()
}

/// A terminal's size in character cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowSize {
    /// Lines.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// The window size of the terminal `fd` (`TIOCGWINSZ`).
pub fn window_size(fd: BorrowedFd<'_>) -> io::Result<WindowSize> {
    // SAFETY: an all-zero winsize is a valid value for the kernel to overwrite.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize into ours; `fd` is open (borrowed).
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(WindowSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// Sets the window size of the terminal `fd` (`TIOCSWINSZ`; on a pty master the
/// foreground process group of its slave gets SIGWINCH).
pub fn set_window_size(fd: BorrowedFd<'_>, size: WindowSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize of ours; `fd` is open (borrowed).
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The caller's stdin, stdout and stderr (fds 0, 1, 2), for as long as the process lives.
pub fn caller_stdio() -> [BorrowedFd<'static>; 3] {
    // SAFETY: fds 0-2 are open for the life of the process: the Rust runtime opens
    // /dev/null on any that was closed at start, and twinbox never closes them.
    [0, 1, 2].map(|fd| unsafe { BorrowedFd::borrow_raw(fd) })
}

/// The caller's terminal: the first of its stdin, stdout and stderr that is one.
pub fn caller_terminal() -> Option<BorrowedFd<'static>> {
    caller_stdio().into_iter().find(|fd| fd.is_terminal())
}

/// The size of the caller's terminal: the first of stdin, stdout, stderr that is a
/// terminal with a size (a pty nobody sized reports 0x0, which is no size).
pub fn caller_window_size() -> Option<WindowSize> {
    caller_stdio()
        .into_iter()
        .filter(|fd| fd.is_terminal())
        .find_map(|fd| window_size(fd).ok().filter(|s| s.rows > 0 && s.cols > 0))
}

/// The terminal `fd` in raw mode (`cfmakeraw`: no echo, no line editing, no signals from
/// keys, no output processing) until this is dropped, which restores its settings.
///
/// Made only under a live [`Interrupt`] and dropped before it (the borrow sees to it), so
/// SIGINT/SIGTERM end the run through its loop and this guard restores the terminal.
#[derive(Debug)]
pub struct RawMode<'a> {
    fd: BorrowedFd<'a>,
    saved: Termios,
    _under: PhantomData<&'a Interrupt>,
}

impl<'a> RawMode<'a> {
    /// Puts `fd` into raw mode; `Ok(None)` when it is not a terminal (nothing to do).
    pub fn enable(fd: BorrowedFd<'a>, _under: &'a Interrupt) -> io::Result<Option<Self>> {
        Self::set(fd)
    }

    fn set(fd: BorrowedFd<'a>) -> io::Result<Option<Self>> {
        if !fd.is_terminal() {
            return Ok(None);
        }
        let saved = termios::tcgetattr(fd)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(fd, SetArg::TCSANOW, &raw)?;
        Ok(Some(Self {
            fd,
            saved,
            _under: PhantomData,
        }))
    }
}

impl Drop for RawMode<'_> {
    fn drop(&mut self) {
        // TCSANOW, not TCSADRAIN: a terminal stopped by flow control must not hang the
        // teardown (the bytes already written were processed when they were written).
        if let Err(e) = termios::tcsetattr(self.fd, SetArg::TCSANOW, &self.saved) {
            warn(&format!("restore the terminal's settings: {e}"));
        }
    }
}

/// The crate has no logger: one line on stderr, the terminal being cooked again or gone.
fn warn(message: &str) {
    use std::io::Write;
    // Not eprintln!: it panics when stderr's reader is gone.
    let _ = writeln!(std::io::stderr(), "twinbox: {message}");
}

/// The eventfd the SIGWINCH handler writes to (-1 before it exists).
static WINCH_FD: AtomicI32 = AtomicI32::new(-1);
/// The eventfd itself, created once and never closed, so the handler can never write to a
/// reused descriptor number.
static WINCH: OnceLock<OwnedFd> = OnceLock::new();
/// Whether a [`ResizeWatcher`] is alive (one at a time: they would share one wake-up).
static WATCHING: AtomicBool = AtomicBool::new(false);

extern "C" fn on_winch(_signal: libc::c_int) {
    let fd = WINCH_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `fd` is the process-lifetime eventfd, the
        // buffer 8 bytes of a local. A full counter (EAGAIN) is still readable.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

fn winch_fd() -> io::Result<&'static OwnedFd> {
    if let Some(fd) = WINCH.get() {
        return Ok(fd);
    }
    // SAFETY: eventfd(2) with valid flags; the result is checked before use.
    let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let fd = WINCH.get_or_init(|| unsafe { OwnedFd::from_raw_fd(raw) });
    if fd.as_raw_fd() != raw {
        // A racing first call won: ours is not needed.
        // SAFETY: `raw` is ours and unused.
        unsafe { libc::close(raw) };
    }
    WINCH_FD.store(fd.as_raw_fd(), Ordering::SeqCst);
    Ok(fd)
}

/// SIGWINCH (the caller's terminal was resized) makes [`ResizeWatcher::fd`] readable while
/// this lives; the replaced disposition comes back on drop. One at a time per process.
pub struct ResizeWatcher {
    wake: &'static OwnedFd,
    old: libc::sigaction,
}

impl ResizeWatcher {
    /// Installs the handler; an error if another watcher is alive.
    pub fn install() -> io::Result<Self> {
        if WATCHING.swap(true, Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a terminal resize watcher is already installed",
            ));
        }
        let installed = winch_fd().and_then(|wake| {
            drain(wake);
            // SAFETY: all-zero sigactions are valid values, filled in below / by the kernel.
            let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
            let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
            action.sa_sigaction = on_winch as extern "C" fn(libc::c_int) as usize;
            // SA_RESTART: other threads' blocking calls are not disturbed by a resize; a
            // poll still returns EINTR, and the eventfd wakes it anyway.
            action.sa_flags = libc::SA_RESTART;
            // SAFETY: a local set emptied; a handler doing only async-signal-safe work.
            let rc = unsafe {
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(libc::SIGWINCH, &action, &mut old)
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Self { wake, old })
        });
        if installed.is_err() {
            WATCHING.store(false, Ordering::SeqCst);
        }
        installed
    }

    /// Readable after a resize: poll it beside the run's descriptors.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// Whether a resize came since the last call (and re-arms the descriptor).
    pub fn take(&self) -> bool {
        drain(self.wake) > 0
    }
}

impl Drop for ResizeWatcher {
    fn drop(&mut self) {
        // SAFETY: restores the disposition saved by `install`.
        unsafe { libc::sigaction(libc::SIGWINCH, &self.old, std::ptr::null_mut()) };
        WATCHING.store(false, Ordering::SeqCst);
    }
}

/// Empties an eventfd; returns the count it held.
fn drain(fd: &OwnedFd) -> u64 {
    let mut value = 0u64;
    // SAFETY: reads 8 bytes into a local u64 from our non-blocking eventfd.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
    if n == 8 {
        value
    } else {
        0
    }
}

/// Bytes a stream moves per read.
const CHUNK: usize = 64 << 10;

/// Where a stream writes.
enum Sink<'a> {
    /// Left open when the stream ends.
    Borrowed(BorrowedFd<'a>),
    /// Closed when the stream's source ends: the far side reads end of input.
    Owned(OwnedFd),
    /// A pty master, left open (closing it would hang the box's terminal up): when the
    /// stream's source ends, the terminal's end-of-file character goes in instead.
    Terminal(BorrowedFd<'a>),
    /// Closed, or broken (a write failed): what comes is read and dropped.
    Gone,
}

impl Sink<'_> {
    fn raw(&self) -> Option<RawFd> {
        match self {
            Sink::Borrowed(fd) => Some(fd.as_raw_fd()),
            Sink::Owned(fd) => Some(fd.as_raw_fd()),
            Sink::Terminal(fd) => Some(fd.as_raw_fd()),
            Sink::Gone => None,
        }
    }
}

/// One direction of the relay.
struct Stream<'a> {
    from: BorrowedFd<'a>,
    to: Sink<'a>,
    buf: Vec<u8>,
    /// The unwritten bytes are `buf[at..]`.
    at: usize,
    source_open: bool,
    /// An output (box → caller): the relay is finished when every output ended.
    output: bool,
    /// The last byte written (into a [`Sink::Terminal`]: whether a line is open).
    last: Option<u8>,
}

impl Stream<'_> {
    fn pending(&self) -> bool {
        self.at < self.buf.len()
    }

    fn ended(&self) -> bool {
        !self.source_open && !self.pending()
    }

    fn read_events(&self) -> RawFd {
        if self.source_open && !self.pending() {
            self.from.as_raw_fd()
        } else {
            -1
        }
    }

    fn write_events(&self) -> RawFd {
        match self.to.raw() {
            Some(fd) if self.pending() => fd,
            _ => -1,
        }
    }

    /// One read into the empty buffer. End of input, EIO (a pty master whose slave is
    /// closed everywhere) and other errors end the source; EAGAIN and EINTR do not.
    fn read(&mut self) {
        self.buf.resize(CHUNK, 0);
        self.at = 0;
        // SAFETY: reads at most the buffer's length into it; `from` is open (borrowed).
        let n = unsafe {
            libc::read(
                self.from.as_raw_fd(),
                self.buf.as_mut_ptr().cast(),
                self.buf.len(),
            )
        };
        if n > 0 {
            self.buf.truncate(n as usize);
            return;
        }
        self.buf.clear();
        let retry = n < 0
            && matches!(
                io::Error::last_os_error().kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            );
        if !retry {
            self.source_open = false;
        }
    }

    /// Writes what is pending until done or the sink would block. A sink that fails is
    /// gone: an output then drops what comes (the box must not block on a caller that
    /// stopped reading); an input stops reading.
    fn flush(&mut self) {
        while self.pending() {
            let Some(fd) = self.to.raw() else {
                self.at = self.buf.len();
                break;
            };
            let rest = &self.buf[self.at..];
            // SAFETY: writes bytes of our buffer; `fd` is open (borrowed or owned).
            let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
            if n > 0 {
                self.at += n as usize;
                self.last = Some(self.buf[self.at - 1]);
                continue;
            }
            if n == 0 {
                return;
            }
            match io::Error::last_os_error().kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return,
                _ => {
                    self.to = Sink::Gone;
                    if !self.output {
                        self.source_open = false;
                    }
                }
            }
        }
        if !self.source_open && !self.pending() {
            match self.to {
                Sink::Owned(_) => self.to = Sink::Gone,
                Sink::Terminal(master) => {
                    self.to = Sink::Gone;
                    self.end_of_file(master);
                }
                Sink::Borrowed(_) | Sink::Gone => {}
            }
        }
    }

    /// The caller's end of input, told to the box's terminal as a keyboard would, so a
    /// reader in canonical mode (`cat`, `read`, a shell) reads end of input: the
    /// terminal's VEOF character (Ctrl-D unless changed), twice after an unfinished line
    /// (the first only hands the line over). As script(1) does. A reader in raw mode
    /// gets the byte; a terminal whose VEOF is disabled gets nothing. Written
    /// blocking-free: the pty has room for two bytes unless the box stopped reading, and
    /// then it is dropped.
    fn end_of_file(&mut self, master: BorrowedFd<'_>) {
        let Ok(settings) = termios::tcgetattr(master) else {
            return;
        };
        let eof = settings.control_chars[libc::VEOF];
        // 0 is _POSIX_VDISABLE: the workload turned end-of-file off (`stty eof undef`),
        // and a NUL would be only data.
        if eof == 0 {
            return;
        }
        let times = if matches!(self.last, None | Some(b'\n')) {
            1
        } else {
            2
        };
        for _ in 0..times {
            // SAFETY: writes one byte of ours to an open descriptor.
            let _ = unsafe { libc::write(master.as_raw_fd(), (&eof as *const u8).cast(), 1) };
        }
    }
}

/// Moves bytes between the caller's descriptors and the box's under `poll`, with the
/// run's own descriptors polled alongside ([`Relay::poll_once`]) so one loop serves both.
///
/// - an *input* (caller → box) ends at the caller's end of input and never ends the relay:
///   on a terminal the session ends when the workload does (`exit`), not at EOF; into a
///   pty the end of input is typed as the terminal's end-of-file character, so a workload
///   reading a piped stdin (`echo hi | twinbox ctr run -t -- cat`) sees it end;
/// - an *output* (box → caller) ends at its end of input, or EIO/HUP of a pty master once
///   every slave descriptor is closed; the relay is finished when every output ended.
///
/// Box-side descriptors written to should be non-blocking (the relay writes only after
/// `POLLOUT` and keeps the rest for later, so a full box never stops the output moving);
/// the caller's are used as they are (setting `O_NONBLOCK` on them would change the
/// calling shell's file description too).
#[derive(Default)]
pub struct Relay<'a> {
    streams: Vec<Stream<'a>>,
    resize: Option<(&'a ResizeWatcher, BorrowedFd<'a>)>,
}

impl<'a> Relay<'a> {
    /// A relay with nothing to move yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn add(&mut self, from: BorrowedFd<'a>, to: Sink<'a>, output: bool) -> &mut Self {
        self.streams.push(Stream {
            from,
            to,
            buf: Vec::new(),
            at: 0,
            source_open: true,
            output,
            last: None,
        });
        self
    }

    /// Copies the caller's `from` into the box's pty `master` until `from` ends, then
    /// types the terminal's end-of-file character (`Stream::end_of_file`); `master`
    /// stays open (closing it would hang the box's terminal up).
    pub fn input_to_terminal(&mut self, from: BorrowedFd<'a>, master: BorrowedFd<'a>) -> &mut Self {
        self.add(from, Sink::Terminal(master), false)
    }

    /// Copies the caller's `from` into `to` and closes `to` once `from` ended and all of
    /// it is written, so the box reads end of input.
    pub fn input_closing(&mut self, from: BorrowedFd<'a>, to: OwnedFd) -> &mut Self {
        self.add(from, Sink::Owned(to), false)
    }

    /// Copies the box's `from` to the caller's `to` until `from` ends.
    pub fn output(&mut self, from: BorrowedFd<'a>, to: BorrowedFd<'a>) -> &mut Self {
        self.add(from, Sink::Borrowed(to), true)
    }

    /// Reports resizes from `watcher` with the new size of the caller's `terminal`.
    pub fn resizes(&mut self, watcher: &'a ResizeWatcher, terminal: BorrowedFd<'a>) -> &mut Self {
        self.resize = Some((watcher, terminal));
        self
    }

    /// Whether every output has ended (and all it read is written).
    pub fn finished(&self) -> bool {
        self.streams.iter().filter(|s| s.output).all(Stream::ended)
    }

    /// One round: polls the streams' descriptors and `extra` (their `revents` are filled
    /// in) for up to `timeout` (None: no limit), then moves what is ready. Returns the
    /// caller's new window size if its terminal was resized.
    pub fn poll_once(
        &mut self,
        extra: &mut [libc::pollfd],
        timeout: Option<Duration>,
    ) -> io::Result<Option<WindowSize>> {
        let entry = |fd: RawFd, events: libc::c_short| libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let mut fds: Vec<libc::pollfd> = extra.to_vec();
        fds.push(entry(
            self.resize.map_or(-1, |(w, _)| w.fd().as_raw_fd()),
            libc::POLLIN,
        ));
        for s in &self.streams {
            fds.push(entry(s.read_events(), libc::POLLIN));
            fds.push(entry(s.write_events(), libc::POLLOUT));
        }
        let timeout_ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        // SAFETY: polls an array of ours with its true length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                extra.iter_mut().for_each(|e| e.revents = 0);
                return Ok(None);
            }
            return Err(error);
        }
        for (e, polled) in extra.iter_mut().zip(&fds) {
            e.revents = polled.revents;
        }
        let base = extra.len() + 1;
        for (i, s) in self.streams.iter_mut().enumerate() {
            if fds[base + 2 * i].revents != 0 {
                s.read();
            }
            // Right after a read too: most writes go through without waiting for POLLOUT.
            s.flush();
        }
        let mut resized = None;
        if let Some((watcher, terminal)) = self.resize {
            if fds[extra.len()].revents != 0 && watcher.take() {
                resized = window_size(terminal).ok();
            }
        }
        Ok(resized)
    }

    /// Runs until every output ended (true) or `stop` is readable (false), passing
    /// resizes to `on_resize`.
    pub fn run(
        &mut self,
        stop: BorrowedFd<'_>,
        mut on_resize: impl FnMut(WindowSize),
    ) -> io::Result<bool> {
        loop {
            if self.finished() {
                return Ok(true);
            }
            let mut extra = [libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            if let Some(size) = self.poll_once(&mut extra, None)? {
                on_resize(size);
            }
            if extra[0].revents != 0 {
                return Ok(false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::pty::openpty;
    use nix::sys::termios::{LocalFlags, OutputFlags};
    use std::io::{Read, Write};
    use std::sync::Mutex;

    /// SIGWINCH is per process: the tests that raise it take turns.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn pipe() -> (std::fs::File, std::fs::File) {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        (r.into(), w.into())
    }

    fn pty() -> (OwnedFd, OwnedFd) {
        let pair = openpty(None, None).unwrap();
        (pair.master, pair.slave)
    }

    fn nonblocking(fd: BorrowedFd<'_>) {
        let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags)).unwrap();
    }

    /// Polls the relay until `done` or 5 s pass.
    fn pump<'a>(relay: &mut Relay<'a>, mut done: impl FnMut(&Relay<'a>) -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !done(relay) {
            assert!(std::time::Instant::now() < deadline, "relay stuck");
            relay
                .poll_once(&mut [], Some(Duration::from_millis(20)))
                .unwrap();
        }
    }

    #[test]
    fn a_pty_slave_is_a_terminal_with_the_size_set_on_its_master() {
        let (master, slave) = pty();
        let (r, _w) = pipe();
        assert!(is_terminal(slave.as_fd()));
        assert!(!is_terminal(r.as_fd()));
        let size = WindowSize {
            rows: 33,
            cols: 101,
        };
        set_window_size(master.as_fd(), size).unwrap();
        assert_eq!(window_size(slave.as_fd()).unwrap(), size);
        assert!(window_size(r.as_fd()).is_err());
    }

    #[test]
    fn raw_mode_holds_until_dropped_and_skips_what_is_not_a_terminal() {
        let (_master, slave) = pty();
        let cooked = termios::tcgetattr(slave.as_fd()).unwrap();
        assert!(cooked
            .local_flags
            .contains(LocalFlags::ICANON | LocalFlags::ECHO));
        {
            let _raw = RawMode::set(slave.as_fd()).unwrap().expect("a terminal");
            let now = termios::tcgetattr(slave.as_fd()).unwrap();
            assert!(!now
                .local_flags
                .intersects(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG));
            assert!(!now.output_flags.contains(OutputFlags::OPOST));
        }
        let after = termios::tcgetattr(slave.as_fd()).unwrap();
        assert_eq!(after.local_flags, cooked.local_flags);
        assert_eq!(after.output_flags, cooked.output_flags);
        assert_eq!(after.input_flags, cooked.input_flags);
        let (r, _w) = pipe();
        assert!(RawMode::set(r.as_fd()).unwrap().is_none());
    }

    #[test]
    fn an_output_moves_every_byte_and_ends_with_its_source() {
        let (box_r, mut box_w) = pipe();
        let (mut caller_r, caller_w) = pipe();
        let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i * 7 + i / 256) as u8).collect();
        let sent = data.clone();
        let writer = std::thread::spawn(move || box_w.write_all(&sent).unwrap());
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            caller_r.read_to_end(&mut got).unwrap();
            got
        });
        let mut relay = Relay::new();
        relay.output(box_r.as_fd(), caller_w.as_fd());
        assert!(!relay.finished());
        pump(&mut relay, Relay::finished);
        writer.join().unwrap();
        drop(relay);
        drop(caller_w);
        assert!(reader.join().unwrap() == data, "bytes differ");
    }

    #[test]
    fn on_a_pty_input_eof_is_typed_as_eof_and_the_relay_goes_on_until_the_slave_closes() {
        for (input, lines) in [
            (&b"hello\n"[..], &[&b"hello\n"[..]][..]),
            (b"hel", &[b"hel"]),
        ] {
            let (master, slave) = pty();
            nonblocking(master.as_fd());
            let (stdin_r, mut stdin_w) = pipe();
            let (mut stdout_r, stdout_w) = pipe();
            nonblocking(stdout_r.as_fd());
            let mut relay = Relay::new();
            relay
                .input_to_terminal(stdin_r.as_fd(), master.as_fd())
                .output(master.as_fd(), stdout_w.as_fd());
            stdin_w.write_all(input).unwrap();
            drop(stdin_w);
            // What was typed is echoed back out by the pty.
            let mut echoed = Vec::new();
            pump(&mut relay, |_| {
                let mut buf = [0u8; 64];
                if let Ok(n) = stdout_r.read(&mut buf) {
                    echoed.extend_from_slice(&buf[..n]);
                }
                echoed.starts_with(&input[..3])
            });
            // The box reads the input, then end of input (a read of 0), as from a
            // keyboard's Ctrl-D: after a finished line or an unfinished one alike.
            let mut slave_file = std::fs::File::from(slave);
            for line in lines {
                let mut got = vec![0u8; 64];
                let n = slave_file.read(&mut got).unwrap();
                assert_eq!(&got[..n], *line);
            }
            assert_eq!(
                slave_file.read(&mut [0u8; 64]).unwrap(),
                0,
                "no end of input"
            );
            // The caller's EOF was seen, yet the relay goes on: the workload ends it.
            for _ in 0..5 {
                relay
                    .poll_once(&mut [], Some(Duration::from_millis(10)))
                    .unwrap();
            }
            assert!(!relay.finished());
            slave_file.write_all(b"bye").unwrap();
            drop(slave_file);
            pump(&mut relay, Relay::finished);
            drop(relay);
            drop(stdout_w);
            let mut rest = Vec::new();
            let _ = stdout_r.read_to_end(&mut rest);
            assert!(
                rest.ends_with(b"bye"),
                "output written before the hangup is lost: {rest:?}"
            );
        }
    }

    #[test]
    fn a_terminal_whose_eof_is_disabled_gets_no_nul_at_the_end_of_input() {
        let (master, slave) = pty();
        nonblocking(master.as_fd());
        let mut settings = termios::tcgetattr(slave.as_fd()).unwrap();
        settings.control_chars[libc::VEOF] = 0;
        // Byte by byte, so a NUL typed after the input would be read here.
        settings.local_flags.remove(LocalFlags::ICANON);
        termios::tcsetattr(slave.as_fd(), SetArg::TCSANOW, &settings).unwrap();
        nonblocking(slave.as_fd());
        let (stdin_r, mut stdin_w) = pipe();
        let mut relay = Relay::new();
        relay.input_to_terminal(stdin_r.as_fd(), master.as_fd());
        stdin_w.write_all(b"ab\n").unwrap();
        drop(stdin_w);
        let mut slave_file = std::fs::File::from(slave);
        let mut got = Vec::new();
        for _ in 0..50 {
            relay
                .poll_once(&mut [], Some(Duration::from_millis(10)))
                .unwrap();
            let mut buf = [0u8; 16];
            if let Ok(n) = slave_file.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
        }
        assert_eq!(got, b"ab\n", "only the input, no NUL after it");
    }

    #[test]
    fn input_closing_gives_the_box_end_of_input() {
        let (stdin_r, mut stdin_w) = pipe();
        let (mut box_r, box_w) = pipe();
        let (out_r, out_w) = pipe();
        let mut relay = Relay::new();
        relay
            .input_closing(stdin_r.as_fd(), box_w.into())
            .output(out_r.as_fd(), out_w.as_fd());
        stdin_w.write_all(b"abc").unwrap();
        drop(stdin_w);
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            box_r.read_to_end(&mut got).unwrap();
            got
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !reader.is_finished() {
            assert!(std::time::Instant::now() < deadline, "no EOF for the box");
            relay
                .poll_once(&mut [], Some(Duration::from_millis(20)))
                .unwrap();
        }
        assert_eq!(reader.join().unwrap(), b"abc");
        assert!(!relay.finished(), "the output is still open");
    }

    #[test]
    fn a_resize_wakes_the_relay_with_the_new_size_and_stop_ends_run() {
        let _serial = SERIAL.lock().unwrap();
        let (master, slave) = pty();
        let watcher = ResizeWatcher::install().unwrap();
        assert!(ResizeWatcher::install().is_err(), "one at a time");
        let (out_r, _out_w) = pipe();
        let (sink_r, sink_w) = pipe();
        drop(sink_r);
        let mut relay = Relay::new();
        relay
            .output(out_r.as_fd(), sink_w.as_fd())
            .resizes(&watcher, slave.as_fd());
        let size = WindowSize { rows: 12, cols: 34 };
        set_window_size(master.as_fd(), size).unwrap();
        // SAFETY: raise(2) of a signal our handler records.
        unsafe { libc::raise(libc::SIGWINCH) };
        let got = relay
            .poll_once(&mut [], Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(got, Some(size));
        assert!(!watcher.take(), "taken by the relay");
        let (stop_r, mut stop_w) = pipe();
        stop_w.write_all(b"x").unwrap();
        let mut sizes = Vec::new();
        assert!(!relay.run(stop_r.as_fd(), |s| sizes.push(s)).unwrap());
        drop(relay);
        drop(watcher);
        let again = ResizeWatcher::install().unwrap();
        assert!(!again.take(), "a new watcher starts clean");
    }
}
