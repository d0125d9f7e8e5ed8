//! A virtio-blk device behind a virtio-mmio (version 2) transport, one request queue,
//! serving requests synchronously on the vCPU thread that notified the queue.
//!
//! Interim: twinbox's `devices` crate is to provide the transport and the block device
//! (with ioeventfd notification served by the event loop); until it lands this compact
//! version lets VMs mount their root and extra disks.

use super::bus::BusDevice;
use crate::memory::GuestMemoryMmap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
/// virtio-mmio version 2 (non-legacy).
const VERSION: u32 = 2;
/// Device ID of a block device.
const DEVICE_ID_BLOCK: u32 = 2;
/// Vendor ID we report ("TWBX").
const VENDOR_ID: u32 = 0x5842_5754;
/// Largest queue we accept.
const QUEUE_MAX_SIZE: u16 = 256;
/// Sector size of virtio-blk requests.
const SECTOR_SIZE: u64 = 512;

/// Feature bits.
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

/// Request types.
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Request status.
const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Interrupt status bit: the used ring was updated.
const INT_USED_RING: u32 = 1;
/// Status bit the driver sets when it gives up on the device.
const STATUS_FAILED: u32 = 0x80;

/// Register offsets of the virtio-mmio transport.
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// A virtio-blk device on the MMIO bus.
pub struct VirtioBlock {
    memory: GuestMemoryMmap,
    file: File,
    read_only: bool,
    capacity_bytes: u64,
    interrupt: EventFd,
    queue: Queue,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    status: u32,
}

impl VirtioBlock {
    /// Opens `path` as the backing file of a new device raising `interrupt`.
    pub fn open(
        memory: GuestMemoryMmap,
        path: &Path,
        read_only: bool,
        interrupt: EventFd,
    ) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)?;
        let capacity_bytes = file.metadata()?.len();
        Ok(Self {
            memory,
            file,
            read_only,
            capacity_bytes,
            interrupt,
            queue: Queue::new(QUEUE_MAX_SIZE).expect("queue size is a power of two"),
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            status: 0,
        })
    }

    fn device_features(&self) -> u64 {
        let mut features = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            features |= VIRTIO_BLK_F_RO;
        }
        features
    }

    fn reset(&mut self) {
        self.queue = Queue::new(QUEUE_MAX_SIZE).expect("queue size is a power of two");
        self.driver_features = 0;
        self.interrupt_status = 0;
        self.status = 0;
        self.queue_sel = 0;
    }

    fn config_byte(&self, offset: u64) -> u8 {
        // struct virtio_blk_config starts with `le64 capacity` (in 512-byte sectors).
        let capacity = (self.capacity_bytes / SECTOR_SIZE).to_le_bytes();
        capacity.get(offset as usize).copied().unwrap_or(0)
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue_selected = self.queue_sel == 0;
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => DEVICE_ID_BLOCK,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX if queue_selected => u32::from(QUEUE_MAX_SIZE),
            reg::QUEUE_READY if queue_selected => u32::from(self.queue.ready()),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let queue_selected = self.queue_sel == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => match self.driver_features_sel {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM if queue_selected => self.queue.set_size(value as u16),
            reg::QUEUE_READY if queue_selected => self.queue.set_ready(value == 1),
            reg::QUEUE_DESC_LOW if queue_selected => {
                self.queue.set_desc_table_address(Some(value), None)
            }
            reg::QUEUE_DESC_HIGH if queue_selected => {
                self.queue.set_desc_table_address(None, Some(value))
            }
            reg::QUEUE_AVAIL_LOW if queue_selected => {
                self.queue.set_avail_ring_address(Some(value), None)
            }
            reg::QUEUE_AVAIL_HIGH if queue_selected => {
                self.queue.set_avail_ring_address(None, Some(value))
            }
            reg::QUEUE_USED_LOW if queue_selected => {
                self.queue.set_used_ring_address(Some(value), None)
            }
            reg::QUEUE_USED_HIGH if queue_selected => {
                self.queue.set_used_ring_address(None, Some(value))
            }
            reg::QUEUE_NOTIFY if value == 0 => self.process_queue(),
            reg::INTERRUPT_ACK => self.interrupt_status &= !value,
            reg::STATUS if value == 0 => self.reset(),
            reg::STATUS => self.status = value,
            _ => tracing::debug!("virtio-blk: ignored write {value:#x} at {offset:#x}"),
        }
    }

    /// Serves every available request, then interrupts the guest if it wants that.
    fn process_queue(&mut self) {
        if self.status & STATUS_FAILED != 0 || !self.queue.is_valid(&self.memory) {
            return;
        }
        let memory = self.memory.clone();
        let mut served = false;
        while let Some(chain) = self.queue.pop_descriptor_chain(&memory) {
            let head = chain.head_index();
            let descriptors: Vec<_> = chain.collect();
            let written = self.serve(&descriptors);
            if let Err(e) = self.queue.add_used(&memory, head, written) {
                tracing::warn!("virtio-blk: cannot return request {head}: {e}");
                break;
            }
            served = true;
        }
        if served && self.queue.needs_notification(&memory).unwrap_or(true) {
            self.interrupt_status |= INT_USED_RING;
            if let Err(e) = self.interrupt.write(1) {
                tracing::warn!("virtio-blk: interrupt failed: {e}");
            }
        }
    }

    /// Serves one request; returns the bytes written into guest buffers (data + status).
    fn serve(&mut self, descriptors: &[virtio_queue::desc::split::Descriptor]) -> u32 {
        let (Some(header), Some(status)) = (descriptors.first(), descriptors.last()) else {
            return 0;
        };
        if descriptors.len() < 2 || header.len() < 16 || !status.is_write_only() || status.len() < 1
        {
            tracing::warn!(
                "virtio-blk: malformed request ({} descriptors)",
                descriptors.len()
            );
            return 0;
        }
        let data = &descriptors[1..descriptors.len() - 1];
        let kind: u32 = self.memory.read_obj(header.addr()).unwrap_or(u32::MAX);
        let sector: u64 = self
            .memory
            .read_obj(GuestAddress(header.addr().0 + 8))
            .unwrap_or(u64::MAX);
        let (result, written) = match kind {
            VIRTIO_BLK_T_IN => self.transfer(sector, data, true),
            VIRTIO_BLK_T_OUT if self.read_only => (VIRTIO_BLK_S_IOERR, 0),
            VIRTIO_BLK_T_OUT => self.transfer(sector, data, false),
            VIRTIO_BLK_T_FLUSH if self.read_only => (VIRTIO_BLK_S_OK, 0),
            VIRTIO_BLK_T_FLUSH => match self.file.sync_data() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(_) => (VIRTIO_BLK_S_IOERR, 0),
            },
            VIRTIO_BLK_T_GET_ID => match data.first() {
                Some(d) if d.is_write_only() => {
                    let id = b"twinbox";
                    let n = id.len().min(d.len() as usize);
                    match self.memory.write_slice(&id[..n], d.addr()) {
                        Ok(()) => (VIRTIO_BLK_S_OK, n as u32),
                        Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                    }
                }
                _ => (VIRTIO_BLK_S_IOERR, 0),
            },
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        };
        if self.memory.write_obj(result, status.addr()).is_err() {
            return written;
        }
        written + 1
    }

    /// Moves data between the backing file at `sector` and the data buffers: into guest
    /// memory for a read (`to_guest`), out of it for a write.
    fn transfer(
        &mut self,
        sector: u64,
        data: &[virtio_queue::desc::split::Descriptor],
        to_guest: bool,
    ) -> (u8, u32) {
        let Some(mut offset) = sector.checked_mul(SECTOR_SIZE) else {
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        let mut written = 0u32;
        for d in data {
            let len = u64::from(d.len());
            if d.is_write_only() != to_guest
                || offset
                    .checked_add(len)
                    .is_none_or(|end| end > self.capacity_bytes)
            {
                return (VIRTIO_BLK_S_IOERR, written);
            }
            let mut buf = vec![0u8; len as usize];
            let ok = if to_guest {
                self.file.read_exact_at(&mut buf, offset).is_ok()
                    && self.memory.write_slice(&buf, d.addr()).is_ok()
            } else {
                self.memory.read_slice(&mut buf, d.addr()).is_ok()
                    && self.file.write_all_at(&buf, offset).is_ok()
            };
            if !ok {
                return (VIRTIO_BLK_S_IOERR, written);
            }
            if to_guest {
                written += d.len();
            }
            offset += len;
        }
        (VIRTIO_BLK_S_OK, written)
    }
}

impl BusDevice for VirtioBlock {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config_byte(offset - reg::CONFIG + i as u64);
            }
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < reg::CONFIG && data.len() == 4 && offset.is_multiple_of(4) {
            self.write_register(
                offset,
                u32::from_le_bytes(data.try_into().expect("4 bytes")),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(read_only: bool) -> (VirtioBlock, std::path::PathBuf) {
        let path =
            std::env::temp_dir().join(format!("twinbox-vblk-{}-{read_only}", std::process::id()));
        std::fs::write(&path, vec![7u8; 4096]).unwrap();
        let memory = crate::memory::create(16).unwrap();
        (
            VirtioBlock::open(memory, &path, read_only, EventFd::new(0).unwrap()).unwrap(),
            path,
        )
    }

    #[test]
    fn identifies_as_a_version_2_block_device_with_capacity() {
        let (mut d, path) = device(true);
        let mut w = [0u8; 4];
        d.read(reg::MAGIC, &mut w);
        assert_eq!(u32::from_le_bytes(w), MAGIC);
        d.read(reg::DEVICE_ID, &mut w);
        assert_eq!(u32::from_le_bytes(w), 2);
        d.read(reg::DEVICE_FEATURES, &mut w);
        assert_ne!(u32::from_le_bytes(w) & (1 << 5), 0, "read-only feature");
        d.write(reg::DEVICE_FEATURES_SEL, &1u32.to_le_bytes());
        d.read(reg::DEVICE_FEATURES, &mut w);
        assert_eq!(u32::from_le_bytes(w), 1, "VERSION_1");
        let mut cap = [0u8; 8];
        d.read(reg::CONFIG, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn serves_a_read_request_through_the_queue() {
        let (mut d, path) = device(false);
        let mem = d.memory.clone();
        // Descriptor table at 0x1000, avail ring at 0x2000, used ring at 0x3000.
        let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let at = GuestAddress(0x1000 + 16 * i);
            mem.write_obj(addr, at).unwrap();
            mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
            mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
        };
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(0x4000))
            .unwrap();
        mem.write_obj(1u64, GuestAddress(0x4008)).unwrap();
        desc(0, 0x4000, 16, NEXT, 1);
        desc(1, 0x5000, 512, NEXT | WRITE, 2);
        desc(2, 0x6000, 1, WRITE, 0);
        mem.write_obj(0u16, GuestAddress(0x2000)).unwrap(); // flags
        mem.write_obj(1u16, GuestAddress(0x2002)).unwrap(); // idx
        mem.write_obj(0u16, GuestAddress(0x2004)).unwrap(); // ring[0]
        mem.write_obj(0xffu8, GuestAddress(0x6000)).unwrap();
        for (r, v) in [
            (reg::QUEUE_NUM, 16),
            (reg::QUEUE_DESC_LOW, 0x1000),
            (reg::QUEUE_AVAIL_LOW, 0x2000),
            (reg::QUEUE_USED_LOW, 0x3000),
            (reg::QUEUE_READY, 1),
            (reg::STATUS, 0xf),
            (reg::QUEUE_NOTIFY, 0),
        ] {
            d.write(r, &(v as u32).to_le_bytes());
        }
        let mut data = [0u8; 512];
        mem.read_slice(&mut data, GuestAddress(0x5000)).unwrap();
        assert_eq!(data, [7u8; 512]);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x6000)).unwrap(),
            VIRTIO_BLK_S_OK
        );
        assert_eq!(
            mem.read_obj::<u16>(GuestAddress(0x3002)).unwrap(),
            1,
            "used idx"
        );
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x3008)).unwrap(),
            513,
            "used len"
        );
        assert_eq!(d.interrupt.read().unwrap(), 1);
        let mut w = [0u8; 4];
        d.read(reg::INTERRUPT_STATUS, &mut w);
        assert_eq!(u32::from_le_bytes(w), 1);
        std::fs::remove_file(path).unwrap();
    }
}
