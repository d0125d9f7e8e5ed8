//! The box's network: `eth0` configured from the job, the same way in both boxes.
//!
//! The host made the link (a veth end moved into the container's network namespace, or
//! the VM's virtio-net NIC) and leased its addresses; init only brings it up, with the
//! classic `AF_INET` socket ioctls, which every kernel with `CONFIG_INET` has and which
//! need no netlink code in a std + libc binary:
//!
//! 1. `lo` up (`SIOCGIFFLAGS`/`SIOCSIFFLAGS`), if it is not already (the container
//!    runtime raises it; the VM's kernel does not);
//! 2. `eth0`: `SIOCSIFADDR` (the kernel gives it a classful mask), `SIOCSIFNETMASK` (the
//!    link's prefix; the kernel recomputes the broadcast with it), `SIOCSIFFLAGS` up, which
//!    installs the link's connected route;
//! 3. the default route via the gateway (`SIOCADDRT`, `RTF_UP | RTF_GATEWAY`, on `eth0`),
//!    reachable through that connected route;
//! 4. `/etc/resolv.conf` with the resolver, when the job names one (the root is an overlay
//!    with a writable upper layer in both boxes, so the image is never touched).
//!
//! In a container the runtime lends init `CAP_NET_ADMIN` for this (its default set, like
//! moby's, has none); [`give_back_net_admin`] drops it from the bounding set and from
//! init's own sets before the workload is forked, so the workload has the same
//! capabilities with or without `--net`.

use crate::sys::{check, SysError};
use std::ffi::CStr;
use std::net::Ipv4Addr;
use twinbox_proto::NetConfig;

/// The interface the host's link appears as in the box.
pub const ETH0: &CStr = c"eth0";
/// The loopback interface.
pub const LO: &CStr = c"lo";
/// Where the resolver goes.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// `CAP_NET_ADMIN` from `<linux/capability.h>`.
pub const CAP_NET_ADMIN: u32 = 12;

/// Brings up `lo` and `eth0` with `net`'s address and default route, and writes
/// resolv.conf when `net` names a resolver.
pub fn configure(net: &NetConfig) -> Result<(), SysError> {
    let sock = Socket::open()?;
    sock.up(LO)?;
    let eth0 = name(ETH0);
    sock.ioctl(
        libc::SIOCSIFADDR,
        &mut ifreq_addr(ETH0, net.address),
        || format!("set address {} on {eth0}", net.address),
    )?;
    sock.ioctl(
        libc::SIOCSIFNETMASK,
        &mut ifreq_addr(ETH0, netmask(net.prefix_len)),
        || format!("set netmask /{} on {eth0}", net.prefix_len),
    )?;
    sock.up(ETH0)?;
    let mut route = default_route(net.gateway, ETH0);
    // SAFETY: SIOCADDRT reads one rtentry; rt_dev points at a 'static NUL-terminated
    // name that outlives the call.
    check(
        unsafe { libc::ioctl(sock.0, libc::SIOCADDRT, &mut route) },
        || format!("add the default route via {} on {eth0}", net.gateway),
    )?;
    if let Some(resolver) = net.resolver {
        std::fs::write(RESOLV_CONF, resolv_conf(resolver)).map_err(|e| {
            SysError::new(
                format!("write {RESOLV_CONF}"),
                e.raw_os_error().unwrap_or(libc::EIO),
            )
        })?;
    }
    Ok(())
}

/// Drops `CAP_NET_ADMIN`, which a container runtime lent init to configure `eth0`, from
/// the bounding set and from init's effective, permitted and inheritable sets, so the
/// workload can neither have nor regain it.
pub fn give_back_net_admin() -> Result<(), SysError> {
    // SAFETY: prctl with integer arguments.
    check(
        unsafe {
            libc::prctl(
                libc::PR_CAPBSET_DROP,
                CAP_NET_ADMIN as libc::c_ulong,
                0,
                0,
                0,
            )
        },
        || "drop CAP_NET_ADMIN from the bounding set".to_owned(),
    )?;
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget with a v3 header and room for its two data words, on the stack.
    check(
        unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) as libc::c_int },
        || "read init's capabilities".to_owned(),
    )?;
    let word = (CAP_NET_ADMIN / 32) as usize;
    data[word] = data[word].without(CAP_NET_ADMIN % 32);
    // SAFETY: capset with the same header and the two data words just read and edited.
    check(
        unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) as libc::c_int },
        || "drop CAP_NET_ADMIN from init's capabilities".to_owned(),
    )?;
    Ok(())
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct`: one 32-bit word of each set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

impl CapData {
    /// This word with bit `bit` (a capability's number modulo 32) cleared in every set.
    fn without(self, bit: u32) -> Self {
        let bit = 1u32 << bit;
        Self {
            effective: self.effective & !bit,
            permitted: self.permitted & !bit,
            inheritable: self.inheritable & !bit,
        }
    }
}

/// An `AF_INET` datagram socket, the handle the interface ioctls go through.
struct Socket(libc::c_int);

impl Socket {
    fn open() -> Result<Self, SysError> {
        // SAFETY: socket with integer arguments; the descriptor is owned by the result.
        let fd = check(
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) },
            || "open an AF_INET socket for the interface ioctls".to_owned(),
        )?;
        Ok(Self(fd))
    }

    fn ioctl(
        &self,
        request: libc::c_ulong,
        req: &mut libc::ifreq,
        what: impl FnOnce() -> String,
    ) -> Result<(), SysError> {
        // SAFETY: an interface ioctl on our socket with an ifreq on the caller's stack,
        // which the kernel reads (and for the SIOCG requests, writes) within its size.
        check(
            unsafe { libc::ioctl(self.0, request, req as *mut libc::ifreq) },
            what,
        )
        .map(drop)
    }

    /// IFF_UP on `interface`, unless it is up already.
    fn up(&self, interface: &CStr) -> Result<(), SysError> {
        let shown = name(interface);
        let mut req = ifreq_named(interface);
        self.ioctl(libc::SIOCGIFFLAGS, &mut req, || {
            format!("read the flags of {shown} (is there an {shown} in this box?)")
        })?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        if flags & libc::IFF_UP as libc::c_short != 0 {
            return Ok(());
        }
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        self.ioctl(libc::SIOCSIFFLAGS, &mut req, || format!("bring up {shown}"))
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: closes the descriptor this value owns.
        unsafe { libc::close(self.0) };
    }
}

fn name(interface: &CStr) -> std::borrow::Cow<'_, str> {
    interface.to_string_lossy()
}

/// An `ifreq` for `interface` with everything else zero.
pub fn ifreq_named(interface: &CStr) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = interface.to_bytes();
    // One byte stays for the NUL terminator.
    let len = bytes.len().min(libc::IFNAMSIZ - 1);
    for (d, s) in req.ifr_name.iter_mut().zip(&bytes[..len]) {
        *d = *s as libc::c_char;
    }
    req
}

/// An `ifreq` for `interface` carrying `address` as an `AF_INET` sockaddr (for
/// `SIOCSIFADDR` and `SIOCSIFNETMASK`).
pub fn ifreq_addr(interface: &CStr, address: Ipv4Addr) -> libc::ifreq {
    let mut req = ifreq_named(interface);
    req.ifr_ifru.ifru_addr = sockaddr_in(address);
    req
}

/// `address` as a generic `sockaddr` holding a `sockaddr_in` (port 0).
pub fn sockaddr_in(address: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            // Network byte order: the octets as they are written.
            s_addr: u32::from_ne_bytes(address.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr and sockaddr_in are both 16 bytes of plain data; the kernel reads
    // a sockaddr_in through the sockaddr field of ifreq and rtentry exactly like this.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// The netmask of a prefix length (`/30` → `255.255.255.252`); lengths over 32 are 32.
pub fn netmask(prefix_len: u8) -> Ipv4Addr {
    match prefix_len {
        0 => Ipv4Addr::UNSPECIFIED,
        len => Ipv4Addr::from(u32::MAX << (32 - u32::from(len.min(32)))),
    }
}

/// The `rtentry` of a default route via `gateway` on `interface` (`SIOCADDRT`).
/// `interface` must outlive the ioctl: the entry points at it.
pub fn default_route(gateway: Ipv4Addr, interface: &'static CStr) -> libc::rtentry {
    // SAFETY: rtentry is plain data (and a null device pointer); all zeroes is valid.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr_in(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // The kernel only reads the name (it copies it with strncpy_from_user).
    route.rt_dev = interface.as_ptr().cast_mut();
    route
}

/// The text of `/etc/resolv.conf` for one name server.
pub fn resolv_conf(resolver: Ipv4Addr) -> String {
    format!("# written by twinbox-init from the job (the host's resolver)\nnameserver {resolver}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The (family, port, address octets) of a sockaddr built here.
    fn unpack(sa: &libc::sockaddr) -> (i32, u16, [u8; 4]) {
        // SAFETY: every sockaddr here was built from a sockaddr_in of the same size.
        let sin: libc::sockaddr_in = unsafe { std::mem::transmute(*sa) };
        (
            i32::from(sin.sin_family),
            sin.sin_port,
            sin.sin_addr.s_addr.to_ne_bytes(),
        )
    }

    #[test]
    fn the_address_request_names_eth0_and_carries_the_address_in_network_order() {
        let req = ifreq_addr(ETH0, Ipv4Addr::new(10, 201, 0, 2));
        let name: Vec<u8> = req.ifr_name.iter().map(|c| *c as u8).collect();
        assert_eq!(&name[..5], b"eth0\0");
        assert!(name[5..].iter().all(|b| *b == 0), "{name:?}");
        // SAFETY: ifreq_addr wrote the addr member.
        let addr = unsafe { req.ifr_ifru.ifru_addr };
        assert_eq!(unpack(&addr), (libc::AF_INET, 0, [10, 201, 0, 2]));
    }

    #[test]
    fn a_name_too_long_for_ifreq_keeps_its_terminator() {
        let req = ifreq_named(c"an-interface-name-of-20");
        assert_eq!(req.ifr_name[libc::IFNAMSIZ - 1], 0);
        assert_eq!(req.ifr_name[0] as u8, b'a');
    }

    #[test]
    fn netmasks_of_prefix_lengths() {
        assert_eq!(netmask(30), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(1), Ipv4Addr::new(128, 0, 0, 0));
        assert_eq!(netmask(32), Ipv4Addr::BROADCAST);
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(netmask(40), Ipv4Addr::BROADCAST);
    }

    #[test]
    fn the_default_route_goes_via_the_gateway_on_eth0() {
        let route = default_route(Ipv4Addr::new(10, 201, 0, 1), ETH0);
        assert_eq!(unpack(&route.rt_dst), (libc::AF_INET, 0, [0; 4]));
        assert_eq!(unpack(&route.rt_genmask), (libc::AF_INET, 0, [0; 4]));
        assert_eq!(
            unpack(&route.rt_gateway),
            (libc::AF_INET, 0, [10, 201, 0, 1])
        );
        assert_eq!(route.rt_flags, libc::RTF_UP | libc::RTF_GATEWAY);
        // SAFETY: rt_dev points at ETH0, a 'static C string.
        let dev = unsafe { CStr::from_ptr(route.rt_dev) };
        assert_eq!(dev, ETH0);
        assert_eq!(route.rt_metric, 0);
    }

    #[test]
    fn resolv_conf_names_the_one_server() {
        let text = resolv_conf(Ipv4Addr::new(192, 0, 2, 53));
        let servers: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("nameserver"))
            .collect();
        assert_eq!(servers, ["nameserver 192.0.2.53"]);
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn giving_back_clears_only_net_admin_in_each_set() {
        let all = CapData {
            effective: u32::MAX,
            permitted: u32::MAX,
            inheritable: 0x1000,
        };
        let cleared = all.without(CAP_NET_ADMIN % 32);
        assert_eq!(cleared.effective, !(1 << 12));
        assert_eq!(cleared.permitted, !(1 << 12));
        assert_eq!(cleared.inheritable, 0);
    }
}
