//! The image store against images made by real tools, not by twinbox (issue 15): buildah
//! builds a base and two images on it from a busybox rootfs tarball and pushes them as
//! docker-archive and oci-archive; skopeo copies both into one OCI layout; umoci builds
//! an image with a whiteout and an opaque directory, and skopeo saves it as a
//! docker-archive. The test opens every form, checks the config as `docker run` honours
//! it, unpacks, checks that overlayfs sees the whiteouts and opaque directory as the image
//! means them, that a shared base layer is stored once, builds the VM disk and reads it
//! with debugfs, and drives `twinbox image` including hostile archives.
//!
//! Needs root (unpacking chowns and makes whiteout devices, the overlay mount) and
//! buildah, skopeo, umoci, e2fsprogs (scripts/install-deps). A missing tool fails the
//! test by name. Run serialized: `flock /tmp/twinbox-itest.lock cargo test --test image_store`.

mod common;

use common::image::{require_tools, sh};

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use twinbox_image::{Image, ImageSpec, Store};

/// The Cmd every test image carries, and what it prints in the boxes.
const CMD: &str = r#"echo "$GREETING from $(pwd) as $(id -u):$(id -g)"; cat greeting"#;

/// Built once for all tests of this file.
struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(build_images)
}

fn build_images() -> Fixture {
    common::require_root("building images with buildah and unpacking them");
    require_tools(
        &[
            "buildah",
            "skopeo",
            "umoci",
            "mkfs.ext4",
            "debugfs",
            "unshare",
            "busybox",
        ],
        "buildah, skopeo, umoci, e2fsprogs, busybox-static",
    );
    // One fixed directory, rebuilt by every run (runs are serialized), so runs do not pile
    // up copies of buildah's storage.
    let dir = std::env::temp_dir().join("twinbox-image-store-fixture");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // A small rootfs: the host's static busybox with its applet links, a user `app`.
    sh(
        &dir,
        r#"
        mkdir -p rootfs/bin rootfs/etc rootfs/srv/data rootfs/tmp newdata
        cp "$(command -v busybox)" rootfs/bin/busybox
        for a in sh echo cat id pwd ls env true; do ln -s busybox rootfs/bin/$a; done
        printf 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n' > rootfs/etc/passwd
        printf 'root:x:0:\napp:x:1000:\n' > rootfs/etc/group
        echo base > rootfs/etc/motd
        echo old > rootfs/srv/data/old
        echo new > newdata/new
        tar -C rootfs -cf rootfs.tar .
        "#,
    );
    let cmd_json = serde_json::to_string(&[CMD]).unwrap();
    sh(
        &dir,
        &format!(
            r#"
        B="buildah --root $PWD/storage --runroot $PWD/run --storage-driver vfs"
        base=$($B from scratch)
        $B add "$base" rootfs.tar /
        $B config --entrypoint '["/bin/sh","-c"]' "$base"
        $B commit -q "$base" tb-base >/dev/null
        a=$($B from tb-base)
        m=$($B mount "$a")
        echo "hello from a" > "$m/srv/greeting"
        rm "$m/etc/motd"
        $B umount "$a" >/dev/null
        $B config --cmd '{cmd_json}' --env GREETING=hi --workingdir /srv --user app "$a"
        $B commit -q "$a" tb-a >/dev/null
        b=$($B from tb-base)
        m=$($B mount "$b")
        echo "hello from b" > "$m/srv/greeting"
        $B umount "$b" >/dev/null
        $B commit -q "$b" tb-b >/dev/null
        $B push -q tb-a docker-archive:$PWD/a-docker.tar:tb-a:1
        $B push -q tb-a oci-archive:$PWD/a-oci.tar:tb-a:1
        $B push -q tb-b oci-archive:$PWD/b-oci.tar:tb-b:1
        skopeo copy -q oci-archive:a-oci.tar oci:layout:a
        skopeo copy -q oci-archive:b-oci.tar oci:layout:b
        umoci init --layout umoci
        umoci new --image umoci:u
        umoci insert --image umoci:u rootfs /
        umoci insert --image umoci:u --opaque newdata /srv/data
        umoci insert --image umoci:u --whiteout /etc/motd
        umoci config --image umoci:u --config.entrypoint /bin/sh --config.entrypoint -c \
          --config.cmd 'cat /srv/data/new' --config.env GREETING=umoci --config.user app:app
        skopeo copy -q oci:umoci:u docker-archive:$PWD/u-docker.tar:u:1
        "#
        ),
    );
    Fixture { dir }
}

fn open(path: &Path, reference: Option<&str>) -> Image {
    Image::open(&ImageSpec {
        path: path.to_owned(),
        reference: reference.map(str::to_owned),
    })
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A cache of its own for one test, removed when the test ends.
struct TestStore(Store);

impl std::ops::Deref for TestStore {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.0
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0.root());
    }
}

fn store(name: &str) -> TestStore {
    TestStore(Store::new(common::fresh_dir(&format!(
        "twinbox-image-cache-{name}"
    ))))
}

fn layer_dirs(store: &Store) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store.root().join("layers-v2/sha256"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn assert_whiteout(path: &Path) {
    let meta =
        std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        meta.file_type().is_char_device() && meta.rdev() == 0,
        "{} is not a whiteout",
        path.display()
    );
}

/// Lists `paths` in an overlayfs of `lowerdir`, mounted read-only in a private mount
/// namespace as the container mounts it.
fn overlay_view(lowerdir: &str, script: &str) -> String {
    let mnt = common::fresh_dir("twinbox-image-overlay");
    std::fs::create_dir_all(&mnt).unwrap();
    let out = sh(
        &mnt,
        &format!("unshare -m sh -c 'mount -t overlay overlay -o ro,lowerdir={lowerdir} {m} && cd {m} && {script}'", m = mnt.display()),
    );
    let _ = std::fs::remove_dir(&mnt);
    out
}

#[test]
fn buildah_archives_and_skopeo_layout_give_one_config_and_one_set_of_layers() {
    let f = fixture();
    let store = store("forms");
    let forms = [
        open(&f.path("a-docker.tar"), None),
        open(&f.path("a-oci.tar"), None),
        open(&f.path("layout"), Some("a")),
    ];
    let mut all_dirs = Vec::new();
    for image in &forms {
        let what = format!(
            "{} ({})",
            image.source_path().display(),
            image.format().name()
        );
        let c = &image.config;
        assert_eq!(c.command(&[]), ["/bin/sh", "-c", CMD], "{what}");
        assert_eq!(
            c.command(&["exit 3".to_owned()]),
            ["/bin/sh", "-c", "exit 3"],
            "{what}"
        );
        let env = c.env(&["EXTRA=1".to_owned(), "GREETING=override".to_owned()]);
        assert!(
            env.contains(&"GREETING=override".to_owned()) && env.contains(&"EXTRA=1".to_owned()),
            "{what}: {env:?}"
        );
        assert!(c.env(&[]).contains(&"GREETING=hi".to_owned()), "{what}");
        assert_eq!(c.working_dir(), "/srv", "{what}");
        let layers = store
            .layers(image)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let user = c.resolve_user(&layers.dirs).unwrap();
        assert_eq!(
            (user.uid, user.gid, user.home.as_str()),
            (1000, 1000, "/home/app"),
            "{what}"
        );
        // buildah's diff of `rm etc/motd` is a whiteout in the top layer.
        assert_whiteout(&layers.dirs.last().unwrap().join("etc/motd"));
        all_dirs.push(layers.dirs.clone());
    }
    assert!(
        all_dirs.windows(2).all(|w| w[0] == w[1]),
        "the three forms share their layers: {all_dirs:?}"
    );
    assert_eq!(layer_dirs(&store).len(), all_dirs[0].len());

    let e = Image::open(&ImageSpec::parse(f.path("layout").to_str().unwrap()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("holds 2 images") && e.contains('a') && e.contains('b'),
        "{e}"
    );
}

#[test]
fn two_images_sharing_a_base_layer_store_it_once() {
    let f = fixture();
    let store = store("shared");
    let a = open(&f.path("layout"), Some("a"));
    let b = open(&f.path("layout"), Some("b"));
    let (la, lb) = (store.layers(&a).unwrap(), store.layers(&b).unwrap());
    assert_eq!(la.dirs[0], lb.dirs[0], "one directory for the base layer");
    let mut union: Vec<_> = a
        .layers
        .iter()
        .chain(&b.layers)
        .map(|l| l.diff_id.hex().to_owned())
        .collect();
    union.sort();
    union.dedup();
    assert_eq!(layer_dirs(&store), union);
    assert_eq!(a.layers[0].diff_id, b.layers[0].diff_id);
    let listing = store.list().unwrap();
    let base = listing
        .layers
        .iter()
        .find(|(d, _, _)| d == a.layers[0].diff_id.hex())
        .unwrap();
    assert_eq!(base.2, 2, "the base layer is used by both images");
    let sizes = store.sizes(&a).unwrap();
    assert!(
        sizes.layers_bytes_on_disk > 1_000_000,
        "busybox is in there: {sizes:?}"
    );
}

#[test]
fn umoci_whiteouts_and_opaque_dirs_reach_overlayfs_and_the_vm_disk() {
    let f = fixture();
    let store = store("umoci");
    let oci = open(&f.path("umoci"), None);
    let docker = open(&f.path("u-docker.tar"), None);
    assert_eq!(
        oci.config.command(&[]),
        ["/bin/sh", "-c", "cat /srv/data/new"]
    );
    let layers = store.layers(&oci).unwrap();
    assert_eq!(
        store.layers(&docker).unwrap().dirs,
        layers.dirs,
        "skopeo's docker-archive shares the layers"
    );
    let user = oci.config.resolve_user(&layers.dirs).unwrap();
    assert_eq!((user.uid, user.gid), (1000, 1000));
    assert_whiteout(&layers.dirs[2].join("etc/motd"));

    // Overlayfs, as the container mounts the layers, sees what the image means.
    let view = overlay_view(
        &layers.overlay_lowerdir().unwrap(),
        "ls srv/data; test ! -e etc/motd && echo motd-gone; cat etc/passwd",
    );
    assert!(view.starts_with("new\nmotd-gone\n"), "{view}");
    assert!(view.contains("app:x:1000"), "{view}");

    // The VM disk says the same.
    let disk = store.ext4(&oci).unwrap();
    let debugfs = |cmd: &str| {
        let out = Command::new("debugfs")
            .args(["-R", cmd])
            .arg(&disk.path)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    assert!(debugfs("cat /srv/data/new").starts_with("new"));
    assert!(debugfs("stat /srv/data/old").contains("File not found"));
    assert!(debugfs("stat /etc/motd").contains("File not found"));
    assert!(debugfs("cat /etc/passwd").contains("app:x:1000"));
    assert!(debugfs("stat /bin/busybox").contains("Size: "));
    let xattrs = debugfs("ea_list /srv/data");
    assert!(
        !xattrs.contains("trusted.") && !xattrs.contains("user.overlay."),
        "no overlay xattrs on the disk: {xattrs}"
    );
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(&disk.path)
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let sizes = store.sizes(&oci).unwrap();
    assert!(
        sizes.ext4_bytes.is_some() && sizes.ext4_bytes_on_disk.is_some(),
        "{sizes:?}"
    );
}

/// `ctr run --userns --image`: the layers, idmapped into the container's user namespace
/// and stacked by its root with `userxattr`, show what the image means (the whiteout, the
/// opaque directory, the owners) exactly as host root's overlay does, while container root
/// is the first host uid of the run's leased range and the cached layers stay as they were.
#[test]
fn a_user_namespace_sees_the_layers_as_the_image_means_them() {
    let f = fixture();
    let image = f.path("u-docker.tar");
    let image = image.to_str().unwrap();
    let script = "ls /srv/data; test ! -e /etc/motd && echo motd-gone; \
                  stat -c %u:%g /bin/busybox /etc/passwd; id -u; \
                  head -n1 /proc/self/uid_map | tr -s ' '; \
                  echo mine > /tmp/w && cat /tmp/w";
    let run = |userns: bool| {
        let mut args = vec!["ctr", "run"];
        if userns {
            args.push("--userns");
        }
        args.extend([
            "--image",
            image,
            "--entrypoint",
            "/bin/sh",
            "--",
            "-c",
            script,
        ]);
        let out = common::leaks::check_no_leaks(&format!("{args:?}"), || {
            Command::new(common::twinbox())
                .args(&args)
                .output()
                .expect("run twinbox")
        });
        assert!(out.status.success(), "{args:?}: {}", common::describe(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let common_part = "new\nmotd-gone\n0:0\n0:0\n1000\n";
    let host = run(false);
    assert_eq!(host, format!("{common_part} 0 0 4294967295\nmine\n"));
    let userns = run(true);
    // Container root is the first id of the run's own leased range (userns.rs).
    let base = userns
        .strip_prefix(&format!("{common_part} 0 "))
        .and_then(|rest| rest.strip_suffix(" 65536\nmine\n"))
        .and_then(|base| base.parse::<u64>().ok());
    assert!(
        base.is_some_and(|b| (0x7000_0000..0x7FFE_0000).contains(&b)),
        "{userns:?}"
    );
    // The cache's layers are untouched: host owners, both opaque markers, no new file.
    let layers = Store::default_location()
        .layers(&open(Path::new(image), None))
        .unwrap();
    let data = layers.dirs[1].join("srv/data");
    assert_eq!(std::fs::metadata(&data).unwrap().uid(), 0);
    assert_eq!(std::fs::read_dir(&data).unwrap().count(), 1, "{data:?}");
    let path = std::ffi::CString::new(data.to_str().unwrap()).unwrap();
    for marker in [c"trusted.overlay.opaque", c"user.overlay.opaque"] {
        let mut value = [0u8; 8];
        // SAFETY: both names are NUL-terminated and the buffer's length is passed.
        let n = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                marker.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        assert_eq!(n, 1, "{marker:?} on {}", data.display());
        assert_eq!(value[0], b'y', "{marker:?} on {}", data.display());
    }
}

/// Runs `twinbox image ARGS` with its own cache; (status, stdout, stderr).
fn cli(cache: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(common::twinbox())
        .arg("image")
        .args(args)
        .env("TWINBOX_CACHE", cache)
        .output()
        .expect("run twinbox");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_refused(cache: &Path, args: &[&str], needle: &str) {
    let (status, _, stderr) = cli(cache, args);
    assert_eq!(status, 125, "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr:?}");
    assert!(stderr.contains(needle), "{args:?}: {stderr}");
    let tmp = cache.join("images/tmp");
    assert!(
        std::fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0) == 0,
        "{args:?}: nothing half-unpacked left in {}",
        tmp.display()
    );
}

#[test]
fn the_cli_loads_lists_removes_and_refuses_hostile_archives() {
    let f = fixture();
    let cache = common::fresh_dir("twinbox-image-cli");
    let a_docker = f.path("a-docker.tar");
    let (status, out, err) = cli(&cache, &["load", a_docker.to_str().unwrap(), "--ext4"]);
    assert_eq!(status, 0, "{err}");
    assert!(
        out.contains("workdir  /srv") && out.contains("user     1000:1000"),
        "{out}"
    );
    let (status, out, err) = cli(
        &cache,
        &[
            "load",
            "--json",
            &format!("{}@b", f.path("layout").display()),
        ],
    );
    assert_eq!(status, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["working_dir"], "/");
    let (status, out, _) = cli(&cache, &["ls"]);
    assert_eq!(status, 0);
    assert!(
        out.contains(&format!("cache {}/images", cache.display())) && out.contains("in total"),
        "{out}"
    );
    assert!(out.contains("tb-a:1") && out.contains("VM DISK"), "{out}");

    // Hostile inputs: a layer blob that does not match its digest, a truncated archive,
    // a manifest naming a missing blob. One line, exit 125, nothing left half-made.
    let layers_before = std::fs::read_dir(cache.join("images/layers-v2/sha256"))
        .unwrap()
        .count();
    let bad = common::fresh_dir("twinbox-image-hostile");
    sh(
        Path::new("/"),
        &format!("cp -r {} {}", f.path("layout").display(), bad.display()),
    );
    let a = open(&bad, Some("a"));
    let top = a.layers.last().unwrap().blob_digest.clone().unwrap();
    let blob = bad.join("blobs/sha256").join(top.hex());
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&blob, &bytes).unwrap();
    let fresh = common::fresh_dir("twinbox-image-cli-hostile");
    assert_refused(
        &fresh,
        &["load", &format!("{}@a", bad.display())],
        &format!("blob {top} is corrupt"),
    );
    std::fs::remove_file(&blob).unwrap();
    assert_refused(
        &fresh,
        &["load", &format!("{}@a", bad.display())],
        "missing",
    );
    let truncated = bad.with_extension("tar");
    let whole = std::fs::read(&a_docker).unwrap();
    std::fs::write(&truncated, &whole[..whole.len() * 2 / 3]).unwrap();
    assert_refused(&fresh, &["load", truncated.to_str().unwrap()], "truncated");
    assert_refused(
        &cache,
        &["load", "/nonexistent/image.tar"],
        "cannot open image",
    );
    assert_eq!(
        std::fs::read_dir(cache.join("images/layers-v2/sha256"))
            .unwrap()
            .count(),
        layers_before
    );

    // rm keeps the base layer b still uses; prune then has nothing of b's to take.
    let (status, out, err) = cli(&cache, &["rm", "tb-a:1"]);
    assert_eq!(status, 0, "{err}");
    assert!(out.contains("1 disk(s)"), "{out}");
    let (status, _, _) = cli(&cache, &["prune"]);
    assert_eq!(status, 0);
    let (_, out, _) = cli(&cache, &["ls"]);
    // The layout names b by its skopeo ref name alone.
    assert!(
        !out.contains("tb-a:1") && out.lines().any(|l| l.ends_with("  b")),
        "{out}"
    );
    assert_refused(&cache, &["rm", "tb-a:1"], "no cached image matches");
    for dir in [&bad, &fresh, &cache] {
        let _ = std::fs::remove_dir_all(dir);
    }
    let _ = std::fs::remove_file(&truncated);
}
