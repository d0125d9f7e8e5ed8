//! `twinbox doctor`: checks this host for what each box needs, one line per check, and
//! says what to do about each failure.

use clap::Args;
use serde::Serialize;
use twinbox_spec::artifacts;
use twinbox_spec::host::{self, HostProbe, KvmFlavor};

/// Options of `twinbox doctor`.
#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
    /// Only run the KVM smoke guest (a few real-mode instructions and a port exit) and
    /// print what it did; exit 0 when it behaved.
    #[arg(long)]
    pub kvm_smoke: bool,
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Verdict {
    Ok,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Debug, Serialize)]
struct Check {
    name: &'static str,
    verdict: Verdict,
    found: String,
    /// What to do when the check is not ok.
    advice: Option<String>,
}

impl Check {
    fn ok(name: &'static str, found: impl Into<String>) -> Self {
        Self {
            name,
            verdict: Verdict::Ok,
            found: found.into(),
            advice: None,
        }
    }

    fn not_ok(
        name: &'static str,
        verdict: Verdict,
        found: impl Into<String>,
        advice: impl Into<String>,
    ) -> Self {
        Self {
            name,
            verdict,
            found: found.into(),
            advice: Some(advice.into()),
        }
    }
}

fn check_kvm() -> Vec<Check> {
    let flavor = host::kvm_flavor();
    let mut checks = vec![match flavor {
        KvmFlavor::Hardware { .. } | KvmFlavor::Nested { .. } => Check::ok("kvm", flavor.describe()),
        KvmFlavor::Pvm => Check::not_ok(
            "kvm",
            Verdict::Warn,
            flavor.describe(),
            "VM numbers from this host describe PVM, not VT-x/AMD-V; VM tests use the lab (lab/run)",
        ),
        KvmFlavor::NoAccess | KvmFlavor::Absent => {
            Check::not_ok("kvm", Verdict::Fail, flavor.describe(), "the microVM needs /dev/kvm")
        }
    }];
    if flavor.usable() {
        checks.push(match vmm::smoke::run() {
            Ok(report) => Check::ok(
                "kvm guest",
                format!(
                    "smoke guest ran: port {:#x} exit in {} µs, setup {} µs",
                    report.port, report.first_exit_us, report.setup_us
                ),
            ),
            Err(error) => Check::not_ok(
                "kvm guest",
                Verdict::Fail,
                error.to_string(),
                "this KVM cannot run a guest; check dmesg",
            ),
        });
    }
    checks
}

fn check_root() -> Check {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        Check::ok("root", "running as root")
    } else {
        Check::not_ok(
            "root",
            Verdict::Fail,
            "not root",
            "containers need root (loop devices, mounts, cgroups): run twinbox as root",
        )
    }
}

/// The cgroup check asks the container's own detection (`container::cgroup::detect`) —
/// what `ctr run` will use — so doctor and the run cannot disagree.
fn check_cgroups(host: &HostProbe) -> Check {
    let layout = host.cgroup_layout();
    match container::cgroup::detect(&host.read("/proc/self/mountinfo")) {
        Ok(_) => Check::ok(
            "cgroups",
            format!("{layout}; every controller a container run needs is mounted"),
        ),
        Err(error) => Check::not_ok(
            "cgroups",
            Verdict::Fail,
            format!("{layout}; {error}"),
            "mount cgroup2 at /sys/fs/cgroup, or the v1 hierarchies the message names \
             (cgroup_enable=memory on the kernel command line for memory)",
        ),
    }
}

fn check_file(
    host: &HostProbe,
    name: &'static str,
    path: &str,
    found: &str,
    advice: &str,
    verdict: Verdict,
) -> Check {
    if host.path(path).exists() {
        Check::ok(name, format!("{found} ({path})"))
    } else {
        Check::not_ok(name, verdict, format!("{path} missing"), advice)
    }
}

fn check_overlayfs(host: &HostProbe) -> Check {
    let listed = host
        .read("/proc/filesystems")
        .lines()
        .any(|line| line.split_whitespace().last() == Some("overlay"));
    if listed {
        Check::ok("overlayfs", "overlay filesystem available")
    } else {
        Check::not_ok(
            "overlayfs",
            Verdict::Fail,
            "overlay not in /proc/filesystems",
            "modprobe overlay",
        )
    }
}

fn check_on_path(name: &'static str, program: &str, advice: &str) -> Check {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false);
    if found {
        Check::ok(name, format!("{program} found"))
    } else {
        Check::not_ok(
            name,
            Verdict::Warn,
            format!("{program} not on PATH"),
            advice,
        )
    }
}

fn check_artifacts() -> Vec<Check> {
    let build = "build it with scripts/build-artifacts";
    [
        ("guest kernel", artifacts::kernel_vmlinux()),
        ("guest bzImage", artifacts::kernel_bzimage()),
        ("twinbox-init", artifacts::init_binary()),
        ("initramfs", artifacts::initramfs()),
        ("rootfs image", artifacts::rootfs_image()),
        ("lab kernel", artifacts::lab_dir().join("vmlinuz")),
    ]
    .into_iter()
    .map(|(name, path)| {
        if path.exists() {
            Check::ok(name, path.display().to_string())
        } else {
            Check::not_ok(
                name,
                Verdict::Fail,
                format!("{} missing", path.display()),
                build,
            )
        }
    })
    .collect()
}

/// The checks that read only the host tree (testable on a fake root).
fn host_checks(host: &HostProbe) -> Vec<Check> {
    vec![
        check_cgroups(host),
        check_overlayfs(host),
        check_file(
            host,
            "loop devices",
            "/dev/loop-control",
            "loop-control present",
            "modprobe loop",
            Verdict::Fail,
        ),
        check_file(
            host,
            "tun",
            "/dev/net/tun",
            "tun present",
            "modprobe tun (needed for VM networking)",
            Verdict::Warn,
        ),
    ]
}

fn all_checks() -> Vec<Check> {
    let mut checks = check_kvm();
    checks.push(check_root());
    checks.extend(host_checks(&HostProbe::default()));
    checks.push(check_on_path(
        "qemu",
        "qemu-system-x86_64",
        "scripts/install-deps (the lab and the QEMU peer need it)",
    ));
    checks.extend(check_artifacts());
    checks
}

fn print_smoke() -> anyhow::Result<i32> {
    let report = vmm::smoke::run()?;
    super::say(format_args!(
        "kvm smoke guest: out {:#x} <- {:#x}, halted: {}, setup {} µs, first exit {} µs ({})",
        report.port,
        report.value,
        report.halted,
        report.setup_us,
        report.first_exit_us,
        host::kvm_flavor().describe()
    ));
    let expected = report.port == twinbox_spec::proto::MARKER_PORT
        && report.value == vmm::smoke::SMOKE_VALUE
        && report.halted;
    Ok(if expected { 0 } else { 1 })
}

/// Runs `twinbox doctor`: exit 0 when nothing failed, 1 otherwise.
pub fn main(args: DoctorArgs) -> anyhow::Result<i32> {
    if args.kvm_smoke {
        return print_smoke();
    }
    let checks = all_checks();
    let failed = checks.iter().any(|c| c.verdict == Verdict::Fail);
    if args.json {
        super::say(format_args!("{}", serde_json::to_string_pretty(&checks)?));
    } else {
        for check in &checks {
            let verdict = match check.verdict {
                Verdict::Ok => "ok  ",
                Verdict::Warn => "warn",
                Verdict::Fail => "FAIL",
            };
            match &check.advice {
                Some(advice) => super::say(format_args!(
                    "{verdict} {:<14} {} — {advice}",
                    check.name, check.found
                )),
                None => super::say(format_args!("{verdict} {:<14} {}", check.name, check.found)),
            }
        }
    }
    Ok(if failed { 1 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 1 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
34 30 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
35 30 0:31 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
36 30 0:32 / /sys/fs/cgroup/devices rw - cgroup cgroup rw,devices
";

    fn fake_root(files: &[(&str, &str)]) -> std::path::PathBuf {
        let root = std::env::temp_dir().join(format!(
            "twinbox-doctor-{}-{}",
            std::process::id(),
            twinbox_spec::clock::monotonic_ns()
        ));
        for (path, text) in files {
            let file = root.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, text).unwrap();
        }
        root
    }

    fn verdicts(root: &std::path::Path) -> Vec<(&'static str, Verdict, String)> {
        host_checks(&HostProbe::at(root))
            .into_iter()
            .map(|c| (c.name, c.verdict, c.found))
            .collect()
    }

    #[test]
    fn a_complete_hybrid_host_passes() {
        let root = fake_root(&[
            ("/proc/self/mountinfo", HYBRID),
            ("/proc/filesystems", "nodev\ttmpfs\nnodev\toverlay\n"),
            ("/dev/loop-control", ""),
            ("/dev/net/tun", ""),
        ]);
        for (name, verdict, found) in verdicts(&root) {
            assert_eq!(verdict, Verdict::Ok, "{name}: {found}");
        }
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn what_the_container_would_miss_is_named() {
        let without_memory: String = HYBRID
            .lines()
            .filter(|l| !l.contains("memory"))
            .collect::<Vec<_>>()
            .join("\n");
        let root = fake_root(&[
            ("/proc/self/mountinfo", &without_memory),
            ("/proc/filesystems", "nodev\ttmpfs\n"),
        ]);
        let checks = verdicts(&root);
        let get = |name: &str| checks.iter().find(|c| c.0 == name).cloned().unwrap();
        let (_, verdict, found) = get("cgroups");
        assert_eq!(verdict, Verdict::Fail);
        assert!(found.contains("memory"), "{found}");
        assert_eq!(get("overlayfs").1, Verdict::Fail);
        assert_eq!(get("loop devices").1, Verdict::Fail);
        assert_eq!(get("tun").1, Verdict::Warn);
        std::fs::remove_dir_all(root).unwrap();
    }
}
