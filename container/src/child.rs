//! What the cloned child does in its new namespaces, up to the exec of twinbox-init.
//!
//! Runs right after `clone` in a copy of the parent: it only walks data prepared by the
//! parent ([`Prepared`]) and makes raw syscalls, so it never allocates (the parent may be
//! multi-threaded). Progress and failures go to the parent over the channel
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
        EXEC_INIT => "exec /sbin/twinbox-init".into(),
        OUTPUT => "redirect output".into(),
        BECOME_ROOT => "become root of the user namespace".into(),
        PARENT_GONE => "outlive the parent: it died during start-up".into(),
        SECCOMP => "install the seccomp filter".into(),
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

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Child entry: returns only on failure, with the status to exit with.
pub fn main(p: &Prepared) -> isize {
    let fail = |code: u32| -> isize {
        p.channel.failed(code, errno());
        125
    };
    // SAFETY: every call below is a plain syscall on data owned by `p` or the stack.
    unsafe {
        arm_parent_death_signal();
        for fd in &p.parent_fds {
            libc::close(*fd);
        }
        // EOF here means the parent died (our copy of its end is closed above).
        if !p.channel.wait_for_release() {
            return fail(WAIT_RELEASE);
        }
        // The maps are written now, but our credentials still hold host uid 0, which the
        // namespace does not map: switch to its root (host HOST_BASE) and drop the host's
        // supplementary groups.
        if p.user_namespace
            && (libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(0, 0, 0) != 0
                || libc::setresuid(0, 0, 0) != 0)
        {
            return fail(BECOME_ROOT);
        }
        // setresgid/setresuid cleared the parent-death signal.
        if !rearm_and_check_parent(&p.channel) {
            return fail(PARENT_GONE);
        }
        // Now inside the run's cgroup: the cgroup namespace is rooted there.
        if libc::unshare(libc::CLONE_NEWCGROUP) != 0 {
            return fail(UNSHARE_CGROUP);
        }
        let none = std::ptr::null::<libc::c_char>();
        let root = c"/";
        if libc::mount(
            none,
            root.as_ptr(),
            none,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return fail(PRIVATE_ROOT);
        }
        for (i, step) in p.plan.steps.iter().enumerate() {
            let ok = match step {
                Step::Mount {
                    source,
                    target,
                    fstype,
                    flags,
                    data,
                } => {
                    let opt = |s: &CString| if s.is_empty() { none } else { s.as_ptr() };
                    libc::mount(
                        opt(source),
                        target.as_ptr(),
                        opt(fstype),
                        *flags,
                        opt(data).cast(),
                    ) == 0
                }
                Step::Mkdir(path) => {
                    libc::mkdir(path.as_ptr(), 0o755) == 0 || errno() == libc::EEXIST
                }
                Step::Touch(path) => {
                    let fd = libc::open(
                        path.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o644,
                    );
                    fd >= 0 && libc::close(fd) == 0
                }
                Step::Symlink { target, link } => {
                    libc::symlink(target.as_ptr(), link.as_ptr()) == 0 || errno() == libc::EEXIST
                }
                Step::Attach { fd, target } => {
                    libc::syscall(
                        libc::SYS_move_mount,
                        *fd,
                        c"".as_ptr(),
                        libc::AT_FDCWD,
                        target.as_ptr(),
                        MOVE_MOUNT_F_EMPTY_PATH,
                    ) == 0
                }
                Step::Mask(path) => match file_type(path) {
                    None => errno() == libc::ENOENT,
                    Some(libc::S_IFDIR) => {
                        libc::mount(
                            c"tmpfs".as_ptr(),
                            path.as_ptr(),
                            c"tmpfs".as_ptr(),
                            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                            std::ptr::null(),
                        ) == 0
                    }
                    Some(_) => {
                        libc::mount(
                            c"/dev/null".as_ptr(),
                            path.as_ptr(),
                            none,
                            libc::MS_BIND,
                            std::ptr::null(),
                        ) == 0
                    }
                },
                Step::ReadOnly(path) => match file_type(path) {
                    None => errno() == libc::ENOENT,
                    Some(_) => {
                        libc::mount(
                            path.as_ptr(),
                            path.as_ptr(),
                            none,
                            libc::MS_BIND | libc::MS_REC,
                            std::ptr::null(),
                        ) == 0
                            && libc::mount(
                                none,
                                path.as_ptr(),
                                none,
                                libc::MS_BIND
                                    | libc::MS_REMOUNT
                                    | libc::MS_RDONLY
                                    | libc::MS_NOSUID
                                    | libc::MS_NODEV
                                    | libc::MS_NOEXEC,
                                std::ptr::null(),
                            ) == 0
                    }
                },
            };
            if !ok {
                return fail(FIRST_PLAN_STEP + i as u32);
            }
        }
        if let Some(name) = &p.hostname {
            if libc::sethostname(name.as_ptr(), name.as_bytes().len()) != 0 {
                return fail(HOSTNAME);
            }
        }
        if !loopback_up() {
            return fail(LOOPBACK);
        }
        if libc::chdir(p.plan.new_root.as_ptr()) != 0 {
            return fail(PIVOT_ROOT);
        }
        let dot = c".";
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) != 0 {
            return fail(PIVOT_ROOT);
        }
        // The old root is stacked under the new one at "."; detach it.
        if libc::umount2(dot.as_ptr(), libc::MNT_DETACH) != 0 {
            return fail(DETACH_OLD_ROOT);
        }
        if libc::chdir(root.as_ptr()) != 0 {
            return fail(DETACH_OLD_ROOT);
        }
        if libc::fcntl(p.marker_fd, libc::F_SETFD, 0) != 0 {
            return fail(MARKER_FD);
        }
        if let Some(fd) = p.output_fd {
            if libc::dup2(fd, 1) < 0 || libc::dup2(fd, 2) < 0 {
                return fail(OUTPUT);
            }
            libc::close(fd);
        }
        for cap in &p.caps_to_drop {
            if libc::prctl(libc::PR_CAPBSET_DROP, *cap as libc::c_ulong, 0, 0, 0) != 0
                && errno() != libc::EINVAL
            {
                return fail(CAPABILITIES);
            }
        }
        let header = CapHeader {
            version: 0x2008_0522,
            pid: 0,
        };
        let data = [
            CapData {
                effective: p.caps_keep[0],
                permitted: p.caps_keep[0],
                inheritable: p.caps_keep[0],
            },
            CapData {
                effective: p.caps_keep[1],
                permitted: p.caps_keep[1],
                inheritable: p.caps_keep[1],
            },
        ];
        if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) != 0 {
            return fail(CAPABILITIES);
        }
        // capset is a credential change too; re-arming is cheap and keeps the rule simple.
        if !rearm_and_check_parent(&p.channel) {
            return fail(PARENT_GONE);
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return fail(NO_NEW_PRIVS);
        }
        // Last before exec: from here on only what the filter allows, exec included.
        if let Some(filter) = &p.seccomp {
            if seccompiler::apply_filter(filter).is_err() {
                return fail(SECCOMP);
            }
        }
        p.channel.ready();
        libc::execve(p.init.as_ptr(), p.argv.as_ptr(), p.envp.as_ptr());
        fail(EXEC_INIT)
    }
}

/// Asks for SIGKILL when the parent dies (and with it, as PID 1, the whole container).
unsafe fn arm_parent_death_signal() {
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
}

/// Re-arms the parent-death signal after a credential change cleared it, then checks the
/// parent did not die in between (`getppid` cannot tell: it is 0 in a new pid namespace).
unsafe fn rearm_and_check_parent(channel: &ChildEnds) -> bool {
    // SAFETY: prctl with integer arguments.
    unsafe { arm_parent_death_signal() };
    channel.parent_alive()
}

/// The `S_IFMT` bits of `path`, or None (errno set) when it cannot be stat'ed.
unsafe fn file_type(path: &CString) -> Option<libc::mode_t> {
    // SAFETY: stat into a zeroed struct on the stack.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        (libc::stat(path.as_ptr(), &mut st) == 0).then_some(st.st_mode & libc::S_IFMT)
    }
}

/// `move_mount(2)`: the source is the fd itself.
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Sets IFF_UP on `lo` of the new network namespace.
fn loopback_up() -> bool {
    // SAFETY: a datagram socket, an ifreq on the stack, SIOCGIFFLAGS/SIOCSIFFLAGS on it.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return false;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        let ok = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) == 0 && {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(sock, libc::SIOCSIFFLAGS, &req) == 0
        };
        libc::close(sock);
        ok
    }
}
