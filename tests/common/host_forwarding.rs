//! What `--net nat` changes on the host, saved, and put back on drop: `ip_forward`, every
//! interface's `forwarding` (the kernel copies a write of `ip_forward` to each), twinbox's
//! note that it turned `ip_forward` on, and the `ip twinbox` nftables table.
//!
//! Shared by the top-level tests (`tests/common`) and hostnet's own (`net/tests/nat.rs`
//! takes this file by `#[path]`: a member's test crate cannot see `tests/common`, and a
//! guard of host state has no place in hostnet's public API). Hence std alone, and the
//! paths written out here; `net/tests/nat.rs` checks them against hostnet's constants.

#![allow(dead_code)] // each test crate uses a different subset

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The sysctl `--net nat` turns on (`hostnet::nat::IP_FORWARD`).
pub const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
/// hostnet's note that twinbox turned ip_forward on (`hostnet::nat::FORWARDING_NOTE`).
pub const FORWARDING_NOTE: &str = "/run/twinbox/ip_forward-turned-on-by-twinbox";
/// The nftables table (family ip) `--net nat` installs (`hostnet::nat::TABLE`).
pub const TABLE: &str = "twinbox";

/// The host's forwarding state as [`HostForwarding::save`] found it; put back on drop,
/// whatever the test did (a failed assertion included).
pub struct HostForwarding {
    ip_forward: String,
    interfaces: Vec<(PathBuf, String)>,
    note: Option<String>,
    table: Option<String>,
}

impl HostForwarding {
    /// Saves the host's forwarding state; panics naming what it cannot read.
    pub fn save() -> Self {
        let interfaces = std::fs::read_dir("/proc/sys/net/ipv4/conf")
            .expect("/proc/sys/net/ipv4/conf")
            .flatten()
            .filter(|e| e.file_name() != "all")
            .filter_map(|e| {
                let path = e.path().join("forwarding");
                let value = std::fs::read_to_string(&path).ok()?;
                Some((path, value))
            })
            .collect();
        Self {
            ip_forward: std::fs::read_to_string(IP_FORWARD).expect("read ip_forward"),
            interfaces,
            note: std::fs::read_to_string(FORWARDING_NOTE).ok(),
            table: Self::table(),
        }
    }

    /// `nft list table ip twinbox`, if the table is there.
    pub fn table() -> Option<String> {
        let out = Command::new("nft")
            .args(["list", "table", "ip", TABLE])
            .output()
            .expect("nft (Debian package nftables) is needed by this test");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The host as one that never ran twinbox, with `ip_forward` = `value` (and so every
    /// interface's `forwarding`).
    pub fn fresh(value: &str) {
        if Self::table().is_some() {
            let status = Command::new("nft")
                .args(["delete", "table", "ip", TABLE])
                .status()
                .expect("nft");
            assert!(status.success(), "nft delete table ip {TABLE}: {status}");
        }
        let _ = std::fs::remove_file(FORWARDING_NOTE);
        std::fs::write(IP_FORWARD, value).expect("write ip_forward");
    }

    /// Whether twinbox's note that it turned `ip_forward` on is there.
    pub fn noted() -> bool {
        Path::new(FORWARDING_NOTE).exists()
    }
}

impl Drop for HostForwarding {
    fn drop(&mut self) {
        // Best effort, in an order that ends where the host was: no table and no note,
        // ip_forward (which resets every interface's forwarding), then the interfaces, the
        // note and the table as they were.
        if Self::table().is_some() {
            let _ = Command::new("nft")
                .args(["delete", "table", "ip", TABLE])
                .status();
        }
        let _ = std::fs::remove_file(FORWARDING_NOTE);
        let _ = std::fs::write(IP_FORWARD, &self.ip_forward);
        for (path, value) in &self.interfaces {
            let _ = std::fs::write(path, value);
        }
        if let Some(note) = &self.note {
            let _ = std::fs::write(FORWARDING_NOTE, note);
        }
        if let Some(table) = &self.table {
            if let Ok(mut nft) = Command::new("nft")
                .args(["-f", "-"])
                .stdin(Stdio::piped())
                .spawn()
            {
                if let Some(mut stdin) = nft.stdin.take() {
                    let _ = stdin.write_all(table.as_bytes());
                }
                let _ = nft.wait();
            }
        }
    }
}
