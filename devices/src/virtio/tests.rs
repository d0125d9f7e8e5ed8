//! End to end without KVM: a "driver" written against the virtio 1.1 register map talks
//! to a Block through the MMIO bus, the queue lives in real guest memory, and the
//! device's work runs in an event-manager loop — the wiring the VMM does.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::test_util::TempDisk;
use super::*;
use crate::bus::Bus;

const BASE: u64 = 0xd000_0000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
/// More than the bounce buffer, so the copy loop goes round several times.
const READ_LEN: u32 = 300 << 10;

fn rd(bus: &Bus, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    assert!(bus.read(BASE + offset, &mut data));
    u32::from_le_bytes(data)
}

fn wr(bus: &Bus, offset: u64, value: u32) {
    assert!(bus.write(BASE + offset, &value.to_le_bytes()));
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

#[test]
fn driver_reads_disk_through_bus_queue_and_event_loop() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let image: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    let disk = TempDisk::new(&image);
    let block = Arc::new(Mutex::new(Block::new(disk.open(), false, "e2e").unwrap()));
    let irq = Arc::new(IrqTrigger::new().unwrap());
    let transport = MmioTransport::new(mem.clone(), block.clone(), irq.clone());
    let mut bus = Bus::new();
    bus.insert(BASE, MMIO_WINDOW_LEN, Arc::new(Mutex::new(transport)))
        .unwrap();
    let mut manager: EventManager<Subscriber> = EventManager::new().unwrap();
    manager.add_subscriber(block.clone());

    // Probe and handshake, as drivers/virtio/virtio_mmio.c does it.
    assert_eq!(rd(&bus, 0x000), 0x7472_6976);
    assert_eq!(rd(&bus, 0x004), 2);
    assert_eq!(rd(&bus, 0x008), TYPE_BLOCK);
    wr(&bus, 0x070, 0);
    wr(&bus, 0x070, 1);
    wr(&bus, 0x070, 1 | 2);
    wr(&bus, 0x014, 0);
    let low = rd(&bus, 0x010);
    wr(&bus, 0x014, 1);
    let high = rd(&bus, 0x010);
    let offered = u64::from(high) << 32 | u64::from(low);
    let wanted = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_BLK_F_FLUSH;
    assert_eq!(offered & wanted, wanted);
    wr(&bus, 0x024, 0);
    wr(&bus, 0x020, wanted as u32);
    wr(&bus, 0x024, 1);
    wr(&bus, 0x020, (wanted >> 32) as u32);
    wr(&bus, 0x070, 1 | 2 | 8);
    assert_eq!(rd(&bus, 0x070), 1 | 2 | 8);
    // Capacity, as the 32-bit halves Linux's virtio_cread64 reads.
    let capacity = u64::from(rd(&bus, 0x100)) | u64::from(rd(&bus, 0x104)) << 32;
    assert_eq!(capacity, (1 << 20) / 512);

    let vq = MockSplitQueue::new(&mem, 16);
    wr(&bus, 0x030, 0);
    assert_eq!(rd(&bus, 0x044), 0);
    assert!(rd(&bus, 0x034) >= 16);
    wr(&bus, 0x038, 16);
    for (reg, addr) in [
        (0x080, vq.desc_table_addr()),
        (0x090, vq.avail_addr()),
        (0x0a0, vq.used_addr()),
    ] {
        wr(&bus, reg, addr.0 as u32);
        wr(&bus, reg + 4, (addr.0 >> 32) as u32);
    }
    wr(&bus, 0x044, 1);
    wr(&bus, 0x070, 1 | 2 | 8 | 4);
    assert_eq!(rd(&bus, 0x070), 1 | 2 | 8 | 4);

    // One IN request: 300 KiB from sector 8.
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    header[8..].copy_from_slice(&8u64.to_le_bytes());
    mem.write_slice(&header, GuestAddress(HDR)).unwrap();
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, 1)),
        RawDescriptor::from(SplitDescriptor::new(DATA, READ_LEN, next | write, 2)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, write, 0)),
    ];
    vq.add_desc_chains(&descs, 0).unwrap();
    // Kick through the register (no ioeventfd without KVM): the transport signals the
    // queue eventfd and the event loop does the work.
    wr(&bus, 0x050, 0);
    for _ in 0..10 {
        if vq.used().idx().load() == 1 {
            break;
        }
        manager.run_with_timeout(1000).unwrap();
    }
    assert_eq!(vq.used().idx().load(), 1);
    let elem = vq.used().ring().ref_at(0).unwrap().load();
    assert_eq!((elem.id(), elem.len()), (0, READ_LEN + 1));
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_OK as u8
    );
    let mut got = vec![0u8; READ_LEN as usize];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got == image[8 * 512..8 * 512 + READ_LEN as usize]);

    // The interrupt: eventfd raised, status bit 0 set, acked through 0x64.
    assert_eq!(irq.eventfd().read().unwrap(), 1);
    assert_eq!(rd(&bus, 0x060), INTERRUPT_USED_RING);
    wr(&bus, 0x064, INTERRUPT_USED_RING);
    assert_eq!(rd(&bus, 0x060), 0);

    // Reset: back to square one, the device inactive.
    wr(&bus, 0x070, 0);
    assert_eq!(rd(&bus, 0x070), 0);
    manager.run_with_timeout(1000).unwrap();
    assert!(!block.lock().unwrap().needs_reset());
}
