//! One container run. [`run`] tells the story top to bottom, in numbered steps:
//!
//! 1. **sweep** — remove what killed runs left behind (`sweep.rs`), on a thread beside
//!    the steps below, finished before the run counts itself torn down;
//! 2. **check** — root, the spec, the image is ext4, the disks exist, CAP_NET_ADMIN with
//!    `--net`, the cgroup layout, the host's init is built, so bad input costs nothing and
//!    leaves nothing behind;
//! 3. **cgroup** — the run's cgroup: cpu quota, memory without swap, pids, the device
//!    allowlist (`cgroup.rs`), made on a thread of its own beside step 4;
//! 4. **rootfs** — the staging directory (one for every run: the child mounts its own
//!    tmpfs over it in its own mount namespace), the image on a read-only autoclear loop
//!    device (or, for an OCI image's layers, one read-only bind per layer: overlayfs lower
//!    directories, no loop device), the image, the host's init and the disks as detached
//!    mounts, the mount plan (`plan.rs`);
//! 5. **child** — with `--net` a link leased (`hostnet`: its addresses go into the job),
//!    with `--userns` the run's own range of host ids (`userns.rs`);
//!    the channel, the job, everything the child needs prepared; `clone` into new
//!    pid/mnt/uts/ipc/net (and user) namespaces (`child.rs` runs there), born inside the
//!    run's cgroup (`cgroup::Birth`: no move of a running task, whose RCU grace period
//!    cost 5–17 ms per run);
//! 6. **admit** — with `--userns` the maps and idmapped mounts (`userns.rs`); with
//!    `--net` the veth pair made into the child's network
//!    namespace (`eth0` there, `tb<i>` on the host) and, with `--net nat`, the NAT table;
//!    the child is released (init configures `eth0` from the job);
//! 7. **ready** — the child reports the sandbox ready (or which step failed), then the
//!    channel closes on the exec of init; with `-t` it sends the master of the pty it made
//!    on the box's devpts first, which gets the caller's window size before init runs;
//! 8. **run** — markers and output until init ends, a signal or the time limit; with `-t`
//!    the pty relayed to the caller (`tty.rs`: raw mode, resizes) until its master hangs up;
//! 9. **teardown** — reap, the link (the pair goes with the namespace; the lease is
//!    freed), cgroup readout and removal, loop device;
//! 10. **report** — outcome from the markers (`twinbox_spec::outcome`), timeline, usage.
//!
//! Every resource is held by a guard that releases it on every path (the child killed
//! and reaped first, then the link, the mounts, the loop device, the cgroup: the reverse
//! of how they were taken), and every privileged call goes through [`Syscall`], so the tests below check the order of steps and cleanups without root.

use crate::cgroup::{self, Limits};
use crate::channel::{self, FromChild, ParentSide};
use crate::child::{self, Prepared};
use crate::shared_image::Released;
use crate::syscall::{HeldImage, Leased, Linked, Real, Reaped, Syscall};
use crate::{caps, plan, seccomp, sweep, tty, userns, Error};
use nix::sched::CloneFlags;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};
use twinbox_proto::{MarkerChannel, NetConfig};
use twinbox_spec::clock::monotonic_ns;
use twinbox_spec::image;
use twinbox_spec::interrupt::Interrupt;
use twinbox_spec::outcome::MarkerLog;
use twinbox_spec::run_spec::{NetMode, OutputMode, StdinMode};
use twinbox_spec::terminal::{self, ResizeWatcher};
use twinbox_spec::{BoxKind, Outcome, Phase, RunReport, RunSpec, Usage};

/// Path of init inside the container: the host's twinbox-init, bound read-only there by
/// the runtime (`plan.rs`), whatever the image holds.
pub const INIT: &str = plan::INIT;

/// Runs `spec` in a container and reports how it went. Setup problems are errors; the
/// workload's own failures are the report's outcome.
pub fn run(spec: &RunSpec) -> Result<RunReport, Error> {
    run_with(&Real, spec)
}

/// [`run`] with the privileged calls made by `sys`.
pub(crate) fn run_with(sys: &dyn Syscall, spec: &RunSpec) -> Result<RunReport, Error> {
    let mut log = MarkerLog::new(spec.spawn_ns);

    // 1–2. Leftovers of killed runs, then everything checked before anything is made.
    if !sys.is_root() {
        return Err(Error::NotRoot);
    }
    let mountinfo = sys.mountinfo()?;
    // Beside this run's start, on a thread of its own; finished before the run is torn
    // down.
    let sweeping = sys.start_sweep(mountinfo.clone());
    check(spec)?;
    let host_init = sys.host_init()?;
    if spec.net.is_some() && !sys.can_admin_network() {
        return Err(Error::NoNetAdmin);
    }
    let layout = cgroup::detect(&mountinfo)?;
    let mut notes = Vec::new();
    let name = run_name()?;

    // 3. The cgroup, made on a thread of its own while step 4 goes on (`PendingCgroup`).
    let cpus = spec.cpus.unwrap_or(f64::from(spec.vcpus));
    let devices = cgroup::device_allowlist(Path::new("/dev"), &plan::DEVICES)?;
    let limits = Limits::new(cpus, spec.memory_mib, spec.pids_limit).with_devices(devices);
    let pending_group = sys.create_cgroup(&layout, &name, limits);
    // Declared here, so that on every path it goes after what the steps below take.
    let mut group;

    // 4. The root filesystem, ready to attach.
    // The staging tmpfs goes over one fixed directory inside the child's own mount
    // namespace: no directory per run to make and remove on the host.
    let staging = plan::staging_dir();
    sys.create_dir(&staging)?;
    // Mounted here, as host root, detached: the child attaches them (inside its device
    // allowlist it could not open the loop device; in a user namespace not mount ext4).
    // The image's read-only mount is shared with every other run of it (`shared_image.rs`):
    // this run holds it and gives the child a clone of its own.
    // No entry of the image may steer where the plan mounts or creates (`plan.rs`).
    let mount_points = plan::image_mount_points(spec.disks.len());
    let mut image = ImageGuard { sys, held: None };
    let root_mounts = match &spec.rootfs_layers {
        None => {
            let held = image.held.insert(sys.hold_image(&spec.rootfs)?);
            let image_mount = sys.clone_image(held)?;
            sys.check_mount_points(&image_mount, &mount_points)?;
            RootMounts::Image(image_mount)
        }
        // An image's layers: one read-only bind each, stacked by the child's overlay.
        Some(layers) => {
            sys.check_layers_mount_points(layers, &mount_points)?;
            RootMounts::Layers(
                layers
                    .iter()
                    .map(|dir| sys.bind_layer(dir))
                    .collect::<Result<Vec<_>, _>>()?,
            )
        }
    };
    let init_mount = sys.bind_init(&host_init)?;
    let disk_mounts = spec
        .disks
        .iter()
        .map(|d| sys.bind_disk(&d.path, d.read_only))
        .collect::<Result<Vec<_>, _>>()?;
    let disk_fds: Vec<RawFd> = disk_mounts.iter().map(AsRawFd::as_raw_fd).collect();
    let plan = plan::build(
        &staging,
        &root_mounts.lower(spec.user_namespace),
        init_mount.as_raw_fd(),
        &disk_fds,
    )
    .map_err(Error::Setup)?;

    // 5. The child. Its link first: the addresses travel in the job, sealed before clone.
    let mut network = Network::None;
    let mut net_config = None;
    let mut link_info = None;
    if let Some(mode) = spec.net {
        let leased = sys.lease_link(mode)?;
        let resolver = sys.host_resolver();
        if let Some(reason) = resolver.reason() {
            notes.push(format!("network: no resolver in the box: {reason}"));
        }
        net_config = Some(NetConfig {
            resolver: resolver.address(),
            ..leased.config
        });
        network = Network::Leased(leased);
    }
    let (mut parent, child_side) = channel::channel()?;
    let (marker_r, marker_w) = pipe()?;
    let output = match spec.output {
        OutputMode::Capture => Some(pipe()?),
        OutputMode::Inherit => None,
    };
    let mut parent_fds = parent.raw_fds();
    parent_fds.push(marker_r.as_raw_fd());
    parent_fds.extend(output.as_ref().map(|(r, _)| r.as_raw_fd()));
    let prepared = prepare(
        spec,
        plan,
        &child_side,
        marker_w.as_raw_fd(),
        output.as_ref().map(|(_, w)| w.as_raw_fd()),
        parent_fds,
        net_config,
    )?;
    let interrupt =
        Interrupt::install().map_err(|e| Error::os("install the SIGINT/SIGTERM handlers", e))?;
    // Before the child: a resize from here on is forwarded once the relay runs.
    let mut watcher = None;
    if spec.tty && terminal::caller_window_size().is_some() {
        watcher = ResizeWatcher::install()
            .inspect_err(|e| notes.push(format!("terminal resizes not forwarded: {e}")))
            .ok();
    }
    // The child is born in it.
    group = pending_group.wait()?;
    // Nothing to admit (no user namespace to map, no link to make, no terminal to size
    // before init runs): the child may run on this process's memory while this thread
    // waits, released before it exists (`clone_flags`).
    let to_admit = spec.user_namespace || spec.net.is_some() || spec.tty;
    // This run's own host ids, held until the child is reaped (dropped after it).
    let id_lease = spec.user_namespace.then(|| sys.lease_ids()).transpose()?;
    let mut child = ChildGuard {
        sys,
        // Born inside the run's cgroup: no move of a running task (`cgroup.rs`: Birth).
        pid: sys.spawn(
            &prepared,
            clone_flags(spec.user_namespace, to_admit),
            &*group,
            &mut parent,
        )?,
        reaped: None,
    };
    // The child holds its copies now; ours would keep the pipes open after it is gone.
    drop(child_side);
    drop(marker_w);
    let output_r = output.map(|(r, _w)| r);

    // 6. Admit the child: maps, link, release.
    if let Some(id_lease) = &id_lease {
        let mut mounts = Vec::new();
        match &root_mounts {
            RootMounts::Image(image_mount) => mounts.push(userns::Detached {
                what: format!("the image mount of {}", spec.rootfs.display()),
                fd: image_mount,
            }),
            RootMounts::Layers(fds) => {
                for (dir, fd) in spec.rootfs_layers.iter().flatten().zip(fds) {
                    mounts.push(userns::Detached {
                        what: format!("the bind of layer {}", dir.display()),
                        fd,
                    });
                }
            }
        }
        for (disk, fd) in spec.disks.iter().zip(&disk_mounts) {
            mounts.push(userns::Detached {
                what: format!("the bind of {}", disk.path.display()),
                fd,
            });
        }
        sys.map_user_namespace(child.pid, id_lease, &mounts)?;
    }
    if let Some(mode) = spec.net {
        let mut info = network.link(sys, child.pid)?;
        if mode == NetMode::Nat {
            sys.apply_nat()?;
            info.nat = true;
        }
        link_info = Some(info);
    }
    // (Done already for a child that ran on our memory: then this does nothing.)
    parent.release()?;

    // 7. Sandbox ready (with -t, its terminal first), then init.
    let mut pty = None;
    wait_ready(
        &parent, &mut child, &prepared, &interrupt, &mut log, &mut pty,
    )?;
    if spec.tty && pty.is_none() {
        return Err(Error::Setup(
            "the container started without sending its terminal".into(),
        ));
    }
    log.timeline_mut().record(Phase::GuestEntry, monotonic_ns());
    // The child attached its copies; ours are of no more use.
    drop(root_mounts);
    drop(init_mount);
    drop(disk_mounts);

    // 8. Until init ends, a signal or the time limit.
    let mut session = match &pty {
        Some(master) => Some(tty::Session::start(
            master,
            spec.stdin,
            &interrupt,
            watcher.as_ref(),
        )?),
        None => None,
    };
    let (captured, stop_reason) = supervise(
        spec,
        &marker_r,
        output_r.as_ref(),
        session.as_mut(),
        &interrupt,
        &mut log,
    );
    // The caller's terminal is restored before anything else can print.
    drop(session);
    if stop_reason.is_some() {
        sys.kill(child.pid);
    }

    // 9. Teardown, in order: the child, the link, the cgroup, the hold on the image (the
    // last user unmounts it and its loop device clears).
    let reaped = child.reap()?;
    drop(network);
    drop(pty);
    drop(watcher);
    // What init reported ends here (before the host's own torn-down stamp, so a failure
    // names the last phase init reached).
    let mut finished = log.finish(|| describe_wait_status(reaped.status));
    let stats = group.stats();
    group.destroy()?;
    drop(group);
    // An image's layers took no loop device.
    let released = image.release();
    sweeping.finish();
    finished.timeline.record(Phase::TornDown, monotonic_ns());
    // Only now: a second SIGINT/SIGTERM during the teardown (Ctrl-C pressed again, a
    // parent's death signal after a stop) is recorded instead of killing the CLI halfway,
    // which left the cgroups and the image mount to the next run's sweep.
    drop(interrupt);
    if let Released::LoopStuck(device) = released {
        notes.push(format!(
            "{} still attached 2 s after the run",
            device.display()
        ));
    }

    // 10. The report.
    // A stop (signal, time limit) is the run's end even if the workload's exit raced it.
    let outcome = match stop_reason {
        Some(reason) => Outcome::Failed(reason),
        None => finished.outcome,
    };
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
        timeline: finished.timeline,
        output: output_r.map(|_| String::from_utf8_lossy(&captured).into_owned()),
        usage: Usage {
            runtime_peak_rss_kib: twinbox_spec::host::self_status_kib("VmHWM"),
            runtime_peak_pss_kib: None,
            guest_memory_touched_kib: None,
            cgroup_memory_peak_kib: stats.memory_peak_kib,
            cpu_user_us: Some(tv_us(reaped.usage.ru_utime)),
            cpu_system_us: Some(tv_us(reaped.usage.ru_stime)),
            oom_killed: stats.oom_killed,
        },
        notes,
        network: link_info,
    })
}

/// Step 2: the spec, the image and the disks, before anything is made.
fn check(spec: &RunSpec) -> Result<(), Error> {
    spec.validate()?;
    if spec.tty && spec.output == OutputMode::Capture {
        return Err(Error::Setup(
            "a terminal (-t) goes to the caller, its output cannot be captured".into(),
        ));
    }
    if spec.rootfs_layers.is_none() {
        image::check_ext4(&spec.rootfs)?;
    }
    for disk in &spec.disks {
        std::fs::metadata(&disk.path).map_err(|source| Error::Disk {
            path: disk.path.clone(),
            source,
        })?;
    }
    Ok(())
}

/// This run's name: the owner's pid, start time and pid namespace (for the sweep), and a
/// counter (shared with the VMM's runs in this process).
fn run_name() -> Result<String, Error> {
    sweep::next_run_name().map_err(Error::Setup)
}

/// The namespaces of the child: pid, mount, uts, ipc, net, and user with `--userns`
/// (the cgroup namespace comes later, once the child is in its cgroup). A child the parent
/// need not admit (`to_admit` false), when born in its cgroup, runs on the parent's memory
/// with the parent suspended until it execs init ([`crate::syscall::SHARED_MEMORY`]):
/// no copy of the caller's page tables. A child to admit cannot: the parent must run to
/// write its maps, make its link or size its terminal before init runs, and with
/// `--userns` the child sets its credentials, which glibc does on every thread of the
/// memory's process.
fn clone_flags(user_namespace: bool, to_admit: bool) -> CloneFlags {
    let mut flags = CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWNET;
    if user_namespace {
        // Created first by clone, so it owns every other new namespace.
        flags |= CloneFlags::CLONE_NEWUSER;
    }
    if !to_admit {
        flags |= crate::syscall::SHARED_MEMORY;
    }
    flags
}

/// Step 5: everything the child needs, allocated before `clone`.
pub(crate) fn prepare(
    spec: &RunSpec,
    plan: plan::Plan,
    channel: &channel::ChildSide,
    marker_fd: RawFd,
    output_fd: Option<RawFd>,
    parent_fds: Vec<RawFd>,
    net: Option<NetConfig>,
) -> Result<Prepared, Error> {
    let mut job = spec.job();
    job.net = net;
    job.marker = MarkerChannel::Fd(marker_fd);
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
    // With a network, init needs CAP_NET_ADMIN to configure eth0; it gives it back before
    // the workload starts.
    let (caps_to_drop, caps_keep) = caps::for_init(caps::last_cap(), net.is_some());
    Ok(Prepared {
        plan,
        hostname,
        channel: channel.ends(),
        marker_fd,
        output_fd,
        tty: spec.tty,
        null_stdin: spec.stdin == StdinMode::Null,
        argv: [init.as_ptr(), std::ptr::null()],
        init,
        envp,
        env_storage,
        caps_to_drop,
        caps_keep,
        user_namespace: spec.user_namespace,
        parent_fds,
        // Compiled here (once per process): the child after clone must not allocate.
        seccomp: Some(seccomp::cached_container_filter()?),
    })
}

/// Step 7: waits for the child's reports until the channel closes on exec; the pty's
/// master, if one comes, goes into `pty` (sized like the caller's terminal). A failed
/// step, a child gone without reporting ready, or SIGINT/SIGTERM meanwhile is a setup
/// error (the guards clean up).
fn wait_ready(
    parent: &ParentSide,
    child: &mut ChildGuard<'_>,
    prepared: &Prepared,
    interrupt: &Interrupt,
    log: &mut MarkerLog,
    pty: &mut Option<OwnedFd>,
) -> Result<(), Error> {
    let mut ready = false;
    loop {
        let mut fds = [
            pollin(parent.status_fd()),
            pollin(interrupt.fd().as_raw_fd()),
        ];
        // SAFETY: polls our own descriptors; EINTR just comes round again.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if let Some(signal) = interrupt.signal() {
            return Err(Error::Setup(format!(
                "interrupted by signal {signal} while the container started"
            )));
        }
        if fds[0].revents == 0 {
            continue;
        }
        match parent.receive() {
            FromChild::Terminal(master) => {
                let master =
                    master.map_err(|e| Error::os("receive the container's terminal", e))?;
                *pty = Some(tty::adopt(master)?);
            }
            FromChild::Ready { at_ns } => {
                ready = true;
                log.timeline_mut().record(Phase::SandboxReady, at_ns);
            }
            FromChild::Failed { step, errno } => {
                return Err(Error::Setup(format!(
                    "{}: {}",
                    child::describe(step, &prepared.plan),
                    std::io::Error::from_raw_os_error(errno)
                )));
            }
            FromChild::Closed if ready => return Ok(()),
            FromChild::Closed => {
                let reaped = child.reap()?;
                return Err(Error::Setup(format!(
                    "the container's first process ended before init: {}",
                    describe_wait_status(reaped.status)
                )));
            }
        }
    }
}

/// Step 8: reads markers and captured output until both pipes close and the terminal
/// session (`-t`) is finished, a signal arrives or the time limit passes; returns the
/// output and why the run was stopped, if it was.
fn supervise(
    spec: &RunSpec,
    marker_r: &OwnedFd,
    output_r: Option<&OwnedFd>,
    mut session: Option<&mut tty::Session<'_>>,
    interrupt: &Interrupt,
    log: &mut MarkerLog,
) -> (Vec<u8>, Option<String>) {
    let mut captured = Vec::new();
    let started = Instant::now();
    let mut marker_open = true;
    let mut output_open = output_r.is_some();
    while marker_open || output_open || session.as_ref().is_some_and(|s| !s.finished()) {
        let fd_if = |open: bool, fd: RawFd| if open { fd } else { -1 };
        let mut fds = [
            pollin(fd_if(marker_open, marker_r.as_raw_fd())),
            pollin(output_r.map_or(-1, |r| fd_if(output_open, r.as_raw_fd()))),
            pollin(interrupt.fd().as_raw_fd()),
        ];
        // The timeout only bounds how late a time limit is noticed.
        match session.as_deref_mut() {
            // The terminal's descriptors are polled with ours, and what is ready moved.
            Some(session) => session.poll(&mut fds, Duration::from_millis(100)),
            // SAFETY: polls our own descriptors.
            None => unsafe {
                libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100);
            },
        }
        if fds[0].revents != 0 {
            let mut buf = [0u8; 64];
            match read(marker_r, &mut buf) {
                Some(0) => marker_open = false,
                Some(n) => log.feed(&buf[..n], monotonic_ns()),
                None => {}
            }
        }
        if let (Some(r), true) = (output_r, fds[1].revents != 0) {
            let mut buf = [0u8; 4096];
            match read(r, &mut buf) {
                Some(0) => output_open = false,
                Some(n) => captured.extend_from_slice(&buf[..n]),
                None => {}
            }
        }
        if let Some(signal) = interrupt.signal() {
            return (captured, Some(format!("interrupted by signal {signal}")));
        }
        if let Some(limit) = spec.time_limit.filter(|l| started.elapsed() >= *l) {
            return (captured, Some(format!("time limit of {limit:?} reached")));
        }
    }
    (captured, None)
}

fn pollin(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// One read: Some(0) on EOF or an error (both end the stream), None when a signal
/// interrupted it (the loop looks at the signal, then reads again).
fn read(fd: &OwnedFd, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: reads into a buffer of ours, at most its length.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    match n {
        n if n >= 0 => Some(n as usize),
        _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => None,
        _ => Some(0),
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), Error> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::os("pipe", std::io::Error::from_raw_os_error(e as i32)))
}

fn cstr(s: &str, what: &str) -> Result<CString, Error> {
    CString::new(s).map_err(|_| Error::Setup(format!("{what} contains a NUL byte")))
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

/// The run's link: leased before the child exists, made into its network namespace
/// before it is released. Declared before the child's guard, so on every path it goes
/// after the child is reaped: the pair (usually gone with the namespace already), then
/// the lease.
enum Network {
    /// No `--net`.
    None,
    /// Addresses reserved, no interface yet.
    Leased(Leased),
    /// The veth pair exists; held only to be dropped.
    Linked { _link: Linked },
}

impl Network {
    /// Makes the leased link's veth pair into the network namespace of `pid`; the link
    /// as reports show it.
    fn link(&mut self, sys: &dyn Syscall, pid: i32) -> Result<hostnet::LinkInfo, Error> {
        let Network::Leased(leased) = std::mem::replace(self, Network::None) else {
            return Err(Error::Setup("no leased link to make".into()));
        };
        let link = sys.create_veth(leased, pid)?;
        let info = link.info.clone();
        *self = Network::Linked { _link: link };
        Ok(info)
    }
}

/// The parent's detached mounts of the root: closed once the child attached them (or on
/// any early return, which unmounts them: they belong to no namespace).
enum RootMounts {
    /// The ext4 image's mount.
    Image(OwnedFd),
    /// One bind per layer of an OCI image, lowest first.
    Layers(Vec<OwnedFd>),
}

impl RootMounts {
    /// The plan's view: the descriptors the child attaches (layers idmapped into its user
    /// namespace with `user_namespace`).
    fn lower(&self, user_namespace: bool) -> plan::Lower {
        match self {
            Self::Image(fd) => plan::Lower::Image(fd.as_raw_fd()),
            Self::Layers(fds) => {
                let fds = fds.iter().map(AsRawFd::as_raw_fd).collect();
                if user_namespace {
                    plan::Lower::UsernsLayers(fds)
                } else {
                    plan::Lower::Layers(fds)
                }
            }
        }
    }
}

/// The run's hold on the shared image mount (none for an image's layers), given up at
/// teardown or on any early return.
struct ImageGuard<'s> {
    sys: &'s dyn Syscall,
    held: Option<HeldImage>,
}

impl ImageGuard<'_> {
    /// Gives the hold up now (nothing held: nothing to wait for).
    fn release(&mut self) -> Released {
        self.held
            .take()
            .map_or(Released::Freed, |held| self.sys.release_image(held))
    }
}

impl Drop for ImageGuard<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

/// The container's first process: killed and reaped on drop unless already reaped.
struct ChildGuard<'s> {
    sys: &'s dyn Syscall,
    pid: i32,
    reaped: Option<Reaped>,
}

impl ChildGuard<'_> {
    /// Waits for it to end (once; later calls return the same).
    fn reap(&mut self) -> Result<Reaped, Error> {
        if let Some(reaped) = self.reaped {
            return Ok(reaped);
        }
        let reaped = self.sys.wait(self.pid)?;
        self.reaped = Some(reaped);
        Ok(reaped)
    }
}

impl Drop for ChildGuard<'_> {
    fn drop(&mut self) {
        if self.reaped.is_none() {
            self.sys.kill(self.pid);
            let _ = self.reap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recording::{ChildScript, Recording};
    use std::path::PathBuf;
    use twinbox_proto::{ExitCode, Marker};
    use twinbox_spec::DiskSpec;

    /// A file that passes the ext4 check (the superblock magic, nothing else).
    struct FakeImage(PathBuf);

    impl FakeImage {
        fn new(what: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "twinbox-run-test-{what}-{}.ext4",
                std::process::id()
            ));
            let mut bytes = vec![0u8; 2048];
            bytes[1080..1082].copy_from_slice(&0xEF53u16.to_le_bytes());
            std::fs::write(&path, bytes).unwrap();
            Self(path)
        }

        fn spec(&self) -> RunSpec {
            RunSpec::new(&self.0, vec!["/bin/true".into()])
        }
    }

    impl Drop for FakeImage {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn runs(markers: Vec<Marker>, status: i32) -> ChildScript {
        ChildScript::Runs {
            markers,
            output: "hello\n",
            status,
        }
    }

    fn exits(code: u8) -> Vec<Marker> {
        vec![
            Marker::InitStarted,
            Marker::WorkloadStarted,
            Marker::WorkloadExited(ExitCode::Exited(code)),
        ]
    }

    /// The calls of a run that gets as far as the child, before any failure.
    const SETUP: [&str; 7] = [
        "sweep",
        "create cgroup",
        "create staging dir",
        "hold image",
        "clone image",
        "check mount points .twinbox,proc,sys,dev,tmp,run",
        "bind init",
    ];

    fn calls(expected: &[&str]) -> Vec<String> {
        expected.iter().map(|s| s.to_string()).collect()
    }

    /// The calls of a run that gets past [`SETUP`], then `rest`.
    fn after_setup(rest: &[&str]) -> Vec<String> {
        calls(&[&SETUP[..], rest].concat())
    }

    /// What follows [`SETUP`] in a run whose workload exits: the child, then teardown.
    const EXITED: [&str; 4] = ["spawn", "wait", "cgroup destroy", "give up image"];

    /// What follows [`SETUP`] when the child (born in its cgroup) fails: killed and
    /// reaped before the cgroup goes.
    const CHILD_FAILED: [&str; 5] = ["spawn", "kill", "wait", "give up image", "cgroup destroy"];

    #[test]
    fn a_run_takes_its_steps_in_order_and_tears_down_child_first() {
        let image = FakeImage::new("order");
        let sys = Recording::new(runs(exits(3), 0));
        let mut spec = image.spec();
        spec.output = OutputMode::Capture;
        let report = run_with(&sys, &spec).unwrap();
        assert_eq!(sys.calls(), after_setup(&EXITED));
        assert_eq!(report.outcome, Outcome::Exited(3));
        assert_eq!(report.output.as_deref(), Some("hello\n"));
        assert!(report.timeline.is_ordered(), "{:?}", report.timeline);
        for phase in Phase::ALL {
            assert!(report.timeline.get(phase).is_some(), "{phase} missing");
        }
    }

    #[test]
    fn only_a_child_with_nothing_to_admit_runs_on_the_suspended_parents_memory() {
        use crate::syscall::SHARED_MEMORY;
        let plain = clone_flags(false, false);
        assert!(plain.contains(SHARED_MEMORY));
        assert!(!plain.contains(CloneFlags::CLONE_NEWUSER));
        // --net: the parent makes the link while the child waits.
        assert!(!clone_flags(false, true).intersects(SHARED_MEMORY));
        // --userns: the maps, and the child's set*id calls.
        let userns = clone_flags(true, true);
        assert!(userns.contains(CloneFlags::CLONE_NEWUSER));
        assert!(!userns.intersects(SHARED_MEMORY));
        for flags in [plain, userns] {
            assert!(flags.contains(
                CloneFlags::CLONE_NEWPID
                    | CloneFlags::CLONE_NEWNS
                    | CloneFlags::CLONE_NEWUTS
                    | CloneFlags::CLONE_NEWIPC
                    | CloneFlags::CLONE_NEWNET
            ));
        }
    }

    #[test]
    fn userns_maps_the_child_after_it_is_born() {
        let image = FakeImage::new("userns");
        let disk = FakeImage::new("userns-disk");
        let sys = Recording::new(runs(exits(0), 0));
        let mut spec = image.spec();
        spec.user_namespace = true;
        spec.disks = vec![DiskSpec {
            path: disk.0.clone(),
            read_only: true,
        }];
        run_with(&sys, &spec).unwrap();
        let calls = sys.calls();
        let at = |call: &str| {
            calls
                .iter()
                .position(|c| c.starts_with(call))
                .unwrap_or_else(|| panic!("{call} not in {calls:?}"))
        };
        assert!(at("bind disk") > at("clone image"));
        assert!(calls[at("bind disk")].ends_with("ro=true"));
        assert!(at("spawn userns") > at("bind disk"));
        assert_eq!(
            calls[at("map user namespace")],
            "map user namespace (2 mounts)"
        );
        assert!(at("map user namespace") > at("spawn userns"));
    }

    #[test]
    fn each_failing_step_undoes_what_came_before_in_reverse() {
        let image = FakeImage::new("fail");
        let cases: [(&str, &[&str]); 6] = [
            // Made beside step 4, a failed cgroup is noticed right before the clone:
            // step 4 is undone, nothing else was made.
            (
                "create cgroup",
                &[
                    "sweep",
                    "create cgroup FAILED",
                    "create staging dir",
                    "hold image",
                    "clone image",
                    "check mount points .twinbox,proc,sys,dev,tmp,run",
                    "bind init",
                    "give up image",
                ],
            ),
            (
                "create staging dir",
                &[
                    "sweep",
                    "create cgroup",
                    "create staging dir FAILED",
                    "cgroup destroy",
                ],
            ),
            (
                "hold image",
                &[
                    "sweep",
                    "create cgroup",
                    "create staging dir",
                    "hold image FAILED",
                    "cgroup destroy",
                ],
            ),
            (
                "clone image",
                &[
                    "sweep",
                    "create cgroup",
                    "create staging dir",
                    "hold image",
                    "clone image FAILED",
                    "give up image",
                    "cgroup destroy",
                ],
            ),
            (
                "bind init",
                &[
                    "sweep",
                    "create cgroup",
                    "create staging dir",
                    "hold image",
                    "clone image",
                    "check mount points .twinbox,proc,sys,dev,tmp,run",
                    "bind init FAILED",
                    "give up image",
                    "cgroup destroy",
                ],
            ),
            (
                "spawn",
                &[
                    "sweep",
                    "create cgroup",
                    "create staging dir",
                    "hold image",
                    "clone image",
                    "check mount points .twinbox,proc,sys,dev,tmp,run",
                    "bind init",
                    "spawn FAILED",
                    "give up image",
                    "cgroup destroy",
                ],
            ),
        ];
        for (failing, expected) in cases {
            let mut sys = Recording::new(runs(exits(0), 0));
            sys.fail = Some(failing);
            let err = run_with(&sys, &image.spec()).unwrap_err();
            assert!(err.to_string().contains(failing), "{failing}: {err}");
            assert_eq!(sys.calls(), calls(expected), "when {failing} fails");
        }
    }

    #[test]
    fn a_failed_child_step_is_named_and_the_child_reaped_before_the_cgroup_goes() {
        let image = FakeImage::new("child-fails");
        let sys = Recording::new(ChildScript::FailsAt {
            step: child::PIVOT_ROOT,
            errno: libc::EINVAL,
        });
        let err = run_with(&sys, &image.spec()).unwrap_err().to_string();
        assert!(err.contains("pivot_root"), "{err}");
        assert!(
            err.contains(&std::io::Error::from_raw_os_error(libc::EINVAL).to_string()),
            "{err}"
        );
        assert_eq!(sys.calls(), after_setup(&CHILD_FAILED));
    }

    #[test]
    fn a_child_gone_without_a_word_is_an_error_not_a_run() {
        let image = FakeImage::new("vanishes");
        let sys = Recording::new(ChildScript::Vanishes);
        let err = run_with(&sys, &image.spec()).unwrap_err().to_string();
        assert!(err.contains("ended before init"), "{err}");
        assert!(err.contains("signal 9"), "{err}");
        let calls = sys.calls();
        assert_eq!(
            calls.iter().filter(|c| *c == "wait").count(),
            1,
            "{calls:?}"
        );
        assert!(
            !calls.contains(&"kill".to_string()),
            "reaped already: {calls:?}"
        );
    }

    #[test]
    fn init_failure_is_a_failed_run_from_the_shared_interpreter() {
        let image = FakeImage::new("init-fails");
        let sys = Recording::new(runs(
            vec![Marker::InitStarted, Marker::InitFailed(libc::ENOENT as u32)],
            125 << 8,
        ));
        let report = run_with(&sys, &image.spec()).unwrap();
        assert!(
            matches!(&report.outcome, Outcome::Failed(why) if why.contains("twinbox-init failed")),
            "{:?}",
            report.outcome
        );
        let sys = Recording::new(runs(vec![Marker::InitStarted], 3 << 8));
        let report = run_with(&sys, &image.spec()).unwrap();
        assert!(
            matches!(&report.outcome, Outcome::Failed(why) if why.contains("exited with status 3") && why.contains("init_started")),
            "{:?}",
            report.outcome
        );
    }

    #[test]
    fn stdin_is_null_unless_inherited_and_the_job_carries_tty_and_verbose() {
        let image = FakeImage::new("stdin");
        let sys = Recording::new(runs(exits(0), 0));
        run_with(&sys, &image.spec()).unwrap();
        let spawned = sys.spawned.borrow().clone().expect("spawned");
        assert!(spawned.null_stdin && !spawned.tty);
        assert!(!spawned.job.tty && !spawned.job.verbose);
        let sys = Recording::new(runs(exits(0), 0));
        let mut spec = image.spec();
        spec.stdin = StdinMode::Inherit;
        spec.verbose = true;
        run_with(&sys, &spec).unwrap();
        let spawned = sys.spawned.borrow().clone().expect("spawned");
        assert!(!spawned.null_stdin);
        assert!(spawned.job.verbose && !spawned.job.tty);
    }

    #[test]
    fn a_tty_run_relays_the_terminal_until_it_hangs_up_then_tears_down_as_usual() {
        let image = FakeImage::new("tty");
        let sys = Recording::new(runs(exits(3), 0));
        let mut spec = image.spec();
        spec.tty = true;
        let report = run_with(&sys, &spec).unwrap();
        assert_eq!(report.outcome, Outcome::Exited(3));
        assert_eq!(sys.calls(), after_setup(&EXITED));
        let spawned = sys.spawned.borrow().clone().expect("spawned");
        assert!(spawned.tty && spawned.job.tty);
    }

    #[test]
    fn a_tty_cannot_be_captured_and_the_refusal_makes_nothing() {
        let image = FakeImage::new("tty-capture");
        let sys = Recording::new(runs(exits(0), 0));
        let mut spec = image.spec();
        spec.tty = true;
        spec.output = OutputMode::Capture;
        let err = run_with(&sys, &spec).unwrap_err().to_string();
        assert!(err.contains("-t"), "{err}");
        assert_eq!(sys.calls(), calls(&["sweep"]));
    }

    #[test]
    fn a_failing_terminal_step_or_a_failure_after_it_cleans_up_like_any_child_failure() {
        let image = FakeImage::new("tty-fails");
        let mut spec = image.spec();
        spec.tty = true;
        for (script, named) in [
            (
                ChildScript::FailsAt {
                    step: child::TERMINAL,
                    errno: libc::ENOSPC,
                },
                "allocate the container's terminal",
            ),
            (
                ChildScript::FailsAfterTerminal {
                    step: child::CAPABILITIES,
                    errno: libc::EPERM,
                },
                "drop capabilities",
            ),
        ] {
            let sys = Recording::new(script);
            let err = run_with(&sys, &spec).unwrap_err().to_string();
            assert!(err.contains(named), "{err}");
            assert_eq!(sys.calls(), after_setup(&CHILD_FAILED), "{named}");
        }
    }

    fn net_spec(image: &FakeImage, mode: NetMode) -> RunSpec {
        let mut spec = image.spec();
        spec.net = Some(mode);
        spec
    }

    #[test]
    fn net_leases_before_the_child_links_it_before_release_and_frees_it_after_reap() {
        let image = FakeImage::new("net");
        let sys = Recording::new(runs(exits(0), 0));
        let report = run_with(&sys, &net_spec(&image, NetMode::Link)).unwrap();
        assert_eq!(
            sys.calls(),
            after_setup(&[
                "lease link",
                "spawn",
                "create veth tb3",
                "wait",
                "delete veth",
                "release lease",
                "cgroup destroy",
                "give up image",
            ])
        );
        let spawned = sys.spawned.borrow().clone().expect("spawned");
        assert_eq!(
            spawned.job.net,
            Some(NetConfig {
                address: [10, 201, 0, 14].into(),
                prefix_len: 30,
                gateway: [10, 201, 0, 13].into(),
                resolver: Some([192, 0, 2, 53].into()),
            }),
            "init must get the link and the host's resolver in its job"
        );
        assert_ne!(spawned.caps_keep[0] & 1 << caps::NET_ADMIN, 0);
        assert!(!spawned.caps_to_drop.contains(&caps::NET_ADMIN));
        let link = report.network.expect("the report names the link");
        assert_eq!(
            link.to_string(),
            "eth0 10.201.0.14/30 via 10.201.0.13 (host tb3)"
        );
        assert!(!link.nat);
    }

    #[test]
    fn without_net_the_job_has_none_and_net_admin_is_not_lent() {
        let image = FakeImage::new("no-net");
        let sys = Recording::new(runs(exits(0), 0));
        let report = run_with(&sys, &image.spec()).unwrap();
        let spawned = sys.spawned.borrow().clone().expect("spawned");
        assert_eq!(spawned.job.net, None);
        assert_eq!(spawned.caps_keep, caps::default_mask());
        assert!(spawned.caps_to_drop.contains(&caps::NET_ADMIN));
        let calls = sys.calls();
        assert!(
            !calls
                .iter()
                .any(|c| c.contains("lease") || c.contains("veth")),
            "{calls:?}"
        );
        assert_eq!(report.network, None);
        assert!(
            !report.notes.iter().any(|n| n.starts_with("network")),
            "{:?}",
            report.notes
        );
    }

    #[test]
    fn nat_installs_the_table_once_the_pair_exists_and_no_resolver_is_a_note() {
        let image = FakeImage::new("nat");
        let mut sys = Recording::new(runs(exits(0), 0));
        sys.resolver = hostnet::Resolver::Unavailable("only the stub 127.0.0.53".into());
        let report = run_with(&sys, &net_spec(&image, NetMode::Nat)).unwrap();
        let calls = sys.calls();
        let at = |call: &str| {
            calls
                .iter()
                .position(|c| c == call)
                .unwrap_or_else(|| panic!("{call} not in {calls:?}"))
        };
        assert_eq!(at("apply nat"), at("create veth tb3") + 1);
        let spawned = sys.spawned.borrow().clone().expect("spawned");
        assert_eq!(spawned.job.net.and_then(|n| n.resolver), None);
        assert!(
            report
                .notes
                .contains(&"network: no resolver in the box: only the stub 127.0.0.53".into()),
            "{:?}",
            report.notes
        );
        assert!(report.network.expect("the report names the link").nat);
    }

    #[test]
    fn each_failing_network_step_frees_the_link_and_undoes_the_rest() {
        let image = FakeImage::new("net-fail");
        let tail = ["give up image", "cgroup destroy"];
        let cases: [(&str, Vec<&str>); 3] = [
            ("lease nat link", vec!["lease nat link FAILED"]),
            (
                "create veth tb3",
                vec![
                    "lease nat link",
                    "spawn",
                    "create veth tb3 FAILED",
                    "release lease",
                    "kill",
                    "wait",
                ],
            ),
            (
                "apply nat",
                vec![
                    "lease nat link",
                    "spawn",
                    "create veth tb3",
                    "apply nat FAILED",
                    "kill",
                    "wait",
                    "delete veth",
                    "release lease",
                ],
            ),
        ];
        for (failing, middle) in cases {
            let mut sys = Recording::new(runs(exits(0), 0));
            sys.fail = Some(failing);
            let err = run_with(&sys, &net_spec(&image, NetMode::Nat)).unwrap_err();
            assert!(err.to_string().contains(failing), "{failing}: {err}");
            assert_eq!(
                sys.calls(),
                after_setup(&[middle.as_slice(), &tail].concat()),
                "when {failing} fails"
            );
        }
    }

    #[test]
    fn bad_input_and_no_root_make_nothing() {
        let sys = Recording::new(runs(exits(0), 0));
        let missing = RunSpec::new("/nonexistent/rootfs.ext4", vec!["/bin/true".into()]);
        let err = run_with(&sys, &missing).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/rootfs.ext4"), "{err}");
        assert_eq!(sys.calls(), calls(&["sweep"]));
        let mut sys = Recording::new(runs(exits(0), 0));
        sys.root = false;
        let image = FakeImage::new("no-root");
        assert!(matches!(run_with(&sys, &image.spec()), Err(Error::NotRoot)));
        assert!(sys.calls().is_empty());
        let mut sys = Recording::new(runs(exits(0), 0));
        sys.net_admin = false;
        let err = run_with(&sys, &net_spec(&image, NetMode::Link)).unwrap_err();
        assert!(matches!(err, Error::NoNetAdmin), "{err}");
        assert!(err.to_string().contains("CAP_NET_ADMIN"), "{err}");
        assert_eq!(sys.calls(), calls(&["sweep"]));
        // No init built on the host: one line naming it and the way to build it.
        let mut sys = Recording::new(runs(exits(0), 0));
        sys.fail = Some("host init");
        let err = run_with(&sys, &image.spec()).unwrap_err().to_string();
        assert!(
            err.starts_with("twinbox-init not found at /cache/init/"),
            "{err}"
        );
        assert!(err.contains("scripts/build-artifacts"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        assert_eq!(sys.calls(), calls(&["sweep"]));
    }

    fn layers_spec(image: &FakeImage) -> RunSpec {
        let mut spec = image.spec();
        spec.rootfs_layers = Some(vec![
            "/c/l/base".into(),
            "/c/l/mid".into(),
            "/c/l/top".into(),
        ]);
        spec.user = Some(twinbox_spec::WorkloadUser {
            uid: 1000,
            gid: 1000,
            groups: vec![27],
        });
        spec
    }

    #[test]
    fn an_image_s_layers_are_bound_and_stacked_without_a_loop_device() {
        let image = FakeImage::new("layers");
        let sys = Recording::new(runs(exits(3), 0));
        let report = run_with(&sys, &layers_spec(&image)).unwrap();
        assert_eq!(report.outcome, Outcome::Exited(3));
        assert_eq!(
            sys.calls(),
            calls(&[
                "sweep",
                "create cgroup",
                "create staging dir",
                "check mount points .twinbox,proc,sys,dev,tmp,run (3 layers)",
                "bind layer /c/l/base",
                "bind layer /c/l/mid",
                "bind layer /c/l/top",
                "bind init",
                "spawn",
                "wait",
                "cgroup destroy",
            ])
        );
        let spawned = sys.spawned.borrow().clone().expect("spawned");
        // Topmost first, each on a short name in the staging tmpfs; the upper is fresh.
        assert!(
            spawned.overlay.starts_with("lowerdir=/run/twinbox/ctr/")
                && spawned.overlay.contains("/lower/2:")
                && spawned.overlay.contains("/lower/1:")
                && spawned.overlay.contains("/lower/0,upperdir="),
            "{}",
            spawned.overlay
        );
        assert_eq!(spawned.attaches, 3 + 1, "three layers and init");
        let user = spawned.job.user.expect("the job carries the user");
        assert_eq!((user.uid, user.gid, user.groups), (1000, 1000, vec![27]));
        assert!(!report.notes.iter().any(|n| n.contains("still attached")));
    }

    #[test]
    fn a_failing_layer_bind_undoes_the_earlier_ones_and_the_rest() {
        let image = FakeImage::new("layers-fail");
        let mut sys = Recording::new(runs(exits(0), 0));
        sys.fail = Some("bind layer /c/l/mid");
        let err = run_with(&sys, &layers_spec(&image)).unwrap_err();
        assert!(err.to_string().contains("bind layer /c/l/mid"), "{err}");
        assert_eq!(
            sys.calls(),
            calls(&[
                "sweep",
                "create cgroup",
                "create staging dir",
                "check mount points .twinbox,proc,sys,dev,tmp,run (3 layers)",
                "bind layer /c/l/base",
                "bind layer /c/l/mid FAILED",
                "cgroup destroy",
            ])
        );
    }

    #[test]
    fn layers_with_userns_are_idmapped_into_the_child_s_namespace() {
        let image = FakeImage::new("layers-userns");
        let sys = Recording::new(runs(exits(0), 0));
        let mut spec = layers_spec(&image);
        spec.user_namespace = true;
        run_with(&sys, &spec).unwrap();
        let calls = sys.calls();
        let at = |call: &str| calls.iter().position(|c| c.starts_with(call)).unwrap();
        // Every layer's bind, none forgotten: an unmapped layer shows its files as nobody.
        assert_eq!(
            calls[at("map user namespace")],
            "map user namespace (3 mounts)"
        );
        assert!(at("map user namespace") > at("spawn userns"));
        assert!(at("bind layer /c/l/top") < at("spawn userns"));
    }

    #[test]
    fn the_host_init_is_bound_after_the_image_and_given_to_the_plan() {
        let image = FakeImage::new("init-bind");
        let sys = Recording::new(runs(exits(0), 0));
        run_with(&sys, &image.spec()).unwrap();
        let calls = sys.calls();
        let at = |call: &str| calls.iter().position(|c| c == call).unwrap();
        assert!(at("clone image") < at("check mount points .twinbox,proc,sys,dev,tmp,run"));
        assert!(at("check mount points .twinbox,proc,sys,dev,tmp,run") < at("bind init"));
        assert!(at("bind init") < at("spawn"));
        assert_eq!(INIT, "/.twinbox/init");
    }
}
