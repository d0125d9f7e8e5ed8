//! Transmit: guest chains → backend, one `writev` per frame straight from guest memory.
//!
//! A TX chain is `[virtio_net_hdr_v1][frame]` in driver-readable descriptors, split any
//! way the driver likes. Checked before anything reaches the backend: every descriptor
//! readable and inside guest RAM, the chain complete (no loop, no dangling link), at
//! least a header and at most [`MAX_PACKET_LEN`] bytes, and a header that asks only for
//! offloads the driver negotiated. The used length of a TX chain is always 0 (the device
//! writes nothing into it).

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryMmap};

use super::{
    Active, ChainDrop, Net, NetBackend, NetCounters, QueueBroken, BUDGET, MAX_IOVS, MAX_PACKET_LEN,
    TX_QUEUE, VNET_HDR_LEN,
};
use crate::virtio::iov::{push_guest_range, IoBuf};

/// How a TX pass ended, when the queue is not broken.
#[derive(Default)]
struct TxPass {
    /// Some chain went to the used ring (an interrupt may be due).
    used_any: bool,
    /// The backend said EAGAIN; the chain stays available until EPOLLOUT.
    blocked: bool,
    /// The budget ran out with chains left.
    more: bool,
}

impl Net {
    /// Sends every frame the driver made available on the TX queue; called on the event
    /// loop for TX kicks and EPOLLOUT (public for tests and VMMs without an event loop).
    pub fn process_tx(&mut self) {
        if self.broken || self.tx_blocked {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        match run_tx(&self.backend, active, &mut self.counters) {
            Ok(pass) => {
                if pass.used_any {
                    active.notify(TX_QUEUE);
                }
                self.tx_blocked = pass.blocked;
                if pass.more {
                    // Come back through the loop after the other events: kick ourselves.
                    if let Err(e) = self.events.queue_evts[TX_QUEUE].write(1) {
                        tracing::error!("virtio-net: cannot requeue TX work: {e}");
                    }
                }
            }
            Err(e) => self.set_broken(&e),
        }
    }
}

/// Pops and sends chains until the queue is empty, the budget is spent or the backend
/// is full.
fn run_tx(
    backend: &NetBackend,
    a: &mut Active,
    counters: &mut NetCounters,
) -> Result<TxPass, QueueBroken> {
    let mut pass = TxPass::default();
    let mut budget = BUDGET;
    loop {
        // No kicks while we are draining anyway.
        a.tx.disable_notification(&a.mem)
            .map_err(QueueBroken::Used)?;
        loop {
            if budget == 0 {
                pass.more = true;
                return Ok(pass);
            }
            // iter() re-reads the avail index and refuses one that ran more than a
            // queue's worth ahead of us.
            let chain = a.tx.iter(&a.mem).map_err(QueueBroken::Avail)?.next();
            let Some(chain) = chain else { break };
            budget -= 1;
            let head = chain.head_index();
            a.tx_iovs.clear();
            match parse_chain(&a.mem, chain, a.acked, &mut a.tx_iovs) {
                Err(why) => {
                    tracing::debug!("virtio-net: TX chain {head} dropped: {why:?}");
                    counters.tx_dropped.count(why);
                }
                Ok((len, hdr)) => {
                    // Entry 0 is the header as checked; `hdr` outlives the call.
                    a.tx_iovs[0] = IoBuf::host(&hdr);
                    let written = backend.write_frame(&a.tx_iovs);
                    match written {
                        Ok(n) if n == len => {
                            counters.tx_frames += 1;
                            counters.tx_bytes += (len - VNET_HDR_LEN) as u64;
                        }
                        Ok(n) => {
                            tracing::debug!("virtio-net: backend took {n} of {len} bytes");
                            counters.tx_backend_errors += 1;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            // Leave the chain available; EPOLLOUT brings us back to it.
                            a.tx.go_to_previous_position();
                            a.tx_iovs.clear();
                            counters.tx_backend_full += 1;
                            pass.blocked = true;
                            return Ok(pass);
                        }
                        Err(e) => {
                            tracing::debug!("virtio-net: backend refused a {len}-byte frame: {e}");
                            counters.tx_backend_errors += 1;
                        }
                    }
                }
            }
            a.tx_iovs.clear();
            a.tx.add_used(&a.mem, head, 0).map_err(QueueBroken::Used)?;
            pass.used_any = true;
        }
        // Re-enable kicks; if the driver slipped more in meanwhile, go round again.
        if !a
            .tx
            .enable_notification(&a.mem)
            .map_err(QueueBroken::Used)?
        {
            return Ok(pass);
        }
    }
}

/// Checks a TX chain and fills `out` with its iovecs: a placeholder at index 0 for the
/// header, which is returned as a copy (the caller points entry 0 at that copy, so what
/// is sent is what was checked, whatever the driver writes meanwhile), then the frame
/// straight from guest memory. Returns the length (header included) and the header.
fn parse_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    acked: u64,
    out: &mut Vec<IoBuf>,
) -> Result<(usize, [u8; VNET_HDR_LEN]), ChainDrop> {
    let mut total = 0usize;
    let mut hdr = [0u8; VNET_HDR_LEN];
    let mut descs = 0usize;
    let mut last_has_next = false;
    out.push(IoBuf::default());
    for desc in chain {
        descs += 1;
        last_has_next = desc.has_next();
        if desc.is_write_only() {
            return Err(ChainDrop::WrongDirection);
        }
        let len = desc.len() as usize;
        let start = total;
        // Bounded: the descriptor iterator stops at 4 GiB in total.
        total += len;
        if total > MAX_PACKET_LEN {
            return Err(ChainDrop::TooLong);
        }
        // The header may be split over descriptors: copy its bytes as they come.
        let in_header = VNET_HDR_LEN.saturating_sub(start).min(len);
        if in_header > 0 {
            mem.read_slice(&mut hdr[start..start + in_header], desc.addr())
                .map_err(|_| ChainDrop::OutsideMemory)?;
        }
        if in_header < len {
            let addr = desc
                .addr()
                .checked_add(in_header as u64)
                .ok_or(ChainDrop::OutsideMemory)?;
            let rest = (len - in_header) as u32;
            push_guest_range(mem, addr, rest, out, MAX_IOVS)?;
        }
    }
    if descs == 0 || last_has_next {
        return Err(ChainDrop::BrokenLink);
    }
    if total < VNET_HDR_LEN {
        return Err(ChainDrop::TooShort);
    }
    check_header(&hdr, acked)?;
    Ok((total, hdr))
}

/// The driver may only ask for offloads it negotiated (virtio 1.1, 5.1.6.2.1): a
/// partial checksum needs CSUM, each GSO type its HOST_TSO* and the ECN bit HOST_ECN;
/// DATA_VALID and RSC_INFO are device-to-driver only. The kernel then checks the GSO
/// fields themselves (and refuses bad ones, counted as backend errors).
fn check_header(hdr: &[u8; VNET_HDR_LEN], acked: u64) -> Result<(), ChainDrop> {
    let has = |bit: u32| acked & (1 << bit) != 0;
    let (flags, gso_type) = (u32::from(hdr[0]), u32::from(hdr[1]));
    if flags & !VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
        || (flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && !has(VIRTIO_NET_F_CSUM))
    {
        return Err(ChainDrop::BadOffload);
    }
    let gso_ok = match gso_type & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_NONE => gso_type & VIRTIO_NET_HDR_GSO_ECN == 0,
        VIRTIO_NET_HDR_GSO_TCPV4 => has(VIRTIO_NET_F_HOST_TSO4),
        VIRTIO_NET_HDR_GSO_TCPV6 => has(VIRTIO_NET_F_HOST_TSO6),
        // UDP (UFO) and USO are not offered.
        _ => false,
    };
    let ecn_ok = gso_type & VIRTIO_NET_HDR_GSO_ECN == 0 || has(VIRTIO_NET_F_HOST_ECN);
    if gso_ok && ecn_ok {
        Ok(())
    } else {
        Err(ChainDrop::BadOffload)
    }
}
