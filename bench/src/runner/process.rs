//! Running a host process with phase stamps, a time limit and its own resource usage
//! (through `wait4`, so concurrent children of ours do not mix in).
//!
//! Every runtime and peer VMM the bench starts dies with it ([`die_with_bench`]): a
//! bench killed with SIGKILL, which runs no cleanup of its own, leaves none running. The
//! native box's workloads are the exception (see [`run_dying_with`]).

use super::footprint::Footprint;
use nix::sys::prctl;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
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
    /// Its stdout and stderr, when captured (stdout first).
    pub output: Option<String>,
    /// How many bytes of `output` are stdout.
    pub stdout_len: usize,
    /// Whether a VMM's memory was read at its exit (see [`run_vmm`]).
    pub exit_read: bool,
    /// CPU time of the process, and its peak RSS when it lived long enough to be sampled
    /// (a VMM's: its own and its guest RAM's, from [`Footprint`]s, see [`run_vmm`]).
    pub usage: Usage,
}

/// The first wait between two looks at a running child: its exit stamp is at most this
/// late for a run of a few milliseconds.
const POLL_MIN: Duration = Duration::from_micros(200);
/// The longest wait between two looks: a run of seconds is stamped to within this.
const POLL_MAX: Duration = Duration::from_millis(2);
/// The wait between two looks grows with the run's age: 1/POLL_AGE_DIVISOR of it, between
/// [`POLL_MIN`] and [`POLL_MAX`], so the stamp's error stays under 1 % of the run while a
/// long run is not woken thousands of times a second (each wake-up is CPU taken from the
/// box being measured, on a host with few cores).
const POLL_AGE_DIVISOR: u32 = 200;

/// The first reading of a VMM's smaps after its start; each later one comes twice as long
/// after the start as the one before (5, 10, 20, 40 ms, ...), up to [`FOOTPRINT_EVERY_MAX`]
/// apart. Reading smaps walks the page tables of the whole guest RAM mapping: measured in
/// the lab (one CPU under QEMU's software CPU), ~4 ms per reading of a booted 128 MiB
/// guest, so a reading every 5 ms took close to half of the CPU from the guest being
/// timed. The reading at the VMM's exit (see [`run_vmm`]) still catches what it holds at
/// the end.
const FOOTPRINT_FIRST: Duration = Duration::from_millis(5);
/// The longest time between two readings of a running VMM's smaps.
const FOOTPRINT_EVERY_MAX: Duration = Duration::from_millis(250);

/// How long to wait before looking at a child again, `age` after its start.
fn poll_interval(age: Duration) -> Duration {
    (age / POLL_AGE_DIVISOR).clamp(POLL_MIN, POLL_MAX)
}

/// When the reading after one taken `age` after the start is due (see [`FOOTPRINT_FIRST`]).
fn next_footprint_at(age: Duration) -> Duration {
    (age * 2).clamp(FOOTPRINT_FIRST, age + FOOTPRINT_EVERY_MAX)
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
    cmd: Command,
    death: Option<Signal>,
    spawn_ns: u64,
    capture: bool,
    limit: Option<Duration>,
) -> Result<Finished, String> {
    watch(cmd, death, spawn_ns, capture, limit, None)
}

/// [`run_dying_with`] for a VMM whose guest has `guest_ram_kib` of RAM, with its memory
/// measured as for every VMM alike: the peak of its own RSS and PSS and of its guest RAM's
/// resident pages ([`Footprint`]), read at growing intervals while it runs (5, 10, 20 ms
/// after its start, ..., then every 250 ms) and once more as it exits.
///
/// The reading at exit is what makes a short run count: a process that has exited has no
/// memory left to read (a zombie's smaps is empty, and `ru_maxrss` after a vfork-style
/// spawn is the bench's), and a run of a few milliseconds may end before the first
/// sample. So the VMM's main thread is traced for its exit alone (`PTRACE_SEIZE` with
/// `PTRACE_O_TRACEEXIT`: no syscall or signal tracing beyond re-delivering what it gets):
/// it stops on its way out, with its memory intact, is read, and goes on. The time it
/// waited for the bench is taken off its exit stamps; the note says so.
pub fn run_vmm(
    cmd: Command,
    death: Signal,
    spawn_ns: u64,
    capture: bool,
    limit: Option<Duration>,
    guest_ram_kib: u64,
) -> Result<Finished, String> {
    watch(
        cmd,
        Some(death),
        spawn_ns,
        capture,
        limit,
        Some(guest_ram_kib),
    )
}

/// The VMM memory readings of one run in progress.
struct Reading {
    guest_ram_kib: u64,
    /// Whether its exit is traced (the seize worked).
    traced: bool,
    peak: Option<Footprint>,
    /// Time the process spent stopped at its exit waiting for the bench.
    paused_ns: u64,
}

impl Reading {
    fn sample(&mut self, pid: u32) {
        if let Some(now) = Footprint::of(pid, self.guest_ram_kib) {
            self.peak = Some(self.peak.map_or(now, |p| p.max(now)));
        }
    }

    /// Handles a ptrace stop of the traced process: at its exit, one last reading, then
    /// it goes on; a signal it was sent is delivered as if nobody watched.
    fn stopped(&mut self, pid: u32, status: i32) {
        let tracee = Pid::from_raw(pid as libc::pid_t);
        let event = status >> 16;
        let resumed = if event == libc::PTRACE_EVENT_EXIT {
            let stopped_at = twinbox_spec::clock::monotonic_ns();
            self.sample(pid);
            let r = ptrace::detach(tracee, None);
            self.paused_ns += twinbox_spec::clock::monotonic_ns() - stopped_at;
            r
        } else if event != 0 {
            // A group stop or another event: go on.
            ptrace::cont(tracee, None)
        } else {
            let signal = Signal::try_from(libc::WSTOPSIG(status)).ok();
            ptrace::cont(tracee, signal)
        };
        if let Err(e) = resumed {
            tracing::warn!("resuming traced pid {pid}: {e}");
        }
    }
}

fn watch(
    mut cmd: Command,
    death: Option<Signal>,
    spawn_ns: u64,
    capture: bool,
    limit: Option<Duration>,
    guest_ram_kib: Option<u64>,
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
    let mut reading = guest_ram_kib.map(|guest_ram_kib| Reading {
        guest_ram_kib,
        traced: ptrace::seize(
            Pid::from_raw(child.id() as libc::pid_t),
            ptrace::Options::PTRACE_O_TRACEEXIT,
        )
        .map_err(|e| tracing::warn!("cannot trace pid {} for its exit: {e}", child.id()))
        .is_ok(),
        peak: None,
        paused_ns: 0,
    });
    let readers = capture.then(|| spawn_readers(&mut child));
    let started = Instant::now();
    let pid = child.id() as libc::pid_t;
    let mut killed = false;
    let mut interrupted: Option<(i32, Instant)> = None;
    let mut next_footprint = FOOTPRINT_FIRST;
    let mut next_hwm = Duration::ZERO;
    let mut hwm_kib: Option<u64> = None;
    let (status, rusage) = loop {
        let mut status = 0;
        // SAFETY: all-zero is a valid rusage.
        let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `pid` is our unreaped child; the out-pointers are valid locals.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut rusage) };
        if r == pid && libc::WIFSTOPPED(status) {
            if let Some(reading) = reading.as_mut() {
                reading.stopped(child.id(), status);
            }
            continue;
        }
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
        // so it would report the bench's memory, not the workload's. A VMM's smaps, which
        // costs more to read, at growing intervals (see FOOTPRINT_FIRST).
        let age = started.elapsed();
        match reading.as_mut() {
            Some(reading) if age >= next_footprint => {
                reading.sample(child.id());
                next_footprint = next_footprint_at(started.elapsed());
            }
            Some(_) => {}
            None if age >= next_hwm => {
                hwm_kib = twinbox_spec::host::process_status_kib(child.id(), "VmHWM").or(hwm_kib);
                next_hwm = age + Duration::from_millis(10);
            }
            None => {}
        }
        // The exit stamp is at most this late.
        std::thread::sleep(poll_interval(age));
    };
    // The time the process waited at its exit for the bench's reading is not its own.
    let paused_ns = reading.as_ref().map_or(0, |r| r.paused_ns);
    timeline.record(
        Phase::WorkloadExited,
        twinbox_spec::clock::monotonic_ns() - paused_ns,
    );
    let mut stdout_len = 0;
    let output = readers.map(|(a, b)| {
        let mut text = a.join().unwrap_or_default();
        stdout_len = text.len();
        text.push_str(&b.join().unwrap_or_default());
        text
    });
    timeline.record(
        Phase::TornDown,
        twinbox_spec::clock::monotonic_ns() - paused_ns,
    );
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
    let peak = reading.as_ref().and_then(|r| r.peak);
    Ok(Finished {
        outcome,
        timeline,
        output,
        stdout_len,
        usage: Usage {
            runtime_peak_rss_kib: peak.map(|p| p.own_rss_kib).or(hwm_kib),
            runtime_peak_pss_kib: peak.map(|p| p.own_pss_kib),
            guest_memory_touched_kib: peak.map(|p| p.guest_rss_kib),
            cpu_user_us: Some(us(rusage.ru_utime)),
            cpu_system_us: Some(us(rusage.ru_stime)),
            ..Usage::default()
        },
        exit_read: reading.is_some_and(|r| r.traced),
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

    /// Set in the environment of this test binary run again as a memory-using child.
    const CHILD_ENV: &str = "TWINBOX_BENCH_MEMORY_CHILD";
    const OWN_MIB: usize = 48;
    const GUEST_MIB: usize = 64;
    const TOUCHED_MIB: usize = 16;

    /// The child: touches OWN_MIB of heap, and TOUCHED_MIB of a GUEST_MIB region (standing
    /// for guest RAM, as large as the "guest"), then exits at once — a run far shorter
    /// than any sampling period.
    #[test]
    fn memory_child() {
        if std::env::var_os(CHILD_ENV).is_none() {
            return;
        }
        let own = vec![1u8; OWN_MIB << 20];
        // Mapped as VMMs map guest RAM (vm-memory, Firecracker): private, anonymous,
        // MAP_NORESERVE — which also keeps the kernel from merging it with the heap's
        // anonymous mappings.
        // SAFETY: a fresh anonymous mapping at an address the kernel picks; only the
        // first TOUCHED_MIB of it are written, and it is never unmapped (the process exits).
        let guest = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                GUEST_MIB << 20,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(guest, libc::MAP_FAILED);
        // SAFETY: within the mapping just made, writable.
        unsafe { std::ptr::write_bytes(guest.cast::<u8>(), 1, TOUCHED_MIB << 20) };
        std::hint::black_box(&own);
        std::process::exit(0);
    }

    #[test]
    fn a_short_lived_vmm_s_own_memory_and_guest_ram_are_read_at_its_exit() {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "runner::process::tests::memory_child",
            "--test-threads=1",
        ]);
        cmd.env(CHILD_ENV, "1");
        let guest_kib = (GUEST_MIB as u64) << 10;
        let done = run_vmm(cmd, Signal::SIGKILL, monotonic_ns(), true, None, guest_kib).unwrap();
        assert_eq!(done.outcome, Outcome::Exited(0), "{:?}", done.output);
        assert!(done.exit_read, "the exit was not traced");
        let mib = |kib: Option<u64>| kib.unwrap() as f64 / 1024.0;
        // The heap it touched, plus the test harness's own few MiB.
        let own = mib(done.usage.runtime_peak_rss_kib);
        assert!(
            own >= OWN_MIB as f64 && own < (OWN_MIB + 24) as f64,
            "own RSS {own:.1} MiB, expected about {OWN_MIB}"
        );
        let pss = mib(done.usage.runtime_peak_pss_kib);
        assert!(pss >= OWN_MIB as f64 && pss <= own, "own PSS {pss:.1} MiB");
        let guest = mib(done.usage.guest_memory_touched_kib);
        assert!(
            guest >= TOUCHED_MIB as f64 && guest < (TOUCHED_MIB + 2) as f64,
            "guest RAM touched {guest:.1} MiB, expected about {TOUCHED_MIB}"
        );
        assert!(done.timeline.is_ordered());
    }

    #[test]
    fn a_vmm_that_is_killed_or_signalled_is_still_waited_for_and_measured() {
        // A signal it is sent while traced reaches it as if nobody watched.
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "kill -USR1 $$; exit 7"]);
        let done = run_vmm(cmd, Signal::SIGKILL, monotonic_ns(), false, None, 1 << 20).unwrap();
        assert_eq!(done.outcome, Outcome::Signaled(libc::SIGUSR1));
        let mut cmd = Command::new("/bin/sh");
        cmd.args([
            "-c",
            "trap 'exit 7' USR1; sleep 0.05; kill -USR1 $$; sleep 0.05",
        ]);
        let done = run_vmm(cmd, Signal::SIGKILL, monotonic_ns(), false, None, 1 << 20).unwrap();
        assert_eq!(done.outcome, Outcome::Exited(7));
        assert!(done.usage.runtime_peak_rss_kib.unwrap() > 0);
        let mut cmd = Command::new("/bin/sleep");
        cmd.arg("30");
        let limit = Some(Duration::from_millis(100));
        let done = run_vmm(cmd, Signal::SIGKILL, monotonic_ns(), false, limit, 1 << 20).unwrap();
        assert!(matches!(done.outcome, Outcome::Failed(ref m) if m.contains("time limit")));
    }

    #[test]
    fn a_long_run_is_looked_at_less_often_and_its_memory_read_at_growing_intervals() {
        let ms = Duration::from_millis;
        assert_eq!(poll_interval(ms(1)), POLL_MIN);
        assert_eq!(poll_interval(ms(100)), Duration::from_micros(500));
        assert_eq!(poll_interval(ms(5000)), POLL_MAX);
        // Readings at 5, 10, 20, ... ms, then every 250 ms: a 5 s boot is read about 25
        // times instead of every 5 ms (about 1000).
        let mut at = Duration::ZERO;
        let mut readings = 0;
        while at < ms(5000) {
            at = next_footprint_at(at);
            readings += 1;
        }
        assert_eq!(next_footprint_at(Duration::ZERO), FOOTPRINT_FIRST);
        assert_eq!(next_footprint_at(ms(5)), ms(10));
        assert_eq!(next_footprint_at(ms(1000)), ms(1250));
        assert!((20..=30).contains(&readings), "{readings} readings in 5 s");
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
