//! Measures the virtio-blk request path without KVM: a queue in real guest memory, a
//! temp file as the disk (page cache warm), IN then OUT requests of 128 KiB by default
//! (Linux's default max_sectors_kb), the device driven directly as the event loop would.
//!
//! `cargo run --release -p devices --example blk_throughput [MiB] [request KiB]`

use std::sync::Arc;
use std::time::Instant;

use devices::virtio::{Block, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// Largest request size accepted (the data area in guest memory holds 8 of them).
const MAX_REQ_KIB: u32 = 1024;
const QLEN: u16 = 256;

fn main() {
    let mib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(256);
    let req_kib: u32 = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .filter(|k| (1..=MAX_REQ_KIB).contains(k))
        .unwrap_or(128);
    let req = req_kib << 10;
    let path = std::env::temp_dir().join(format!("twinbox-blk-bench-{}.img", std::process::id()));
    std::fs::write(&path, vec![7u8; (mib << 20) as usize]).expect("write disk image");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open disk image");
    // Unlinked at once: the open file keeps working, and no exit path can leave it behind.
    let _ = std::fs::remove_file(&path);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    // Ring layout by hand: virtio-queue's MockSplitQueue sizes its avail ring in
    // elements rather than bytes, so past half a queue its used ring overlaps it.
    let (desc_table, avail, used) = (
        GuestAddress(0),
        GuestAddress(0x1_0000),
        GuestAddress(0x2_0000),
    );
    let mut block = Block::new(file, false, "bench").unwrap();
    let irq = Arc::new(IrqTrigger::new().unwrap());
    let mut queue = Queue::new(QLEN).unwrap();
    queue.set_size(QLEN);
    queue.set_ready(true);
    queue.try_set_desc_table_address(desc_table).unwrap();
    queue.try_set_avail_ring_address(avail).unwrap();
    queue.try_set_used_ring_address(used).unwrap();
    block
        .activate(mem.clone(), VIRTIO_F_VERSION_1, vec![queue], irq)
        .unwrap();

    for (name, kind, flags) in [
        ("read (IN)", VIRTIO_BLK_T_IN, VRING_DESC_F_WRITE),
        ("write (OUT)", VIRTIO_BLK_T_OUT, 0),
    ] {
        let requests = (mib << 20) / u64::from(req);
        let start = Instant::now();
        let mut sector = 0u64;
        let mut done = 0u64;
        while done < requests {
            // Batches of 64 requests (3 descriptors each) per "kick".
            let batch = (requests - done).min(64);
            let mut descs = Vec::new();
            for i in 0..batch {
                let hdr = 0x10_0000 + i * 16;
                let mut raw = [0u8; 16];
                raw[..4].copy_from_slice(&kind.to_le_bytes());
                raw[8..].copy_from_slice(&sector.to_le_bytes());
                mem.write_slice(&raw, GuestAddress(hdr)).unwrap();
                let data = 0x20_0000 + (i % 8) * u64::from(req);
                let base = (i * 3) as u16;
                descs.push(RawDescriptor::from(Descriptor::new(
                    hdr,
                    16,
                    VRING_DESC_F_NEXT as u16,
                    base + 1,
                )));
                descs.push(RawDescriptor::from(Descriptor::new(
                    data,
                    req,
                    (flags | VRING_DESC_F_NEXT) as u16,
                    base + 2,
                )));
                descs.push(RawDescriptor::from(Descriptor::new(
                    0x18_0000 + i,
                    1,
                    VRING_DESC_F_WRITE as u16,
                    0,
                )));
                sector += u64::from(req) / 512;
            }
            // Descriptors into the table; heads into the avail ring, then publish the
            // new index, as a driver does.
            for (i, d) in descs.iter().enumerate() {
                mem.write_obj(*d, desc_table.unchecked_add(16 * i as u64))
                    .unwrap();
            }
            let idx: u16 = mem.read_obj(avail.unchecked_add(2)).unwrap();
            for i in 0..batch as u16 {
                let slot = u64::from(idx.wrapping_add(i) % QLEN);
                mem.write_obj(i * 3, avail.unchecked_add(4 + 2 * slot))
                    .unwrap();
            }
            mem.write_obj(idx.wrapping_add(batch as u16), avail.unchecked_add(2))
                .unwrap();
            block.process_queue();
            let used_idx: u16 = mem.read_obj(used.unchecked_add(2)).unwrap();
            assert_eq!(used_idx, idx.wrapping_add(batch as u16), "all completed");
            for i in 0..batch {
                let status: u8 = mem.read_obj(GuestAddress(0x18_0000 + i)).unwrap();
                assert_eq!(status, 0, "request {i} failed");
            }
            done += batch;
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{name}: {mib} MiB in {requests} requests of {} KiB: {:.3} s, {:.0} MiB/s, {:.1} us/request",
            req_kib,
            secs,
            mib as f64 / secs,
            secs * 1e6 / requests as f64
        );
    }
}
