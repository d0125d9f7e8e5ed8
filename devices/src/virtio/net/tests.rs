//! virtio-net against hand-built split queues in real guest memory, with a Unix datagram
//! socketpair as the tap: one datagram = one `virtio_net_hdr_v1` + frame.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::split_ring::{Buf, Ring};
use crate::virtio::INTERRUPT_CONFIG_CHANGE;

const MEM_SIZE: usize = 0x100_0000;
/// Far outside guest memory.
const WILD: u64 = 0x1_0000_0000;
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x1_0000;
/// Guest buffers.
const BUF: u64 = 0x10_0000;
const MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];

/// What a Linux 6.1 guest acks when everything is offered.
const ALL: u64 = OFFERED_FEATURES;
/// VERSION_1 and nothing else.
const PLAIN: u64 = VIRTIO_F_VERSION_1;
const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A device over one end of a datagram socketpair; the other end plays the host.
fn device() -> (Net, UnixDatagram) {
    let (ours, peer) = UnixDatagram::pair().unwrap();
    let backend = NetBackend::socket(OwnedFd::from(ours)).unwrap();
    peer.set_nonblocking(true).unwrap();
    (Net::new(backend, MAC).unwrap(), peer)
}

/// Everything a test needs: memory, both rings, the device (active with `features`),
/// its interrupt and the host end.
struct Rig {
    mem: GuestMemoryMmap,
    rx: Ring,
    tx: Ring,
    net: Net,
    irq: Arc<IrqTrigger>,
    peer: UnixDatagram,
}

fn rig_with(mem: GuestMemoryMmap, features: u64, size: u16) -> Rig {
    let (mut net, peer) = device();
    let rx = Ring::new(RX_RING, size);
    let tx = Ring::new(TX_RING, size);
    let irq = Arc::new(IrqTrigger::new().unwrap());
    net.activate(
        mem.clone(),
        features,
        vec![rx.queue(), tx.queue()],
        irq.clone(),
    )
    .unwrap();
    Rig {
        mem,
        rx,
        tx,
        net,
        irq,
        peer,
    }
}

fn rig(features: u64) -> Rig {
    rig_with(memory(), features, 16)
}

/// A header with `flags` and `gso_type`, and `num_buffers` set to garbage the device must
/// overwrite on RX.
fn header(flags: u32, gso_type: u32) -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    h[0] = flags as u8;
    h[1] = gso_type as u8;
    h[10] = 0xaa;
    h[11] = 0xbb;
    h
}

/// Recognisable frame bytes.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn packet(hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> Vec<u8> {
    [&hdr[..], frame].concat()
}

fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// The next datagram the host end received, if any.
fn received(peer: &UnixDatagram) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; MAX_PACKET_LEN + 100];
    match peer.recv(&mut buf) {
        Ok(n) => {
            buf.truncate(n);
            Some(buf)
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(e) => panic!("recv: {e}"),
    }
}

#[test]
fn identity_features_and_config_space() {
    let (net, _peer) = device();
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    assert_eq!(net.queue_events().len(), 2);
    let f = net.avail_features();
    for bit in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature bit {bit} offered");
    }
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & VIRTIO_RING_F_EVENT_IDX, 0);
    assert_eq!(f & (1 << VIRTIO_NET_F_GUEST_UFO), 0, "UFO not offered");

    let mut config = [0xffu8; 10];
    net.read_config(0, &mut config);
    assert_eq!(&config[..6], &MAC);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "LINK_UP");
    assert_eq!(
        u16::from_le_bytes([config[8], config[9]]),
        1,
        "one queue pair"
    );
    // Byte-wise reads, reads straddling the end, reads far beyond: zeros past the end.
    let mut one = [0u8; 1];
    net.read_config(5, &mut one);
    assert_eq!(one, [MAC[5]]);
    let mut tail = [0xffu8; 4];
    net.read_config(8, &mut tail);
    assert_eq!(tail, [1, 0, 0, 0]);
    for offset in [10, 0xeff, u64::MAX] {
        let mut past = [0xffu8; 8];
        net.read_config(offset, &mut past);
        assert_eq!(past, [0; 8], "offset {offset:#x}");
    }
    // Writes are ignored.
    let mut net = net;
    net.write_config(0, &[0xff; 6]);
    net.read_config(0, &mut config);
    assert_eq!(&config[..6], &MAC);
}

#[test]
fn bad_construction_is_refused() {
    let (a, _b) = UnixDatagram::pair().unwrap();
    let backend = NetBackend::socket(OwnedFd::from(a)).unwrap();
    assert_eq!(backend.kind(), BackendKind::Socket);
    assert!(matches!(
        Net::new(backend, [0x01, 0, 0, 0, 0, 1]),
        Err(NetError::InvalidMac(m)) if m == "01:00:00:00:00:01"
    ));
    let (a, _b) = UnixDatagram::pair().unwrap();
    let backend = NetBackend::socket(OwnedFd::from(a)).unwrap();
    assert!(matches!(
        Net::new(backend, [0; 6]),
        Err(NetError::InvalidMac(_))
    ));
    // A socket is not a tap, and a regular file is neither.
    let (a, _b) = UnixDatagram::pair().unwrap();
    assert!(NetBackend::tap(OwnedFd::from(a)).is_err());
    let file = std::fs::File::open("/proc/self/status").unwrap();
    assert!(NetBackend::socket(OwnedFd::from(file)).is_err());
}

#[test]
fn offload_flags_follow_negotiation() {
    use libc::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN};
    let bit = |b: u32| 1u64 << b;
    assert_eq!(tap_offloads(PLAIN), 0);
    assert_eq!(
        tap_offloads(ALL),
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
    );
    assert_eq!(tap_offloads(bit(VIRTIO_NET_F_GUEST_CSUM)), TUN_F_CSUM);
    assert_eq!(
        tap_offloads(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO6)),
        TUN_F_CSUM | TUN_F_TSO6
    );
    // TSO without checksum offload, ECN without TSO: the kernel would refuse, so do we.
    assert_eq!(tap_offloads(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
    assert_eq!(
        tap_offloads(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_ECN)),
        TUN_F_CSUM
    );
    // HOST_* (guest → host) needs nothing on the tap.
    assert_eq!(
        tap_offloads(bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4)),
        0
    );

    let (net, _peer) = device();
    assert_eq!(net.tap_offload_flags(), 0, "inactive");
    let mut r = rig(ALL);
    assert_eq!(r.net.acked_features(), Some(ALL));
    assert_eq!(r.net.tap_offload_flags(), tap_offloads(ALL));
    r.net.reset();
    assert_eq!(r.net.tap_offload_flags(), 0);
}

#[test]
fn tx_round_trip_is_byte_exact() {
    let mut r = rig(ALL);
    let hdr = header(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0);
    let f = frame(1400, 7);
    // Header split 4 + 8, frame split 600 + 800: the device must not care.
    r.mem.write_slice(&hdr[..4], GuestAddress(BUF)).unwrap();
    r.mem
        .write_slice(&hdr[4..], GuestAddress(BUF + 0x100))
        .unwrap();
    r.mem
        .write_slice(&f[..600], GuestAddress(BUF + 0x1000))
        .unwrap();
    r.mem
        .write_slice(&f[600..], GuestAddress(BUF + 0x2000))
        .unwrap();
    let head = r.tx.add(
        &r.mem,
        &[
            (BUF, 4, false),
            (BUF + 0x100, 8, false),
            (BUF + 0x1000, 600, false),
            (BUF + 0x2000, 800, false),
        ],
    );
    // A second frame in the same batch, header and frame in one buffer.
    let f2 = frame(60, 9);
    let p2 = packet(&header(0, 0), &f2);
    r.mem.write_slice(&p2, GuestAddress(BUF + 0x3000)).unwrap();
    let head2 = r.tx.add(&r.mem, &[(BUF + 0x3000, p2.len() as u32, false)]);
    r.net.process_tx();

    assert_eq!(received(&r.peer).unwrap(), packet(&hdr, &f));
    assert_eq!(received(&r.peer).unwrap(), p2);
    assert_eq!(received(&r.peer), None);
    assert_eq!(r.tx.used_idx(&r.mem), 2);
    assert_eq!(r.tx.used(&r.mem, 0), (head, 0));
    assert_eq!(r.tx.used(&r.mem, 1), (head2, 0));
    assert_eq!(
        r.irq.eventfd().read().unwrap(),
        1,
        "one interrupt per batch"
    );
    let c = r.net.counters();
    assert_eq!((c.tx_frames, c.tx_bytes), (2, 1460));
    assert_eq!(c.tx_dropped.total(), 0);
}

#[test]
fn tx_gso_frames_pass_only_with_their_feature() {
    // All offloads negotiated: TSO4, TSO6, ECN headers are sent as they are.
    let mut r = rig(ALL);
    let f = frame(100, 1);
    let gso = [
        VIRTIO_NET_HDR_GSO_TCPV4,
        VIRTIO_NET_HDR_GSO_TCPV6,
        VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN,
    ];
    for (i, g) in gso.iter().enumerate() {
        let p = packet(&header(VIRTIO_NET_HDR_F_NEEDS_CSUM, *g), &f);
        let at = BUF + 0x1000 * i as u64;
        r.mem.write_slice(&p, GuestAddress(at)).unwrap();
        r.tx.add(&r.mem, &[(at, p.len() as u32, false)]);
    }
    r.net.process_tx();
    for g in gso {
        let got = received(&r.peer).unwrap();
        assert_eq!(u32::from(got[1]), g);
    }
    assert_eq!(r.net.counters().tx_frames, 3);

    // Nothing negotiated: each of these is refused before reaching the host.
    let mut r = rig(PLAIN);
    let refused = [
        (VIRTIO_NET_HDR_F_NEEDS_CSUM, 0),
        (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4),
        (0, VIRTIO_NET_HDR_GSO_TCPV6),
        (0, VIRTIO_NET_HDR_GSO_ECN),
        (0, VIRTIO_NET_HDR_GSO_UDP),
        (2 /* DATA_VALID: device to driver only */, 0),
    ];
    for (i, (flags, g)) in refused.iter().enumerate() {
        let p = packet(&header(*flags, *g), &f);
        let at = BUF + 0x1000 * i as u64;
        r.mem.write_slice(&p, GuestAddress(at)).unwrap();
        r.tx.add(&r.mem, &[(at, p.len() as u32, false)]);
    }
    r.net.process_tx();
    assert_eq!(received(&r.peer), None);
    assert_eq!(r.tx.used_idx(&r.mem), refused.len() as u16);
    assert_eq!(
        r.net.counters().tx_dropped.bad_offload,
        refused.len() as u64
    );
    // UDP GSO is refused even with everything else negotiated.
    let mut r = rig(ALL);
    let p = packet(
        &header(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_UDP),
        &f,
    );
    r.mem.write_slice(&p, GuestAddress(BUF)).unwrap();
    r.tx.add(&r.mem, &[(BUF, p.len() as u32, false)]);
    r.net.process_tx();
    assert_eq!(received(&r.peer), None);
    assert_eq!(r.net.counters().tx_dropped.bad_offload, 1);
}

#[test]
fn rx_round_trip_without_mergeable_buffers() {
    let mut r = rig(PLAIN);
    // Header and frame land in two buffers of one chain.
    let head =
        r.rx.add(&r.mem, &[(BUF, 12, true), (BUF + 0x1000, 2000, true)]);
    let f = frame(1000, 3);
    r.peer.send(&packet(&header(0, 0), &f)).unwrap();
    r.net.process_rx();

    assert_eq!(r.rx.used_idx(&r.mem), 1);
    assert_eq!(r.rx.used(&r.mem, 0), (head, 1012));
    let hdr = read_guest(&r.mem, BUF, 12);
    assert_eq!(&hdr[..10], &header(0, 0)[..10]);
    assert_eq!(
        u16::from_le_bytes([hdr[10], hdr[11]]),
        1,
        "num_buffers is 1"
    );
    assert_eq!(read_guest(&r.mem, BUF + 0x1000, 1000), f);
    assert_eq!(r.irq.eventfd().read().unwrap(), 1);
    let c = r.net.counters();
    assert_eq!((c.rx_frames, c.rx_bytes), (1, 1000));
    // Its only buffer is used: RX waits for the driver's next kick.
    assert_eq!(r.net.backend_interest(), EventSet::empty());
}

#[test]
fn rx_waits_for_buffers_without_polling_then_resumes() {
    let mut r = rig(PLAIN);
    assert_eq!(r.net.backend_interest(), EventSet::IN);
    let f = frame(500, 5);
    r.peer.send(&packet(&header(0, 0), &f)).unwrap();
    r.net.process_rx();
    assert_eq!(r.rx.used_idx(&r.mem), 0);
    assert_eq!(r.net.counters().rx_no_buffers, 1);
    assert_eq!(
        r.net.backend_interest(),
        EventSet::empty(),
        "no buffers: the backend is not watched"
    );
    // Calling again without buffers neither reads nor spins.
    r.net.process_rx();
    assert_eq!(r.net.counters().rx_no_buffers, 2);
    assert_eq!(r.net.counters().rx_frames, 0);

    let head = r.rx.add(&r.mem, &[(BUF, 2048, true)]);
    r.rx.add(&r.mem, &[(BUF + 0x1000, 2048, true)]);
    r.net.process_rx(); // the driver's RX kick
    assert_eq!(r.rx.used(&r.mem, 0), (head, 512));
    assert_eq!(read_guest(&r.mem, BUF + 12, 500), f);
    assert_eq!(r.rx.used_idx(&r.mem), 1);
    assert_eq!(r.net.backend_interest(), EventSet::IN, "a buffer is left");
}

#[test]
fn rx_stall_with_event_idx_asks_for_a_kick() {
    let features = PLAIN | VIRTIO_RING_F_EVENT_IDX;
    let mut r = rig(features);
    r.rx.add(&r.mem, &[(BUF, 2048, true)]);
    r.peer.send(&packet(&header(0, 0), &frame(100, 1))).unwrap();
    r.peer.send(&packet(&header(0, 0), &frame(100, 2))).unwrap();
    r.net.process_rx();
    assert_eq!(r.rx.used_idx(&r.mem), 1);
    assert_eq!(r.net.counters().rx_no_buffers, 1);
    // avail_event (after the used ring) now names the next entry we will look at, so
    // the driver's next buffer triggers a kick.
    let avail_event: u16 = r
        .mem
        .read_obj(GuestAddress(
            r.rx.used_addr() + 4 + 8 * u64::from(r.rx.size),
        ))
        .unwrap();
    assert_eq!(avail_event, 1);
    r.rx.add(&r.mem, &[(BUF + 0x1000, 2048, true)]);
    r.net.process_rx();
    assert_eq!(r.rx.used_idx(&r.mem), 2);
    assert_eq!(read_guest(&r.mem, BUF + 0x1000 + 12, 100), frame(100, 2));
}

#[test]
fn mergeable_frame_spans_several_chains() {
    let mut r = rig_with(memory(), ALL, 64);
    // 40 page-sized chains, as Linux posts them in mergeable mode (after the big frame,
    // 27 remain: still room for another 64 KiB one).
    let heads: Vec<u16> = (0..40)
        .map(|i| r.rx.add(&r.mem, &[(BUF + 0x1000 * i, 4096, true)]))
        .collect();
    let big = frame(50_000, 11);
    let gso_hdr = header(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4);
    r.peer.send(&packet(&gso_hdr, &big)).unwrap();
    let small = frame(70, 12);
    r.peer.send(&packet(&header(0, 0), &small)).unwrap();
    r.net.process_rx();

    // 50 012 bytes = 12 full pages + 852 bytes: 13 chains, then the small frame in the
    // 14th.
    assert_eq!(r.rx.used_idx(&r.mem), 14);
    for (i, &head) in heads.iter().take(12).enumerate() {
        assert_eq!(r.rx.used(&r.mem, i as u16), (head, 4096), "chain {i}");
    }
    assert_eq!(r.rx.used(&r.mem, 12), (heads[12], 50_012 - 12 * 4096));
    assert_eq!(r.rx.used(&r.mem, 13), (heads[13], 82));
    let hdr = read_guest(&r.mem, BUF, 12);
    assert_eq!(&hdr[..10], &gso_hdr[..10], "offload header passed through");
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 13, "num_buffers");
    let mut got = read_guest(&r.mem, BUF, 13 * 4096);
    got.truncate(50_012);
    assert_eq!(&got[12..], &big[..]);
    let hdr2 = read_guest(&r.mem, BUF + 13 * 0x1000, 12);
    assert_eq!(u16::from_le_bytes([hdr2[10], hdr2[11]]), 1);
    assert_eq!(read_guest(&r.mem, BUF + 13 * 0x1000 + 12, 70), small);
    assert_eq!(r.net.counters().rx_frames, 2);
    assert_eq!(r.irq.eventfd().read().unwrap(), 1);
}

#[test]
fn mergeable_rx_waits_for_room_for_a_whole_frame() {
    // GSO negotiated: until 64 KiB are posted, a frame could be up to that long.
    let mut r = rig_with(memory(), ALL, 64);
    for i in 0..10 {
        r.rx.add(&r.mem, &[(BUF + 0x1000 * i, 4096, true)]);
    }
    r.peer.send(&packet(&header(0, 0), &frame(100, 1))).unwrap();
    r.net.process_rx();
    assert_eq!(r.rx.used_idx(&r.mem), 0);
    assert_eq!(r.net.counters().rx_no_buffers, 1);
    for i in 10..17 {
        r.rx.add(&r.mem, &[(BUF + 0x1000 * i, 4096, true)]);
    }
    r.net.process_rx();
    assert_eq!(r.rx.used_idx(&r.mem), 1);
    assert_eq!(r.rx.used(&r.mem, 0), (0, 112));

    // Without GSO one MTU frame's worth is enough: two 1 KiB chains take a 1500-byte
    // frame.
    let mut r = rig(PLAIN | MRG);
    let a = r.rx.add(&r.mem, &[(BUF, 1024, true)]);
    let b = r.rx.add(&r.mem, &[(BUF + 0x1000, 1024, true)]);
    let f = frame(1500, 4);
    r.peer.send(&packet(&header(0, 0), &f)).unwrap();
    r.net.process_rx();
    assert_eq!(r.rx.used(&r.mem, 0), (a, 1024));
    assert_eq!(r.rx.used(&r.mem, 1), (b, 1512 - 1024));
    let mut got = read_guest(&r.mem, BUF + 12, 1012);
    got.extend(read_guest(&r.mem, BUF + 0x1000, 488));
    assert_eq!(got, f);

    // A ring too small to ever hold 64 KiB still receives once every entry is posted.
    let mut r = rig_with(memory(), ALL, 4);
    for i in 0..4 {
        r.rx.add(&r.mem, &[(BUF + 0x1000 * i, 2048, true)]);
    }
    r.peer
        .send(&packet(&header(0, 0), &frame(3000, 6)))
        .unwrap();
    r.net.process_rx();
    assert_eq!(r.rx.used_idx(&r.mem), 2);
    assert_eq!(r.net.counters().rx_frames, 1);
}

#[test]
fn rx_frame_too_big_for_the_buffers_is_counted_and_the_chain_reused() {
    let mut r = rig(PLAIN);
    let head = r.rx.add(&r.mem, &[(BUF, 100, true)]);
    r.peer.send(&packet(&header(0, 0), &frame(200, 1))).unwrap();
    r.peer.send(&[0u8; 5]).unwrap(); // shorter than a header
    r.peer.send(&packet(&header(0, 0), &frame(50, 2))).unwrap();
    r.net.process_rx();
    let c = r.net.counters();
    assert_eq!((c.rx_truncated, c.rx_runts, c.rx_frames), (1, 1, 1));
    assert_eq!(r.rx.used_idx(&r.mem), 1);
    assert_eq!(
        r.rx.used(&r.mem, 0),
        (head, 62),
        "the same chain took the next frame"
    );
    assert_eq!(read_guest(&r.mem, BUF + 12, 50), frame(50, 2));

    // One byte too long is caught (a tap's read says only what it copied: the device's
    // spare byte after the buffers is what tells), an exact fit is not.
    let head = r.rx.add(
        &r.mem,
        &[(BUF + 0x1000, 60, true), (BUF + 0x2000, 40, true)],
    );
    r.peer.send(&packet(&header(0, 0), &frame(89, 3))).unwrap();
    r.peer.send(&packet(&header(0, 0), &frame(88, 4))).unwrap();
    r.net.process_rx();
    let c = r.net.counters();
    assert_eq!((c.rx_truncated, c.rx_frames), (2, 2));
    assert_eq!(r.rx.used(&r.mem, 1), (head, 100));
    let mut got = read_guest(&r.mem, BUF + 0x1000 + 12, 48);
    got.extend(read_guest(&r.mem, BUF + 0x2000, 40));
    assert_eq!(got, frame(88, 4));
}

/// (what, chain, counter that must grow).
type Malformed = (&'static str, Vec<Buf>, fn(&DropCounts) -> u64);

#[test]
fn malformed_tx_chains_are_dropped_and_counted() {
    let good = packet(&header(0, 0), &frame(64, 1));
    let cases: Vec<Malformed> = vec![
        (
            "writable descriptor",
            vec![(BUF, 12, false), (BUF + 0x1000, 64, true)],
            |d| d.wrong_direction,
        ),
        ("header too short", vec![(BUF, 11, false)], |d| d.too_short),
        ("empty", vec![(BUF, 0, false)], |d| d.too_short),
        (
            "outside memory",
            vec![(BUF, 12, false), (WILD, 64, false)],
            |d| d.outside_memory,
        ),
        ("header outside memory", vec![(WILD, 76, false)], |d| {
            d.outside_memory
        }),
        (
            "straddling the end of memory",
            vec![(BUF, 12, false), (MEM_SIZE as u64 - 32, 64, false)],
            |d| d.outside_memory,
        ),
        (
            "longer than a GSO frame",
            vec![
                (BUF, 12, false),
                (BUF + 0x1000, MAX_FRAME_LEN as u32 + 1, false),
            ],
            |d| d.too_long,
        ),
        (
            // virtio-queue stops the chain before its total passes 4 GiB: what is
            // left of it has a dangling link.
            "4 GiB",
            vec![(BUF, 12, false), (BUF, u32::MAX, false)],
            |d| d.broken_link,
        ),
    ];
    for (what, chain, counter) in cases {
        let mut r = rig(ALL);
        r.mem.write_slice(&good, GuestAddress(BUF)).unwrap();
        let head = r.tx.add(&r.mem, &chain);
        // Then a good frame: the device still works.
        r.mem
            .write_slice(&good, GuestAddress(BUF + 0x8000))
            .unwrap();
        r.tx.add(&r.mem, &[(BUF + 0x8000, good.len() as u32, false)]);
        r.net.process_tx();
        assert_eq!(r.tx.used(&r.mem, 0), (head, 0), "{what}");
        let c = r.net.counters();
        assert_eq!(counter(&c.tx_dropped), 1, "{what}: counted");
        assert_eq!(c.tx_dropped.total(), 1, "{what}: counted once");
        assert_eq!(received(&r.peer).unwrap(), good, "{what}: next frame sent");
        assert_eq!(received(&r.peer), None, "{what}: nothing else sent");
        assert!(!r.net.needs_reset(), "{what}");
    }
}

#[test]
fn looping_and_dangling_chains_are_dropped() {
    let good = packet(&header(0, 0), &frame(64, 1));
    for (what, next) in [("loop to itself", 0u16), ("link past the table", 200)] {
        let mut r = rig(ALL);
        r.mem.write_slice(&good, GuestAddress(BUF)).unwrap();
        r.tx.write_desc(&r.mem, 0, BUF, good.len() as u32, VRING_DESC_F_NEXT, next);
        r.tx.publish(&r.mem, 0);
        r.tx.next_desc = 1;
        r.rx.write_desc(
            &r.mem,
            0,
            BUF + 0x4000,
            2048,
            VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
            next,
        );
        r.rx.publish(&r.mem, 0);
        r.rx.next_desc = 1;
        r.peer.send(&good).unwrap();
        r.net.process_tx();
        r.net.process_rx();
        assert_eq!(received(&r.peer), None, "{what}: nothing sent");
        let c = r.net.counters();
        assert_eq!(c.tx_dropped.broken_link, 1, "{what}");
        assert_eq!(c.rx_dropped.broken_link, 1, "{what}");
        assert_eq!(r.tx.used(&r.mem, 0), (0, 0));
        assert_eq!(r.rx.used(&r.mem, 0), (0, 0));
        // Good chains afterwards go through both ways.
        r.mem
            .write_slice(&good, GuestAddress(BUF + 0x8000))
            .unwrap();
        r.tx.add(&r.mem, &[(BUF + 0x8000, good.len() as u32, false)]);
        // Room for a whole 64 KiB frame, which mergeable RX waits for.
        let head = r.rx.add(&r.mem, &[(BUF + 0x1_0000, 0x2_0000, true)]);
        r.net.process_tx();
        r.net.process_rx();
        assert_eq!(received(&r.peer).unwrap(), good, "{what}");
        assert_eq!(r.rx.used(&r.mem, 1), (head, good.len() as u32), "{what}");
        assert!(!r.net.needs_reset());
    }
}

#[test]
fn malformed_rx_chains_are_returned_empty_and_counted() {
    let cases: Vec<Malformed> = vec![
        (
            "readable descriptor",
            vec![(BUF, 12, true), (BUF + 0x1000, 2048, false)],
            |d| d.wrong_direction,
        ),
        ("shorter than a header", vec![(BUF, 11, true)], |d| {
            d.too_short
        }),
        ("outside memory", vec![(WILD, 2048, true)], |d| {
            d.outside_memory
        }),
        (
            "straddling the end",
            vec![(MEM_SIZE as u64 - 1024, 2048, true)],
            |d| d.outside_memory,
        ),
    ];
    let f = frame(300, 8);
    for (what, chain, counter) in cases {
        for features in [PLAIN, ALL] {
            let mut r = rig(features);
            let bad = r.rx.add(&r.mem, &chain);
            let good = r.rx.add(&r.mem, &[(BUF + 0x8000, 0x1_0000, true)]);
            let good2 = r.rx.add(&r.mem, &[(BUF + 0x20000, 0x1_0000, true)]);
            r.peer.send(&packet(&header(0, 0), &f)).unwrap();
            r.net.process_rx();
            assert_eq!(r.rx.used(&r.mem, 0), (bad, 0), "{what}");
            assert_eq!(counter(&r.net.counters().rx_dropped), 1, "{what}");
            assert_eq!(r.rx.used(&r.mem, 1), (good, 312), "{what}");
            assert_eq!(read_guest(&r.mem, BUF + 0x8000 + 12, 300), f, "{what}");
            let _ = good2;
            assert!(!r.net.needs_reset(), "{what}");
        }
    }
}

/// Guest memory whose first 64 KiB at BUF are 16 separate 4 KiB regions, back to back:
/// a buffer there is contiguous for the guest but not for the host.
fn fragmented_memory() -> GuestMemoryMmap {
    let mut ranges = vec![(GuestAddress(0), BUF as usize)];
    for i in 0..16u64 {
        ranges.push((GuestAddress(BUF + 0x1000 * i), 0x1000));
    }
    ranges.push((
        GuestAddress(BUF + 0x1_0000),
        MEM_SIZE - BUF as usize - 0x1_0000,
    ));
    GuestMemoryMmap::from_ranges(&ranges).unwrap()
}

#[test]
fn buffers_across_memory_regions() {
    // TX and RX through buffers spanning 16 host mappings.
    let mut r = rig_with(fragmented_memory(), ALL, 16);
    let p = packet(&header(0, 0), &frame(0x1_0000 - 12, 2));
    r.mem.write_slice(&p, GuestAddress(BUF)).unwrap();
    r.tx.add(&r.mem, &[(BUF, p.len() as u32, false)]);
    r.net.process_tx();
    assert_eq!(received(&r.peer).unwrap(), p);

    let f = frame(30_000, 3);
    r.peer.send(&packet(&header(0, 0), &f)).unwrap();
    r.rx.add(&r.mem, &[(BUF + 0x800, 0xf000, true)]);
    r.rx.add(&r.mem, &[(BUF + 0x2_0000, 0x1_0000, true)]);
    r.net.process_rx();
    assert_eq!(r.rx.used(&r.mem, 0), (0, 30_012));
    assert_eq!(read_guest(&r.mem, BUF + 0x800 + 12, 30_000), f);
}

/// Writes an indirect table of `n` 16-byte descriptors at `table` and makes a chain of it
/// available on `ring` (virtio-queue follows indirect tables whether or not the feature
/// was negotiated, and they may be longer than the queue).
fn add_indirect(ring: &mut Ring, mem: &GuestMemoryMmap, table: u64, n: u16, write: bool) -> u16 {
    for i in 0..n {
        let at = table + 16 * u64::from(i);
        let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
        if i + 1 < n {
            flags |= VRING_DESC_F_NEXT;
        }
        mem.write_obj(BUF + 16 * u64::from(i), GuestAddress(at))
            .unwrap();
        mem.write_obj(16u32, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags as u16, GuestAddress(at + 12)).unwrap();
        mem.write_obj(i + 1, GuestAddress(at + 14)).unwrap();
    }
    let head = ring.next_desc;
    ring.write_desc(
        mem,
        head,
        table,
        16 * u32::from(n),
        VRING_DESC_F_INDIRECT,
        0,
    );
    ring.next_desc = (head + 1) % ring.size;
    ring.publish(mem, head);
    head
}

#[test]
fn chains_with_more_segments_than_one_call_takes_are_dropped() {
    let mut r = rig(ALL);
    let segments = MAX_IOVS as u16 + 1;
    let good = packet(&header(0, 0), &frame(64, 1));
    let head = add_indirect(&mut r.tx, &r.mem, 0x80_0000, segments, false);
    r.mem.write_slice(&good, GuestAddress(0x90_0000)).unwrap();
    r.tx.add(&r.mem, &[(0x90_0000, good.len() as u32, false)]);
    r.net.process_tx();
    assert_eq!(r.tx.used(&r.mem, 0), (head, 0));
    assert_eq!(r.net.counters().tx_dropped.too_many_segments, 1);
    assert_eq!(
        received(&r.peer).unwrap(),
        good,
        "the next frame still goes"
    );

    // Exactly the limit is fine: the device's header copy takes one entry, the rest of
    // the first descriptor and the others one each.
    let n = MAX_IOVS as u16 - 1;
    let fine = add_indirect(&mut r.tx, &r.mem, 0x80_0000, n, false);
    r.net.process_tx();
    assert_eq!(r.tx.used(&r.mem, 2), (fine, 0));
    assert_eq!(received(&r.peer).unwrap().len(), 16 * usize::from(n));

    let head = add_indirect(&mut r.rx, &r.mem, 0x80_0000, segments, true);
    let good = r.rx.add(&r.mem, &[(0x90_0000, 0x2_0000, true)]);
    r.peer.send(&packet(&header(0, 0), &frame(100, 2))).unwrap();
    r.net.process_rx();
    assert_eq!(r.rx.used(&r.mem, 0), (head, 0));
    assert_eq!(r.net.counters().rx_dropped.too_many_segments, 1);
    assert_eq!(r.rx.used(&r.mem, 1), (good, 112));
    assert!(!r.net.needs_reset());
}

#[test]
fn broken_queue_stops_the_device_until_reset() {
    let mut r = rig(ALL);
    // The avail index runs more than a queue ahead of the device.
    r.mem
        .write_obj(100u16, GuestAddress(r.tx.avail_addr() + 2))
        .unwrap();
    r.net.process_tx();
    assert!(r.net.needs_reset());
    assert_ne!(r.irq.status() & INTERRUPT_CONFIG_CHANGE, 0);
    assert_eq!(r.net.backend_interest(), EventSet::empty());
    // RX stays stopped too, even with buffers and a frame.
    r.rx.add(&r.mem, &[(BUF, 2048, true)]);
    r.peer.send(&packet(&header(0, 0), &frame(10, 1))).unwrap();
    r.net.process_rx();
    assert_eq!(r.rx.used_idx(&r.mem), 0);
    r.net.reset();
    assert!(!r.net.needs_reset());

    // A head index past the table cannot be returned: the used ring is unusable.
    let mut r = rig(ALL);
    r.rx.publish(&r.mem, 999);
    r.peer.send(&packet(&header(0, 0), &frame(10, 1))).unwrap();
    r.net.process_rx();
    assert!(r.net.needs_reset());
}

#[test]
fn activation_checks_the_queues() {
    let mem = memory();
    let (mut net, _peer) = device();
    let irq = Arc::new(IrqTrigger::new().unwrap());
    let rx = Ring::new(RX_RING, 16);
    assert!(matches!(
        net.activate(mem.clone(), ALL, vec![rx.queue()], irq.clone()),
        Err(ActivateError::QueueCount {
            expected: 2,
            got: 1
        })
    ));
    let bad = Ring::new(MEM_SIZE as u64 - 0x1000, 16);
    assert!(matches!(
        net.activate(mem.clone(), ALL, vec![rx.queue(), bad.queue()], irq.clone()),
        Err(ActivateError::InvalidQueue { index: 1, .. })
    ));
    let tx = Ring::new(TX_RING, 16);
    net.activate(mem.clone(), ALL, vec![rx.queue(), tx.queue()], irq.clone())
        .unwrap();
    assert!(matches!(
        net.activate(mem, ALL, vec![rx.queue(), tx.queue()], irq),
        Err(ActivateError::AlreadyActive)
    ));
}

#[test]
fn event_loop_drives_rx_tx_and_backpressure() {
    let mem = memory();
    let (net, peer) = device();
    let net = Arc::new(Mutex::new(net));
    let mut manager: EventManager<Arc<Mutex<Net>>> = EventManager::new().unwrap();
    manager.add_subscriber(net.clone());
    // Inactive: a frame waiting on the backend is not even watched.
    peer.send(&packet(&header(0, 0), &frame(10, 1))).unwrap();
    assert_eq!(manager.run_with_timeout(0).unwrap(), 0);

    let mut rx = Ring::new(RX_RING, 64);
    let mut tx = Ring::new(TX_RING, 64);
    let irq = Arc::new(IrqTrigger::new().unwrap());
    let (rx_kick, tx_kick) = {
        let mut n = net.lock().unwrap();
        n.activate(mem.clone(), ALL, vec![rx.queue(), tx.queue()], irq.clone())
            .unwrap();
        (
            n.queue_events()[RX_QUEUE].try_clone().unwrap(),
            n.queue_events()[TX_QUEUE].try_clone().unwrap(),
        )
    };
    // The activate event: queues and backend get watched; the waiting frame is readable,
    // but there are no buffers yet.
    for _ in 0..3 {
        manager.run_with_timeout(0).unwrap();
    }
    assert_eq!(net.lock().unwrap().counters().rx_no_buffers, 1);
    assert_eq!(net.lock().unwrap().backend_interest(), EventSet::empty());
    assert_eq!(manager.run_with_timeout(0).unwrap(), 0, "nothing spins");

    // The driver posts buffers and kicks: the frame arrives.
    for i in 0..40 {
        rx.add(&mem, &[(BUF + 0x1000 * i, 4096, true)]);
    }
    rx_kick.write(1).unwrap();
    manager.run_with_timeout(100).unwrap();
    assert_eq!(rx.used_idx(&mem), 1);
    assert_eq!(read_guest(&mem, BUF + 12, 10), frame(10, 1));
    assert!(irq.eventfd().read().unwrap() >= 1);

    // More frames: EPOLLIN alone brings them in.
    peer.send(&packet(&header(0, 0), &frame(20, 2))).unwrap();
    manager.run_with_timeout(100).unwrap();
    assert_eq!(rx.used_idx(&mem), 2);

    // TX until the socket is full: the rest waits for EPOLLOUT, then goes out in order.
    let big = packet(&header(0, 0), &frame(60_000, 5));
    mem.write_slice(&big, GuestAddress(BUF + 0x10_0000))
        .unwrap();
    let frames = 40u16;
    for _ in 0..frames {
        tx.add(&mem, &[(BUF + 0x10_0000, big.len() as u32, false)]);
    }
    tx_kick.write(1).unwrap();
    manager.run_with_timeout(100).unwrap();
    let full = net.lock().unwrap().counters().tx_backend_full;
    assert!(full >= 1, "the socket filled up");
    assert!(net
        .lock()
        .unwrap()
        .backend_interest()
        .contains(EventSet::OUT));
    let mut got = 0u16;
    for _ in 0..1000 {
        while let Some(p) = received(&peer) {
            assert_eq!(p.len(), big.len());
            got += 1;
        }
        if got == frames {
            break;
        }
        manager.run_with_timeout(100).unwrap();
    }
    assert_eq!(got, frames);
    assert_eq!(tx.used_idx(&mem), frames);
    let c = net.lock().unwrap().counters();
    assert_eq!(c.tx_frames, u64::from(frames));
    assert_eq!(c.tx_backend_errors, 0);
    assert!(!net
        .lock()
        .unwrap()
        .backend_interest()
        .contains(EventSet::OUT));

    // Reset: the backend is no longer watched.
    net.lock().unwrap().reset();
    manager.run_with_timeout(0).unwrap();
    peer.send(&packet(&header(0, 0), &frame(10, 1))).unwrap();
    assert_eq!(manager.run_with_timeout(0).unwrap(), 0);
}

#[test]
fn rx_header_flags_are_cleared_unless_guest_csum() {
    // DATA_VALID from the host: kept for a driver that negotiated GUEST_CSUM, cleared
    // (as the spec requires) for one that did not; num_buffers set either way.
    for (features, want_flags) in [(ALL, 2u8), (PLAIN, 0), (PLAIN | MRG, 0)] {
        let mut r = rig(features);
        r.rx.add(&r.mem, &[(BUF, 4, true), (BUF + 0x100, 0x2_0000, true)]);
        r.peer.send(&packet(&header(2, 0), &frame(40, 1))).unwrap();
        r.net.process_rx();
        assert_eq!(r.net.counters().rx_frames, 1, "{features:#x}");
        let flags: u8 = r.mem.read_obj(GuestAddress(BUF)).unwrap();
        assert_eq!(flags, want_flags, "{features:#x}");
        // The header's tail is in the second buffer: num_buffers at its bytes 6 and 7.
        let num_buffers: u16 = r.mem.read_obj(GuestAddress(BUF + 0x100 + 6)).unwrap();
        assert_eq!(num_buffers, 1, "{features:#x}");
    }
}

#[test]
fn hung_up_backend_is_no_longer_watched() {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array we own.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(ret, 0);
    // SAFETY: both fds were just created and belong to nothing else.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let net = Net::new(NetBackend::socket(ours).unwrap(), MAC).unwrap();
    let net = Arc::new(Mutex::new(net));
    let mut manager: EventManager<Arc<Mutex<Net>>> = EventManager::new().unwrap();
    manager.add_subscriber(net.clone());
    let mem = memory();
    let mut rx = Ring::new(RX_RING, 16);
    let tx = Ring::new(TX_RING, 16);
    let irq = Arc::new(IrqTrigger::new().unwrap());
    net.lock()
        .unwrap()
        .activate(mem.clone(), PLAIN, vec![rx.queue(), tx.queue()], irq)
        .unwrap();
    manager.run_with_timeout(0).unwrap();
    for i in 0..4 {
        rx.add(&mem, &[(BUF + 0x1000 * i, 2048, true)]);
    }
    let mut peer = std::fs::File::from(theirs);
    peer.write_all(&packet(&header(0, 0), &frame(30, 1)))
        .unwrap();
    drop(peer);
    for _ in 0..4 {
        manager.run_with_timeout(100).unwrap();
    }
    assert_eq!(
        rx.used_idx(&mem),
        1,
        "what was sent before the hang-up arrives"
    );
    assert_eq!(net.lock().unwrap().backend_interest(), EventSet::empty());
    assert_eq!(
        manager.run_with_timeout(0).unwrap(),
        0,
        "a hung-up backend does not spin the loop"
    );
}

#[test]
fn tap_kind_writes_with_writev_and_survives_a_refused_offload() {
    // /dev/null is a character device like a tap: writes succeed, reads say EOF, and
    // TUNSETOFFLOAD fails (ENOTTY), which must only be logged.
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .unwrap();
    let backend = NetBackend::tap(OwnedFd::from(null)).unwrap();
    assert_eq!(backend.kind(), BackendKind::Tap);
    assert!(backend.set_offload(libc::TUN_F_CSUM).is_err());
    let net = Arc::new(Mutex::new(Net::new(backend, MAC).unwrap()));
    let mut manager: EventManager<Arc<Mutex<Net>>> = EventManager::new().unwrap();
    manager.add_subscriber(net.clone());
    let mem = memory();
    let rx = Ring::new(RX_RING, 16);
    let mut tx = Ring::new(TX_RING, 16);
    let irq = Arc::new(IrqTrigger::new().unwrap());
    net.lock()
        .unwrap()
        .activate(mem.clone(), ALL, vec![rx.queue(), tx.queue()], irq)
        .unwrap();
    manager.run_with_timeout(0).unwrap(); // activation: offloads refused, logged
    let p = packet(&header(0, 0), &frame(500, 1));
    mem.write_slice(&p, GuestAddress(BUF)).unwrap();
    tx.add(&mem, &[(BUF, 12, false), (BUF + 12, 500, false)]);
    net.lock().unwrap().process_tx();
    let c = net.lock().unwrap().counters();
    assert_eq!((c.tx_frames, c.tx_bytes), (1, 500));
    assert_eq!(tx.used_idx(&mem), 1);
    assert!(!net.lock().unwrap().needs_reset());
}

/// A register of the MMIO window at [`MMIO_BASE`] on `bus`.
fn rd(bus: &crate::bus::Bus, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    assert!(bus.read(MMIO_BASE + offset, &mut data));
    u32::from_le_bytes(data)
}

fn wr(bus: &crate::bus::Bus, offset: u64, value: u32) {
    assert!(bus.write(MMIO_BASE + offset, &value.to_le_bytes()));
}

const MMIO_BASE: u64 = 0xd000_0000;

/// Linux's probe and handshake through the MMIO window, up to FEATURES_OK; returns
/// whether the device accepted `features`.
fn negotiate(bus: &crate::bus::Bus, features: u64) -> bool {
    assert_eq!(rd(bus, 0x008), TYPE_NET);
    wr(bus, 0x070, 0);
    wr(bus, 0x070, 1);
    wr(bus, 0x070, 1 | 2);
    wr(bus, 0x024, 0);
    wr(bus, 0x020, features as u32);
    wr(bus, 0x024, 1);
    wr(bus, 0x020, (features >> 32) as u32);
    wr(bus, 0x070, 1 | 2 | 8);
    rd(bus, 0x070) & 8 != 0
}

#[test]
fn driver_negotiates_and_moves_frames_through_the_mmio_transport() {
    use crate::virtio::{MmioTransport, MMIO_WINDOW_LEN};
    let mem = memory();
    let (net, peer) = device();
    let net = Arc::new(Mutex::new(net));
    let irq = Arc::new(IrqTrigger::new().unwrap());
    let transport = MmioTransport::new(mem.clone(), net.clone(), irq.clone());
    let mut bus = crate::bus::Bus::new();
    bus.insert(MMIO_BASE, MMIO_WINDOW_LEN, Arc::new(Mutex::new(transport)))
        .unwrap();
    let mut manager: EventManager<Arc<Mutex<Net>>> = EventManager::new().unwrap();
    manager.add_subscriber(net.clone());

    // Features the device does not offer (the control queue, UFO) are refused.
    for extra in [VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_UFO] {
        assert!(!negotiate(&bus, ALL | 1 << extra), "feature bit {extra}");
    }
    // What Linux 6.1 acks when all of ours are offered.
    wr(&bus, 0x014, 0);
    let low = rd(&bus, 0x010);
    wr(&bus, 0x014, 1);
    let offered = u64::from(rd(&bus, 0x010)) << 32 | u64::from(low);
    assert_eq!(offered, ALL);
    assert!(negotiate(&bus, offered));
    // The MAC, byte by byte as virtio_cread_bytes reads it; the link status.
    let mac: Vec<u8> = (0..6)
        .map(|i| {
            let mut b = [0u8; 1];
            assert!(bus.read(MMIO_BASE + 0x100 + i, &mut b));
            b[0]
        })
        .collect();
    assert_eq!(mac, MAC);
    assert_eq!(rd(&bus, 0x104) >> 16, 1, "status: LINK_UP");

    let mut rx = Ring::new(RX_RING, 64);
    let mut tx = Ring::new(TX_RING, 64);
    for (index, ring) in [&rx, &tx].into_iter().enumerate() {
        wr(&bus, 0x030, index as u32);
        assert_eq!(rd(&bus, 0x034), u32::from(QUEUE_SIZE));
        wr(&bus, 0x038, 64);
        for (reg, addr) in [
            (0x080, ring.base),
            (0x090, ring.avail_addr()),
            (0x0a0, ring.used_addr()),
        ] {
            wr(&bus, reg, addr as u32);
            wr(&bus, reg + 4, (addr >> 32) as u32);
        }
        wr(&bus, 0x044, 1);
    }
    wr(&bus, 0x070, 1 | 2 | 8 | 4);
    assert_eq!(rd(&bus, 0x070), 1 | 2 | 8 | 4);
    manager.run_with_timeout(100).unwrap(); // activation: queues and tap watched
    assert_eq!(net.lock().unwrap().acked_features(), Some(ALL));
    assert_eq!(net.lock().unwrap().tap_offload_flags(), tap_offloads(ALL));

    // RX: the driver fills its ring and kicks queue 0 through QueueNotify.
    for i in 0..64 {
        rx.add(&mem, &[(BUF + 0x1000 * i, 4096, true)]);
    }
    wr(&bus, 0x050, RX_QUEUE as u32);
    let f = frame(9000, 5);
    let gso = header(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4);
    peer.send(&packet(&gso, &f)).unwrap();
    for _ in 0..10 {
        if rx.used_idx(&mem) == 3 {
            break;
        }
        manager.run_with_timeout(100).unwrap();
    }
    assert_eq!(rx.used_idx(&mem), 3, "9012 bytes in three 4 KiB buffers");
    let mut got = read_guest(&mem, BUF, 3 * 4096);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
    got.truncate(9012);
    assert_eq!(&got[12..], &f[..]);
    assert_ne!(rd(&bus, 0x060) & INTERRUPT_USED_RING, 0);
    wr(&bus, 0x064, INTERRUPT_USED_RING);

    // TX: a TSO frame out through queue 1.
    let p = packet(&gso, &frame(20_000, 6));
    mem.write_slice(&p, GuestAddress(0x80_0000)).unwrap();
    tx.add(
        &mem,
        &[
            (0x80_0000, 12, false),
            (0x80_000c, p.len() as u32 - 12, false),
        ],
    );
    wr(&bus, 0x050, TX_QUEUE as u32);
    manager.run_with_timeout(100).unwrap();
    assert_eq!(received(&peer).unwrap(), p);
    assert_eq!(tx.used_idx(&mem), 1);

    // Reset: the device stops and lets go of the tap.
    wr(&bus, 0x070, 0);
    manager.run_with_timeout(100).unwrap();
    assert_eq!(net.lock().unwrap().backend_interest(), EventSet::empty());
    peer.send(&packet(&header(0, 0), &frame(10, 1))).unwrap();
    assert_eq!(manager.run_with_timeout(0).unwrap(), 0);
}
