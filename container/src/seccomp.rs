//! The container's seccomp profile: a default-deny allowlist of system calls, comparable to
//! the default profile moby (Docker) ships (`seccomp/default.json` of moby/profiles), for a
//! container that keeps runc's default capabilities and no `CAP_SYS_ADMIN`.
//!
//! - **Refused calls fail with `EPERM`**, as in moby (its `defaultErrnoRet` is 1): a program
//!   sees "operation not permitted", the answer it already handles for a missing capability,
//!   instead of being killed.
//! - **`clone3` fails with `ENOSYS`**, as in moby: its flags sit in a struct in user memory
//!   that a seccomp filter cannot read, so it cannot be argument-filtered; `ENOSYS` makes
//!   glibc (`pthread_create`, `posix_spawn`) fall back to `clone`, whose flags it can.
//! - **Argument filters**: `clone` and `unshare` only without namespace flags (no
//!   `CLONE_NEWUSER` above all: a user namespace hands out every capability again, a door to
//!   kernel code such as nf_tables and filesystem mounts); `personality` only for the values
//!   moby allows; `socket` for every family but `AF_ALG` and `AF_VSOCK` (moby's choice: the
//!   kernel crypto API and the host's vsock); `ioctl` for every request but `TIOCSTI` and
//!   `TIOCLINUX` (beyond moby, as Flatpak and systemd-nspawn do): without `--tty` the
//!   container's output is the host's terminal, and a character pushed into its input
//!   queue is typed into the user's shell once the box is gone.
//! - **Denied, among others**: `keyctl`/`add_key`/`request_key` (the key store is not
//!   namespaced), `bpf`, `perf_event_open`, `userfaultfd`, `io_uring_*` (its operations run
//!   out of seccomp's sight; newer moby denies it too), `kexec_*`, the module calls, the
//!   whole mount family (`mount`, `umount2`, `pivot_root`, `move_mount`, `open_tree`,
//!   `fsopen`, `fsconfig`, `fsmount`, `fspick`, `mount_setattr`), `setns`, `sethostname`,
//!   `syslog`, `reboot`, `swapon`, `iopl`, `ioperm`, `open_by_handle_at`, setting the clock.
//!   The container's runtime does its mounts, hostname and namespaces before the filter is
//!   installed; twinbox-init in a container mounts nothing and sets no hostname (the
//!   runtime provides `/proc`, `/sys`, `/dev`, `/tmp`, `/run` and clears the job's hostname).
//!
//! Why seccompiler: pure Rust from rust-vmm, the compiler Firecracker and Cloud Hypervisor
//! filter their own threads with; no libseccomp C library to link or ship. It compiles in
//! the parent, before `clone`: the child only hands the finished program to the kernel with
//! `seccompiler::apply_filter`, which neither allocates nor parses, as the last step before
//! the exec of init (apply_filter also sets `no_new_privs`, which an unprivileged filter
//! needs).
//!
//! x86_64 only: the table below uses x86_64 system call numbers, and any other audit
//! architecture (a 32-bit `int 0x80` call included) kills the process at the filter's
//! first instruction, before a number is looked at. x32 numbers (bit 30 set) match nothing
//! and are refused. Built for another architecture, [`container_filter`] returns
//! [`SeccompError::UnsupportedArch`].

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// What can go wrong while building the container's filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The profile has system call numbers for x86_64 only.
    #[error("seccomp: the container profile exists for x86_64 only, not {0}")]
    UnsupportedArch(&'static str),
    /// seccompiler refused the rules (a bug in the table below).
    #[error("seccomp: compiling the container profile: {0}")]
    Compile(#[from] seccompiler::BackendError),
    /// The program exceeds the kernel's BPF_MAXINSNS.
    #[error("seccomp: the container profile compiles to {0} instructions, over the kernel's {MAX_INSTRUCTIONS}")]
    TooLong(usize),
}

/// The errno a refused system call returns (moby's default).
pub const DENIED_ERRNO: i32 = libc::EPERM;

/// The errno `clone3` returns, so that libc falls back to `clone`.
pub const CLONE3_ERRNO: i32 = libc::ENOSYS;

/// The kernel's limit on a classic BPF program (BPF_MAXINSNS).
const MAX_INSTRUCTIONS: usize = 4096;

/// Every namespace flag of `clone`/`unshare`: mount, cgroup, uts, ipc, user, pid, net,
/// time. (`CLONE_NEWTIME` shares its bit with the exit signal in `clone`, where the kernel
/// ignores it, so it only matters for `unshare`.)
pub const NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWTIME) as u64;

/// `personality(2)` values allowed, as in moby: PER_LINUX, PER_LINUX32, UNAME26 with
/// either, and 0xffffffff (the query that changes nothing). `ADDR_NO_RANDOMIZE` and the
/// rest stay refused.
pub const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// `ioctl` requests refused: pushing input into a terminal (TIOCSTI) and the virtual
/// console's selection and paste (TIOCLINUX).
pub const DENIED_IOCTLS: [u64; 2] = [libc::TIOCSTI, libc::TIOCLINUX];

/// Socket families refused: the kernel crypto API and vsock (a channel to the host that a
/// network namespace does not cut), as in moby.
pub const DENIED_SOCKET_FAMILIES: [u64; 2] = [libc::AF_ALG as u64, libc::AF_VSOCK as u64];

/// System calls refused on purpose, by number and name (x86_64).
#[cfg(target_arch = "x86_64")]
pub use x86_64::DENIED;

/// Compiles the container's filter (x86_64): call it in the parent, before `clone`, and
/// install the result in the child with `seccompiler::apply_filter` just before exec.
///
/// Two parts: a hand-written dispatch in front ([`x86_64::dispatch`]: the architecture,
/// `clone3`, then a binary search over the calls allowed whatever their arguments) and
/// seccompiler's program for the few calls with argument rules (and the refusal of
/// everything else) behind it. seccompiler lays its rules out as one linear chain, ~1,600
/// instructions for the whole allowlist, and the kernel pays for the length at install
/// time: it converts and JIT-compiles the program and, to fill its per-syscall action cache,
/// runs it once for every system call number (`seccomp_cache_prepare`), ~0.75 ms a
/// container on the PVM host. The tree decides a number in a dozen instructions.
pub fn container_filter() -> Result<BpfProgram, SeccompError> {
    #[cfg(target_arch = "x86_64")]
    {
        let (plain, checked): (BTreeMap<_, _>, BTreeMap<_, _>) = rules()?
            .into_iter()
            .partition(|(_, rules)| rules.is_empty());
        let filter = SeccompFilter::new(
            checked,
            SeccompAction::Errno(DENIED_ERRNO as u32),
            SeccompAction::Allow,
            TargetArch::x86_64,
        )?;
        let argument_rules: BpfProgram = filter.try_into()?;
        let plain: Vec<u32> = plain.keys().map(|&nr| nr as u32).collect();
        let mut program = x86_64::dispatch(&plain);
        program.extend(argument_rules);
        if program.len() > MAX_INSTRUCTIONS {
            return Err(SeccompError::TooLong(program.len()));
        }
        Ok(program)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Err(SeccompError::UnsupportedArch(std::env::consts::ARCH))
    }
}

/// [`container_filter`], compiled once per process: every container a process starts (the
/// bench starts hundreds) gets a copy of the same program, ~0.08 ms of compiling saved on
/// each start after the first.
pub fn cached_container_filter() -> Result<BpfProgram, SeccompError> {
    static COMPILED: OnceLock<BpfProgram> = OnceLock::new();
    if let Some(program) = COMPILED.get() {
        return Ok(program.clone());
    }
    let program = container_filter()?;
    Ok(COMPILED.get_or_init(|| program).clone())
}

/// The allowlist as seccompiler rules: an empty rule list allows the call whatever its
/// arguments; otherwise any one matching rule allows it.
#[cfg(target_arch = "x86_64")]
fn rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        x86_64::ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    let arg0 = |op: SeccompCmpOp, value: u64| -> Result<SeccompRule, SeccompError> {
        Ok(SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            op,
            value,
        )?])?)
    };
    let no_namespaces = || arg0(SeccompCmpOp::MaskedEq(NAMESPACE_FLAGS), 0);
    // x86_64 clone(flags, stack, parent_tid, child_tid, tls): flags come first.
    rules.insert(libc::SYS_clone, vec![no_namespaces()?]);
    rules.insert(libc::SYS_unshare, vec![no_namespaces()?]);
    // The kernel reads the request as an unsigned int: compare the low word only, so high
    // bits cannot smuggle TIOCSTI past an unequal 64-bit value.
    let request_is_not =
        |request: u64| SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, request);
    rules.insert(
        libc::SYS_ioctl,
        vec![SeccompRule::new(
            DENIED_IOCTLS
                .iter()
                .map(|&r| request_is_not(r))
                .collect::<Result<_, _>>()?,
        )?],
    );
    // personality takes an unsigned int: compare the low word only, as the kernel reads it.
    rules.insert(
        libc::SYS_personality,
        PERSONALITIES
            .iter()
            .map(|&p| {
                Ok(SeccompRule::new(vec![SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    p,
                )?])?)
            })
            .collect::<Result<_, SeccompError>>()?,
    );
    // The family is an int: the three ranges around AF_ALG (38) and AF_VSOCK (40).
    let family = |op: SeccompCmpOp, value: u64| -> Result<SeccompRule, SeccompError> {
        Ok(SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            op,
            value,
        )?])?)
    };
    rules.insert(
        libc::SYS_socket,
        vec![
            family(SeccompCmpOp::Lt, DENIED_SOCKET_FAMILIES[0])?,
            family(SeccompCmpOp::Eq, DENIED_SOCKET_FAMILIES[0] + 1)?,
            family(SeccompCmpOp::Gt, DENIED_SOCKET_FAMILIES[1])?,
        ],
    );
    Ok(rules)
}

#[cfg(target_arch = "x86_64")]
mod x86_64 {
    //! The x86_64 numbers and the hand-written part of the program.

    use super::{sock_filter, CLONE3_ERRNO};

    /// `AUDIT_ARCH_X86_64`: EM_X86_64 (62) | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE.
    const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
    /// Offsets in `struct seccomp_data`.
    const DATA_NR: u32 = 0;
    const DATA_ARCH: u32 = 4;
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

    const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
    /// The longest forward skip of a conditional jump (its offsets are one byte).
    const MAX_SKIP: usize = u8::MAX as usize;
    /// Marks a jump to the end of the dispatch until the end is known.
    const TO_END: u32 = u32::MAX;

    fn ins(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
        sock_filter { code, jt, jf, k }
    }

    /// Runs before seccompiler's program: an x86_64 `clone3` returns ENOSYS (seccompiler's
    /// program can give a refused call only one errno), a call in `allowed` (sorted: the
    /// numbers allowed whatever their arguments) is allowed after a binary search, and
    /// everything else (another architecture, a call with argument rules, a refused call)
    /// jumps to the instruction after the dispatch, where seccompiler's program starts
    /// with its own architecture check. Every jump goes forward and no further than that
    /// first instruction, so prepending keeps both programs valid.
    pub fn dispatch(allowed: &[u32]) -> Vec<sock_filter> {
        let mut program = vec![
            ins(LD_W_ABS, 0, 0, DATA_ARCH),
            ins(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
            ins(JA, 0, 0, TO_END),
            ins(LD_W_ABS, 0, 0, DATA_NR),
            ins(JEQ_K, 0, 1, libc::SYS_clone3 as u32),
            ins(
                RET_K,
                0,
                0,
                libc::SECCOMP_RET_ERRNO | (CLONE3_ERRNO as u32 & libc::SECCOMP_RET_DATA),
            ),
        ];
        program.extend(search(&segments(allowed)));
        let end = program.len();
        for (at, instruction) in program.iter_mut().enumerate() {
            if instruction.code == JA && instruction.k == TO_END {
                instruction.k = (end - at - 1) as u32;
            }
        }
        program
    }

    /// The number line cut where the verdict changes: (first number, allowed) for each
    /// run of numbers with the same verdict, the first starting at 0.
    fn segments(allowed: &[u32]) -> Vec<(u32, bool)> {
        let mut segments = vec![(0, false)];
        for &nr in allowed {
            match segments.last_mut() {
                Some((start, true)) if *start == nr => {}
                Some(last) if last.0 == nr => last.1 = true,
                _ => segments.push((nr, true)),
            }
            if nr < u32::MAX {
                segments.push((nr + 1, false));
            }
        }
        // Merge neighbours with the same verdict (consecutive allowed numbers).
        segments.dedup_by(|next, prev| next.1 == prev.1);
        segments
    }

    /// A binary search over `segments` (the number is in the accumulator): allowed ones
    /// return ALLOW, the others jump to the end of the dispatch.
    fn search(segments: &[(u32, bool)]) -> Vec<sock_filter> {
        if let [(_, allowed)] = segments {
            return vec![if *allowed {
                ins(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW)
            } else {
                ins(JA, 0, 0, TO_END)
            }];
        }
        let (below, above) = segments.split_at(segments.len() / 2);
        let threshold = above[0].0;
        let (below, above) = (search(below), search(above));
        let mut code = Vec::with_capacity(2 + below.len() + above.len());
        if below.len() <= MAX_SKIP {
            code.push(ins(JGE_K, below.len() as u8, 0, threshold));
        } else {
            code.push(ins(JGE_K, 0, 1, threshold));
            code.push(ins(JA, 0, 0, below.len() as u32));
        }
        code.extend(below);
        code.extend(above);
        code
    }

    // Numbers newer than the libc crate's table (arch/x86/entry/syscalls/syscall_64.tbl).
    const SYS_IO_PGETEVENTS: i64 = 333;
    const SYS_URETPROBE: i64 = 335;
    const SYS_CACHESTAT: i64 = 451;
    const SYS_MAP_SHADOW_STACK: i64 = 453;
    const SYS_FUTEX_WAKE: i64 = 454;
    const SYS_FUTEX_WAIT: i64 = 455;
    const SYS_FUTEX_REQUEUE: i64 = 456;
    const SYS_STATMOUNT: i64 = 457;
    const SYS_LISTMOUNT: i64 = 458;
    const SYS_SETXATTRAT: i64 = 463;
    const SYS_GETXATTRAT: i64 = 464;
    const SYS_LISTXATTRAT: i64 = 465;
    const SYS_REMOVEXATTRAT: i64 = 466;

    /// Allowed whatever the arguments: moby's unconditional list for amd64, plus what moby
    /// allows for the capabilities the container keeps (`chroot` for CAP_SYS_CHROOT) and
    /// `ptrace`/`process_vm_*` (kernels >= 4.8 re-check seccomp after a tracer's changes).
    /// `clone`, `unshare`, `personality`, `socket` and `ioctl` are allowed with argument
    /// rules.
    pub const ALLOWED: &[i64] = &[
        // Files and descriptors.
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_open,
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_creat,
        libc::SYS_close,
        libc::SYS_close_range,
        libc::SYS_lseek,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_preadv2,
        libc::SYS_pwritev2,
        libc::SYS_dup,
        libc::SYS_dup2,
        libc::SYS_dup3,
        libc::SYS_fcntl,
        libc::SYS_flock,
        libc::SYS_pipe,
        libc::SYS_pipe2,
        libc::SYS_sendfile,
        libc::SYS_splice,
        libc::SYS_tee,
        libc::SYS_vmsplice,
        libc::SYS_copy_file_range,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_sync,
        libc::SYS_syncfs,
        libc::SYS_sync_file_range,
        libc::SYS_fallocate,
        libc::SYS_fadvise64,
        libc::SYS_readahead,
        libc::SYS_truncate,
        libc::SYS_ftruncate,
        libc::SYS_memfd_create,
        libc::SYS_memfd_secret,
        libc::SYS_name_to_handle_at,
        SYS_CACHESTAT,
        // Paths and metadata.
        libc::SYS_stat,
        libc::SYS_fstat,
        libc::SYS_lstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_statfs,
        libc::SYS_fstatfs,
        libc::SYS_access,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
        libc::SYS_getcwd,
        libc::SYS_chdir,
        libc::SYS_fchdir,
        libc::SYS_chroot,
        libc::SYS_getdents,
        libc::SYS_getdents64,
        libc::SYS_mkdir,
        libc::SYS_mkdirat,
        libc::SYS_rmdir,
        libc::SYS_rename,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_link,
        libc::SYS_linkat,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_symlink,
        libc::SYS_symlinkat,
        libc::SYS_readlink,
        libc::SYS_readlinkat,
        // Device nodes are the device cgroup's and nodev's business, as in moby.
        libc::SYS_mknod,
        libc::SYS_mknodat,
        libc::SYS_chmod,
        libc::SYS_fchmod,
        libc::SYS_fchmodat,
        libc::SYS_fchmodat2,
        libc::SYS_chown,
        libc::SYS_fchown,
        libc::SYS_lchown,
        libc::SYS_fchownat,
        libc::SYS_umask,
        libc::SYS_utime,
        libc::SYS_utimes,
        libc::SYS_utimensat,
        libc::SYS_futimesat,
        libc::SYS_getxattr,
        libc::SYS_lgetxattr,
        libc::SYS_fgetxattr,
        libc::SYS_setxattr,
        libc::SYS_lsetxattr,
        libc::SYS_fsetxattr,
        libc::SYS_listxattr,
        libc::SYS_llistxattr,
        libc::SYS_flistxattr,
        libc::SYS_removexattr,
        libc::SYS_lremovexattr,
        libc::SYS_fremovexattr,
        SYS_SETXATTRAT,
        SYS_GETXATTRAT,
        SYS_LISTXATTRAT,
        SYS_REMOVEXATTRAT,
        // Mount ids of the caller's own mount namespace (read-only).
        SYS_STATMOUNT,
        SYS_LISTMOUNT,
        // Waiting for files and events.
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_select,
        libc::SYS_pselect6,
        libc::SYS_epoll_create,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_ctl_old,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_wait_old,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        libc::SYS_eventfd,
        libc::SYS_eventfd2,
        libc::SYS_inotify_init,
        libc::SYS_inotify_init1,
        libc::SYS_inotify_add_watch,
        libc::SYS_inotify_rm_watch,
        libc::SYS_fanotify_mark,
        libc::SYS_signalfd,
        libc::SYS_signalfd4,
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
        // Asynchronous I/O (the old interface; io_uring is refused).
        libc::SYS_io_setup,
        libc::SYS_io_destroy,
        libc::SYS_io_submit,
        libc::SYS_io_cancel,
        libc::SYS_io_getevents,
        SYS_IO_PGETEVENTS,
        libc::SYS_ioprio_get,
        libc::SYS_ioprio_set,
        // Memory.
        libc::SYS_brk,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_mincore,
        libc::SYS_msync,
        libc::SYS_mlock,
        libc::SYS_mlock2,
        libc::SYS_mlockall,
        libc::SYS_munlock,
        libc::SYS_munlockall,
        libc::SYS_remap_file_pages,
        libc::SYS_pkey_alloc,
        libc::SYS_pkey_free,
        libc::SYS_pkey_mprotect,
        libc::SYS_membarrier,
        libc::SYS_mseal,
        SYS_MAP_SHADOW_STACK,
        // Processes and threads (clone is below, with its argument rule).
        libc::SYS_fork,
        libc::SYS_vfork,
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_wait4,
        libc::SYS_waitid,
        libc::SYS_kill,
        libc::SYS_tkill,
        libc::SYS_tgkill,
        libc::SYS_pidfd_open,
        libc::SYS_pidfd_send_signal,
        libc::SYS_process_mrelease,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_prctl,
        libc::SYS_arch_prctl,
        libc::SYS_modify_ldt,
        libc::SYS_set_thread_area,
        libc::SYS_get_thread_area,
        libc::SYS_set_tid_address,
        libc::SYS_set_robust_list,
        libc::SYS_get_robust_list,
        libc::SYS_rseq,
        libc::SYS_futex,
        libc::SYS_futex_waitv,
        SYS_FUTEX_WAKE,
        SYS_FUTEX_WAIT,
        SYS_FUTEX_REQUEUE,
        // Further filters only narrow what is allowed.
        libc::SYS_seccomp,
        libc::SYS_landlock_create_ruleset,
        libc::SYS_landlock_add_rule,
        libc::SYS_landlock_restrict_self,
        SYS_URETPROBE,
        // Signals.
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigpending,
        libc::SYS_rt_sigsuspend,
        libc::SYS_rt_sigtimedwait,
        libc::SYS_rt_sigqueueinfo,
        libc::SYS_rt_tgsigqueueinfo,
        libc::SYS_sigaltstack,
        libc::SYS_pause,
        libc::SYS_restart_syscall,
        // Identity (the kernel checks the capabilities the container keeps).
        libc::SYS_getpid,
        libc::SYS_getppid,
        libc::SYS_gettid,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        libc::SYS_getresuid,
        libc::SYS_getresgid,
        libc::SYS_getgroups,
        libc::SYS_setuid,
        libc::SYS_setgid,
        libc::SYS_setreuid,
        libc::SYS_setregid,
        libc::SYS_setresuid,
        libc::SYS_setresgid,
        libc::SYS_setfsuid,
        libc::SYS_setfsgid,
        libc::SYS_setgroups,
        libc::SYS_capget,
        libc::SYS_capset,
        libc::SYS_getpgid,
        libc::SYS_getpgrp,
        libc::SYS_setpgid,
        libc::SYS_getsid,
        libc::SYS_setsid,
        // Scheduling, limits and accounting.
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_sched_setaffinity,
        libc::SYS_sched_getattr,
        libc::SYS_sched_setattr,
        libc::SYS_sched_getparam,
        libc::SYS_sched_setparam,
        libc::SYS_sched_getscheduler,
        libc::SYS_sched_setscheduler,
        libc::SYS_sched_get_priority_max,
        libc::SYS_sched_get_priority_min,
        libc::SYS_sched_rr_get_interval,
        libc::SYS_getpriority,
        libc::SYS_setpriority,
        libc::SYS_getrlimit,
        libc::SYS_setrlimit,
        libc::SYS_prlimit64,
        libc::SYS_getrusage,
        libc::SYS_times,
        libc::SYS_getcpu,
        libc::SYS_sysinfo,
        libc::SYS_uname,
        libc::SYS_getrandom,
        // Time (reading it; setting needs CAP_SYS_TIME, which is dropped).
        libc::SYS_time,
        libc::SYS_gettimeofday,
        libc::SYS_clock_gettime,
        libc::SYS_clock_getres,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_nanosleep,
        libc::SYS_alarm,
        libc::SYS_getitimer,
        libc::SYS_setitimer,
        libc::SYS_timer_create,
        libc::SYS_timer_delete,
        libc::SYS_timer_settime,
        libc::SYS_timer_gettime,
        libc::SYS_timer_getoverrun,
        // System V and POSIX IPC (the container has its own IPC namespace).
        libc::SYS_shmget,
        libc::SYS_shmat,
        libc::SYS_shmdt,
        libc::SYS_shmctl,
        libc::SYS_semget,
        libc::SYS_semop,
        libc::SYS_semtimedop,
        libc::SYS_semctl,
        libc::SYS_msgget,
        libc::SYS_msgsnd,
        libc::SYS_msgrcv,
        libc::SYS_msgctl,
        libc::SYS_mq_open,
        libc::SYS_mq_unlink,
        libc::SYS_mq_timedsend,
        libc::SYS_mq_timedreceive,
        libc::SYS_mq_notify,
        libc::SYS_mq_getsetattr,
        // Sockets (socket itself is below, with its family rule).
        libc::SYS_socketpair,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_accept,
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_shutdown,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_sendmmsg,
        libc::SYS_recvmmsg,
    ];

    /// Refused on purpose (a subset of all that is not allowed, for the tests and the
    /// reader): each is named in the module documentation or in moby's
    /// capability-conditioned lists for capabilities the container does not keep.
    pub const DENIED: &[(i64, &str)] = &[
        (libc::SYS_keyctl, "keyctl"),
        (libc::SYS_add_key, "add_key"),
        (libc::SYS_request_key, "request_key"),
        (libc::SYS_bpf, "bpf"),
        (libc::SYS_perf_event_open, "perf_event_open"),
        (libc::SYS_userfaultfd, "userfaultfd"),
        (libc::SYS_io_uring_setup, "io_uring_setup"),
        (libc::SYS_io_uring_enter, "io_uring_enter"),
        (libc::SYS_io_uring_register, "io_uring_register"),
        (libc::SYS_kexec_load, "kexec_load"),
        (libc::SYS_kexec_file_load, "kexec_file_load"),
        (libc::SYS_init_module, "init_module"),
        (libc::SYS_finit_module, "finit_module"),
        (libc::SYS_delete_module, "delete_module"),
        (libc::SYS_mount, "mount"),
        (libc::SYS_umount2, "umount2"),
        (libc::SYS_pivot_root, "pivot_root"),
        (libc::SYS_move_mount, "move_mount"),
        (libc::SYS_open_tree, "open_tree"),
        (libc::SYS_fsopen, "fsopen"),
        (libc::SYS_fsconfig, "fsconfig"),
        (libc::SYS_fsmount, "fsmount"),
        (libc::SYS_fspick, "fspick"),
        (libc::SYS_mount_setattr, "mount_setattr"),
        (libc::SYS_setns, "setns"),
        (libc::SYS_sethostname, "sethostname"),
        (libc::SYS_setdomainname, "setdomainname"),
        (libc::SYS_syslog, "syslog"),
        (libc::SYS_reboot, "reboot"),
        (libc::SYS_swapon, "swapon"),
        (libc::SYS_swapoff, "swapoff"),
        (libc::SYS_acct, "acct"),
        (libc::SYS_quotactl, "quotactl"),
        (libc::SYS_iopl, "iopl"),
        (libc::SYS_ioperm, "ioperm"),
        (libc::SYS_open_by_handle_at, "open_by_handle_at"),
        (libc::SYS_settimeofday, "settimeofday"),
        (libc::SYS_clock_settime, "clock_settime"),
        (libc::SYS_kcmp, "kcmp"),
        (libc::SYS_pidfd_getfd, "pidfd_getfd"),
        (libc::SYS_process_madvise, "process_madvise"),
        (libc::SYS_lookup_dcookie, "lookup_dcookie"),
        (libc::SYS_fanotify_init, "fanotify_init"),
        (libc::SYS_vhangup, "vhangup"),
        (libc::SYS_mbind, "mbind"),
        (libc::SYS_set_mempolicy, "set_mempolicy"),
        (libc::SYS_get_mempolicy, "get_mempolicy"),
        (libc::SYS_migrate_pages, "migrate_pages"),
        (libc::SYS_move_pages, "move_pages"),
        (libc::SYS_uselib, "uselib"),
        (libc::SYS__sysctl, "_sysctl"),
        (libc::SYS_ustat, "ustat"),
        (libc::SYS_sysfs, "sysfs"),
    ];
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    //! The filter applied for real, in a forked child of the test process (no root
    //! needed): each call is tried once with the filter and once without, so a refusal is
    //! shown to be the filter's and not the host's or a missing privilege's.

    use super::*;
    use std::os::fd::{AsRawFd, OwnedFd};

    fn errno() -> i64 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0) as i64
    }

    /// A raw system call: its result, or minus the errno.
    fn sys(nr: i64, a: [u64; 5]) -> i64 {
        // SAFETY: every caller passes arguments that are integers, null, or pointers to
        // live stack data of the size the call expects.
        let r = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4]) };
        if r < 0 {
            -errno()
        } else {
            r
        }
    }

    /// `clone(flags | SIGCHLD)` without a new stack (a fork): the new process exits at
    /// once, the caller reaps it and gets 0, or minus the errno.
    fn clone_with(flags: u64) -> i64 {
        let r = sys(libc::SYS_clone, [flags | libc::SIGCHLD as u64, 0, 0, 0, 0]);
        if r == 0 {
            // SAFETY: the new process leaves without running anything else.
            unsafe { libc::_exit(0) };
        }
        if r > 0 {
            // SAFETY: reaps our own child; a null status pointer is allowed.
            unsafe { libc::waitpid(r as i32, std::ptr::null_mut(), 0) };
            return 0;
        }
        r
    }

    /// One attempt: a name for the failure message and the call.
    type Probe = (&'static str, fn() -> i64);

    /// A path that does not exist, so an unfiltered `mount` fails with ENOENT before any
    /// privilege check and a filtered one with EPERM.
    const MISSING: &std::ffi::CStr = c"/nonexistent-twinbox-seccomp-test";

    /// Calls the filter must refuse with EPERM, each with arguments for which the kernel
    /// itself would answer something else (or succeed harmlessly in the forked child).
    /// Unfiltered, the child really enters a user namespace: `clone(CLONE_NEWUSER)` comes
    /// first, while its uid is still mapped, and the other namespace probes after the
    /// `unshare`, where they have the capabilities even when the tests do not run as root.
    const REFUSED: &[Probe] = &[
        ("clone(CLONE_NEWUSER)", || {
            clone_with(libc::CLONE_NEWUSER as u64)
        }),
        // KEYCTL_GET_KEYRING_ID of KEY_SPEC_USER_KEYRING, no create.
        ("keyctl", || {
            sys(libc::SYS_keyctl, [0, (-4i64) as u64, 0, 0, 0])
        }),
        // An unknown command: EINVAL from the kernel.
        ("bpf", || sys(libc::SYS_bpf, [9999, 0, 0, 0, 0])),
        // A null attribute pointer: EFAULT from the kernel.
        ("perf_event_open", || {
            sys(libc::SYS_perf_event_open, [0, 0, u64::MAX, u64::MAX, 0])
        }),
        ("unshare(CLONE_NEWUSER)", || {
            sys(libc::SYS_unshare, [libc::CLONE_NEWUSER as u64, 0, 0, 0, 0])
        }),
        ("unshare(CLONE_NEWNS)", || {
            sys(libc::SYS_unshare, [libc::CLONE_NEWNS as u64, 0, 0, 0, 0])
        }),
        ("clone(CLONE_NEWNET)", || {
            clone_with(libc::CLONE_NEWNET as u64)
        }),
        ("mount", || {
            sys(
                libc::SYS_mount,
                [0, MISSING.as_ptr() as u64, c"tmpfs".as_ptr() as u64, 0, 0],
            )
        }),
        ("umount2", || {
            sys(libc::SYS_umount2, [MISSING.as_ptr() as u64, 0, 0, 0, 0])
        }),
        // ADDR_NO_RANDOMIZE is not one of the allowed personalities.
        ("personality(ADDR_NO_RANDOMIZE)", || {
            sys(libc::SYS_personality, [0x0040000, 0, 0, 0, 0])
        }),
        ("socket(AF_VSOCK)", || {
            sys(
                libc::SYS_socket,
                [libc::AF_VSOCK as u64, libc::SOCK_STREAM as u64, 0, 0, 0],
            )
        }),
        ("socket(AF_ALG)", || {
            sys(
                libc::SYS_socket,
                [libc::AF_ALG as u64, libc::SOCK_SEQPACKET as u64, 0, 0, 0],
            )
        }),
        // A bad fd: EBADF from the kernel (checked before the request).
        ("ioctl(TIOCSTI)", || {
            sys(libc::SYS_ioctl, [u64::MAX, libc::TIOCSTI, 0, 0, 0])
        }),
        // The same request with high bits set, which the kernel drops.
        ("ioctl(TIOCSTI | 1 << 32)", || {
            sys(
                libc::SYS_ioctl,
                [u64::MAX, libc::TIOCSTI | 1 << 32, 0, 0, 0],
            )
        }),
        ("ioctl(TIOCLINUX)", || {
            sys(libc::SYS_ioctl, [u64::MAX, libc::TIOCLINUX, 0, 0, 0])
        }),
        // A null setup struct: EFAULT from the kernel.
        ("io_uring_setup", || {
            sys(libc::SYS_io_uring_setup, [1, 0, 0, 0, 0])
        }),
        // A null range: EFAULT/EINVAL from the kernel.
        ("userfaultfd", || {
            sys(libc::SYS_userfaultfd, [u64::MAX, 0, 0, 0, 0])
        }),
    ];

    /// Calls that must keep working under the filter, each returning >= 0 when they do.
    const ALLOWED_CALLS: &[Probe] = &[
        ("getpid", || sys(libc::SYS_getpid, [0; 5])),
        ("pipe2+write+read", || {
            let mut fds = [0i32; 2];
            let r = sys(libc::SYS_pipe2, [fds.as_mut_ptr() as u64, 0, 0, 0, 0]);
            if r < 0 {
                return r;
            }
            let byte = [7u8];
            let w = sys(
                libc::SYS_write,
                [fds[1] as u64, byte.as_ptr() as u64, 1, 0, 0],
            );
            let mut back = [0u8];
            let r = sys(
                libc::SYS_read,
                [fds[0] as u64, back.as_mut_ptr() as u64, 1, 0, 0],
            );
            if w != 1 || r != 1 || back[0] != 7 {
                return -(libc::EIO as i64);
            }
            0
        }),
        ("fork", || {
            // SAFETY: the child exits at once; the parent reaps it.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                unsafe { libc::_exit(3) };
            }
            if pid < 0 {
                return -errno();
            }
            let mut status = 0;
            // SAFETY: reaps our own child into a stack variable.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 3 {
                0
            } else {
                -(libc::ECHILD as i64)
            }
        }),
        ("clone(SIGCHLD)", || clone_with(0)),
        ("clone(thread flags)", || {
            // pthread_create's flags, through glibc: clone3 (ENOSYS) then clone.
            extern "C" fn body(arg: *mut libc::c_void) -> *mut libc::c_void {
                arg
            }
            let mut thread: libc::pthread_t = 0;
            // SAFETY: a thread that returns its argument; joined below.
            let r =
                unsafe { libc::pthread_create(&mut thread, std::ptr::null(), body, 42 as *mut _) };
            if r != 0 {
                return -(r as i64);
            }
            let mut out: *mut libc::c_void = std::ptr::null_mut();
            // SAFETY: joins the thread created above.
            unsafe { libc::pthread_join(thread, &mut out) };
            if out as usize == 42 {
                0
            } else {
                -(libc::EIO as i64)
            }
        }),
        ("unshare(CLONE_FILES)", || {
            sys(libc::SYS_unshare, [libc::CLONE_FILES as u64, 0, 0, 0, 0])
        }),
        ("personality(query)", || {
            sys(libc::SYS_personality, [0xffff_ffff, 0, 0, 0, 0])
        }),
        // FIONREAD on a pipe: any other ioctl still reaches the kernel.
        ("ioctl(FIONREAD)", || {
            let mut fds = [0i32; 2];
            let r = sys(libc::SYS_pipe2, [fds.as_mut_ptr() as u64, 0, 0, 0, 0]);
            if r < 0 {
                return r;
            }
            let mut pending = -1i32;
            let request = libc::FIONREAD;
            sys(
                libc::SYS_ioctl,
                [
                    fds[0] as u64,
                    request,
                    &mut pending as *mut i32 as u64,
                    0,
                    0,
                ],
            )
        }),
        ("socket(AF_UNIX)", || {
            sys(
                libc::SYS_socket,
                [libc::AF_UNIX as u64, libc::SOCK_STREAM as u64, 0, 0, 0],
            )
        }),
        ("socket(AF_INET)", || {
            sys(
                libc::SYS_socket,
                [libc::AF_INET as u64, libc::SOCK_DGRAM as u64, 0, 0, 0],
            )
        }),
        // What init does with --net (rootfs/init/src/net.rs): interface ioctls on an
        // AF_INET socket (the read one needs no privilege; the set ones are the same call
        // with another request number, which the filter does not look at but for TIOCSTI
        // and TIOCLINUX), then giving CAP_NET_ADMIN back with prctl and capget/capset.
        ("ioctl(SIOCGIFFLAGS lo)", || {
            let sock = sys(
                libc::SYS_socket,
                [libc::AF_INET as u64, libc::SOCK_DGRAM as u64, 0, 0, 0],
            );
            if sock < 0 {
                return sock;
            }
            // SAFETY: ifreq is plain data; all zeroes is valid.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            req.ifr_name[0] = b'l' as libc::c_char;
            req.ifr_name[1] = b'o' as libc::c_char;
            sys(
                libc::SYS_ioctl,
                [
                    sock as u64,
                    libc::SIOCGIFFLAGS,
                    &mut req as *mut libc::ifreq as u64,
                    0,
                    0,
                ],
            )
        }),
        ("prctl(PR_CAPBSET_READ, CAP_NET_ADMIN)", || {
            sys(libc::SYS_prctl, [libc::PR_CAPBSET_READ as u64, 12, 0, 0, 0])
        }),
        ("capget", || {
            let mut header = [0x2008_0522u32, 0];
            let mut data = [0u32; 6];
            sys(
                libc::SYS_capget,
                [
                    header.as_mut_ptr() as u64,
                    data.as_mut_ptr() as u64,
                    0,
                    0,
                    0,
                ],
            )
        }),
    ];

    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe2")
    }

    /// Forks; the child leaves the test's session (so no call can reach its terminal),
    /// installs `filter` (if any), makes calls `0..count` and writes each result to a
    /// pipe. Returns the results in order. The child only makes system calls (and glibc's
    /// fork-safe pthread_create) between fork and `_exit`.
    fn results_in_child(
        filter: Option<&BpfProgram>,
        count: usize,
        call: &dyn Fn(usize) -> i64,
    ) -> Vec<i64> {
        let (r, w) = pipe();
        // SAFETY: the child below writes to the pipe and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: setsid takes no arguments.
            unsafe { libc::setsid() };
            let mut code = 0;
            if let Some(filter) = filter {
                if seccompiler::apply_filter(filter).is_err() {
                    code = 99;
                }
            }
            if code == 0 {
                for i in 0..count {
                    let result = call(i).to_le_bytes();
                    // SAFETY: 8 bytes from the stack into our pipe.
                    unsafe { libc::write(w.as_raw_fd(), result.as_ptr().cast(), 8) };
                }
            }
            // SAFETY: leaves the forked child without running the test harness's code.
            unsafe { libc::_exit(code) };
        }
        drop(w);
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::from(r), &mut bytes).expect("read");
        let mut status = 0;
        // SAFETY: reaps the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "probe child ended with status {status:#x} (99: the filter was not installed)"
        );
        assert_eq!(bytes.len(), count * 8, "probe child wrote {bytes:?}");
        bytes
            .chunks(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    /// [`results_in_child`] for a list of probes.
    fn probe_results(filter: Option<&BpfProgram>, probes: &[Probe]) -> Vec<i64> {
        results_in_child(filter, probes.len(), &|i| (probes[i].1)())
    }

    fn filter() -> BpfProgram {
        container_filter().expect("compile the container filter")
    }

    #[test]
    fn refused_calls_fail_with_eperm_because_of_the_filter() {
        let without = probe_results(None, REFUSED);
        let with = probe_results(Some(&filter()), REFUSED);
        for (((name, _), before), after) in REFUSED.iter().zip(without).zip(with) {
            assert_eq!(after, -(DENIED_ERRNO as i64), "{name} under the filter");
            assert_ne!(
                before,
                -(DENIED_ERRNO as i64),
                "{name} is refused with EPERM even without the filter: the probe proves nothing"
            );
        }
    }

    #[test]
    fn allowed_calls_work_under_the_filter() {
        let with = probe_results(Some(&filter()), ALLOWED_CALLS);
        for ((name, _), result) in ALLOWED_CALLS.iter().zip(with) {
            assert!(result >= 0, "{name} under the filter: errno {}", -result);
        }
    }

    #[test]
    fn clone3_gets_enosys_so_libc_falls_back_to_clone() {
        // A null struct of size 0: EINVAL from the kernel, never a new process.
        let probe: &[Probe] = &[("clone3", || sys(libc::SYS_clone3, [0; 5]))];
        assert_eq!(probe_results(None, probe), [-(libc::EINVAL as i64)]);
        assert_eq!(
            probe_results(Some(&filter()), probe),
            [-(CLONE3_ERRNO as i64)]
        );
    }

    #[test]
    fn a_dynamic_shell_starts_forks_and_exits_under_the_filter() {
        // execve, the dynamic loader, libc start-up, a pipeline (fork, pipe, wait).
        let program = filter();
        let sh = c"/bin/sh";
        let script = c"echo piped | cat >/dev/null && exit 7";
        let argv = [
            sh.as_ptr(),
            c"-c".as_ptr(),
            script.as_ptr(),
            std::ptr::null(),
        ];
        let envp = [c"PATH=/usr/bin:/bin".as_ptr(), std::ptr::null()];
        // SAFETY: the child installs the filter and execs, or exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            if seccompiler::apply_filter(&program).is_ok() {
                // SAFETY: NUL-terminated strings and null-terminated arrays from above.
                unsafe { libc::execve(sh.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
            }
            // SAFETY: leaves the forked child.
            unsafe { libc::_exit(99) };
        }
        let mut status = 0;
        // SAFETY: reaps the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 7,
            "/bin/sh under the filter ended with status {status:#x} (99: filter or exec failed)"
        );
    }

    #[test]
    fn no_denied_call_is_on_the_allowlist() {
        let rules = rules().expect("rules");
        for (nr, name) in x86_64::DENIED {
            assert!(!rules.contains_key(nr), "{name} ({nr}) is allowed");
        }
        assert!(
            !rules.contains_key(&libc::SYS_clone3),
            "clone3 must reach the ENOSYS prefix"
        );
        let mut seen = std::collections::BTreeSet::new();
        for nr in x86_64::ALLOWED {
            assert!(seen.insert(nr), "syscall {nr} is listed twice");
        }
    }

    #[test]
    fn every_denied_call_gets_eperm_under_the_filter() {
        // Every argument -1 (bad fds, pointers, lengths, commands): were the filter broken,
        // the kernel would reject each call itself rather than change the host. Only the
        // filtered side is run: no unfiltered control for calls like these.
        let results = results_in_child(Some(&filter()), x86_64::DENIED.len(), &|i| {
            sys(x86_64::DENIED[i].0, [u64::MAX; 5])
        });
        for ((_, name), result) in x86_64::DENIED.iter().zip(results) {
            assert_eq!(result, -(DENIED_ERRNO as i64), "{name} under the filter");
        }
    }

    /// What the dispatch alone decides for a call: `Some(return value)`, or `None` when
    /// it hands the call over to the instruction after it. Interprets the few classic BPF
    /// instructions the dispatch is made of, as the kernel would.
    fn dispatch_verdict(dispatch: &[sock_filter], arch: u32, nr: u32) -> Option<u32> {
        let mut pc = 0;
        let mut acc = 0u32;
        while pc < dispatch.len() {
            let i = &dispatch[pc];
            pc += 1;
            let jump = |taken: bool| usize::from(if taken { i.jt } else { i.jf });
            match u32::from(i.code) {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                    acc = if i.k == 0 { nr } else { arch };
                    assert!(i.k == 0 || i.k == 4, "load of seccomp_data offset {}", i.k);
                }
                c if c == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K => pc += jump(acc == i.k),
                c if c == libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K => pc += jump(acc >= i.k),
                c if c == libc::BPF_JMP | libc::BPF_JA => pc += i.k as usize,
                c if c == libc::BPF_RET | libc::BPF_K => return Some(i.k),
                c => panic!("instruction {c:#x} at {}", pc - 1),
            }
            assert!(
                pc <= dispatch.len(),
                "a jump past the allowlist's first instruction"
            );
        }
        assert_eq!(pc, dispatch.len());
        None
    }

    #[test]
    fn the_dispatch_allows_the_plain_calls_and_hands_every_other_over_intact() {
        let rules = rules().expect("rules");
        let plain: Vec<u32> = rules
            .iter()
            .filter(|(_, r)| r.is_empty())
            .map(|(&nr, _)| nr as u32)
            .collect();
        let dispatch = x86_64::dispatch(&plain);
        let program = filter();
        assert_eq!(program[..dispatch.len()], dispatch[..]);
        // seccompiler's part starts with its own architecture check (a load of the arch).
        assert_eq!(program[dispatch.len()], dispatch[0]);
        let x86_64 = 62 | 0x8000_0000 | 0x4000_0000;
        let x32 = 0x4000_0000;
        let numbers = (0..1024).chain([x32, x32 | 39, x32 | 1023, u32::MAX - 1, u32::MAX]);
        for nr in numbers {
            let verdict = dispatch_verdict(&dispatch, x86_64, nr);
            let expected = if plain.contains(&nr) {
                Some(libc::SECCOMP_RET_ALLOW)
            } else if nr == libc::SYS_clone3 as u32 {
                Some(libc::SECCOMP_RET_ERRNO | CLONE3_ERRNO as u32)
            } else {
                None
            };
            assert_eq!(verdict, expected, "system call {nr:#x}");
            // Another architecture is never judged here, whatever the number.
            assert_eq!(dispatch_verdict(&dispatch, 3 | 0x4000_0000, nr), None);
        }
        // The arguments of clone, unshare, ioctl, personality and socket are checked behind.
        for nr in [
            libc::SYS_clone,
            libc::SYS_unshare,
            libc::SYS_ioctl,
            libc::SYS_personality,
            libc::SYS_socket,
        ] {
            assert!(!plain.contains(&(nr as u32)), "{nr} is allowed unchecked");
        }
        // A tree, not a chain: a few hundred calls decided in a few hundred instructions.
        assert!(
            dispatch.len() < 2 * plain.len() / 3,
            "{} instructions for {} calls",
            dispatch.len(),
            plain.len()
        );
        assert!(program.len() <= MAX_INSTRUCTIONS);
    }

    #[test]
    fn the_cached_filter_is_the_compiled_one_every_time() {
        let fresh = filter();
        for _ in 0..2 {
            assert_eq!(cached_container_filter().expect("cached filter"), fresh);
        }
    }

    #[test]
    fn x32_numbers_are_refused() {
        // getpid through the x32 ABI (bit 30 of the number): the x86_64 audit arch, but a
        // number no rule matches. Unfiltered it works (or ENOSYS without x32 support).
        let probe: &[Probe] = &[("x32 getpid", || sys(0x4000_0000 | libc::SYS_getpid, [0; 5]))];
        assert_ne!(probe_results(None, probe), [-(DENIED_ERRNO as i64)]);
        assert_eq!(
            probe_results(Some(&filter()), probe),
            [-(DENIED_ERRNO as i64)]
        );
    }

    /// Forks a child that (optionally filtered) makes getpid through `int 0x80`, the
    /// 32-bit entry, and returns its wait status.
    fn int80_getpid_status(filter: Option<&BpfProgram>) -> i32 {
        // SAFETY: the child makes raw calls and leaves with _exit or dies of a signal.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: a stack rlimit; no core file for the expected SIGSYS.
            unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
            if let Some(filter) = filter {
                if seccompiler::apply_filter(filter).is_err() {
                    // SAFETY: leaves the forked child.
                    unsafe { libc::_exit(99) };
                }
            }
            let mut eax: u32 = 20; // __NR_getpid of i386
                                   // SAFETY: int 0x80 with eax = getpid takes no pointers and clobbers only eax.
            unsafe { std::arch::asm!("int 0x80", inout("eax") eax) };
            // SAFETY: leaves the forked child.
            unsafe { libc::_exit(if eax as i32 > 0 { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: reaps the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        status
    }

    #[test]
    fn the_32_bit_entry_kills_the_process() {
        // Another audit arch: the filter's first check kills the process (SIGSYS) before a
        // number is compared, so i386 numbers cannot slip past x86_64 rules. A kernel
        // without IA-32 emulation faults the instruction itself (SIGSEGV) either way.
        let unfiltered = int80_getpid_status(None);
        let filtered = int80_getpid_status(Some(&filter()));
        let by = |status: i32, signal: i32| {
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == signal
        };
        if by(unfiltered, libc::SIGSEGV) {
            assert!(by(filtered, libc::SIGSEGV), "status {filtered:#x}");
        } else {
            assert!(
                libc::WIFEXITED(unfiltered) && libc::WEXITSTATUS(unfiltered) == 0,
                "unfiltered int 0x80 getpid: status {unfiltered:#x}"
            );
            assert!(
                by(filtered, libc::SIGSYS),
                "filtered int 0x80 getpid: status {filtered:#x}, not killed by SIGSYS"
            );
        }
    }
}
