//! The console against hand-built split queues in real guest memory, with pipes as the
//! host ends: the driver side is played the way Linux's `virtio_console.c` does it.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use vm_memory::{Bytes, GuestAddress};

use super::control::{
    ControlMsg, BAD_ID, DEVICE_READY, HEADER_LEN, PORT_ADD, PORT_NAME, PORT_OPEN, PORT_READY,
};
use super::*;
use crate::virtio::split_ring::{Buf, Ring};

const MEM_SIZE: usize = 0x400_0000;
/// Far outside guest memory.
const WILD: u64 = 0x1_0000_0000;
/// Rings: queue q at RINGS + q * 0x4000.
const RINGS: u64 = 0;
/// Guest buffers are handed out from here up.
const BUFS: u64 = 0x10_0000;
const STDIN: usize = 1;
const STDOUT: usize = 2;
const STDERR: usize = 3;

/// The driver side: guest memory, one ring per queue, a bump allocator for buffers.
struct Guest {
    mem: GuestMemoryMmap,
    rings: Vec<Ring>,
    next_buf: u64,
}

impl Guest {
    fn new(sizes: &[u16]) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let rings = sizes
            .iter()
            .enumerate()
            .map(|(q, &size)| Ring::new(RINGS + q as u64 * 0x4000, size))
            .collect();
        Self {
            mem,
            rings,
            next_buf: BUFS,
        }
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let at = self.next_buf;
        self.next_buf += u64::from(len).next_multiple_of(64);
        assert!(self.next_buf < MEM_SIZE as u64, "test guest out of memory");
        at
    }

    /// Posts `count` writable single-buffer chains of `len` bytes on queue `q`.
    fn post_rx(&mut self, q: usize, count: usize, len: u32) {
        for _ in 0..count {
            let addr = self.alloc(len);
            self.rings[q].add(&self.mem, &[(addr, len, true)]);
        }
    }

    /// Makes `data` available on queue `q` as one readable chain split into `pieces`
    /// buffers; returns the head.
    fn send(&mut self, q: usize, data: &[u8], pieces: usize) -> u16 {
        let piece = data.len().div_ceil(pieces.max(1)).max(1);
        let bufs: Vec<Buf> = data
            .chunks(piece)
            .map(|chunk| {
                let addr = self.alloc(chunk.len() as u32);
                self.mem.write_slice(chunk, GuestAddress(addr)).unwrap();
                (addr, chunk.len() as u32, false)
            })
            .collect();
        self.rings[q].add(&self.mem, &bufs)
    }

    /// Used entries of queue `q` since the last call, with the bytes the device wrote.
    fn received(&mut self, q: usize) -> Vec<Vec<u8>> {
        let used = self.rings[q].take_used(&self.mem);
        used.into_iter()
            .map(|(head, len)| self.rings[q].read_chain(&self.mem, head, len))
            .collect()
    }

    /// Control messages the device sent since the last call: header and trailing bytes.
    fn control_in(&mut self) -> Vec<(ControlMsg, Vec<u8>)> {
        self.received(CONTROL_RX_QUEUE)
            .into_iter()
            .map(|bytes| {
                let header: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().unwrap();
                (ControlMsg::from_bytes(header), bytes[HEADER_LEN..].to_vec())
            })
            .collect()
    }
}

fn msg(id: u32, event: u16, value: u16) -> ControlMsg {
    ControlMsg { id, event, value }
}

/// A pipe: (read end, write end).
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array we pass.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds are fresh and ours.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn set_pipe_size(fd: &impl AsRawFd, bytes: i32) {
    // SAFETY: fcntl with an int argument on an open pipe.
    assert!(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, bytes) } >= bytes);
}

/// The test's (host) ends of the four ports.
struct Host {
    control: File,
    stdin: File,
    stdout: File,
    stderr: File,
}

/// Reads what `file` has now without waiting (the test's ends are non-blocking);
/// `None` at EOF.
fn read_now(file: &mut File) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return if out.is_empty() { None } else { Some(out) },
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Some(out),
            Err(e) => panic!("read: {e}"),
        }
    }
}

fn nonblocking(fd: OwnedFd) -> File {
    set_nonblocking(&fd).unwrap();
    File::from(fd)
}

/// An active stdio console over pipes, and the guest driving it.
fn setup() -> (Console, Guest, Host, Arc<IrqTrigger>) {
    let (control_r, control_w) = pipe();
    let (stdin_r, stdin_w) = pipe();
    let (stdout_r, stdout_w) = pipe();
    let (stderr_r, stderr_w) = pipe();
    let mut console = Console::stdio(control_r, stdin_r, stdout_w, stderr_w).unwrap();
    let guest = Guest::new(console.queue_max_sizes());
    let irq = Arc::new(IrqTrigger::new().unwrap());
    let queues = guest.rings.iter().map(Ring::queue).collect();
    console
        .activate(
            guest.mem.clone(),
            console.avail_features(),
            queues,
            irq.clone(),
        )
        .unwrap();
    let host = Host {
        control: nonblocking(control_w),
        stdin: nonblocking(stdin_w),
        stdout: nonblocking(stdout_r),
        stderr: nonblocking(stderr_r),
    };
    (console, guest, host, irq)
}

/// The driver sends a control message (and, like Linux, expects it back at once).
fn send_control(console: &mut Console, guest: &mut Guest, m: ControlMsg) {
    guest.send(CONTROL_TX_QUEUE, &m.to_bytes(), 1);
    console.process_queue(CONTROL_TX_QUEUE);
    assert_eq!(
        guest.rings[CONTROL_TX_QUEUE].take_used(&guest.mem).len(),
        1,
        "control message returned"
    );
}

/// Linux's probe and port setup: control buffers, DEVICE_READY, then per port: receive
/// buffers and PORT_READY. Returns what the device sent.
fn handshake(console: &mut Console, guest: &mut Guest) -> Vec<(ControlMsg, Vec<u8>)> {
    guest.post_rx(CONTROL_RX_QUEUE, 16, 4096);
    send_control(console, guest, msg(BAD_ID, DEVICE_READY, 1));
    let mut seen = guest.control_in();
    for (m, _) in seen.clone() {
        guest.post_rx(rx_queue(m.id as usize), 8, 4096);
        send_control(console, guest, msg(m.id, PORT_READY, 1));
    }
    seen.extend(guest.control_in());
    seen
}

/// The guest opens port `id` (`port_fops_open`).
fn open_port(console: &mut Console, guest: &mut Guest, id: usize, open: bool) {
    send_control(console, guest, msg(id as u32, PORT_OPEN, u16::from(open)));
}

#[test]
fn device_shape_and_config_space() {
    let (console, _guest, _host, _irq) = setup();
    assert_eq!(console.device_type(), 3);
    let features = console.avail_features();
    assert_ne!(features & VIRTIO_F_VERSION_1, 0);
    assert_ne!(features & 1 << VIRTIO_CONSOLE_F_MULTIPORT, 0);
    assert_eq!(features & 1, 0, "no F_SIZE");
    assert_eq!(features & 4, 0, "no F_EMERG_WRITE");
    // (4 ports + control) * 2, in Linux's order: port 0, control, ports 1..
    assert_eq!(console.queue_max_sizes().len(), 10);
    // How many buffers the driver may post on each port's receiveq: full ones for the
    // host → guest ports (control, stdin), two for stdout and stderr, which the host never
    // writes (Linux fills every receiveq with pages).
    let sizes = console.queue_max_sizes();
    assert_eq!(
        [0, 1, 2, 3].map(|port| sizes[rx_queue(port)]),
        [
            RX_QUEUE_SIZE,
            RX_QUEUE_SIZE,
            OUTPUT_RX_QUEUE_SIZE,
            OUTPUT_RX_QUEUE_SIZE
        ]
    );
    assert_eq!(
        (
            rx_queue(0),
            tx_queue(0),
            rx_queue(1),
            tx_queue(1),
            rx_queue(3),
            tx_queue(3)
        ),
        (0, 1, 4, 5, 8, 9)
    );
    let mut config = [0xffu8; 12];
    console.read_config(0, &mut config);
    assert_eq!(config, [0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0]);
    let mut nr = [0u8; 4];
    console.read_config(4, &mut nr);
    assert_eq!(u32::from_le_bytes(nr), 4);
    let mut past = [0xffu8; 4];
    console.read_config(12, &mut past);
    assert_eq!(past, [0; 4]);
}

#[test]
fn bad_port_lists_are_refused() {
    let port = |name: &str| Port::output(name, pipe().1);
    assert!(matches!(
        Console::new(vec![]),
        Err(ConsoleError::PortCount { got: 0, .. })
    ));
    for names in [vec![""], vec!["a\0b"], vec!["x", "x"]] {
        let ports = names.into_iter().map(port).collect();
        assert!(matches!(
            Console::new(ports),
            Err(ConsoleError::BadName { .. })
        ));
    }
    let long = "n".repeat(MAX_NAME_LEN + 1);
    assert!(Console::new(vec![port(&long)]).is_err());
    let many = (0..=MAX_PORTS).map(|i| port(&i.to_string())).collect();
    assert!(Console::new(many).is_err());
}

#[test]
fn handshake_adds_every_port_then_opens_before_naming() {
    let (mut console, mut guest, _host, _irq) = setup();
    let seen = handshake(&mut console, &mut guest);
    let mut want: Vec<(ControlMsg, Vec<u8>)> =
        (0..4).map(|id| (msg(id, PORT_ADD, 1), vec![])).collect();
    for (id, name) in twinbox_proto::stdio::PORTS.iter().enumerate() {
        let mut bytes = name.as_bytes().to_vec();
        bytes.push(0);
        want.push((msg(id as u32, PORT_OPEN, 1), vec![]));
        want.push((msg(id as u32, PORT_NAME, 1), bytes));
    }
    assert_eq!(seen, want);
    for (id, name) in twinbox_proto::stdio::PORTS.iter().enumerate() {
        assert_eq!(console.port_name(id), Some(*name));
        assert!(!console.guest_connected(id));
    }
    open_port(&mut console, &mut guest, STDOUT, true);
    assert!(console.guest_connected(STDOUT));
    open_port(&mut console, &mut guest, STDOUT, false);
    assert!(!console.guest_connected(STDOUT));
    let c = console.counters();
    assert_eq!(c.control.received, 7);
    assert_eq!(c.control.sent, 12);
    assert_eq!(c.dropped.total(), 0);
}

#[test]
fn control_messages_wait_for_receive_buffers() {
    let (mut console, mut guest, _host, _irq) = setup();
    // A buffer too small for a message is returned empty; the message waits.
    guest.post_rx(CONTROL_RX_QUEUE, 1, 4);
    send_control(&mut console, &mut guest, msg(BAD_ID, DEVICE_READY, 1));
    assert_eq!(
        guest.rings[CONTROL_RX_QUEUE].take_used(&guest.mem),
        vec![(0, 0)]
    );
    assert_eq!(console.counters().dropped.too_short, 1);
    assert!(guest.control_in().is_empty());
    guest.post_rx(CONTROL_RX_QUEUE, 2, 4096);
    console.process_queue(CONTROL_RX_QUEUE);
    assert_eq!(guest.control_in().len(), 2);
    guest.post_rx(CONTROL_RX_QUEUE, 8, 4096);
    console.process_queue(CONTROL_RX_QUEUE);
    let ids: Vec<u32> = guest.control_in().iter().map(|(m, _)| m.id).collect();
    assert_eq!(ids, vec![2, 3]);
    assert_eq!(console.counters().control.sent, 4);
}

#[test]
fn stdin_waits_for_the_open_port_then_fills_buffers_then_eof() {
    let (mut console, mut guest, mut host, _irq) = setup();
    handshake(&mut console, &mut guest);
    // Three 10-byte buffers more than the handshake's; the bytes split across them.
    let rxq = rx_queue(STDIN);
    guest.rings[rxq].take_used(&guest.mem);
    let data: Vec<u8> = (0..=255u8).collect();
    host.stdin.write_all(&data).unwrap();
    // Not open yet: Linux would discard what arrives, so nothing moves.
    console.process_queue(rxq);
    assert!(guest.received(rxq).is_empty());
    open_port(&mut console, &mut guest, STDIN, true);
    let got = guest.received(rxq);
    assert_eq!(got.len(), 1, "256 bytes fit the first page");
    assert_eq!(got[0], data);
    // A read split over small buffers: post only those, after the page buffers are gone.
    let mut console2_data = Vec::new();
    for _ in 0..7 {
        // Use up the remaining page buffers with one byte each.
        host.stdin.write_all(&[0xaa]).unwrap();
        console.process_input(STDIN);
        console2_data.extend(guest.received(rxq).concat());
    }
    assert_eq!(console2_data, vec![0xaa; 7]);
    host.stdin.write_all(&data[..25]).unwrap();
    console.process_input(STDIN);
    assert!(guest.received(rxq).is_empty(), "no buffers left");
    guest.post_rx(rxq, 3, 10);
    console.process_queue(rxq);
    let got = guest.received(rxq);
    assert_eq!(
        got,
        vec![
            data[..10].to_vec(),
            data[10..20].to_vec(),
            data[20..25].to_vec()
        ]
    );
    assert!(
        guest.control_in().is_empty(),
        "no EOF while the pipe is open"
    );

    // EOF: the writer goes; the next read returns 0 and the port closes after the data.
    host.stdin.write_all(&data[25..30]).unwrap();
    drop(host.stdin);
    guest.post_rx(rxq, 2, 4096);
    console.process_queue(rxq);
    assert_eq!(guest.received(rxq), vec![data[25..30].to_vec()]);
    assert_eq!(
        guest.control_in(),
        vec![(msg(STDIN as u32, PORT_OPEN, 0), vec![])]
    );
    let c = console.counters();
    assert_eq!(c.ports[STDIN].bytes_to_guest, 256 + 7 + 25 + 5);
    // Nothing more happens on that port: no read, no second EOF.
    console.process_input(STDIN);
    assert!(guest.control_in().is_empty());
}

#[test]
fn stdout_and_stderr_arrive_separately_and_byte_exact() {
    let (mut console, mut guest, mut host, irq) = setup();
    handshake(&mut console, &mut guest);
    open_port(&mut console, &mut guest, STDOUT, true);
    open_port(&mut console, &mut guest, STDERR, true);
    let out: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    let err: Vec<u8> = (0..1000u32).map(|i| 255 - (i % 256) as u8).collect();
    let (txo, txe) = (tx_queue(STDOUT), tx_queue(STDERR));
    guest.send(txo, &out[..1500], 3);
    guest.send(txe, &err, 1);
    guest.send(txo, &out[1500..], 7);
    let _ = irq.eventfd().read();
    console.process_queue(txo);
    console.process_queue(txe);
    assert_eq!(read_now(&mut host.stdout).unwrap(), out);
    assert_eq!(read_now(&mut host.stderr).unwrap(), err);
    assert_eq!(guest.rings[txo].take_used(&guest.mem).len(), 2);
    assert_eq!(guest.rings[txe].take_used(&guest.mem).len(), 1);
    assert!(
        irq.eventfd().read().unwrap() >= 1,
        "the guest learns its buffers are free"
    );
    let c = console.counters();
    assert_eq!(c.ports[STDOUT].bytes_from_guest, 4096);
    assert_eq!(c.ports[STDERR].bytes_from_guest, 1000);
    assert_eq!(c.dropped.total(), 0);
}

#[test]
fn a_full_pipe_holds_the_guest_back_and_loses_nothing() {
    let (mut console, mut guest, mut host, _irq) = setup();
    handshake(&mut console, &mut guest);
    open_port(&mut console, &mut guest, STDOUT, true);
    set_pipe_size(&host.stdout, 4096);
    let txo = tx_queue(STDOUT);
    let data: Vec<u8> = (0..64 << 10)
        .map(|i: u32| (i * 7 + i / 256) as u8)
        .collect();
    for chunk in data.chunks(16 << 10) {
        guest.send(txo, chunk, 2);
    }
    console.process_queue(txo);
    assert!(
        guest.rings[txo].take_used(&guest.mem).is_empty(),
        "first chain still partly unwritten"
    );
    assert!(console.ports[STDOUT].tx_blocked);
    assert_eq!(console.ports[STDOUT].interest(), EventSet::OUT);
    // Kicks while blocked change nothing (and write nothing out of order).
    console.process_queue(txo);
    let mut got = Vec::new();
    let mut used = 0;
    for _ in 0..1000 {
        got.extend(read_now(&mut host.stdout).unwrap());
        console.process_host(STDOUT); // EPOLLOUT
        used += guest.rings[txo].take_used(&guest.mem).len();
        if got.len() == data.len() {
            break;
        }
    }
    assert!(got == data, "every byte, in order");
    assert_eq!(used, 4);
    let c = console.counters().ports[STDOUT];
    assert!(c.host_full >= 15, "blocked on every 4 KiB: {}", c.host_full);
    assert_eq!(c.bytes_from_guest, data.len() as u64);
    assert_eq!(c.discarded_bytes, 0);
}

#[test]
fn guest_close_ends_the_host_stream_after_its_data() {
    let (mut console, mut guest, mut host, _irq) = setup();
    handshake(&mut console, &mut guest);
    open_port(&mut console, &mut guest, STDOUT, true);
    open_port(&mut console, &mut guest, STDERR, true);
    set_pipe_size(&host.stdout, 4096);
    // stdout: more than the pipe holds, queued before the close and not yet served.
    let data = vec![0x5au8; 10_000];
    guest.send(tx_queue(STDOUT), &data, 4);
    open_port(&mut console, &mut guest, STDOUT, false);
    let mut got = read_now(&mut host.stdout).unwrap();
    assert_eq!(got.len(), 4096);
    loop {
        console.process_host(STDOUT);
        match read_now(&mut host.stdout) {
            Some(more) => got.extend(more),
            None => break, // EOF: the device closed its end
        }
    }
    assert_eq!(got, data);
    // stderr: nothing pending, closed at once.
    open_port(&mut console, &mut guest, STDERR, false);
    assert_eq!(read_now(&mut host.stderr), None);
    // Late chains on a closed port are returned and counted, never stall the queue.
    guest.send(tx_queue(STDOUT), b"late", 1);
    console.process_queue(tx_queue(STDOUT));
    assert_eq!(guest.rings[tx_queue(STDOUT)].take_used(&guest.mem).len(), 2);
    assert_eq!(console.counters().ports[STDOUT].discarded_bytes, 4);
}

#[test]
fn flush_output_writes_the_tail_then_closes() {
    let (mut console, mut guest, host, _irq) = setup();
    handshake(&mut console, &mut guest);
    open_port(&mut console, &mut guest, STDOUT, true);
    open_port(&mut console, &mut guest, STDERR, true);
    set_pipe_size(&host.stdout, 4096);
    let out: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    for chunk in out.chunks(30_000) {
        guest.send(tx_queue(STDOUT), chunk, 1);
    }
    guest.send(tx_queue(STDERR), b"last words", 1);
    // Part of it goes now and blocks; the guest powers off; the VMM flushes.
    console.process_queue(tx_queue(STDOUT));
    let readers: Vec<_> = [host.stdout, host.stderr]
        .into_iter()
        .map(|mut f| {
            std::thread::spawn(move || {
                let mut got = Vec::new();
                loop {
                    match read_now(&mut f) {
                        None => return got,
                        Some(more) if more.is_empty() => {
                            std::thread::sleep(Duration::from_millis(1))
                        }
                        Some(more) => got.extend(more),
                    }
                }
            })
        })
        .collect();
    let outcome = console.flush_output(Instant::now() + Duration::from_secs(20));
    assert!(outcome.complete);
    let got: Vec<Vec<u8>> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    assert!(got[0] == out);
    assert_eq!(got[1], b"last words");
    assert_eq!(outcome.bytes + 4096, out.len() as u64 + 10);
}

/// Linux resets every virtio device on its way down (virtio_dev_shutdown), right after
/// the workload's last writes: what the transmit rings still hold must reach the host at
/// teardown all the same.
#[test]
fn output_queued_before_the_drivers_reset_is_flushed_at_teardown() {
    let (mut console, mut guest, host, _irq) = setup();
    handshake(&mut console, &mut guest);
    open_port(&mut console, &mut guest, STDERR, true);
    let tail: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    for chunk in tail.chunks(4096) {
        guest.send(tx_queue(STDERR), chunk, 1);
    }
    // The device has not seen the kicks yet when the driver resets it.
    console.reset();
    let mut stderr = host.stderr;
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        loop {
            match read_now(&mut stderr) {
                None => return got,
                Some(more) if more.is_empty() => std::thread::sleep(Duration::from_millis(1)),
                Some(more) => got.extend(more),
            }
        }
    });
    let outcome = console.flush_output(Instant::now() + Duration::from_secs(20));
    assert!(outcome.complete);
    assert!(reader.join().unwrap() == tail, "the tail arrived whole");
}

#[test]
fn flush_output_gives_up_at_the_deadline() {
    let (mut console, mut guest, host, _irq) = setup();
    handshake(&mut console, &mut guest);
    open_port(&mut console, &mut guest, STDOUT, true);
    set_pipe_size(&host.stdout, 4096);
    guest.send(tx_queue(STDOUT), &[1u8; 20_000], 1);
    let start = Instant::now();
    let outcome = console.flush_output(start + Duration::from_millis(100));
    assert!(!outcome.complete);
    assert_eq!(outcome.bytes, 4096);
    assert!(start.elapsed() >= Duration::from_millis(100));
    // The fd is closed all the same: the reader gets what fitted, then EOF.
    let mut stdout = host.stdout;
    assert_eq!(read_now(&mut stdout).unwrap().len(), 4096);
    assert_eq!(read_now(&mut stdout), None);
}

#[test]
fn guest_writes_on_input_ports_are_consumed_and_counted() {
    let (mut console, mut guest, _host, _irq) = setup();
    handshake(&mut console, &mut guest);
    guest.send(tx_queue(0), b"to the control port", 2);
    guest.send(tx_queue(STDIN), b"to stdin", 1);
    console.process_queue(tx_queue(0));
    console.process_queue(tx_queue(STDIN));
    assert_eq!(guest.rings[tx_queue(0)].take_used(&guest.mem).len(), 1);
    assert_eq!(guest.rings[tx_queue(STDIN)].take_used(&guest.mem).len(), 1);
    let c = console.counters();
    assert_eq!(c.ports[0].discarded_bytes, 19);
    assert_eq!(c.ports[STDIN].discarded_bytes, 8);
}

#[test]
fn hostile_control_messages_are_counted_not_obeyed() {
    let (mut console, mut guest, _host, _irq) = setup();
    guest.post_rx(CONTROL_RX_QUEUE, 8, 4096);
    let q = CONTROL_TX_QUEUE;
    // Too short, a writable descriptor, outside memory, a loop.
    guest.send(q, &[1, 2, 3, 4], 1);
    let addr = guest.alloc(8);
    guest.rings[q].add(&guest.mem, &[(addr, 8, true)]);
    guest.rings[q].add(&guest.mem, &[(WILD, 8, false)]);
    let head = guest.rings[q].next_desc;
    guest.rings[q].write_desc(&guest.mem, head, addr, 8, VRING_DESC_F_NEXT, head);
    guest.rings[q].next_desc += 1;
    guest.rings[q].publish(&guest.mem, head);
    // Events a driver must not send, bad port ids, failures.
    for m in [
        msg(0, PORT_ADD, 1),
        msg(0, PORT_NAME, 1),
        msg(0, 99, 1),
        msg(4, PORT_READY, 1),
        msg(BAD_ID, PORT_OPEN, 1),
        msg(1, PORT_READY, 0),
        msg(BAD_ID, DEVICE_READY, 0),
    ] {
        guest.send(q, &m.to_bytes(), 1);
    }
    console.process_queue(q);
    assert_eq!(
        guest.rings[q].take_used(&guest.mem).len(),
        11,
        "all returned"
    );
    assert!(guest.control_in().is_empty(), "none answered");
    let c = console.counters();
    assert_eq!(
        (
            c.dropped.too_short,
            c.dropped.wrong_direction,
            c.dropped.outside_memory,
            c.dropped.broken_link
        ),
        (1, 1, 1, 1)
    );
    assert_eq!(
        (
            c.control.unknown_event,
            c.control.bad_id,
            c.control.driver_failed
        ),
        (3, 2, 2)
    );
    assert!(!console.needs_reset());
    // Still works.
    let seen = handshake(&mut console, &mut guest);
    assert_eq!(seen.len(), 12);
}

#[test]
fn hostile_data_chains_are_dropped_and_counted() {
    let (mut console, mut guest, mut host, _irq) = setup();
    handshake(&mut console, &mut guest);
    open_port(&mut console, &mut guest, STDOUT, true);
    open_port(&mut console, &mut guest, STDIN, true);
    let txo = tx_queue(STDOUT);
    let big = guest.alloc(2 << 20);
    let ok = guest.alloc(16);
    guest.mem.write_slice(b"good", GuestAddress(ok)).unwrap();
    guest.rings[txo].add(&guest.mem, &[(ok, 4, true)]); // writable in transmit
    guest.rings[txo].add(&guest.mem, &[(WILD, 4, false)]); // outside memory
    guest.rings[txo].add(&guest.mem, &[(MEM_SIZE as u64 - 2, 4, false)]); // straddles the end
    guest.rings[txo].add(&guest.mem, &[(big, 2 << 20, false)]); // too long
    let head = guest.rings[txo].next_desc;
    guest.rings[txo].write_desc(&guest.mem, head, ok, 4, VRING_DESC_F_NEXT, head);
    guest.rings[txo].next_desc += 1;
    guest.rings[txo].publish(&guest.mem, head); // loops
    guest.rings[txo].add(&guest.mem, &[(ok, 4, false)]); // fine
    console.process_queue(txo);
    assert_eq!(guest.rings[txo].take_used(&guest.mem).len(), 6);
    assert_eq!(read_now(&mut host.stdout).unwrap(), b"good");
    // Receive side: readable buffers, outside memory, empty.
    let rxq = rx_queue(STDIN);
    guest.rings[rxq].take_used(&guest.mem);
    let buf = guest.alloc(64);
    // Use up the handshake's page buffers first.
    host.stdin.write_all(&vec![0u8; 8 * 4096]).unwrap();
    console.process_input(STDIN);
    assert_eq!(guest.rings[rxq].take_used(&guest.mem).len(), 8);
    guest.rings[rxq].add(&guest.mem, &[(buf, 64, false)]);
    guest.rings[rxq].add(&guest.mem, &[(WILD, 64, true)]);
    guest.rings[rxq].add(&guest.mem, &[(buf, 0, true)]);
    guest.rings[rxq].add(&guest.mem, &[(buf, 64, true)]);
    host.stdin.write_all(b"in").unwrap();
    console.process_queue(rxq);
    let used = guest.rings[rxq].take_used(&guest.mem);
    assert_eq!(
        used.iter().map(|u| u.1).collect::<Vec<_>>(),
        vec![0, 0, 0, 2]
    );
    let c = console.counters();
    assert_eq!(c.dropped.wrong_direction, 2);
    assert_eq!(c.dropped.outside_memory, 3);
    assert_eq!(c.dropped.too_long, 1);
    assert_eq!(c.dropped.broken_link, 1);
    assert_eq!(c.dropped.too_short, 1);
    assert!(!console.needs_reset());

    // A broken ring (avail index far ahead) stops the device until reset.
    guest
        .mem
        .write_obj(500u16, GuestAddress(guest.rings[txo].base + 0x1002))
        .unwrap();
    console.process_queue(txo);
    assert!(console.needs_reset());
    console.reset();
    assert!(!console.needs_reset());
}

type Subscriber = Arc<Mutex<Console>>;

/// An empty kick of the control receiveq through the loop, which then syncs its fds.
fn poke(console: &Subscriber, manager: &mut EventManager<Subscriber>) {
    console.lock().unwrap().queue_events()[CONTROL_RX_QUEUE]
        .write(1)
        .unwrap();
    assert!(manager.run_with_timeout(0).unwrap() >= 1);
}

#[test]
fn event_loop_reads_on_epollin_resumes_on_epollout_and_never_spins() {
    let (console, mut guest, mut host, _irq) = setup();
    let console = Arc::new(Mutex::new(console));
    let mut manager: EventManager<Subscriber> = EventManager::new().unwrap();
    manager.add_subscriber(console.clone());
    // The activation event registers the queue eventfds.
    manager.run_with_timeout(0).unwrap();
    {
        let mut c = console.lock().unwrap();
        handshake(&mut c, &mut guest);
        open_port(&mut c, &mut guest, 0, true);
        open_port(&mut c, &mut guest, STDOUT, true);
    }
    // Those were direct calls; a kick lets the loop catch up with the fds to watch.
    poke(&console, &mut manager);
    // The control port: the job frame arrives through EPOLLIN.
    let job = twinbox_proto::stdio::Frame::WindowSize { rows: 24, cols: 80 }
        .encode()
        .unwrap();
    host.control.write_all(&job).unwrap();
    let n = manager.run_with_timeout(1000).unwrap();
    assert!(n >= 1);
    assert_eq!(guest.received(rx_queue(0)).concat(), job);

    // Backpressure through the loop: EPOLLOUT resumes the blocked port.
    set_pipe_size(&host.stdout, 4096);
    let data = vec![7u8; 50_000];
    guest.send(tx_queue(STDOUT), &data, 5);
    let kick = console.lock().unwrap().queue_events()[tx_queue(STDOUT)]
        .try_clone()
        .unwrap();
    kick.write(1).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < data.len() && Instant::now() < deadline {
        manager.run_with_timeout(10).unwrap();
        got.extend(read_now(&mut host.stdout).unwrap());
    }
    assert_eq!(got, data);

    // Input with no guest buffers: not watched, so a readable pipe wakes nothing.
    {
        let mut c = console.lock().unwrap();
        // The job took one of the handshake's 8 pages (a chain is used once, however
        // little it got); the other 7 fill up and 100 bytes stay in the pipe.
        host.control.write_all(&vec![1u8; 7 * 4096 + 100]).unwrap();
        c.process_input(0);
        assert!(c.ports[0].rx_waiting);
    }
    poke(&console, &mut manager);
    assert_eq!(manager.run_with_timeout(0).unwrap(), 0);
    assert_eq!(
        manager.run_with_timeout(50).unwrap(),
        0,
        "no spin on a readable pipe"
    );
    // The guest posts a buffer and kicks: the rest arrives.
    guest.received(rx_queue(0));
    guest.post_rx(rx_queue(0), 1, 4096);
    let rx_kick = console.lock().unwrap().queue_events()[rx_queue(0)]
        .try_clone()
        .unwrap();
    rx_kick.write(1).unwrap();
    manager.run_with_timeout(1000).unwrap();
    assert_eq!(guest.received(rx_queue(0)).concat().len(), 100);
    // EOF after the writer hangs up: PORT_OPEN 0, then the fd is gone from the loop.
    drop(host.control);
    guest.post_rx(rx_queue(0), 1, 4096);
    rx_kick.write(1).unwrap();
    manager.run_with_timeout(1000).unwrap();
    for _ in 0..3 {
        manager.run_with_timeout(0).unwrap();
    }
    assert!(guest.control_in().contains(&(msg(0, PORT_OPEN, 0), vec![])));
    let c = console.lock().unwrap();
    assert!(c.ports[0].fd.is_none());
    assert!(c.ports[0].registered.is_none());
    drop(c);
    assert_eq!(
        manager.run_with_timeout(50).unwrap(),
        0,
        "no spin on a hung-up pipe"
    );
}

/// The wiring the VMM does (`register_mmio_virtio`): the transport on an MMIO bus, the
/// device on an event loop; a driver negotiates, sets up all ten queues, goes DRIVER_OK
/// and sends DEVICE_READY through a QueueNotify write.
#[test]
fn linux_style_probe_through_the_mmio_transport_and_event_loop() {
    use crate::bus::Bus;
    use crate::virtio::{MmioTransport, MMIO_WINDOW_LEN};
    const BASE: u64 = 0xd000_0000;
    let rd = |bus: &Bus, offset: u64| {
        let mut data = [0u8; 4];
        assert!(bus.read(BASE + offset, &mut data));
        u32::from_le_bytes(data)
    };
    let wr = |bus: &Bus, offset: u64, value: u32| {
        assert!(bus.write(BASE + offset, &value.to_le_bytes()));
    };
    let (control_r, _control_w) = pipe();
    let (stdin_r, _stdin_w) = pipe();
    let (_stdout_r, stdout_w) = pipe();
    let (_stderr_r, stderr_w) = pipe();
    let console = Console::stdio(control_r, stdin_r, stdout_w, stderr_w).unwrap();
    let mut guest = Guest::new(console.queue_max_sizes());
    let console = Arc::new(Mutex::new(console));
    let irq = Arc::new(IrqTrigger::new().unwrap());
    let transport = MmioTransport::new(guest.mem.clone(), console.clone(), irq.clone());
    let mut bus = Bus::new();
    bus.insert(BASE, MMIO_WINDOW_LEN, Arc::new(Mutex::new(transport)))
        .unwrap();
    let mut manager: EventManager<Subscriber> = EventManager::new().unwrap();
    manager.add_subscriber(console.clone());

    assert_eq!(rd(&bus, 0x008), TYPE_CONSOLE);
    wr(&bus, 0x070, 1);
    wr(&bus, 0x070, 1 | 2);
    let mut offered = 0u64;
    for sel in 0..2 {
        wr(&bus, 0x014, sel);
        offered |= u64::from(rd(&bus, 0x010)) << (32 * sel);
    }
    let wanted = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_CONSOLE_F_MULTIPORT;
    assert_eq!(offered, wanted);
    for sel in 0..2 {
        wr(&bus, 0x024, sel);
        wr(&bus, 0x020, (wanted >> (32 * sel)) as u32);
    }
    wr(&bus, 0x070, 1 | 2 | 8);
    // virtio_cread_feature(MULTIPORT, max_nr_ports): config offset 4.
    assert_eq!(rd(&bus, 0x104), 4);
    for (q, ring) in guest.rings.iter().enumerate() {
        wr(&bus, 0x030, q as u32);
        assert_eq!(rd(&bus, 0x034), u32::from(ring.size));
        wr(&bus, 0x038, u32::from(ring.size));
        for (reg, addr) in [
            (0x080, ring.base),
            (0x090, ring.base + 0x1000),
            (0x0a0, ring.base + 0x2000),
        ] {
            wr(&bus, reg, addr as u32);
            wr(&bus, reg + 4, (addr >> 32) as u32);
        }
        wr(&bus, 0x044, 1);
    }
    wr(&bus, 0x030, 10);
    assert_eq!(rd(&bus, 0x034), 0, "no eleventh queue");
    wr(&bus, 0x070, 1 | 2 | 8 | 4);
    assert_eq!(rd(&bus, 0x070), 1 | 2 | 8 | 4);
    manager.run_with_timeout(1000).unwrap(); // activation

    guest.post_rx(CONTROL_RX_QUEUE, 16, 4096);
    guest.send(
        CONTROL_TX_QUEUE,
        &msg(BAD_ID, DEVICE_READY, 1).to_bytes(),
        1,
    );
    wr(&bus, 0x050, CONTROL_TX_QUEUE as u32);
    manager.run_with_timeout(1000).unwrap();
    let adds: Vec<ControlMsg> = guest.control_in().into_iter().map(|(m, _)| m).collect();
    assert_eq!(
        adds,
        (0..4).map(|id| msg(id, PORT_ADD, 1)).collect::<Vec<_>>()
    );
    assert_ne!(rd(&bus, 0x060) & INTERRUPT_USED_RING, 0);
}
