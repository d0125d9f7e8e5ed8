//! The tests' [`Syscall`] double: writes every call to a log, fails the call it is told
//! to, and plays a scripted child (reports on the channel, markers, output) instead of
//! cloning one. The orchestration of `run.rs` runs on it unprivileged.

use crate::cgroup::{CgroupManager, Layout, Limits, PendingCgroup, Stats};
use crate::child::Prepared;
use crate::shared_image::Released;
use crate::syscall::{Errno, HeldImage, Leased, Linked, Reaped, Syscall};
use crate::{userns, Error};
use nix::sched::CloneFlags;
use std::cell::RefCell;
use std::ffi::CStr;
use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use twinbox_proto::Marker;
use twinbox_spec::NetMode;

/// What the pretend child does once "cloned".
#[derive(Clone, Debug)]
pub enum ChildScript {
    /// Reports ready, sends these markers and this output, then ends with `status`
    /// (a wait status).
    Runs {
        markers: Vec<Marker>,
        output: &'static str,
        status: i32,
    },
    /// Reports that step `step` failed with `errno`, then exits 125.
    FailsAt { step: u32, errno: i32 },
    /// With `-t`: sends its terminal's master, then fails like `FailsAt`.
    FailsAfterTerminal { step: u32, errno: i32 },
    /// Ends (killed by SIGKILL) without a word on the channel.
    Vanishes,
}

/// The shared call log.
pub type Log = Rc<RefCell<Vec<String>>>;

/// The double.
pub struct Recording {
    /// Every call, in order ("<call> FAILED" for the one made to fail).
    pub log: Log,
    /// The call that fails (by its log name), if any.
    pub fail: Option<&'static str>,
    /// The pretend child.
    pub child: ChildScript,
    /// What `is_root` answers.
    pub root: bool,
    /// What `can_admin_network` answers.
    pub net_admin: bool,
    /// What `host_resolver` answers.
    pub resolver: hostnet::Resolver,
    /// What the pretend child was given: its job and capability words, taken at spawn.
    pub spawned: RefCell<Option<Spawned>>,
    /// Descriptors the child's pretend `open`s returned (real, so they can be sent).
    pub opened: RefCell<Vec<OwnedFd>>,
}

/// What `spawn` saw in the prepared child.
#[derive(Clone, Debug)]
pub struct Spawned {
    /// The job init would get, decoded from TWINBOX_JOB.
    pub job: twinbox_proto::Job,
    /// The capset words.
    pub caps_keep: [u32; 2],
    /// The capabilities dropped from the bounding set.
    pub caps_to_drop: Vec<u32>,
    /// Whether the child makes a pty.
    pub tty: bool,
    /// Whether the child puts /dev/null on stdin.
    pub null_stdin: bool,
    /// The options of the plan's overlay mount (its lower directories).
    pub overlay: String,
    /// How many detached mounts the plan attaches (root, init, disks).
    pub attaches: usize,
}

/// The link the double leases: link 3 of the default pool.
pub const LINK: &str = "tb3";

/// Logs `what` when dropped: stands for a resource whose release the tests follow.
struct DropLog {
    log: Log,
    what: &'static str,
}

impl Drop for DropLog {
    fn drop(&mut self) {
        self.log.borrow_mut().push(self.what.into());
    }
}

/// A hybrid host's mountinfo: v1 cpu, memory, pids, devices.
pub const HYBRID: &str = "\
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
";

/// Where the double says the host's init is.
pub const HOST_INIT: &str = "/cache/init/0123456789abcdef/twinbox-init";

/// The pretend child's pid.
pub const PID: i32 = 4242;

impl Recording {
    /// A double whose child runs `child`, failing nothing.
    pub fn new(child: ChildScript) -> Self {
        Self {
            log: Rc::default(),
            fail: None,
            child,
            root: true,
            net_admin: true,
            resolver: hostnet::Resolver::Reachable([192, 0, 2, 53].into()),
            spawned: RefCell::new(None),
            opened: RefCell::new(Vec::new()),
        }
    }

    /// The calls made so far.
    pub fn calls(&self) -> Vec<String> {
        self.log.borrow().clone()
    }

    /// Keeps a descriptor the pretend kernel handed out (closed with the double); its
    /// number for the child.
    fn keep(&self, fd: OwnedFd) -> RawFd {
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        self.opened.borrow_mut().push(fd);
        raw
    }

    /// Logs `call`; Err if it is the one to fail.
    fn call(&self, call: &str) -> Result<(), Error> {
        record(&self.log, self.fail, call)
    }

    /// Logs a call of the child; EPERM if it is the one to fail.
    fn child_call(&self, call: String) -> Result<(), Errno> {
        self.call(&call).map_err(|_| Errno::EPERM)
    }
}

fn show(s: &CStr) -> std::borrow::Cow<'_, str> {
    s.to_string_lossy()
}

fn record(log: &Log, fail: Option<&str>, call: &str) -> Result<(), Error> {
    if fail == Some(call) {
        log.borrow_mut().push(format!("{call} FAILED"));
        return Err(Error::Setup(format!("{call} failed (test double)")));
    }
    log.borrow_mut().push(call.to_owned());
    Ok(())
}

fn write_all(fd: RawFd, bytes: &[u8]) {
    // SAFETY: writes a buffer of ours to a pipe of the test (small: never blocks).
    let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
    assert_eq!(n, bytes.len() as isize, "pretend child's write");
}

/// The cgroup of the double: logs membership and removal.
struct FakeCgroup {
    log: Log,
    fail: Option<&'static str>,
    destroyed: bool,
}

impl CgroupManager for FakeCgroup {
    fn add(&self, pid: i32) -> Result<(), Error> {
        assert_eq!(pid, PID);
        record(&self.log, self.fail, "cgroup add")
    }

    fn birth(&self) -> Result<crate::cgroup::Birth, Error> {
        // The double's spawn stands for a child born in its cgroup; never asked.
        Err(Error::Setup(
            "the recording double has no real cgroup".into(),
        ))
    }

    fn stats(&self) -> Stats {
        Stats::default()
    }

    fn destroy(&mut self) -> Result<(), Error> {
        if !self.destroyed {
            self.destroyed = true;
            self.log.borrow_mut().push("cgroup destroy".into());
        }
        Ok(())
    }
}

impl Drop for FakeCgroup {
    fn drop(&mut self) {
        let _ = self.destroy();
    }
}

impl Syscall for Recording {
    fn is_root(&self) -> bool {
        self.root
    }

    fn can_admin_network(&self) -> bool {
        self.net_admin
    }

    fn mountinfo(&self) -> Result<String, Error> {
        Ok(HYBRID.into())
    }

    fn start_sweep(&self, _mountinfo: String) -> crate::syscall::Sweeping {
        let _ = self.call("sweep");
        crate::syscall::Sweeping(None)
    }

    fn create_cgroup(&self, layout: &Layout, _name: &str, limits: Limits) -> PendingCgroup {
        assert!(matches!(layout, Layout::V1 { .. }));
        assert!(!limits.devices.is_empty(), "no device allowlist");
        PendingCgroup::made(self.call("create cgroup").map(|()| {
            Box::new(FakeCgroup {
                log: self.log.clone(),
                fail: self.fail,
                destroyed: false,
            }) as Box<dyn CgroupManager>
        }))
    }

    fn create_dir(&self, path: &Path) -> Result<(), Error> {
        assert!(path.starts_with(crate::sweep::STAGING_ROOT), "{path:?}");
        self.call("create staging dir")
    }

    fn hold_image(&self, _image: &Path) -> Result<HeldImage, Error> {
        self.call("hold image")?;
        Ok(HeldImage {
            root: PathBuf::from("/run/twinbox/images/fake/root"),
            hold: None,
        })
    }

    fn clone_image(&self, _held: &HeldImage) -> Result<OwnedFd, Error> {
        self.call("clone image")?;
        Ok(std::fs::File::open("/dev/null").unwrap().into())
    }

    fn release_image(&self, _held: HeldImage) -> Released {
        let _ = self.call("give up image");
        Released::Freed
    }

    fn bind_layer(&self, path: &Path) -> Result<OwnedFd, Error> {
        self.call(&format!("bind layer {}", path.display()))?;
        Ok(std::fs::File::open("/dev/null").unwrap().into())
    }

    fn check_layers_mount_points(&self, layers: &[PathBuf], names: &[&str]) -> Result<(), Error> {
        self.call(&format!(
            "check mount points {} ({} layers)",
            names.join(","),
            layers.len()
        ))
    }

    fn bind_disk(&self, path: &Path, read_only: bool) -> Result<OwnedFd, Error> {
        self.call(&format!("bind disk {} ro={read_only}", path.display()))?;
        Ok(std::fs::File::open("/dev/null").unwrap().into())
    }

    fn host_init(&self) -> Result<PathBuf, Error> {
        match self.fail {
            Some("host init") => Err(Error::NoInit(PathBuf::from(HOST_INIT))),
            _ => Ok(PathBuf::from(HOST_INIT)),
        }
    }

    fn bind_init(&self, path: &Path) -> Result<OwnedFd, Error> {
        assert_eq!(path, Path::new(HOST_INIT));
        self.call("bind init")?;
        Ok(std::fs::File::open("/dev/null").unwrap().into())
    }

    fn check_mount_points(&self, _image: &OwnedFd, names: &[&str]) -> Result<(), Error> {
        self.call(&format!("check mount points {}", names.join(",")))
    }

    fn spawn(
        &self,
        prepared: &Prepared,
        flags: CloneFlags,
        _group: &dyn CgroupManager,
        _parent: &mut crate::channel::ParentSide,
    ) -> Result<i32, Error> {
        let userns = flags.contains(CloneFlags::CLONE_NEWUSER);
        self.call(if userns { "spawn userns" } else { "spawn" })?;
        assert!(
            prepared.seccomp.is_some(),
            "the child must get a seccomp filter"
        );
        let token = prepared
            .env_storage
            .iter()
            .find_map(|e| e.to_str().ok()?.strip_prefix("TWINBOX_JOB="))
            .expect("init's environment carries the job");
        *self.spawned.borrow_mut() = Some(Spawned {
            job: twinbox_proto::Job::decode(token).expect("a valid job"),
            caps_keep: prepared.caps_keep,
            caps_to_drop: prepared.caps_to_drop.clone(),
            tty: prepared.tty,
            null_stdin: prepared.null_stdin,
            overlay: prepared
                .plan
                .steps
                .iter()
                .find_map(|step| match step {
                    crate::plan::Step::Mount { fstype, data, .. }
                        if fstype.to_str() == Ok("overlay") =>
                    {
                        Some(data.to_string_lossy().into_owned())
                    }
                    _ => None,
                })
                .expect("the plan mounts an overlay"),
            attaches: prepared
                .plan
                .steps
                .iter()
                .filter(|step| matches!(step, crate::plan::Step::Attach { .. }))
                .count(),
        });
        // With -t the real child sends its pty's master before anything else it reports;
        // here the slave goes at once, so the parent's relay sees the hangup of a box that
        // has ended.
        let sends_terminal = prepared.tty
            && matches!(
                self.child,
                ChildScript::Runs { .. } | ChildScript::FailsAfterTerminal { .. }
            );
        if sends_terminal {
            let pty = nix::pty::openpty(None, None).expect("openpty");
            prepared
                .channel
                .send_terminal(std::os::fd::AsRawFd::as_raw_fd(&pty.master))
                .expect("send the terminal");
        }
        match &self.child {
            ChildScript::Runs {
                markers, output, ..
            } => {
                prepared.channel.ready();
                for marker in markers {
                    write_all(prepared.marker_fd, &marker.encode().to_le_bytes());
                }
                if let Some(fd) = prepared.output_fd {
                    write_all(fd, output.as_bytes());
                }
            }
            ChildScript::FailsAt { step, errno }
            | ChildScript::FailsAfterTerminal { step, errno } => {
                prepared.channel.failed(*step, *errno)
            }
            ChildScript::Vanishes => {}
        }
        Ok(PID)
    }

    fn lease_ids(&self) -> Result<userns::IdLease, Error> {
        self.call("lease ids")?;
        Ok(userns::IdLease::unheld(userns::BLOCK_START))
    }

    fn map_user_namespace(
        &self,
        pid: i32,
        _lease: &userns::IdLease,
        mounts: &[userns::Detached<'_>],
    ) -> Result<(), Error> {
        assert_eq!(pid, PID);
        self.call(&format!("map user namespace ({} mounts)", mounts.len()))
    }

    fn kill(&self, pid: i32) {
        assert_eq!(pid, PID);
        let _ = self.call("kill");
    }

    fn wait(&self, pid: i32) -> Result<Reaped, Error> {
        assert_eq!(pid, PID);
        self.call("wait")?;
        let status = match &self.child {
            ChildScript::Runs { status, .. } => *status,
            ChildScript::FailsAt { .. } | ChildScript::FailsAfterTerminal { .. } => 125 << 8,
            ChildScript::Vanishes => libc::SIGKILL,
        };
        Ok(Reaped {
            status,
            // SAFETY: an all-zero rusage is a valid value.
            usage: unsafe { std::mem::zeroed() },
        })
    }

    fn lease_link(&self, mode: NetMode) -> Result<Leased, Error> {
        self.call(match mode {
            NetMode::Link => "lease link",
            NetMode::Nat => "lease nat link",
        })?;
        Ok(Leased {
            config: twinbox_proto::NetConfig {
                address: [10, 201, 0, 14].into(),
                prefix_len: 30,
                gateway: [10, 201, 0, 13].into(),
                resolver: None,
            },
            held: Box::new(DropLog {
                log: self.log.clone(),
                what: "release lease",
            }),
        })
    }

    fn host_resolver(&self) -> hostnet::Resolver {
        self.resolver.clone()
    }

    fn create_veth(&self, link: Leased, pid: i32) -> Result<Linked, Error> {
        assert_eq!(pid, PID);
        // On failure `link` drops here: the lease is released, as for real.
        self.call(&format!("create veth {LINK}"))?;
        Ok(Linked {
            info: hostnet::LinkInfo {
                host_interface: LINK.into(),
                host_address: link.config.gateway,
                box_address: link.config.address,
                prefix_len: link.config.prefix_len,
                mac: None,
                nat: false,
            },
            // A tuple drops in order: the pair goes before its lease.
            _held: Box::new((
                DropLog {
                    log: self.log.clone(),
                    what: "delete veth",
                },
                link.held,
            )),
        })
    }

    fn apply_nat(&self) -> Result<(), Error> {
        self.call("apply nat")
    }

    fn set_parent_death_signal(&self) -> Result<(), Errno> {
        self.child_call("pdeathsig".into())
    }

    fn close(&self, fd: RawFd) {
        // Logged only: the descriptors are the test's own.
        let _ = self.child_call(format!("close {fd}"));
    }

    fn become_root(&self) -> Result<(), Errno> {
        self.child_call("become root".into())
    }

    fn unshare_cgroup(&self) -> Result<(), Errno> {
        self.child_call("unshare cgroup".into())
    }

    fn mount(
        &self,
        source: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: libc::c_ulong,
        _data: Option<&CStr>,
    ) -> Result<(), Errno> {
        let or_none = |s: Option<&CStr>| s.map_or("-".into(), |s| show(s).into_owned());
        let ro = if flags & libc::MS_RDONLY != 0 {
            " ro"
        } else {
            ""
        };
        self.child_call(format!(
            "mount {} on {} ({}){ro}",
            or_none(source),
            show(target),
            or_none(fstype)
        ))
    }

    fn mkdir(&self, path: &CStr) -> Result<(), Errno> {
        self.child_call(format!("mkdir {}", show(path)))
    }

    fn touch(&self, path: &CStr) -> Result<(), Errno> {
        self.child_call(format!("touch {}", show(path)))
    }

    fn symlink(&self, target: &CStr, link: &CStr) -> Result<(), Errno> {
        self.child_call(format!("symlink {} -> {}", show(link), show(target)))
    }

    fn move_mount(&self, _fd: RawFd, target: &CStr) -> Result<(), Errno> {
        self.child_call(format!("move_mount {}", show(target)))
    }

    fn file_type(&self, path: &CStr) -> Result<libc::mode_t, Errno> {
        // This pretend kernel has no /proc/kcore; acpi and firmware are directories.
        let path = show(path);
        if path.ends_with("/proc/kcore") {
            Err(Errno::ENOENT)
        } else if path.ends_with("/proc/acpi") || path.ends_with("/sys/firmware") {
            Ok(libc::S_IFDIR)
        } else {
            Ok(libc::S_IFREG)
        }
    }

    fn sethostname(&self, name: &CStr) -> Result<(), Errno> {
        self.child_call(format!("sethostname {}", show(name)))
    }

    fn loopback_up(&self) -> Result<(), Errno> {
        self.child_call("lo up".into())
    }

    fn chdir(&self, path: &CStr) -> Result<(), Errno> {
        self.child_call(format!("chdir {}", show(path)))
    }

    fn pivot_root(&self, new_root: &CStr, put_old: &CStr) -> Result<(), Errno> {
        self.child_call(format!("pivot_root {} {}", show(new_root), show(put_old)))
    }

    fn umount_detach(&self, path: &CStr) -> Result<(), Errno> {
        self.child_call(format!("umount -l {}", show(path)))
    }

    fn open(&self, path: &CStr, _flags: libc::c_int) -> Result<RawFd, Errno> {
        self.child_call(format!("open {}", show(path)))?;
        Ok(self.keep(std::fs::File::open("/dev/null").unwrap().into()))
    }

    fn open_pty(&self, ptmx: &CStr) -> Result<(RawFd, RawFd), Errno> {
        self.child_call(format!("open pty {}", show(ptmx)))?;
        let pty = nix::pty::openpty(None, None).expect("openpty");
        Ok((self.keep(pty.master), self.keep(pty.slave)))
    }

    fn keep_on_exec(&self, _fd: RawFd) -> Result<(), Errno> {
        self.child_call("keep marker fd".into())
    }

    fn dup2(&self, _from: RawFd, to: RawFd) -> Result<(), Errno> {
        self.child_call(format!("dup2 to {to}"))
    }

    fn drop_bounding_cap(&self, cap: u32) -> Result<(), Errno> {
        // One line for all of them: the count is what matters.
        let mut log = self.log.borrow_mut();
        match log.last_mut() {
            Some(last) if last.starts_with("drop caps") => *last = format!("drop caps ..{cap}"),
            _ => log.push(format!("drop caps ..{cap}")),
        }
        Ok(())
    }

    fn capset(&self, keep: [u32; 2]) -> Result<(), Errno> {
        self.child_call(format!("capset {:#x} {:#x}", keep[0], keep[1]))
    }

    fn new_session(&self) -> Result<(), Errno> {
        self.child_call("setsid".into())
    }

    fn no_new_privs(&self) -> Result<(), Errno> {
        self.child_call("no_new_privs".into())
    }

    fn apply_seccomp(&self, filter: &seccompiler::BpfProgram) -> Result<(), Errno> {
        assert!(!filter.is_empty());
        self.child_call("seccomp".into())
    }

    fn exec(
        &self,
        path: &CStr,
        argv: &[*const libc::c_char],
        envp: &[*const libc::c_char],
    ) -> Errno {
        assert!(
            argv.last().is_some_and(|p| p.is_null()),
            "argv ends in NULL"
        );
        assert!(
            envp.last().is_some_and(|p| p.is_null()),
            "envp ends in NULL"
        );
        let _ = self.child_call(format!("exec {}", show(path)));
        // A pretend exec cannot replace the test: it "fails" like a missing init.
        Errno::ENOENT
    }
}
