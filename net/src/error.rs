//! The one error type of the crate: every variant names the interface, the call and the
//! errno, and its message says what a user can do about it.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while giving a box its network.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel refused a network change: the caller lacks CAP_NET_ADMIN.
    #[error(
        "--net needs CAP_NET_ADMIN: {call} on {interface} was refused ({source}); run as root"
    )]
    NotPermitted {
        /// The netlink request or ioctl that was refused.
        call: &'static str,
        /// The interface it was for.
        interface: String,
        /// The errno (EPERM or EACCES).
        source: io::Error,
    },
    /// A netlink request failed for another reason.
    #[error("netlink {call} on {interface}: {source}")]
    Netlink {
        /// The request (`RTM_NEWLINK veth`, `RTM_NEWADDR`, ...).
        call: &'static str,
        /// The interface it was for.
        interface: String,
        /// The errno from the kernel's NLMSG_ERROR, or from the socket.
        source: io::Error,
    },
    /// The host end of the link already exists: a foreign interface with our name.
    #[error("interface {interface} already exists on the host (not made by this run); delete it with `ip link del {interface}`")]
    InterfaceExists {
        /// The interface name.
        interface: String,
    },
    /// The process whose network namespace should receive the veth end is gone.
    #[error(
        "veth {interface}: no process {pid} to take the box end (its network namespace is gone)"
    )]
    NoSuchNamespace {
        /// The host end's name.
        interface: String,
        /// The pid that was given.
        pid: u32,
    },
    /// The tun driver is not there.
    #[error("/dev/net/tun missing: modprobe tun ({source})")]
    TunMissing {
        /// The error from opening /dev/net/tun.
        source: io::Error,
    },
    /// An ioctl on the tap failed.
    #[error("{call} on tap {interface}: {source}")]
    Tap {
        /// The ioctl (`TUNSETIFF`, `TUNSETVNETHDRSZ`, `TUNSETOFFLOAD`).
        call: &'static str,
        /// The tap's name.
        interface: String,
        /// The errno.
        source: io::Error,
    },
    /// TWINBOX_NET_POOL (or a pool given in code) is not usable.
    #[error("address pool {value:?}: {reason}")]
    BadPool {
        /// The text that was given.
        value: String,
        /// What is wrong with it and what would do.
        reason: String,
    },
    /// Every link of the pool is leased or its host address is in use on the host.
    #[error("address pool {pool} exhausted: {links} links in use (set TWINBOX_NET_POOL to a larger private CIDR)")]
    PoolExhausted {
        /// The pool, as CIDR.
        pool: String,
        /// How many links it has.
        links: u32,
    },
    /// A lease lock file could not be created, opened or locked.
    #[error("lease lock {path}: {source}")]
    LockFile {
        /// The lock file or its directory.
        path: PathBuf,
        /// The errno.
        source: io::Error,
    },
    /// The `nft` binary is not installed.
    #[error("--net nat needs the nft command: install the nftables package ({source})")]
    NftMissing {
        /// The error from spawning `nft`.
        source: io::Error,
    },
    /// `nft` ran and rejected the table.
    #[error("nft {action} table ip twinbox: {detail}")]
    Nft {
        /// What was being done (`apply`, `remove`, `list`).
        action: &'static str,
        /// nft's own message.
        detail: String,
    },
    /// The note that twinbox turned `ip_forward` on could not be written, read or removed.
    #[error("{}: {source} (twinbox's note that it turned ip_forward on)", path.display())]
    ForwardingNote {
        /// The note's path ([`crate::nat::FORWARDING_NOTE`]).
        path: PathBuf,
        /// The errno.
        source: io::Error,
    },
    /// A sysctl could not be written.
    #[error("{}: {source}", path.display())]
    Sysctl {
        /// The /proc/sys path.
        path: PathBuf,
        /// The errno.
        source: io::Error,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Sort a failed netlink request into "not permitted" or a plain netlink error.
    pub(crate) fn netlink(call: &'static str, interface: &str, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => Error::NotPermitted {
                call,
                interface: interface.to_string(),
                source,
            },
            _ => Error::Netlink {
                call,
                interface: interface.to_string(),
                source,
            },
        }
    }

    /// Sort a failed tap ioctl into "not permitted" or a plain tap error.
    pub(crate) fn tap(call: &'static str, interface: &str, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => Error::NotPermitted {
                call,
                interface: interface.to_string(),
                source,
            },
            _ => Error::Tap {
                call,
                interface: interface.to_string(),
                source,
            },
        }
    }
}
