//! virtio-blk (virtio 1.1, 5.2) backed by a host file.
//!
//! One request queue of up to [`QUEUE_SIZE`] entries. Offered features: VERSION_1,
//! FLUSH, SEG_MAX, EVENT_IDX, and RO for read-only disks. Requests: IN, OUT (IOERR on a
//! read-only disk), FLUSH (fdatasync), GET_ID; anything else completes with UNSUPP.
//! Request parsing and the I/O itself are in [`request`]; this file holds the device
//! state and its event-loop side (`MutEventSubscriber`).

pub mod request;

use std::fs::File;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::events::DeviceEvents;
use super::{
    read_config_bytes, valid_queues, ActivateError, IrqTrigger, VirtioDevice, INTERRUPT_USED_RING,
    TYPE_BLOCK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use request::Disk;

/// Maximum (and offered) size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes in a virtio-blk sector, whatever the host's block size.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID answer (VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = 20;

/// Why a block device cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing file's size cannot be read.
    #[error("cannot stat the disk image: {0}")]
    Metadata(#[source] std::io::Error),
    /// The backing file's size is not a whole number of 512-byte sectors.
    #[error("disk image size {0} is not a multiple of 512 bytes")]
    UnalignedSize(u64),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The id is longer than the 20 bytes GET_ID can return.
    #[error("block device id {0:?} is longer than 20 bytes")]
    IdTooLong(String),
}

/// What the device holds between DRIVER_OK and reset.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<IrqTrigger>,
    event_idx: bool,
}

/// A virtio-blk device. Share it as `Arc<Mutex<Block>>` between the MMIO transport and
/// the event manager (see the wiring steps in [`crate::virtio`]).
pub struct Block {
    disk: Disk,
    avail_features: u64,
    events: DeviceEvents,
    active: Option<Active>,
    /// The driver broke the queue; nothing is processed until a reset.
    broken: bool,
}

impl Block {
    /// A block device over `file` (opened read-write unless `read_only`), answering
    /// GET_ID with `id` (at most 20 bytes). Capacity is the file size in 512-byte
    /// sectors, fixed now.
    pub fn new(file: File, read_only: bool, id: &str) -> Result<Self, BlockError> {
        let size = file.metadata().map_err(BlockError::Metadata)?.len();
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::UnalignedSize(size));
        }
        if id.len() > ID_BYTES {
            return Err(BlockError::IdTooLong(id.to_owned()));
        }
        let mut id_bytes = [0u8; ID_BYTES];
        id_bytes[..id.len()].copy_from_slice(id.as_bytes());
        let mut avail_features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX;
        if read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        Ok(Self {
            disk: Disk {
                file,
                size,
                read_only,
                id: id_bytes,
                bounce: Default::default(),
            },
            avail_features,
            events: DeviceEvents::new(1).map_err(BlockError::EventFd)?,
            active: None,
            broken: false,
        })
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.size / SECTOR_SIZE
    }

    /// The config space (virtio 1.1, 5.2.4): capacity, size_max (0 = none), seg_max.
    fn config_bytes(&self) -> [u8; 16] {
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.capacity().to_le_bytes());
        // seg_max: data descriptors per request; the header and status take two slots.
        config[12..].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        config
    }

    /// Handles everything available on the queue; called on the event-loop thread.
    /// Public so tests (and a VMM without an event loop) can drive the device directly.
    pub fn process_queue(&mut self) {
        if self.broken {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        match run_queue(&self.disk, active) {
            Ok(used_any) => {
                if used_any {
                    let notify = !active.event_idx
                        || active.queue.needs_notification(&active.mem).unwrap_or(true);
                    if notify {
                        if let Err(e) = active.interrupt.trigger(INTERRUPT_USED_RING) {
                            tracing::error!("virtio-blk: cannot raise interrupt: {e}");
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!("virtio-blk: queue broken, stopping until reset: {e}");
                self.broken = true;
                active.interrupt.signal_needs_reset();
            }
        }
    }
}

/// Why processing a queue had to stop for good.
#[derive(Debug, thiserror::Error)]
enum QueueBroken {
    #[error("available ring: {0:?}")]
    Avail(virtio_queue::Error),
    #[error("used ring: {0:?}")]
    Used(virtio_queue::Error),
}

/// Pops and completes every available chain; true if any was completed.
fn run_queue(disk: &Disk, active: &mut Active) -> Result<bool, QueueBroken> {
    let mut used_any = false;
    loop {
        if active.event_idx {
            // No kicks while we are draining anyway.
            active
                .queue
                .disable_notification(&active.mem)
                .map_err(QueueBroken::Used)?;
        }
        loop {
            // iter() re-reads the avail index and refuses one that ran more than a
            // queue's worth ahead of us (a driver bug or attack).
            let chain = {
                let mut iter = active.queue.iter(&active.mem).map_err(QueueBroken::Avail)?;
                iter.next()
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let len = request::handle_chain(disk, &active.mem, chain);
            active
                .queue
                .add_used(&active.mem, head, len)
                .map_err(QueueBroken::Used)?;
            used_any = true;
        }
        if !active.event_idx {
            return Ok(used_any);
        }
        // Re-enable kicks; if the driver slipped more in meanwhile, go round again.
        if !active
            .queue
            .enable_notification(&active.mem)
            .map_err(QueueBroken::Used)?
        {
            return Ok(used_any);
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.events.queue_evts
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Nothing writable (no WCE / writeback toggling offered).
        tracing::debug!(
            "virtio-blk: ignoring {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<IrqTrigger>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let [mut queue] = valid_queues(queues, &mem)?;
        let event_idx = acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        queue.set_event_idx(event_idx);
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
            event_idx,
        });
        self.broken = false;
        self.events
            .signal_activated()
            .inspect_err(|_| self.active = None)
    }

    fn reset(&mut self) {
        self.active = None;
        self.broken = false;
        // Let the event loop drop the queue eventfds.
        self.events.signal_reset("virtio-blk");
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }

    /// Requests are served whole within one event, so nothing is held between events.
    fn save_state(
        &self,
    ) -> Result<crate::snapshot::VirtioDeviceSnapshot, crate::snapshot::SnapshotError> {
        match (&self.active, self.broken) {
            (Some(a), false) => Ok(super::queues_progress(&[&a.queue])),
            _ => Err(crate::snapshot::SnapshotError::Busy {
                device: "virtio-blk",
                why: "not active, or stopped on a broken queue".into(),
            }),
        }
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        let active = self.active.is_some();
        self.events.init(ops, active);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let active = self.active.is_some();
        if self.events.process(&events, ops, active).is_some() {
            self.process_queue();
        }
    }
}

#[cfg(test)]
mod tests;
