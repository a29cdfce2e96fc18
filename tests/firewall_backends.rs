//! One battery of real-packet tests, run against every firewall backend.
//!
//! Like hickory's `zone_handler_battery`, each test is a plain function taking
//! a [`Rig`]; the `battery!` macro instantiates all of them once per backend.
//! A rig is a fresh [`Lab`] (own namespaces, own prefix, so tests run in
//! parallel) with listeners on the server, and the backend is always called
//! from a thread inside the server namespace, so `nft`/`iptables` change the
//! server's firewall and never the host's.
//!
//! Every verdict is a real TCP connect (or UDP datagram): "admitted" means the
//! handshake completed, "dropped" means it timed out (not refused: a refusal
//! would mean a missing listener, a bug in the test).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::time::Duration;

use nxknock::firewall::{
    Door, DoorBackend, Guarded, IptablesBackend, NftablesBackend, OpenDoor, Proto,
};
use nxknock::lab::{
    ATTACKER_V4, ATTACKER_V6, CLIENT_V4, CLIENT_V6, Lab, Netns, SERVER_V4, SERVER_V6, require_root,
};

const SSH: u16 = 22;
/// Never guarded in these tests; shows the guard is per service.
const WEB: u16 = 80;
/// Long enough for any handshake over a local bridge; a dropped SYN is the
/// only way to take this long.
const DROP_WAIT: Duration = Duration::from_millis(300);
/// Generous, so a slow machine never fails an "admitted" check.
const ADMIT_WAIT: Duration = Duration::from_secs(3);
/// The short door of the expiry tests.
const SHORT: Duration = Duration::from_secs(2);
const LONG: Duration = Duration::from_secs(30);

fn ssh() -> Vec<Guarded> {
    vec![Guarded {
        proto: Proto::Tcp,
        port: SSH,
    }]
}

fn door(addr: IpAddr, prefix_len: u8, proto: Proto, port: u16, open_for: Duration) -> Door {
    Door {
        addr,
        prefix_len,
        proto,
        port,
        open_for,
        single_use: false,
    }
}

fn v4(a: std::net::Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}

fn v6(a: Ipv6Addr) -> IpAddr {
    IpAddr::V6(a)
}

/// What a backend has put into a namespace's firewall, as comparable lines
/// (no counters, no set elements). Empty means nothing of ours is left.
type Footprint = fn(&Netns) -> Vec<String>;

fn nft_footprint(ns: &Netns) -> Vec<String> {
    match ns.run(&["nft", "-s", "-t", "list", "table", "inet", "nxknock"]) {
        Ok(text) => text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
        Err(e) if e.to_string().contains("No such file or directory") => Vec::new(),
        Err(e) => panic!("nft list failed: {e}"),
    }
}

fn iptables_footprint(ns: &Netns) -> Vec<String> {
    let mut lines = Vec::new();
    for tool in ["iptables", "ip6tables"] {
        let rules = ns.run(&[tool, "-w", "-S"]).unwrap();
        lines.extend(
            rules
                .lines()
                .filter(|l| l.contains("NXKNOCK"))
                .map(|l| format!("{tool}: {l}")),
        );
    }
    let sets = ns.run(&["ipset", "list", "-n"]).unwrap();
    lines.extend(
        sets.lines()
            .filter(|l| l.starts_with("nxknock"))
            .map(|l| format!("ipset: {l}")),
    );
    lines
}

/// A lab, a backend, and listeners on the server (TCP 22 and 80, both
/// families) that stay open for the whole test.
struct Rig {
    lab: Lab,
    backend: Box<dyn DoorBackend>,
    footprint: Footprint,
    _listeners: Vec<TcpListener>,
}

impl Rig {
    fn new(prefix: &str, backend: Box<dyn DoorBackend>, footprint: Footprint) -> Rig {
        let lab = Lab::new(prefix).expect("lab");
        // The whole battery relies on this: a child spawned from an entered
        // thread lives in that namespace. If it did not, the backend would
        // rewrite the *host's* firewall, so check before the first call.
        let ns_of = |out: std::process::Output| String::from_utf8(out.stdout).unwrap();
        let inside = lab.server.run(&["readlink", "/proc/self/ns/net"]).unwrap();
        let entered = lab.server.enter(|| {
            ns_of(
                std::process::Command::new("readlink")
                    .arg("/proc/self/ns/net")
                    .output()
                    .unwrap(),
            )
        });
        assert_eq!(
            entered, inside,
            "children of an entered thread must inherit its netns"
        );

        let mut listeners = Vec::new();
        for ip in [v4(SERVER_V4), v6(SERVER_V6)] {
            for port in [SSH, WEB] {
                listeners.push(
                    lab.server
                        .tcp_listen(SocketAddr::new(ip, port))
                        .expect("listen"),
                );
            }
        }
        Rig {
            lab,
            backend,
            footprint,
            _listeners: listeners,
        }
    }

    /// Runs `f` with the backend, inside the server namespace.
    fn fw<R: Send>(&self, f: impl FnOnce(&dyn DoorBackend) -> R + Send) -> R {
        let backend = &*self.backend;
        self.lab.server.enter(move || f(backend))
    }

    fn install(&self, services: &[Guarded]) {
        self.fw(|b| b.install_guard(services))
            .expect("install_guard");
    }

    fn open(&self, d: &Door) {
        self.fw(|b| b.open(d)).expect("open");
    }

    fn list(&self) -> Vec<OpenDoor> {
        self.fw(|b| b.list()).expect("list")
    }

    fn footprint(&self) -> Vec<String> {
        (self.footprint)(&self.lab.server)
    }

    /// Tries one TCP handshake from `host` (optionally from a given source
    /// address) to the server. `Ok` = admitted, `Err(())` = dropped.
    fn try_connect(
        &self,
        host: &Netns,
        src: Option<IpAddr>,
        dst: IpAddr,
        port: u16,
        wait: Duration,
    ) -> Result<(), ()> {
        let to = SocketAddr::new(dst, port);
        let res = match src {
            Some(src) => host.tcp_connect_from(src, to, wait),
            None => host.tcp_connect(to, wait),
        };
        match res {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::TimedOut => Err(()),
            Err(e) => panic!(
                "{} -> {to}: unexpected {e} (no listener? no route?)",
                host.name()
            ),
        }
    }

    #[track_caller]
    fn assert_admitted(&self, host: &Netns, src: Option<IpAddr>, dst: IpAddr, port: u16) {
        let r = self.try_connect(host, src, dst, port, ADMIT_WAIT);
        assert!(
            r.is_ok(),
            "{} ({src:?}) -> {dst} port {port}: expected admitted, was dropped",
            host.name()
        );
    }

    #[track_caller]
    fn assert_dropped(&self, host: &Netns, src: Option<IpAddr>, dst: IpAddr, port: u16) {
        let r = self.try_connect(host, src, dst, port, DROP_WAIT);
        assert!(
            r.is_err(),
            "{} ({src:?}) -> {dst} port {port}: expected dropped, was admitted",
            host.name()
        );
    }

    /// Polls until a new connection from the client is dropped; `false` if
    /// that has not happened within `bound`.
    fn wait_until_dropped(&self, dst: IpAddr, bound: Duration) -> bool {
        let start = std::time::Instant::now();
        while start.elapsed() < bound {
            if self
                .try_connect(&self.lab.client, None, dst, SSH, DROP_WAIT)
                .is_err()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

// ---------------------------------------------------------------- the battery

fn guard_drops_everyone_before_any_door(rig: &Rig) {
    let (cli, atk) = (&rig.lab.client, &rig.lab.attacker);
    // Without the guard the lab is wide open: proves the drops below are ours.
    rig.assert_admitted(cli, None, v4(SERVER_V4), SSH);
    rig.assert_admitted(cli, None, v6(SERVER_V6), SSH);
    rig.install(&ssh());
    for host in [cli, atk] {
        rig.assert_dropped(host, None, v4(SERVER_V4), SSH);
        rig.assert_dropped(host, None, v6(SERVER_V6), SSH);
    }
    // Only the guarded service is closed.
    rig.assert_admitted(atk, None, v4(SERVER_V4), WEB);
    rig.assert_admitted(atk, None, v6(SERVER_V6), WEB);
}

fn door_admits_only_its_source(rig: &Rig) {
    rig.install(&ssh());
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Tcp, SSH, LONG));
    rig.assert_admitted(&rig.lab.client, None, v4(SERVER_V4), SSH);
    rig.assert_dropped(&rig.lab.attacker, None, v4(SERVER_V4), SSH);
    // An IPv4 door does not open IPv6 for the same host.
    rig.assert_dropped(&rig.lab.client, None, v6(SERVER_V6), SSH);
}

fn door_expires_by_itself(rig: &Rig) {
    rig.install(&ssh());
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Tcp, SSH, SHORT));
    rig.assert_admitted(&rig.lab.client, None, v4(SERVER_V4), SSH);
    assert!(
        rig.wait_until_dropped(v4(SERVER_V4), SHORT * 3),
        "door still open long after {SHORT:?}"
    );
    assert_eq!(rig.list(), vec![], "an expired door is still listed");
}

fn established_connection_outlives_its_door(rig: &Rig) {
    // A listener of its own, so we accept exactly this connection; port 22
    // is only the probe for "has the door expired yet".
    const PORT: u16 = 2222;
    rig.install(&[
        Guarded {
            proto: Proto::Tcp,
            port: SSH,
        },
        Guarded {
            proto: Proto::Tcp,
            port: PORT,
        },
    ]);
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Tcp, SSH, SHORT));
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Tcp, PORT, SHORT));
    let listener = rig
        .lab
        .server
        .tcp_listen(SocketAddr::new(v4(SERVER_V4), PORT))
        .unwrap();
    let mut client = rig
        .lab
        .client
        .tcp_connect(SocketAddr::new(v4(SERVER_V4), PORT), ADMIT_WAIT)
        .unwrap();
    let (mut server, _) = listener.accept().unwrap();
    for s in [&client, &server] {
        s.set_read_timeout(Some(ADMIT_WAIT)).unwrap();
    }
    let exchange =
        |client: &mut std::net::TcpStream, server: &mut std::net::TcpStream, round: u8| {
            let mut buf = [0u8; 5];
            client.write_all(&[b'c', b'l', b'i', b'-', round]).unwrap();
            server.read_exact(&mut buf).unwrap();
            assert_eq!(buf, [b'c', b'l', b'i', b'-', round]);
            server.write_all(&[b's', b'r', b'v', b'-', round]).unwrap();
            client.read_exact(&mut buf).unwrap();
            assert_eq!(buf, [b's', b'r', b'v', b'-', round]);
        };
    exchange(&mut client, &mut server, 1);
    // Both doors were opened together; once a new connection to 22 is
    // dropped, the door to PORT is gone too. Confirm on PORT itself.
    assert!(
        rig.wait_until_dropped(v4(SERVER_V4), SHORT * 3),
        "door never expired"
    );
    rig.assert_dropped(&rig.lab.client, None, v4(SERVER_V4), PORT);
    exchange(&mut client, &mut server, 2);
}

fn close_removes_the_door_at_once(rig: &Rig) {
    rig.install(&ssh());
    let d = door(v4(CLIENT_V4), 32, Proto::Tcp, SSH, LONG);
    rig.open(&d);
    rig.assert_admitted(&rig.lab.client, None, v4(SERVER_V4), SSH);
    rig.fw(|b| b.close(&d)).expect("close");
    rig.assert_dropped(&rig.lab.client, None, v4(SERVER_V4), SSH);
    assert_eq!(rig.list(), vec![]);
    // Closing a door that is already gone (expired, closed) is not an error.
    rig.fw(|b| b.close(&d)).expect("second close");
}

fn list_reports_doors_with_time_left(rig: &Rig) {
    rig.install(&ssh());
    assert_eq!(rig.list(), vec![]);
    // Re-opening refreshes: the 5 s door becomes a 30 s door, not a second one.
    rig.open(&door(
        v4(CLIENT_V4),
        32,
        Proto::Tcp,
        SSH,
        Duration::from_secs(5),
    ));
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Tcp, SSH, LONG));
    rig.open(&door(v6(CLIENT_V6), 64, Proto::Tcp, SSH, LONG));
    rig.open(&door(
        v4(CLIENT_V4),
        32,
        Proto::Udp,
        53,
        Duration::from_secs(10),
    ));
    let mut doors = rig.list();
    doors.sort_by_key(|d| (d.addr, d.proto as u8, d.port));
    let got: Vec<_> = doors
        .iter()
        .map(|d| (d.addr, d.prefix_len, d.proto, d.port))
        .collect();
    assert_eq!(
        got,
        vec![
            (v4(CLIENT_V4), 32, Proto::Tcp, SSH),
            (v4(CLIENT_V4), 32, Proto::Udp, 53),
            (
                v6(CLIENT_V6 & Ipv6Addr::new(!0, !0, !0, !0, 0, 0, 0, 0)),
                64,
                Proto::Tcp,
                SSH
            ),
        ]
    );
    let left: Vec<_> = doors.iter().map(|d| d.expires_in).collect();
    let within =
        |d: Duration, lo: u64, hi: u64| d > Duration::from_secs(lo) && d <= Duration::from_secs(hi);
    assert!(
        within(left[0], 20, 30) && within(left[1], 5, 10) && within(left[2], 20, 30),
        "{left:?}"
    );
}

fn reopen_refreshes_the_timeout(rig: &Rig) {
    rig.install(&ssh());
    let host = door(v4(CLIENT_V4), 32, Proto::Tcp, SSH, LONG);
    let prefix = door(v6(CLIENT_V6), 64, Proto::Tcp, SSH, LONG);
    rig.open(&host);
    rig.open(&prefix);
    std::thread::sleep(Duration::from_secs(2));
    // The same door again, same timeout: the common case (a user knocks
    // twice). On kernel 6.18 a plain nft `add element` with an unchanged
    // timeout keeps the old expiry; a refresh must restart the clock.
    rig.open(&host);
    rig.open(&prefix);
    let doors = rig.list();
    assert_eq!(doors.len(), 2, "{doors:?}");
    for d in &doors {
        assert!(
            d.expires_in >= Duration::from_secs(28),
            "not refreshed: {d:?}"
        );
    }
    // Re-opening with a shorter window shortens the door, for real.
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Tcp, SSH, SHORT));
    rig.assert_admitted(&rig.lab.client, None, v4(SERVER_V4), SSH);
    assert!(
        rig.wait_until_dropped(v4(SERVER_V4), SHORT * 3),
        "door not shortened"
    );
}

fn install_guard_is_idempotent_and_keeps_doors(rig: &Rig) {
    let (cli, atk) = (&rig.lab.client, &rig.lab.attacker);
    rig.install(&ssh());
    let once = rig.footprint();
    assert!(!once.is_empty());
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Tcp, SSH, LONG));
    rig.install(&ssh());
    assert_eq!(rig.footprint(), once, "a second install changed our rules");
    // A restarted daemon must not close doors that are open.
    assert_eq!(rig.list().len(), 1);
    rig.assert_admitted(cli, None, v4(SERVER_V4), SSH);
    rig.assert_dropped(atk, None, v4(SERVER_V4), SSH);
    // Re-installing with other services moves the guard.
    rig.install(&[Guarded {
        proto: Proto::Tcp,
        port: WEB,
    }]);
    rig.assert_admitted(atk, None, v4(SERVER_V4), SSH);
    rig.assert_dropped(atk, None, v4(SERVER_V4), WEB);
}

fn operator_rules_still_decide(rig: &Rig) {
    rig.install(&ssh());
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Tcp, SSH, LONG));
    rig.assert_admitted(&rig.lab.client, None, v4(SERVER_V4), SSH);
    // The operator bans the client after nxknock installed its guard. A door
    // only lets a packet past *our* drop; it must not override this (an
    // iptables ACCEPT in our chain would, RETURN does not; an nft accept in
    // our table cannot).
    let client = CLIENT_V4.to_string();
    let ban = [
        "iptables", "-w", "-A", "INPUT", "-s", &client, "-p", "tcp", "--dport", "22", "-j", "DROP",
    ];
    rig.lab.server.run(&ban).unwrap();
    rig.assert_dropped(&rig.lab.client, None, v4(SERVER_V4), SSH);
}

/// An operator's own rules in both worlds, which uninstall must not touch.
fn add_bystanders(ns: &Netns) {
    ns.run(&["nft", "add", "table", "inet", "bystander"])
        .unwrap();
    ns.run(&[
        "nft",
        "add",
        "chain",
        "inet",
        "bystander",
        "in",
        "{ type filter hook input priority 0; policy accept; }",
    ])
    .unwrap();
    ns.run(&[
        "nft",
        "add",
        "rule",
        "inet",
        "bystander",
        "in",
        "tcp",
        "dport",
        "8080",
        "accept",
    ])
    .unwrap();
    ns.run(&["iptables", "-w", "-N", "BYSTANDER"]).unwrap();
    ns.run(&[
        "iptables",
        "-w",
        "-A",
        "BYSTANDER",
        "-p",
        "tcp",
        "--dport",
        "8080",
        "-j",
        "RETURN",
    ])
    .unwrap();
    ns.run(&[
        "iptables",
        "-w",
        "-A",
        "INPUT",
        "-s",
        "192.0.2.1",
        "-j",
        "BYSTANDER",
    ])
    .unwrap();
    ns.run(&["ipset", "create", "bystander", "hash:ip"])
        .unwrap();
}

fn bystanders(ns: &Netns) -> String {
    let nft = ns
        .run(&["nft", "-s", "list", "table", "inet", "bystander"])
        .unwrap();
    let ipt = ns.run(&["iptables", "-w", "-S"]).unwrap();
    let ipset = ns.run(&["ipset", "list", "-n"]).unwrap();
    let ipt: Vec<_> = ipt.lines().filter(|l| l.contains("BYSTANDER")).collect();
    let ipset: Vec<_> = ipset.lines().filter(|l| l.contains("bystander")).collect();
    format!("{nft}\n{ipt:?}\n{ipset:?}")
}

fn uninstall_removes_ours_and_nothing_else(rig: &Rig) {
    let srv = &rig.lab.server;
    add_bystanders(srv);
    let before = bystanders(srv);
    assert!(
        before.contains("tcp dport 8080 accept")
            && before.contains("-A INPUT -s 192.0.2.1/32 -j BYSTANDER")
    );
    rig.install(&ssh());
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Tcp, SSH, LONG));
    rig.assert_dropped(&rig.lab.attacker, None, v4(SERVER_V4), SSH);
    rig.fw(|b| b.uninstall()).expect("uninstall");
    assert_eq!(
        rig.footprint(),
        Vec::<String>::new(),
        "something of ours survived"
    );
    assert_eq!(
        bystanders(srv),
        before,
        "uninstall touched someone else's rules"
    );
    rig.assert_admitted(&rig.lab.attacker, None, v4(SERVER_V4), SSH);
    rig.assert_admitted(&rig.lab.attacker, None, v6(SERVER_V6), SSH);
    // Uninstalling what is not there is fine (and must still spare the rest).
    rig.fw(|b| b.uninstall()).expect("second uninstall");
    assert_eq!(bystanders(srv), before);
}

fn ipv6_prefix_door_admits_the_whole_64(rig: &Rig) {
    let (cli, atk) = (&rig.lab.client, &rig.lab.attacker);
    // A second client address in the same /64 (privacy addresses, other
    // machines behind the same router), and an attacker outside it. The
    // attacker's lab address ::3 shares the client's /64, so it is admitted
    // like any other neighbour and not used here.
    let cli2 = v6(Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 0x99));
    let outside = v6(Ipv6Addr::new(0x2001, 0xdb8, 0x19, 0, 0, 0, 0, 3));
    cli.add_addr(cli2, 64).unwrap();
    atk.add_addr(outside, 64).unwrap();
    rig.install(&ssh());
    rig.assert_dropped(cli, Some(cli2), v6(SERVER_V6), SSH);
    let prefix_door = door(v6(CLIENT_V6), 64, Proto::Tcp, SSH, LONG);
    rig.open(&prefix_door);
    rig.assert_admitted(cli, Some(v6(CLIENT_V6)), v6(SERVER_V6), SSH);
    rig.assert_admitted(cli, Some(cli2), v6(SERVER_V6), SSH);
    rig.assert_dropped(atk, Some(outside), v6(SERVER_V6), SSH);
    // A host door inside the open /64 coexists with it (nft interval sets
    // refuse overlaps; this is why host doors have a set of their own)...
    rig.open(&door(cli2, 128, Proto::Tcp, SSH, LONG));
    assert_eq!(rig.list().len(), 2);
    // ...and outlives it: closing the /64 leaves only ::99 admitted.
    rig.fw(|b| b.close(&prefix_door)).expect("close /64");
    rig.assert_admitted(cli, Some(cli2), v6(SERVER_V6), SSH);
    rig.assert_dropped(cli, Some(v6(CLIENT_V6)), v6(SERVER_V6), SSH);
    rig.assert_dropped(atk, Some(v6(ATTACKER_V6)), v6(SERVER_V6), SSH);
}

fn udp_guard_and_door(rig: &Rig) {
    const PORT: u16 = 5353;
    let server = rig
        .lab
        .server
        .udp_bind(SocketAddr::new(v4(SERVER_V4), PORT))
        .unwrap();
    server.set_read_timeout(Some(DROP_WAIT)).unwrap();
    let client = rig
        .lab
        .client
        .udp_bind(SocketAddr::new(v4(CLIENT_V4), 0))
        .unwrap();
    let attacker = rig
        .lab
        .attacker
        .udp_bind(SocketAddr::new(v4(ATTACKER_V4), 0))
        .unwrap();
    let to = SocketAddr::new(v4(SERVER_V4), PORT);
    // Whether one datagram from `sock` reaches the server.
    let arrives = |sock: &UdpSocket, tag: &[u8]| {
        sock.send_to(tag, to).unwrap();
        let mut buf = [0u8; 16];
        match server.recv_from(&mut buf) {
            Ok((n, _)) => {
                assert_eq!(&buf[..n], tag);
                true
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
            Err(e) => panic!("recv: {e}"),
        }
    };
    assert!(
        arrives(&client, b"before"),
        "lab broken: UDP not delivered without guard"
    );
    rig.install(&[Guarded {
        proto: Proto::Udp,
        port: PORT,
    }]);
    assert!(!arrives(&client, b"guarded"));
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Udp, PORT, LONG));
    assert!(arrives(&client, b"door"));
    assert!(!arrives(&attacker, b"attacker"));
    // A TCP door for the same port does not open UDP.
    rig.fw(|b| b.close(&door(v4(CLIENT_V4), 32, Proto::Udp, PORT, LONG)))
        .unwrap();
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Tcp, PORT, LONG));
    let fresh = rig
        .lab
        .client
        .udp_bind(SocketAddr::new(v4(CLIENT_V4), 0))
        .unwrap();
    assert!(!arrives(&fresh, b"tcp door"));
}

// ------------------------------------------------------------ instantiation

/// `battery!(module, "tag", constructor, footprint)` makes one `#[test]` per
/// battery function, each in its own lab `nx<tag>-<short>`.
macro_rules! battery {
    ($module:ident, $tag:literal, $make:expr, $footprint:expr) => {
        mod $module {
            use super::*;
            battery!(@each $tag, $make, $footprint;
                guard_drops_everyone_before_any_door "gd",
                door_admits_only_its_source "da",
                door_expires_by_itself "ex",
                established_connection_outlives_its_door "es",
                close_removes_the_door_at_once "cl",
                list_reports_doors_with_time_left "ls",
                reopen_refreshes_the_timeout "rf",
                install_guard_is_idempotent_and_keeps_doors "id",
                uninstall_removes_ours_and_nothing_else "un",
                operator_rules_still_decide "op",
                ipv6_prefix_door_admits_the_whole_64 "p6",
                udp_guard_and_door "ud",
            );
        }
    };
    (@each $tag:literal, $make:expr, $footprint:expr; $($test:ident $short:literal,)*) => {
        $(
            #[test]
            fn $test() {
                if !require_root(concat!(stringify!($test), " (", $tag, ")")) {
                    return;
                }
                let rig = Rig::new(concat!("nx", $tag, "-", $short), Box::new($make), $footprint);
                super::$test(&rig);
            }
        )*
    };
}

battery!(nftables, "nf", NftablesBackend::new(), nft_footprint);
battery!(iptables, "ip", IptablesBackend::new(), iptables_footprint);

/// An `inet nxknock` table with another layout (an older nxknock, or a hand
/// edit) cannot be kept; install_guard replaces it whole instead of failing.
#[test]
fn nftables_install_replaces_a_foreign_layout() {
    if !require_root("nftables_install_replaces_a_foreign_layout") {
        return;
    }
    let rig = Rig::new("nxnf-fl", Box::new(NftablesBackend::new()), nft_footprint);
    let old = "table inet nxknock {\n\
               \tset doors4 { type ipv4_addr . inet_service; flags timeout; }\n\
               \tchain input { type filter hook input priority 0; policy accept; }\n\
               }\n";
    let mut nft = rig.lab.server.cmd("nft");
    nft.args(["-f", "-"]).stdin(std::process::Stdio::piped());
    let mut child = nft.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(old.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    rig.install(&ssh());
    let fp = rig.footprint().join("\n");
    assert!(
        fp.contains("type ipv4_addr . inet_proto . inet_service"),
        "{fp}"
    );
    assert!(fp.contains("priority filter - 10"), "{fp}");
    rig.assert_dropped(&rig.lab.client, None, v4(SERVER_V4), SSH);
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Tcp, SSH, LONG));
    rig.assert_admitted(&rig.lab.client, None, v4(SERVER_V4), SSH);
}
