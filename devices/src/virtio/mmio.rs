//! The virtio-mmio transport, version 2 (virtio 1.1, 4.2.2): a 0x1000-byte register
//! window on the MMIO bus.
//!
//! The transport owns the feature negotiation, the status handshake and the queue
//! registers; at DRIVER_OK it builds `virtio_queue::Queue`s and activates the device.
//! Every value the driver writes is checked; writes that make no sense at that point of
//! the handshake are ignored (and logged), and an impossible configuration makes
//! activation fail, after which Status shows DEVICE_NEEDS_RESET.

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;

/// Size of the register window to insert on the MMIO bus (and the `4K` of the cmdline).
pub const MMIO_WINDOW_LEN: u64 = 0x1000;
/// Offset of QueueNotify: where the VMM registers the queues' ioeventfds.
pub const NOTIFY_REG_OFFSET: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest; nobody matches on it.
const VENDOR_ID: u32 = 0;

// Register offsets (virtio 1.1, 4.2.2).
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = NOTIFY_REG_OFFSET;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

/// Device status bits (virtio 1.1, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready; the device is live.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// The driver's view of one queue, before activation.
#[derive(Clone, Debug, Default)]
struct QueueRegs {
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
    /// The driver wrote a size that is zero, not a power of two or above the maximum.
    bad_size: bool,
}

/// A virtio device behind a virtio-mmio v2 register window.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<IrqTrigger>,
    device_status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    max_sizes: Vec<u16>,
    activated: bool,
}

impl MmioTransport {
    /// The transport for `device`, whose queues live in `mem` and whose interrupts go
    /// through `interrupt` (register `interrupt.eventfd()` as the GSI's irqfd).
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<IrqTrigger>,
    ) -> Self {
        let max_sizes = lock(&device).queue_max_sizes().to_vec();
        Self {
            mem,
            device,
            interrupt,
            device_status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            queues: vec![QueueRegs::default(); max_sizes.len()],
            max_sizes,
            activated: false,
        }
    }

    /// Duplicates of the device's queue eventfds, in queue order: register queue `i`'s
    /// as ioeventfd at `base + NOTIFY_REG_OFFSET` with datamatch `i as u32`.
    pub fn queue_events(&self) -> std::io::Result<Vec<EventFd>> {
        lock(&self.device)
            .queue_events()
            .iter()
            .map(EventFd::try_clone)
            .collect()
    }

    /// The interrupt (its eventfd is the irqfd to register).
    pub fn interrupt(&self) -> &Arc<IrqTrigger> {
        &self.interrupt
    }

    /// The Status register as the guest sees it.
    pub fn device_status(&self) -> u32 {
        let mut s = self.device_status;
        if self.activated && lock(&self.device).needs_reset() {
            s |= status::DEVICE_NEEDS_RESET;
        }
        s
    }

    fn selected_queue(&mut self) -> Option<(&mut QueueRegs, u16)> {
        let i = usize::try_from(self.queue_sel).ok()?;
        let max = *self.max_sizes.get(i)?;
        Some((&mut self.queues[i], max))
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK, and only
    /// while the selected queue is not ready (virtio 1.1, 4.2.3.2).
    fn queue_config_allowed(&self) -> bool {
        self.device_status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED)
            == status::FEATURES_OK
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => lock(&self.device).device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let features = lock(&self.device).avail_features();
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |(_, max)| u32::from(max)),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |(q, _)| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.device_status(),
            REG_CONFIG_GENERATION => 0, // the config space never changes
            _ => {
                tracing::debug!("virtio-mmio: read of write-only/unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NOTIFY => self.notify(value),
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.write_status(value),
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue_register(offset, value),
            _ => tracing::debug!("virtio-mmio: write to read-only/unknown register {offset:#x}"),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let negotiating = self.device_status
            & (status::DRIVER | status::FEATURES_OK | status::FAILED)
            == status::DRIVER;
        if !negotiating {
            tracing::warn!("virtio-mmio: driver features written outside negotiation; ignored");
            return;
        }
        let value = u64::from(value);
        match self.driver_features_sel {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | value,
            1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (value << 32),
            // Pages 2+ are all zero on our side; acking anything there is refused when
            // FEATURES_OK is checked.
            _ if value != 0 => self.acked_features |= 1 << 63 | 1 << 62,
            _ => {}
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        if !self.queue_config_allowed() {
            tracing::warn!(
                "virtio-mmio: queue register {offset:#x} written outside setup; ignored"
            );
            return;
        }
        let Some((q, max)) = self.selected_queue() else {
            tracing::warn!(
                "virtio-mmio: queue register {offset:#x} written for a queue that does not exist"
            );
            return;
        };
        if q.ready && offset != REG_QUEUE_READY {
            tracing::warn!(
                "virtio-mmio: queue register {offset:#x} written while queue ready; ignored"
            );
            return;
        }
        let set_low = |r: &mut u64| *r = (*r & !0xffff_ffff) | u64::from(value);
        let set_high = |r: &mut u64| *r = (*r & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            REG_QUEUE_NUM => match u16::try_from(value) {
                Ok(size) if size != 0 && size.is_power_of_two() && size <= max => {
                    q.size = size;
                    q.bad_size = false;
                }
                _ => {
                    tracing::warn!("virtio-mmio: bad queue size {value} (max {max})");
                    q.bad_size = true;
                }
            },
            REG_QUEUE_READY => q.ready = value == 1,
            REG_QUEUE_DESC_LOW => set_low(&mut q.desc),
            REG_QUEUE_DESC_HIGH => set_high(&mut q.desc),
            REG_QUEUE_DRIVER_LOW => set_low(&mut q.avail),
            REG_QUEUE_DRIVER_HIGH => set_high(&mut q.avail),
            REG_QUEUE_DEVICE_LOW => set_low(&mut q.used),
            REG_QUEUE_DEVICE_HIGH => set_high(&mut q.used),
            _ => unreachable!("only queue registers are routed here"),
        }
    }

    fn notify(&mut self, value: u32) {
        // Normally an ioeventfd catches this write before it ever exits to the VMM.
        let device = lock(&self.device);
        match usize::try_from(value)
            .ok()
            .and_then(|i| device.queue_events().get(i))
        {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    tracing::error!("virtio-mmio: cannot signal queue {value}: {e}");
                }
            }
            None => tracing::warn!("virtio-mmio: notify for a queue that does not exist: {value}"),
        }
    }

    fn write_status(&mut self, value: u32) {
        use status::*;
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.device_status;
        if value & FAILED != 0 {
            // The driver gave up; nothing else to check.
            self.device_status |= FAILED;
            return;
        }
        if value & old != old {
            tracing::warn!("virtio-mmio: driver cleared status bits ({old:#x} -> {value:#x})");
            self.device_status |= DEVICE_NEEDS_RESET;
            return;
        }
        let new = value & !old;
        let ok = match new {
            0 => true,
            ACKNOWLEDGE => old == 0,
            DRIVER => old == ACKNOWLEDGE,
            FEATURES_OK => old == ACKNOWLEDGE | DRIVER && self.features_acceptable(),
            DRIVER_OK => old == ACKNOWLEDGE | DRIVER | FEATURES_OK && self.activate(),
            _ => false,
        };
        if ok {
            self.device_status = value;
        } else if new == FEATURES_OK && old == ACKNOWLEDGE | DRIVER {
            // Refused features: leave FEATURES_OK clear; the driver reads it back and fails.
            tracing::warn!(
                "virtio-mmio: refusing features {:#x} (offered {:#x})",
                self.acked_features,
                lock(&self.device).avail_features()
            );
        } else {
            tracing::warn!("virtio-mmio: bad status transition {old:#x} -> {value:#x}");
            self.device_status |= DEVICE_NEEDS_RESET;
        }
    }

    /// The driver acked only what we offer, and VERSION_1 (no legacy interface here).
    fn features_acceptable(&self) -> bool {
        let offered = lock(&self.device).avail_features();
        self.acked_features & !offered == 0 && self.acked_features & VIRTIO_F_VERSION_1 != 0
    }

    /// Builds the queues from the registers and activates the device.
    fn activate(&mut self) -> bool {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, regs) in self.queues.iter().enumerate() {
            if regs.bad_size || !regs.ready || regs.size == 0 {
                tracing::warn!("virtio-mmio: queue {i} not usable at DRIVER_OK: {regs:?}");
                return false;
            }
            let mut q = match Queue::new(self.max_sizes[i]) {
                Ok(q) => q,
                Err(e) => {
                    tracing::warn!("virtio-mmio: queue {i}: {e:?}");
                    return false;
                }
            };
            // try_set_* report misalignment instead of logging and ignoring it.
            if q.try_set_size(regs.size).is_err()
                || q.try_set_desc_table_address(vm_memory::GuestAddress(regs.desc))
                    .is_err()
                || q.try_set_avail_ring_address(vm_memory::GuestAddress(regs.avail))
                    .is_err()
                || q.try_set_used_ring_address(vm_memory::GuestAddress(regs.used))
                    .is_err()
            {
                tracing::warn!("virtio-mmio: queue {i} misconfigured: {regs:?}");
                return false;
            }
            q.set_ready(true);
            queues.push(q);
        }
        let result = lock(&self.device).activate(
            self.mem.clone(),
            self.acked_features,
            queues,
            self.interrupt.clone(),
        );
        match result {
            Ok(()) => {
                self.activated = true;
                true
            }
            Err(e) => {
                tracing::warn!("virtio-mmio: activation failed: {e}");
                false
            }
        }
    }

    fn reset(&mut self) {
        if self.activated {
            lock(&self.device).reset();
        }
        self.activated = false;
        self.device_status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.queues.fill(QueueRegs::default());
        self.interrupt.clear();
    }
}

/// Locks the device; a poisoned lock (a panic elsewhere) still holds the best state we have.
fn lock(device: &Arc<Mutex<dyn VirtioDevice>>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).read_config(offset - CONFIG_SPACE, data);
            return;
        }
        // Registers are 32-bit and must be accessed as such (4.2.2.2).
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::warn!("virtio-mmio: {}-byte read at {offset:#x}", data.len());
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).write_config(offset - CONFIG_SPACE, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset.is_multiple_of(4) => {
                self.write_register(offset, u32::from_le_bytes(bytes))
            }
            _ => tracing::warn!("virtio-mmio: {}-byte write at {offset:#x}", data.len()),
        }
    }
}
