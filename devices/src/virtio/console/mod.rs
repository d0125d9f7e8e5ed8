//! virtio-console (virtio 1.1, 5.3) with `VIRTIO_CONSOLE_F_MULTIPORT`: named byte-stream
//! ports between host file descriptors and the guest's `/dev/vport<d>p<id>`, which carry
//! a VM workload's stdin, stdout and stderr plus a control stream
//! (`twinbox_proto::stdio`; [`Console::stdio`] builds exactly that device).
//!
//! # Queues
//! Port 0 uses queues 0 (receiveq, device → driver) and 1 (transmitq, driver → device);
//! the control pair is 2 (control receiveq) and 3 (control transmitq); port `i ≥ 1` uses
//! `2 + 2i` and `3 + 2i` ([`rx_queue`], [`tx_queue`]), the order Linux's `init_vqs` asks
//! for. Config space: cols, rows (0: no `F_SIZE`), `max_nr_ports` (the port count),
//! `emerg_wr` (0: no `F_EMERG_WRITE`).
//!
//! # Control protocol ([`control`])
//! On the driver's DEVICE_READY the device sends PORT_ADD for every port, in id order.
//! On PORT_READY(id, 1) it sends PORT_OPEN(id, 1) and *then* PORT_NAME(id, name), so
//! `host_connected` is set before the name shows in sysfs, where init waits for it:
//! Linux's `port_fops_read` returns EOF at once and `will_write_block` holds every write
//! while the host side is not connected. The driver's PORT_OPEN(id, 0/1) is recorded.
//! Linux spins on the control transmitq until the device returns each message
//! (`__send_control_msg`), so that queue is always served at once.
//!
//! # Host ends
//! One file descriptor per port, handed in by the VMM ([`HostEnd`]); the device makes it
//! non-blocking and watches it on the event loop, so it never blocks the loop and needs
//! no thread.
//! - Host → guest ([`HostEnd::Input`], `input.rs`): while the guest has the port open and
//!   has posted receive buffers, one `readv` goes straight into them. Data waits in the
//!   pipe until the guest opens the port: Linux discards what arrives on a port nobody
//!   has open (`in_intr` → `discard_port_data`). When the fd reaches EOF (everything
//!   read is already in the used ring) the device sends PORT_OPEN(id, 0) and the guest
//!   reads EOF once it has taken the data.
//! - Guest → host ([`HostEnd::Output`], `output.rs`): the port's transmit chains go to
//!   the fd with `writev`, several chains per call; on EAGAIN the partly written chain
//!   stays pending with its offset and the device waits for EPOLLOUT, while the guest's
//!   queue fills and its writers block: backpressure, nothing dropped, nothing buffered
//!   on the host. After the driver's PORT_OPEN(id, 0) the device writes what the guest
//!   queued before closing, then closes the fd, so the host reader sees EOF.
//! - Transmit chains on a host → guest port (control, stdin) have nowhere to go: they
//!   are consumed and counted ([`PortCounters::discarded_bytes`]), never left to stall
//!   the queue.
//! - [`Console::flush_output`]: at teardown, after the vCPUs stopped, writes out every
//!   chain still queued for the output ports (waiting for the readers until a deadline)
//!   and closes the output fds, so a guest that powers off right after writing loses
//!   nothing.
//!
//! # Event loop
//! Like [`super::Net`]: the queue eventfds and the activate eventfd through
//! `DeviceEvents`, plus each port's fd, watched only while there is something to do:
//! EPOLLIN on an input while the guest has the port open and buffers posted (with none,
//! the fd is not watched, so a readable pipe cannot spin the level-triggered loop; the
//! driver's next receive kick resumes it), EPOLLOUT on an output only while a write
//! waits on EAGAIN. An fd with no interest is removed from epoll, which would otherwise
//! still report EPOLLHUP on it.
//!
//! # Hostile drivers
//! Every chain is checked before any I/O: direction, inside guest RAM, complete (no
//! loop, no dangling link), bounded length and segment count. A bad chain is returned
//! with length 0 and counted by reason ([`DropCounts`]); a malformed control message,
//! an unknown event or a bad port id is dropped and counted ([`ControlCounters`]). A
//! broken queue (avail index jumping ahead, used ring outside memory) stops the device
//! with DEVICE_NEEDS_RESET. Only ranges checked against guest RAM reach the kernel.

pub mod control;
mod input;
mod output;
mod snapshot;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use super::chain::{ChainDrop, DropCounts};
pub use control::ControlCounters;
pub use output::{FlushOutcome, MAX_TX_CHAIN_LEN};

use super::events::DeviceEvents;
use super::iov::{push_guest_range, IoBuf};
use super::{
    check_queues, read_config_bytes, ActivateError, IrqTrigger, VirtioDevice, INTERRUPT_USED_RING,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use control::ControlMsg;

/// Device type: console (virtio 1.1, 5).
pub const TYPE_CONSOLE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;

// From include/uapi/linux/virtio_console.h (virtio-bindings 0.2 has no console module).
/// Feature bit: several ports plus a control queue pair (`VIRTIO_CONSOLE_F_MULTIPORT`).
pub const VIRTIO_CONSOLE_F_MULTIPORT: u32 = 1;

/// Most ports a device takes (QEMU's default for virtio-serial; 64 queues).
pub const MAX_PORTS: usize = 31;
/// Longest port name (Linux copies what fits its receive buffer, a page).
pub const MAX_NAME_LEN: usize = 255;
/// Size of the control queues: the device sends about two messages per port.
pub const CONTROL_QUEUE_SIZE: u16 = 32;
/// Size of an input port's receiveq: Linux fills it with page-sized buffers, so 64 pins
/// 256 KiB of guest memory per port.
pub const RX_QUEUE_SIZE: u16 = 64;
/// Size of an output port's receiveq. The device never sends on it, but Linux fills every
/// port's receiveq with page-sized buffers all the same: at [`RX_QUEUE_SIZE`] the stdout
/// and stderr ports pinned 512 KiB of each guest's memory for nothing.
pub const OUTPUT_RX_QUEUE_SIZE: u16 = 2;
/// Size of each port's transmitq: Linux sends up to 32 KiB per `write`, one chain each.
pub const TX_QUEUE_SIZE: u16 = 128;
/// Index of the control receiveq (device → driver).
pub const CONTROL_RX_QUEUE: usize = 2;
/// Index of the control transmitq (driver → device).
pub const CONTROL_TX_QUEUE: usize = 3;
/// Reads or writes per port and event before going back to the loop, so one busy port
/// starves neither the others nor other devices.
const BUDGET: usize = 64;
/// Most iovecs in one `readv`/`writev`, below the kernel's IOV_MAX (1024).
const MAX_IOVS: usize = 512;
/// Event data of port `i`'s fd (the device's eventfds use 0 and 1 + queue index).
const HOST_EVENT_BASE: u32 = 0x1_0000;

/// The receiveq (device → driver) of `port`.
pub fn rx_queue(port: usize) -> usize {
    if port == 0 {
        0
    } else {
        2 + 2 * port
    }
}

/// The transmitq (driver → device) of `port`.
pub fn tx_queue(port: usize) -> usize {
    rx_queue(port) + 1
}

/// What queue `q` is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum QueueRole {
    Rx(usize),
    Tx(usize),
    ControlRx,
    ControlTx,
}

fn role(q: usize) -> QueueRole {
    match q {
        0 => QueueRole::Rx(0),
        1 => QueueRole::Tx(0),
        CONTROL_RX_QUEUE => QueueRole::ControlRx,
        CONTROL_TX_QUEUE => QueueRole::ControlTx,
        _ if q & 1 == 0 => QueueRole::Rx(q / 2 - 1),
        _ => QueueRole::Tx(q / 2 - 1),
    }
}

/// A port's host end, one per port.
#[derive(Debug)]
pub enum HostEnd {
    /// Host → guest: the device reads it (the read end of a pipe) and the guest reads
    /// what arrives; EOF on it is EOF in the guest.
    Input(OwnedFd),
    /// Guest → host: the device writes what the guest writes (the write end of a pipe);
    /// closed when the guest closes the port, so the reader sees EOF.
    Output(OwnedFd),
}

/// A named port.
#[derive(Debug)]
pub struct Port {
    /// Its name, shown in the guest at `/sys/class/virtio-ports/vport<d>p<id>/name`.
    pub name: String,
    /// Its host end.
    pub host: HostEnd,
}

impl Port {
    /// A host → guest port reading `fd`.
    pub fn input(name: impl Into<String>, fd: OwnedFd) -> Self {
        Self {
            name: name.into(),
            host: HostEnd::Input(fd),
        }
    }

    /// A guest → host port writing `fd`.
    pub fn output(name: impl Into<String>, fd: OwnedFd) -> Self {
        Self {
            name: name.into(),
            host: HostEnd::Output(fd),
        }
    }
}

/// Why a console device cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// No ports, or more than [`MAX_PORTS`].
    #[error("a console has 1 to {max} ports, not {got}")]
    PortCount {
        /// Ports given.
        got: usize,
        /// [`MAX_PORTS`].
        max: usize,
    },
    /// A name that is empty, too long, holds a NUL or is used twice.
    #[error("console port name {name:?}: {why}")]
    BadName {
        /// The name.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// `fcntl(O_NONBLOCK)` failed on a host end.
    #[error("console port {name}: cannot make its host end non-blocking: {source}")]
    NonBlocking {
        /// The port.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] io::Error),
}

/// What one port moved since the device was created (not cleared by reset).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortCounters {
    /// Bytes read from the host end into guest buffers.
    pub bytes_to_guest: u64,
    /// Bytes written from guest buffers to the host end.
    pub bytes_from_guest: u64,
    /// Times the host end was full (EAGAIN): the guest's data waited for EPOLLOUT.
    pub host_full: u64,
    /// Host end failures (a read or write error other than EAGAIN/EINTR, e.g. EPIPE
    /// when the reader went away).
    pub host_errors: u64,
    /// Guest bytes with nowhere to go: written on a host → guest port, after the host
    /// end failed, or after it was closed.
    pub discarded_bytes: u64,
}

/// What the device has moved and refused, for the VMM's logs and report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsoleCounters {
    /// Per port, in id order.
    pub ports: Vec<PortCounters>,
    /// Malformed chains on any queue.
    pub dropped: DropCounts,
    /// The control queues.
    pub control: ControlCounters,
}

/// Why processing a queue had to stop for good.
#[derive(Debug, thiserror::Error)]
enum QueueBroken {
    #[error("available ring of queue {0}: {1:?}")]
    Avail(usize, virtio_queue::Error),
    #[error("used ring of queue {0}: {1:?}")]
    Used(usize, virtio_queue::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Input,
    Output,
}

/// One port's host side and connection state.
struct PortState {
    name: String,
    dir: Direction,
    /// `None` once closed (input at EOF, output after the guest closed the port).
    fd: Option<OwnedFd>,
    /// What the fd is registered for with the event loop, if it is.
    registered: Option<EventSet>,
    /// Close the fd once the event loop has stopped watching it.
    close_pending: bool,
    /// The driver has the port open (its last PORT_OPEN value).
    guest_connected: bool,
    /// Input: the host end reached EOF; PORT_OPEN(id, 0) was queued.
    eof: bool,
    /// Input: the guest has no receive buffers posted; its next kick resumes.
    rx_waiting: bool,
    /// Output: a write met EAGAIN; waiting for EPOLLOUT.
    tx_blocked: bool,
    /// Output: the host end failed (the reader went away): guest data is discarded.
    host_gone: bool,
    /// Output: the guest closed the port; close the fd once its data is written.
    guest_closing: bool,
    counters: PortCounters,
}

impl PortState {
    /// What the device wants from the fd now (given the device is active).
    fn interest(&self) -> EventSet {
        if self.fd.is_none() || self.close_pending {
            return EventSet::empty();
        }
        match self.dir {
            Direction::Input if self.guest_connected && !self.eof && !self.rx_waiting => {
                EventSet::IN
            }
            Direction::Output if self.tx_blocked && !self.host_gone => EventSet::OUT,
            _ => EventSet::empty(),
        }
    }

    /// PORT_OPEN value the device announces for its side.
    fn host_connected(&self) -> bool {
        match self.dir {
            Direction::Input => !self.eof,
            Direction::Output => true,
        }
    }
}

/// What the device holds between DRIVER_OK and reset. The pools hold iovecs into `mem`,
/// so they live and die with it.
struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<IrqTrigger>,
    event_idx: bool,
    /// Per port: receive chains popped and not yet filled (input ports only).
    rx_pools: Vec<input::RxPool>,
    /// Per port: transmit chains popped and not yet written (output ports only).
    tx_pending: Vec<output::TxPending>,
    /// Queues that got used entries since the last [`Active::notify`] (bit = index).
    used: u64,
}

impl Active {
    /// Returns a chain to the driver.
    fn add_used(&mut self, q: usize, head: u16, len: u32) -> Result<(), QueueBroken> {
        add_used(&mut self.queues[q], &self.mem, &mut self.used, q, head, len)
    }

    /// Raises the used-ring interrupt once if any queue used since the last call wants
    /// it (EVENT_IDX may say not yet).
    fn notify(&mut self) {
        if self.used == 0 {
            return;
        }
        let mut wanted = false;
        for (q, queue) in self.queues.iter_mut().enumerate() {
            if self.used & (1 << q) != 0 {
                wanted |= !self.event_idx || queue.needs_notification(&self.mem).unwrap_or(true);
            }
        }
        self.used = 0;
        if wanted {
            if let Err(e) = self.interrupt.trigger(INTERRUPT_USED_RING) {
                tracing::error!("virtio-console: cannot raise interrupt: {e}");
            }
        }
    }
}

/// `Queue::add_used` that remembers the queue for [`Active::notify`]; a free function so
/// callers can hold other fields of [`Active`] meanwhile.
fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    used: &mut u64,
    q: usize,
    head: u16,
    len: u32,
) -> Result<(), QueueBroken> {
    queue
        .add_used(mem, head, len)
        .map_err(|e| QueueBroken::Used(q, e))?;
    *used |= 1 << q;
    Ok(())
}

/// The next available chain of `queue` (index `q`), if any.
fn pop<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    q: usize,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, QueueBroken> {
    // iter() re-reads the avail index and refuses one that ran more than a queue's worth
    // ahead of us.
    Ok(queue
        .iter(mem)
        .map_err(|e| QueueBroken::Avail(q, e))?
        .next())
}

/// Checks a data chain (every descriptor `writable` or every one readable, inside guest
/// RAM, complete, at most `max_len` bytes, its segments fitting `out` up to `limit`) and
/// appends its iovecs to `out`; returns its length. On error `out` is as before.
fn check_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    writable: bool,
    out: &mut Vec<IoBuf>,
    limit: usize,
    max_len: usize,
) -> Result<usize, ChainDrop> {
    let start = out.len();
    let mut total = 0usize;
    let mut descs = 0usize;
    let mut last_has_next = false;
    let parse = || {
        for desc in chain {
            descs += 1;
            last_has_next = desc.has_next();
            if desc.is_write_only() != writable {
                return Err(ChainDrop::WrongDirection);
            }
            // Bounded: the descriptor iterator stops at 4 GiB in total.
            total += desc.len() as usize;
            if total > max_len {
                return Err(ChainDrop::TooLong);
            }
            push_guest_range(mem, desc.addr(), desc.len(), out, limit)?;
        }
        if descs == 0 || last_has_next {
            return Err(ChainDrop::BrokenLink);
        }
        Ok(total)
    };
    let result = parse();
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// Sets `O_NONBLOCK` on `fd`'s open file description.
fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own, with commands that take an int or nothing; no
    // memory is passed.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A multiport virtio console. Share it as `Arc<Mutex<Console>>` between the MMIO
/// transport and the event manager, exactly like [`super::Net`] (see the wiring steps in
/// [`crate::virtio`]); it has `2 * (ports + 1)` queues.
pub struct Console {
    ports: Vec<PortState>,
    queue_sizes: Vec<u16>,
    events: DeviceEvents,
    active: Option<Active>,
    /// The queues of a driver that reset the device, kept for [`Console::flush_output`]:
    /// Linux resets every virtio device when it powers off (`virtio_dev_shutdown`), which
    /// comes right after the workload's last writes, so its transmit rings may still hold
    /// the tail of the output. Dropped if the driver activates the device again.
    unflushed: Option<Active>,
    /// The driver broke a queue; nothing is processed until a reset.
    broken: bool,
    /// Control messages waiting for a control receive buffer, oldest first.
    control_out: std::collections::VecDeque<ControlMsg>,
    dropped: DropCounts,
    control_counters: ControlCounters,
}

impl Console {
    /// A console with `ports` in id order. Each host end is made non-blocking here (on
    /// its open file description, so give the device a pipe end of its own, never a
    /// descriptor shared with another process such as the caller's own stdin).
    pub fn new(ports: Vec<Port>) -> Result<Self, ConsoleError> {
        if ports.is_empty() || ports.len() > MAX_PORTS {
            return Err(ConsoleError::PortCount {
                got: ports.len(),
                max: MAX_PORTS,
            });
        }
        let mut states: Vec<PortState> = Vec::with_capacity(ports.len());
        for Port { name, host } in ports {
            let why = if name.is_empty() {
                Some("empty")
            } else if name.len() > MAX_NAME_LEN {
                Some("longer than 255 bytes")
            } else if name.contains('\0') {
                Some("contains a NUL byte")
            } else if states.iter().any(|s| s.name == name) {
                Some("used by two ports")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(ConsoleError::BadName { name, why });
            }
            let (dir, fd) = match host {
                HostEnd::Input(fd) => (Direction::Input, fd),
                HostEnd::Output(fd) => (Direction::Output, fd),
            };
            if let Err(source) = set_nonblocking(&fd) {
                return Err(ConsoleError::NonBlocking { name, source });
            }
            states.push(PortState {
                name,
                dir,
                fd: Some(fd),
                registered: None,
                close_pending: false,
                guest_connected: false,
                eof: false,
                rx_waiting: false,
                tx_blocked: false,
                host_gone: false,
                guest_closing: false,
                counters: PortCounters::default(),
            });
        }
        let queues = 2 * (states.len() + 1);
        let queue_sizes = (0..queues)
            .map(|q| match role(q) {
                QueueRole::ControlRx | QueueRole::ControlTx => CONTROL_QUEUE_SIZE,
                QueueRole::Rx(port) => match states[port].dir {
                    Direction::Input => RX_QUEUE_SIZE,
                    Direction::Output => OUTPUT_RX_QUEUE_SIZE,
                },
                QueueRole::Tx(_) => TX_QUEUE_SIZE,
            })
            .collect();
        Ok(Self {
            ports: states,
            queue_sizes,
            events: DeviceEvents::new(queues).map_err(ConsoleError::EventFd)?,
            active: None,
            unflushed: None,
            broken: false,
            control_out: Default::default(),
            dropped: DropCounts::default(),
            control_counters: ControlCounters::default(),
        })
    }

    /// twinbox's stdio device: the four ports of `twinbox_proto::stdio::PORTS` in their
    /// order, control and stdin read from the given read ends, stdout and stderr written
    /// to the given write ends.
    pub fn stdio(
        control: OwnedFd,
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    ) -> Result<Self, ConsoleError> {
        use twinbox_proto::stdio::{PORT_CONTROL, PORT_STDERR, PORT_STDIN, PORT_STDOUT};
        Self::new(vec![
            Port::input(PORT_CONTROL, control),
            Port::input(PORT_STDIN, stdin),
            Port::output(PORT_STDOUT, stdout),
            Port::output(PORT_STDERR, stderr),
        ])
    }

    /// Number of ports.
    pub fn port_count(&self) -> usize {
        self.ports.len()
    }

    /// The name of port `id`.
    pub fn port_name(&self, id: usize) -> Option<&str> {
        self.ports.get(id).map(|p| p.name.as_str())
    }

    /// Whether the guest has port `id` open (its last PORT_OPEN).
    pub fn guest_connected(&self, id: usize) -> bool {
        self.ports.get(id).is_some_and(|p| p.guest_connected)
    }

    /// Bytes moved and chains refused so far.
    pub fn counters(&self) -> ConsoleCounters {
        ConsoleCounters {
            ports: self.ports.iter().map(|p| p.counters).collect(),
            dropped: self.dropped,
            control: self.control_counters,
        }
    }

    /// The config space (virtio 1.1, 5.3.4): cols, rows, max_nr_ports, emerg_wr.
    fn config_bytes(&self) -> [u8; 12] {
        let mut config = [0u8; 12];
        config[4..8].copy_from_slice(&(self.ports.len() as u32).to_le_bytes());
        config
    }

    /// Stops the device after the driver broke a queue; it shows DEVICE_NEEDS_RESET.
    fn set_broken(&mut self, e: &QueueBroken) {
        tracing::warn!("virtio-console: queue broken, stopping until reset: {e}");
        self.broken = true;
        if let Some(active) = &self.active {
            active.interrupt.signal_needs_reset();
        }
    }

    /// Serves queue `q` after the driver's kick (public for tests and VMMs without an
    /// event loop).
    pub fn process_queue(&mut self, q: usize) {
        match role(q) {
            QueueRole::ControlTx => self.process_control_tx(),
            QueueRole::ControlRx => self.send_control(),
            QueueRole::Rx(port) => {
                if let Some(p) = self.ports.get_mut(port) {
                    p.rx_waiting = false;
                }
                self.process_input(port);
            }
            QueueRole::Tx(port) => self.process_tx(port),
        }
    }

    /// Port `port`'s fd became ready.
    fn process_host(&mut self, port: usize) {
        let Some(p) = self.ports.get_mut(port) else {
            return;
        };
        match p.dir {
            Direction::Input => self.process_input(port),
            Direction::Output => {
                // EPOLLERR (the reader went away) also ends the wait: the write says why.
                p.tx_blocked = false;
                self.process_tx(port);
            }
        }
    }

    /// Closes port `port`'s host end now if the event loop does not watch it, else once
    /// [`Self::sync_host`] has removed it (the loop must never see a closed fd number).
    fn close_host(&mut self, port: usize) {
        let p = &mut self.ports[port];
        if p.registered.is_none() {
            p.fd = None;
            p.close_pending = false;
        } else {
            p.close_pending = true;
        }
    }

    /// Brings each fd's registration in line with what the device wants from it, and
    /// closes the fds waiting for that.
    fn sync_host(&mut self, ops: &mut EventOps) {
        let live = self.active.is_some() && !self.broken;
        for (i, p) in self.ports.iter_mut().enumerate() {
            let want = if live {
                p.interest()
            } else {
                EventSet::empty()
            };
            let data = HOST_EVENT_BASE + i as u32;
            if let Some(fd) = p.fd.as_ref() {
                let result = match p.registered {
                    None if want.is_empty() => Ok(()),
                    None => ops.add(Events::with_data(fd, data, want)),
                    Some(cur) if want.is_empty() => ops.remove(Events::with_data(fd, data, cur)),
                    Some(cur) if cur == want => Ok(()),
                    Some(_) => ops.modify(Events::with_data(fd, data, want)),
                };
                match result {
                    Ok(()) => p.registered = (!want.is_empty()).then_some(want),
                    Err(e) => tracing::error!(
                        "virtio-console: cannot watch port {} for {want:?}: {e:?}",
                        p.name
                    ),
                }
            }
            if p.close_pending && p.registered.is_none() {
                p.fd = None;
                p.close_pending = false;
            }
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_CONSOLE_F_MULTIPORT
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.events.queue_evts
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // emerg_wr is writable only with F_EMERG_WRITE, which is not offered.
        tracing::debug!(
            "virtio-console: ignoring {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        mut queues: Vec<Queue>,
        interrupt: Arc<IrqTrigger>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        check_queues(&queues, self.queue_sizes.len(), &mem)?;
        if acked_features & 1 << VIRTIO_CONSOLE_F_MULTIPORT == 0 {
            // Without MULTIPORT a driver uses queues 0 and 1 only and never sends
            // DEVICE_READY: no port gets a name, so init finds none.
            tracing::warn!("virtio-console: the driver did not accept MULTIPORT");
        }
        let event_idx = acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        for q in &mut queues {
            q.set_event_idx(event_idx);
        }
        let n = self.ports.len();
        if self.unflushed.take().is_some() {
            tracing::debug!(
                "virtio-console: re-activated; output queued before the reset is dropped"
            );
        }
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
            event_idx,
            rx_pools: (0..n).map(|_| input::RxPool::new()).collect(),
            tx_pending: (0..n).map(|_| output::TxPending::new()).collect(),
            used: 0,
        });
        self.broken = false;
        self.events
            .signal_activated()
            .inspect_err(|_| self.active = None)
    }

    fn reset(&mut self) {
        // The output the driver queued before the reset is written at teardown
        // (`unflushed`); a broken driver's queues cannot be trusted for that. Input held
        // for the driver is abandoned with its queues.
        let active = self.active.take();
        self.unflushed = if self.broken { None } else { active };
        self.broken = false;
        self.control_out.clear();
        for p in &mut self.ports {
            p.guest_connected = false;
            p.rx_waiting = false;
            p.tx_blocked = false;
            p.guest_closing = false;
        }
        // Let the event loop drop the queue eventfds and the host fds.
        self.events.signal_reset("virtio-console");
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }

    fn save_state(
        &self,
    ) -> Result<crate::snapshot::VirtioDeviceSnapshot, crate::snapshot::SnapshotError> {
        self.save()
    }

    fn restore_state(
        &mut self,
        state: &crate::snapshot::VirtioDeviceSnapshot,
    ) -> Result<(), crate::snapshot::SnapshotError> {
        self.restore(state)
    }
}

impl MutEventSubscriber for Console {
    fn init(&mut self, ops: &mut EventOps) {
        let active = self.active.is_some();
        self.events.init(ops, active);
        self.sync_host(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        if data >= HOST_EVENT_BASE {
            self.process_host((data - HOST_EVENT_BASE) as usize);
        } else {
            let active = self.active.is_some();
            if let Some(q) = self.events.process(&events, ops, active) {
                self.process_queue(q);
            }
        }
        self.sync_host(ops);
    }
}

#[cfg(test)]
mod tests;
