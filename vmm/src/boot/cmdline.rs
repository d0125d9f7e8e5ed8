//! The kernel command line twinbox boots with, built with linux-loader's `Cmdline` (which
//! checks each piece is printable ASCII and keeps the whole under the kernel's limit).
//! The fixed parts are the guest contract in `twinbox_spec::guest_cmdline`, shared with
//! the bench's QEMU peer.

use crate::layout::CMDLINE_MAX_SIZE;
use linux_loader::cmdline::{Cmdline, Error as LoaderError};
use thiserror::Error;
use vm_memory::GuestAddress;

/// Why the command line cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error(
        "kernel command line is {len} bytes, the limit is {max} (the job token grows with the \
         command, its arguments and environment: shorten them or --cmdline-extra)"
    )]
    TooLong { len: usize, max: usize },
    #[error("kernel command line: {0}")]
    Invalid(String),
}

/// A virtio-mmio device as the kernel's `virtio_mmio.device=` parser wants it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioEntry {
    /// Window size in bytes.
    pub size: u64,
    /// MMIO base address.
    pub base: u64,
    /// Interrupt line.
    pub irq: u32,
}

/// A command line being assembled, in the order the pieces are added.
pub struct KernelCmdline {
    line: Cmdline,
    /// Bytes the line would have with everything asked for (the loader stops at the limit
    /// and would not say by how much it was exceeded).
    wanted: usize,
}

impl KernelCmdline {
    /// An empty line limited to the kernel's `COMMAND_LINE_SIZE` (NUL included).
    pub fn new() -> Self {
        Self {
            line: Cmdline::new(CMDLINE_MAX_SIZE).expect("a non-zero capacity"),
            wanted: 0,
        }
    }

    /// Appends space-separated options; blank input adds nothing.
    pub fn push(&mut self, options: &str) -> Result<(), CmdlineError> {
        let options = options.trim();
        if options.is_empty() {
            return Ok(());
        }
        self.wanted += usize::from(self.wanted > 0) + options.len();
        let result = self.line.insert_str(options);
        self.check(result)
    }

    /// Appends a `virtio_mmio.device=` entry.
    pub fn push_virtio_mmio(&mut self, entry: VirtioMmioEntry) -> Result<(), CmdlineError> {
        // The entry as the loader writes it (its windows are whole KiB), for the length
        // in a TooLong message only.
        let text = format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            entry.size >> 10,
            entry.base,
            entry.irq
        );
        self.wanted += usize::from(self.wanted > 0) + text.len();
        let result =
            self.line
                .add_virtio_mmio_device(entry.size, GuestAddress(entry.base), entry.irq, None);
        self.check(result)
    }

    fn check(&self, result: Result<(), LoaderError>) -> Result<(), CmdlineError> {
        result.map_err(|e| match e {
            LoaderError::TooLarge => CmdlineError::TooLong {
                len: self.wanted + 1,
                max: CMDLINE_MAX_SIZE,
            },
            other => CmdlineError::Invalid(other.to_string()),
        })
    }

    /// The finished line (without its NUL).
    pub fn into_string(self) -> Result<String, CmdlineError> {
        let line = self
            .line
            .as_cstring()
            .map_err(|e| CmdlineError::Invalid(e.to_string()))?;
        line.into_string()
            .map_err(|e| CmdlineError::Invalid(e.to_string()))
    }
}

impl Default for KernelCmdline {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinbox_spec::guest_cmdline::BASE;

    /// Joins the parts with single spaces, checked against the kernel's limit.
    fn build(parts: &[&str]) -> Result<String, CmdlineError> {
        let mut line = KernelCmdline::new();
        for part in parts {
            line.push(part)?;
        }
        line.into_string()
    }

    #[test]
    fn parts_are_joined_with_single_spaces() {
        let mut line = KernelCmdline::new();
        line.push(BASE).unwrap();
        line.push("").unwrap();
        line.push(" twinbox.job=abc ").unwrap();
        line.push_virtio_mmio(VirtioMmioEntry {
            size: 0x1000,
            base: 0xd000_0000,
            irq: 5,
        })
        .unwrap();
        let line = line.into_string().unwrap();
        assert!(line.starts_with("console=ttyS0 reboot=k"));
        assert!(line.ends_with("twinbox.job=abc virtio_mmio.device=4K@0xd0000000:5"));
        assert!(!line.contains("  "));
    }

    #[test]
    fn too_long_lines_are_refused_with_their_length() {
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
        assert_eq!(
            build(&[&"x".repeat(2000), &"y".repeat(100)]),
            Err(CmdlineError::TooLong {
                len: 2102,
                max: 2048
            })
        );
    }

    #[test]
    fn non_printable_bytes_are_refused() {
        assert!(matches!(
            build(&["a\u{7f}b"]),
            Err(CmdlineError::Invalid(_))
        ));
        assert!(matches!(build(&["é"]), Err(CmdlineError::Invalid(_))));
    }
}
