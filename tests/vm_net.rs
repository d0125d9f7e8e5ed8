//! `twinbox vm run --net` (issue 11, the VM's side).
//!
//! Where Linux boots (the lab: QEMU's software CPU with kvm_amd, see tests/common/lab.rs; or
//! a host with hardware KVM): the guest's `eth0` has its address and default route, the host
//! pings the guest and moves 4 MiB of random bytes through a TCP echo in the guest (busybox
//! `nc`), checksums compared on both sides, the guest pings and connects to the host, the
//! guest has the virtio-rng as its hardware RNG, iperf3 moves data both ways (printed, not
//! asserted beyond "more than zero"), and after a normal run and after SIGKILL of the VMM no
//! tap, host address or held lease is left. All of that runs with the VMM's seccomp filters
//! in kill mode (the default), so a call the network path needs and the filters lack kills
//! the run.
//!
//! On this host, whatever its KVM (PVM boots no Linux in time): a run with `--net` that ends
//! at its time limit has the tap `tbt<i>` with its host address while it runs, names the
//! link in its report and leaves nothing; a SIGKILLed run leaves nothing; a bad `--net`
//! value, an exhausted pool and a missing CAP_NET_ADMIN are one line and exit 125 and leave
//! nothing.
//!
//! Traffic goes only between this machine (or the lab VM) and the guests the tests start,
//! on the links the runs make. Needs root, /dev/kvm, the built artifacts, /dev/net/tun,
//! iproute2 and util-linux's setpriv (and for the lab its kernel, QEMU and iperf3 on this
//! host); fails naming what is missing. Run it serialized with the other integration
//! tests: the leak checks compare host snapshots.

mod common;

use common::lab::LabOutput;
use common::{describe, net};
use std::collections::BTreeSet;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn image() -> String {
    common::rootfs_image("twinbox vm run --net")
}

/// `twinbox vm run --rootfs IMG ARGS -- CMD...`, not yet started.
fn vm(args: &[&str], cmd: &[&str]) -> Command {
    let mut command = Command::new(common::twinbox());
    command
        .args(["vm", "run", "--rootfs", &image()])
        .args(args)
        .arg("--")
        .args(cmd);
    command
}

/// What a VM's link could leave on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NetState {
    /// Interfaces in /sys/class/net.
    links: BTreeSet<String>,
    /// `interface address/prefix` of every IPv4 address.
    addresses: BTreeSet<String>,
    leases: net::Leases,
}

impl NetState {
    fn snapshot() -> Self {
        Self {
            links: net::host_links(),
            addresses: net::host_addresses(),
            leases: net::Leases::now(),
        }
    }

    /// The taps in this snapshot that `before` did not have.
    fn new_taps(&self, before: &NetState) -> Vec<String> {
        self.links
            .difference(&before.links)
            .filter(|l| l.starts_with("tbt"))
            .cloned()
            .collect()
    }
}

/// The host before a run.
type Before = net::Before<NetState>;

impl Before {
    fn now() -> Self {
        Self::take(NetState::snapshot)
    }

    /// Fails naming what `what` left: links, addresses, held leases, and lease files
    /// unless the run was `killed`.
    fn assert_nothing_left(&self, what: &str, killed: bool) {
        let after = NetState::snapshot();
        let mut leaks = Vec::new();
        let new = net::added::<String>;
        for (kind, items) in [
            ("links", new(&self.net.links, &after.links)),
            ("host addresses", new(&self.net.addresses, &after.addresses)),
        ] {
            if !items.is_empty() {
                leaks.push(format!("{kind} {items:?}"));
            }
        }
        leaks.extend(self.net.leases.leaks(&after.leases, killed));
        assert!(leaks.is_empty(), "{what} left {}", leaks.join("; "));
        self.host
            .assert_nothing_leaked(&common::leaks::HostResources::snapshot(), what);
    }
}

/// Waits (up to 60 s) for `child` to make a tap, and returns its name and state then.
fn wait_for_tap(before: &Before, child: &mut Child) -> (String, NetState) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = NetState::snapshot();
        if let Some(tap) = now.new_taps(&before.net).first() {
            return (tap.clone(), now);
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                std::io::Read::read_to_string(&mut stderr, &mut err).ok();
            }
            panic!("vm run --net ended ({status}) without a tap tbt<i> ever appearing: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "no tap tbt<i> appeared within 60 s of vm run --net"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The host address the tap `tap` had in `state`.
fn tap_address(state: &NetState, tap: &str) -> String {
    state
        .addresses
        .iter()
        .find_map(|a| a.strip_prefix(&format!("{tap} ")))
        .unwrap_or_else(|| panic!("tap {tap} has no IPv4 address: {:?}", state.addresses))
        .to_owned()
}

fn assert_one_line_125(out: &Output, needle: &str, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{what}: {}", describe(out));
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("twinbox: note:"))
        .collect();
    assert_eq!(lines.len(), 1, "{what}: one line, got {stderr:?}");
    assert!(
        lines[0].starts_with("twinbox: ") && lines[0].contains(needle),
        "{what}: {stderr:?} should mention {needle:?}"
    );
}

/// On this host, whatever its KVM: the run's time limit ends it (on PVM the kernel is
/// still booting; elsewhere `sleep` is still sleeping), so the link's life is the VMM's.
#[test]
fn a_run_with_net_holds_its_tap_while_it_runs_reports_the_link_and_leaves_nothing() {
    let _serial = serial();
    common::kvm::require_kvm("twinbox vm run --net");
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "/dev/net/tun missing: modprobe tun"
    );
    let before = Before::now();
    let mut child = vm(
        &["--net", "--json", "--timeout", "4"],
        &["/bin/sleep", "30"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("run twinbox");
    let (tap, during) = wait_for_tap(&before, &mut child);
    let host_address = tap_address(&during, &tap);
    let lease = format!("{}.lock", tap.trim_start_matches("tbt"));
    assert!(
        during.leases.held.contains(&lease),
        "the run must hold lease {lease} while it runs: {:?}",
        during.leases.held
    );
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("time limit"),
        "{}",
        describe(&out)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("--json is not JSON ({e}): {}", describe(&out)));
    let link = &report["network"];
    assert_eq!(link["host_interface"], tap.as_str(), "report: {report}");
    let host = link["host_address"].as_str().expect("host_address");
    let prefix = link["prefix_len"].as_u64().expect("prefix_len");
    assert_eq!(format!("{host}/{prefix}"), host_address, "report: {report}");
    assert_eq!(prefix, 30);
    let index: u8 = tap.trim_start_matches("tbt").parse().unwrap();
    assert_eq!(
        link["mac"],
        format!("02:74:62:00:00:{index:02x}").as_str(),
        "the guest MAC is 02:74:62 plus the link index: {report}"
    );
    assert_eq!(link["nat"], false);
    before.assert_nothing_left("vm run --net ending at its time limit", false);

    // --net nat: the same link, NAT on (the `ip twinbox` table is documented to stay).
    let before = Before::now();
    let out = vm(
        &["--net", "nat", "--json", "--timeout", "2"],
        &["/bin/sleep", "30"],
    )
    .output()
    .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("--json is not JSON ({e}): {}", describe(&out)));
    assert_eq!(report["network"]["nat"], true, "--net nat: {report}");
    assert!(
        net::run_tool("nft", &["list", "table", "ip", "twinbox"]).contains("masquerade"),
        "--net nat installs the ip twinbox table"
    );
    before.assert_nothing_left("vm run --net nat", false);

    // SIGKILL of the VMM: the kernel closes the tap's fds (the interface goes) and the
    // lease's flock.
    let before = Before::now();
    let mut child = vm(&["--net", "--timeout", "60"], &["/bin/sleep", "600"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run twinbox");
    let (tap, _) = wait_for_tap(&before, &mut child);
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(status.code().is_none(), "killed, not exited: {status}");
    assert!(
        !std::path::Path::new("/sys/class/net").join(&tap).exists(),
        "tap {tap} outlived the SIGKILLed VMM"
    );
    // A killed VMM cannot remove its own (now empty) cgroup: the next twinbox start
    // sweeps it. Start one, as a user would.
    let next = vm(&["--timeout", "1"], &["/bin/true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run twinbox");
    assert!(
        next.code().is_some(),
        "the next vm run ended by a signal: {next}"
    );
    before.assert_nothing_left(
        "vm run --net killed with SIGKILL, then one more vm run",
        true,
    );
}

/// `setpriv ARGS -- twinbox vm run --rootfs IMG --net -- /bin/true`, run to the end.
fn vm_net_under_setpriv(setpriv: &[&str]) -> Output {
    Command::new("setpriv")
        .args(setpriv)
        .arg("--")
        .arg(common::twinbox())
        .args([
            "vm",
            "run",
            "--rootfs",
            &image(),
            "--net",
            "--",
            "/bin/true",
        ])
        .output()
        .expect("setpriv (util-linux)")
}

#[test]
fn bad_net_value_exhausted_pool_and_no_net_admin_are_one_line_125_and_leave_nothing() {
    let _serial = serial();
    common::kvm::require_kvm("twinbox vm run --net");
    let before = Before::now();
    let out = vm(&["--net", "bridge"], &["/bin/true"]).output().unwrap();
    assert_one_line_125(&out, "--net \"bridge\"", "malformed --net");
    before.assert_nothing_left("malformed --net", false);

    let before = Before::now();
    {
        let _held = net::HeldLeases::take(4);
        let out = vm(&["--net"], &["/bin/true"])
            .env("TWINBOX_NET_POOL", "10.201.0.0/28")
            .output()
            .unwrap();
        assert_one_line_125(&out, "exhausted", "exhausted pool");
    }
    before.assert_nothing_left("exhausted pool", false);

    // Root without CAP_NET_ADMIN: the tap is refused, and the lease goes with the error.
    let before = Before::now();
    let out = vm_net_under_setpriv(&["--bounding-set", "-net_admin"]);
    assert_one_line_125(&out, "CAP_NET_ADMIN", "no CAP_NET_ADMIN");
    before.assert_nothing_left("no CAP_NET_ADMIN", false);

    // An unprivileged user hears about the capability, not about the lease directory.
    let before = Before::now();
    let out = vm_net_under_setpriv(&["--reuid", "65534", "--regid", "65534", "--clear-groups"]);
    assert_one_line_125(&out, "CAP_NET_ADMIN", "unprivileged user");
    before.assert_nothing_left("unprivileged user", false);
}

/// What the guest does in the link test: shows its address and route, serves one TCP
/// echo that keeps a copy of what it got (for its checksum), pings its gateway (the host)
/// and tells the host it is ready over TCP (the guest reaching the host), then prints the
/// checksum of what it echoed and which hardware RNG it has.
const GUEST_LINK: &str = r#"
gw=$(ip route | awk '/^default/ {print $3}')
echo GUEST_ADDR=$(ip -4 -o addr show dev eth0 | awk '{print $4}')
echo GUEST_GW=$gw
echo GUEST_ROUTE=$(awk '$2 == "00000000" {print $1}' /proc/net/route)
echo GUEST_HWRNG=$(cat /sys/class/misc/hw_random/rng_current)
echo GUEST_HWRNG_BYTES=$(head -c 64 /dev/hwrng | wc -c)
nc -l -p 5000 -e /bin/sh -c 'tee /tmp/echoed' &
server=$!
sleep 1
ping -c 2 -W 5 "$gw" > /dev/null && echo GUEST_PING=ok
echo ready | nc "$gw" 6000
wait $server
echo GUEST_ECHO_SUM=$(sha256sum /tmp/echoed | cut -d' ' -f1)
"#;

/// iperf3 in the guest: two one-off servers in turn (to the guest, then from it with
/// `-R`), each announced to the host as in the link test.
const GUEST_IPERF: &str = r#"
gw=$(ip route | awk '/^default/ {print $3}')
for dir in to from; do
    iperf3 -s -1 > /dev/null 2>&1 &
    server=$!
    sleep 1
    echo ready | nc "$gw" 6000
    wait $server
done
"#;

/// The lab side: runs the guests above, talks to them, and checks the host after each run
/// and after a SIGKILLed one.
fn lab_script() -> String {
    format!(
        r#"
GUEST_LINK=$(cat <<'EOF'
{GUEST_LINK}
EOF
)
GUEST_IPERF=$(cat <<'EOF'
{GUEST_IPERF}
EOF
)
taps() {{ ls /sys/class/net | grep -c '^tbt'; }}
# The box's address: one above the host end of the (only) tap.
box_addr() {{
    host=$(ip -4 -o addr show | awk '$2 ~ /^tbt/ {{split($4, a, "/"); print a[1]}}' | head -n1)
    echo "${{host%.*}}.$(( ${{host##*.}} + 1 ))"
}}
echo LOCKS_BEFORE=$(grep -c FLOCK /proc/locks)
echo TAPS_BEFORE=$(taps)
head -c 4194304 /dev/urandom > /tmp/blob
echo HOST_SUM=$(sha256sum /tmp/blob | cut -d' ' -f1)

twinbox vm run --net --timings -- /bin/sh -c "$GUEST_LINK" > /tmp/link.out 2> /tmp/link.err &
vm=$!
echo READY=$(timeout 300 nc -l -p 6000)
box=$(box_addr)
echo BOX=$box
echo TAPS_DURING=$(taps)
ping -c 3 -W 5 "$box" > /dev/null && echo HOST_PING=ok
echo HOST_ECHO_SUM=$(timeout 120 nc -w 5 "$box" 5000 < /tmp/blob | sha256sum | cut -d' ' -f1)
wait $vm; echo LINK_STATUS=$?
cat /tmp/link.out /tmp/link.err
echo LINK_REPORT=$(sed -n 's/^network: //p' /tmp/link.err)
echo TAPS_AFTER=$(taps)
echo ADDRS_AFTER=$(ip -4 -o addr show | grep -c ' 10\.201\.')
echo LOCKS_AFTER=$(grep -c FLOCK /proc/locks)

twinbox vm run --net -- /bin/sh -c "$GUEST_IPERF" > /tmp/iperf.out 2>&1 &
vm=$!
timeout 300 nc -l -p 6000 > /dev/null
box=$(box_addr)
echo IPERF_TO_GUEST_MBITS=$(iperf3 -c "$box" -t 5 -f m | awk '/receiver/ {{print $7}}')
timeout 300 nc -l -p 6000 > /dev/null
echo IPERF_FROM_GUEST_MBITS=$(iperf3 -c "$box" -t 5 -f m -R | awk '/receiver/ {{print $7}}')
wait $vm; echo IPERF_STATUS=$?
cat /tmp/iperf.out

twinbox vm run --net -- /bin/sleep 600 > /dev/null 2>&1 &
vm=$!
for i in $(seq 1 120); do [ "$(taps)" -gt 0 ] && break; sleep 1; done
echo KILL_TAPS_DURING=$(taps)
kill -9 $vm; wait $vm; echo KILL_STATUS=$?
echo KILL_TAPS_AFTER=$(taps)
echo KILL_ADDRS_AFTER=$(ip -4 -o addr show | grep -c ' 10\.201\.')
echo KILL_LOCKS_AFTER=$(grep -c FLOCK /proc/locks)
"#
    )
}

fn run_lab(script: &str) -> LabOutput {
    common::run_where_linux_boots(script, |lab| {
        lab.bin("/usr/bin/iperf3").mem_mib(2048).timeout_s(1500)
    })
}

#[test]
fn guest_gets_its_link_host_and_guest_reach_each_other_iperf_moves_data_and_nothing_is_left() {
    let _serial = serial();
    assert!(
        std::path::Path::new("/usr/bin/iperf3").exists(),
        "/usr/bin/iperf3 missing (apt-get install iperf3): the lab's client"
    );
    let out = run_lab(&lab_script());
    let v = |key: &str| out.expect_value(key);
    let box_addr = v("BOX");
    let host_addr = v("GUEST_GW");
    assert_eq!(v("READY"), "ready", "the guest reached the host over TCP");
    assert_eq!(
        v("GUEST_ADDR"),
        format!("{box_addr}/30"),
        "eth0 has the link's box address:\n{}",
        out.output
    );
    assert_eq!(
        v("GUEST_ROUTE"),
        "eth0",
        "a default route via eth0 in /proc/net/route:\n{}",
        out.output
    );
    let report = v("LINK_REPORT");
    assert!(
        report.starts_with(&format!("eth0 {box_addr}/30 via {host_addr} (host tbt")),
        "the report names the link the guest used, got {report:?}:\n{}",
        out.output
    );
    assert_eq!(v("TAPS_DURING"), "1", "{}", out.output);
    assert_eq!(v("HOST_PING"), "ok", "the host pings the guest");
    assert_eq!(v("GUEST_PING"), "ok", "the guest pings the host");
    let sum = v("HOST_SUM");
    assert_eq!(
        v("GUEST_ECHO_SUM"),
        sum,
        "the guest got the 4 MiB intact:\n{}",
        out.output
    );
    assert_eq!(
        v("HOST_ECHO_SUM"),
        sum,
        "the host got the 4 MiB back intact:\n{}",
        out.output
    );
    assert_eq!(v("LINK_STATUS"), "0", "{}", out.output);
    assert!(
        v("GUEST_HWRNG").starts_with("virtio_rng"),
        "the guest's hardware RNG is the virtio-rng:\n{}",
        out.output
    );
    assert_eq!(v("GUEST_HWRNG_BYTES"), "64", "/dev/hwrng gives bytes");
    for (after, what) in [
        ("TAPS_AFTER", "normal exit"),
        ("KILL_TAPS_AFTER", "SIGKILL of the VMM"),
    ] {
        assert_eq!(v(after), v("TAPS_BEFORE"), "a tap left after {what}");
    }
    assert_eq!(v("ADDRS_AFTER"), "0", "a pool address left after the run");
    assert_eq!(
        v("KILL_ADDRS_AFTER"),
        "0",
        "a pool address left after SIGKILL"
    );
    assert_eq!(
        v("LOCKS_AFTER"),
        v("LOCKS_BEFORE"),
        "a lease held after the run"
    );
    assert_eq!(
        v("KILL_LOCKS_AFTER"),
        v("LOCKS_BEFORE"),
        "a lease held after SIGKILL"
    );
    assert_eq!(v("KILL_TAPS_DURING"), "1", "{}", out.output);
    assert_eq!(v("KILL_STATUS"), "137", "{}", out.output);
    assert_eq!(v("IPERF_STATUS"), "0", "{}", out.output);
    for key in ["IPERF_TO_GUEST_MBITS", "IPERF_FROM_GUEST_MBITS"] {
        let mbits: f64 = v(key)
            .parse()
            .unwrap_or_else(|e| panic!("{key}: {e}\n{}", out.output));
        assert!(mbits > 0.0, "{key} = {mbits}:\n{}", out.output);
        eprintln!("{key}={mbits} (lab: software CPU)");
    }
}
