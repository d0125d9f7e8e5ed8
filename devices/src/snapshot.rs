//! Device state for VM snapshots: plain data (serde) that a VMM saves with a paused VM and
//! hands back to freshly built devices of the same kind to continue where they were.
//!
//! Only what the guest can observe is kept: registers, the negotiated features, each
//! queue's rings and progress, and per-device connection state. Host resources (fds,
//! eventfds, pipes) are never in it: the restoring VMM makes its own and the devices keep
//! them. A snapshot is untrusted input (a file on disk): every restore checks it against
//! the device it is given and refuses, with a reason, what does not fit.

use serde::{Deserialize, Serialize};

/// Why a device could not be saved or restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    /// The device is in a state the snapshot cannot carry (e.g. guest output still queued).
    #[error("{device}: cannot be saved now: {why}")]
    Busy {
        /// Which device.
        device: &'static str,
        /// What it holds.
        why: String,
    },
    /// The device kind has no snapshot support.
    #[error("{0}: snapshots are not supported for this device")]
    Unsupported(&'static str),
    /// The saved state does not fit this device.
    #[error("{device}: saved state does not fit: {why}")]
    Mismatch {
        /// Which device.
        device: &'static str,
        /// What does not fit.
        why: String,
    },
}

/// The 8250 UART's registers and receive FIFO (vm-superio's `SerialState`, as data).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// One queue as the driver configured it through the transport's registers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegsSnapshot {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub bad_size: bool,
}

/// How far the device got in one active queue: where it reads the available ring next and
/// where it writes the used ring next. Chains the device had taken but not returned are
/// given back (`next_avail` rewound), so the restored device takes them again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueProgress {
    pub next_avail: u16,
    pub next_used: u16,
}

/// A console port's connection state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSnapshot {
    /// The port's name: a restore checks it is the same port.
    pub name: String,
    /// The driver has the port open.
    pub guest_connected: bool,
    /// Input: the host end had reached its end (PORT_OPEN(id, 0) sent).
    pub eof: bool,
    /// Output: the host end failed; guest data is discarded.
    pub host_gone: bool,
    /// Output: the guest closed the port.
    pub guest_closing: bool,
}

/// What an active virtio device holds besides the transport's registers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceSnapshot {
    /// One per queue, in queue order.
    pub queues: Vec<QueueProgress>,
    /// Console ports, in id order (empty for other devices).
    #[serde(default)]
    pub ports: Vec<PortSnapshot>,
}

/// A virtio-mmio transport and the device behind it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportSnapshot {
    /// The virtio device type, checked at restore.
    pub device_type: u32,
    pub device_status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub acked_beyond_64: bool,
    pub queue_sel: u32,
    pub queues: Vec<QueueRegsSnapshot>,
    /// The InterruptStatus register.
    pub interrupt_status: u32,
    /// The device's own state when it was active (DRIVER_OK).
    pub device: Option<VirtioDeviceSnapshot>,
}

/// The IOAPIC's registers (the model lives in the VMM, the data here beside the others).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoapicSnapshot {
    pub id: u32,
    pub select: u32,
    /// Redirection entries, one per pin.
    pub table: Vec<u64>,
}

/// One device on a bus, by kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BusDeviceSnapshot {
    Serial(SerialSnapshot),
    Ioapic(IoapicSnapshot),
    VirtioMmio(TransportSnapshot),
}

/// Every device of one bus that has state, by base address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusSnapshot {
    pub devices: Vec<(u64, BusDeviceSnapshot)>,
}
