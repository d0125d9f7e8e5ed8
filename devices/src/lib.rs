//! Emulated devices of the twinbox microVM (see docs/ARCHITECTURE.md).
//!
//! This crate knows nothing of KVM or of the VMM: devices see guest memory
//! (`vm-memory`), signal interrupts through `EventFd`s (which the VMM turns into irqfds),
//! and are reached through the [`bus::BusDevice`] trait (port I/O and MMIO alike).
//!
//! - [`bus`]: address ranges → devices;
//! - [`serial`]: COM1 8250 UART (the guest console);
//! - [`i8042`]: just enough of the keyboard controller for the guest to reset the machine;
//! - [`marker`]: the phase-marker port twinbox-init writes to;
//! - [`virtio`]: virtio-mmio transport, virtio-blk, virtio-net, virtio-rng and the
//!   multiport virtio-console (wiring steps in its module docs);
//! - [`snapshot`]: device state as plain data, for VM snapshots.

pub mod bus;
pub mod i8042;
pub mod marker;
pub mod serial;
pub mod snapshot;
pub mod virtio;
