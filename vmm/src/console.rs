//! Where the guest's serial console (kernel log, init's own lines) goes: the
//! `--console-log` file and/or stderr with `--verbose` (never the workload's stdout, which
//! has its own port: stdio.rs); and the buffer the report's captured output uses.
//!
//! The serial device runs on a vCPU thread, so its writer must never block in a system
//! call the VMM cannot interrupt: a `write(2)` to a full pipe whose reader went away
//! would hold the vCPU — and with it the run's time limit and SIGTERM — forever. So the
//! vCPU only appends to a bounded in-memory queue ([`ConsoleSink`]); one `vmm-console`
//! thread ([`StdoutWriter`]) per destination moves the queue there, writing only what `poll` says
//! fits, in chunks of at most `PIPE_BUF` (a pipe write that size never blocks once poll
//! says POLLOUT).
//!
//! When the queue is full the vCPU waits for room, like a guest waiting for a UART's
//! transmit register: a slow reader slows the guest, output is not lost. [`StdoutWriter`]'s
//! close (at teardown, before the vCPUs are stopped) releases any waiting vCPU and drops
//! further output; the writer thread then flushes what is queued until the reader has
//! taken nothing for [`FLUSH_STALL`], and exits.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes the queue between the vCPU and the writer thread holds before the vCPU waits.
pub const QUEUE_CAPACITY: usize = 64 << 10;
/// At teardown, how long the writer keeps trying while the reader takes nothing.
pub const FLUSH_STALL: Duration = Duration::from_secs(2);
/// Largest single write: a pipe write of at most PIPE_BUF bytes is atomic and, once poll
/// reported POLLOUT, does not block.
const CHUNK: usize = libc::PIPE_BUF;

/// A captured console, shared between the serial device and the report.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// The text so far (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Several console destinations at once (`--console-log` and `--verbose`), or none: the
/// console is then dropped.
#[derive(Default)]
pub struct Tee(Vec<ConsoleSink>);

impl Tee {
    pub fn push(&mut self, sink: ConsoleSink) {
        self.0.push(sink);
    }
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for sink in &mut self.0 {
            sink.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Turns the tty's `\r\n` line ends back into `\n` so guest output reads like a host
/// program's output (the guest's serial tty has ONLCR on).
pub struct Console<W: Write + Send> {
    inner: W,
}

impl<W: Write + Send> Console<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        Self { inner }
    }
}

impl<W: Write + Send> Write for Console<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let cleaned: Vec<u8> = buf.iter().copied().filter(|b| *b != b'\r').collect();
        self.inner.write_all(&cleaned)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The queue between the serial device (vCPU thread) and the writer thread.
#[derive(Default)]
struct Queue {
    bytes: VecDeque<u8>,
    /// Teardown began: drop new output, wake waiting vCPUs.
    closed: bool,
    /// The reader is gone (EPIPE or another write error): drop everything.
    broken: bool,
    /// The writer is waiting for bytes: only then does a vCPU need to wake it (the
    /// serial device writes one byte at a time, so a wake-up per byte would cost a futex
    /// call per byte on the vCPU).
    writer_waiting: bool,
    /// vCPUs waiting for room.
    sinks_waiting: usize,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when bytes arrive, when room frees up, and on close.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The serial device's end: appends to the queue, waits while it is full.
pub struct ConsoleSink {
    shared: Arc<Shared>,
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut q = self.shared.lock();
        while !q.closed && !q.broken && q.bytes.len() + buf.len() > QUEUE_CAPACITY {
            q.sinks_waiting += 1;
            q = self
                .shared
                .changed
                .wait(q)
                .unwrap_or_else(|p| p.into_inner());
            q.sinks_waiting -= 1;
        }
        if !q.closed && !q.broken {
            q.bytes.extend(buf);
            if q.writer_waiting {
                self.shared.changed.notify_all();
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // The writer thread sends bytes as soon as the reader takes them; nothing waits here.
        Ok(())
    }
}

/// The `vmm-console` thread that moves queued output to stdout. Dropping it closes the
/// queue (releasing any vCPU waiting for room), flushes what it can and joins the thread.
pub struct StdoutWriter {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

impl StdoutWriter {
    /// Starts the writer on `out`; `on_start` runs first on the new thread (the VMM installs
    /// the thread's seccomp filter there). If it fails,
    /// guest output is dropped (the guest is never held up by it).
    pub fn start_on(
        out: OwnedFd,
        on_start: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> std::io::Result<(ConsoleSink, Self)> {
        let shared = Arc::new(Shared::default());
        let theirs = shared.clone();
        let handle = std::thread::Builder::new()
            .name("vmm-console".into())
            .spawn(move || match on_start() {
                Ok(()) => writer_loop(File::from(out), &theirs),
                Err(e) => {
                    tracing::error!("console writer: {e}; guest output is dropped");
                    let mut q = theirs.lock();
                    q.broken = true;
                    q.bytes.clear();
                    theirs.changed.notify_all();
                }
            })?;
        Ok((
            ConsoleSink {
                shared: shared.clone(),
            },
            Self {
                shared,
                handle: Some(handle),
            },
        ))
    }

    /// Closes the queue: waiting vCPUs go on, later output is dropped, the writer flushes
    /// what is queued and ends. Idempotent.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
    }
}

impl Drop for StdoutWriter {
    fn drop(&mut self) {
        self.close();
        if let Some(handle) = self.handle.take() {
            if handle.join().is_err() {
                tracing::error!("the console writer thread panicked");
            }
        }
    }
}

/// Waits until `out` can take a chunk without blocking, or `timeout` passes. True when
/// it can.
fn writable(out: &File, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: out.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    // POLLERR/POLLHUP count as "go ahead": the write then fails and says why.
    n > 0
}

fn writer_loop(mut out: File, shared: &Shared) {
    // How long one poll waits before the loop looks at `closed` again.
    const TICK: Duration = Duration::from_millis(50);
    let mut chunk = Vec::with_capacity(CHUNK);
    // Since when the reader has taken nothing while we had bytes for it.
    let mut stalled_since: Option<Instant> = None;
    loop {
        {
            let mut q = shared.lock();
            while chunk.is_empty() && q.bytes.is_empty() && !q.closed {
                q.writer_waiting = true;
                q = shared.changed.wait(q).unwrap_or_else(|p| p.into_inner());
                q.writer_waiting = false;
            }
            if chunk.is_empty() && q.bytes.is_empty() {
                return; // closed, and everything written
            }
            if q.closed && stalled_since.is_some_and(|t| t.elapsed() >= FLUSH_STALL) {
                tracing::warn!(
                    "console: the reader of stdout took nothing for {FLUSH_STALL:?}; {} bytes \
                     of guest output dropped",
                    q.bytes.len() + chunk.len()
                );
                return;
            }
            if chunk.is_empty() {
                let n = q.bytes.len().min(CHUNK);
                chunk.extend(q.bytes.drain(..n));
                if q.sinks_waiting > 0 {
                    shared.changed.notify_all(); // room for a waiting vCPU
                }
            }
        }
        if !writable(&out, TICK) {
            stalled_since.get_or_insert_with(Instant::now);
            continue;
        }
        match out.write(&chunk) {
            Ok(n) => {
                chunk.drain(..n);
                stalled_since = None;
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::Interrupted
                    || e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!("console: cannot write guest output to stdout: {e}");
                let mut q = shared.lock();
                q.broken = true;
                q.bytes.clear();
                shared.changed.notify_all();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn carriage_returns_are_dropped() {
        let captured = Captured::default();
        let mut console = Console::new(captured.clone());
        console.write_all(b"hi\r\nthere\r\n").unwrap();
        assert_eq!(captured.text(), "hi\nthere\n");
    }

    fn pipe() -> (File, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array we own.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds were just created and are owned by nobody else.
        unsafe {
            use std::os::fd::FromRawFd;
            (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        }
    }

    #[test]
    fn output_reaches_the_reader_in_order() {
        let (mut reader, write_end) = pipe();
        let (mut sink, writer) = StdoutWriter::start_on(write_end, || Ok(())).unwrap();
        for i in 0..1000u32 {
            sink.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        drop(writer); // flushes, then closes its end of the pipe
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        let expected: String = (0..1000u32).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, expected);
    }

    /// The case the queue exists for: nobody reads the pipe, the guest keeps writing.
    /// The "vCPU" (a thread writing to the sink) blocks once the pipe and the queue are
    /// full, and close() releases it; the writer gives up flushing after FLUSH_STALL.
    #[test]
    fn a_stuck_reader_blocks_the_writer_only_until_close() {
        let (reader, write_end) = pipe();
        let (mut sink, writer) = StdoutWriter::start_on(write_end, || Ok(())).unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let vcpu = std::thread::spawn(move || {
            // Far more than a pipe (64 KiB) plus the queue hold.
            for _ in 0..(1 << 20) / 512 {
                sink.write_all(&[b'x'; 512]).unwrap();
            }
            done_tx.send(()).unwrap();
        });
        assert!(
            done_rx.recv_timeout(Duration::from_millis(500)).is_err(),
            "the writer did not block on a full queue: output would have been lost"
        );
        writer.close();
        done_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("close() did not release the blocked vCPU");
        vcpu.join().unwrap();
        let started = Instant::now();
        drop(writer);
        assert!(
            started.elapsed() < FLUSH_STALL + Duration::from_secs(3),
            "the writer thread kept waiting for a reader that never reads"
        );
        drop(reader);
    }

    #[test]
    fn a_closed_reader_drops_output_instead_of_blocking() {
        let (reader, write_end) = pipe();
        drop(reader);
        let (mut sink, writer) = StdoutWriter::start_on(write_end, || Ok(())).unwrap();
        // EPIPE (SIGPIPE is ignored by the Rust runtime) marks the queue broken.
        for _ in 0..(1 << 20) / 512 {
            sink.write_all(&[b'x'; 512]).unwrap();
        }
        drop(writer);
    }
}
