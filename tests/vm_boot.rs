//! The microVM booting the real guest kernel and rootfs, end to end through the CLI.
//!
//! Runs on the host's KVM when it is hardware virtualization, else in the lab (QEMU TCG
//! with kvm-amd; see tests/common/lab.rs) — a Linux guest cannot reach user space on PVM.
//! Needs root, the built artifacts and (for the lab) the lab kernel; fails saying which is
//! missing. Boots are expensive, so each test runs many checks from one script.

mod common;

use common::lab::LabOutput;

/// Runs `script` where VMs boot Linux, with `lab_mem_mib` of lab RAM when in the lab.
fn run_script(script: &str, lab_mem_mib: u32) -> LabOutput {
    common::run_where_linux_boots(script, |lab| lab.mem_mib(lab_mem_mib).timeout_s(900))
}

fn value(out: &LabOutput, key: &str) -> String {
    out.expect_value(key)
}

#[test]
fn workloads_report_output_status_signals_cpus_and_memory() {
    let out = run_script(
        r#"
        twinbox vm run -- /bin/echo round-trip-ok > /tmp/echo.out; echo ECHO_STATUS=$?
        echo ECHO_LINES=$(grep -c '^round-trip-ok$' /tmp/echo.out)
        for c in 0 1 7 255; do
            twinbox vm run -- /bin/sh -c "exit $c" > /dev/null; echo EXIT_$c=$?
        done
        twinbox vm run -- /bin/sh -c 'kill -9 $$' > /dev/null; echo SIGNAL_STATUS=$?
        for n in 1 2 4; do
            echo NPROC_$n=$(twinbox vm run --vcpus $n -- /bin/sh -c 'echo CPUS=$(grep -c ^processor /proc/cpuinfo)' | sed -n 's/^CPUS=//p')
        done
        for m in 128 2048; do
            echo MEMTOTAL_$m=$(twinbox vm run --memory $m -- /bin/sh -c 'grep MemTotal /proc/meminfo' | awk '/MemTotal/ {print $2}')
        done
        twinbox vm run --json -- /bin/true > /tmp/report.json; echo JSON_STATUS=$?
        echo JSON_PHASES=$(grep -c '"phase"' /tmp/report.json)
        echo JSON_EXITED=$(grep -c '"exited": 0' /tmp/report.json)
        "#,
        3072,
    );
    assert_eq!(value(&out, "ECHO_STATUS"), "0", "{}", out.output);
    assert_eq!(
        value(&out, "ECHO_LINES"),
        "1",
        "the workload's line reached our stdout once"
    );
    for code in ["0", "1", "7", "255"] {
        assert_eq!(value(&out, &format!("EXIT_{code}")), code, "{}", out.output);
    }
    assert_eq!(value(&out, "SIGNAL_STATUS"), "137", "SIGKILL → 128 + 9");
    for n in ["1", "2", "4"] {
        assert_eq!(value(&out, &format!("NPROC_{n}")), n, "{}", out.output);
    }
    for mib in [128u64, 2048] {
        let kib: u64 = value(&out, &format!("MEMTOTAL_{mib}"))
            .parse()
            .expect("MemTotal in KiB");
        // The kernel keeps some RAM for itself (code, memmap): MemTotal is a bit below.
        assert!(
            kib <= mib * 1024 && kib >= mib * 1024 * 80 / 100,
            "MemTotal {kib} KiB for {mib} MiB"
        );
    }
    assert_eq!(value(&out, "JSON_STATUS"), "0");
    assert_eq!(
        value(&out, "JSON_PHASES"),
        "7",
        "every phase stamped:\n{}",
        out.output
    );
    assert_eq!(value(&out, "JSON_EXITED"), "1");
}

#[test]
fn disks_kernels_limits_signals_and_bad_input() {
    let out = run_script(
        r#"
        truncate -s 16M /tmp/disk.img
        twinbox vm run --disk /tmp/disk.img -- /bin/sh -c 'echo persisted-by-guest | dd of=/dev/vdb conv=fsync 2>/dev/null' > /dev/null
        echo RW_STATUS=$?
        echo RW_DATA=$(head -c 18 /tmp/disk.img)
        twinbox vm run --disk /tmp/disk.img:ro -- /bin/sh -c 'echo overwritten | dd of=/dev/vdb conv=fsync 2>/dev/null' > /dev/null
        echo RO_WRITE_STATUS=$?
        echo RO_DATA=$(twinbox vm run --disk /tmp/disk.img:ro -- /bin/sh -c 'echo DISK=$(head -c 18 /dev/vdb)' | sed -n 's/^DISK=//p')
        echo BZ=$(twinbox vm run --kernel "${TWINBOX_CACHE:-/var/cache/twinbox}/kernel/current/bzImage" -- /bin/echo bzimage-ok | grep -c '^bzimage-ok$')
        echo ELF=$(twinbox vm run --kernel "${TWINBOX_CACHE:-/var/cache/twinbox}/kernel/current/vmlinux" -- /bin/echo vmlinux-ok | grep -c '^vmlinux-ok$')
        twinbox vm run --timeout 3 -- /bin/sleep 60 > /dev/null 2> /tmp/timeout.err; echo TIMEOUT_STATUS=$?
        echo TIMEOUT_MSG=$(grep -c 'time limit' /tmp/timeout.err)
        twinbox vm run -- /bin/sleep 60 > /dev/null & pid=$!
        sleep 5; kill -TERM $pid; wait $pid; echo TERM_STATUS=$?
        echo LEFT_PROCESSES=$(cat /proc/[0-9]*/comm 2>/dev/null | grep -c '^twinbox$')
        twinbox vm run --rootfs /tmp/disk.img -- /bin/true 2> /tmp/bad.err; echo NOT_EXT4_STATUS=$?
        echo NOT_EXT4_LINES=$(wc -l < /tmp/bad.err)
        twinbox vm run --vcpus 0 -- /bin/true 2> /dev/null; echo VCPUS0_STATUS=$?
        twinbox vm run --kernel /tmp/disk.img -- /bin/true 2> /dev/null; echo BADKERNEL_STATUS=$?
        "#,
        2048,
    );
    assert_eq!(value(&out, "RW_STATUS"), "0", "{}", out.output);
    assert_eq!(
        value(&out, "RW_DATA"),
        "persisted-by-guest",
        "guest writes reach the host file"
    );
    assert_ne!(
        value(&out, "RO_WRITE_STATUS"),
        "0",
        "a :ro disk refuses writes"
    );
    assert_eq!(
        value(&out, "RO_DATA"),
        "persisted-by-guest",
        "{}",
        out.output
    );
    assert_eq!(value(&out, "BZ"), "1", "bzImage boots:\n{}", out.output);
    assert_eq!(value(&out, "ELF"), "1", "vmlinux boots:\n{}", out.output);
    assert_eq!(value(&out, "TIMEOUT_STATUS"), "1", "{}", out.output);
    assert_eq!(value(&out, "TIMEOUT_MSG"), "1");
    assert_eq!(
        value(&out, "TERM_STATUS"),
        "143",
        "SIGTERM stops the VM, CLI exits 128+15"
    );
    assert_eq!(value(&out, "LEFT_PROCESSES"), "0", "{}", out.output);
    assert_eq!(value(&out, "NOT_EXT4_STATUS"), "125", "{}", out.output);
    assert_eq!(value(&out, "NOT_EXT4_LINES"), "1", "one line for bad input");
    assert_eq!(value(&out, "VCPUS0_STATUS"), "125");
    assert_eq!(value(&out, "BADKERNEL_STATUS"), "125");
}
