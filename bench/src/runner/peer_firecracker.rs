//! Peer: Firecracker, timed from process start to process exit (Firecracker has no
//! twinbox marker device, so no inner phases). Like the QEMU peer it boots the tiny guest
//! in the `vmm` scenario, else twinbox's kernel with the image as a read-only root drive,
//! extra disks as further drives, twinbox's own kernel command line and job, and with
//! `RunSpec::net` a tap.
//!
//! Firecracker is started without its API socket, configured by one JSON file:
//!
//! ```text
//! firecracker --no-api --config-file <run dir>/vm-config.json
//! {"boot-source":    {"kernel_image_path": <spec.kernel, absolute>,
//!                     "boot_args": <the QEMU peer's command line, job included>},
//!  "drives":         [{"drive_id": "rootfs", "path_on_host": <spec.rootfs>,
//!                      "is_root_device": true, "is_read_only": true}, <disks>...],
//!  "machine-config": {"vcpu_count": <spec.vcpus>, "mem_size_mib": <spec.memory_mib>},
//!  "network-interfaces": [{"iface_id": "eth0", "host_dev_name": <tap>,
//!                          "guest_mac": <twinbox's MAC for the link>}]}
//! ```
//!
//! - `--no-api --config-file`: boot at once from the file; no socket to create, poll and
//!   clean up. `--no-api` also drops the API thread, so the VMM does only what it must.
//! - `drives` is required by Firecracker's schema (`VmmConfig::drives` has no serde
//!   default: without it every run fails with "missing field `drives`"); the tiny guest
//!   gets `[]` and no `boot_args` (Firecracker's default command line, which a PVH guest
//!   with no command-line parser ignores), so the `vmm` scenario times the bare VMM.
//! - A Linux guest: Firecracker puts the root drive first (`/dev/vda`), appends
//!   `root=/dev/vda ro` (ours says the same) and a `virtio_mmio.device=` entry per device
//!   to `boot_args`, and attaches the tap by name with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
//!   (`devices/virtio/net/tap.rs`, `Tap::open_named`). So the tap must exist and be free:
//!   a [`hostnet::PersistentTap`] (deleted after the run; a killed bench's is swept by the
//!   next lease or bench start).
//! - Everything else is Firecracker's default, seccomp filters included: the comparison is
//!   with Firecracker as shipped.
//! - Its log and the guest's serial console go to its stdout (no `--log-path`), which is
//!   captured; metrics are written nowhere (no `--metrics-path`). The process runs in a
//!   per-run directory that holds the config file and is removed on every path, so
//!   nothing lands in the bench's working directory.
//!
//! The workload's status is init's console line, as for QEMU ([`guest_outcome`]): a guest
//! ends with the i8042 reset (`reboot=k`), which makes Firecracker exit 0 whatever the
//! workload did. The tiny guest writes the marker (ignored), an ACPI S5 byte to port 0x600
//! (ignored) and resets through the i8042; exit 0 is its success.
//!
//! Sources: Firecracker `src/firecracker/src/main.rs` (the `--no-api`, `--config-file`,
//! `--log-path`, `--metrics-path` arguments and the exit path of `run_without_api`),
//! `src/vmm/src/resources.rs` (`VmmConfig`), `src/vmm/src/builder.rs` and
//! `device_manager/mmio.rs` (root device and `virtio_mmio.device=` on the command line),
//! `docs/getting-started.md` (config file), `docs/pvh.md` (PVH kernels are booted through
//! the note), `FAQ.md` / issue #598 (a guest reboot ends the Firecracker process),
//! `src/vmm/src/device_manager/legacy.rs` (x86 port devices).

use super::peer::{executable_file, guest_outcome, is_tiny_guest, peer_report, RunDir, VMM_NOTE};
use super::Runner;
use std::path::{Path, PathBuf};
use std::process::Command;
use twinbox_spec::{RunReport, RunSpec};

/// Name of this peer in tables.
pub const NAME: &str = "firecracker";

/// Name of the config file inside the per-run directory.
const CONFIG_FILE: &str = "vm-config.json";

/// What the Firecracker peer can do: what the QEMU peer can (our kernel and image, disks
/// as virtio-blk drives, a tap link); its memory is an outside process's.
pub const CAPABILITIES: super::Capabilities = super::peer::KERNEL_VMM;

/// Firecracker runner.
#[derive(Debug, Clone)]
pub struct Firecracker {
    /// The firecracker binary, absolute.
    binary: PathBuf,
}

impl Firecracker {
    /// A runner for the Firecracker binary at `path`; one line saying why when it is not
    /// an executable file.
    pub fn new(path: &Path) -> Result<Self, String> {
        Ok(Self {
            binary: executable_file(path, NAME)?,
        })
    }

    /// The binary this runner starts.
    pub fn binary(&self) -> &Path {
        &self.binary
    }
}

/// The guest's link as the config names it: the tap's name and the guest's MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// The host tap Firecracker opens by name.
    pub tap: String,
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

/// A path as the config's JSON needs it: absolute (Firecracker runs in its own directory)
/// and UTF-8.
fn json_path(path: &Path, what: &str) -> Result<String, String> {
    let absolute =
        std::path::absolute(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    absolute
        .to_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("{what} path {} is not UTF-8", absolute.display()))
}

/// The `--config-file` JSON for `spec`: the tiny guest alone (`boot_args` None), or a
/// Linux guest with its command line, the image and disks as drives and `nic`.
pub fn config_json(
    spec: &RunSpec,
    boot_args: Option<&str>,
    nic: Option<&Nic>,
) -> Result<serde_json::Value, String> {
    let kernel = spec
        .kernel
        .as_ref()
        .ok_or("firecracker peer needs a kernel")?;
    let mut boot_source = serde_json::json!({ "kernel_image_path": json_path(kernel, "kernel")? });
    let mut drives = Vec::new();
    if let Some(args) = boot_args {
        boot_source["boot_args"] = args.into();
        drives.push(serde_json::json!({
            "drive_id": "rootfs",
            "path_on_host": json_path(&spec.rootfs, "rootfs")?,
            "is_root_device": true,
            "is_read_only": true,
        }));
        for (n, disk) in spec.disks.iter().enumerate() {
            drives.push(serde_json::json!({
                "drive_id": format!("disk{}", n + 1),
                "path_on_host": json_path(&disk.path, "disk")?,
                "is_root_device": false,
                "is_read_only": disk.read_only,
            }));
        }
    }
    let mut config = serde_json::json!({
        "boot-source": boot_source,
        "drives": drives,
        "machine-config": {
            "vcpu_count": spec.vcpus,
            "mem_size_mib": spec.memory_mib,
        },
    });
    if let Some(nic) = nic {
        config["network-interfaces"] = serde_json::json!([{
            "iface_id": "eth0",
            "host_dev_name": nic.tap,
            "guest_mac": nic.mac,
        }]);
    }
    Ok(config)
}

/// Firecracker's arguments for a config file at `config`.
pub fn args(config: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "--no-api".into(),
        "--config-file".into(),
        config.as_os_str().to_owned(),
    ]
}

impl Runner for Firecracker {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> super::Capabilities {
        CAPABILITIES
    }

    fn run(&self, spec: &RunSpec) -> Result<RunReport, String> {
        let kernel = spec
            .kernel
            .as_ref()
            .ok_or("firecracker peer needs a kernel")?;
        let tiny = is_tiny_guest(kernel);
        // Lives until Firecracker has exited; deleted on drop, on every path.
        let tap = match spec.net {
            Some(mode) if !tiny => {
                let lease = super::peer::lease_link(mode)?;
                Some(hostnet::PersistentTap::create(lease).map_err(|e| format!("tap: {e}"))?)
            }
            _ => None,
        };
        let boot_args = if tiny {
            None
        } else {
            let net = tap.as_ref().map(|t| t.lease().net_config(None));
            Some(super::peer_qemu::kernel_cmdline(
                spec,
                twinbox_spec::host::is_pvm(),
                net,
            )?)
        };
        let nic = tap.as_ref().map(|t| Nic {
            tap: t.name().to_owned(),
            mac: hostnet::format_mac(&t.mac()),
        });
        let config = config_json(spec, boot_args.as_deref(), nic.as_ref())?;
        let dir = RunDir::create(NAME)?;
        let config_path = dir.path().join(CONFIG_FILE);
        let text =
            serde_json::to_vec_pretty(&config).map_err(|e| format!("firecracker config: {e}"))?;
        std::fs::write(&config_path, text)
            .map_err(|e| format!("{}: {e}", config_path.display()))?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(args(&config_path)).current_dir(dir.path());
        let done = super::peer::run_vmm_process(cmd, spec)?;
        drop(dir);
        let mut report = peer_report(NAME, done, VMM_NOTE, |process, console| {
            guest_outcome(NAME, process, console, tiny)
        });
        report.network = tap.as_ref().map(|t| t.link_info());
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::peer::tests::{script, tiny_spec};
    use crate::runner::peer::RunDir;
    use twinbox_spec::{BoxKind, Outcome};

    #[test]
    fn the_tiny_guest_config_has_kernel_no_drives_vcpus_and_memory() {
        let spec = tiny_spec(Path::new("/cache/tiny-guest.elf"));
        let json = config_json(&spec, None, None).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "boot-source": { "kernel_image_path": "/cache/tiny-guest.elf" },
                "drives": [],
                "machine-config": { "vcpu_count": 2, "mem_size_mib": 128 },
            })
        );
        assert_eq!(
            args(Path::new("/tmp/x/vm-config.json")),
            ["--no-api", "--config-file", "/tmp/x/vm-config.json"]
        );
    }

    #[test]
    fn a_linux_guest_gets_its_command_line_a_read_only_root_drive_disks_and_the_tap() {
        let mut spec = RunSpec::new("/img/rootfs.ext4", vec!["/bin/true".into()]);
        spec.kernel = Some("/k/vmlinux".into());
        spec.disks = vec![twinbox_spec::run_spec::DiskSpec {
            path: "/scratch.img".into(),
            read_only: true,
        }];
        let nic = Nic {
            tap: "tbt4".into(),
            mac: "02:74:62:00:00:04".into(),
        };
        let line = "console=ttyS0 twinbox.job=abc";
        let json = config_json(&spec, Some(line), Some(&nic)).unwrap();
        assert_eq!(json["boot-source"]["boot_args"], line);
        assert_eq!(
            json["drives"],
            serde_json::json!([
                {"drive_id": "rootfs", "path_on_host": "/img/rootfs.ext4",
                 "is_root_device": true, "is_read_only": true},
                {"drive_id": "disk1", "path_on_host": "/scratch.img",
                 "is_root_device": false, "is_read_only": true},
            ])
        );
        assert_eq!(
            json["network-interfaces"],
            serde_json::json!([
                {"iface_id": "eth0", "host_dev_name": "tbt4", "guest_mac": "02:74:62:00:00:04"}
            ])
        );
    }

    #[test]
    fn relative_kernel_is_made_absolute() {
        // Firecracker runs in its own directory, so a relative path would miss.
        let spec = tiny_spec(Path::new("out/tiny-guest.elf"));
        let json = config_json(&spec, None, None).unwrap();
        let kernel = json["boot-source"]["kernel_image_path"].as_str().unwrap();
        assert_eq!(
            Path::new(kernel),
            std::env::current_dir().unwrap().join("out/tiny-guest.elf")
        );
    }

    #[test]
    fn no_kernel_is_an_error() {
        let mut spec = tiny_spec(Path::new("/k"));
        spec.kernel = None;
        assert!(config_json(&spec, None, None).is_err());
    }

    #[test]
    fn new_rejects_missing_and_non_executable_files() {
        let dir = RunDir::create("fc-test").unwrap();
        let missing = dir.path().join("firecracker");
        let e = Firecracker::new(&missing).unwrap_err();
        assert!(e.contains("no such file") && !e.contains('\n'), "{e}");
        let plain = script(dir.path(), "plain", "exit 0", 0o644);
        let e = Firecracker::new(&plain).unwrap_err();
        assert!(e.contains("not executable") && !e.contains('\n'), "{e}");
        let e = Firecracker::new(dir.path()).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        let ok = script(dir.path(), "fc", "exit 0", 0o755);
        assert_eq!(Firecracker::new(&ok).unwrap().binary(), ok);
    }

    /// The fake firecracker checks it got the config file in its own run directory, prints
    /// it, then exits with the status given.
    fn fake(dir: &Path, status: u8) -> Firecracker {
        let body = format!(
            "[ \"$1\" = --no-api ] && [ \"$2\" = --config-file ] || exit 90\n\
             [ \"$(dirname \"$3\")\" = \"$PWD\" ] || exit 91\n\
             echo \"run dir $PWD\"; cat \"$3\"; echo oops >&2; exit {status}"
        );
        Firecracker::new(&script(dir, &format!("fc-{status}"), &body, 0o755)).unwrap()
    }

    /// The tiny guest written into `dir` (the runner recognises it by its bytes).
    fn tiny_kernel(dir: &Path) -> PathBuf {
        let path = dir.join("tiny.elf");
        crate::tiny_guest::write_to(&path).unwrap();
        path
    }

    fn run_dir_of(report: &RunReport) -> PathBuf {
        let out = report.output.as_deref().unwrap();
        let line = out
            .lines()
            .find_map(|l| l.strip_prefix("run dir "))
            .unwrap();
        PathBuf::from(line)
    }

    #[test]
    fn exit_zero_is_success_and_the_run_dir_is_removed() {
        let dir = RunDir::create("fc-test").unwrap();
        let fc = fake(dir.path(), 0);
        let report = fc.run(&tiny_spec(&tiny_kernel(dir.path()))).unwrap();
        assert_eq!(report.outcome, Outcome::Exited(0));
        let out = report.output.as_deref().unwrap();
        assert!(out.contains("\"drives\": []"), "{out}");
        assert_eq!(report.box_kind, BoxKind::Peer("firecracker".into()));
        assert!(report.timeline.is_ordered());
        let out = report.output.as_deref().unwrap();
        assert!(out.contains("\"mem_size_mib\": 128"), "{out}");
        let run_dir = run_dir_of(&report);
        assert!(run_dir.starts_with(std::env::temp_dir()), "{run_dir:?}");
        assert!(!run_dir.exists(), "{run_dir:?} left behind");
    }

    #[test]
    fn non_zero_exit_fails_with_the_output_and_the_run_dir_is_removed() {
        let dir = RunDir::create("fc-test").unwrap();
        let fc = fake(dir.path(), 3);
        let report = fc.run(&tiny_spec(&tiny_kernel(dir.path()))).unwrap();
        match &report.outcome {
            Outcome::Failed(why) => {
                assert!(why.starts_with("firecracker ended with Exited(3)"), "{why}");
                assert!(why.contains("oops") && why.contains("vcpu_count"), "{why}");
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        assert!(!run_dir_of(&report).exists());
    }

    #[test]
    fn time_limit_kills_and_still_removes_the_run_dir() {
        let dir = RunDir::create("fc-test").unwrap();
        let body = "echo \"run dir $PWD\"; exec sleep 30";
        let fc = Firecracker::new(&script(dir.path(), "slow", body, 0o755)).unwrap();
        let mut spec = tiny_spec(&tiny_kernel(dir.path()));
        spec.time_limit = Some(std::time::Duration::from_millis(200));
        let report = fc.run(&spec).unwrap();
        assert!(
            matches!(&report.outcome, Outcome::Failed(w) if w.contains("time limit")),
            "{:?}",
            report.outcome
        );
        assert!(!run_dir_of(&report).exists());
    }

    /// A Linux guest's status is the one init printed; exit 0 without it is a failure.
    #[test]
    fn a_linux_guest_reports_inits_status_and_silence_is_a_failure() {
        let dir = RunDir::create("fc-test").unwrap();
        let spec = {
            let mut spec = RunSpec::new("/img/rootfs.ext4", vec!["/bin/true".into()]);
            spec.kernel = Some(dir.path().join("vmlinux"));
            spec
        };
        let said = script(
            dir.path(),
            "fc-said",
            "grep -q '\"is_root_device\": true' \"$3\" || exit 92\n\
             grep -q 'twinbox.job=' \"$3\" || exit 93\n\
             echo 'twinbox-init: workload exited with status 3'; exit 0",
            0o755,
        );
        let report = Firecracker::new(&said).unwrap().run(&spec).unwrap();
        assert_eq!(report.outcome, Outcome::Exited(3), "{:?}", report.output);
        let silent = script(dir.path(), "fc-silent", "echo booting; exit 0", 0o755);
        let report = Firecracker::new(&silent).unwrap().run(&spec).unwrap();
        assert!(
            matches!(&report.outcome, Outcome::Failed(w) if w.contains("init never reported")),
            "{:?}",
            report.outcome
        );
    }
}
