//! Device wiring: which device sits at which port or address, how its interrupt reaches
//! the guest, and which `virtio_mmio.device=` entry tells the kernel about it. The devices
//! do not know how they are wired.
//!
//! The device models come from the `devices` crate. virtio queues are notified through
//! KVM ioeventfds and served on the event-loop thread, never on a vCPU thread.

use crate::boot::cmdline::VirtioMmioEntry;
use crate::event_loop::Subscriber;
use crate::ioapic::{self, Ioapic, KvmRoutes};
use crate::layout::{
    I8042_PORT, I8042_PORT_LEN, IOAPIC_START, IRQ_MAX, SERIAL_IRQ, SERIAL_PORT, SERIAL_PORT_LEN,
    VIRTIO_IRQ_BASE, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::memory::GuestMemoryMmap;
use crate::vcpu::IoHandler;
use devices::bus::{Bus, SharedBusDevice as SharedDevice};
use devices::virtio::{
    Block, Console, IrqTrigger, MmioTransport, Net, NetBackend, NetError, Rng, RngError,
    VirtioDevice, MMIO_WINDOW_LEN, NOTIFY_REG_OFFSET,
};
use event_manager::MutEventSubscriber;
use kvm_ioctls::IoEventAddress;
use kvm_ioctls::VmFd;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use thiserror::Error;
use twinbox_spec::proto::{Marker, MarkerError, MARKER_PORT};
use twinbox_spec::DiskSpec;
use vmm_sys_util::eventfd::EventFd;

/// Why a device could not be set up.
#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("cannot create an eventfd for {what}: {source}")]
    EventFd {
        what: String,
        source: std::io::Error,
    },
    #[error("KVM refused the interrupt line {gsi} for {what}: {source}")]
    Irqfd {
        what: String,
        gsi: u32,
        source: kvm_ioctls::Error,
    },
    #[error("disk {path}: {source}")]
    Disk {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk {path}: {source}")]
    Block {
        path: PathBuf,
        source: devices::virtio::BlockError,
    },
    #[error("{what}: tap not usable as a network backend: {source}")]
    Tap {
        what: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Net { what: String, source: NetError },
    #[error("virtio-console: {source}")]
    Console {
        source: devices::virtio::ConsoleError,
    },
    #[error("virtio-rng: {source}")]
    Rng { source: RngError },
    #[error("too many disks: at most {max} virtio devices (disks, network card, entropy source, stdio console) fit the interrupt lines")]
    TooManyDisks { max: u32 },
    #[error("cannot place {what} at {base:#x}: the range is taken")]
    Overlap { what: String, base: u64 },
}

/// Port and memory-mapped I/O buses, as the vCPUs see them.
pub struct IoBuses {
    /// Port I/O.
    pub pio: Bus,
    /// Memory-mapped I/O.
    pub mmio: Bus,
    /// The IOAPIC (also on `mmio`), for the EOIs KVM hands over.
    pub ioapic: Arc<Mutex<Ioapic<KvmRoutes>>>,
}

impl IoHandler for IoBuses {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if !self.pio.read(u64::from(port), data) {
            data.fill(0xff);
        }
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.pio.write(u64::from(port), data);
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.mmio.read(addr, data) {
            tracing::debug!("guest read unmapped MMIO at {addr:#x}");
            data.fill(0xff);
        }
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if !self.mmio.write(addr, data) {
            tracing::debug!("guest wrote unmapped MMIO at {addr:#x}");
        }
    }
    fn ioapic_eoi(&self, vector: u8) {
        self.ioapic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .end_of_interrupt(vector);
    }
}

/// What the devices need from the run.
pub struct DeviceConfig<'a> {
    /// The IOAPIC's APIC ID: the one the MP table gives it.
    pub ioapic_id: u8,
    /// Root image: the first virtio-blk device (`/dev/vda`), read-only.
    pub rootfs: &'a Path,
    /// Extra disks: `/dev/vdb`, `/dev/vdc`, ...
    pub disks: &'a [DiskSpec],
    /// Where the serial console's output goes.
    pub console: Box<dyn std::io::Write + Send>,
    /// Called on the vCPU thread for each marker init writes.
    pub on_marker: Box<dyn FnMut(Result<Marker, MarkerError>) + Send>,
    /// The network card's tap (`--net`), if any.
    pub net: Option<NetLink>,
    /// The device's ends of the stdio ports (see stdio.rs).
    pub stdio: crate::stdio::DeviceEnds,
}

/// The attached devices.
pub struct DeviceSet {
    /// What the vCPUs dispatch I/O exits to.
    pub io: Arc<IoBuses>,
    /// Device event handlers for the event loop.
    pub subscribers: Vec<Subscriber>,
    /// `virtio_mmio.device=` entries for the kernel command line.
    pub cmdline_entries: Vec<VirtioMmioEntry>,
    /// Written when the guest resets the machine through the i8042.
    pub reset_evt: EventFd,
    /// The stdio console (its ports carry the job and the workload's streams), kept for
    /// the flush at teardown.
    pub console: Arc<Mutex<Console>>,
    /// Interrupt eventfds registered as irqfds (kept open for the VM's life).
    _irq_evts: Vec<EventFd>,
}

fn eventfd(what: &str) -> Result<EventFd, DeviceError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DeviceError::EventFd {
        what: what.to_owned(),
        source,
    })
}

fn irqfd(vm: &VmFd, what: &str, gsi: u32) -> Result<EventFd, DeviceError> {
    let evt = eventfd(what)?;
    vm.register_irqfd(&evt, gsi)
        .map_err(|source| DeviceError::Irqfd {
            what: what.to_owned(),
            gsi,
            source,
        })?;
    Ok(evt)
}

fn insert(
    bus: &mut Bus,
    what: &str,
    base: u64,
    len: u64,
    device: SharedDevice,
) -> Result<(), DeviceError> {
    bus.insert(base, len, device)
        .map_err(|_| DeviceError::Overlap {
            what: what.to_owned(),
            base,
        })
}

/// The network card's host end, opened (in the host's network namespace) before any VMM
/// thread is jailed.
pub struct NetLink {
    /// The tap's fd (`IFF_TAP|IFF_NO_PI|IFF_VNET_HDR`, 12-byte header); the device owns it.
    pub tap: OwnedFd,
    /// The tap's interface name, for messages.
    pub name: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

/// What [`VirtioWiring::register_mmio_virtio`] needs and what it collects, one device at a
/// time; devices take consecutive [`VirtioSlot`]s in registration order.
struct VirtioWiring<'a> {
    vm: &'a Arc<VmFd>,
    memory: &'a GuestMemoryMmap,
    mmio: &'a mut Bus,
    subscribers: Vec<Subscriber>,
    cmdline_entries: Vec<VirtioMmioEntry>,
}

impl VirtioWiring<'_> {
    /// Wires one virtio device into the next free slot, in the five steps every virtio-mmio
    /// device takes (the shape of Firecracker's `register_mmio_virtio`): its transport, one
    /// ioeventfd per queue at the notify register with the queue index as datamatch (once
    /// the guest's driver activates the device, see [`QueueNotifiers`]), an irqfd on the
    /// slot's GSI, the register window on the MMIO bus, the device on the event loop, and
    /// its `virtio_mmio.device=` entry. The device does not know how it is wired.
    fn register_mmio_virtio<D>(
        &mut self,
        what: &str,
        device: D,
    ) -> Result<Arc<Mutex<D>>, DeviceError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let slot = VirtioSlot::nth(self.cmdline_entries.len() as u32)?;
        let eventfd_error = |source| DeviceError::EventFd {
            what: what.to_owned(),
            source,
        };
        // 1. The device, shared by its transport (vCPU side) and the event loop.
        let device = Arc::new(Mutex::new(device));
        let irq = Arc::new(IrqTrigger::new().map_err(eventfd_error)?);
        let mut transport = MmioTransport::new(self.memory.clone(), device.clone(), irq.clone());
        // 2. Queue kicks: one ioeventfd per queue at the notify register, datamatch = index,
        //    registered when the driver activates the device; the interrupt: an irqfd on
        //    the slot's line.
        let mut notifiers = QueueNotifiers {
            vm: Arc::downgrade(self.vm),
            what: what.to_owned(),
            addr: slot.base + NOTIFY_REG_OFFSET,
            events: transport.queue_events().map_err(eventfd_error)?,
            registered: false,
        };
        transport.on_activate(Box::new(move || notifiers.register()));
        self.vm
            .register_irqfd(irq.eventfd(), slot.gsi)
            .map_err(|source| DeviceError::Irqfd {
                what: what.to_owned(),
                gsi: slot.gsi,
                source,
            })?;
        // 3. The register window on the MMIO bus.
        insert(
            self.mmio,
            what,
            slot.base,
            MMIO_WINDOW_LEN,
            Arc::new(Mutex::new(transport)),
        )?;
        // 4. The event loop serves the same device.
        self.subscribers.push(device.clone());
        // 5. The kernel finds it on its command line.
        self.cmdline_entries.push(VirtioMmioEntry {
            size: MMIO_WINDOW_LEN,
            base: slot.base,
            irq: slot.gsi,
        });
        Ok(device)
    }
}

/// Attaches every device of a twinbox VM.
pub fn attach(
    vm: &Arc<VmFd>,
    memory: &GuestMemoryMmap,
    config: DeviceConfig<'_>,
) -> Result<DeviceSet, DeviceError> {
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let mut irq_evts = Vec::new();

    // The IOAPIC (split irqchip): every GSI below reaches the guest through the routes it
    // keeps in KVM.
    let ioapic = Arc::new(Mutex::new(Ioapic::new(
        config.ioapic_id,
        KvmRoutes(Arc::downgrade(vm)),
    )));
    insert(
        &mut mmio,
        "IOAPIC",
        IOAPIC_START,
        ioapic::WINDOW_LEN,
        ioapic.clone(),
    )?;

    // Serial console on COM1, interrupt through an irqfd on IRQ 4.
    let serial_irq = irqfd(vm, "serial", SERIAL_IRQ)?;
    let serial = devices::serial::SerialConsole::new(
        serial_irq
            .try_clone()
            .map_err(|source| DeviceError::EventFd {
                what: "serial".into(),
                source,
            })?,
        config.console,
    );
    irq_evts.push(serial_irq);
    insert(
        &mut pio,
        "serial",
        u64::from(SERIAL_PORT),
        SERIAL_PORT_LEN,
        Arc::new(Mutex::new(serial)),
    )?;

    // i8042: only its reset line matters (`reboot=k`).
    let reset_evt = eventfd("i8042 reset")?;
    let i8042 = devices::i8042::I8042::new(reset_evt.try_clone().map_err(|source| {
        DeviceError::EventFd {
            what: "i8042".into(),
            source,
        }
    })?);
    insert(
        &mut pio,
        "i8042",
        u64::from(I8042_PORT),
        I8042_PORT_LEN,
        Arc::new(Mutex::new(i8042)),
    )?;

    // Phase marker port.
    let marker = devices::marker::PhaseMarker::new(config.on_marker);
    insert(
        &mut pio,
        "phase marker",
        u64::from(MARKER_PORT),
        4,
        Arc::new(Mutex::new(marker)),
    )?;

    // virtio devices, one slot each in this order: the root image (read-only, /dev/vda),
    // each extra disk, the network card, the entropy source. Disks come first so their
    // names (vda, vdb, ...) do not depend on the other devices.
    let mut virtio = VirtioWiring {
        vm,
        memory,
        mmio: &mut mmio,
        subscribers: Vec::new(),
        cmdline_entries: Vec::new(),
    };
    let disks = std::iter::once((config.rootfs, true))
        .chain(config.disks.iter().map(|d| (d.path.as_path(), d.read_only)));
    for (path, read_only) in disks {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| DeviceError::Disk {
                path: path.into(),
                source,
            })?;
        let id = block_id(path);
        let block = Block::new(file, read_only, id).map_err(|source| DeviceError::Block {
            path: path.into(),
            source,
        })?;
        virtio.register_mmio_virtio(&format!("virtio-blk {}", path.display()), block)?;
    }
    if let Some(link) = config.net {
        let what = format!("virtio-net {}", link.name);
        let backend = NetBackend::tap(link.tap).map_err(|source| DeviceError::Tap {
            what: what.clone(),
            source,
        })?;
        let net = Net::new(backend, link.mac).map_err(|source| DeviceError::Net {
            what: what.clone(),
            source,
        })?;
        virtio.register_mmio_virtio(&what, net)?;
    }
    let rng = Rng::new().map_err(|source| DeviceError::Rng { source })?;
    virtio.register_mmio_virtio("virtio-rng", rng)?;
    let ends = config.stdio;
    let console = Console::stdio(ends.control, ends.stdin, ends.stdout, ends.stderr)
        .map_err(|source| DeviceError::Console { source })?;
    let console = virtio.register_mmio_virtio("virtio-console (stdio)", console)?;
    let VirtioWiring {
        subscribers,
        cmdline_entries,
        ..
    } = virtio;

    Ok(DeviceSet {
        io: Arc::new(IoBuses { pio, mmio, ioapic }),
        subscribers,
        cmdline_entries,
        reset_evt,
        console,
        _irq_evts: irq_evts,
    })
}

/// A virtio device's queue-notify eventfds, registered with KVM as ioeventfds the first
/// time the guest's driver activates the device (the transport's activation hook, on the
/// vCPU thread that wrote DRIVER_OK) and kept for the VM's life, resets included.
///
/// Why not at set-up: each registration replaces KVM's MMIO bus behind an SRCU grace
/// period, and the destroy of the VM then waits for what those left in flight — measured on
/// a PVM host, one ioeventfd registered at set-up made closing a VM that ran a ~20 ms
/// guest cost ~11 ms instead of ~0.4 ms, while registered 100 ms or more before the close
/// they cost it nothing. A guest that never drives a device (the bench's tiny guest) now
/// pays nothing for it; a Linux guest registers them during its boot, long before the end.
/// Until then a QueueNotify write is an MMIO exit that the transport turns into the same
/// eventfd signal, so no notification is lost on either path.
struct QueueNotifiers {
    /// Weak, as the IOAPIC's: the run's reference stays the last, so the VM is destroyed
    /// at teardown.
    vm: Weak<VmFd>,
    what: String,
    /// The device's QueueNotify register.
    addr: u64,
    /// One per queue, in queue order (datamatch = index).
    events: Vec<EventFd>,
    registered: bool,
}

impl QueueNotifiers {
    fn register(&mut self) {
        if self.registered {
            return;
        }
        self.registered = true;
        let Some(vm) = self.vm.upgrade() else {
            return;
        };
        for (queue, evt) in self.events.iter().enumerate() {
            if let Err(e) = vm.register_ioevent(evt, &IoEventAddress::Mmio(self.addr), queue as u32)
            {
                // Not fatal: the notifications keep arriving as MMIO exits.
                tracing::warn!(
                    "{}: KVM refused the ioeventfd of queue {queue} at {:#x} ({e}); its \
                     notifications go through MMIO exits",
                    self.what,
                    self.addr
                );
            }
        }
    }
}

/// How long the teardown waits for the caller's readers to take the workload's last
/// output (a reader that takes nothing must not hold the run's end for ever; one that is
/// merely slow, e.g. on a loaded host, must not lose the tail).
const OUTPUT_FLUSH_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

impl DeviceSet {
    /// Writes out what the guest queued on its output ports and the device has not moved
    /// yet (the workload's last words before init powered off), then closes them so the
    /// stdio pumps see their end. Called after the vCPUs and the event loop stopped.
    /// Returns a note for the report when output was lost.
    pub fn flush_output(&self) -> Option<String> {
        let mut console = self.console.lock().unwrap_or_else(|p| p.into_inner());
        let flushed = console.flush_output(std::time::Instant::now() + OUTPUT_FLUSH_LIMIT);
        // Output ports only: stdout and stderr, ids 2 and 3 (proto::stdio::PORTS).
        let discarded: u64 = console
            .counters()
            .ports
            .iter()
            .skip(2)
            .map(|p| p.discarded_bytes)
            .sum();
        match (flushed.complete, discarded) {
            (true, 0) => None,
            (complete, bytes) => Some(format!(
                "workload output incomplete: {bytes} bytes discarded{}",
                if complete {
                    " (the reader of stdout or stderr went away)"
                } else {
                    "; the reader took nothing for 10 s at the end"
                }
            )),
        }
    }
}

/// Where the n-th virtio-mmio device lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioSlot {
    /// MMIO base.
    pub base: u64,
    /// Window size.
    pub size: u64,
    /// Interrupt line.
    pub gsi: u32,
}

impl VirtioSlot {
    /// The slot of device `index` (0 = root disk).
    pub fn nth(index: u32) -> Result<Self, DeviceError> {
        let gsi = VIRTIO_IRQ_BASE + index;
        if gsi > IRQ_MAX {
            return Err(DeviceError::TooManyDisks {
                max: IRQ_MAX - VIRTIO_IRQ_BASE + 1,
            });
        }
        Ok(Self {
            base: VIRTIO_MMIO_START + u64::from(index) * VIRTIO_MMIO_SIZE,
            size: VIRTIO_MMIO_SIZE,
            gsi,
        })
    }
}

/// The virtio-blk id (GET_ID, at most 20 bytes) of a disk file: its name, cut to 20 bytes
/// on a character boundary as QEMU cuts a long `serial` (an image's cached disk is named
/// by its 64-hex-digit id).
fn block_id(path: &Path) -> &str {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("disk");
    let mut end = name.len().min(20);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_long_disk_name_is_cut_to_the_20_bytes_of_a_virtio_blk_id() {
        assert_eq!(block_id(Path::new("/x/rootfs.ext4")), "rootfs.ext4");
        assert_eq!(
            block_id(Path::new("/c/897d409578c46ab8167639e17f4d983e-0.1.0.ext4")),
            "897d409578c46ab81676"
        );
        assert_eq!(block_id(Path::new("/x/ééééééééééé")), "éééééééééé");
        assert_eq!(block_id(Path::new("/")), "disk");
    }

    use super::*;

    #[test]
    fn virtio_slots_are_consecutive_windows_and_lines() {
        assert_eq!(
            VirtioSlot::nth(0).unwrap(),
            VirtioSlot {
                base: 0xd000_0000,
                size: 0x1000,
                gsi: 5
            }
        );
        assert_eq!(
            VirtioSlot::nth(2).unwrap(),
            VirtioSlot {
                base: 0xd000_2000,
                size: 0x1000,
                gsi: 7
            }
        );
        assert!(VirtioSlot::nth(18).is_ok());
        assert!(matches!(
            VirtioSlot::nth(19),
            Err(DeviceError::TooManyDisks { max: 19 })
        ));
    }
}
