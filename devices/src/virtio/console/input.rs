//! Host → guest: one `readv` from the port's fd straight into the driver's receive
//! buffers.
//!
//! Receive chains are popped into a per-port pool as they are needed and stay there
//! until bytes fill them; a read offers every chain held (up to [`READ_ROOM`] bytes), and
//! each chain it reached goes to the used ring with the bytes it got: the stream has no
//! framing, so a partly filled chain is simply a short read for the guest. Nothing is
//! read while the guest has the port closed (Linux would discard it) or has no buffers
//! posted (the fd is then not watched; the driver's next kick resumes).

use std::collections::VecDeque;
use std::os::fd::AsFd;

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{
    add_used, check_chain, pop, Active, ChainDrop, Console, Direction, DropCounts, PortState,
    QueueBroken, BUDGET, MAX_IOVS, RX_QUEUE_SIZE,
};
use crate::virtio::iov::{self, IoBuf};

/// Guest buffer bytes gathered before a read: a default pipe's capacity.
const READ_ROOM: usize = 64 << 10;
/// Longest receive chain accepted (Linux posts single pages).
const MAX_RX_CHAIN_LEN: usize = 1 << 20;

/// One receive chain in the pool.
#[derive(Clone, Copy, Debug)]
struct Held {
    head: u16,
    len: usize,
    /// Its entries at the front of the pool's iovecs.
    iovs: usize,
}

/// Receive chains popped from a port's receiveq, checked, and not yet used.
pub(super) struct RxPool {
    iovs: Vec<IoBuf>,
    chains: VecDeque<Held>,
    bytes: usize,
}

/// Why a chain did not join the pool.
enum Refused {
    /// Malformed: return it to the driver unused.
    Drop(ChainDrop),
    /// Valid, but the pool's iovecs are full: leave it in the ring for later.
    PoolFull,
}

impl RxPool {
    /// An empty pool; allocates its arrays once.
    pub(super) fn new() -> Self {
        Self {
            iovs: Vec::with_capacity(MAX_IOVS),
            chains: VecDeque::with_capacity(usize::from(RX_QUEUE_SIZE)),
            bytes: 0,
        }
    }

    /// Receive chains held (taken from the ring, not yet used).
    pub(super) fn held(&self) -> usize {
        self.chains.len()
    }

    fn push(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<(), Refused> {
        let head = chain.head_index();
        let before = self.iovs.len();
        match check_chain(mem, chain, true, &mut self.iovs, MAX_IOVS, MAX_RX_CHAIN_LEN) {
            Ok(0) => Err(Refused::Drop(ChainDrop::TooShort)),
            Ok(len) => {
                self.chains.push_back(Held {
                    head,
                    len,
                    iovs: self.iovs.len() - before,
                });
                self.bytes += len;
                Ok(())
            }
            Err(ChainDrop::TooManySegments) if !self.chains.is_empty() => Err(Refused::PoolFull),
            Err(why) => Err(Refused::Drop(why)),
        }
    }
}

/// How a receive pass ended, when the queue is not broken.
enum InStop {
    /// Nothing more to read now; EPOLLIN brings us back.
    HostEmpty,
    /// The budget ran out; the fd is still readable and epoll says so again.
    Budget,
    /// The driver has no buffers; wait for its kick.
    NoBuffers,
    /// The host end reached EOF (or failed): nothing more will come.
    Eof,
}

impl Console {
    /// Moves bytes from port `port`'s host end into the driver's receive buffers until
    /// the fd is empty, the buffers run out or the budget is spent; called for EPOLLIN,
    /// receive kicks and the guest opening the port (public for tests and VMMs without an
    /// event loop).
    pub fn process_input(&mut self, port: usize) {
        if self.broken {
            return;
        }
        let (Some(a), Some(p)) = (self.active.as_mut(), self.ports.get_mut(port)) else {
            return;
        };
        if p.dir != Direction::Input || !p.guest_connected || p.eof || p.fd.is_none() {
            return;
        }
        let result = run_input(a, port, p, &mut self.dropped);
        a.notify();
        match result {
            Ok(InStop::HostEmpty | InStop::Budget) => p.rx_waiting = false,
            Ok(InStop::NoBuffers) => p.rx_waiting = true,
            Ok(InStop::Eof) => {
                // Everything read is in the used ring already, ahead of this message.
                p.eof = true;
                self.close_host(port);
                self.announce_host_closed(port);
            }
            Err(e) => self.set_broken(&e),
        }
    }
}

fn run_input(
    a: &mut Active,
    port: usize,
    p: &mut PortState,
    dropped: &mut DropCounts,
) -> Result<InStop, QueueBroken> {
    let q = super::rx_queue(port);
    let Some(fd) = p.fd.as_ref() else {
        return Ok(InStop::Eof);
    };
    // Kicks are only wanted while we wait for buffers (enabled below when we do).
    a.queues[q]
        .disable_notification(&a.mem)
        .map_err(|e| QueueBroken::Used(q, e))?;
    for _ in 0..BUDGET {
        fill(a, port, q, dropped)?;
        if a.rx_pools[port].chains.is_empty() {
            // Ask for a kick when buffers come; if some came meanwhile, go on.
            if a.queues[q]
                .enable_notification(&a.mem)
                .map_err(|e| QueueBroken::Used(q, e))?
            {
                continue;
            }
            return Ok(InStop::NoBuffers);
        }
        let n = match iov::readv(fd.as_fd(), &a.rx_pools[port].iovs) {
            Ok(0) => return Ok(InStop::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(InStop::HostEmpty),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(
                    "virtio-console: port {}: read failed, closing it: {e}",
                    p.name
                );
                p.counters.host_errors += 1;
                return Ok(InStop::Eof);
            }
        };
        deliver(a, port, q, n)?;
        p.counters.bytes_to_guest += n as u64;
    }
    Ok(InStop::Budget)
}

/// Pops receive chains into the pool until it holds [`READ_ROOM`] bytes or the driver
/// has no more.
fn fill(
    a: &mut Active,
    port: usize,
    q: usize,
    dropped: &mut DropCounts,
) -> Result<(), QueueBroken> {
    let pool = &mut a.rx_pools[port];
    // A driver adding malformed chains as fast as we drop them cannot hold us here.
    let mut pops = 2 * usize::from(a.queues[q].size());
    while pool.bytes < READ_ROOM && pops > 0 {
        pops -= 1;
        let Some(chain) = pop(&mut a.queues[q], &a.mem, q)? else {
            break;
        };
        let head = chain.head_index();
        match pool.push(&a.mem, chain) {
            Ok(()) => {}
            Err(Refused::PoolFull) => {
                a.queues[q].go_to_previous_position();
                break;
            }
            Err(Refused::Drop(why)) => {
                tracing::debug!("virtio-console: receive chain {head} dropped: {why:?}");
                dropped.count(why);
                add_used(&mut a.queues[q], &a.mem, &mut a.used, q, head, 0)?;
            }
        }
    }
    Ok(())
}

/// Hands the `n` bytes just read to the driver: each chain they reached goes to the used
/// ring with the bytes it holds, in order.
fn deliver(a: &mut Active, port: usize, q: usize, n: usize) -> Result<(), QueueBroken> {
    let pool = &mut a.rx_pools[port];
    let mut left = n;
    let mut chains = 0;
    let mut iovs = 0;
    for held in &pool.chains {
        if left == 0 {
            break;
        }
        let got = left.min(held.len);
        left -= got;
        chains += 1;
        iovs += held.iovs;
        pool.bytes -= held.len;
        add_used(
            &mut a.queues[q],
            &a.mem,
            &mut a.used,
            q,
            held.head,
            got as u32,
        )?;
    }
    pool.chains.drain(..chains);
    pool.iovs.drain(..iovs);
    Ok(())
}
