//! The device event loop: one thread running an event-manager that serves device queue
//! notifications (ioeventfds) and other device file descriptors, until told to stop.

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::EventFd;

/// A device (or other) subscriber the loop serves.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// How long one `epoll_wait` may block before the stop flag is looked at again, in ms.
/// A stop request also wakes the loop at once through [`Wake`]; this is the backstop.
const POLL_MS: i32 = 100;

/// A running event loop.
pub struct EventLoop {
    stop: Arc<AtomicBool>,
    wake: EventFd,
    handle: JoinHandle<()>,
}

/// Makes `epoll_wait` return when the loop is asked to stop, so teardown does not wait
/// for the poll timeout.
struct Wake(EventFd);

impl MutEventSubscriber for Wake {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            tracing::warn!("event loop: cannot watch its wake-up eventfd: {e:?}");
        }
    }
}

impl EventLoop {
    /// Starts the loop thread with `subscribers` registered.
    pub fn start(subscribers: Vec<Subscriber>) -> std::io::Result<Self> {
        let mut manager: EventManager<Subscriber> = EventManager::new()
            .map_err(|e| std::io::Error::other(format!("event manager: {e:?}")))?;
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        manager.add_subscriber(Arc::new(Mutex::new(Wake(wake.try_clone()?))));
        for s in subscribers {
            manager.add_subscriber(s);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("vmm-events".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    if let Err(e) = manager.run_with_timeout(POLL_MS) {
                        tracing::error!("device event loop failed: {e:?}");
                        break;
                    }
                }
            })?;
        Ok(Self { stop, wake, handle })
    }

    /// Stops the loop (waking it at once) and joins its thread.
    pub fn stop_and_join(self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        let _ = self.handle.join();
    }
}
