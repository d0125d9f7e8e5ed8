//! The event-loop side shared by virtio devices: the queue eventfds (ioeventfds for the
//! VMM) and the private *activate* eventfd through which a device, activated on a vCPU
//! thread, gets its queue eventfds added to (or, after a reset, removed from) the
//! event manager it lives in.

use std::io;

use event_manager::{EventOps, EventSet, Events};
use vmm_sys_util::eventfd::EventFd;

use super::ActivateError;

/// Event data tag of the activate eventfd; queue `i` uses `QUEUE_EVENT_BASE + i`.
const ACTIVATE_EVENT: u32 = 0;
const QUEUE_EVENT_BASE: u32 = 1;

/// A device's eventfds and whether its queues are currently watched.
pub(crate) struct DeviceEvents {
    /// One per queue, in queue order.
    pub queue_evts: Vec<EventFd>,
    activate_evt: EventFd,
    /// Only `process`/`init` can change the registrations, so this tracks them.
    registered: bool,
}

impl DeviceEvents {
    /// Fresh non-blocking eventfds for `queues` queues.
    pub fn new(queues: usize) -> io::Result<Self> {
        let evt = || EventFd::new(libc::EFD_NONBLOCK);
        Ok(Self {
            queue_evts: (0..queues).map(|_| evt()).collect::<io::Result<_>>()?,
            activate_evt: evt()?,
            registered: false,
        })
    }

    /// Asks the event loop to bring registrations in line with the device state (call
    /// after activation and after reset, from any thread).
    pub fn signal(&self) -> io::Result<()> {
        self.activate_evt.write(1)
    }

    /// [`Self::signal`] at the end of an activation, its error as the activation's.
    pub fn signal_activated(&self) -> Result<(), ActivateError> {
        self.signal().map_err(ActivateError::Signal)
    }

    /// [`Self::signal`] at the end of a reset, which cannot fail: an error is logged for
    /// `device` (e.g. "virtio-blk").
    pub fn signal_reset(&self, device: &str) {
        if let Err(e) = self.signal() {
            tracing::error!("{device}: cannot signal reset to the event loop: {e}");
        }
    }

    /// `MutEventSubscriber::init`: watch the activate eventfd (and the queues if the
    /// device was activated before being added to the loop).
    pub fn init(&mut self, ops: &mut EventOps, active: bool) {
        let events = Events::with_data(&self.activate_evt, ACTIVATE_EVENT, EventSet::IN);
        if let Err(e) = ops.add(events) {
            tracing::error!("virtio: cannot register the activate eventfd: {e:?}");
        }
        self.sync(ops, active);
    }

    /// `MutEventSubscriber::process`: returns the index of the queue that was kicked (its
    /// eventfd already drained), or `None` for the activate event.
    pub fn process(&mut self, events: &Events, ops: &mut EventOps, active: bool) -> Option<usize> {
        if events.data() == ACTIVATE_EVENT {
            let _ = self.activate_evt.read();
            self.sync(ops, active);
            return None;
        }
        let index = events.data().wrapping_sub(QUEUE_EVENT_BASE) as usize;
        let evt = self.queue_evts.get(index)?;
        // Drain before working: a kick arriving meanwhile must wake the loop again.
        let _ = evt.read();
        Some(index)
    }

    fn sync(&mut self, ops: &mut EventOps, active: bool) {
        if active == self.registered {
            return;
        }
        for (i, evt) in self.queue_evts.iter().enumerate() {
            let events = Events::with_data(evt, QUEUE_EVENT_BASE + i as u32, EventSet::IN);
            let result = if active {
                ops.add(events)
            } else {
                ops.remove(events)
            };
            if let Err(e) = result {
                tracing::error!("virtio: cannot (un)register queue {i} eventfd: {e:?}");
            }
        }
        self.registered = active;
    }
}
