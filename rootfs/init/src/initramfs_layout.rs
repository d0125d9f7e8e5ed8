//! What twinbox's initramfs holds, in one place: init reads it to find its way
//! (`initramfs.rs`) and `twinbox-initramfs` writes it (`bin/twinbox-initramfs.rs`).
//!
//! ```text
//! /init                 twinbox-init itself (the kernel's default `rdinit=`)
//! /twinbox-initramfs    marker: init started from here must mount the real root
//! /dev/console          c 5 1, so the kernel can give PID 1 a console
//! /dev /proc /sys       mount points
//! /twinbox/image        the root disk, read-only
//! /twinbox/layer        tmpfs with the overlay's upper and work directories
//! /twinbox/root         the overlay, which becomes `/`
//! ```

/// Where the kernel looks for the initramfs's init when the command line has no
/// `rdinit=`: init lives there, so no VMM has to say anything for it to run.
pub const INIT: &str = "/init";
/// The marker file: its presence at `/` (with PID 1 and no job in the environment) is
/// how init knows it was started from twinbox's initramfs.
pub const MARKER: &str = "/twinbox-initramfs";
/// What the marker file says (for a human who unpacks the archive).
pub const MARKER_TEXT: &str =
    "twinbox initramfs: /init mounts root= read-only under a tmpfs overlay and switches to it\n";
/// Mount point of the root disk, read-only.
pub const IMAGE: &str = "/twinbox/image";
/// Mount point of the tmpfs holding the overlay's upper and work directories.
pub const LAYER: &str = "/twinbox/layer";
/// Mount point of the overlay that becomes the new root.
pub const NEW_ROOT: &str = "/twinbox/root";
/// The directories of the archive, parents first (without the leading `/`).
pub const DIRS: [&str; 7] = [
    "dev",
    "proc",
    "sys",
    "twinbox",
    "twinbox/image",
    "twinbox/layer",
    "twinbox/root",
];
/// The console node: path, major, minor.
pub const CONSOLE: (&str, u32, u32) = ("dev/console", 5, 1);
