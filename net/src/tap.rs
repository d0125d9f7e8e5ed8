//! A VM's link: a tap `tbt<i>` (`tbnt<i>` for `--net nat`) opened with IFF_TAP |
//! IFF_NO_PI | IFF_VNET_HDR and a 12-byte virtio-net header (`virtio_net_hdr_v1`, with
//! `num_buffers`), carrying the lease's host address, forwarding only for NAT
//! (`forwarding.rs`), up.
//!
//! The tap is not persistent: it exists only while its fd is open, so it vanishes with
//! the VMM, SIGKILL included. The VMM reads and writes frames on [`Tap::file`], each
//! preceded by the virtio-net header, and sets the offloads the guest negotiated with
//! [`Tap::set_offload`].
//!
//! [`PersistentTap`] is for a VMM that opens its tap by name (Firecracker's
//! `host_dev_name`): a non-multiqueue tap held by our fd would refuse its attach (EBUSY),
//! so that one is made persistent (TUNSETPERSIST) and our fd closed. It no longer dies
//! with a process, so it carries the alias [`PERSISTENT_ALIAS`] (set before it is made
//! persistent, so an unmarked one never outlives its creator), is deleted on drop, and
//! [`sweep_persistent`] deletes those whose lease nobody holds any more (a killed run's).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;

use twinbox_spec::NetMode;

use crate::error::{Error, Result};
use crate::ifname::{self, Kind};
use crate::lease::Lease;
use crate::netlink::Rtnl;
use crate::LinkInfo;

/// The alias (IFLA_IFALIAS) that marks a persistent tap as twinbox's own: only such taps
/// are ever swept.
pub const PERSISTENT_ALIAS: &str = "twinbox persistent tap";

/// The tun/tap control device.
pub const TUN_DEVICE: &str = "/dev/net/tun";
/// Size of the virtio-net header on every frame (virtio_net_hdr_v1 with num_buffers).
pub const VNET_HDR_LEN: i32 = 12;

/// Offload flags for [`Tap::set_offload`] (linux/if_tun.h `TUN_F_*`).
pub mod offload {
    /// The guest accepts and sends partial checksums (VIRTIO_NET_F_GUEST_CSUM / CSUM).
    pub const CSUM: u32 = libc::TUN_F_CSUM;
    /// TCP segmentation offload over IPv4.
    pub const TSO4: u32 = libc::TUN_F_TSO4;
    /// TCP segmentation offload over IPv6.
    pub const TSO6: u32 = libc::TUN_F_TSO6;
    /// TSO with ECN.
    pub const TSO_ECN: u32 = libc::TUN_F_TSO_ECN;
    /// UDP fragmentation offload.
    pub const UFO: u32 = libc::TUN_F_UFO;
}

/// The tap's name for lease `index` in `mode`.
pub fn tap_name(index: u32, mode: NetMode) -> String {
    ifname::name(Kind::Tap, mode, index)
}

/// The guest NIC's MAC for lease `index`: locally administered, unicast, `02:74:62` ("tb")
/// then the index in 24 bits, so each concurrent VM has its own.
pub fn guest_mac(index: u32) -> [u8; 6] {
    let [_, high, middle, low] = index.to_be_bytes();
    [0x02, 0x74, 0x62, high, middle, low]
}

/// A non-persistent tap owned by this process; owns its lease. Dropping it closes the
/// fd, which deletes the interface.
#[derive(Debug)]
pub struct Tap {
    // Declared before `lease`: the interface goes before the lease is released.
    file: File,
    name: String,
    lease: Lease,
}

impl Tap {
    /// Create `tbt<index>` (`tbnt<index>`) for `lease`, give it the host address /30 and
    /// forwarding as the lease's mode allows, and bring it up.
    pub fn create(lease: Lease) -> Result<Self> {
        let name = tap_name(lease.index(), lease.mode());
        let file = open_tun(&name)?;
        set_iff(&file, &name)?;
        let header_len: libc::c_int = VNET_HDR_LEN;
        // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, which lives on
        // this stack frame for the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ as _, &header_len) };
        if rc < 0 {
            return Err(Error::tap(
                "TUNSETVNETHDRSZ",
                &name,
                io::Error::last_os_error(),
            ));
        }
        let tap = Self { file, name, lease };
        let (mut rtnl, index) = rtnl_and_index(&tap.name)?;
        address_and_up(&mut rtnl, index, &tap.name, &tap.lease)?;
        tracing::debug!(interface = %tap.name, host = %tap.lease.host_address(),
            r#box = %tap.lease.box_address(), "tap created");
        Ok(tap)
    }

    /// The tap's interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tap's fd (non-blocking): frames with a 12-byte virtio-net header in front.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The guest NIC's MAC for this link (for the device's config space).
    pub fn mac(&self) -> [u8; 6] {
        guest_mac(self.lease.index())
    }

    /// The lease the link was made for.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Tell the tap which offloads the guest accepts (TUNSETOFFLOAD with [`offload`]
    /// flags; 0 turns them all off).
    pub fn set_offload(&self, flags: u32) -> Result<()> {
        set_offload_on(self.file.as_fd(), flags)
            .map_err(|source| Error::tap("TUNSETOFFLOAD", &self.name, source))
    }

    /// The report record of this link.
    pub fn link_info(&self, nat: bool) -> LinkInfo {
        crate::link_info(&self.lease, &self.name, Some(self.mac()), nat)
    }
}

/// A persistent tap `tbt<i>` (`tbnt<i>`) that no fd of ours holds, for a VMM that attaches
/// to it by name with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR; owns its lease. Dropping it
/// deletes the interface, then frees the lease.
#[derive(Debug)]
pub struct PersistentTap {
    name: String,
    lease: Lease,
}

impl PersistentTap {
    /// Create the tap for `lease` as [`Tap::create`] does (address, forwarding, up), but
    /// persistent, marked [`PERSISTENT_ALIAS`], and with our fd closed.
    pub fn create(lease: Lease) -> Result<Self> {
        let name = tap_name(lease.index(), lease.mode());
        let file = open_tun(&name)?;
        set_iff(&file, &name)?;
        let (mut rtnl, index) = rtnl_and_index(&name)?;
        // Marked while the interface still dies with our fd: a kill before TUNSETPERSIST
        // leaves nothing, a kill after it leaves a tap the sweep recognises.
        rtnl.set_alias(index, PERSISTENT_ALIAS)
            .map_err(|e| Error::netlink("RTM_SETLINK alias", &name, e))?;
        let on: libc::c_ulong = 1;
        // SAFETY: TUNSETPERSIST takes its argument by value; no memory is passed.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETPERSIST as _, on) } < 0 {
            let source = io::Error::last_os_error();
            return Err(Error::tap("TUNSETPERSIST", &name, source));
        }
        // From here on Drop deletes the interface on every path.
        let tap = Self { name, lease };
        drop(file);
        address_and_up(&mut rtnl, index, &tap.name, &tap.lease)?;
        tracing::debug!(interface = %tap.name, host = %tap.lease.host_address(),
            r#box = %tap.lease.box_address(), "persistent tap created");
        Ok(tap)
    }

    /// The tap's interface name (what the VMM opens).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The guest NIC's MAC for this link.
    pub fn mac(&self) -> [u8; 6] {
        guest_mac(self.lease.index())
    }

    /// The lease the link was made for.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The report record of this link.
    pub fn link_info(&self) -> LinkInfo {
        let nat = self.lease.mode() == NetMode::Nat;
        crate::link_info(&self.lease, &self.name, Some(self.mac()), nat)
    }
}

impl Drop for PersistentTap {
    fn drop(&mut self) {
        match Rtnl::open().and_then(|mut rtnl| rtnl.delete_link(&self.name)) {
            Ok(()) => tracing::debug!(interface = %self.name, "persistent tap deleted"),
            Err(error) => {
                tracing::warn!(interface = %self.name, %error, "persistent tap not deleted")
            }
        }
    }
}

/// Delete the persistent taps of dead runs: interfaces with a tap name of ours
/// ([`crate::ifname`]) and the [`PERSISTENT_ALIAS`] whose link's lease no process holds
/// (its lock is taken for the deletion, so no new lease of that link can race it). Other
/// interfaces, taps of live runs included, are never touched. Best effort; one line per
/// tap deleted or kept, for a log.
pub fn sweep_persistent() -> Vec<String> {
    let Ok(links) = Rtnl::open().and_then(|mut rtnl| rtnl.links()) else {
        return Vec::new();
    };
    let mut done = Vec::new();
    for (name, alias) in links {
        let Some((ifname::Kind::Tap, _, index)) = ifname::parse(&name) else {
            continue;
        };
        if alias.as_deref() != Some(PERSISTENT_ALIAS) {
            continue;
        }
        match crate::lease::Unheld::take(index) {
            Ok(Some(_unheld)) => match Rtnl::open().and_then(|mut rtnl| rtnl.delete_link(&name)) {
                Ok(()) => done.push(format!("deleted tap {name}: its run is gone")),
                Err(error) => done.push(format!("cannot delete tap {name}: {error}")),
            },
            Ok(None) => {}
            Err(error) => done.push(format!("kept tap {name}: {error}")),
        }
    }
    done
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// A netlink socket and the interface index of the tap `name`.
fn rtnl_and_index(name: &str) -> Result<(Rtnl, u32)> {
    let rtnl = Rtnl::open().map_err(|e| Error::netlink("socket", name, e))?;
    let index = nix::net::if_::if_nametoindex(name)
        .map_err(|e| Error::netlink("if_nametoindex", name, e.into()))?;
    Ok((rtnl, index))
}

/// Gives the tap `name` (interface `index`) the lease's host address, forwarding as the
/// lease's mode allows, and brings it up.
fn address_and_up(rtnl: &mut Rtnl, index: u32, name: &str, lease: &Lease) -> Result<()> {
    rtnl.add_ipv4(index, lease.host_address(), lease.prefix_len())
        .map_err(|e| Error::netlink("RTM_NEWADDR", name, e))?;
    crate::forwarding::set(name, crate::forwarding::allowed(lease.mode()))?;
    rtnl.set_up(index)
        .map_err(|e| Error::netlink("RTM_SETLINK up", name, e))
}

/// TUNSETOFFLOAD on any fd of a tap (e.g. a clone held by the virtio-net device).
pub fn set_offload_on(fd: BorrowedFd<'_>, flags: u32) -> io::Result<()> {
    let flags = flags as libc::c_ulong;
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD as _, flags) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A fresh fd of /dev/net/tun (close-on-exec, non-blocking), for tap `name`.
fn open_tun(name: &str) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(TUN_DEVICE)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                Error::TunMissing { source }
            }
            _ => Error::tap("open /dev/net/tun", name, source),
        })
}

/// TUNSETIFF: attach `file` to a new tap called `name`.
fn set_iff(file: &File, name: &str) -> Result<()> {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    // Names come from tap_name(): ASCII, at most 13 bytes, so they fit with the NUL.
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which lives on this stack frame.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut request) };
    if rc < 0 {
        let source = io::Error::last_os_error();
        return Err(match source.raw_os_error() {
            // EBUSY: a tap of that name is attached elsewhere; EINVAL: a non-tap device
            // has the name.
            Some(libc::EBUSY) | Some(libc::EINVAL) | Some(libc::EEXIST) => Error::InterfaceExists {
                interface: name.to_string(),
            },
            _ => Error::tap("TUNSETIFF", name, source),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_macs_are_locally_administered_unicast_and_distinct() {
        let first = guest_mac(0);
        let last = guest_mac((1 << 22) - 1);
        for mac in [first, last] {
            assert_eq!(
                mac[0] & 0x02,
                0x02,
                "{mac:02x?} is not locally administered"
            );
            assert_eq!(mac[0] & 0x01, 0, "{mac:02x?} is multicast");
        }
        assert_eq!(first, [0x02, 0x74, 0x62, 0, 0, 0]);
        assert_eq!(guest_mac(0x01_02_03), [0x02, 0x74, 0x62, 1, 2, 3]);
        assert_ne!(guest_mac(1), guest_mac(2));
    }

    #[test]
    fn tap_names_fit_ifnamsiz_for_the_largest_pool() {
        // A /8 pool has 2^22 links.
        for mode in [NetMode::Link, NetMode::Nat] {
            assert!(tap_name((1 << 22) - 1, mode).len() < libc::IFNAMSIZ);
            assert!(crate::veth::host_interface_name((1 << 22) - 1, mode).len() < libc::IFNAMSIZ);
        }
    }
}
