//! `twinbox image`: the cache of unpacked OCI/Docker images (load, ls, rm, prune).

use super::say;
use anyhow::Result;
use clap::{Args, Subcommand};
use twinbox_image::{Image, ImageSpec, Store};

const CACHE_HELP: &str = "\
The cache lives in $TWINBOX_CACHE/images (default /var/cache/twinbox/images): layers \
unpacked once by their uncompressed digest and shared by every image that has them, and \
one ext4 per image for the VM. It only grows when an image is loaded or run, and never \
shrinks by itself: `twinbox image ls` shows where it is and how big, `rm` and `prune` \
free it.

An image is named PATH[@REF]: PATH is an OCI image layout directory, an oci-archive or a \
docker-archive tar (docker save, podman save, skopeo copy, buildah push); REF, needed \
only when it holds several images, is a tag (app:1; docker.io/library/ and localhost/ \
may be left out) or a digest (sha256:..., or 12+ hex digits of the manifest or image id). \
Only linux/amd64 images run.";

/// `twinbox image` subcommands.
#[derive(Subcommand, Debug)]
#[command(after_help = CACHE_HELP)]
pub enum ImageCommand {
    /// Open an image, verify it and unpack its layers into the cache (`--ext4`: also build
    /// the VM disk); print its id, config and sizes.
    #[command(after_help = CACHE_HELP)]
    Load(LoadArgs),
    /// List cached images, layers and VM disks with their sizes, the cache's location and
    /// its total size.
    #[command(after_help = CACHE_HELP)]
    Ls(LsArgs),
    /// Remove a cached image (by tag, or a prefix of its id or manifest digest), its VM
    /// disk, and the layers no other cached image uses.
    #[command(after_help = CACHE_HELP)]
    Rm(RmArgs),
    /// Remove layers no cached image uses, VM disks of removed images or other twinbox
    /// versions, and leftovers of killed runs.
    #[command(after_help = CACHE_HELP)]
    Prune,
}

/// Options of `twinbox image load`.
#[derive(Args, Debug)]
pub struct LoadArgs {
    /// The image: PATH[@REF].
    pub image: String,
    /// Also build the VM's ext4 disk.
    #[arg(long)]
    pub ext4: bool,
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Options of `twinbox image ls`.
#[derive(Args, Debug)]
pub struct LsArgs {
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Options of `twinbox image rm`.
#[derive(Args, Debug)]
pub struct RmArgs {
    /// A tag, or a prefix (6+ hex digits) of the image id or manifest digest.
    pub reference: String,
}

/// Runs a `twinbox image` subcommand.
pub fn main(command: ImageCommand) -> Result<i32> {
    let store = Store::default_location();
    match command {
        ImageCommand::Load(args) => load(&store, &args),
        ImageCommand::Ls(args) => ls(&store, &args),
        ImageCommand::Rm(args) => {
            let removed = store.remove(&args.reference)?;
            say(format_args!(
                "removed image {}: {} layer(s), {} disk(s), {} freed",
                removed.images.join(", "),
                removed.layers.len(),
                removed.disks.len(),
                human(removed.bytes)
            ));
            Ok(0)
        }
        ImageCommand::Prune => {
            let removed = store.prune()?;
            say(format_args!(
                "pruned {} layer(s), {} disk(s), {} leftover(s): {} freed",
                removed.layers.len(),
                removed.disks.len(),
                removed.tmp,
                human(removed.bytes)
            ));
            Ok(0)
        }
    }
}

fn load(store: &Store, args: &LoadArgs) -> Result<i32> {
    let started = std::time::Instant::now();
    let image = Image::open(&ImageSpec::parse(&args.image))?;
    let (layers, disk) = if args.ext4 {
        let disk = store.ext4(&image)?;
        (disk.layers.dirs.clone(), Some(disk.path))
    } else {
        (store.layers(&image)?.dirs, None)
    };
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let sizes = store.sizes(&image)?;
    let user = image.config.resolve_user(&layers)?;
    if args.json {
        let value = serde_json::json!({
            "id": image.id.to_string(),
            "manifest_digest": image.manifest_digest.as_ref().map(|d| d.to_string()),
            "names": image.names,
            "format": image.format().name(),
            "layers": layers,
            "ext4": disk,
            "config": image.config,
            "command": image.config.command(&[]),
            "env": image.config.env_for(&[], &user),
            "working_dir": image.config.working_dir(),
            "user": user,
            "sizes": sizes,
            "elapsed_ms": elapsed_ms,
        });
        say(format_args!("{}", serde_json::to_string_pretty(&value)?));
        return Ok(0);
    }
    say(format_args!(
        "image    {} ({})",
        image.id,
        image.format().name()
    ));
    say(format_args!("names    {}", image.names.join(", ")));
    say(format_args!("command  {:?}", image.config.command(&[])));
    say(format_args!(
        "env      {:?}",
        image.config.env_for(&[], &user)
    ));
    say(format_args!("workdir  {}", image.config.working_dir()));
    say(format_args!(
        "user     {}:{} (from {:?})",
        user.uid, user.gid, image.config.user
    ));
    for (i, dir) in layers.iter().enumerate() {
        say(format_args!("layer {i}  {}", dir.display()));
    }
    if let Some(disk) = &disk {
        say(format_args!("ext4     {}", disk.display()));
    }
    say(format_args!(
        "sizes    {} layer(s): {} in the archive, {} unpacked{}; {elapsed_ms} ms",
        sizes.layer_count,
        human(sizes.layers_bytes_in_archive),
        human(sizes.layers_bytes_on_disk),
        sizes
            .ext4_bytes_on_disk
            .map(|b| format!(", VM disk {}", human(b)))
            .unwrap_or_default()
    ));
    Ok(0)
}

fn ls(store: &Store, args: &LsArgs) -> Result<i32> {
    let listing = store.list()?;
    if args.json {
        say(format_args!("{}", serde_json::to_string_pretty(&listing)?));
        return Ok(0);
    }
    say(format_args!(
        "cache {}: {} in total",
        listing.root.display(),
        human(listing.total_bytes)
    ));
    say(format_args!("IMAGE ID      SIZE       LAYERS  NAMES"));
    for (record, bytes) in &listing.images {
        let id = record.id.strip_prefix("sha256:").unwrap_or(&record.id);
        say(format_args!(
            "{:<12}  {:>9}  {:>6}  {}",
            &id[..12.min(id.len())],
            human(*bytes),
            record.layers.len(),
            record.names.join(", ")
        ));
    }
    say(format_args!("LAYER (diff_id)  SIZE       IMAGES"));
    for (diff_id, bytes, uses) in &listing.layers {
        say(format_args!(
            "{:<15}  {:>9}  {:>6}",
            &diff_id[..12.min(diff_id.len())],
            human(*bytes),
            uses
        ));
    }
    if !listing.disks.is_empty() {
        say(format_args!(
            "VM DISK                                    SIZE"
        ));
        for (path, bytes, stale) in &listing.disks {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            say(format_args!(
                "{name}  {:>9}{}",
                human(*bytes),
                if *stale {
                    "  (stale: prune removes it)"
                } else {
                    ""
                }
            ));
        }
    }
    if listing.tmp_bytes > 0 {
        say(format_args!(
            "unfinished work in tmp/: {} (prune removes it)",
            human(listing.tmp_bytes)
        ));
    }
    Ok(0)
}

/// Bytes for a person: KiB/MiB/GiB with one decimal.
fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}
