//! Race-free leases of point-to-point /30 links from an address pool.
//!
//! Link `i` of pool `base/len` is the /30 at `base + 4i`: the host end is `base + 4i + 1`,
//! the box end `base + 4i + 2`. A lease of link `i` is an open file
//! `/run/twinbox/net/<i>.lock` held with `flock(LOCK_EX | LOCK_NB)`. The lock lives in
//! the open file description, so the kernel drops it when the process dies, SIGKILL
//! included: no stale lease can block an index, whatever is left on disk. The index also
//! names the host interfaces (`tb<i>`, `tbt<i>`, `tbn<i>`, `tbnt<i>`: `ifname.rs`), so two
//! runs never race for a name. A lease carries its link's mode (`--net` or `--net nat`),
//! which picks the name and whether the host end forwards.
//!
//! A normal release unlinks the lock file while still holding the lock; a taker therefore
//! checks, once locked, that the path still names the inode it locked and starts over if
//! not (the classic flock + unlink protocol, `twinbox_spec::lease_lock`, which the
//! `--userns` id leases share). After a SIGKILL the file stays, unlocked:
//! the next acquisition may reuse it, and every release tidies such leftovers away under
//! the same protocol (a leftover is a file whose lock can be taken); correctness never
//! depends on that tidying.

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use nix::fcntl::Flock;
use twinbox_spec::lease_lock::{self, IfMissing};
use twinbox_spec::NetMode;

use crate::error::{Error, Result};
use crate::netlink::Rtnl;

/// Where lease lock files live on the host.
pub const LOCK_DIR: &str = "/run/twinbox/net";
/// The environment variable that overrides the pool.
pub const POOL_ENV: &str = "TWINBOX_NET_POOL";
/// The pool used when TWINBOX_NET_POOL is not set.
pub const DEFAULT_POOL: &str = "10.201.0.0/16";
/// Prefix length of every leased link.
pub const LINK_PREFIX_LEN: u8 = 30;
/// The smallest pool accepted (/28: four links).
const SMALLEST_POOL_PREFIX: u8 = 28;

/// A private IPv4 range that links are carved from, as `base/len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool {
    base: Ipv4Addr,
    prefix_len: u8,
}

impl Pool {
    /// The pool from TWINBOX_NET_POOL, or 10.201.0.0/16 when it is unset.
    pub fn from_env() -> Result<Self> {
        match std::env::var(POOL_ENV) {
            Ok(value) => value.parse().map_err(|e| match e {
                Error::BadPool { value, reason } => Error::BadPool {
                    value: value.clone(),
                    reason: format!("{reason} (from {POOL_ENV}={value})"),
                },
                other => other,
            }),
            Err(std::env::VarError::NotPresent) => DEFAULT_POOL.parse(),
            Err(std::env::VarError::NotUnicode(_)) => Err(Error::BadPool {
                value: POOL_ENV.to_string(),
                reason: "not valid UTF-8".into(),
            }),
        }
    }

    /// The pool's network address.
    pub fn base(&self) -> Ipv4Addr {
        self.base
    }

    /// The pool's prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// How many /30 links the pool holds.
    pub fn links(&self) -> u32 {
        1u32 << (LINK_PREFIX_LEN - self.prefix_len)
    }

    /// The (host, box) addresses of link `index`, or None past the end of the pool.
    pub fn link(&self, index: u32) -> Option<(Ipv4Addr, Ipv4Addr)> {
        if index >= self.links() {
            return None;
        }
        let network = u32::from(self.base) + 4 * index;
        Some((Ipv4Addr::from(network + 1), Ipv4Addr::from(network + 2)))
    }

    /// Whether `address` lies inside the pool.
    pub fn contains(&self, address: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix_len);
        u32::from(address) & mask == u32::from(self.base)
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix_len)
    }
}

impl FromStr for Pool {
    type Err = Error;

    /// Parse `a.b.c.d/len`: a network address of RFC 1918 space, /28 or larger.
    fn from_str(text: &str) -> Result<Self> {
        let bad = |reason: String| Error::BadPool {
            value: text.to_string(),
            reason,
        };
        let (address, length) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| bad("expected a CIDR such as 10.201.0.0/16".into()))?;
        let base: Ipv4Addr = address
            .parse()
            .map_err(|_| bad(format!("{address:?} is not an IPv4 address")))?;
        let prefix_len: u8 = length
            .parse()
            .ok()
            .filter(|len| *len <= 32)
            .ok_or_else(|| bad(format!("{length:?} is not a prefix length 0-32")))?;
        if prefix_len > SMALLEST_POOL_PREFIX {
            return Err(bad(format!(
                "too small: /{prefix_len} holds fewer than 4 links of /30; use /{SMALLEST_POOL_PREFIX} or larger"
            )));
        }
        let mask = if prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - prefix_len)
        };
        let network = Ipv4Addr::from(u32::from(base) & mask);
        if network != base {
            return Err(bad(format!(
                "{base} has host bits set for /{prefix_len}; did you mean {network}/{prefix_len}?"
            )));
        }
        let last = Ipv4Addr::from(u32::from(base) | !mask);
        if !(base.is_private() && last.is_private() && same_private_block(base, last)) {
            return Err(bad(
                "not a private range: use part of 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16"
                    .into(),
            ));
        }
        Ok(Self { base, prefix_len })
    }
}

/// Whether two private addresses fall in the same RFC 1918 block (a pool must not straddle
/// from private space into public space, e.g. 172.16.0.0/11).
fn same_private_block(a: Ipv4Addr, b: Ipv4Addr) -> bool {
    let block = |ip: Ipv4Addr| match ip.octets() {
        [10, ..] => 1,
        [172, 16..=31, ..] => 2,
        [192, 168, ..] => 3,
        _ => 0,
    };
    block(a) != 0 && block(a) == block(b)
}

/// One leased link: the lock that reserves it, its index and its two addresses.
/// Dropping it releases the link.
#[derive(Debug)]
pub struct Lease {
    lock: Option<Flock<File>>,
    path: PathBuf,
    pool: Pool,
    mode: NetMode,
    index: u32,
    host: Ipv4Addr,
    guest: Ipv4Addr,
}

impl Lease {
    /// Lease a free link of the pool from TWINBOX_NET_POOL (default 10.201.0.0/16) under
    /// /run/twinbox/net for a box in `mode`, skipping links whose host address is already
    /// on a host interface or any of whose interface names (`ifname::all`) is taken:
    /// leftovers or foreign use. Persistent taps of dead runs are deleted first
    /// ([`crate::tap::sweep_persistent`]).
    pub fn acquire(mode: NetMode) -> Result<Self> {
        let pool = Pool::from_env()?;
        // A killed run's persistent tap would keep its link's index taken for good.
        for line in crate::tap::sweep_persistent() {
            tracing::debug!("{line}");
        }
        let in_use = host_ipv4_addresses()?;
        Self::acquire_with(Path::new(LOCK_DIR), &pool, mode, |index, host| {
            in_use.contains(&host) || crate::ifname::all(index).any(|name| interface_exists(&name))
        })
    }

    /// Lease the first link of `pool` whose lock under `dir` is free and whose host
    /// address is not in `in_use` (addresses already on host interfaces), for a box in
    /// `mode`.
    pub fn acquire_in(dir: &Path, pool: &Pool, mode: NetMode, in_use: &[Ipv4Addr]) -> Result<Self> {
        Self::acquire_with(dir, pool, mode, |_, host| in_use.contains(&host))
    }

    fn acquire_with(
        dir: &Path,
        pool: &Pool,
        mode: NetMode,
        taken: impl Fn(u32, Ipv4Addr) -> bool,
    ) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|source| lock_error(dir, source))?;
        for index in 0..pool.links() {
            let (host, guest) = pool.link(index).expect("index below pool.links()");
            if taken(index, host) {
                tracing::debug!(index, %host, "link skipped: its address or interface name is in use on the host");
                continue;
            }
            let path = dir.join(format!("{index}.lock"));
            if let Some(lock) = try_lock(&path)? {
                tracing::debug!(index, %host, %guest, "link leased");
                return Ok(Self {
                    lock: Some(lock),
                    path,
                    pool: *pool,
                    mode,
                    index,
                    host,
                    guest,
                });
            }
        }
        Err(Error::PoolExhausted {
            pool: pool.to_string(),
            links: pool.links(),
        })
    }

    /// The link's index in the pool; with the mode it names the host interface.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Whether the box behind this link may reach beyond the host (`--net nat`).
    pub fn mode(&self) -> NetMode {
        self.mode
    }

    /// The host's end of the link (the box's gateway).
    pub fn host_address(&self) -> Ipv4Addr {
        self.host
    }

    /// The box's end of the link.
    pub fn box_address(&self) -> Ipv4Addr {
        self.guest
    }

    /// The link's prefix length (30).
    pub fn prefix_len(&self) -> u8 {
        LINK_PREFIX_LEN
    }

    /// The pool the link came from.
    pub fn pool(&self) -> Pool {
        self.pool
    }

    /// What init needs to configure eth0 for this link, with the box's resolver if any.
    pub fn net_config(&self, resolver: Option<Ipv4Addr>) -> twinbox_proto::NetConfig {
        twinbox_proto::NetConfig {
            address: self.guest,
            prefix_len: LINK_PREFIX_LEN,
            gateway: self.host,
            resolver,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Unlink while still locked, so whoever opened the same inode meanwhile sees the
        // path gone once it gets the lock and starts over.
        if let Err(error) = fs::remove_file(&self.path) {
            if error.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), %error, "lease lock file not removed");
            }
        }
        drop(self.lock.take());
        if let Some(dir) = self.path.parent() {
            sweep(dir);
        }
    }
}

/// The lease lock of one link, taken only to clean up after a dead holder: held while
/// it lives, then released the way a lease is (unlink while locked).
#[derive(Debug)]
pub(crate) struct Unheld {
    lock: Option<Flock<File>>,
    path: PathBuf,
}

impl Unheld {
    /// Link `index`'s lock under [`LOCK_DIR`] if no lease holds it (the file is made if
    /// it is missing); None when a live lease has it.
    pub(crate) fn take(index: u32) -> Result<Option<Self>> {
        let dir = Path::new(LOCK_DIR);
        fs::create_dir_all(dir).map_err(|source| lock_error(dir, source))?;
        let path = dir.join(format!("{index}.lock"));
        Ok(try_lock(&path)?.map(|lock| Self {
            lock: Some(lock),
            path,
        }))
    }
}

impl Drop for Unheld {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        drop(self.lock.take());
    }
}

/// Remove the lock files of links nobody holds (left by killed runs). Best effort: a
/// file that cannot be locked is someone's lease and stays.
fn sweep(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_lock = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_suffix(".lock"))
            .is_some_and(|index| index.parse::<u32>().is_ok());
        if !is_lock {
            continue;
        }
        if let Ok(Some(lock)) = lock_existing(&path) {
            match fs::remove_file(&path) {
                Ok(()) => tracing::debug!(path = %path.display(), "stale lease lock removed"),
                Err(error) => {
                    tracing::debug!(path = %path.display(), %error, "stale lease lock kept")
                }
            }
            drop(lock);
        }
    }
}

/// Lock `path`, creating it, without waiting; None when another lease holds it.
fn try_lock(path: &Path) -> Result<Option<Flock<File>>> {
    lease_lock::try_lock(path, IfMissing::Create).map_err(|source| lock_error(path, source))
}

/// Lock `path` if it exists, without waiting; None when it is held or gone.
fn lock_existing(path: &Path) -> Result<Option<Flock<File>>> {
    lease_lock::try_lock(path, IfMissing::Skip).map_err(|source| lock_error(path, source))
}

/// A failure on a lock file or its directory; EACCES/EPERM mean the caller is not root.
fn lock_error(path: &Path, source: io::Error) -> Error {
    match source.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => Error::NotPermitted {
            call: "creating the lease lock",
            interface: path.display().to_string(),
            source,
        },
        _ => Error::LockFile {
            path: path.to_path_buf(),
            source,
        },
    }
}

/// Whether an interface of that name exists in this network namespace.
fn interface_exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// Every IPv4 address on an interface of this network namespace.
pub fn host_ipv4_addresses() -> Result<Vec<Ipv4Addr>> {
    let addresses = Rtnl::open()
        .and_then(|mut rtnl| rtnl.ipv4_addresses())
        .map_err(|source| Error::netlink("RTM_GETADDR dump", "all interfaces", source))?;
    Ok(addresses.into_iter().map(|(_, ip)| ip).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, pipe, ForkResult};
    use std::io::{Read, Write};

    fn pool(text: &str) -> Pool {
        text.parse().expect(text)
    }

    #[test]
    fn the_default_pool_has_16384_links_with_host_1_and_box_2() {
        let pool = pool(DEFAULT_POOL);
        assert_eq!(pool.links(), 16384);
        assert_eq!(
            pool.link(0),
            Some((Ipv4Addr::new(10, 201, 0, 1), Ipv4Addr::new(10, 201, 0, 2)))
        );
        assert_eq!(
            pool.link(16383),
            Some((
                Ipv4Addr::new(10, 201, 255, 253),
                Ipv4Addr::new(10, 201, 255, 254)
            ))
        );
        assert_eq!(pool.link(16384), None);
        assert!(pool.contains(Ipv4Addr::new(10, 201, 7, 9)));
        assert!(!pool.contains(Ipv4Addr::new(10, 202, 0, 1)));
        assert_eq!(pool.to_string(), DEFAULT_POOL);
    }

    #[test]
    fn pools_that_are_public_small_misaligned_or_malformed_are_refused_with_a_reason() {
        for (text, says) in [
            ("8.8.0.0/16", "not a private range"),
            ("172.0.0.0/11", "not a private range"),
            ("10.0.0.0/7", "not a private range"),
            ("0.0.0.0/0", "not a private range"),
            ("10.201.0.0/29", "too small"),
            ("10.201.0.1/16", "did you mean 10.201.0.0/16"),
            ("10.201.0.0", "expected a CIDR"),
            ("10.201.0/16", "not an IPv4 address"),
            ("10.201.0.0/33", "not a prefix length"),
        ] {
            let error = text.parse::<Pool>().expect_err(text).to_string();
            assert!(
                error.contains(says),
                "{text}: {error:?} does not say {says:?}"
            );
            assert!(!error.contains('\n'), "{text}: {error:?} is not one line");
        }
        assert_eq!(pool("192.168.77.0/28").links(), 4);
        assert_eq!(pool("172.31.0.0/16").links(), 16384);
    }

    #[test]
    fn a_bad_twinbox_net_pool_names_the_variable() {
        // The only unit test that touches this variable; nothing else here reads it.
        std::env::set_var(POOL_ENV, "8.8.8.0/24");
        let error = Pool::from_env().expect_err("public pool").to_string();
        std::env::set_var(POOL_ENV, "10.77.0.0/20");
        let custom = Pool::from_env();
        std::env::remove_var(POOL_ENV);
        assert!(error.contains("TWINBOX_NET_POOL=8.8.8.0/24"), "{error}");
        assert!(error.contains("not a private range"), "{error}");
        assert_eq!(custom.expect("a private /20").links(), 1024);
        assert_eq!(Pool::from_env().unwrap().to_string(), DEFAULT_POOL);
    }

    #[test]
    fn leases_take_the_lowest_free_link_and_release_it_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool("10.99.0.0/28");
        let first = Lease::acquire_in(dir.path(), &pool, NetMode::Link, &[]).unwrap();
        let second = Lease::acquire_in(dir.path(), &pool, NetMode::Link, &[]).unwrap();
        assert_eq!((first.index(), second.index()), (0, 1));
        assert_eq!(second.host_address(), Ipv4Addr::new(10, 99, 0, 5));
        assert_eq!(second.box_address(), Ipv4Addr::new(10, 99, 0, 6));
        drop(first);
        assert!(
            !dir.path().join("0.lock").exists(),
            "released lock file left behind"
        );
        let again = Lease::acquire_in(dir.path(), &pool, NetMode::Link, &[]).unwrap();
        assert_eq!(again.index(), 0, "a released link is leased again");
    }

    #[test]
    fn a_link_whose_host_address_is_on_an_interface_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool("10.99.0.0/28");
        let lease = Lease::acquire_in(
            dir.path(),
            &pool,
            NetMode::Link,
            &[Ipv4Addr::new(10, 99, 0, 1)],
        )
        .unwrap();
        assert_eq!(lease.index(), 1);
    }

    #[test]
    fn an_exhausted_pool_is_one_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool("10.99.0.0/28");
        let _held: Vec<Lease> = (0..4)
            .map(|_| Lease::acquire_in(dir.path(), &pool, NetMode::Link, &[]).unwrap())
            .collect();
        let error = Lease::acquire_in(dir.path(), &pool, NetMode::Link, &[])
            .expect_err("pool of 4 is full");
        assert_eq!(
            error.to_string(),
            "address pool 10.99.0.0/28 exhausted: 4 links in use (set TWINBOX_NET_POOL to a larger private CIDR)"
        );
    }

    #[test]
    fn a_lock_file_left_by_a_killed_holder_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("0.lock"), b"").unwrap();
        let lease =
            Lease::acquire_in(dir.path(), &pool("10.99.0.0/28"), NetMode::Link, &[]).unwrap();
        assert_eq!(lease.index(), 0);
    }

    #[test]
    fn a_release_sweeps_lock_files_nobody_holds_and_keeps_held_ones() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool("10.99.0.0/24");
        let held = Lease::acquire_in(dir.path(), &pool, NetMode::Link, &[]).unwrap();
        let released = Lease::acquire_in(dir.path(), &pool, NetMode::Link, &[]).unwrap();
        for stale in ["5.lock", "9.lock"] {
            fs::write(dir.path().join(stale), b"").unwrap();
        }
        fs::write(dir.path().join("notes.txt"), b"").unwrap();
        drop(released);
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["0.lock", "notes.txt"],
            "held lock or foreign file touched, or stale kept"
        );
        assert_eq!(held.index(), 0);
    }

    #[test]
    fn net_config_points_the_box_at_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let lease =
            Lease::acquire_in(dir.path(), &pool("10.99.0.0/28"), NetMode::Link, &[]).unwrap();
        let resolver = Some(Ipv4Addr::new(192, 0, 2, 53));
        assert_eq!(
            lease.net_config(resolver),
            twinbox_proto::NetConfig {
                address: Ipv4Addr::new(10, 99, 0, 2),
                prefix_len: 30,
                gateway: Ipv4Addr::new(10, 99, 0, 1),
                resolver,
            }
        );
    }

    /// Eight forked children acquire at the same instant (released by one pipe write) and
    /// each reports its index, holding its lease until the parent has all eight.
    #[test]
    fn eight_concurrent_processes_get_eight_distinct_links() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool("10.99.0.0/24");
        let channel = || {
            let (read, write) = pipe().unwrap();
            (File::from(read), File::from(write))
        };
        let (mut go_read, mut go_write) = channel();
        let (mut done_read, mut done_write) = channel();
        let (mut report_read, mut report_write) = channel();
        let mut children = Vec::new();
        for _ in 0..8 {
            // SAFETY: the child runs only this block and leaves by _exit. glibc's malloc
            // is fork-safe, and the child takes no lock another harness thread could hold.
            match unsafe { fork() }.unwrap() {
                ForkResult::Child => {
                    let mut byte = [0u8; 1];
                    let _ = go_read.read(&mut byte);
                    let code = match Lease::acquire_in(dir.path(), &pool, NetMode::Link, &[]) {
                        Ok(lease) => {
                            let _ = report_write.write_all(&lease.index().to_le_bytes());
                            let _ = done_read.read(&mut byte);
                            drop(lease);
                            0
                        }
                        Err(_) => 1,
                    };
                    // SAFETY: _exit ends the child without running the parent's atexit
                    // handlers or destructors.
                    unsafe { libc::_exit(code) };
                }
                ForkResult::Parent { child } => children.push(child),
            }
        }
        drop(report_write);
        go_write.write_all(&[1u8; 8]).unwrap();
        let mut indices = Vec::new();
        for _ in 0..8 {
            let mut bytes = [0u8; 4];
            report_read
                .read_exact(&mut bytes)
                .expect("a child exited without reporting a lease");
            indices.push(u32::from_le_bytes(bytes));
        }
        done_write.write_all(&[1u8; 8]).unwrap();
        for child in children {
            assert_eq!(waitpid(child, None).unwrap(), WaitStatus::Exited(child, 0));
        }
        indices.sort_unstable();
        assert_eq!(indices, (0..8).collect::<Vec<u32>>(), "leases overlapped");
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "lock files left after release: {left:?}");
    }
}
