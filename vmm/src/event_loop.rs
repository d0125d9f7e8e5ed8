//! The device event loop: one thread running an event-manager that serves device queue
//! notifications (ioeventfds) and other device file descriptors, until told to stop.
//! Dropping the [`EventLoop`] stops and joins the thread; if the loop itself fails, it
//! says why and writes the `failed` eventfd the main thread waits on, so a dead loop ends
//! the run instead of leaving the guest waiting for I/O forever.

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::EventFd;

/// A device (or other) subscriber the loop serves.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A running event loop; dropping it stops and joins the thread.
pub struct EventLoop {
    stop: Arc<AtomicBool>,
    wake: EventFd,
    failure: Arc<Mutex<Option<String>>>,
    handle: Option<JoinHandle<()>>,
}

/// Makes `epoll_wait` return when the loop is asked to stop. The loop blocks without a
/// timeout, so this wake-up is the only way out besides an error.
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
    /// Starts the loop thread with `subscribers` registered; `failed` is written if the
    /// loop dies of an error. `on_start` runs first on the new thread (the VMM installs the
    /// thread's seccomp filter there); its error is a failure of the loop.
    pub fn start(
        subscribers: Vec<Subscriber>,
        failed: EventFd,
        on_start: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> std::io::Result<Self> {
        let mut manager: EventManager<Subscriber> = EventManager::new()
            .map_err(|e| std::io::Error::other(format!("event manager: {e:?}")))?;
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        // Watched before the devices, so a stop is seen even while devices are busy.
        manager.add_subscriber(Arc::new(Mutex::new(Wake(wake.try_clone()?))));
        for s in subscribers {
            manager.add_subscriber(s);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let failure = Arc::new(Mutex::new(None));
        let (flag, why) = (stop.clone(), failure.clone());
        let handle = std::thread::Builder::new()
            .name("vmm-events".into())
            .spawn(move || {
                let fail = |text: String| {
                    tracing::error!("{text}");
                    *why.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
                    let _ = failed.write(1);
                };
                if let Err(e) = on_start() {
                    return fail(format!("device event loop: {e}"));
                }
                while !flag.load(Ordering::Acquire) {
                    if let Err(e) = manager.run() {
                        return fail(format!("device event loop failed: {e:?}"));
                    }
                }
            })?;
        Ok(Self {
            stop,
            wake,
            failure,
            handle: Some(handle),
        })
    }

    /// Why the loop died, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn join(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        if let Some(handle) = self.handle.take() {
            if handle.join().is_err() {
                tracing::error!("the device event loop thread panicked");
            }
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A subscriber that counts its events.
    struct Counter(EventFd, Arc<Mutex<u32>>);

    impl MutEventSubscriber for Counter {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let _ = self.0.read();
            *self.1.lock().unwrap() += 1;
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.0, EventSet::IN)).unwrap();
        }
    }

    #[test]
    fn serves_subscribers_and_drop_stops_the_thread_at_once() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let count = Arc::new(Mutex::new(0));
        let counter: Subscriber =
            Arc::new(Mutex::new(Counter(evt.try_clone().unwrap(), count.clone())));
        let failed = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let events =
            EventLoop::start(vec![counter], failed.try_clone().unwrap(), || Ok(())).unwrap();
        evt.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while *count.lock().unwrap() == 0 {
            assert!(
                Instant::now() < deadline,
                "the loop never served the subscriber"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let started = Instant::now();
        drop(events);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "drop took {:?}: the loop was not woken",
            started.elapsed()
        );
        assert!(failed.read().is_err(), "a clean stop is not a failure");
    }

    /// A loop that cannot start (here: its setup hook fails, as a refused seccomp filter
    /// would) says why and writes `failed`, which ends the run in the main thread.
    #[test]
    fn a_loop_that_fails_says_why_and_signals_the_run() {
        let failed = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let events = EventLoop::start(vec![], failed.try_clone().unwrap(), || {
            Err("no filter for you".into())
        })
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while failed.read().is_err() {
            assert!(Instant::now() < deadline, "failed was never written");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            events.failure().as_deref(),
            Some("device event loop: no filter for you")
        );
    }
}
