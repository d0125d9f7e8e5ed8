//! Seccomp filters for the VMM's threads, one per thread kind, each installed by the thread
//! itself after its setup (as Firecracker and Cloud Hypervisor do): the guest reaches the
//! VMM only through these threads — vCPUs run the port/MMIO device models, the event loop
//! parses virtqueues, the console thread writes what the guest printed — so a guest that
//! subverts a device model finds only the system calls that thread needs.
//!
//! The lists come from `strace -f` of `twinbox vm run` (a Linux guest booting until its
//! reset, with a virtio disk) and of the tiny-guest tests (virtqueue round trip, console
//! flood, teardown), per thread, plus what Rust's runtime and glibc do on those threads
//! after the filter is in: allocation (`mmap`/`mprotect`/`mremap`/`munmap`/`madvise`/`brk`,
//! never with PROT_EXEC), futex waits, signal return (the vCPU kick; SIGINT/SIGTERM may land on
//! any thread), `close`, and thread exit. `ioctl` is limited to the vCPU ioctls by number.
//!
//! A call outside the list kills the whole process (`SECCOMP_RET_KILL_PROCESS`): a VMM
//! whose device thread is doing something unexpected is not one to keep running. The
//! environment variable `TWINBOX_VMM_SECCOMP` chooses otherwise for debugging: `log`
//! (allowed, and logged by the kernel's audit: `dmesg | grep 'type=1326'` gives the
//! syscall number) or `off`.
//!
//! The caller's thread handles no guest input. It is filtered only when the caller says it
//! will do nothing after the run but print the report and exit (the CLI, through
//! [`crate::RunOptions`]); the bench's thread is not, since it runs containers and peers
//! next.

use kvm_bindings::{kvm_ioeventfd, kvm_irq_routing, kvm_regs, kvm_translation, kvm_vcpu_events};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use thiserror::Error;
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

/// The environment variable that chooses [`Mode`].
pub const MODE_ENV: &str = "TWINBOX_VMM_SECCOMP";

// The vCPU ioctls the vCPU threads may issue (numbers from the kernel's kvm.h).
const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
ioctl_iowr_nr!(KVM_TRANSLATE, KVMIO, 0x85, kvm_translation);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
// The IOAPIC (on a vCPU thread) replaces the VM's interrupt routes when the guest programs it.
ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
// A virtio device's queue ioeventfds are registered (on the vCPU thread) when the guest's
// driver activates it (devices/mod.rs, `QueueNotifiers`).
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);

/// The tap ioctl the event loop may issue (`_IOW('T', 208, unsigned int)`, linux/if_tun.h).
const TUNSETOFFLOAD: u32 = 0x4004_54d0;

/// What a call outside a thread's list does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Kill the process (the default).
    Kill,
    /// Allow the call and have the kernel log it (for finding a missing entry).
    Log,
    /// No filters.
    Off,
}

/// Why the filters cannot be used.
#[derive(Debug, Error)]
pub enum SeccompError {
    #[error("{MODE_ENV}={0:?}: expected kill, log or off")]
    BadMode(String),
    #[error(
        "this kernel has no seccomp filter support (set {MODE_ENV}=off to run the VMM without \
         system call filters)"
    )]
    Unsupported,
    #[error("cannot build the {kind} seccomp filter: {source}")]
    Build {
        kind: ThreadKind,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the {kind} seccomp filter: {source}")]
    Install {
        kind: ThreadKind,
        source: seccompiler::Error,
    },
}

/// The kinds of VMM thread, each with its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU: KVM_RUN and the port/MMIO device models.
    Vcpu,
    /// The device event loop: virtqueues, disk I/O, interrupts.
    EventLoop,
    /// The console writers (serial console to `--console-log`/stderr) and the stdio pumps
    /// (the workload's streams between the caller's fds and the console device's pipes).
    Console,
    /// The caller's thread once the VM runs, when the caller opts in
    /// ([`crate::RunOptions::lock_caller_thread`]): waits, stops and joins the others,
    /// measures, tears down, and returns the report to a caller that then only prints it
    /// and exits (the CLI).
    Caller,
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::EventLoop => "event loop",
            ThreadKind::Console => "console",
            ThreadKind::Caller => "caller",
        })
    }
}

impl Mode {
    /// The mode `TWINBOX_VMM_SECCOMP` asks for (unset: [`Mode::Kill`]).
    pub fn from_env() -> Result<Self, SeccompError> {
        match std::env::var(MODE_ENV) {
            Err(_) => Ok(Mode::Kill),
            Ok(v) => match v.as_str() {
                "" | "kill" => Ok(Mode::Kill),
                "log" => Ok(Mode::Log),
                "off" => Ok(Mode::Off),
                _ => Err(SeccompError::BadMode(v)),
            },
        }
    }
}

/// The compiled filters of one run, shared by the threads that install them.
#[derive(Clone, Debug)]
pub struct Filters {
    vcpu: Option<Arc<BpfProgram>>,
    event_loop: Option<Arc<BpfProgram>>,
    console: Option<Arc<BpfProgram>>,
    caller: Option<Arc<BpfProgram>>,
    /// Stacked on every kind's list: `openat` fails with EACCES (see [`refuse_open`]).
    refuse_open: Option<Arc<BpfProgram>>,
}

impl Filters {
    /// Compiles every thread kind's filter for `mode` (none for [`Mode::Off`]); fails if the
    /// kernel cannot install filters at all, before any VM exists.
    pub fn new(mode: Mode) -> Result<Self, SeccompError> {
        if mode == Mode::Off {
            return Ok(Self::none());
        }
        // SAFETY: PR_GET_SECCOMP takes no pointer arguments; it fails with EINVAL when the
        // kernel lacks CONFIG_SECCOMP.
        if unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) } < 0 {
            return Err(SeccompError::Unsupported);
        }
        let build = |kind| compile(kind, mode).map(|p| Some(Arc::new(p)));
        Ok(Self {
            vcpu: build(ThreadKind::Vcpu)?,
            event_loop: build(ThreadKind::EventLoop)?,
            console: build(ThreadKind::Console)?,
            caller: build(ThreadKind::Caller)?,
            refuse_open: Some(Arc::new(refuse_open()?)),
        })
    }

    /// The same filters, with rmdir(2) added to the caller's list (nothing for
    /// [`Mode::Off`]): a run in its own cgroup (`cgroup.rs`) removes the cgroup's
    /// directories from the caller's thread after the VM. It moves back to its original
    /// cgroups by write(2) on files opened before, so rmdir is the only addition; it
    /// removes empty directories only, and the caller's thread is never guest-facing.
    pub fn caller_removes_cgroup(mut self, mode: Mode) -> Result<Self, SeccompError> {
        if self.caller.is_some() {
            let program = compile_with(ThreadKind::Caller, mode, &[libc::SYS_rmdir])?;
            self.caller = Some(Arc::new(program));
        }
        Ok(self)
    }

    /// No filters (for callers that run threads outside a VM run, such as tests).
    pub fn none() -> Self {
        Self {
            vcpu: None,
            event_loop: None,
            console: None,
            caller: None,
            refuse_open: None,
        }
    }

    /// Installs `kind`'s filter on the calling thread (nothing when filters are off).
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let program = match kind {
            ThreadKind::Vcpu => &self.vcpu,
            ThreadKind::EventLoop => &self.event_loop,
            ThreadKind::Console => &self.console,
            ThreadKind::Caller => &self.caller,
        };
        // `refuse_open` first: installing a filter takes prctl and seccomp, which the
        // thread's own list does not allow once it is in.
        for program in [&self.refuse_open, program].into_iter().flatten() {
            seccompiler::apply_filter(program)
                .map_err(|source| SeccompError::Install { kind, source })?;
        }
        Ok(())
    }
}

/// A rule matching argument `index` against `value`.
fn arg(index: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
        .expect("argument index below 6")
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conditions).expect("a non-empty rule")
}

/// Allowed unconditionally.
fn any(rules: &mut BTreeMap<i64, Vec<SeccompRule>>, calls: &[libc::c_long]) {
    for call in calls {
        rules.insert(*call, vec![]);
    }
}

/// What every VMM thread needs once running: memory management by the allocator and at
/// thread exit (never executable), futexes (locks, channels, join), signal return, close,
/// logging to stderr, time, exit.
fn common() -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules = BTreeMap::new();
    any(
        &mut rules,
        &[
            libc::SYS_brk,
            // realloc of a block above glibc's mmap threshold moves the mapping (e.g. a
            // captured console growing past 128 KiB on a vCPU thread).
            libc::SYS_mremap,
            libc::SYS_munmap,
            libc::SYS_madvise,
            libc::SYS_futex,
            libc::SYS_sched_yield,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_close,
            libc::SYS_write,
            libc::SYS_clock_gettime,
            // Not seen in the traces, harmless, and a library's first HashMap (its random
            // keys) or a back-off sleep on one of these threads must not kill the VMM.
            libc::SYS_getrandom,
            libc::SYS_nanosleep,
            libc::SYS_clock_nanosleep,
            libc::SYS_gettid,
            libc::SYS_exit,
            libc::SYS_exit_group,
        ],
    );
    let not_exec = || {
        vec![rule(vec![arg(
            2,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )])]
    };
    // Allowed here, refused by the stacked `refuse_open` filter: see there.
    any(&mut rules, &[libc::SYS_openat]);
    rules.insert(libc::SYS_mmap, not_exec());
    rules.insert(libc::SYS_mprotect, not_exec());
    // Debug builds check an fd is open before closing it (F_GETFD); nothing else.
    rules.insert(
        libc::SYS_fcntl,
        vec![rule(vec![arg(1, SeccompCmpOp::Eq, libc::F_GETFD as u64)])],
    );
    rules
}

/// The allow-list of `kind`.
fn rules(kind: ThreadKind) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules = common();
    match kind {
        ThreadKind::Vcpu => {
            let ioctls = [
                KVM_RUN(),
                KVM_GET_REGS(),
                KVM_SET_REGS(),
                KVM_TRANSLATE(),
                KVM_GET_VCPU_EVENTS(),
                KVM_SET_VCPU_EVENTS(),
                KVM_SET_GSI_ROUTING(),
                KVM_IOEVENTFD(),
            ];
            rules.insert(
                libc::SYS_ioctl,
                ioctls
                    .iter()
                    .map(|nr| rule(vec![arg(1, SeccompCmpOp::Eq, u64::from(*nr as u32))]))
                    .collect(),
            );
        }
        ThreadKind::EventLoop => {
            any(
                &mut rules,
                &[
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_pwait,
                    libc::SYS_epoll_ctl,
                    libc::SYS_read,
                    libc::SYS_pread64,
                    libc::SYS_pwrite64,
                    libc::SYS_fdatasync,
                    libc::SYS_fsync,
                    // virtio-net: one frame per readv/writev on the tap, straight from and
                    // into guest memory.
                    libc::SYS_readv,
                    libc::SYS_writev,
                ],
            );
            // virtio-net sets the tap's offloads to what the guest acked, after each
            // activation; no other ioctl.
            rules.insert(
                libc::SYS_ioctl,
                vec![rule(vec![arg(
                    1,
                    SeccompCmpOp::Eq,
                    u64::from(TUNSETOFFLOAD),
                )])],
            );
        }
        ThreadKind::Console => {
            // read: the stdin pump reads the caller's stdin, the output pumps their pipes.
            any(
                &mut rules,
                &[libc::SYS_poll, libc::SYS_ppoll, libc::SYS_read],
            );
            // The control pump reads the caller's terminal size after a resize (`-t`).
            rules.insert(
                libc::SYS_ioctl,
                vec![rule(vec![arg(1, SeccompCmpOp::Eq, libc::TIOCGWINSZ)])],
            );
        }
        // No open: the files it reads at the end (/proc/self/status, smaps) were opened
        // before; tgkill is the vCPU kick; rt_sigaction is the CLI restoring SIGINT/SIGTERM.
        ThreadKind::Caller => {
            any(
                &mut rules,
                &[
                    libc::SYS_poll,
                    libc::SYS_ppoll,
                    libc::SYS_read,
                    libc::SYS_pread64,
                    libc::SYS_lseek,
                    libc::SYS_tgkill,
                    libc::SYS_getpid,
                    libc::SYS_getrusage,
                    libc::SYS_rt_sigaction,
                    // The stdio console's flush at teardown writes the workload's last output.
                    libc::SYS_writev,
                ],
            );
            // -t: restoring the caller's terminal settings at the end (tcsetattr, which
            // reads them back with TCGETS to check what the terminal took).
            rules.insert(
                libc::SYS_ioctl,
                [libc::TCGETS, libc::TCSETS, libc::TCSETSW, libc::TCSETSF]
                    .iter()
                    .map(|op| rule(vec![arg(1, SeccompCmpOp::Eq, *op)]))
                    .collect(),
            );
            // `--image`: the CLI's hold on the image cache ends after the run, and its
            // guard unlocks before it closes (`twinbox_image::CacheGuard`); unlock only.
            rules.insert(
                libc::SYS_flock,
                vec![rule(vec![arg(1, SeccompCmpOp::Eq, libc::LOCK_UN as u64)])],
            );
        }
    }
    rules
}

/// The second filter every VMM thread gets: `openat` fails with EACCES, everything else is
/// left to the thread's list. glibc's `free()` may open /proc/sys/vm/overcommit_memory on
/// any thread, once per process, when it trims a thread's heap; a kill there would be a
/// VMM dying at random, and allowing the open would let a subverted device thread read
/// host files. Refused, glibc assumes it may not shrink heaps and goes on. (With stacked
/// filters the kernel takes the strictest answer: ERRNO beats the list's ALLOW.)
fn refuse_open() -> Result<BpfProgram, SeccompError> {
    let kind = ThreadKind::Caller; // only for the error message: the filter is shared
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|source| SeccompError::Build { kind, source })?;
    let rules = [(libc::SYS_openat, vec![])].into_iter().collect();
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        arch,
    )
    .and_then(BpfProgram::try_from)
    .map_err(|source| SeccompError::Build { kind, source })
}

/// Compiles `kind`'s filter for this architecture.
fn compile(kind: ThreadKind, mode: Mode) -> Result<BpfProgram, SeccompError> {
    compile_with(kind, mode, &[])
}

/// Compiles `kind`'s filter with `extra` calls allowed unconditionally.
fn compile_with(
    kind: ThreadKind,
    mode: Mode,
    extra: &[libc::c_long],
) -> Result<BpfProgram, SeccompError> {
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::KillProcess,
    };
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|source| SeccompError::Build { kind, source })?;
    let mut rules = rules(kind);
    any(&mut rules, extra);
    SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .and_then(BpfProgram::try_from)
        .map_err(|source| SeccompError::Build { kind, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ThreadKind; 4] = [
        ThreadKind::Vcpu,
        ThreadKind::EventLoop,
        ThreadKind::Console,
        ThreadKind::Caller,
    ];

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_SET_REGS(), 0x4090_ae82);
        assert_eq!(KVM_TRANSLATE(), 0xc018_ae85);
        assert_eq!(KVM_GET_VCPU_EVENTS(), 0x8040_ae9f);
        assert_eq!(KVM_SET_VCPU_EVENTS(), 0x4040_aea0);
        assert_eq!(KVM_SET_GSI_ROUTING(), 0x4008_ae6a);
        assert_eq!(KVM_IOEVENTFD(), 0x4040_ae79);
    }

    #[test]
    fn every_kind_compiles_in_both_modes() {
        for kind in ALL {
            for mode in [Mode::Kill, Mode::Log] {
                let program = compile(kind, mode).unwrap();
                assert!(program.len() > 10, "{kind} filter is suspiciously short");
            }
        }
    }

    #[test]
    fn tunsetoffload_is_the_kernels() {
        assert_eq!(
            TUNSETOFFLOAD as libc::c_ulong,
            libc::TUNSETOFFLOAD as libc::c_ulong
        );
    }

    #[test]
    fn only_the_vcpu_the_tap_and_the_window_size_may_ioctl_and_only_the_event_loop_may_touch_disks()
    {
        let vcpu = rules(ThreadKind::Vcpu);
        let events = rules(ThreadKind::EventLoop);
        let console = rules(ThreadKind::Console);
        let caller = rules(ThreadKind::Caller);
        assert!(vcpu.contains_key(&libc::SYS_ioctl));
        assert_eq!(
            events.get(&libc::SYS_ioctl).map(Vec::len),
            Some(1),
            "the event loop may issue exactly one ioctl (TUNSETOFFLOAD)"
        );
        assert!(events.contains_key(&libc::SYS_writev) && events.contains_key(&libc::SYS_readv));
        assert_eq!(
            console.get(&libc::SYS_ioctl).map(Vec::len),
            Some(1),
            "the console threads may issue exactly one ioctl (TIOCGWINSZ)"
        );
        assert_eq!(
            caller.get(&libc::SYS_ioctl).map(Vec::len),
            Some(4),
            "the caller may only get and set terminal attributes (restoring -t's raw mode)"
        );
        assert!(events.contains_key(&libc::SYS_pwrite64));
        // A captured run's output buffer grows on a stdio pump past glibc's mmap threshold:
        // its reallocation is an mremap, which must not kill the bench that captures.
        assert!(console.contains_key(&libc::SYS_mremap));
        assert!(!vcpu.contains_key(&libc::SYS_pwrite64));
        for forbidden in [
            libc::SYS_open,
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_socket,
            libc::SYS_ptrace,
            libc::SYS_mount,
        ] {
            for list in [&vcpu, &events, &console, &caller] {
                assert!(
                    !list.contains_key(&forbidden),
                    "syscall {forbidden} allowed"
                );
            }
        }
    }

    /// Runs `body` in a forked child under the event loop's filter (kill mode), with a pipe
    /// made before the filter, and returns its wait status.
    fn under_event_loop_filter(filters: &Filters, body: fn([i32; 2]) -> i32) -> i32 {
        under_filter(filters, ThreadKind::EventLoop, body)
    }

    /// Runs `body` in a forked child under `kind`'s filter, with a pipe made before the
    /// filter, and returns its wait status.
    fn under_filter(filters: &Filters, kind: ThreadKind, body: fn([i32; 2]) -> i32) -> i32 {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: the child installs a precompiled filter, makes raw system calls on its
        // own fds and _exits: async-signal-safe after fork.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = match filters.apply(kind) {
                Ok(()) => body(fds),
                Err(_) => 3,
            };
            // SAFETY: ends the forked child without running the parent's atexit.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child, then closes the pipe we made.
        unsafe {
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        status
    }

    /// What virtio-net does on the event loop passes the filter in kill mode: readv and
    /// writev (on a pipe here, a tap in a run) and TUNSETOFFLOAD (on a closed fd here: the
    /// kernel answers EBADF, the filter let it through); any other ioctl kills.
    #[test]
    fn the_event_loop_may_do_what_virtio_net_does_and_no_other_ioctl() {
        let filters = Filters::new(Mode::Kill).unwrap();
        let status = under_event_loop_filter(&filters, |fds| {
            let mut byte = [7u8];
            let iov = libc::iovec {
                iov_base: byte.as_mut_ptr().cast(),
                iov_len: 1,
            };
            // SAFETY: one iovec over a live one-byte buffer, on our own pipe.
            let wrote = unsafe { libc::writev(fds[1], &iov, 1) };
            // SAFETY: as above.
            let read = unsafe { libc::readv(fds[0], &iov, 1) };
            // SAFETY: an ioctl on an fd that is not open; no memory is passed.
            let offload = unsafe { libc::ioctl(-1, libc::TUNSETOFFLOAD as _, 0) };
            // SAFETY: reads errno of this thread.
            let errno = unsafe { *libc::__errno_location() };
            if wrote != 1 || read != 1 {
                6
            } else if offload != -1 || errno != libc::EBADF {
                7
            } else {
                0
            }
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "readv/writev/TUNSETOFFLOAD under the event-loop filter: status {status:#x} \
             (SIGSYS = {}, exit 6 = readv/writev failed, 7 = TUNSETOFFLOAD not EBADF)",
            libc::SIGSYS
        );
        let status = under_event_loop_filter(&filters, |_| {
            // SAFETY: as above; TUNSETIFF is not on the list.
            unsafe { libc::ioctl(-1, libc::TUNSETIFF as _, 0) };
            0
        });
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "TUNSETIFF on the event loop must kill (status {status:#x})"
        );
    }

    /// The CLI's thread lets go of its hold on the image cache after an `--image` run:
    /// `flock(LOCK_UN)` passes the caller's filter (on a closed fd here: EBADF), taking a
    /// lock kills.
    #[test]
    fn the_caller_may_unlock_a_flock_and_take_none() {
        let filters = Filters::new(Mode::Kill).unwrap();
        let status = under_filter(&filters, ThreadKind::Caller, |_| {
            // SAFETY: flock on an fd that is not open.
            let unlocked = unsafe { libc::flock(-1, libc::LOCK_UN) };
            // SAFETY: reads errno of this thread.
            let errno = unsafe { *libc::__errno_location() };
            i32::from(unlocked != -1 || errno != libc::EBADF)
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "flock(LOCK_UN) under the caller's filter: status {status:#x} (SIGSYS = {})",
            libc::SIGSYS
        );
        let status = under_filter(&filters, ThreadKind::Caller, |_| {
            // SAFETY: as above.
            unsafe { libc::flock(-1, libc::LOCK_EX) };
            0
        });
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "flock(LOCK_EX) on the caller's thread must kill (status {status:#x})"
        );
    }

    /// Forks a child that installs `kind`'s filter and calls `getppid` (in no list): the
    /// kernel must kill it with SIGSYS. Then one that only calls allowed things and exits.
    #[test]
    fn a_call_outside_the_list_kills_the_process() {
        let filters = Filters::new(Mode::Kill).unwrap();
        for kind in ALL {
            for forbidden in [true, false] {
                // SAFETY: the child only installs a precompiled filter (prctl + seccomp),
                // makes raw system calls and _exits: async-signal-safe after fork.
                let pid = unsafe { libc::fork() };
                assert!(pid >= 0, "fork failed");
                if pid == 0 {
                    let code = match filters.apply(kind) {
                        Ok(()) => {
                            if forbidden {
                                // SAFETY: a plain system call.
                                unsafe { libc::getppid() };
                            }
                            // SAFETY: openat of a NUL-terminated literal; must fail EACCES.
                            let fd = unsafe {
                                libc::openat(
                                    libc::AT_FDCWD,
                                    c"/proc/sys/vm/overcommit_memory".as_ptr(),
                                    libc::O_RDONLY | libc::O_CLOEXEC,
                                )
                            };
                            // SAFETY: reads errno of this thread.
                            let errno = unsafe { *libc::__errno_location() };
                            if fd == -1 && errno == libc::EACCES {
                                0
                            } else {
                                4
                            }
                        }
                        Err(_) => 3,
                    };
                    // SAFETY: ends the forked child without running the parent's atexit.
                    unsafe { libc::_exit(code) };
                }
                let mut status = 0;
                // SAFETY: waits for our own child.
                assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
                if forbidden {
                    assert!(
                        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                        "{kind}: getppid under the filter should die of SIGSYS (status {status:#x})"
                    );
                } else {
                    assert!(
                        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                        "{kind}: allowed calls only, and openat refused with EACCES (exit 4 \
                         if not), yet status {status:#x}"
                    );
                }
            }
        }
    }

    /// rmdir(2) kills the caller under its plain filter, and is allowed (here: ENOENT) under
    /// the filter of a run in its own cgroup; no other kind gains it.
    #[test]
    fn only_a_caller_in_its_own_cgroup_may_rmdir() {
        let plain = Filters::new(Mode::Kill).unwrap();
        let cgroup = plain.clone().caller_removes_cgroup(Mode::Kill).unwrap();
        for (filters, kind, allowed) in [
            (&plain, ThreadKind::Caller, false),
            (&cgroup, ThreadKind::Caller, true),
            (&cgroup, ThreadKind::EventLoop, false),
        ] {
            // SAFETY: the child only installs a precompiled filter, makes a raw system call
            // and _exits: async-signal-safe after fork.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                let code = match filters.apply(kind) {
                    // SAFETY: rmdir of a NUL-terminated literal that does not exist.
                    Ok(()) => {
                        match unsafe { libc::rmdir(c"/nonexistent-twinbox-rmdir".as_ptr()) } {
                            // SAFETY: reads errno of this thread.
                            -1 if unsafe { *libc::__errno_location() } == libc::ENOENT => 0,
                            _ => 4,
                        }
                    }
                    Err(_) => 3,
                };
                // SAFETY: ends the forked child without running the parent's atexit.
                unsafe { libc::_exit(code) };
            }
            let mut status = 0;
            // SAFETY: waits for our own child.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            if allowed {
                assert!(
                    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                    "{kind}: rmdir should reach the kernel (status {status:#x})"
                );
            } else {
                assert!(
                    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                    "{kind}: rmdir should die of SIGSYS (status {status:#x})"
                );
            }
        }
    }
}
