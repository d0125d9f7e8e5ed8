//! `twinbox vm run` refuses bad input with one line on stderr and exit status 125, before
//! (or instead of) booting anything. Runs on the host; the checks that get as far as
//! creating a VM need /dev/kvm (any flavour) and root.

mod common;

use std::process::Command;

/// Runs `twinbox vm run ARGS -- /bin/true` and returns (status, stderr).
fn vm_run(args: &[&str]) -> (i32, String) {
    let out = Command::new(common::twinbox())
        .args(["vm", "run"])
        .args(args)
        .args(["--", "/bin/true"])
        .output()
        .expect("run twinbox");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_refused(args: &[&str], needle: &str) {
    let (status, stderr) = vm_run(args);
    assert_eq!(status, 125, "{args:?}: {stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "{args:?}: one line, got {stderr:?}"
    );
    assert!(stderr.starts_with("twinbox: "), "{stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?}: {stderr:?} should mention {needle:?}"
    );
}

fn temp_file(name: &str, bytes: &[u8]) -> String {
    let path = std::env::temp_dir().join(format!("twinbox-vm-bad-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

#[test]
fn bad_files_and_sizes_are_one_line_and_125() {
    let rootfs = common::require_artifact(&twinbox_spec::artifacts::rootfs_image());
    let rootfs = rootfs.to_str().unwrap();
    let not_a_kernel = temp_file("kernel", b"this is not a kernel");
    let not_ext4 = temp_file("img", &[0u8; 4096]);
    assert_refused(
        &["--rootfs", rootfs, "--kernel", "/nonexistent/vmlinux"],
        "/nonexistent/vmlinux",
    );
    assert_refused(
        &["--rootfs", rootfs, "--kernel", &not_a_kernel],
        "neither an ELF vmlinux nor a bzImage",
    );
    assert_refused(&["--rootfs", &not_ext4], "not an ext4 image");
    assert_refused(&["--rootfs", rootfs, "--vcpus", "0"], "--vcpus 0");
    assert_refused(&["--rootfs", rootfs, "--memory", "5"], "--memory 5");
    assert_refused(
        &["--rootfs", rootfs, "--memory", "1048576"],
        "more than this host's",
    );
    assert_refused(
        &["--rootfs", rootfs, "--disk", "/nonexistent/disk.img"],
        "/nonexistent/disk.img",
    );
    std::fs::remove_file(not_a_kernel).unwrap();
    std::fs::remove_file(not_ext4).unwrap();
}

#[test]
fn too_long_command_line_is_refused_after_the_vm_is_built_and_released() {
    common::require_root("creating a KVM VM");
    common::require_artifact(&twinbox_spec::artifacts::kernel_vmlinux());
    let rootfs = common::require_artifact(&twinbox_spec::artifacts::rootfs_image());
    let extra = "x".repeat(3000);
    assert_refused(
        &[
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--cmdline-extra",
            &extra,
        ],
        "the limit is 2048",
    );
}

#[test]
fn kvm_permission_is_explained() {
    common::require_root("switching to an unprivileged user");
    let rootfs = common::require_artifact(&twinbox_spec::artifacts::rootfs_image());
    common::require_artifact(&twinbox_spec::artifacts::kernel_vmlinux());
    // /dev/kvm is root-only here; `nobody` gets EACCES. The binary and artifacts must be
    // readable by nobody, so use copies in a world-readable temp dir.
    let dir = std::env::temp_dir().join(format!("twinbox-vm-perm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("twinbox");
    std::fs::copy(common::twinbox(), &bin).unwrap();
    let kvm_mode = std::fs::metadata("/dev/kvm")
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args([
            "vm",
            "run",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--",
            "/bin/true",
        ])
        .env("TWINBOX_CACHE", twinbox_spec::artifacts::cache_dir())
        .output()
        .expect("setpriv (util-linux) is needed");
    std::fs::remove_dir_all(&dir).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    match kvm_mode {
        Ok(mode) if mode & 0o006 == 0 => {
            assert_eq!(out.status.code(), Some(125), "{stderr}");
            assert!(
                stderr.contains("/dev/kvm: permission denied — run as root or add yourself to the kvm group"),
                "{stderr}"
            );
        }
        _ => panic!("/dev/kvm is world-accessible or missing here ({kvm_mode:?}): cannot test the permission message"),
    }
}
