//! `twinbox ctr run --userns`: each run gets its own range of host ids. Two containers at
//! once each see their root as uid 0, yet on the host their processes run as two different
//! uids (and gids) of ranges that are disjoint and overlap no range of /etc/subuid or
//! /etc/subgid, nor any id of /etc/passwd or /etc/group; no process of a container holds
//! the lease; a SIGKILLed CLI's range is free at once for the next run; nothing is left.
//! Needs root and the built rootfs image; fails naming what is missing.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

/// Where the CLI keeps its id lease lock files.
const LEASE_DIR: &str = "/run/twinbox/userns";
/// Size of a run's range.
const SIZE: u64 = 65_536;

/// Prints the uid and gid maps and the ids as the container sees them, then waits for a
/// line on stdin.
const SCRIPT: &str = "head -n1 /proc/self/uid_map; head -n1 /proc/self/gid_map; \
                      echo ids=$(id -u):$(id -g); echo ready; read line; echo done";

/// A running `ctr run --userns`, stopped at its `read`.
struct Box {
    cli: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// The first host uid and gid of the maps the container sees.
    uid_base: u64,
    gid_base: u64,
    /// `uid:gid` as `id` prints them inside.
    ids: String,
}

impl Box {
    fn start() -> Self {
        let image = common::rootfs_image("twinbox ctr run --userns");
        let mut cli = Command::new(common::twinbox())
            .args(["ctr", "run", "--rootfs", &image, "--userns", "--"])
            .args(["/bin/sh", "-c", SCRIPT])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run twinbox");
        let stdin = cli.stdin.take();
        let mut stdout = BufReader::new(cli.stdout.take().unwrap());
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if stdout.read_line(&mut line).unwrap_or(0) == 0 {
                let status = cli.wait();
                panic!("the container ended before it was ready ({status:?}), said {lines:?}");
            }
            if line.trim() == "ready" {
                break;
            }
            lines.push(line.trim().to_owned());
        }
        let base = |line: &str| -> u64 {
            let words: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(words.len(), 3, "not a map line: {line:?} in {lines:?}");
            assert_eq!((words[0], words[2]), ("0", "65536"), "map {line:?}");
            words[1].parse().unwrap()
        };
        let ids = lines
            .iter()
            .find_map(|l| l.strip_prefix("ids="))
            .unwrap_or_else(|| panic!("no ids line in {lines:?}"))
            .to_owned();
        Self {
            uid_base: base(&lines[0]),
            gid_base: base(&lines[1]),
            ids,
            cli,
            stdin,
            stdout,
        }
    }

    /// The container's processes as the host sees them: the CLI's children (init) and
    /// theirs (the workload), by pid.
    fn host_pids(&self) -> Vec<u32> {
        let children = |pid: u32| -> Vec<u32> {
            let mut all = Vec::new();
            for task in std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
            {
                let path = task.unwrap().path().join("children");
                let text = std::fs::read_to_string(path).unwrap_or_default();
                all.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
            all
        };
        let init = children(self.cli.id());
        let mut pids = init.clone();
        for pid in init {
            pids.extend(children(pid));
        }
        pids
    }

    /// SIGKILLs the CLI and waits until the box's processes are gone too (they go with it:
    /// parent-death signal); the first host uid of the range it had.
    fn kill_cli(mut self) -> u64 {
        let pids = self.host_pids();
        self.cli.kill().unwrap();
        self.cli.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids
            .iter()
            .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
        {
            assert!(
                Instant::now() < deadline,
                "the box outlived its CLI: {pids:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.uid_base
    }

    /// Lets the workload end and checks the run's status.
    fn finish(mut self) {
        let mut stdin = self.stdin.take().unwrap();
        stdin.write_all(b"go\n").unwrap();
        drop(stdin);
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut self.stdout, &mut rest);
        let status = self.cli.wait().unwrap();
        assert!(
            status.success() && rest.contains("done"),
            "{status:?}, said {rest:?}"
        );
    }
}

/// `Uid:` or `Gid:` of /proc/PID/status: real, effective, saved, filesystem.
fn status_ids(pid: u32, key: &str) -> Vec<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .split_whitespace()
        .map(|id| id.parse().unwrap())
        .collect()
}

/// The ranges `[start, end)` the host has given out: /etc/subuid and /etc/subgid, and every
/// id of /etc/passwd and /etc/group.
fn host_ranges() -> Vec<(String, u64, u64)> {
    let mut ranges = Vec::new();
    for file in ["/etc/subuid", "/etc/subgid"] {
        for line in std::fs::read_to_string(file).unwrap_or_default().lines() {
            let f: Vec<&str> = line.split(':').collect();
            if let (Some(Ok(start)), Some(Ok(count))) = (
                f.get(1).map(|s| s.parse::<u64>()),
                f.get(2).map(|s| s.parse::<u64>()),
            ) {
                ranges.push((format!("{file}: {line}"), start, start + count));
            }
        }
    }
    for (file, fields) in [("/etc/passwd", &[2, 3][..]), ("/etc/group", &[2][..])] {
        for line in std::fs::read_to_string(file).unwrap_or_default().lines() {
            let f: Vec<&str> = line.split(':').collect();
            for &i in fields {
                if let Some(Ok(id)) = f.get(i).map(|s| s.parse::<u64>()) {
                    ranges.push((format!("{file}: {line}"), id, id + 1));
                }
            }
        }
    }
    ranges
}

fn lease_files() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(LEASE_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn two_userns_containers_at_once_are_root_inside_and_two_different_host_ids() {
    common::require_root("twinbox ctr run --userns");
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    common::leaks::check_no_leaks("two ctr run --userns at once", || {
        let boxes = [Box::start(), Box::start()];
        let mut host_uids = Vec::new();
        for b in &boxes {
            assert_eq!(b.ids, "0:0", "container root is not uid 0 inside");
            assert_eq!(b.uid_base, b.gid_base, "uid and gid ranges differ");
            let pids = b.host_pids();
            assert!(
                pids.len() >= 2,
                "no init and workload under the CLI: {pids:?}"
            );
            for &pid in &pids {
                // Root inside is the range's first id on the host, for every process.
                assert_eq!(status_ids(pid, "Uid:"), vec![b.uid_base; 4], "pid {pid}");
                assert_eq!(status_ids(pid, "Gid:"), vec![b.gid_base; 4], "pid {pid}");
                // The lease's lock is the CLI's alone: no process of the box holds it.
                for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .unwrap()
                    .flatten()
                {
                    let target = std::fs::read_link(fd.path()).unwrap_or_default();
                    assert!(
                        !target.starts_with(LEASE_DIR),
                        "pid {pid} of the box holds {target:?}"
                    );
                }
            }
            host_uids.push(b.uid_base);
            for (what, start, end) in host_ranges() {
                assert!(
                    end <= b.uid_base || start >= b.uid_base + SIZE,
                    "the range {}..{} overlaps {what}",
                    b.uid_base,
                    b.uid_base + SIZE
                );
            }
        }
        let (a, b) = (host_uids[0], host_uids[1]);
        assert!(
            a.abs_diff(b) >= SIZE,
            "two boxes at once share host ids: ranges at {a} and {b}"
        );
        assert_eq!(lease_files().len(), 2, "{:?}", lease_files());
        for b in boxes {
            b.finish();
        }
        assert_eq!(
            lease_files(),
            Vec::<String>::new(),
            "leases left after the runs"
        );
    });
}

#[test]
fn a_sigkilled_cli_frees_its_range_at_once() {
    common::require_root("twinbox ctr run --userns");
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    common::leaks::check_no_leaks("a SIGKILLed ctr run --userns", || {
        let base = Box::start().kill_cli();
        // The lowest free range is taken first, and the killed run's is free again.
        let next = Box::start();
        assert_eq!(
            next.uid_base, base,
            "the killed run's range {base} was not free for the next run"
        );
        next.finish();
        assert_eq!(
            lease_files(),
            Vec::<String>::new(),
            "leases left after the runs"
        );
    });
}

/// A SIGKILLed CLI frees its lock at once, but its box may outlive it for a while (the pid
/// namespace goes asynchronously, a process in D state waits): its range is not handed out
/// again while any host process still has an id in it. Here a process of the test, run as
/// the killed box's root uid and gid (`setpriv`), stands for such a straggler.
#[test]
fn a_killed_run_s_range_waits_for_the_last_process_with_its_ids() {
    common::require_root("twinbox ctr run --userns");
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    common::leaks::check_no_leaks("a killed ctr run --userns with a straggler", || {
        let base = Box::start().kill_cli();
        let id = base.to_string();
        let mut straggler = Command::new("setpriv")
            .args([
                "--reuid",
                &id,
                "--regid",
                &id,
                "--clear-groups",
                "sleep",
                "60",
            ])
            .spawn()
            .expect("setpriv (util-linux) is needed by this test");
        let deadline = Instant::now() + Duration::from_secs(5);
        while status_ids(straggler.id(), "Uid:") != vec![base; 4] {
            assert!(Instant::now() < deadline, "setpriv did not take uid {base}");
            std::thread::sleep(Duration::from_millis(10));
        }
        let next = Box::start();
        let next_base = next.uid_base;
        let stale = lease_files().contains(&format!("{base}.lock"));
        next.finish();
        let _ = straggler.kill();
        let _ = straggler.wait();
        assert_ne!(
            next_base, base,
            "the killed run's range was handed out while a process still ran as {base}"
        );
        assert!(
            stale,
            "the killed run's lock file went while its ids were in use"
        );
        // The straggler gone, the range is free again and its file is swept.
        let last = Box::start();
        assert_eq!(last.uid_base, base, "the killed run's range stayed taken");
        last.finish();
        assert_eq!(
            lease_files(),
            Vec::<String>::new(),
            "leases left after the runs"
        );
    });
}
