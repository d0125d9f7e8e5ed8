//! "Image sizes: MB vs GB", measured: the bytes of the image on disk (the built-in image's
//! ext4, or an `--image`'s layers in the cache), and what one running instance adds for
//! the `startup` workload — the container's overlay upper layer, the VM's root disk writes
//! and the guest memory its VMM touched.
//!
//! One extra run per box after the scenarios: `/bin/true`, then `df -Pk /` inside the box.
//! Both boxes' roots are an overlay whose upper layer is a fresh tmpfs (the container's on
//! the host, the VM's in guest memory), and overlayfs answers `statfs` with its upper
//! layer's, so `df`'s "Used" is what the instance wrote there — the same reading in both.

use crate::results::{BoxSizes, ScenarioResult, Sizes};
use crate::runner::{self, Runner};
use crate::scenario::{startup::Startup, Context, Scenario};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The script run in each box: the startup workload, then the reading.
const SCRIPT: &str = "/bin/true && df -Pk /";

/// Where the image's bytes come from.
pub struct ImageBytes {
    /// What they count.
    pub what: String,
    /// Allocated bytes.
    pub bytes: u64,
    /// The VM's root disk, allocated bytes.
    pub vm_disk_bytes: Option<u64>,
    /// The VM's root disk file (its writes are measured around the run).
    pub vm_disk: Option<std::path::PathBuf>,
}

impl ImageBytes {
    /// The built-in image: one ext4 file that is both boxes' root.
    pub fn builtin(rootfs: &Path) -> Self {
        let bytes = allocated(rootfs).unwrap_or(0);
        Self {
            what: "the built-in image's ext4, allocated blocks".into(),
            bytes,
            vm_disk_bytes: Some(bytes),
            vm_disk: Some(rootfs.to_owned()),
        }
    }
}

/// Allocated bytes of a file (a sparse image counts what it holds).
pub fn allocated(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

/// Measures each of twinbox's boxes in `runners` that ran `startup` successfully in
/// `startup`; `None` when none of them took part.
pub fn measure(
    ctx: &Context,
    runners: &[&dyn Runner],
    startup: &ScenarioResult,
    image: ImageBytes,
) -> Option<Sizes> {
    let mut boxes = Vec::new();
    for r in runners {
        let name = r.name();
        if name != runner::container::NAME && name != runner::vm::NAME {
            continue;
        }
        if let Some(out) = startup.sat_out.iter().find(|x| x.box_name == name) {
            boxes.push(BoxSizes {
                box_name: name.into(),
                written_bytes: None,
                root_disk_written_bytes: None,
                guest_memory_bytes: None,
                error: Some(format!("not measured: {}", out.reason)),
            });
            continue;
        }
        if !startup.boxes.iter().any(|b| b == name) {
            continue;
        }
        let ran = startup
            .runs
            .iter()
            .any(|x| x.box_name == name && !x.warmup && x.error.is_none());
        if !ran {
            boxes.push(BoxSizes {
                box_name: name.into(),
                written_bytes: None,
                root_disk_written_bytes: None,
                guest_memory_bytes: None,
                error: Some("not measured: its startup runs failed".into()),
            });
            continue;
        }
        let vm_disk = (name == runner::vm::NAME)
            .then_some(image.vm_disk.as_deref())
            .flatten();
        boxes.push(measure_box(*r, ctx, vm_disk));
    }
    if boxes.is_empty() {
        return None;
    }
    Some(Sizes {
        image_what: image.what,
        image_bytes: image.bytes,
        vm_disk_bytes: image.vm_disk_bytes,
        workload: Startup.workload(),
        boxes,
    })
}

fn measure_box(r: &dyn Runner, ctx: &Context, vm_disk: Option<&Path>) -> BoxSizes {
    let mut spec = Startup.spec(ctx, &r.capabilities());
    spec.argv = vec!["/bin/sh".into(), "-c".into(), SCRIPT.into()];
    let before = vm_disk.and_then(allocated);
    let mut out = BoxSizes {
        box_name: r.name().into(),
        written_bytes: None,
        root_disk_written_bytes: None,
        guest_memory_bytes: None,
        error: None,
    };
    let report = match r.run(&spec) {
        Ok(report) => report,
        Err(e) => {
            out.error = Some(e);
            return out;
        }
    };
    if let (Some(before), Some(after)) = (before, vm_disk.and_then(allocated)) {
        out.root_disk_written_bytes = Some(after.saturating_sub(before));
    }
    out.guest_memory_bytes = report.usage.guest_memory_touched_kib.map(|k| k * 1024);
    match crate::scenario::succeeded(&report) {
        Ok(()) => match used_kib(report.output.as_deref().unwrap_or_default()) {
            Some(kib) => out.written_bytes = Some(kib * 1024),
            None => out.error = Some("no `df -Pk /` line for / in the box's output".into()),
        },
        Err(e) => out.error = Some(e),
    }
    out
}

/// The "Used" KiB of `/` in `df -Pk` output.
fn used_kib(output: &str) -> Option<u64> {
    output.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, _, used, _, _, "/"] => used.parse().ok(),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn df_s_used_column_of_the_root_is_read() {
        let busybox = "Filesystem           1024-blocks    Used Available Capacity Mounted on\n\
                       overlay               12341792       100  12341692   0% /\n";
        assert_eq!(used_kib(busybox), Some(100));
        let coreutils = "Filesystem     1024-blocks  Used Available Capacity Mounted on\n\
                         overlay              61440    12     61428       1% /\n\
                         tmpfs                 1024     0      1024       0% /dev\n";
        assert_eq!(used_kib(coreutils), Some(12));
        assert_eq!(used_kib("df: /: not found\n"), None);
    }
}
