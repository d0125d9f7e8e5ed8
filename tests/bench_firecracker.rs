//! The Firecracker peer against the real Firecracker binary (not a stand-in script):
//! it boots the bench's tiny guest on this host's KVM (PVM is fine) and exits 0, which
//! its config without `drives` never did; and, where Linux boots (the lab, or a host with
//! hardware KVM), it boots twinbox's kernel and image with a persistent tap and serves the
//! `net` scenario beside native, leaving no tap behind.
//!
//! The binary comes from `TWINBOX_FIRECRACKER`, else `firecracker` in PATH, else
//! `../shared/peers/firecracker` beside the repository; without one the tests FAIL naming
//! where they looked (a check that did not run must not pass). Needs /dev/kvm; the net
//! test also root, iperf3 and the built artifacts. Traffic stays on the machine that runs
//! the bench (the lab's own loopback and the link twinbox makes to the guest).
//! Run: flock /tmp/twinbox-itest.lock cargo test --test bench_firecracker -- --test-threads=1

mod common;

use bench::results::Results;
use bench::runner::peer_firecracker::Firecracker;
use bench::runner::Runner;
use twinbox_spec::{Outcome, RunSpec};

#[test]
fn the_real_firecracker_boots_the_tiny_guest_and_exits_zero() {
    common::kvm::require_kvm("Firecracker");
    let dir = common::fresh_dir("twinbox-fc-tiny");
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("tiny-guest.elf");
    bench::tiny_guest::write_to(&kernel).unwrap();
    let mut spec = RunSpec::new("/nonexistent/rootfs.ext4", Vec::new());
    spec.kernel = Some(kernel);
    spec.vcpus = 1;
    spec.memory_mib = 128;
    spec.time_limit = Some(std::time::Duration::from_secs(60));
    let fc = Firecracker::new(&common::peers::firecracker()).expect("an executable Firecracker");
    let report = fc.run(&spec).expect("Firecracker starts");
    let output = report.output.as_deref().unwrap_or_default();
    assert_eq!(report.outcome, Outcome::Exited(0), "{output}");
    assert!(!output.contains("Invalid JSON"), "{output}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn firecracker_boots_our_kernel_with_a_tap_and_serves_the_net_scenario() {
    let fc = common::peers::firecracker();
    let microbench = common::require_artifact(
        &twinbox_spec::artifacts::rootfs_image().with_file_name("twinbox-microbench"),
    );
    let script = format!(
        r#"ip link set lo up
# In the lab the binary sits at a fixed path (the host's path may lie under the lab's own
# /tmp, which the lab mounts over); on a hardware-KVM host it is the host's.
fc={in_lab}
[ -x "$fc" ] || fc={fc}
out=/tmp/twinbox-fc-net
rm -rf "$out"
twinbox bench net --boxes native --firecracker "$fc" --runs 1 --warmup 0 \
  --vm-timeout 600 --out "$out" > /tmp/twinbox-fc-net.log 2>&1
echo BENCH_STATUS=$?
tail -n 40 /tmp/twinbox-fc-net.log
echo TAPS_LEFT=$(ls /sys/class/net | grep -c '^tb')
echo "RESULTS=$(tr -d '\n' < "$out/results.json")"
rm -rf "$out"
"#,
        fc = fc.display(),
        in_lab = common::peers::FIRECRACKER_IN_LAB,
    );
    let lab = common::run_where_linux_boots(&script, |lab| {
        lab.bin(&fc)
            .file(&fc, common::peers::FIRECRACKER_IN_LAB)
            .bin("/usr/bin/iperf3")
            .file(&microbench, "/cache/rootfs/current/twinbox-microbench")
            .mem_mib(2048)
            .timeout_s(1500)
    });
    assert_eq!(lab.expect_value("BENCH_STATUS"), "0", "{}", lab.output);
    assert_eq!(
        lab.expect_value("TAPS_LEFT"),
        "0",
        "a tap outlived the run:\n{}",
        lab.output
    );
    let dir = common::fresh_dir("twinbox-fc-net-results");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("results.json");
    std::fs::write(&path, lab.expect_value("RESULTS")).unwrap();
    let results = Results::load(&path).expect("results.json parses");
    std::fs::remove_dir_all(&dir).unwrap();
    let net = results.scenario("net").expect("a net scenario");
    assert!(
        net.boxes.iter().any(|b| b == "firecracker"),
        "firecracker did not take part: sat out {:?}",
        net.sat_out
    );
    for m in &net.metrics {
        let v = net.values("firecracker", &m.key);
        assert!(
            v.len() == 1 && v[0] > 0.0,
            "net/firecracker/{}: {v:?}, failures {:?}\n{}",
            m.key,
            net.failures("firecracker"),
            lab.output
        );
    }
    let run = net
        .runs
        .iter()
        .find(|r| r.box_name == "firecracker")
        .expect("a firecracker run");
    // Seen with --nocapture; software-CPU numbers where the lab ran it.
    println!("firecracker net: {:?}", run.metrics);
    let report = run.report.as_ref().expect("the run's report");
    assert_eq!(report.outcome, Outcome::Exited(0), "the box's exit status");
    let link = report.network.as_ref().expect("the run's link");
    assert!(link.host_interface.starts_with("tbt"), "{link:?}");
    assert!(link.mac.is_some(), "{link:?}");
}
