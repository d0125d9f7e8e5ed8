//! Helpers shared by the integration tests: where the artifacts are, what the host can do,
//! the lab, and leak checks. A test that lacks what it needs fails with a message naming
//! it; it never passes silently.
#![allow(dead_code)]

pub mod host_forwarding;
pub mod image;
pub mod kvm;
pub mod lab;
pub mod leaks;
pub mod net;
pub mod peers;

use std::path::{Path, PathBuf};
use std::process::Output;
use twinbox_spec::host::KvmFlavor;

/// The twinbox binary under test.
pub fn twinbox() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_twinbox"))
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Fails the test unless it runs as root.
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "{what} needs root (loop devices, mounts, cgroups, KVM): run the tests as root"
    );
}

/// Fails the test unless the artifact exists; returns its path.
pub fn require_artifact(path: &Path) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing — build the artifacts with scripts/build-artifacts",
        path.display()
    );
    path.to_path_buf()
}

/// The built rootfs image, as a path string; fails unless root (`what` needs it) and the
/// image exists.
pub fn rootfs_image(what: &str) -> String {
    require_root(what);
    require_artifact(&twinbox_spec::artifacts::rootfs_image())
        .display()
        .to_string()
}

/// `<temp dir>/<name>-<pid>`, emptied of what an earlier run left there (it may not exist).
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A finished command's status, stdout and stderr, for failure messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Where VM tests run: on the host's own KVM when it has hardware virtualization, else in
/// the lab (QEMU TCG with software AMD-V), where a Linux guest boots at useful speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmHost {
    /// The host's /dev/kvm is VT-x/AMD-V (possibly nested).
    HostKvm,
    /// The host's KVM is PVM or absent: use the lab.
    Lab,
}

/// Chooses where Linux-booting VM tests run.
pub fn vm_host() -> VmHost {
    match kvm::host_kvm() {
        KvmFlavor::Hardware { .. } | KvmFlavor::Nested { .. } => VmHost::HostKvm,
        _ => VmHost::Lab,
    }
}

/// Runs `script` where VMs boot Linux (see [`vm_host`]): in the lab as `lab` prepares it
/// (twinbox and the artifacts already in), else on the host's KVM.
pub fn run_where_linux_boots(
    script: &str,
    lab: impl FnOnce(lab::Lab) -> lab::Lab,
) -> lab::LabOutput {
    require_root("booting microVMs");
    match vm_host() {
        VmHost::Lab => lab(lab::Lab::new().with_twinbox().with_artifacts()).run(script),
        VmHost::HostKvm => run_vm_script(script),
    }
}

/// Runs a shell script with the twinbox binary and the artifacts available, on the host
/// KVM or in the lab (see [`vm_host`]); `twinbox` is on PATH in both.
pub fn run_vm_script(script: &str) -> lab::LabOutput {
    match vm_host() {
        VmHost::Lab => lab::Lab::new().with_twinbox().with_artifacts().run(script),
        VmHost::HostKvm => {
            let bin_dir = twinbox().parent().unwrap().to_path_buf();
            let path = format!(
                "{}:{}",
                bin_dir.display(),
                std::env::var("PATH").unwrap_or_default()
            );
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                .env("PATH", path)
                .output()
                .expect("run sh");
            let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
            output.push_str(&String::from_utf8_lossy(&out.stderr));
            lab::LabOutput {
                status: out.status.code().unwrap_or(-1),
                output,
            }
        }
    }
}
