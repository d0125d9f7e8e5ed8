//! The machine a guest kernel sees: vCPUs, topology, CPU flags, caches, firmware tables —
//! checked from inside the guest, through the CLI, as a user would look (`/proc/cpuinfo`,
//! `/sys/devices/system/cpu`, the kernel log).
//!
//! Two kernels: twinbox's own (MP table, no ACPI) and Debian's unmodified cloud kernel
//! (ACPI only, virtio drivers as modules) with the small initramfs `lab/build-stock-guest.sh`
//! builds, which prints what that kernel found and resets the machine.
//!
//! Runs on the host's KVM when it is hardware virtualization, else in the lab (a Linux
//! guest cannot boot on PVM). Needs root and the built artifacts; fails saying which is
//! missing.

mod common;

use common::lab::LabOutput;
use std::path::PathBuf;

/// The stock kernel and its initramfs, built by `lab/build-stock-guest.sh`.
fn stock_guest() -> (PathBuf, PathBuf) {
    let dir = twinbox_spec::artifacts::cache_dir().join("stock-guest/current");
    (
        common::require_artifact(&dir.join("vmlinuz")),
        common::require_artifact(&dir.join("initramfs.cpio")),
    )
}

fn flags(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

#[test]
fn a_stock_distribution_kernel_sees_every_vcpu_its_disk_and_warns_of_nothing() {
    let (kernel, initrd) = stock_guest();
    let out = common::run_where_linux_boots(
        r#"
        stock="${TWINBOX_CACHE:-/var/cache/twinbox}/stock-guest/current"
        twinbox vm run --vcpus 2 --memory 512 --timeout 300 --kernel "$stock/vmlinuz" \
            --initrd "$stock/initramfs.cpio" --console-log /tmp/stock.log -- /bin/true
        echo STOCK_RUN_STATUS=$?
        grep -a '^STOCK_' /tmp/stock.log | tr -d '\r'
        echo STOCK_WARNINGS=$(grep -ac -E 'WARNING|BUG' /tmp/stock.log)
        grep -a -E 'WARNING|BUG|MADT|not listed by BIOS|XSAVE consistency' /tmp/stock.log | head -n 20
        "#,
        |lab| {
            lab.mem_mib(2048)
                .timeout_s(900)
                .file(&kernel, "/cache/stock-guest/current/vmlinuz")
                .file(&initrd, "/cache/stock-guest/current/initramfs.cpio")
        },
    );
    let value = |key: &str| out.expect_value(key);
    assert_eq!(
        value("STOCK_DONE"),
        "yes",
        "the initramfs ran to its end:\n{}",
        out.output
    );
    assert_eq!(
        value("STOCK_CPUS_ONLINE"),
        "0-1",
        "both vCPUs online (the kernel found them in the MADT):\n{}",
        out.output
    );
    assert_eq!(value("STOCK_NPROC"), "2");
    assert_eq!(
        value("STOCK_WARNINGS"),
        "0",
        "no WARNING or BUG in the kernel log:\n{}",
        out.output
    );
    assert_eq!(
        value("STOCK_DISKS").trim(),
        "vda",
        "the root disk is found (virtio-mmio devices described in the DSDT):\n{}",
        out.output
    );
    assert_eq!(value("STOCK_ROOT_MOUNTED"), "yes", "{}", out.output);
    assert_eq!(value("STOCK_ROOT_HAS_SH"), "yes");
    // One package of two single-threaded cores: package:core:thread siblings:core siblings.
    assert_eq!(value("STOCK_TOPOLOGY_0"), "0:0:0:0-1", "{}", out.output);
    assert_eq!(value("STOCK_TOPOLOGY_1"), "0:1:1:0-1", "{}", out.output);
    let stock_flags = value("STOCK_FLAGS");
    let stock_flags = flags(&stock_flags);
    assert!(
        stock_flags.contains(&"tsc_deadline_timer"),
        "{stock_flags:?}"
    );
    for hidden in ["arch_perfmon", "pdcm", "perfctr_core", "waitpkg"] {
        assert!(
            !stock_flags.contains(&hidden),
            "{hidden} shown: {stock_flags:?}"
        );
    }
    // Caches, where the kernel lists them: a core's own L1/L2 serve that core alone, the
    // last level is shared by the package.
    let caches: Vec<(String, String)> = out
        .output
        .lines()
        .filter_map(|l| l.strip_prefix("STOCK_CACHE_"))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect();
    for (index, cache) in &caches {
        let (level, shared) = cache.split_once(':').expect("L<level>-<type>:<cpus>");
        let cpu = index.split('_').next().unwrap();
        if level.starts_with("L3") {
            assert_eq!(shared, "0-1", "cache {index} ({level}) is the package's");
        } else {
            assert_eq!(shared, cpu, "cache {index} ({level}) is its core's own");
        }
    }
    assert_eq!(
        value("STOCK_RUN_STATUS"),
        "1",
        "the run ends at the guest's reset, without a workload status:\n{}",
        out.output
    );
}

#[test]
fn twinbox_kernel_sees_one_package_of_single_threaded_cores_and_the_right_flags() {
    let out = common::run_where_linux_boots(
        r#"
        for n in 1 2; do
            twinbox vm run --vcpus $n -- /bin/sh -c '
                for c in /sys/devices/system/cpu/cpu[0-9]*; do
                    t=$c/topology
                    echo "TOPOLOGY_${c##*cpu}=$(cat $t/physical_package_id):$(cat $t/core_id):$(cat $t/thread_siblings_list):$(cat $t/core_siblings_list)"
                done
                echo "PACKAGES=$(grep "^physical id" /proc/cpuinfo | sort -u | wc -l)"
                echo "SIBLINGS=$(grep -m1 "^siblings" /proc/cpuinfo | cut -d: -f2 | tr -d " ")"
                echo "CORES=$(grep -m1 "^cpu cores" /proc/cpuinfo | cut -d: -f2 | tr -d " ")"
                echo "APICIDS=$(grep "^apicid" /proc/cpuinfo | cut -d: -f2 | tr -d " " | tr "\n" ",")"
                echo "FLAGS=$(grep -m1 ^flags /proc/cpuinfo | cut -d: -f2)"
            ' | sed "s/^/VCPUS${n}_/"
        done
        "#,
        |lab| lab.mem_mib(2048).timeout_s(900),
    );
    let value = |key: &str| out.expect_value(key);
    check_topology(&out, 1, &["0:0:0:0"]);
    check_topology(&out, 2, &["0:0:0:0-1", "0:1:1:0-1"]);
    for n in [1, 2] {
        assert_eq!(value(&format!("VCPUS{n}_PACKAGES")), "1");
        assert_eq!(value(&format!("VCPUS{n}_SIBLINGS")), n.to_string());
        assert_eq!(value(&format!("VCPUS{n}_CORES")), n.to_string());
        let apic_ids: String = (0..n).map(|i| format!("{i},")).collect();
        assert_eq!(value(&format!("VCPUS{n}_APICIDS")), apic_ids);
        let line = value(&format!("VCPUS{n}_FLAGS"));
        let guest_flags = flags(&line);
        assert!(
            guest_flags.contains(&"tsc_deadline_timer"),
            "the TSC-deadline timer KVM emulates is offered: {guest_flags:?}"
        );
        for hidden in ["arch_perfmon", "pdcm", "perfctr_core", "waitpkg"] {
            assert!(
                !guest_flags.contains(&hidden),
                "{hidden} shown: {guest_flags:?}"
            );
        }
        assert_eq!(
            guest_flags.contains(&"ht"),
            n > 1,
            "HTT only with more than one logical CPU: {guest_flags:?}"
        );
    }
}

/// `VCPUS<n>_TOPOLOGY_<cpu>` = package:core:thread siblings:core siblings, CPU by CPU.
fn check_topology(out: &LabOutput, vcpus: u32, expected: &[&str]) {
    for (cpu, want) in expected.iter().enumerate() {
        assert_eq!(
            out.expect_value(&format!("VCPUS{vcpus}_TOPOLOGY_{cpu}")),
            *want,
            "vCPU {cpu} of {vcpus}:\n{}",
            out.output
        );
    }
    assert_eq!(
        out.value(&format!("VCPUS{vcpus}_TOPOLOGY_{}", expected.len())),
        None,
        "no CPU beyond the {vcpus} asked for"
    );
}
