//! `twinbox bench startup cpu --runs 2 --warmup 0` end to end: results.json parses and
//! holds every run with ordered phases; native and container have numbers; the VM column has numbers or a recorded reason; the ratios in report.md
//! are the ones the stored runs give; the charts exist. Needs root and the image.

mod common;

use bench::results::{Results, ScenarioResult};
use std::process::Command;
use twinbox_spec::Phase;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The table row of `box_name` under the first metric heading of scenario `s`.
fn report_row<'a>(report: &'a str, scenario: &str, box_name: &str) -> &'a str {
    let section = report
        .split(&format!("\n## {scenario}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("report has no section {scenario}"));
    section
        .lines()
        .find(|l| l.starts_with(&format!("| {box_name} |")))
        .unwrap_or_else(|| panic!("no row for {box_name} in {scenario}"))
}

fn check_box_column(s: &ScenarioResult, box_name: &str, runs: usize) {
    let records: Vec<_> = s.runs.iter().filter(|r| r.box_name == box_name).collect();
    let reason = s
        .skipped
        .iter()
        .find(|k| k.box_name == box_name)
        .map(|k| k.reason.clone());
    let failed: Vec<_> = records.iter().filter_map(|r| r.error.clone()).collect();
    if failed.is_empty() {
        assert_eq!(
            records.len(),
            runs,
            "{}/{box_name}: every run recorded",
            s.name
        );
    } else {
        assert!(
            failed.iter().all(|e| !e.trim().is_empty()),
            "{}/{box_name}: failures carry a reason",
            s.name
        );
        assert_eq!(
            records.len() + reason.as_ref().map_or(0, |_| runs - records.len()),
            runs,
            "{}/{box_name}: runs after a failure are recorded as skipped",
            s.name
        );
    }
    for r in records.iter().filter(|r| r.error.is_none()) {
        let report = r
            .report
            .as_ref()
            .expect("a successful run keeps its report");
        let t = &report.timeline;
        assert!(
            t.is_ordered(),
            "{}/{box_name}: phases ordered:\n{}",
            s.name,
            t.render()
        );
        let exited = t.between(Phase::Spawn, Phase::WorkloadExited).unwrap();
        let down = t.between(Phase::Spawn, Phase::TornDown).unwrap();
        assert!(
            exited > 0 && down >= exited,
            "{}/{box_name}: {exited} ns / {down} ns",
            s.name
        );
        let headline = &s.metrics[0].key;
        assert!(
            r.metrics[headline] > 0.0,
            "{}/{box_name}: {headline} positive",
            s.name
        );
    }
}

#[test]
fn bench_startup_and_cpu_end_to_end() {
    common::require_root("twinbox bench (container and VM boxes)");
    common::require_artifact(&twinbox_spec::artifacts::rootfs_image());
    common::require_artifact(&twinbox_spec::artifacts::kernel_vmlinux());
    let out = std::env::temp_dir().join(format!("twinbox-bench-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new(common::twinbox())
        .args(["bench", "startup", "cpu", "--runs", "2", "--warmup", "0"])
        .args(["--vm-timeout", "15", "--out"])
        .arg(&out)
        .status()
        .expect("run twinbox bench");
    assert_eq!(status.code(), Some(0), "twinbox bench exit status");

    let results = Results::load(&out.join("results.json")).expect("results.json parses");
    assert_eq!(results.schema_version, bench::results::SCHEMA_VERSION);
    assert_eq!(results.params.runs, 2);
    assert!(!results.host.cpu_model.is_empty());
    let names: Vec<&str> = results.scenarios.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["startup", "cpu"]);

    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    // Where Linux cannot boot (PVM, no KVM) the VM sits out at once, with the reason.
    let linux_boots = results.host.kvm.linux_guest_obstacle().is_none();
    for s in &results.scenarios {
        let boxes: &[&str] = if linux_boots {
            &["native", "container", "vm"]
        } else {
            let vm = s
                .sat_out
                .iter()
                .find(|o| o.box_name == "vm")
                .expect("vm sat out");
            assert!(
                vm.reason.starts_with("skipped on this host"),
                "{}",
                vm.reason
            );
            &["native", "container"]
        };
        assert_eq!(s.boxes, boxes);
        // Native always measures.
        assert_eq!(
            s.values("native", &s.metrics[0].key).len(),
            2,
            "{}: native",
            s.name
        );
        for b in boxes {
            check_box_column(s, b, 2);
        }
        // The container always measures here (root, image present).
        assert_eq!(
            s.values("container", &s.metrics[0].key).len(),
            2,
            "{}: container {:?}",
            s.name,
            s.failures("container")
        );
        // Ratios in the report are the stored runs' medians divided.
        let key = &s.metrics[0].key;
        let native = median(s.values("native", key));
        for b in &boxes[1..] {
            let v = s.values(b, key);
            let row = report_row(&report, &s.name, b);
            if v.is_empty() {
                assert!(row.contains("failed") || row.contains("skipped"), "{row}");
            } else {
                let want = format!("{:.2}×", median(v) / native);
                assert!(row.contains(&want), "{}: {row} should show {want}", s.name);
            }
        }
    }
    let head: String = report.lines().take(5).collect::<Vec<_>>().join("\n");
    assert!(head.contains(&results.host.cpu_model), "{head}");
    if !results.host.kvm.timings_representative() {
        assert!(head.contains("not what VT-x/AMD-V hosts see"), "{head}");
    }
    for svg in ["startup.svg", "overhead.svg"] {
        let text = std::fs::read_to_string(out.join(svg)).expect(svg);
        assert!(text.starts_with("<svg"), "{svg}");
    }
    std::fs::remove_dir_all(&out).unwrap();
}
