//! virtio-rng (virtio 1.1, 5.4): the guest's hardware RNG, fed from the host's
//! `/dev/urandom`, so the guest kernel's CRNG is seeded early in boot (guest kernel:
//! `CONFIG_HW_RANDOM_VIRTIO=y`).
//!
//! One request queue; each chain's device-writable buffers are filled with random bytes,
//! at most [`MAX_BYTES_PER_REQUEST`] per chain (a driver can ask for 4 GiB in one chain;
//! handing out less is allowed, the used length says how much). Readable buffers are
//! ignored. Wiring is exactly that of [`super::block::Block`] (see [`crate::virtio`]),
//! with `TYPE_RNG` and no config space.

use std::fs::File;
use std::io::Read;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::events::DeviceEvents;
use super::{
    ActivateError, IrqTrigger, VirtioDevice, INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_RING,
    VIRTIO_F_VERSION_1,
};

/// Device type: entropy source.
pub const TYPE_RNG: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
/// Maximum size of the request queue.
pub const RNG_QUEUE_SIZE: u16 = 256;
/// Most random bytes handed out per chain.
pub const MAX_BYTES_PER_REQUEST: usize = 64 << 10;

/// Why an RNG device cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// `/dev/urandom` cannot be opened.
    #[error("cannot open /dev/urandom: {0}")]
    Source(#[source] std::io::Error),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<IrqTrigger>,
}

/// A virtio entropy device. Share it as `Arc<Mutex<Rng>>` like the block device.
pub struct Rng {
    source: File,
    events: DeviceEvents,
    active: Option<Active>,
    broken: bool,
}

impl Rng {
    /// An RNG reading from the host's `/dev/urandom`.
    pub fn new() -> Result<Self, RngError> {
        Ok(Self {
            source: File::open("/dev/urandom").map_err(RngError::Source)?,
            events: DeviceEvents::new(1).map_err(RngError::EventFd)?,
            active: None,
            broken: false,
        })
    }

    /// Serves every available chain; called on the event-loop thread (public for tests and
    /// VMMs without an event loop).
    pub fn process_queue(&mut self) {
        if self.broken {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut used_any = false;
        let mut bytes = vec![0u8; MAX_BYTES_PER_REQUEST];
        loop {
            let chain = match active.queue.iter(&active.mem) {
                Ok(mut iter) => iter.next(),
                Err(e) => {
                    tracing::warn!("virtio-rng: queue broken, stopping until reset: {e:?}");
                    self.broken = true;
                    let _ = active.interrupt.trigger(INTERRUPT_CONFIG_CHANGE);
                    return;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let mut written = 0usize;
            for desc in chain.writable() {
                let n = (desc.len() as usize).min(MAX_BYTES_PER_REQUEST - written);
                if n == 0 {
                    continue;
                }
                if let Err(e) = self.source.read_exact(&mut bytes[..n]) {
                    tracing::error!("virtio-rng: /dev/urandom: {e}");
                    break;
                }
                // A buffer outside guest memory ends the request with what was written.
                if let Err(e) = active.mem.write_slice(&bytes[..n], desc.addr()) {
                    tracing::warn!("virtio-rng: chain {head}: {e}");
                    break;
                }
                written += n;
            }
            if let Err(e) = active.queue.add_used(&active.mem, head, written as u32) {
                tracing::warn!("virtio-rng: used ring broken, stopping until reset: {e:?}");
                self.broken = true;
                let _ = active.interrupt.trigger(INTERRUPT_CONFIG_CHANGE);
                return;
            }
            used_any = true;
        }
        if used_any {
            if let Err(e) = active.interrupt.trigger(INTERRUPT_USED_RING) {
                tracing::error!("virtio-rng: cannot raise interrupt: {e}");
            }
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[RNG_QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.events.queue_evts
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0); // no config space
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            "virtio-rng: ignoring {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<IrqTrigger>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let [queue] = super::valid_queues(queues, &mem)?;
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        self.broken = false;
        self.events
            .signal_activated()
            .inspect_err(|_| self.active = None)
    }

    fn reset(&mut self) {
        self.active = None;
        self.broken = false;
        self.events.signal_reset("virtio-rng");
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
                device: "virtio-rng",
                why: "not active, or stopped on a broken queue".into(),
            }),
        }
    }
}

impl MutEventSubscriber for Rng {
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
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    #[test]
    fn fills_writable_buffers_and_survives_bad_ones() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut rng = Rng::new().unwrap();
        let irq = Arc::new(IrqTrigger::new().unwrap());
        rng.activate(
            mem.clone(),
            VIRTIO_F_VERSION_1,
            vec![vq.create_queue().unwrap()],
            irq.clone(),
        )
        .unwrap();
        let w = VRING_DESC_F_WRITE;
        vq.add_desc_chains(
            &[
                // 0: two writable buffers of 32 bytes.
                desc(0x10_0000, 32, w | VRING_DESC_F_NEXT, 1),
                desc(0x10_1000, 32, w, 0),
                // 2: a readable buffer only: nothing written.
                desc(0x10_2000, 32, 0, 0),
                // 3: a huge buffer: capped.
                desc(0x20_0000, 1 << 20, w, 0),
                // 4: outside guest memory.
                desc(0x1_0000_0000, 32, w, 0),
            ],
            0,
        )
        .unwrap();
        rng.process_queue();
        let used: Vec<(u32, u32)> = (0..4)
            .map(|i| {
                let e = vq.used().ring().ref_at(i).unwrap().load();
                (e.id(), e.len())
            })
            .collect();
        assert_eq!(
            used,
            vec![(0, 64), (2, 0), (3, MAX_BYTES_PER_REQUEST as u32), (4, 0)]
        );
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        mem.read_slice(&mut a, GuestAddress(0x10_0000)).unwrap();
        mem.read_slice(&mut b, GuestAddress(0x10_1000)).unwrap();
        // 2^-256 chance of a false failure each.
        assert_ne!(a, [0; 32]);
        assert_ne!(a, b);
        let mut past_cap = [0u8; 64];
        mem.read_slice(
            &mut past_cap,
            GuestAddress(0x20_0000 + MAX_BYTES_PER_REQUEST as u64),
        )
        .unwrap();
        assert_eq!(past_cap, [0; 64], "nothing written past the cap");
        assert_eq!(irq.eventfd().read().unwrap(), 1);
        assert!(!rng.needs_reset());

        vq.avail().idx().store(100);
        rng.process_queue();
        assert!(rng.needs_reset());
    }
}
