//! Peer: bubblewrap (Debian's package), running the image's workload from the image
//! mounted by [`super::peer_root::PeerRoot`], timed from process start to process exit.
//!
//! Options, from bwrap(1): `--unshare-all` (user if possible, ipc, pid, net, uts,
//! cgroup if possible), `--die-with-parent`, `--new-session`, the image read-only as `/`,
//! a fresh `/proc`, a minimal `/dev`, a tmpfs `/tmp` (and `/mnt` when there are disks), hostname `twinbox`, a clean
//! environment with the same `PATH` as twinbox-init's default, and extra disks as binds
//! at `/mnt/disk<N>`. bubblewrap has no resource limits (no cgroups): the memory and CPU
//! limits twinbox's container and runc get do not apply.

use super::peer::{in_path, peer_report};
use super::{process, Runner};
use std::path::{Path, PathBuf};
use std::process::Command;
use twinbox_spec::{RunReport, RunSpec};

/// Name of this peer in tables.
pub const NAME: &str = "bwrap";

/// `PATH` inside the box: twinbox-init's default.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// bubblewrap runner.
#[derive(Debug)]
pub struct Bwrap {
    binary: PathBuf,
    rootfs: PathBuf,
}

impl Bwrap {
    /// bwrap from PATH over the image mounted at `rootfs`, if installed.
    pub fn find(rootfs: &Path) -> Option<Self> {
        in_path("bwrap").map(|binary| Self {
            binary,
            rootfs: rootfs.into(),
        })
    }
}

/// bwrap's arguments for one run (see the module docs).
pub fn args_for(rootfs: &Path, spec: &RunSpec) -> Vec<String> {
    let mut a: Vec<String> = [
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--ro-bind",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(rootfs.display().to_string());
    a.push("/".into());
    for s in [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--hostname",
        "twinbox",
        "--clearenv",
        "--setenv",
        "PATH",
        PATH,
    ] {
        a.push(s.into());
    }
    if !spec.disks.is_empty() {
        // The image is read-only and has no /mnt/disk<N> files to bind onto: a tmpfs /mnt
        // holds the mount points (twinbox's container has its writable overlay there).
        a.extend(["--tmpfs".to_string(), "/mnt".to_string()]);
    }
    for (n, disk) in spec.disks.iter().enumerate() {
        a.push(
            if disk.read_only {
                "--ro-bind"
            } else {
                "--bind"
            }
            .into(),
        );
        a.push(disk.path.display().to_string());
        a.push(format!("/mnt/disk{n}"));
    }
    a.push("--".into());
    a.extend(spec.argv.iter().cloned());
    a
}

impl Runner for Bwrap {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> super::Capabilities {
        super::PEER_RUNTIME
    }

    fn run(&self, spec: &RunSpec) -> Result<RunReport, String> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(args_for(&self.rootfs, spec));
        let done = process::run(cmd, spec.spawn_ns, true, spec.time_limit)?;
        Ok(peer_report(
            NAME,
            done,
            "bwrap process start to exit; image pre-mounted by the bench; no cgroup limits",
            |outcome, _| outcome,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinbox_spec::run_spec::DiskSpec;

    #[test]
    fn image_is_root_and_disks_are_bound() {
        let mut spec = RunSpec::new("/img", vec!["/bin/true".into()]);
        spec.disks = vec![DiskSpec {
            path: "/d.img".into(),
            read_only: true,
        }];
        let a = args_for(Path::new("/r"), &spec);
        assert!(a.windows(3).any(|w| w == ["--ro-bind", "/r", "/"]));
        assert!(a
            .windows(3)
            .any(|w| w == ["--ro-bind", "/d.img", "/mnt/disk0"]));
        assert!(a.contains(&"--unshare-all".to_string()));
        assert_eq!(
            a[a.len() - 2..],
            ["--".to_string(), "/bin/true".to_string()]
        );
    }
}
