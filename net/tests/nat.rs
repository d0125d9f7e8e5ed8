//! Root tests of `--net nat`: the `ip twinbox` table is idempotent; with it a NAT box's
//! traffic that leaves through an interface that is not a box link is masqueraded, while a
//! plain `--net` box beside it reaches only the host and no box reaches another; the host
//! ends' forwarding sysctls say the same; `remove` takes the table away. All traffic stays
//! between namespaces this test made. ip_forward is put back as it was found.
//! Run: flock /tmp/twinbox-itest.lock cargo test -p hostnet --test nat -- --test-threads=1

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use hostnet::{forwarding, nat, Lease, NetMode, Veth};
#[path = "../../tests/common/host_forwarding.rs"]
mod host_forwarding;

use host_forwarding::HostForwarding;

/// The tests change host-wide state (ip_forward, which the kernel copies to every
/// interface, and the table): one at a time, whatever --test-threads says.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The guard shared with the top-level tests writes hostnet's paths out: they must be
/// hostnet's.
#[test]
fn the_forwarding_guard_saves_what_hostnet_changes() {
    assert_eq!(host_forwarding::IP_FORWARD, nat::IP_FORWARD);
    assert_eq!(host_forwarding::FORWARDING_NOTE, nat::FORWARDING_NOTE);
    assert_eq!(host_forwarding::TABLE, nat::TABLE);
}

#[test]
fn applying_twice_gives_the_same_table_and_remove_takes_it_away() {
    require_root();
    let _serial = serial();
    let _saved = HostForwarding::save();
    // A host that routed before twinbox (no note of ours).
    std::fs::write(nat::IP_FORWARD, "1\n").unwrap();
    let _ = std::fs::remove_file(nat::FORWARDING_NOTE);
    nat::apply().expect("first apply");
    let first = HostForwarding::table().expect("table ip twinbox after apply");
    nat::apply().expect("second apply");
    let second = HostForwarding::table().expect("table ip twinbox after the second apply");
    assert_eq!(first, second, "a second apply changed the ruleset");
    for needle in [
        "type nat hook postrouting priority srcnat; policy accept;",
        "iifname \"tbn*\" oifname != \"tb*\" masquerade",
        "type filter hook forward priority filter; policy accept;",
        "iifname \"tbn*\" oifname != \"tb*\" accept",
        "iifname != \"tb*\" oifname \"tbn*\" ct state established,related accept",
        "iifname \"tb*\" drop",
        "oifname \"tb*\" drop",
    ] {
        assert!(first.contains(needle), "table lacks `{needle}`:\n{first}");
    }
    assert!(!first.contains("saddr"), "the table names a pool:\n{first}");
    assert_eq!(
        std::fs::read_to_string(nat::IP_FORWARD).unwrap().trim(),
        "1",
        "apply did not turn on ip_forward"
    );
    nat::remove().expect("remove");
    assert_eq!(
        HostForwarding::table(),
        None,
        "table ip twinbox left after remove"
    );
    assert_eq!(
        std::fs::read_to_string(nat::IP_FORWARD).unwrap(),
        "1\n",
        "remove turned off the forwarding of a host that routed before twinbox"
    );
    nat::remove().expect("remove when absent is fine");
}

/// The "outside": a namespace on a plain veth `nx<N>` (not a `tb*` name, so not a box
/// link) at 192.168.250.1/30 on the host, 192.168.250.2 inside.
struct Outside {
    netns: Netns,
    _link: DeleteOnDrop,
}

const OUTSIDE_HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 250, 1);
const OUTSIDE_PEER: Ipv4Addr = Ipv4Addr::new(192, 168, 250, 2);

impl Outside {
    fn new() -> Self {
        assert!(
            !address_on_host(OUTSIDE_HOST),
            "{OUTSIDE_HOST} is already on the host; this test needs 192.168.250.0/30 free"
        );
        let netns = Netns::new();
        let name = format!("nx{}", netns.pid() % 100_000);
        let pid = netns.pid().to_string();
        run(
            "ip",
            &[
                "link", "add", &name, "type", "veth", "peer", "name", "eth0", "netns", &pid,
            ],
        );
        let link = DeleteOnDrop(name.clone());
        run(
            "ip",
            &["addr", "add", &format!("{OUTSIDE_HOST}/30"), "dev", &name],
        );
        run("ip", &["link", "set", &name, "up"]);
        netns.ip(&["addr", "add", &format!("{OUTSIDE_PEER}/30"), "dev", "eth0"]);
        netns.ip(&["link", "set", "eth0", "up"]);
        Self { netns, _link: link }
    }
}

/// A box: a namespace with a hostnet veth of `mode`, configured the way init does it.
fn a_box(mode: NetMode) -> (Netns, Veth) {
    let netns = Netns::new();
    let veth = Veth::create(Lease::acquire(mode).expect("lease"), netns.pid()).expect("veth");
    netns.configure_box(veth.lease().box_address(), veth.lease().host_address());
    (netns, veth)
}

/// From inside `from`, a TCP connection to `to:port` within 3 s; the error if none.
fn connect_from(from: &Netns, to: Ipv4Addr, port: u16) -> Result<(), String> {
    from.run_inside(move || {
        TcpStream::connect_timeout(&SocketAddr::from((to, port)), Duration::from_secs(3))
            .and_then(|mut stream| stream.write_all(b"x"))
            .map_err(|e| e.to_string())
    })
}

/// A listener inside `netns` on `address`; its thread reports the first peer, if any
/// connects within 6 s.
fn listen_in(
    netns: &Netns,
    address: Ipv4Addr,
) -> (u16, std::thread::JoinHandle<Option<SocketAddr>>) {
    let listener = netns.run_inside(move || TcpListener::bind((address, 0)).expect("bind"));
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(6);
        while std::time::Instant::now() < deadline {
            if let Ok((mut stream, peer)) = listener.accept() {
                let mut byte = [0u8; 1];
                let _ = stream.set_nonblocking(false);
                let _ = stream.read_exact(&mut byte);
                return Some(peer);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    });
    (port, seen)
}

/// With the table installed, a NAT box reaches a server in an "outside" namespace routed
/// through the host and the server sees the host's outside address; a plain `--net` box
/// beside it gets nowhere beyond its link (its host end does not forward, and the table
/// drops it), and neither box reaches the other, while both still reach the host.
#[test]
fn only_a_nat_box_leaves_the_host_and_it_is_masqueraded() {
    require_root();
    let _serial = serial();
    let _saved = HostForwarding::save();
    let outside = Outside::new();
    // The link box first, so that apply's write of ip_forward (which the kernel copies to
    // every interface) happens with it present: apply must close it again.
    let (link_ns, link) = a_box(NetMode::Link);
    let (nat_ns, nat_link) = a_box(NetMode::Nat);
    std::fs::write(nat::IP_FORWARD, "0\n").unwrap();
    nat::apply().expect("nat apply");
    assert!(
        nat_link.name().starts_with("tbn") && !link.name().starts_with("tbn"),
        "{} {}",
        nat_link.name(),
        link.name()
    );
    let forwarding_of = |name: &str| {
        std::fs::read_to_string(forwarding::path(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    assert_eq!(forwarding_of(link.name()), "0", "the plain link forwards");
    assert_eq!(
        forwarding_of(nat_link.name()),
        "1",
        "the NAT link does not forward"
    );

    let (port, seen) = listen_in(&outside.netns, OUTSIDE_PEER);
    connect_from(&nat_ns, OUTSIDE_PEER, port).expect("NAT box → outside through the host");
    let peer = seen.join().unwrap().expect("the outside saw the NAT box");
    assert_eq!(
        peer.ip(),
        OUTSIDE_HOST,
        "the outside saw {peer}, not the masqueraded host address"
    );

    let (port, seen) = listen_in(&outside.netns, OUTSIDE_PEER);
    let error = connect_from(&link_ns, OUTSIDE_PEER, port)
        .expect_err("a plain --net box reached the outside");
    assert_eq!(
        seen.join().unwrap(),
        None,
        "the outside saw the plain box ({error})"
    );

    for (from, (to_ns, to), what) in [
        (&nat_ns, (&link_ns, &link), "NAT box → plain box"),
        (&link_ns, (&nat_ns, &nat_link), "plain box → NAT box"),
    ] {
        let (port, seen) = listen_in(to_ns, to.lease().box_address());
        let result = connect_from(from, to.lease().box_address(), port);
        assert!(result.is_err(), "{what} connected");
        assert_eq!(seen.join().unwrap(), None, "{what} got through");
    }

    for (ns, veth) in [(&link_ns, &link), (&nat_ns, &nat_link)] {
        let host = veth.lease().host_address();
        let listener = TcpListener::bind((host, 0)).expect("bind on the host end");
        let port = listener.local_addr().unwrap().port();
        connect_from(ns, host, port).expect("a box reaches the host");
    }

    drop((link, nat_link));
    nat::remove().expect("remove");
    assert_eq!(HostForwarding::table(), None);
    assert_eq!(
        std::fs::read_to_string(nat::IP_FORWARD).unwrap(),
        "0\n",
        "remove did not turn off the ip_forward that apply turned on"
    );
    assert!(
        !std::path::Path::new(nat::FORWARDING_NOTE).exists(),
        "remove left the note"
    );
}

/// Deletes a host interface the test made with `ip`.
struct DeleteOnDrop(String);

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.0])
            .output();
    }
}
