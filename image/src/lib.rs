//! OCI and Docker images for both boxes (issue 15): open an image from an OCI layout, an
//! oci-archive or a docker-archive, verify every blob against its digest, unpack each
//! layer once into a content-addressed cache in overlayfs form, and build the VM's ext4.
//!
//! The calls a box makes:
//! ```no_run
//! use twinbox_image::{Image, ImageSpec, Store};
//! # fn main() -> Result<(), twinbox_image::ImageError> {
//! let image = Image::open(&ImageSpec::parse("app.tar@app:1"))?;
//! let store = Store::default_location();
//! // Container: overlayfs over the layers (keep `layers` alive while the box runs).
//! let layers = store.layers(&image)?;
//! let lowerdir = layers.overlay_lowerdir()?;
//! // VM: one ext4 built from the layers, cached by image id and twinbox version.
//! let disk = store.ext4(&image)?;
//! // Both: what to run, as `docker run` does.
//! let argv = image.config.command(&[]);
//! let env = image.config.env(&["DEBUG=1".to_string()]);
//! let user = image.config.resolve_user(&layers.dirs)?;
//! # let _ = (lowerdir, disk, argv, env, user); Ok(()) }
//! ```

mod config;
mod digest;
mod error;
mod ext4;
mod fsat;
mod merged;
mod open;
mod source;
mod store;
#[cfg(test)]
mod testutil;
mod unpack;

pub use config::{read_merged, resolve_user, ResolvedUser, RunConfig, DEFAULT_PATH};
pub use digest::Digest;
pub use error::{ImageError, Result};
pub use merged::{find_program, resolve_file};
pub use open::{Image, ImageSpec, Layer};
pub use source::Format;
pub use store::{
    CacheGuard, Ext4Disk, ImageRecord, ImageSizes, Layers, Listing, Removed, Store, VERSION,
};
pub use unpack::UnpackStats;
