//! The lab proves itself: it boots, loads kvm-amd, and a standard KVM runs twinbox's smoke
//! guest there. The same smoke guest runs on the host's own KVM, whatever its flavour.

mod common;

use std::process::Command;

fn parse_exit_us(line: &str) -> u64 {
    line.split("first exit ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exit time in {line:?}"))
}

#[test]
fn smoke_guest_runs_on_the_host_kvm() {
    common::require_root("the KVM smoke guest");
    let out = Command::new(common::twinbox())
        .args(["doctor", "--kvm-smoke"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "smoke guest failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("out 0x120 <- 0x1, halted: true"),
        "{stdout}"
    );
    parse_exit_us(&stdout);
}

#[test]
fn lab_loads_kvm_amd_and_runs_the_smoke_guest() {
    let out = common::lab::Lab::new().with_twinbox().run(
        "grep -q svm /proc/cpuinfo && echo SVM=yes; echo NPT=$(cat /sys/module/kvm_amd/parameters/npt); \
         twinbox doctor --kvm-smoke",
    );
    assert_eq!(out.status, 0, "{}", out.output);
    assert_eq!(out.value("SVM").as_deref(), Some("yes"), "{}", out.output);
    assert_eq!(out.value("NPT").as_deref(), Some("Y"), "{}", out.output);
    assert!(out.output.contains("@@LAB-KVM=ready"), "{}", out.output);
    let line = out
        .output
        .lines()
        .find(|line| line.starts_with("kvm smoke guest:"))
        .unwrap_or_else(|| panic!("no smoke line:\n{}", out.output));
    assert!(line.contains("out 0x120 <- 0x1, halted: true"), "{line}");
    assert!(
        line.contains("AMD-V"),
        "the lab must be a hardware-flavour KVM: {line}"
    );
}

#[test]
fn lab_reports_the_script_status() {
    let out = common::lab::Lab::new().run("echo ANSWER=42; exit 7");
    assert_eq!(out.status, 7, "{}", out.output);
    assert_eq!(out.value("ANSWER").as_deref(), Some("42"));
}

#[test]
fn doctor_explains_every_check() {
    let out = Command::new(common::twinbox())
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let checks: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("doctor --json is JSON");
    let checks = checks.as_array().expect("a list of checks");
    let names: Vec<&str> = checks.iter().filter_map(|c| c["name"].as_str()).collect();
    for expected in [
        "kvm",
        "root",
        "cgroups",
        "overlayfs",
        "loop devices",
        "tun",
        "guest kernel",
        "rootfs image",
    ] {
        assert!(
            names.contains(&expected),
            "doctor lacks the {expected} check: {names:?}"
        );
    }
    for check in checks {
        if check["verdict"] != "ok" {
            assert!(
                check["advice"].is_string(),
                "a failing check must say what to do: {check}"
            );
        }
    }
    let failed = checks.iter().any(|c| c["verdict"] == "fail");
    assert_eq!(
        out.status.success(),
        !failed,
        "exit status must follow the verdicts"
    );
}
