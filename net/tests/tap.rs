//! Root tests of the VM link: a tap with the host address, a frame through it with the
//! 12-byte virtio-net header, offloads, and nothing left after drop or SIGKILL; eight
//! concurrent holders get eight distinct links; a persistent tap (for a VMM that opens it
//! by name) takes such an attach, goes on drop, and after a SIGKILL with the next lease.
//! Run: flock /tmp/twinbox-itest.lock cargo test -p hostnet --test tap -- --test-threads=1

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::*;
use hostnet::tap::{offload, VNET_HDR_LEN};
use hostnet::{Lease, NetMode, PersistentTap, Tap};

#[test]
fn a_tap_has_the_host_address_is_up_takes_offloads_and_goes_on_drop() {
    require_root();
    let tap = Tap::create(Lease::acquire(NetMode::Link).expect("lease")).expect("tap");
    let name = tap.name().to_string();
    let host = tap.lease().host_address();
    assert!(
        name.starts_with("tbt") && name.len() <= 15,
        "tap named {name}"
    );
    let shown = run("ip", &["-o", "addr", "show", "dev", &name]);
    assert!(
        shown.contains(&format!("inet {host}/30")),
        "{name} lacks {host}/30: {shown}"
    );
    let link = run("ip", &["-d", "-o", "link", "show", "dev", &name]);
    assert!(link.contains(",UP"), "{name} not up: {link}");
    assert!(link.contains("tun type tap"), "{name} is not a tap: {link}");
    assert!(
        link.contains("vnet_hdr on"),
        "{name} lacks IFF_VNET_HDR: {link}"
    );
    assert!(
        !link.contains("persist on"),
        "{name} must not be persistent: {link}"
    );
    tap.set_offload(offload::CSUM | offload::TSO4 | offload::TSO6 | offload::TSO_ECN)
        .expect("TUNSETOFFLOAD with checksum and TSO");
    tap.set_offload(0).expect("TUNSETOFFLOAD off");
    let error = tap
        .set_offload(0x8000_0000)
        .expect_err("an unknown offload bit");
    assert!(
        error
            .to_string()
            .starts_with(&format!("TUNSETOFFLOAD on tap {name}")),
        "{error}"
    );
    let info = tap.link_info(false);
    assert_eq!(info.host_interface, name);
    assert_eq!(
        info.mac.as_deref(),
        Some(hostnet::format_mac(&tap.mac()).as_str())
    );
    drop(tap);
    assert!(!link_exists(&name), "{name} left after drop");
    assert!(!address_on_host(host), "{host} left after drop");
}

/// An ARP request for the host address written as the guest would (virtio-net header,
/// then the frame) gets the kernel's ARP reply back through the same fd.
#[test]
fn an_arp_request_through_the_tap_gets_the_hosts_reply() {
    require_root();
    let tap = Tap::create(Lease::acquire(NetMode::Link).expect("lease")).expect("tap");
    let (host, guest, mac) = (
        tap.lease().host_address(),
        tap.lease().box_address(),
        tap.mac(),
    );
    let mut frame = vec![0u8; VNET_HDR_LEN as usize];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&[0x08, 0x06]); // ARP
    frame.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet/IPv4, request
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&guest.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&host.octets());
    tap.file()
        .write_all(&frame)
        .expect("write a frame to the tap");

    let deadline = Instant::now() + Duration::from_secs(3);
    let mut buffer = [0u8; 2048];
    loop {
        assert!(
            Instant::now() < deadline,
            "no ARP reply for {host} came back through the tap"
        );
        let n = match tap.file().read(&mut buffer) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => panic!("read from the tap: {e}"),
        };
        let eth = &buffer[VNET_HDR_LEN as usize..n];
        // Skip the IPv6 router solicitations and the like that a new link sends.
        if eth.len() < 42 || eth[12..14] != [0x08, 0x06] || eth[20..22] != [0, 2] {
            continue;
        }
        assert_eq!(eth[0..6], mac, "reply not addressed to the guest MAC");
        assert_eq!(Ipv4Addr::new(eth[28], eth[29], eth[30], eth[31]), host);
        assert_eq!(Ipv4Addr::new(eth[38], eth[39], eth[40], eth[41]), guest);
        break;
    }
}

#[test]
fn a_sigkilled_holder_leaves_no_tap_address_or_held_lock() {
    require_root();
    let holder = Holder::spawn(|| {
        let tap = Tap::create(Lease::acquire(NetMode::Link).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        let index = tap.lease().index();
        std::mem::forget(tap);
        Ok(index)
    });
    let index = holder.report.clone().expect("holder made a tap");
    let name = hostnet::tap::tap_name(index, NetMode::Link);
    assert!(
        link_exists(&name),
        "{name} not there while its holder lives"
    );
    holder.sigkill();
    assert_link_freed_after_sigkill(&name, index);
}

#[test]
fn eight_concurrent_holders_get_eight_distinct_links_and_leave_nothing() {
    require_root();
    let setups = (0..8)
        .map(|_| {
            || {
                let tap = Tap::create(Lease::acquire(NetMode::Link).map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())?;
                let index = tap.lease().index();
                std::mem::forget(tap);
                Ok(index)
            }
        })
        .collect();
    let (holders, indices) = holders_racing(setups, "holders");
    for index in &indices {
        assert!(link_exists(&hostnet::tap::tap_name(*index, NetMode::Link)));
    }
    for holder in holders {
        holder.sigkill();
    }
    for index in indices {
        let name = hostnet::tap::tap_name(index, NetMode::Link);
        eventually(&format!("{name} gone after SIGKILL"), || {
            !link_exists(&name)
        });
    }
    assert!(
        !host_links().contains(": tbt"),
        "taps left: {}",
        host_links()
    );
    assert_no_lease_files_left();
}

#[test]
fn without_cap_net_admin_the_tap_error_says_so() {
    require_root();
    let report =
        unprivileged_report(|lease| Tap::create(lease).map(|_| 0).map_err(|e| e.to_string()));
    let error = report.expect_err("nobody created a tap");
    assert!(error.starts_with("--net needs CAP_NET_ADMIN"), "{error}");
}

/// Attach to tap `name` by name the way Firecracker does (`Tap::open_named`:
/// IFF_TAP | IFF_NO_PI | IFF_VNET_HDR on a fresh /dev/net/tun fd); the fd, or the errno.
fn attach_by_name(name: &str) -> Result<std::fs::File, std::io::Error> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq on this stack frame.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut request) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// `ip -o link show NAME` (its alias, if any, is on that line).
fn link_line(name: &str) -> String {
    run("ip", &["-o", "link", "show", name])
}

#[test]
fn a_persistent_tap_takes_an_attach_by_name_survives_it_and_goes_on_drop() {
    require_root();
    let tap = PersistentTap::create(Lease::acquire(NetMode::Nat).expect("lease")).expect("tap");
    let name = tap.name().to_owned();
    assert!(name.starts_with("tbnt"), "{name}");
    assert!(
        link_line(&name).contains(hostnet::tap::PERSISTENT_ALIAS),
        "{}",
        link_line(&name)
    );
    assert!(address_on_host(tap.lease().host_address()));
    let forwarding = std::fs::read_to_string(hostnet::forwarding::path(&name)).unwrap();
    assert_eq!(forwarding.trim(), "1", "a NAT tap must forward");
    // What Firecracker does with host_dev_name; twice, as two runs of a VMM would.
    for _ in 0..2 {
        let attached = attach_by_name(&name).expect("attach to the persistent tap by name");
        drop(attached);
        assert!(link_exists(&name), "{name} went with the VMM's fd");
    }
    let held = attach_by_name(&name).expect("attach");
    let second = attach_by_name(&name).expect_err("a second attach while one holds it");
    assert_eq!(second.raw_os_error(), Some(libc::EBUSY), "{second}");
    drop(held);
    let host = tap.lease().host_address();
    drop(tap);
    assert!(!link_exists(&name), "{name} left after drop");
    assert!(!address_on_host(host), "{host} left after drop");
    assert_no_lease_files_left();
}

/// A killed holder's persistent tap stays (nothing deletes it with the process) until
/// the next lease acquisition, which deletes it because its lease is free; a persistent
/// tap with one of our names but without our alias is not ours and stays.
#[test]
fn a_sigkilled_holders_persistent_tap_goes_with_the_next_lease_and_a_foreign_one_stays() {
    require_root();
    let holder = Holder::spawn(|| {
        let tap = PersistentTap::create(Lease::acquire(NetMode::Link).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        let index = tap.lease().index();
        std::mem::forget(tap);
        Ok(index)
    });
    let index = holder.report.clone().expect("holder made a persistent tap");
    let name = hostnet::tap::tap_name(index, NetMode::Link);
    holder.sigkill();
    assert!(
        link_exists(&name),
        "{name} went with its holder: not persistent"
    );
    // A foreign persistent tap with a name of ours, at a high index no test reaches.
    let foreign = hostnet::tap::tap_name(9999, NetMode::Link);
    run("ip", &["tuntap", "add", "dev", &foreign, "mode", "tap"]);
    let swept = {
        let lease = Lease::acquire(NetMode::Link).expect("lease after SIGKILL");
        (lease.index(), link_exists(&name))
    };
    let foreign_stayed = link_exists(&foreign);
    run("ip", &["link", "del", &foreign]);
    assert_eq!(swept, (index, false), "the dead run's tap was not swept");
    assert!(foreign_stayed, "a tap without our alias was swept");
    assert!(
        hostnet::tap::sweep_persistent().is_empty(),
        "nothing is left to sweep"
    );
    assert_no_lease_files_left();
}
