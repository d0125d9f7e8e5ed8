//! The host side of a box's network (issue 11): a race-free lease of a point-to-point
//! link, the veth pair of a container and the tap of a microVM, and the NAT table.
//!
//! - [`lease`]: link `i` of the pool (default 10.201.0.0/16, `TWINBOX_NET_POOL`) is a /30,
//!   host `.4i+1`, box `.4i+2`, reserved by a flock that dies with the process.
//! - [`ifname`]: the host ends' names: `tb<i>`/`tbt<i>` for `--net`, `tbn<i>`/`tbnt<i>`
//!   for `--net nat`.
//! - [`veth`]: a container's veth pair, host end `tb<i>`, box end `eth0` created directly
//!   in the container's network namespace; it vanishes with that namespace.
//! - [`tap`]: a VM's tap `tbt<i>` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, non-persistent); it
//!   vanishes when the VMM's fd closes. A persistent one for a VMM that opens its tap by
//!   name (Firecracker), deleted on drop and swept once its lease is free.
//! - [`forwarding`]: a link-mode host end never forwards; a NAT one does.
//! - [`nat`]: `--net nat`, the one nftables table `ip twinbox` and ip_forward.
//! - [`resolver`]: the host's name server, if a box can reach it.
//! - [`rundir`]: /run/twinbox, 0755 whatever the umask.
//!
//! Netlink goes through `netlink-packet-route` / `netlink-packet-core` on a blocking
//! `netlink-sys` socket, with a small request/ACK helper (`netlink.rs`). Not `rtnetlink`:
//! it is async and would bring a tokio runtime into every box start, and start-up time is
//! what twinbox measures (issue 13). Nothing here spawns `ip`.

pub mod error;
pub mod forwarding;
pub mod ifname;
pub mod lease;
pub mod nat;
mod netlink;
pub mod resolver;
pub mod rundir;
pub mod tap;
pub mod veth;

pub use error::{Error, Result};
pub use lease::{Lease, Pool};
pub use resolver::{host_resolver, Resolver};
pub use tap::{PersistentTap, Tap};
pub use twinbox_spec::{LinkInfo, NetMode};
pub use veth::Veth;

/// The report's record of `lease` on host interface `host_interface`.
pub fn link_info(lease: &Lease, host_interface: &str, mac: Option<[u8; 6]>, nat: bool) -> LinkInfo {
    LinkInfo {
        host_interface: host_interface.to_string(),
        host_address: lease.host_address(),
        box_address: lease.box_address(),
        prefix_len: lease.prefix_len(),
        mac: mac.map(|m| format_mac(&m)),
        nat,
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn link_info_round_trips_through_json() {
        let info = LinkInfo {
            host_interface: "tbt3".into(),
            host_address: Ipv4Addr::new(10, 201, 0, 13),
            box_address: Ipv4Addr::new(10, 201, 0, 14),
            prefix_len: 30,
            mac: Some(format_mac(&[0x02, 0x74, 0x62, 0, 0, 3])),
            nat: true,
        };
        let json = serde_json::to_string(&info).unwrap();
        assert!(json.contains(r#""box_address":"10.201.0.14""#), "{json}");
        assert!(json.contains(r#""mac":"02:74:62:00:00:03""#), "{json}");
        assert_eq!(serde_json::from_str::<LinkInfo>(&json).unwrap(), info);
    }
}
