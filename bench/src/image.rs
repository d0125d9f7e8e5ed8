//! `twinbox bench --image PATH[@REF]`: twinbox's container and VM run the scenarios'
//! workloads from an OCI/Docker image instead of the built-in one, as `ctr run --image`
//! and `vm run --image` do — the container over the image's layers (overlayfs lower
//! directories from the cache), the VM from the ext4 built from them. Every other box
//! (native, the peers) runs something else than the image, so it sits out; a scenario
//! whose program the image lacks is not run, with that reason.
//!
//! The image's config (Entrypoint, Env, User) is not applied: a scenario's workload is its
//! own command, run as root, the same in both boxes, as with the built-in image.

use crate::results::ImageUsed;
use crate::runner::{self, Runner};
use std::path::{Path, PathBuf};
use twinbox_image::{Ext4Disk, Image, ImageSizes, ImageSpec, Layers, Store};
use twinbox_spec::{RunReport, RunSpec};

/// The image of a bench: its layers (for the container) and its disk (for the VM), held in
/// the cache (its shared lock) until the bench ends.
pub struct BenchImage {
    /// What results.json records of it.
    pub used: ImageUsed,
    /// The input it came from (named in the container's messages).
    source: PathBuf,
    /// The unpacked layers, lowest first.
    layers: Layers,
    /// The VM's disk, when the VM box is in the bench.
    disk: Option<Ext4Disk>,
    /// Sizes in the cache, for the report's claims.
    pub sizes: ImageSizes,
}

impl BenchImage {
    /// Opens, verifies and unpacks `reference` (`PATH[@REF]`), and builds its VM disk when
    /// `with_disk`. The error is one line naming the image.
    pub fn open(reference: &str, with_disk: bool) -> Result<Self, String> {
        let fail = |e: twinbox_image::ImageError| format!("--image {reference}: {e}");
        let image = Image::open(&ImageSpec::parse(reference)).map_err(fail)?;
        let store = Store::default_location();
        let (layers, disk) = if with_disk {
            let disk = store.ext4(&image).map_err(fail)?;
            (store.layers(&image).map_err(fail)?, Some(disk))
        } else {
            (store.layers(&image).map_err(fail)?, None)
        };
        let sizes = store.sizes(&image).map_err(fail)?;
        Ok(Self {
            used: ImageUsed {
                reference: reference.to_owned(),
                name: image.display_name(),
                id: image.id.to_string(),
                manifest_digest: image.manifest_digest.as_ref().map(ToString::to_string),
            },
            source: image.source_path().to_owned(),
            layers,
            disk,
            sizes,
        })
    }

    /// The VM's root disk, when built.
    pub fn disk(&self) -> Option<&Path> {
        self.disk.as_ref().map(|d| d.path.as_path())
    }

    /// Why a scenario with `workload` cannot run from the image: its program is not in it
    /// (a path as it is, a bare name in the default PATH, the image's symlinks followed).
    pub fn lacks(&self, workload: &[String]) -> Option<String> {
        let program = workload.first()?;
        match twinbox_image::find_program(&self.layers.dirs, program) {
            Ok(Some(_)) => None,
            Ok(None) => Some(format!("the image {} has no {program}", self.used.name)),
            Err(e) => Some(format!("cannot look for {program} in the image: {e}")),
        }
    }

    /// Whether `box_name` runs from the image (twinbox's container and VM).
    pub fn runs_in(box_name: &str) -> bool {
        box_name == runner::container::NAME || box_name == runner::vm::NAME
    }

    /// `runner` running from the image: the container on its layers, the VM on its disk.
    /// Other boxes come back unchanged (they sit out, see [`BenchImage::runs_in`]).
    pub fn wrap(&self, runner: Box<dyn Runner>) -> Box<dyn Runner> {
        let root = match runner.name() {
            runner::container::NAME => Root::Layers {
                source: self.source.clone(),
                dirs: self.layers.dirs.clone(),
            },
            runner::vm::NAME => match self.disk() {
                Some(disk) => Root::Disk(disk.to_owned()),
                None => return runner,
            },
            _ => return runner,
        };
        Box::new(OnImage {
            inner: runner,
            root,
        })
    }
}

/// Where a wrapped box takes its root from.
enum Root {
    /// overlayfs over the layers; `source` names the image in messages.
    Layers { source: PathBuf, dirs: Vec<PathBuf> },
    /// The ext4 built from the layers.
    Disk(PathBuf),
}

/// A box whose runs take their root from the image.
struct OnImage {
    inner: Box<dyn Runner>,
    root: Root,
}

impl OnImage {
    fn rooted(&self, spec: &RunSpec) -> RunSpec {
        let mut spec = spec.clone();
        match &self.root {
            Root::Layers { source, dirs } => {
                spec.rootfs = source.clone();
                spec.rootfs_layers = Some(dirs.clone());
            }
            Root::Disk(disk) => spec.rootfs = disk.clone(),
        }
        spec
    }
}

impl Runner for OnImage {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn capabilities(&self) -> runner::Capabilities {
        self.inner.capabilities()
    }

    fn run(&self, spec: &RunSpec) -> Result<RunReport, String> {
        self.inner.run(&self.rooted(spec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A box that returns the spec it was given, as its output.
    struct Echo(&'static str);

    impl Runner for Echo {
        fn name(&self) -> &str {
            self.0
        }
        fn capabilities(&self) -> runner::Capabilities {
            runner::container::CAPABILITIES
        }
        fn run(&self, spec: &RunSpec) -> Result<RunReport, String> {
            Err(format!(
                "{} {:?}",
                spec.rootfs.display(),
                spec.rootfs_layers
            ))
        }
    }

    #[test]
    fn the_container_runs_on_the_layers_and_the_vm_on_the_disk() {
        let spec = RunSpec::new("/builtin.ext4", vec!["/bin/true".into()]);
        let layers = OnImage {
            inner: Box::new(Echo("container")),
            root: Root::Layers {
                source: "/app.tar".into(),
                dirs: vec!["/c/l/0".into(), "/c/l/1".into()],
            },
        };
        assert_eq!(
            layers.run(&spec).unwrap_err(),
            r#"/app.tar Some(["/c/l/0", "/c/l/1"])"#
        );
        let disk = OnImage {
            inner: Box::new(Echo("vm")),
            root: Root::Disk("/c/ext4/app.ext4".into()),
        };
        assert_eq!(disk.run(&spec).unwrap_err(), "/c/ext4/app.ext4 None");
        assert_eq!(disk.name(), "vm");
        assert!(BenchImage::runs_in("container") && BenchImage::runs_in("vm"));
        assert!(!BenchImage::runs_in("native") && !BenchImage::runs_in("runc"));
    }
}
