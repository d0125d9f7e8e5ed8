//! `twinbox ctr run` against the real image: isolation seen from inside and outside,
//! the overlay, limits (memory/OOM, pids, cpu), exit statuses, signals, bad input,
//! SIGKILL of the CLI at any point of start-up (nothing survives; the next start sweeps
//! the named leftovers), the cgroup v2 device program, and a leak check (mounts, loop
//! devices, twinbox-* cgroups) around every run. Needs root and the built rootfs image;
//! fails naming what is missing. The attacks of issue 10 are in `ctr_lockdown.rs`.
//!
//! The tests share one lock: the leak check compares host snapshots, so runs of this file
//! must not overlap.

mod common;

use common::describe;
use std::process::{Command, Output};
use std::sync::Mutex;
use twinbox_spec::{Outcome, Phase, RunReport};

static SERIAL: Mutex<()> = Mutex::new(());

fn image() -> String {
    common::rootfs_image("twinbox ctr run")
}

/// Runs `twinbox ctr run ARGS -- CMD...` with a leak check around it.
fn ctr(args: &[&str], cmd: &[&str]) -> Output {
    let rootfs = image();
    common::leaks::check_no_leaks(&format!("ctr run {args:?} -- {cmd:?}"), || {
        Command::new(common::twinbox())
            .args(["ctr", "run", "--rootfs", &rootfs])
            .args(args)
            .arg("--")
            .args(cmd)
            .output()
            .expect("run twinbox")
    })
}

fn sh(args: &[&str], script: &str) -> Output {
    ctr(args, &["/bin/sh", "-c", script])
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails unless the workload printed every one of `expected` (lines like `key=value`).
fn assert_reported(out: &Output, expected: &[&str]) {
    let text = stdout(out);
    for line in expected {
        assert!(
            text.contains(line),
            "missing {line:?} in\n{}",
            describe(out)
        );
    }
}

/// Fails unless the `procs=N` line shows only the container's own few processes (init,
/// the shell and its pipeline), i.e. host processes are not visible.
fn assert_few_processes(out: &Output) {
    let procs: u32 = stdout(out)
        .lines()
        .find_map(|l| l.strip_prefix("procs="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(u32::MAX);
    assert!(procs < 10, "{procs} processes visible:\n{}", describe(out));
}

/// The JSON report that `--json` printed after the workload's own output.
fn report(out: &Output) -> RunReport {
    let text = stdout(out);
    let start = text
        .find("{\n")
        .unwrap_or_else(|| panic!("no JSON report in\n{}", describe(out)));
    serde_json::from_str(&text[start..]).unwrap_or_else(|e| panic!("{e}\n{}", describe(out)))
}

fn sha256(path: &str) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split(' ')
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn isolation_seen_from_inside_and_the_overlay_vanishes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rootfs = image();
    let before = sha256(&rootfs);
    let script = "\
        echo pid1=$(tr '\\0' ' ' < /proc/1/cmdline); \
        echo host=$(hostname); \
        echo procs=$(ls -d /proc/[0-9]* | wc -l); \
        echo cgroupfs=$(grep -c ' /sys/fs/cgroup' /proc/self/mountinfo); \
        echo nets=$(ls /sys/class/net | tr '\\n' ' '); \
        echo loflags=$(cat /sys/class/net/lo/flags); \
        echo netns=$(readlink /proc/self/ns/net); \
        echo capeff=$(grep CapEff /proc/self/status | tr -d '\\t' | cut -d: -f2); \
        echo nonewprivs=$(grep NoNewPrivs /proc/self/status | tr -d '\\t' | cut -d: -f2); \
        echo written > /etc/twinbox-probe && echo probe=$(cat /etc/twinbox-probe); \
        touch /sys/x 2>/dev/null && echo sys=rw || echo sys=ro; \
        mount -t tmpfs x /mnt 2>/dev/null && echo mount=allowed || echo mount=denied";
    let out = sh(&["--hostname", "boxtest", "--json"], script);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_reported(
        &out,
        &[
            "pid1=/.twinbox/init",
            "host=boxtest",
            "cgroupfs=0",
            "nets=lo\n",
            "loflags=0x9",
            // moby's default capability set without MKNOD (container/src/caps.rs).
            "capeff=00000000a00425fb",
            "nonewprivs=1",
            "probe=written",
            "sys=ro",
            "mount=denied",
        ],
    );
    // Host processes are not visible: init, the shell and its pipeline only.
    assert_few_processes(&out);
    // Its own network namespace, not the host's.
    let host_netns = std::fs::read_link("/proc/self/ns/net").expect("the host's netns");
    assert!(
        stdout(&out).contains("netns=net:[")
            && !stdout(&out).contains(&format!("netns={}", host_netns.display())),
        "the box shares the host's network namespace {}:\n{}",
        host_netns.display(),
        describe(&out)
    );
    let report = report(&out);
    assert_eq!(report.outcome, Outcome::Exited(0));
    assert!(report.timeline.is_ordered(), "{:?}", report.timeline);
    for phase in twinbox_spec::Phase::ALL {
        assert!(
            report.timeline.get(phase).is_some(),
            "{phase} missing: {:?}",
            report.timeline
        );
    }
    // The write went to the tmpfs upper layer: gone in the next run, image unchanged.
    let out = sh(&[], "cat /etc/twinbox-probe 2>&1 || echo absent");
    assert!(stdout(&out).contains("absent"), "{}", describe(&out));
    assert_eq!(sha256(&rootfs), before, "the image file changed");
    // Default hostname is the container's, not the host's.
    let out = sh(&[], "hostname");
    assert_eq!(stdout(&out).trim(), "twinbox", "{}", describe(&out));
}

#[test]
fn exit_statuses_and_signals_pass_through() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (script, status) in [
        ("exit 0", 0),
        ("exit 1", 1),
        ("exit 7", 7),
        ("exit 255", 255),
        ("kill -9 $$", 137),
        ("kill -TERM $$", 143),
    ] {
        let out = sh(&[], script);
        assert_eq!(
            out.status.code(),
            Some(status),
            "{script}: {}",
            describe(&out)
        );
    }
    let out = ctr(&[], &["no-such-command-in-the-image"]);
    assert_eq!(out.status.code(), Some(127), "{}", describe(&out));
}

#[test]
fn memory_limit_kills_a_hog_and_reports_oom() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = sh(
        &["--memory", "64", "--json"],
        "x=0123456789abcdef; while :; do x=$x$x; done",
    );
    let report = report(&out);
    assert!(report.usage.oom_killed, "{}", describe(&out));
    assert_eq!(report.outcome, Outcome::Signaled(9), "{}", describe(&out));
    let peak = report.usage.cgroup_memory_peak_kib.expect("peak memory");
    assert!((32 * 1024..=64 * 1024).contains(&peak), "peak {peak} KiB");
    assert!(
        report.notes.iter().any(|n| n.contains("OOM")),
        "{:?}",
        report.notes
    );
}

#[test]
fn pids_limit_stops_a_fork_bomb() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // 40 sleepers against pids.max 20: forks fail (the forking subshell dies of it),
    // at most 20 tasks exist. Counted with a glob and builtins: no fork needed.
    let count = "set -- /proc/[0-9]*; echo running=$#";
    let running = |out: &Output| -> u32 {
        stdout(out)
            .lines()
            .find_map(|l| l.strip_prefix("running="))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("{}", describe(out)))
    };
    let bomb = format!("(for i in $(seq 40); do sleep 30 & done) 2>/dev/null; {count}");
    let out = sh(&["--pids", "20"], &bomb);
    let limited = running(&out);
    assert!(
        limited <= 20,
        "{limited} tasks under pids.max 20:\n{}",
        describe(&out)
    );
    // Without the limit all 40 start.
    let out = sh(&[], &bomb);
    let unlimited = running(&out);
    assert!(unlimited > 40, "{}", describe(&out));
}

/// CPU time the workload got per second of its wall time.
fn cpu_share(cpus: &str) -> (f64, u64) {
    let out = sh(
        &["--cpus", cpus, "--json"],
        "timeout -s TERM 2 sh -c 'i=0; trap \"echo count=\\$i; exit 0\" TERM; while :; do i=$((i+1)); done'",
    );
    let report = report(&out);
    let wall = report
        .timeline
        .between(Phase::WorkloadStarted, Phase::WorkloadExited)
        .expect("workload phases") as f64;
    let cpu = (report.usage.cpu_user_us.unwrap_or(0) + report.usage.cpu_system_us.unwrap_or(0))
        as f64
        * 1000.0;
    let count = stdout(&out)
        .lines()
        .find_map(|l| l.strip_prefix("count="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{}", describe(&out)));
    (cpu / wall, count)
}

#[test]
fn cpu_quota_caps_cpu_time() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The quota is an upper bound the kernel enforces: a busy loop under --cpus 0.5 gets
    // at most half a CPU per wall second (plus one period of slack). A loaded host can
    // only lower it, so this holds on a noisy machine; the throughput ratio against an
    // unlimited run is printed for the record but not asserted (2 shared cores).
    let (half, half_count) = cpu_share("0.5");
    let (full, full_count) = cpu_share("1");
    eprintln!(
        "cpu share: --cpus 0.5 {half:.2} ({half_count} loops), --cpus 1 {full:.2} ({full_count} loops), \
         throughput ratio {:.2}",
        half_count as f64 / full_count.max(1) as f64
    );
    assert!(half > 0.05 && half < 0.6, "--cpus 0.5 got {half:.2} CPU");
    assert!(
        half_count > 0 && full_count > 0,
        "the busy loop did not count"
    );
}

#[test]
fn userns_maps_root_to_an_unprivileged_host_range() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let script = "\
        cat /proc/self/uid_map; cat /proc/self/gid_map; \
        echo uid=$(id -u) gid=$(id -g); \
        echo passwd_owner=$(stat -c %u:%g /etc/passwd); \
        echo hi > /tmp/x && echo tmp=$(cat /tmp/x); \
        echo written > /etc/twinbox-probe && echo probe=$(cat /etc/twinbox-probe); \
        echo host=$(hostname); \
        echo procs=$(ls -d /proc/[0-9]* | wc -l); \
        echo loflags=$(cat /sys/class/net/lo/flags); \
        printf hello | dd of=/mnt/disk0 conv=notrunc 2>/dev/null && echo disk=written; \
        mount -t tmpfs x /mnt 2>/dev/null && echo mount=allowed || echo mount=denied";
    // A host-root-owned disk file: its bind is idmapped too, so container root may write.
    let path = std::env::temp_dir().join(format!("twinbox-ctr-nsdisk-{}", std::process::id()));
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let disk = path.display().to_string();
    let out = sh(
        &["--userns", "--hostname", "nsbox", "--disk", &disk],
        script,
    );
    let written = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(&written[..5], b"hello", "{}", describe(&out));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = stdout(&out);
    let maps: Vec<Vec<&str>> = text
        .lines()
        .take(2)
        .map(|l| l.split_whitespace().collect())
        .collect();
    // Container root is the first id of the run's own leased range in twinbox's block
    // (0x7000_0000..0x7FFE_0000; tests/ctr_userns.rs checks the leases): no privilege over
    // the host's own files.
    let base: u64 = maps[0][1].parse().unwrap();
    assert!(
        maps == vec![vec!["0", maps[0][1], "65536"]; 2]
            && (0x7000_0000..0x7FFE_0000).contains(&base)
            && base % 65536 == 0,
        "{maps:?}: {}",
        describe(&out)
    );
    assert_reported(
        &out,
        &[
            "uid=0 gid=0",
            // The image mount is idmapped: host root's files are root's inside, not nobody's.
            "passwd_owner=0:0",
            "tmp=hi",
            "probe=written",
            "host=nsbox",
            "loflags=0x9",
            "disk=written",
            "mount=denied",
        ],
    );
    assert_few_processes(&out);
}

#[test]
fn extra_disk_is_bind_mounted_at_mnt_disk0() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let path = std::env::temp_dir().join(format!("twinbox-ctr-disk-{}", std::process::id()));
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let disk = path.display().to_string();
    let out = sh(
        &["--disk", &disk],
        "printf hello | dd of=/mnt/disk0 conv=notrunc 2>/dev/null && echo ok",
    );
    assert!(stdout(&out).contains("ok"), "{}", describe(&out));
    assert_eq!(&std::fs::read(&path).unwrap()[..5], b"hello");
    let ro = format!("{disk}:ro");
    let out = sh(
        &["--disk", &ro],
        "head -c 5 /mnt/disk0; echo; printf x > /mnt/disk0 || echo refused",
    );
    let text = stdout(&out);
    std::fs::remove_file(&path).unwrap();
    assert!(
        text.contains("hello") && text.contains("refused"),
        "{}",
        describe(&out)
    );
}

#[test]
fn bad_input_is_one_line_125_and_leaves_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rootfs = image();
    let not_ext4 = std::env::temp_dir().join(format!("twinbox-ctr-bad-{}", std::process::id()));
    std::fs::write(&not_ext4, vec![0u8; 4096]).unwrap();
    let not_ext4 = not_ext4.display().to_string();
    for (args, needle) in [
        (
            vec!["--rootfs", "/nonexistent/rootfs.ext4"],
            "/nonexistent/rootfs.ext4",
        ),
        (vec!["--rootfs", not_ext4.as_str()], "not an ext4 image"),
        (vec!["--rootfs", rootfs.as_str(), "--cpus", "0"], "--cpus"),
        (
            vec!["--rootfs", rootfs.as_str(), "--memory", "1"],
            "--memory",
        ),
        (vec!["--rootfs", rootfs.as_str(), "--pids", "0"], "--pids"),
        (
            vec!["--rootfs", rootfs.as_str(), "--disk", "/nonexistent/disk"],
            "/nonexistent/disk",
        ),
    ] {
        let out = common::leaks::check_no_leaks("bad input", || {
            Command::new(common::twinbox())
                .args(["ctr", "run"])
                .args(&args)
                .args(["--", "/bin/true"])
                .output()
                .expect("run twinbox")
        });
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr:?}");
        assert!(
            stderr.contains(needle),
            "{args:?}: {stderr:?} should name {needle:?}"
        );
    }
    std::fs::remove_file(&not_ext4).unwrap();
}

#[test]
fn sigterm_to_the_cli_tears_the_container_down() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rootfs = image();
    common::leaks::check_no_leaks("interrupted run", || {
        let mut child = Command::new(common::twinbox())
            .args([
                "ctr",
                "run",
                "--rootfs",
                &rootfs,
                "--",
                "/bin/sh",
                "-c",
                "echo up; sleep 60",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run twinbox");
        // Wait until the workload runs, then interrupt.
        let mut line = String::new();
        let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        assert_eq!(line.trim(), "up");
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(143));
    });
}

#[test]
fn library_call_captures_output_for_the_bench() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rootfs = image();
    let report = common::leaks::check_no_leaks("container::run", || {
        let mut spec = twinbox_spec::RunSpec::new(
            &rootfs,
            vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo out; echo err >&2; exit 3".into(),
            ],
        );
        spec.output = twinbox_spec::run_spec::OutputMode::Capture;
        container::run(&spec).expect("container::run")
    });
    assert_eq!(report.outcome, Outcome::Exited(3));
    let output = report.output.expect("captured output");
    assert!(
        output.contains("out\n") && output.contains("err\n"),
        "{output:?}"
    );
    assert!(report.timeline.is_ordered(), "{:?}", report.timeline);
    assert!(report.usage.cgroup_memory_peak_kib.is_some());
}

/// Live (not zombie) processes whose cgroup is one of run owner `pid`'s.
fn live_processes_of(pid: u32) -> Vec<String> {
    let needle = format!("twinbox-{pid}-");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let path = entry.path();
        let cgroup = std::fs::read_to_string(path.join("cgroup")).unwrap_or_default();
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        let state = stat.rsplit(')').next().unwrap_or("").trim_start();
        if cgroup.contains(&needle) && !state.starts_with('Z') && !state.is_empty() {
            found.push(format!("{}: {}", path.display(), stat.trim()));
        }
    }
    found
}

/// Staging directories of run owner `pid` left on the host.
fn staging_of(pid: u32) -> Vec<String> {
    std::fs::read_dir(container::sweep::STAGING_ROOT)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(&format!("twinbox-{pid}-")))
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `done` every 20 ms for up to 3 s.
fn eventually(done: impl Fn() -> bool) -> bool {
    (0..150).any(|_| {
        let ok = done();
        if !ok {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        ok
    })
}

#[test]
fn sigkill_of_the_cli_at_any_point_leaves_nothing_after_the_next_start() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rootfs = image();
    let before = common::leaks::HostResources::snapshot();
    for userns in [false, true] {
        for delay_ms in [0u64, 2, 5, 10, 15, 20, 30, 50, 100, 200] {
            let what = format!("SIGKILL after {delay_ms} ms (userns: {userns})");
            let mut cli = Command::new(common::twinbox());
            cli.args(["ctr", "run", "--rootfs", &rootfs]);
            if userns {
                cli.arg("--userns");
            }
            let mut cli = cli
                .args(["--", "/bin/sleep", "30"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("run twinbox");
            let pid = cli.id();
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
            cli.kill().expect("SIGKILL the CLI");
            cli.wait().unwrap();
            // The container dies with its CLI (parent-death signal), not at the next start.
            assert!(
                eventually(|| live_processes_of(pid).is_empty()),
                "{what}: the container outlived its CLI: {:?}",
                live_processes_of(pid)
            );
            // The next start sweeps the killed run's cgroups and staging directory.
            let out = Command::new(common::twinbox())
                .args(["ctr", "run", "--rootfs", &rootfs, "--", "/bin/true"])
                .output()
                .expect("run twinbox");
            assert_eq!(out.status.code(), Some(0), "{what}: {}", describe(&out));
            assert_eq!(
                staging_of(pid),
                Vec::<String>::new(),
                "{what}: staging left"
            );
            let settled = eventually(|| {
                let now = common::leaks::HostResources::snapshot();
                now.mounts == before.mounts
                    && now.loop_devices == before.loop_devices
                    && now.twinbox_cgroups == before.twinbox_cgroups
            });
            if !settled {
                before.assert_nothing_leaked(&common::leaks::HostResources::snapshot(), &what);
            }
        }
    }
}

/// The cgroup2 hierarchy of this host: `/sys/fs/cgroup` (pure v2) or the hybrid's
/// `/sys/fs/cgroup/unified`, from mountinfo.
fn cgroup2_root() -> std::path::PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            (fields.get(sep + 1) == Some(&"cgroup2")).then(|| fields[4].into())
        })
        .expect("no cgroup2 mount on this host: the v2 device program cannot be tried")
}

#[test]
fn cgroup_v2_device_program_admits_only_the_allowlist() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    common::require_root("a cgroup v2 device program");
    let dir = cgroup2_root().join(format!("twinbox-devtest-{}", std::process::id()));
    common::leaks::check_no_leaks("device program", || {
        std::fs::create_dir(&dir).unwrap();
        let rules =
            container::cgroup::device_allowlist(std::path::Path::new("/dev"), &["null"]).unwrap();
        let attached = container::device_program::attach(&dir, &rules);
        let out = attached.as_ref().ok().map(|()| {
            let script = format!(
                "echo $$ > {}/cgroup.procs || exit 99; \
                 (: < /dev/null) 2>/dev/null && echo null=ok || echo null=denied; \
                 (: < /dev/kmsg) 2>/dev/null && echo kmsg=ok || echo kmsg=denied; \
                 mknod /tmp/twinbox-devtest-$$ c 1 3 2>/dev/null && echo mknod=ok || echo mknod=denied; \
                 rm -f /tmp/twinbox-devtest-$$",
                dir.display()
            );
            Command::new("sh").args(["-c", &script]).output().unwrap()
        });
        let _ = std::fs::remove_dir(&dir);
        attached.expect("attach the device program");
        let out = out.unwrap();
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        for line in ["null=ok", "kmsg=denied", "mknod=denied"] {
            assert!(text.contains(line), "missing {line} in\n{}", describe(&out));
        }
    });
}
