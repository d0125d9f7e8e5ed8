//! Issue 15, "twinbox brings its init": a plain ext4 holding only busybox — no
//! twinbox-init, not even `/proc` or `/dev` — runs in both boxes; the project's image,
//! which still carries its own init, runs as before. The container binds the host's init
//! read-only at `/.twinbox/init` (the workload can neither write nor replace it, and the
//! image cannot steer that mount with a symlink); the VM boots twinbox's initramfs, whose
//! init mounts the disk and switches to it (in the lab, where Linux boots).
//!
//! Needs root, `mkfs.ext4`, the host's `/bin/busybox` (busybox-static) and the artifacts
//! (`scripts/build-artifacts`); fails naming what is missing. Every container run has a
//! leak check (mounts, loop devices, cgroups, staging directories) around it.
//!
//! Run with `flock /tmp/twinbox-itest.lock cargo test --test own_image`.

mod common;

use common::describe;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

/// The leak checks compare host snapshots: runs of this file must not overlap.
static SERIAL: Mutex<()> = Mutex::new(());

/// A busybox-only ext4 in its own temporary directory, removed on drop.
struct PlainImage {
    dir: PathBuf,
    path: PathBuf,
}

impl PlainImage {
    /// `/bin/busybox` and its applet links, nothing else; `extra` may add to the tree
    /// before the image is made.
    fn build(name: &str, extra: impl FnOnce(&Path)) -> Self {
        common::require_root("building an ext4 image and running it");
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.exists(),
            "/bin/busybox missing — install busybox-static (scripts/install-deps)"
        );
        let dir = common::fresh_dir(&format!("twinbox-own-image-{name}"));
        let tree = dir.join("tree");
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::copy(busybox, tree.join("bin/busybox")).unwrap();
        let applets = Command::new(busybox).arg("--list").output().unwrap();
        for applet in String::from_utf8_lossy(&applets.stdout).lines() {
            if applet != "busybox" {
                std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).unwrap();
            }
        }
        extra(&tree);
        assert!(!tree.join("sbin/twinbox-init").exists());
        let path = dir.join("plain.ext4");
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "^has_journal", "-d"])
            .arg(&tree)
            .arg(&path)
            .arg("16M")
            .output()
            .expect("mkfs.ext4 (e2fsprogs) must be installed");
        assert!(out.status.success(), "mkfs.ext4: {}", describe(&out));
        Self { dir, path }
    }

    fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for PlainImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `twinbox ctr run --rootfs ROOTFS -- CMD...`, with a leak check around it.
fn ctr(rootfs: &str, cmd: &[&str]) -> Output {
    common::leaks::check_no_leaks(&format!("ctr run --rootfs {rootfs} -- {cmd:?}"), || {
        Command::new(common::twinbox())
            .args(["ctr", "run", "--rootfs", rootfs, "--"])
            .args(cmd)
            .output()
            .expect("run twinbox")
    })
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    stdout(&out).split(' ').next().unwrap().to_owned()
}

/// Output and status of the two workloads of the issue, in the container.
fn echo_and_exit_7(rootfs: &str) {
    let out = ctr(rootfs, &["/bin/echo", "hello"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(stdout(&out), "hello\n", "{}", describe(&out));
    assert!(out.stderr.is_empty(), "{}", describe(&out));
    let out = ctr(rootfs, &["sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
}

#[test]
fn a_plain_image_without_init_runs_in_the_container() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let image = PlainImage::build("ctr", |_| {});
    echo_and_exit_7(image.path());
    // PID 1 is the host's init, bound where the image had nothing; the image has no
    // /proc, /dev or /tmp of its own, the overlay's upper layer holds them.
    let out = ctr(
        image.path(),
        &[
            "sh",
            "-c",
            "echo pid1=$(tr '\\0' ' ' < /proc/1/cmdline); echo twinbox=$(ls /.twinbox); \
             echo tmp=$(touch /tmp/x && echo rw)",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = stdout(&out);
    for line in ["pid1=/.twinbox/init\n", "twinbox=init\n", "tmp=rw\n"] {
        assert!(text.contains(line), "{line:?} missing: {}", describe(&out));
    }
}

#[test]
fn the_project_image_still_runs_in_the_container_with_the_hosts_init() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let rootfs = common::rootfs_image("twinbox ctr run");
    echo_and_exit_7(&rootfs);
    // The image's own init is there but not the one that runs.
    let out = ctr(
        &rootfs,
        &[
            "sh",
            "-c",
            "test -x /sbin/twinbox-init && echo own=yes; \
             echo pid1=$(tr '\\0' ' ' < /proc/1/cmdline)",
        ],
    );
    assert_eq!(
        stdout(&out),
        "own=yes\npid1=/.twinbox/init\n",
        "{}",
        describe(&out)
    );
}

#[test]
fn the_workload_can_neither_write_nor_replace_init() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let rootfs = common::rootfs_image("twinbox ctr run");
    let host_init = std::fs::canonicalize(common::require_artifact(
        &twinbox_spec::artifacts::init_binary(),
    ))
    .unwrap();
    let before = sha256(&host_init);
    // Every way a root workload without CAP_SYS_ADMIN has at the file and its directory;
    // each line is the attack and the shell's answer (the errno's text).
    let script = r#"
        try() { label=$1; shift; if "$@" 2>/tmp/err; then echo "$label=ok"; else echo "$label=$(sed 's/.*: //' /tmp/err)"; fi; }
        try truncate sh -c 'echo x > /.twinbox/init'
        try append sh -c 'echo x >> /.twinbox/init'
        try rm rm -f /.twinbox/init
        try rename mv /.twinbox/init /.twinbox/old
        try create touch /.twinbox/new
        try move_dir mv /.twinbox /moved
        try umount umount /.twinbox/init
        try mount_over mount -t tmpfs none /.twinbox
        twinbox-probe write /.twinbox/init x
        echo sha=$(sha256sum /.twinbox/init | cut -d' ' -f1)
        grep ' /.twinbox' /proc/self/mountinfo | cut -d' ' -f5,6
    "#;
    let out = ctr(&rootfs, &["sh", "-c", script]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = stdout(&out);
    for line in [
        "truncate=Read-only file system",
        // init is running from it: the write open is refused before the mount is asked.
        "append=Text file busy",
        "rm=Read-only file system",
        "rename=Read-only file system",
        "create=Read-only file system",
        "move_dir=Device or resource busy",
        "umount=Operation not permitted",
        // EPERM from the seccomp filter, in busybox's words.
        "mount_over=permission denied (are you root?)",
        // The raw errno of open(O_WRONLY): ETXTBSY, 26.
        "write errno=26 at=open",
        &format!("sha={before}"),
        // The tmpfs of ours, read-only, then the bind on the file: read-only, nosuid,
        // nodev — and nothing of the host but that one file.
        "/.twinbox ro,nosuid,nodev,noexec",
        "/.twinbox/init ro,nosuid,nodev",
    ] {
        assert!(text.contains(line), "{line:?} missing: {}", describe(&out));
    }
    assert_eq!(
        text.lines().filter(|l| l.starts_with("/.twinbox")).count(),
        2,
        "{}",
        describe(&out)
    );
    assert_eq!(sha256(&host_init), before, "the host's init changed");
}

#[test]
fn an_image_cannot_steer_the_init_mount_with_a_symlink() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let image = PlainImage::build("symlink", |tree| {
        std::os::unix::fs::symlink("/etc", tree.join(".twinbox")).unwrap();
    });
    let out = ctr(image.path(), &["/bin/echo", "hello"]);
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{}", describe(&out));
    assert!(
        err.contains("the image has /.twinbox as a symlink"),
        "{}",
        describe(&out)
    );
    assert!(out.stdout.is_empty());
    // A directory of that name is fine: ours covers it.
    let image = PlainImage::build("dir", |tree| {
        std::fs::create_dir(tree.join(".twinbox")).unwrap();
        std::fs::write(tree.join(".twinbox/init"), b"#!/bin/sh\necho not ours\n").unwrap();
    });
    echo_and_exit_7(image.path());
}

/// `twinbox ctr run --rootfs ROOTFS --disk DISK -- CMD...`, with a leak check around it.
fn ctr_with_disk(rootfs: &str, disk: &Path, cmd: &[&str]) -> Output {
    common::leaks::check_no_leaks(&format!("ctr run --rootfs {rootfs} --disk"), || {
        Command::new(common::twinbox())
            .args(["ctr", "run", "--rootfs", rootfs, "--disk"])
            .arg(disk)
            .arg("--")
            .args(cmd)
            .output()
            .expect("run twinbox")
    })
}

/// One line, exit 125, naming `what`, nothing on stdout.
fn refused_naming(out: &Output, what: &str) {
    assert_eq!(out.status.code(), Some(125), "{}", describe(out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{}", describe(out));
    assert!(err.contains(what), "{}", describe(out));
    assert!(out.stdout.is_empty(), "{}", describe(out));
}

/// A hostile image's symlinks at the places the container mounts over or makes files in
/// (`/proc`, `/sys`, `/dev`, `/tmp`, `/run`, `/mnt` with disks, or below `/mnt`) never
/// steer a mount or a file onto the host: the run is refused in one line, or the file is
/// made on a tmpfs of twinbox's. Before, `/mnt -> DIR` with `--disk` created `DIR/disk0`
/// on the host.
#[test]
fn an_image_cannot_steer_the_api_and_disk_mounts_with_symlinks() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let host_dir = common::fresh_dir("twinbox-own-image-target");
    std::fs::create_dir_all(&host_dir).unwrap();
    let disk = host_dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let planted = host_dir.join("planted");
    std::fs::create_dir(&planted).unwrap();
    let nothing_planted = || {
        let left: Vec<_> = std::fs::read_dir(&planted).unwrap().collect();
        assert!(
            left.is_empty(),
            "the image made files on the host: {left:?}"
        );
    };

    let target = planted.clone();
    let image = PlainImage::build("mnt-link", move |tree| {
        std::os::unix::fs::symlink(&target, tree.join("mnt")).unwrap();
    });
    refused_naming(
        &ctr_with_disk(image.path(), &disk, &["/bin/true"]),
        "the image has /mnt as a symlink",
    );
    nothing_planted();
    // Without a disk, `/mnt` is the image's own business.
    echo_and_exit_7(image.path());

    for name in ["proc", "sys", "dev", "tmp", "run"] {
        let target = planted.clone();
        let image = PlainImage::build(&format!("{name}-link"), move |tree| {
            std::os::unix::fs::symlink(&target, tree.join(name)).unwrap();
        });
        refused_naming(
            &ctr(image.path(), &["/bin/true"]),
            &format!("the image has /{name} as a symlink"),
        );
        nothing_planted();
    }

    // A symlink below a real `/mnt` is covered by twinbox's tmpfs: the disk is there.
    let target = planted.join("disk0");
    let image = PlainImage::build("mnt-entry-link", move |tree| {
        std::fs::create_dir(tree.join("mnt")).unwrap();
        std::os::unix::fs::symlink(&target, tree.join("mnt/disk0")).unwrap();
    });
    let out = ctr_with_disk(image.path(), &disk, &["/bin/wc", "-c", "/mnt/disk0"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(stdout(&out).starts_with("4096 "), "{}", describe(&out));
    nothing_planted();
    let _ = std::fs::remove_dir_all(&host_dir);
}

#[test]
fn a_plain_image_and_the_project_image_run_in_the_vm() {
    let image = PlainImage::build("vm", |_| {});
    // The output's first line: while the guest console shares the VM's stdout, the
    // guest kernel's "reboot: Restarting system" may follow it.
    let script = r#"
        twinbox vm run --rootfs /plain.ext4 -- /bin/echo hello > /tmp/plain.out; echo PLAIN_ECHO_STATUS=$?
        echo PLAIN_ECHO_OUT=$(head -n1 /tmp/plain.out)
        twinbox vm run --rootfs /plain.ext4 -- sh -c 'exit 7'; echo PLAIN_EXIT=$?
        twinbox vm run --rootfs /plain.ext4 -- sh -c 'echo PID1=$(tr "\0" " " < /proc/1/cmdline); echo ROOT=$(grep " / / " /proc/self/mountinfo | grep -o " - [a-z0-9]* " | tr -d " -"); touch /new && echo WRITABLE=yes' > /tmp/inside.out; echo INSIDE_STATUS=$?
        cat /tmp/inside.out
        twinbox vm run -- /bin/echo hello > /tmp/own.out; echo OWN_ECHO_STATUS=$?
        echo OWN_ECHO_OUT=$(head -n1 /tmp/own.out)
        twinbox vm run -- sh -c 'exit 7'; echo OWN_EXIT=$?
    "#;
    let out = common::run_where_linux_boots(script, |lab| {
        lab.file(&image.path, "/plain.ext4").timeout_s(900)
    });
    let expect = |key: &str, value: &str| {
        assert_eq!(out.expect_value(key), value, "{key}:\n{}", out.output);
    };
    expect("PLAIN_ECHO_STATUS", "0");
    expect("PLAIN_ECHO_OUT", "hello");
    expect("PLAIN_EXIT", "7");
    expect("INSIDE_STATUS", "0");
    // The initramfs's /init is PID 1, the root an overlay over the disk.
    expect("PID1", "/init");
    expect("ROOT", "overlay");
    expect("WRITABLE", "yes");
    expect("OWN_ECHO_STATUS", "0");
    expect("OWN_ECHO_OUT", "hello");
    expect("OWN_EXIT", "7");
}
