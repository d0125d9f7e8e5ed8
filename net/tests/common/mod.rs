//! Helpers for hostnet's root tests: a network namespace of the test's own, commands
//! run inside it, host snapshots for leak checks, and a forked holder to SIGKILL.
//! Traffic only ever goes to addresses of the test's own links.

#![allow(dead_code)] // each test file uses a different subset

use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, pipe, ForkResult, Pid};

/// Fail (never skip) when the test is not root: it needs CAP_NET_ADMIN.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (CAP_NET_ADMIN, netns): run it as root under flock /tmp/twinbox-itest.lock"
    );
}

/// A process sitting in a fresh network namespace, killed on drop.
pub struct Netns {
    child: Child,
}

impl Netns {
    /// `unshare -n sleep 600`: the namespace lives as long as that process.
    pub fn new() -> Self {
        let child = Command::new("unshare")
            .args(["--net", "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn `unshare --net sleep` (util-linux)");
        let netns = Self { child };
        // unshare execs sleep only after the namespace exists: wait until /proc says so.
        let host = std::fs::read_link("/proc/self/ns/net").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let theirs = std::fs::read_link(format!("/proc/{}/ns/net", netns.pid()));
            if matches!(&theirs, Ok(link) if *link != host) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "unshare --net never entered a new namespace"
            );
            thread::sleep(Duration::from_millis(5));
        }
        netns
    }

    /// The pid whose namespace the box end goes into.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Run `ip ARGS` inside the namespace; panic with its stderr on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let pid = self.pid().to_string();
        let mut full = vec!["-t", &pid, "-n", "ip"];
        full.extend_from_slice(args);
        run("nsenter", &full)
    }

    /// Configure the box end the way init will: address, up, default route via the host.
    pub fn configure_box(&self, address: Ipv4Addr, gateway: Ipv4Addr) {
        self.ip(&["link", "set", "lo", "up"]);
        self.ip(&["addr", "add", &format!("{address}/30"), "dev", "eth0"]);
        self.ip(&["link", "set", "eth0", "up"]);
        self.ip(&["route", "add", "default", "via", &gateway.to_string()]);
    }

    /// Run `f` on a thread that has joined the namespace (setns is per thread).
    pub fn run_inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = File::open(format!("/proc/{}/ns/net", self.pid())).expect("open the netns");
        thread::spawn(move || {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns into the test's netns");
            f()
        })
        .join()
        .expect("thread inside the netns panicked")
    }

    /// Kill the namespace's only process, which ends the namespace.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run a command; its stdout, or a panic naming the command and its stderr.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `ip -o link` and `ip -o addr` of the host, for leak checks.
pub fn host_links() -> String {
    run("ip", &["-o", "link"])
}

/// `ip -o addr` of the host.
pub fn host_addresses() -> String {
    run("ip", &["-o", "addr"])
}

/// Whether an interface called exactly `name` is on the host.
pub fn link_exists(name: &str) -> bool {
    host_links().lines().any(|line| {
        line.split(':')
            .nth(1)
            .map(|field| field.trim().split('@').next() == Some(name))
            .unwrap_or(false)
    })
}

/// Whether `address` is on any host interface.
pub fn address_on_host(address: Ipv4Addr) -> bool {
    let needle = format!(" {address}/");
    host_addresses().lines().any(|line| line.contains(&needle))
}

/// Wait up to 5 s for `cond` (the kernel tears links down asynchronously after a netns dies).
pub fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// `busybox ping -c 1` in this thread's namespace; true when a reply came.
pub fn ping(address: Ipv4Addr) -> bool {
    Command::new("busybox")
        .args(["ping", "-c", "1", "-W", "2", &address.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("busybox (for ping) is needed by this test")
        .success()
}

/// A start line for holders: children wait on it so they race each other for real.
pub struct Gate {
    read: File,
    write: File,
}

impl Gate {
    /// A closed gate.
    pub fn new() -> Self {
        let (read, write) = pipe().unwrap();
        Self {
            read: File::from(read),
            write: File::from(write),
        }
    }

    /// Let `n` waiting holders go at once.
    pub fn open(mut self, n: usize) {
        self.write.write_all(&vec![1u8; n]).unwrap();
    }
}

/// A forked child that runs `setup` (which returns a u32 to report, e.g. a lease index,
/// and keeps whatever it made alive by leaking it), reports, then waits to be killed.
pub struct Holder {
    pid: Pid,
    reader: Option<File>,
    /// What `setup` reported, or the error it printed (after [`Holder::wait_report`]).
    pub report: Result<u32, String>,
}

impl Holder {
    /// Fork, run `setup` in the child, and wait for its report.
    pub fn spawn(setup: impl FnOnce() -> Result<u32, String>) -> Self {
        let mut holder = Self::start(None, setup);
        holder.wait_report();
        holder
    }

    /// Fork and run `setup` in the child once `gate` opens; read the report later.
    pub fn start(gate: Option<&Gate>, setup: impl FnOnce() -> Result<u32, String>) -> Self {
        let (read_end, write_end) = pipe().unwrap();
        let (reader, mut writer) = (File::from(read_end), File::from(write_end));
        // SAFETY: the tests run with --test-threads=1; the child runs `setup`, writes to
        // a pipe and sleeps until killed, never returning into the harness.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                drop(reader);
                if let Some(gate) = gate {
                    let mut byte = [0u8; 1];
                    let _ = (&gate.read).read(&mut byte);
                }
                let message = match setup() {
                    Ok(value) => format!("ok {value}"),
                    Err(error) => format!("err {error}"),
                };
                let _ = writer.write_all(message.as_bytes());
                drop(writer);
                loop {
                    thread::sleep(Duration::from_secs(60));
                }
            }
            ForkResult::Parent { child } => Self {
                pid: child,
                reader: Some(reader),
                report: Err("not reported yet".into()),
            },
        }
    }

    /// Read what the child reported (EOF when it closed its end).
    pub fn wait_report(&mut self) {
        let Some(mut reader) = self.reader.take() else {
            return;
        };
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        self.report = match text.split_once(' ') {
            Some(("ok", value)) => Ok(value.parse().unwrap()),
            Some(("err", error)) => Err(error.to_string()),
            _ => Err(format!("holder died before reporting: {text:?}")),
        };
    }

    /// SIGKILL the holder and reap it.
    pub fn sigkill(self) {
        kill(self.pid, Signal::SIGKILL).unwrap();
        waitpid(self.pid, None).unwrap();
    }
}

/// Lock files under /run/twinbox/net that nobody holds, after one release has swept:
/// a leftover lease. (Files that are held belong to live runs and are not ours to judge.)
pub fn unheld_lock_files_after_a_sweep() -> Vec<String> {
    // Acquiring and dropping a lease runs the release sweep.
    drop(hostnet::Lease::acquire(hostnet::NetMode::Link).expect("lease for the sweep"));
    let Ok(entries) = std::fs::read_dir(hostnet::lease::LOCK_DIR) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| {
            let Ok(file) = File::open(entry.path()) else {
                return false;
            };
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok()
        })
        .map(|entry| entry.path().display().to_string())
        .collect()
}

/// No lease lock file left unheld after a sweep (see [`unheld_lock_files_after_a_sweep`]).
pub fn assert_no_lease_files_left() {
    let left = unheld_lock_files_after_a_sweep();
    assert!(left.is_empty(), "lease lock files left: {left:?}");
}

/// After the holder of link `index` (host interface `name`) was SIGKILLed: the interface
/// goes, the lock died with the holder (the same index is free again), its address is
/// not on the host and no lease file is left.
pub fn assert_link_freed_after_sigkill(name: &str, index: u32) {
    eventually(&format!("{name} gone after SIGKILL"), || !link_exists(name));
    let again = hostnet::Lease::acquire(hostnet::NetMode::Link).expect("lease after SIGKILL");
    assert_eq!(
        again.index(),
        index,
        "the killed holder's link is still reserved"
    );
    assert!(
        !address_on_host(again.host_address()),
        "address left after SIGKILL"
    );
    drop(again);
    assert_no_lease_files_left();
}

/// Forks a holder for each of `setups` (each reports its link index), lets them go at
/// once, and returns them with their indices, sorted; fails when one failed or two
/// holders (`who`) share a link.
pub fn holders_racing<F>(setups: Vec<F>, who: &str) -> (Vec<Holder>, Vec<u32>)
where
    F: FnOnce() -> Result<u32, String>,
{
    let gate = Gate::new();
    let mut holders: Vec<Holder> = setups
        .into_iter()
        .map(|setup| Holder::start(Some(&gate), setup))
        .collect();
    let count = holders.len();
    gate.open(count);
    holders.iter_mut().for_each(Holder::wait_report);
    let mut indices: Vec<u32> = holders
        .iter()
        .map(|h| h.report.clone().expect("a holder failed"))
        .collect();
    indices.sort_unstable();
    indices.dedup();
    assert_eq!(
        indices.len(),
        count,
        "links shared between {who}: {indices:?}"
    );
    (holders, indices)
}

/// What `make` reported, run in a forked child that dropped root (uid 65534) with a lease
/// from a scratch lock directory it may write (so only the link itself needs
/// CAP_NET_ADMIN).
pub fn unprivileged_report(
    make: impl FnOnce(hostnet::Lease) -> Result<u32, String>,
) -> Result<u32, String> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let lock_dir = dir.path().to_path_buf();
    let holder = Holder::spawn(move || {
        nix::unistd::setresuid(65534.into(), 65534.into(), 65534.into())
            .map_err(|e| e.to_string())?;
        let pool: hostnet::Pool = "10.201.0.0/16".parse().unwrap();
        let lease = hostnet::Lease::acquire_in(&lock_dir, &pool, hostnet::NetMode::Link, &[])
            .map_err(|e| e.to_string())?;
        make(lease)
    });
    let report = holder.report.clone();
    holder.sigkill();
    report
}
