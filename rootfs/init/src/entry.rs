//! Init's entry point, without std's runtime start.
//!
//! Before `main`, std's start of a program reads `/proc/self/maps` (through
//! `pthread_getattr_np` and `sscanf`) to place a stack guard, maps an alternate signal
//! stack and installs SIGSEGV/SIGBUS handlers to report stack overflows: a dozen system
//! calls and a few page faults on every start of init, and a page fault costs ~15 µs on a
//! PVM host. Init recurses nowhere, so it starts from C's `main` (`#![no_main]`) and keeps
//! only what of that start it relies on ([`prepare_process`]): stdin, stdout and stderr
//! open, SIGPIPE ignored (a closed marker pipe or console is an EPIPE, never a death). A
//! panic still ends init with status 101 after the panic message, as under std's start.

/// What std's start did that init relies on: fds 0–2 open (a file init opens must never
/// become its stderr; `/dev/null` where one is closed, as std does, or left closed when
/// there is none yet — the VM's init opens the console there once `/dev` is mounted) and
/// SIGPIPE ignored.
#[cfg_attr(test, allow(dead_code))]
pub fn prepare_process() {
    let mut fds = [0, 1, 2].map(|fd| libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    });
    // SAFETY: polls three pollfds of ours without waiting.
    if unsafe { libc::poll(fds.as_mut_ptr(), 3, 0) } >= 0 {
        for pollfd in fds {
            if pollfd.revents & libc::POLLNVAL != 0 {
                // The lowest free descriptor: the closed one (fds below it are open).
                // SAFETY: a static NUL-terminated path; the descriptor is kept on purpose.
                unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
            }
        }
    }
    // SAFETY: setting a disposition to SIG_IGN takes no handler code.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// Runs `boot` (which never returns) and turns a panic into status 101, as std's start
/// does; the panic hook has printed the message by then.
#[cfg_attr(test, allow(dead_code))]
pub fn run(boot: fn() -> !) -> libc::c_int {
    match std::panic::catch_unwind(boot) {
        Err(_) => 101,
    }
}
