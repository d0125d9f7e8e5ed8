//! `--userns`: the container gets its own user namespace whose ids 0..[`SIZE`] are a
//! range of host ids leased for this run alone ([`IdLease`]), so container root is not
//! host root, and no one else's ids either.
//!
//! **Whose ids.** A fixed range (it was 100000–165535) is the `/etc/subuid` range
//! `useradd` gives a host's first user, who would then own every `--userns` workload
//! (same host uid: signal it, ptrace it, read its /proc), and every run would share it
//! with every other. So each run leases its own [`SIZE`] ids from twinbox's block,
//! [`BLOCK_START`] up to [`BLOCK_END`] (0x7000_0000..0x7FFE_0000, a range systemd's
//! UIDS-GIDS.md leaves unused: above its container ranges, below its "foreign" range and
//! the ids some programs read as negative; above `useradd`'s subordinate ids, which end at
//! 600100000). A slot is skipped if any id of it is in `/etc/subuid`, `/etc/subgid`,
//! `/etc/passwd` or `/etc/group`, read at each lease ([`taken`], [`free_slots`]).
//!
//! **Held for the run's life.** A slot is leased by an exclusive `flock` on
//! `/run/twinbox/userns/<first id>.lock`, opened close-on-exec (the container's init never
//! holds it): the kernel drops it when the holder dies, so a SIGKILLed CLI frees its lease
//! at once, and two runs at the same time hold two slots, whose ids are disjoint. The run
//! holds the lease until its child is reaped; a released lease unlinks its file while
//! still locked, a killed run's file is unlinked by the next lease (as `hostnet`'s leases).
//! But a lock file left by a killed run does not prove its box gone: the CLI's death
//! releases the flock at once, while the box's processes may live on a while (the pid
//! namespace is torn down asynchronously; a process in D state waits). So a slot whose file
//! is found unheld is free only when no process of the host has a uid or gid in it (the
//! `Uid:`/`Gid:` lines of every `/proc/<pid>/status`, read only when such a file is found,
//! [`status_ids`]); else its file stays and the next slot is taken.
//!
//! The container's files take no leased id to disk: its upper layer is a tmpfs that goes
//! with the run, and the image, layers and disks are idmapped mounts (container root
//! writes as host root there).
//!
//! **The limit.** Only those four files are read: ids that other name services hand out
//! (SSSD, whose AD id mapping defaults to 200000–2000200000 and so covers the whole block,
//! LDAP, winbind, shadow's `subid:` service in nsswitch.conf) are not seen. On such a host
//! keep twinbox's block out of the service's ranges (SSSD: `ldap_idmap_range_min`/`_max`),
//! or list the ids it uses inside the block in `/etc/subuid` under a placeholder name
//! (`sssd:1879048192:1000000`) so that twinbox skips them — `--userns`'s help says so.
//!
//! The image (or an OCI image's layer binds) and the extra disks arrive as detached mounts
//! made by the parent (`detached.rs`); here they are idmapped to the container's user
//! namespace once that exists (host uid 0 in the image then shows as uid 0 inside, not as
//! `nobody`). Everything else of the plan (tmpfs, overlay, proc, sysfs, devpts, binds) is
//! allowed to the namespace's root; over layers the overlay takes `userxattr`
//! (`plan::Lower::UsernsLayers`), since that root cannot read `trusted.overlay.*`.

use crate::detached::{self, MountAttr, MOUNT_ATTR_IDMAP};
use crate::sweep::STAGING_ROOT;
use crate::Error;
use nix::fcntl::Flock;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use twinbox_spec::lease_lock::{self, IfMissing};

/// Number of ids mapped: a whole 16-bit id space, `nobody` (65534) included.
pub const SIZE: u32 = 65_536;
/// First host id of twinbox's block.
pub const BLOCK_START: u32 = 0x7000_0000;
/// End (exclusive) of twinbox's block: systemd's "foreign" range starts here.
pub const BLOCK_END: u32 = 0x7FFE_0000;
/// Where the leases' lock files live (a tmpfs: nothing survives a reboot).
pub const LEASE_DIR: &str = "/run/twinbox/userns";

/// The files whose ids a lease must not overlap.
const ID_FILES: [&str; 4] = ["/etc/subuid", "/etc/subgid", "/etc/passwd", "/etc/group"];

/// Ids already given to someone, as half-open ranges `[start, end)`: every `name:start:count`
/// of the subordinate id files, and every uid and gid of the user and group databases
/// (`name:x:id:...`, field 3 of both, and field 4, the primary group, of passwd). Lines that
/// do not parse are skipped (a comment, a NIS `+` line, a number that is no 32-bit id).
/// Ids are 32-bit; the ends are computed in 64 bits, so no line can overflow them.
pub fn taken(subuid: &str, subgid: &str, passwd: &str, group: &str) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    for line in subuid.lines().chain(subgid.lines()) {
        let mut fields = line.trim().split(':');
        let (_, Some(start), Some(count)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if let (Ok(start), Ok(count)) = (start.parse::<u32>(), count.parse::<u32>()) {
            ranges.push((u64::from(start), u64::from(start) + u64::from(count)));
        }
    }
    for (text, fields) in [(passwd, &[2usize, 3][..]), (group, &[2usize][..])] {
        for line in text.lines() {
            let parts: Vec<&str> = line.trim().split(':').collect();
            for &i in fields {
                if let Some(Ok(id)) = parts.get(i).map(|f| f.parse::<u32>()) {
                    ranges.push((u64::from(id), u64::from(id) + 1));
                }
            }
        }
    }
    ranges
}

/// The uids and gids of one `/proc/<pid>/status` (real, effective, saved and filesystem ids
/// of its `Uid:` and `Gid:` lines).
pub fn status_ids(status: &str) -> Vec<u32> {
    status
        .lines()
        .filter_map(|line| {
            line.strip_prefix("Uid:")
                .or_else(|| line.strip_prefix("Gid:"))
        })
        .flat_map(|ids| ids.split_whitespace().filter_map(|id| id.parse().ok()))
        .collect()
}

/// Whether any of `ids` lies in the slot starting at `base`.
pub fn slot_in_use(base: u32, ids: &[u32]) -> bool {
    let (start, end) = (u64::from(base), u64::from(base) + u64::from(SIZE));
    ids.iter().any(|&id| (start..end).contains(&u64::from(id)))
}

/// Every uid and gid a process of the host has now (a process that goes while read is
/// skipped).
fn host_ids() -> Vec<u32> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if !entry.file_name().as_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        if let Ok(status) = std::fs::read_to_string(entry.path().join("status")) {
            ids.extend(status_ids(&status));
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The first ids of the slots of twinbox's block that overlap none of `taken`, lowest first.
pub fn free_slots(taken: &[(u64, u64)]) -> impl Iterator<Item = u32> + '_ {
    (BLOCK_START..BLOCK_END)
        .step_by(SIZE as usize)
        .filter(move |&base| {
            let (start, end) = (u64::from(base), u64::from(base) + u64::from(SIZE));
            taken.iter().all(|&(s, e)| e <= start || s >= end)
        })
}

/// A range of [`SIZE`] host ids, this run's alone while held (see the module doc).
#[derive(Debug)]
pub struct IdLease {
    base: u32,
    /// The locked lock file and its path; `None` only for the tests' recording double.
    lock: Option<(Flock<File>, PathBuf)>,
}

impl IdLease {
    /// Leases the lowest free slot of twinbox's block.
    pub fn acquire() -> Result<Self, Error> {
        let read = |path: &str| match std::fs::read_to_string(path) {
            Ok(text) => Ok(text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(Error::os(
                format!("read {path} (--userns leases ids none of it holds)"),
                e,
            )),
        };
        let [subuid, subgid, passwd, group] = ID_FILES.map(read);
        let taken = taken(&subuid?, &subgid?, &passwd?, &group?);
        let dir = Path::new(LEASE_DIR);
        // The box (a host uid with no rights over root's inodes) walks /run/twinbox/ctr for
        // its mount plan: that and /run/twinbox 0755 whatever the umask (DirBuilder's mode
        // is masked by it); the lease files root's alone.
        for path in [dir.parent().unwrap_or(dir), Path::new(STAGING_ROOT)] {
            hostnet::rundir::ensure(path)
                .map_err(|e| Error::os(format!("create {} (0755)", path.display()), e))?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(Error::os(format!("create {}", dir.display()), e));
            }
            _ => {}
        }
        let lease = Self::acquire_in(dir, &taken, host_ids)?;
        tracing::debug!(base = lease.base, "user namespace ids leased");
        Ok(lease)
    }

    /// Leases the lowest slot free of `taken` under `dir`, after sweeping the lock files no
    /// one holds. A slot whose file is found there unheld (a killed run's) is taken only if
    /// none of `host_ids` lies in it; `host_ids` is called once, and only then.
    fn acquire_in(
        dir: &Path,
        taken: &[(u64, u64)],
        host_ids: impl FnOnce() -> Vec<u32>,
    ) -> Result<Self, Error> {
        let mut host_ids = Some(host_ids);
        let mut ids: Option<Vec<u32>> = None;
        let mut in_use = |base: u32| {
            let ids =
                ids.get_or_insert_with(|| host_ids.take().map(|read| read()).unwrap_or_default());
            slot_in_use(base, ids)
        };
        sweep(dir, &mut in_use);
        for base in free_slots(taken) {
            let path = dir.join(format!("{base}.lock"));
            let found = std::fs::symlink_metadata(&path).is_ok();
            let Some(lock) = lock(&path, !found)? else {
                continue;
            };
            if found && in_use(base) {
                tracing::debug!(base, "slot skipped: a killed run's box still has its ids");
                continue;
            }
            return Ok(Self {
                base,
                lock: Some((lock, path)),
            });
        }
        Err(Error::Setup(format!(
            "--userns: every range of {SIZE} ids in {BLOCK_START}..{BLOCK_END} is leased by a \
             running container or given out in {}",
            ID_FILES.join(", ")
        )))
    }

    /// A lease of `base` that holds no lock, for the recording double.
    #[cfg(test)]
    pub(crate) fn unheld(base: u32) -> Self {
        Self { base, lock: None }
    }

    /// The `uid_map`/`gid_map` line: container 0.. → host `base`...
    pub fn map_line(&self) -> String {
        format!("0 {} {SIZE}\n", self.base)
    }
}

impl Drop for IdLease {
    fn drop(&mut self) {
        // Unlink while still locked: a run waiting on this file then finds it gone and
        // takes a new one (`lock`), never a file that someone else also locks.
        if let Some((lock, path)) = self.lock.take() {
            let _ = std::fs::remove_file(&path);
            drop(lock);
        }
    }
}

/// Locks `path` exclusively without waiting (creating it if `create`): `None` if someone
/// holds it, or if it was unlinked or replaced while we locked it.
fn lock(path: &Path, create: bool) -> Result<Option<Flock<File>>, Error> {
    let if_missing = if create {
        IfMissing::Create
    } else {
        IfMissing::Skip
    };
    lease_lock::try_lock(path, if_missing)
        .map_err(|e| Error::os(format!("lock {}", path.display()), e))
}

/// Unlinks the lock files no one holds (left by killed runs), but not one whose slot
/// `in_use` says a process still has ids of (given the slot's first id, from the file's
/// name `<first id>.lock`). Best effort.
fn sweep(dir: &Path, in_use: &mut impl FnMut(u32) -> bool) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if let Ok(Some(lock)) = lock(&path, false) {
            let base = entry
                .file_name()
                .to_str()
                .and_then(|name| name.strip_suffix(".lock"))
                .and_then(|base| base.parse::<u32>().ok());
            if base.is_some_and(&mut *in_use) {
                continue;
            }
            let _ = std::fs::remove_file(&path);
            drop(lock);
        }
    }
}

/// One detached mount to idmap: what it is (for errors) and its fd.
pub struct Detached<'a> {
    /// Names the mount in error messages.
    pub what: String,
    /// The detached mount (read-only, nodev, nosuid already where they belong).
    pub fd: &'a OwnedFd,
}

/// Writes the child's uid and gid maps (the ids of `lease`), then idmaps the detached mounts
/// (the image or its layers, the extra disks) to the child's user namespace so their files
/// keep their owners inside.
pub fn map(pid: i32, lease: &IdLease, mounts: &[Detached<'_>]) -> Result<(), Error> {
    for file in ["uid_map", "gid_map"] {
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, lease.map_line())
            .map_err(|e| Error::os(format!("write {path}"), e))?;
    }
    let path = format!("/proc/{pid}/ns/user");
    let ns = std::fs::File::open(&path).map_err(|e| Error::os(format!("open {path}"), e))?;
    for mount in mounts {
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_IDMAP,
            attr_clr: 0,
            propagation: 0,
            userns_fd: ns.as_raw_fd() as u64,
        };
        detached::set_attr(
            mount.fd,
            &attr,
            &format!("idmap {} to the container's user namespace", mount.what),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `useradd` writes for a host's first two users, and a hand-made range.
    const SUBUID: &str = "alice:100000:65536\nbob:165536:65536\n# comment\n";

    #[test]
    fn the_map_gives_the_leased_range_to_container_root() {
        assert_eq!(
            IdLease::unheld(BLOCK_START).map_line(),
            "0 1879048192 65536\n"
        );
    }

    #[test]
    fn slots_lie_in_twinbox_s_block_aligned_and_whole() {
        let slots: Vec<u32> = free_slots(&[]).collect();
        assert_eq!(slots.first(), Some(&BLOCK_START));
        assert_eq!(slots.len(), ((BLOCK_END - BLOCK_START) / SIZE) as usize);
        let last = *slots.last().unwrap();
        assert!(u64::from(last) + u64::from(SIZE) <= u64::from(BLOCK_END));
        assert!(slots.iter().all(|b| b % SIZE == 0));
    }

    #[test]
    fn a_subordinate_range_inside_the_block_is_never_leased() {
        // useradd's ranges lie below the block; a hand-made one over its first two slots.
        let subuid = format!("{SUBUID}svc:{BLOCK_START}:{}\n", 2 * SIZE);
        let taken = taken(&subuid, SUBUID, "", "");
        assert_eq!(
            taken[..3],
            [
                (100_000, 165_536),
                (165_536, 231_072),
                (u64::from(BLOCK_START), u64::from(BLOCK_START + 2 * SIZE))
            ]
        );
        assert_eq!(free_slots(&taken).next(), Some(BLOCK_START + 2 * SIZE));
        // Without it, useradd's ranges alone leave the block's first slot free.
        assert_eq!(
            free_slots(&self::taken(SUBUID, SUBUID, "", "")).next(),
            Some(BLOCK_START)
        );
    }

    #[test]
    fn ids_beyond_32_bits_are_skipped_and_nothing_overflows() {
        let subuid = "big:18446744073709551615:2\nneg:-1:2\ntop:4294967295:4294967295\n";
        let passwd = "u:x:4294967296:0::/:/bin/sh\nv:x:4294967295:4294967295::/:/bin/sh\n";
        let taken = taken(subuid, "", passwd, "");
        assert_eq!(
            taken,
            [
                (4_294_967_295, 8_589_934_590),
                (0, 1),
                (4_294_967_295, 4_294_967_296),
                (4_294_967_295, 4_294_967_296),
            ]
        );
        assert_eq!(free_slots(&taken).next(), Some(BLOCK_START));
    }

    #[test]
    fn a_process_s_ids_are_its_uid_and_gid_lines() {
        let status = "Name:\tsh\nUid:\t1879048192\t1879048192\t1879048192\t1879048193\n\
                      Gid:\t1879113727\t0\t0\t0\nGroups:\t5\n";
        let ids = status_ids(status);
        assert_eq!(
            ids,
            [
                1_879_048_192,
                1_879_048_192,
                1_879_048_192,
                1_879_048_193,
                1_879_113_727,
                0,
                0,
                0
            ]
        );
        assert!(slot_in_use(BLOCK_START, &ids));
        assert!(
            !slot_in_use(BLOCK_START + SIZE, &ids),
            "65535 past the base is the last"
        );
        assert!(slot_in_use(BLOCK_START, &[BLOCK_START + SIZE - 1]));
        assert!(!slot_in_use(BLOCK_START, &[BLOCK_START - 1, 0, u32::MAX]));
    }

    /// A directory of lock files for `acquire_in`, removed on drop.
    struct LeaseDir(PathBuf);

    impl LeaseDir {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("twinbox-userns-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn file(&self, base: u32) -> PathBuf {
            self.0.join(format!("{base}.lock"))
        }
    }

    impl Drop for LeaseDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_killed_run_s_slot_is_reused_only_when_no_process_has_its_ids() {
        let dir = LeaseDir::new("stale");
        let first = BLOCK_START;
        // A killed run's lock file, unheld, and a process of its box still alive.
        std::fs::write(dir.file(first), "").unwrap();
        let lease = IdLease::acquire_in(&dir.0, &[], || vec![0, first + 5]).unwrap();
        assert_eq!(
            lease.base,
            first + SIZE,
            "the killed run's ids were handed out again"
        );
        assert!(
            dir.file(first).exists(),
            "the sweep unlinked a slot still in use"
        );
        drop(lease);
        assert!(
            !dir.file(first + SIZE).exists(),
            "a released lease keeps its file"
        );
        // Its box gone: the slot is free again, and its file reused.
        let lease = IdLease::acquire_in(&dir.0, &[], Vec::new).unwrap();
        assert_eq!(lease.base, first);
        drop(lease);
        assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 0);
    }

    #[test]
    fn processes_are_not_read_when_no_lock_file_is_left() {
        let dir = LeaseDir::new("clean");
        let held = IdLease::acquire_in(&dir.0, &[], || panic!("/proc read")).unwrap();
        let next = IdLease::acquire_in(&dir.0, &[], || panic!("/proc read")).unwrap();
        assert_eq!((held.base, next.base), (BLOCK_START, BLOCK_START + SIZE));
    }

    #[test]
    fn a_slot_overlapping_any_listed_id_is_skipped() {
        let b = BLOCK_START;
        // A subuid range over the first slot's end and the second's start, a subgid range
        // inside the third, a user of the fourth, a group of the fifth, a primary group of
        // the sixth: the seventh is the first free.
        let subuid = format!("x:{}:2\n", b + SIZE - 1);
        let subgid = format!("y:{}:10\n", b + 2 * SIZE + 100);
        let passwd = format!(
            "u:x:{}:0::/:/bin/sh\nv:x:1000:{}::/:/bin/sh\n",
            b + 3 * SIZE,
            b + 5 * SIZE + 65_535
        );
        let group = format!("g:x:{}:\n+nis\n", b + 4 * SIZE + 7);
        let taken = taken(&subuid, &subgid, &passwd, &group);
        assert_eq!(free_slots(&taken).next(), Some(b + 6 * SIZE));
        // A range ending exactly where a slot starts does not touch it.
        let taken = [(0, u64::from(b))];
        assert_eq!(free_slots(&taken).next(), Some(b));
    }

    #[test]
    fn a_block_given_out_whole_leaves_no_slot() {
        let subuid = format!("z:{BLOCK_START}:{}\n", BLOCK_END - BLOCK_START);
        assert_eq!(free_slots(&taken(&subuid, "", "", "")).next(), None);
    }

    #[test]
    fn a_held_lock_file_is_not_taken_and_a_released_one_is_unlinked() {
        let dir = LeaseDir::new("sweep");
        let path = dir.0.join("1.lock");
        let held = lock(&path, true).unwrap().expect("a new file locks");
        assert!(lock(&path, true).unwrap().is_none(), "locked twice");
        sweep(&dir.0, &mut |_| false);
        assert!(path.exists(), "the sweep took a held lease");
        drop(held);
        sweep(&dir.0, &mut |_| false);
        assert!(!path.exists(), "the sweep left a lease no one holds");
    }
}
