//! A network namespace with a link to the host, made by the bench for a peer runtime that
//! joins a namespace given by path (runc's `linux.namespaces[{type: network, path}]`), the
//! way a CNI plugin prepares one for a container engine.
//!
//! The namespace belongs to a thread of the bench that `unshare(CLONE_NEWNET)`s and then
//! only waits: its `/proc/<pid>/task/<tid>/ns/net` is the path handed to the runtime. The
//! link is `hostnet`'s veth for a leased /30 (`eth0` created in the namespace through the
//! thread's id, `tb<i>` on the host); the thread configures `eth0` (address, up, default
//! route via the host) and `lo` from inside with the same ioctls twinbox-init uses. When
//! the [`BoxNet`] is dropped the veth is deleted and the thread ends; the namespace goes
//! with its last user. If the bench is killed, the thread dies with it, the namespace
//! with the runtime's container, the veth with the namespace and the lease with the
//! process: nothing outlives the run.

use std::ffi::CStr;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::mpsc;
use twinbox_spec::LinkInfo;

/// The box end's name inside the namespace.
const ETH0: &CStr = c"eth0";
/// The loopback interface.
const LO: &CStr = c"lo";

/// A network namespace held by a bench thread, with a configured veth link to the host.
#[derive(Debug)]
pub struct BoxNet {
    // Dropped first: deletes the pair while the namespace still exists.
    veth: Option<hostnet::Veth>,
    /// Closing it tells the holder thread to end.
    stop: Option<mpsc::Sender<()>>,
    holder: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
}

/// What the holder thread configures: address, prefix length, gateway.
type Addressing = (Ipv4Addr, u8, Ipv4Addr);

impl BoxNet {
    /// Leases a link for `mode`, makes the namespace and the veth, and configures `eth0`
    /// and `lo` inside; one line saying what failed otherwise.
    pub fn create(mode: twinbox_spec::NetMode) -> Result<Self, String> {
        let (tid_tx, tid_rx) = mpsc::channel::<Result<i32, String>>();
        let (cfg_tx, cfg_rx) = mpsc::channel::<Addressing>();
        let (done_tx, done_rx) = mpsc::channel::<Result<(), String>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let holder = std::thread::Builder::new()
            .name("twinbox-netns".into())
            .spawn(move || hold(tid_tx, cfg_rx, done_tx, stop_rx))
            .map_err(|e| format!("starting the network namespace thread: {e}"))?;
        // From here on Drop ends the thread (and deletes the veth) on every path.
        let mut net = Self {
            veth: None,
            stop: Some(stop_tx),
            holder: Some(holder),
            path: PathBuf::new(),
        };
        let tid = tid_rx
            .recv()
            .map_err(|_| "the network namespace thread ended early".to_string())??;
        net.path = PathBuf::from(format!("/proc/{}/task/{tid}/ns/net", std::process::id()));
        let lease = super::peer::lease_link(mode)?;
        let addressing = (
            lease.box_address(),
            lease.prefix_len(),
            lease.host_address(),
        );
        // IFLA_NET_NS_PID takes a thread id too: the namespace is the holder thread's.
        let veth = hostnet::Veth::create(lease, tid as u32).map_err(|e| format!("veth: {e}"))?;
        net.veth = Some(veth);
        cfg_tx
            .send(addressing)
            .map_err(|_| "the network namespace thread ended early".to_string())?;
        done_rx
            .recv()
            .map_err(|_| "the network namespace thread ended early".to_string())??;
        Ok(net)
    }

    /// The namespace's path, for the runtime's config.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The link, as a box's report records it.
    pub fn link_info(&self) -> Option<LinkInfo> {
        self.veth.as_ref().map(|v| v.link_info(false))
    }
}

impl Drop for BoxNet {
    fn drop(&mut self) {
        drop(self.veth.take());
        drop(self.stop.take());
        if let Some(h) = self.holder.take() {
            let _ = h.join();
        }
    }
}

/// The holder thread: a namespace of its own, its id sent back, `eth0` configured when
/// the addressing arrives, then it waits until told to end (the sender dropped).
fn hold(
    tid_tx: mpsc::Sender<Result<i32, String>>,
    cfg_rx: mpsc::Receiver<Addressing>,
    done_tx: mpsc::Sender<Result<(), String>>,
    stop_rx: mpsc::Receiver<()>,
) {
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
        let _ = tid_tx.send(Err(format!("unshare(CLONE_NEWNET): {e}")));
        return;
    }
    let _ = tid_tx.send(Ok(nix::unistd::gettid().as_raw()));
    let Ok((address, prefix_len, gateway)) = cfg_rx.recv() else {
        return;
    };
    let _ = done_tx.send(configure(address, prefix_len, gateway));
    // Returns when the BoxNet drops the sender.
    let _ = stop_rx.recv();
}

/// `lo` up; `eth0` with `address/prefix_len`, up; default route via `gateway`. Runs in
/// the namespace's thread.
fn configure(address: Ipv4Addr, prefix_len: u8, gateway: Ipv4Addr) -> Result<(), String> {
    // SAFETY: plain socket creation; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by socket() and is owned by nothing else.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    let ioctl = |request: libc::c_ulong, arg: *mut libc::c_void, what: &str| {
        // SAFETY: each request below gets the structure it reads or writes, alive for
        // the call.
        if unsafe { libc::ioctl(fd, request, arg) } < 0 {
            Err(format!("{what}: {}", std::io::Error::last_os_error()))
        } else {
            Ok(())
        }
    };
    let up = |name: &CStr| {
        let mut req = ifreq(name);
        ioctl(
            libc::SIOCGIFFLAGS,
            (&mut req as *mut libc::ifreq).cast(),
            "SIOCGIFFLAGS",
        )?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
        ioctl(
            libc::SIOCSIFFLAGS,
            (&mut req as *mut libc::ifreq).cast(),
            &format!("bringing {} up", name.to_string_lossy()),
        )
    };
    up(LO)?;
    let mut req = ifreq(ETH0);
    req.ifr_ifru.ifru_addr = sockaddr(address);
    ioctl(
        libc::SIOCSIFADDR,
        (&mut req as *mut libc::ifreq).cast(),
        &format!("address {address} on eth0"),
    )?;
    let mask = Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(prefix_len))
            .unwrap_or(0),
    );
    let mut req = ifreq(ETH0);
    req.ifr_ifru.ifru_netmask = sockaddr(mask);
    ioctl(
        libc::SIOCSIFNETMASK,
        (&mut req as *mut libc::ifreq).cast(),
        "netmask on eth0",
    )?;
    up(ETH0)?;
    // SAFETY: rtentry is plain data and a null device pointer; all zeroes is valid.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // The kernel only reads the name, during the call; ETH0 is 'static.
    route.rt_dev = ETH0.as_ptr().cast_mut();
    ioctl(
        libc::SIOCADDRT,
        (&mut route as *mut libc::rtentry).cast(),
        &format!("default route via {gateway}"),
    )
}

/// An `ifreq` naming `name` (shorter than IFNAMSIZ), the rest zero.
fn ifreq(name: &CStr) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all zeroes is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.to_bytes()) {
        *dst = *src as libc::c_char;
    }
    req
}

/// `address` as a `sockaddr` (an AF_INET `sockaddr_in`, same size).
fn sockaddr(address: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(address.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_in_network_order() {
        let sa = sockaddr(Ipv4Addr::new(10, 201, 0, 2));
        // SAFETY: built from a sockaddr_in of the same size just above.
        let sin: libc::sockaddr_in = unsafe { std::mem::transmute(sa) };
        assert_eq!(sin.sin_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(sin.sin_addr.s_addr.to_ne_bytes(), [10, 201, 0, 2]);
        let req = ifreq(ETH0);
        assert_eq!(
            req.ifr_name[..5]
                .iter()
                .map(|c| *c as u8)
                .collect::<Vec<_>>(),
            b"eth0\0"
        );
    }
}
