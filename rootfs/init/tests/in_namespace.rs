//! twinbox-init from the built image, as PID 1 of fresh namespaces (the container shape,
//! without the container crate): proves the image's init runs a job, reports markers on
//! an inherited fd, maps exit statuses, makes the root writable with `overlay_root`, and
//! kills what the workload leaves behind.
//!
//! Needs root (mounts, loop device, namespaces) and the image from `rootfs/build.sh`;
//! without them every test fails with a message naming what is missing.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use twinbox_proto::stdio::{PORTS, PORTS_CMDLINE_FLAG};
use twinbox_proto::{ExitCode, Frame, Job, Marker, MarkerChannel};

/// The fd number the marker pipe gets in init, as a container runtime would pass it.
const MARKER_FD: i32 = 5;

fn image() -> PathBuf {
    let cache = std::env::var_os("TWINBOX_CACHE")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("/var/cache/twinbox"), PathBuf::from);
    let image = cache.join("rootfs/current/rootfs.ext4");
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests mount an image in new namespaces: run them as root"
    );
    assert!(
        image.exists(),
        "{} not found — build it with rootfs/build.sh",
        image.display()
    );
    image
}

/// What one boot of init produced.
struct Outcome {
    status: i32,
    stdout: String,
    stderr: String,
    markers: Vec<Marker>,
}

/// Mounts the image read-only with a tmpfs overlay in a private mount namespace (so all
/// of it, the loop device included, goes away with the namespace), then runs init as
/// PID 1 of new PID and UTS namespaces with `TWINBOX_JOB` set to `token`.
fn boot(token: &str) -> Outcome {
    boot_in(token, None)
}

/// [`boot`], with init in the named network namespace `netns` (`/run/netns/NAME`) when
/// given, instead of the host's.
fn boot_in(token: &str, netns: Option<&str>) -> Outcome {
    let dir = tempdir();
    boot_dir(Some(token), netns, &dir, None)
}

/// [`boot_in`] in `dir`, which may hold what [`boot_with_ports`] prepared; without a
/// token init is booted the VM-with-ports way. With `terminal` (a pty slave) that is
/// init's stdin, stdout and stderr, as a runtime gives it for `-t`, instead of pipes.
fn boot_dir(
    token: Option<&str>,
    netns: Option<&str>,
    dir: &std::path::Path,
    terminal: Option<&OwnedFd>,
) -> Outcome {
    let image = image();
    let script = r#"
        set -e
        dir=$1 img=$2
        mount --make-rprivate /
        mkdir -p "$dir/lower" "$dir/rw" "$dir/root"
        mount -o ro,loop "$img" "$dir/lower"
        mount -t tmpfs tmpfs "$dir/rw"
        mkdir "$dir/rw/upper" "$dir/rw/work"
        mount -t overlay overlay -o "lowerdir=$dir/lower,upperdir=$dir/rw/upper,workdir=$dir/rw/work" "$dir/root"
        if [ -n "$4" ]; then
            # The VM with ports: the test's /dev (FIFOs for the ports) and
            # /sys/class/virtio-ports, and a /proc/cmdline saying twinbox.ports=1.
            mount --bind "$dir/dev" "$dir/root/dev"
            mount --bind "$dir/sys" "$dir/root/sys"
            exec unshare --fork --pid --uts --kill-child --mount-proc="$dir/root/proc" -- \
                sh -c 'mount --bind "$1/cmdline" "$1/root/proc/cmdline" && exec chroot "$1/root" /sbin/twinbox-init' sh "$dir"
        fi
        mount --rbind /dev "$dir/root/dev"
        enter=
        if [ -n "$3" ]; then enter="nsenter --net=/run/netns/$3"; fi
        exec $enter unshare --fork --pid --uts --kill-child -- chroot "$dir/root" /sbin/twinbox-init
    "#;
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 just returned these two fresh descriptors; each gets one owner.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let writer_raw = fds[1];
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--", "sh", "-c", script, "sh"])
        .arg(dir)
        .arg(&image)
        .arg(netns.unwrap_or(""))
        .arg(if token.is_none() { "ports" } else { "" })
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(slave) = terminal {
        let stdio = || Stdio::from(slave.try_clone().unwrap());
        command.stdin(stdio()).stdout(stdio()).stderr(stdio());
    }
    if let Some(token) = token {
        command.env("TWINBOX_JOB", token);
    }
    // SAFETY: dup2 is async-signal-safe; it gives the child the marker pipe at MARKER_FD
    // without CLOEXEC, which is how a runtime hands it to init.
    unsafe {
        command.pre_exec(move || {
            // dup2 onto itself keeps CLOEXEC, so clear it explicitly in that case.
            let ok = if writer_raw == MARKER_FD {
                libc::fcntl(MARKER_FD, libc::F_SETFD, 0) != -1
            } else {
                libc::dup2(writer_raw, MARKER_FD) != -1
            };
            if !ok {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().expect("spawn unshare (util-linux)");
    drop(writer);
    let output = child.wait_with_output().expect("wait for init");
    let mut bytes = Vec::new();
    std::fs::File::from(reader).read_to_end(&mut bytes).unwrap();
    std::fs::remove_dir_all(dir).ok();
    assert_no_loop_device_left(&image);
    Outcome {
        status: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        markers: bytes
            .chunks(4)
            .map(|c| {
                Marker::decode(u32::from_le_bytes(c.try_into().expect("whole markers"))).unwrap()
            })
            .collect(),
    }
}

fn tempdir() -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("twinbox-init-ns-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The loop device dies with the mount namespace; its autoclear runs as the last mount
/// goes, which may lag the process exit a little, so poll briefly before failing.
fn assert_no_loop_device_left(image: &std::path::Path) {
    for _ in 0..50 {
        let out = Command::new("losetup")
            .arg("-j")
            .arg(image)
            .output()
            .expect("losetup");
        if out.stdout.is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("a loop device still holds {}", image.display());
}

fn job(argv: &[&str]) -> Job {
    Job {
        env: vec![
            "PATH=/bin:/sbin:/usr/bin:/usr/sbin".into(),
            "HOME=/root".into(),
        ],
        marker: MarkerChannel::Fd(MARKER_FD),
        ..Job::new(argv.iter().copied())
    }
}

fn started_and_exited(code: ExitCode) -> Vec<Marker> {
    vec![
        Marker::InitStarted,
        Marker::WorkloadStarted,
        Marker::WorkloadExited(code),
    ]
}

#[test]
fn runs_the_job_with_its_arguments_env_cwd_and_hostname() {
    let job = Job {
        cwd: "/root".into(),
        hostname: Some("box-ü".into()),
        verbose: true,
        env: vec!["PATH=/bin:/usr/bin".into(), "Q=a \"b\" 'c'".into()],
        ..job(&[
            "sh",
            "-c",
            r#"printf '%s|' "$@" "$Q" "$(pwd)" "$(hostname)"; exit 3"#,
            "sh",
            "two  spaces",
            "naïve 日本",
            "",
        ])
    };
    let out = boot(&job.encode().unwrap());
    assert_eq!(
        out.stdout, "two  spaces|naïve 日本||a \"b\" 'c'|/root|box-ü|",
        "stderr: {}",
        out.stderr
    );
    assert_eq!(out.status, 3, "stderr: {}", out.stderr);
    assert_eq!(out.markers, started_and_exited(ExitCode::Exited(3)));
    assert!(
        out.stderr
            .contains("twinbox-init: workload exited with status 3"),
        "{}",
        out.stderr
    );
}

#[test]
fn without_verbose_the_streams_carry_the_workload_alone() {
    let out = boot(
        &job(&["sh", "-c", "echo out; echo err >&2; exit 2"])
            .encode()
            .unwrap(),
    );
    assert_eq!(
        (out.status, out.stdout.as_str(), out.stderr.as_str()),
        (2, "out\n", "err\n")
    );
    assert_eq!(out.markers, started_and_exited(ExitCode::Exited(2)));
}

#[test]
fn the_workload_does_not_inherit_the_marker_fd_and_sees_a_userland() {
    let script = "test ! -e /proc/self/fd/5 && grep -q ' /tmp tmpfs' /proc/mounts && \
                  grep -q ' /sys sysfs ro' /proc/mounts && test \"$$\" = 2";
    let out = boot(&job(&["sh", "-c", script]).encode().unwrap());
    assert_eq!(out.status, 0, "stderr: {}", out.stderr);
    assert_eq!(out.markers, started_and_exited(ExitCode::Exited(0)));
}

#[test]
fn exec_failures_and_signals_map_like_shells() {
    let out = boot(&job(&["no-such-command"]).encode().unwrap());
    assert_eq!(out.status, 127);
    assert!(
        out.stderr
            .contains("twinbox-init: no-such-command: not found"),
        "{}",
        out.stderr
    );
    assert_eq!(out.markers, started_and_exited(ExitCode::Exited(127)));

    let killed = Job {
        verbose: true,
        ..job(&["sh", "-c", "kill -KILL $$"])
    };
    let out = boot(&killed.encode().unwrap());
    assert_eq!(out.status, 128 + 9);
    assert!(
        out.stderr
            .contains("twinbox-init: workload killed by signal 9"),
        "{}",
        out.stderr
    );
    assert_eq!(out.markers, started_and_exited(ExitCode::Signaled(9)));
}

#[test]
fn leftover_processes_are_killed_when_the_workload_exits() {
    // Without the final SIGKILL to every process this boot would wait for the sleeper.
    let out = boot(
        &job(&["sh", "-c", "sleep 100000 & sleep 100000 & exit 4"])
            .encode()
            .unwrap(),
    );
    assert_eq!(out.status, 4, "stderr: {}", out.stderr);
}

#[test]
fn overlay_root_makes_the_read_only_root_writable() {
    let job = Job {
        overlay_root: true,
        ..job(&[
            "sh",
            "-c",
            "echo x > /etc/written && cat /etc/written && grep -q '^overlay / ' /proc/mounts",
        ])
    };
    let out = boot(&job.encode().unwrap());
    assert_eq!(
        (out.status, out.stdout.as_str()),
        (0, "x\n"),
        "stderr: {}",
        out.stderr
    );
}

#[test]
fn a_garbled_job_is_one_line_and_status_125() {
    let out = boot("not*base64");
    assert_eq!(out.status, 125);
    assert_eq!(
        out.stderr.trim(),
        "twinbox-init: bad TWINBOX_JOB: job token is not base64url"
    );
    assert!(out.markers.is_empty());
}

#[test]
fn signals_sent_to_init_reach_the_workload() {
    // PID 1 drops default-disposition signals unless it blocks and forwards them; the
    // workload would loop forever if SIGTERM to init were lost.
    let script = r#"trap 'exit 9' TERM; kill -TERM 1; while :; do sleep 0.1; done"#;
    let out = boot(&job(&["sh", "-c", script]).encode().unwrap());
    assert_eq!(out.status, 9, "stderr: {}", out.stderr);
    assert_eq!(out.markers, started_and_exited(ExitCode::Exited(9)));
}

/// A network namespace made for one test with a veth pair: `eth0` (down, no address) in
/// the box's namespace `tbinit<pid>`, its peer with the gateway address in a second
/// namespace `tbinit<pid>p`, so nothing is added to the host's own network. Both
/// namespaces, and with them the pair, are deleted on drop.
struct TestLink {
    netns: String,
    peer_netns: String,
}

impl TestLink {
    const GATEWAY: &'static str = "10.254.254.1";

    fn new() -> Self {
        let netns = format!("tbinit{}", std::process::id());
        let link = Self {
            peer_netns: format!("{netns}p"),
            netns,
        };
        let gateway = format!("{}/30", Self::GATEWAY);
        for args in [
            vec!["netns", "add", &link.netns],
            vec!["netns", "add", &link.peer_netns],
            vec![
                "link",
                "add",
                "tbinit-peer",
                "netns",
                &link.peer_netns,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &link.netns,
            ],
            vec![
                "-n",
                &link.peer_netns,
                "addr",
                "add",
                &gateway,
                "dev",
                "tbinit-peer",
            ],
            vec!["-n", &link.peer_netns, "link", "set", "tbinit-peer", "up"],
        ] {
            let out = Command::new("ip")
                .args(&args)
                .output()
                .expect("run ip (iproute2)");
            assert!(
                out.status.success(),
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        link
    }
}

impl Drop for TestLink {
    fn drop(&mut self) {
        for netns in [&self.netns, &self.peer_netns] {
            let _ = Command::new("ip").args(["netns", "del", netns]).status();
        }
    }
}

#[test]
fn net_brings_up_eth0_with_address_route_and_resolver_and_gives_back_net_admin() {
    let link = TestLink::new();
    let script = "ip -4 -o addr show dev eth0; ip route show default; \
                  ip -o link show lo | grep -q 'UP' && echo lo-up; \
                  cat /etc/resolv.conf; \
                  ping -c 1 -W 5 10.254.254.1 >/dev/null && echo gateway-answers; \
                  grep CapBnd /proc/self/status";
    let job = Job {
        net: Some(twinbox_proto::NetConfig {
            address: "10.254.254.2".parse().unwrap(),
            prefix_len: 30,
            gateway: TestLink::GATEWAY.parse().unwrap(),
            resolver: Some("192.0.2.53".parse().unwrap()),
        }),
        ..job(&["sh", "-c", script])
    };
    let out = boot_in(&job.encode().unwrap(), Some(&link.netns));
    assert_eq!(
        out.status, 0,
        "stdout: {}\nstderr: {}",
        out.stdout, out.stderr
    );
    assert_eq!(out.markers, started_and_exited(ExitCode::Exited(0)));
    for expected in [
        "inet 10.254.254.2/30",
        "default via 10.254.254.1 dev eth0",
        "lo-up",
        "nameserver 192.0.2.53",
        "gateway-answers",
    ] {
        assert!(
            out.stdout.contains(expected),
            "init did not configure the network: {expected:?} missing from\n{}\nstderr: {}",
            out.stdout,
            out.stderr
        );
    }
    let bounding = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).expect("CapBnd is hex"))
        .expect("CapBnd line");
    assert_eq!(
        bounding & (1 << 12),
        0,
        "CAP_NET_ADMIN is still in the workload's bounding set: {bounding:#x}"
    );
}

#[test]
fn net_without_an_eth0_is_init_failed_with_the_errno() {
    let job = Job {
        net: Some(twinbox_proto::NetConfig {
            address: "10.254.254.2".parse().unwrap(),
            prefix_len: 30,
            gateway: TestLink::GATEWAY.parse().unwrap(),
            resolver: None,
        }),
        ..job(&["true"])
    };
    // The host's network namespace has no eth0 of the box's (this host may well have an
    // eth0 of its own, so the test gives init a fresh namespace with only lo).
    let netns = format!("tbinit{}e", std::process::id());
    let made = Command::new("ip").args(["netns", "add", &netns]).status();
    assert!(made.is_ok_and(|s| s.success()), "ip netns add {netns}");
    let out = boot_in(&job.encode().unwrap(), Some(&netns));
    let _ = Command::new("ip").args(["netns", "del", &netns]).status();
    assert_eq!(out.status, 125, "stderr: {}", out.stderr);
    assert_eq!(
        out.markers,
        vec![Marker::InitFailed(libc::ENODEV as u32)],
        "stderr: {}",
        out.stderr
    );
    assert!(out.stderr.contains("eth0"), "{}", out.stderr);
}

/// What the VM's ports carried in one boot: the host's side of stdout and stderr.
struct PortOutput {
    stdout: String,
    stderr: String,
}

/// Boots init the way twinbox's VM does, with `twinbox.ports=1` and no token: the four
/// ports are FIFOs in a fake `/dev`, named in a fake `/sys/class/virtio-ports` (numbered
/// backwards, so only the names can match them), `frames` wait on the control port and
/// `stdin` on the stdin port. The host's ends stay open for the whole boot, as the VMM's
/// do; init's stderr stands in for the serial console.
fn boot_with_ports(frames: &[Frame], stdin: &[u8]) -> (Outcome, PortOutput) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = tempdir();
    std::fs::create_dir_all(dir.join("dev")).unwrap();
    std::fs::write(
        dir.join("cmdline"),
        format!("console=ttyS0 quiet {PORTS_CMDLINE_FLAG}\n"),
    )
    .unwrap();
    let mut ends = Vec::new();
    for (id, name) in PORTS.iter().enumerate() {
        let node = format!("vport9p{}", 3 - id);
        let class = dir.join("sys/class/virtio-ports").join(&node);
        std::fs::create_dir_all(&class).unwrap();
        std::fs::write(class.join("name"), format!("{name}\n")).unwrap();
        let fifo = dir.join("dev").join(&node);
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: c_path is NUL-terminated.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        // Host → guest ports: read-write, so init's read-only open does not wait and
        // nothing reads EOF early. Guest → host: a non-blocking reader.
        let mut options = std::fs::OpenOptions::new();
        if id < 2 {
            options.read(true).write(true);
        } else {
            options.read(true).custom_flags(libc::O_NONBLOCK);
        }
        ends.push(options.open(&fifo).unwrap());
    }
    for frame in frames {
        ends[0].write_all(&frame.encode().unwrap()).unwrap();
    }
    ends[1].write_all(stdin).unwrap();
    let outcome = boot_dir(None, None, &dir, None);
    let read = |file: &mut std::fs::File| {
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes); // ends at EOF: every writer is gone
        String::from_utf8_lossy(&bytes).replace('\r', "")
    };
    let output = PortOutput {
        stdout: read(&mut ends[2]),
        stderr: read(&mut ends[3]),
    };
    (outcome, output)
}

#[test]
fn vm_ports_carry_the_job_and_the_three_streams_apart_from_init() {
    // Longer than any kernel command line (2048 bytes): the job is not capped any more.
    let long = "x".repeat(5000);
    let job = job(&[
        "sh",
        "-c",
        r#"echo out; echo err >&2; read line; echo "in=$line len=${#1}"; exit 4"#,
        "sh",
        &long,
    ]);
    let (out, ports) = boot_with_ports(&[Frame::Job(job)], b"hello\n");
    assert_eq!(
        (out.status, ports.stdout.as_str(), ports.stderr.as_str()),
        (4, "out\nin=hello len=5000\n", "err\n"),
        "console: {}",
        out.stderr
    );
    // Not verbose: nothing of init anywhere, the console included.
    assert_eq!((out.stdout.as_str(), out.stderr.as_str()), ("", ""));
    assert_eq!(out.markers, started_and_exited(ExitCode::Exited(4)));
}

#[test]
fn vm_ports_with_tty_run_the_workload_on_a_relayed_pty() {
    let job = Job {
        tty: true,
        verbose: true,
        ..job(&[
            "sh",
            "-c",
            r#"stty size; tty; test -t 2 && echo stderr-is-tty; read line; echo "line=$line"; exit 3"#,
        ])
    };
    let frames = [Frame::Job(job), Frame::WindowSize { rows: 12, cols: 34 }];
    let (out, ports) = boot_with_ports(&frames, b"hi\n");
    assert_eq!(out.status, 3, "console: {}", out.stderr);
    for expected in [
        "12 34\n",
        "/dev/pts/0\n",
        "stderr-is-tty\n",
        "hi\n",
        "line=hi\n",
    ] {
        assert!(
            ports.stdout.contains(expected),
            "{expected:?} missing from {:?}; console: {}",
            ports.stdout,
            out.stderr
        );
    }
    assert_eq!(ports.stderr, "", "with a tty everything is on stdout");
    // Verbose: the exit line, on the console only.
    assert_eq!(
        out.stderr, "twinbox-init: workload exited with status 3\n",
        "stdout port: {:?}",
        ports.stdout
    );
    assert_eq!(out.markers, started_and_exited(ExitCode::Exited(3)));
}

/// A pty pair (master, slave), as a runtime makes for `-t`.
fn pty_pair() -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two fds through valid pointers; the rest may be null.
    let made = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(made, 0);
    // SAFETY: openpty just returned these two fresh descriptors; each gets one owner.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

/// Boots `job` with a pty slave as init's stdio; returns the status and what the
/// master read.
fn boot_on_pty(job: &Job) -> (i32, String) {
    let (master, slave) = pty_pair();
    let out = boot_dir(Some(&job.encode().unwrap()), None, &tempdir(), Some(&slave));
    drop(slave);
    let mut seen = Vec::new();
    let _ = std::fs::File::from(master).read_to_end(&mut seen); // ends with EIO
    (out.status, String::from_utf8_lossy(&seen).replace('\r', ""))
}

#[test]
fn a_tty_job_gets_the_runtimes_pty_as_its_controlling_terminal() {
    let script = "(: </dev/tty) 2>/dev/null && echo ctty=yes || echo ctty=no; exit 6";
    let tty_job = Job {
        tty: true,
        ..job(&["sh", "-c", script])
    };
    assert_eq!(boot_on_pty(&tty_job), (6, "ctty=yes\n".to_owned()));
    // The same workload without -t has no controlling terminal: the check means it.
    let plain = job(&["sh", "-c", script]);
    assert_eq!(boot_on_pty(&plain), (6, "ctty=no\n".to_owned()));
}
