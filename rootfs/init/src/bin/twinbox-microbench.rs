//! `twinbox-microbench`: the cost of the three kernel entry points a box taxes most —
//! a system call, a fork, an exec — measured from inside the box.
//!
//! It is a static binary in the image (`/usr/bin/twinbox-microbench`), and the very same
//! file sits next to the image in the cache for the bench's native runs, so all boxes
//! run identical code.
//!
//! Each measurement repeats its operation in batches until at least [`MIN_TIME`] has
//! passed, then prints one `key: value` line with the mean cost per operation:
//!
//! - `syscall_ns`: `syscall(SYS_getppid)` — a real kernel entry and exit every time (no
//!   vDSO, nothing cached by libc), the floor of every system call's cost.
//! - `fork_us`: `fork()` of this small process, the child `_exit(0)`s at once, the parent
//!   `waitpid`s — process creation and teardown (page tables, a pid in the namespace).
//! - `exec_us`: the same, but the child `execve`s this binary again with `--exit`, which
//!   returns 0 at once — adds loading a static ELF from the box's root filesystem.
//!
//! Usage: `twinbox-microbench [syscall|fork|exec]...` (default: all three, in that order).

use std::ffi::CString;
use std::time::{Duration, Instant};

/// Each measurement runs at least this long.
const MIN_TIME: Duration = Duration::from_millis(500);
/// Argument that makes the binary exit 0 at once (the exec target).
const EXIT_ARG: &str = "--exit";

/// One measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Measure {
    Syscall,
    Fork,
    Exec,
}

impl Measure {
    const ALL: [Measure; 3] = [Measure::Syscall, Measure::Fork, Measure::Exec];

    fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    fn name(self) -> &'static str {
        match self {
            Measure::Syscall => "syscall",
            Measure::Fork => "fork",
            Measure::Exec => "exec",
        }
    }

    /// Output key and the unit the mean is printed in (nanoseconds per unit).
    fn key(self) -> (&'static str, f64) {
        match self {
            Measure::Syscall => ("syscall_ns", 1.0),
            Measure::Fork => ("fork_us", 1_000.0),
            Measure::Exec => ("exec_us", 1_000.0),
        }
    }

    /// Operations per batch: a clock read per batch must not weigh on the result.
    fn batch(self) -> u64 {
        match self {
            Measure::Syscall => 10_000,
            Measure::Fork | Measure::Exec => 10,
        }
    }
}

/// The measurements asked for on the command line.
fn parse_args(args: &[String]) -> Result<Vec<Measure>, String> {
    if args.is_empty() {
        return Ok(Measure::ALL.to_vec());
    }
    args.iter()
        .map(|a| {
            Measure::parse(a)
                .ok_or_else(|| format!("unknown measurement {a:?}: use syscall, fork, exec"))
        })
        .collect()
}

/// The line printed for a measurement.
fn format_line(m: Measure, ops: u64, elapsed: Duration) -> String {
    let (key, unit_ns) = m.key();
    let per_op = elapsed.as_nanos() as f64 / ops as f64 / unit_ns;
    format!(
        "{key}: {per_op:.3} ({ops} ops in {:.3} s)",
        elapsed.as_secs_f64()
    )
}

/// Waits for `pid`; `Err` unless it exited 0.
fn reap(pid: libc::pid_t) -> Result<(), String> {
    let mut status = 0;
    loop {
        // SAFETY: `pid` is our child; `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("waitpid: {e}"));
        }
    }
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Ok(())
    } else {
        Err(format!("child ended with wait status {status:#x}"))
    }
}

/// What one operation of `m` needs prepared before timing starts.
struct Exec {
    path: CString,
    argv: [*const libc::c_char; 3],
    env: [*const libc::c_char; 1],
    arg: CString,
}

impl Exec {
    fn new() -> Result<Box<Self>, String> {
        let exe = std::env::current_exe().map_err(|e| format!("finding this binary: {e}"))?;
        let path = CString::new(exe.into_os_string().into_encoded_bytes())
            .map_err(|_| "this binary's path has a NUL byte".to_string())?;
        let arg = CString::new(EXIT_ARG).expect("no NUL");
        let mut e = Box::new(Self {
            argv: [std::ptr::null(); 3],
            env: [std::ptr::null()],
            path,
            arg,
        });
        e.argv = [e.path.as_ptr(), e.arg.as_ptr(), std::ptr::null()];
        Ok(e)
    }
}

/// One fork, and in the child either `_exit(0)` or the exec.
fn fork_once(exec: Option<&Exec>) -> Result<(), String> {
    // SAFETY: the child only calls async-signal-safe functions (execve, _exit) on data
    // prepared before the fork.
    match unsafe { libc::fork() } {
        -1 => Err(format!("fork: {}", std::io::Error::last_os_error())),
        0 => {
            if let Some(e) = exec {
                // SAFETY: path, argv and env are NUL-terminated and live (owned by `e`).
                unsafe { libc::execve(e.path.as_ptr(), e.argv.as_ptr(), e.env.as_ptr()) };
                // SAFETY: leaving the child without running the parent's destructors.
                unsafe { libc::_exit(127) };
            }
            // SAFETY: as above.
            unsafe { libc::_exit(0) }
        }
        pid => reap(pid),
    }
}

/// Runs `m` in batches for at least [`MIN_TIME`]; returns (ops, elapsed).
fn measure(m: Measure) -> Result<(u64, Duration), String> {
    let exec = match m {
        Measure::Exec => Some(Exec::new()?),
        _ => None,
    };
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < MIN_TIME {
        for _ in 0..m.batch() {
            match m {
                Measure::Syscall => {
                    // SAFETY: getppid takes no arguments and cannot fail.
                    let ppid = unsafe { libc::syscall(libc::SYS_getppid) };
                    std::hint::black_box(ppid);
                }
                Measure::Fork => fork_once(None)?,
                Measure::Exec => fork_once(exec.as_deref())?,
            }
        }
        ops += m.batch();
    }
    Ok((ops, start.elapsed()))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(EXIT_ARG) {
        return;
    }
    let code = match parse_args(&args).and_then(|ms| {
        for m in ms {
            let (ops, elapsed) = measure(m)?;
            println!("{}", format_line(m, ops, elapsed));
        }
        Ok(())
    }) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("twinbox-microbench: {e}");
            1
        }
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_all_three_in_order() {
        assert_eq!(parse_args(&[]).unwrap(), Measure::ALL.to_vec());
        let one = parse_args(&["fork".to_string()]).unwrap();
        assert_eq!(one, vec![Measure::Fork]);
        assert!(parse_args(&["nope".to_string()])
            .unwrap_err()
            .contains("unknown measurement"));
    }

    #[test]
    fn lines_carry_the_mean_in_the_keys_unit() {
        let l = format_line(Measure::Syscall, 1000, Duration::from_micros(50));
        assert!(l.starts_with("syscall_ns: 50.000 (1000 ops"), "{l}");
        let l = format_line(Measure::Exec, 10, Duration::from_millis(5));
        assert!(l.starts_with("exec_us: 500.000 (10 ops"), "{l}");
    }

    #[test]
    fn fork_and_syscall_run_for_real() {
        let (ops, elapsed) = measure(Measure::Syscall).unwrap();
        assert!(ops >= Measure::Syscall.batch() && elapsed >= MIN_TIME);
        fork_once(None).unwrap();
    }
}
