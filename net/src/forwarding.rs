//! Per-interface IPv4 forwarding: a link-mode box reaches the host and nothing beyond it.
//!
//! `/proc/sys/net/ipv4/conf/<if>/forwarding` decides whether packets received on `<if>`
//! may be routed on (Documentation/networking/ip-sysctl.rst: "controls whether packets
//! received _on_ this interface can be forwarded"; net/ipv4/route.c
//! `ip_route_input_slow` answers such a packet with an unreachable route when
//! `IN_DEV_FORWARD` is off for its input device). So the host end of a link-mode box gets
//! 0 and a NAT box's 1, before the link is up, whatever `ip_forward` says; that holds even
//! where no nftables table of ours exists (plain `--net` needs no `nft`).
//!
//! One catch: writing `net.ipv4.ip_forward` (or `conf/all/forwarding`) copies the value to
//! every interface (`devinet.c` `inet_forward_change`). [`crate::nat::apply`] therefore
//! closes the link-mode interfaces again right after it turns `ip_forward` on; a run that
//! makes its link after that write closes its own. Someone else toggling `ip_forward`
//! later reopens them; then the `ip twinbox` table's forward chain, if present, still drops
//! their traffic.

use std::io;
use std::path::PathBuf;

use twinbox_spec::NetMode;

use crate::error::{Error, Result};

/// The sysctl file of interface `name`.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/sys/net/ipv4/conf/{name}/forwarding"))
}

/// Whether packets received on a host end of `mode` may be forwarded.
pub fn allowed(mode: NetMode) -> bool {
    mode == NetMode::Nat
}

/// Turn forwarding of packets received on `name` on or off.
pub(crate) fn set(name: &str, on: bool) -> Result<()> {
    let path = path(name);
    std::fs::write(&path, if on { "1\n" } else { "0\n" }).map_err(|source: io::Error| match source
        .raw_os_error()
    {
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => Error::NotPermitted {
            call: "write the forwarding sysctl of",
            interface: name.to_string(),
            source,
        },
        _ => Error::Sysctl { path, source },
    })
}

/// Close forwarding again on every link-mode host end of this namespace (after a write of
/// `ip_forward` opened them all). Best effort: an interface that went meanwhile is fine.
pub(crate) fn close_link_mode_interfaces() {
    let Ok(interfaces) = nix::net::if_::if_nameindex() else {
        return;
    };
    for interface in interfaces.iter() {
        let name = interface.name().to_string_lossy();
        if let Some((_, NetMode::Link, _)) = crate::ifname::parse(&name) {
            match set(&name, false) {
                Ok(()) => tracing::debug!(interface = %name, "forwarding closed again"),
                Err(error) => tracing::debug!(interface = %name, %error, "forwarding not closed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_nat_links_forward() {
        assert!(allowed(NetMode::Nat));
        assert!(!allowed(NetMode::Link));
        assert_eq!(
            path("tbt3"),
            PathBuf::from("/proc/sys/net/ipv4/conf/tbt3/forwarding")
        );
    }
}
