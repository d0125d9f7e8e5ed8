//! One container run, from checks to teardown.

use crate::cgroup::{self, Limits};
use crate::child::{self, Prepared};
use crate::{caps, detached, plan, seccomp, sweep, userns, Error};
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;
use twinbox_proto::MarkerChannel;
use twinbox_spec::clock::monotonic_ns;
use twinbox_spec::image::{self, LoopDevice};
use twinbox_spec::interrupt::Interrupt;
use twinbox_spec::outcome::MarkerLog;
use twinbox_spec::run_spec::OutputMode;
use twinbox_spec::{BoxKind, Phase, RunReport, RunSpec, Usage};

static RUNS: AtomicU32 = AtomicU32::new(0);

/// Path of init inside the image.
pub const INIT: &str = "/sbin/twinbox-init";

/// The staging directory, removed when the run ends (its tmpfs lived only in the child's
/// mount namespace).
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The container's init: killed and reaped on drop unless already reaped.
struct Child {
    pid: i32,
    reaped: bool,
}

impl Child {
    fn kill(&self) {
        // SAFETY: kill(2) of our own child; SIGKILL to a pid-namespace init ends the namespace.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
    }

    fn wait(&mut self) -> Result<(i32, libc::rusage), Error> {
        let mut status = 0;
        // SAFETY: zeroed rusage is a valid out-parameter.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: wait4 on our own child with valid out-pointers.
            let r = unsafe { libc::wait4(self.pid, &mut status, 0, &mut usage) };
            if r == self.pid {
                self.reaped = true;
                return Ok((status, usage));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::os("wait for the container", e));
            }
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill();
            let _ = self.wait();
        }
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), Error> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::os("pipe", std::io::Error::from_raw_os_error(e as i32)))
}

fn cstr(s: &str, what: &str) -> Result<CString, Error> {
    CString::new(s).map_err(|_| Error::Setup(format!("{what} contains a NUL byte")))
}

/// Reads until `buf` is full or EOF; returns bytes read.
fn read_full(fd: RawFd, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: reads into the unfilled tail of `buf`.
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n > 0 {
            got += n as usize;
        } else if n == 0
            || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
        {
            break;
        }
    }
    got
}

/// Runs `spec` in a container and reports how it went. Setup problems are errors; the
/// workload's own failures are the report's outcome.
pub fn run(spec: &RunSpec) -> Result<RunReport, Error> {
    let mut log = MarkerLog::new(spec.spawn_ns);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::NotRoot);
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::os("read /proc/self/mountinfo", e))?;
    // What killed runs left behind goes before this run adds its own.
    sweep_leftovers(&mountinfo);
    spec.validate()?;
    image::check_ext4(&spec.rootfs)?;
    for disk in &spec.disks {
        std::fs::metadata(&disk.path).map_err(|source| Error::Disk {
            path: disk.path.clone(),
            source,
        })?;
    }
    let layout = cgroup::detect(&mountinfo)?;
    let pid = std::process::id();
    let start = sweep::start_time(std::path::Path::new("/proc"), pid).ok_or_else(|| {
        Error::Setup("cannot read this process's start time from /proc/self/stat".into())
    })?;
    let name = sweep::run_name(pid, start, RUNS.fetch_add(1, Ordering::SeqCst));
    let cpus = spec.cpus.unwrap_or(f64::from(spec.vcpus));
    let devices = cgroup::device_allowlist(std::path::Path::new("/dev"), &plan::DEVICES)?;
    let mut group = cgroup::create(
        &layout,
        &name,
        Limits::new(cpus, spec.memory_mib, spec.pids_limit).with_devices(devices),
    )?;

    let staging_path = plan::staging_dir(&name);
    std::fs::create_dir_all(sweep::STAGING_ROOT)
        .map_err(|e| Error::os(format!("create {}", sweep::STAGING_ROOT), e))?;
    std::fs::create_dir(&staging_path)
        .map_err(|e| Error::os(format!("create {}", staging_path.display()), e))?;
    let staging = Staging(staging_path);
    let device = LoopDevice::attach(&spec.rootfs)?;
    // The image and the disks are mounted here, as host root, detached; the child
    // attaches them (it could not open the loop device inside its device allowlist).
    let image_mount = detached::ext4(&device.path)?;
    let disk_mounts = spec
        .disks
        .iter()
        .map(|d| detached::bind(&d.path, d.read_only))
        .collect::<Result<Vec<_>, _>>()?;
    let disk_fds: Vec<RawFd> = disk_mounts.iter().map(|fd| fd.as_raw_fd()).collect();
    let plan = plan::build(&staging.0, image_mount.as_raw_fd(), &disk_fds).map_err(Error::Setup)?;

    let (release_r, release_w) = pipe()?;
    let (status_r, status_w) = pipe()?;
    let (marker_r, marker_w) = pipe()?;
    let output = match spec.output {
        OutputMode::Capture => Some(pipe()?),
        OutputMode::Inherit => None,
    };

    let mut job = spec.job();
    job.marker = MarkerChannel::Fd(marker_w.as_raw_fd());
    job.overlay_root = false;
    job.power_off = false;
    // The runtime sets the hostname itself: init runs without CAP_SYS_ADMIN.
    job.hostname = None;
    let token = job
        .encode()
        .map_err(|e| Error::Setup(format!("job: {e}")))?;
    let env_storage = vec![cstr(&format!("TWINBOX_JOB={token}"), "job")?];
    let mut envp: Vec<*const libc::c_char> = env_storage.iter().map(|c| c.as_ptr()).collect();
    envp.push(std::ptr::null());
    let init = cstr(INIT, "init")?;
    // Without --hostname the container is "twinbox", not the host's name.
    let hostname = Some(cstr(
        spec.hostname.as_deref().unwrap_or("twinbox"),
        "hostname",
    )?);
    let prepared = Prepared {
        plan,
        hostname,
        release_fd: release_r.as_raw_fd(),
        status_fd: status_w.as_raw_fd(),
        marker_fd: marker_w.as_raw_fd(),
        output_fd: output.as_ref().map(|(_, w)| w.as_raw_fd()),
        argv: [init.as_ptr(), std::ptr::null()],
        init,
        envp,
        env_storage,
        caps_to_drop: caps::to_drop(caps::last_cap()),
        caps_keep: caps::default_mask(),
        user_namespace: spec.user_namespace,
        parent_fds: [&release_w, &status_r, &marker_r]
            .into_iter()
            .chain(output.as_ref().map(|(r, _)| r))
            .map(|fd| fd.as_raw_fd())
            .collect(),
        // Compiled here: the child after clone must not allocate.
        seccomp: Some(seccomp::container_filter()?),
    };

    let interrupt =
        Interrupt::install().map_err(|e| Error::os("install the SIGINT/SIGTERM handlers", e))?;
    let mut stack = vec![0u8; 256 * 1024];
    let mut flags = nix::sched::CloneFlags::CLONE_NEWPID
        | nix::sched::CloneFlags::CLONE_NEWNS
        | nix::sched::CloneFlags::CLONE_NEWUTS
        | nix::sched::CloneFlags::CLONE_NEWIPC
        | nix::sched::CloneFlags::CLONE_NEWNET;
    if spec.user_namespace {
        // Created first by clone, so it owns every other new namespace.
        flags |= nix::sched::CloneFlags::CLONE_NEWUSER;
    }
    // SAFETY: the child only runs `child::main`, which walks pre-allocated data and makes
    // raw syscalls until it execs or exits.
    let pid = unsafe {
        nix::sched::clone(
            Box::new(|| child::main(&prepared)),
            &mut stack,
            flags,
            Some(libc::SIGCHLD),
        )
    }
    .map_err(|e| {
        Error::os(
            "clone the container",
            std::io::Error::from_raw_os_error(e as i32),
        )
    })?;
    let mut child = Child {
        pid: pid.as_raw(),
        reaped: false,
    };
    drop(release_r);
    drop(status_w);
    drop(marker_w);
    let output_r = output.map(|(r, w)| {
        drop(w);
        r
    });

    let mapped = match spec.user_namespace {
        true => {
            let mut mounts = vec![userns::Detached {
                what: format!("the image mount of {}", spec.rootfs.display()),
                fd: &image_mount,
            }];
            for (disk, fd) in spec.disks.iter().zip(&disk_mounts) {
                mounts.push(userns::Detached {
                    what: format!("the bind of {}", disk.path.display()),
                    fd,
                });
            }
            userns::map(child.pid, &mounts)
        }
        false => Ok(()),
    };
    if let Err(e) = mapped.and_then(|()| group.add(child.pid)) {
        drop(child);
        group.destroy()?;
        return Err(e);
    }
    let release = release_w.as_raw_fd();
    // SAFETY: one byte from the stack into our pipe.
    unsafe { libc::write(release, [1u8].as_ptr().cast(), 1) };
    drop(release_w);

    // Status records until the pipe closes on exec.
    let mut failure = None;
    loop {
        let mut record = [0u8; 8];
        if read_full(status_r.as_raw_fd(), &mut record) < 8 {
            break;
        }
        let code = u32::from_le_bytes(record[..4].try_into().unwrap_or_default());
        let errno = i32::from_le_bytes(record[4..].try_into().unwrap_or_default());
        if code == child::READY {
            log.timeline_mut()
                .record(Phase::SandboxReady, monotonic_ns());
        } else {
            failure = Some((code, errno));
        }
    }
    if let Some((code, errno)) = failure {
        let what = child::describe(code, &prepared.plan);
        drop(child);
        group.destroy()?;
        return Err(Error::Setup(format!(
            "{what}: {}",
            std::io::Error::from_raw_os_error(errno)
        )));
    }
    log.timeline_mut().record(Phase::GuestEntry, monotonic_ns());
    // The child attached its copy; ours must go for the loop device to clear.
    drop(image_mount);
    drop(disk_mounts);
    // The mount now holds the image; the loop device clears itself when it goes.
    let loop_backing = PathBuf::from("/sys/block")
        .join(device.path.file_name().unwrap_or_default())
        .join("loop/backing_file");
    drop(device);

    let mut notes: Vec<String> = layout.device_note().into_iter().collect();
    let mut captured = Vec::new();
    let started = Instant::now();
    let mut stop_reason = None;
    let mut marker_open = true;
    let mut output_open = output_r.is_some();
    while marker_open || output_open {
        let fd_if = |open: bool, fd: RawFd| if open { fd } else { -1 };
        let mut fds = [
            libc::pollfd {
                fd: fd_if(marker_open, marker_r.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: output_r
                    .as_ref()
                    .map_or(-1, |r| fd_if(output_open, r.as_raw_fd())),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: interrupt.fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // The timeout only bounds how late a time limit is noticed.
        // SAFETY: polls our own descriptors.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        if fds[0].revents != 0 {
            let mut buf = [0u8; 64];
            // SAFETY: reads into a stack buffer.
            let n = unsafe { libc::read(marker_r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                marker_open = false;
            } else {
                log.feed(&buf[..n as usize], monotonic_ns());
            }
        }
        if let (Some(r), true) = (&output_r, fds[1].revents != 0) {
            let mut buf = [0u8; 4096];
            // SAFETY: reads into a stack buffer.
            let n = unsafe { libc::read(r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                output_open = false;
            } else {
                captured.extend_from_slice(&buf[..n as usize]);
            }
        }
        if let Some(signal) = interrupt.signal() {
            stop_reason = Some(format!("interrupted by signal {signal}"));
        } else if spec
            .time_limit
            .is_some_and(|limit| started.elapsed() >= limit)
        {
            stop_reason = Some(format!(
                "time limit of {:?} reached",
                spec.time_limit.unwrap_or_default()
            ));
        }
        if stop_reason.is_some() {
            child.kill();
            break;
        }
    }
    let (status, rusage) = child.wait()?;
    drop(interrupt);
    let stats = group.stats();
    group.destroy()?;
    drop(group);
    drop(staging);
    // The last mount of the image went with the mount namespace; autoclear detaches the
    // loop device right after (asynchronously): torn down means it is free again.
    let freed = wait_until(|| !loop_backing.exists());
    log.timeline_mut().record(Phase::TornDown, monotonic_ns());
    if !freed {
        notes.push(format!(
            "{} still attached 2 s after the run",
            loop_backing.display()
        ));
    }
    let finished = log.finish(|| describe_wait_status(status));
    // A stop (signal, time limit) is the run's end even if the workload's exit raced it.
    let outcome = match stop_reason {
        Some(reason) => twinbox_spec::Outcome::Failed(reason),
        None => finished.outcome,
    };
    let timeline = finished.timeline;
    notes.extend(finished.notes);
    if stats.oom_killed {
        notes.push(format!(
            "the container hit its memory limit of {} MiB: OOM killer struck",
            spec.memory_mib
        ));
    }
    let tv_us = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000 + tv.tv_usec as u64;
    Ok(RunReport {
        box_kind: BoxKind::Container,
        outcome,
        timeline,
        output: output_r.map(|_| String::from_utf8_lossy(&captured).into_owned()),
        usage: Usage {
            runtime_peak_rss_kib: rss_kib(),
            guest_memory_touched_kib: None,
            cgroup_memory_peak_kib: stats.memory_peak_kib,
            cpu_user_us: Some(tv_us(rusage.ru_utime)),
            cpu_system_us: Some(tv_us(rusage.ru_stime)),
            oom_killed: stats.oom_killed,
        },
        notes,
    })
}

/// Removes the cgroups and staging directories of runs whose twinbox died; a leftover
/// that cannot be removed is logged, and does not stop this run.
fn sweep_leftovers(mountinfo: &str) {
    let swept = sweep::sweep(&sweep::Places::host(mountinfo));
    for path in &swept.removed {
        tracing::info!(path = %path.display(), "removed a leftover of a killed run");
    }
    for failure in &swept.failed {
        tracing::warn!("leftover of a killed run: {failure}");
    }
}

/// How init ended, in words, for a run whose workload never reported an exit.
fn describe_wait_status(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!(
            "twinbox-init exited with status {}",
            libc::WEXITSTATUS(status)
        )
    } else if libc::WIFSIGNALED(status) {
        format!(
            "twinbox-init was killed by signal {}",
            libc::WTERMSIG(status)
        )
    } else {
        format!("unexpected wait status {status:#x}")
    }
}

/// Polls `done` every 200 µs for up to 2 s.
fn wait_until(done: impl Fn() -> bool) -> bool {
    for _ in 0..10_000 {
        if done() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    false
}

/// Our own peak RSS (VmHWM), KiB.
fn rss_kib() -> Option<u64> {
    twinbox_spec::host::self_status_kib("VmHWM")
}
