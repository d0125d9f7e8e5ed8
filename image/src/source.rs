//! Where an image's files come from: a directory (an OCI image layout, or an unpacked
//! docker-archive) or a tar archive (oci-archive, docker-archive). An archive is indexed
//! once — each member's offset and size — and read in place, so a multi-GB archive is never
//! copied before its blobs are verified and unpacked.

use crate::error::{io, malformed, ImageError, Result};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// JSON files (index, manifests, configs) larger than this are refused: real ones are a few
/// KiB, and a hostile one must not make twinbox allocate without bound.
pub(crate) const JSON_LIMIT: u64 = 16 << 20;

/// The three input forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A directory with `oci-layout`, `index.json` and `blobs/`.
    OciLayout,
    /// An OCI image layout in a tar (`skopeo copy ... oci-archive:`, `buildah push`).
    OciArchive,
    /// `docker save` / `podman save`: `manifest.json`, config JSON, layer tars.
    DockerArchive,
}

impl Format {
    /// The name users know the form by.
    pub fn name(self) -> &'static str {
        match self {
            Format::OciLayout => "oci layout",
            Format::OciArchive => "oci-archive",
            Format::DockerArchive => "docker-archive",
        }
    }
}

/// An opened input.
pub(crate) struct Source {
    path: PathBuf,
    format: Format,
    /// `None` for a directory; for an archive, member name → (data offset, size).
    members: Option<HashMap<String, (u64, u64)>>,
}

impl Source {
    /// Opens `path` and finds out which form it is.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(io(path, "cannot open image"))?;
        let members = if meta.is_dir() {
            None
        } else {
            Some(index_archive(path)?)
        };
        let has = |name: &str| match &members {
            None => path.join(name).is_file(),
            Some(m) => m.contains_key(name),
        };
        // docker save since 25 writes both an OCI layout and manifest.json; the OCI side
        // carries digests for every blob, so it wins.
        let format = if has("oci-layout") && has("index.json") {
            if members.is_some() {
                Format::OciArchive
            } else {
                Format::OciLayout
            }
        } else if has("manifest.json") {
            Format::DockerArchive
        } else {
            let why = if meta.is_dir() {
                "no oci-layout + index.json, no manifest.json"
            } else {
                "a tar without oci-layout + index.json or manifest.json"
            };
            return Err(ImageError::UnknownFormat(path.to_owned(), why.into()));
        };
        Ok(Self {
            path: path.to_owned(),
            format,
            members,
        })
    }

    /// The input's path, for messages.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Which form the input is.
    pub(crate) fn format(&self) -> Format {
        self.format
    }

    /// The size of a member, `None` when it is missing.
    pub(crate) fn size(&self, name: &str) -> Option<u64> {
        match &self.members {
            None => std::fs::metadata(self.path.join(name))
                .ok()
                .filter(|m| m.is_file())
                .map(|m| m.len()),
            Some(m) => m.get(name).map(|&(_, size)| size),
        }
    }

    /// Opens a member for reading. `name` must come from [`normalize`] or a [`Digest`]:
    /// it never holds `..`.
    ///
    /// [`Digest`]: crate::Digest
    pub(crate) fn read(&self, name: &str) -> Result<Box<dyn Read + Send>> {
        let missing = || malformed(&self.path, format!("{name} is missing"));
        match &self.members {
            None => {
                let p = self.path.join(name);
                if !p.is_file() {
                    return Err(missing());
                }
                Ok(Box::new(File::open(&p).map_err(io(p, "cannot open"))?))
            }
            Some(m) => {
                let &(offset, size) = m.get(name).ok_or_else(missing)?;
                let mut f = File::open(&self.path).map_err(io(&self.path, "cannot open"))?;
                f.seek(SeekFrom::Start(offset))
                    .map_err(io(&self.path, "cannot seek"))?;
                Ok(Box::new(f.take(size)))
            }
        }
    }

    /// Reads a small member (JSON) whole.
    pub(crate) fn read_json_bytes(&self, name: &str) -> Result<Vec<u8>> {
        if let Some(size) = self.size(name) {
            if size > JSON_LIMIT {
                return Err(malformed(
                    &self.path,
                    format!("{name} is {size} bytes, more than any image JSON ({JSON_LIMIT})"),
                ));
            }
        }
        let mut bytes = Vec::new();
        self.read(name)?
            .take(JSON_LIMIT + 1)
            .read_to_end(&mut bytes)
            .map_err(io(self.path.join(name), "cannot read"))?;
        Ok(bytes)
    }
}

/// A member path as stored in the index: no leading `/` or `./`, no `.` components, `/`
/// separated. `None` when it holds `..` (such a member can never be asked for) or is empty.
pub(crate) fn normalize(name: &str) -> Option<String> {
    let mut parts = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            p => parts.push(p),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Scans the archive's headers once (seeking over the data) and records where each
/// regular member's data lies. A truncated archive fails here, before anything is unpacked.
fn index_archive(path: &Path) -> Result<HashMap<String, (u64, u64)>> {
    let file = File::open(path).map_err(io(path, "cannot open image"))?;
    let mut magic = [0u8; 4];
    let n = (&file).read(&mut magic).map_err(io(path, "cannot read"))?;
    if n >= 2 && magic[..2] == [0x1f, 0x8b] || n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        return Err(ImageError::UnknownFormat(
            path.to_owned(),
            "a compressed archive: decompress it first (gunzip/unzstd)".into(),
        ));
    }
    (&file)
        .seek(SeekFrom::Start(0))
        .map_err(io(path, "cannot seek"))?;
    let len = file.metadata().map_err(io(path, "cannot stat"))?.len();
    let mut archive = tar::Archive::new(file);
    let bad = |e: std::io::Error| {
        ImageError::UnknownFormat(path.to_owned(), format!("not a readable tar archive: {e}"))
    };
    let mut members = HashMap::new();
    for entry in archive.entries_with_seek().map_err(bad)? {
        let entry = entry.map_err(bad)?;
        let offset = entry.raw_file_position();
        let size = entry.size();
        if offset.saturating_add(size) > len {
            return Err(ImageError::UnknownFormat(
                path.to_owned(),
                "truncated archive (a member ends past the end of the file)".into(),
            ));
        }
        if entry.header().entry_type().is_file() {
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            if let Some(name) = normalize(&name) {
                members.insert(name, (offset, size));
            }
        }
    }
    if members.is_empty() {
        return Err(ImageError::UnknownFormat(
            path.to_owned(),
            "an empty or unreadable tar archive".into(),
        ));
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_strips_dots_and_refuses_parent() {
        assert_eq!(
            normalize("./blobs/sha256/x").as_deref(),
            Some("blobs/sha256/x")
        );
        assert_eq!(
            normalize("/manifest.json").as_deref(),
            Some("manifest.json")
        );
        assert_eq!(normalize("a//b/./c").as_deref(), Some("a/b/c"));
        assert_eq!(normalize("../etc/passwd"), None);
        assert_eq!(normalize("a/../../b"), None);
        assert_eq!(normalize("./"), None);
    }
}
