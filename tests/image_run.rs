//! `--image` in both boxes (issue 15): an image built by buildah (not by twinbox) from a
//! busybox rootfs, two layers, with Entrypoint, Cmd, Env, WorkingDir and User 1000:1000,
//! saved as docker-archive and oci-archive, runs in the container on its layers (overlayfs
//! lower directories, a fresh upper) and in the VM on the ext4 built from them, with the
//! same output and exit status: as the config says, with `-e` on top of Env, with `--`
//! arguments replacing Cmd, with `--workdir`. Bad input is one line and exit 125.
//!
//! Needs root, buildah and busybox-static (scripts/install-deps) and the artifacts; the
//! VM part runs in the lab (one session for every VM check) unless the host has hardware
//! KVM. Every container run has a leak check around it (mounts, loop devices, cgroups,
//! staging directories). Run with `flock /tmp/twinbox-itest.lock cargo test --test
//! image_run`.

mod common;

use common::describe;
use common::image::{require_tools, sh};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

/// The leak checks compare host snapshots: runs of this file must not overlap.
static SERIAL: Mutex<()> = Mutex::new(());

/// The image's Entrypoint: prints what `docker run` would have set up, then exits 3.
const ENTRYPOINT: &str = r#"["/bin/sh","-c","echo \"$GREETING from $(pwd) as $(id -u):$(id -g) groups $(id -G) home $HOME args $*\"; exit 3","sh"]"#;

/// The runs both boxes make (arguments after `twinbox ctr|vm run`, given the archive as
/// `IMG`) and the one line each prints; every one exits 3.
const CASES: [(&str, &str); 4] = [
    (
        "--image IMG",
        "hello from /srv/app as 1000:1000 groups 1000 2000 home /home/app args one two",
    ),
    (
        "-e GREETING=hi --image IMG",
        "hi from /srv/app as 1000:1000 groups 1000 2000 home /home/app args one two",
    ),
    (
        "--image IMG -- alpha beta",
        "hello from /srv/app as 1000:1000 groups 1000 2000 home /home/app args alpha beta",
    ),
    (
        "--workdir /tmp --image IMG",
        "hello from /tmp as 1000:1000 groups 1000 2000 home /home/app args one two",
    ),
];

/// `--entrypoint` as `docker run --entrypoint` (arguments with the archive as `IMG`, the
/// one line printed, the status), both boxes alike: the image's Cmd (`one two`) is dropped
/// with its Entrypoint, the arguments after `--` follow the new one, `''` clears it.
const ENTRYPOINT_CASES: [(&[&str], &str, i32); 3] = [
    (&["--entrypoint", "/bin/echo", "--image", "IMG"], "", 0),
    (
        &[
            "--entrypoint",
            "/bin/echo",
            "--image",
            "IMG",
            "--",
            "x",
            "y",
        ],
        "x y",
        0,
    ),
    (
        &[
            "--entrypoint",
            "",
            "--image",
            "IMG",
            "--",
            "/bin/sh",
            "-c",
            "echo $GREETING in $(pwd); exit 4",
        ],
        "hello in /srv/app",
        4,
    ),
];

/// `args` with `IMG` replaced by `image`.
fn with_image(args: &[&str], image: &str) -> Vec<String> {
    args.iter()
        .map(|a| if *a == "IMG" { image } else { a }.to_owned())
        .collect()
}

/// `args` quoted for the lab's shell.
fn quoted(args: &[String]) -> String {
    args.iter()
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The archives, built once for the file.
struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(build)
}

fn build() -> Fixture {
    common::require_root("building images with buildah and running them");
    require_tools(&["buildah", "busybox"], "buildah, busybox-static");
    let dir = std::env::temp_dir().join("twinbox-image-run-fixture");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    sh(
        &dir,
        &format!(
            r#"
        mkdir -p rootfs/bin rootfs/etc rootfs/tmp
        cp "$(command -v busybox)" rootfs/bin/busybox
        for a in sh echo cat id pwd ls env grep true; do ln -s busybox rootfs/bin/$a; done
        printf 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n' > rootfs/etc/passwd
        printf 'root:x:0:\napp:x:1000:\nextra:x:2000:app\n' > rootfs/etc/group
        tar -C rootfs -cf rootfs.tar .
        B="buildah --root $PWD/storage --runroot $PWD/run --storage-driver vfs"
        base=$($B from scratch)
        $B add "$base" rootfs.tar /
        $B commit -q "$base" tb-run-base >/dev/null
        app=$($B from tb-run-base)
        m=$($B mount "$app")
        mkdir -p "$m/srv/app" && echo note > "$m/srv/app/note"
        $B umount "$app" >/dev/null
        $B config --entrypoint '{ENTRYPOINT}' --cmd '["one","two"]' --env GREETING=hello \
            --workingdir /srv/app --user 1000:1000 "$app"
        $B commit -q "$app" tb-run >/dev/null
        $B push -q tb-run docker-archive:$PWD/app-docker.tar:tb-run:1
        $B push -q tb-run oci-archive:$PWD/app-oci.tar:tb-run:1
        # The same layers with a shell as Entrypoint, as root: `-- SCRIPT` runs SCRIPT.
        shell=$($B from tb-run)
        $B config --entrypoint '["/bin/sh","-c"]' --cmd '[]' --user 0 "$shell"
        $B commit -q "$shell" tb-shell >/dev/null
        $B push -q tb-shell oci-archive:$PWD/shell-oci.tar:tb-shell:1
        # Hostile copies: cut short, and a config whose bytes no longer match its digest.
        head -c 300000 app-docker.tar > truncated.tar
        mkdir bad && tar -C bad -xf app-docker.tar
        config=$(ls bad/*.json | grep -v manifest.json | head -n1)
        sed -i 's/GREETING=hello/GREETING=HACKD/' "$config"
        tar -C bad -cf bad-config.tar .
        rm -rf storage run rootfs bad
        "#
        ),
    );
    Fixture { dir }
}

/// `twinbox ctr run ARGS` (with `IMG` replaced), with a leak check around it.
fn ctr(args: &str, image: &str) -> Output {
    let args: Vec<&str> = args.split(' ').collect();
    ctr_argv(&with_image(&args, image))
}

/// `twinbox ctr run ARGS`, with a leak check around it.
fn ctr_argv(args: &[String]) -> Output {
    common::leaks::check_no_leaks(&format!("ctr run {args:?}"), || {
        Command::new(common::twinbox())
            .args(["ctr", "run"])
            .args(args)
            .output()
            .expect("run twinbox")
    })
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_container_runs_the_image_as_its_config_says_from_both_archive_forms() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let f = fixture();
    for archive in ["app-docker.tar", "app-oci.tar"] {
        let image = f.path(archive);
        for (args, line) in CASES {
            let out = ctr(args, &image);
            assert_eq!(
                out.status.code(),
                Some(3),
                "{archive} {args}: {}",
                describe(&out)
            );
            assert_eq!(
                stdout(&out),
                format!("{line}\n"),
                "{archive} {args}: {}",
                describe(&out)
            );
            assert!(
                out.stderr.is_empty(),
                "{archive} {args}: {}",
                describe(&out)
            );
        }
    }
}

#[test]
fn the_container_takes_an_entrypoint_as_docker_run_does() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let image = fixture().path("app-oci.tar");
    for (args, line, status) in ENTRYPOINT_CASES {
        let out = ctr_argv(&with_image(args, &image));
        assert_eq!(
            out.status.code(),
            Some(status),
            "{args:?}: {}",
            describe(&out)
        );
        assert_eq!(
            stdout(&out),
            format!("{line}\n"),
            "{args:?}: {}",
            describe(&out)
        );
        assert!(out.stderr.is_empty(), "{args:?}: {}", describe(&out));
    }
}

#[test]
fn the_container_s_root_is_the_layers_under_a_fresh_upper() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let image = fixture().path("shell-oci.tar");
    // The root's overlay stacks the layers, topmost first; the file of the upper layer
    // of one run is gone in the next; PID 1 is the host's init; the workload is root.
    let script = "grep ' / / ' /proc/self/mountinfo | grep -o 'lowerdir=[^,]*'; \
                  cat /srv/app/note; ls /srv/app/mark 2>/dev/null || echo no-mark; \
                  touch /srv/app/mark; echo pid1=$(cat /proc/1/cmdline | tr '\\0' ' '); id -u";
    for _ in 0..2 {
        let out = common::leaks::check_no_leaks("ctr run --image (root)", || {
            Command::new(common::twinbox())
                .args(["ctr", "run", "--image", &image, "--", script])
                .output()
                .expect("run twinbox")
        });
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        let text = stdout(&out);
        assert!(
            text.contains("/lower/1:") && text.contains("/lower/0"),
            "{}",
            describe(&out)
        );
        assert!(
            text.contains("note\nno-mark\npid1=/.twinbox/init\n0\n"),
            "{}",
            describe(&out)
        );
    }
}

#[test]
fn bad_input_is_one_line_and_125_with_nothing_left() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let f = fixture();
    let image = f.path("app-oci.tar");
    let rootfs = common::rootfs_image("the --rootfs of the conflicting case");
    let cases: [(Vec<String>, &str); 6] = [
        (
            vec!["--image".into(), image.clone(), "--rootfs".into(), rootfs],
            "--image and --rootfs",
        ),
        (
            vec!["--image".into(), format!("{image}@no-such:tag")],
            "no image matches",
        ),
        (vec!["--image".into(), f.path("truncated.tar")], "truncated"),
        (vec!["--image".into(), f.path("bad-config.tar")], "sha256"),
        (
            vec![
                "--entrypoint".into(),
                "/bin/true".into(),
                "--".into(),
                "/bin/true".into(),
            ],
            "--entrypoint replaces an image's Entrypoint, so it needs --image",
        ),
        (
            vec![
                "--entrypoint".into(),
                "".into(),
                "--image".into(),
                image.clone(),
            ],
            "put the command after `--`",
        ),
    ];
    for (args, says) in cases {
        let out = common::leaks::check_no_leaks(&format!("ctr run {args:?}"), || {
            Command::new(common::twinbox())
                .args(["ctr", "run"])
                .args(&args)
                .output()
                .expect("run twinbox")
        });
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {}", describe(&out));
        assert_eq!(err.lines().count(), 1, "{args:?}: {}", describe(&out));
        assert!(
            err.starts_with("twinbox: ") && err.contains(says),
            "{args:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: {}", describe(&out));
    }
    // Nothing half-unpacked in the cache.
    let tmp = twinbox_image::Store::default_location().root().join("tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", tmp.display());
    // Without --image the command stays required.
    let out = Command::new(common::twinbox())
        .args(["ctr", "run"])
        .output()
        .expect("run twinbox");
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("<CMD>"),
        "{}",
        describe(&out)
    );
}

#[test]
fn the_vm_runs_the_image_with_the_container_s_output_and_status() {
    let f = fixture();
    // One lab session for every VM check: each case prints its first line and status.
    let mut script = String::new();
    for (n, archive) in ["app-docker.tar", "app-oci.tar"].iter().enumerate() {
        for (i, (args, _)) in CASES.iter().enumerate() {
            let args = args.replace("IMG", &format!("/{archive}"));
            script.push_str(&format!(
                "twinbox vm run {args} > /tmp/out 2>/tmp/err; echo CASE_{n}_{i}_STATUS=$?\n\
                 echo CASE_{n}_{i}_OUT=$(head -n1 /tmp/out); echo CASE_{n}_{i}_ERR=$(head -n1 /tmp/err)\n"
            ));
        }
    }
    for (i, (args, _, _)) in ENTRYPOINT_CASES.iter().enumerate() {
        let args = quoted(&with_image(args, "/app-oci.tar"));
        script.push_str(&format!(
            "twinbox vm run {args} > /tmp/out 2>/tmp/err; echo ENTRY_{i}_STATUS=$?\n\
             echo ENTRY_{i}_OUT=$(head -n1 /tmp/out); echo ENTRY_{i}_ERR=$(head -n1 /tmp/err)\n"
        ));
    }
    script.push_str(
        "twinbox vm run --image /app-oci.tar@nope:1 2>/tmp/err; echo BADREF_STATUS=$?; \
         echo BADREF_LINES=$(wc -l < /tmp/err)\n",
    );
    let out = common::run_where_linux_boots(&script, |lab| {
        lab.file(f.path("app-docker.tar"), "/app-docker.tar")
            .file(f.path("app-oci.tar"), "/app-oci.tar")
            // The VM's disk is built in the lab's cache with mkfs.ext4 -d.
            .bin("/sbin/mke2fs")
            .file("/sbin/mke2fs", "/sbin/mkfs.ext4")
            .file("/etc/mke2fs.conf", "/etc/mke2fs.conf")
            .timeout_s(900)
    });
    for n in 0..2 {
        for (i, (args, line)) in CASES.iter().enumerate() {
            let key = |what: &str| format!("CASE_{n}_{i}_{what}");
            assert_eq!(
                out.expect_value(&key("STATUS")),
                "3",
                "{args} ({n}): {}",
                out.output
            );
            assert_eq!(
                out.expect_value(&key("OUT")),
                *line,
                "{args} ({n}): {}",
                out.output
            );
            assert_eq!(
                out.expect_value(&key("ERR")),
                "",
                "{args} ({n}): {}",
                out.output
            );
        }
    }
    for (i, (args, line, status)) in ENTRYPOINT_CASES.iter().enumerate() {
        let key = |what: &str| format!("ENTRY_{i}_{what}");
        let context = format!("{args:?}: {}", out.output);
        assert_eq!(
            out.expect_value(&key("STATUS")),
            status.to_string(),
            "{context}"
        );
        assert_eq!(out.expect_value(&key("OUT")), *line, "{context}");
        assert_eq!(out.expect_value(&key("ERR")), "", "{context}");
    }
    assert_eq!(out.expect_value("BADREF_STATUS"), "125", "{}", out.output);
    assert_eq!(out.expect_value("BADREF_LINES"), "1", "{}", out.output);
}
