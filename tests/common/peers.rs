//! Where the tests find the peer VMMs: the product looks by flag, environment variable or
//! PATH only; a test may also look in `../shared/peers/` beside the repository, where the
//! development machines keep binaries built from the peers' public source.

use std::path::PathBuf;

/// Where the lab carries the Firecracker binary (the host's path may lie under the lab's
/// own /tmp, which the lab mounts over).
pub const FIRECRACKER_IN_LAB: &str = "/opt/twinbox-lab/firecracker";

/// The Firecracker binary: `TWINBOX_FIRECRACKER`, else `firecracker` in PATH, else
/// `../shared/peers/firecracker` beside the repository; otherwise the test fails naming
/// every place looked at, so a missing peer never reads as a passed check.
pub fn firecracker() -> PathBuf {
    let beside = super::repo_root().join("../shared/peers/firecracker");
    std::env::var_os("TWINBOX_FIRECRACKER")
        .map(PathBuf::from)
        .or_else(|| bench::runner::peer::in_path("firecracker"))
        .or_else(|| beside.is_file().then(|| beside.clone()))
        .unwrap_or_else(|| {
            panic!(
                "no Firecracker binary: set TWINBOX_FIRECRACKER, put firecracker in PATH, or \
                 provide {} — this check did not run",
                beside.display()
            )
        })
}
