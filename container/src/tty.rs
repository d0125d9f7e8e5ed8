//! The parent's side of `-t`: the master of the container's pty, relayed to the caller.
//!
//! The child makes the pty on the box's own devpts and sends the master over the channel
//! ([`crate::channel::FromChild::Terminal`]); [`adopt`] sizes it like the caller's
//! terminal before init runs; a [`Session`] then relays the caller's stdin to the master
//! (with `-i`, in raw mode when stdin is a terminal) and the master to the caller's stdout,
//! and forwards resizes. Ctrl-C is byte 0x03 in raw mode: the pty's line discipline makes
//! it SIGINT for the workload's foreground process group, and twinbox never sees it.
//! The session ends when the master reports EIO/HUP, once init (which holds the slave)
//! and so every process of the box is gone.

use crate::Error;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;
use twinbox_spec::interrupt::Interrupt;
use twinbox_spec::run_spec::StdinMode;
use twinbox_spec::terminal::{self, RawMode, Relay, ResizeWatcher};

/// Makes the master received from the child ready for the relay: non-blocking (the relay
/// writes only what fits and never stalls on a box that does not read), and the caller's
/// window size set before the workload starts.
pub(crate) fn adopt(master: OwnedFd) -> Result<OwnedFd, Error> {
    let flags = fcntl(master.as_raw_fd(), FcntlArg::F_GETFL)
        .map_err(|e| os("read the terminal's flags", e))?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    fcntl(master.as_raw_fd(), FcntlArg::F_SETFL(flags))
        .map_err(|e| os("make the terminal non-blocking", e))?;
    if let Some(size) = terminal::caller_window_size() {
        terminal::set_window_size(master.as_fd(), size)
            .map_err(|e| Error::os("size the container's terminal", e))?;
    }
    Ok(master)
}

fn os(what: &str, errno: nix::errno::Errno) -> Error {
    Error::os(what, std::io::Error::from_raw_os_error(errno as i32))
}

/// The relay between the caller and the container's pty while the box runs. Dropping it
/// restores the caller's terminal.
pub(crate) struct Session<'a> {
    master: BorrowedFd<'a>,
    relay: Relay<'a>,
    // Last: the relay stops using the terminal before its settings come back.
    _raw: Option<RawMode<'a>>,
}

impl<'a> Session<'a> {
    /// Starts relaying `master`: the caller's stdin into it when `stdin` is inherited
    /// (raw mode if that is a terminal), its output to the caller's stdout, and resizes
    /// from `watcher` (the caller's terminal) onto it.
    pub(crate) fn start(
        master: &'a OwnedFd,
        stdin: StdinMode,
        interrupt: &'a Interrupt,
        watcher: Option<&'a ResizeWatcher>,
    ) -> Result<Self, Error> {
        let [caller_in, caller_out, _] = terminal::caller_stdio();
        let mut relay = Relay::new();
        relay.output(master.as_fd(), caller_out);
        let mut raw = None;
        if stdin == StdinMode::Inherit {
            relay.input_to_terminal(caller_in, master.as_fd());
            raw = RawMode::enable(caller_in, interrupt)
                .map_err(|e| Error::os("put the terminal into raw mode", e))?;
        }
        if let (Some(watcher), Some(terminal)) = (watcher, terminal::caller_terminal()) {
            relay.resizes(watcher, terminal);
        }
        Ok(Self {
            master: master.as_fd(),
            relay,
            _raw: raw,
        })
    }

    /// One round of the relay with `extra` polled alongside (see [`Relay::poll_once`]); a
    /// resize of the caller's terminal is passed on to the box's.
    pub(crate) fn poll(&mut self, extra: &mut [libc::pollfd], timeout: Duration) {
        match self.relay.poll_once(extra, Some(timeout)) {
            Ok(Some(size)) => {
                if let Err(e) = terminal::set_window_size(self.master, size) {
                    tracing::warn!("forward the terminal's new size: {e}");
                }
            }
            Ok(None) => {}
            Err(e) => {
                // poll itself failed (EINVAL, ENOMEM): not worth ending the run over; the
                // loop comes round again after a pause instead of spinning.
                tracing::warn!("relay the container's terminal: {e}");
                std::thread::sleep(timeout);
            }
        }
    }

    /// Whether the box's side is closed and everything it wrote is passed on.
    pub(crate) fn finished(&self) -> bool {
        self.relay.finished()
    }
}
