//! virtio-blk against a hand-built split queue (virtio-queue's MockSplitQueue) in real
//! guest memory, with a temp file as the disk.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::virtio::test_util::TempDisk;
use crate::virtio::INTERRUPT_CONFIG_CHANGE;

const MEM_SIZE: usize = 0x40_0000;
const QLEN: u16 = 16;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x11_0000;
const DATA2: u64 = 0x12_0000;
const STATUS: u64 = 0x13_0000;
/// Far outside the 4 MiB of guest memory.
const WILD: u64 = 0x1_0000_0000;
const DISK_SECTORS: u64 = 16;
/// A status value no device writes, to see whether the status byte was touched.
const UNTOUCHED: u8 = 0xaa;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A disk whose byte i is `i / 512` (its sector number), so reads are recognisable.
fn disk_image() -> Vec<u8> {
    (0..DISK_SECTORS * SECTOR_SIZE)
        .map(|i| (i / SECTOR_SIZE) as u8)
        .collect()
}

fn write_header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
    let mut raw = [0u8; 16];
    raw[..4].copy_from_slice(&kind.to_le_bytes());
    raw[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(HDR)).unwrap();
    mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
}

/// One buffer of a chain: (address, length, device-writable).
type Buf = (u64, u32, bool);

/// Puts one chain at descriptor index `start` and makes it available.
fn add_chain(vq: &MockSplitQueue<GuestMemoryMmap>, start: u16, bufs: &[Buf]) {
    let descs: Vec<RawDescriptor> = bufs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, write))| {
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            let last = i == bufs.len() - 1;
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let next = if last { 0 } else { start + i as u16 + 1 };
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
        })
        .collect();
    vq.add_desc_chains(&descs, start).unwrap();
}

/// A block device activated on `vq`, plus its interrupt.
fn active_block(
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<GuestMemoryMmap>,
    disk: &TempDisk,
    read_only: bool,
    features: u64,
) -> (Block, Arc<IrqTrigger>) {
    let mut block = Block::new(disk.open(), read_only, "twinbox-disk").unwrap();
    let irq = Arc::new(IrqTrigger::new().unwrap());
    let queue: Queue = vq.create_queue().unwrap();
    block
        .activate(mem.clone(), features, vec![queue], irq.clone())
        .unwrap();
    (block, irq)
}

/// The used-ring entry `i` as (descriptor head, length).
fn used(vq: &MockSplitQueue<GuestMemoryMmap>, i: usize) -> (u32, u32) {
    let elem = vq.used().ring().ref_at(i).unwrap().load();
    (elem.id(), elem.len())
}

fn status(mem: &GuestMemoryMmap) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

#[test]
fn capacity_features_and_config_space() {
    let disk = TempDisk::new(&disk_image());
    let block = Block::new(disk.open(), true, "id").unwrap();
    assert_eq!(block.capacity(), DISK_SECTORS);
    let f = block.avail_features();
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
    let mut cap = [0u8; 8];
    block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
    let mut seg_max = [0u8; 4];
    block.read_config(12, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), u32::from(QUEUE_SIZE) - 2);
    // Past the end reads zeros, partially-past reads what exists.
    let mut tail = [0xffu8; 8];
    block.read_config(14, &mut tail);
    assert_eq!(tail, [0; 8]);
    block.read_config(u64::MAX, &mut tail);
    assert_eq!(tail, [0; 8]);

    let rw = Block::new(disk.open(), false, "id").unwrap();
    assert_eq!(rw.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);

    let odd = TempDisk::new(&[0u8; 513]);
    assert!(matches!(
        Block::new(odd.open(), false, "x"),
        Err(BlockError::UnalignedSize(513))
    ));
    assert!(matches!(
        Block::new(disk.open(), false, "an id far longer than twenty bytes"),
        Err(BlockError::IdTooLong(_))
    ));
}

#[test]
fn write_read_flush_get_id_round_trip() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QLEN);
    let disk = TempDisk::new(&disk_image());
    let (mut block, irq) = active_block(&mem, &vq, &disk, false, VIRTIO_F_VERSION_1);

    // OUT: 1024 bytes to sector 2, from two 512-byte buffers.
    let payload: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    mem.write_slice(&payload[..512], GuestAddress(DATA))
        .unwrap();
    mem.write_slice(&payload[512..], GuestAddress(DATA2))
        .unwrap();
    write_header(&mem, VIRTIO_BLK_T_OUT, 2);
    add_chain(
        &vq,
        0,
        &[
            (HDR, 16, false),
            (DATA, 512, false),
            (DATA2, 512, false),
            (STATUS, 1, true),
        ],
    );
    block.process_queue();
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(used(&vq, 0), (0, 1), "OUT writes only the status byte");
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
    let on_disk = disk.contents();
    assert_eq!(&on_disk[1024..2048], &payload[..]);
    assert_eq!(on_disk[1023], 1, "sector 1 untouched");
    assert_eq!(on_disk[2048], 4, "sector 4 untouched");
    assert_eq!(irq.eventfd().read().unwrap(), 1);
    assert_eq!(irq.status(), INTERRUPT_USED_RING);
    irq.ack(INTERRUPT_USED_RING);

    // IN: sectors 1..4 (1536 bytes) into one buffer.
    mem.write_slice(&[0u8; 1536], GuestAddress(DATA)).unwrap();
    write_header(&mem, VIRTIO_BLK_T_IN, 1);
    add_chain(
        &vq,
        4,
        &[(HDR, 16, false), (DATA, 1536, true), (STATUS, 1, true)],
    );
    block.process_queue();
    assert_eq!(used(&vq, 1), (4, 1537));
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
    let mut back = vec![0u8; 1536];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back[..512].iter().all(|&b| b == 1));
    assert_eq!(&back[512..], &payload[..]);

    // FLUSH and GET_ID, both in one batch: one interrupt for both.
    write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    add_chain(&vq, 8, &[(HDR, 16, false), (STATUS, 1, true)]);
    block.process_queue();
    assert_eq!(used(&vq, 2), (8, 1));
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);

    write_header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    add_chain(
        &vq,
        10,
        &[(HDR, 16, false), (DATA, 64, true), (STATUS, 1, true)],
    );
    block.process_queue();
    assert_eq!(used(&vq, 3), (10, 21));
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..12], b"twinbox-disk");
    assert!(id[12..].iter().all(|&b| b == 0));
    assert!(!block.needs_reset());
}

#[test]
fn read_only_disk_refuses_writes() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QLEN);
    let image = disk_image();
    let disk = TempDisk::new(&image);
    let (mut block, _irq) = active_block(&mem, &vq, &disk, true, VIRTIO_F_VERSION_1);
    mem.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
    write_header(&mem, VIRTIO_BLK_T_OUT, 0);
    add_chain(
        &vq,
        0,
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
    );
    block.process_queue();
    assert_eq!(used(&vq, 0), (0, 1));
    assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(disk.contents(), image);
}

/// (what, request type, sector, chain, expected status or None = dropped).
type Case = (&'static str, u32, u64, Vec<Buf>, Option<u32>);

/// Each malformed chain, alone on a fresh queue: (what, request type, sector, chain,
/// expected status byte or None if the chain must be dropped with used length 0).
#[test]
fn malformed_chains_fail_cleanly() {
    let full_disk = (DISK_SECTORS * SECTOR_SIZE) as u32;
    let cases: Vec<Case> = vec![
        (
            "data outside memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 16, false), (WILD, 512, true), (STATUS, 1, true)],
            Some(VIRTIO_BLK_S_IOERR),
        ),
        (
            "data straddling the end of memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                (HDR, 16, false),
                (MEM_SIZE as u64 - 256, 512, true),
                (STATUS, 1, true),
            ],
            Some(VIRTIO_BLK_S_IOERR),
        ),
        (
            "header outside memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![(WILD, 16, false), (DATA, 512, true), (STATUS, 1, true)],
            Some(VIRTIO_BLK_S_IOERR),
        ),
        (
            "short header",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 8, false), (DATA, 512, true), (STATUS, 1, true)],
            Some(VIRTIO_BLK_S_IOERR),
        ),
        (
            "write-only header",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 16, true), (DATA, 512, true), (STATUS, 1, true)],
            Some(VIRTIO_BLK_S_IOERR),
        ),
        (
            "IN into a read-only buffer",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
            Some(VIRTIO_BLK_S_IOERR),
        ),
        (
            "OUT from a write-only buffer",
            VIRTIO_BLK_T_OUT,
            0,
            vec![(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
            Some(VIRTIO_BLK_S_IOERR),
        ),
        (
            "sector past the end",
            VIRTIO_BLK_T_IN,
            DISK_SECTORS,
            vec![(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
            Some(VIRTIO_BLK_S_IOERR),
        ),
        (
            "last sector plus one",
            VIRTIO_BLK_T_OUT,
            DISK_SECTORS - 1,
            vec![(HDR, 16, false), (DATA, 1024, false), (STATUS, 1, true)],
            Some(VIRTIO_BLK_S_IOERR),
        ),
        (
            "sector * 512 overflows",
            VIRTIO_BLK_T_IN,
            u64::MAX / 256,
            vec![(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
            Some(VIRTIO_BLK_S_IOERR),
        ),
        (
            "huge length",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                (HDR, 16, false),
                (DATA, 0xffff_fe00, true),
                (STATUS, 1, true),
            ],
            Some(VIRTIO_BLK_S_IOERR),
        ),
        (
            "whole disk plus a sector",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                (HDR, 16, false),
                (DATA, full_disk, true),
                (DATA2, 512, true),
                (STATUS, 1, true),
            ],
            Some(VIRTIO_BLK_S_IOERR),
        ),
        (
            "length not whole sectors",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 16, false), (DATA, 100, true), (STATUS, 1, true)],
            Some(VIRTIO_BLK_S_IOERR),
        ),
        (
            "GET_ID without buffer",
            VIRTIO_BLK_T_GET_ID,
            0,
            vec![(HDR, 16, false), (STATUS, 1, true)],
            Some(VIRTIO_BLK_S_IOERR),
        ),
        (
            "unknown type",
            99,
            0,
            vec![(HDR, 16, false), (STATUS, 1, true)],
            Some(VIRTIO_BLK_S_UNSUPP),
        ),
        (
            "discard (not offered)",
            11,
            0,
            vec![(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)],
            Some(VIRTIO_BLK_S_UNSUPP),
        ),
        (
            "read-only status",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 16, false), (DATA, 512, true), (STATUS, 1, false)],
            None,
        ),
        (
            "zero-length status",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 16, false), (DATA, 512, true), (STATUS, 0, true)],
            None,
        ),
        (
            "status outside memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 16, false), (DATA, 512, true), (WILD, 1, true)],
            None,
        ),
        (
            "single descriptor",
            VIRTIO_BLK_T_IN,
            0,
            vec![(STATUS, 16, true)],
            None,
        ),
        (
            "zero-length everything",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 0, false), (STATUS, 0, true)],
            None,
        ),
    ];
    for (what, kind, sector, chain, expected) in cases {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, QLEN);
        let image = disk_image();
        let disk = TempDisk::new(&image);
        let (mut block, _irq) = active_block(&mem, &vq, &disk, false, VIRTIO_F_VERSION_1);
        write_header(&mem, kind, sector);
        add_chain(&vq, 0, &chain);
        block.process_queue();
        assert_eq!(vq.used().idx().load(), 1, "{what}: chain returned");
        let (head, len) = used(&vq, 0);
        assert_eq!(head, 0, "{what}");
        match expected {
            Some(s) => {
                assert_eq!(status(&mem), s as u8, "{what}: status");
                assert_eq!(len, 1, "{what}: only the status byte written");
            }
            None => {
                assert_eq!(len, 0, "{what}: dropped");
                assert_eq!(status(&mem), UNTOUCHED, "{what}: status untouched");
            }
        }
        assert!(
            !block.needs_reset(),
            "{what}: a bad request is not a broken queue"
        );
        assert_eq!(disk.contents(), image, "{what}: disk unchanged");
    }
}

#[test]
fn looping_chain_terminates() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QLEN);
    let disk = TempDisk::new(&disk_image());
    let (mut block, _irq) = active_block(&mem, &vq, &disk, false, VIRTIO_F_VERSION_1);
    write_header(&mem, VIRTIO_BLK_T_IN, 0);
    // 0 → 1 → 0 → 1 … : the iterator stops after QLEN descriptors.
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
        RawDescriptor::from(SplitDescriptor::new(
            STATUS,
            1,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            0,
        )),
    ];
    vq.add_desc_chains(&descs, 0).unwrap();
    block.process_queue();
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(used(&vq, 0), (0, 1));
    assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
    // Self-loop with a descriptor index past the table.
    write_header(&mem, VIRTIO_BLK_T_IN, 0);
    let wild_next = [RawDescriptor::from(SplitDescriptor::new(
        HDR,
        16,
        VRING_DESC_F_NEXT as u16,
        QLEN + 5,
    ))];
    vq.add_desc_chains(&wild_next, 4).unwrap();
    block.process_queue();
    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!(used(&vq, 1), (4, 0), "no status descriptor: dropped");
    assert!(!block.needs_reset());
}

#[test]
fn avail_index_jump_breaks_the_device_until_reset() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QLEN);
    let disk = TempDisk::new(&disk_image());
    let (mut block, irq) = active_block(&mem, &vq, &disk, false, VIRTIO_F_VERSION_1);
    vq.avail().idx().store(QLEN + 1);
    block.process_queue();
    assert!(block.needs_reset());
    assert_eq!(vq.used().idx().load(), 0, "nothing consumed");
    assert_ne!(irq.status() & INTERRUPT_CONFIG_CHANGE, 0);
    // Stays stopped even once the index looks sane again.
    vq.avail().idx().store(0);
    write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    add_chain(&vq, 0, &[(HDR, 16, false), (STATUS, 1, true)]);
    block.process_queue();
    assert_eq!(vq.used().idx().load(), 0);
    block.reset();
    assert!(!block.needs_reset());
}

#[test]
fn used_ring_outside_memory_fails_activation() {
    let mem = memory();
    let disk = TempDisk::new(&disk_image());
    let mut block = Block::new(disk.open(), false, "x").unwrap();
    let irq = Arc::new(IrqTrigger::new().unwrap());
    // Descriptor table and avail ring fine, used ring running past the end of memory.
    let mut queue = Queue::new(QLEN).unwrap();
    queue.set_size(QLEN);
    queue.set_ready(true);
    queue.try_set_desc_table_address(GuestAddress(0)).unwrap();
    queue
        .try_set_avail_ring_address(GuestAddress(0x1000))
        .unwrap();
    queue
        .try_set_used_ring_address(GuestAddress(MEM_SIZE as u64 - 0x40))
        .unwrap();
    let err = block
        .activate(mem.clone(), VIRTIO_F_VERSION_1, vec![queue], irq.clone())
        .unwrap_err();
    assert!(matches!(err, ActivateError::InvalidQueue { .. }), "{err}");
    assert!(matches!(
        block.activate(mem.clone(), VIRTIO_F_VERSION_1, vec![], irq),
        Err(ActivateError::QueueCount {
            expected: 1,
            got: 0
        })
    ));
}

#[test]
fn event_idx_batches_and_still_completes_everything() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QLEN);
    let disk = TempDisk::new(&disk_image());
    let (mut block, irq) = active_block(
        &mem,
        &vq,
        &disk,
        false,
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX,
    );
    write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    for start in [0, 2, 4] {
        add_chain(&vq, start, &[(HDR, 16, false), (STATUS, 1, true)]);
    }
    block.process_queue();
    assert_eq!(vq.used().idx().load(), 3);
    // used_event (after the avail ring) is 0: the driver wants an interrupt once used
    // passes entry 0, which it did.
    assert_eq!(irq.eventfd().read().unwrap(), 1);
}

#[test]
fn event_loop_registers_queue_after_activation_and_processes_kicks() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QLEN);
    let disk = TempDisk::new(&disk_image());
    let block = Arc::new(Mutex::new(Block::new(disk.open(), false, "x").unwrap()));
    let mut manager: EventManager<Arc<Mutex<Block>>> = EventManager::new().unwrap();
    manager.add_subscriber(block.clone());
    let kick = block.lock().unwrap().queue_events()[0].try_clone().unwrap();

    // A kick before activation is not even watched yet.
    kick.write(1).unwrap();
    assert_eq!(manager.run_with_timeout(0).unwrap(), 0);

    let irq = Arc::new(IrqTrigger::new().unwrap());
    let queue: Queue = vq.create_queue().unwrap();
    block
        .lock()
        .unwrap()
        .activate(mem.clone(), VIRTIO_F_VERSION_1, vec![queue], irq.clone())
        .unwrap();
    write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    add_chain(&vq, 0, &[(HDR, 16, false), (STATUS, 1, true)]);
    // The activate event registers the queue; the pending kick then fires.
    let mut dispatched = 0;
    while vq.used().idx().load() == 0 && dispatched < 10 {
        manager.run_with_timeout(1000).unwrap();
        dispatched += 1;
    }
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
    assert_eq!(irq.eventfd().read().unwrap(), 1);

    // After a reset the queue eventfd is dropped from the loop: kicks are not processed.
    block.lock().unwrap().reset();
    manager.run_with_timeout(1000).unwrap(); // the reset's activate event
    add_chain(&vq, 2, &[(HDR, 16, false), (STATUS, 1, true)]);
    kick.write(1).unwrap();
    assert_eq!(manager.run_with_timeout(0).unwrap(), 0);
    assert_eq!(vq.used().idx().load(), 1);
}

#[test]
fn head_index_past_the_table_breaks_the_queue() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, QLEN);
    let disk = TempDisk::new(&disk_image());
    let (mut block, irq) = active_block(&mem, &vq, &disk, false, VIRTIO_F_VERSION_1);
    // avail.ring[0] = QLEN + 3, avail.idx = 1: a head no descriptor table has.
    vq.avail().ring().ref_at(0).unwrap().store(QLEN + 3);
    vq.avail().idx().store(1);
    block.process_queue();
    assert!(block.needs_reset());
    assert_eq!(vq.used().idx().load(), 0);
    assert_ne!(irq.status() & INTERRUPT_CONFIG_CHANGE, 0);
}

/// Many more requests than the queue has entries, in batches, with the rings laid out
/// by hand (MockSplitQueue sizes its avail ring in elements, not bytes, so its used ring
/// overlaps the second half of the avail ring): ring positions and the 16-bit indexes
/// wrap, and every request still completes, in order, with the right data.
#[test]
fn rings_wrap_over_many_batches() {
    const DESC_TABLE: u64 = 0;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;
    let mem = memory();
    let image = disk_image();
    let disk = TempDisk::new(&image);
    let mut block = Block::new(disk.open(), true, "wrap").unwrap();
    let irq = Arc::new(IrqTrigger::new().unwrap());
    let mut queue = Queue::new(QLEN).unwrap();
    queue.set_size(QLEN);
    queue.set_ready(true);
    queue
        .try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .unwrap();
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL))
        .unwrap();
    queue.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    block
        .activate(mem.clone(), VIRTIO_F_VERSION_1, vec![queue], irq)
        .unwrap();

    let mut avail_idx = 0u16;
    let mut completed = 0u16;
    // 5 requests (15 descriptors) per batch, 66,000 requests: the u16 index wraps.
    for batch in 0..13_200u32 {
        for i in 0..5u16 {
            let sector = u64::from((batch * 5 + u32::from(i)) % DISK_SECTORS as u32);
            let hdr = HDR + u64::from(i) * 16;
            let mut raw = [0u8; 16];
            raw[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
            raw[8..].copy_from_slice(&sector.to_le_bytes());
            mem.write_slice(&raw, GuestAddress(hdr)).unwrap();
            let head = i * 3;
            let descs = [
                (hdr, 16, VRING_DESC_F_NEXT, head + 1),
                (
                    DATA + u64::from(i) * 512,
                    512,
                    VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                    head + 2,
                ),
                (STATUS + u64::from(i), 1, VRING_DESC_F_WRITE, 0),
            ];
            for (k, (addr, len, flags, next)) in descs.into_iter().enumerate() {
                let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next));
                mem.write_obj(
                    d,
                    GuestAddress(DESC_TABLE + 16 * u64::from(head + k as u16)),
                )
                .unwrap();
            }
            let slot = u64::from(avail_idx.wrapping_add(i) % QLEN);
            mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
        }
        avail_idx = avail_idx.wrapping_add(5);
        mem.write_obj(avail_idx, GuestAddress(AVAIL + 2)).unwrap();
        block.process_queue();
        let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used_idx, avail_idx, "batch {batch}");
        for i in 0..5u16 {
            let slot = u64::from(completed.wrapping_add(i) % QLEN);
            let id: u32 = mem.read_obj(GuestAddress(USED + 4 + 8 * slot)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(USED + 8 + 8 * slot)).unwrap();
            assert_eq!(
                (id, len),
                (u32::from(i) * 3, 513),
                "batch {batch} request {i}"
            );
            let sector = (batch * 5 + u32::from(i)) % DISK_SECTORS as u32;
            let first: u8 = mem
                .read_obj(GuestAddress(DATA + u64::from(i) * 512))
                .unwrap();
            assert_eq!(first, sector as u8);
        }
        completed = completed.wrapping_add(5);
    }
    assert_eq!(
        avail_idx,
        (66_000 - 65_536) as u16,
        "the 16-bit index wrapped"
    );
    assert!(!block.needs_reset());
}
