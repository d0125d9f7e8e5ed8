//! Measures the virtio-net data path without KVM: queues in real guest memory, a Unix
//! datagram socketpair as the tap, the device driven by an event manager exactly as the
//! VMM's event loop drives it. The "driver" here recycles each used buffer at once, as a
//! guest that keeps up would, and kicks after every batch. TX sends one guest frame over
//! and over; RX receives what a host thread sends as fast as it can.
//!
//! `cargo run --release -p devices --example net_throughput [frames] [frame bytes]`
//! (defaults: 200 000 frames of 1514 bytes, then of 65 000 bytes as TSO would make).

#[path = "../src/virtio/split_ring.rs"]
mod split_ring;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::virtio::net::{RX_QUEUE, TX_QUEUE, VNET_HDR_LEN};
use devices::virtio::{IrqTrigger, Net, NetBackend, VirtioDevice};
use event_manager::{EventManager, SubscriberOps};
use split_ring::Ring;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QSIZE: u16 = 256;
const RX_BUF: u64 = 0x10_0000;
const RX_BUF_LEN: u32 = 4096;
const TX_BUF: u64 = 0x80_0000;

/// Lets a datagram socket queue many large frames (the default holds ~3 of 64 KiB).
fn grow_buffers(sock: &UnixDatagram) {
    let size: libc::c_int = 8 << 20;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setsockopt reads one c_int from the pointer we pass, which lives across
        // the call; the fd is open.
        let ret = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(ret, 0, "setsockopt: {}", std::io::Error::last_os_error());
    }
}

fn report(what: &str, frames: u64, frame_len: usize, secs: f64) {
    println!(
        "{what:<4} {frame_len:>6}-byte frames: {:>9.0} frames/s {:>9.1} MB/s",
        frames as f64 / secs,
        frames as f64 * frame_len as f64 / secs / 1e6
    );
}

fn run(frames: u64, frame_len: usize) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let (ours, peer) = UnixDatagram::pair().unwrap();
    grow_buffers(&ours);
    grow_buffers(&peer);
    let backend = NetBackend::socket(OwnedFd::from(ours)).unwrap();
    let net = Net::new(backend, [0x06, 0, 0, 0, 0, 1]).unwrap();
    let features = net.avail_features();
    let net = Arc::new(Mutex::new(net));
    let mut manager: EventManager<Arc<Mutex<Net>>> = EventManager::new().unwrap();
    manager.add_subscriber(net.clone());

    let mut rx = Ring::new(0, QSIZE);
    let mut tx = Ring::new(0x1_0000, QSIZE);
    let packet_len = VNET_HDR_LEN + frame_len;
    mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(TX_BUF))
        .unwrap();
    mem.write_slice(
        &vec![0x5a; frame_len],
        GuestAddress(TX_BUF + VNET_HDR_LEN as u64),
    )
    .unwrap();
    for i in 0..QSIZE {
        rx.write_desc(
            &mem,
            i,
            RX_BUF + u64::from(i) * u64::from(RX_BUF_LEN),
            RX_BUF_LEN,
            VRING_DESC_F_WRITE,
            0,
        );
        tx.write_desc(&mem, i, TX_BUF, packet_len as u32, 0, 0);
    }
    let irq = Arc::new(IrqTrigger::new().unwrap());
    let (rx_kick, tx_kick) = {
        let mut n = net.lock().unwrap();
        n.activate(mem.clone(), features, vec![rx.queue(), tx.queue()], irq)
            .unwrap();
        (
            n.queue_events()[RX_QUEUE].try_clone().unwrap(),
            n.queue_events()[TX_QUEUE].try_clone().unwrap(),
        )
    };
    manager.run_with_timeout(0).unwrap(); // the activation event

    // TX: guest → host.
    let sink = peer.try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; packet_len + 1];
        for _ in 0..frames {
            let n = sink.recv(&mut buf).unwrap();
            assert_eq!(n, packet_len);
        }
    });
    let start = Instant::now();
    for i in 0..QSIZE {
        tx.publish(&mem, i);
    }
    tx_kick.write(1).unwrap();
    while net.lock().unwrap().counters().tx_frames < frames {
        manager.run_with_timeout(100).unwrap();
        if tx.recycle(&mem) > 0 {
            tx_kick.write(1).unwrap();
        }
    }
    drain.join().unwrap();
    report("TX", frames, frame_len, start.elapsed().as_secs_f64());

    // RX: host → guest.
    let source = peer.try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        let pkt = vec![0u8; packet_len];
        for _ in 0..frames {
            source.send(&pkt).unwrap();
        }
    });
    let start = Instant::now();
    for i in 0..QSIZE {
        rx.publish(&mem, i);
    }
    rx_kick.write(1).unwrap();
    while net.lock().unwrap().counters().rx_frames < frames {
        manager.run_with_timeout(100).unwrap();
        if rx.recycle(&mem) > 0 {
            rx_kick.write(1).unwrap();
        }
    }
    flood.join().unwrap();
    report("RX", frames, frame_len, start.elapsed().as_secs_f64());
    let c = net.lock().unwrap().counters();
    assert_eq!(
        c.tx_dropped.total() + c.rx_dropped.total() + c.rx_truncated,
        0
    );
}

fn main() {
    let frames: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let sizes: Vec<usize> = match std::env::args().nth(2).and_then(|a| a.parse().ok()) {
        Some(len) => vec![len],
        None => vec![1514, 65_000],
    };
    for len in sizes {
        assert!(
            (14..=devices::virtio::net::MAX_FRAME_LEN).contains(&len),
            "frame bytes must be 14..=65554"
        );
        run(frames, len);
    }
}
