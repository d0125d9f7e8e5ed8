//! `twinbox-init`: PID 1 of both boxes, the very same static binary in the VM and in the
//! container.
//!
//! The story of one boot, each step one module away:
//! 1. mount `/proc` and find the job ([`job_source`]),
//! 2. open the marker channel ([`marker`]); in the VM, mount devtmpfs and adopt the console,
//! 3. in the VM, stack a writable overlay over the read-only root ([`overlay_root`]),
//! 4. mount the rest of a userland and set the hostname ([`mounts`]); when the job has a
//!    network, bring up `eth0` with its address and default route and write resolv.conf
//!    ([`net`]); report `InitStarted`,
//! 5. fork and exec the workload ([`workload`]); report `WorkloadStarted`,
//! 6. forward signals and reap until the workload exits ([`reaper`]); report
//!    `WorkloadExited`, kill and reap what is left, print the exit line ([`console`]),
//! 7. power off (VM) or exit with the workload's status (container) ([`power`]).
//!
//! Any failure before the workload starts is one line on the console, an `InitFailed`
//! marker carrying the errno, and the same ending as step 7 with status 125.
//!
//! Init takes no arguments today (in the VM the kernel passes unknown command-line words
//! as argv, so argv is ignored); built-in guest micro-benchmarks may later add a
//! subcommand here.

mod console;
mod job_source;
mod marker;
mod mounts;
mod net;
mod overlay_root;
mod power;
mod reaper;
mod sys;
mod workload;

use console::{adopt_console_if_stdio_closed, exit_line, say};
use job_source::Origin;
use marker::MarkerWriter;
use sys::{check, cstring, SysError};
use twinbox_proto::{Job, Marker, MarkerChannel, MARKER_PORT};

fn main() {
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
    let (job, origin) = match job_source::find() {
        Ok(found) => found,
        Err(err) => fail_without_job(&err.to_string(), err.errno()),
    };
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
    if let Err(err) = prepare(&job, origin) {
        fail(&job, &mut markers, &err);
    }
    markers.send(Marker::InitStarted);
    let code = match run_workload(&job, origin, &signals, &mut markers) {
        Ok(code) => code,
        Err(err) => fail(&job, &mut markers, &err),
    };
    markers.send(Marker::WorkloadExited(code));
    reaper::kill_all_and_reap();
    say(&exit_line(code));
    power::finish(job.power_off, code.shell_status())
}

/// Steps 3 and 4: overlay root, mounts, hostname, network.
fn prepare(job: &Job, origin: Origin) -> Result<(), SysError> {
    if job.overlay_root {
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

/// Steps 5 and 6: start the workload and wait for it.
fn run_workload(
    job: &Job,
    origin: Origin,
    signals: &reaper::Signals,
    markers: &mut MarkerWriter,
) -> Result<twinbox_proto::ExitCode, SysError> {
    let stdio = match origin {
        Origin::Vm => workload::Stdio::Console,
        Origin::Container => workload::Stdio::Inherit,
    };
    let prepared = workload::Prepared::new(job, stdio)?;
    markers.send(Marker::WorkloadStarted);
    let pid = prepared.spawn()?;
    reaper::wait_for(pid, signals)
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
