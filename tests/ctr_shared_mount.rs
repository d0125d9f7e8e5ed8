//! The shared image mount of `twinbox ctr run` (issue 13): runs of one image at the same
//! time use one read-only mount of it (one loop device), each with its own writable layer;
//! the mount goes with the last run; a run SIGKILLed mid-way leaves nothing once the next
//! run is over; a changed image file gets a fresh mount. Seen from the host (its mount
//! table, its loop devices) and from inside the boxes. Needs root and the built rootfs
//! image; fails naming what is missing.
//!
//! The tests share one lock: they compare host snapshots.

mod common;

use common::describe;
use common::leaks::HostResources;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// `twinbox ctr run --rootfs IMAGE -- /bin/sh -c SCRIPT`, started with its stdout piped.
fn start(image: &Path, script: &str) -> Child {
    Command::new(common::twinbox())
        .args(["ctr", "run", "--rootfs"])
        .arg(image)
        .args(["--", "/bin/sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run twinbox")
}

/// Reads the child's stdout up to and including the line `up` (the workload is running).
fn wait_up(child: &mut Child) -> BufReader<std::process::ChildStdout> {
    let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).expect("read the box's stdout");
        assert!(n > 0, "the box ended before its workload said `up`");
        if line.trim() == "up" {
            return out;
        }
    }
}

/// The rest of the child's stdout, and its exit status (stderr in the message).
fn finish(mut child: Child, mut out: BufReader<std::process::ChildStdout>) -> String {
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).expect("read the box's stdout");
    let status = child.wait().expect("wait for twinbox");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert_eq!(status.code(), Some(0), "stdout:\n{rest}\nstderr:\n{err}");
    rest
}

/// The shared image mounts on the host (`<IMAGES_ROOT>/<key>/root`, ext4), as (mount
/// point, source device) pairs.
fn image_mounts() -> Vec<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .filter_map(|line| {
            let point = line.split(' ').nth(4)?;
            let (_, after) = line.split_once(" - ")?;
            let mut fields = after.split(' ');
            let (fstype, source) = (fields.next()?, fields.next()?);
            let image = point.starts_with(container::shared_image::IMAGES_ROOT)
                && point.ends_with("/root")
                && fstype == "ext4";
            image.then(|| (point.to_owned(), source.to_owned()))
        })
        .collect()
}

/// Loop devices whose backing file is `image`.
fn loop_devices_of(image: &Path) -> Vec<String> {
    let image = std::fs::canonicalize(image).unwrap();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let backing = entry.path().join("loop/backing_file");
        if let Ok(file) = std::fs::read_to_string(backing) {
            if Path::new(file.trim()) == image {
                found.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    found
}

/// Polls `done` every 20 ms for up to 3 s.
fn eventually(done: impl Fn() -> bool) -> bool {
    (0..150).any(|_| {
        let ok = done();
        if !ok {
            std::thread::sleep(Duration::from_millis(20));
        }
        ok
    })
}

/// Fails with what is left unless the host is back to `before` (mounts, loop devices,
/// cgroups, staging directories) within 3 s.
fn assert_back_to(before: &HostResources, what: &str) {
    let settled = eventually(|| {
        let now = HostResources::snapshot();
        now.mounts == before.mounts
            && now.loop_devices == before.loop_devices
            && now.twinbox_cgroups == before.twinbox_cgroups
            && now.staging == before.staging
    });
    if !settled {
        before.assert_nothing_leaked(&HostResources::snapshot(), what);
    }
}

#[test]
fn concurrent_runs_share_one_read_only_mount_and_it_goes_with_the_last() {
    let _serial = serial();
    let image = PathBuf::from(common::rootfs_image("twinbox ctr run"));
    let before = HostResources::snapshot();
    assert_eq!(image_mounts(), vec![], "an image mount before the test");
    // Each writes its own file, waits for the other to have written, then looks for the
    // other's: the lower is shared, the writable layers are not.
    let script = |me: &str, other: &str| {
        format!(
            "echo {me} > /{me}; echo up; sleep 1.5; \
             test -e /{other} && echo saw-{other} || echo no-{other}; cat /{me}; \
             echo x > /bin/shared-write-test && echo wrote-bin || echo ro-bin"
        )
    };
    let mut a = start(&image, &script("box-a", "box-b"));
    let mut b = start(&image, &script("box-b", "box-a"));
    let (out_a, out_b) = (wait_up(&mut a), wait_up(&mut b));
    let mounts = image_mounts();
    let devices = loop_devices_of(&image);
    let (a, b) = (finish(a, out_a), finish(b, out_b));
    assert_eq!(
        mounts.len(),
        1,
        "two running boxes, image mounts: {mounts:?}"
    );
    assert_eq!(
        devices.len(),
        1,
        "two running boxes, loop devices: {devices:?}"
    );
    assert!(mounts[0].1.ends_with(&devices[0]), "{mounts:?} {devices:?}");
    for (out, me, other) in [(&a, "box-a", "box-b"), (&b, "box-b", "box-a")] {
        assert!(
            out.contains(&format!("no-{other}")),
            "{me} saw {other}'s file:\n{out}"
        );
        assert!(
            out.contains(&format!("{me}\n")),
            "{me} lost its own file:\n{out}"
        );
        // Written to the box's own upper layer, never to the shared image.
        assert!(out.contains("wrote-bin"), "{me}: {out}");
    }
    // The image itself is untouched: a later box sees none of it.
    let out = Command::new(common::twinbox())
        .args(["ctr", "run", "--rootfs"])
        .arg(&image)
        .args([
            "--",
            "/bin/sh",
            "-c",
            "ls /box-a /box-b /bin/shared-write-test",
        ])
        .output()
        .expect("run twinbox");
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(image_mounts(), vec![], "the mount outlived its last run");
    assert_eq!(loop_devices_of(&image), Vec::<String>::new());
    assert_back_to(&before, "two concurrent runs");
}

#[test]
fn sigkill_of_a_cli_mid_run_leaves_nothing_once_the_next_run_is_over() {
    let _serial = serial();
    let image = PathBuf::from(common::rootfs_image("twinbox ctr run"));
    let before = HostResources::snapshot();
    for next_while_running in [false, true] {
        let what = format!("SIGKILL mid-run (another run going on: {next_while_running})");
        let mut other = next_while_running.then(|| start(&image, "echo up; sleep 1"));
        let other_out = other.as_mut().map(wait_up);
        let mut killed = start(&image, "echo up; sleep 30");
        let killed_out = wait_up(&mut killed);
        killed.kill().expect("SIGKILL the CLI");
        killed.wait().unwrap();
        drop(killed_out);
        // Its mount stays for now: nobody could take it down.
        assert_eq!(image_mounts().len(), 1, "{what}");
        let out = Command::new(common::twinbox())
            .args(["ctr", "run", "--rootfs"])
            .arg(&image)
            .args(["--", "/bin/true"])
            .output()
            .expect("run twinbox");
        assert_eq!(out.status.code(), Some(0), "{what}: {}", describe(&out));
        if let (Some(other), Some(out)) = (other, other_out) {
            finish(other, out);
        }
        assert!(
            eventually(|| image_mounts().is_empty() && loop_devices_of(&image).is_empty()),
            "{what}: left {:?}, {:?}",
            image_mounts(),
            loop_devices_of(&image)
        );
        assert_back_to(&before, &what);
    }
}

#[test]
fn a_changed_image_file_gets_a_fresh_mount() {
    let _serial = serial();
    let built = PathBuf::from(common::rootfs_image("twinbox ctr run"));
    let dir = common::fresh_dir("twinbox-shared-mount");
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("rootfs.ext4");
    let next = dir.join("rootfs.ext4.next");
    let copy = |to: &Path| {
        let ok = Command::new("cp")
            .args(["--reflink=auto", "--sparse=always"])
            .arg(&built)
            .arg(to)
            .status()
            .expect("cp")
            .success();
        assert!(ok, "copy {} to {}", built.display(), to.display());
    };
    copy(&image);
    // A new version of the image, made aside, then put at the same path while a box of
    // the old one runs: the next box must see the new contents.
    copy(&next);
    std::fs::write(dir.join("marker"), "new image\n").unwrap();
    let debugfs = Command::new("debugfs")
        .arg("-w")
        .arg("-R")
        .arg(format!("write {} /marker", dir.join("marker").display()))
        .arg(&next)
        .output()
        .expect("debugfs (e2fsprogs) is needed to change an image");
    assert!(debugfs.status.success(), "{}", describe(&debugfs));
    let before = HostResources::snapshot();
    let mut old = start(&image, "echo up; sleep 3; cat /marker 2>&1 || true");
    let old_out = wait_up(&mut old);
    std::fs::rename(&next, &image).unwrap();
    let mut new = start(&image, "echo up; cat /marker; sleep 1");
    let new_out = wait_up(&mut new);
    let mounts = image_mounts();
    let (old, new) = (finish(old, old_out), finish(new, new_out));
    assert!(new.contains("new image"), "the new box saw:\n{new}");
    assert!(!old.contains("new image"), "the old box saw:\n{old}");
    assert_eq!(mounts.len(), 2, "one mount per version: {mounts:?}");
    assert_ne!(mounts[0].1, mounts[1].1, "{mounts:?}");
    assert_back_to(&before, "runs of a changed image");
    std::fs::remove_dir_all(&dir).unwrap();
}
