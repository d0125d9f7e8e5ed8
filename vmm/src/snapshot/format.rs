//! The snapshot on disk: a directory with `state` (a header line, then the VM's state, both
//! JSON) and `memory` (guest RAM, sparse).
//!
//! The header says what the snapshot is and what it needs (format and twinbox version,
//! CPUID digest, vCPU count, memory size, the root image's identity, the state's SHA-256),
//! so a restore can refuse a mismatch before it builds anything, with one line naming it.
//! JSON keeps the file self-describing (`head -1 DIR/state` shows the header).

use devices::snapshot::BusSnapshot;
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// What the first line's `format` says.
pub const FORMAT_NAME: &str = "twinbox-vm-snapshot";
/// Bumped whenever the state's layout or meaning changes (2: the workload's stdin port is
/// saved open; version 1 saved it at end of input, so its restores read no stdin).
pub const FORMAT_VERSION: u32 = 2;
/// This build's version; a snapshot restores only in the twinbox that wrote it.
pub const TWINBOX_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// Largest state file read (a VM's state is tens of KiB per vCPU).
const MAX_STATE_BYTES: u64 = 64 << 20;

/// Why a snapshot cannot be written or used. Each message is one line.
#[derive(Debug, Error)]
pub enum FormatError {
    #[error("snapshot {dir}: {what}: {source}")]
    Io {
        dir: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("snapshot {0}: not a twinbox snapshot (its state file has no valid header)")]
    NotASnapshot(PathBuf),
    #[error("snapshot {dir}: format version {found}, this twinbox reads version {FORMAT_VERSION} — take the snapshot again")]
    FormatVersion { dir: PathBuf, found: u32 },
    #[error("snapshot {dir}: written by twinbox {found}, this is twinbox {TWINBOX_VERSION} — take the snapshot again")]
    TwinboxVersion { dir: PathBuf, found: String },
    #[error("snapshot {0}: its state is truncated or corrupt (checksum mismatch)")]
    Corrupt(PathBuf),
    #[error("snapshot {dir}: its state does not parse: {why}")]
    BadState { dir: PathBuf, why: String },
    #[error("snapshot {dir}: taken on another CPU model (CPUID differs) — take the snapshot on this host")]
    Cpuid { dir: PathBuf },
    #[error("snapshot {dir}: {what} is {saved}, asked for {asked} — drop --{flag} or use the snapshot's")]
    Size {
        dir: PathBuf,
        what: &'static str,
        flag: &'static str,
        saved: u32,
        asked: u32,
    },
    #[error("snapshot {dir}: the root image {image} changed since the snapshot ({why}) — take the snapshot again")]
    ImageChanged {
        dir: PathBuf,
        image: PathBuf,
        why: String,
    },
    #[error("snapshot {dir}: memory file {why}")]
    Memory { dir: PathBuf, why: String },
}

/// A file's identity: the same file, unchanged (device, inode, size, modification time).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl FileIdentity {
    /// The identity of `path` now.
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(Self {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        })
    }

    /// What differs between `self` (saved) and `now`, if anything.
    pub fn difference(&self, now: &Self) -> Option<String> {
        if (self.dev, self.ino) != (now.dev, now.ino) {
            Some("another file".into())
        } else if self.size != now.size {
            Some(format!("size {} → {}", self.size, now.size))
        } else if self.mtime_ns != now.mtime_ns {
            Some("modified".into())
        } else {
            None
        }
    }
}

/// The first line of the state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub format_version: u32,
    pub twinbox_version: String,
    /// SHA-256 of the normalised CPUID the vCPUs were given (hex).
    pub cpuid_sha256: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The root image the guest has mounted.
    pub rootfs: FileIdentity,
    /// The kernel it booted (for the record: the kernel's code is in memory).
    pub kernel: PathBuf,
    /// The initramfs it booted.
    pub initrd: Option<PathBuf>,
    /// Host CLOCK_REALTIME when the VM was paused: a restore moves the guest's clocks on
    /// by the time since.
    pub paused_realtime_ns: u64,
    /// SHA-256 of the state line (hex).
    pub state_sha256: String,
}

/// One vCPU, as KVM gives it.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    /// (index, value) for every MSR of KVM_GET_MSR_INDEX_LIST that KVM would read.
    pub msrs: Vec<(u32, u64)>,
    /// The guest TSC's frequency.
    pub tsc_khz: Option<u32>,
}

/// The VM's state besides memory.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub vcpus: Vec<VcpuState>,
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// Port I/O devices (serial).
    pub pio: BusSnapshot,
    /// MMIO devices (IOAPIC, virtio-mmio transports).
    pub mmio: BusSnapshot,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The state file's bytes: the header (with the state's checksum filled in), a newline,
/// the state.
pub fn encode(mut header: Header, state: &VmState) -> Result<Vec<u8>, serde_json::Error> {
    let body = serde_json::to_vec(state)?;
    header.state_sha256 = sha256_hex(&body);
    let mut out = serde_json::to_vec(&header)?;
    out.push(b'\n');
    out.extend_from_slice(&body);
    Ok(out)
}

/// Parses and checks a state file's bytes: header first (format, versions), then the
/// checksum, then the state.
pub fn decode(dir: &Path, bytes: &[u8]) -> Result<(Header, VmState), FormatError> {
    let newline = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| FormatError::NotASnapshot(dir.to_owned()))?;
    let (head, body) = (&bytes[..newline], &bytes[newline + 1..]);
    // The name and versions first, from a loose parse: a snapshot of another format
    // version may have another header, and must still be named as such.
    let loose: serde_json::Value =
        serde_json::from_slice(head).map_err(|_| FormatError::NotASnapshot(dir.to_owned()))?;
    if loose.get("format").and_then(|f| f.as_str()) != Some(FORMAT_NAME) {
        return Err(FormatError::NotASnapshot(dir.to_owned()));
    }
    let version = loose
        .get("format_version")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| FormatError::NotASnapshot(dir.to_owned()))?;
    if version != u64::from(FORMAT_VERSION) {
        return Err(FormatError::FormatVersion {
            dir: dir.to_owned(),
            found: version.min(u64::from(u32::MAX)) as u32,
        });
    }
    let header: Header =
        serde_json::from_value(loose).map_err(|_| FormatError::NotASnapshot(dir.to_owned()))?;
    if header.twinbox_version != TWINBOX_VERSION {
        return Err(FormatError::TwinboxVersion {
            dir: dir.to_owned(),
            found: header.twinbox_version,
        });
    }
    if sha256_hex(body) != header.state_sha256 {
        return Err(FormatError::Corrupt(dir.to_owned()));
    }
    let state: VmState = serde_json::from_slice(body).map_err(|e| FormatError::BadState {
        dir: dir.to_owned(),
        why: e.to_string(),
    })?;
    if state.vcpus.len() != header.vcpus as usize {
        return Err(FormatError::BadState {
            dir: dir.to_owned(),
            why: format!(
                "{} vCPU states for {} vCPUs",
                state.vcpus.len(),
                header.vcpus
            ),
        });
    }
    Ok((header, state))
}

/// Writes the state file into `dir` (created if missing) through a temporary name, so a
/// crash never leaves a half-written state under the real name.
pub fn write_state(dir: &Path, bytes: &[u8]) -> Result<(), FormatError> {
    let io = |what| {
        move |source| FormatError::Io {
            dir: dir.to_owned(),
            what,
            source,
        }
    };
    let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
    // A new file (never through a symlink); the rename replaces a name, never follows it.
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::File::options()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("cannot create the state file"))?
    };
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io("cannot write the state file"))?;
    std::fs::rename(&tmp, dir.join(STATE_FILE)).map_err(io("cannot name the state file"))
}

/// Reads and checks the state file of `dir`.
pub fn read_state(dir: &Path) -> Result<(Header, VmState), FormatError> {
    let path = dir.join(STATE_FILE);
    let io = |what| {
        move |source| FormatError::Io {
            dir: dir.to_owned(),
            what,
            source,
        }
    };
    let meta = std::fs::metadata(&path).map_err(io("no state file"))?;
    if meta.len() > MAX_STATE_BYTES {
        return Err(FormatError::NotASnapshot(dir.to_owned()));
    }
    let bytes = std::fs::read(&path).map_err(io("cannot read the state file"))?;
    decode(dir, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::snapshot::{BusDeviceSnapshot, IoapicSnapshot, SerialSnapshot};

    fn header() -> Header {
        Header {
            format: FORMAT_NAME.into(),
            format_version: FORMAT_VERSION,
            twinbox_version: TWINBOX_VERSION.into(),
            cpuid_sha256: "ab".repeat(32),
            vcpus: 1,
            memory_mib: 128,
            rootfs: FileIdentity {
                path: "/images/rootfs.ext4".into(),
                dev: 2049,
                ino: 12,
                size: 1 << 26,
                mtime_ns: 1_700_000_000_123_456_789,
            },
            kernel: "/k/vmlinux".into(),
            initrd: None,
            paused_realtime_ns: 42,
            state_sha256: String::new(),
        }
    }

    fn state() -> VmState {
        let regs = kvm_regs {
            rip: 0xffff_ffff_8100_0000,
            rax: 7,
            ..Default::default()
        };
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[0x20] = 1;
        let clock = kvm_clock_data {
            clock: 123_456_789,
            ..Default::default()
        };
        VmState {
            vcpus: vec![VcpuState {
                regs,
                sregs: Default::default(),
                xsave: Default::default(),
                xcrs: Default::default(),
                debug_regs: Default::default(),
                lapic,
                mp_state: Default::default(),
                events: Default::default(),
                msrs: vec![(0x10, 99), (0x6e0, 5)],
                tsc_khz: Some(2_000_000),
            }],
            clock,
            pio: BusSnapshot {
                devices: vec![(
                    0x3f8,
                    BusDeviceSnapshot::Serial(SerialSnapshot {
                        interrupt_enable: 2,
                        in_buffer: b"hi".to_vec(),
                        ..Default::default()
                    }),
                )],
            },
            mmio: BusSnapshot {
                devices: vec![(
                    0xfec0_0000,
                    BusDeviceSnapshot::Ioapic(IoapicSnapshot {
                        id: 1,
                        select: 0x10,
                        table: vec![0x1_0000; 24],
                    }),
                )],
            },
        }
    }

    #[test]
    fn the_state_comes_back_as_it_was_saved() {
        let bytes = encode(header(), &state()).unwrap();
        let (h, s) = decode(Path::new("/snap"), &bytes).unwrap();
        assert_eq!(h.vcpus, 1);
        assert_eq!(h.rootfs, header().rootfs);
        assert_eq!(h.state_sha256.len(), 64);
        assert_eq!(s.vcpus[0].regs.rip, 0xffff_ffff_8100_0000);
        assert_eq!(s.vcpus[0].regs.rax, 7);
        assert_eq!(s.vcpus[0].lapic.regs[0x20], 1);
        assert_eq!(s.vcpus[0].msrs, vec![(0x10, 99), (0x6e0, 5)]);
        assert_eq!(s.clock.clock, 123_456_789);
        assert_eq!(s.pio, state().pio);
        assert_eq!(s.mmio, state().mmio);
    }

    #[test]
    fn the_header_is_one_readable_json_line() {
        let bytes = encode(header(), &state()).unwrap();
        let line = bytes.split(|&b| b == b'\n').next().unwrap();
        let v: serde_json::Value = serde_json::from_slice(line).unwrap();
        assert_eq!(v["format"], FORMAT_NAME);
        assert_eq!(v["memory_mib"], 128);
    }

    fn reencode_header(bytes: &[u8], change: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let newline = bytes.iter().position(|&b| b == b'\n').unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&bytes[..newline]).unwrap();
        change(&mut v);
        let mut out = serde_json::to_vec(&v).unwrap();
        out.extend_from_slice(&bytes[newline..]);
        out
    }

    #[test]
    fn another_format_or_twinbox_version_is_refused_by_name() {
        let bytes = encode(header(), &state()).unwrap();
        let dir = Path::new("/snap");
        let other = reencode_header(&bytes, |v| v["format_version"] = 99.into());
        let err = decode(dir, &other).err().unwrap();
        assert!(
            matches!(err, FormatError::FormatVersion { found: 99, .. }),
            "{err}"
        );
        let other = reencode_header(&bytes, |v| v["twinbox_version"] = "0.0.1".into());
        let err = decode(dir, &other).err().unwrap();
        assert!(err.to_string().contains("twinbox 0.0.1"), "{err}");
    }

    #[test]
    fn truncated_corrupt_or_random_bytes_are_refused() {
        let bytes = encode(header(), &state()).unwrap();
        let dir = Path::new("/snap");
        let truncated = &bytes[..bytes.len() - 10];
        assert!(matches!(
            decode(dir, truncated),
            Err(FormatError::Corrupt(_))
        ));
        let mut flipped = bytes.clone();
        let last = flipped.len() - 20;
        flipped[last] ^= 1;
        assert!(matches!(
            decode(dir, &flipped),
            Err(FormatError::Corrupt(_))
        ));
        let head_only = &bytes[..40];
        assert!(matches!(
            decode(dir, head_only),
            Err(FormatError::NotASnapshot(_))
        ));
        let random: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        assert!(matches!(
            decode(dir, &random),
            Err(FormatError::NotASnapshot(_))
        ));
        assert!(matches!(
            decode(dir, b""),
            Err(FormatError::NotASnapshot(_))
        ));
    }

    #[test]
    fn a_file_identity_names_what_changed() {
        let a = header().rootfs;
        assert_eq!(a.difference(&a), None);
        let b = FileIdentity {
            size: 5,
            ..a.clone()
        };
        assert!(a.difference(&b).unwrap().contains("size"));
        let c = FileIdentity {
            mtime_ns: 1,
            ..a.clone()
        };
        assert_eq!(a.difference(&c).as_deref(), Some("modified"));
        let d = FileIdentity {
            ino: 1,
            ..a.clone()
        };
        assert_eq!(a.difference(&d).as_deref(), Some("another file"));
    }
}
