//! Opening an image: find the input's form, pick one image (tag or digest; linux/amd64),
//! and read its manifest and config, each verified against its digest and size.
//!
//! Input syntax, as `--image` takes it: `PATH[@REF]`. `PATH` is an OCI image layout
//! directory, an oci-archive or a docker-archive tar. `REF` is needed only when the input
//! holds more than one image: a tag as the tool wrote it (`busybox:1`,
//! `localhost/app:latest`; `docker.io/library/` and `localhost/` may be left out, and a
//! missing `:tag` means `:latest`), or a digest `sha256:<hex>` of the manifest or of the
//! config (the image id), or a unique prefix of at least 12 hex digits of either.

use crate::config::RunConfig;
use crate::digest::{Digest, Hashing};
use crate::error::{io, malformed, ImageError, Result};
use crate::source::{normalize, Format, Source, JSON_LIMIT};
use oci_spec::image::{
    Arch, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType, Os,
};
use serde::Deserialize;
use std::io::Read;
use std::path::{Path, PathBuf};

/// What `--image` names: an input and an optional selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// The layout directory or archive.
    pub path: PathBuf,
    /// A tag or digest choosing one image of several.
    pub reference: Option<String>,
}

impl ImageSpec {
    /// Parses `PATH[@REF]`. A path that exists as written is taken whole even if it holds
    /// an `@`; otherwise the text after the last `@` is the selector.
    pub fn parse(text: &str) -> Self {
        if !Path::new(text).exists() {
            if let Some((path, reference)) = text.rsplit_once('@') {
                if !path.is_empty() && !reference.is_empty() {
                    return Self {
                        path: path.into(),
                        reference: Some(reference.into()),
                    };
                }
            }
        }
        Self {
            path: text.into(),
            reference: None,
        }
    }
}

/// One layer of an image, as its manifest names it.
#[derive(Debug, Clone)]
pub struct Layer {
    /// sha256 of the uncompressed tar (the config's `rootfs.diff_ids`): the cache key, so
    /// the same layer in any compression is stored once.
    pub diff_id: Digest,
    /// The blob's digest when the format has one (OCI: the possibly compressed blob);
    /// docker-archive layers are verified through `diff_id` alone.
    pub blob_digest: Option<Digest>,
    /// The blob's size in the input.
    pub blob_size: u64,
    /// The member holding the blob (`blobs/sha256/<hex>`, or the docker-archive's name).
    pub(crate) member: String,
}

/// An opened, verified image: which one, its layers lowest first, and its config.
pub struct Image {
    pub(crate) source: Source,
    /// sha256 of the config, which names every layer by content: the image's identity
    /// whatever archive form or compression carried it (as `docker images` shows it).
    pub id: Digest,
    /// The manifest's digest (OCI forms; a docker-archive has no manifest blob).
    pub manifest_digest: Option<Digest>,
    /// The names the input gives this image (tags, ref names).
    pub names: Vec<String>,
    /// Layers, lowest first.
    pub layers: Vec<Layer>,
    /// The run settings of the config.
    pub config: RunConfig,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("source", &self.source.path())
            .field("id", &self.id)
            .field("names", &self.names)
            .field("layers", &self.layers.len())
            .finish()
    }
}

impl Image {
    /// Opens the image `spec` names, verifying index → manifest → config. Layers are
    /// verified when they are unpacked ([`crate::Store::layers`]).
    pub fn open(spec: &ImageSpec) -> Result<Self> {
        let source = Source::open(&spec.path)?;
        match source.format() {
            Format::OciLayout | Format::OciArchive => open_oci(source, spec.reference.as_deref()),
            Format::DockerArchive => open_docker(source, spec.reference.as_deref()),
        }
    }

    /// The input this image came from.
    pub fn source_path(&self) -> &Path {
        self.source.path()
    }

    /// The input's form.
    pub fn format(&self) -> Format {
        self.source.format()
    }

    /// Bytes of the layer blobs in the input (compressed as stored).
    pub fn archive_layer_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.blob_size).sum()
    }

    /// The best name for messages: the first tag, else the short id.
    pub fn display_name(&self) -> String {
        self.names
            .first()
            .cloned()
            .unwrap_or_else(|| self.id.short().to_owned())
    }

    /// Opens a layer's blob for reading.
    ///
    /// Reads stop one byte past the size the manifest gives, so a blob that is longer
    /// (or a layout entry that is a symlink to an endless device) fails the size check
    /// instead of being read forever.
    pub(crate) fn read_layer(&self, layer: &Layer) -> Result<Box<dyn Read + Send>> {
        Ok(Box::new(
            self.source.read(&layer.member)?.take(layer.blob_size + 1),
        ))
    }
}

/// Reads a blob named by a descriptor whole, checking size and digest.
fn read_verified(source: &Source, digest: &Digest, size: u64, what: &str) -> Result<Vec<u8>> {
    if size > JSON_LIMIT {
        return Err(malformed(
            source.path(),
            format!("{what} {digest} claims {size} bytes, more than any image JSON"),
        ));
    }
    let member = format!("blobs/sha256/{}", digest.hex());
    if source.size(&member).is_none() {
        return Err(malformed(
            source.path(),
            format!("{what} {digest} is missing (no {member})"),
        ));
    }
    let mut reader = Hashing::new(source.read(&member)?.take(size + 1));
    let mut bytes = Vec::new();
    reader
        .read_to_end(&mut bytes)
        .map_err(io(source.path().join(&member), "cannot read"))?;
    let (actual, n) = reader
        .finish()
        .map_err(io(source.path().join(&member), "cannot read"))?;
    if n != size {
        return Err(corrupt(
            source,
            digest,
            format!("{n} bytes, the descriptor says {size}"),
        ));
    }
    if &actual != digest {
        return Err(corrupt(
            source,
            digest,
            format!("its content hashes to {actual}"),
        ));
    }
    Ok(bytes)
}

pub(crate) fn corrupt(source: &Source, digest: &Digest, what: String) -> ImageError {
    ImageError::Corrupt {
        path: source.path().to_owned(),
        digest: digest.to_string(),
        what,
    }
}

fn descriptor_digest(source: &Source, d: &Descriptor) -> Result<Digest> {
    Digest::parse(d.digest().as_ref()).ok_or_else(|| {
        malformed(
            source.path(),
            format!("unsupported digest {} (only sha256)", d.digest()),
        )
    })
}

fn is_index(m: &MediaType) -> bool {
    matches!(m, MediaType::ImageIndex)
        || m.to_string() == "application/vnd.docker.distribution.manifest.list.v2+json"
}

fn is_manifest(m: &MediaType) -> bool {
    matches!(m, MediaType::ImageManifest)
        || m.to_string() == "application/vnd.docker.distribution.manifest.v2+json"
}

/// A manifest found through the index, with the names that lead to it.
struct Candidate {
    manifest: Digest,
    size: u64,
    names: Vec<String>,
}

fn open_oci(source: Source, reference: Option<&str>) -> Result<Image> {
    let bytes = source.read_json_bytes("index.json")?;
    let index: ImageIndex = serde_json::from_slice(&bytes)
        .map_err(|e| malformed(source.path(), format!("index.json: {e}")))?;
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut other_platforms = Vec::new();
    for d in index.manifests() {
        let names = ref_names(d);
        collect(&source, d, names, 0, &mut candidates, &mut other_platforms)?;
    }
    // The same manifest under two tags is one image.
    let mut merged: Vec<Candidate> = Vec::new();
    for c in candidates {
        match merged.iter_mut().find(|m| m.manifest == c.manifest) {
            Some(m) => m.names.extend(c.names),
            None => merged.push(c),
        }
    }
    if merged.is_empty() {
        let what = if other_platforms.is_empty() {
            "holds no image manifest".to_owned()
        } else {
            format!(
                "holds no linux/amd64 image (twinbox runs linux/amd64 only); it has {}",
                other_platforms.join(", ")
            )
        };
        return Err(ImageError::Platform {
            path: source.path().to_owned(),
            what,
        });
    }
    let chosen = choose(
        &source,
        merged,
        reference,
        |c| (&c.names, vec![c.manifest.clone()]),
        |c| {
            // A config digest (image id) selects too: read each manifest to learn it.
            read_manifest(&source, &c.manifest, c.size)
                .ok()
                .map(|m| m.config().digest().to_string())
        },
    )?;
    let manifest = read_manifest(&source, &chosen.manifest, chosen.size)?;
    let config_digest = descriptor_digest(&source, manifest.config())?;
    let config_bytes = read_verified(&source, &config_digest, manifest.config().size(), "config")?;
    let (config, diff_ids) = parse_config(&source, &config_bytes)?;
    if diff_ids.len() != manifest.layers().len() {
        return Err(malformed(
            source.path(),
            format!(
                "manifest {} has {} layers, its config {} diff_ids",
                chosen.manifest,
                manifest.layers().len(),
                diff_ids.len()
            ),
        ));
    }
    let mut layers = Vec::new();
    for (d, diff_id) in manifest.layers().iter().zip(diff_ids) {
        let media = d.media_type().to_string();
        if !media.contains("tar") {
            return Err(malformed(
                source.path(),
                format!(
                    "layer {} has media type {media}, not a tar layer",
                    d.digest()
                ),
            ));
        }
        let digest = descriptor_digest(&source, d)?;
        let member = format!("blobs/sha256/{}", digest.hex());
        layers.push(Layer {
            diff_id,
            blob_digest: Some(digest),
            blob_size: d.size(),
            member,
        });
    }
    let mut names = chosen.names;
    names.dedup();
    Ok(Image {
        source,
        id: config_digest,
        manifest_digest: Some(chosen.manifest),
        names,
        layers,
        config,
    })
}

/// The names an index entry gives its image.
fn ref_names(d: &Descriptor) -> Vec<String> {
    let mut names = Vec::new();
    if let Some(a) = d.annotations() {
        // containerd/docker write the full name beside the OCI ref name (often just a tag).
        for key in [
            "io.containerd.image.name",
            "org.opencontainers.image.ref.name",
        ] {
            if let Some(v) = a.get(key) {
                if !names.contains(v) {
                    names.push(v.clone());
                }
            }
        }
    }
    names
}

/// Follows an index entry down to image manifests for linux/amd64.
fn collect(
    source: &Source,
    d: &Descriptor,
    names: Vec<String>,
    depth: u32,
    out: &mut Vec<Candidate>,
    other_platforms: &mut Vec<String>,
) -> Result<()> {
    if let Some(p) = d.platform() {
        if !(*p.os() == Os::Linux && *p.architecture() == Arch::Amd64) {
            let name = format!("{}/{}", p.os(), p.architecture());
            if !other_platforms.contains(&name) {
                other_platforms.push(name);
            }
            return Ok(());
        }
    }
    let digest = descriptor_digest(source, d)?;
    if is_index(d.media_type()) {
        if depth >= 4 {
            return Err(malformed(
                source.path(),
                format!("index {digest} nests deeper than 4 levels"),
            ));
        }
        let bytes = read_verified(source, &digest, d.size(), "index")?;
        let index: ImageIndex = serde_json::from_slice(&bytes)
            .map_err(|e| malformed(source.path(), format!("index {digest}: {e}")))?;
        for inner in index.manifests() {
            collect(
                source,
                inner,
                names.clone(),
                depth + 1,
                out,
                other_platforms,
            )?;
        }
    } else if is_manifest(d.media_type()) {
        out.push(Candidate {
            manifest: digest,
            size: d.size(),
            names,
        });
    }
    // Anything else (attestations, artifacts) is not an image.
    Ok(())
}

fn read_manifest(source: &Source, digest: &Digest, size: u64) -> Result<ImageManifest> {
    let bytes = read_verified(source, digest, size, "manifest")?;
    serde_json::from_slice(&bytes)
        .map_err(|e| malformed(source.path(), format!("manifest {digest}: {e}")))
}

/// Parses a config and checks its platform; returns the run settings and the diff_ids.
fn parse_config(source: &Source, bytes: &[u8]) -> Result<(RunConfig, Vec<Digest>)> {
    let config: ImageConfiguration = serde_json::from_slice(bytes)
        .map_err(|e| malformed(source.path(), format!("image config: {e}")))?;
    if !(*config.os() == Os::Linux && *config.architecture() == Arch::Amd64) {
        return Err(ImageError::Platform {
            path: source.path().to_owned(),
            what: format!(
                "the image is {}/{}; twinbox runs linux/amd64 only",
                config.os(),
                config.architecture()
            ),
        });
    }
    let diff_ids = config
        .rootfs()
        .diff_ids()
        .iter()
        .map(|d| {
            Digest::parse(d).ok_or_else(|| {
                malformed(
                    source.path(),
                    format!("image config: unsupported diff_id {d}"),
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((RunConfig::from_oci(config.config().as_ref()), diff_ids))
}

/// One entry of a docker-archive's manifest.json.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn open_docker(source: Source, reference: Option<&str>) -> Result<Image> {
    let bytes = source.read_json_bytes("manifest.json")?;
    let entries: Vec<DockerEntry> = serde_json::from_slice(&bytes)
        .map_err(|e| malformed(source.path(), format!("manifest.json: {e}")))?;
    // Digests are known only once each config is hashed; configs are small.
    let mut candidates = Vec::new();
    for e in entries {
        let config_member = member_name(&source, &e.config)?;
        let config_bytes = source.read_json_bytes(&config_member)?;
        let id = Digest::of(&config_bytes);
        // The config's file name is its digest in every writer (`<hex>.json`,
        // `blobs/sha256/<hex>`): a mismatch is a corrupt config.
        let stem = config_member.rsplit('/').next().unwrap_or_default();
        if let Some(named) = Digest::from_hex(stem.strip_suffix(".json").unwrap_or(stem)) {
            if named != id {
                return Err(corrupt(
                    &source,
                    &named,
                    format!("config {config_member} hashes to {id}"),
                ));
            }
        }
        candidates.push((e, config_member, config_bytes, id));
    }
    if candidates.is_empty() {
        return Err(malformed(source.path(), "manifest.json lists no image"));
    }
    let (entry, _member, config_bytes, id) = choose(
        &source,
        candidates,
        reference,
        |(e, _, _, id)| (e.repo_tags.as_ref().unwrap_or(&EMPTY), vec![id.clone()]),
        |_| None,
    )?;
    let (config, diff_ids) = parse_config(&source, &config_bytes)?;
    if diff_ids.len() != entry.layers.len() {
        return Err(malformed(
            source.path(),
            format!(
                "manifest.json lists {} layers, the config {} diff_ids",
                entry.layers.len(),
                diff_ids.len()
            ),
        ));
    }
    let mut layers = Vec::new();
    for (name, diff_id) in entry.layers.iter().zip(diff_ids) {
        let member = member_name(&source, name)?;
        let blob_size = source
            .size(&member)
            .ok_or_else(|| malformed(source.path(), format!("layer {member} is missing")))?;
        layers.push(Layer {
            diff_id,
            blob_digest: None,
            blob_size,
            member,
        });
    }
    Ok(Image {
        source,
        id,
        manifest_digest: None,
        names: entry.repo_tags.unwrap_or_default(),
        layers,
        config,
    })
}

static EMPTY: Vec<String> = Vec::new();

/// A file name from manifest.json, which the archive's author chose: never absolute,
/// never with `..`.
fn member_name(source: &Source, name: &str) -> Result<String> {
    if name.starts_with('/') {
        return Err(ImageError::Unsafe {
            path: source.path().to_owned(),
            what: format!("manifest.json names an absolute path {name:?}"),
        });
    }
    normalize(name).ok_or_else(|| ImageError::Unsafe {
        path: source.path().to_owned(),
        what: format!("manifest.json names {name:?}, outside the archive"),
    })
}

/// Picks one candidate: by reference when given, else the only one.
fn choose<C>(
    source: &Source,
    candidates: Vec<C>,
    reference: Option<&str>,
    keys: impl Fn(&C) -> (&Vec<String>, Vec<Digest>),
    extra_digest: impl Fn(&C) -> Option<String>,
) -> Result<C> {
    let describe = |c: &C| {
        let (names, digests) = keys(c);
        match names.first() {
            Some(n) => n.clone(),
            None => digests.first().map(|d| d.to_string()).unwrap_or_default(),
        }
    };
    let choices = || {
        candidates
            .iter()
            .map(describe)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(reference) = reference else {
        if candidates.len() == 1 {
            return Ok(candidates.into_iter().next().expect("one candidate"));
        }
        return Err(ImageError::Selection {
            path: source.path().to_owned(),
            what: format!(
                "holds {} images; pick one with PATH@REF: {}",
                candidates.len(),
                choices()
            ),
        });
    };
    let by_name: Vec<usize> = (0..candidates.len())
        .filter(|&i| {
            keys(&candidates[i])
                .0
                .iter()
                .any(|n| name_matches(reference, n))
        })
        .collect();
    let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
    let is_hex = hex.len() >= 12 && hex.len() <= 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    let matched = if !by_name.is_empty() || !is_hex {
        by_name
    } else {
        let hex = hex.to_ascii_lowercase();
        (0..candidates.len())
            .filter(|&i| {
                let c = &candidates[i];
                keys(c).1.iter().any(|d| d.hex().starts_with(&hex))
                    || extra_digest(c)
                        .is_some_and(|d| d.strip_prefix("sha256:").unwrap_or(&d).starts_with(&hex))
            })
            .collect()
    };
    match matched.len() {
        1 => Ok(candidates
            .into_iter()
            .nth(matched[0])
            .expect("index in range")),
        0 => Err(ImageError::Selection {
            path: source.path().to_owned(),
            what: format!("no image matches {reference:?}; it holds: {}", choices()),
        }),
        _ => Err(ImageError::Selection {
            path: source.path().to_owned(),
            what: format!(
                "{reference:?} matches {} images: {}",
                matched.len(),
                matched
                    .iter()
                    .map(|&i| describe(&candidates[i]))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// Whether a user's reference names a tag as a tool wrote it.
pub(crate) fn name_matches(reference: &str, name: &str) -> bool {
    reference == name || canonical(reference) == canonical(name)
}

/// `docker.io/library/busybox:latest`, `localhost/busybox` and `busybox` are one name.
fn canonical(name: &str) -> String {
    let mut n = name;
    for prefix in [
        "docker.io/library/",
        "index.docker.io/library/",
        "docker.io/",
        "localhost/",
    ] {
        if let Some(rest) = n.strip_prefix(prefix) {
            n = rest;
            break;
        }
    }
    let last = n.rsplit('/').next().unwrap_or(n);
    if last.contains(':') || last.contains('@') {
        n.to_owned()
    } else {
        format!("{n}:latest")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_splits_at_the_last_at_sign_unless_the_path_exists() {
        let s = ImageSpec::parse("/nonexistent/x.tar@app:1");
        assert_eq!(s.path, PathBuf::from("/nonexistent/x.tar"));
        assert_eq!(s.reference.as_deref(), Some("app:1"));
        let s = ImageSpec::parse("/nonexistent/x.tar");
        assert_eq!(s.reference, None);
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("a@b");
        std::fs::write(&odd, b"").unwrap();
        let s = ImageSpec::parse(odd.to_str().unwrap());
        assert_eq!(s.path, odd);
        assert_eq!(s.reference, None);
    }

    #[test]
    fn names_match_as_docker_shortens_them() {
        assert!(name_matches("busybox", "docker.io/library/busybox:latest"));
        assert!(name_matches("app:1", "localhost/app:1"));
        assert!(name_matches("1", "1"));
        assert!(!name_matches("app:2", "localhost/app:1"));
        assert!(!name_matches("other", "localhost/app:latest"));
    }
}
