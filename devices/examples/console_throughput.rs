//! Measures the virtio-console data path without KVM: queues in real guest memory, pipes
//! as the host ends (as the VMM gives them, 1 MiB of capacity), the device driven by an
//! event manager exactly as the VMM's event loop drives it. The "driver" here recycles
//! each used buffer at once, as a guest that keeps up would, and kicks after every batch.
//!
//! - guest → host (stdout): 32 KiB chains, what Linux's `port_fops_write` sends per
//!   `write`, a host thread draining the pipe into nothing;
//! - host → guest (stdin): page-sized receive buffers, what Linux posts, a host thread
//!   writing into the pipe as fast as it can.
//!
//! `cargo run --release -p devices --example console_throughput [MiB]` (default 256).

#[path = "../src/virtio/split_ring.rs"]
mod split_ring;

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::virtio::console::control::{ControlMsg, PORT_OPEN};
use devices::virtio::console::{rx_queue, tx_queue, CONTROL_TX_QUEUE};
use devices::virtio::{Console, IrqTrigger, VirtioDevice};
use event_manager::{EventManager, SubscriberOps};
use split_ring::Ring;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const STDIN: usize = 1;
const STDOUT: usize = 2;
/// Guest buffers.
const BUFS: u64 = 0x10_0000;
const TX_CHAIN: u32 = 32 << 10;
const RX_BUF: u32 = 4096;
/// The pipes' capacity (what the VMM asks for).
const PIPE_CAPACITY: i32 = 1 << 20;

/// A pipe of [`PIPE_CAPACITY`]: (read end, write end).
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array we pass.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fcntl with an int argument on the pipe just made.
    unsafe { libc::fcntl(fds[0], libc::F_SETPIPE_SZ, PIPE_CAPACITY) };
    // SAFETY: both fds are fresh and ours.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn report(what: &str, bytes: u64, secs: f64) {
    println!(
        "{what:<28} {:>6} MiB in {secs:>6.3} s: {:>8.1} MB/s",
        bytes >> 20,
        bytes as f64 / secs / 1e6
    );
}

/// The yardstick: the same bytes through the same kind of pipe, a host thread writing
/// `write_len` at a time and another draining it.
fn native_pipe(total: u64, write_len: usize) -> f64 {
    let (r, w) = pipe();
    let drain = std::thread::spawn(move || {
        let mut out = std::fs::File::from(r);
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < total {
            got += out.read(&mut buf).unwrap() as u64;
        }
    });
    let start = Instant::now();
    let mut input = std::fs::File::from(w);
    let chunk = vec![0x5au8; write_len];
    let mut sent = 0u64;
    while sent < total {
        input.write_all(&chunk).unwrap();
        sent += write_len as u64;
    }
    drain.join().unwrap();
    start.elapsed().as_secs_f64()
}

fn main() {
    let mib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(256);
    let total = mib << 20;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let (control_r, _control_w) = pipe();
    let (stdin_r, stdin_w) = pipe();
    let (stdout_r, stdout_w) = pipe();
    let (_stderr_r, stderr_w) = pipe();
    let console = Console::stdio(control_r, stdin_r, stdout_w, stderr_w).unwrap();
    let features = console.avail_features();
    let mut rings: Vec<Ring> = console
        .queue_max_sizes()
        .iter()
        .enumerate()
        .map(|(q, &size)| Ring::new(q as u64 * 0x4000, size))
        .collect();
    let queues = rings.iter().map(Ring::queue).collect();
    let console = Arc::new(Mutex::new(console));
    let mut manager: EventManager<Arc<Mutex<Console>>> = EventManager::new().unwrap();
    manager.add_subscriber(console.clone());
    let kicks: Vec<_> = {
        let mut c = console.lock().unwrap();
        c.activate(
            mem.clone(),
            features,
            queues,
            Arc::new(IrqTrigger::new().unwrap()),
        )
        .unwrap();
        c.queue_events()
            .iter()
            .map(|e| e.try_clone().unwrap())
            .collect()
    };
    manager.run_with_timeout(0).unwrap(); // the activation event

    // Guest → host: stdout.
    let txq = tx_queue(STDOUT);
    let tx = &mut rings[txq];
    mem.write_slice(&vec![0x5a; TX_CHAIN as usize], GuestAddress(BUFS))
        .unwrap();
    for i in 0..tx.size {
        tx.write_desc(&mem, i, BUFS, TX_CHAIN, 0, 0);
    }
    let drain = std::thread::spawn(move || {
        let mut out = std::fs::File::from(stdout_r);
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < total {
            got += out.read(&mut buf).unwrap() as u64;
        }
    });
    let start = Instant::now();
    for i in 0..tx.size {
        tx.publish(&mem, i);
    }
    kicks[txq].write(1).unwrap();
    while console.lock().unwrap().counters().ports[STDOUT].bytes_from_guest < total {
        manager.run_with_timeout(100).unwrap();
        if tx.recycle(&mem) > 0 {
            kicks[txq].write(1).unwrap();
        }
    }
    drain.join().unwrap();
    report(
        "guest -> host (stdout)",
        total,
        start.elapsed().as_secs_f64(),
    );

    // Host → guest: stdin, once the guest has the port open.
    let rxq = rx_queue(STDIN);
    let rx = &mut rings[rxq];
    for i in 0..rx.size {
        let addr = BUFS + (8 << 20) + u64::from(i) * u64::from(RX_BUF);
        rx.write_desc(&mem, i, addr, RX_BUF, VRING_DESC_F_WRITE, 0);
    }
    let ctl = &mut rings[CONTROL_TX_QUEUE];
    let open = ControlMsg {
        id: STDIN as u32,
        event: PORT_OPEN,
        value: 1,
    };
    let ctl_buf = BUFS + (16 << 20);
    mem.write_slice(&open.to_bytes(), GuestAddress(ctl_buf))
        .unwrap();
    ctl.write_desc(&mem, 0, ctl_buf, 8, 0, 0);
    ctl.publish(&mem, 0);
    kicks[CONTROL_TX_QUEUE].write(1).unwrap();
    manager.run_with_timeout(100).unwrap();
    assert!(console.lock().unwrap().guest_connected(STDIN));
    let rx = &mut rings[rxq];
    let flood = std::thread::spawn(move || {
        let mut input = std::fs::File::from(stdin_w);
        let chunk = vec![0xa5u8; 1 << 20];
        let mut sent = 0u64;
        while sent < total {
            input.write_all(&chunk).unwrap();
            sent += chunk.len() as u64;
        }
    });
    let start = Instant::now();
    for i in 0..rx.size {
        rx.publish(&mem, i);
    }
    kicks[rxq].write(1).unwrap();
    while console.lock().unwrap().counters().ports[STDIN].bytes_to_guest < total {
        manager.run_with_timeout(100).unwrap();
        if rx.recycle(&mem) > 0 {
            kicks[rxq].write(1).unwrap();
        }
    }
    report(
        "host -> guest (stdin)",
        total,
        start.elapsed().as_secs_f64(),
    );
    flood.join().unwrap();
    let c = console.lock().unwrap().counters();
    assert_eq!(c.dropped.total(), 0);
    report(
        "native pipe, 32 KiB writes",
        total,
        native_pipe(total, TX_CHAIN as usize),
    );
}
