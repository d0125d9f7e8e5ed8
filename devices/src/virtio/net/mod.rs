//! virtio-net (virtio 1.1, 5.1) over a tap: one RX and one TX queue, checksum and TCP
//! segmentation offloads both ways, mergeable receive buffers.
//!
//! - [`NetBackend`]: the host end (a tap, or a datagram socket in tests), one frame per
//!   read or write, each preceded by the 12-byte `virtio_net_hdr_v1`;
//! - TX ([`tx`]): each chain the driver makes available is checked (readable only, inside
//!   guest memory, a whole header, at most one 64 KiB GSO frame, offloads it negotiated)
//!   and handed to the backend in one `writev` straight from guest memory;
//! - RX ([`rx`]): when the backend is readable and the driver has posted buffers, one
//!   `readv` goes straight into them. With `VIRTIO_NET_F_MRG_RXBUF` a frame may fill
//!   several chains (a 64 KiB TSO frame across page-sized buffers, as Linux posts them);
//!   without it, each frame goes into one chain (Linux then posts 64 KiB "big" chains).
//!
//! # Why mergeable buffers
//! Linux posts one small chain per buffer in mergeable mode and sizes them to the
//! traffic, so a 64 KiB frame costs ~17 pages only when it comes. Big-buffer mode pins
//! 64 KiB per ring entry whatever arrives. Both are implemented (the driver picks); the
//! device keeps the chains it has popped but not yet filled in a pool, so each frame
//! costs only the chains it uses.
//!
//! # Offloads
//! Offered: CSUM, GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN, HOST_TSO4/6, HOST_ECN. UFO is not
//! offered: Linux guests stopped producing it (4.14) and USO needs a newer guest than
//! ours. After activation the device sets the tap's offloads to what the guest accepted
//! for RX ([`tap_offloads`]), on the event-loop thread; a tap always accepts GSO frames
//! from us, so the HOST_* side needs nothing on the host.
//!
//! # Event loop
//! Like [`super::Block`], plus the backend fd: EPOLLIN while the driver has RX buffers
//! (with none, the fd is not watched, so a full tap cannot spin the loop; the driver's
//! next RX kick resumes it), EPOLLOUT only while a TX write is waiting on EAGAIN.
//!
//! # Hostile drivers
//! A malformed chain (wrong direction, outside guest memory, too short, too long, too
//! many segments, looping or with a dangling link, offloads not negotiated) is returned
//! unused (length 0) and counted in [`NetCounters`]; the device goes on. A broken queue
//! (avail index jumping ahead, head index or used ring invalid) stops the device with
//! DEVICE_NEEDS_RESET, as for the other devices. Only ranges checked against guest RAM
//! ever reach the kernel as iovecs.

mod backend;
pub mod rx;
pub mod tx;

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use super::chain::{ChainDrop, DropCounts};
pub use backend::{BackendKind, NetBackend};

use super::events::DeviceEvents;
use super::iov::IoBuf;
use super::{
    read_config_bytes, valid_queues, ActivateError, IrqTrigger, VirtioDevice, INTERRUPT_USED_RING,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// Device type: network card (virtio 1.1, 5).
pub const TYPE_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Maximum (and offered) size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most iovecs in one read or write: two per descriptor of a full queue (a buffer may
/// straddle two adjacent memory regions), well under the kernel's IOV_MAX (1024).
const MAX_IOVS: usize = 2 * QUEUE_SIZE as usize;
/// Bytes of `virtio_net_hdr_v1` before every frame (VERSION_1 always has `num_buffers`).
pub const VNET_HDR_LEN: usize =
    std::mem::size_of::<virtio_bindings::virtio_net::virtio_net_hdr_v1>();
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Largest frame either side may send with GSO: 64 KiB of IP packet (Linux's
/// gso_max_size for virtio-net and tap) plus an Ethernet header with one VLAN tag.
pub const MAX_FRAME_LEN: usize = 65536 + 18;
/// Largest header + frame a TX chain may carry, and what RX gathers with GSO.
pub const MAX_PACKET_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Largest frame without GSO on a tap of MTU 1500 (the default), VLAN tag included.
const MTU_FRAME_LEN: usize = 1500 + 18;
/// Chains handled per event before going back to the loop, so neither direction (nor
/// another device) starves while the other is flooded.
const BUDGET: usize = 256;
/// Event data of the backend fd (the device's eventfds use 0 and 1 + queue index).
const BACKEND_EVENT: u32 = 0xffff_0000;

/// The feature bits offered (checked against the ones acked at activation).
const OFFERED_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_EVENT_IDX
    | 1 << VIRTIO_NET_F_MAC
    | 1 << VIRTIO_NET_F_STATUS
    | 1 << VIRTIO_NET_F_MRG_RXBUF
    | 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_GUEST_ECN
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_HOST_ECN;

/// The tap offloads (`TUN_F_*` for `TUNSETOFFLOAD`) matching features `acked` by the
/// driver: what the kernel may hand to the guest unsegmented or with a partial checksum.
/// TSO only with checksum offload, ECN only with TSO, as the kernel itself requires.
pub fn tap_offloads(acked: u64) -> u32 {
    let has = |bit: u32| acked & (1 << bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
        flags |= libc::TUN_F_TSO_ECN;
    }
    flags
}

/// Why a net device cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The MAC address is multicast (broadcast included) or all zeros, which no NIC may
    /// use as its own.
    #[error("MAC address {0} is not a valid unicast address")]
    InvalidMac(String),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// What the device has moved and refused since it was created (not cleared by reset).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames handed to the backend.
    pub tx_frames: u64,
    /// Their bytes, headers excluded.
    pub tx_bytes: u64,
    /// Frames the backend refused (e.g. a GSO header the kernel rejects): dropped.
    pub tx_backend_errors: u64,
    /// Times the backend was full (EAGAIN): the frame waits for EPOLLOUT.
    pub tx_backend_full: u64,
    /// Malformed TX chains.
    pub tx_dropped: DropCounts,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Their bytes, headers excluded.
    pub rx_bytes: u64,
    /// Frames larger than the buffers the driver had posted: lost.
    pub rx_truncated: u64,
    /// Frames shorter than a header (only a socket peer can send those): lost.
    pub rx_runts: u64,
    /// Backend read failures other than EAGAIN.
    pub rx_backend_errors: u64,
    /// Times RX ran out of driver buffers and stopped watching the backend until the
    /// driver's next RX kick; frames meanwhile wait in the tap's queue, and the host
    /// kernel drops (and counts) what overflows it.
    pub rx_no_buffers: u64,
    /// Malformed RX chains.
    pub rx_dropped: DropCounts,
}

/// Why processing a queue had to stop for good.
#[derive(Debug, thiserror::Error)]
enum QueueBroken {
    #[error("available ring: {0:?}")]
    Avail(virtio_queue::Error),
    #[error("used ring: {0:?}")]
    Used(virtio_queue::Error),
}

/// What the device holds between DRIVER_OK and reset.
struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<IrqTrigger>,
    acked: u64,
    event_idx: bool,
    /// The driver takes partial checksums and DATA_VALID; if not, RX clears `flags`.
    guest_csum: bool,
    /// RX chains popped and checked but not yet filled, with their iovecs.
    pool: rx::RxPool,
    /// Iovecs of the TX chain being sent; allocated once, cleared after each chain.
    tx_iovs: Vec<IoBuf>,
}

impl Active {
    /// Raises the used-ring interrupt for `queue` unless EVENT_IDX says the driver does
    /// not want it yet.
    fn notify(&mut self, queue: usize) {
        let q = if queue == RX_QUEUE {
            &mut self.rx
        } else {
            &mut self.tx
        };
        if !self.event_idx || q.needs_notification(&self.mem).unwrap_or(true) {
            if let Err(e) = self.interrupt.trigger(INTERRUPT_USED_RING) {
                tracing::error!("virtio-net: cannot raise interrupt: {e}");
            }
        }
    }
}

/// A virtio-net device. Share it as `Arc<Mutex<Net>>` between the MMIO transport and
/// the event manager, exactly like [`super::Block`] (see the wiring steps in
/// [`crate::virtio`]); its two queue eventfds are queue 0 (RX) and 1 (TX).
pub struct Net {
    backend: NetBackend,
    mac: [u8; 6],
    events: DeviceEvents,
    active: Option<Active>,
    /// The driver broke a queue; nothing is processed until a reset.
    broken: bool,
    /// RX stopped for lack of driver buffers: the backend is not watched for input.
    rx_waiting: bool,
    /// A TX write met EAGAIN: TX waits for the backend to be writable.
    tx_blocked: bool,
    /// The socket peer hung up (a tap never does): the backend is not watched.
    backend_closed: bool,
    /// Tap offloads to set on the event-loop thread after an activation.
    offload_pending: Option<u32>,
    /// What the backend fd is registered for with the event loop, if it is.
    registered: Option<EventSet>,
    counters: NetCounters,
}

impl Net {
    /// A network device over `backend` whose config space shows `mac`.
    pub fn new(backend: NetBackend, mac: [u8; 6]) -> Result<Self, NetError> {
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return Err(NetError::InvalidMac(format_mac(&mac)));
        }
        Ok(Self {
            backend,
            mac,
            events: DeviceEvents::new(2).map_err(NetError::EventFd)?,
            active: None,
            broken: false,
            rx_waiting: false,
            tx_blocked: false,
            backend_closed: false,
            offload_pending: None,
            registered: None,
            counters: NetCounters::default(),
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The host end.
    pub fn backend(&self) -> &NetBackend {
        &self.backend
    }

    /// Features the driver acked, while the device is active.
    pub fn acked_features(&self) -> Option<u64> {
        self.active.as_ref().map(|a| a.acked)
    }

    /// The tap offloads for the features negotiated now (0 while inactive); the device
    /// sets them itself after activation, this is for the VMM's logs and for tests.
    pub fn tap_offload_flags(&self) -> u32 {
        self.acked_features().map_or(0, tap_offloads)
    }

    /// Frames and drops so far.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// What the device wants from the backend fd now: IN while RX can take frames, OUT
    /// while a TX frame waits on EAGAIN, nothing while inactive, broken or hung up.
    pub fn backend_interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.active.is_none() || self.broken || self.backend_closed {
            return set;
        }
        if !self.rx_waiting {
            set |= EventSet::IN;
        }
        if self.tx_blocked {
            set |= EventSet::OUT;
        }
        set
    }

    /// The config space (virtio 1.1, 5.1.4): mac, status, max_virtqueue_pairs.
    fn config_bytes(&self) -> [u8; 10] {
        let mut config = [0u8; 10];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config
    }

    /// Stops the device after the driver broke a queue; it shows DEVICE_NEEDS_RESET.
    fn set_broken(&mut self, e: &QueueBroken) {
        tracing::warn!("virtio-net: queue broken, stopping until reset: {e}");
        self.broken = true;
        if let Some(active) = &self.active {
            active.interrupt.signal_needs_reset();
        }
    }

    /// Sets the tap offloads negotiated by the last activation, once.
    fn apply_offloads(&mut self) {
        if let Some(flags) = self.offload_pending.take() {
            if let Err(e) = self.backend.set_offload(flags) {
                // The kernel then checksums and segments everything itself: slower, correct.
                tracing::warn!("virtio-net: cannot set tap offloads {flags:#x}: {e}");
            }
        }
    }

    /// Brings the backend fd's registration in line with [`Self::backend_interest`].
    fn sync_backend(&mut self, ops: &mut EventOps) {
        let want = self.backend_interest();
        let fd = &self.backend;
        let result = match self.registered {
            None if want.is_empty() => return,
            None => ops.add(Events::with_data(fd, BACKEND_EVENT, want)),
            Some(cur) if want.is_empty() => ops.remove(Events::with_data(fd, BACKEND_EVENT, cur)),
            Some(cur) if cur == want => return,
            Some(_) => ops.modify(Events::with_data(fd, BACKEND_EVENT, want)),
        };
        match result {
            Ok(()) => self.registered = (!want.is_empty()).then_some(want),
            Err(e) => tracing::error!("virtio-net: cannot watch the backend for {want:?}: {e:?}"),
        }
    }

    /// The backend fd became ready (`set` from epoll).
    fn process_backend(&mut self, set: EventSet) {
        if set.contains(EventSet::OUT) {
            self.tx_blocked = false;
            self.process_tx();
        }
        if set.contains(EventSet::IN) {
            self.process_rx();
        }
        if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
            // Nothing more will come (what was readable has just been taken); stop
            // watching rather than spin on the condition.
            tracing::warn!("virtio-net: backend reported {set:?}; no longer watching it");
            self.backend_closed = true;
        }
    }
}

/// `aa:bb:cc:dd:ee:ff`.
fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn avail_features(&self) -> u64 {
        OFFERED_FEATURES
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.events.queue_evts
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR absent on legacy
        // devices; for a VERSION_1 device nothing here is writable.
        tracing::debug!(
            "virtio-net: ignoring {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<IrqTrigger>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let [mut rxq, mut txq] = valid_queues(queues, &mem)?;
        let event_idx = acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        rxq.set_event_idx(event_idx);
        txq.set_event_idx(event_idx);
        let has = |bit: u32| acked_features & (1 << bit) != 0;
        let mergeable = has(VIRTIO_NET_F_MRG_RXBUF);
        let gso = has(VIRTIO_NET_F_GUEST_TSO4)
            || has(VIRTIO_NET_F_GUEST_TSO6)
            || has(VIRTIO_NET_F_GUEST_UFO);
        // With mergeable buffers, gather room for the largest frame the tap may hand us
        // before reading: it cannot be asked how long the next frame is.
        let frame_room = if gso {
            MAX_PACKET_LEN
        } else {
            VNET_HDR_LEN + MTU_FRAME_LEN
        };
        self.active = Some(Active {
            pool: rx::RxPool::new(mergeable.then_some(frame_room)),
            tx_iovs: Vec::with_capacity(MAX_IOVS),
            mem,
            rx: rxq,
            tx: txq,
            interrupt,
            acked: acked_features,
            event_idx,
            guest_csum: has(VIRTIO_NET_F_GUEST_CSUM),
        });
        self.broken = false;
        self.rx_waiting = false;
        self.tx_blocked = false;
        self.offload_pending = Some(tap_offloads(acked_features));
        self.events
            .signal_activated()
            .inspect_err(|_| self.active = None)
    }

    fn reset(&mut self) {
        // Dropping Active drops the pool's iovecs together with the memory they point
        // into.
        self.active = None;
        self.broken = false;
        self.rx_waiting = false;
        self.tx_blocked = false;
        self.offload_pending = None;
        // Let the event loop drop the queue eventfds and the backend.
        self.events.signal_reset("virtio-net");
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }

    /// Not yet: the tap's link would have to be re-made around a restored guest.
    fn save_state(
        &self,
    ) -> Result<crate::snapshot::VirtioDeviceSnapshot, crate::snapshot::SnapshotError> {
        Err(crate::snapshot::SnapshotError::Unsupported("virtio-net"))
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        let active = self.active.is_some();
        self.events.init(ops, active);
        if active {
            self.apply_offloads();
        }
        self.sync_backend(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.data() == BACKEND_EVENT {
            self.process_backend(events.event_set());
        } else {
            let active = self.active.is_some();
            match self.events.process(&events, ops, active) {
                Some(RX_QUEUE) => self.process_rx(),
                Some(TX_QUEUE) => self.process_tx(),
                Some(_) => {}
                // Activation or reset: the queue eventfds were (un)registered.
                None => self.apply_offloads(),
            }
        }
        self.sync_backend(ops);
    }
}

#[cfg(test)]
mod tests;
