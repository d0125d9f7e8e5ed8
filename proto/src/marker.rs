//! Phase markers: how `twinbox-init` tells the host which phase it reached.
//!
//! A marker is one little-endian `u32`: the low 8 bits are a [`PhaseCode`], the upper 24
//! bits a payload (the workload's [`ExitCode`] for `WorkloadExited`). In the VM init writes
//! it with `outl` to [`MARKER_PORT`] and the VMM timestamps the `KVM_EXIT_IO`; in the
//! container init writes the same 4 bytes to an inherited pipe and the runtime timestamps
//! the read. The host, never the guest clock, stamps every phase.

use std::fmt;

/// The I/O port of the marker device in the VM.
///
/// Chosen because no Linux driver probes it: the PC legacy ranges (PIC, PIT, keyboard,
/// RTC, DMA, IDE 0x170/0x1f0, serial 0x2e8/0x2f8/0x3e8/0x3f8, parallel, VGA, floppy,
/// PCI 0xcf8) all lie elsewhere, and it is below 0x400 so that init can reach it through
/// `ioperm` (the TSS I/O bitmap), which works even where IOPL=3 is unavailable.
pub const MARKER_PORT: u16 = 0x0120;

/// The phases that init reports. The values are wire format: never renumber.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PhaseCode {
    /// PID 1 is running and has mounted what it needs.
    InitStarted = 1,
    /// The workload process has been forked and is about to `execve`.
    WorkloadStarted = 2,
    /// The workload exited; the payload is its [`ExitCode`].
    WorkloadExited = 3,
    /// Init could not set up or run the job; the payload is an errno.
    InitFailed = 4,
}

impl PhaseCode {
    fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::InitStarted),
            2 => Some(Self::WorkloadStarted),
            3 => Some(Self::WorkloadExited),
            4 => Some(Self::InitFailed),
            _ => None,
        }
    }
}

/// How the workload ended, as carried in a `WorkloadExited` payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitCode {
    /// Exited normally with this status (0..=255).
    Exited(u8),
    /// Killed by this signal number.
    Signaled(u8),
}

const SIGNALED_FLAG: u32 = 0x100;

impl ExitCode {
    /// Converts a raw `waitpid` status into an exit code.
    pub fn from_wait_status(status: i32) -> Self {
        // WIFSIGNALED: low 7 bits are the signal, neither 0 nor 0x7f.
        let signal = status & 0x7f;
        if signal != 0 && signal != 0x7f {
            Self::Signaled(signal as u8)
        } else {
            Self::Exited(((status >> 8) & 0xff) as u8)
        }
    }

    /// The status a shell would report: the code, or 128 + signal.
    pub fn shell_status(self) -> i32 {
        match self {
            Self::Exited(code) => i32::from(code),
            Self::Signaled(signal) => 128 + i32::from(signal),
        }
    }

    fn to_payload(self) -> u32 {
        match self {
            Self::Exited(code) => u32::from(code),
            Self::Signaled(signal) => SIGNALED_FLAG | u32::from(signal),
        }
    }

    fn from_payload(payload: u32) -> Option<Self> {
        match payload {
            0..=0xff => Some(Self::Exited(payload as u8)),
            p if p & !0xff == SIGNALED_FLAG => Some(Self::Signaled((p & 0xff) as u8)),
            _ => None,
        }
    }
}

impl fmt::Display for ExitCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited(code) => write!(f, "exit status {code}"),
            Self::Signaled(signal) => write!(f, "killed by signal {signal}"),
        }
    }
}

/// One decoded marker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Marker {
    InitStarted,
    WorkloadStarted,
    WorkloadExited(ExitCode),
    /// Init failed before or while starting the workload; carries an errno.
    InitFailed(u32),
}

/// A marker value that does not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkerError(pub u32);

impl fmt::Display for MarkerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown phase marker value {:#010x}", self.0)
    }
}

impl std::error::Error for MarkerError {}

impl Marker {
    /// The phase this marker reports.
    pub fn phase(self) -> PhaseCode {
        match self {
            Self::InitStarted => PhaseCode::InitStarted,
            Self::WorkloadStarted => PhaseCode::WorkloadStarted,
            Self::WorkloadExited(_) => PhaseCode::WorkloadExited,
            Self::InitFailed(_) => PhaseCode::InitFailed,
        }
    }

    /// Encodes the marker as the `u32` that goes on the wire.
    pub fn encode(self) -> u32 {
        let payload = match self {
            Self::InitStarted | Self::WorkloadStarted => 0,
            Self::WorkloadExited(code) => code.to_payload(),
            Self::InitFailed(errno) => errno & 0x00ff_ffff,
        };
        (payload << 8) | self.phase() as u32
    }

    /// Decodes a wire value; unknown codes and malformed payloads are errors, because a
    /// hostile guest can write anything to the port.
    pub fn decode(value: u32) -> Result<Self, MarkerError> {
        let payload = value >> 8;
        match PhaseCode::from_u8((value & 0xff) as u8) {
            Some(PhaseCode::InitStarted) if payload == 0 => Ok(Self::InitStarted),
            Some(PhaseCode::WorkloadStarted) if payload == 0 => Ok(Self::WorkloadStarted),
            Some(PhaseCode::WorkloadExited) => ExitCode::from_payload(payload)
                .map(Self::WorkloadExited)
                .ok_or(MarkerError(value)),
            Some(PhaseCode::InitFailed) => Ok(Self::InitFailed(payload)),
            _ => Err(MarkerError(value)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_marker_round_trips() {
        let mut markers = vec![
            Marker::InitStarted,
            Marker::WorkloadStarted,
            Marker::InitFailed(2),
        ];
        for code in 0..=255u8 {
            markers.push(Marker::WorkloadExited(ExitCode::Exited(code)));
        }
        for signal in 1..=64u8 {
            markers.push(Marker::WorkloadExited(ExitCode::Signaled(signal)));
        }
        for marker in markers {
            assert_eq!(Marker::decode(marker.encode()), Ok(marker), "{marker:?}");
        }
    }

    #[test]
    fn wire_values_are_stable() {
        assert_eq!(Marker::InitStarted.encode(), 0x01);
        assert_eq!(Marker::WorkloadStarted.encode(), 0x02);
        assert_eq!(Marker::WorkloadExited(ExitCode::Exited(7)).encode(), 0x0703);
        assert_eq!(
            Marker::WorkloadExited(ExitCode::Signaled(9)).encode(),
            0x01_0903
        );
    }

    #[test]
    fn garbage_is_rejected() {
        for value in [0, 5, 0xff, 0x0101, 0x0201, 0x0fff_ff03, u32::MAX] {
            assert!(Marker::decode(value).is_err(), "{value:#x}");
        }
    }

    #[test]
    fn wait_status_decoding_matches_libc_layout() {
        assert_eq!(ExitCode::from_wait_status(0), ExitCode::Exited(0));
        assert_eq!(ExitCode::from_wait_status(7 << 8), ExitCode::Exited(7));
        assert_eq!(ExitCode::from_wait_status(255 << 8), ExitCode::Exited(255));
        assert_eq!(ExitCode::from_wait_status(9), ExitCode::Signaled(9));
        assert_eq!(ExitCode::from_wait_status(9 | 0x80), ExitCode::Signaled(9)); // core dumped
        assert_eq!(ExitCode::Signaled(15).shell_status(), 143);
    }
}
