//! `twinbox-init`: PID 1 of both boxes, the very same static binary in the VM and in the
//! container.
//!
//! The story of one boot, each step one module away:
//! 0. started as `/init` of twinbox's initramfs (the VM's default): mount `/proc`, then
//!    the root disk under a tmpfs overlay, and switch to it ([`initramfs`]),
//! 1. mount `/proc` and find the job ([`job_source`]): in the environment (container), on
//!    the kernel command line (a VM booted by a peer VMM), or — with `twinbox.ports=1` —
//!    on the control port of twinbox's VM, for which init mounts devtmpfs and sysfs
//!    first, adopts the console and opens the four named ports ([`ports`]),
//! 2. open the marker channel ([`marker`]); in the VM, mount devtmpfs and adopt the console
//!    (if step 1 did not already),
//! 3. in the VM, stack a writable overlay over the read-only root ([`overlay_root`]),
//!    unless step 0 did,
//! 4. mount the rest of a userland and set the hostname ([`mounts`]); when the job has a
//!    network, bring up `eth0` with its address and default route and write resolv.conf
//!    ([`net`]); report `InitStarted`,
//! 5. start the workload ([`workload`]: a child on init's memory until its exec, as
//!    `posix_spawn` does) on its stdio: the container's inherited
//!    fds, the VM's serial console, or the VM's ports — with `-t` in the VM, a pty that
//!    init relays to the ports ([`tty`]); report `WorkloadStarted`,
//! 6. forward signals, reap (and relay) until the workload exits ([`reaper`]); report
//!    `WorkloadExited`, kill and reap what is left, drain the pty, print the exit line if
//!    the job is verbose ([`console`]),
//! 7. power off (VM) or exit with the workload's status (container) ([`power`]).
//!
//! Any failure before the workload starts is one line on the console (init's stderr; in
//! the VM the serial console, never the workload's ports), an `InitFailed` marker
//! carrying the errno, and the same ending as step 7 with status 125.
//!
//! Init takes no arguments today (in the VM the kernel passes unknown command-line words
//! as argv, so argv is ignored); built-in guest micro-benchmarks may later add a
//! subcommand here.
//!
//! It starts from C's `main`, without std's runtime start ([`entry`]).
// The unit tests' harness brings its own main.
#![cfg_attr(not(test), no_main)]

mod console;
mod entry;
mod initramfs;
// Shared with the archive writer (bin/twinbox-initramfs.rs), which uses all of it.
#[allow(dead_code)]
mod initramfs_layout;
mod job_source;
mod marker;
mod mounts;
mod net;
mod overlay_root;
mod ports;
mod power;
mod reaper;
mod sys;
mod tty;
mod workload;

use console::{adopt_console_if_stdio_closed, closing_line, say};
use job_source::{Origin, Source};
use marker::MarkerWriter;
use ports::{Control, StdioPorts, WinSize};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;
use sys::{check, cstring, SysError};
use twinbox_proto::{ExitCode, Job, Marker, MarkerChannel, MARKER_PORT};

/// How long a `-t` workload's start waits for the host's first window size when it did
/// not come with the job.
const FIRST_SIZE_WAIT: Duration = Duration::from_millis(100);
/// After the workload's exit, how long the pty may stay silent before init moves on to
/// the exit marker (a leftover process may hold the slave open without writing).
const DRAIN_BEFORE_MARKER: Duration = Duration::from_millis(100);
/// After everything else is killed, how long the pty's last output may wait for the host
/// to take it.
const DRAIN_AT_END: Duration = Duration::from_secs(2);

/// Where the workload's stdin, stdout and stderr come from.
enum Streams {
    /// The container runtime's fds, inherited.
    Inherited,
    /// The VM's serial console (a peer VMM: the job was on the command line).
    Console,
    /// The VM's ports, with the control port's stream and the window sizes that came
    /// with the job.
    Ports(StdioPorts, Control<std::fs::File>, Vec<WinSize>),
}

/// The C entry point ([`entry`]).
#[cfg(not(test))]
#[no_mangle]
pub extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    entry::prepare_process();
    entry::run(boot)
}

/// The whole of init's life, steps 0 to 7 (module docs).
#[cfg_attr(test, allow(dead_code))]
fn boot() -> ! {
    // Not dumpable: the workload runs as the same uid but without CAP_SYS_PTRACE, so it
    // can neither ptrace init nor open /proc/1/fd (init's marker pipe), and cannot forge
    // phases or the exit status the host reads. (exec makes the workload dumpable again.)
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    // Outside a PID namespace (tests, debugging) orphans still come back to us.
    // SAFETY: getpid/prctl take no pointers.
    if unsafe { libc::getpid() } != 1 {
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    }
    // Block the forwarded signals first, so one sent while init sets up waits for the
    // workload instead of being dropped (PID 1 ignores default-disposition signals).
    let signals = match reaper::Signals::block() {
        Ok(signals) => signals,
        Err(err) => fail_without_job(&err.to_string(), err.errno),
    };
    if let Err(err) = mounts::ensure(&mounts::PROC) {
        fail_without_job(&err.to_string(), err.errno);
    }
    // Started from twinbox's initramfs: the real root first (initramfs.rs).
    let root_overlaid = initramfs::detect() == initramfs::Start::OnInitramfs;
    if root_overlaid {
        if let Err(err) = initramfs::switch_root() {
            fail_without_job(&err.to_string(), err.errno);
        }
    }
    let (job, origin, streams) = find_job();
    let mut markers = match MarkerWriter::open(job.marker) {
        Ok(writer) => writer,
        Err(err) => fail(&job, &mut MarkerWriter::none(), &err),
    };
    if origin == Origin::Vm {
        if let Err(err) = mounts::ensure(&mounts::DEV_VM) {
            fail(&job, &mut markers, &err);
        }
        adopt_console_if_stdio_closed();
    }
    if let Err(err) = prepare(&job, origin, root_overlaid) {
        fail(&job, &mut markers, &err);
    }
    markers.send(Marker::InitStarted);
    let (code, relay) = match run_workload(&job, streams, &signals, &mut markers) {
        Ok(ended) => ended,
        Err(err) => fail(&job, &mut markers, &err),
    };
    markers.send(Marker::WorkloadExited(code));
    reaper::kill_all_and_reap();
    if let Some(mut relay) = relay {
        // Everything that held the slave is dead now: the master ends with EIO.
        relay.drain(DRAIN_AT_END);
        drop(relay); // closes the stdout port: the host's EOF
    }
    if let Some(line) = closing_line(job.verbose, code) {
        say(&line);
    }
    power::finish(job.power_off, code.shell_status())
}

/// Step 1: the job, which box this is, and where the workload's stdio comes from. Any
/// failure ends init here.
fn find_job() -> (Job, Origin, Streams) {
    let decoded = |token: &str, origin| match job_source::decode(token, origin) {
        Ok(job) => job,
        Err(err) => fail_without_job(&err.to_string(), err.errno()),
    };
    match job_source::find() {
        Ok(Source::Token(token, Origin::Container)) => (
            decoded(&token, Origin::Container),
            Origin::Container,
            Streams::Inherited,
        ),
        Ok(Source::Token(token, Origin::Vm)) => {
            (decoded(&token, Origin::Vm), Origin::Vm, Streams::Console)
        }
        Ok(Source::Ports) => match job_from_ports() {
            Ok((job, ports, control, sizes)) => {
                (job, Origin::Vm, Streams::Ports(ports, control, sizes))
            }
            Err(err) => fail_without_job(&err.to_string(), err.errno),
        },
        Err(err) => fail_without_job(&err.to_string(), err.errno()),
    }
}

/// The VM with ports: `/dev` (the port nodes, the console) and `/sys` (the port names)
/// come before the job, which is read from the control port.
fn job_from_ports() -> Result<(Job, StdioPorts, Control<std::fs::File>, Vec<WinSize>), SysError> {
    mounts::ensure(&mounts::DEV_VM)?;
    adopt_console_if_stdio_closed();
    mounts::ensure(&mounts::sys(Origin::Vm))?;
    let (mut control, stdio) = ports::open(
        Path::new(ports::SYSFS_PORTS),
        Path::new("/dev"),
        ports::WAIT_LIMIT,
    )?
    .split();
    let (job, sizes) = control.read_job()?;
    Ok((job, stdio, control, sizes))
}

/// Steps 3 and 4: overlay root (unless the initramfs stacked it already), mounts,
/// hostname, network.
fn prepare(job: &Job, origin: Origin, root_overlaid: bool) -> Result<(), SysError> {
    if job.overlay_root && !root_overlaid {
        overlay_root::enter()?;
    }
    mounts::ensure_all(&mounts::userland(origin))?;
    if let Some(name) = &job.hostname {
        let c_name = cstring(name)?;
        // SAFETY: c_name is valid for name.len() bytes.
        check(
            unsafe { libc::sethostname(c_name.as_ptr(), name.len()) },
            || format!("set hostname {name:?}"),
        )?;
    }
    if let Some(config) = &job.net {
        net::configure(config)?;
        if origin == Origin::Container {
            // The runtime lent CAP_NET_ADMIN for the step above only.
            net::give_back_net_admin()?;
        }
    }
    Ok(())
}

/// Steps 5 and 6: start the workload and wait for it. With the VM's `-t`, the relay is
/// handed back for the last of the output after everything else has been killed.
fn run_workload(
    job: &Job,
    streams: Streams,
    signals: &reaper::Signals,
    markers: &mut MarkerWriter,
) -> Result<(ExitCode, Option<tty::Relay>), SysError> {
    let (ports, control, sizes) = match streams {
        Streams::Inherited | Streams::Console => {
            let stdio = match (streams, job.tty) {
                (Streams::Console, _) => workload::Stdio::Console,
                (_, true) => workload::Stdio::InheritTerminal,
                (_, false) => workload::Stdio::Inherit,
            };
            let prepared = workload::Prepared::new(job, stdio)?;
            markers.send(Marker::WorkloadStarted);
            let pid = prepared.spawn()?;
            return Ok((reaper::wait_for(pid, signals, &mut reaper::Nothing)?, None));
        }
        Streams::Ports(ports, control, sizes) => (ports, control, sizes),
    };
    if !job.tty {
        let fds = [&ports.stdin, &ports.stdout, &ports.stderr].map(|f| f.as_raw_fd());
        let prepared = workload::Prepared::new(job, workload::Stdio::Fds(fds))?;
        markers.send(Marker::WorkloadStarted);
        let pid = prepared.spawn()?;
        // The workload has its dups: with init's copies closed, each output port closes
        // (the host's EOF) when the workload and its children have closed theirs.
        drop((ports, control));
        return Ok((reaper::wait_for(pid, signals, &mut reaper::Nothing)?, None));
    }
    let pty = tty::Pty::open()?;
    let StdioPorts {
        stdin,
        stdout,
        stderr,
    } = ports;
    drop(stderr); // everything goes through the pty: stderr ends at once
    let mut relay = tty::Relay::new(pty.master, stdin, stdout, control)?;
    relay.settle_size(&sizes, FIRST_SIZE_WAIT);
    let prepared = workload::Prepared::new(job, workload::Stdio::Terminal(pty.slave.as_raw_fd()))?;
    markers.send(Marker::WorkloadStarted);
    let pid = prepared.spawn()?;
    // Only the workload holds the slave now, so the master's EIO marks its end.
    drop(pty.slave);
    let code = reaper::wait_for(pid, signals, &mut relay)?;
    relay.drain(DRAIN_BEFORE_MARKER);
    Ok((code, Some(relay)))
}

/// Init cannot go on: say why, report it, and end as the job asked.
fn fail(job: &Job, markers: &mut MarkerWriter, err: &SysError) -> ! {
    say(&err.to_string());
    markers.send(Marker::InitFailed(err.errno as u32));
    power::finish(job.power_off, power::EXIT_INIT_FAILED)
}

/// Init cannot even learn its job. Guess the box from where the job should have been: a
/// booted kernel gets the marker on the standard port (harmless under a VMM without the
/// device) and a reboot; a container gets an exit status.
fn fail_without_job(message: &str, errno: i32) -> ! {
    say(message);
    // SAFETY: getpid has no preconditions.
    let booted = job_source::likely_origin() == Origin::Vm && unsafe { libc::getpid() } == 1;
    if booted {
        if let Ok(mut markers) = MarkerWriter::open(MarkerChannel::Port(MARKER_PORT)) {
            markers.send(Marker::InitFailed(errno as u32));
        }
    }
    power::finish(booted, power::EXIT_INIT_FAILED)
}
