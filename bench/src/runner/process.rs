//! Running a host process with phase stamps, a time limit and its own resource usage
//! (through `wait4`, so concurrent children of ours do not mix in).
//!
//! Every runtime and peer VMM the bench starts dies with it ([`die_with_bench`]): a
//! bench killed with SIGKILL, which runs no cleanup of its own, leaves none running. The
//! native box's workloads are the exception (see [`run_dying_with`]).

use nix::sys::prctl;
use nix::sys::signal::Signal;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use twinbox_spec::{Outcome, Phase, Timeline, Usage};

/// What a finished host process did.
pub struct Finished {
    /// Exit status or signal; `Failed` when the time limit killed it.
    pub outcome: Outcome,
    /// spawn (given), workload_started (exec done), workload_exited (reaped), torn_down.
    pub timeline: Timeline,
    /// Its stdout and stderr, when captured.
    pub output: Option<String>,
    /// CPU time of the process, and its peak RSS when it lived long enough to be sampled.
    pub usage: Usage,
}

/// How long an interrupted child gets to end after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// Makes the process `cmd` starts receive `signal` when the bench dies, however it dies.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child ends, not the process:
/// the bench waits for each child on the thread that started it, so that thread outlives
/// the child unless the whole bench dies. The parent may die between `fork` and the
/// `prctl`, when the signal would never come: the child then checks that its parent is
/// still the bench and, if not, does not exec at all.
pub fn die_with_bench(cmd: &mut Command, signal: Signal) {
    let bench = nix::unistd::getpid();
    // SAFETY: the closure runs in the child between fork and exec and makes only
    // async-signal-safe system calls (prctl, getppid); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            prctl::set_pdeathsig(signal)?;
            if nix::unistd::getppid() != bench {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            Ok(())
        });
    }
}

/// Spawns `cmd` (stamped from `spawn_ns`) so that it dies with the bench (SIGKILL, see
/// [`die_with_bench`]), waits at most `limit`, reaps it.
pub fn run(
    cmd: Command,
    spawn_ns: u64,
    capture: bool,
    limit: Option<Duration>,
) -> Result<Finished, String> {
    run_dying_with(cmd, Some(Signal::SIGKILL), spawn_ns, capture, limit)
}

/// [`run`], with `death` as the signal the process gets when the bench dies (SIGTERM for
/// twinbox's own instances, which then tear their box down), or none.
///
/// `None` is for the native box's timed workloads only: a parent-death signal needs code
/// in the child before exec, so std must `fork` the whole bench instead of using
/// `posix_spawn` (vfork speed), which adds to every native start what copying the
/// bench's page tables costs (measured: 0.65 → 1.7–3.1 ms per `/bin/true` from a process
/// with 64 MiB resident). The native start is the baseline every box is compared with, so
/// it stays undisturbed; its workloads are finite host processes that hold no mount, state
/// or cgroup, and end by themselves if the bench is killed.
///
/// `Command::spawn` returns only once `execve` succeeded (std reports exec failures
/// through a close-on-exec pipe), so its return is the `workload_started` stamp.
pub fn run_dying_with(
    mut cmd: Command,
    death: Option<Signal>,
    spawn_ns: u64,
    capture: bool,
    limit: Option<Duration>,
) -> Result<Finished, String> {
    if let Some(signal) = death {
        die_with_bench(&mut cmd, signal);
    }
    let mut timeline = Timeline::starting_at(spawn_ns);
    cmd.stdin(Stdio::null());
    if capture {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    timeline.record_now(Phase::WorkloadStarted);
    let readers = capture.then(|| spawn_readers(&mut child));
    let started = Instant::now();
    let pid = child.id() as libc::pid_t;
    let mut killed = false;
    let mut interrupted: Option<(i32, Instant)> = None;
    let mut polls: u64 = 0;
    let mut hwm_kib: Option<u64> = None;
    let (status, rusage) = loop {
        let mut status = 0;
        // SAFETY: all-zero is a valid rusage.
        let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `pid` is our unreaped child; the out-pointers are valid locals.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut rusage) };
        if r == pid {
            break (status, rusage);
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("waiting for pid {pid}: {e}"));
        }
        if !killed && limit.is_some_and(|l| started.elapsed() > l) {
            let _ = child.kill();
            killed = true;
        }
        // The bench was interrupted (SIGINT/SIGTERM recorded by its handler): do not wait
        // for a child that would only end at its time limit. SIGTERM first, so a runtime
        // (`twinbox ctr run`, runc, QEMU) tears its instance down; SIGKILL if it has not
        // ended within TERM_GRACE.
        match interrupted {
            None => {
                interrupted = twinbox_spec::interrupt::received().map(|s| (s, Instant::now()));
                if interrupted.is_some() && !killed {
                    // SAFETY: `pid` is our unreaped child, so it cannot have been reused.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                }
            }
            Some((_, at)) if !killed && at.elapsed() > TERM_GRACE => {
                let _ = child.kill();
                killed = true;
            }
            Some(_) => {}
        }
        // The child's own peak RSS, sampled every ~10 ms while it lives: `ru_maxrss` of
        // a child spawned with vfork semantics starts from the parent's high-water mark,
        // so it would report the bench's memory, not the workload's.
        if polls.is_multiple_of(50) {
            hwm_kib = twinbox_spec::host::process_status_kib(child.id(), "VmHWM").or(hwm_kib);
        }
        polls += 1;
        // Short sleeps: the exit stamp is at most this late.
        std::thread::sleep(Duration::from_micros(200));
    };
    timeline.record_now(Phase::WorkloadExited);
    let output = readers.map(|(a, b)| {
        let mut text = a.join().unwrap_or_default();
        text.push_str(&b.join().unwrap_or_default());
        text
    });
    timeline.record_now(Phase::TornDown);
    let outcome = if let Some((signal, _)) = interrupted {
        Outcome::Failed(format!("interrupted by signal {signal}"))
    } else if killed {
        Outcome::Failed(format!(
            "time limit of {:.1} s reached",
            limit.unwrap_or_default().as_secs_f64()
        ))
    } else if libc::WIFEXITED(status) {
        Outcome::Exited(libc::WEXITSTATUS(status))
    } else {
        Outcome::Signaled(libc::WTERMSIG(status))
    };
    let us = |t: libc::timeval| (t.tv_sec as u64) * 1_000_000 + t.tv_usec as u64;
    Ok(Finished {
        outcome,
        timeline,
        output,
        usage: Usage {
            runtime_peak_rss_kib: hwm_kib,
            cpu_user_us: Some(us(rusage.ru_utime)),
            cpu_system_us: Some(us(rusage.ru_stime)),
            ..Usage::default()
        },
    })
}

type Reader = std::thread::JoinHandle<String>;

/// Drains stdout and stderr on threads so a chatty child never blocks on a full pipe.
fn spawn_readers(child: &mut Child) -> (Reader, Reader) {
    fn drain(mut r: impl Read + Send + 'static) -> Reader {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    }
    let out = child.stdout.take().expect("stdout is piped");
    let err = child.stderr.take().expect("stderr is piped");
    (drain(out), drain(err))
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinbox_spec::clock::monotonic_ns;

    #[test]
    fn stamps_are_ordered_and_status_passes_through() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "echo hi; exit 3"]);
        let done = run(cmd, monotonic_ns(), true, None).unwrap();
        assert_eq!(done.outcome, Outcome::Exited(3));
        assert_eq!(done.output.as_deref(), Some("hi\n"));
        assert!(done.timeline.is_ordered());
        assert!(done.timeline.get(Phase::TornDown).is_some());
        assert!(done.usage.cpu_user_us.is_some());
    }

    #[test]
    fn peak_rss_is_the_workloads_own() {
        let mut cmd = Command::new("/bin/sleep");
        cmd.arg("0.3");
        let done = run(cmd, monotonic_ns(), false, None).unwrap();
        let kib = done.usage.runtime_peak_rss_kib.unwrap();
        // sleep(1) is a few MiB at most; the test process is larger than that would allow
        // only by accident, so just check it is a plausible small process.
        assert!(kib > 0 && kib < 64 * 1024, "{kib} KiB");
    }

    #[test]
    fn time_limit_kills() {
        let mut cmd = Command::new("/bin/sleep");
        cmd.arg("30");
        let done = run(cmd, monotonic_ns(), false, Some(Duration::from_millis(50))).unwrap();
        assert!(matches!(done.outcome, Outcome::Failed(ref m) if m.contains("time limit")));
    }

    #[test]
    fn children_die_with_the_thread_that_started_them() {
        // A thread stands in for the bench: it starts a long sleep and ends without
        // waiting; the parent-death signal must kill the sleep.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut cmd = Command::new("/bin/sleep");
            cmd.arg("30");
            die_with_bench(&mut cmd, Signal::SIGKILL);
            let child = cmd.spawn().unwrap();
            tx.send(child).unwrap();
        })
        .join()
        .unwrap();
        let mut child = rx.recv().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "sleep outlived its parent thread"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn missing_program_is_an_error() {
        let cmd = Command::new("/nonexistent/twinbox-bench-test");
        assert!(run(cmd, monotonic_ns(), false, None).is_err());
    }
}
