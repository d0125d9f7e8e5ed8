//! The VM's stdio on the host: pipes between the caller's fds and the console device's
//! four ports (`twinbox_spec::proto::stdio`), and the threads that move bytes through them.
//!
//! ```text
//!  caller fd 0 ──stdin pump──▶ pipe ──▶ port twinbox.stdin  ──▶ guest workload fd 0
//!  job, window sizes ─control─▶ pipe ──▶ port twinbox.control ─▶ twinbox-init
//!  caller fd 1 ◀─stdout pump── pipe ◀── port twinbox.stdout ◀── guest workload fd 1
//!  caller fd 2 ◀─stderr pump── pipe ◀── port twinbox.stderr ◀── guest workload fd 2
//! ```
//!
//! Why pipes between the device and the caller's fds: the device runs on the event loop,
//! which must never block, so it needs non-blocking, pollable ends. The caller's own fds
//! may be regular files (not pollable) or shared with a parent shell (setting O_NONBLOCK
//! on them would change the shell's file description too). The pipe is also the bounded
//! queue: when the reader of our stdout is slow, the pipe fills, the device stops taking
//! the guest's buffers and the guest's writes wait; nothing is lost or buffered without
//! bound. Each pump is a thread doing blocking-style copies under `poll`, so a stop
//! request always gets through.
//!
//! Ends: a stdin pump ends at the caller's end of input (the device then closes the
//! port, the guest reads EOF) or when stopped; an output pump ends when the device
//! drops its end (guest closed the port, or teardown) and the pipe is drained, or when
//! the caller's reader took nothing for [`FLUSH_STALL`] after the stop.

use crate::console::{Captured, FLUSH_STALL};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use twinbox_spec::proto::stdio::Frame;
use twinbox_spec::proto::Job;
use twinbox_spec::run_spec::{OutputMode, StdinMode};
use twinbox_spec::terminal::caller_window_size;
use twinbox_spec::RunSpec;
use vmm_sys_util::eventfd::EventFd;

/// Bytes one pump moves per read.
const CHUNK: usize = 64 << 10;
/// The pipes' capacity (the kernel rounds to pages; 1 MiB is the default
/// /proc/sys/fs/pipe-max-size, so root and non-root get it alike).
const PIPE_CAPACITY: i32 = 1 << 20;
/// How long one poll waits before a pump looks at the stop flag again.
const TICK: Duration = Duration::from_millis(50);

/// The device's ends of the four ports, in `proto::stdio::PORTS` order: read ends for the
/// host→guest ports (control, stdin), write ends for the guest→host ones (stdout,
/// stderr); all non-blocking.
pub(crate) struct DeviceEnds {
    pub control: OwnedFd,
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// The host side of the VM's stdio while the VM runs. Dropping it stops the pumps that
/// wait on the caller (stdin, control) and joins every pump; call it after the device
/// has been dropped, so the output pumps see their end of input.
pub(crate) struct GuestStdio {
    stop: Arc<EventFd>,
    pumps: Vec<JoinHandle<()>>,
    /// One message per pump that ended.
    ended: Receiver<()>,
    captured: Option<Captured>,
    /// Before a job (a VM being snapshotted): the write end of the guest's stdin, held
    /// open and silent until this is dropped (see `start_with`).
    _silent_stdin: Option<OwnedFd>,
}

/// What a pump thread runs first (the VMM installs its seccomp filter there).
pub(crate) type OnStart = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

impl GuestStdio {
    /// Makes the pipes and starts the pumps for `spec`; `job` goes first on the control
    /// port. `winch` becomes readable when the caller's terminal was resized (`-t`).
    pub(crate) fn start(
        spec: &RunSpec,
        job: &Job,
        winch: Option<OwnedFd>,
        on_start: OnStart,
    ) -> std::io::Result<(Self, DeviceEnds)> {
        Self::start_with(spec, Some(job), winch, on_start)
    }

    /// [`Self::start`], or without a job: the control and stdin ports then stay open and
    /// silent, and init waits on the control port (a VM being snapshotted before its job:
    /// an end of input reaching the guest before the pause would be in every restore, and
    /// each restored workload would read end of input at once).
    pub(crate) fn start_with(
        spec: &RunSpec,
        job: Option<&Job>,
        winch: Option<OwnedFd>,
        on_start: OnStart,
    ) -> std::io::Result<(Self, DeviceEnds)> {
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let mut pumps = Vec::new();
        let (ended_tx, ended) = channel();
        let spawn = |name: &str, body: Box<dyn FnOnce() + Send>| {
            let on_start = on_start.clone();
            let ended = ended_tx.clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    match on_start() {
                        Ok(()) => body(),
                        Err(e) => tracing::error!("stdio pump: {e}; its stream is dropped"),
                    }
                    let _ = ended.send(());
                })
        };

        // Control: the job, then (with a tty) the window size now and after each resize.
        let (control_guest, control_host) = pipe(Side::Read)?;
        let mut frames: Vec<Frame> = job.map(|job| Frame::Job(job.clone())).into_iter().collect();
        if spec.tty {
            frames.extend(caller_window_size().map(|ws| Frame::WindowSize {
                rows: ws.rows,
                cols: ws.cols,
            }));
        }
        let mut wire = Vec::new();
        for frame in frames {
            wire.extend(frame.encode().map_err(std::io::Error::other)?);
        }
        let s = stop.clone();
        pumps.push(spawn(
            "vmm-control",
            Box::new(move || control_pump(File::from(control_host), wire, winch, &s)),
        )?);

        // stdin: the caller's, or end of input at once (the write end closes right here);
        // before a job, held open and silent.
        let (stdin_guest, stdin_host) = pipe(Side::Read)?;
        let mut silent_stdin = None;
        if job.is_none() {
            silent_stdin = Some(stdin_host);
        } else if spec.stdin == StdinMode::Inherit {
            let caller = std::io::stdin().as_fd().try_clone_to_owned()?;
            let s = stop.clone();
            pumps.push(spawn(
                "vmm-stdin",
                Box::new(move || input_pump(File::from(caller), File::from(stdin_host), &s)),
            )?);
        }

        // stdout and stderr: to the caller's, or both into the report.
        let captured = (spec.output == OutputMode::Capture).then(Captured::default);
        let (stdout_guest, stdout_host) = pipe(Side::Write)?;
        let (stderr_guest, stderr_host) = pipe(Side::Write)?;
        for (name, from, fd) in [
            ("vmm-stdout", stdout_host, 1),
            ("vmm-stderr", stderr_host, 2),
        ] {
            let to: Box<dyn Write + Send> = match &captured {
                Some(c) => Box::new(c.clone()),
                None => Box::new(File::from(caller_fd(fd)?)),
            };
            let s = stop.clone();
            pumps.push(spawn(
                name,
                Box::new(move || output_pump(File::from(from), to, &s)),
            )?);
        }

        Ok((
            Self {
                stop,
                pumps,
                ended,
                captured,
                _silent_stdin: silent_stdin,
            },
            DeviceEnds {
                control: control_guest,
                stdin: stdin_guest,
                stdout: stdout_guest,
                stderr: stderr_guest,
            },
        ))
    }

    /// Ends the pumps (see `Drop`) and returns what the workload wrote, in capture mode.
    /// Call after the device is gone, so the output pumps have seen their end of input.
    pub(crate) fn finish(self) -> Option<String> {
        let captured = self.captured.clone();
        drop(self);
        captured.map(|c| c.text())
    }
}

impl Drop for GuestStdio {
    /// Stops the pumps and joins them. A pump stuck in a write to a caller's reader that
    /// takes nothing (a full pipe nobody drains) cannot be interrupted: after
    /// [`FLUSH_STALL`] and a grace second it is left behind, detached, with a warning,
    /// rather than hanging the run's end.
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        let deadline = Instant::now() + FLUSH_STALL + Duration::from_secs(1);
        let mut ended = 0;
        while ended < self.pumps.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.ended.recv_timeout(left) {
                Ok(()) => ended += 1,
                Err(_) => break,
            }
        }
        if ended < self.pumps.len() {
            tracing::warn!(
                "{} stdio pump(s) still blocked writing to a reader that takes nothing; left \
                 behind",
                self.pumps.len() - ended
            );
            return;
        }
        for pump in self.pumps.drain(..) {
            if pump.join().is_err() {
                tracing::error!("a stdio pump thread panicked");
            }
        }
    }
}

/// A duplicate of the caller's fd `fd` (1 or 2).
fn caller_fd(fd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: fds 1 and 2 stay open for the life of the process; we only duplicate.
    unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()
}

/// Which end of a pipe the device gets (non-blocking); the other end is the pump's.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    Read,
    Write,
}

/// A pipe as (device end, pump end), both close-on-exec, the device's non-blocking.
fn pipe(device: Side) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and belong to nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // A larger pipe means fewer wake-ups per MiB; failing to grow it only costs speed.
    // SAFETY: F_SETPIPE_SZ takes an int.
    unsafe { libc::fcntl(r.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_CAPACITY) };
    let (device_end, pump_end) = match device {
        Side::Read => (r, w),
        Side::Write => (w, r),
    };
    set_nonblocking(&device_end)?;
    Ok((device_end, pump_end))
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Waits until `fd` has `events` or `stop` fires or `timeout` passes. Returns
/// (fd ready, stop fired).
fn wait(fd: BorrowedFd<'_>, events: i16, stop: &EventFd, timeout: Duration) -> (bool, bool) {
    let mut pfds = [
        libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: two valid pollfds for the duration of the call.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, ms) };
    if n <= 0 {
        return (false, false);
    }
    // POLLHUP/POLLERR count as ready: the read or write then says what happened.
    (pfds[0].revents != 0, pfds[1].revents != 0)
}

/// Writes all of `bytes` to the pipe `to`, giving up when `stop` fires.
fn write_all_until_stop(to: &mut File, mut bytes: &[u8], stop: &EventFd) -> bool {
    while !bytes.is_empty() {
        let (ready, stopped) = wait(to.as_fd(), libc::POLLOUT, stop, TICK);
        if stopped {
            return false;
        }
        if !ready {
            continue;
        }
        match to.write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// The caller's stdin into the stdin port's pipe, until end of input or stop. Dropping
/// `to` at the end is the guest's end of input.
fn input_pump(mut from: File, mut to: File, stop: &EventFd) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let (ready, stopped) = wait(from.as_fd(), libc::POLLIN, stop, TICK);
        if stopped {
            return;
        }
        if !ready {
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("stdin: {e}; the workload gets end of input");
                return;
            }
        };
        if !write_all_until_stop(&mut to, &buf[..n], stop) {
            return;
        }
    }
}

/// The control port's frames: `first` (the job, maybe a window size), then a window
/// size after each resize signalled on `winch`. Keeps the pipe open until stop, so init
/// never reads end of input on its control port while the VM runs.
fn control_pump(mut to: File, first: Vec<u8>, winch: Option<OwnedFd>, stop: &EventFd) {
    if !write_all_until_stop(&mut to, &first, stop) {
        return;
    }
    let Some(winch) = winch else {
        // Nothing more to send: hold the pipe open until the run ends.
        let mut pfd = libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of each call.
        while unsafe { libc::poll(&mut pfd, 1, -1) } <= 0 {}
        return;
    };
    let mut winch = File::from(winch);
    loop {
        let (ready, stopped) = wait(winch.as_fd(), libc::POLLIN, stop, Duration::from_secs(3600));
        if stopped {
            return;
        }
        if !ready {
            continue;
        }
        let mut drain = [0u8; 64];
        let _ = winch.read(&mut drain);
        if let Some(ws) = caller_window_size() {
            let frame = Frame::WindowSize {
                rows: ws.rows,
                cols: ws.cols,
            }
            .encode()
            .expect("a window-size frame always encodes");
            if !write_all_until_stop(&mut to, &frame, stop) {
                return;
            }
        }
    }
}

/// A guest→host port's pipe into the caller's fd (or the capture buffer), until the
/// device closes its end and the pipe is empty. After stop, gives up once the caller's
/// reader took nothing for [`FLUSH_STALL`].
fn output_pump(mut from: File, mut to: Box<dyn Write + Send>, stop: &EventFd) {
    let mut buf = vec![0u8; CHUNK];
    let mut stopped_at: Option<Instant> = None;
    loop {
        let (ready, stopped) = wait(from.as_fd(), libc::POLLIN, stop, TICK);
        if stopped {
            stopped_at.get_or_insert_with(Instant::now);
        }
        if !ready {
            if stopped_at.is_some_and(|t| t.elapsed() >= FLUSH_STALL) {
                return;
            }
            if stopped {
                // The stop eventfd stays readable: do not spin on it.
                std::thread::sleep(Duration::from_millis(5));
            }
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => return, // the device closed its end and everything was read
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if let Err(e) = to.write_all(&buf[..n]) {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                tracing::warn!("workload output: {e}; the rest is dropped");
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinbox_spec::proto::FrameReader;

    fn no_filter() -> OnStart {
        Arc::new(|| Ok(()))
    }

    /// What the device would do: read the control and stdin ends, write the output ends.
    #[test]
    fn the_device_ends_carry_the_job_in_and_the_workload_output_out() {
        let mut spec = RunSpec::new("/img", vec!["/bin/echo".into(), "x".repeat(5000)]);
        spec.output = OutputMode::Capture;
        let job = spec.job();
        let (stdio, ends) = GuestStdio::start(&spec, &job, None, no_filter()).unwrap();

        // The job arrives whole on the control port's end (non-blocking: poll first).
        let mut control = File::from(ends.control);
        let mut frames = FrameReader::new();
        let mut buf = [0u8; 4096];
        let got = loop {
            let stop = EventFd::new(0).unwrap();
            wait(control.as_fd(), libc::POLLIN, &stop, Duration::from_secs(5));
            let n = control.read(&mut buf).unwrap();
            frames.feed(&buf[..n]);
            if let Some(frame) = frames.next_frame().unwrap() {
                break frame;
            }
        };
        assert_eq!(got, Frame::Job(job));

        // stdin is Null: its end reads end of input at once.
        let mut stdin = File::from(ends.stdin);
        assert_eq!(stdin.read(&mut buf).unwrap(), 0);

        // Output written on the device's ends is captured, stdout and stderr both.
        File::from(ends.stdout).write_all(b"out\n").unwrap();
        File::from(ends.stderr).write_all(b"").unwrap();
        assert_eq!(stdio.finish().as_deref(), Some("out\n"));
    }

    #[test]
    fn every_byte_value_passes_through_an_output_pump() {
        let mut spec = RunSpec::new("/img", vec!["true".into()]);
        spec.output = OutputMode::Capture;
        let (stdio, ends) = GuestStdio::start(&spec, &spec.job(), None, no_filter()).unwrap();
        let bytes: Vec<u8> = (0..=255u8).cycle().take(3 << 20).collect();
        let mut out = File::from(ends.stdout);
        let writer = std::thread::spawn(move || {
            let mut rest = &bytes[..];
            let stop = EventFd::new(0).unwrap();
            while !rest.is_empty() {
                wait(out.as_fd(), libc::POLLOUT, &stop, Duration::from_secs(5));
                match out.write(rest) {
                    Ok(n) => rest = &rest[n..],
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            bytes
        });
        let sent = writer.join().unwrap();
        drop(ends.stderr);
        let captured = stdio.finish().unwrap();
        // Capture keeps text (lossy UTF-8); compare the length of a lossless prefix instead.
        assert_eq!(
            captured.len(),
            String::from_utf8_lossy(&sent).len(),
            "everything written was captured"
        );
    }
}
