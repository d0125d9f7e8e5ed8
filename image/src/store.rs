//! The content-addressed image cache under `$TWINBOX_CACHE/images`:
//!
//! ```text
//! images/
//! ├── lock                          flock: shared while a box uses the cache, exclusive for rm/prune
//! ├── layers-v2/sha256/<diff_id>/   one unpacked layer in overlayfs form, shared by every image
//! ├── ext4/<image id>-<version>.ext4  the VM disk of an image, per twinbox version
//! ├── refs/<image id>.json          an image seen: its names, source, layers (what rm/prune count)
//! ├── tmp/                          unpacks and builds in progress, renamed into place when done
//! └── locks/<key>.lock              one per layer/disk being made (two processes never make one twice)
//! ```
//!
//! Layers are keyed by their uncompressed digest (diff_id), so a layer stored once serves
//! every image and every compression that carries it. Everything is made in `tmp/` and
//! renamed into place, so a reader sees a layer or disk whole or not at all; a killed
//! process leaves only `tmp/` entries, which the next maker of that key or `prune` removes.

use crate::digest::{Digest, Hashing};
use crate::error::{errno, io, ImageError, Result};
use crate::open::{corrupt, name_matches, Image, Layer};
use crate::{ext4, unpack};
use rustix::fs::{flock, FlockOperation};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The version baked into VM disk names: a new twinbox rebuilds disks, since how a disk is
/// made may change with it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where unpacked layers live. The name carries the unpack format: a change of what
/// unpacking writes (v2: `user.overlay.opaque` beside `trusted.overlay.opaque`) takes a new
/// name, so no layer of the old form is used; `prune` removes the old ones.
const LAYERS: &str = "layers-v2/sha256";
/// The layer directories of earlier unpack formats.
const STALE_LAYERS: [&str; 1] = ["layers"];

/// The image cache.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Holds the cache's shared lock: while it lives, `rm` and `prune` refuse to run, so the
/// layer directories and disks a box uses stay in place.
#[derive(Debug)]
pub struct CacheGuard {
    lock: File,
    /// The process that took the lock, the only one that releases it.
    owner: u32,
}

impl CacheGuard {
    fn new(lock: File) -> Self {
        Self {
            lock,
            owner: std::process::id(),
        }
    }
}

impl Drop for CacheGuard {
    /// Unlocks, rather than only closing the file: a flock belongs to the open file
    /// description, and a child that another thread has just forked and not yet exec'd
    /// refers to it too (the descriptor is close-on-exec, but that acts only at the exec).
    /// Closed alone, the lock would outlive the guard by that instant and `rm` or `prune`
    /// run right after would be refused; an unlock through any descriptor releases it for
    /// all. A copy of the guard in a forked child never unlocks its parent's hold.
    fn drop(&mut self) {
        if std::process::id() == self.owner {
            let _ = flock(&self.lock, FlockOperation::Unlock);
        }
    }
}

/// An image's layers unpacked, for the container's overlayfs.
#[derive(Debug)]
pub struct Layers {
    /// The layer directories, lowest first.
    pub dirs: Vec<PathBuf>,
    /// Keeps the directories from `rm`/`prune` while the box runs: keep `Layers` alive.
    pub guard: CacheGuard,
}

impl Layers {
    /// The `lowerdir=` value for overlayfs: topmost layer first, `:`-separated, as the
    /// kernel reads it. Fails on a cache path holding `:` or `,`, which the option cannot
    /// carry.
    pub fn overlay_lowerdir(&self) -> Result<String> {
        let mut parts = Vec::new();
        for d in self.dirs.iter().rev() {
            let s = d.to_str().filter(|s| !s.contains([':', ',', '\\'])).ok_or_else(|| ImageError::Cache {
                root: d.clone(),
                what: "the cache path holds ':', ',' or '\\', which overlayfs' lowerdir cannot carry; move it with TWINBOX_CACHE".into(),
            })?;
            parts.push(s.to_owned());
        }
        Ok(parts.join(":"))
    }
}

/// An image's VM disk.
#[derive(Debug)]
pub struct Ext4Disk {
    /// The ext4 file (read-only, 0444): hand it to the VM as its root disk.
    pub path: PathBuf,
    /// The layer directories it was built from (for [`crate::RunConfig::resolve_user`]).
    pub layers: Layers,
}

/// Sizes for the report's "image sizes MB vs GB" claim.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImageSizes {
    /// Bytes the image's unpacked layers take on disk (allocated blocks, hard links once).
    pub layers_bytes_on_disk: u64,
    /// Bytes of the layer blobs in the input, compressed as stored.
    pub layers_bytes_in_archive: u64,
    /// How many layers.
    pub layer_count: usize,
    /// The VM disk's apparent size, when it is built.
    pub ext4_bytes: Option<u64>,
    /// The VM disk's allocated bytes (the file is sparse), when it is built.
    pub ext4_bytes_on_disk: Option<u64>,
}

/// What the cache records of an image it has unpacked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The image id (config digest).
    pub id: String,
    /// The manifest digest, for OCI inputs.
    pub manifest_digest: Option<String>,
    /// Tags and ref names seen for it.
    pub names: Vec<String>,
    /// The input it was last opened from.
    pub source: PathBuf,
    /// Layer diff_ids, lowest first.
    pub layers: Vec<String>,
    /// Seconds since the epoch of the last use.
    pub last_used: u64,
}

/// `twinbox image ls`: everything in the cache and its size.
#[derive(Debug, Serialize)]
pub struct Listing {
    /// The cache directory.
    pub root: PathBuf,
    /// Images, with the bytes of their layers.
    pub images: Vec<(ImageRecord, u64)>,
    /// Layers: diff_id, bytes on disk, how many images use it.
    pub layers: Vec<(String, u64, usize)>,
    /// VM disks: file, bytes on disk, whether prune would remove it.
    pub disks: Vec<(PathBuf, u64, bool)>,
    /// Bytes of unfinished work in tmp/.
    pub tmp_bytes: u64,
    /// Everything under the root.
    pub total_bytes: u64,
}

/// What `rm` or `prune` removed.
#[derive(Debug, Default, Serialize)]
pub struct Removed {
    /// Image ids whose records went.
    pub images: Vec<String>,
    /// Layer diff_ids.
    pub layers: Vec<String>,
    /// Disk files.
    pub disks: Vec<PathBuf>,
    /// Leftovers of killed runs in tmp/.
    pub tmp: usize,
    /// Bytes freed.
    pub bytes: u64,
}

impl Store {
    /// The cache at `root` (made on first use).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `$TWINBOX_CACHE/images` (default `/var/cache/twinbox/images`).
    pub fn default_location() -> Self {
        Self::new(twinbox_spec::artifacts::cache_dir().join("images"))
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a layer lives once unpacked.
    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.root.join(LAYERS).join(diff_id.hex())
    }

    /// Where an image's VM disk lives once built.
    pub fn disk_path(&self, image_id: &Digest) -> PathBuf {
        self.root
            .join("ext4")
            .join(format!("{}-{VERSION}.ext4", image_id.hex()))
    }

    /// Unpacks what is missing of the image's layers (each verified against its digest as
    /// it is read) and returns their directories, lowest first.
    pub fn layers(&self, image: &Image) -> Result<Layers> {
        let guard = self.shared()?;
        let mut dirs = Vec::new();
        for layer in &image.layers {
            dirs.push(self.ensure_layer(image, layer)?);
        }
        self.write_record(image)?;
        Ok(Layers { dirs, guard })
    }

    /// The image's VM disk: built once from its layers, then reused for the same image
    /// (by id) and twinbox version.
    pub fn ext4(&self, image: &Image) -> Result<Ext4Disk> {
        let layers = self.layers(image)?;
        let path = self.disk_path(&image.id);
        if !path.is_file() {
            let key = format!("ext4-{}", image.id.hex());
            let _lock = self.key_lock(&key)?;
            if !path.is_file() {
                let work = self.fresh_tmp(&key)?;
                let tree = work.path.join("tree");
                let disk = work.path.join("disk.ext4");
                std::fs::create_dir(&tree).map_err(io(&tree, "cannot create"))?;
                let started = std::time::Instant::now();
                ext4::merge(&layers.dirs, &tree)?;
                ext4::mkfs(&tree, &disk)?;
                std::fs::set_permissions(
                    &disk,
                    std::os::unix::fs::PermissionsExt::from_mode(0o444),
                )
                .map_err(io(&disk, "cannot chmod"))?;
                self.mkdir(&self.root.join("ext4"))?;
                std::fs::rename(&disk, &path)
                    .map_err(io(&path, "cannot move the disk into place"))?;
                tracing::info!(disk = %path.display(), ms = started.elapsed().as_millis() as u64, "built VM disk");
            }
        }
        Ok(Ext4Disk { path, layers })
    }

    /// Sizes of an image in the cache (its layers must be unpacked).
    pub fn sizes(&self, image: &Image) -> Result<ImageSizes> {
        let mut seen = HashSet::new();
        let mut on_disk = 0;
        for layer in &image.layers {
            on_disk += du(&self.layer_dir(&layer.diff_id), &mut seen);
        }
        let disk = std::fs::metadata(self.disk_path(&image.id)).ok();
        Ok(ImageSizes {
            layers_bytes_on_disk: on_disk,
            layers_bytes_in_archive: image.archive_layer_bytes(),
            layer_count: image.layers.len(),
            ext4_bytes: disk.as_ref().map(|m| m.len()),
            ext4_bytes_on_disk: disk.as_ref().map(|m| m.blocks() * 512),
        })
    }

    /// Everything in the cache with its size.
    pub fn list(&self) -> Result<Listing> {
        let records = self.records()?;
        let mut uses: BTreeMap<String, usize> = BTreeMap::new();
        for r in &records {
            for l in &r.layers {
                *uses.entry(l.clone()).or_default() += 1;
            }
        }
        let mut layers = Vec::new();
        let mut layer_bytes = BTreeMap::new();
        for name in dir_names(&self.root.join(LAYERS)) {
            let bytes = du(&self.root.join(LAYERS).join(&name), &mut HashSet::new());
            layer_bytes.insert(name.clone(), bytes);
            layers.push((name.clone(), bytes, uses.get(&name).copied().unwrap_or(0)));
        }
        let images = records
            .iter()
            .map(|r| {
                let bytes = r.layers.iter().filter_map(|l| layer_bytes.get(l)).sum();
                (r.clone(), bytes)
            })
            .collect();
        let ids: HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
        let disks = dir_names(&self.root.join("ext4"))
            .into_iter()
            .map(|name| {
                let path = self.root.join("ext4").join(&name);
                let bytes = std::fs::metadata(&path)
                    .map(|m| m.blocks() * 512)
                    .unwrap_or(0);
                (path, bytes, disk_is_stale(&name, &ids))
            })
            .collect();
        Ok(Listing {
            root: self.root.clone(),
            images,
            layers,
            disks,
            tmp_bytes: dir_names(&self.root.join("tmp"))
                .iter()
                .map(|n| du(&self.root.join("tmp").join(n), &mut HashSet::new()))
                .sum(),
            total_bytes: du(&self.root, &mut HashSet::new()),
        })
    }

    /// Removes the image `reference` names (a tag, or a prefix of its id or manifest
    /// digest): its record, its disks, and the layers no other image uses.
    pub fn remove(&self, reference: &str) -> Result<Removed> {
        let _guard = self.exclusive()?;
        let records = self.records()?;
        let hex = reference
            .strip_prefix("sha256:")
            .unwrap_or(reference)
            .to_ascii_lowercase();
        let by_digest = hex.len() >= 6 && hex.bytes().all(|b| b.is_ascii_hexdigit());
        let matched: Vec<&ImageRecord> = records
            .iter()
            .filter(|r| {
                r.names.iter().any(|n| name_matches(reference, n))
                    || (by_digest
                        && (strip(&r.id).starts_with(&hex)
                            || r.manifest_digest
                                .as_deref()
                                .is_some_and(|m| strip(m).starts_with(&hex))))
            })
            .collect();
        let chosen = match matched.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(ImageError::Cache {
                    root: self.root.clone(),
                    what: format!("no cached image matches {reference:?} (see `twinbox image ls`)"),
                })
            }
            many => {
                let names: Vec<String> = many.iter().map(|r| describe(r)).collect();
                return Err(ImageError::Cache {
                    root: self.root.clone(),
                    what: format!(
                        "{reference:?} matches {} images: {}",
                        many.len(),
                        names.join(", ")
                    ),
                });
            }
        };
        let mut removed = Removed::default();
        let record = self
            .root
            .join("refs")
            .join(format!("{}.json", strip(&chosen.id)));
        std::fs::remove_file(&record).map_err(io(&record, "cannot remove"))?;
        removed.images.push(chosen.id.clone());
        for name in dir_names(&self.root.join("ext4")) {
            if name.starts_with(strip(&chosen.id)) {
                self.remove_path(&self.root.join("ext4").join(&name), &mut removed.bytes)?;
                removed.disks.push(self.root.join("ext4").join(name));
            }
        }
        let others: Vec<ImageRecord> = records.into_iter().filter(|r| r.id != chosen.id).collect();
        self.remove_unused_layers(&others, Some(&chosen.layers), &mut removed)?;
        Ok(removed)
    }

    /// Removes layers no image uses, disks of removed images or older twinbox versions,
    /// and leftovers of killed runs.
    pub fn prune(&self) -> Result<Removed> {
        let _guard = self.exclusive()?;
        let records = self.records()?;
        let mut removed = Removed::default();
        self.remove_unused_layers(&records, None, &mut removed)?;
        let ids: HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
        for name in dir_names(&self.root.join("ext4")) {
            if disk_is_stale(&name, &ids) {
                let path = self.root.join("ext4").join(&name);
                self.remove_path(&path, &mut removed.bytes)?;
                removed.disks.push(path);
            }
        }
        for old in STALE_LAYERS {
            let path = self.root.join(old);
            if path.is_dir() {
                self.remove_path(&path, &mut removed.bytes)?;
                removed
                    .layers
                    .push(format!("{old}/ (an earlier unpack format)"));
            }
        }
        // Nobody holds the shared lock, so nobody is making anything: all of tmp/ and the
        // key locks are leftovers.
        for dir in ["tmp", "locks"] {
            for name in dir_names(&self.root.join(dir)) {
                self.remove_path(&self.root.join(dir).join(name), &mut removed.bytes)?;
                if dir == "tmp" {
                    removed.tmp += 1;
                }
            }
        }
        Ok(removed)
    }

    fn remove_unused_layers(
        &self,
        keep_for: &[ImageRecord],
        only: Option<&[String]>,
        removed: &mut Removed,
    ) -> Result<()> {
        let used: HashSet<&str> = keep_for
            .iter()
            .flat_map(|r| r.layers.iter().map(String::as_str))
            .collect();
        for name in dir_names(&self.root.join(LAYERS)) {
            if used.contains(name.as_str()) || only.is_some_and(|o| !o.contains(&name)) {
                continue;
            }
            self.remove_path(&self.root.join(LAYERS).join(&name), &mut removed.bytes)?;
            removed.layers.push(name);
        }
        Ok(())
    }

    fn remove_path(&self, path: &Path, bytes: &mut u64) -> Result<()> {
        *bytes += du(path, &mut HashSet::new());
        let meta = std::fs::symlink_metadata(path).map_err(io(path, "cannot stat"))?;
        // std's remove_dir_all never follows symlinks inside (it works through fds).
        let r = if meta.is_dir() {
            std::fs::remove_dir_all(path)
        } else {
            std::fs::remove_file(path)
        };
        r.map_err(io(path, "cannot remove"))
    }

    /// One layer: already there, or unpacked now under its key lock.
    fn ensure_layer(&self, image: &Image, layer: &Layer) -> Result<PathBuf> {
        let dir = self.layer_dir(&layer.diff_id);
        if dir.is_dir() {
            return Ok(dir);
        }
        let key = format!("layer-{}", layer.diff_id.hex());
        let _lock = self.key_lock(&key)?;
        if dir.is_dir() {
            return Ok(dir);
        }
        let label = format!(
            "{}: layer {}",
            image.source_path().display(),
            layer
                .blob_digest
                .as_ref()
                .map_or_else(|| layer.member.clone(), |d| d.to_string())
        );
        let started = std::time::Instant::now();
        let work = self.fresh_tmp(&key)?;
        // The blob is verified whole before a decompressor or the tar reader sees a byte of
        // it (two reads; the second comes from the page cache).
        if let Some(digest) = &layer.blob_digest {
            let mut h = Hashing::new(image.read_layer(layer)?);
            let (actual, n) = {
                std::io::copy(&mut h, &mut std::io::sink())
                    .map_err(io(image.source_path(), "cannot read layer"))?;
                h.finish()
                    .map_err(io(image.source_path(), "cannot read layer"))?
            };
            if n != layer.blob_size {
                return Err(corrupt(
                    &image.source,
                    digest,
                    format!("{n} bytes, the manifest says {}", layer.blob_size),
                ));
            }
            if &actual != digest {
                return Err(corrupt(
                    &image.source,
                    digest,
                    format!("its content hashes to {actual}"),
                ));
            }
        }
        let mut stream = Hashing::new(decompress(
            BufReader::new(image.read_layer(layer)?),
            &label,
        )?);
        let stats = unpack::unpack(ClosedTar::new(&mut stream), &work.path, &label)?;
        let (diff_id, bytes) = stream.finish().map_err(|e| ImageError::Malformed {
            path: label.clone().into(),
            what: format!("unreadable layer: {e}"),
        })?;
        if diff_id != layer.diff_id {
            return Err(ImageError::Corrupt {
                path: image.source_path().to_owned(),
                digest: layer
                    .blob_digest
                    .as_ref()
                    .map_or_else(|| layer.member.clone(), |d| d.to_string()),
                what: format!(
                    "uncompressed it hashes to {diff_id}, the config's diff_id is {}",
                    layer.diff_id
                ),
            });
        }
        let work_fd = crate::fsat::open_dir(&work.path).map_err(io(&work.path, "cannot open"))?;
        rustix::fs::syncfs(&work_fd).map_err(errno(&work.path, "syncfs"))?;
        self.mkdir(&self.root.join(LAYERS))?;
        std::fs::rename(&work.path, &dir).map_err(io(&dir, "cannot move the layer into place"))?;
        work.keep();
        tracing::info!(
            layer = %layer.diff_id, bytes, entries = stats.entries, whiteouts = stats.whiteouts,
            ms = started.elapsed().as_millis() as u64, "unpacked layer"
        );
        Ok(dir)
    }

    fn write_record(&self, image: &Image) -> Result<()> {
        let refs = self.root.join("refs");
        self.mkdir(&refs)?;
        let path = refs.join(format!("{}.json", image.id.hex()));
        let mut names = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<ImageRecord>(&b).ok())
            .map(|r| r.names)
            .unwrap_or_default();
        for n in &image.names {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        let record = ImageRecord {
            id: image.id.to_string(),
            manifest_digest: image.manifest_digest.as_ref().map(|d| d.to_string()),
            names,
            source: std::fs::canonicalize(image.source_path())
                .unwrap_or_else(|_| image.source_path().to_owned()),
            layers: image
                .layers
                .iter()
                .map(|l| l.diff_id.hex().to_owned())
                .collect(),
            last_used: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        // Unique per process and call: two threads may record the same image at once.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = refs.join(format!(
            ".{}.{}.{seq}.tmp",
            image.id.hex(),
            std::process::id()
        ));
        let json = serde_json::to_vec_pretty(&record).expect("a record serializes");
        std::fs::write(&tmp, json).map_err(io(&tmp, "cannot write"))?;
        std::fs::rename(&tmp, &path).map_err(io(&path, "cannot write"))
    }

    fn records(&self) -> Result<Vec<ImageRecord>> {
        let mut out = Vec::new();
        for name in dir_names(&self.root.join("refs")) {
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            let path = self.root.join("refs").join(&name);
            let bytes = std::fs::read(&path).map_err(io(&path, "cannot read"))?;
            match serde_json::from_slice(&bytes) {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!("ignoring {}: {e}", path.display()),
            }
        }
        Ok(out)
    }

    fn mkdir(&self, path: &Path) -> Result<()> {
        std::fs::create_dir_all(path).map_err(io(path, "cannot create cache directory"))
    }

    /// Makes the cache's root, or keeps it, private to its owner (0700): unpacked layers
    /// keep their images' set-id bits and device nodes, and no other local user may reach
    /// them (a setuid-root program of any image, a device node it planted), nor race the
    /// unpack in a directory a layer made writable (moby's CVE-2021-41091 is the same
    /// lesson). A root owned by another user, or not a directory, is refused.
    fn private_root(&self) -> Result<()> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        if let Some(parent) = self.root.parent() {
            self.mkdir(parent)?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(&self.root) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(&self.root, "cannot create cache directory")(e)),
        }
        let meta = std::fs::symlink_metadata(&self.root)
            .map_err(io(&self.root, "cannot look at the cache directory"))?;
        let unsafe_root = |what: String| ImageError::Unsafe {
            path: self.root.clone(),
            what,
        };
        if !meta.is_dir() {
            return Err(unsafe_root(
                "the image cache is not a directory (a symlink?): remove it".into(),
            ));
        }
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me {
            return Err(unsafe_root(format!(
                "the image cache is owned by uid {}, not by this user (uid {me}): it would \
                 hand this user's images to another",
                meta.uid()
            )));
        }
        if meta.mode() & 0o077 != 0 {
            std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))
                .map_err(io(&self.root, "cannot make the cache directory private"))?;
        }
        Ok(())
    }

    /// The cache's lock file, opened close-on-exec (as std opens every file): a box's
    /// children keep no copy of it past their exec.
    fn lock_file(&self) -> Result<File> {
        self.private_root()?;
        let path = self.root.join("lock");
        File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(path, "cannot open the cache lock"))
    }

    /// The cache's shared lock, for a box using it.
    pub fn shared(&self) -> Result<CacheGuard> {
        let file = self.lock_file()?;
        flock(&file, FlockOperation::LockShared).map_err(errno(self.root.join("lock"), "flock"))?;
        Ok(CacheGuard::new(file))
    }

    /// The cache's exclusive lock, for rm and prune: refused at once while a box holds it.
    fn exclusive(&self) -> Result<CacheGuard> {
        let file = self.lock_file()?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(CacheGuard::new(file)),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(ImageError::Cache {
                root: self.root.clone(),
                what: "in use by a running twinbox (a box or an unpack); try again when it ends"
                    .into(),
            }),
            Err(e) => Err(errno(self.root.join("lock"), "flock")(e)),
        }
    }

    /// The lock of one thing being made, so two processes never make it twice.
    fn key_lock(&self, key: &str) -> Result<File> {
        let dir = self.root.join("locks");
        self.mkdir(&dir)?;
        let path = dir.join(format!("{key}.lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path, "cannot open lock"))?;
        flock(&file, FlockOperation::LockExclusive).map_err(errno(&path, "flock"))?;
        Ok(file)
    }

    /// An empty `tmp/<key>`, removed again on drop unless kept. Called under the key's
    /// lock, so anything already there is a killed run's leftover.
    fn fresh_tmp(&self, key: &str) -> Result<TmpDir> {
        let tmp = self.root.join("tmp");
        self.mkdir(&tmp)?;
        let path = tmp.join(key);
        if std::fs::symlink_metadata(&path).is_ok() {
            std::fs::remove_dir_all(&path).map_err(io(&path, "cannot remove a leftover"))?;
        }
        std::fs::create_dir(&path).map_err(io(&path, "cannot create"))?;
        Ok(TmpDir { path, keep: false })
    }
}

/// Work in progress: removed on drop unless [`TmpDir::keep`] (it was renamed into place).
struct TmpDir {
    path: PathBuf,
    keep: bool,
}

impl TmpDir {
    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                tracing::warn!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// Ends a layer stream with the tar framing its writer may have left out: zeros to the
/// next 512-byte record and two zero records. umoci 0.4.7 (Debian bookworm's) writes
/// layers that stop right after the last file's data, which Go's tar reader (containerd,
/// podman, umoci itself) accepts and the tar crate does not. It is safe because the bytes
/// the tar reader gets beyond the stream are only zeros and the real stream below is
/// hashed against the config's diff_id: a layer cut short inside a file fails that check,
/// and its partial unpack is thrown away.
struct ClosedTar<R> {
    inner: R,
    read: u64,
    /// Zeros still to give after the inner EOF (`None` before it).
    tail: Option<u64>,
}

impl<R: Read> ClosedTar<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            read: 0,
            tail: None,
        }
    }
}

impl<R: Read> Read for ClosedTar<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.tail.is_none() {
            let n = self.inner.read(buf)?;
            if n > 0 || buf.is_empty() {
                self.read += n as u64;
                return Ok(n);
            }
            self.tail = Some((512 - self.read % 512) % 512 + 1024);
        }
        let left = self.tail.as_mut().expect("set above");
        let n = (*left).min(buf.len() as u64) as usize;
        buf[..n].fill(0);
        *left -= n as u64;
        Ok(n)
    }
}

/// Sniffs the compression (gzip, zstd, or a plain tar) from the first bytes instead of
/// trusting media types: docker-archive layers have none, and tools disagree on them.
fn decompress(mut r: BufReader<Box<dyn Read + Send>>, label: &str) -> Result<Box<dyn Read + Send>> {
    let head = r.fill_buf().map_err(|e| ImageError::Malformed {
        path: label.into(),
        what: format!("unreadable layer: {e}"),
    })?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(r)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let d = zstd::stream::read::Decoder::with_buffer(r).map_err(|e| ImageError::Malformed {
            path: label.into(),
            what: format!("zstd: {e}"),
        })?;
        Ok(Box::new(d))
    } else {
        Ok(Box::new(r))
    }
}

fn strip(d: &str) -> &str {
    d.strip_prefix("sha256:").unwrap_or(d)
}

fn describe(r: &ImageRecord) -> String {
    r.names
        .first()
        .cloned()
        .unwrap_or_else(|| strip(&r.id)[..12].to_owned())
}

/// A disk is stale when its image is gone or another twinbox version made it.
fn disk_is_stale(name: &str, ids: &HashSet<&str>) -> bool {
    let Some(stem) = name.strip_suffix(".ext4") else {
        return true;
    };
    let Some((id, version)) = stem.split_once('-') else {
        return true;
    };
    version != VERSION || !ids.contains(format!("sha256:{id}").as_str())
}

/// The names in a directory (none when it does not exist).
fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Allocated bytes under `path`, each inode once across calls sharing `seen`; never
/// follows symlinks.
fn du(path: &Path, seen: &mut HashSet<(u64, u64)>) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let mut total = 0;
    if seen.insert((meta.dev(), meta.ino())) {
        total += meta.blocks() * 512;
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
            total += du(&entry.path(), seen);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{add_oci_image, docker_archive, layer, require_root, E};
    use crate::ImageSpec;

    fn base() -> Vec<u8> {
        layer(&[
            E::Dir("etc/", 0o755),
            E::File(
                "etc/passwd",
                b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
                0o644,
            ),
            E::File("etc/motd", b"hello", 0o644),
            E::Dir("var/cache/", 0o755),
            E::File("var/cache/old", b"old", 0o644),
            E::File("bin/tool", b"tool", 0o755),
            E::Hard("bin/tool2", "bin/tool"),
        ])
    }

    fn top(tag: &str) -> Vec<u8> {
        layer(&[
            E::File("etc/.wh.motd", b"", 0o644),
            E::File("var/cache/.wh..wh..opq", b"", 0o644),
            E::File("var/cache/new", b"new", 0o644),
            E::File(
                "etc/passwd",
                b"root:x:0:0:root:/root:/bin/sh\napp:x:2000:2000::/srv:/bin/sh\n",
                0o644,
            ),
            E::File(&format!("tag-{tag}"), tag.as_bytes(), 0o644),
        ])
    }

    struct Setup {
        _t: tempfile::TempDir,
        layout: PathBuf,
        store: Store,
    }

    fn setup() -> Setup {
        require_root();
        let t = tempfile::tempdir().unwrap();
        let layout = t.path().join("layout");
        std::fs::create_dir(&layout).unwrap();
        add_oci_image(&layout, "a:1", &[base(), top("a")]);
        add_oci_image(&layout, "b:1", &[base(), top("b")]);
        let store = Store::new(t.path().join("cache"));
        Setup {
            _t: t,
            layout,
            store,
        }
    }

    fn spec(path: &Path, reference: &str) -> ImageSpec {
        ImageSpec {
            path: path.to_owned(),
            reference: Some(reference.to_owned()),
        }
    }

    #[test]
    fn the_cache_root_is_private_to_its_owner() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        // Made 0700, whatever the umask.
        let store = Store::new(t.path().join("new"));
        store.shared().unwrap();
        assert_eq!(mode(store.root()), 0o700);
        // An existing world-readable one (an older twinbox's) is made private.
        let old = t.path().join("old");
        std::fs::create_dir(&old).unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
        Store::new(&old).shared().unwrap();
        assert_eq!(mode(&old), 0o700);
        // A symlink in its place is refused in one line.
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&old, &link).unwrap();
        let err = Store::new(&link).shared().err().unwrap().to_string();
        assert!(
            err.contains("not a directory") && !err.contains('\n'),
            "{err}"
        );
    }

    /// No layer, disk or unfinished work in the cache.
    fn cache_is_clean(store: &Store) {
        for dir in [LAYERS, "ext4", "tmp"] {
            assert_eq!(
                dir_names(&store.root.join(dir)),
                Vec::<String>::new(),
                "{dir}"
            );
        }
    }

    #[test]
    fn a_shared_base_layer_is_stored_once() {
        let s = setup();
        let a = Image::open(&spec(&s.layout, "a:1")).unwrap();
        let b = Image::open(&spec(&s.layout, "b:1")).unwrap();
        let (la, lb) = (s.store.layers(&a).unwrap(), s.store.layers(&b).unwrap());
        assert_eq!(la.dirs[0], lb.dirs[0]);
        assert_ne!(la.dirs[1], lb.dirs[1]);
        assert_eq!(dir_names(&s.store.root.join(LAYERS)).len(), 3);
        assert_eq!(la.dirs[0], s.store.layer_dir(&Digest::of(&base())));
        assert_eq!(
            la.overlay_lowerdir().unwrap(),
            format!("{}:{}", la.dirs[1].display(), la.dirs[0].display())
        );
        let user = a.config.resolve_user(&la.dirs).unwrap();
        assert_eq!(
            (user.uid, user.gid, user.home.as_str()),
            (2000, 2000, "/srv"),
            "the top layer's passwd"
        );
        let sizes = s.store.sizes(&a).unwrap();
        assert_eq!(sizes.layer_count, 2);
        assert!(sizes.layers_bytes_on_disk > 0 && sizes.layers_bytes_in_archive > 0);
        let listing = s.store.list().unwrap();
        assert_eq!(listing.images.len(), 2);
        assert!(listing.layers.iter().any(|(_, _, uses)| *uses == 2));
    }

    #[test]
    fn several_images_need_a_reference() {
        let s = setup();
        let e = Image::open(&ImageSpec::parse(s.layout.to_str().unwrap()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("holds 2 images") && e.contains("a:1") && e.contains("b:1"),
            "{e}"
        );
        let e = Image::open(&spec(&s.layout, "c:1"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no image matches \"c:1\"") && e.contains("a:1, b:1"),
            "{e}"
        );
        let a = Image::open(&spec(&s.layout, "a:1")).unwrap();
        let by_digest = Image::open(&spec(
            &s.layout,
            &a.manifest_digest.as_ref().unwrap().to_string(),
        ))
        .unwrap();
        assert_eq!(by_digest.id, a.id);
        let by_id = Image::open(&spec(&s.layout, &a.id.hex()[..12])).unwrap();
        assert_eq!(by_id.manifest_digest, a.manifest_digest);
    }

    #[test]
    fn a_corrupt_layer_blob_is_named_and_nothing_is_left() {
        let s = setup();
        let a = Image::open(&spec(&s.layout, "a:1")).unwrap();
        let blob = s
            .layout
            .join("blobs/sha256")
            .join(a.layers[1].blob_digest.as_ref().unwrap().hex());
        let mut bytes = std::fs::read(&blob).unwrap();
        let last = bytes.len() - 9;
        bytes[last] ^= 0xff;
        std::fs::write(&blob, &bytes).unwrap();
        let e = s.store.layers(&a).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "blob {} is corrupt",
                a.layers[1].blob_digest.as_ref().unwrap()
            )),
            "{e}"
        );
        // The good base layer stays; the bad one left nothing.
        assert_eq!(
            dir_names(&s.store.root.join(LAYERS)),
            vec![a.layers[0].diff_id.hex().to_owned()]
        );
        assert_eq!(dir_names(&s.store.root.join("tmp")), Vec::<String>::new());
        bytes.truncate(100);
        std::fs::write(&blob, &bytes).unwrap();
        let e = s.store.layers(&a).unwrap_err().to_string();
        assert!(e.contains("100 bytes, the manifest says"), "{e}");
    }

    #[test]
    fn a_wrong_diff_id_is_caught_after_unpacking_into_tmp() {
        require_root();
        let t = tempfile::tempdir().unwrap();
        let tar = t.path().join("d.tar");
        // The config names `base()`, the archive holds another tar under its name.
        let config_layers = vec![base()];
        docker_archive(&tar, "x:1", &config_layers, &["layer.tar"]);
        // Rewrite with a different layer body but the same config.
        let other = layer(&[E::File("evil", b"evil", 0o644)]);
        let config = crate::testutil::config_json(&config_layers, "amd64");
        let mut b = tar::Builder::new(std::fs::File::create(&tar).unwrap());
        let config_name = format!("{}.json", Digest::of(&config).hex());
        let manifest = serde_json::json!([{"Config": config_name, "RepoTags": ["x:1"], "Layers": ["layer.tar"]}]);
        for (name, data) in [
            ("manifest.json", serde_json::to_vec(&manifest).unwrap()),
            (config_name.as_str(), config),
            ("layer.tar", other),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_path(name).unwrap();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append(&h, &data[..]).unwrap();
        }
        b.finish().unwrap();
        drop(b);
        let store = Store::new(t.path().join("cache"));
        let image = Image::open(&ImageSpec::parse(tar.to_str().unwrap())).unwrap();
        let e = store.layers(&image).unwrap_err().to_string();
        assert!(
            e.contains("blob layer.tar is corrupt") && e.contains("diff_id"),
            "{e}"
        );
        cache_is_clean(&store);
    }

    #[test]
    fn docker_archive_names_outside_the_archive_are_refused() {
        require_root();
        let t = tempfile::tempdir().unwrap();
        for name in ["../layer.tar", "/etc/passwd", "a/../../b.tar"] {
            let tar = t.path().join("d.tar");
            docker_archive(&tar, "x:1", &[base()], &[name]);
            let e = Image::open(&ImageSpec::parse(tar.to_str().unwrap()))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("outside the archive") || e.contains("absolute path"),
                "{name}: {e}"
            );
        }
    }

    #[test]
    fn missing_blobs_truncated_archives_and_other_platforms_are_one_line_errors() {
        let s = setup();
        let a = Image::open(&spec(&s.layout, "a:1")).unwrap();
        std::fs::remove_file(s.layout.join("blobs/sha256").join(a.id.hex())).unwrap();
        let e = Image::open(&spec(&s.layout, "a:1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("config {} is missing", a.id)), "{e}");

        let t = tempfile::tempdir().unwrap();
        let tar = t.path().join("d.tar");
        docker_archive(&tar, "x:1", &[base()], &["layer.tar"]);
        let bytes = std::fs::read(&tar).unwrap();
        std::fs::write(&tar, &bytes[..bytes.len() / 2]).unwrap();
        let e = Image::open(&ImageSpec::parse(tar.to_str().unwrap()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated") || e.contains("missing"), "{e}");
        assert!(!e.contains('\n'));

        let arm = t.path().join("arm");
        std::fs::create_dir(&arm).unwrap();
        add_oci_image(&arm, "arm:1", &[base()]);
        let config = crate::testutil::config_json(&[base()], "arm64");
        // Point the manifest at an arm64 config.
        let image = Image::open(&ImageSpec::parse(arm.to_str().unwrap())).unwrap();
        let manifest_path = arm
            .join("blobs/sha256")
            .join(image.manifest_digest.as_ref().unwrap().hex());
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
        let cd = Digest::of(&config);
        std::fs::write(arm.join("blobs/sha256").join(cd.hex()), &config).unwrap();
        manifest["config"] = serde_json::json!({"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": config.len()});
        let mbytes = serde_json::to_vec(&manifest).unwrap();
        let md = Digest::of(&mbytes);
        std::fs::write(arm.join("blobs/sha256").join(md.hex()), &mbytes).unwrap();
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md.to_string(), "size": mbytes.len()}]});
        std::fs::write(arm.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
        let e = Image::open(&ImageSpec::parse(arm.to_str().unwrap()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the image is linux/arm64; twinbox runs linux/amd64 only"),
            "{e}"
        );
    }

    #[test]
    fn the_same_layer_in_another_compression_is_stored_once() {
        let s = setup();
        let a = Image::open(&spec(&s.layout, "a:1")).unwrap();
        let oci = s.store.layers(&a).unwrap();
        let tar = s._t.path().join("d.tar");
        docker_archive(&tar, "a:docker", &[base(), top("a")], &["0.tar", "1.tar"]);
        let d = Image::open(&ImageSpec::parse(tar.to_str().unwrap())).unwrap();
        assert_eq!(d.id, a.id, "same config, same image id");
        let docker = s.store.layers(&d).unwrap();
        assert_eq!(oci.dirs, docker.dirs);
        assert_eq!(dir_names(&s.store.root.join(LAYERS)).len(), 2);
    }

    #[test]
    fn a_layer_without_its_final_tar_framing_unpacks_a_cut_one_does_not() {
        require_root();
        let full = layer(&[E::File("a", b"1234", 0o644), E::File("b", b"56", 0o644)]);
        // As umoci 0.4.7 writes it: the last file's data, then nothing.
        let unframed = full[..512 * 3 + 2].to_vec();
        let cut = full[..512 * 3 + 1].to_vec();
        let t = tempfile::tempdir().unwrap();
        for (name, body, ok) in [("unframed", unframed, true), ("cut", cut, false)] {
            let tar = t.path().join(format!("{name}.tar"));
            docker_archive(&tar, "x:1", &[body], &["layer.tar"]);
            let store = Store::new(t.path().join(name));
            let image = Image::open(&ImageSpec::parse(tar.to_str().unwrap())).unwrap();
            // The cut layer's diff_id is of the cut bytes: only the zero fill could hide
            // the missing byte, and the file comes out short, never zero-padded unnoticed.
            let r = store.layers(&image);
            if ok {
                let dirs = r.unwrap().dirs;
                assert_eq!(std::fs::read(dirs[0].join("b")).unwrap(), b"56");
            } else {
                let got = r.map(|l| std::fs::read(l.dirs[0].join("b")).unwrap());
                assert!(got.is_err() || got.unwrap() != b"56", "{name}");
            }
        }
    }

    #[test]
    fn concurrent_unpacks_of_one_layer_agree() {
        let s = setup();
        let dirs: Vec<Vec<PathBuf>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        let a = Image::open(&spec(&s.layout, "a:1")).unwrap();
                        s.store.layers(&a).unwrap().dirs
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(dirs.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(dir_names(&s.store.root.join(LAYERS)).len(), 2);
        assert_eq!(dir_names(&s.store.root.join("tmp")), Vec::<String>::new());
    }

    #[test]
    fn the_vm_disk_applies_whiteouts_and_opaque_dirs() {
        let s = setup();
        let a = Image::open(&spec(&s.layout, "a:1")).unwrap();
        let disk = s.store.ext4(&a).unwrap();
        assert_eq!(disk.path, s.store.disk_path(&a.id));
        let debugfs = |cmd: &str| {
            let out = std::process::Command::new("debugfs")
                .args(["-R", cmd])
                .arg(&disk.path)
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .output()
                .expect("debugfs (e2fsprogs) is installed");
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr)
        };
        assert!(debugfs("cat /etc/passwd").contains("app:x:2000"));
        assert!(debugfs("stat /etc/motd").contains("File not found"));
        assert!(debugfs("stat /var/cache/old").contains("File not found"));
        assert!(debugfs("cat /var/cache/new").starts_with("new"));
        assert!(
            !debugfs("ea_list /var/cache").contains("trusted"),
            "overlay xattrs stay out"
        );
        assert!(
            debugfs("stat /bin/tool2").contains("Links: 2"),
            "hard links kept"
        );
        // Built once: a second call reuses it.
        let mtime = std::fs::metadata(&disk.path).unwrap().modified().unwrap();
        drop(disk);
        let again = s.store.ext4(&a).unwrap();
        assert_eq!(
            std::fs::metadata(&again.path).unwrap().modified().unwrap(),
            mtime
        );
        assert_eq!(dir_names(&s.store.root.join("tmp")), Vec::<String>::new());
    }

    #[test]
    fn rm_keeps_shared_layers_and_prune_frees_the_rest() {
        let s = setup();
        let a = Image::open(&spec(&s.layout, "a:1")).unwrap();
        let b = Image::open(&spec(&s.layout, "b:1")).unwrap();
        drop(s.store.ext4(&a).unwrap());
        drop(s.store.layers(&b).unwrap());
        // A box holding the cache blocks rm and prune.
        let held = s.store.shared().unwrap();
        assert!(s.store.prune().unwrap_err().to_string().contains("in use"));
        drop(held);
        let removed = s.store.remove("a:1").unwrap();
        assert_eq!(removed.layers, vec![a.layers[1].diff_id.hex().to_owned()]);
        assert_eq!(removed.disks.len(), 1);
        assert!(
            s.store.layer_dir(&a.layers[0].diff_id).is_dir(),
            "b still uses the base"
        );
        let e = s.store.remove("a:1").unwrap_err().to_string();
        assert!(e.contains("no cached image matches"), "{e}");
        // A record gone by hand leaves orphans, which prune finds.
        std::fs::remove_file(
            s.store
                .root
                .join("refs")
                .join(format!("{}.json", b.id.hex())),
        )
        .unwrap();
        let pruned = s.store.prune().unwrap();
        assert_eq!(pruned.layers.len(), 2);
        cache_is_clean(&s.store);
    }

    #[test]
    fn rm_runs_at_once_after_a_box_lets_go_though_a_child_still_has_the_lock_open() {
        let s = setup();
        let a = Image::open(&spec(&s.layout, "a:1")).unwrap();
        drop(s.store.layers(&a).unwrap());
        let held = s.store.shared().unwrap();
        // A process with the lock's open file description, as a child forked by another
        // thread has it until its exec; `sleep` has it (as stdin) until it is killed.
        struct Killed(std::process::Child);
        impl Drop for Killed {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let _child = Killed(
            std::process::Command::new("sleep")
                .arg("60")
                .stdin(held.lock.try_clone().unwrap())
                .spawn()
                .unwrap(),
        );
        let e = s.store.remove("a:1").unwrap_err().to_string();
        assert!(e.contains("in use"), "{e}");
        drop(held);
        let removed = s.store.remove("a:1").unwrap();
        assert_eq!(removed.images, vec![a.id.to_string()]);
        cache_is_clean(&s.store);
    }

    #[test]
    fn layers_of_an_earlier_unpack_format_are_never_used_and_prune_removes_them() {
        let s = setup();
        let a = Image::open(&spec(&s.layout, "a:1")).unwrap();
        // A base layer as the format before user.overlay.opaque stored it.
        let old = s
            .store
            .root
            .join("layers/sha256")
            .join(a.layers[0].diff_id.hex());
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("stale"), b"x").unwrap();
        let layers = s.store.layers(&a).unwrap();
        assert!(layers
            .dirs
            .iter()
            .all(|d| !d.starts_with(s.store.root.join("layers/"))));
        assert!(!layers.dirs[0].join("stale").exists(), "unpacked anew");
        drop(layers);
        let pruned = s.store.prune().unwrap();
        assert!(!s.store.root.join("layers").exists());
        assert!(
            pruned.bytes > 0
                && pruned
                    .layers
                    .iter()
                    .any(|l| l.contains("earlier unpack format"))
        );
        // The current layers stay for the image that has them.
        assert!(s.store.layer_dir(&a.layers[0].diff_id).is_dir());
    }
}
