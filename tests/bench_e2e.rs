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
    // The default boxes: native, container, the VM booted and the VM restored from a
    // snapshot. Where Linux cannot boot (PVM, no KVM) both VMs sit out at once, with the
    // reason.
    assert_eq!(
        results.params.boxes,
        ["native", "container", "vm", "vm-snapshot"]
    );
    let linux_boots = results.host.kvm.linux_guest_obstacle().is_none();
    for s in &results.scenarios {
        let boxes: &[&str] = if linux_boots {
            &["native", "container", "vm", "vm-snapshot"]
        } else {
            for vm in ["vm", "vm-snapshot"] {
                let sat_out = s
                    .sat_out
                    .iter()
                    .find(|o| o.box_name == vm)
                    .unwrap_or_else(|| panic!("{}: {vm} should sit out: {:?}", s.name, s.sat_out));
                assert!(
                    sat_out.reason.starts_with("skipped on this host"),
                    "{}: {vm}: {}",
                    s.name,
                    sat_out.reason
                );
            }
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
    // Image sizes: the built-in image's ext4 on disk, and what a container wrote.
    let sizes = results
        .sizes
        .as_ref()
        .expect("sizes measured after startup");
    assert!(sizes.image_bytes > 0, "{sizes:?}");
    let container = sizes.boxes.iter().find(|b| b.box_name == "container");
    assert!(
        container.is_some_and(|b| b.written_bytes.is_some() && b.error.is_none()),
        "{sizes:?}"
    );
    assert!(report.contains("- **Image sizes: container \"MB\", VM \"GB\".** The image on disk: "));
    std::fs::remove_dir_all(&out).unwrap();
}

/// `twinbox bench --image`: an image built by buildah (busybox with /bin/true, sh, df; no
/// sysbench) runs `startup` in the container on its layers (and in the VM where Linux
/// boots); native sits out, `cpu` is not run for want of sysbench, never counted; the
/// results and report name the image and its digest, and its sizes in the cache.
#[test]
fn bench_with_an_image_runs_the_twinbox_boxes_on_it() {
    common::require_root("twinbox bench --image (unpacking, container)");
    common::image::require_tools(&["buildah", "busybox"], "buildah, busybox-static");
    let dir = common::fresh_dir("twinbox-bench-image");
    std::fs::create_dir_all(&dir).unwrap();
    common::image::sh(
        &dir,
        r#"
        mkdir -p rootfs/bin rootfs/etc rootfs/tmp
        cp "$(command -v busybox)" rootfs/bin/busybox
        for a in sh true df; do ln -s busybox rootfs/bin/$a; done
        tar -C rootfs -cf rootfs.tar .
        B="buildah --root $PWD/storage --runroot $PWD/run --storage-driver vfs"
        c=$($B from scratch)
        $B add "$c" rootfs.tar /
        $B commit -q "$c" tb-bench >/dev/null
        $B push -q tb-bench oci-archive:$PWD/bench-oci.tar:tb-bench:1
        rm -rf storage run rootfs rootfs.tar
        "#,
    );
    let image = dir.join("bench-oci.tar");
    let out = dir.join("out");
    let status = Command::new(common::twinbox())
        .args(["bench", "startup", "cpu", "--runs", "2", "--warmup", "0"])
        .args(["--vm-timeout", "60", "--image"])
        .arg(&image)
        .arg("--out")
        .arg(&out)
        .status()
        .expect("run twinbox bench");
    assert_eq!(status.code(), Some(0), "twinbox bench --image exit status");
    let results = Results::load(&out.join("results.json")).expect("results.json parses");
    let used = results
        .params
        .image
        .as_ref()
        .expect("the image is recorded");
    assert_eq!(used.name, "tb-bench:1");
    assert!(
        used.id.starts_with("sha256:") && used.id.len() == 71,
        "{used:?}"
    );
    let reason = |s: &ScenarioResult, b: &str| {
        s.sat_out
            .iter()
            .find(|o| o.box_name == b)
            .map(|o| o.reason.clone())
    };
    let startup = results.scenario("startup").expect("startup");
    assert_eq!(
        startup.values("container", "to_torn_down_ms").len(),
        2,
        "{:?}",
        startup.failures("container")
    );
    let native = reason(startup, "native").expect("native sits out");
    assert!(native.contains("--image"), "{native}");
    let linux_boots = results.host.kvm.linux_guest_obstacle().is_none();
    if linux_boots {
        assert_eq!(startup.values("vm", "to_torn_down_ms").len(), 2);
    } else {
        assert!(reason(startup, "vm").is_some_and(|r| r.starts_with("skipped on this host")));
    }
    let cpu = results.scenario("cpu").expect("cpu");
    assert!(cpu.runs.is_empty() && cpu.boxes.is_empty(), "{cpu:?}");
    let no_sysbench = reason(cpu, "container").expect("container sits cpu out");
    assert_eq!(no_sysbench, "the image tb-bench:1 has no sysbench");
    // Its sizes: the layers in the cache, what a container wrote.
    let sizes = results.sizes.as_ref().expect("sizes");
    assert!(sizes.image_what.contains("layers"), "{sizes:?}");
    assert!(
        sizes.image_bytes > 0 && sizes.vm_disk_bytes.is_some(),
        "{sizes:?}"
    );
    let container = sizes.boxes.iter().find(|b| b.box_name == "container");
    assert!(
        container.is_some_and(|b| b.written_bytes.is_some() && b.error.is_none()),
        "{sizes:?}"
    );
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains(&format!("Image: `tb-bench:1` ({}", used.id)),
        "{report}"
    );
    assert!(report.contains("unpacked in the cache"), "{report}");
    std::fs::remove_dir_all(&dir).unwrap();
}
