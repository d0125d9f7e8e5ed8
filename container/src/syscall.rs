//! Every privileged call the parent makes for a run, behind one trait (the shape of
//! youki's `syscall/syscall.rs`): [`Real`] makes them; the recording double in the tests of
//! `run.rs` writes each call to a log and plays a scripted child, so the orchestration —
//! the order of the steps, the error paths, the order of cleanup — is tested without root.
//!
//! The child's calls (after `clone`, in its new namespaces) are here too, for the same
//! reason: `child::main` runs in-process on the double, and its order (parent-death
//! signal first and after every credential change, seccomp last) is tested. Their real
//! implementation is raw system calls that never allocate.
//!
//! What is not here is unprivileged and runs as is in the tests too: reading the image's
//! superblock, stat of `/dev` nodes, the pipes of the channel, compiling the seccomp
//! filter.

use crate::cgroup::{Birth, CgroupManager, Layout, Limits, PendingCgroup};
use crate::channel::ParentSide;
use crate::child::{self, Prepared};
use crate::shared_image::{ImageHold, Released};
use crate::{detached, sweep, userns, Error};
use nix::sched::CloneFlags;
use std::any::Any;
use std::ffi::CStr;
use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use twinbox_spec::NetMode;

/// A run's hold on the shared read-only mount of its image (`shared_image.rs`): where it
/// is mounted, and (for real) the hold, released by [`Syscall::release_image`].
#[derive(Debug)]
pub struct HeldImage {
    /// The image's mount point on the host.
    pub root: PathBuf,
    /// The hold; None in the tests' double.
    pub hold: Option<ImageHold>,
}

/// How the child process ended, as `wait4` told.
#[derive(Clone, Copy)]
pub struct Reaped {
    /// The wait status.
    pub status: i32,
    /// Its resource usage (the whole container: init reaps its descendants).
    pub usage: libc::rusage,
}

/// A link leased for the run but not made yet: its addresses, and what holds the lease.
/// Dropping it frees the link.
pub struct Leased {
    /// The box's address, prefix and gateway, as init gets them (resolver not yet set).
    pub config: twinbox_proto::NetConfig,
    /// The lease (for real a `hostnet::Lease`).
    pub held: Box<dyn Any>,
}

/// The link made: the veth pair between the host and the child's network namespace.
/// Dropping it deletes the host end if it is still there, then frees the lease.
pub struct Linked {
    /// The link as reports show it (`nat` false: the run sets it).
    pub info: hostnet::LinkInfo,
    /// The pair and its lease (for real a `hostnet::Veth`), held only to be dropped.
    pub _held: Box<dyn Any>,
}

/// An errno of one of the child's calls.
pub type Errno = nix::errno::Errno;

/// The privileged calls of one container run, in the order the run makes them: the
/// parent's, then the child's.
pub trait Syscall {
    /// Whether the caller is root (loop devices, mounts and cgroups need it).
    fn is_root(&self) -> bool;
    /// Whether the caller has CAP_NET_ADMIN (`--net` makes a veth pair and addresses).
    fn can_admin_network(&self) -> bool;
    /// The text of `/proc/self/mountinfo` (cgroup layout, sweep places).
    fn mountinfo(&self) -> Result<String, Error>;
    /// Starts removing the cgroups and staging directories of runs whose twinbox died,
    /// and the shared image mounts nobody holds; done when the result is finished or
    /// dropped.
    fn start_sweep(&self, mountinfo: String) -> Sweeping;
    /// Starts creating the run's cgroup with its limits (beside the caller's next steps
    /// where it can: [`PendingCgroup`]); on error nothing is left.
    fn create_cgroup(&self, layout: &Layout, name: &str, limits: Limits) -> PendingCgroup;
    /// Makes sure the directory `path` exists (with its parents).
    fn create_dir(&self, path: &Path) -> Result<(), Error>;
    /// Holds the shared read-only mount of the ext4 `image`, mounting it (loop device,
    /// ext4) if no other run of it holds one.
    fn hold_image(&self, image: &Path) -> Result<HeldImage, Error>;
    /// A detached clone of the held image mount for this run's child to attach.
    fn clone_image(&self, held: &HeldImage) -> Result<OwnedFd, Error>;
    /// Gives the hold up; the last user unmounts and waits for the loop device to clear.
    fn release_image(&self, held: HeldImage) -> Released;
    /// A detached bind of one layer directory of an OCI image (read-only, nodev, nosuid,
    /// private; `detached::layer`).
    fn bind_layer(&self, path: &Path) -> Result<OwnedFd, Error>;
    /// Refuses layers whose merged entry at one of `names` (`plan::image_mount_points`)
    /// is not a directory (`detached::check_layers_mount_points`).
    fn check_layers_mount_points(&self, layers: &[PathBuf], names: &[&str]) -> Result<(), Error>;
    /// A detached bind of the disk file `path` (nodev, nosuid, read-only when asked).
    fn bind_disk(&self, path: &Path, read_only: bool) -> Result<OwnedFd, Error>;
    /// The host's twinbox-init the box runs (found before anything is made).
    fn host_init(&self) -> Result<PathBuf, Error>;
    /// A detached read-only, private bind of the host's init (`detached::init`).
    fn bind_init(&self, path: &Path) -> Result<OwnedFd, Error>;
    /// Refuses an image whose entry at one of `names` (`plan::image_mount_points`) is not
    /// a directory (`detached::check_mount_points`).
    fn check_mount_points(&self, image: &OwnedFd, names: &[&str]) -> Result<(), Error>;
    /// Clones the child into new namespaces (`flags`), born inside `group` (or moved
    /// there at once where it cannot be); it runs `child::main(prepared)`.
    fn spawn(
        &self,
        prepared: &Prepared,
        flags: CloneFlags,
        group: &dyn CgroupManager,
        parent: &mut ParentSide,
    ) -> Result<i32, Error>;
    /// Leases this run's own range of host ids for `--userns` (held until dropped).
    fn lease_ids(&self) -> Result<userns::IdLease, Error>;
    /// Writes the child's uid/gid maps (the ids of `lease`) and idmaps the detached mounts
    /// to its namespace.
    fn map_user_namespace(
        &self,
        pid: i32,
        lease: &userns::IdLease,
        mounts: &[userns::Detached<'_>],
    ) -> Result<(), Error>;
    /// SIGKILL to the child (as PID 1 of its namespace, that ends the container).
    fn kill(&self, pid: i32);
    /// Reaps the child.
    fn wait(&self, pid: i32) -> Result<Reaped, Error>;
    /// Leases a free point-to-point link for `mode` (`--net`, `--net nat`: the host end's
    /// name and forwarding follow it); the lease dies with this process.
    fn lease_link(&self, mode: NetMode) -> Result<Leased, Error>;
    /// The name server the box should use, or why there is none.
    fn host_resolver(&self) -> hostnet::Resolver;
    /// Makes `link`'s veth pair: `eth0` in the network namespace of `pid`, the host end
    /// addressed and up. On error the lease is freed and nothing is left.
    fn create_veth(&self, link: Leased, pid: i32) -> Result<Linked, Error>;
    /// Installs (or replaces) the one NAT table (`--net nat`).
    fn apply_nat(&self) -> Result<(), Error>;

    // The child's calls, after clone. None may allocate.

    /// SIGKILL when the parent dies.
    fn set_parent_death_signal(&self) -> Result<(), Errno>;
    /// Closes a descriptor (errors ignored: it is closed either way).
    fn close(&self, fd: RawFd);
    /// uid/gid 0 of the new user namespace, no supplementary groups.
    fn become_root(&self) -> Result<(), Errno>;
    /// A new cgroup namespace, rooted at the current cgroup.
    fn unshare_cgroup(&self) -> Result<(), Errno>;
    /// `mount(2)`.
    fn mount(
        &self,
        source: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: libc::c_ulong,
        data: Option<&CStr>,
    ) -> Result<(), Errno>;
    /// A directory, mode 0755.
    fn mkdir(&self, path: &CStr) -> Result<(), Errno>;
    /// An empty file to mount onto (an existing one is fine).
    fn touch(&self, path: &CStr) -> Result<(), Errno>;
    /// A symbolic link `link` → `target`.
    fn symlink(&self, target: &CStr, link: &CStr) -> Result<(), Errno>;
    /// `move_mount(2)` of the detached mount `fd` onto `target`.
    fn move_mount(&self, fd: RawFd, target: &CStr) -> Result<(), Errno>;
    /// The `S_IFMT` bits of `path`.
    fn file_type(&self, path: &CStr) -> Result<libc::mode_t, Errno>;
    /// The UTS namespace's hostname.
    fn sethostname(&self, name: &CStr) -> Result<(), Errno>;
    /// IFF_UP on `lo` of the new network namespace.
    fn loopback_up(&self) -> Result<(), Errno>;
    /// `chdir(2)`.
    fn chdir(&self, path: &CStr) -> Result<(), Errno>;
    /// `pivot_root(2)`.
    fn pivot_root(&self, new_root: &CStr, put_old: &CStr) -> Result<(), Errno>;
    /// `umount2(path, MNT_DETACH)`.
    fn umount_detach(&self, path: &CStr) -> Result<(), Errno>;
    /// Opens `path` (close-on-exec, never as a controlling terminal).
    fn open(&self, path: &CStr, flags: libc::c_int) -> Result<RawFd, Errno>;
    /// A pty pair on the devpts whose `ptmx` is `ptmx`: the master unlocked, and its slave
    /// opened through the master (`TIOCGPTPEER`, no path lookup), both close-on-exec and
    /// neither a controlling terminal. Returns (master, slave).
    fn open_pty(&self, ptmx: &CStr) -> Result<(RawFd, RawFd), Errno>;
    /// Clears close-on-exec on `fd` (the marker pipe init inherits).
    fn keep_on_exec(&self, fd: RawFd) -> Result<(), Errno>;
    /// `dup2(2)`.
    fn dup2(&self, from: RawFd, to: RawFd) -> Result<(), Errno>;
    /// Drops `cap` from the bounding set.
    fn drop_bounding_cap(&self, cap: u32) -> Result<(), Errno>;
    /// Effective, permitted and inheritable sets to `keep` (two 32-bit words).
    fn capset(&self, keep: [u32; 2]) -> Result<(), Errno>;
    /// `setsid(2)`: a new session without a controlling terminal.
    fn new_session(&self) -> Result<(), Errno>;
    /// `PR_SET_NO_NEW_PRIVS`.
    fn no_new_privs(&self) -> Result<(), Errno>;
    /// Installs the seccomp filter on this thread.
    fn apply_seccomp(&self, filter: &seccompiler::BpfProgram) -> Result<(), Errno>;
    /// `execve(2)`; returns only on failure.
    fn exec(
        &self,
        path: &CStr,
        argv: &[*const libc::c_char],
        envp: &[*const libc::c_char],
    ) -> Errno;
}

/// The calls, made.
pub struct Real;

impl Syscall for Real {
    fn is_root(&self) -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn can_admin_network(&self) -> bool {
        // The effective set as the kernel shows it; unreadable counts as "yes", so the
        // kernel's own refusal (one line from hostnet) remains the last word.
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
                u64::from_str_radix(hex.trim(), 16).ok()
            })
            .is_none_or(|effective| effective & 1 << crate::caps::NET_ADMIN != 0)
    }

    fn mountinfo(&self) -> Result<String, Error> {
        read_proc_file(Path::new("/proc/self/mountinfo"))
            .map_err(|e| Error::os("read /proc/self/mountinfo", e))
    }

    fn start_sweep(&self, mountinfo: String) -> Sweeping {
        // On a thread of its own: the run's start does not wait for it (a sweep reads
        // every cgroup hierarchy, ~0.2 ms with nothing to remove on a PVM host), and it
        // removes only what dead owners named, never this run's (named for a live owner)
        // nor an image mount anyone holds (`shared_image.rs` locks).
        let sweep = move || sweep_now(&mountinfo);
        match std::thread::Builder::new()
            .name("twinbox-sweep".into())
            .spawn(sweep.clone())
        {
            Ok(thread) => Sweeping(Some(thread)),
            Err(e) => {
                tracing::debug!("sweep in line: no thread: {e}");
                sweep();
                Sweeping(None)
            }
        }
    }

    fn create_cgroup(&self, layout: &Layout, name: &str, limits: Limits) -> PendingCgroup {
        PendingCgroup::start(layout, name, limits)
    }

    fn create_dir(&self, path: &Path) -> Result<(), Error> {
        std::fs::create_dir_all(path)
            .map_err(|e| Error::os(format!("create {}", path.display()), e))
    }

    fn hold_image(&self, image: &Path) -> Result<HeldImage, Error> {
        let hold = ImageHold::acquire(image)?;
        Ok(HeldImage {
            root: hold.root().to_owned(),
            hold: Some(hold),
        })
    }

    fn clone_image(&self, held: &HeldImage) -> Result<OwnedFd, Error> {
        detached::clone(&held.root)
    }

    fn release_image(&self, held: HeldImage) -> Released {
        held.hold.map_or(Released::Shared, ImageHold::release)
    }

    fn bind_layer(&self, path: &Path) -> Result<OwnedFd, Error> {
        detached::layer(path)
    }

    fn check_layers_mount_points(&self, layers: &[PathBuf], names: &[&str]) -> Result<(), Error> {
        detached::check_layers_mount_points(layers, names)
    }

    fn bind_disk(&self, path: &Path, read_only: bool) -> Result<OwnedFd, Error> {
        detached::bind(path, read_only)
    }

    fn host_init(&self) -> Result<PathBuf, Error> {
        let path = twinbox_spec::artifacts::init_binary();
        // The keyed file behind `current`: a rebuild that moves the link meanwhile does
        // not change what this run binds.
        let resolved = std::fs::canonicalize(&path)
            .ok()
            .filter(|p| p.is_file())
            .ok_or(Error::NoInit(path))?;
        Ok(resolved)
    }

    fn bind_init(&self, path: &Path) -> Result<OwnedFd, Error> {
        detached::init(path)
    }

    fn check_mount_points(&self, image: &OwnedFd, names: &[&str]) -> Result<(), Error> {
        detached::check_mount_points(image, names)
    }

    fn spawn(
        &self,
        prepared: &Prepared,
        flags: CloneFlags,
        group: &dyn CgroupManager,
        parent: &mut ParentSide,
    ) -> Result<i32, Error> {
        match group.birth() {
            Ok(Birth::Thread(joined)) => {
                // Suspended until the child execs, this thread cannot release it after
                // clone: it goes released (`run::clone_flags`: nothing to admit), born
                // in its cgroup with its pids limit already set (`Joined`).
                if flags.contains(CloneFlags::CLONE_VFORK) {
                    parent.release()?;
                }
                let pid = clone_child(self, prepared, flags)?;
                if let Err(e) = joined.leave() {
                    self.kill(pid);
                    let _ = self.wait(pid);
                    return Err(e);
                }
                Ok(pid)
            }
            // clone3 without a stack cannot share memory: a plain fork.
            Ok(Birth::Into(dir)) => match clone_into(self, prepared, flags - SHARED_MEMORY, &dir) {
                Err(Errno::ENOSYS) => moved(self, prepared, flags, group),
                Err(errno) => Err(Error::os(
                    "clone the container into its cgroup",
                    std::io::Error::from_raw_os_error(errno as i32),
                )),
                Ok(pid) => Ok(pid),
            },
            Err(e) => {
                tracing::debug!("child not born in its cgroup, moved there instead: {e}");
                moved(self, prepared, flags, group)
            }
        }
    }

    fn lease_ids(&self) -> Result<userns::IdLease, Error> {
        userns::IdLease::acquire()
    }

    fn map_user_namespace(
        &self,
        pid: i32,
        lease: &userns::IdLease,
        mounts: &[userns::Detached<'_>],
    ) -> Result<(), Error> {
        userns::map(pid, lease, mounts)
    }

    fn kill(&self, pid: i32) {
        // SIGKILL to the namespace's init ends the whole namespace. ESRCH: already gone.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    fn wait(&self, pid: i32) -> Result<Reaped, Error> {
        let mut status = 0;
        // SAFETY: a zeroed rusage is a valid out-parameter.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: wait4 on our own child with valid out-pointers.
            let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            if r == pid {
                return Ok(Reaped { status, usage });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::os("wait for the container", e));
            }
        }
    }

    fn lease_link(&self, mode: NetMode) -> Result<Leased, Error> {
        let lease = hostnet::Lease::acquire(mode)?;
        Ok(Leased {
            config: lease.net_config(None),
            held: Box::new(lease),
        })
    }

    fn host_resolver(&self) -> hostnet::Resolver {
        hostnet::host_resolver()
    }

    fn create_veth(&self, link: Leased, pid: i32) -> Result<Linked, Error> {
        let lease = link
            .held
            .downcast::<hostnet::Lease>()
            .map_err(|_| Error::Setup("the run's link is not held by a hostnet lease".into()))?;
        let veth = hostnet::Veth::create(*lease, pid as u32)?;
        Ok(Linked {
            info: veth.link_info(false),
            _held: Box::new(veth),
        })
    }

    fn apply_nat(&self) -> Result<(), Error> {
        Ok(hostnet::nat::apply()?)
    }

    fn set_parent_death_signal(&self) -> Result<(), Errno> {
        // SAFETY: prctl with integer arguments.
        Errno::result(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) }).map(drop)
    }

    fn close(&self, fd: RawFd) {
        // SAFETY: closes a descriptor number the caller owns in this process.
        unsafe { libc::close(fd) };
    }

    fn become_root(&self) -> Result<(), Errno> {
        // SAFETY: plain credential calls with integer arguments and a NULL list.
        unsafe {
            Errno::result(libc::setgroups(0, std::ptr::null()))?;
            Errno::result(libc::setresgid(0, 0, 0))?;
            Errno::result(libc::setresuid(0, 0, 0)).map(drop)
        }
    }

    fn unshare_cgroup(&self) -> Result<(), Errno> {
        // SAFETY: unshare with a flag.
        Errno::result(unsafe { libc::unshare(libc::CLONE_NEWCGROUP) }).map(drop)
    }

    fn mount(
        &self,
        source: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: libc::c_ulong,
        data: Option<&CStr>,
    ) -> Result<(), Errno> {
        let ptr = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
        // SAFETY: NUL-terminated strings or NULL, as mount(2) takes them.
        Errno::result(unsafe {
            libc::mount(
                ptr(source),
                target.as_ptr(),
                ptr(fstype),
                flags,
                ptr(data).cast(),
            )
        })
        .map(drop)
    }

    fn mkdir(&self, path: &CStr) -> Result<(), Errno> {
        // SAFETY: a NUL-terminated path.
        Errno::result(unsafe { libc::mkdir(path.as_ptr(), 0o755) }).map(drop)
    }

    fn touch(&self, path: &CStr) -> Result<(), Errno> {
        // SAFETY: a NUL-terminated path; the descriptor is closed right away.
        unsafe {
            let fd = Errno::result(libc::open(
                path.as_ptr(),
                // Never through a symlink: the plan makes its files only on tmpfs of ours.
                libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                0o644,
            ))?;
            Errno::result(libc::close(fd)).map(drop)
        }
    }

    fn symlink(&self, target: &CStr, link: &CStr) -> Result<(), Errno> {
        // SAFETY: NUL-terminated paths.
        Errno::result(unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) }).map(drop)
    }

    fn move_mount(&self, fd: RawFd, target: &CStr) -> Result<(), Errno> {
        // SAFETY: move_mount of our detached mount (the fd itself is the source) onto a
        // NUL-terminated path.
        Errno::result(unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                fd,
                c"".as_ptr(),
                libc::AT_FDCWD,
                target.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            )
        })
        .map(drop)
    }

    fn file_type(&self, path: &CStr) -> Result<libc::mode_t, Errno> {
        // SAFETY: stat into a zeroed struct on the stack.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            Errno::result(libc::stat(path.as_ptr(), &mut st))?;
            Ok(st.st_mode & libc::S_IFMT)
        }
    }

    fn sethostname(&self, name: &CStr) -> Result<(), Errno> {
        // SAFETY: the name's bytes and their length.
        Errno::result(unsafe { libc::sethostname(name.as_ptr(), name.to_bytes().len()) }).map(drop)
    }

    fn loopback_up(&self) -> Result<(), Errno> {
        // SAFETY: a datagram socket, an ifreq on the stack, SIOCGIFFLAGS/SIOCSIFFLAGS on
        // it, the socket closed on every path.
        unsafe {
            let sock = Errno::result(libc::socket(
                libc::AF_INET,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                0,
            ))?;
            let mut req: libc::ifreq = std::mem::zeroed();
            for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
                *d = *s as libc::c_char;
            }
            let result =
                Errno::result(libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req)).and_then(|_| {
                    req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
                    Errno::result(libc::ioctl(sock, libc::SIOCSIFFLAGS, &req))
                });
            libc::close(sock);
            result.map(drop)
        }
    }

    fn chdir(&self, path: &CStr) -> Result<(), Errno> {
        // SAFETY: a NUL-terminated path.
        Errno::result(unsafe { libc::chdir(path.as_ptr()) }).map(drop)
    }

    fn pivot_root(&self, new_root: &CStr, put_old: &CStr) -> Result<(), Errno> {
        // SAFETY: NUL-terminated paths.
        Errno::result(unsafe {
            libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr())
        })
        .map(drop)
    }

    fn umount_detach(&self, path: &CStr) -> Result<(), Errno> {
        // SAFETY: a NUL-terminated path.
        Errno::result(unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) }).map(drop)
    }

    fn open(&self, path: &CStr, flags: libc::c_int) -> Result<RawFd, Errno> {
        // SAFETY: a NUL-terminated path; the descriptor is the caller's.
        Errno::result(unsafe {
            libc::open(path.as_ptr(), flags | libc::O_CLOEXEC | libc::O_NOCTTY)
        })
    }

    fn open_pty(&self, ptmx: &CStr) -> Result<(RawFd, RawFd), Errno> {
        let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
        // SAFETY: a NUL-terminated path; TIOCSPTLCK reads an int of ours, TIOCGPTPEER
        // takes open flags; the master is closed again if the slave cannot be had.
        unsafe {
            let master = Errno::result(libc::open(ptmx.as_ptr(), flags))?;
            let unlock: libc::c_int = 0;
            let slave = Errno::result(libc::ioctl(master, libc::TIOCSPTLCK, &unlock))
                .and_then(|_| Errno::result(libc::ioctl(master, libc::TIOCGPTPEER, flags)));
            match slave {
                Ok(slave) => Ok((master, slave)),
                Err(errno) => {
                    libc::close(master);
                    Err(errno)
                }
            }
        }
    }

    fn keep_on_exec(&self, fd: RawFd) -> Result<(), Errno> {
        // SAFETY: F_SETFD on a descriptor of ours.
        Errno::result(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }).map(drop)
    }

    fn dup2(&self, from: RawFd, to: RawFd) -> Result<(), Errno> {
        // SAFETY: dup2 of descriptors of ours.
        Errno::result(unsafe { libc::dup2(from, to) }).map(drop)
    }

    fn drop_bounding_cap(&self, cap: u32) -> Result<(), Errno> {
        // SAFETY: prctl with integer arguments.
        Errno::result(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) })
            .map(drop)
    }

    fn capset(&self, keep: [u32; 2]) -> Result<(), Errno> {
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = keep.map(|word| CapData {
            effective: word,
            permitted: word,
            inheritable: word,
        });
        // SAFETY: capset with a v3 header and its two data words, on the stack.
        Errno::result(unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) }).map(drop)
    }

    fn new_session(&self) -> Result<(), Errno> {
        // SAFETY: setsid takes no arguments.
        Errno::result(unsafe { libc::setsid() }).map(drop)
    }

    fn no_new_privs(&self) -> Result<(), Errno> {
        // SAFETY: prctl with integer arguments.
        Errno::result(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }).map(drop)
    }

    fn apply_seccomp(&self, filter: &seccompiler::BpfProgram) -> Result<(), Errno> {
        // apply_filter neither allocates nor parses: it hands the program to the kernel.
        seccompiler::apply_filter(filter).map_err(|_| Errno::last())
    }

    fn exec(
        &self,
        path: &CStr,
        argv: &[*const libc::c_char],
        envp: &[*const libc::c_char],
    ) -> Errno {
        // SAFETY: NULL-terminated argv and envp arrays of NUL-terminated strings that
        // `Prepared` keeps alive.
        unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        Errno::last()
    }
}

/// `move_mount(2)`: the source is the fd itself.
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `clone` of the child, running `child::main(prepared)` on a new stack: its own copy of
/// this process, or with [`SHARED_MEMORY`] this process's memory while it is suspended.
fn clone_child(sys: &Real, prepared: &Prepared, flags: CloneFlags) -> Result<i32, Error> {
    // Sharing memory only with the parent suspended (CLONE_VFORK): nothing else may run
    // on this memory beside the child.
    let flags = if flags.contains(CloneFlags::CLONE_VFORK) {
        flags
    } else {
        flags - SHARED_MEMORY
    };
    // Without CLONE_VM the child runs on its own copy of this stack; with CLONE_VFORK
    // clone returns once the child has exec'd or exited. Either way ours may go as soon
    // as clone returns.
    let mut stack = vec![0u8; 256 * 1024];
    // SAFETY: the child only runs `child::main`, which walks pre-allocated data and
    // makes raw system calls until it execs or exits; with SHARED_MEMORY this thread is
    // suspended meanwhile (errno, the one thread-local the child writes, is ours again
    // after), and the child sets no credentials there (glibc's set*id would signal this
    // process's other threads, see `run::clone_flags`).
    let pid = unsafe {
        nix::sched::clone(
            Box::new(|| child::main(prepared, sys)),
            &mut stack,
            flags,
            Some(libc::SIGCHLD),
        )
    }
    .map_err(|e| {
        Error::os(
            "clone the container",
            std::io::Error::from_raw_os_error(e as i32),
        )
    })?;
    Ok(pid.as_raw())
}

/// The child cloned outside its cgroup and moved in: the slow way (moving another task
/// waits for an RCU grace period), where it cannot be born there.
fn moved(
    sys: &Real,
    prepared: &Prepared,
    flags: CloneFlags,
    group: &dyn CgroupManager,
) -> Result<i32, Error> {
    // Not with the parent suspended until exec: the child must be moved before it sets
    // up (its cgroup namespace is rooted where it is).
    let pid = clone_child(sys, prepared, flags - SHARED_MEMORY)?;
    if let Err(e) = group.add(pid) {
        sys.kill(pid);
        let _ = sys.wait(pid);
        return Err(e);
    }
    Ok(pid)
}

/// A `/proc` (or cgroupfs) file read whole into a buffer sized for it up front: such files
/// report size 0, so `fs::read_to_string` starts at 32 bytes and doubles, one read(2) per
/// step (nine for a host's mountinfo).
pub(crate) fn read_proc_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::with_capacity(16 * 1024);
    std::fs::File::open(path)?.read_to_string(&mut text)?;
    Ok(text)
}

/// Clone flags of a child that runs on the parent's memory, the parent suspended until the
/// child execs init or exits (what `posix_spawn` does). No copy of the parent's page
/// tables and no copy-on-write faults afterwards: for a large caller (the bench, which
/// runs the container in its own process) the clone cost 0.6–0.7 ms instead of ~0.45
/// (PVM host). Only for a child born in its cgroup that needs no admission by the parent
/// (`run::clone_flags`).
pub(crate) const SHARED_MEMORY: CloneFlags = CloneFlags::CLONE_VM.union(CloneFlags::CLONE_VFORK);

/// `struct clone_args` of clone3(2), up to `cgroup` (Linux 5.7).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// clone3's flag: the child starts in the cgroup2 directory `clone_args.cgroup` names.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// clone3 with `CLONE_INTO_CGROUP`: the child is born in the cgroup2 directory `dir`. Like
/// fork, the child returns on a copy of this stack and runs `child::main(prepared)`.
fn clone_into(
    sys: &Real,
    prepared: &Prepared,
    flags: CloneFlags,
    dir: &OwnedFd,
) -> Result<i32, Errno> {
    use std::os::fd::AsRawFd;
    let mut args = CloneArgs {
        flags: flags.bits() as u64 | CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: dir.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM and without a stack is a fork: the child has its own
    // copy of this process and returns here with 0.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match pid {
        0 => {
            // A panic must not unwind into this copy of the parent's frames: their drops
            // would release the parent's leases (userns ids, links) from here. None is
            // known (the child's code does not panic), so this only guards.
            let status = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                child::main(prepared, sys)
            }))
            .unwrap_or(125);
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(status as i32) }
        }
        -1 => Err(Errno::last()),
        pid => Ok(pid as i32),
    }
}

/// The sweep of [`Syscall::start_sweep`], on the calling thread.
fn sweep_now(mountinfo: &str) {
    let swept = sweep::sweep(&sweep::Places::host(mountinfo));
    for path in &swept.removed {
        tracing::info!(path = %path.display(), "removed a leftover of a killed run");
    }
    for failure in &swept.failed {
        tracing::warn!("leftover of a killed run: {failure}");
    }
    for line in crate::shared_image::sweep() {
        tracing::info!("{line}");
    }
}

/// A sweep under way (or done), finished before the run counts itself torn down.
pub struct Sweeping(pub(crate) Option<std::thread::JoinHandle<()>>);

impl Sweeping {
    /// Waits for the sweep to end (as dropping it does on an early return).
    pub fn finish(self) {}
}

impl Drop for Sweeping {
    fn drop(&mut self) {
        if let Some(thread) = self.0.take() {
            // A panic in the sweep is its own: the run goes on.
            let _ = thread.join();
        }
    }
}
