//! The kernel command line twinbox boots with.

use crate::layout::CMDLINE_MAX_SIZE;
use thiserror::Error;

/// Why the command line cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error(
        "kernel command line is {len} bytes, the limit is {max} (the job token grows with the \
         command, its arguments and environment: shorten them or --cmdline-extra)"
    )]
    TooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL or non-ASCII byte")]
    Invalid,
}

/// The fixed part: serial console, reset through the i8042 (`reboot=k`), reboot at once on
/// panic, quiet, read-only ext4 root on the first virtio-blk device, twinbox-init as init.
pub const BASE: &str = "console=ttyS0 reboot=k panic=-1 quiet root=/dev/vda ro rootfstype=ext4 \
                        init=/sbin/twinbox-init";

/// Extra options the PVM host needs (see docs/vm-on-pvm.md): no speculative-execution
/// mitigations (they issue `verw`, which PVM's emulator cannot run) and no KASLR.
pub const PVM_EXTRA: &str = "mitigations=off noxsave clearcpuid=popcnt,rdtscp,invpcid,smap";

/// A virtio-mmio device entry as the kernel's `virtio_mmio.device=` parser wants it.
pub fn virtio_mmio_device(size: u64, base: u64, irq: u32) -> String {
    format!("virtio_mmio.device={}K@{base:#x}:{irq}", size >> 10)
}

/// Joins the parts and checks the length (with its NUL) against the kernel's limit.
pub fn build(parts: &[&str]) -> Result<String, CmdlineError> {
    let line = parts
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if !line.is_ascii() || line.contains('\0') {
        return Err(CmdlineError::Invalid);
    }
    if line.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(CmdlineError::TooLong {
            len: line.len() + 1,
            max: CMDLINE_MAX_SIZE,
        });
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_joined_with_single_spaces() {
        let line = build(&[
            BASE,
            "",
            " twinbox.job=abc ",
            &virtio_mmio_device(0x1000, 0xd000_0000, 5),
        ])
        .unwrap();
        assert!(line.starts_with("console=ttyS0 reboot=k"));
        assert!(line.ends_with("twinbox.job=abc virtio_mmio.device=4K@0xd0000000:5"));
        assert!(!line.contains("  "));
    }

    #[test]
    fn too_long_lines_are_refused() {
        let long = "x".repeat(3000);
        assert_eq!(
            build(&[&long]),
            Err(CmdlineError::TooLong {
                len: 3001,
                max: 2048
            })
        );
        assert!(build(&[&"x".repeat(2047)]).is_ok());
        assert!(build(&[&"x".repeat(2048)]).is_err());
    }
}
