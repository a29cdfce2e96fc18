//! The namespace harness itself: the firewall battery is only as trustworthy
//! as the lab it runs in, and a lab that leaks namespaces would slowly litter
//! the machine.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use nxknock::lab::{CLIENT_V4, Lab, Netns, SERVER_V4, SERVER_V6, require_root};

const WAIT: Duration = Duration::from_secs(3);

fn exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

#[test]
fn lab_vanishes_on_drop_even_when_a_test_panics() {
    if !require_root("lab_vanishes_on_drop_even_when_a_test_panics") {
        return;
    }
    let result = std::panic::catch_unwind(|| {
        let lab = Lab::new("nxlab-pn").unwrap();
        assert!(exists(lab.server.name()) && exists(lab.bridge().name()));
        panic!("a failing test");
    });
    assert!(result.is_err());
    for suffix in ["srv", "cli", "atk", "br"] {
        assert!(!exists(&format!("nxlab-pn-{suffix}")), "{suffix} left behind");
    }
}

#[test]
fn leftover_namespace_is_replaced() {
    if !require_root("leftover_namespace_is_replaced") {
        return;
    }
    // A killed test run leaves its namespace behind; the next run must cope.
    let first = Netns::new("nxlab-lo").unwrap();
    first.run(&["ip", "link", "add", "marker", "type", "veth", "peer", "name", "marker2"]).unwrap();
    std::mem::forget(first);
    let second = Netns::new("nxlab-lo").unwrap();
    let links = second.run(&["ip", "-o", "link"]).unwrap();
    assert!(!links.contains("marker"), "old namespace reused: {links}");
    drop(second);
    assert!(!exists("nxlab-lo"));
}

#[test]
fn hosts_reach_each_other_and_entered_threads_stay_inside() {
    if !require_root("hosts_reach_each_other_and_entered_threads_stay_inside") {
        return;
    }
    let mut lab = Lab::new("nxlab-rt").unwrap();
    // Both families, server <- client.
    let l4 = lab.server.tcp_listen(SocketAddr::new(SERVER_V4.into(), 7)).unwrap();
    let l6 = lab.server.tcp_listen(SocketAddr::new(SERVER_V6.into(), 7)).unwrap();
    lab.client.tcp_connect(l4.local_addr().unwrap(), WAIT).unwrap();
    lab.client.tcp_connect(l6.local_addr().unwrap(), WAIT).unwrap();
    let (_, peer) = l4.accept().unwrap();
    assert_eq!(peer.ip(), IpAddr::from(CLIENT_V4));

    // The listener lives in the server namespace, not the caller's: the
    // lab address is not even configured here.
    assert!(std::net::TcpListener::bind(SocketAddr::new(SERVER_V4.into(), 7)).is_err());

    // An added host, and an extra address from another subnet, are reachable
    // over the shared link.
    let resolver = lab
        .add_host("res", Ipv4Addr::new(198, 18, 0, 53), Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 0x53))
        .unwrap();
    let udp = resolver.udp_bind("198.18.0.53:53".parse().unwrap()).unwrap();
    udp.set_read_timeout(Some(WAIT)).unwrap();
    let far: IpAddr = "198.19.7.7".parse().unwrap();
    lab.client.add_addr(far, 24).unwrap();
    let sender = lab.client.udp_bind(SocketAddr::new(far, 0)).unwrap();
    sender.send_to(b"q", "198.18.0.53:53").unwrap();
    let mut buf = [0u8; 4];
    let (n, from) = udp.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from.ip()), (&b"q"[..], far));
    assert!(lab.host("res").is_some() && lab.host("cli").is_some() && lab.host("nope").is_none());
    assert!(lab.add_host("res", Ipv4Addr::new(198, 18, 0, 54), Ipv6Addr::LOCALHOST).is_err());
}
