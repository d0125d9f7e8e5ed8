//! Peer: runc (Debian's package), running the image's workload from the image mounted by
//! [`super::peer_root::PeerRoot`], timed from process start to process exit.
//!
//! The bundle's `config.json` is runc's own default (`runc spec`: pid, net, ipc, uts and
//! mount namespaces, three capabilities, read-only root, no new privileges), changed only
//! where the run asks for it: the workload's argv, no terminal, the mounted image as the
//! root, hostname `twinbox`, the memory limit (and CPU quota when set) like twinbox's
//! container, and the extra disks as binds at `/mnt/disk<N>` on a tmpfs `/mnt`. With
//! `RunSpec::net` the container joins a network namespace the bench prepared with a link
//! to the host ([`super::netns`]), given by path, as container engines do with CNI. runc keeps its
//! state under a directory of ours (`--root`, a [`RunDir`]), removed at the end; `runc run` deletes the
//! container when its process exits. If the bench is killed while a container runs, runc dies
//! with it but the container (runc's child, not ours) does not: the next bench's
//! [`super::sweep`] deletes it through the state left in that directory.

use super::peer::{in_path, peer_report, RunDir};
use super::sweep::RUNC_STATE;
use super::{process, Runner};
use nix::sys::signal::Signal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use twinbox_spec::{Outcome, RunReport, RunSpec};

/// Name of this peer in tables.
pub const NAME: &str = "runc";

/// What runc can do: what every peer runtime can, and a network namespace with a link
/// when the run asks for one.
pub const CAPABILITIES: super::Capabilities = super::Capabilities {
    net: super::NetAt::Link,
    ..super::PEER_RUNTIME
};

/// runc runner.
#[derive(Debug)]
pub struct Runc {
    binary: PathBuf,
    rootfs: PathBuf,
    state: RunDir,
    template: serde_json::Value,
    runs: AtomicU32,
}

impl Runc {
    /// runc from PATH, over the image mounted at `rootfs`; `Ok(None)` if runc is not
    /// installed.
    pub fn find(rootfs: &Path) -> Result<Option<Self>, String> {
        let Some(binary) = in_path("runc") else {
            return Ok(None);
        };
        let state = RunDir::create("runc")?;
        let mut me = Self {
            binary,
            rootfs: rootfs.into(),
            state,
            template: serde_json::Value::Null,
            runs: AtomicU32::new(0),
        };
        // `runc spec` writes its default config.json into the bundle directory.
        let mut spec_cmd = Command::new(&me.binary);
        spec_cmd.args(["spec", "--bundle"]).arg(me.state.path());
        process::die_with_bench(&mut spec_cmd, Signal::SIGKILL);
        let out = spec_cmd.output().map_err(|e| format!("runc spec: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "runc spec: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let default = me.state.path().join("config.json");
        let text =
            std::fs::read_to_string(&default).map_err(|e| format!("{}: {e}", default.display()))?;
        let _ = std::fs::remove_file(&default);
        me.template = serde_json::from_str(&text).map_err(|e| format!("runc spec output: {e}"))?;
        Ok(Some(me))
    }
}

/// runc's default config changed for one run (see the module docs); with `netns`, the
/// container joins that network namespace instead of getting an empty one.
pub fn config_for(
    template: &serde_json::Value,
    rootfs: &Path,
    spec: &RunSpec,
    netns: Option<&Path>,
) -> serde_json::Value {
    let mut c = template.clone();
    if let (Some(path), Some(namespaces)) = (netns, c["linux"]["namespaces"].as_array_mut()) {
        namespaces.retain(|n| n["type"] != "network");
        namespaces.push(serde_json::json!({ "type": "network", "path": path }));
    }
    c["process"]["terminal"] = false.into();
    c["process"]["args"] = spec.argv.clone().into();
    c["root"] = serde_json::json!({ "path": rootfs, "readonly": true });
    c["hostname"] = "twinbox".into();
    let mut resources = serde_json::json!({
        "memory": { "limit": u64::from(spec.memory_mib) << 20 }
    });
    if let Some(cpus) = spec.cpus {
        resources["cpu"] =
            serde_json::json!({ "quota": (cpus * 100_000.0) as i64, "period": 100_000 });
    }
    if let Some(devices) = c["linux"]["resources"].get("devices").cloned() {
        resources["devices"] = devices;
    }
    c["linux"]["resources"] = resources;
    if !c["mounts"].is_array() {
        c["mounts"] = serde_json::json!([]);
    }
    if let Some(mounts) = c["mounts"].as_array_mut() {
        if !spec.disks.is_empty() {
            // The root is read-only and has no /mnt/disk<N> files to bind onto: a tmpfs
            // /mnt holds the mount points (twinbox's container has its overlay there).
            mounts.push(serde_json::json!({
                "destination": "/mnt",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=755"],
            }));
        }
        for (n, disk) in spec.disks.iter().enumerate() {
            let mut options = vec!["bind"];
            if disk.read_only {
                options.push("ro");
            }
            mounts.push(serde_json::json!({
                "destination": format!("/mnt/disk{n}"),
                "type": "bind",
                "source": disk.path,
                "options": options,
            }));
        }
    }
    c
}

impl Runner for Runc {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> super::Capabilities {
        CAPABILITIES
    }

    fn run(&self, spec: &RunSpec) -> Result<RunReport, String> {
        let n = self.runs.fetch_add(1, Ordering::Relaxed);
        let id = format!("twinbox-bench-{}-{n}", std::process::id());
        let bundle_dir = RunDir::create("runc-bundle")?;
        let bundle = bundle_dir.path();
        // With `spec.net`, a namespace of the bench's with a link to the host, as a CNI
        // plugin would prepare it; it lives until this run's report is made.
        let net = spec.net.map(super::netns::BoxNet::create).transpose()?;
        let config = config_for(
            &self.template,
            &self.rootfs,
            spec,
            net.as_ref().map(|n| n.path()),
        );
        std::fs::write(bundle.join("config.json"), config.to_string())
            .map_err(|e| format!("{}: {e}", bundle.display()))?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(self.state.path().join(RUNC_STATE));
        cmd.args(["run", "--bundle"]).arg(bundle).arg(&id);
        let done = process::run(cmd, spec.spawn_ns, true, spec.time_limit)?;
        if matches!(done.outcome, Outcome::Failed(_)) {
            // The time limit killed runc, not necessarily its container: remove it.
            let mut delete = Command::new(&self.binary);
            delete.arg("--root").arg(self.state.path().join(RUNC_STATE));
            delete.args(["delete", "--force", &id]);
            process::die_with_bench(&mut delete, Signal::SIGKILL);
            let _ = delete.output();
        }
        let mut report = peer_report(
            NAME,
            done,
            "runc process start to exit; image pre-mounted by the bench",
            |outcome, _| outcome,
        );
        report.network = net.as_ref().and_then(|n| n.link_info());
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinbox_spec::run_spec::DiskSpec;

    #[test]
    fn config_keeps_runc_defaults_and_sets_the_run() {
        let template = serde_json::json!({
            "process": { "terminal": true, "args": ["sh"], "noNewPrivileges": true },
            "root": { "path": "rootfs", "readonly": true },
            "hostname": "runc",
            "mounts": [ { "destination": "/proc", "type": "proc", "source": "proc" } ],
            "linux": { "resources": { "devices": [ { "allow": false, "access": "rwm" } ] } }
        });
        let mut spec = RunSpec::new("/img", vec!["fio".into(), "--x".into()]);
        spec.memory_mib = 64;
        spec.cpus = Some(0.5);
        spec.disks = vec![DiskSpec {
            path: "/d.img".into(),
            read_only: true,
        }];
        let c = config_for(&template, Path::new("/run/root"), &spec, None);
        assert_eq!(c["process"]["args"], serde_json::json!(["fio", "--x"]));
        assert_eq!(c["process"]["terminal"], false);
        assert_eq!(c["process"]["noNewPrivileges"], true);
        assert_eq!(c["root"]["path"], "/run/root");
        assert_eq!(c["hostname"], "twinbox");
        assert_eq!(c["linux"]["resources"]["memory"]["limit"], 64u64 << 20);
        assert_eq!(c["linux"]["resources"]["cpu"]["quota"], 50_000);
        assert_eq!(c["linux"]["resources"]["devices"][0]["allow"], false);
        let mounts = c["mounts"].as_array().unwrap();
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[1]["destination"], "/mnt");
        assert_eq!(mounts[2]["destination"], "/mnt/disk0");
        assert_eq!(mounts[2]["options"], serde_json::json!(["bind", "ro"]));
    }

    #[test]
    fn a_given_network_namespace_replaces_runcs_empty_one() {
        let template = serde_json::json!({
            "linux": { "namespaces": [ { "type": "pid" }, { "type": "network" } ] }
        });
        let spec = RunSpec::new("/img", vec!["true".into()]);
        let ns = Path::new("/proc/1/task/2/ns/net");
        let c = config_for(&template, Path::new("/r"), &spec, Some(ns));
        assert_eq!(
            c["linux"]["namespaces"],
            serde_json::json!([
                { "type": "pid" },
                { "type": "network", "path": "/proc/1/task/2/ns/net" }
            ])
        );
        let c = config_for(&template, Path::new("/r"), &spec, None);
        assert_eq!(
            c["linux"]["namespaces"][1],
            serde_json::json!({ "type": "network" })
        );
    }
}
