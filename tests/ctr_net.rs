//! `twinbox ctr run --net` against the real image (issue 11): the box sees `eth0` with its
//! address and default route; the host and the box move 4 MiB of random bytes each way,
//! checksums compared on both sides; 8 concurrent boxes get 8 distinct links; after a
//! normal exit, SIGTERM and SIGKILL of the CLI no veth, network namespace, host address,
//! held lease lock or nftables rule beyond the one documented `ip twinbox` table is left;
//! `--net nat` masquerades the box out of the host to a namespace the test made, and a plain
//! link does not get there even with the nat run's table in place; a bad `--net` value, an exhausted pool and a missing
//! CAP_NET_ADMIN are one line and exit 125. Each with and without `--userns` where the
//! box's side differs.
//!
//! Traffic goes only between this host, the boxes the tests start (addresses of the
//! 10.201.0.0/16 pool on links the runs make) and the test's own "outside" namespace. Needs root, the built rootfs image,
//! iproute2, nftables and util-linux's setpriv; fails naming what is missing. Runs must not
//! overlap (the leak checks compare host snapshots): one lock for the file, and run it
//! serialized with the other integration tests.

mod common;

use common::host_forwarding::{HostForwarding, FORWARDING_NOTE, IP_FORWARD};
use common::{describe, net};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

/// 4 MiB, the size of each transfer.
const BLOB: usize = 4 << 20;

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn image() -> String {
    common::rootfs_image("twinbox ctr run --net")
}

/// `twinbox ctr run --rootfs IMG --timings ARGS -- /bin/sh -c SCRIPT`, not yet started
/// (`--timings` prints the run's link on stderr).
fn ctr(args: &[&str], script: &str) -> Command {
    let mut command = Command::new(common::twinbox());
    command
        .args(["ctr", "run", "--rootfs", &image(), "--timings"])
        .args(args)
        .args(["--", "/bin/sh", "-c", script]);
    command
}

/// `--net`, plus `--userns` when asked.
fn net_args(userns: bool) -> Vec<&'static str> {
    let mut args = vec!["--net"];
    if userns {
        args.push("--userns");
    }
    args
}

/// The link a run reported (`RunReport.network`, printed by `--timings`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Link {
    address: Ipv4Addr,
    prefix_len: u8,
    gateway: Ipv4Addr,
    host_interface: String,
}

/// Parses `network: eth0 A/P via G (host tbN[, NAT out])` from a run's stderr.
fn reported_link(stderr: &str) -> Option<Link> {
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("network: eth0 "))?;
    let (cidr, rest) = line.split_once(" via ")?;
    let (address, prefix_len) = cidr.split_once('/')?;
    let (gateway, rest) = rest.split_once(" (host ")?;
    let host_interface = rest.split([')', ',']).next()?;
    Some(Link {
        address: address.parse().ok()?,
        prefix_len: prefix_len.parse().ok()?,
        gateway: gateway.parse().ok()?,
        host_interface: host_interface.to_owned(),
    })
}

// ---- what a run may leave on the host's network ----------------------------------------

/// The host's network state that a `--net` run touches, at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NetState {
    /// IPv4 addresses on the host's interfaces (`ip -4 -o addr`: interface and CIDR).
    addresses: BTreeSet<String>,
    /// `nft list ruleset` without the `ip twinbox` table, which `--net nat` may leave by
    /// design (documented in net/src/nat.rs).
    ruleset_without_ours: String,
    /// Lease lock files, and which of them some process holds locked.
    leases: net::Leases,
}

impl NetState {
    fn snapshot() -> Self {
        Self {
            addresses: net::host_addresses(),
            leases: net::Leases::now(),
            ruleset_without_ours: net::ruleset_without_ours(),
        }
    }

    /// What `after` holds that this snapshot did not; lease files left unlocked are
    /// allowed only when `killed` (a SIGKILLed run cannot unlink its lock file; the next
    /// acquisition of that index reuses it).
    fn leaks(&self, after: &NetState, killed: bool) -> Vec<String> {
        let mut leaks = Vec::new();
        let new_addresses = net::added(&self.addresses, &after.addresses);
        if !new_addresses.is_empty() {
            leaks.push(format!("host addresses {new_addresses:?}"));
        }
        if after.ruleset_without_ours != self.ruleset_without_ours {
            leaks.push(format!(
                "nftables rules outside table ip twinbox:\nbefore:\n{}\nafter:\n{}",
                self.ruleset_without_ours, after.ruleset_without_ours
            ));
        }
        leaks.extend(self.leases.leaks(&after.leases, killed));
        leaks
    }
}

/// Host resources (common leak check) and network state, before a run.
type Before = net::Before<NetState>;

impl Before {
    fn now() -> Self {
        Self::take(NetState::snapshot)
    }

    /// Fails naming what `what` left behind, after letting the kernel finish tearing
    /// down network namespaces (their cleanup runs in a workqueue, after the last task).
    fn assert_nothing_left(&self, what: &str, killed: bool) {
        let settled = eventually(Duration::from_secs(5), || {
            let now = common::leaks::HostResources::snapshot();
            now.links == self.host.links
                && now.netns == self.host.netns
                && self.net.leaks(&NetState::snapshot(), killed).is_empty()
        });
        if !settled {
            let leaks = self.net.leaks(&NetState::snapshot(), killed);
            assert!(leaks.is_empty(), "{what} left {}", leaks.join("; "));
        }
        self.host
            .assert_nothing_leaked(&common::leaks::HostResources::snapshot(), what);
    }
}

/// Polls `done` every 20 ms until it holds or `limit` passes.
fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if done() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- a running box, read line by line ---------------------------------------------------

/// A started CLI whose stdout lines arrive on a channel, and whose stderr is collected.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Running {
    fn start(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run twinbox");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stderr_pipe = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr_pipe.read_to_string(&mut text);
            text
        });
        Self {
            child,
            lines,
            stderr,
        }
    }

    /// The rest of the first stdout line starting with `prefix`; fails after 30 s or
    /// when the box ends first, with what it said.
    fn expect_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => match line.strip_prefix(prefix) {
                    Some(rest) => return rest.trim().to_owned(),
                    None => seen.push(line),
                },
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!(
            "the box never printed {prefix:?}; stdout: {seen:?}\nstderr: {}",
            self.take_stderr()
        );
    }

    fn take_stderr(&mut self) -> String {
        std::mem::replace(&mut self.stderr, std::thread::spawn(String::new))
            .join()
            .unwrap_or_default()
    }

    /// Waits for the CLI; its exit status and stderr.
    fn finish(mut self) -> (Option<i32>, String) {
        let status = self.child.wait().expect("wait for twinbox");
        (status.code(), self.take_stderr())
    }
}

fn sha256(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum (coreutils)");
    let mut stdin = child.stdin.take().unwrap();
    let data = bytes.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().expect("sha256sum");
    writer.join().unwrap().expect("feed sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// The first IPv4 name server of the host's resolv.conf outside 127/8, as hostnet's
/// `host_resolver` chooses it for the box.
fn reachable_host_resolver() -> Option<Ipv4Addr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .filter_map(|v| v.trim().parse::<Ipv4Addr>().ok())
        .find(|a| !a.is_loopback() && !a.is_unspecified())
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("read /dev/urandom");
    bytes
}

// ---- tests -----------------------------------------------------------------------------

#[test]
fn the_box_sees_eth0_with_its_address_default_route_and_resolver() {
    let _serial = serial();
    let script = "ip -4 -o addr show dev eth0; ip route show default; \
                  ip -o link show lo | grep -q UP && echo lo-up; \
                  grep -c nameserver /etc/resolv.conf; grep Cap /proc/self/status; \
                  ls /sys/class/net";
    for userns in [false, true] {
        let what = format!("ctr run --net (userns: {userns})");
        let before = Before::now();
        let out = ctr(&net_args(userns), script)
            .output()
            .expect("run twinbox");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.code(), Some(0), "{what}: {}", describe(&out));
        let link = reported_link(&stderr)
            .unwrap_or_else(|| panic!("{what}: no network line (--timings): {}", describe(&out)));
        assert_eq!(link.prefix_len, 30, "{link:?}");
        for expected in [
            format!("inet {}/30", link.address),
            format!("default via {} dev eth0", link.gateway),
            "lo-up".to_string(),
        ] {
            assert!(
                stdout.contains(&expected),
                "{what}: {expected:?} missing: {}",
                describe(&out)
            );
        }
        // Only lo and eth0: the host's interfaces are not the box's.
        let interfaces: BTreeSet<&str> = stdout
            .lines()
            .skip_while(|l| !l.starts_with("CapAmb"))
            .skip(1)
            .flat_map(str::split_whitespace)
            .collect();
        assert_eq!(
            interfaces,
            BTreeSet::from(["eth0", "lo"]),
            "{what}: {}",
            describe(&out)
        );
        // CAP_NET_ADMIN was lent to init for eth0 only: the workload has none of it.
        for set in ["CapEff:", "CapBnd:", "CapPrm:"] {
            let mask = stdout
                .lines()
                .find_map(|l| l.strip_prefix(set))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
                .unwrap_or_else(|| panic!("{what}: no {set} line: {}", describe(&out)));
            assert_eq!(mask & 1 << 12, 0, "{what}: {set} has CAP_NET_ADMIN");
        }
        // The host's resolver, when it has one a box can reach (what hostnet picks).
        let host_resolver = reachable_host_resolver();
        let expected_servers = if host_resolver.is_some() { "1" } else { "0" };
        assert!(
            stdout.lines().any(|l| l == expected_servers),
            "{what}: expected {expected_servers} nameserver line(s) for {host_resolver:?}: {}",
            describe(&out)
        );
        before.assert_nothing_left(&what, false);
    }
}

#[test]
fn host_and_box_move_4_mib_each_way_byte_exact() {
    let _serial = serial();
    // The box: say where it is, serve one echo connection (keeping a copy), then send its
    // own 4 MiB to the host end, retrying until the test listens.
    let script = r#"
        set -e
        echo "box $(ip -4 -o addr show dev eth0 | awk '{print $4}') $(ip route show default | awk '{print $3}')"
        head -c 4194304 /dev/urandom > /tmp/out
        echo "sent $(sha256sum < /tmp/out | cut -d' ' -f1)"
        nc -l -p 7001 -e tee /tmp/got
        echo "got $(sha256sum < /tmp/got | cut -d' ' -f1) $(wc -c < /tmp/got)"
        gw=$(ip route show default | awk '{print $3}')
        i=0
        until nc "$gw" 7002 < /tmp/out; do
            i=$((i + 1)); [ $i -lt 100 ] || exit 9; sleep 0.1
        done
        echo done
    "#;
    for userns in [false, true] {
        let what = format!("TCP both ways (userns: {userns})");
        let before = Before::now();
        let mut running = Running::start(ctr(&net_args(userns), script));
        let where_ = running.expect_line("box ");
        let (cidr, gateway) = where_.split_once(' ').expect("box ADDR/LEN GW");
        let address: Ipv4Addr = cidr.split('/').next().unwrap().parse().expect(cidr);
        let gateway: Ipv4Addr = gateway.parse().expect(gateway);
        let box_sent = running.expect_line("sent ");

        // Host -> box: the echo server returns every byte; the box hashes what it got.
        let blob = random_bytes(BLOB);
        let echo_addr = SocketAddrV4::new(address, 7001);
        let mut stream = None;
        eventually(Duration::from_secs(20), || {
            stream = TcpStream::connect_timeout(&echo_addr.into(), Duration::from_secs(2)).ok();
            stream.is_some()
        });
        let stream =
            stream.unwrap_or_else(|| panic!("{what}: cannot connect to the box at {echo_addr}"));
        let mut writer = stream.try_clone().unwrap();
        let to_send = blob.clone();
        let sender = std::thread::spawn(move || {
            writer.write_all(&to_send)?;
            writer.shutdown(Shutdown::Write)
        });
        let mut echoed = Vec::with_capacity(BLOB);
        (&stream).read_to_end(&mut echoed).expect("read the echo");
        sender.join().unwrap().expect("send 4 MiB to the box");
        assert!(
            echoed == blob,
            "{what}: the echo differs ({} of {} bytes back)",
            echoed.len(),
            blob.len()
        );
        let host_sum = sha256(&blob);
        let box_got = running.expect_line("got ");
        assert_eq!(
            box_got,
            format!("{host_sum} {BLOB}"),
            "{what}: the box received other bytes than the host sent"
        );

        // Box -> host: a listener on the host end's address, exactly 4 MiB.
        let listener = TcpListener::bind(SocketAddrV4::new(gateway, 7002))
            .unwrap_or_else(|e| panic!("{what}: listen on the host end {gateway}:7002: {e}"));
        let (mut conn, peer) = listener.accept().expect("the box connects");
        assert_eq!(peer.ip(), std::net::IpAddr::V4(address), "{what}");
        let mut received = vec![0u8; BLOB];
        conn.read_exact(&mut received).expect("4 MiB from the box");
        drop(conn);
        assert_eq!(
            sha256(&received),
            box_sent,
            "{what}: the host received other bytes than the box sent"
        );
        running.expect_line("done");
        let (status, stderr) = running.finish();
        assert_eq!(status, Some(0), "{what}: {stderr}");
        let link = reported_link(&stderr)
            .unwrap_or_else(|| panic!("{what}: no network line (--timings): {stderr}"));
        assert_eq!((link.address, link.gateway), (address, gateway), "{what}");
        before.assert_nothing_left(&what, false);
    }
}

#[test]
fn eight_concurrent_boxes_get_eight_distinct_links() {
    let _serial = serial();
    let before = Before::now();
    let script = "ip -4 -o addr show dev eth0 | awk '{print \"inet \" $4}'; sleep 2";
    let runs: Vec<Child> = (0..8)
        .map(|_| {
            ctr(&["--net"], script)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run twinbox")
        })
        .collect();
    let mut links = Vec::new();
    for run in runs {
        let out = run.wait_with_output().expect("wait for twinbox");
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        let link = reported_link(&String::from_utf8_lossy(&out.stderr))
            .unwrap_or_else(|| panic!("no network line (--timings): {}", describe(&out)));
        let seen = String::from_utf8_lossy(&out.stdout);
        assert!(
            seen.contains(&format!("inet {}/30", link.address)),
            "the box does not have the address its run reported: {}",
            describe(&out)
        );
        links.push(link);
    }
    let addresses: BTreeSet<_> = links.iter().map(|l| l.address).collect();
    let gateways: BTreeSet<_> = links.iter().map(|l| l.gateway).collect();
    let interfaces: BTreeSet<_> = links.iter().map(|l| l.host_interface.clone()).collect();
    assert_eq!(
        (addresses.len(), gateways.len(), interfaces.len()),
        (8, 8, 8),
        "links shared between concurrent runs: {links:#?}"
    );
    // No two /30s overlap: distinct network addresses.
    let networks: BTreeSet<u32> = links.iter().map(|l| u32::from(l.address) & !3).collect();
    assert_eq!(networks.len(), 8, "{links:#?}");
    before.assert_nothing_left("8 concurrent --net runs", false);
}

/// Host interfaces named like a box link's host end (`tb<N>`).
fn host_ends() -> BTreeSet<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.strip_prefix("tb")
                .is_some_and(|i| i.parse::<u32>().is_ok())
        })
        .collect()
}

#[test]
fn sigterm_and_sigkill_of_the_cli_leave_no_link() {
    let _serial = serial();
    for (signal, killed) in [(libc::SIGTERM, false), (libc::SIGKILL, true)] {
        for userns in [false, true] {
            let what = format!("signal {signal} to ctr run --net (userns: {userns})");
            let before = Before::now();
            let ends_before = host_ends();
            let mut running = Running::start(ctr(&net_args(userns), "echo up; exec sleep 60"));
            running.expect_line("up");
            let made: Vec<String> = host_ends().difference(&ends_before).cloned().collect();
            assert_eq!(made.len(), 1, "{what}: the run's host end: {made:?}");
            let pid = running.child.id();
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(pid as i32, signal) };
            let (status, stderr) = running.finish();
            assert_eq!(
                status,
                (!killed).then_some(128 + signal),
                "{what}: {stderr}"
            );
            if killed {
                // The container dies with its CLI (parent-death signal) and its network
                // namespace with it; the next start sweeps the cgroup and staging dir.
                let out = Command::new(common::twinbox())
                    .args(["ctr", "run", "--rootfs", &image(), "--", "/bin/true"])
                    .output()
                    .expect("run twinbox");
                assert_eq!(out.status.code(), Some(0), "{what}: {}", describe(&out));
            }
            assert!(
                eventually(Duration::from_secs(5), || !host_ends().contains(&made[0])),
                "{what}: host end {} still there",
                made[0]
            );
            before.assert_nothing_left(&what, killed);
        }
    }
}

/// Fails unless `out` is exit 125 with exactly one line on stderr containing `needle`.
fn assert_one_line_125(out: &Output, needle: &str, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{what}: {}", describe(out));
    assert_eq!(
        stderr.lines().count(),
        1,
        "{what}: not one line: {}",
        describe(out)
    );
    assert!(
        stderr.contains(needle),
        "{what}: {needle:?} missing: {}",
        describe(out)
    );
}

#[test]
fn bad_net_value_exhausted_pool_and_no_net_admin_are_one_line_125_and_leave_nothing() {
    let _serial = serial();
    let before = Before::now();
    let out = ctr(&["--net", "bridge"], "true")
        .output()
        .expect("run twinbox");
    assert_one_line_125(&out, "--net \"bridge\"", "malformed --net");
    before.assert_nothing_left("malformed --net", false);

    let before = Before::now();
    {
        let _held = net::HeldLeases::take(4);
        let out = ctr(&["--net"], "true")
            .env("TWINBOX_NET_POOL", "10.201.0.0/28")
            .output()
            .expect("run twinbox");
        assert_one_line_125(&out, "exhausted", "exhausted pool");
    }
    before.assert_nothing_left("exhausted pool", false);

    // Root without CAP_NET_ADMIN (setpriv drops it from the bounding set, so the exec'd
    // CLI has it in no set): the veth is refused.
    let before = Before::now();
    let mut command = Command::new("setpriv");
    command
        .args(["--bounding-set", "-net_admin", "--"])
        .arg(common::twinbox())
        .args([
            "ctr",
            "run",
            "--rootfs",
            &image(),
            "--net",
            "--",
            "/bin/true",
        ]);
    let out = command.output().expect("setpriv (util-linux)");
    assert_one_line_125(&out, "CAP_NET_ADMIN", "no CAP_NET_ADMIN");
    before.assert_nothing_left("no CAP_NET_ADMIN", false);
}

#[test]
fn without_net_the_box_has_only_lo() {
    let _serial = serial();
    let before = Before::now();
    let out = ctr(&[], "ls /sys/class/net; ip -4 route")
        .output()
        .expect("run twinbox");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["lo"],
        "{}",
        describe(&out)
    );
    assert!(
        reported_link(&String::from_utf8_lossy(&out.stderr)).is_none(),
        "{}",
        describe(&out)
    );
    before.assert_nothing_left("ctr run without --net", false);
}

#[test]
fn the_reported_link_parses() {
    let link = reported_link(
        "twinbox-init: workload exited with status 0\n\
         network: eth0 10.201.0.6/30 via 10.201.0.5 (host tb1, NAT out)\n",
    );
    assert_eq!(
        link,
        Some(Link {
            address: Ipv4Addr::new(10, 201, 0, 6),
            prefix_len: 30,
            gateway: Ipv4Addr::new(10, 201, 0, 5),
            host_interface: "tb1".into(),
        })
    );
    assert_eq!(
        net::without_our_table(
            "table inet f {\n}\ntable ip twinbox {\n\tchain a {\n\t}\n}\ntable ip x {\n}\n"
        ),
        "table inet f {\n}\ntable ip x {\n}\n"
    );
}

/// A "NIC" of the host made by the test: a veth `<host_end><N>` on the host (`host`/30, not
/// a `tb*` name) to `far_end` (`far`/30, default route via the host) in a named network
/// namespace `<netns><N>` of its own (N from the test's pid). Deleting the namespace on drop
/// takes the pair, host end included.
struct TestNic {
    netns: String,
    host_end: String,
}

impl TestNic {
    fn new(netns: &str, host_end: &str, far_end: &str, host: &str, far: &str) -> Self {
        let id = std::process::id() % 100_000;
        let nic = Self {
            netns: format!("{netns}{id}"),
            host_end: format!("{host_end}{id}"),
        };
        let host_cidr = format!("{host}/30");
        let far_cidr = format!("{far}/30");
        let (netns, host_end) = (nic.netns.as_str(), nic.host_end.as_str());
        for args in [
            vec!["netns", "add", netns],
            vec![
                "link", "add", host_end, "type", "veth", "peer", "name", far_end, "netns", netns,
            ],
            vec!["addr", "add", &host_cidr, "dev", host_end],
            vec!["link", "set", host_end, "up"],
            vec!["-n", netns, "addr", "add", &far_cidr, "dev", far_end],
            vec!["-n", netns, "link", "set", far_end, "up"],
            // Answers to the test's other NIC go back through the host too.
            vec!["-n", netns, "route", "add", "default", "via", host],
        ] {
            net::run_tool("ip", &args);
        }
        nic
    }

    /// Runs `f` on a thread that joined the namespace (network namespaces are per thread).
    /// The thread holds no reference to the namespace once `f` returns.
    fn spawn_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.netns);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns of this thread only, on an fd it owns.
            let r =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
            drop(ns);
            f()
        })
    }
}

impl Drop for TestNic {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// A network namespace standing for "the world outside the host", made by the test: a
/// veth `tno<N>` on the host (10.254.253.1/30, not a `tb*` name, so the NAT table treats
/// it as a way out) to `out0` (10.254.253.2/30) in the namespace. Deleted on drop.
struct Outside {
    nic: TestNic,
}

impl Outside {
    const HOST: &'static str = "10.254.253.1";
    const FAR: &'static str = "10.254.253.2";

    fn new() -> Self {
        Self {
            nic: TestNic::new("tbnat", "tno", "out0", Self::HOST, Self::FAR),
        }
    }

    /// Accepts one TCP connection on FAR:`port` inside the namespace (a thread that
    /// joined it) within `wait`, and sends back the peer's address. The thread ends either
    /// way, so it does not keep the namespace alive.
    fn accept_one(&self, port: u16, wait: Duration) -> mpsc::Receiver<Result<Ipv4Addr, String>> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        self.nic.spawn_in(move || {
            let result = (|| {
                let far: Ipv4Addr = Outside::FAR.parse().unwrap();
                let listener = TcpListener::bind(SocketAddrV4::new(far, port))
                    .map_err(|e| format!("listen on {far}:{port}: {e}"))?;
                listener
                    .set_nonblocking(true)
                    .map_err(|e| format!("nonblocking: {e}"))?;
                let _ = ready_tx.send(());
                let deadline = Instant::now() + wait;
                let peer = loop {
                    match listener.accept() {
                        Ok((_conn, peer)) => break peer,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            if Instant::now() > deadline {
                                return Err(format!("no connection within {wait:?}"));
                            }
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(e) => return Err(format!("accept: {e}")),
                    }
                };
                match peer.ip() {
                    std::net::IpAddr::V4(ip) => Ok(ip),
                    other => Err(format!("IPv6 peer {other}")),
                }
            })();
            let _ = ready_tx.send(());
            let _ = tx.send(result);
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the outside listener starts");
        rx
    }
}

#[test]
fn nat_masquerades_the_box_out_of_the_host_and_link_does_not() {
    let _serial = serial();
    let saved = HostForwarding::save();
    let before = Before::now();
    {
        let outside = Outside::new();
        let script = format!(
            "nc -w 5 {} 7003 </dev/null && echo reached || echo unreachable",
            Outside::FAR
        );
        // With nat: the far side sees the host's address on the way out, not the box's.
        let peer = outside.accept_one(7003, Duration::from_secs(30));
        let out = ctr(&["--net", "nat"], &script)
            .output()
            .expect("run twinbox");
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        let note = reported_link(&String::from_utf8_lossy(&out.stderr))
            .unwrap_or_else(|| panic!("no network line (--timings): {}", describe(&out)));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(", NAT out)"),
            "the report does not say NAT: {}",
            describe(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("reached"),
            "the box did not get out through NAT: {}",
            describe(&out)
        );
        let seen = peer
            .recv_timeout(Duration::from_secs(5))
            .expect("the outside listener answers")
            .expect("the outside listener");
        assert_eq!(
            seen.to_string(),
            Outside::HOST,
            "the far side saw {seen}, not the host's address (box {})",
            note.address
        );
        assert!(
            net::run_tool("nft", &["list", "table", "ip", "twinbox"]).contains("masquerade"),
            "no masquerade rule in table ip twinbox"
        );

        // With a plain link the box reaches the host and nothing beyond it, though the nat
        // run's table stays installed (by design) and ip_forward is on: its host end does
        // not forward and the table forwards only NAT links. So nothing connects, though a
        // listener is there.
        assert!(
            net::run_tool("nft", &["list", "tables"]).contains("table ip twinbox"),
            "the nat run's table is gone"
        );
        let peer = outside.accept_one(7003, Duration::from_secs(4));
        let out = ctr(&["--net"], &script.replace("-w 5", "-w 2"))
            .output()
            .expect("run twinbox");
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("unreachable"),
            "a plain --net box got out beside the nat table: {}",
            describe(&out)
        );
        let seen = peer
            .recv_timeout(Duration::from_secs(10))
            .expect("the outside listener ends");
        assert!(seen.is_err(), "without nat the far side saw {seen:?}");
        // The same box still reaches its host end (its gateway) on that link. The
        // listener closes what it accepts, so the box's nc ends.
        let host = TcpListener::bind("0.0.0.0:0").expect("listen on the host");
        let port = host.local_addr().unwrap().port();
        std::thread::spawn(move || drop(host.accept()));
        let out = ctr(
            &["--net"],
            &format!("nc -w 5 \"$(ip route | awk '/default/ {{print $3}}')\" {port} </dev/null && echo reached"),
        )
        .output()
        .expect("run twinbox");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("reached"),
            "a plain --net box did not reach the host: {}",
            describe(&out)
        );
    }
    // Put the host back as it was: ip_forward and the table are what --net nat changes.
    drop(saved);
    before.assert_nothing_left("--net nat", false);
}

/// A second "NIC" of the host, made by the test: a veth `tnl<N>` (10.254.252.1/30, not a
/// `tb*` name) to `lan0` (10.254.252.2/30, default route via the host) in a namespace of
/// its own. Traffic from it to [`Outside`] crosses the host only if the host routes
/// between its own interfaces. Deleted on drop.
struct Lan {
    nic: TestNic,
}

impl Lan {
    const HOST: &'static str = "10.254.252.1";
    const FAR: &'static str = "10.254.252.2";

    fn new() -> Self {
        Self {
            nic: TestNic::new("tblan", "tnl", "lan0", Self::HOST, Self::FAR),
        }
    }

    /// A TCP connection from inside the namespace to `to:port` within `wait`.
    fn connect(&self, to: &str, port: u16, wait: Duration) -> Result<(), String> {
        let to: Ipv4Addr = to.parse().unwrap();
        self.nic
            .spawn_in(move || {
                TcpStream::connect_timeout(&SocketAddrV4::new(to, port).into(), wait)
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
            .join()
            .expect("the connecting thread")
    }
}

/// Turns forwarding of what `interface` receives on, as systemd-networkd's per-link
/// `IPForward=` does.
fn forward_on(interface: &str) {
    std::fs::write(
        format!("/proc/sys/net/ipv4/conf/{interface}/forwarding"),
        "1\n",
    )
    .unwrap_or_else(|e| panic!("forwarding of {interface}: {e}"));
}

/// `--net nat` on a host that did not route (ip_forward 0) lets its NAT box out but does
/// not make the host a router: traffic from one of the host's other interfaces to another
/// (the test's `Lan` to its `Outside`) is not forwarded. On a host that already routed —
/// ip_forward 1, or ip_forward 0 with those two interfaces' own `forwarding` 1 (a per-link
/// router) — that traffic is forwarded after, as the host had it, and no note is left.
#[test]
fn nat_on_a_host_that_did_not_route_forwards_nothing_but_its_boxes() {
    let _serial = serial();
    let saved = HostForwarding::save();
    let before = Before::now();
    {
        let outside = Outside::new();
        let lan = Lan::new();
        let script = format!(
            "nc -w 5 {} 7004 </dev/null && echo reached || echo unreachable",
            Outside::FAR
        );
        for (ip_forward, per_link, host_routes) in [
            ("1\n", false, true),
            ("0\n", true, true),
            ("0\n", false, false),
        ] {
            let what = format!(
                "ip_forward {} (the test's NICs forwarding on their own: {per_link}) before \
                 --net nat",
                ip_forward.trim()
            );
            HostForwarding::fresh(ip_forward);
            if per_link {
                forward_on(&lan.nic.host_end);
                forward_on(&outside.nic.host_end);
                // A note of this boot that a killed run left (it wrote the note, then
                // died before its sysctl write): it must not outlive this run.
                let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
                std::fs::write(FORWARDING_NOTE, boot_id).unwrap();
            }
            let peer = outside.accept_one(7004, Duration::from_secs(30));
            let out = ctr(&["--net", "nat"], &script)
                .output()
                .expect("run twinbox");
            assert_eq!(out.status.code(), Some(0), "{what}: {}", describe(&out));
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("reached"),
                "{what}: the NAT box did not get out: {}",
                describe(&out)
            );
            let seen = peer.recv_timeout(Duration::from_secs(5));
            assert_eq!(
                seen.map(|p| p.map(|ip| ip.to_string())),
                Ok(Ok(Outside::HOST.to_string())),
                "{what}: the outside did not see the masqueraded NAT box"
            );
            assert_eq!(
                std::fs::read_to_string(IP_FORWARD).unwrap(),
                "1\n",
                "{what}: ip_forward after the run"
            );
            assert_eq!(
                HostForwarding::noted(),
                !host_routes,
                "{what}: twinbox's note that it turned ip_forward on"
            );

            let peer = outside.accept_one(7005, Duration::from_secs(4));
            let connected = lan.connect(Outside::FAR, 7005, Duration::from_secs(2));
            let seen = peer
                .recv_timeout(Duration::from_secs(10))
                .expect("the outside listener ends");
            if host_routes {
                assert_eq!(
                    (connected, seen.map(|ip| ip.to_string())),
                    (Ok(()), Ok(Lan::FAR.to_string())),
                    "{what}: the host's own routing between its interfaces was changed"
                );
            } else {
                assert!(
                    connected.is_err() && seen.is_err(),
                    "{what}: the host now forwards between its other interfaces \
                     (connected: {connected:?}, outside saw: {seen:?})"
                );
            }
        }
    }
    drop(saved);
    before.assert_nothing_left("--net nat on a host that did not route", false);
}

/// A `--net nat` run that cannot install its table (here: no `nft` on PATH) fails with one
/// line and exit 125 and leaves a host that did not route as it was: ip_forward 0, no
/// note, no table, and nothing forwarded between the host's other interfaces.
#[test]
fn a_nat_run_whose_table_fails_leaves_ip_forward_off_and_forwards_nothing() {
    let _serial = serial();
    let saved = HostForwarding::save();
    let before = Before::now();
    {
        let outside = Outside::new();
        let lan = Lan::new();
        HostForwarding::fresh("0\n");
        let no_nft = tempfile_dir("twinbox-no-nft");
        let out = ctr(&["--net", "nat"], "echo ran")
            .env("PATH", &no_nft)
            .output()
            .expect("run twinbox");
        let _ = std::fs::remove_dir(&no_nft);
        assert_one_line_125(&out, "nft", "--net nat without nft");
        assert_eq!(
            std::fs::read_to_string(IP_FORWARD).unwrap(),
            "0\n",
            "a failed --net nat left ip_forward on"
        );
        assert!(!HostForwarding::noted(), "a failed --net nat left its note");
        assert_eq!(
            HostForwarding::table(),
            None,
            "a failed --net nat left a table"
        );
        let peer = outside.accept_one(7006, Duration::from_secs(4));
        let connected = lan.connect(Outside::FAR, 7006, Duration::from_secs(2));
        let seen = peer
            .recv_timeout(Duration::from_secs(10))
            .expect("the outside listener ends");
        assert!(
            connected.is_err() && seen.is_err(),
            "after a failed --net nat the host forwards between its other interfaces \
             (connected: {connected:?}, outside saw: {seen:?})"
        );
    }
    drop(saved);
    before.assert_nothing_left("a --net nat run without nft", false);
}

/// An empty directory of this test's own, for a PATH with nothing in it.
fn tempfile_dir(prefix: &str) -> String {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.display().to_string()
}

#[test]
fn sigkill_of_the_cli_at_any_point_of_a_net_start_leaves_no_link() {
    let _serial = serial();
    for userns in [false, true] {
        for delay_ms in [0u64, 2, 5, 10, 15, 20, 30, 50, 100] {
            let what = format!("SIGKILL after {delay_ms} ms of ctr run --net (userns: {userns})");
            let before = Before::now();
            let mut cli = ctr(&net_args(userns), "exec sleep 30")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("run twinbox");
            std::thread::sleep(Duration::from_millis(delay_ms));
            cli.kill().expect("SIGKILL the CLI");
            cli.wait().unwrap();
            // The next start sweeps the killed run's cgroup and staging directory; the
            // link goes with the container's network namespace, the lease with the CLI.
            let out = Command::new(common::twinbox())
                .args(["ctr", "run", "--rootfs", &image(), "--", "/bin/true"])
                .output()
                .expect("run twinbox");
            assert_eq!(out.status.code(), Some(0), "{what}: {}", describe(&out));
            before.assert_nothing_left(&what, true);
        }
    }
}
