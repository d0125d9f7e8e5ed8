//! Guest → host: the port's transmit chains go to its fd with `writev`, straight from
//! guest memory, several chains per call.
//!
//! Chains are popped into a per-port pending list (up to [`WRITE_ROOM`] bytes) and leave
//! it, to the used ring, once all their bytes are written. A short write or EAGAIN leaves
//! the rest pending with its offset; the device then waits for EPOLLOUT with the queue's
//! kicks off, so a slow reader makes the guest's queue fill and its writers wait
//! (Linux's `will_write_block`): nothing is dropped, nothing is copied to the host.
//!
//! A transmit chain on a host → guest port, after the host end failed (EPIPE: the reader
//! went away) or after it was closed has nowhere to go: it is checked, counted as
//! discarded and returned, so the guest never blocks on it.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Instant;

use virtio_queue::{QueueOwnedT, QueueT};

use super::{
    add_used, check_chain, pop, Active, ChainDrop, Console, Direction, DropCounts, PortState,
    QueueBroken, BUDGET, MAX_IOVS, TX_QUEUE_SIZE,
};
use crate::virtio::iov::{self, IoBuf};

/// Guest bytes gathered before a write: as much as a pipe can hold at the default
/// `/proc/sys/fs/pipe-max-size` (1 MiB), so one call can fill a pipe the VMM enlarged.
const WRITE_ROOM: usize = 1 << 20;
/// Longest transmit chain accepted: Linux sends at most 32 KiB per `write` and a pipe's
/// worth per `splice` (1 MiB at the default pipe-max-size).
pub const MAX_TX_CHAIN_LEN: usize = 1 << 20;

/// Transmit chains of one port popped and not yet completely written.
pub(super) struct TxPending {
    /// Iovecs of the bytes still to write, in order (the first one possibly advanced past
    /// what a short write took).
    iovs: Vec<IoBuf>,
    /// (head, bytes still to write) per chain, in order.
    chains: VecDeque<(u16, usize)>,
    bytes: usize,
}

impl TxPending {
    /// Whether no chain waits to be written.
    pub(super) fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// Empty; allocates its arrays once.
    pub(super) fn new() -> Self {
        Self {
            iovs: Vec::with_capacity(MAX_IOVS),
            chains: VecDeque::with_capacity(usize::from(TX_QUEUE_SIZE)),
            bytes: 0,
        }
    }
}

/// How a transmit pass ended, when the queue is not broken.
enum OutStop {
    /// Every chain the driver made available is written (or discarded).
    Empty,
    /// The host end is full; EPOLLOUT brings us back.
    Blocked,
    /// The budget ran out with chains left.
    Budget,
}

/// What [`Console::flush_output`] achieved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushOutcome {
    /// Guest bytes written to the host ends by the flush.
    pub bytes: u64,
    /// False if some output port's reader did not take everything before the deadline,
    /// or a queue was broken: the rest of that port's output is lost.
    pub complete: bool,
}

impl Console {
    /// Writes the chains the driver made available on port `port`'s transmitq to its host
    /// end (or discards them, see the module docs); called for transmit kicks and EPOLLOUT
    /// (public for tests and VMMs without an event loop).
    pub fn process_tx(&mut self, port: usize) {
        if self.broken {
            return;
        }
        let (Some(a), Some(p)) = (self.active.as_mut(), self.ports.get_mut(port)) else {
            return;
        };
        if p.tx_blocked {
            return;
        }
        let result = run_output(a, port, p, &mut self.dropped, Some(BUDGET));
        a.notify();
        match result {
            Ok(OutStop::Empty) => {
                if p.guest_closing && p.fd.is_some() {
                    // The guest closed the port and everything it wrote before is out.
                    self.close_host(port);
                }
            }
            Ok(OutStop::Blocked) => p.tx_blocked = true,
            Ok(OutStop::Budget) => {
                // Come back through the loop after the other events: kick ourselves.
                if let Err(e) = self.events.queue_evts[super::tx_queue(port)].write(1) {
                    tracing::error!("virtio-console: cannot requeue port {port}: {e}");
                }
            }
            Err(e) => self.set_broken(&e),
        }
    }

    /// Teardown, after the vCPUs stopped (and preferably after the event loop stopped
    /// serving the device): writes every chain still queued for the output ports to their
    /// host ends, waiting with `poll` for the readers to make room until `deadline`, then
    /// closes the output fds so the readers see EOF. Call once; the device moves no more
    /// output afterwards.
    pub fn flush_output(&mut self, deadline: Instant) -> FlushOutcome {
        let mut outcome = FlushOutcome {
            bytes: 0,
            complete: true,
        };
        for port in 0..self.ports.len() {
            if self.ports[port].dir != Direction::Output {
                continue;
            }
            let before = self.ports[port].counters.bytes_from_guest;
            if !self.flush_port(port, deadline) {
                outcome.complete = false;
            }
            let p = &mut self.ports[port];
            outcome.bytes += p.counters.bytes_from_guest - before;
            // The event loop is done with the device (or will be before it could reuse the
            // number): close whatever its registration.
            p.registered = None;
            p.close_pending = false;
            p.fd = None;
        }
        outcome
    }

    /// [`Self::flush_output`] for one port; false if it could not finish.
    fn flush_port(&mut self, port: usize, deadline: Instant) -> bool {
        loop {
            if self.broken {
                return false;
            }
            // The live queues, or those of a driver that reset the device on its way
            // down (see `Console::unflushed`).
            let (Some(a), p) = (
                self.active.as_mut().or(self.unflushed.as_mut()),
                &mut self.ports[port],
            ) else {
                // Never activated: the guest has nothing queued.
                return true;
            };
            p.tx_blocked = false;
            let result = run_output(a, port, p, &mut self.dropped, None);
            a.notify();
            match result {
                Ok(OutStop::Empty) => return true,
                Ok(OutStop::Budget) => {}
                Ok(OutStop::Blocked) => {
                    let Some(fd) = p.fd.as_ref() else {
                        return true;
                    };
                    if !wait_writable(fd.as_fd(), deadline) {
                        tracing::warn!(
                            "virtio-console: port {}: the reader took nothing more before the deadline; the rest of the output is lost",
                            p.name
                        );
                        return false;
                    }
                }
                Err(e) => {
                    self.set_broken(&e);
                    return false;
                }
            }
        }
    }
}

/// Waits with `poll` until `fd` is writable (or in error, which the next write reports);
/// false at `deadline`.
fn wait_writable(fd: std::os::fd::BorrowedFd<'_>, deadline: Instant) -> bool {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // Round up, so a wait shorter than a millisecond does not spin.
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: one pollfd that lives across the call, count 1.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            return true;
        }
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
}

/// Pops and writes chains until the queue is empty, the host end is full or the budget
/// (writes; `None` for no limit) is spent.
fn run_output(
    a: &mut Active,
    port: usize,
    p: &mut PortState,
    dropped: &mut DropCounts,
    budget: Option<usize>,
) -> Result<OutStop, QueueBroken> {
    let q = super::tx_queue(port);
    let mut writes = 0usize;
    loop {
        // No kicks while we are draining anyway (nor while we wait for EPOLLOUT).
        a.queues[q]
            .disable_notification(&a.mem)
            .map_err(|e| QueueBroken::Used(q, e))?;
        fill(a, port, q, p, dropped)?;
        if a.tx_pending[port].chains.is_empty() {
            // Re-enable kicks; if the driver slipped more in meanwhile, go round again.
            if a.queues[q]
                .enable_notification(&a.mem)
                .map_err(|e| QueueBroken::Used(q, e))?
            {
                continue;
            }
            return Ok(OutStop::Empty);
        }
        if budget.is_some_and(|b| writes >= b) {
            return Ok(OutStop::Budget);
        }
        writes += 1;
        // fill() keeps nothing pending without an fd to write to.
        let Some(fd) = p.fd.as_ref() else {
            return Ok(OutStop::Empty);
        };
        match iov::writev(fd.as_fd(), &a.tx_pending[port].iovs) {
            Ok(n) => {
                complete(a, port, q, n)?;
                p.counters.bytes_from_guest += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                p.counters.host_full += 1;
                return Ok(OutStop::Blocked);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(
                    "virtio-console: port {}: write failed, discarding its output from now on: {e}",
                    p.name
                );
                p.counters.host_errors += 1;
                p.host_gone = true;
                discard_pending(a, port, q, p)?;
            }
        }
    }
}

/// Whether chains of this port have nowhere to go.
fn discarding(p: &PortState) -> bool {
    p.dir == Direction::Input || p.fd.is_none() || p.host_gone
}

/// Pops transmit chains into the pending list until it holds [`WRITE_ROOM`] bytes or the
/// driver has no more; discards them when the port has nowhere to write.
fn fill(
    a: &mut Active,
    port: usize,
    q: usize,
    p: &mut PortState,
    dropped: &mut DropCounts,
) -> Result<(), QueueBroken> {
    let pending = &mut a.tx_pending[port];
    let discard = discarding(p);
    // A driver adding chains as fast as we drop them cannot hold us here.
    let mut pops = 2 * usize::from(a.queues[q].size());
    while pending.bytes < WRITE_ROOM && pops > 0 {
        pops -= 1;
        let Some(chain) = pop(&mut a.queues[q], &a.mem, q)? else {
            break;
        };
        let head = chain.head_index();
        let before = pending.iovs.len();
        match check_chain(
            &a.mem,
            chain,
            false,
            &mut pending.iovs,
            MAX_IOVS,
            MAX_TX_CHAIN_LEN,
        ) {
            Ok(len) if discard || len == 0 => {
                pending.iovs.truncate(before);
                p.counters.discarded_bytes += len as u64;
                add_used(&mut a.queues[q], &a.mem, &mut a.used, q, head, 0)?;
            }
            Ok(len) => {
                pending.chains.push_back((head, len));
                pending.bytes += len;
            }
            Err(ChainDrop::TooManySegments) if !pending.chains.is_empty() => {
                // Valid, but the iovecs are full: it waits in the ring for the next write.
                a.queues[q].go_to_previous_position();
                break;
            }
            Err(why) => {
                tracing::debug!("virtio-console: transmit chain {head} dropped: {why:?}");
                dropped.count(why);
                add_used(&mut a.queues[q], &a.mem, &mut a.used, q, head, 0)?;
            }
        }
    }
    Ok(())
}

/// Accounts `n` bytes written: the chains they finish go to the used ring (a transmit
/// chain's used length is 0, the device wrote nothing into it).
fn complete(a: &mut Active, port: usize, q: usize, n: usize) -> Result<(), QueueBroken> {
    let pending = &mut a.tx_pending[port];
    iov::consume_front(&mut pending.iovs, n);
    pending.bytes -= n;
    let mut left = n;
    while let Some(front) = pending.chains.front_mut() {
        if front.1 > left {
            front.1 -= left;
            break;
        }
        left -= front.1;
        let head = front.0;
        pending.chains.pop_front();
        add_used(&mut a.queues[q], &a.mem, &mut a.used, q, head, 0)?;
    }
    Ok(())
}

/// Returns every pending chain unwritten (the host end failed).
fn discard_pending(
    a: &mut Active,
    port: usize,
    q: usize,
    p: &mut PortState,
) -> Result<(), QueueBroken> {
    let pending = &mut a.tx_pending[port];
    p.counters.discarded_bytes += pending.bytes as u64;
    pending.iovs.clear();
    pending.bytes = 0;
    while let Some((head, _)) = pending.chains.pop_front() {
        add_used(&mut a.queues[q], &a.mem, &mut a.used, q, head, 0)?;
    }
    Ok(())
}
