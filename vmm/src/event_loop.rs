//! The device event loop: one thread running an event-manager that serves device queue
//! notifications (ioeventfds) and other device file descriptors, until told to stop.

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// A device (or other) subscriber the loop serves.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// How long one `epoll_wait` may block before the stop flag is looked at again, in ms.
/// Stopping waits at most this long.
const POLL_MS: i32 = 20;

/// A running event loop.
pub struct EventLoop {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

impl EventLoop {
    /// Starts the loop thread with `subscribers` registered.
    pub fn start(subscribers: Vec<Subscriber>) -> std::io::Result<Self> {
        let mut manager: EventManager<Subscriber> = EventManager::new()
            .map_err(|e| std::io::Error::other(format!("event manager: {e:?}")))?;
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
        Ok(Self { stop, handle })
    }

    /// Stops the loop and joins its thread.
    pub fn stop_and_join(self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.handle.join();
    }
}
