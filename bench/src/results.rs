//! `results.json`: every run of a bench, the source of truth the report and charts are
//! rendered from (never from live state, so a stored file can be re-rendered and checked).

use crate::stats::{summarize, Summary};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use twinbox_spec::host::HostInfo;
use twinbox_spec::RunReport;

/// Version of this file's layout; bumped on incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;

/// A whole bench.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// [`SCHEMA_VERSION`] of the writer.
    pub schema_version: u32,
    /// twinbox version (the crate version).
    pub twinbox_version: String,
    /// When the bench started, UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub started_utc: String,
    /// The machine.
    pub host: HostInfo,
    /// What was asked.
    pub params: Params,
    /// One entry per scenario, in the order run.
    pub scenarios: Vec<ScenarioResult>,
    /// Bytes on disk of the image and written per instance ("image sizes MB vs GB");
    /// absent when neither twinbox box ran `startup`, and in files from before it.
    #[serde(default)]
    pub sizes: Option<Sizes>,
}

/// An OCI/Docker image the container and VM boxes ran from (`--image`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageUsed {
    /// As given: `PATH[@REF]`.
    pub reference: String,
    /// Its name (first tag), or its short id when it has none.
    pub name: String,
    /// The image id: the digest of its config.
    pub id: String,
    /// The manifest's digest, for OCI inputs.
    pub manifest_digest: Option<String>,
}

/// "Image sizes MB vs GB", measured: the image on disk and what one instance adds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sizes {
    /// What [`Sizes::image_bytes`] counts (the built-in image's ext4, or the image's layers
    /// in the cache).
    pub image_what: String,
    /// Bytes of the image on disk: allocated blocks, hard links once.
    pub image_bytes: u64,
    /// Allocated bytes of the VM's root disk, shared read-only by every VM (with `--image`
    /// the ext4 built from the layers, beside them in the cache).
    pub vm_disk_bytes: Option<u64>,
    /// The workload of the measured runs.
    pub workload: Vec<String>,
    /// Per box (twinbox's container and VM).
    pub boxes: Vec<BoxSizes>,
}

/// What one running instance of a box wrote and touched.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BoxSizes {
    /// The box.
    pub box_name: String,
    /// Bytes its writable root layer holds after the workload, as `df` inside the box
    /// reads the overlay's upper layer (container: a tmpfs on the host; VM: a tmpfs in
    /// guest memory).
    pub written_bytes: Option<u64>,
    /// Bytes the run added to the VM's root disk file (allocated after − before).
    pub root_disk_written_bytes: Option<u64>,
    /// Guest memory pages the VMM process touched, bytes.
    pub guest_memory_bytes: Option<u64>,
    /// Why it was not measured.
    pub error: Option<String>,
}

/// The parameters of the bench.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Params {
    /// Counted runs per box and scenario.
    pub runs: u32,
    /// Discarded warm-up runs per box and scenario.
    pub warmup: u32,
    /// vCPUs of the VM / CPUs of the container.
    pub vcpus: u32,
    /// Memory of the VM / limit of the container, MiB.
    pub memory_mib: u32,
    /// Per-run time limit of VM and peer runs, seconds.
    pub vm_timeout_s: f64,
    /// Boxes asked for, in run order.
    pub boxes: Vec<String>,
    /// Whether peer VMMs were measured.
    pub peers: bool,
    /// The root filesystem image.
    pub rootfs: String,
    /// The guest kernel.
    pub kernel: String,
    /// Instances alive at once in the `density` scenario.
    #[serde(default)]
    pub density_instances: u32,
    /// Whether twinbox's VMM threads ran in its jail (false in files from before it).
    #[serde(default)]
    pub vm_jail: bool,
    /// Whether the vm box's VMM ran in its own cgroup (true in files from before the
    /// choice existed).
    #[serde(default = "in_own_cgroup")]
    pub vm_cgroup: bool,
    /// The OCI/Docker image the container and VM ran from (`--image`), instead of
    /// [`Params::rootfs`].
    #[serde(default)]
    pub image: Option<ImageUsed>,
}

/// One metric a scenario measures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricDef {
    /// Key in [`RunRecord::metrics`].
    pub key: String,
    /// Unit shown in the report.
    pub unit: String,
    /// Whether more is better (throughput) or worse (time, memory).
    pub higher_is_better: bool,
}

/// One scenario: its definition and all its runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScenarioResult {
    /// Scenario name (`startup`, `vmm`, `cpu`, ...).
    pub name: String,
    /// What it measures and how, one paragraph.
    pub description: String,
    /// The workload's argv (or what stands for it).
    pub workload: Vec<String>,
    /// The metrics, the first being the headline.
    pub metrics: Vec<MetricDef>,
    /// Boxes that took part, in run order.
    pub boxes: Vec<String>,
    /// Every run, warm-ups included, in the order done.
    pub runs: Vec<RunRecord>,
    /// Boxes whose remaining runs were skipped, and why.
    pub skipped: Vec<Skip>,
    /// Boxes of the bench that do not take part in this scenario, and why (absent from
    /// files written before it was recorded).
    #[serde(default)]
    pub sat_out: Vec<SatOut>,
}

/// A box that does not take part in a scenario.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SatOut {
    /// The box.
    pub box_name: String,
    /// Why (what it cannot do that the scenario needs).
    pub reason: String,
}

/// Runs of a box not done.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Skip {
    /// The box.
    pub box_name: String,
    /// How many runs were not done.
    pub runs_skipped: u32,
    /// Why.
    pub reason: String,
}

/// One run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The box.
    pub box_name: String,
    /// Round (0-based, warm-up rounds included).
    pub round: u32,
    /// Warm-up run, not summarised.
    pub warmup: bool,
    /// Measured values by metric key; empty when the run failed.
    pub metrics: BTreeMap<String, f64>,
    /// Why the run failed, if it did.
    pub error: Option<String>,
    /// The box's report (workload output cut to a few KiB), when the box produced one.
    pub report: Option<RunReport>,
}

/// What files from before `vm_cgroup` existed ran: the vm box in its own cgroup.
fn in_own_cgroup() -> bool {
    true
}

impl Results {
    /// Writes pretty JSON to `path`.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, text + "\n")
    }

    /// Reads a `results.json`.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        serde_json::from_str(&text).map_err(std::io::Error::other)
    }

    /// The scenario called `name`.
    pub fn scenario(&self, name: &str) -> Option<&ScenarioResult> {
        self.scenarios.iter().find(|s| s.name == name)
    }
}

impl ScenarioResult {
    /// Counted (non-warm-up, successful) values of `metric` for `box_name`.
    pub fn values(&self, box_name: &str, metric: &str) -> Vec<f64> {
        self.runs
            .iter()
            .filter(|r| r.box_name == box_name && !r.warmup && r.error.is_none())
            .filter_map(|r| r.metrics.get(metric).copied())
            .collect()
    }

    /// Summary of `metric` for `box_name`, `None` with no successful counted run.
    pub fn summary(&self, box_name: &str, metric: &str) -> Option<Summary> {
        summarize(&self.values(box_name, metric))
    }

    /// Runs of `box_name` that failed (warm-ups included: a box that fails its warm-up
    /// is skipped for the rest of the scenario), with their reasons.
    pub fn failures(&self, box_name: &str) -> Vec<&str> {
        self.runs
            .iter()
            .filter(|r| r.box_name == box_name)
            .filter_map(|r| r.error.as_deref())
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use twinbox_spec::host::{CgroupLayout, KvmFlavor};

    /// A small hand-built bench used by the report tests too.
    pub(crate) fn sample() -> Results {
        let run = |box_name: &str, round: u32, warmup: bool, v: Option<f64>| RunRecord {
            box_name: box_name.into(),
            round,
            warmup,
            metrics: v
                .map(|v| BTreeMap::from([("events_per_s".to_string(), v)]))
                .unwrap_or_default(),
            error: v
                .is_none()
                .then(|| "time limit of 5.0 s reached".to_string()),
            report: None,
        };
        Results {
            schema_version: SCHEMA_VERSION,
            twinbox_version: "0.1.0".into(),
            started_utc: "2026-11-23T14:00:00Z".into(),
            host: HostInfo {
                cpu_model: "Test CPU".into(),
                cores: 2,
                memory_kib: 4 << 20,
                kernel: "6.1.0-test".into(),
                kvm: KvmFlavor::Pvm,
                cgroups: CgroupLayout::V2,
            },
            params: Params {
                runs: 3,
                warmup: 1,
                vcpus: 1,
                memory_mib: 128,
                vm_timeout_s: 5.0,
                boxes: vec!["native".into(), "container".into(), "vm".into()],
                peers: false,
                rootfs: "/img".into(),
                kernel: "/vmlinux".into(),
                density_instances: 4,
                vm_jail: true,
                vm_cgroup: true,
                image: None,
            },
            scenarios: vec![ScenarioResult {
                name: "cpu".into(),
                description: "sysbench cpu".into(),
                workload: vec!["sysbench".into()],
                metrics: vec![MetricDef {
                    key: "events_per_s".into(),
                    unit: "events/s".into(),
                    higher_is_better: true,
                }],
                boxes: vec!["native".into(), "container".into(), "vm".into()],
                runs: vec![
                    run("native", 0, true, Some(1.0)),
                    run("container", 0, true, Some(1.0)),
                    run("vm", 1, false, None),
                    run("native", 1, false, Some(1000.0)),
                    run("container", 1, false, Some(900.0)),
                    run("native", 2, false, Some(1200.0)),
                    run("container", 2, false, Some(960.0)),
                    run("native", 3, false, Some(1100.0)),
                    run("container", 3, false, Some(990.0)),
                ],
                skipped: vec![Skip {
                    box_name: "vm".into(),
                    runs_skipped: 3,
                    reason: "time limit of 5.0 s reached".into(),
                }],
                sat_out: vec![SatOut {
                    box_name: "firecracker".into(),
                    reason: "boots only the tiny guest, not the image".into(),
                }],
            }],
            sizes: None,
        }
    }

    /// [`sample`] with a `net` scenario: native and container measured (p50 10 and 40 µs,
    /// 20 and 15 Gbit/s each way), the VM sitting out.
    pub(crate) fn sample_with_net() -> Results {
        use crate::metric;
        use crate::scenario::Scenario;
        let mut r = sample();
        let run = |box_name: &str, round: u32, rtt: f64, gbit: f64| RunRecord {
            box_name: box_name.into(),
            round,
            warmup: false,
            metrics: BTreeMap::from([
                (metric::TCP_TO_BOX_GBIT_S.key.to_string(), gbit),
                (metric::TCP_FROM_BOX_GBIT_S.key.to_string(), gbit),
                (metric::TCP_RR_PER_S.key.to_string(), 1e6 / rtt),
                (metric::TCP_RR_P50_US.key.to_string(), rtt),
                (metric::TCP_RR_P99_US.key.to_string(), 2.0 * rtt),
            ]),
            error: None,
            report: None,
        };
        let net = crate::scenario::Net;
        r.scenarios.push(ScenarioResult {
            name: net.name().into(),
            description: net.description().into(),
            workload: net.workload(),
            metrics: net.metrics().iter().map(|m| m.def()).collect(),
            boxes: vec!["native".into(), "container".into()],
            runs: vec![
                run("native", 0, 10.0, 20.0),
                run("container", 0, 40.0, 15.0),
            ],
            skipped: vec![],
            sat_out: vec![SatOut {
                box_name: "vm".into(),
                reason: "no virtio-net yet".into(),
            }],
        });
        r
    }

    #[test]
    fn round_trips_through_json() {
        let results = sample();
        let dir = std::env::temp_dir().join(format!("bench-results-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("results.json");
        results.save(&path).unwrap();
        let back = Results::load(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(back, results);
    }

    #[test]
    fn files_from_before_sat_out_still_load() {
        let mut json = serde_json::to_value(sample()).unwrap();
        json["scenarios"][0]
            .as_object_mut()
            .unwrap()
            .remove("sat_out");
        let back: Results = serde_json::from_value(json).unwrap();
        assert!(back.scenarios[0].sat_out.is_empty());
        assert_eq!(back.scenarios[0].runs, sample().scenarios[0].runs);
    }

    #[test]
    fn summaries_skip_warmups_and_failures() {
        let results = sample();
        let cpu = results.scenario("cpu").unwrap();
        assert_eq!(
            cpu.values("native", "events_per_s"),
            vec![1000.0, 1200.0, 1100.0]
        );
        assert_eq!(
            cpu.summary("native", "events_per_s").unwrap().median,
            1100.0
        );
        assert_eq!(cpu.summary("vm", "events_per_s"), None);
        assert_eq!(cpu.failures("vm"), vec!["time limit of 5.0 s reached"]);
    }
}
