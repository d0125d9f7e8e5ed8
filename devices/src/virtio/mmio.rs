//! The virtio-mmio transport, version 2 (virtio 1.1, 4.2.2): a 0x1000-byte register
//! window on the MMIO bus.
//!
//! The transport owns the feature negotiation, the status handshake and the queue
//! registers; at DRIVER_OK it builds `virtio_queue::Queue`s and activates the device.
//! Every value the driver writes is checked; writes that make no sense at that point of
//! the handshake are ignored (and logged), and an impossible configuration makes
//! activation fail, after which Status shows DEVICE_NEEDS_RESET.

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_mmio as mmio;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;
use crate::snapshot::{BusDeviceSnapshot, QueueRegsSnapshot, SnapshotError, TransportSnapshot};

/// Size of the register window to insert on the MMIO bus (and the `4K` of the cmdline).
pub const MMIO_WINDOW_LEN: u64 = 0x1000;
/// Offset of QueueNotify: where the VMM registers the queues' ioeventfds.
pub const NOTIFY_REG_OFFSET: u64 = mmio::VIRTIO_MMIO_QUEUE_NOTIFY as u64;

/// What the MagicValue register reads: "virt" in little-endian ASCII (the kernel header
/// names only the register, not its value).
const MAGIC_VALUE: u32 = u32::from_le_bytes(*b"virt");
const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest; nobody matches on it.
const VENDOR_ID: u32 = 0;

// Register offsets (virtio 1.1, 4.2.2), from the kernel's virtio_mmio.h; the driver/device
// area registers are what the header still calls the avail/used rings.
const REG_MAGIC: u64 = mmio::VIRTIO_MMIO_MAGIC_VALUE as u64;
const REG_VERSION: u64 = mmio::VIRTIO_MMIO_VERSION as u64;
const REG_DEVICE_ID: u64 = mmio::VIRTIO_MMIO_DEVICE_ID as u64;
const REG_VENDOR_ID: u64 = mmio::VIRTIO_MMIO_VENDOR_ID as u64;
const REG_DEVICE_FEATURES: u64 = mmio::VIRTIO_MMIO_DEVICE_FEATURES as u64;
const REG_DEVICE_FEATURES_SEL: u64 = mmio::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
const REG_DRIVER_FEATURES: u64 = mmio::VIRTIO_MMIO_DRIVER_FEATURES as u64;
const REG_DRIVER_FEATURES_SEL: u64 = mmio::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
const REG_QUEUE_SEL: u64 = mmio::VIRTIO_MMIO_QUEUE_SEL as u64;
const REG_QUEUE_NUM_MAX: u64 = mmio::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
const REG_QUEUE_NUM: u64 = mmio::VIRTIO_MMIO_QUEUE_NUM as u64;
const REG_QUEUE_READY: u64 = mmio::VIRTIO_MMIO_QUEUE_READY as u64;
const REG_QUEUE_NOTIFY: u64 = NOTIFY_REG_OFFSET;
const REG_INTERRUPT_STATUS: u64 = mmio::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
const REG_INTERRUPT_ACK: u64 = mmio::VIRTIO_MMIO_INTERRUPT_ACK as u64;
const REG_STATUS: u64 = mmio::VIRTIO_MMIO_STATUS as u64;
const REG_QUEUE_DESC_LOW: u64 = mmio::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
const REG_QUEUE_DESC_HIGH: u64 = mmio::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
const REG_QUEUE_DRIVER_LOW: u64 = mmio::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
const REG_QUEUE_DRIVER_HIGH: u64 = mmio::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
const REG_QUEUE_DEVICE_LOW: u64 = mmio::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
const REG_QUEUE_DEVICE_HIGH: u64 = mmio::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
const REG_CONFIG_GENERATION: u64 = mmio::VIRTIO_MMIO_CONFIG_GENERATION as u64;
const CONFIG_SPACE: u64 = mmio::VIRTIO_MMIO_CONFIG as u64;

/// Device status bits (virtio 1.1, 2.1), from the kernel's virtio_config.h.
pub mod status {
    use virtio_bindings::virtio_config as c;
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    /// The driver is ready; the device is live.
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device.
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
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

/// What the VMM runs each time the device becomes active (the driver's DRIVER_OK
/// accepted, or a restored active state): wiring worth doing only for a device the guest
/// uses, such as its queues' ioeventfds. Runs on the thread that handled the write (a
/// vCPU's) or the restore.
pub type ActivationHook = Box<dyn FnMut() + Send>;

/// A virtio device behind a virtio-mmio v2 register window.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<IrqTrigger>,
    device_status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    /// The driver acked a feature in a page beyond bit 63 (none exist).
    acked_beyond_64: bool,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    max_sizes: Vec<u16>,
    activated: bool,
    on_activate: Option<ActivationHook>,
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
            acked_beyond_64: false,
            queue_sel: 0,
            queues: vec![QueueRegs::default(); max_sizes.len()],
            max_sizes,
            activated: false,
            on_activate: None,
        }
    }

    /// Runs `hook` at every activation of the device (the driver's DRIVER_OK, or the
    /// restore of a device saved active), after the device took its queues.
    /// Until it has run, QueueNotify writes reach the transport as MMIO exits, which
    /// signal the queue's eventfd (see [`MmioTransport::queue_events`]).
    pub fn on_activate(&mut self, hook: ActivationHook) {
        self.on_activate = Some(hook);
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
            _ if value != 0 => self.acked_beyond_64 = true,
            _ => {}
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        if !self.queue_config_allowed() {
            // Linux writes QueueReady=0 while tearing queues down after a reset: not
            // worth a warning, and a guest must not be able to flood the log anyway.
            tracing::debug!(
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
        // Once the device is active an ioeventfd normally catches this write before it
        // exits to the VMM; before that (or where the VMM registers none) it lands here.
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
            self.set_needs_reset();
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
            self.set_needs_reset();
        }
    }

    /// Sets DEVICE_NEEDS_RESET and, the first time, sends the configuration-change
    /// interrupt that tells the driver to look (virtio 1.1, 2.1.2).
    fn set_needs_reset(&mut self) {
        if self.device_status & status::DEVICE_NEEDS_RESET == 0 {
            self.device_status |= status::DEVICE_NEEDS_RESET;
            if let Err(e) = self.interrupt.trigger(super::INTERRUPT_CONFIG_CHANGE) {
                tracing::error!("virtio-mmio: cannot raise interrupt: {e}");
            }
        }
    }

    /// The driver acked only what we offer, and VERSION_1 (no legacy interface here).
    fn features_acceptable(&self) -> bool {
        let offered = lock(&self.device).avail_features();
        !self.acked_beyond_64
            && self.acked_features & !offered == 0
            && self.acked_features & VIRTIO_F_VERSION_1 != 0
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
                if let Some(hook) = &mut self.on_activate {
                    hook();
                }
                true
            }
            Err(e) => {
                tracing::warn!("virtio-mmio: activation failed: {e}");
                false
            }
        }
    }

    /// The transport's registers and, when active, the device's queues and own state, for
    /// a snapshot of a paused VM (nothing may run the device meanwhile).
    pub fn save_state(&self) -> Result<TransportSnapshot, SnapshotError> {
        let device = lock(&self.device);
        let saved = if self.activated {
            Some(device.save_state()?)
        } else {
            None
        };
        Ok(TransportSnapshot {
            device_type: device.device_type(),
            device_status: self.device_status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            acked_beyond_64: self.acked_beyond_64,
            queue_sel: self.queue_sel,
            queues: self
                .queues
                .iter()
                .map(|q| QueueRegsSnapshot {
                    size: q.size,
                    ready: q.ready,
                    desc: q.desc,
                    avail: q.avail,
                    used: q.used,
                    bad_size: q.bad_size,
                })
                .collect(),
            interrupt_status: self.interrupt.status(),
            device: saved,
        })
    }

    /// Puts a freshly built transport (and its inactive device) in a saved state: the
    /// registers, then, if the device was active, the queues at their saved positions, an
    /// activation and the device's own state. Untrusted input: every queue is checked as
    /// at the driver's DRIVER_OK, and a device of another kind or shape is refused.
    pub fn restore_state(&mut self, saved: &TransportSnapshot) -> Result<(), SnapshotError> {
        let mismatch = |why: String| SnapshotError::Mismatch {
            device: "virtio-mmio",
            why,
        };
        let device_type = lock(&self.device).device_type();
        if saved.device_type != device_type {
            return Err(mismatch(format!(
                "device type {} saved where type {device_type} is",
                saved.device_type
            )));
        }
        if saved.queues.len() != self.queues.len() {
            return Err(mismatch(format!(
                "{} queues saved, the device has {}",
                saved.queues.len(),
                self.queues.len()
            )));
        }
        if self.activated {
            return Err(mismatch("the device is already active".into()));
        }
        // A queue larger than this device takes (a snapshot of a build whose device had
        // larger queues, or a crafted one) is refused here rather than left to break the
        // device at its activation.
        for (i, (q, max)) in saved.queues.iter().zip(&self.max_sizes).enumerate() {
            if q.size > *max {
                return Err(mismatch(format!(
                    "queue {i}: size {} saved, the device takes at most {max}",
                    q.size
                )));
            }
        }
        self.device_status = saved.device_status;
        self.device_features_sel = saved.device_features_sel;
        self.driver_features_sel = saved.driver_features_sel;
        self.acked_features = saved.acked_features;
        self.acked_beyond_64 = saved.acked_beyond_64;
        self.queue_sel = saved.queue_sel;
        for (regs, q) in self.queues.iter_mut().zip(&saved.queues) {
            *regs = QueueRegs {
                size: q.size,
                ready: q.ready,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                bad_size: q.bad_size,
            };
        }
        if let Some(state) = &saved.device {
            if state.queues.len() != self.queues.len() {
                return Err(mismatch(format!(
                    "{} queue positions saved for {} queues",
                    state.queues.len(),
                    self.queues.len()
                )));
            }
            let mut queues = Vec::with_capacity(self.queues.len());
            for (i, (regs, progress)) in self.queues.iter().zip(&state.queues).enumerate() {
                let q = Queue::try_from(virtio_queue::QueueState {
                    max_size: self.max_sizes[i],
                    next_avail: progress.next_avail,
                    next_used: progress.next_used,
                    event_idx_enabled: false,
                    size: regs.size,
                    ready: regs.ready,
                    desc_table: regs.desc,
                    avail_ring: regs.avail,
                    used_ring: regs.used,
                })
                .map_err(|e| mismatch(format!("queue {i}: {e:?}")))?;
                queues.push(q);
            }
            let mut device = lock(&self.device);
            device
                .activate(
                    self.mem.clone(),
                    self.acked_features,
                    queues,
                    self.interrupt.clone(),
                )
                .map_err(|e| mismatch(format!("activation: {e}")))?;
            if let Err(e) = device.restore_state(state) {
                device.reset();
                return Err(e);
            }
            drop(device);
            self.activated = true;
            if let Some(hook) = &mut self.on_activate {
                hook();
            }
        }
        self.interrupt.restore_status(saved.interrupt_status);
        Ok(())
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
        self.acked_beyond_64 = false;
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
    fn save(&self) -> Result<Option<BusDeviceSnapshot>, SnapshotError> {
        self.save_state()
            .map(|s| Some(BusDeviceSnapshot::VirtioMmio(s)))
    }

    fn restore(&mut self, saved: &BusDeviceSnapshot) -> Result<(), SnapshotError> {
        match saved {
            BusDeviceSnapshot::VirtioMmio(s) => self.restore_state(s),
            _ => Err(SnapshotError::Mismatch {
                device: "virtio-mmio",
                why: "another kind of device saved at its address".into(),
            }),
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_util::TempDisk;
    use crate::virtio::{
        ActivateError, Block, INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_RING, TYPE_BLOCK,
    };
    use vm_memory::GuestAddress;

    const MEM_SIZE: usize = 0x10_0000;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    /// A queue as the device received it: (size, desc, avail, used).
    type QueueSeen = (u16, u64, u64, u64);

    /// A device that records what the transport does to it.
    struct Recorder {
        features: u64,
        evts: [EventFd; 2],
        /// (acked features, per queue (size, desc, avail, used)).
        activated: Option<(u64, Vec<QueueSeen>)>,
        resets: usize,
        broken: bool,
        config: [u8; 8],
    }

    impl Recorder {
        fn new() -> Self {
            Self {
                features: VIRTIO_F_VERSION_1 | 1 << 3,
                evts: [
                    EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                    EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                ],
                activated: None,
                resets: 0,
                broken: false,
                config: *b"ABCDEFGH",
            }
        }
    }

    impl VirtioDevice for Recorder {
        fn device_type(&self) -> u32 {
            42
        }
        fn avail_features(&self) -> u64 {
            self.features
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[64, 32]
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.evts
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = *self.config.get(offset as usize + i).unwrap_or(&0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.config[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            acked_features: u64,
            queues: Vec<Queue>,
            _interrupt: Arc<IrqTrigger>,
        ) -> Result<(), ActivateError> {
            let qs = queues
                .iter()
                .map(|q| (q.size(), q.desc_table(), q.avail_ring(), q.used_ring()))
                .collect();
            self.activated = Some((acked_features, qs));
            Ok(())
        }
        fn reset(&mut self) {
            self.activated = None;
            self.resets += 1;
        }
        fn needs_reset(&self) -> bool {
            self.broken
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn rd(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn wr(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn with_recorder() -> (MmioTransport, Arc<Mutex<Recorder>>, Arc<IrqTrigger>) {
        let dev = Arc::new(Mutex::new(Recorder::new()));
        let irq = Arc::new(IrqTrigger::new().unwrap());
        let t = MmioTransport::new(memory(), dev.clone(), irq.clone());
        (t, dev, irq)
    }

    /// ACKNOWLEDGE, DRIVER, features (page 0 and 1), FEATURES_OK; true if accepted.
    fn negotiate(t: &mut MmioTransport, features: u64) -> bool {
        wr(t, REG_STATUS, status::ACKNOWLEDGE);
        wr(t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, REG_DRIVER_FEATURES_SEL, 0);
        wr(t, REG_DRIVER_FEATURES, features as u32);
        wr(t, REG_DRIVER_FEATURES_SEL, 1);
        wr(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        wr(
            t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        rd(t, REG_STATUS) & status::FEATURES_OK != 0
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
        wr(t, REG_QUEUE_SEL, index);
        wr(t, REG_QUEUE_NUM, size);
        wr(t, REG_QUEUE_DESC_LOW, (base + DESC) as u32);
        wr(t, REG_QUEUE_DESC_HIGH, ((base + DESC) >> 32) as u32);
        wr(t, REG_QUEUE_DRIVER_LOW, (base + AVAIL) as u32);
        wr(t, REG_QUEUE_DRIVER_HIGH, 0);
        wr(t, REG_QUEUE_DEVICE_LOW, (base + USED) as u32);
        wr(t, REG_QUEUE_DEVICE_HIGH, 0);
        wr(t, REG_QUEUE_READY, 1);
    }

    const ALL_OK: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identification_and_feature_pages() {
        let (mut t, _, _) = with_recorder();
        assert_eq!(rd(&mut t, REG_MAGIC), 0x7472_6976);
        assert_eq!(rd(&mut t, REG_VERSION), 2);
        assert_eq!(rd(&mut t, REG_DEVICE_ID), 42);
        assert_eq!(rd(&mut t, REG_VENDOR_ID), VENDOR_ID);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 1 << 3);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 7);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 0);
    }

    #[test]
    fn full_handshake_activates_with_the_driver_queues() {
        let (mut t, dev, _) = with_recorder();
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        wr(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 64);
        wr(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 32);
        wr(&mut t, REG_QUEUE_SEL, 2);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 0, "no queue 2");
        setup_queue(&mut t, 0, 64, 0);
        setup_queue(&mut t, 1, 8, 0x10000);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 1);
        wr(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(rd(&mut t, REG_STATUS), ALL_OK);
        let (features, queues) = dev.lock().unwrap().activated.clone().unwrap();
        assert_eq!(features, VIRTIO_F_VERSION_1);
        assert_eq!(
            queues,
            vec![
                (64, DESC, AVAIL, USED),
                (8, 0x10000 + DESC, 0x10000 + AVAIL, 0x10000 + USED)
            ]
        );
        // Queue registers are frozen once live.
        wr(&mut t, REG_QUEUE_SEL, 0);
        wr(&mut t, REG_QUEUE_NUM, 2);
        wr(&mut t, REG_STATUS, 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0, "reset clears the queues");
        // And the device can be brought up again.
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1 | 1 << 3));
        setup_queue(&mut t, 0, 16, 0);
        setup_queue(&mut t, 1, 16, 0x10000);
        wr(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(rd(&mut t, REG_STATUS), ALL_OK);
        let (features, _) = dev.lock().unwrap().activated.clone().unwrap();
        assert_eq!(features, VIRTIO_F_VERSION_1 | 1 << 3);
    }

    #[test]
    fn features_without_version_1_or_not_offered_are_refused() {
        let (mut t, _, _) = with_recorder();
        assert!(!negotiate(&mut t, 1 << 3), "legacy driver refused");
        wr(&mut t, REG_STATUS, 0);
        assert!(
            !negotiate(&mut t, VIRTIO_F_VERSION_1 | 1 << 5),
            "unoffered bit"
        );
        wr(&mut t, REG_STATUS, 0);
        // Acking anything in a page beyond 1.
        wr(&mut t, REG_STATUS, status::ACKNOWLEDGE);
        wr(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 2);
        wr(&mut t, REG_DRIVER_FEATURES, 1);
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, REG_DRIVER_FEATURES, 1);
        wr(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(rd(&mut t, REG_STATUS) & status::FEATURES_OK, 0);
    }

    #[test]
    fn bad_queue_sizes_fail_activation_with_needs_reset() {
        for size in [0, 3, 48, 128, 0x1_0000 + 16] {
            let (mut t, dev, irq) = with_recorder();
            assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
            setup_queue(&mut t, 0, size, 0);
            setup_queue(&mut t, 1, 16, 0x10000);
            wr(&mut t, REG_STATUS, ALL_OK);
            let s = rd(&mut t, REG_STATUS);
            assert_eq!(s & status::DRIVER_OK, 0, "size {size}");
            assert_ne!(s & status::DEVICE_NEEDS_RESET, 0, "size {size}");
            assert!(dev.lock().unwrap().activated.is_none());
            assert_eq!(irq.status(), INTERRUPT_CONFIG_CHANGE, "driver told to look");
        }
    }

    #[test]
    fn queue_not_ready_or_misaligned_fails_activation() {
        let (mut t, dev, _) = with_recorder();
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        setup_queue(&mut t, 0, 16, 0);
        wr(&mut t, REG_STATUS, ALL_OK);
        assert_ne!(rd(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert!(dev.lock().unwrap().activated.is_none());

        let (mut t, dev, _) = with_recorder();
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        setup_queue(&mut t, 0, 16, 1); // descriptor table must be 16-byte aligned
        setup_queue(&mut t, 1, 16, 0x10000);
        wr(&mut t, REG_STATUS, ALL_OK);
        assert_ne!(rd(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert!(dev.lock().unwrap().activated.is_none());
    }

    #[test]
    fn out_of_order_status_and_early_queue_writes() {
        let (mut t, dev, _) = with_recorder();
        // Queue setup before FEATURES_OK is ignored.
        setup_queue(&mut t, 0, 16, 0);
        wr(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
        // DRIVER_OK straight away.
        wr(&mut t, REG_STATUS, status::DRIVER_OK);
        assert_eq!(rd(&mut t, REG_STATUS), status::DEVICE_NEEDS_RESET);
        assert!(dev.lock().unwrap().activated.is_none());
        wr(&mut t, REG_STATUS, 0);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        // Clearing a bit.
        wr(&mut t, REG_STATUS, status::ACKNOWLEDGE);
        wr(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, REG_STATUS, status::DRIVER);
        assert_ne!(rd(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        // FAILED is always accepted.
        wr(&mut t, REG_STATUS, status::FAILED);
        assert_ne!(rd(&mut t, REG_STATUS) & status::FAILED, 0);
        // Features written outside negotiation are ignored.
        wr(&mut t, REG_STATUS, 0);
        wr(&mut t, REG_DRIVER_FEATURES, 0xffff_ffff);
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
    }

    #[test]
    fn interrupt_status_ack_notify_and_config() {
        let (mut t, dev, irq) = with_recorder();
        irq.trigger(INTERRUPT_USED_RING | INTERRUPT_CONFIG_CHANGE)
            .unwrap();
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 3);
        wr(&mut t, REG_INTERRUPT_ACK, INTERRUPT_USED_RING);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), INTERRUPT_CONFIG_CHANGE);
        assert_eq!(irq.eventfd().read().unwrap(), 1);

        wr(&mut t, REG_QUEUE_NOTIFY, 1);
        wr(&mut t, REG_QUEUE_NOTIFY, 7); // no such queue: ignored
        let d = dev.lock().unwrap();
        assert!(d.evts[0].read().is_err(), "queue 0 not kicked");
        assert_eq!(d.evts[1].read().unwrap(), 1);
        drop(d);

        let mut two = [0u8; 2];
        t.read(CONFIG_SPACE + 2, &mut two);
        assert_eq!(&two, b"CD");
        t.write(CONFIG_SPACE + 7, b"z");
        let mut all = [0u8; 8];
        t.read(CONFIG_SPACE, &mut all);
        assert_eq!(&all, b"ABCDEFGz");

        let dups = t.queue_events().unwrap();
        assert_eq!(dups.len(), 2);
        dups[0].write(1).unwrap();
        assert_eq!(
            dev.lock().unwrap().evts[0].read().unwrap(),
            1,
            "same eventfd"
        );
    }

    #[test]
    fn odd_accesses_read_zero_and_change_nothing() {
        let (mut t, _, _) = with_recorder();
        let mut one = [0xffu8; 1];
        t.read(REG_MAGIC, &mut one);
        assert_eq!(one, [0]);
        let mut four = [0xffu8; 4];
        t.read(REG_MAGIC + 1, &mut four);
        assert_eq!(four, [0; 4]);
        assert_eq!(rd(&mut t, 0x0f0), 0, "unknown register");
        t.write(REG_STATUS, &[1]);
        t.write(REG_STATUS + 2, &1u32.to_le_bytes());
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        wr(&mut t, REG_MAGIC, 0);
        assert_eq!(rd(&mut t, REG_MAGIC), 0x7472_6976);
        wr(&mut t, REG_QUEUE_SEL, u32::MAX);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn the_activation_hook_runs_once_per_accepted_driver_ok() {
        let (mut t, _, _) = with_recorder();
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = runs.clone();
        t.on_activate(Box::new(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        let count = || runs.load(std::sync::atomic::Ordering::SeqCst);
        // Queue 1 never made ready: DRIVER_OK is refused, the hook does not run.
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        setup_queue(&mut t, 0, 16, 0);
        wr(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(count(), 0);
        for round in 1..=2 {
            wr(&mut t, REG_STATUS, 0);
            assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
            setup_queue(&mut t, 0, 16, 0);
            setup_queue(&mut t, 1, 16, 0x10000);
            assert_eq!(count(), round - 1, "not before DRIVER_OK");
            wr(&mut t, REG_STATUS, ALL_OK);
            assert_eq!(rd(&mut t, REG_STATUS), ALL_OK);
            assert_eq!(count(), round, "once per activation, again after a reset");
        }
    }

    /// A fresh transport of a block device on `disk`.
    fn block_transport(disk: &TempDisk) -> MmioTransport {
        let block = Arc::new(Mutex::new(Block::new(disk.open(), false, "b").unwrap()));
        MmioTransport::new(memory(), block, Arc::new(IrqTrigger::new().unwrap()))
    }

    /// What a block transport on `disk` saves once its driver has activated it (queue 0 of
    /// 256 entries).
    fn saved_active_block(disk: &TempDisk) -> TransportSnapshot {
        let mut t = block_transport(disk);
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        setup_queue(&mut t, 0, 256, 0);
        wr(&mut t, REG_STATUS, ALL_OK);
        t.save_state().unwrap()
    }

    #[test]
    fn the_activation_hook_runs_at_the_restore_of_an_active_device() {
        let disk = TempDisk::new(&vec![0u8; 8 * 512]);
        let saved = saved_active_block(&disk);
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut restored = block_transport(&disk);
        let counter = runs.clone();
        restored.on_activate(Box::new(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        restored.restore_state(&saved).unwrap();
        assert_eq!(rd(&mut restored, REG_STATUS), ALL_OK);
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn a_saved_queue_larger_than_the_device_takes_is_refused() {
        let disk = TempDisk::new(&vec![0u8; 8 * 512]);
        let mut saved = saved_active_block(&disk);
        let max = saved.queues[0].size;
        saved.queues[0].size = max * 2;
        let mut restored = block_transport(&disk);
        let err = restored.restore_state(&saved).unwrap_err().to_string();
        assert!(
            err.contains(&format!("size {} saved", max * 2)) && err.contains("at most"),
            "{err}"
        );
        assert_eq!(rd(&mut restored, REG_STATUS), 0, "nothing of it was taken");
    }

    #[test]
    fn broken_device_shows_needs_reset() {
        let (mut t, dev, _) = with_recorder();
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        setup_queue(&mut t, 0, 16, 0);
        setup_queue(&mut t, 1, 16, 0x10000);
        wr(&mut t, REG_STATUS, ALL_OK);
        dev.lock().unwrap().broken = true;
        assert_eq!(rd(&mut t, REG_STATUS), ALL_OK | status::DEVICE_NEEDS_RESET);
    }

    #[test]
    fn block_behind_the_transport() {
        let disk = TempDisk::new(&vec![0u8; 8 * 512]);
        let mut t = block_transport(&disk);
        assert_eq!(rd(&mut t, REG_DEVICE_ID), TYPE_BLOCK);
        let mut cap = [0u8; 8];
        t.read(CONFIG_SPACE, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        assert_eq!(rd(&mut t, CONFIG_SPACE), 8, "32-bit halves");
        assert_eq!(rd(&mut t, CONFIG_SPACE + 4), 0);

        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        // Rings beyond guest memory: the block device refuses to activate.
        setup_queue(&mut t, 0, 256, MEM_SIZE as u64);
        wr(&mut t, REG_STATUS, ALL_OK);
        assert_ne!(rd(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        wr(&mut t, REG_STATUS, 0);
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        setup_queue(&mut t, 0, 256, 0);
        wr(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(rd(&mut t, REG_STATUS), ALL_OK);
    }
}
