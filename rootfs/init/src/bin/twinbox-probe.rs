//! `twinbox-probe`: tries one named attack on the box it runs in and prints the answer,
//! for the lockdown tests (busybox has no applet for most of these system calls).
//!
//! One line on stdout: `<attack> ok` when every step succeeded, `<attack> errno=<N>` when
//! the one call failed, `<attack> errno=<N> at=<step>` for an attack of several steps that
//! stopped at `<step>`. Exit status 0 either way (the line is the result); 125 with one
//! line on stderr for bad usage.
//!
//! Static, std + libc only, like the rest of the image's own binaries
//! (`/usr/bin/twinbox-probe`). Every attack is harmless when it succeeds: `write-back`
//! writes the value it just read, and the namespaces, keys and counters made live only as
//! long as this process.

use std::ffi::CString;

/// The attacks, with their arguments, for the usage line.
const USAGE: &str = "usage: twinbox-probe ATTACK [ARGS]; ATTACK is one of: keyctl, add_key, \
    bpf, perf_event_open, userfaultfd, io_uring_setup, clone3, clone-newuser, unshare-user, \
    unshare-user-mount, mount, mknod-open PATH b|c MAJOR MINOR, write PATH VALUE, \
    write-back PATH";

/// How an attack ended: refused at a step with an errno, or not refused.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Refused {
        step: Option<&'static str>,
        errno: i32,
    },
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `Ok(value)` for a non-negative result, else the step refused with errno.
fn check(r: i64, step: &'static str) -> Result<i64, Outcome> {
    if r < 0 {
        Err(Outcome::Refused {
            step: Some(step),
            errno: errno(),
        })
    } else {
        Ok(r)
    }
}

/// A single-call attack: the call's result as an outcome.
fn single(r: i64) -> Outcome {
    if r < 0 {
        Outcome::Refused {
            step: None,
            errno: errno(),
        }
    } else {
        Outcome::Ok
    }
}

fn cstring(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"))
}

/// The line printed for `name` and its outcome.
fn format_line(name: &str, outcome: &Outcome) -> String {
    match outcome {
        Outcome::Ok => format!("{name} ok"),
        Outcome::Refused { step: None, errno } => format!("{name} errno={errno}"),
        Outcome::Refused {
            step: Some(step),
            errno,
        } => format!("{name} errno={errno} at={step}"),
    }
}

/// Runs the attack named by `args[0]`; `Err` is a usage problem.
fn attack(args: &[String]) -> Result<Outcome, String> {
    let name = args.first().ok_or("no attack named")?.as_str();
    let rest = &args[1..];
    let want = |n: usize| -> Result<(), String> {
        if rest.len() == n {
            Ok(())
        } else {
            Err(format!("{name} takes {n} argument(s), got {}", rest.len()))
        }
    };
    // SAFETY (all `unsafe` below): raw system calls whose pointer arguments point at
    // live, correctly sized data on the stack or in CStrings owned by this function.
    let outcome = match name {
        "keyctl" => {
            want(0)?;
            // KEYCTL_GET_KEYRING_ID of KEY_SPEC_USER_KEYRING, created if missing: the
            // kernel's key store is not namespaced.
            single(unsafe { libc::syscall(libc::SYS_keyctl, 0, -4, 1) })
        }
        "add_key" => {
            want(0)?;
            let (kind, desc, data) = (c"user", c"twinbox-probe", b"x");
            single(unsafe {
                libc::syscall(
                    libc::SYS_add_key,
                    kind.as_ptr(),
                    desc.as_ptr(),
                    data.as_ptr(),
                    data.len(),
                    -2, // KEY_SPEC_PROCESS_KEYRING: gone with this process.
                )
            })
        }
        "bpf" => {
            want(0)?;
            // BPF_MAP_CREATE of a one-entry array map (union bpf_attr's first fields).
            let mut attr = [0u32; 16];
            attr[0] = 2; // BPF_MAP_TYPE_ARRAY
            attr[1] = 4; // key size
            attr[2] = 4; // value size
            attr[3] = 1; // max entries
            single(unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    0,
                    attr.as_ptr(),
                    std::mem::size_of_val(&attr),
                )
            })
        }
        "perf_event_open" => {
            want(0)?;
            // A software cpu-clock counter on this process, user space only: allowed by
            // perf_event_paranoid 2 without any capability, so only seccomp refuses it.
            // struct perf_event_attr in its first published size (PERF_ATTR_SIZE_VER0,
            // 64 bytes; the libc crate has no definition): type PERF_TYPE_SOFTWARE (1) and
            // size in the first word, config PERF_COUNT_SW_CPU_CLOCK (0), and in the flag
            // word exclude_kernel (bit 5) and exclude_hv (bit 6).
            let mut attr = [0u64; 8];
            attr[0] = 1 | (64 << 32);
            attr[5] = (1 << 5) | (1 << 6);
            single(unsafe { libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), 0, -1, -1, 0) })
        }
        "userfaultfd" => {
            want(0)?;
            single(unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) })
        }
        "io_uring_setup" => {
            want(0)?;
            // struct io_uring_params is 120 bytes; zeroed asks for defaults.
            let mut params = [0u8; 120];
            single(unsafe { libc::syscall(libc::SYS_io_uring_setup, 1, params.as_mut_ptr()) })
        }
        "clone3" => {
            want(0)?;
            // A null struct of size 0: EINVAL from the kernel itself, never a process.
            single(unsafe { libc::syscall(libc::SYS_clone3, 0, 0) })
        }
        "clone-newuser" => {
            want(0)?;
            clone_newuser()
        }
        "unshare-user" => {
            want(0)?;
            single(unsafe { libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER) })
        }
        "unshare-user-mount" => {
            want(0)?;
            match unshare_user_mount() {
                Ok(()) => Outcome::Ok,
                Err(refused) => refused,
            }
        }
        "ptrace-init" => {
            want(0)?;
            // SAFETY: PTRACE_SEIZE of PID 1 with no options; refused unless init is
            // dumpable (or we hold CAP_SYS_PTRACE): then nothing is attached.
            single(unsafe { libc::ptrace(libc::PTRACE_SEIZE, 1, 0, 0) as libc::c_long })
        }
        "open-init-fds" => {
            want(0)?;
            // init's descriptors include the marker pipe: whoever opens one for writing can
            // forge phases. Any descriptor that opens counts as a success of the attack.
            let entries = match std::fs::read_dir("/proc/1/fd") {
                Ok(entries) => entries,
                Err(e) => {
                    return Ok(Outcome::Refused {
                        step: Some("list"),
                        errno: e.raw_os_error().unwrap_or(0),
                    })
                }
            };
            let mut last = Outcome::Refused {
                step: Some("list"),
                errno: libc::ENOENT,
            };
            for entry in entries.flatten() {
                match std::fs::OpenOptions::new().write(true).open(entry.path()) {
                    Ok(_) => return Ok(Outcome::Ok),
                    Err(e) => {
                        last = Outcome::Refused {
                            step: Some("open"),
                            errno: e.raw_os_error().unwrap_or(0),
                        }
                    }
                }
            }
            last
        }
        "mount" => {
            want(0)?;
            single(mount_tmpfs(c"/mnt"))
        }
        "mknod-open" => {
            want(4)?;
            let path = cstring(&rest[0])?;
            let kind = match rest[1].as_str() {
                "b" => libc::S_IFBLK,
                "c" => libc::S_IFCHR,
                k => return Err(format!("device kind {k:?}: use b or c")),
            };
            let number = |s: &str| {
                s.parse::<u32>()
                    .map_err(|_| format!("device number {s:?} is not a number"))
            };
            let dev = libc::makedev(number(&rest[2])?, number(&rest[3])?);
            match mknod_open_read(&path, kind, dev) {
                Ok(()) => Outcome::Ok,
                Err(refused) => refused,
            }
        }
        "write" => {
            want(2)?;
            match write_file(&cstring(&rest[0])?, rest[1].as_bytes()) {
                Ok(()) => Outcome::Ok,
                Err(refused) => refused,
            }
        }
        "write-back" => {
            want(1)?;
            let path = cstring(&rest[0])?;
            match std::fs::read(&rest[0]) {
                Ok(value) => match write_file(&path, &value) {
                    Ok(()) => Outcome::Ok,
                    Err(refused) => refused,
                },
                Err(e) => Outcome::Refused {
                    step: Some("read"),
                    errno: e.raw_os_error().unwrap_or(0),
                },
            }
        }
        other => return Err(format!("unknown attack {other:?}")),
    };
    Ok(outcome)
}

/// `clone(CLONE_NEWUSER)` as a fork: a new process in a new user namespace that exits at
/// once.
fn clone_newuser() -> Outcome {
    // SAFETY: without a new stack this is a fork; the child only calls _exit.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong,
            0,
            0,
            0,
            0,
        )
    };
    match pid {
        0 => unsafe { libc::_exit(0) },
        p if p < 0 => single(p),
        p => {
            // SAFETY: reaps the child made above; a null status pointer is allowed.
            unsafe { libc::waitpid(p as libc::pid_t, std::ptr::null_mut(), 0) };
            Outcome::Ok
        }
    }
}

/// `unshare -Urm` and a mount: a user namespace where this process is root, a mount
/// namespace it owns, and tmpfs on /mnt there.
fn unshare_user_mount() -> Result<(), Outcome> {
    // SAFETY: getuid/getgid/unshare take no pointers.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    check(
        unsafe { libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER | libc::CLONE_NEWNS) },
        "unshare",
    )?;
    let refused = |step| {
        move |e: std::io::Error| Outcome::Refused {
            step: Some(step),
            errno: e.raw_os_error().unwrap_or(0),
        }
    };
    std::fs::write("/proc/self/setgroups", "deny").map_err(refused("setgroups"))?;
    std::fs::write("/proc/self/uid_map", format!("0 {uid} 1")).map_err(refused("uid_map"))?;
    std::fs::write("/proc/self/gid_map", format!("0 {gid} 1")).map_err(refused("gid_map"))?;
    check(mount_tmpfs(c"/mnt"), "mount")?;
    Ok(())
}

/// `mount -t tmpfs none TARGET`.
fn mount_tmpfs(target: &std::ffi::CStr) -> i64 {
    // SAFETY: NUL-terminated strings; null data.
    i64::from(unsafe {
        libc::mount(
            c"none".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    })
}

/// Makes a device node, opens it and reads a sector: the path from a device number to the
/// host's disk or /dev/kvm.
fn mknod_open_read(path: &CString, kind: libc::mode_t, dev: libc::dev_t) -> Result<(), Outcome> {
    // SAFETY: path is NUL-terminated.
    check(
        i64::from(unsafe { libc::mknod(path.as_ptr(), kind | 0o600, dev) }),
        "mknod",
    )?;
    // SAFETY: as above; the fd is closed below.
    let fd = check(
        i64::from(unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) }),
        "open",
    )? as libc::c_int;
    let mut sector = [0u8; 512];
    // SAFETY: reads into the stack buffer of its length.
    let r = unsafe { libc::read(fd, sector.as_mut_ptr().cast(), sector.len()) };
    // SAFETY: closes the fd opened above.
    unsafe { libc::close(fd) };
    // /dev/kvm has nothing to read (EINVAL): opening it is the escape, so only a block
    // device's read counts as a step.
    if kind == libc::S_IFBLK {
        check(r as i64, "read")?;
    }
    Ok(())
}

/// Opens `path` for writing and writes `value` in one call.
fn write_file(path: &CString, value: &[u8]) -> Result<(), Outcome> {
    // SAFETY: path is NUL-terminated; the fd is closed below.
    let fd = check(
        i64::from(unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) }),
        "open",
    )? as libc::c_int;
    // SAFETY: writes from `value`, of its length.
    let r = unsafe { libc::write(fd, value.as_ptr().cast(), value.len()) };
    let result = check(r as i64, "write");
    // SAFETY: closes the fd opened above.
    unsafe { libc::close(fd) };
    result.map(|_| ())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match attack(&args) {
        Ok(outcome) => println!("{}", format_line(&args[0], &outcome)),
        Err(e) => {
            eprintln!("twinbox-probe: {e} ({USAGE})");
            std::process::exit(125);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn lines_name_the_attack_errno_and_step() {
        assert_eq!(format_line("bpf", &Outcome::Ok), "bpf ok");
        let refused = Outcome::Refused {
            step: None,
            errno: 1,
        };
        assert_eq!(format_line("bpf", &refused), "bpf errno=1");
        let at_open = Outcome::Refused {
            step: Some("open"),
            errno: 13,
        };
        assert_eq!(
            format_line("mknod-open", &at_open),
            "mknod-open errno=13 at=open"
        );
    }

    #[test]
    fn bad_usage_is_an_error_not_an_attack() {
        assert!(attack(&[]).is_err());
        assert!(attack(&args(&["no-such-attack"])).is_err());
        assert!(attack(&args(&["keyctl", "extra"])).is_err());
        assert!(attack(&args(&["mknod-open", "/x", "z", "1", "2"])).is_err());
        assert!(attack(&args(&["mknod-open", "/x", "c", "ten", "2"])).is_err());
        assert!(attack(&args(&["write", "/x"])).is_err());
    }

    #[test]
    fn clone3_with_a_null_struct_is_refused_by_the_kernel_itself() {
        // Outside any filter: EINVAL (a filter that maps clone3 to ENOSYS shows as 38).
        assert_eq!(
            attack(&args(&["clone3"])),
            Ok(Outcome::Refused {
                step: None,
                errno: libc::EINVAL
            })
        );
    }

    #[test]
    fn write_back_reports_the_failing_step() {
        let missing = "/nonexistent-twinbox-probe/value";
        assert_eq!(
            attack(&args(&["write-back", missing])),
            Ok(Outcome::Refused {
                step: Some("read"),
                errno: libc::ENOENT
            })
        );
    }
}
