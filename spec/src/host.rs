//! What kind of host this is: which KVM it has, which cgroup layout, which CPU. Used by
//! `twinbox doctor`, by the VMM (to adapt to PVM), by the tests (to choose the lab), and by
//! the bench (every report says which KVM its VM numbers come from).
//!
//! Every probe reads from a root directory so tests can feed a fake `/proc` and `/sys`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

/// The CPU vendor of a hardware-virtualization host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuVendor {
    Intel,
    Amd,
}

/// Which KVM serves `/dev/kvm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum KvmFlavor {
    /// VT-x or AMD-V on bare metal.
    Hardware { vendor: CpuVendor },
    /// VT-x or AMD-V exposed to this host, which is itself a guest (nested virtualization).
    Nested { vendor: CpuVendor },
    /// PVM: guest kernel code is emulated instruction by instruction.
    Pvm,
    /// `/dev/kvm` exists but cannot be opened read-write.
    NoAccess,
    /// No `/dev/kvm`.
    Absent,
}

impl KvmFlavor {
    /// One line for a person.
    pub fn describe(self) -> &'static str {
        match self {
            KvmFlavor::Hardware {
                vendor: CpuVendor::Intel,
            } => "hardware KVM (Intel VT-x)",
            KvmFlavor::Hardware {
                vendor: CpuVendor::Amd,
            } => "hardware KVM (AMD-V)",
            KvmFlavor::Nested {
                vendor: CpuVendor::Intel,
            } => "nested KVM (VT-x inside a VM)",
            KvmFlavor::Nested {
                vendor: CpuVendor::Amd,
            } => "nested KVM (AMD-V inside a VM)",
            KvmFlavor::Pvm => {
                "PVM KVM: guest kernel code is emulated, so VM timings on this host are not \
                 representative of VT-x/AMD-V hosts"
            }
            KvmFlavor::NoAccess => {
                "/dev/kvm exists but cannot be opened — run as root or join the kvm group"
            }
            KvmFlavor::Absent => "no /dev/kvm — enable VT-x/AMD-V and load kvm_intel or kvm_amd",
        }
    }

    /// Whether VM timings measured here say something about VT-x/AMD-V hosts.
    pub fn timings_representative(self) -> bool {
        matches!(self, KvmFlavor::Hardware { .. } | KvmFlavor::Nested { .. })
    }

    /// Whether a VM can be created at all.
    pub fn usable(self) -> bool {
        !matches!(self, KvmFlavor::NoAccess | KvmFlavor::Absent)
    }

    /// Why no VM can run here at all (no `/dev/kvm`, or no access to it); `None` where
    /// one can.
    pub fn vm_obstacle(self) -> Option<&'static str> {
        (!self.usable()).then(|| self.describe())
    }

    /// Why a Linux guest cannot boot here in useful time; `None` where it can. PVM
    /// emulates every guest kernel instruction, so a Linux boot takes minutes (or stops at
    /// an instruction PVM cannot emulate): a VM that only runs user code (the bench's tiny
    /// guest) is fine there, a Linux boot is not.
    pub fn linux_guest_obstacle(self) -> Option<&'static str> {
        match self {
            KvmFlavor::Pvm => Some(
                "this host's KVM is PVM, which emulates guest kernel code: a Linux guest \
                 takes minutes to boot here (measure Linux VMs on a VT-x/AMD-V host)",
            ),
            other => other.vm_obstacle(),
        }
    }
}

impl fmt::Display for KvmFlavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvmFlavor::Hardware { .. } => "hardware",
            KvmFlavor::Nested { .. } => "nested",
            KvmFlavor::Pvm => "pvm",
            KvmFlavor::NoAccess => "no-access",
            KvmFlavor::Absent => "absent",
        })
    }
}

/// How cgroups are mounted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupLayout {
    /// Only cgroup v1 hierarchies.
    V1,
    /// v1 controllers plus an (often empty) cgroup2 at /sys/fs/cgroup/unified.
    Hybrid,
    /// cgroup2 at /sys/fs/cgroup.
    V2,
    /// No cgroup filesystem mounted.
    None,
}

impl fmt::Display for CgroupLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CgroupLayout::V1 => "v1",
            CgroupLayout::Hybrid => "hybrid (v1 controllers + cgroup2 at unified)",
            CgroupLayout::V2 => "v2",
            CgroupLayout::None => "none",
        })
    }
}

/// A view of a host's /proc, /sys and /dev under a root (`/` for the real host).
#[derive(Clone, Debug)]
pub struct HostProbe {
    root: PathBuf,
}

impl Default for HostProbe {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/"),
        }
    }
}

impl HostProbe {
    /// A probe of a fake host tree (tests).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Where an absolute host path lies in the probed tree.
    pub fn path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// A host file's text, empty when it cannot be read.
    pub fn read(&self, path: &str) -> String {
        fs::read_to_string(self.path(path)).unwrap_or_default()
    }

    fn cpu_flags(&self) -> Vec<String> {
        self.read("/proc/cpuinfo")
            .lines()
            .find(|line| line.starts_with("flags"))
            .and_then(|line| line.split_once(':'))
            .map(|(_, flags)| flags.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// Which KVM this host has.
    pub fn kvm_flavor(&self) -> KvmFlavor {
        let dev = self.path("/dev/kvm");
        if !dev.exists() {
            return KvmFlavor::Absent;
        }
        if self.path("/sys/module/kvm_pvm").exists() {
            return KvmFlavor::Pvm;
        }
        if self.root == Path::new("/")
            && fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&dev)
                .is_err()
        {
            return KvmFlavor::NoAccess;
        }
        let flags = self.cpu_flags();
        let has = |flag: &str| flags.iter().any(|f| f == flag);
        let vendor = if has("svm") || self.path("/sys/module/kvm_amd").exists() {
            CpuVendor::Amd
        } else {
            CpuVendor::Intel
        };
        if has("hypervisor") {
            KvmFlavor::Nested { vendor }
        } else {
            KvmFlavor::Hardware { vendor }
        }
    }

    /// How cgroups are mounted, from `/proc/self/mountinfo`.
    pub fn cgroup_layout(&self) -> CgroupLayout {
        let mountinfo = self.read("/proc/self/mountinfo");
        let mut v1 = false;
        let mut v2_at_root = false;
        let mut v2_elsewhere = false;
        for line in mountinfo.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let Some(sep) = fields.iter().position(|f| *f == "-") else {
                continue;
            };
            let (Some(mount_point), Some(fstype)) = (fields.get(4), fields.get(sep + 1)) else {
                continue;
            };
            match *fstype {
                "cgroup" => v1 = true,
                "cgroup2" if *mount_point == "/sys/fs/cgroup" => v2_at_root = true,
                "cgroup2" => v2_elsewhere = true,
                _ => {}
            }
        }
        match (v1, v2_at_root, v2_elsewhere) {
            (_, true, _) => CgroupLayout::V2,
            (true, _, true) => CgroupLayout::Hybrid,
            (true, _, false) => CgroupLayout::V1,
            _ => CgroupLayout::None,
        }
    }

    /// The host's description for reports.
    pub fn describe(&self) -> HostInfo {
        let cpuinfo = self.read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find(|line| line.starts_with("model name"))
            .and_then(|line| line.split_once(':'))
            .map_or_else(
                || "unknown".to_owned(),
                |(_, model)| model.trim().to_owned(),
            );
        let cores = cpuinfo
            .lines()
            .filter(|line| line.starts_with("processor"))
            .count();
        let memory_kib = self
            .read("/proc/meminfo")
            .lines()
            .find(|line| line.starts_with("MemTotal:"))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|kib| kib.parse().ok())
            .unwrap_or(0);
        HostInfo {
            cpu_model,
            cores,
            memory_kib,
            kernel: self.read("/proc/sys/kernel/osrelease").trim().to_owned(),
            kvm: self.kvm_flavor(),
            cgroups: self.cgroup_layout(),
        }
    }
}

/// A host, as reports describe it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub cpu_model: String,
    pub cores: usize,
    pub memory_kib: u64,
    pub kernel: String,
    pub kvm: KvmFlavor,
    pub cgroups: CgroupLayout,
}

/// Which KVM this host has.
pub fn kvm_flavor() -> KvmFlavor {
    HostProbe::default().kvm_flavor()
}

/// How this host mounts cgroups.
pub fn cgroup_layout() -> CgroupLayout {
    HostProbe::default().cgroup_layout()
}

/// This host, for reports.
pub fn describe() -> HostInfo {
    HostProbe::default().describe()
}

/// Whether this host's KVM is PVM (guest kernel code emulated; see docs/vm-on-pvm.md): the
/// one PVM detection, used by the VMM (CPUID profile, command line) and by reports alike.
pub fn is_pvm() -> bool {
    kvm_flavor() == KvmFlavor::Pvm
}

/// A `kB` field (e.g. `"VmHWM"`, `"VmRSS"`) of a `/proc/<pid>/status` text, in KiB.
pub fn status_field_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if name != field {
            return None;
        }
        value.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// A `kB` field of this process's `/proc/self/status`, in KiB.
pub fn self_status_kib(field: &str) -> Option<u64> {
    status_field_kib(&fs::read_to_string("/proc/self/status").ok()?, field)
}

/// A `kB` field of process `pid`'s `/proc/<pid>/status`, in KiB (`None` once it is gone).
pub fn process_status_kib(pid: u32, field: &str) -> Option<u64> {
    status_field_kib(
        &fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        field,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_in_kib() {
        let status = "Name:\tx\nVmRSS:\t    1234 kB\nVmHWM:\t  99 kB\nThreads:\t3\n";
        assert_eq!(status_field_kib(status, "VmRSS"), Some(1234));
        assert_eq!(status_field_kib(status, "VmHWM"), Some(99));
        assert_eq!(status_field_kib(status, "Threads"), None, "not a kB field");
        assert_eq!(status_field_kib(status, "VmRS"), None, "whole names only");
        assert!(self_status_kib("VmRSS").is_some_and(|kib| kib > 0));
    }

    fn fake_host(files: &[(&str, &str)]) -> (PathBuf, HostProbe) {
        let root = std::env::temp_dir().join(format!(
            "twinbox-host-{}-{}",
            std::process::id(),
            crate::clock::monotonic_ns()
        ));
        for (path, content) in files {
            let full = root.join(path.trim_start_matches('/'));
            fs::create_dir_all(full.parent().unwrap()).unwrap();
            fs::write(full, content).unwrap();
        }
        (root.clone(), HostProbe::at(root))
    }

    const HYBRID: &str = "\
25 1 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
";
    const V2: &str = "30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";

    #[test]
    fn cgroup_layouts_are_told_apart() {
        let (a, hybrid) = fake_host(&[("/proc/self/mountinfo", HYBRID)]);
        assert_eq!(hybrid.cgroup_layout(), CgroupLayout::Hybrid);
        let (b, v2) = fake_host(&[("/proc/self/mountinfo", V2)]);
        assert_eq!(v2.cgroup_layout(), CgroupLayout::V2);
        let v1_only = HYBRID
            .lines()
            .filter(|l| !l.contains("cgroup2"))
            .collect::<Vec<_>>()
            .join("\n");
        let (c, v1) = fake_host(&[("/proc/self/mountinfo", &v1_only)]);
        assert_eq!(v1.cgroup_layout(), CgroupLayout::V1);
        for dir in [a, b, c] {
            fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn kvm_flavours_are_told_apart() {
        let (a, absent) = fake_host(&[("/proc/cpuinfo", "flags : fpu svm\n")]);
        assert_eq!(absent.kvm_flavor(), KvmFlavor::Absent);
        let (b, pvm) = fake_host(&[("/dev/kvm", ""), ("/sys/module/kvm_pvm/x", "")]);
        assert_eq!(pvm.kvm_flavor(), KvmFlavor::Pvm);
        assert!(!KvmFlavor::Pvm.timings_representative());
        let (c, amd) = fake_host(&[("/dev/kvm", ""), ("/proc/cpuinfo", "flags\t: fpu svm\n")]);
        assert_eq!(
            amd.kvm_flavor(),
            KvmFlavor::Hardware {
                vendor: CpuVendor::Amd
            }
        );
        let (d, nested) = fake_host(&[
            ("/dev/kvm", ""),
            ("/proc/cpuinfo", "flags : vmx hypervisor\n"),
        ]);
        assert_eq!(
            nested.kvm_flavor(),
            KvmFlavor::Nested {
                vendor: CpuVendor::Intel
            }
        );
        for dir in [a, b, c, d] {
            fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn only_hardware_virtualization_boots_linux_and_pvm_still_runs_a_vm() {
        let hw = KvmFlavor::Nested {
            vendor: CpuVendor::Amd,
        };
        assert_eq!(hw.linux_guest_obstacle(), None);
        assert_eq!(hw.vm_obstacle(), None);
        let pvm = KvmFlavor::Pvm.linux_guest_obstacle().unwrap();
        assert!(pvm.contains("PVM") && !pvm.contains('\n'), "{pvm}");
        assert_eq!(KvmFlavor::Pvm.vm_obstacle(), None);
        for none in [KvmFlavor::Absent, KvmFlavor::NoAccess] {
            assert_eq!(none.vm_obstacle(), Some(none.describe()));
            assert_eq!(none.linux_guest_obstacle(), Some(none.describe()));
        }
    }

    #[test]
    fn host_description_reads_cpu_and_memory() {
        let (a, host) = fake_host(&[
            (
                "/proc/cpuinfo",
                "processor : 0\nmodel name : Test CPU\nprocessor : 1\n",
            ),
            ("/proc/meminfo", "MemTotal:       2048 kB\n"),
            ("/proc/sys/kernel/osrelease", "6.1.0\n"),
        ]);
        let info = host.describe();
        assert_eq!(
            (info.cpu_model.as_str(), info.cores, info.memory_kib),
            ("Test CPU", 2, 2048)
        );
        assert_eq!(info.kernel, "6.1.0");
        fs::remove_dir_all(a).unwrap();
    }
}
