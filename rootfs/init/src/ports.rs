//! The VM's stdio channel, guest side: the four named virtio-console ports of
//! [`twinbox_proto::stdio`], found by name, each opened once, and the job read from the
//! control port.
//!
//! The kernel makes `/dev/vport<dev>p<id>` when the host adds a port, but the port's
//! `name` file in sysfs appears only when the host's `PORT_NAME` control message has
//! been handled, in a workqueue, possibly after init started. So init looks for the names
//! every [`WAIT_STEP`] for up to [`WAIT_LIMIT`], opening each port as soon as its name is
//! there. The driver allows one open per port, so each is opened exactly once here and
//! the workload gets dups; the host sees a port closed (EOF) when the last of them goes.

use crate::sys::{self, SysError};
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use twinbox_proto::stdio::{PORTS, PORT_CONTROL};
use twinbox_proto::{Frame, FrameReader, Job};

/// Where the kernel lists virtio-console ports, one directory per port named like its
/// device node.
pub const SYSFS_PORTS: &str = "/sys/class/virtio-ports";
/// How long init waits for all four names before it gives up.
pub const WAIT_LIMIT: Duration = Duration::from_secs(10);
/// How often it looks.
pub const WAIT_STEP: Duration = Duration::from_millis(5);

/// A terminal size from a [`Frame::WindowSize`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

/// The four ports, opened.
#[derive(Debug)]
pub struct Ports {
    /// Host → guest frames (read).
    pub control: File,
    /// The workload's stdin (read).
    pub stdin: File,
    /// The workload's stdout (write).
    pub stdout: File,
    /// The workload's stderr (write).
    pub stderr: File,
}

/// The workload's three ports, once the control port has gone to its [`Control`].
#[derive(Debug)]
pub struct StdioPorts {
    pub stdin: File,
    pub stdout: File,
    pub stderr: File,
}

impl Ports {
    /// The control port's frame stream and the workload's three ports.
    pub fn split(self) -> (Control<File>, StdioPorts) {
        let stdio = StdioPorts {
            stdin: self.stdin,
            stdout: self.stdout,
            stderr: self.stderr,
        };
        (Control::new(self.control), stdio)
    }
}

/// The device node of each port of [`PORTS`] (same order) whose name `class_dir` lists
/// so far: `class_dir/<dir>/name` holding the port's name makes it `dev_dir/<dir>`.
pub fn scan(class_dir: &Path, dev_dir: &Path) -> [Option<PathBuf>; 4] {
    let mut found: [Option<PathBuf>; 4] = Default::default();
    let Ok(entries) = std::fs::read_dir(class_dir) else {
        return found; // the driver has not registered its class yet
    };
    for entry in entries.flatten() {
        let Ok(name) = std::fs::read_to_string(entry.path().join("name")) else {
            continue; // no name yet (or no name at all: not one of ours)
        };
        if let Some(index) = PORTS.iter().position(|p| *p == name.trim_end()) {
            found[index] = Some(dev_dir.join(entry.file_name()));
        }
    }
    found
}

/// Opens the four ports, waiting up to `limit` for their names (see the module docs).
pub fn open(class_dir: &Path, dev_dir: &Path, limit: Duration) -> Result<Ports, SysError> {
    let started = Instant::now();
    let mut opened: [Option<File>; 4] = Default::default();
    loop {
        for (index, path) in scan(class_dir, dev_dir).into_iter().enumerate() {
            let (Some(path), None) = (path, &opened[index]) else {
                continue;
            };
            let flags = if index < 2 {
                libc::O_RDONLY
            } else {
                libc::O_WRONLY
            };
            match sys::open(&path.to_string_lossy(), flags) {
                Ok(fd) => opened[index] = Some(File::from(fd)),
                // The node may trail the name by a moment; look again next round.
                Err(err) if err.errno == libc::ENOENT => {}
                Err(err) => {
                    return Err(SysError::new(
                        format!("port {}: {}", PORTS[index], err.what),
                        err.errno,
                    ))
                }
            }
        }
        if let [Some(_), Some(_), Some(_), Some(_)] = &opened {
            let [control, stdin, stdout, stderr] = opened.map(|f| f.expect("all four"));
            return Ok(Ports {
                control,
                stdin,
                stdout,
                stderr,
            });
        }
        if started.elapsed() >= limit {
            return Err(missing_error(class_dir, &opened, limit));
        }
        std::thread::sleep(WAIT_STEP);
    }
}

fn missing_error(class_dir: &Path, opened: &[Option<File>; 4], limit: Duration) -> SysError {
    let missing: Vec<&str> = PORTS
        .iter()
        .zip(opened)
        .filter(|(_, file)| file.is_none())
        .map(|(name, _)| *name)
        .collect();
    SysError::new(
        format!(
            "virtio-console ports {} not in {} after {} s (the kernel command line says \
             {}; the VMM must add them, named, with its virtio-console device)",
            missing.join(", "),
            class_dir.display(),
            limit.as_secs(),
            twinbox_proto::stdio::PORTS_CMDLINE_FLAG,
        ),
        libc::ENODEV,
    )
}

/// The control port's frame stream: the job first, window sizes afterwards.
#[derive(Debug)]
pub struct Control<R> {
    source: R,
    frames: FrameReader,
    /// Set at end of stream or at a broken frame: nothing more is read.
    closed: bool,
}

impl<R: Read> Control<R> {
    pub fn new(source: R) -> Self {
        Self {
            source,
            frames: FrameReader::new(),
            closed: false,
        }
    }

    /// Reads until the job has arrived. Window sizes before it, and any complete frame
    /// that came in the same reads after it, are returned with it.
    pub fn read_job(&mut self) -> Result<(Job, Vec<WinSize>), SysError> {
        let mut sizes = Vec::new();
        loop {
            while let Some(frame) = self.next_frame()? {
                match frame {
                    Frame::Job(job) => {
                        while let Some(frame) = self.next_frame()? {
                            self.note(frame, &mut sizes);
                        }
                        return Ok((job, sizes));
                    }
                    other => self.note(other, &mut sizes),
                }
            }
            if !self.read_some()? {
                return Err(SysError::new(
                    format!("{PORT_CONTROL}: the host closed the port before sending the job"),
                    libc::EPIPE,
                ));
            }
        }
    }

    /// One read of what is there (the port was polled readable, or is non-blocking);
    /// returns the window sizes it completed. End of stream or a bad frame closes the
    /// stream: the workload goes on without resizes.
    pub fn read_sizes(&mut self) -> Vec<WinSize> {
        let mut sizes = Vec::new();
        if self.closed {
            return sizes;
        }
        match self.read_some() {
            Ok(true) => {}
            Ok(false) => self.closed = true,
            Err(err) if err.errno == libc::EAGAIN => return sizes,
            Err(err) => {
                crate::console::say(&err.to_string());
                self.closed = true;
            }
        }
        loop {
            match self.next_frame() {
                Ok(Some(frame)) => self.note(frame, &mut sizes),
                Ok(None) => return sizes,
                Err(err) => {
                    crate::console::say(&err.to_string());
                    self.closed = true;
                    return sizes;
                }
            }
        }
    }

    /// Whether the stream has ended (nothing more will be read).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The reader, for polling.
    pub fn source(&self) -> &R {
        &self.source
    }

    fn next_frame(&mut self) -> Result<Option<Frame>, SysError> {
        self.frames.next_frame().map_err(|err| {
            self.closed = true;
            SysError::new(format!("{PORT_CONTROL}: {err}"), libc::EINVAL)
        })
    }

    fn note(&self, frame: Frame, sizes: &mut Vec<WinSize>) {
        match frame {
            Frame::WindowSize { rows, cols } => sizes.push(WinSize { rows, cols }),
            Frame::Job(_) => {
                crate::console::say(&format!("{PORT_CONTROL}: a second job frame, ignored"))
            }
        }
    }

    /// Reads once into the frame reader; `false` at end of stream.
    fn read_some(&mut self) -> Result<bool, SysError> {
        let mut buf = [0u8; 16 << 10];
        loop {
            match self.source.read(&mut buf) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.frames.feed(&buf[..n]);
                    return Ok(true);
                }
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    return Err(SysError::new(
                        format!("read {PORT_CONTROL}"),
                        err.raw_os_error().unwrap_or(libc::EIO),
                    ))
                }
            }
        }
    }
}

impl<R: Read + AsRawFd> Control<R> {
    /// Waits up to `limit` for a first window size when none has come yet, so a `-t`
    /// workload starts with the host terminal's size rather than 0x0 plus a `SIGWINCH`.
    /// The host sends it right behind the job; this only covers the two frames landing
    /// in separate reads.
    pub fn await_size(&mut self, limit: Duration) -> Vec<WinSize> {
        let started = Instant::now();
        while !self.closed {
            let left = limit.saturating_sub(started.elapsed());
            let mut fds = [sys::pollfd(Some(&self.source), libc::POLLIN)];
            match sys::poll(&mut fds, left.as_millis() as libc::c_int) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let sizes = self.read_sizes();
                    if !sizes.is_empty() {
                        return sizes;
                    }
                }
            }
            if left.is_zero() {
                break;
            }
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use twinbox_proto::stdio::{PORT_STDERR, PORT_STDIN, PORT_STDOUT};

    fn tempdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "twinbox-init-ports-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A fake `/sys/class/virtio-ports` entry (`name` may be None: not named yet) and,
    /// when `node`, its `/dev` node as a plain file.
    fn add_port(sys: &Path, dev: &Path, dir: &str, name: Option<&str>, node: bool) {
        std::fs::create_dir_all(sys.join(dir)).unwrap();
        if let Some(name) = name {
            std::fs::write(sys.join(dir).join("name"), format!("{name}\n")).unwrap();
        }
        if node {
            std::fs::write(dev.join(dir), b"").unwrap();
        }
    }

    #[test]
    fn ports_are_found_by_name_whatever_their_number() {
        let root = tempdir("scan");
        let (sys, dev) = (root.join("sys"), root.join("dev"));
        std::fs::create_dir_all(&dev).unwrap();
        assert_eq!(scan(&sys, &dev), [None, None, None, None]);
        add_port(&sys, &dev, "vport1p3", Some(PORT_CONTROL), true);
        add_port(&sys, &dev, "vport1p0", Some(PORT_STDERR), true);
        add_port(&sys, &dev, "vport1p1", None, true); // name not handled yet
        add_port(&sys, &dev, "vport2p0", Some("org.qemu.guest_agent.0"), true);
        let found = scan(&sys, &dev);
        assert_eq!(found[0], Some(dev.join("vport1p3")));
        assert_eq!((&found[1], &found[2]), (&None, &None));
        assert_eq!(found[3], Some(dev.join("vport1p0")));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn names_that_appear_late_are_waited_for() {
        let root = tempdir("late");
        let (sys, dev) = (root.join("sys"), root.join("dev"));
        std::fs::create_dir_all(&dev).unwrap();
        add_port(&sys, &dev, "vport0p0", Some(PORT_CONTROL), true);
        add_port(&sys, &dev, "vport0p1", Some(PORT_STDIN), true);
        let (sys2, dev2) = (sys.clone(), dev.clone());
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            add_port(&sys2, &dev2, "vport0p2", Some(PORT_STDOUT), true);
            // Name first, node a moment later: an ENOENT open is retried.
            add_port(&sys2, &dev2, "vport0p3", Some(PORT_STDERR), false);
            std::thread::sleep(Duration::from_millis(50));
            std::fs::write(dev2.join("vport0p3"), b"").unwrap();
        });
        let ports = open(&sys, &dev, Duration::from_secs(5)).unwrap();
        late.join().unwrap();
        for file in [&ports.control, &ports.stdin, &ports.stdout, &ports.stderr] {
            assert!(file.as_raw_fd() > 2);
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn missing_ports_fail_with_their_names_after_the_limit() {
        let root = tempdir("missing");
        let (sys, dev) = (root.join("sys"), root.join("dev"));
        std::fs::create_dir_all(&dev).unwrap();
        add_port(&sys, &dev, "vport0p0", Some(PORT_CONTROL), true);
        add_port(&sys, &dev, "vport0p2", Some(PORT_STDOUT), true);
        let started = Instant::now();
        let err = open(&sys, &dev, Duration::from_millis(200)).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(err.errno, libc::ENODEV);
        assert!(
            err.what
                .starts_with("virtio-console ports twinbox.stdin, twinbox.stderr not in "),
            "{err}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    fn wire(frames: &[Frame]) -> Vec<u8> {
        frames.iter().flat_map(|f| f.encode().unwrap()).collect()
    }

    #[test]
    fn the_job_is_read_from_a_stream_in_pieces_with_the_sizes_around_it() {
        let mut job = Job::new(["/bin/sh", "-c", &"y".repeat(70_000)]);
        job.tty = true;
        let bytes = wire(&[
            Frame::WindowSize { rows: 1, cols: 2 },
            Frame::Job(job.clone()),
            Frame::WindowSize {
                rows: 40,
                cols: 120,
            },
        ]);
        for piece in [1, 5, 4096, bytes.len()] {
            let (mut host, guest) = UnixStream::pair().unwrap();
            let chunks: Vec<Vec<u8>> = bytes.chunks(piece).map(<[u8]>::to_vec).collect();
            let writer = std::thread::spawn(move || {
                for chunk in chunks {
                    host.write_all(&chunk).unwrap();
                }
                host // kept open: the port stays open after the job
            });
            let mut control = Control::new(guest);
            let (got, mut sizes) = control.read_job().unwrap();
            let _host = writer.join().unwrap();
            assert_eq!(got, job, "pieces of {piece}");
            // The trailing size may not have been in the reads that completed the job.
            if sizes.len() < 2 {
                sizes.extend(control.await_size(Duration::from_secs(5)));
            }
            assert_eq!(
                sizes,
                [
                    WinSize { rows: 1, cols: 2 },
                    WinSize {
                        rows: 40,
                        cols: 120
                    }
                ],
                "pieces of {piece}"
            );
        }
    }

    #[test]
    fn a_stream_ending_or_garbled_before_the_job_is_an_error() {
        let (mut host, guest) = UnixStream::pair().unwrap();
        host.write_all(&wire(&[Frame::WindowSize { rows: 1, cols: 1 }]))
            .unwrap();
        drop(host);
        let err = Control::new(guest).read_job().unwrap_err();
        assert_eq!(err.errno, libc::EPIPE);
        assert!(err.what.contains("before sending the job"), "{err}");

        let (mut host, guest) = UnixStream::pair().unwrap();
        host.write_all(&[7, 0, 0, 0, 0]).unwrap();
        let mut control = Control::new(guest);
        let err = control.read_job().unwrap_err();
        assert_eq!(err.errno, libc::EINVAL);
        assert_eq!(err.what, "twinbox.control: control frame of unknown kind 7");
        assert!(control.is_closed());
    }

    #[test]
    fn sizes_after_the_job_are_read_until_the_stream_ends() {
        let (mut host, guest) = UnixStream::pair().unwrap();
        sys::set_nonblocking(&guest).unwrap();
        let mut control = Control::new(guest);
        assert_eq!(control.read_sizes(), []); // EAGAIN: nothing yet, still open
        assert!(!control.is_closed());
        host.write_all(&wire(&[Frame::WindowSize { rows: 9, cols: 8 }])[..3])
            .unwrap();
        assert_eq!(control.read_sizes(), []);
        host.write_all(&wire(&[Frame::WindowSize { rows: 9, cols: 8 }])[3..])
            .unwrap();
        assert_eq!(control.read_sizes(), [WinSize { rows: 9, cols: 8 }]);
        drop(host);
        assert_eq!(control.read_sizes(), []);
        assert!(control.is_closed());
        assert_eq!(control.await_size(Duration::from_secs(1)), []);
    }
}
