//! The VM's stdio channel: named virtio-console ports between the VMM and `twinbox-init`.
//!
//! The VMM gives the guest one virtio-console device with `VIRTIO_CONSOLE_F_MULTIPORT` and
//! the four ports of [`PORTS`], in that order (the index is the port id). The guest kernel
//! shows each as `/dev/vport<dev>p<id>`, its name in `/sys/class/virtio-ports/*/name`.
//!
//! - [`PORT_CONTROL`]: host → guest, a stream of [`Frame`]s: first the [`Frame::Job`]
//!   (so a job is not capped by the kernel command line), then [`Frame::WindowSize`]
//!   whenever the host terminal is resized (`-t`). Nothing flows guest → host yet.
//! - [`PORT_STDIN`]: host → guest, the workload's stdin bytes. End of input is the host
//!   closing the port (`VIRTIO_CONSOLE_PORT_OPEN` 0), which the guest reads as EOF.
//! - [`PORT_STDOUT`], [`PORT_STDERR`]: guest → host, the workload's output bytes. The
//!   guest closing the port (every fd of it closed) is EOF on the host side.
//!
//! The kernel command line then carries [`PORTS_CMDLINE_FLAG`] instead of
//! `twinbox.job=TOKEN`, telling init to read its job from the control port. Init's own
//! messages and the kernel log stay on the serial console, never on the workload's stdout.
//!
//! A guest booted by another VMM (a bench peer) has no such device: its job is on the
//! command line and the workload writes to the serial console, as before.

use crate::job::{Job, JobError};
use std::fmt;

/// Host → guest frames: the job, then window sizes.
pub const PORT_CONTROL: &str = "twinbox.control";
/// Host → guest: the workload's stdin.
pub const PORT_STDIN: &str = "twinbox.stdin";
/// Guest → host: the workload's stdout.
pub const PORT_STDOUT: &str = "twinbox.stdout";
/// Guest → host: the workload's stderr.
pub const PORT_STDERR: &str = "twinbox.stderr";
/// The ports in id order.
pub const PORTS: [&str; 4] = [PORT_CONTROL, PORT_STDIN, PORT_STDOUT, PORT_STDERR];

/// Kernel command-line word: "the job comes over the control port".
pub const PORTS_CMDLINE_FLAG: &str = "twinbox.ports=1";

/// Largest frame payload accepted (a job of 16 MiB is far beyond any `ARG_MAX`).
pub const MAX_FRAME_PAYLOAD: u32 = 16 << 20;

const KIND_JOB: u8 = 1;
const KIND_WINDOW_SIZE: u8 = 2;

/// One message on the control port. Wire form: kind (1 byte), payload length (u32 LE),
/// payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// The job, as its [`Job::encode`] token.
    Job(Job),
    /// The host terminal's size, for the workload's pty (`TIOCSWINSZ`).
    WindowSize { rows: u16, cols: u16 },
}

/// Why a frame cannot be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// An unknown frame kind.
    UnknownKind(u8),
    /// A payload longer than [`MAX_FRAME_PAYLOAD`].
    TooLong(u32),
    /// A window-size payload that is not 4 bytes.
    BadWindowSize,
    /// The job inside does not decode.
    Job(JobError),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownKind(k) => write!(f, "control frame of unknown kind {k}"),
            Self::TooLong(n) => write!(f, "control frame of {n} bytes is too long"),
            Self::BadWindowSize => write!(f, "window-size frame is not 4 bytes"),
            Self::Job(err) => write!(f, "job frame: {err}"),
        }
    }
}

impl std::error::Error for FrameError {}

impl Frame {
    /// The frame's bytes on the wire.
    pub fn encode(&self) -> Result<Vec<u8>, JobError> {
        let (kind, payload) = match self {
            Self::Job(job) => (KIND_JOB, job.encode()?.into_bytes()),
            Self::WindowSize { rows, cols } => {
                let mut p = rows.to_le_bytes().to_vec();
                p.extend_from_slice(&cols.to_le_bytes());
                (KIND_WINDOW_SIZE, p)
            }
        };
        let mut out = Vec::with_capacity(5 + payload.len());
        out.push(kind);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }
}

/// Reassembles frames from a byte stream read in arbitrary pieces.
#[derive(Debug, Default)]
pub struct FrameReader {
    pending: Vec<u8>,
}

impl FrameReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the port.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. After an error the
    /// stream cannot be trusted any more; the caller stops reading it.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let Some(&kind) = self.pending.first() else {
            return Ok(None);
        };
        if kind != KIND_JOB && kind != KIND_WINDOW_SIZE {
            return Err(FrameError::UnknownKind(kind));
        }
        let Some(len) = self.pending.get(1..5) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes"));
        if len > MAX_FRAME_PAYLOAD {
            return Err(FrameError::TooLong(len));
        }
        let end = 5 + len as usize;
        if self.pending.len() < end {
            return Ok(None);
        }
        let payload: Vec<u8> = self.pending.drain(..end).skip(5).collect();
        match kind {
            KIND_JOB => {
                let token =
                    String::from_utf8(payload).map_err(|_| FrameError::Job(JobError::NotBase64))?;
                Job::decode(&token).map(Frame::Job).map_err(FrameError::Job)
            }
            _ => {
                let raw: [u8; 4] = payload
                    .as_slice()
                    .try_into()
                    .map_err(|_| FrameError::BadWindowSize)?;
                Ok(Frame::WindowSize {
                    rows: u16::from_le_bytes([raw[0], raw[1]]),
                    cols: u16::from_le_bytes([raw[2], raw[3]]),
                })
            }
        }
        .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_any_split_of_the_stream() {
        let mut job = Job::new(["/bin/sh", "-c", &"x".repeat(5000)]);
        job.tty = true;
        let frames = [
            Frame::Job(job),
            Frame::WindowSize {
                rows: 40,
                cols: 120,
            },
        ];
        let wire: Vec<u8> = frames.iter().flat_map(|f| f.encode().unwrap()).collect();
        for piece in [1, 3, 7, 4096, wire.len()] {
            let mut reader = FrameReader::new();
            let mut got = Vec::new();
            for chunk in wire.chunks(piece) {
                reader.feed(chunk);
                while let Some(frame) = reader.next_frame().unwrap() {
                    got.push(frame);
                }
            }
            assert_eq!(got, frames, "pieces of {piece}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let cases: [(&[u8], FrameError); 3] = [
            (&[9, 0, 0, 0, 0], FrameError::UnknownKind(9)),
            (&[1, 0xff, 0xff, 0xff, 0xff], FrameError::TooLong(u32::MAX)),
            (&[2, 3, 0, 0, 0, 1, 2, 3], FrameError::BadWindowSize),
        ];
        for (bytes, want) in cases {
            let mut reader = FrameReader::new();
            reader.feed(bytes);
            assert_eq!(reader.next_frame(), Err(want));
        }
        let mut reader = FrameReader::new();
        reader.feed(&[1, 2, 0, 0, 0, b'!', b'!']);
        assert!(matches!(reader.next_frame(), Err(FrameError::Job(_))));
    }
}
