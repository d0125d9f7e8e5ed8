//! Receive: backend → guest, one `readv` per frame straight into the driver's buffers.
//!
//! An RX chain is device-writable descriptors only, at least a header long. Chains are
//! popped into a pool as they are needed and stay there until a frame fills them, so a
//! small frame never walks the whole ring. Without `MRG_RXBUF` a frame goes into the
//! pool's first chain; with it, into as many chains as it needs, the pool first grown to
//! hold the largest frame the backend may produce (64 KiB with guest TSO, else one MTU
//! frame; a tap cannot be asked the length of its next frame). The header's
//! `num_buffers` is then set to the number of chains used (1 without MRG_RXBUF; a tap
//! leaves those two bytes alone or zeroes them, depending on the kernel).
//!
//! With no chain available RX stops: the backend fd is no longer watched and
//! notifications are enabled, so the driver's next RX kick resumes it. A frame longer
//! than the room offered is lost (the backend consumed it) and counted; the chains stay
//! in the pool for the next one. A tap's read returns the bytes it copied, not the
//! frame's length, so each read offers one spare byte of the device's own after the
//! guest's buffers: a frame that reaches it did not fit.

use std::collections::VecDeque;

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{
    Active, ChainDrop, Net, NetBackend, NetCounters, QueueBroken, BUDGET, MAX_IOVS,
    NUM_BUFFERS_OFFSET, RX_QUEUE, VNET_HDR_LEN,
};
use crate::virtio::iov::{push_guest_range, IoBuf};

/// Header bytes the device writes after a read: `flags` (cleared when the driver did not
/// negotiate GUEST_CSUM: the spec wants 0 there, and a tap may set DATA_VALID whatever
/// its offloads), then both bytes of `num_buffers`.
const FIXED_BYTES: [usize; 3] = [0, NUM_BUFFERS_OFFSET, NUM_BUFFERS_OFFSET + 1];

/// One RX chain in the pool.
#[derive(Clone, Copy, Debug)]
struct Held {
    head: u16,
    /// Writable bytes.
    len: u32,
    /// Its entries at the front of the pool's iovecs.
    iovs: usize,
    /// Descriptors it took from the driver's table.
    descs: usize,
    /// Guest addresses of the header bytes the device rewrites, [`FIXED_BYTES`] (the
    /// header may be split over descriptors).
    fixed_at: [GuestAddress; 3],
}

/// RX chains popped from the queue, checked, and not yet used.
pub(super) struct RxPool {
    /// Iovecs of all held chains, in order (plus, during a read, the spill byte).
    iovs: Vec<IoBuf>,
    chains: VecDeque<Held>,
    /// Total writable bytes held.
    bytes: usize,
    /// Total descriptors held.
    descs: usize,
    /// `Some(room)` with MRG_RXBUF: gather `room` bytes before reading.
    mergeable_room: Option<usize>,
}

/// Why a chain did not join the pool.
enum Refused {
    /// Malformed: return it to the driver unused.
    Drop(ChainDrop),
    /// Valid, but the pool's iovecs are full: leave it in the ring for later.
    PoolFull,
}

impl RxPool {
    /// An empty pool; `mergeable_room` as in the field. Allocates its arrays once.
    pub(super) fn new(mergeable_room: Option<usize>) -> Self {
        Self {
            iovs: Vec::with_capacity(MAX_IOVS + 1),
            chains: VecDeque::with_capacity(usize::from(super::QUEUE_SIZE)),
            bytes: 0,
            descs: 0,
            mergeable_room,
        }
    }

    /// True when the pool can take a frame: one chain without MRG_RXBUF; with it, room
    /// for the largest frame, or as much as the driver can ever post (every ring entry
    /// or descriptor held, or every iovec slot used), so that a guest with small buffers
    /// and a small ring still receives.
    fn ready(&self, queue_size: usize) -> bool {
        match self.mergeable_room {
            None => !self.chains.is_empty(),
            Some(room) => {
                self.bytes >= room
                    || (!self.chains.is_empty()
                        && (self.chains.len() >= queue_size
                            || self.descs >= queue_size
                            || self.iovs.len() >= MAX_IOVS))
            }
        }
    }

    /// Checks `chain` and adds it to the pool.
    fn push(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<(), Refused> {
        let start = self.iovs.len();
        let head = chain.head_index();
        let mut len = 0u32;
        let mut descs = 0usize;
        let mut last_has_next = false;
        let mut fixed_at = [GuestAddress(0); 3];
        let parse = || -> Result<(), ChainDrop> {
            for desc in chain {
                descs += 1;
                last_has_next = desc.has_next();
                if !desc.is_write_only() {
                    return Err(ChainDrop::WrongDirection);
                }
                push_guest_range(mem, desc.addr(), desc.len(), &mut self.iovs, MAX_IOVS)?;
                for (pos, at) in FIXED_BYTES.iter().zip(fixed_at.iter_mut()) {
                    let pos = *pos as u32;
                    if (len..len.saturating_add(desc.len())).contains(&pos) {
                        // Inside a range just checked against guest memory: no overflow.
                        *at = GuestAddress(desc.addr().0 + u64::from(pos - len));
                    }
                }
                // The descriptor iterator stops before 4 GiB in total.
                len = len.saturating_add(desc.len());
            }
            if descs == 0 || last_has_next {
                return Err(ChainDrop::BrokenLink);
            }
            // Every buffer must hold a whole header (virtio 1.1, 5.1.6.3.1), which also
            // puts num_buffers in the first chain of a frame.
            if (len as usize) < VNET_HDR_LEN {
                return Err(ChainDrop::TooShort);
            }
            Ok(())
        };
        match parse() {
            Ok(()) => {
                self.chains.push_back(Held {
                    head,
                    len,
                    iovs: self.iovs.len() - start,
                    descs,
                    fixed_at,
                });
                self.bytes += len as usize;
                self.descs += descs;
                Ok(())
            }
            Err(why) => {
                self.iovs.truncate(start);
                if why == ChainDrop::TooManySegments && !self.chains.is_empty() {
                    Err(Refused::PoolFull)
                } else {
                    Err(Refused::Drop(why))
                }
            }
        }
    }

    /// Reads the next frame into every chain held (without MRG_RXBUF the pool never
    /// holds more than one) plus `spill`, a device byte after them: neither a tap nor a
    /// socket says how long a frame was when it did not fit (both return what they
    /// copied), so a frame that reaches `spill` is one that did not fit.
    fn read(&mut self, backend: &NetBackend, spill: &mut [u8; 1]) -> std::io::Result<usize> {
        debug_assert!(self.mergeable_room.is_some() || self.chains.len() <= 1);
        // Within the capacity reserved in new(): no allocation.
        self.iovs.push(IoBuf::host_mut(spill));
        let result = backend.read_frame(&self.iovs);
        self.iovs.pop();
        result
    }

    /// Forgets the first `n` chains (used).
    fn consume(&mut self, n: usize) {
        let mut iovs = 0;
        for held in self.chains.drain(..n) {
            iovs += held.iovs;
            self.bytes -= held.len as usize;
            self.descs -= held.descs;
        }
        self.iovs.drain(..iovs);
    }
}

/// How an RX pass ended, when the queue is not broken.
enum RxStop {
    /// Nothing more to read now.
    BackendEmpty,
    /// The budget ran out; the backend is still readable and epoll says so again.
    Budget,
    /// The driver has no buffers; wait for its kick.
    NoBuffers,
    /// The socket peer hung up.
    Closed,
}

impl Net {
    /// Moves frames from the backend into the driver's RX buffers until the backend is
    /// empty, the buffers run out or the budget is spent; called on the event loop for
    /// EPOLLIN and RX kicks (public for tests and VMMs without an event loop).
    pub fn process_rx(&mut self) {
        if self.broken || self.backend_closed {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut used_any = false;
        let result = run_rx(&self.backend, active, &mut self.counters, &mut used_any);
        if used_any {
            active.notify(RX_QUEUE);
        }
        match result {
            Ok(RxStop::BackendEmpty | RxStop::Budget) => self.rx_waiting = false,
            Ok(RxStop::NoBuffers) => self.rx_waiting = true,
            Ok(RxStop::Closed) => {
                tracing::warn!("virtio-net: the backend hung up; no more RX");
                self.backend_closed = true;
            }
            Err(e) => self.set_broken(&e),
        }
    }
}

/// Grows the pool until it can take a frame; false if the driver has too few buffers.
fn fill(
    a: &mut Active,
    counters: &mut NetCounters,
    used_any: &mut bool,
) -> Result<bool, QueueBroken> {
    let queue_size = usize::from(a.rx.size());
    // A driver adding malformed chains as fast as we drop them cannot hold us here.
    let mut pops = 0usize;
    while !a.pool.ready(queue_size) {
        if pops == 2 * queue_size {
            return Ok(false);
        }
        pops += 1;
        let chain = a.rx.iter(&a.mem).map_err(QueueBroken::Avail)?.next();
        let Some(chain) = chain else {
            return Ok(false);
        };
        let head = chain.head_index();
        match a.pool.push(&a.mem, chain) {
            Ok(()) => {}
            Err(Refused::PoolFull) => {
                a.rx.go_to_previous_position();
                return Ok(true);
            }
            Err(Refused::Drop(why)) => {
                tracing::debug!("virtio-net: RX chain {head} dropped: {why:?}");
                counters.rx_dropped.count(why);
                // Used entries of one frame are added together after the read, so this
                // zero-length entry can never land inside a merged frame.
                a.rx.add_used(&a.mem, head, 0).map_err(QueueBroken::Used)?;
                *used_any = true;
            }
        }
    }
    Ok(true)
}

fn run_rx(
    backend: &NetBackend,
    a: &mut Active,
    counters: &mut NetCounters,
    used_any: &mut bool,
) -> Result<RxStop, QueueBroken> {
    // Kicks are only wanted while we wait for buffers (enabled below when we do).
    a.rx.disable_notification(&a.mem)
        .map_err(QueueBroken::Used)?;
    for _ in 0..BUDGET {
        if !fill(a, counters, used_any)? {
            // Ask for a kick when buffers come; if some came meanwhile, go on.
            if a.rx
                .enable_notification(&a.mem)
                .map_err(QueueBroken::Used)?
            {
                continue;
            }
            counters.rx_no_buffers += 1;
            return Ok(RxStop::NoBuffers);
        }
        let mut spill = [0u8; 1];
        let room = a.pool.bytes;
        let n = match a.pool.read(backend, &mut spill) {
            Ok(0) => return Ok(RxStop::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Ok(RxStop::BackendEmpty)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!("virtio-net: backend read failed: {e}");
                counters.rx_backend_errors += 1;
                continue;
            }
        };
        if n < VNET_HDR_LEN {
            counters.rx_runts += 1;
            continue;
        }
        if n > room {
            counters.rx_truncated += 1;
            continue;
        }
        deliver(a, n)?;
        counters.rx_frames += 1;
        counters.rx_bytes += (n - VNET_HDR_LEN) as u64;
        *used_any = true;
    }
    Ok(RxStop::Budget)
}

/// Hands the `n` bytes just read to the driver: `num_buffers`, then one used entry per
/// chain filled, in order.
fn deliver(a: &mut Active, n: usize) -> Result<(), QueueBroken> {
    let mut left = n;
    let mut chains = 0usize;
    for held in &a.pool.chains {
        if left == 0 {
            break;
        }
        left -= left.min(held.len as usize);
        chains += 1;
    }
    // n ≤ room, so the chains held cover it; at most a queue's worth of them.
    let first = a.pool.chains[0];
    let [lo, hi] = (chains as u16).to_le_bytes();
    let bytes = [(0, !a.guest_csum), (1, true), (2, true)];
    for ((i, write), value) in bytes.into_iter().zip([0, lo, hi]) {
        let at = first.fixed_at[i];
        if write {
            if let Err(e) = a.mem.write_obj(value, at) {
                // Checked when the chain was popped; memory does not shrink.
                tracing::error!("virtio-net: cannot write the RX header at {at:?}: {e}");
            }
        }
    }
    let mut left = n;
    for held in a.pool.chains.iter().take(chains) {
        let used = left.min(held.len as usize);
        left -= used;
        a.rx.add_used(&a.mem, held.head, used as u32)
            .map_err(QueueBroken::Used)?;
    }
    a.pool.consume(chains);
    Ok(())
}
