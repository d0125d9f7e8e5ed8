//! Root tests of the container link: a veth pair into a namespace of the test's own,
//! traffic both ways over it, and nothing left after drop, namespace death or SIGKILL.
//! Run: flock /tmp/twinbox-itest.lock cargo test -p hostnet --test veth -- --test-threads=1

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use hostnet::{Lease, NetMode, Veth};

#[test]
fn host_and_box_reach_each_other_by_ping_and_tcp_over_the_veth() {
    require_root();
    let netns = Netns::new();
    let veth =
        Veth::create(Lease::acquire(NetMode::Link).expect("lease"), netns.pid()).expect("veth");
    let (host, boxed) = (veth.lease().host_address(), veth.lease().box_address());
    let name = veth.name().to_string();
    assert!(
        name.starts_with("tb") && name.len() <= 15,
        "host end named {name}"
    );
    let shown = run("ip", &["-o", "addr", "show", "dev", &name]);
    assert!(
        shown.contains(&format!("inet {host}/30")),
        "{name} lacks {host}/30: {shown}"
    );
    assert!(
        run("ip", &["-o", "link", "show", "dev", &name]).contains(",UP"),
        "{name} is not up"
    );
    let inside = netns.ip(&["-o", "link", "show", "eth0"]);
    assert!(
        inside.contains("eth0@"),
        "no eth0 in the box namespace: {inside}"
    );
    assert!(
        !inside.contains(",UP"),
        "the box end must stay down for init: {inside}"
    );

    netns.configure_box(boxed, host);
    assert!(ping(boxed), "host cannot ping the box at {boxed}");
    assert!(
        netns.run_inside(move || ping(host)),
        "box cannot ping the host at {host}"
    );

    // box listens, host connects
    let listener =
        netns.run_inside(move || TcpListener::bind((boxed, 0)).expect("bind in the box"));
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut stream, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).unwrap();
        stream.write_all(&buf).unwrap();
        peer
    });
    let mut client =
        TcpStream::connect_timeout(&SocketAddr::from((boxed, port)), Duration::from_secs(5))
            .expect("host → box TCP connect");
    client.write_all(b"hello").unwrap();
    let mut echoed = [0u8; 5];
    client.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"hello");
    assert_eq!(
        server.join().unwrap().ip(),
        host,
        "the box saw another source than the host end"
    );

    // host listens, box connects
    let listener = TcpListener::bind((host, 0)).expect("bind on the host end");
    let port = listener.local_addr().unwrap().port();
    let peer = netns.run_inside(move || {
        let mut stream =
            TcpStream::connect_timeout(&SocketAddr::from((host, port)), Duration::from_secs(5))
                .expect("box → host TCP connect");
        stream.write_all(b"x").unwrap();
        stream.local_addr().unwrap()
    });
    let (mut accepted, from) = listener.accept().unwrap();
    let mut byte = [0u8; 1];
    accepted.read_exact(&mut byte).unwrap();
    assert_eq!(from, peer);
    assert_eq!(from.ip(), boxed);

    drop(veth);
    assert!(!link_exists(&name), "{name} left after drop");
    assert!(!address_on_host(host), "{host} left after drop");
    let inside = std::process::Command::new("nsenter")
        .args([
            "-t",
            &netns.pid().to_string(),
            "-n",
            "ip",
            "-o",
            "link",
            "show",
            "eth0",
        ])
        .output()
        .unwrap();
    assert!(!inside.status.success(), "eth0 left in the box after drop");
}

#[test]
fn the_host_end_goes_with_the_namespace_and_a_later_drop_is_quiet() {
    require_root();
    let netns = Netns::new();
    let veth =
        Veth::create(Lease::acquire(NetMode::Link).expect("lease"), netns.pid()).expect("veth");
    let name = veth.name().to_string();
    let host = veth.lease().host_address();
    assert!(link_exists(&name));
    netns.kill();
    eventually(&format!("{name} gone after its namespace died"), || {
        !link_exists(&name)
    });
    drop(veth); // ENODEV, ignored
    assert!(!address_on_host(host), "{host} left");
}

#[test]
fn a_sigkilled_holder_leaves_no_veth_address_or_held_lock() {
    require_root();
    let netns = Netns::new();
    let pid = netns.pid();
    let holder = Holder::spawn(move || {
        let veth = Veth::create(
            Lease::acquire(NetMode::Link).map_err(|e| e.to_string())?,
            pid,
        )
        .map_err(|e| e.to_string())?;
        let index = veth.lease().index();
        std::mem::forget(veth);
        Ok(index)
    });
    let index = holder.report.clone().expect("holder made a veth");
    let name = hostnet::veth::host_interface_name(index, NetMode::Link);
    assert!(
        link_exists(&name),
        "{name} not there while its holder lives"
    );
    holder.sigkill();
    // The box's namespace dies with the run (the container's processes are killed).
    netns.kill();
    // The lock died with the holder: the same index is free again.
    assert_link_freed_after_sigkill(&name, index);
}

#[test]
fn a_process_that_is_gone_is_one_clear_error() {
    require_root();
    let netns = Netns::new();
    let pid = netns.pid();
    netns.kill();
    let error =
        Veth::create(Lease::acquire(NetMode::Link).expect("lease"), pid).expect_err("dead pid");
    let text = error.to_string();
    assert!(text.contains(&format!("no process {pid}")), "{text}");
    let name = text
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .trim_end_matches(':')
        .to_string();
    assert!(!link_exists(&name), "{name} left after a failed create");
}

#[test]
fn without_cap_net_admin_the_error_says_so() {
    require_root();
    let netns = Netns::new();
    let pid = netns.pid();
    let report = unprivileged_report(|lease| match Veth::create(lease, pid) {
        Ok(_) => Ok(0),
        Err(error) => Err(error.to_string()),
    });
    let error = report.expect_err("nobody created a veth");
    assert!(error.starts_with("--net needs CAP_NET_ADMIN"), "{error}");
}

#[test]
fn eight_concurrent_containers_get_eight_distinct_veths_and_leave_nothing() {
    require_root();
    let namespaces: Vec<Netns> = (0..8).map(|_| Netns::new()).collect();
    let setups = namespaces
        .iter()
        .map(|netns| {
            let pid = netns.pid();
            move || {
                let veth = Veth::create(
                    Lease::acquire(NetMode::Link).map_err(|e| e.to_string())?,
                    pid,
                )
                .map_err(|e| e.to_string())?;
                let index = veth.lease().index();
                std::mem::forget(veth);
                Ok(index)
            }
        })
        .collect();
    let (holders, indices) = holders_racing(setups, "containers");
    for holder in holders {
        holder.sigkill();
    }
    for netns in namespaces {
        netns.kill();
    }
    for index in indices {
        let name = hostnet::veth::host_interface_name(index, NetMode::Link);
        eventually(&format!("{name} gone"), || !link_exists(&name));
    }
    assert_no_lease_files_left();
}

#[test]
fn a_link_whose_interface_name_is_taken_on_the_host_is_skipped() {
    require_root();
    let probe = Lease::acquire(NetMode::Link).expect("lease");
    let index = probe.index();
    drop(probe);
    let foreign = hostnet::veth::host_interface_name(index, NetMode::Link);
    // A bridge: always built in, unlike the dummy driver on some kernels.
    run("ip", &["link", "add", &foreign, "type", "bridge"]);
    let lease = Lease::acquire(NetMode::Link);
    let _ = std::process::Command::new("ip")
        .args(["link", "del", &foreign])
        .output();
    let lease = lease.expect("lease beside a foreign interface");
    assert_ne!(
        lease.index(),
        index,
        "leased link {index} although {foreign} exists on the host"
    );
}
