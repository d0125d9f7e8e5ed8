//! A container's link: a veth pair whose host end `tb<i>` (`tbn<i>` for `--net nat`)
//! carries the lease's host address and whose other end is created as `eth0` directly
//! inside the container's network namespace (IFLA_NET_NS_PID on the peer), so it never
//! appears on the host. The host end forwards only for NAT (`forwarding.rs`).
//!
//! The box end stays down: init inside configures it from the job. When the namespace
//! dies the kernel deletes the pair, host end included, so a killed run leaves nothing;
//! Drop still deletes the host end if it is there.

use twinbox_spec::NetMode;

use crate::error::{Error, Result};
use crate::ifname::{self, Kind};
use crate::lease::Lease;
use crate::netlink::Rtnl;
use crate::LinkInfo;

/// The name of the box end inside the container.
pub const BOX_INTERFACE: &str = "eth0";

/// The host end's name for lease `index` in `mode`.
pub fn host_interface_name(index: u32, mode: NetMode) -> String {
    ifname::name(Kind::Veth, mode, index)
}

/// A veth pair between the host and a container's network namespace; owns its lease.
#[derive(Debug)]
pub struct Veth {
    name: String,
    lease: Lease,
}

impl Veth {
    /// Create the pair for `lease`: `eth0` in the network namespace of `netns_pid`,
    /// `tb<index>` (`tbn<index>`) on the host with the host address /30, forwarding as
    /// the lease's mode allows, up.
    pub fn create(lease: Lease, netns_pid: u32) -> Result<Self> {
        let name = host_interface_name(lease.index(), lease.mode());
        let mut rtnl = Rtnl::open().map_err(|e| Error::netlink("socket", &name, e))?;
        if let Err(source) = rtnl.add_veth(&name, BOX_INTERFACE, netns_pid) {
            return Err(match source.raw_os_error() {
                Some(libc::EEXIST) => Error::InterfaceExists { interface: name },
                Some(libc::ESRCH) => Error::NoSuchNamespace {
                    interface: name,
                    pid: netns_pid,
                },
                _ => Error::netlink("RTM_NEWLINK veth", &name, source),
            });
        }
        // From here on Drop deletes the host end if a later step fails.
        let veth = Self { name, lease };
        let index = nix::net::if_::if_nametoindex(veth.name.as_str())
            .map_err(|e| Error::netlink("if_nametoindex", &veth.name, e.into()))?;
        rtnl.add_ipv4(index, veth.lease.host_address(), veth.lease.prefix_len())
            .map_err(|e| Error::netlink("RTM_NEWADDR", &veth.name, e))?;
        crate::forwarding::set(&veth.name, crate::forwarding::allowed(veth.lease.mode()))?;
        rtnl.set_up(index)
            .map_err(|e| Error::netlink("RTM_SETLINK up", &veth.name, e))?;
        tracing::debug!(interface = %veth.name, host = %veth.lease.host_address(),
            r#box = %veth.lease.box_address(), netns_pid, "veth created");
        Ok(veth)
    }

    /// The host end's interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The lease the link was made for.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The report record of this link.
    pub fn link_info(&self, nat: bool) -> LinkInfo {
        crate::link_info(&self.lease, &self.name, None, nat)
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // Usually the namespace is gone and the kernel took the pair with it: ENODEV.
        let result = Rtnl::open().and_then(|mut rtnl| rtnl.delete_link(&self.name));
        match result {
            Ok(()) => tracing::debug!(interface = %self.name, "veth deleted"),
            Err(error) if error.raw_os_error() == Some(libc::ENODEV) => {}
            Err(error) => tracing::warn!(interface = %self.name, %error, "veth not deleted"),
        }
    }
}
