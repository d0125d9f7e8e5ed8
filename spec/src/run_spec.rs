//! What one run is asked to do, for either box.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

/// Largest guest/container memory accepted, in MiB (1 TiB): anything above is a typo.
pub const MAX_MEMORY_MIB: u32 = 1 << 20;
/// Smallest memory a Linux guest of ours can boot in, in MiB.
pub const MIN_MEMORY_MIB: u32 = 16;
/// Largest vCPU count accepted (the KVM limit on x86 is higher, but no microVM needs more).
pub const MAX_VCPUS: u32 = 254;

/// An extra disk given to the box: a virtio-blk device in the VM, a bind mount in the
/// container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub read_only: bool,
}

impl std::str::FromStr for DiskSpec {
    type Err = String;

    /// Parses `PATH` or `PATH:ro` / `PATH:rw`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (path, read_only) = match s.rsplit_once(':') {
            Some((path, "ro")) => (path, true),
            Some((path, "rw")) => (path, false),
            _ => (s, false),
        };
        if path.is_empty() {
            return Err(format!("disk {s:?}: empty path"));
        }
        Ok(Self {
            path: path.into(),
            read_only,
        })
    }
}

/// The box's network (issue 11): none by default, so a box is as closed as without it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetMode {
    /// `eth0` on a point-to-point link with the host: the host reaches the box and the box
    /// the host, nothing further.
    Link,
    /// The link, and the box's traffic masqueraded out of the host's default route.
    Nat,
}

impl std::str::FromStr for NetMode {
    type Err = String;

    /// Parses `link` or `nat`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "link" => Ok(Self::Link),
            "nat" => Ok(Self::Nat),
            other => Err(format!(
                "--net {other:?}: use `--net` (a link with the host) or `--net nat` (and NAT out)"
            )),
        }
    }
}

impl std::fmt::Display for NetMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Link => "link",
            Self::Nat => "nat",
        })
    }
}

/// Where the workload's output goes.
/// Where the workload's stdin comes from, in both boxes alike.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StdinMode {
    /// End of input at once, as from `/dev/null` (library callers, the bench, and the CLI
    /// when its stdin is a terminal and neither `-i` nor `-t` was given).
    #[default]
    Null,
    /// The caller's stdin (fd 0), until its end of input.
    Inherit,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputMode {
    /// Stream it to our own stdout/stderr as it comes.
    #[default]
    Inherit,
    /// Collect it into `RunReport::output`.
    Capture,
}

/// Who the workload runs as (an image's `User`, resolved on the host against the
/// image's `/etc/passwd` and `/etc/group`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadUser {
    /// The user id.
    pub uid: u32,
    /// The primary group id.
    pub gid: u32,
    /// Supplementary group ids.
    pub groups: Vec<u32>,
}

/// One run: the image, the workload and the size of the box.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// The root filesystem image (ext4), shared by both boxes. With `rootfs_layers` the
    /// container does not read it (it names the image in messages).
    pub rootfs: PathBuf,
    /// The container's root as overlayfs layers instead of `rootfs` (`--image`): the
    /// directories of an image's unpacked layers, lowest first, as
    /// `twinbox_image::Layers::dirs`; a fresh upper layer per run.
    #[serde(default)]
    pub rootfs_layers: Option<Vec<PathBuf>>,
    /// Run the workload as this user; `None`: as root.
    #[serde(default)]
    pub user: Option<WorkloadUser>,
    /// Guest kernel (VM only): ELF vmlinux or bzImage.
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (VM only). `None`: twinbox's initramfs for a Linux kernel (it
    /// mounts the image and starts twinbox-init), none for any other kernel.
    pub initrd: Option<PathBuf>,
    /// Appended to the kernel command line (VM only).
    pub cmdline_extra: Option<String>,
    /// The workload's argv.
    pub argv: Vec<String>,
    /// The workload's environment as `KEY=VALUE`; a default PATH is added when absent.
    pub env: Vec<String>,
    /// The workload's working directory inside the box.
    pub cwd: String,
    /// vCPUs of the VM; CPUs of the container when `cpus` is not given.
    pub vcpus: u32,
    /// Guest memory / container memory limit, in MiB.
    pub memory_mib: u32,
    /// Container CPU quota in CPUs (e.g. 0.5); defaults to `vcpus`.
    pub cpus: Option<f64>,
    /// Container pids limit.
    pub pids_limit: Option<u32>,
    /// Hostname inside the box.
    pub hostname: Option<String>,
    /// Extra disks.
    pub disks: Vec<DiskSpec>,
    /// Run the container in a new user namespace too.
    pub user_namespace: bool,
    /// Host `CLOCK_MONOTONIC` ns when the run was requested (the `spawn` phase).
    pub spawn_ns: u64,
    /// Kill the box if the workload has not exited after this long.
    pub time_limit: Option<Duration>,
    /// Where the workload's output goes.
    pub output: OutputMode,
    /// The box's network; `None`: loopback only.
    #[serde(default)]
    pub net: Option<NetMode>,
    /// The workload's stdin.
    #[serde(default)]
    pub stdin: StdinMode,
    /// `-t`: the workload runs on a pty inside the box, relayed to the caller's terminal
    /// (raw mode, window size passed through and resizes forwarded).
    #[serde(default)]
    pub tty: bool,
    /// The VM's serial console (kernel log, init's own lines) saved to this file; without
    /// it the console is discarded unless `verbose`.
    #[serde(default)]
    pub console_log: Option<PathBuf>,
    /// Init's own progress lines on stderr; in the VM also the serial console.
    #[serde(default)]
    pub verbose: bool,
}

/// A `RunSpec` that cannot run.
#[derive(Debug, Error, PartialEq)]
pub enum SpecError {
    #[error("no command given: put it after `--`, e.g. `-- /bin/echo hello`")]
    NoCommand,
    #[error("--vcpus {0}: must be between 1 and {MAX_VCPUS}")]
    Vcpus(u32),
    #[error("--memory {0} MiB: must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}")]
    Memory(u32),
    #[error("--cpus {0}: must be a positive number of CPUs no larger than {MAX_VCPUS}")]
    Cpus(f64),
    #[error("--pids {0}: must be at least 1")]
    Pids(u32),
    #[error("invalid job: {0}")]
    Job(String),
}

impl RunSpec {
    /// A spec with default sizes (1 vCPU, 128 MiB) that runs `argv` from `rootfs`.
    pub fn new(rootfs: impl Into<PathBuf>, argv: Vec<String>) -> Self {
        Self {
            rootfs: rootfs.into(),
            rootfs_layers: None,
            user: None,
            kernel: None,
            initrd: None,
            cmdline_extra: None,
            argv,
            env: Vec::new(),
            cwd: "/".into(),
            vcpus: 1,
            memory_mib: 128,
            cpus: None,
            pids_limit: None,
            hostname: None,
            disks: Vec::new(),
            user_namespace: false,
            spawn_ns: crate::clock::monotonic_ns(),
            time_limit: None,
            output: OutputMode::Inherit,
            net: None,
            stdin: StdinMode::Null,
            tty: false,
            console_log: None,
            verbose: false,
        }
    }

    /// Checks sizes and the workload; file checks belong to each box.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.argv.is_empty() {
            return Err(SpecError::NoCommand);
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(SpecError::Vcpus(self.vcpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(SpecError::Memory(self.memory_mib));
        }
        if let Some(cpus) = self.cpus {
            if !(cpus.is_finite() && cpus > 0.0 && cpus <= f64::from(MAX_VCPUS)) {
                return Err(SpecError::Cpus(cpus));
            }
        }
        if self.pids_limit == Some(0) {
            return Err(SpecError::Pids(0));
        }
        self.job()
            .validate()
            .map_err(|e| SpecError::Job(e.to_string()))
    }

    /// The job for twinbox-init, without box-specific settings (marker, overlay,
    /// power-off), which each box adds.
    pub fn job(&self) -> twinbox_proto::Job {
        let mut env = self.env.clone();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        }
        twinbox_proto::Job {
            argv: self.argv.clone(),
            env,
            cwd: self.cwd.clone(),
            hostname: self.hostname.clone(),
            tty: self.tty,
            verbose: self.verbose,
            user: self.user.as_ref().map(|u| twinbox_proto::JobUser {
                uid: u.uid,
                gid: u.gid,
                groups: u.groups.clone(),
            }),
            ..twinbox_proto::Job::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked() {
        let ok = RunSpec::new("/img", vec!["true".into()]);
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(
            RunSpec {
                vcpus: 0,
                ..ok.clone()
            }
            .validate(),
            Err(SpecError::Vcpus(0))
        );
        assert_eq!(
            RunSpec {
                memory_mib: 1,
                ..ok.clone()
            }
            .validate(),
            Err(SpecError::Memory(1))
        );
        assert_eq!(
            RunSpec {
                memory_mib: u32::MAX,
                ..ok.clone()
            }
            .validate(),
            Err(SpecError::Memory(u32::MAX))
        );
        assert!(RunSpec {
            cpus: Some(f64::NAN),
            ..ok.clone()
        }
        .validate()
        .is_err());
        assert_eq!(
            RunSpec { argv: vec![], ..ok }.validate(),
            Err(SpecError::NoCommand)
        );
    }

    #[test]
    fn job_gets_a_default_path() {
        let job = RunSpec::new("/img", vec!["true".into()]).job();
        assert!(job.env.iter().any(|e| e.starts_with("PATH=")));
    }

    #[test]
    fn the_job_carries_the_user_and_an_older_spec_without_layers_or_user_still_reads() {
        let mut spec = RunSpec::new("/img", vec!["id".into()]);
        assert_eq!(spec.job().user, None);
        spec.user = Some(WorkloadUser {
            uid: 1000,
            gid: 100,
            groups: vec![10],
        });
        let user = spec.job().user.unwrap();
        assert_eq!((user.uid, user.gid, user.groups), (1000, 100, vec![10]));
        let mut json: serde_json::Value = serde_json::to_value(&spec).unwrap();
        let object = json.as_object_mut().unwrap();
        object.remove("rootfs_layers");
        object.remove("user");
        let old: RunSpec = serde_json::from_value(json).unwrap();
        assert_eq!((old.rootfs_layers, old.user), (None, None));
    }

    #[test]
    fn net_modes_parse_and_print() {
        assert_eq!("link".parse::<NetMode>(), Ok(NetMode::Link));
        assert_eq!("nat".parse::<NetMode>(), Ok(NetMode::Nat));
        assert!("bridge"
            .parse::<NetMode>()
            .unwrap_err()
            .contains("--net nat"));
        assert_eq!(NetMode::Nat.to_string(), "nat");
    }

    #[test]
    fn disk_specs_parse() {
        let d: DiskSpec = "/tmp/a.img:ro".parse().unwrap();
        assert_eq!(
            d,
            DiskSpec {
                path: "/tmp/a.img".into(),
                read_only: true
            }
        );
        let d: DiskSpec = "/tmp/b.img".parse().unwrap();
        assert!(!d.read_only);
        assert!(":ro".parse::<DiskSpec>().is_err());
    }
}
