//! Starting the workload as `posix_spawn` does: a child on init's own memory
//! (`CLONE_VM | CLONE_VFORK`) while init waits until it execs or exits — no copy of
//! init's page tables and no copy-on-write faults in init afterwards. Everything is
//! converted to C strings and pointer arrays before, so between the clone and `execve`
//! the child only makes raw system calls on memory prepared for it: it allocates nothing,
//! formats nothing (its messages go out in parts, `console::write_stderr`) and takes no
//! lock.
//!
//! The child gets a new session, the job's working directory, the job's user (an image's
//! `User`: supplementary groups, gid, uid, in that order, after everything that needs
//! root and right before exec), exactly the job's environment, default signal
//! dispositions and an empty signal mask, and `execvp` semantics (a command without a slash is searched in the job's `PATH`; a file the
//! kernel cannot execute is run by `/bin/sh`). On failure it prints what a shell would and
//! exits 127 (not found) or 126 (found but cannot be run).

use crate::console::{decimal, write_stderr};
use crate::sys::{cstring, errno_text, SysError, ERRNO_TEXT};
use std::ffi::CString;
use std::os::fd::RawFd;
use std::ptr;
use twinbox_proto::{Job, JobUser};

/// `PATH` when the job's environment has none (what `execvp` in glibc falls back to, plus
/// the sbin directories because init runs as root).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Exit status when the command is not found, like shells.
pub const EXIT_NOT_FOUND: i32 = 127;
/// Exit status when the command is found but cannot be run, or the working directory
/// cannot be entered.
pub const EXIT_CANNOT_RUN: i32 = 126;

/// Where the workload's stdin, stdout and stderr go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stdio {
    /// Keep the fds init inherited (the container runtime's pipes).
    Inherit,
    /// Keep the fds init inherited, a pty slave the runtime made (`-t`), and make it the
    /// controlling terminal.
    InheritTerminal,
    /// Open `/dev/console` (the VM's ttyS0) for all three (not as controlling tty).
    Console,
    /// These descriptors as stdin, stdout and stderr (the VM's ports). They must be 3 or
    /// above (see [`crate::sys::above_stdio`]) and close-on-exec in init.
    Fds([RawFd; 3]),
    /// This pty slave as all three and as the controlling terminal (the VM's `-t`); 3 or
    /// above, close-on-exec in init.
    Terminal(RawFd),
}

/// A workload ready to be started: all strings already in C form.
#[derive(Debug)]
pub struct Prepared {
    /// The command as the job gave it, for messages.
    command: String,
    /// The files to try in order (PATH lookup already done).
    candidates: Vec<CString>,
    argv: Vec<CString>,
    env: Vec<CString>,
    cwd: CString,
    stdio: Stdio,
    user: Option<JobUser>,
}

/// The calls that give the workload its user, behind a trait so their order is tested.
/// Each returns 0 or an errno.
pub trait IdentityCalls {
    /// `setgroups(2)`: exactly these supplementary groups.
    fn setgroups(&mut self, groups: &[libc::gid_t]) -> i32;
    /// `setgid(2)`.
    fn setgid(&mut self, gid: libc::gid_t) -> i32;
    /// `setuid(2)`: last, since it gives up the right to make the other two.
    fn setuid(&mut self, uid: libc::uid_t) -> i32;
}

/// The kernel's calls; used in the workload's child only. Raw system calls, not glibc's
/// `set*id`, which in a process with threads (the unit tests) would change every
/// thread's credentials, here those of the process whose memory the child runs on.
struct Kernel;

fn errno_of(r: libc::c_long) -> i32 {
    if r == 0 {
        0
    } else {
        // SAFETY: reading errno right after the failed call.
        unsafe { *libc::__errno_location() }
    }
}

impl IdentityCalls for Kernel {
    fn setgroups(&mut self, groups: &[libc::gid_t]) -> i32 {
        // SAFETY: a pointer and length of a slice that outlives the call.
        errno_of(unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) })
    }

    fn setgid(&mut self, gid: libc::gid_t) -> i32 {
        // SAFETY: plain syscall.
        errno_of(unsafe { libc::syscall(libc::SYS_setgid, gid) })
    }

    fn setuid(&mut self, uid: libc::uid_t) -> i32 {
        // SAFETY: plain syscall.
        errno_of(unsafe { libc::syscall(libc::SYS_setuid, uid) })
    }
}

/// Becomes `user`: groups, then gid, then uid (each needs the rights the next one takes
/// away). Stops at the first failure: which call and its errno.
pub fn become_user(
    calls: &mut impl IdentityCalls,
    user: &JobUser,
) -> Result<(), (&'static str, i32)> {
    match calls.setgroups(&user.groups) {
        0 => {}
        errno => return Err(("setgroups", errno)),
    }
    match calls.setgid(user.gid) {
        0 => {}
        errno => return Err(("setgid", errno)),
    }
    match calls.setuid(user.uid) {
        0 => Ok(()),
        errno => Err(("setuid", errno)),
    }
}

/// The `PATH` value in a `KEY=VALUE` environment, if any (the last one wins, like getenv
/// after putenv).
pub fn path_of(env: &[String]) -> Option<&str> {
    env.iter()
        .rev()
        .find_map(|entry| entry.strip_prefix("PATH="))
}

/// The files `execvp` would try for `command` with this `PATH`, in order. A command with a
/// slash is used as is; an empty `PATH` element means the current directory.
pub fn candidates(command: &str, path: Option<&str>) -> Vec<String> {
    if command.contains('/') {
        return vec![command.to_owned()];
    }
    path.unwrap_or(DEFAULT_PATH)
        .split(':')
        .map(|dir| {
            if dir.is_empty() {
                command.to_owned()
            } else {
                format!("{}/{command}", dir.trim_end_matches('/'))
            }
        })
        .collect()
}

/// The exit status of a failed exec and the words after `COMMAND: ` in its message, like
/// shells report it, without allocating.
fn exec_failure_words(errno: i32, buf: &mut [u8; ERRNO_TEXT]) -> (i32, &[u8]) {
    match errno {
        libc::ENOENT | libc::ENOTDIR => (EXIT_NOT_FOUND, b"not found"),
        libc::EACCES => (EXIT_CANNOT_RUN, b"permission denied"),
        other => (EXIT_CANNOT_RUN, errno_text(other, buf)),
    }
}

fn cstrings(items: &[String]) -> Result<Vec<CString>, SysError> {
    items.iter().map(|s| cstring(s)).collect()
}

/// A NULL-terminated pointer array over `items` (valid while `items` lives).
fn pointers(items: &[CString]) -> Vec<*const libc::c_char> {
    items
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(ptr::null()))
        .collect()
}

impl Prepared {
    /// Converts the job; fails only on strings that `execve` cannot carry.
    pub fn new(job: &Job, stdio: Stdio) -> Result<Self, SysError> {
        let command = job.argv.first().cloned().unwrap_or_default();
        let candidates = cstrings(&candidates(&command, path_of(&job.env)))?;
        Ok(Self {
            command,
            candidates,
            argv: cstrings(&job.argv)?,
            env: cstrings(&job.env)?,
            cwd: cstring(&job.cwd)?,
            stdio,
            user: job.user.clone(),
        })
    }

    /// Starts the child that becomes the workload (see the module docs); returns once it
    /// has exec'd (or failed and exited), with its pid.
    pub fn spawn(&self) -> Result<libc::pid_t, SysError> {
        // Built before the clone: the child allocates nothing.
        let argv = pointers(&self.argv);
        let env = pointers(&self.env);
        // `/bin/sh FILE ARG...` for a file the kernel cannot execute; the child puts FILE
        // in slot 1.
        let mut shell_argv: Vec<*const libc::c_char> = [SHELL.as_ptr(), ptr::null()]
            .into_iter()
            .chain(argv.iter().skip(1).copied())
            .collect();
        // Only the few pages the child touches are ever faulted in.
        let mut stack: Vec<u8> = Vec::with_capacity(CHILD_STACK);
        // The stack grows down from its top, which the ABI wants 16-byte aligned.
        let top = (stack.as_mut_ptr() as usize + CHILD_STACK) & !15;
        let launch = Launch {
            prepared: self,
            argv: &argv,
            env: &env,
            shell_argv: shell_argv.as_mut_ptr(),
        };
        // Every signal blocked across the clone, so that none runs one of init's handlers
        // in the child, on init's memory, before the child has reset them (posix_spawn
        // does the same); init's own mask comes back right after.
        // SAFETY: sigset_t is plain data; sigfillset fills it.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above; pthread_sigmask fills it.
        let mut before: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: signal-mask calls on sets of ours around a clone whose child runs
        // `launch_child` on `stack` and touches only what `launch` points at. All of it
        // outlives the child's use: with CLONE_VFORK this thread waits until the child has
        // exec'd or exited.
        // The child's setuid/setgid marks the memory it shares with init dumpable as the
        // host's fs.suid_dumpable says; init's own setting comes back right after (main.rs
        // makes init non-dumpable so the workload cannot ptrace it).
        // SAFETY: prctl with integer arguments.
        let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
        let (pid, errno) = unsafe {
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut before);
            let pid = libc::clone(
                launch_child,
                top as *mut libc::c_void,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                ptr::from_ref(&launch).cast_mut().cast(),
            );
            let errno = *libc::__errno_location();
            if dumpable >= 0 {
                libc::prctl(libc::PR_SET_DUMPABLE, dumpable as libc::c_ulong, 0, 0, 0);
            }
            libc::pthread_sigmask(libc::SIG_SETMASK, &before, ptr::null_mut());
            (pid, errno)
        };
        if pid == -1 {
            return Err(SysError::new("start the workload", errno));
        }
        Ok(pid)
    }

    /// The child, from the clone to the exec; never returns.
    fn child(&self, launch: &Launch<'_>) -> ! {
        let (argv, env) = (launch.argv, launch.env);
        // SAFETY: this is the workload's child on init's memory (module docs): below only
        // raw system calls on memory prepared before the clone, ending in execve or
        // _exit.
        unsafe {
            reset_signals();
            libc::setsid();
            match self.stdio {
                Stdio::Inherit => {}
                Stdio::InheritTerminal => take_terminal(),
                Stdio::Console => attach_console(),
                Stdio::Fds(fds) => attach(fds),
                Stdio::Terminal(fd) => {
                    attach([fd; 3]);
                    take_terminal();
                }
            }
            if libc::chdir(self.cwd.as_ptr()) != 0 {
                let errno = *libc::__errno_location();
                write_stderr(&[
                    b"cannot change directory to ",
                    self.cwd.as_bytes(),
                    b": ",
                    errno_text(errno, &mut [0; ERRNO_TEXT]),
                ]);
                libc::_exit(EXIT_CANNOT_RUN);
            }
            // The job's user last: the terminal and the directory above may need root.
            if let Some(user) = &self.user {
                if let Err((call, errno)) = become_user(&mut Kernel, user) {
                    write_stderr(&[
                        b"cannot run as user ",
                        decimal(user.uid, &mut [0; 10]),
                        b":",
                        decimal(user.gid, &mut [0; 10]),
                        b": ",
                        call.as_bytes(),
                        b": ",
                        errno_text(errno, &mut [0; ERRNO_TEXT]),
                    ]);
                    libc::_exit(EXIT_CANNOT_RUN);
                }
            }
            // execvp: ENOENT/ENOTDIR move on to the next PATH entry, EACCES too but is
            // remembered, anything else stops the search.
            let mut seen_eacces = false;
            let mut last = libc::ENOENT;
            for file in &self.candidates {
                libc::execve(file.as_ptr(), argv.as_ptr(), env.as_ptr());
                let errno = *libc::__errno_location();
                match errno {
                    libc::ENOENT | libc::ENOTDIR => {}
                    libc::EACCES => seen_eacces = true,
                    libc::ENOEXEC => {
                        // A file without an interpreter line: the shell runs it, as
                        // execvp does.
                        *launch.shell_argv.add(1) = file.as_ptr();
                        libc::execve(SHELL.as_ptr(), launch.shell_argv, env.as_ptr());
                        last = *libc::__errno_location();
                        break;
                    }
                    other => {
                        last = other;
                        break;
                    }
                }
            }
            if seen_eacces && (last == libc::ENOENT || last == libc::ENOTDIR) {
                last = libc::EACCES;
            }
            let mut buf = [0; ERRNO_TEXT];
            let (status, words) = exec_failure_words(last, &mut buf);
            write_stderr(&[self.command.as_bytes(), b": ", words]);
            libc::_exit(status)
        }
    }
}

/// Bytes of stack for the workload's child until its exec: it formats and allocates
/// nothing, so a few pages would do.
const CHILD_STACK: usize = 64 * 1024;

/// The shell that runs a file without an interpreter line, as `execvp` does.
const SHELL: &std::ffi::CStr = c"/bin/sh";

/// What the workload's child is given: the job and the pointer arrays made for it.
struct Launch<'a> {
    prepared: &'a Prepared,
    argv: &'a [*const libc::c_char],
    env: &'a [*const libc::c_char],
    /// `/bin/sh`, a slot for the file, then argv after its first; NULL-terminated.
    shell_argv: *mut *const libc::c_char,
}

/// The child's entry, clone's `fn`.
extern "C" fn launch_child(launch: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `spawn` passes a `Launch` that outlives the child's run on this memory.
    let launch = unsafe { &*launch.cast::<Launch<'_>>() };
    launch.prepared.child(launch)
}

/// Unblocks every signal and restores every disposition to its default: init blocks the
/// signals it waits for, and Rust's runtime ignores SIGPIPE; the workload must see neither.
///
/// # Safety
/// Only in the workload's child, before exec.
unsafe fn reset_signals() {
    // SAFETY: plain signal syscalls on a stack-allocated set.
    unsafe {
        for signal in 1..=libc::SIGRTMAX() {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::signal(signal, libc::SIG_DFL);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, ptr::null_mut());
    }
}

/// Opens the console as fds 0-2, deliberately *not* as the controlling terminal.
///
/// When a session leader whose controlling terminal is a real tty exits, the kernel hangs
/// that tty up, and the hangup discards output the serial driver has not sent yet: with
/// more vCPUs than host CPUs the workload's last lines were lost about one run in three.
/// No input reaches the guest's console (the VMM forwards none), so a controlling
/// terminal would bring nothing but that. Init drains the console before power-off.
/// Failures leave the inherited fds.
///
/// # Safety
/// Only in the workload's child, after `setsid`.
unsafe fn attach_console() {
    // SAFETY: plain syscalls on a static path and our own descriptors.
    unsafe {
        let fd = libc::open(c"/dev/console".as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
        if fd < 0 {
            return;
        }
        for target in 0..=2 {
            libc::dup2(fd, target);
        }
        if fd > 2 {
            libc::close(fd);
        }
    }
}

/// Puts `fds` at 0, 1 and 2 (their dups lose close-on-exec). The sources are 3 or above,
/// so no `dup2` overwrites a later one's source. A failure ends the child with 126 and a
/// line on whatever stderr it has by then.
///
/// # Safety
/// Only in the workload's child.
unsafe fn attach(fds: [RawFd; 3]) {
    for (target, fd) in (0..).zip(fds) {
        // SAFETY: dup2 on descriptors of this process.
        if unsafe { libc::dup2(fd, target) } < 0 {
            // SAFETY: reading errno right after the failed call.
            let errno = unsafe { *libc::__errno_location() };
            write_stderr(&[
                b"cannot set up fd ",
                decimal(target as u32, &mut [0; 10]),
                b" of the workload: ",
                errno_text(errno, &mut [0; ERRNO_TEXT]),
            ]);
            // SAFETY: ends the child without running anything of the parent's.
            unsafe { libc::_exit(EXIT_CANNOT_RUN) };
        }
    }
}

/// Makes stdin, a terminal, the controlling terminal of the child's new session, so the
/// terminal's Ctrl-C and hangup reach the workload's foreground process group. If init
/// itself still has it as its controlling terminal (a runtime that did not open it with
/// `O_NOCTTY`), only stealing it (arg 1, needs `CAP_SYS_ADMIN`) works. A failure is one
/// line on stderr and the workload runs without a controlling terminal.
///
/// # Safety
/// Only in the workload's child, after `setsid`.
unsafe fn take_terminal() {
    // SAFETY: TIOCSCTTY takes an int by value.
    let taken = unsafe {
        libc::ioctl(0, libc::TIOCSCTTY, 0) == 0 || libc::ioctl(0, libc::TIOCSCTTY, 1) == 0
    };
    if !taken {
        // SAFETY: reading errno right after the failed call.
        let errno = unsafe { *libc::__errno_location() };
        write_stderr(&[
            b"cannot make stdin the controlling terminal: ",
            errno_text(errno, &mut [0; ERRNO_TEXT]),
        ]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinbox_proto::ExitCode;

    #[test]
    fn path_lookup_follows_execvp() {
        assert_eq!(candidates("/bin/echo", Some("/x")), ["/bin/echo"]);
        assert_eq!(candidates("./run.sh", None), ["./run.sh"]);
        assert_eq!(candidates("ls", Some("/a:/b/")), ["/a/ls", "/b/ls"]);
        assert_eq!(candidates("ls", Some(":/a:")), ["ls", "/a/ls", "ls"]);
        assert_eq!(candidates("ls", None)[0], "/usr/local/sbin/ls");
        assert_eq!(
            candidates("ls", None).len(),
            DEFAULT_PATH.split(':').count()
        );
    }

    #[test]
    fn path_comes_from_the_job_env_last_entry_winning() {
        let env = vec![
            "PATHX=/no".to_owned(),
            "PATH=/first".into(),
            "HOME=/".into(),
            "PATH=/second".into(),
        ];
        assert_eq!(path_of(&env), Some("/second"));
        assert_eq!(path_of(&["HOME=/".to_owned()]), None);
    }

    /// The exit status and message for a failed exec.
    fn exec_failure(command: &str, errno: i32) -> (i32, String) {
        let mut buf = [0; ERRNO_TEXT];
        let (status, words) = exec_failure_words(errno, &mut buf);
        let words = String::from_utf8_lossy(words);
        (status, format!("{command}: {words}"))
    }

    #[test]
    fn exec_errors_map_like_shells() {
        assert_eq!(
            exec_failure("nope", libc::ENOENT),
            (127, "nope: not found".to_owned())
        );
        assert_eq!(
            exec_failure("x/y", libc::ENOTDIR),
            (127, "x/y: not found".to_owned())
        );
        assert_eq!(
            exec_failure("/etc", libc::EACCES),
            (126, "/etc: permission denied".to_owned())
        );
        let (status, message) = exec_failure("big", libc::E2BIG);
        assert_eq!(status, 126);
        assert_eq!(message, "big: Argument list too long");
    }

    #[test]
    fn tricky_arguments_survive_conversion() {
        let job = Job {
            env: vec![
                "Q=a \"b\" 'c'".into(),
                "U=naïve 日本".into(),
                "PATH=/bin".into(),
            ],
            cwd: "/tmp/dir with space".into(),
            ..Job::new([
                "echo",
                "two  spaces",
                "\"quoted\" 'single'",
                "日本語 🚀",
                "",
            ])
        };
        let prepared = Prepared::new(&job, Stdio::Inherit).unwrap();
        let back = |v: &[CString]| {
            v.iter()
                .map(|c| c.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(back(&prepared.argv), job.argv);
        assert_eq!(back(&prepared.env), job.env);
        assert_eq!(prepared.cwd.to_str().unwrap(), job.cwd);
        assert_eq!(back(&prepared.candidates), ["/bin/echo"]);
        let ptrs = pointers(&prepared.argv);
        assert_eq!(ptrs.len(), job.argv.len() + 1);
        assert!(ptrs.last().unwrap().is_null());
    }

    /// Runs `job` through the real spawn path and returns its wait status.
    fn run(job: &Job) -> ExitCode {
        let pid = Prepared::new(job, Stdio::Inherit).unwrap().spawn().unwrap();
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        ExitCode::from_wait_status(status)
    }

    fn sh(script: &str, env: &[&str]) -> Job {
        Job {
            env: env.iter().map(|e| e.to_string()).collect(),
            ..Job::new(["sh", "-c", script])
        }
    }

    #[test]
    fn a_real_workload_runs_with_exactly_the_job_env_and_cwd() {
        assert_eq!(
            run(&sh("exit 7", &["PATH=/usr/bin:/bin"])),
            ExitCode::Exited(7)
        );
        // `env` lists the whole environment: nothing of the test process leaks in.
        let script = r#"test "$(env | sort | tr '\n' ' ')" = "A=1 PATH=/usr/bin:/bin PWD=/tmp " && test "$(pwd)" = /tmp"#;
        let job = Job {
            cwd: "/tmp".into(),
            ..sh(script, &["PATH=/usr/bin:/bin", "A=1"])
        };
        assert_eq!(run(&job), ExitCode::Exited(0));
        // Blocked or ignored signals in the parent are reset in the workload.
        assert_eq!(
            run(&sh("kill -TERM $$; exit 3", &["PATH=/usr/bin:/bin"])),
            ExitCode::Signaled(15)
        );
        // The test harness ignores SIGPIPE (13), as init does: the workload gets the default
        // back (a shell cannot undo a disposition ignored at its start).
        assert_eq!(
            run(&sh("kill -PIPE $$; exit 3", &["PATH=/usr/bin:/bin"])),
            ExitCode::Signaled(13)
        );
    }

    #[test]
    fn exec_failures_exit_like_shells() {
        let missing = Job {
            env: vec!["PATH=/nonexistent:/also-not".into()],
            ..Job::new(["no-such-cmd-twinbox"])
        };
        assert_eq!(run(&missing), ExitCode::Exited(127));
        assert_eq!(run(&Job::new(["/etc"])), ExitCode::Exited(126)); // a directory: EACCES
        let bad_cwd = Job {
            cwd: "/no/such/dir".into(),
            ..Job::new(["/bin/true"])
        };
        assert_eq!(run(&bad_cwd), ExitCode::Exited(126));
    }

    #[test]
    fn a_script_without_interpreter_line_runs_under_sh() {
        let dir = std::env::temp_dir().join(format!("twinbox-init-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("noshebang");
        std::fs::write(&script, "exit 5\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let job = Job {
            env: vec![format!("PATH={}", dir.display())],
            ..Job::new(["noshebang"])
        };
        let status = run(&job);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(status, ExitCode::Exited(5));
    }

    /// Records the identity calls; fails the one named.
    struct Recorder {
        calls: Vec<String>,
        fail: Option<&'static str>,
    }

    impl Recorder {
        fn call(&mut self, name: &'static str, what: String) -> i32 {
            self.calls.push(what);
            if self.fail == Some(name) {
                libc::EPERM
            } else {
                0
            }
        }
    }

    impl IdentityCalls for Recorder {
        fn setgroups(&mut self, groups: &[libc::gid_t]) -> i32 {
            self.call("setgroups", format!("setgroups {groups:?}"))
        }
        fn setgid(&mut self, gid: libc::gid_t) -> i32 {
            self.call("setgid", format!("setgid {gid}"))
        }
        fn setuid(&mut self, uid: libc::uid_t) -> i32 {
            self.call("setuid", format!("setuid {uid}"))
        }
    }

    #[test]
    fn the_user_is_taken_groups_then_gid_then_uid_stopping_at_a_failure() {
        let user = JobUser {
            uid: 1000,
            gid: 100,
            groups: vec![10, 20],
        };
        let mut rec = Recorder {
            calls: Vec::new(),
            fail: None,
        };
        assert_eq!(become_user(&mut rec, &user), Ok(()));
        assert_eq!(
            rec.calls,
            ["setgroups [10, 20]", "setgid 100", "setuid 1000"]
        );
        for (fail, made) in [("setgroups", 1), ("setgid", 2), ("setuid", 3)] {
            let mut rec = Recorder {
                calls: Vec::new(),
                fail: Some(fail),
            };
            assert_eq!(become_user(&mut rec, &user), Err((fail, libc::EPERM)));
            assert_eq!(rec.calls.len(), made, "{fail}: {:?}", rec.calls);
        }
        // No groups is an empty list, never "keep the ones init has".
        let mut rec = Recorder {
            calls: Vec::new(),
            fail: None,
        };
        let alone = JobUser {
            groups: vec![],
            ..user
        };
        assert_eq!(become_user(&mut rec, &alone), Ok(()));
        assert_eq!(rec.calls[0], "setgroups []");
    }

    #[test]
    fn a_real_workload_runs_as_the_jobs_user_after_entering_its_directory() {
        // SAFETY: geteuid has no arguments and cannot fail.
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root");
        // /root is closed to uid 65534: the directory is entered before the user is taken.
        let script =
            r#"test "$(id -u):$(id -g):$(id -G)" = "65534:65534:65534 7" && test "$(pwd)" = /root"#;
        let job = Job {
            cwd: "/root".into(),
            user: Some(JobUser {
                uid: 65534,
                gid: 65534,
                groups: vec![7],
            }),
            ..sh(script, &["PATH=/usr/bin:/bin"])
        };
        assert_eq!(run(&job), ExitCode::Exited(0));
    }

    #[test]
    fn nul_bytes_are_an_error_not_a_panic() {
        let job = Job {
            argv: vec!["a\0b".into()],
            ..Job::default()
        };
        assert_eq!(
            Prepared::new(&job, Stdio::Inherit).unwrap_err().errno,
            libc::EINVAL
        );
    }
}
