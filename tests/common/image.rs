//! Building test images with real tools (buildah, skopeo, umoci) from shell scripts.

use std::path::Path;
use std::process::Command;

/// The PATH the tools are looked up in and run with, whatever the test runner's is.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Fails the test, naming the tool and `packages` to install, unless every one of `tools`
/// is on [`PATH`].
pub fn require_tools(tools: &[&str], packages: &str) {
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .env("PATH", PATH)
            .output()
            .expect("run sh")
            .status
            .success();
        assert!(
            found,
            "{tool} is not installed: run scripts/install-deps ({packages})"
        );
    }
}

/// Runs a bash script in `dir`; fails the test with its output when it fails.
pub fn sh(dir: &Path, script: &str) -> String {
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .env("PATH", PATH)
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "script failed:\n{script}\n{}",
        super::describe(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
