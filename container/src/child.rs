//! What the cloned child does in its new namespaces, up to the exec of twinbox-init.
//!
//! Its stdio: with `-t` a pty of the container's own devpts (the master goes to the
//! parent over the channel, the slave becomes fds 0-2, which init makes the workload's
//! controlling terminal); otherwise stdin is `/dev/null` of the container unless the
//! caller's is inherited, and stdout/stderr are the caller's or the capture pipe.
//!
//! Runs right after `clone` in a copy of the parent — or, when the parent has nothing to
//! admit, on the parent's own memory with the calling thread suspended until the exec
//! (`syscall::SHARED_MEMORY`) — : it only walks data prepared by the parent
//! ([`Prepared`]) and makes its calls through [`Syscall`] (whose real implementation is
//! raw system calls), so it never allocates (the parent may be multi-threaded). The tests run [`main`] in-process on the recording double. Progress and failures go to the parent over the channel
//! (`channel.rs`): ready just before exec, or the failed step's code and errno.
//!
//! Dying with the parent: the child asks for SIGKILL on its parent's death first thing,
//! and again after every credential change (the kernel clears the request on each, so
//! with `--userns` a killed CLI used to leave the container running). A parent that died
//! before a request took effect is caught by the pipes instead (`getppid` cannot tell: it
//! is 0 in a new pid namespace): the child closes the parent's ends it inherited, so the
//! release pipe reads EOF and the status pipe reports POLLERR once the parent is gone.

use crate::channel::ChildEnds;
use crate::plan::{Plan, Step};
use crate::syscall::{Errno, Syscall};
use std::ffi::CString;
use std::os::fd::RawFd;

// Failure codes for steps outside the mount plan (plan steps are `FIRST_PLAN_STEP + i`);
// 0 is the channel's "ready".
/// Waiting for the parent's release.
pub const WAIT_RELEASE: u32 = 1;
/// Unsharing the cgroup namespace.
pub const UNSHARE_CGROUP: u32 = 2;
/// Making / private.
pub const PRIVATE_ROOT: u32 = 3;
/// Setting the hostname.
pub const HOSTNAME: u32 = 4;
/// Bringing up lo.
pub const LOOPBACK: u32 = 5;
/// pivot_root into the new root.
pub const PIVOT_ROOT: u32 = 6;
/// Detaching the old root.
pub const DETACH_OLD_ROOT: u32 = 7;
/// Handing the marker fd to init.
pub const MARKER_FD: u32 = 8;
/// Dropping capabilities.
pub const CAPABILITIES: u32 = 9;
/// Setting no_new_privs.
pub const NO_NEW_PRIVS: u32 = 10;
/// Executing init.
pub const EXEC_INIT: u32 = 11;
/// Redirecting output.
pub const OUTPUT: u32 = 12;
/// Becoming root of the user namespace.
pub const BECOME_ROOT: u32 = 13;
/// Finding the parent dead after a credential change.
pub const PARENT_GONE: u32 = 14;
/// Installing the seccomp filter.
pub const SECCOMP: u32 = 15;
/// Leaving the CLI's session.
pub const NEW_SESSION: u32 = 16;
/// Making the container's pty and handing its master to the parent (`-t`).
pub const TERMINAL: u32 = 17;
/// Putting `/dev/null` on stdin.
pub const STDIN: u32 = 18;
/// The code of the plan's first step.
pub const FIRST_PLAN_STEP: u32 = 100;

/// Names the failed step of a failure record.
pub fn describe(code: u32, plan: &Plan) -> String {
    match code {
        WAIT_RELEASE => "wait for the parent".into(),
        UNSHARE_CGROUP => "unshare the cgroup namespace".into(),
        PRIVATE_ROOT => "make / private".into(),
        HOSTNAME => "set the hostname".into(),
        LOOPBACK => "bring up lo".into(),
        PIVOT_ROOT => "pivot_root".into(),
        DETACH_OLD_ROOT => "detach the old root".into(),
        MARKER_FD => "pass the marker fd".into(),
        CAPABILITIES => "drop capabilities".into(),
        NO_NEW_PRIVS => "set no_new_privs".into(),
        EXEC_INIT => format!("exec {}", crate::run::INIT),
        OUTPUT => "redirect output".into(),
        BECOME_ROOT => "become root of the user namespace".into(),
        PARENT_GONE => "outlive the parent: it died during start-up".into(),
        SECCOMP => "install the seccomp filter".into(),
        NEW_SESSION => "start a new session".into(),
        TERMINAL => format!(
            "allocate the container's terminal on {}",
            PTMX.to_string_lossy()
        ),
        STDIN => "open /dev/null as stdin".into(),
        c if c >= FIRST_PLAN_STEP => plan
            .steps
            .get((c - FIRST_PLAN_STEP) as usize)
            .map(Step::describe)
            .unwrap_or_else(|| format!("step {c}")),
        c => format!("step {c}"),
    }
}

/// Everything the child needs, allocated before `clone`.
pub struct Prepared {
    /// The mount plan, carried out in order.
    pub plan: Plan,
    /// The container's hostname.
    pub hostname: Option<CString>,
    /// The child's side of the start-up channel.
    pub channel: ChildEnds,
    /// Write end of the marker pipe, handed to init (its number is in the job).
    pub marker_fd: RawFd,
    /// When capturing output: write end to put on stdout and stderr.
    pub output_fd: Option<RawFd>,
    /// `-t`: a pty of the container's devpts as fds 0-2, its master sent to the parent.
    pub tty: bool,
    /// Without `-t`: stdin is `/dev/null` (true) or the caller's, inherited (false).
    pub null_stdin: bool,
    /// Path of init inside the new root.
    pub init: CString,
    /// init's argv (NULL-terminated).
    pub argv: [*const libc::c_char; 2],
    /// init's environment (NULL-terminated): the job.
    pub envp: Vec<*const libc::c_char>,
    /// Keeps the strings `envp` points at alive.
    #[allow(dead_code)]
    pub env_storage: Vec<CString>,
    /// Capabilities to drop from the bounding set.
    pub caps_to_drop: Vec<u32>,
    /// The capability words kept (effective, permitted, inheritable).
    pub caps_keep: [u32; 2],
    /// In a new user namespace: take uid/gid 0 of it once the parent wrote the maps.
    pub user_namespace: bool,
    /// The parent's ends of the pipes, inherited by `clone`: closed first thing, so the
    /// parent's death shows on the pipes.
    pub parent_fds: Vec<RawFd>,
    /// The seccomp filter, compiled by the parent; installed right before exec.
    pub seccomp: Option<seccompiler::BpfProgram>,
}

/// Child entry: returns only on failure, with the status to exit with (after telling the
/// parent which step failed).
pub fn main(p: &Prepared, sys: &dyn Syscall) -> isize {
    match setup(p, sys) {
        Ok(()) => {
            p.channel.ready();
            let errno = sys.exec(&p.init, &p.argv, &p.envp);
            p.channel.failed(EXEC_INIT, errno as i32);
        }
        Err((step, errno)) => p.channel.failed(step, errno as i32),
    }
    125
}

/// A step's result: the step's code and errno on failure.
type StepResult = Result<(), (u32, Errno)>;

/// Tags a call's error with its step code.
fn at<T>(step: u32, result: Result<T, Errno>) -> Result<T, (u32, Errno)> {
    result.map_err(|errno| (step, errno))
}

/// Everything up to the exec of init.
fn setup(p: &Prepared, sys: &dyn Syscall) -> StepResult {
    at(WAIT_RELEASE, sys.set_parent_death_signal())?;
    for fd in &p.parent_fds {
        sys.close(*fd);
    }
    // EOF here means the parent died (our copy of its end is closed above).
    if !p.channel.wait_for_release() {
        return Err((WAIT_RELEASE, Errno::EPIPE));
    }
    if p.user_namespace {
        // The maps are written now, but our credentials still hold host uid 0, which the
        // namespace does not map: switch to its root (the run's leased ids) and drop the host's
        // supplementary groups. That clears the parent-death signal.
        at(BECOME_ROOT, sys.become_root())?;
        rearm(p, sys)?;
    }
    // Now inside the run's cgroup: the cgroup namespace is rooted there.
    at(UNSHARE_CGROUP, sys.unshare_cgroup())?;
    at(
        PRIVATE_ROOT,
        sys.mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None),
    )?;
    for (i, step) in p.plan.steps.iter().enumerate() {
        at(FIRST_PLAN_STEP + i as u32, carry_out(step, sys))?;
    }
    if let Some(name) = &p.hostname {
        at(HOSTNAME, sys.sethostname(name))?;
    }
    at(LOOPBACK, sys.loopback_up())?;
    at(PIVOT_ROOT, sys.chdir(&p.plan.new_root))?;
    at(PIVOT_ROOT, sys.pivot_root(c".", c"."))?;
    // The old root is stacked under the new one at "."; detach it.
    at(DETACH_OLD_ROOT, sys.umount_detach(c"."))?;
    at(DETACH_OLD_ROOT, sys.chdir(c"/"))?;
    at(MARKER_FD, sys.keep_on_exec(p.marker_fd))?;
    if p.tty {
        terminal(p, sys)?;
    } else if p.null_stdin {
        // The container's /dev/null (inside the device allowlist), not a host descriptor.
        let null = at(STDIN, sys.open(c"/dev/null", libc::O_RDWR))?;
        at(STDIN, stdio_onto(sys, null, &[0]))?;
    }
    if let Some(fd) = p.output_fd {
        at(OUTPUT, sys.dup2(fd, 1))?;
        at(OUTPUT, sys.dup2(fd, 2))?;
        sys.close(fd);
    }
    // Out of the CLI's session and process group, as runc does: init must not hold the
    // user's terminal as its controlling tty (a box could push input into the user's shell
    // with TIOCSTI), and a Ctrl-C meant for twinbox goes to twinbox, which stops the box.
    at(NEW_SESSION, sys.new_session())?;
    for cap in &p.caps_to_drop {
        // EINVAL: a capability this kernel does not have.
        match sys.drop_bounding_cap(*cap) {
            Ok(()) | Err(Errno::EINVAL) => {}
            Err(errno) => return Err((CAPABILITIES, errno)),
        }
    }
    at(CAPABILITIES, sys.capset(p.caps_keep))?;
    // capset is a credential change too; re-arming is cheap and keeps the rule simple.
    rearm(p, sys)?;
    at(NO_NEW_PRIVS, sys.no_new_privs())?;
    // Last before exec: from here on only what the filter allows, exec included.
    if let Some(filter) = &p.seccomp {
        at(SECCOMP, sys.apply_seccomp(filter))?;
    }
    Ok(())
}

/// The container's `ptmx`, seen after `pivot_root`: its own devpts instance (mounted
/// `newinstance` by the plan), so the pty is numbered and named inside the box.
pub const PTMX: &std::ffi::CStr = c"/dev/pts/ptmx";

/// `-t`: a pty on the container's devpts; the master to the parent, the slave as fds 0-2.
/// Made after `pivot_root` (the path is the box's) and before `setsid`, so the child,
/// still in the CLI's session, never gets it as its own controlling terminal.
fn terminal(p: &Prepared, sys: &dyn Syscall) -> StepResult {
    let (master, slave) = at(TERMINAL, sys.open_pty(PTMX))?;
    let sent = p.channel.send_terminal(master);
    // The parent's copy is the one that counts: ours would keep the pty open after the
    // box is gone (and init must not inherit it: it is close-on-exec too).
    sys.close(master);
    at(TERMINAL, sent)?;
    at(TERMINAL, stdio_onto(sys, slave, &[0, 1, 2]))
}

/// Puts `fd` on each of `targets` and closes it, unless it already is one of them (the
/// lowest free number may be 0-2 when the caller had them closed).
fn stdio_onto(sys: &dyn Syscall, fd: RawFd, targets: &[RawFd]) -> Result<(), Errno> {
    for &target in targets {
        if target != fd {
            sys.dup2(fd, target)?;
        }
    }
    if !targets.contains(&fd) {
        sys.close(fd);
    }
    Ok(())
}

/// Re-arms the parent-death signal after a credential change cleared it, then checks the
/// parent did not die in between (`getppid` cannot tell: it is 0 in a new pid namespace).
fn rearm(p: &Prepared, sys: &dyn Syscall) -> StepResult {
    at(PARENT_GONE, sys.set_parent_death_signal())?;
    if !p.channel.parent_alive() {
        return Err((PARENT_GONE, Errno::ESRCH));
    }
    Ok(())
}

/// One step of the mount plan.
fn carry_out(step: &Step, sys: &dyn Syscall) -> Result<(), Errno> {
    fn opt(s: &CString) -> Option<&std::ffi::CStr> {
        (!s.is_empty()).then_some(s.as_c_str())
    }
    let exists_ok = |r: Result<(), Errno>| match r {
        Err(Errno::EEXIST) => Ok(()),
        r => r,
    };
    match step {
        Step::Mount {
            source,
            target,
            fstype,
            flags,
            data,
        } => sys.mount(opt(source), target, opt(fstype), *flags, opt(data)),
        Step::Mkdir(path) => exists_ok(sys.mkdir(path)),
        Step::Touch(path) => sys.touch(path),
        Step::Symlink { target, link } => exists_ok(sys.symlink(target, link)),
        Step::Attach { fd, target } => sys.move_mount(*fd, target),
        Step::Mask(path) => match sys.file_type(path) {
            Err(Errno::ENOENT) => Ok(()),
            Err(errno) => Err(errno),
            Ok(libc::S_IFDIR) => sys.mount(
                Some(c"tmpfs"),
                path,
                Some(c"tmpfs"),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                None,
            ),
            Ok(_) => sys.mount(Some(c"/dev/null"), path, None, libc::MS_BIND, None),
        },
        Step::ReadOnly(path) => match sys.file_type(path) {
            Err(Errno::ENOENT) => Ok(()),
            Err(errno) => Err(errno),
            Ok(_) => {
                sys.mount(Some(path), path, None, libc::MS_BIND | libc::MS_REC, None)?;
                sys.mount(None, path, None, READ_ONLY_REMOUNT, None)
            }
        },
    }
}

/// Remounting a bind read-only, keeping the flags every API mount here has.
const READ_ONLY_REMOUNT: libc::c_ulong = libc::MS_BIND
    | libc::MS_REMOUNT
    | libc::MS_RDONLY
    | libc::MS_NOSUID
    | libc::MS_NODEV
    | libc::MS_NOEXEC;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::{self, ChildSide, FromChild, ParentSide};
    use crate::recording::{ChildScript, Recording};
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::path::Path;
    use twinbox_spec::{RunSpec, StdinMode};

    const ROOT: &str = "/run/twinbox/ctr/t/root";

    /// What `child::main` needs, as `run` prepares it, plus the test's ends of the pipes.
    struct Setup {
        prepared: Prepared,
        parent: ParentSide,
        _child: ChildSide,
        _marker: (OwnedFd, OwnedFd),
    }

    fn setup(user_namespace: bool) -> Setup {
        setup_with(|spec| spec.user_namespace = user_namespace)
    }

    fn setup_with(adjust: impl FnOnce(&mut RunSpec)) -> Setup {
        let (parent, child) = channel::channel().unwrap();
        let marker = nix::unistd::pipe().unwrap();
        let mut spec = RunSpec::new("/image.ext4", vec!["/bin/true".into()]);
        adjust(&mut spec);
        let plan = crate::plan::build(
            Path::new("/run/twinbox/ctr/t"),
            &crate::plan::Lower::Image(7),
            6,
            &[],
        )
        .unwrap();
        let prepared = crate::run::prepare(
            &spec,
            plan,
            &child,
            marker.1.as_raw_fd(),
            None,
            parent.raw_fds(),
            None,
        )
        .unwrap();
        Setup {
            prepared,
            parent,
            _child: child,
            _marker: marker,
        }
    }

    fn double() -> Recording {
        Recording::new(ChildScript::Vanishes)
    }

    fn position(calls: &[String], call: &str) -> usize {
        calls
            .iter()
            .position(|c| c == call)
            .unwrap_or_else(|| panic!("{call:?} not in {calls:#?}"))
    }

    #[test]
    fn parent_death_signal_first_mounts_then_pivot_seccomp_last() {
        let mut s = setup(false);
        s.parent.release().unwrap();
        let sys = double();
        assert_eq!(main(&s.prepared, &sys), 125);
        let calls = sys.calls();
        assert_eq!(calls[0], "pdeathsig");
        assert!(calls[1].starts_with("close "), "{calls:#?}");
        let order = [
            "unshare cgroup".to_string(),
            "mount - on / (-)".into(),
            "mount twinbox on /run/twinbox/ctr/t (tmpfs)".into(),
            "move_mount /run/twinbox/ctr/t/lower".into(),
            format!("mount proc on {ROOT}/proc (proc)"),
            format!("mount /dev/null on {ROOT}/proc/keys (-)"),
            format!("mount tmpfs on {ROOT}/sys/firmware (tmpfs) ro"),
            format!("mount {ROOT}/proc/sys on {ROOT}/proc/sys (-)"),
            format!("mount - on {ROOT}/proc/sys (-) ro"),
            "sethostname twinbox".into(),
            "lo up".into(),
            format!("chdir {ROOT}"),
            "pivot_root . .".into(),
            "umount -l .".into(),
            "chdir /".into(),
            "keep marker fd".into(),
            // Stdin is the box's /dev/null unless inherited.
            "open /dev/null".into(),
            "dup2 to 0".into(),
            "setsid".into(),
            "capset 0xa00425fb 0x0".into(),
            "no_new_privs".into(),
            "seccomp".into(),
            format!("exec {}", crate::run::INIT),
        ];
        let at: Vec<usize> = order.iter().map(|c| position(&calls, c)).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{calls:#?}");
        // Re-armed after the capability change, and seccomp the very last before exec.
        assert_eq!(
            calls[position(&calls, "capset 0xa00425fb 0x0") + 1],
            "pdeathsig"
        );
        assert_eq!(calls[calls.len() - 2], "seccomp");
        assert!(
            calls.iter().any(|c| c.starts_with("drop caps ..")),
            "{calls:#?}"
        );
        // A path this kernel lacks is skipped, not an error.
        assert!(!calls.iter().any(|c| c.contains("kcore")), "{calls:#?}");
        drop(s._child);
        assert!(matches!(s.parent.receive(), FromChild::Ready { .. }));
        assert!(matches!(
            s.parent.receive(),
            FromChild::Failed {
                step: EXEC_INIT,
                errno: libc::ENOENT
            }
        ));
    }

    #[test]
    fn an_inherited_stdin_is_left_alone() {
        let mut s = setup_with(|spec| spec.stdin = StdinMode::Inherit);
        s.parent.release().unwrap();
        let sys = double();
        main(&s.prepared, &sys);
        let calls = sys.calls();
        assert!(
            !calls
                .iter()
                .any(|c| c.starts_with("open") || c.starts_with("dup2")),
            "{calls:#?}"
        );
    }

    #[test]
    fn tty_makes_the_pty_in_the_box_sends_the_master_and_gives_init_the_slave() {
        let mut s = setup_with(|spec| {
            spec.tty = true;
            spec.stdin = StdinMode::Inherit;
        });
        assert!(s.prepared.tty);
        s.parent.release().unwrap();
        let sys = double();
        main(&s.prepared, &sys);
        let calls = sys.calls();
        let fds: Vec<i32> = sys
            .opened
            .borrow()
            .iter()
            .map(|fd| fd.as_raw_fd())
            .collect();
        let [master, slave] = fds[..] else {
            panic!("one pty pair: {fds:?}");
        };
        let pty = position(&calls, "open pty /dev/pts/ptmx");
        assert_eq!(calls[pty - 1], "keep marker fd");
        assert_eq!(
            calls[pty + 1..pty + 7],
            [
                format!("close {master}"),
                "dup2 to 0".into(),
                "dup2 to 1".into(),
                "dup2 to 2".into(),
                format!("close {slave}"),
                "setsid".into(),
            ],
            "the master is the parent's alone, the slave init's stdio, before setsid"
        );
        assert!(
            position(&calls, "pivot_root . .") < position(&calls, "open pty /dev/pts/ptmx"),
            "the pty must come from the box's devpts"
        );
        assert!(!calls.iter().any(|c| c == "open /dev/null"), "{calls:#?}");
        drop(s._child);
        assert!(matches!(s.parent.receive(), FromChild::Terminal(Ok(_))));
        assert!(matches!(s.parent.receive(), FromChild::Ready { .. }));
    }

    #[test]
    fn a_pty_that_cannot_be_made_is_reported_and_nothing_follows() {
        let mut s = setup_with(|spec| spec.tty = true);
        s.parent.release().unwrap();
        let mut sys = double();
        sys.fail = Some("open pty /dev/pts/ptmx");
        assert_eq!(main(&s.prepared, &sys), 125);
        let calls = sys.calls();
        assert_eq!(
            calls.last().map(String::as_str),
            Some("open pty /dev/pts/ptmx FAILED")
        );
        drop(s._child);
        let FromChild::Failed { step, errno } = s.parent.receive() else {
            panic!("no failure reported");
        };
        assert_eq!((step, errno), (TERMINAL, libc::EPERM));
        assert_eq!(
            describe(step, &s.prepared.plan),
            "allocate the container's terminal on /dev/pts/ptmx"
        );
        assert!(matches!(s.parent.receive(), FromChild::Closed));
    }

    #[test]
    fn userns_takes_root_then_re_arms_before_anything_else() {
        let mut s = setup(true);
        s.parent.release().unwrap();
        let sys = double();
        main(&s.prepared, &sys);
        let calls = sys.calls();
        let root = position(&calls, "become root");
        assert_eq!(calls[root + 1], "pdeathsig", "{calls:#?}");
        assert_eq!(calls[root + 2], "unshare cgroup", "{calls:#?}");
        assert!(calls[..root]
            .iter()
            .skip(1)
            .all(|c| c.starts_with("close ")));
    }

    #[test]
    fn a_failing_plan_step_is_reported_with_its_code_and_nothing_follows() {
        let mut s = setup(false);
        s.parent.release().unwrap();
        let failing = format!("mount proc on {ROOT}/proc (proc)");
        let mut sys = double();
        sys.fail = Some(Box::leak(failing.clone().into_boxed_str()));
        assert_eq!(main(&s.prepared, &sys), 125);
        let calls = sys.calls();
        assert_eq!(calls.last(), Some(&format!("{failing} FAILED")));
        drop(s._child);
        let FromChild::Failed { step, errno } = s.parent.receive() else {
            panic!("no failure reported");
        };
        assert_eq!(errno, libc::EPERM);
        assert_eq!(
            describe(step, &s.prepared.plan),
            format!("mount proc (proc) on {ROOT}/proc")
        );
    }

    #[test]
    fn a_parent_dead_before_release_or_after_a_credential_change_stops_the_child() {
        // Before the release: EOF on the channel, nothing mounted.
        let s = setup(false);
        let Setup {
            prepared,
            parent,
            _child,
            _marker,
        } = s;
        drop(parent);
        let sys = double();
        assert_eq!(main(&prepared, &sys), 125);
        assert!(
            sys.calls().iter().skip(1).all(|c| c.starts_with("close ")),
            "{:#?}",
            sys.calls()
        );
        // Released, then gone while the child became root: caught right after re-arming.
        let mut s = setup(true);
        s.parent.release().unwrap();
        let Setup {
            prepared,
            parent,
            _child,
            _marker,
        } = s;
        drop(parent);
        let sys = double();
        assert_eq!(main(&prepared, &sys), 125);
        let calls = sys.calls();
        assert_eq!(calls.last().map(String::as_str), Some("pdeathsig"));
        assert_eq!(calls[calls.len() - 2], "become root");
    }
}
