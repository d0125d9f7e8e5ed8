//! The control queues (virtio 1.1, 5.3.6.2; Linux `drivers/char/virtio_console.c`):
//! 8-byte `virtio_console_control` messages (id u32, event u16, value u16, little
//! endian), one per chain, PORT_NAME followed by the name.
//!
//! Driver → device (control transmitq): DEVICE_READY, PORT_READY, PORT_OPEN. Device →
//! driver (control receiveq): PORT_ADD, PORT_OPEN, PORT_NAME. Messages the device has
//! to send wait in a bounded queue until the driver posts a receive buffer (Linux posts
//! a queue's worth of pages before DEVICE_READY, so in practice they go at once).

use super::ChainDrop;
use super::{
    add_used, pop, Console, Direction, QueueBroken, CONTROL_QUEUE_SIZE, CONTROL_RX_QUEUE,
    CONTROL_TX_QUEUE, MAX_NAME_LEN, MAX_PORTS,
};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

// Events, from include/uapi/linux/virtio_console.h (virtio-bindings 0.2 has no console
// module).
/// Driver → device: the driver is ready (value 1) or failed (0); id is BAD_ID.
pub const DEVICE_READY: u16 = 0;
/// Device → driver: a port with this id exists.
pub const PORT_ADD: u16 = 1;
/// Device → driver: the port is gone (never sent: ports live as long as the device).
pub const PORT_REMOVE: u16 = 2;
/// Driver → device: the port is set up (value 1) or failed (0).
pub const PORT_READY: u16 = 3;
/// Device → driver: the port is a console (hvc); never sent, these are plain ports.
pub const CONSOLE_PORT: u16 = 4;
/// Device → driver: a console port's size; never sent.
pub const RESIZE: u16 = 5;
/// Both ways: this side has the port open (1) or closed (0).
pub const PORT_OPEN: u16 = 6;
/// Device → driver: the port's name follows the header.
pub const PORT_NAME: u16 = 7;
/// The id of messages about no port (DEVICE_READY).
pub const BAD_ID: u32 = u32::MAX;

/// Bytes of `struct virtio_console_control`.
pub const HEADER_LEN: usize = 8;
/// Most messages waiting for receive buffers: a port add, open and name per port, and
/// then some. Only a driver that never posts control buffers and keeps asking fills it.
const MAX_PENDING: usize = 4 * MAX_PORTS;

/// One control message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlMsg {
    /// Port id.
    pub id: u32,
    /// One of the event constants above.
    pub event: u16,
    /// Event-specific value.
    pub value: u16,
}

impl ControlMsg {
    /// The wire form.
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(&self.id.to_le_bytes());
        b[4..6].copy_from_slice(&self.event.to_le_bytes());
        b[6..].copy_from_slice(&self.value.to_le_bytes());
        b
    }

    /// Decodes the wire form.
    pub fn from_bytes(b: [u8; HEADER_LEN]) -> Self {
        Self {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            event: u16::from_le_bytes([b[4], b[5]]),
            value: u16::from_le_bytes([b[6], b[7]]),
        }
    }
}

/// What the control queues carried and refused (not cleared by reset).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ControlCounters {
    /// Messages taken from the driver.
    pub received: u64,
    /// Messages delivered to the driver.
    pub sent: u64,
    /// Driver messages of an event it must not send (or unknown).
    pub unknown_event: u64,
    /// Driver messages naming a port that does not exist.
    pub bad_id: u64,
    /// DEVICE_READY(0) or PORT_READY(id, 0): the driver failed to set something up.
    pub driver_failed: u64,
    /// Messages not queued because 4 per possible port were already waiting.
    pub overflow: u64,
}

/// Most chains taken from a control queue per call, so a driver flooding it with
/// malformed chains cannot hold the event loop.
const CONTROL_BUDGET: usize = 2 * CONTROL_QUEUE_SIZE as usize;

impl Console {
    /// Queues a message for the driver (sent by [`Self::send_control`]).
    fn queue_control(&mut self, id: u32, event: u16, value: u16) {
        if self.control_out.len() >= MAX_PENDING {
            tracing::warn!("virtio-console: control queue full, dropping event {event} for {id}");
            self.control_counters.overflow += 1;
            return;
        }
        self.control_out.push_back(ControlMsg { id, event, value });
    }

    /// Tells the driver that the host end of port `id` closed (input EOF).
    pub(super) fn announce_host_closed(&mut self, id: usize) {
        self.queue_control(id as u32, PORT_OPEN, 0);
        self.send_control();
    }

    /// Takes the driver's control messages and acts on them; called for kicks of the
    /// control transmitq (public for tests and VMMs without an event loop).
    pub fn process_control_tx(&mut self) {
        let mut drained = false;
        for _ in 0..CONTROL_BUDGET {
            if self.broken {
                return;
            }
            let Some(a) = self.active.as_mut() else {
                return;
            };
            let q = CONTROL_TX_QUEUE;
            let step = (|| {
                let Some(chain) = pop(&mut a.queues[q], &a.mem, q)? else {
                    // Re-enable kicks; if the driver slipped one in meanwhile, go on.
                    let more = a.queues[q]
                        .enable_notification(&a.mem)
                        .map_err(|e| QueueBroken::Used(q, e))?;
                    return Ok(if more { Step::Again } else { Step::Done });
                };
                let head = chain.head_index();
                let msg = read_message(&a.mem, chain);
                a.add_used(q, head, 0)?;
                Ok(Step::Msg(msg))
            })();
            match step {
                Ok(Step::Done) => {
                    drained = true;
                    break;
                }
                Ok(Step::Again) => {}
                Ok(Step::Msg(Ok(msg))) => {
                    self.control_counters.received += 1;
                    self.handle(msg);
                }
                Ok(Step::Msg(Err(why))) => {
                    tracing::debug!("virtio-console: control message dropped: {why:?}");
                    self.dropped.count(why);
                }
                Err(e) => {
                    self.set_broken(&e);
                    return;
                }
            }
        }
        // Linux spins until its message comes back: return it now, not at the next event.
        if let Some(a) = self.active.as_mut() {
            a.notify();
        }
        if !drained {
            // Budget spent: come back through the loop after the other events.
            if let Err(e) = self.events.queue_evts[CONTROL_TX_QUEUE].write(1) {
                tracing::error!("virtio-console: cannot requeue the control queue: {e}");
            }
        }
        self.send_control();
    }

    /// Acts on one driver message.
    fn handle(&mut self, msg: ControlMsg) {
        if msg.event == DEVICE_READY {
            if msg.value == 1 {
                for id in 0..self.ports.len() {
                    self.queue_control(id as u32, PORT_ADD, 1);
                }
            } else {
                tracing::warn!("virtio-console: the driver failed to set up the device");
                self.control_counters.driver_failed += 1;
            }
            return;
        }
        if !matches!(msg.event, PORT_READY | PORT_OPEN) {
            tracing::debug!("virtio-console: unexpected control event {}", msg.event);
            self.control_counters.unknown_event += 1;
            return;
        }
        let id = msg.id as usize;
        let Some(port) = self.ports.get_mut(id) else {
            tracing::debug!(
                "virtio-console: control event {} for no port {id}",
                msg.event
            );
            self.control_counters.bad_id += 1;
            return;
        };
        match (msg.event, msg.value) {
            (PORT_READY, 0) => {
                tracing::warn!(
                    "virtio-console: the driver failed to set up port {}",
                    port.name
                );
                self.control_counters.driver_failed += 1;
            }
            (PORT_READY, _) => {
                // Open first: the name is what init waits for, and a port the host has
                // not opened reads EOF and blocks writers (see the module docs).
                let open = u16::from(port.host_connected());
                self.queue_control(msg.id, PORT_OPEN, open);
                self.queue_control(msg.id, PORT_NAME, 1);
            }
            (_, value) => {
                let connected = value != 0;
                port.guest_connected = connected;
                match port.dir {
                    Direction::Input if connected => {
                        // Data may already wait in the pipe.
                        port.rx_waiting = false;
                        self.process_input(id);
                    }
                    Direction::Input => {}
                    Direction::Output => {
                        port.guest_closing = !connected;
                        if !connected {
                            // Write what the guest queued before closing, then close.
                            self.process_tx(id);
                        }
                    }
                }
            }
        }
    }

    /// Delivers waiting messages into the driver's control receive buffers; called for
    /// kicks of the control receiveq and whenever a message is queued.
    pub(super) fn send_control(&mut self) {
        if self.broken {
            return;
        }
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let q = CONTROL_RX_QUEUE;
        let mut buf = [0u8; HEADER_LEN + MAX_NAME_LEN + 1];
        let mut result = Ok(());
        for _ in 0..CONTROL_BUDGET {
            let Some(&msg) = self.control_out.front() else {
                break;
            };
            let chain = match pop(&mut a.queues[q], &a.mem, q) {
                Ok(Some(chain)) => chain,
                Ok(None) => {
                    // Ask for a kick when buffers come; if some came meanwhile, go on.
                    match a.queues[q].enable_notification(&a.mem) {
                        Ok(true) => continue,
                        Ok(false) => break,
                        Err(e) => {
                            result = Err(QueueBroken::Used(q, e));
                            break;
                        }
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let head = chain.head_index();
            buf[..HEADER_LEN].copy_from_slice(&msg.to_bytes());
            let mut len = HEADER_LEN;
            if msg.event == PORT_NAME {
                // Linux copies len - 8 bytes into a buffer one longer and terminates it;
                // the NUL sent here makes the name end there whatever it reads past.
                let name = self.ports[msg.id as usize].name.as_bytes();
                buf[len..len + name.len()].copy_from_slice(name);
                buf[len + name.len()] = 0;
                len += name.len() + 1;
            }
            let used = match write_message(&a.mem, chain, &buf[..len]) {
                Ok(()) => {
                    self.control_out.pop_front();
                    self.control_counters.sent += 1;
                    len as u32
                }
                Err(why) => {
                    // The message waits for the next buffer.
                    tracing::debug!("virtio-console: control receive chain dropped: {why:?}");
                    self.dropped.count(why);
                    0
                }
            };
            if let Err(e) = add_used(&mut a.queues[q], &a.mem, &mut a.used, q, head, used) {
                result = Err(e);
                break;
            }
        }
        a.notify();
        if let Err(e) = result {
            self.set_broken(&e);
        }
    }
}

/// One step of [`Console::process_control_tx`].
enum Step {
    Done,
    Again,
    Msg(Result<ControlMsg, ChainDrop>),
}

/// Reads a message header from a driver chain (readable descriptors, inside guest RAM,
/// at least 8 bytes; anything after the header is ignored).
fn read_message(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<ControlMsg, ChainDrop> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0usize;
    let mut descs = 0usize;
    let mut last_has_next = false;
    for desc in chain {
        descs += 1;
        last_has_next = desc.has_next();
        if desc.is_write_only() {
            return Err(ChainDrop::WrongDirection);
        }
        let n = (desc.len() as usize).min(HEADER_LEN - got);
        if n > 0 {
            mem.read_slice(&mut header[got..got + n], desc.addr())
                .map_err(|_| ChainDrop::OutsideMemory)?;
            got += n;
        }
    }
    if descs == 0 || last_has_next {
        return Err(ChainDrop::BrokenLink);
    }
    if got < HEADER_LEN {
        return Err(ChainDrop::TooShort);
    }
    Ok(ControlMsg::from_bytes(header))
}

/// Writes `msg` into a driver receive chain (writable descriptors, inside guest RAM,
/// room for all of it).
fn write_message(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    msg: &[u8],
) -> Result<(), ChainDrop> {
    let mut put = 0usize;
    let mut descs = 0usize;
    let mut last_has_next = false;
    for desc in chain {
        descs += 1;
        last_has_next = desc.has_next();
        if !desc.is_write_only() {
            return Err(ChainDrop::WrongDirection);
        }
        let n = (desc.len() as usize).min(msg.len() - put);
        if n > 0 {
            mem.write_slice(&msg[put..put + n], desc.addr())
                .map_err(|_| ChainDrop::OutsideMemory)?;
            put += n;
        }
    }
    if descs == 0 || last_has_next {
        return Err(ChainDrop::BrokenLink);
    }
    if put < msg.len() {
        return Err(ChainDrop::TooShort);
    }
    Ok(())
}
