//! The bench's `net` scenario for real (issue 11): `twinbox bench net` with native, the
//! container and, with `--peers`, runc — each box that has a network gives positive
//! Gbit/s both ways, transactions/s and round trips; each box that has none (bubblewrap,
//! QEMU without a tap) is reported as not run with its reason, and a box that cannot boot
//! here (twinbox's VM on a PVM host) fails with its reason; and the run leaves no link, network namespace, host address, held
//! lease, process, mount or bench directory behind.
//!
//! Traffic stays on this machine: loopback for native, the 10.201.x.y links twinbox makes
//! for the boxes. Needs root, the image (with iperf3), iperf3 on the host and runc.

mod common;

use bench::results::Results;
use common::net;
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::{Duration, Instant};

/// What a `net` run could leave on the host beyond the common leak check.
#[derive(Debug, PartialEq, Eq)]
struct NetLeftovers {
    /// Interfaces on the host.
    links: BTreeSet<String>,
    /// IPv4 addresses from twinbox's default pool on host interfaces.
    pool_addresses: BTreeSet<String>,
    /// Network namespaces some process is in (inode of `/proc/<pid>/ns/net`).
    netns: BTreeSet<u64>,
    /// Lease lock files some process holds.
    held_leases: BTreeSet<String>,
}

impl NetLeftovers {
    fn now() -> Self {
        let pool_addresses = net::host_addresses()
            .into_iter()
            .filter(|a| {
                a.split(' ')
                    .nth(1)
                    .is_some_and(|c| c.starts_with("10.201."))
            })
            .collect();
        let netns = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
            .filter_map(|e| std::fs::metadata(e.path().join("ns/net")).ok())
            .map(|m| m.ino())
            .collect();
        Self {
            links: net::host_links(),
            pool_addresses,
            netns,
            held_leases: net::Leases::now().held,
        }
    }

    /// Waits up to 5 s until nothing is new since this snapshot (the kernel tears
    /// network namespaces down after their last task is gone).
    fn wait_until_gone(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.new_in(&Self::now()).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What `later` holds that this snapshot did not.
    fn new_in(&self, later: &Self) -> Vec<String> {
        let mut found = Vec::new();
        let links: Vec<_> = later.links.difference(&self.links).collect();
        if !links.is_empty() {
            found.push(format!("links {links:?}"));
        }
        let addrs: Vec<_> = later
            .pool_addresses
            .difference(&self.pool_addresses)
            .collect();
        if !addrs.is_empty() {
            found.push(format!("host addresses {addrs:?}"));
        }
        let netns: Vec<_> = later.netns.difference(&self.netns).collect();
        if !netns.is_empty() {
            found.push(format!("network namespaces (inodes) {netns:?}"));
        }
        let held: Vec<_> = later.held_leases.difference(&self.held_leases).collect();
        if !held.is_empty() {
            found.push(format!("held leases {held:?}"));
        }
        found
    }
}

/// The bench's per-run directories in the temp dir.
fn bench_dirs() -> BTreeSet<String> {
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("twinbox-bench."))
        .collect()
}

#[test]
fn net_scenario_measures_native_container_and_runc_and_leaves_nothing() {
    common::require_root("the container's and runc's network links");
    common::require_artifact(&twinbox_spec::artifacts::rootfs_image());
    for tool in ["iperf3", "runc"] {
        assert!(
            bench::runner::peer::in_path(tool).is_some(),
            "{tool} is not installed: run scripts/install-deps"
        );
    }
    let out = common::fresh_dir("twinbox-bench-net");
    let dirs_before = bench_dirs();
    let net_before = NetLeftovers::now();
    common::leaks::check_no_leaks("twinbox bench net", || {
        let status = Command::new(common::twinbox())
            .args(["bench", "net", "--runs", "2", "--warmup", "0"])
            .args(["--boxes", "native,container,vm", "--peers"])
            .args(["--vm-timeout", "10", "--out"])
            .arg(&out)
            .status()
            .expect("run twinbox bench");
        assert_eq!(status.code(), Some(0), "twinbox bench net exit status");
        // Network namespaces are torn down by the kernel after their last task is gone;
        // give that a moment before judging.
        net_before.wait_until_gone();
    });
    let left = net_before.new_in(&NetLeftovers::now());
    assert!(
        left.is_empty(),
        "twinbox bench net left {}",
        left.join("; ")
    );
    assert_eq!(bench_dirs(), dirs_before, "bench directories left behind");

    let results = Results::load(&out.join("results.json")).expect("results.json parses");
    let s = results
        .scenario("net")
        .expect("a net scenario in results.json");
    let keys: Vec<&str> = s.metrics.iter().map(|m| m.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "tcp_to_box_gbit_s",
            "tcp_from_box_gbit_s",
            "tcp_rr_per_s",
            "tcp_rr_p50_us",
            "tcp_rr_p99_us"
        ]
    );
    for b in ["native", "container", "runc"] {
        assert!(s.boxes.iter().any(|x| x == b), "{b} did not take part");
        for m in &keys {
            let v = s.values(b, m);
            assert_eq!(
                v.len(),
                2,
                "net/{b}/{m}: {v:?}, failures {:?}",
                s.failures(b)
            );
            assert!(v.iter().all(|x| *x > 0.0), "net/{b}/{m}: {v:?}");
        }
    }
    // The boxes' runs record where they were: a link from twinbox's pool.
    for run in s.runs.iter().filter(|r| r.box_name != "native") {
        let link = run
            .report
            .as_ref()
            .and_then(|r| r.network.as_ref())
            .unwrap_or_else(|| panic!("{} run has no network in its report", run.box_name));
        assert!(
            link.box_address.octets()[..2] == [10, 201],
            "{}: {link:?}",
            run.box_name
        );
    }
    // Every other box asked for either sat out with its reason, or ran and failed with
    // one (a VM on a host whose KVM cannot boot Linux), never vanished.
    for b in &results.params.boxes {
        if ["native", "container", "runc"].contains(&b.as_str()) {
            continue;
        }
        let sat = s.sat_out.iter().find(|x| &x.box_name == b);
        let ran = s.boxes.iter().any(|x| x == b);
        match sat {
            Some(x) => assert!(x.reason.len() > 10, "{b} sat out without a reason"),
            None => assert!(
                ran && (!s.values(b, keys[0]).is_empty() || !s.failures(b).is_empty()),
                "{b}: neither measured, failed with a reason, nor reported as sitting out"
            ),
        }
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("**Network:"),
        "no network claim in report.md"
    );
    assert!(report.contains("Felter"), "the claim names its source");
    std::fs::remove_dir_all(&out).unwrap();
}

/// The QEMU peer with a link, on our kernel and image, under TCG (this host's KVM may not
/// boot Linux): a tap with virtio-net-device, init configures `eth0` from the job, and the
/// net scenario's servers in the guest answer the host's clients.
#[test]
fn qemu_peer_gets_a_tap_link_and_serves_the_net_scenario() {
    use bench::scenario::Scenario;
    common::require_root("the QEMU peer's tap");
    let rootfs = common::require_artifact(&twinbox_spec::artifacts::rootfs_image());
    let kernel = common::require_artifact(&twinbox_spec::artifacts::kernel_vmlinux());
    let qemu = bench::runner::peer_qemu::QemuMicrovm {
        accel: bench::runner::peer_qemu::Accel::Tcg,
        ..bench::runner::peer_qemu::QemuMicrovm::find()
            .expect("qemu-system-x86_64 is not installed: run scripts/install-deps")
    };
    let ctx = bench::scenario::Context {
        microbench: rootfs.with_file_name("twinbox-microbench"),
        rootfs,
        kernel,
        tiny_kernel: "/nonexistent".into(),
        vcpus: 1,
        memory_mib: 256,
        // A software CPU boots Linux in seconds to tens of seconds.
        vm_timeout: Duration::from_secs(180),
        disk: "/nonexistent".into(),
        density_instances: 1,
        twinbox_exe: common::twinbox(),
        vm_jail: true,
    };
    let net_before = NetLeftovers::now();
    let measured = common::leaks::check_no_leaks("the QEMU peer with a tap", || {
        bench::scenario::Net.measure(&qemu, &ctx)
    });
    net_before.wait_until_gone();
    let left = net_before.new_in(&NetLeftovers::now());
    assert!(left.is_empty(), "the QEMU peer left {}", left.join("; "));
    let report = measured.report.as_ref();
    assert!(
        measured.error.is_none(),
        "{}\nconsole: {}",
        measured.error.as_deref().unwrap_or_default(),
        report.and_then(|r| r.output.as_deref()).unwrap_or_default()
    );
    for m in bench::scenario::Net.metrics() {
        let v = measured.metrics.get(m.key).copied();
        assert!(v.is_some_and(|v| v > 0.0), "{}: {v:?}", m.key);
    }
    // Seen with --nocapture; software-CPU numbers, not a measurement.
    println!("qemu-microvm (TCG) net: {:?}", measured.metrics);
    let link = report
        .and_then(|r| r.network.as_ref())
        .expect("the run's link");
    assert!(link.host_interface.starts_with("tbt"), "{link:?}");
    assert!(link.mac.is_some(), "{link:?}");
}

/// SIGTERM while the clients run against a container and runc: the bench stops (exit
/// 143), the boxes end with it, and no link, namespace, lease, process or directory is
/// left.
#[test]
fn sigterm_mid_measurement_ends_the_boxes_and_leaves_nothing() {
    common::require_root("the container's and runc's network links");
    common::require_artifact(&twinbox_spec::artifacts::rootfs_image());
    let out = common::fresh_dir("twinbox-bench-net-int");
    let dirs_before = bench_dirs();
    let net_before = NetLeftovers::now();
    common::leaks::check_no_leaks("an interrupted twinbox bench net", || {
        let mut child = Command::new(common::twinbox())
            .args(["bench", "net", "--runs", "5", "--warmup", "0"])
            .args(["--boxes", "container", "--peers", "--out"])
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("run twinbox bench");
        // Into the first or second run's iperf3 (each run takes ~11 s).
        std::thread::sleep(Duration::from_secs(6));
        // SAFETY: the child is ours and not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("twinbox bench net did not stop within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(status.code(), Some(143), "exit status 128 + SIGTERM");
        net_before.wait_until_gone();
    });
    let left = net_before.new_in(&NetLeftovers::now());
    assert!(
        left.is_empty(),
        "an interrupted bench left {}",
        left.join("; ")
    );
    assert_eq!(bench_dirs(), dirs_before, "bench directories left behind");
    let _ = std::fs::remove_dir_all(&out);
}
