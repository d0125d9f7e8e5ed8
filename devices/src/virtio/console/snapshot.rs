//! The console's part of a VM snapshot: queue positions and each port's connection state.
//!
//! A snapshot is taken while the guest waits for its job: init has opened every port and
//! blocks reading the control port, so the receive pools hold the buffers the driver
//! posted and nothing is on its way out. Receive chains in a pool were taken from the
//! available ring in order and are returned in order, so they are exactly the last ones
//! taken: the saved `next_avail` is rewound past them and the restored device takes them
//! again. Output still queued for the host, control messages not yet sent, or a device
//! stopped on a broken queue make the snapshot refuse (the caller waits, or gives up).

use virtio_queue::QueueT;

use super::{Console, Direction};
use crate::snapshot::{PortSnapshot, QueueProgress, SnapshotError, VirtioDeviceSnapshot};

const DEVICE: &str = "virtio-console";

fn busy(why: impl Into<String>) -> SnapshotError {
    SnapshotError::Busy {
        device: DEVICE,
        why: why.into(),
    }
}

impl Console {
    pub(super) fn save(&self) -> Result<VirtioDeviceSnapshot, SnapshotError> {
        let Some(active) = &self.active else {
            return Err(busy("not active"));
        };
        if self.broken {
            return Err(busy("stopped on a broken queue"));
        }
        if !self.control_out.is_empty() {
            return Err(busy(format!(
                "{} control messages not yet sent to the guest",
                self.control_out.len()
            )));
        }
        if let Some(port) = active
            .tx_pending
            .iter()
            .position(|pending| !pending.is_empty())
        {
            return Err(busy(format!(
                "guest output of port {} not yet written",
                self.ports[port].name
            )));
        }
        let mut queues: Vec<QueueProgress> = active
            .queues
            .iter()
            .map(|q| QueueProgress {
                next_avail: q.next_avail(),
                next_used: q.next_used(),
            })
            .collect();
        for (port, pool) in active.rx_pools.iter().enumerate() {
            let held = pool.held() as u16;
            let q = &mut queues[super::rx_queue(port)];
            q.next_avail = q.next_avail.wrapping_sub(held);
        }
        let ports = self
            .ports
            .iter()
            .map(|p| PortSnapshot {
                name: p.name.clone(),
                guest_connected: p.guest_connected,
                eof: p.eof,
                host_gone: p.host_gone,
                guest_closing: p.guest_closing,
            })
            .collect();
        Ok(VirtioDeviceSnapshot { queues, ports })
    }

    pub(super) fn restore(&mut self, state: &VirtioDeviceSnapshot) -> Result<(), SnapshotError> {
        if state.ports.len() != self.ports.len() {
            return Err(SnapshotError::Mismatch {
                device: DEVICE,
                why: format!(
                    "{} ports saved, this console has {}",
                    state.ports.len(),
                    self.ports.len()
                ),
            });
        }
        for (port, saved) in self.ports.iter_mut().zip(&state.ports) {
            if port.name != saved.name {
                return Err(SnapshotError::Mismatch {
                    device: DEVICE,
                    why: format!("port {:?} saved where {:?} is", saved.name, port.name),
                });
            }
            port.guest_connected = saved.guest_connected;
            port.eof = saved.eof && port.dir == Direction::Input;
            port.host_gone = saved.host_gone;
            port.guest_closing = saved.guest_closing;
            // The driver's buffers are in its ring (rewound at save): look for them.
            port.rx_waiting = false;
            port.tx_blocked = false;
        }
        Ok(())
    }
}
