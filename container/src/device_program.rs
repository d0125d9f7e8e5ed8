//! The device allowlist on cgroup v2: a `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to
//! the run's cgroup, the way runc and crun do it there (v2 has no `devices.allow` file).
//!
//! The kernel runs the program on every open and mknod of a device node by a task of the
//! cgroup, with `struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; }`
//! (`access_type` = access << 16 | type); it allows when the program returns 1. Ours
//! allows exactly what the v1 rules say: read and write (never mknod) of a character
//! device with one of the listed numbers. The program is a dozen instructions assembled
//! here — no BPF toolchain, no library — and the verifier checks it on load.

use crate::cgroup::DeviceRule;
use crate::Error;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// One `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

// Opcodes (classic + eBPF encodings of <linux/bpf_common.h>, <linux/bpf.h>).
const LDX_MEM_W: u8 = 0x61;
const ALU64_MOV_X: u8 = 0xbf;
const ALU64_MOV_K: u8 = 0xb7;
const ALU64_AND_K: u8 = 0x57;
const ALU64_RSH_K: u8 = 0x77;
const JMP_JNE_K: u8 = 0x55;
const JMP_JA: u8 = 0x05;
const JMP_EXIT: u8 = 0x95;

/// `BPF_DEVCG_DEV_CHAR`.
const DEV_CHAR: i32 = 2;
/// `BPF_DEVCG_ACC_READ | BPF_DEVCG_ACC_WRITE`.
const ACC_READ_WRITE: i32 = 2 | 4;

const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_ATTACH: libc::c_int = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;

/// The program for `rules`: deny unless a character device, read/write only, listed.
pub fn program(rules: &[DeviceRule]) -> Vec<Insn> {
    // r1 = ctx. r2 = access, r3 = type, r4 = major, r5 = minor.
    let mut p = vec![
        insn(LDX_MEM_W, 2, 1, 0, 0),
        insn(ALU64_MOV_X, 3, 2, 0, 0),
        insn(ALU64_AND_K, 3, 0, 0, 0xffff),
        insn(ALU64_RSH_K, 2, 0, 0, 16),
        insn(LDX_MEM_W, 4, 1, 4, 0),
        insn(LDX_MEM_W, 5, 1, 8, 0),
    ];
    // Jumps to "deny" and "allow" are patched once their places are known.
    let mut to_deny = vec![p.len()];
    p.push(insn(JMP_JNE_K, 3, 0, 0, DEV_CHAR));
    p.push(insn(ALU64_AND_K, 2, 0, 0, !ACC_READ_WRITE));
    to_deny.push(p.len());
    p.push(insn(JMP_JNE_K, 2, 0, 0, 0));
    let mut to_allow = Vec::new();
    for rule in rules {
        match rule.minor {
            Some(minor) => {
                p.push(insn(JMP_JNE_K, 4, 0, 2, rule.major as i32));
                p.push(insn(JMP_JNE_K, 5, 0, 1, minor as i32));
            }
            None => p.push(insn(JMP_JNE_K, 4, 0, 1, rule.major as i32)),
        }
        to_allow.push(p.len());
        p.push(insn(JMP_JA, 0, 0, 0, 0));
    }
    let deny = p.len();
    p.push(insn(ALU64_MOV_K, 0, 0, 0, 0));
    p.push(insn(JMP_EXIT, 0, 0, 0, 0));
    let allow = p.len();
    p.push(insn(ALU64_MOV_K, 0, 0, 0, 1));
    p.push(insn(JMP_EXIT, 0, 0, 0, 0));
    for (jumps, target) in [(to_deny, deny), (to_allow, allow)] {
        for at in jumps {
            p[at].off = (target - at - 1) as i16;
        }
    }
    p
}

/// The head of `union bpf_attr` for `BPF_PROG_LOAD`.
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

/// The head of `union bpf_attr` for `BPF_PROG_ATTACH`.
#[repr(C)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

fn load(insns: &[Insn], log: Option<&mut [u8]>) -> std::io::Result<OwnedFd> {
    let (log_level, log_size, log_buf) = match log {
        Some(buf) => (1, buf.len() as u32, buf.as_mut_ptr() as u64),
        None => (0, 0, 0),
    };
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: c"Apache-2.0".as_ptr() as u64,
        log_level,
        log_size,
        log_buf,
        kern_version: 0,
        prog_flags: 0,
    };
    // SAFETY: bpf(2) with an attr of the size given, pointing at live instructions, a
    // NUL-terminated license and (optionally) a log buffer of the size given.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr,
            std::mem::size_of::<ProgLoad>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: bpf returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Loads the program for `rules` and attaches it to the cgroup v2 directory `cgroup`. The
/// attachment lives as long as the cgroup; no descriptor needs to be kept.
pub fn attach(cgroup: &Path, rules: &[DeviceRule]) -> Result<(), Error> {
    let insns = program(rules);
    let prog = load(&insns, None).map_err(|e| {
        // Ask again with the verifier's log, for a message that says why.
        let mut log = vec![0u8; 16 * 1024];
        let _ = load(&insns, Some(&mut log));
        let text = String::from_utf8_lossy(&log);
        let text = text.trim_end_matches('\0').trim();
        Error::os(
            format!("load the device allowlist program (verifier: {text:?})"),
            e,
        )
    })?;
    let dir = std::fs::File::open(cgroup)
        .map_err(|e| Error::os(format!("open {}", cgroup.display()), e))?;
    let attr = ProgAttach {
        target_fd: dir.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: 0,
    };
    // SAFETY: bpf(2) BPF_PROG_ATTACH with an attr of the size given naming our fds.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &attr,
            std::mem::size_of::<ProgAttach>(),
        )
    };
    if r != 0 {
        return Err(Error::os(
            format!("attach the device allowlist to {}", cgroup.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program on one access, as the kernel would (a tiny interpreter of the
    /// instructions `program` emits).
    fn allows(p: &[Insn], kind: i32, access: i32, major: u32, minor: u32) -> bool {
        let ctx = [((access << 16) | kind) as u32, major, minor];
        let mut r = [0i64; 11];
        let mut pc = 0;
        loop {
            let i = p[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            pc += 1;
            match i.code {
                LDX_MEM_W => {
                    assert_eq!(src, 1, "loads only from the context");
                    r[dst] = i64::from(ctx[i.off as usize / 4]);
                }
                ALU64_MOV_X => r[dst] = r[src],
                ALU64_MOV_K => r[dst] = i64::from(i.imm),
                ALU64_AND_K => r[dst] &= i64::from(i.imm),
                ALU64_RSH_K => r[dst] = ((r[dst] as u64) >> i.imm) as i64,
                JMP_JNE_K => {
                    if r[dst] != i64::from(i.imm) {
                        pc = (pc as i64 + i64::from(i.off)) as usize;
                    }
                }
                JMP_JA => pc = (pc as i64 + i64::from(i.off)) as usize,
                JMP_EXIT => return r[0] == 1,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    #[test]
    fn only_listed_character_devices_for_read_and_write() {
        let rules = [
            DeviceRule {
                major: 1,
                minor: Some(3),
            },
            DeviceRule {
                major: 136,
                minor: None,
            },
        ];
        let p = program(&rules);
        let (read, write, mknod) = (2, 4, 1);
        assert!(allows(&p, DEV_CHAR, read, 1, 3));
        assert!(allows(&p, DEV_CHAR, read | write, 1, 3));
        assert!(allows(&p, DEV_CHAR, write, 136, 7));
        assert!(!allows(&p, DEV_CHAR, mknod, 1, 3), "mknod never");
        assert!(!allows(&p, DEV_CHAR, read | mknod, 1, 3));
        assert!(!allows(&p, DEV_CHAR, read, 1, 5), "another minor");
        assert!(!allows(&p, DEV_CHAR, read, 10, 232), "/dev/kvm");
        assert!(
            !allows(&p, 1, read, 1, 3),
            "a block device of the same numbers"
        );
        assert!(!allows(&p, 1, read, 254, 0), "the host's disk");
        let none = program(&[]);
        assert!(!allows(&none, DEV_CHAR, read, 1, 3));
    }
}
