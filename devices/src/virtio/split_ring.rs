//! The driver's side of a split virtqueue laid out by hand in real guest memory, for the
//! device tests and the throughput examples (which include this file with `#[path]`):
//! descriptor table at `base`, avail ring at +0x1000, used ring at +0x2000 (room for 256
//! entries each). Descriptors are handed out round the table and avail slots round the
//! ring, so indices wrap as in a real driver.
// Each user takes the part it needs.
#![allow(dead_code)]

use std::collections::HashMap;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// One buffer of a chain: (guest address, length, device-writable).
pub type Buf = (u64, u32, bool);

/// A split virtqueue, driver side.
pub struct Ring {
    /// Guest address of the descriptor table.
    pub base: u64,
    /// Queue size.
    pub size: u16,
    /// Next descriptor [`Ring::add`] uses.
    pub next_desc: u16,
    /// The avail index published so far.
    avail: u16,
    /// Used entries already taken by [`Ring::take_used`] or [`Ring::recycle`].
    seen_used: u16,
    /// Buffers of each chain [`Ring::add`] made available, by head.
    chains: HashMap<u16, Vec<Buf>>,
}

impl Ring {
    /// An empty ring of `size` entries at `base`.
    pub fn new(base: u64, size: u16) -> Self {
        Self {
            base,
            size,
            next_desc: 0,
            avail: 0,
            seen_used: 0,
            chains: HashMap::new(),
        }
    }

    /// Guest address of the avail ring.
    pub fn avail_addr(&self) -> u64 {
        self.base + 0x1000
    }

    /// Guest address of the used ring.
    pub fn used_addr(&self) -> u64 {
        self.base + 0x2000
    }

    /// The queue as the transport hands it to the device: ready, at these addresses.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_ready(true);
        q.try_set_desc_table_address(GuestAddress(self.base))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail_addr()))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used_addr()))
            .unwrap();
        q
    }

    /// Writes descriptor `i`.
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        i: u16,
        addr: u64,
        len: u32,
        flags: u32,
        next: u16,
    ) {
        let at = self.base + 16 * u64::from(i);
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags as u16, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Makes the chain at `head` available.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail % self.size);
        mem.write_obj(head, GuestAddress(self.avail_addr() + 4 + 2 * slot))
            .unwrap();
        self.avail = self.avail.wrapping_add(1);
        mem.write_obj(self.avail, GuestAddress(self.avail_addr() + 2))
            .unwrap();
    }

    /// Writes `bufs` as one chain and makes it available; returns its head.
    pub fn add(&mut self, mem: &GuestMemoryMmap, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let last = i == bufs.len() - 1;
            let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(mem, idx, addr, len, flags, (idx + 1) % self.size);
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        self.chains.insert(head, bufs.to_vec());
        self.publish(mem, head);
        head
    }

    /// The used index the device has published.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used_addr() + 2)).unwrap()
    }

    /// Used entry `i` (counting from the start) as (head, length).
    pub fn used(&self, mem: &GuestMemoryMmap, i: u16) -> (u16, u32) {
        let at = self.used_addr() + 4 + 8 * u64::from(i % self.size);
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id as u16, len)
    }

    /// Used entries since the last call, as (head, length).
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let idx = self.used_idx(mem);
        let mut out = Vec::new();
        while self.seen_used != idx {
            out.push(self.used(mem, self.seen_used));
            self.seen_used = self.seen_used.wrapping_add(1);
        }
        out
    }

    /// Makes every chain the device returned since the last call available again, as a
    /// driver that keeps up does; returns how many.
    pub fn recycle(&mut self, mem: &GuestMemoryMmap) -> u16 {
        let used = self.used_idx(mem);
        let mut n = 0;
        while self.seen_used != used {
            let (head, _) = self.used(mem, self.seen_used);
            self.publish(mem, head);
            self.seen_used = self.seen_used.wrapping_add(1);
            n += 1;
        }
        n
    }

    /// The first `len` bytes the device wrote into chain `head` (made by [`Ring::add`]).
    pub fn read_chain(&self, mem: &GuestMemoryMmap, head: u16, len: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut left = len as usize;
        for &(addr, blen, _) in &self.chains[&head] {
            let n = left.min(blen as usize);
            let mut piece = vec![0u8; n];
            mem.read_slice(&mut piece, GuestAddress(addr)).unwrap();
            out.extend_from_slice(&piece);
            left -= n;
        }
        out
    }
}
