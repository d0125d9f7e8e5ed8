//! Test helpers: layer tars built entry by entry (including the malformed ones a hostile
//! image would hold, which the tar crate's own setters refuse to write), and OCI layouts
//! and docker-archives built from them.

use crate::digest::Digest;
use flate2::write::GzEncoder;
use std::io::Write;
use std::path::Path;
use tar::{EntryType, Header};

/// One entry of a test layer.
pub(crate) enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, &'a [u8], u32),
    /// A file with owner and PAX xattrs.
    FileX(
        &'a str,
        &'a [u8],
        u32,
        (u64, u64),
        &'a [(&'a str, &'a [u8])],
    ),
    Sym(&'a str, &'a str),
    Hard(&'a str, &'a str),
    Node(&'a str, EntryType, u32, u32),
}

/// Must run as root: unpacking chowns, makes device nodes and sets trusted xattrs.
pub(crate) fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (unpacking chowns, makes device nodes, sets trusted.* xattrs)"
    );
}

fn header(path: &str, kind: EntryType, mode: u32, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_600_000_000);
    h.set_uid(0);
    h.set_gid(0);
    // Raw name bytes: `set_path` refuses `..`, and hostile layers are what we test.
    let name = &mut h.as_old_mut().name;
    name.fill(0);
    name[..path.len()].copy_from_slice(path.as_bytes());
    h
}

/// Builds an uncompressed layer tar.
pub(crate) fn layer(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match *e {
            E::Dir(p, mode) => {
                let mut h = header(p, EntryType::Directory, mode, 0);
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::File(p, data, mode) => {
                let mut h = header(p, EntryType::Regular, mode, data.len() as u64);
                h.set_cksum();
                b.append(&h, data).unwrap();
            }
            E::FileX(p, data, mode, (uid, gid), xattrs) => {
                let pax: Vec<(String, &[u8])> = xattrs
                    .iter()
                    .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
                    .collect();
                b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), *v)))
                    .unwrap();
                let mut h = header(p, EntryType::Regular, mode, data.len() as u64);
                h.set_uid(uid);
                h.set_gid(gid);
                h.set_cksum();
                b.append(&h, data).unwrap();
            }
            E::Sym(p, target) | E::Hard(p, target) => {
                let kind = if matches!(e, E::Sym(..)) {
                    EntryType::Symlink
                } else {
                    EntryType::Link
                };
                let mut h = header(p, kind, 0o777, 0);
                h.set_link_name_literal(target).unwrap();
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::Node(p, kind, major, minor) => {
                let mut h = header(p, kind, 0o620, 0);
                h.set_device_major(major).unwrap();
                h.set_device_minor(minor).unwrap();
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Writes a blob into an OCI layout and returns its descriptor JSON.
fn put_blob(dir: &Path, media: &str, bytes: &[u8]) -> serde_json::Value {
    let d = Digest::of(bytes);
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("blobs/sha256").join(d.hex()), bytes).unwrap();
    serde_json::json!({"mediaType": media, "digest": d.to_string(), "size": bytes.len()})
}

/// An image config for layers with these uncompressed tars.
pub(crate) fn config_json(layers: &[Vec<u8>], arch: &str) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|l| Digest::of(l).to_string()).collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": arch, "os": "linux",
        "config": {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"], "Env": ["A=1"],
                   "WorkingDir": "/srv", "User": "app"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    }))
    .unwrap()
}

/// Adds an image (layers gzipped) to the OCI layout `dir` under `tag`; returns the
/// manifest's descriptor.
pub(crate) fn add_oci_image(dir: &Path, tag: &str, layers: &[Vec<u8>]) -> serde_json::Value {
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let config = put_blob(
        dir,
        "application/vnd.oci.image.config.v1+json",
        &config_json(layers, "amd64"),
    );
    let layer_descs: Vec<_> = layers
        .iter()
        .map(|l| put_blob(dir, "application/vnd.oci.image.layer.v1.tar+gzip", &gzip(l)))
        .collect();
    let manifest = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config, "layers": layer_descs});
    let mut desc = put_blob(
        dir,
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    let index_path = dir.join("index.json");
    let mut index: serde_json::Value = std::fs::read(&index_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({"schemaVersion": 2, "manifests": []}));
    index["manifests"]
        .as_array_mut()
        .unwrap()
        .push(desc.clone());
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    desc
}

/// Writes a docker-archive tar at `path` with one image; `layer_names` are the names
/// manifest.json gives the layers (hostile ones included).
pub(crate) fn docker_archive(path: &Path, tag: &str, layers: &[Vec<u8>], layer_names: &[&str]) {
    let config = config_json(layers, "amd64");
    let config_name = format!("{}.json", Digest::of(&config).hex());
    let manifest =
        serde_json::json!([{"Config": config_name, "RepoTags": [tag], "Layers": layer_names}]);
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = header(name, EntryType::Regular, 0o444, data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    add(&config_name, &config);
    for (l, name) in layers.iter().zip(layer_names) {
        add(name, l);
    }
    b.finish().unwrap();
}
