//! "Run this in the lab": a script in Debian's cloud kernel under QEMU TCG with kvm-amd
//! loaded (see `lab/run`), with chosen host binaries and files copied in.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What a lab run printed and how its script exited.
#[derive(Debug)]
pub struct LabOutput {
    /// The script's exit status (124: lab time limit, 125: the lab itself failed).
    pub status: i32,
    /// The lab console: the script's stdout and stderr, kernel messages, lab markers.
    pub output: String,
}

impl LabOutput {
    /// The value printed on a line `KEY=VALUE` by the script, if any (last wins).
    pub fn value(&self, key: &str) -> Option<String> {
        let prefix = format!("{key}=");
        self.output
            .lines()
            .filter_map(|line| line.trim_end_matches('\r').strip_prefix(&prefix))
            .next_back()
            .map(str::to_owned)
    }

    /// The value of `KEY=VALUE`; fails naming the key, with the whole output, if missing.
    pub fn expect_value(&self, key: &str) -> String {
        self.value(key)
            .unwrap_or_else(|| panic!("{key} missing from the output:\n{}", self.output))
    }
}

/// A lab run being prepared.
#[derive(Debug, Default)]
pub struct Lab {
    bins: Vec<PathBuf>,
    files: Vec<(PathBuf, String)>,
    artifacts: bool,
    mem_mib: Option<u32>,
    cpus: Option<u32>,
    timeout_s: Option<u32>,
}

impl Lab {
    pub fn new() -> Self {
        Self::default()
    }

    /// Copies a host binary and its shared libraries in, at the same path.
    pub fn bin(mut self, path: impl Into<PathBuf>) -> Self {
        self.bins.push(path.into());
        self
    }

    /// Copies the twinbox binary under test in, and puts it on PATH as `twinbox`.
    pub fn with_twinbox(self) -> Self {
        let exe = super::twinbox();
        self.bin(&exe).file(&exe, "/usr/local/bin/twinbox")
    }

    /// Copies a file in at `dest`.
    pub fn file(mut self, src: impl AsRef<Path>, dest: &str) -> Self {
        self.files
            .push((src.as_ref().to_path_buf(), dest.to_owned()));
        self
    }

    /// Copies the built guest kernel, init with its initramfs, and rootfs in
    /// (TWINBOX_CACHE=/cache in the lab).
    pub fn with_artifacts(mut self) -> Self {
        super::require_artifact(&twinbox_spec::artifacts::kernel_vmlinux());
        super::require_artifact(&twinbox_spec::artifacts::init_binary());
        super::require_artifact(&twinbox_spec::artifacts::initramfs());
        super::require_artifact(&twinbox_spec::artifacts::rootfs_image());
        self.artifacts = true;
        self
    }

    pub fn mem_mib(mut self, mib: u32) -> Self {
        self.mem_mib = Some(mib);
        self
    }

    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = Some(cpus);
        self
    }

    pub fn timeout_s(mut self, seconds: u32) -> Self {
        self.timeout_s = Some(seconds);
        self
    }

    /// Boots the lab, runs `script` with sh, and returns its output and status. Panics
    /// (failing the test) when the lab cannot be started at all.
    pub fn run(self, script: &str) -> LabOutput {
        let lab_run = super::repo_root().join("lab/run");
        super::require_artifact(&twinbox_spec::artifacts::lab_dir().join("vmlinuz"));
        let mut command = Command::new(&lab_run);
        for bin in &self.bins {
            command.arg("--bin").arg(bin);
        }
        for (src, dest) in &self.files {
            command
                .arg("--file")
                .arg(format!("{}:{dest}", src.display()));
        }
        if self.artifacts {
            command.arg("--artifacts");
        }
        if let Some(mib) = self.mem_mib {
            command.args(["--mem", &mib.to_string()]);
        }
        if let Some(cpus) = self.cpus {
            command.args(["--cpus", &cpus.to_string()]);
        }
        if let Some(seconds) = self.timeout_s {
            command.args(["--timeout", &seconds.to_string()]);
        }
        command.arg("--").arg(script);
        let out = command
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", lab_run.display()));
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        let status = out.status.code().unwrap_or(-1);
        assert_ne!(status, 125, "the lab itself failed:\n{output}");
        assert_ne!(status, 124, "the lab hit its time limit:\n{output}");
        LabOutput { status, output }
    }
}
