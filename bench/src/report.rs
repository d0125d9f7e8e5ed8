//! `report.md`, rendered from [`Results`] alone: the machine and its KVM caveat first,
//! then one side-by-side table per scenario (median [p10–p90] (n), ratios to native and to
//! container computed from the stored runs), the startup phases, the common claims checked
//! against the numbers, and every failure with its reason.

use crate::metric::{self, Metric};
use crate::results::{Results, ScenarioResult, Sizes};
use crate::runner::{container, native, peer_qemu, vm, vm_snapshot};
use crate::scenario;
use crate::stats::{summarize, Summary};
use std::fmt::Write;
use twinbox_spec::Phase;

/// The reference boxes every other box is compared with, in table column order.
const REFERENCES: [&str; 2] = [native::NAME, container::NAME];

/// Opens the "Claims checked" section: where the claims come from. It ships with twinbox.
const CLAIMS_INTRO: &str = "What introductions to VMs versus containers commonly tell \
    their readers (and Docker's own material echoes), each beside the number this bench \
    measured on this machine (details in the tables above).";

/// Whether a scenario's table gets the phase-by-phase breakdown: it times spawn →
/// torn_down, so the phases between are what that time is made of.
pub fn has_phases(s: &ScenarioResult) -> bool {
    s.metrics
        .iter()
        .any(|m| m.key == metric::TO_TORN_DOWN_MS.key)
}

/// Formats a value with a precision that suits its size.
pub fn fmt_value(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// `median [p10–p90] (n)`.
pub fn fmt_summary(s: &Summary) -> String {
    format!(
        "{} [{}–{}] ({})",
        fmt_value(s.median),
        fmt_value(s.p10),
        fmt_value(s.p90),
        s.n
    )
}

/// Ratio of the medians of `box_name` and `reference` for `metric`, when both exist and
/// are positive (a ratio to a difference that noise made zero or negative means nothing).
pub fn ratio(s: &ScenarioResult, metric: &str, box_name: &str, reference: &str) -> Option<f64> {
    let a = s.summary(box_name, metric)?.median;
    let b = s.summary(reference, metric)?.median;
    (a > 0.0 && b > 0.0).then(|| a / b)
}

/// Median time from spawn to each phase the box stamped, in ms, in phase order (a VM
/// restored from a snapshot has `restored` where a booted one has none).
pub fn phase_medians(s: &ScenarioResult, box_name: &str) -> Vec<(Phase, f64)> {
    let counted: Vec<_> = s
        .runs
        .iter()
        .filter(|r| r.box_name == box_name && !r.warmup && r.error.is_none())
        .filter_map(|r| r.report.as_ref())
        .collect();
    Phase::WITH_RESTORED
        .into_iter()
        .skip(1)
        .filter_map(|p| {
            let v: Vec<f64> = counted
                .iter()
                .filter_map(|r| r.timeline.between(Phase::Spawn, p))
                .map(|ns| ns as f64 / 1e6)
                .collect();
            summarize(&v).map(|s| (p, s.median))
        })
        .collect()
}

/// The cell of one box in a table: its summary, or why it has none.
fn cell(s: &ScenarioResult, box_name: &str, metric: &str) -> String {
    match s.summary(box_name, metric) {
        Some(sum) => fmt_summary(&sum),
        None => match s.failures(box_name).first() {
            Some(_) => "failed (see below)".into(),
            None if s.skipped.iter().any(|k| k.box_name == box_name) => "skipped".into(),
            None => "—".into(),
        },
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or("—".into(), |r| format!("{r:.2}×"))
}

/// The whole report.
pub fn report_from_results(r: &Results) -> String {
    let mut out = String::new();
    let h = &r.host;
    let _ = writeln!(out, "# twinbox bench — {}\n", r.started_utc);
    let _ = writeln!(
        out,
        "Machine: {} ({} cores, {:.1} GiB RAM), kernel {}, cgroups {}.  ",
        h.cpu_model,
        h.cores,
        h.memory_kib as f64 / (1024.0 * 1024.0),
        h.kernel,
        h.cgroups
    );
    let _ = writeln!(out, "KVM: {} ({}).  ", h.kvm, h.kvm.describe());
    if !h.kvm.timings_representative() {
        let _ = writeln!(
            out,
            "**Caveat: on this host the VM figures of Linux workloads are dominated by \
             emulated guest-kernel code and are not what VT-x/AMD-V hosts see.** The `vmm` \
             scenario (tiny guest, no guest kernel) is the honest VM number here."
        );
    }
    let p = &r.params;
    let jail = if p.vm_jail {
        "twinbox's VMM threads jailed"
    } else {
        "twinbox's VMM threads not jailed"
    };
    let cgroup = if p.vm_cgroup {
        "in its own cgroup"
    } else {
        "in no cgroup of its own"
    };
    let _ = writeln!(
        out,
        "\ntwinbox {}; {} counted runs + {} warm-up per box and scenario, boxes interleaved \
         round by round; {} vCPU, {} MiB; VM/peer time limit {:.0} s per run; {jail}, {cgroup}. Cells \
         are median [p10–p90] (n successful runs); ratios are box median / reference median.\n",
        r.twinbox_version, p.runs, p.warmup, p.vcpus, p.memory_mib, p.vm_timeout_s
    );
    if let Some(image) = &p.image {
        let _ = writeln!(
            out,
            "Image: `{}` ({}{}), from `{}`: the container ran on its layers, the VM on the \
             ext4 built from them; boxes that do not run the image sat out.\n",
            image.name,
            image.id,
            image
                .manifest_digest
                .as_deref()
                .map_or(String::new(), |m| format!(", manifest {m}")),
            image.reference
        );
    }
    let _ = writeln!(out, "## Headline\n\n{}", headline(r));
    for s in &r.scenarios {
        scenario_section(&mut out, s);
    }
    claims(&mut out, r);
    failures(&mut out, r);
    out
}

fn scenario_section(out: &mut String, s: &ScenarioResult) {
    let _ = writeln!(out, "## {}\n\n{}\n", s.name, s.description);
    let _ = writeln!(out, "Workload: `{}`\n", s.workload.join(" "));
    let refs: Vec<&str> = REFERENCES
        .into_iter()
        .filter(|r| s.boxes.iter().any(|b| b == r))
        .collect();
    for m in &s.metrics {
        let better = if m.higher_is_better {
            "higher is better"
        } else {
            "lower is better"
        };
        let _ = writeln!(out, "**{}** ({}, {better})\n", m.key, m.unit);
        let mut head = String::from("| box | median [p10–p90] (n) |");
        let mut rule = String::from("|---|---|");
        for r in &refs {
            head.push_str(&format!(" × {r} |"));
            rule.push_str("---|");
        }
        let _ = writeln!(out, "{head}\n{rule}");
        for b in &s.boxes {
            let mut row = format!("| {b} | {} |", cell(s, b, &m.key));
            for r in &refs {
                row.push_str(&format!(" {} |", fmt_ratio(ratio(s, &m.key, b, r))));
            }
            let _ = writeln!(out, "{row}");
        }
        let _ = writeln!(out);
    }
    if !s.sat_out.is_empty() {
        let _ = writeln!(out, "Not taking part:\n");
        for k in &s.sat_out {
            let _ = writeln!(out, "- {}: {}", k.box_name, k.reason);
        }
        let _ = writeln!(out);
    }
    if has_phases(s) {
        let _ = writeln!(
            out,
            "Phases (median ms from spawn; each box stamps the phases it has):\n"
        );
        // The `restored` column only when a box of this scenario restored a snapshot.
        let restored = s.boxes.iter().any(|b| {
            phase_medians(s, b)
                .iter()
                .any(|(p, _)| *p == Phase::Restored)
        });
        let phases: Vec<Phase> = Phase::WITH_RESTORED
            .into_iter()
            .skip(1)
            .filter(|p| restored || *p != Phase::Restored)
            .collect();
        let _ = writeln!(
            out,
            "| box | {} |\n|---|{}",
            phases
                .iter()
                .map(|p| p.name())
                .collect::<Vec<_>>()
                .join(" | "),
            "---|".repeat(phases.len())
        );
        for b in &s.boxes {
            let med = phase_medians(s, b);
            if med.is_empty() {
                continue;
            }
            let cells: Vec<String> = phases
                .iter()
                .map(|p| {
                    med.iter()
                        .find(|(q, _)| q == p)
                        .map_or("—".into(), |(_, v)| fmt_value(*v))
                })
                .collect();
            let _ = writeln!(out, "| {b} | {} |", cells.join(" | "));
        }
        let _ = writeln!(out);
    }
}

/// One row per scenario: its headline metric's median per box.
pub fn headline(r: &Results) -> String {
    // In the bench's box order (native first), boxes that took part in nothing left out.
    let mut boxes: Vec<String> = Vec::new();
    let all = r.scenarios.iter().flat_map(|s| &s.boxes);
    for b in r.params.boxes.iter().chain(all) {
        if !boxes.contains(b) && r.scenarios.iter().any(|s| s.boxes.contains(b)) {
            boxes.push(b.clone());
        }
    }
    let mut out = format!(
        "| scenario | metric | {} |\n|---|---|{}\n",
        boxes.join(" | "),
        "---|".repeat(boxes.len())
    );
    for s in &r.scenarios {
        let Some(m) = s.metrics.first() else { continue };
        let cells: Vec<String> = boxes
            .iter()
            .map(|b| {
                if !s.boxes.contains(b) {
                    return "n/a".into();
                }
                match s.summary(b, &m.key) {
                    Some(sum) => {
                        let mut c = fmt_value(sum.median);
                        if b != native::NAME {
                            if let Some(x) = ratio(s, &m.key, b, native::NAME) {
                                c.push_str(&format!(" ({x:.2}×)"));
                            }
                        }
                        c
                    }
                    None if !s.failures(b).is_empty() => "failed".into(),
                    None => "—".into(),
                }
            })
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} ({}) | {} |",
            s.name,
            m.key,
            m.unit,
            cells.join(" | ")
        );
    }
    out
}

fn claims(out: &mut String, r: &Results) {
    use scenario::{cpu, density, membw, memory, vmm};
    let _ = writeln!(out, "## Claims checked\n\n{CLAIMS_INTRO}\n");
    let median =
        |scn: &str, b: &str, m: Metric| r.scenario(scn)?.summary(b, m.key).map(|s| s.median);
    let show = |v: Option<f64>, unit: &str| {
        v.map_or("not measured".into(), |v| {
            format!("{} {unit}", fmt_value(v))
        })
    };
    let down = metric::TO_TORN_DOWN_MS;
    let _ = writeln!(
        out,
        "- **Start-up: container \"seconds, even milliseconds\", VM \"minutes\".** \
         `/bin/true` spawn → torn down: native {}, container {}, vm cold boot {}, vm restored \
         from a snapshot (`vm-snapshot`) {}{}; the VMM alone (tiny guest) {}.",
        started(r, native::NAME),
        started(r, container::NAME),
        started(r, vm::NAME),
        started(r, vm_snapshot::NAME),
        restore_ratios(r),
        show(median(vmm::NAME, vm::NAME, down), "ms"),
    );
    let _ = writeln!(
        out,
        "- **VM start-up without a guest kernel.** The VMM alone boots, runs and tears down \
         the tiny guest in {} (QEMU microvm: {}), adding {} of host memory (marginal: the \
         twinbox binary's own pages, shared by every instance, are not counted).",
        show(median(vmm::NAME, vm::NAME, down), "ms"),
        show(median(vmm::NAME, peer_qemu::NAME, down), "ms"),
        show(median(vmm::NAME, vm::NAME, metric::HOST_MEMORY_MIB), "MiB"),
    );
    sizes_claim(out, r.sizes.as_ref());
    let host_mib = r.host.memory_kib as f64 / 1024.0;
    let _ = writeln!(
        out,
        "- **Memory per instance: \"MB\" vs \"GB\"; density \"thousands\" vs \"tens\" per \
         host.** Host memory of one idle instance, instances per GiB (1024 / MiB), and per \
         this host's {:.0} MiB of RAM (memory only, nothing else counted):\n",
        host_mib
    );
    let _ = writeln!(
        out,
        "  | box | MiB per instance | per GiB | per host |\n  |---|---|---|---|"
    );
    if let Some(s) = r.scenario(memory::NAME) {
        for b in &s.boxes {
            match s.summary(b, metric::HOST_MEMORY_MIB.key) {
                Some(sum) if sum.median > 0.0 => {
                    let _ = writeln!(
                        out,
                        "  | {b} | {} | {:.0} | {:.0} |",
                        fmt_value(sum.median),
                        1024.0 / sum.median,
                        host_mib / sum.median
                    );
                }
                _ => {
                    let _ = writeln!(out, "  | {b} | not measured | — | — |");
                }
            }
        }
    }
    if let Some(s) = r.scenario(density::NAME) {
        let cell = |b: &str, m: Metric| show(s.summary(b, m.key).map(|x| x.median), "MiB");
        let (avail, free) = (metric::MIB_PER_INSTANCE, metric::MEMFREE_MIB_PER_INSTANCE);
        let _ = writeln!(
            out,
            "\n  With {} instances alive at once (`density`), the host's MemAvailable drops \
             per instance: native {}, container {}, vm {}, vm restored from one snapshot {}; \
             its MemFree (page cache counted as taken): native {}, container {}, vm {}, vm \
             restored {} (the restores share the snapshot's memory file, taken before the \
             first sample).",
            r.params.density_instances,
            cell(native::NAME, avail),
            cell(container::NAME, avail),
            cell(vm::NAME, avail),
            cell(vm_snapshot::NAME, avail),
            cell(native::NAME, free),
            cell(container::NAME, free),
            cell(vm::NAME, free),
            cell(vm_snapshot::NAME, free),
        );
    }
    let vs_native = |scn: &str, m: Metric, b: &str| {
        r.scenario(scn).map_or("—".into(), |s| {
            fmt_ratio(ratio(s, m.key, b, native::NAME))
        })
    };
    let _ = writeln!(
        out,
        "\n- **Performance: container \"near native\", VM \"weaker\".** CPU (sysbench) \
         container/native {}, vm/native {}; memory bandwidth container/native {}, \
         vm/native {}.\n",
        vs_native(cpu::NAME, metric::EVENTS_PER_S, container::NAME),
        vs_native(cpu::NAME, metric::EVENTS_PER_S, vm::NAME),
        vs_native(membw::NAME, metric::MIB_PER_S, container::NAME),
        vs_native(membw::NAME, metric::MIB_PER_S, vm::NAME),
    );
    net_claim(out, r);
}

/// A box's `startup` median (spawn → torn down) for the start-up claim, or plainly why
/// there is none: not run, sat out (with the reason), failed.
fn started(r: &Results, box_name: &str) -> String {
    let Some(s) = r.scenario(scenario::startup::NAME) else {
        return "not measured (no startup scenario in this bench)".into();
    };
    if let Some(sum) = s.summary(box_name, metric::TO_TORN_DOWN_MS.key) {
        return format!("{} ms", fmt_value(sum.median));
    }
    if let Some(out) = s.sat_out.iter().find(|o| o.box_name == box_name) {
        return format!("not measured (sat out: {})", out.reason);
    }
    if !s.boxes.iter().any(|b| b == box_name) {
        return "not measured (not among this bench's boxes)".into();
    }
    if !s.failures(box_name).is_empty() {
        return "not measured (its runs failed, see below)".into();
    }
    "not measured".into()
}

/// How a restore compares with a cold boot and with a container start (medians of
/// `startup`), when both sides were measured.
fn restore_ratios(r: &Results) -> String {
    let Some(s) = r.scenario(scenario::startup::NAME) else {
        return String::new();
    };
    let key = metric::TO_TORN_DOWN_MS.key;
    let mut parts = Vec::new();
    if let Some(x) = ratio(s, key, vm::NAME, vm_snapshot::NAME) {
        parts.push(format!("{x:.2}× faster than the cold boot"));
    }
    if let Some(x) = ratio(s, key, vm_snapshot::NAME, container::NAME) {
        parts.push(format!("{x:.2}× the container's time"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" (the restore: {})", parts.join(", "))
    }
}

/// Bytes as a reader takes them in: B, KiB or MiB.
fn fmt_bytes(bytes: u64) -> String {
    const KIB: u64 = 1024;
    match bytes {
        b if b < KIB => format!("{b} B"),
        b if b < KIB * KIB => format!("{} KiB", fmt_value(b as f64 / KIB as f64)),
        b => format!("{} MiB", fmt_value(b as f64 / (KIB * KIB) as f64)),
    }
}

/// The "image sizes" row: the image on disk, and what one instance of each box adds.
fn sizes_claim(out: &mut String, sizes: Option<&Sizes>) {
    let Some(s) = sizes else {
        let _ = writeln!(
            out,
            "- **Image sizes: container \"MB\", VM \"GB\".** Not measured (it needs \
             `startup` in the container or the VM)."
        );
        return;
    };
    let opt = |b: Option<u64>| b.map_or("not measured".into(), fmt_bytes);
    let per_box: Vec<String> = s
        .boxes
        .iter()
        .map(|b| {
            if let Some(e) = &b.error {
                return format!("{}: {}", b.box_name, e.lines().next().unwrap_or_default());
            }
            let upper = format!("{} in its overlay's upper layer", opt(b.written_bytes));
            if b.box_name == vm::NAME {
                format!(
                    "vm: {upper} (a tmpfs in guest memory), {} written to its root disk, \
                     {} of guest memory touched",
                    opt(b.root_disk_written_bytes),
                    opt(b.guest_memory_bytes)
                )
            } else {
                format!("{}: {upper}", b.box_name)
            }
        })
        .collect();
    let _ = writeln!(
        out,
        "- **Image sizes: container \"MB\", VM \"GB\".** The image on disk: {} ({}){}. \
         Written per running instance for `{}` (then `df` inside the box): {}.",
        fmt_bytes(s.image_bytes),
        s.image_what,
        s.vm_disk_bytes.map_or(String::new(), |d| format!(
            "; the VM's root disk {}, one file shared read-only by every VM, not copied",
            fmt_bytes(d)
        )),
        s.workload.join(" "),
        per_box.join("; ")
    );
}

/// The network row: Felter et al. 2015 found KVM added tens of µs of round trip and
/// Docker's NAT path cost throughput; here every box that had a link, beside native.
fn net_claim(out: &mut String, r: &Results) {
    let Some(s) = r.scenario(scenario::net::NAME) else {
        return;
    };
    let cell = |b: &str| {
        let med = |m: Metric| s.summary(b, m.key).map(|x| x.median);
        match (
            med(metric::TCP_RR_P50_US),
            med(metric::TCP_TO_BOX_GBIT_S),
            med(metric::TCP_FROM_BOX_GBIT_S),
        ) {
            (Some(rtt), Some(to), Some(from)) => format!(
                "{b} {} µs ({}), {} / {} Gbit/s",
                fmt_value(rtt),
                match s.summary(native::NAME, metric::TCP_RR_P50_US.key) {
                    Some(n) if b != native::NAME => {
                        format!("{:+.1} µs vs native", rtt - n.median)
                    }
                    _ => "baseline".into(),
                },
                fmt_value(to),
                fmt_value(from)
            ),
            _ => format!("{b} not measured"),
        }
    };
    let measured: Vec<String> = s.boxes.iter().map(|b| cell(b)).collect();
    let sat_out: Vec<String> = s
        .sat_out
        .iter()
        .map(|x| format!("{} ({})", x.box_name, x.reason))
        .collect();
    let _ = writeln!(
        out,
        "- **Network: a VM adds tens of µs of round trip (KVM +~30 µs in Felter et al., \
         2015), containers' NAT costs throughput.** Here each box's link is a routed /30 \
         (veth or tap), with no NAT between host and box. TCP request/response p50 round \
         trip host ↔ box, and one-stream throughput host → box / box → host: {}.{}\n",
        measured.join("; "),
        if sat_out.is_empty() {
            String::new()
        } else {
            format!(" Not measured: {}.", sat_out.join("; "))
        }
    );
}

fn failures(out: &mut String, r: &Results) {
    let _ = writeln!(out, "## Failures and skipped runs\n");
    let mut any = false;
    for s in &r.scenarios {
        for run in s.runs.iter().filter(|x| x.error.is_some()) {
            any = true;
            let why = run.error.as_deref().unwrap_or_default();
            let first = why.lines().next().unwrap_or_default();
            let _ = writeln!(
                out,
                "- {} / {} round {}{}: {first}",
                s.name,
                run.box_name,
                run.round,
                if run.warmup { " (warm-up)" } else { "" }
            );
        }
        for k in &s.skipped {
            any = true;
            let _ = writeln!(
                out,
                "- {} / {}: {} remaining runs skipped after a failure ({})",
                s.name,
                k.box_name,
                k.runs_skipped,
                k.reason.lines().next().unwrap_or_default()
            );
        }
    }
    if !any {
        let _ = writeln!(out, "None.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::tests::sample;

    #[test]
    fn ratios_come_from_stored_runs() {
        let r = sample();
        let cpu = r.scenario("cpu").unwrap();
        // native medians 1100, container 960 (warm-ups of 1.0 excluded).
        let x = ratio(cpu, "events_per_s", "container", "native").unwrap();
        assert!((x - 960.0 / 1100.0).abs() < 1e-12);
        assert_eq!(ratio(cpu, "events_per_s", "vm", "native"), None);
        let text = report_from_results(&r);
        assert!(
            text.contains("| native | 1100 [1020–1180] (3) | 1.00× | 1.15× |"),
            "{text}"
        );
        assert!(
            text.contains("| container | 960.0 [912.0–984.0] (3) | 0.87× | 1.00× |"),
            "{text}"
        );
        assert!(
            text.contains("| vm | failed (see below) | — | — |"),
            "{text}"
        );
    }

    #[test]
    fn caveat_and_failures_are_stated() {
        let text = report_from_results(&sample());
        let head: Vec<&str> = text.lines().take(6).collect();
        assert!(head.iter().any(|l| l.contains("Test CPU")));
        assert!(head
            .iter()
            .any(|l| l.contains("not what VT-x/AMD-V hosts see")));
        assert!(text.contains("cpu / vm round 1: time limit of 5.0 s reached"));
        assert!(text.contains("3 remaining runs skipped"));
        assert!(headline(&sample())
            .contains("| cpu | events_per_s (events/s) | 1100 | 960.0 (0.87×) | failed |"));
        assert!(
            text.contains("Not taking part:\n\n- firecracker: boots only the tiny guest"),
            "{text}"
        );
    }

    #[test]
    fn headline_columns_follow_the_bench_box_order() {
        let mut r = sample();
        let mut vmm = r.scenarios[0].clone();
        vmm.name = "vmm".into();
        vmm.boxes = vec!["vm".into()];
        r.scenarios.insert(0, vmm);
        r.params.boxes.push("bwrap".into());
        let head = headline(&r);
        assert!(
            head.starts_with("| scenario | metric | native | container | vm |\n"),
            "{head}"
        );
    }

    #[test]
    fn image_sizes_and_the_image_come_from_the_stored_results() {
        use crate::results::{BoxSizes, ImageUsed};
        let mut r = sample();
        let text = report_from_results(&r);
        assert!(
            text.contains("- **Image sizes: container \"MB\", VM \"GB\".** Not measured"),
            "{text}"
        );
        r.params.image = Some(ImageUsed {
            reference: "app.tar@app:1".into(),
            name: "app:1".into(),
            id: "sha256:abc".into(),
            manifest_digest: Some("sha256:def".into()),
        });
        r.sizes = Some(Sizes {
            image_what: "the image's 2 layers unpacked in the cache".into(),
            image_bytes: 2 << 20,
            vm_disk_bytes: Some(3 << 20),
            workload: vec!["/bin/true".into()],
            boxes: vec![
                BoxSizes {
                    box_name: "container".into(),
                    written_bytes: Some(4096),
                    root_disk_written_bytes: None,
                    guest_memory_bytes: None,
                    error: None,
                },
                BoxSizes {
                    box_name: "vm".into(),
                    written_bytes: Some(8192),
                    root_disk_written_bytes: Some(0),
                    guest_memory_bytes: Some(40 << 20),
                    error: None,
                },
            ],
        });
        // Through results.json, as `--render` reads it.
        let json = serde_json::to_string(&r).unwrap();
        let text = report_from_results(&serde_json::from_str(&json).unwrap());
        assert!(
            text.contains("Image: `app:1` (sha256:abc, manifest sha256:def), from `app.tar@app:1`"),
            "{text}"
        );
        assert!(
            text.contains(
                "The image on disk: 2.00 MiB (the image's 2 layers unpacked in the cache); the \
                 VM's root disk 3.00 MiB, one file shared read-only by every VM, not copied. \
                 Written per running instance for `/bin/true` (then `df` inside the box): \
                 container: 4.00 KiB in its overlay's upper layer; vm: 8.00 KiB in its \
                 overlay's upper layer (a tmpfs in guest memory), 0 B written to its root \
                 disk, 40.00 MiB of guest memory touched."
            ),
            "{text}"
        );
        // A box that was not measured says why.
        r.sizes.as_mut().unwrap().boxes[1] = BoxSizes {
            box_name: "vm".into(),
            written_bytes: None,
            root_disk_written_bytes: None,
            guest_memory_bytes: None,
            error: Some("not measured: its startup runs failed".into()),
        };
        let text = report_from_results(&r);
        assert!(
            text.contains("; vm: not measured: its startup runs failed."),
            "{text}"
        );
    }

    #[test]
    fn the_report_names_no_file_of_a_development_machine() {
        let text = report_from_results(&sample());
        assert!(text.contains("## Claims checked"));
        // The claims text ships with the product: it cites no file at all (an earlier
        // report pointed every user at a notes file of a development machine).
        let claims = text.split("## Claims checked").nth(1).unwrap();
        let intro = claims.lines().find(|l| !l.trim().is_empty()).unwrap();
        assert!(
            !intro.contains('/'),
            "the claims intro names a path: {intro}"
        );
        assert!(!claims.contains(".md"), "the claims cite a file:\n{claims}");
    }

    #[test]
    fn the_network_claim_gives_each_box_beside_native_and_who_sat_out() {
        let text = report_from_results(&crate::results::tests::sample_with_net());
        assert!(text.contains("Felter et al."), "{text}");
        assert!(
            text.contains(
                "native 10.00 µs (baseline), 20.00 / 20.00 Gbit/s; container 40.00 µs \
                 (+30.0 µs vs native), 15.00 / 15.00 Gbit/s. Not measured: vm (no \
                 virtio-net yet)."
            ),
            "{text}"
        );
        // Without a net scenario there is no network row.
        assert!(!report_from_results(&sample()).contains("**Network:"));
    }

    /// A stored `startup` scenario: native, container, a cold-booted vm and a vm restored
    /// from a snapshot, each with two counted runs whose reports carry their timelines
    /// (the restored one stamps `restored`), and a warm-up that must not count.
    fn startup_with_restores() -> Results {
        use crate::results::RunRecord;
        use std::collections::BTreeMap;
        use twinbox_spec::{BoxKind, Outcome, RunReport, Timeline, Usage};
        // (box, phases as ms after spawn; torn_down last).
        let run = |box_name: &str, round: u32, phases: &[(Phase, u64)]| {
            let mut timeline = Timeline::starting_at(1_000_000);
            for (p, ms) in phases {
                timeline.record(*p, 1_000_000 + ms * 1_000_000);
            }
            let down = phases.last().unwrap().1 as f64;
            RunRecord {
                box_name: box_name.into(),
                round,
                warmup: round == 0,
                metrics: BTreeMap::from([(metric::TO_TORN_DOWN_MS.key.to_string(), down)]),
                error: None,
                report: Some(RunReport {
                    box_kind: BoxKind::Vm,
                    outcome: Outcome::Exited(0),
                    timeline,
                    output: None,
                    usage: Usage::default(),
                    notes: Vec::new(),
                    network: None,
                }),
            }
        };
        use Phase::*;
        let boot = |k: u64| {
            vec![
                (SandboxReady, 500 + k),
                (GuestEntry, 510 + k),
                (InitStarted, 2900 + k),
                (WorkloadStarted, 3000 + k),
                (WorkloadExited, 3100 + k),
                (TornDown, 3200 + k),
            ]
        };
        let restore = |k: u64| {
            vec![
                (SandboxReady, 350 + k),
                (Restored, 360 + k),
                (GuestEntry, 361 + k),
                (InitStarted, 362 + k),
                (WorkloadStarted, 600 + k),
                (WorkloadExited, 700 + k),
                (TornDown, 800 + k),
            ]
        };
        let ctr = |k: u64| {
            vec![
                (SandboxReady, 5 + k),
                (WorkloadExited, 9 + k),
                (TornDown, 10 + k),
            ]
        };
        let mut r = sample();
        r.params.boxes.push(vm_snapshot::NAME.into());
        let mut s = r.scenarios[0].clone();
        s.name = scenario::startup::NAME.into();
        s.metrics = vec![metric::TO_TORN_DOWN_MS.def()];
        s.boxes = vec![
            container::NAME.into(),
            vm::NAME.into(),
            vm_snapshot::NAME.into(),
        ];
        s.skipped.clear();
        s.sat_out.clear();
        s.runs = vec![
            run(vm_snapshot::NAME, 0, &restore(5000)),
            run(container::NAME, 1, &ctr(0)),
            run(vm::NAME, 1, &boot(0)),
            run(vm_snapshot::NAME, 1, &restore(0)),
            run(container::NAME, 2, &ctr(2)),
            run(vm::NAME, 2, &boot(200)),
            run(vm_snapshot::NAME, 2, &restore(20)),
        ];
        r.scenarios = vec![s];
        r
    }

    #[test]
    fn the_startup_claim_puts_a_restore_beside_the_container_and_the_boot() {
        // Through results.json, as `--render` reads it.
        let json = serde_json::to_string(&startup_with_restores()).unwrap();
        let r: Results = serde_json::from_str(&json).unwrap();
        let text = report_from_results(&r);
        assert!(
            text.contains(
                "spawn → torn down: native not measured (not among this bench's boxes), \
                 container 11.00 ms, vm cold boot 3300 ms, vm restored from a snapshot \
                 (`vm-snapshot`) 810.0 ms (the restore: 4.07× faster than the cold boot, \
                 73.64× the container's time);"
            ),
            "{text}"
        );
        // The phases table has the restored column, the booted vm a dash in it.
        assert!(
            text.contains(
                "| box | sandbox_ready | restored | guest_entry | init_started | \
                 workload_started | workload_exited | torn_down |"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "| vm-snapshot | 360.0 | 370.0 | 371.0 | 372.0 | 610.0 | 710.0 | 810.0 |"
            ),
            "{text}"
        );
        assert!(
            text.contains("| vm | 600.0 | — | 610.0 | 3000 | 3100 | 3200 | 3300 |"),
            "{text}"
        );
    }

    #[test]
    fn the_startup_claim_says_plainly_why_a_box_is_absent() {
        let mut r = startup_with_restores();
        let s = &mut r.scenarios[0];
        s.runs.retain(|run| run.box_name != vm_snapshot::NAME);
        s.boxes.retain(|b| b != vm_snapshot::NAME);
        s.sat_out.push(crate::results::SatOut {
            box_name: vm_snapshot::NAME.into(),
            reason: "this host cannot boot a Linux guest".into(),
        });
        for run in s.runs.iter_mut().filter(|run| run.box_name == vm::NAME) {
            run.metrics.clear();
            run.error = Some("time limit of 5.0 s reached".into());
        }
        let text = report_from_results(&r);
        assert!(
            text.contains(
                "vm cold boot not measured (its runs failed, see below), vm restored from a \
                 snapshot (`vm-snapshot`) not measured (sat out: this host cannot boot a \
                 Linux guest);"
            ),
            "{text}"
        );
        // Nobody restored: no restored column.
        assert!(!text.contains("| restored |"), "{text}");
        r.scenarios.clear();
        assert!(report_from_results(&r)
            .contains("container not measured (no startup scenario in this bench)"));
    }

    #[test]
    fn phases_follow_the_metrics_not_the_name() {
        let r = sample();
        let cpu = r.scenario("cpu").unwrap();
        assert!(!has_phases(cpu));
        let mut timed = cpu.clone();
        timed.metrics.push(metric::TO_TORN_DOWN_MS.def());
        assert!(has_phases(&timed));
    }
}
