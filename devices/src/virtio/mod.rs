//! Virtio over MMIO (transport version 2, "modern", `VIRTIO_F_VERSION_1`) and virtio-blk.
//!
//! - [`VirtioDevice`]: what a device model provides to the transport;
//! - [`mmio::MmioTransport`]: the 0x1000-byte register window the guest driver talks to
//!   ([`crate::bus::BusDevice`] on the MMIO bus);
//! - [`IrqTrigger`]: the interrupt status register plus the eventfd that raises the GSI;
//! - [`block::Block`]: the virtio-blk device, which is also an event-manager subscriber;
//! - [`net::Net`]: virtio-net over a tap ([`net::NetBackend`]), RX/TX queues plus the tap
//!   fd on the event loop, offloads negotiated and set on the tap (wired like the block
//!   device, device type 1, two queues: RX 0, TX 1);
//! - [`rng::Rng`]: virtio-rng from the host's `/dev/urandom` (attached to every VM, the
//!   guest's `/dev/hwrng`; same wiring as the block device, device type 4; the guest kernel
//!   has `CONFIG_HW_RANDOM_VIRTIO`).
//! - [`console::Console`]: virtio-console with MULTIPORT, named ports between host pipe
//!   ends and the guest's `/dev/vport*` (the workload's stdio and the control stream; same
//!   wiring, device type 3, `2 * (ports + 1)` queues, the port fds on the event loop; the
//!   VMM calls [`Console::flush_output`] at teardown; guest kernel:
//!   `CONFIG_VIRTIO_CONSOLE`).
//! - shared by net and console: `iov` (guest buffers as host iovecs for one
//!   `readv`/`writev`) and [`ChainDrop`] / [`DropCounts`] (why a chain was refused).
//!
//! # Threads
//! The vCPU thread only touches registers (through the bus). The guest's queue kicks go to
//! ioeventfds and the device does its I/O on the VMM's event-loop thread (an
//! `event_manager::EventManager`), never on a vCPU thread. Activation (the driver writing
//! DRIVER_OK) happens on the vCPU thread: the transport hands the queues to the device,
//! and the device then writes to its private *activate* eventfd; when the event loop sees
//! it, the device registers its queue eventfds with the loop (and removes them after a
//! reset). The VMM does not have to do anything for that beyond adding the subscriber.
//!
//! # Wiring steps for the VMM (one virtio-blk disk)
//! ```text
//! // 1. The device and its transport.
//! let block = Arc::new(Mutex::new(Block::new(file, read_only, "rootfs")?));
//! let irq = Arc::new(IrqTrigger::new()?);
//! let transport = MmioTransport::new(guest_mem.clone(), block.clone(), irq.clone());
//! // 2. KVM: one ioeventfd per queue, at base + NOTIFY_REG_OFFSET (0x50), 4 bytes,
//! //    datamatch = queue index (u32); and one irqfd for the device's GSI.
//! for (i, evt) in transport.queue_events()?.iter().enumerate() {
//!     vm_fd.register_ioevent(evt, &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET), i as u32)?;
//! }
//! vm_fd.register_irqfd(irq.eventfd(), gsi)?;
//! //    (queue_events() returns dups, so they can be registered and kept by the VMM.)
//! // 3. The MMIO bus: the register window.
//! mmio_bus.insert(base, MMIO_WINDOW_LEN /* 0x1000 */, Arc::new(Mutex::new(transport)))?;
//! // 4. The event loop: the *same* Arc<Mutex<Block>> (event-manager implements
//! //    MutEventSubscriber for Arc<Mutex<T>>), before the vCPUs start.
//! event_manager.add_subscriber(block);   // its init() registers the activate eventfd
//! // 5. The kernel command line (Linux parses "size@base:irq"):
//! cmdline.push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
//! ```
//! Without the ioeventfd (step 2) the transport still works: a write to QueueNotify
//! signals the queue eventfd itself, on the vCPU thread, so the event loop picks it up.
//! The irqfd should be edge-style (no resamplefd): the device writes the eventfd each
//! time it sets a bit in the interrupt status register, and the guest acks via 0x64.
//!
//! # Hostile guests
//! Nothing the driver writes can panic the VMM: bad queue sizes or ring addresses fail
//! activation and the transport then shows DEVICE_NEEDS_RESET; a queue that breaks while
//! running (avail index jumping ahead, ring outside memory) makes the device stop and
//! report DEVICE_NEEDS_RESET (plus a config-change interrupt) until the driver resets it.

pub mod block;
mod chain;
pub mod console;
mod events;
mod iov;
pub mod mmio;
pub mod net;
pub mod rng;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;

use crate::snapshot::{QueueProgress, SnapshotError, VirtioDeviceSnapshot};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use block::{Block, BlockError};
pub use chain::{ChainDrop, DropCounts};
pub use console::{Console, ConsoleCounters, ConsoleError, HostEnd, Port, TYPE_CONSOLE};
pub use mmio::{MmioTransport, MMIO_WINDOW_LEN, NOTIFY_REG_OFFSET};
pub use net::{Net, NetBackend, NetCounters, NetError, TYPE_NET};
pub use rng::{Rng, RngError, TYPE_RNG};

/// Device type: block device (virtio 1.1, 5).
pub const TYPE_BLOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
/// Feature bit: the device complies with virtio 1.0+ (required by this transport).
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit: used/avail event index notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Interrupt status bit: the device used a buffer in some queue.
pub const INTERRUPT_USED_RING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the configuration (or device status) changed.
pub const INTERRUPT_CONFIG_CHANGE: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// The device's interrupt: the InterruptStatus register (read at 0x60, acked at 0x64) and
/// the eventfd the VMM registers as an irqfd for the device's GSI.
pub struct IrqTrigger {
    status: AtomicU32,
    evt: EventFd,
}

impl IrqTrigger {
    /// A trigger with a fresh non-blocking eventfd and nothing pending.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// The eventfd to register as irqfd for the device's GSI.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Sets `bits` ([`INTERRUPT_USED_RING`] / [`INTERRUPT_CONFIG_CHANGE`]) in the status
    /// register and raises the interrupt.
    pub fn trigger(&self, bits: u32) -> io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Tells the driver, after the device stopped on a broken queue, to look at Status,
    /// where it finds DEVICE_NEEDS_RESET (an error is ignored: the device stays stopped
    /// either way).
    pub(crate) fn signal_needs_reset(&self) {
        let _ = self.trigger(INTERRUPT_USED_RING | INTERRUPT_CONFIG_CHANGE);
    }

    /// Sets the InterruptStatus register without raising the interrupt (a restored device:
    /// the guest's interrupt controller state comes back on its own).
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// Clears everything (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// Why a device refused to activate.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The transport passed a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues it was given.
        got: usize,
    },
    /// A queue's size or ring addresses are unusable (not ready, not in guest memory,
    /// misaligned, size not a power of two).
    #[error("virtqueue {index} is invalid (size {size}, desc {desc:#x}, avail {avail:#x}, used {used:#x})")]
    InvalidQueue {
        /// Queue index.
        index: usize,
        /// Its size.
        size: u16,
        /// Descriptor table address.
        desc: u64,
        /// Available ring address.
        avail: u64,
        /// Used ring address.
        used: u64,
    },
    /// The device is already active.
    #[error("device is already active")]
    AlreadyActive,
    /// Signalling the event loop failed.
    #[error("cannot signal activation to the event loop: {0}")]
    Signal(#[source] io::Error),
}

/// A virtio device model, as seen by a transport.
///
/// Lifecycle: created inactive; [`VirtioDevice::activate`] once the driver sets DRIVER_OK
/// (on the vCPU thread); [`VirtioDevice::reset`] when the driver writes 0 to Status,
/// after which it may be activated again.
pub trait VirtioDevice: Send {
    /// Virtio device type (e.g. [`TYPE_BLOCK`]).
    fn device_type(&self) -> u32;

    /// Feature bits the device offers (must include [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;

    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// One eventfd per queue, signalled when the driver notifies that queue. The VMM
    /// registers them as ioeventfds; the transport writes them on QueueNotify writes.
    fn queue_events(&self) -> &[EventFd];

    /// Reads the device-specific configuration space at `offset` (from 0x100 of the
    /// window). Out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device-specific configuration space (ignored where read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device with the negotiated features and the driver's queues (already
    /// checked by the transport: one per queue, ready). The device checks them against
    /// `mem` itself and refuses with an error if unusable.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<IrqTrigger>,
    ) -> Result<(), ActivateError>;

    /// Stops the device and forgets the queues; it may be activated again afterwards.
    fn reset(&mut self);

    /// True once the device found the driver's queues broken at run time and stopped;
    /// the transport then reports DEVICE_NEEDS_RESET in Status.
    fn needs_reset(&self) -> bool {
        false
    }

    /// For a snapshot of a paused VM (no event loop running): each active queue's progress
    /// and the device's own state. Called only while the device is active.
    fn save_state(&self) -> Result<VirtioDeviceSnapshot, SnapshotError> {
        Err(SnapshotError::Unsupported("virtio device"))
    }

    /// Puts back what [`VirtioDevice::save_state`] saved beyond the queues, right after
    /// the transport re-activated the device with the saved queues.
    fn restore_state(&mut self, _state: &VirtioDeviceSnapshot) -> Result<(), SnapshotError> {
        Ok(())
    }
}

/// [`VirtioDevice::save_state`] of a device that holds no chain between events: its
/// queues' positions as they are.
pub(crate) fn queues_progress(queues: &[&Queue]) -> VirtioDeviceSnapshot {
    use virtio_queue::QueueT;
    VirtioDeviceSnapshot {
        queues: queues
            .iter()
            .map(|q| QueueProgress {
                next_avail: q.next_avail(),
                next_used: q.next_used(),
            })
            .collect(),
        ports: Vec::new(),
    }
}

/// Checks the driver's queues at activation: `expected` of them (the device's count),
/// each with rings that fit guest memory `mem`.
pub(crate) fn check_queues(
    queues: &[Queue],
    expected: usize,
    mem: &GuestMemoryMmap,
) -> Result<(), ActivateError> {
    use virtio_queue::QueueT;
    if queues.len() != expected {
        return Err(ActivateError::QueueCount {
            expected,
            got: queues.len(),
        });
    }
    for (index, q) in queues.iter().enumerate() {
        if !q.is_valid(mem) {
            return Err(ActivateError::InvalidQueue {
                index,
                size: q.size(),
                desc: q.desc_table(),
                avail: q.avail_ring(),
                used: q.used_ring(),
            });
        }
    }
    Ok(())
}

/// The `N` queues of a device with a fixed count (blk and rng 1, net 2), checked as by
/// [`check_queues`].
pub(crate) fn valid_queues<const N: usize>(
    queues: Vec<Queue>,
    mem: &GuestMemoryMmap,
) -> Result<[Queue; N], ActivateError> {
    check_queues(&queues, N, mem)?;
    let got = queues.len();
    <[Queue; N]>::try_from(queues).map_err(|_| ActivateError::QueueCount { expected: N, got })
}

/// [`VirtioDevice::read_config`] over a device's config space `config`: the bytes at
/// `offset`, and zero for whatever lies past its end.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    if let Ok(start) = usize::try_from(offset) {
        if start < config.len() {
            let n = data.len().min(config.len() - start);
            data[..n].copy_from_slice(&config[start..start + n]);
        }
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Helpers shared by the virtio tests.

    use std::fs::{File, OpenOptions};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A disk image in the temp directory, removed on drop.
    pub struct TempDisk {
        pub path: PathBuf,
    }

    impl TempDisk {
        /// A new image holding `contents`.
        pub fn new(contents: &[u8]) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "twinbox-devices-test-{}-{}.img",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::write(&path, contents).unwrap();
            Self { path }
        }

        /// Opens it read-write.
        pub fn open(&self) -> File {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&self.path)
                .unwrap()
        }

        /// Its current contents.
        pub fn contents(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }
    }

    impl Drop for TempDisk {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod split_ring;
#[cfg(test)]
mod tests;
