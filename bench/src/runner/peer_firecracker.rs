//! Peer: Firecracker booting the same tiny guest, timed from process start to process
//! exit (Firecracker has no twinbox marker device, so no inner phases).
//!
//! Firecracker is started without its API socket, configured by one JSON file:
//!
//! ```text
//! firecracker --no-api --config-file <run dir>/vm-config.json
//! {"boot-source":    {"kernel_image_path": <spec.kernel, absolute>},
//!  "machine-config": {"vcpu_count": <spec.vcpus>, "mem_size_mib": <spec.memory_mib>}}
//! ```
//!
//! - `--no-api --config-file`: boot at once from the file; no socket to create, poll and
//!   clean up. `--no-api` also drops the API thread, so the VMM does only what it must.
//! - No `boot_args`: Firecracker then uses its own documented default command line
//!   (`reboot=k panic=1 ...`), which a PVH guest with no command-line parser ignores. No
//!   drives, no network: the tiny guest touches none.
//! - Everything else is Firecracker's default, seccomp filters included: the comparison is
//!   with Firecracker as shipped.
//! - Its log goes to its stdout (no `--log-path`), which is captured and shown when a run
//!   fails; metrics are written nowhere (no `--metrics-path`). The process runs in a
//!   per-run directory that holds the config file and is removed on every path, so
//!   nothing lands in the bench's working directory.
//!
//! The guest writes the marker (ignored: no device there), an ACPI S5 byte to port 0x600
//! (ignored: Firecracker's x86 port devices are the serial ports and the i8042), then
//! resets through the i8042, which makes Firecracker stop the VM and exit with status 0.
//!
//! Sources: Firecracker `src/firecracker/src/main.rs` (the `--no-api`, `--config-file`,
//! `--log-path`, `--metrics-path` arguments and the exit path of `run_without_api`),
//! `docs/getting-started.md` (config file), `docs/pvh.md` (PVH kernels are booted through
//! the note), `FAQ.md` / issue #598 (a guest reboot ends the Firecracker process),
//! `src/vmm/src/device_manager/legacy.rs` (x86 port devices).

use super::peer::{executable_file, peer_outcome, peer_report, RunDir, VMM_NOTE};
use super::{process, Runner};
use std::path::{Path, PathBuf};
use std::process::Command;
use twinbox_spec::{RunReport, RunSpec};

/// Name of this peer in tables.
pub const NAME: &str = "firecracker";

/// Name of the config file inside the per-run directory.
const CONFIG_FILE: &str = "vm-config.json";

/// Firecracker runner (used with the tiny guest only).
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

/// The `--config-file` JSON for `spec`.
pub fn config_json(spec: &RunSpec) -> Result<serde_json::Value, String> {
    let kernel = spec
        .kernel
        .as_ref()
        .ok_or("firecracker peer needs a kernel")?;
    let kernel =
        std::path::absolute(kernel).map_err(|e| format!("kernel {}: {e}", kernel.display()))?;
    let kernel = kernel
        .to_str()
        .ok_or_else(|| format!("kernel path {} is not UTF-8", kernel.display()))?;
    Ok(serde_json::json!({
        "boot-source": { "kernel_image_path": kernel },
        "machine-config": {
            "vcpu_count": spec.vcpus,
            "mem_size_mib": spec.memory_mib,
        },
    }))
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
        super::TINY_GUEST_VMM
    }

    fn run(&self, spec: &RunSpec) -> Result<RunReport, String> {
        let config = config_json(spec)?;
        let dir = RunDir::create(NAME)?;
        let config_path = dir.path().join(CONFIG_FILE);
        let text =
            serde_json::to_vec_pretty(&config).map_err(|e| format!("firecracker config: {e}"))?;
        std::fs::write(&config_path, text)
            .map_err(|e| format!("{}: {e}", config_path.display()))?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(args(&config_path)).current_dir(dir.path());
        let done = process::run(cmd, spec.spawn_ns, true, spec.time_limit)?;
        drop(dir);
        Ok(peer_report(NAME, done, VMM_NOTE, |o, out| {
            peer_outcome(NAME, o, out)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::peer::tests::{script, tiny_spec};
    use crate::runner::peer::RunDir;
    use twinbox_spec::{BoxKind, Outcome};

    #[test]
    fn config_has_kernel_vcpus_and_memory_only() {
        let spec = tiny_spec(Path::new("/cache/tiny-guest.elf"));
        let json = config_json(&spec).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "boot-source": { "kernel_image_path": "/cache/tiny-guest.elf" },
                "machine-config": { "vcpu_count": 2, "mem_size_mib": 128 },
            })
        );
        assert_eq!(
            args(Path::new("/tmp/x/vm-config.json")),
            ["--no-api", "--config-file", "/tmp/x/vm-config.json"]
        );
    }

    #[test]
    fn relative_kernel_is_made_absolute() {
        // Firecracker runs in its own directory, so a relative path would miss.
        let spec = tiny_spec(Path::new("out/tiny-guest.elf"));
        let json = config_json(&spec).unwrap();
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
        assert!(config_json(&spec).is_err());
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
        let report = fc.run(&tiny_spec(Path::new("/k/tiny.elf"))).unwrap();
        assert_eq!(report.outcome, Outcome::Exited(0));
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
        let report = fc.run(&tiny_spec(Path::new("/k/tiny.elf"))).unwrap();
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
        let mut spec = tiny_spec(Path::new("/k/tiny.elf"));
        spec.time_limit = Some(std::time::Duration::from_millis(200));
        let report = fc.run(&spec).unwrap();
        assert!(
            matches!(&report.outcome, Outcome::Failed(w) if w.contains("time limit")),
            "{:?}",
            report.outcome
        );
        assert!(!run_dir_of(&report).exists());
    }
}
