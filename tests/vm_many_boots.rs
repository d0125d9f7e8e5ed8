//! Many Linux boots in a row, alone and through the bench with Firecracker interleaved:
//! every one reaches its workload and ends within its time limit. A lost interrupt (a
//! virtio notification with no IOAPIC route, a timer that never fires) shows up as one
//! boot in tens that never ends, which a single boot test does not catch; the bench adds
//! its exit tracing and memory readings of each VMM process around the same boots.
//!
//! Runs on the host's KVM when it is hardware virtualization, else in the lab (see
//! tests/common/lab.rs). Needs root, the built artifacts and a Firecracker binary
//! (`TWINBOX_FIRECRACKER`, `firecracker` in PATH, or `../shared/peers/firecracker` beside
//! the repository); fails naming what is missing. A failed boot is reported with its
//! number, its exit status and the end of its console log.
//! Run: flock /tmp/twinbox-itest.lock cargo test --test vm_many_boots

mod common;

use bench::results::Results;

/// Back-to-back `twinbox vm run` boots.
const BOOTS: u32 = 20;
/// Counted bench runs per box (twinbox's VM and Firecracker, interleaved).
const BENCH_RUNS: u32 = 5;

#[test]
fn twenty_boots_alone_and_five_beside_firecracker_in_the_bench_all_end() {
    let fc = common::peers::firecracker();
    let script = format!(
        r#"ip link set lo up
ok=0
for i in $(seq 1 {boots}); do
  twinbox vm run --timeout 60 --console-log /tmp/boot.$i.log -- /bin/true > /tmp/boot.$i.out 2>&1
  rc=$?
  if [ $rc = 0 ]; then ok=$((ok + 1)); else
    echo "FAILED_BOOT=$i status $rc"
    tail -n 5 /tmp/boot.$i.out
    echo "-- its console:"; tail -n 40 /tmp/boot.$i.log
  fi
done
echo BOOTS_OK=$ok
fc={in_lab}
[ -x "$fc" ] || fc={fc}
out=/tmp/twinbox-many-boots
rm -rf "$out"
# A bench that never returns would otherwise show only as the lab's time limit.
timeout 900 twinbox bench startup --boxes vm --firecracker "$fc" --runs {runs} --warmup 0 \
  --vm-timeout 60 --out "$out" > /tmp/bench.log 2>&1
echo BENCH_STATUS=$?
tail -n 20 /tmp/bench.log
echo "RESULTS=$(tr -d '\n' < "$out/results.json")"
rm -rf "$out"
"#,
        boots = BOOTS,
        runs = BENCH_RUNS,
        fc = fc.display(),
        in_lab = common::peers::FIRECRACKER_IN_LAB,
    );
    let lab = common::run_where_linux_boots(&script, |lab| {
        lab.bin(&fc)
            .file(&fc, common::peers::FIRECRACKER_IN_LAB)
            .mem_mib(2048)
            .timeout_s(2400)
    });
    assert_eq!(
        lab.expect_value("BOOTS_OK"),
        BOOTS.to_string(),
        "not every boot ended with its workload's status:\n{}",
        lab.output
    );
    assert_eq!(
        lab.expect_value("BENCH_STATUS"),
        "0",
        "the bench failed, or hung and was stopped after 900 s:\n{}",
        lab.output
    );
    let dir = common::fresh_dir("twinbox-many-boots-results");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("results.json");
    std::fs::write(&path, lab.expect_value("RESULTS")).unwrap();
    let results = Results::load(&path).expect("results.json parses");
    std::fs::remove_dir_all(&dir).unwrap();
    let startup = results.scenario("startup").expect("a startup scenario");
    for boxed in ["vm", "firecracker"] {
        // For the reader (--nocapture); speed is the bench's business, never asserted here.
        eprintln!(
            "startup/{boxed}: to_workload_exited_ms {:?}",
            startup.summary(boxed, "to_workload_exited_ms")
        );
        let exited = startup.values(boxed, "to_workload_exited_ms");
        assert_eq!(
            exited.len(),
            BENCH_RUNS as usize,
            "startup/{boxed}: {} of {BENCH_RUNS} runs reached the workload's exit; failures \
             {:?}, sat out {:?}\n{}",
            exited.len(),
            startup.failures(boxed),
            startup.sat_out,
            lab.output
        );
    }
}
