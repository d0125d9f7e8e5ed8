//! The parent side of one run: prepare, clone, release, watch, tear down.

use crate::cgroup::{self, CgroupManager, Limits};
use crate::child::{self, ChildPlan};
use crate::image::{self, LoopDevice};
use crate::rootfs::{self, Disk};
use crate::Error;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;
use twinbox_spec::proto::{Marker, MarkerChannel};
use twinbox_spec::run_spec::OutputMode;
use twinbox_spec::{clock, BoxKind, Outcome, Phase, RunReport, RunSpec, Timeline, Usage};

/// Runs `spec` in a container and reports how it went.
pub fn run(spec: &RunSpec) -> Result<RunReport, Error> {
    run_until::<OwnedFd>(spec, None)
}

/// Like [`run`], but stops the box (SIGKILL, teardown, `Outcome::Failed("interrupted")`)
/// as soon as `stop` (e.g. an eventfd written by a SIGINT handler) becomes readable.
pub fn run_until<F: AsRawFd>(spec: &RunSpec, stop: Option<&F>) -> Result<RunReport, Error> {
    spec.validate()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::NotRoot);
    }
    image::check_ext4(&spec.rootfs)?;
    let disks = spec
        .disks
        .iter()
        .map(|d| {
            let meta = std::fs::metadata(&d.path).map_err(|source| Error::Disk {
                path: d.path.clone(),
                source,
            })?;
            Ok(Disk {
                spec: d.clone(),
                is_dir: meta.is_dir(),
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::os("read /proc/self/mountinfo", e))?;
    let layout = cgroup::detect(&mountinfo)?;

    static RUNS: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "twinbox-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    );
    let mut cgroup = cgroup::create(&layout, &name)?;
    let cpus = spec.cpus.unwrap_or(f64::from(spec.vcpus));
    cgroup.apply(&Limits::new(cpus, spec.memory_mib, spec.pids_limit))?;
    let staging = StagingDir::create(&name)?;
    let mut loop_device = Some(LoopDevice::attach(&spec.rootfs)?);

    let (go_read, go_write) = pipe()?;
    let (ready_read, ready_write) = pipe()?;
    let (marker_read, marker_write) = pipe()?;
    let capture = match spec.output {
        OutputMode::Inherit => None,
        OutputMode::Capture => {
            let (read, write) = pipe()?;
            let null = std::fs::File::open("/dev/null").map_err(|e| Error::os("open /dev/null", e))?;
            Some((read, write, OwnedFd::from(null)))
        }
    };

    let mut job = spec.job();
    job.marker = MarkerChannel::Fd(marker_write.as_raw_fd());
    job.overlay_root = false;
    job.power_off = false;
    // The hostname is set here, before capabilities are dropped: init could not.
    job.hostname = None;
    let token = job
        .encode()
        .map_err(|e| Error::Setup(format!("encode the job: {e}")))?;

    let ops = rootfs::plan(
        staging.path(),
        &loop_device.as_ref().expect("attached").path,
        &disks,
    );
    let mut parent_ends = vec![ready_read.as_raw_fd(), marker_read.as_raw_fd()];
    if let Some((read, _, _)) = &capture {
        parent_ends.push(read.as_raw_fd());
    }
    let strings = vec![
        cstring("/sbin/twinbox-init")?,
        cstring(&format!("{}={token}", twinbox_spec::proto::job::JOB_ENV_VAR))?,
    ];
    let plan = ChildPlan {
        ops,
        new_root: cstring_path(&rootfs::new_root(staging.path()))?,
        hostname: spec.hostname.as_deref().map(cstring).transpose()?,
        init: cstring("/sbin/twinbox-init")?,
        argv: vec![strings[0].as_ptr(), std::ptr::null()],
        envp: vec![strings[1].as_ptr(), std::ptr::null()],
        strings,
        go_read: go_read.as_raw_fd(),
        go_write: go_write.as_raw_fd(),
        ready_write: ready_write.as_raw_fd(),
        parent_ends,
        marker_write: marker_write.as_raw_fd(),
        capture: capture
            .as_ref()
            .map(|(_, write, null)| (write.as_raw_fd(), null.as_raw_fd())),
        last_cap: std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40),
    };

    let mut box_process = clone_child(&plan)?;
    // The child's ends live on in the child only.
    drop((go_read, ready_write, marker_write));
    let capture_read = capture.map(|(read, _, _)| read);
    cgroup.add(box_process.pid)?;
    write_all(&go_write, b"G")?;
    drop(go_write);

    let mut watch = Watch {
        timeline: Timeline::starting_at(spec.spawn_ns),
        ready: Some(ready_read),
        ready_bytes: Vec::new(),
        markers: Some(marker_read),
        marker_bytes: Vec::new(),
        exit_marker: None,
        init_failed: None,
        output: capture_read,
        output_bytes: Vec::new(),
    };
    let started = Instant::now();
    let mut stopped_because = None;
    let status = loop {
        let timeout = spec.time_limit.map(|limit| limit.saturating_sub(started.elapsed()));
        if timeout.is_some_and(|t| t.is_zero()) && stopped_because.is_none() {
            stopped_because = Some(format!(
                "time limit of {:.1} s reached: the container was killed",
                spec.time_limit.unwrap_or_default().as_secs_f64()
            ));
            box_process.kill();
        }
        let events = watch.poll(
            box_process.pidfd.as_raw_fd(),
            stop.map(AsRawFd::as_raw_fd),
            if stopped_because.is_some() { None } else { timeout },
        )?;
        if watch.ready.is_none() {
            // The child mounted the image (or failed): the mount is the loop device's last
            // user now, so it clears when the namespace dies.
            loop_device = None;
        }
        if events.stop && stopped_because.is_none() {
            stopped_because = Some("interrupted".to_owned());
            box_process.kill();
        }
        if events.exited {
            break box_process.reap()?;
        }
    };
    drop(loop_device);
    watch.drain()?;

    let stats = cgroup.stats();
    cgroup.destroy()?;
    drop(cgroup);
    drop(staging);
    watch.timeline.record_now(Phase::TornDown);

    if let Some(message) = watch.setup_failure(&plan.ops) {
        return Err(Error::Setup(message));
    }
    let mut notes = Vec::new();
    let outcome = match (watch.exit_marker, &stopped_because) {
        (_, Some(reason)) => Outcome::Failed(reason.clone()),
        (Some(code), None) => Outcome::from(code),
        (None, None) => Outcome::Failed(match (watch.init_failed, status) {
            (Some(errno), _) => format!(
                "twinbox-init failed: {}",
                std::io::Error::from_raw_os_error(errno as i32)
            ),
            (None, WaitStatus::Signaled(signal)) if stats.oom_killed => {
                format!("twinbox-init was killed by signal {signal} (out of memory)")
            }
            (None, WaitStatus::Signaled(signal)) => {
                format!("twinbox-init was killed by signal {signal}")
            }
            (None, WaitStatus::Exited(code)) => {
                format!("twinbox-init exited with status {code} before the workload exited")
            }
        }),
    };
    if stats.oom_killed {
        notes.push(format!(
            "the container hit its memory limit of {} MiB: the kernel OOM-killed a process",
            spec.memory_mib
        ));
    }
    Ok(RunReport {
        box_kind: BoxKind::Container,
        outcome,
        timeline: watch.timeline,
        output: match spec.output {
            OutputMode::Capture => Some(String::from_utf8_lossy(&watch.output_bytes).into_owned()),
            OutputMode::Inherit => None,
        },
        usage: Usage {
            runtime_peak_rss_kib: own_peak_rss_kib(),
            guest_memory_touched_kib: None,
            cgroup_memory_peak_kib: stats.memory_peak_kib,
            cpu_user_us: stats.cpu_user_us,
            cpu_system_us: stats.cpu_system_us,
            oom_killed: stats.oom_killed,
        },
        notes,
    })
}

fn cstring(s: &str) -> Result<CString, Error> {
    CString::new(s).map_err(|_| Error::Setup(format!("{s:?} contains a NUL byte")))
}

fn cstring_path(p: &Path) -> Result<CString, Error> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Setup(format!("{} contains a NUL byte", p.display())))
}

fn pipe() -> Result<(OwnedFd, OwnedFd), Error> {
    let mut fds = [0; 2];
    // SAFETY: fds is an array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::os("pipe2", std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 just returned two fresh descriptors; each gets one owner.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn write_all(fd: &OwnedFd, bytes: &[u8]) -> Result<(), Error> {
    // SAFETY: writes from a valid slice to our descriptor.
    let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    if n != bytes.len() as isize {
        return Err(Error::os("release the container", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn own_peak_rss_kib() -> Option<u64> {
    // SAFETY: getrusage fills a zeroed struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    (unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0)
        .then_some(usage.ru_maxrss as u64)
}

/// The host directory the child mounts its staging tmpfs on (in its own namespace only).
struct StagingDir(PathBuf);

impl StagingDir {
    fn create(name: &str) -> Result<Self, Error> {
        let base = Path::new("/run");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let path = base.join(name);
        std::fs::create_dir(&path)
            .map_err(|e| Error::os(format!("create {}", path.display()), e))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir(&self.0) {
            tracing::warn!("remove {}: {e}", self.0.display());
        }
    }
}

/// How the box's init ended.
#[derive(Clone, Copy, Debug)]
enum WaitStatus {
    Exited(i32),
    Signaled(i32),
}

/// The cloned child: killed and reaped on drop unless already reaped.
struct BoxProcess {
    pid: i32,
    pidfd: OwnedFd,
    reaped: bool,
}

impl BoxProcess {
    fn kill(&self) {
        // SAFETY: pidfd_send_signal on our own child's pidfd; no memory arguments.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }

    fn reap(&mut self) -> Result<WaitStatus, Error> {
        let mut status = 0;
        loop {
            // SAFETY: waits for our own child.
            let rc = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if rc == self.pid {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(Error::os(format!("wait for container init {}", self.pid), e));
            }
        }
        self.reaped = true;
        Ok(if libc::WIFSIGNALED(status) {
            WaitStatus::Signaled(libc::WTERMSIG(status))
        } else {
            WaitStatus::Exited(libc::WEXITSTATUS(status))
        })
    }
}

impl Drop for BoxProcess {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill();
            let _ = self.reap();
        }
    }
}

/// `clone` with the namespaces and a pidfd, fork-like (no new stack: the child gets a copy
/// of this one). The child runs [`child::main`] and never returns.
fn clone_child(plan: &ChildPlan) -> Result<BoxProcess, Error> {
    let flags = libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWNET
        | libc::CLONE_PIDFD;
    let mut pidfd: libc::c_int = -1;
    // SAFETY: raw clone with a null stack behaves like fork; CLONE_PIDFD stores the pidfd
    // in `pidfd`. The child only runs `child::main`, which does not allocate and exits.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            std::ptr::null_mut::<libc::c_void>(),
            &mut pidfd as *mut libc::c_int,
            std::ptr::null_mut::<libc::c_int>(),
            0 as libc::c_ulong,
        )
    };
    if pid < 0 {
        return Err(Error::os(
            "clone the container (pid, mount, uts, ipc, net namespaces)",
            std::io::Error::last_os_error(),
        ));
    }
    if pid == 0 {
        child::main(plan);
    }
    Ok(BoxProcess {
        pid: pid as i32,
        // SAFETY: the kernel just gave us this pidfd.
        pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) },
        reaped: false,
    })
}

/// What one `poll` round saw.
struct Events {
    exited: bool,
    stop: bool,
}

/// The parent's pipes and what arrived on them.
struct Watch {
    timeline: Timeline,
    ready: Option<OwnedFd>,
    ready_bytes: Vec<u8>,
    markers: Option<OwnedFd>,
    marker_bytes: Vec<u8>,
    exit_marker: Option<twinbox_spec::proto::ExitCode>,
    init_failed: Option<u32>,
    output: Option<OwnedFd>,
    output_bytes: Vec<u8>,
}

/// Reads what is there; `None` at end of file.
fn read_some(fd: RawFd) -> Result<Option<Vec<u8>>, Error> {
    let mut buf = [0u8; 8192];
    loop {
        // SAFETY: reads into a local buffer.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            return Ok(Some(buf[..n as usize].to_vec()));
        }
        if n == 0 {
            return Ok(None);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(Error::os("read from the container", e));
        }
    }
}

impl Watch {
    fn poll(
        &mut self,
        pidfd: RawFd,
        stop: Option<RawFd>,
        timeout: Option<std::time::Duration>,
    ) -> Result<Events, Error> {
        let mut fds = vec![libc::pollfd {
            fd: pidfd,
            events: libc::POLLIN,
            revents: 0,
        }];
        for fd in [
            stop,
            self.ready.as_ref().map(AsRawFd::as_raw_fd),
            self.markers.as_ref().map(AsRawFd::as_raw_fd),
            self.output.as_ref().map(AsRawFd::as_raw_fd),
        ] {
            fds.push(libc::pollfd {
                fd: fd.unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let timeout_ms = timeout.map_or(-1, |t| t.as_millis().clamp(1, i32::MAX as u128) as i32);
        // SAFETY: fds is a valid array of pollfd; negative fds are ignored by poll.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                return Ok(Events {
                    exited: false,
                    stop: false,
                });
            }
            return Err(Error::os("poll", e));
        }
        let ready = |i: usize| fds[i].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
        // Pipes first, so markers written just before exit are stamped before `exited`.
        if ready(2) {
            self.read_ready()?;
        }
        if ready(3) {
            self.read_markers()?;
        }
        if ready(4) {
            self.read_output()?;
        }
        Ok(Events {
            exited: ready(0),
            stop: ready(1),
        })
    }

    fn read_ready(&mut self) -> Result<(), Error> {
        let Some(fd) = &self.ready else { return Ok(()) };
        match read_some(fd.as_raw_fd())? {
            Some(bytes) => {
                let first = self.ready_bytes.is_empty();
                self.ready_bytes.extend_from_slice(&bytes);
                if first && self.ready_bytes[0] == b'R' {
                    self.timeline.record_now(Phase::SandboxReady);
                }
            }
            None => {
                // EOF: close-on-exec fired (exec of init) or the child died.
                if self.ready_bytes == b"R" {
                    self.timeline.record_now(Phase::GuestEntry);
                }
                self.ready = None;
            }
        }
        Ok(())
    }

    fn read_markers(&mut self) -> Result<(), Error> {
        let Some(fd) = &self.markers else { return Ok(()) };
        match read_some(fd.as_raw_fd())? {
            Some(bytes) => {
                let now = clock::monotonic_ns();
                self.marker_bytes.extend_from_slice(&bytes);
                let whole = self.marker_bytes.len() / 4 * 4;
                let chunk: Vec<u8> = self.marker_bytes.drain(..whole).collect();
                for word in chunk.chunks(4) {
                    let value = u32::from_le_bytes(word.try_into().expect("4 bytes"));
                    match Marker::decode(value) {
                        Ok(marker) => {
                            if let Some(phase) = Phase::from_marker(marker.phase()) {
                                self.timeline.record(phase, now);
                            }
                            match marker {
                                Marker::WorkloadExited(code) => self.exit_marker = Some(code),
                                Marker::InitFailed(errno) => self.init_failed = Some(errno),
                                _ => {}
                            }
                        }
                        Err(e) => tracing::warn!("container init: {e}"),
                    }
                }
            }
            None => self.markers = None,
        }
        Ok(())
    }

    fn read_output(&mut self) -> Result<(), Error> {
        let Some(fd) = &self.output else { return Ok(()) };
        match read_some(fd.as_raw_fd())? {
            Some(bytes) => self.output_bytes.extend_from_slice(&bytes),
            None => self.output = None,
        }
        Ok(())
    }

    /// After init is reaped: read every pipe to its end (the pid namespace is gone, so
    /// every writer is too).
    fn drain(&mut self) -> Result<(), Error> {
        while self.ready.is_some() {
            self.read_ready()?;
        }
        while self.markers.is_some() {
            self.read_markers()?;
        }
        while self.output.is_some() {
            self.read_output()?;
        }
        Ok(())
    }

    /// The child's report of a failed setup step, described.
    fn setup_failure(&self, ops: &[rootfs::Op]) -> Option<String> {
        let bytes = self.ready_bytes.strip_prefix(b"R").unwrap_or(&self.ready_bytes);
        let message = bytes.strip_prefix(b"E")?;
        if message.len() < 8 {
            return Some("the container's setup died without a report".into());
        }
        let step = u32::from_le_bytes(message[..4].try_into().expect("4 bytes"));
        let errno = i32::from_le_bytes(message[4..8].try_into().expect("4 bytes"));
        Some(format!(
            "{}: {}",
            child::describe(step, ops),
            std::io::Error::from_raw_os_error(errno)
        ))
    }
}
