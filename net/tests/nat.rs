//! Root tests of `--net nat`: the `ip twinbox` table is idempotent, it masquerades a box's
//! traffic that leaves through an interface that is not a box link, and `remove` takes it
//! away. All traffic stays between namespaces this test made. ip_forward is put back as
//! it was found.
//! Run: flock /tmp/twinbox-itest.lock cargo test -p hostnet --test nat -- --test-threads=1

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use hostnet::{nat, Lease, Pool, Veth};

/// Puts ip_forward back and removes the table, whatever the test did.
struct Restore {
    ip_forward: String,
}

impl Restore {
    fn new() -> Self {
        Self {
            ip_forward: std::fs::read_to_string(nat::IP_FORWARD).expect("read ip_forward"),
        }
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = nat::remove();
        let _ = std::fs::write(nat::IP_FORWARD, self.ip_forward.as_bytes());
    }
}

fn list_table() -> Option<String> {
    let output = std::process::Command::new("nft")
        .args(["list", "table", "ip", nat::TABLE])
        .output()
        .expect("nft (Debian package nftables) is needed by this test");
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

#[test]
fn applying_twice_gives_the_same_table_and_remove_takes_it_away() {
    require_root();
    let _restore = Restore::new();
    let pool: Pool = "10.201.0.0/16".parse().unwrap();
    nat::apply(&pool).expect("first apply");
    let first = list_table().expect("table ip twinbox after apply");
    nat::apply(&pool).expect("second apply");
    let second = list_table().expect("table ip twinbox after the second apply");
    assert_eq!(first, second, "a second apply changed the ruleset");
    for needle in [
        "type nat hook postrouting priority srcnat; policy accept;",
        "ip saddr 10.201.0.0/16 oifname != \"tb*\" masquerade",
        "type filter hook forward priority filter; policy accept;",
        "iifname \"tb*\" accept",
        "oifname \"tb*\" accept",
    ] {
        assert!(first.contains(needle), "table lacks `{needle}`:\n{first}");
    }
    assert_eq!(
        std::fs::read_to_string(nat::IP_FORWARD).unwrap().trim(),
        "1",
        "apply did not turn on ip_forward"
    );
    nat::remove().expect("remove");
    assert_eq!(list_table(), None, "table ip twinbox left after remove");
    nat::remove().expect("remove when absent is fine");
}

/// A box connects to a server in an "outside" namespace routed through the host: with the
/// table, the server sees the host's outside address, not the box's pool address.
#[test]
fn a_box_reaching_beyond_the_host_is_masqueraded() {
    require_root();
    let _restore = Restore::new();
    let (outside_host, outside_peer) = (
        Ipv4Addr::new(192, 168, 250, 1),
        Ipv4Addr::new(192, 168, 250, 2),
    );
    assert!(
        !address_on_host(outside_host),
        "{outside_host} is already on the host; this test needs 192.168.250.0/30 free"
    );
    // The outside world: a namespace on a plain veth (not named tb*, so not a box link).
    let outside = Netns::new();
    let outside_name = format!("nx{}", outside.pid() % 100_000);
    run(
        "ip",
        &[
            "link",
            "add",
            &outside_name,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &outside.pid().to_string(),
        ],
    );
    let _outside_link = DeleteOnDrop(outside_name.clone());
    run(
        "ip",
        &[
            "addr",
            "add",
            &format!("{outside_host}/30"),
            "dev",
            &outside_name,
        ],
    );
    run("ip", &["link", "set", &outside_name, "up"]);
    outside.ip(&["addr", "add", &format!("{outside_peer}/30"), "dev", "eth0"]);
    outside.ip(&["link", "set", "eth0", "up"]);

    let boxns = Netns::new();
    let veth = Veth::create(Lease::acquire().expect("lease"), boxns.pid()).expect("veth");
    let (host, boxed) = (veth.lease().host_address(), veth.lease().box_address());
    boxns.configure_box(boxed, host);
    nat::apply(&veth.lease().pool()).expect("nat apply");

    let listener =
        outside.run_inside(move || TcpListener::bind((outside_peer, 0)).expect("bind outside"));
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut stream, peer) = listener.accept().unwrap();
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).unwrap();
        peer
    });
    boxns.run_inside(move || {
        let mut stream = TcpStream::connect_timeout(
            &SocketAddr::from((outside_peer, port)),
            Duration::from_secs(5),
        )
        .expect("box → outside TCP connect through the host");
        stream.write_all(b"x").unwrap();
    });
    let seen = server.join().unwrap();
    assert_eq!(
        seen.ip(),
        outside_host,
        "the outside saw {seen}, not the masqueraded host address"
    );

    drop(veth);
    nat::remove().expect("remove");
    assert_eq!(list_table(), None);
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
