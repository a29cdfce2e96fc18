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
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use nxknock::firewall::{Door, DoorBackend, FirewallError, Guarded, IptablesBackend, NftablesBackend, OpenDoor, Proto};
use nxknock::lab::{ATTACKER_V4, ATTACKER_V6, CLIENT_V4, CLIENT_V6, Lab, Netns, SERVER_V4, SERVER_V6, require_root};

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
    vec![Guarded { proto: Proto::Tcp, port: SSH }]
}

fn door(addr: IpAddr, prefix_len: u8, proto: Proto, port: u16, open_for: Duration) -> Door {
    Door { addr, prefix_len, proto, port, open_for, single_use: false }
}

/// A single-use door: the first new connection it admits consumes it.
fn once(addr: IpAddr, prefix_len: u8, proto: Proto, port: u16, open_for: Duration) -> Door {
    Door { single_use: true, ..door(addr, prefix_len, proto, port, open_for) }
}

/// The /64 of an IPv6 address, as the backends report a /64 door.
fn net64(a: Ipv6Addr) -> IpAddr {
    v6(a & Ipv6Addr::new(!0, !0, !0, !0, 0, 0, 0, 0))
}

/// One round trip over an established connection: `client` sends five
/// bytes, `server` reads them and answers with five of its own.
fn exchange(client: &mut TcpStream, server: &mut TcpStream, round: u8) {
    for s in [&*client, &*server] {
        s.set_read_timeout(Some(ADMIT_WAIT)).unwrap();
    }
    let mut buf = [0u8; 5];
    client.write_all(&[b'c', b'l', b'i', b'-', round]).unwrap();
    server.read_exact(&mut buf).unwrap();
    assert_eq!(buf, [b'c', b'l', b'i', b'-', round]);
    server.write_all(&[b's', b'r', b'v', b'-', round]).unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(buf, [b's', b'r', b'v', b'-', round]);
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
        Ok(text) => text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect(),
        Err(e) if e.to_string().contains("No such file or directory") => Vec::new(),
        Err(e) => panic!("nft list failed: {e}"),
    }
}

/// The doors as the firewall's own tool lists them (`nft list set`, `ipset
/// list`): `("addr[/len] proto port", seconds left)`, an independent view of
/// what the backend put into the kernel.
type ToolDoors = fn(&Netns) -> Vec<(String, Duration)>;

/// An nft duration as `nft list` prints it: `1m29s992ms`, `30s`, `1h`.
fn nft_duration(text: &str) -> Duration {
    let (mut total, mut num) = (0u64, String::new());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = std::mem::take(&mut num).parse().unwrap_or_else(|_| panic!("nft duration {text:?}"));
        total += match c {
            'd' => n * 86_400_000,
            'h' => n * 3_600_000,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                n
            }
            'm' => n * 60_000,
            's' => n * 1000,
            _ => panic!("nft duration {text:?}"),
        };
    }
    Duration::from_millis(total)
}

fn nft_tool_doors(ns: &Netns) -> Vec<(String, Duration)> {
    let mut doors = Vec::new();
    for set in ["doors4", "doors6", "doors6host", "once4", "once6host", "once6net"] {
        let text = ns.run(&["nft", "list", "set", "inet", "nxknock", set]).unwrap();
        let Some((_, elems)) = text.split_once("elements = {") else {
            continue;
        };
        let elems = elems.split('}').next().unwrap();
        for e in elems.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            // "198.18.0.2 . tcp . 22 timeout 30s expires 29s992ms"
            let w: Vec<&str> = e.split_whitespace().collect();
            let at = w.iter().position(|&x| x == "expires").unwrap_or_else(|| panic!("{set}: {e}"));
            doors.push((format!("{} {} {}", w[0], w[2], w[4]), nft_duration(w[at + 1])));
        }
    }
    doors
}

fn ipset_tool_doors(ns: &Netns) -> Vec<(String, Duration)> {
    let mut doors = Vec::new();
    for set in ["nxknock-doors4", "nxknock-once4", "nxknock-doors6", "nxknock-once6host", "nxknock-once6"] {
        let text = ns.run(&["ipset", "list", set]).unwrap();
        let members = text.split_once("Members:\n").map_or("", |(_, m)| m);
        for line in members.lines().filter(|l| !l.trim().is_empty()) {
            // "198.18.0.2,tcp:22 timeout 29"
            let w: Vec<&str> = line.split_whitespace().collect();
            let (addr, service) = w[0].split_once(',').unwrap();
            let (proto, port) = service.split_once(':').unwrap();
            assert_eq!(w[1], "timeout", "{set}: {line}");
            doors.push((format!("{addr} {proto} {port}"), Duration::from_secs(w[2].parse().unwrap())));
        }
    }
    doors
}

fn iptables_footprint(ns: &Netns) -> Vec<String> {
    let mut lines = Vec::new();
    for tool in ["iptables", "ip6tables"] {
        let rules = ns.run(&[tool, "-w", "-S"]).unwrap();
        lines.extend(rules.lines().filter(|l| l.contains("NXKNOCK")).map(|l| format!("{tool}: {l}")));
    }
    let sets = ns.run(&["ipset", "list", "-n"]).unwrap();
    lines.extend(sets.lines().filter(|l| l.starts_with("nxknock")).map(|l| format!("ipset: {l}")));
    lines
}

/// A lab, a backend, and listeners on the server (TCP 22 and 80, both
/// families) that stay open for the whole test.
struct Rig {
    lab: Lab,
    backend: Box<dyn DoorBackend>,
    footprint: Footprint,
    tool_doors: ToolDoors,
    _listeners: Vec<TcpListener>,
}

impl Rig {
    fn new(prefix: &str, backend: Box<dyn DoorBackend>, (footprint, tool_doors): (Footprint, ToolDoors)) -> Rig {
        let lab = Lab::new(prefix).expect("lab");
        // The whole battery relies on this: a child spawned from an entered
        // thread lives in that namespace. If it did not, the backend would
        // rewrite the *host's* firewall, so check before the first call.
        let ns_of = |out: std::process::Output| String::from_utf8(out.stdout).unwrap();
        let inside = lab.server.run(&["readlink", "/proc/self/ns/net"]).unwrap();
        let entered = lab
            .server
            .enter(|| ns_of(std::process::Command::new("readlink").arg("/proc/self/ns/net").output().unwrap()));
        assert_eq!(entered, inside, "children of an entered thread must inherit its netns");

        let mut listeners = Vec::new();
        for ip in [v4(SERVER_V4), v6(SERVER_V6)] {
            for port in [SSH, WEB] {
                listeners.push(lab.server.tcp_listen(SocketAddr::new(ip, port)).expect("listen"));
            }
        }
        Rig { lab, backend, footprint, tool_doors, _listeners: listeners }
    }

    /// Runs `f` with the backend, inside the server namespace.
    fn fw<R: Send>(&self, f: impl FnOnce(&dyn DoorBackend) -> R + Send) -> R {
        let backend = &*self.backend;
        self.lab.server.enter(move || f(backend))
    }

    fn install(&self, services: &[Guarded]) {
        self.fw(|b| b.install_guard(services)).expect("install_guard");
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

    /// The doors as `nft`/`ipset` list them, sorted.
    fn tool_doors(&self) -> Vec<(String, Duration)> {
        let mut doors = (self.tool_doors)(&self.lab.server);
        doors.sort();
        doors
    }

    /// Tries one TCP handshake from `host` (optionally from a given source
    /// address) to the server. `Ok` = admitted, `Err(())` = dropped.
    fn try_connect(&self, host: &Netns, src: Option<IpAddr>, dst: IpAddr, port: u16, wait: Duration) -> Result<(), ()> {
        let to = SocketAddr::new(dst, port);
        let res = match src {
            Some(src) => host.tcp_connect_from(src, to, wait),
            None => host.tcp_connect(to, wait),
        };
        match res {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::TimedOut => Err(()),
            Err(e) => panic!("{} -> {to}: unexpected {e} (no listener? no route?)", host.name()),
        }
    }

    #[track_caller]
    fn assert_admitted(&self, host: &Netns, src: Option<IpAddr>, dst: IpAddr, port: u16) {
        let r = self.try_connect(host, src, dst, port, ADMIT_WAIT);
        assert!(r.is_ok(), "{} ({src:?}) -> {dst} port {port}: expected admitted, was dropped", host.name());
    }

    #[track_caller]
    fn assert_dropped(&self, host: &Netns, src: Option<IpAddr>, dst: IpAddr, port: u16) {
        let r = self.try_connect(host, src, dst, port, DROP_WAIT);
        assert!(r.is_err(), "{} ({src:?}) -> {dst} port {port}: expected dropped, was admitted", host.name());
    }

    /// Polls until a new connection from the client is dropped; `false` if
    /// that has not happened within `bound`.
    fn wait_until_dropped(&self, dst: IpAddr, bound: Duration) -> bool {
        let start = std::time::Instant::now();
        while start.elapsed() < bound {
            if self.try_connect(&self.lab.client, None, dst, SSH, DROP_WAIT).is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

/// A UDP socket on the server, to see which datagrams the firewall lets in.
struct UdpProbe {
    server: UdpSocket,
    to: SocketAddr,
}

impl UdpProbe {
    fn new(rig: &Rig, port: u16) -> UdpProbe {
        let to = SocketAddr::new(v4(SERVER_V4), port);
        let server = rig.lab.server.udp_bind(to).unwrap();
        UdpProbe { server, to }
    }

    /// A new client socket, hence a new flow for conntrack.
    fn client(rig: &Rig) -> UdpSocket {
        rig.lab.client.udp_bind(SocketAddr::new(v4(CLIENT_V4), 0)).unwrap()
    }

    /// Sends `tag` from `sock`; whether it reaches the server within `wait`.
    fn delivered(&self, sock: &UdpSocket, tag: &[u8], wait: Duration) -> bool {
        sock.send_to(tag, self.to).unwrap();
        let deadline = std::time::Instant::now() + wait;
        let mut buf = [0u8; 16];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            self.server.set_read_timeout(Some(left)).unwrap();
            match self.server.recv_from(&mut buf) {
                Ok((n, _)) => {
                    assert_eq!(&buf[..n], tag, "a datagram arrived late or out of turn");
                    return true;
                }
                // Seen when the whole battery runs in parallel. signal(7):
                // a socket with a receive timeout fails with EINTR rather
                // than resuming, even without a handler, after the process
                // is stopped and continued. Wait out the rest.
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return false;
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
    }

    /// `tag` from `sock` reaches the server (waiting generously).
    fn arrives(&self, sock: &UdpSocket, tag: &[u8]) -> bool {
        self.delivered(sock, tag, ADMIT_WAIT)
    }

    /// `tag` from `sock` does not reach the server within [`DROP_WAIT`].
    fn lost(&self, sock: &UdpSocket, tag: &[u8]) -> bool {
        !self.delivered(sock, tag, DROP_WAIT)
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
    assert!(rig.wait_until_dropped(v4(SERVER_V4), SHORT * 3), "door still open long after {SHORT:?}");
    assert_eq!(rig.list(), vec![], "an expired door is still listed");
}

fn established_connection_outlives_its_door(rig: &Rig) {
    // A listener of its own, so we accept exactly this connection; port 22
    // is only the probe for "has the door expired yet".
    const PORT: u16 = 2222;
    rig.install(&[Guarded { proto: Proto::Tcp, port: SSH }, Guarded { proto: Proto::Tcp, port: PORT }]);
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Tcp, SSH, SHORT));
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Tcp, PORT, SHORT));
    let listener = rig.lab.server.tcp_listen(SocketAddr::new(v4(SERVER_V4), PORT)).unwrap();
    let mut client = rig.lab.client.tcp_connect(SocketAddr::new(v4(SERVER_V4), PORT), ADMIT_WAIT).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    exchange(&mut client, &mut server, 1);
    // Both doors were opened together; once a new connection to 22 is
    // dropped, the door to PORT is gone too. Confirm on PORT itself.
    assert!(rig.wait_until_dropped(v4(SERVER_V4), SHORT * 3), "door never expired");
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
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Tcp, SSH, Duration::from_secs(5)));
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Tcp, SSH, LONG));
    rig.open(&door(v6(CLIENT_V6), 64, Proto::Tcp, SSH, LONG));
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Udp, 53, Duration::from_secs(10)));
    let mut doors = rig.list();
    doors.sort_by_key(|d| (d.addr, d.proto as u8, d.port));
    let got: Vec<_> = doors.iter().map(|d| (d.addr, d.prefix_len, d.proto, d.port)).collect();
    assert_eq!(
        got,
        vec![
            (v4(CLIENT_V4), 32, Proto::Tcp, SSH),
            (v4(CLIENT_V4), 32, Proto::Udp, 53),
            (net64(CLIENT_V6), 64, Proto::Tcp, SSH),
        ]
    );
    let left: Vec<_> = doors.iter().map(|d| d.expires_in).collect();
    let within = |d: Duration, lo: u64, hi: u64| d > Duration::from_secs(lo) && d <= Duration::from_secs(hi);
    assert!(within(left[0], 20, 30) && within(left[1], 5, 10) && within(left[2], 20, 30), "{left:?}");
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
        assert!(d.expires_in >= Duration::from_secs(28), "not refreshed: {d:?}");
    }
    // Re-opening with a shorter window shortens the door, for real.
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Tcp, SSH, SHORT));
    rig.assert_admitted(&rig.lab.client, None, v4(SERVER_V4), SSH);
    assert!(rig.wait_until_dropped(v4(SERVER_V4), SHORT * 3), "door not shortened");
}

fn install_guard_is_idempotent_and_keeps_doors(rig: &Rig) {
    let (cli, atk) = (&rig.lab.client, &rig.lab.attacker);
    rig.install(&ssh());
    let first = rig.footprint();
    assert!(!first.is_empty());
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Tcp, SSH, LONG));
    rig.open(&once(v6(CLIENT_V6), 64, Proto::Tcp, SSH, LONG));
    rig.install(&ssh());
    assert_eq!(rig.footprint(), first, "a second install changed our rules");
    // A restarted daemon must not close doors that are open, of either kind.
    let mut kept: Vec<_> = rig.list().iter().map(|d| d.single_use).collect();
    kept.sort();
    assert_eq!(kept, vec![false, true]);
    rig.assert_admitted(cli, None, v4(SERVER_V4), SSH);
    rig.assert_dropped(atk, None, v4(SERVER_V4), SSH);
    rig.assert_admitted(cli, None, v6(SERVER_V6), SSH);
    rig.assert_dropped(cli, None, v6(SERVER_V6), SSH);
    // Re-installing with other services moves the guard.
    rig.install(&[Guarded { proto: Proto::Tcp, port: WEB }]);
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
    let ban = ["iptables", "-w", "-A", "INPUT", "-s", &client, "-p", "tcp", "--dport", "22", "-j", "DROP"];
    rig.lab.server.run(&ban).unwrap();
    rig.assert_dropped(&rig.lab.client, None, v4(SERVER_V4), SSH);
}

/// An operator's own rules in both worlds, which uninstall must not touch.
fn add_bystanders(ns: &Netns) {
    ns.run(&["nft", "add", "table", "inet", "bystander"]).unwrap();
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
    ns.run(&["nft", "add", "rule", "inet", "bystander", "in", "tcp", "dport", "8080", "accept"]).unwrap();
    ns.run(&["iptables", "-w", "-N", "BYSTANDER"]).unwrap();
    ns.run(&["iptables", "-w", "-A", "BYSTANDER", "-p", "tcp", "--dport", "8080", "-j", "RETURN"]).unwrap();
    ns.run(&["iptables", "-w", "-A", "INPUT", "-s", "192.0.2.1", "-j", "BYSTANDER"]).unwrap();
    ns.run(&["ipset", "create", "bystander", "hash:ip"]).unwrap();
}

fn bystanders(ns: &Netns) -> String {
    let nft = ns.run(&["nft", "-s", "list", "table", "inet", "bystander"]).unwrap();
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
    assert!(before.contains("tcp dport 8080 accept") && before.contains("-A INPUT -s 192.0.2.1/32 -j BYSTANDER"));
    rig.install(&ssh());
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Tcp, SSH, LONG));
    rig.open(&once(v4(CLIENT_V4), 32, Proto::Udp, 53, LONG));
    rig.open(&once(v6(CLIENT_V6), 64, Proto::Tcp, SSH, LONG));
    rig.open(&once(v6(CLIENT_V6), 128, Proto::Tcp, SSH, LONG));
    rig.assert_dropped(&rig.lab.attacker, None, v4(SERVER_V4), SSH);
    rig.fw(|b| b.uninstall()).expect("uninstall");
    assert_eq!(rig.footprint(), Vec::<String>::new(), "something of ours survived");
    assert_eq!(bystanders(srv), before, "uninstall touched someone else's rules");
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
    let probe = UdpProbe::new(rig, PORT);
    // Every check from the client uses a new socket, hence a new flow: a
    // flow that got through once is let through for good, like an
    // established connection, even if never answered.
    let client = || UdpProbe::client(rig);
    let attacker = rig.lab.attacker.udp_bind(SocketAddr::new(v4(ATTACKER_V4), 0)).unwrap();
    assert!(probe.arrives(&client(), b"before"), "lab broken: UDP not delivered without guard");
    rig.install(&[Guarded { proto: Proto::Udp, port: PORT }]);
    assert!(probe.lost(&client(), b"guarded"));
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Udp, PORT, LONG));
    assert!(probe.arrives(&client(), b"door"));
    assert!(probe.lost(&attacker, b"attacker"));
    // A TCP door for the same port does not open UDP.
    rig.fw(|b| b.close(&door(v4(CLIENT_V4), 32, Proto::Udp, PORT, LONG))).unwrap();
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Tcp, PORT, LONG));
    assert!(probe.lost(&client(), b"tcp door"));
}

/// Doors go into the kernel over netlink; the firewall's own tool must see
/// exactly them, each with the timeout it was opened for, and see them go
/// when the kernel expires them (no daemon, no backend call involved).
fn doors_show_in_the_tools_listing_and_expire_there(rig: &Rig) {
    rig.install(&ssh());
    assert_eq!(rig.tool_doors(), vec![]);
    let cli2 = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 0x99);
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Tcp, SSH, LONG));
    rig.open(&door(v6(CLIENT_V6), 64, Proto::Udp, 53, LONG));
    rig.open(&once(v6(cli2), 128, Proto::Tcp, SSH, LONG));
    rig.open(&door(v4(ATTACKER_V4), 32, Proto::Udp, 53, SHORT));
    let listed = rig.tool_doors();
    let names: Vec<&str> = listed.iter().map(|(d, _)| d.as_str()).collect();
    assert_eq!(
        names,
        vec!["198.18.0.2 tcp 22", "198.18.0.3 udp 53", "2001:db8:18::/64 udp 53", "2001:db8:18::99 tcp 22"],
        "{listed:?}"
    );
    for (d, left) in &listed {
        let window = if d.starts_with("198.18.0.3") { SHORT } else { LONG };
        assert!(*left <= window && *left + Duration::from_secs(3) > window, "{d}: {left:?} left of {window:?}");
    }
    // The short door leaves the kernel's set by itself.
    let start = std::time::Instant::now();
    while rig.tool_doors().len() == 4 {
        assert!(start.elapsed() < SHORT * 3, "the kernel kept a {SHORT:?} door: {:?}", rig.tool_doors());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(rig.tool_doors().len(), 3, "{:?}", rig.tool_doors());
    assert_eq!(rig.list().len(), 3);
}

/// Without the guard our sets do not exist: opening or closing a door is a
/// typed netlink error naming the set and the kernel's errno, not a silent
/// no-op.
fn door_without_sets_is_a_netlink_error(rig: &Rig) {
    let d = door(v4(CLIENT_V4), 32, Proto::Tcp, SSH, LONG);
    for (what, res) in [("open", rig.fw(|b| b.open(&d))), ("close", rig.fw(|b| b.close(&d)))] {
        match res {
            Err(FirewallError::Netlink { ref set, errno, .. }) if errno == libc::ENOENT && set.ends_with("doors4") => {}
            other => panic!("{what} without the guard: {other:?}"),
        }
    }
    let msg = rig.fw(|b| b.open(&d)).unwrap_err().to_string();
    assert!(msg.contains("doors4") && msg.contains("errno 2"), "{msg}");
}

// ------------------------------------------------- single-use doors (Doorman)

fn single_use_door_admits_one_connection(rig: &Rig) {
    // A listener of its own, so we accept exactly the admitted connection.
    const PORT: u16 = 2222;
    let (cli, atk) = (&rig.lab.client, &rig.lab.attacker);
    rig.install(&[Guarded { proto: Proto::Tcp, port: PORT }]);
    let listener = rig.lab.server.tcp_listen(SocketAddr::new(v4(SERVER_V4), PORT)).unwrap();
    rig.open(&once(v4(CLIENT_V4), 32, Proto::Tcp, PORT, LONG));
    // The attacker's attempt neither gets in nor spends the client's door.
    rig.assert_dropped(atk, None, v4(SERVER_V4), PORT);
    let mut client = cli
        .tcp_connect(SocketAddr::new(v4(SERVER_V4), PORT), ADMIT_WAIT)
        .expect("the first connection must be admitted");
    let (mut server, _) = listener.accept().unwrap();
    exchange(&mut client, &mut server, 1);
    // The door is spent: a second connection from the client is dropped,
    // and so is the attacker, while the first connection carries on.
    rig.assert_dropped(cli, None, v4(SERVER_V4), PORT);
    rig.assert_dropped(atk, None, v4(SERVER_V4), PORT);
    exchange(&mut client, &mut server, 2);
    assert_eq!(rig.list(), vec![], "a spent door is still listed");
    rig.assert_dropped(cli, None, v4(SERVER_V4), PORT);
    exchange(&mut client, &mut server, 3);
}

fn unused_single_use_door_expires(rig: &Rig) {
    rig.install(&ssh());
    rig.open(&once(v4(CLIENT_V4), 32, Proto::Tcp, SSH, SHORT));
    // Only the kernel's listing can show an unused door: a connection
    // would spend it. The attacker's dropped attempt must not.
    rig.assert_dropped(&rig.lab.attacker, None, v4(SERVER_V4), SSH);
    let doors = rig.list();
    assert!(doors.len() == 1 && doors[0].single_use && doors[0].expires_in <= SHORT, "{doors:?}");
    let start = std::time::Instant::now();
    while !rig.list().is_empty() {
        assert!(start.elapsed() < SHORT * 3, "single-use door still held long after {SHORT:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    rig.assert_dropped(&rig.lab.client, None, v4(SERVER_V4), SSH);
}

fn single_use_ipv6_doors(rig: &Rig) {
    let (cli, atk) = (&rig.lab.client, &rig.lab.attacker);
    let cli1 = Some(v6(CLIENT_V6));
    let cli2 = v6(Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 0x99));
    let outside = v6(Ipv6Addr::new(0x2001, 0xdb8, 0x19, 0, 0, 0, 0, 3));
    cli.add_addr(cli2, 64).unwrap();
    atk.add_addr(outside, 64).unwrap();
    rig.install(&ssh());

    // A /64 door is spent by whichever address of the /64 comes first.
    rig.open(&once(v6(CLIENT_V6), 64, Proto::Tcp, SSH, LONG));
    rig.assert_dropped(atk, Some(outside), v6(SERVER_V6), SSH);
    assert_eq!(rig.list().len(), 1, "spent by a packet from outside the /64");
    rig.assert_admitted(cli, Some(cli2), v6(SERVER_V6), SSH);
    rig.assert_dropped(cli, cli1, v6(SERVER_V6), SSH);
    rig.assert_dropped(cli, Some(cli2), v6(SERVER_V6), SSH);
    assert_eq!(rig.list(), vec![]);

    // A host door inside the /64 and a /64 door side by side: each is
    // spent by its own connection and by no other. (ipset measured: one
    // hash:net,port set holding both would never spend the /64.)
    rig.open(&once(cli2, 128, Proto::Tcp, SSH, LONG));
    rig.open(&once(v6(CLIENT_V6), 64, Proto::Tcp, SSH, LONG));
    assert_eq!(rig.list().len(), 2);
    rig.assert_admitted(cli, cli1, v6(SERVER_V6), SSH); // spends the /64
    rig.assert_dropped(cli, cli1, v6(SERVER_V6), SSH);
    let left = rig.list();
    assert!(left.len() == 1 && left[0].addr == cli2 && left[0].prefix_len == 128, "{left:?}");
    rig.assert_admitted(cli, Some(cli2), v6(SERVER_V6), SSH); // spends the host door
    rig.assert_dropped(cli, Some(cli2), v6(SERVER_V6), SSH);
    rig.assert_dropped(atk, Some(outside), v6(SERVER_V6), SSH);
    assert_eq!(rig.list(), vec![]);
}

fn list_and_close_single_use_doors(rig: &Rig) {
    rig.install(&ssh());
    let cli2 = v6(Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 0x99));
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Tcp, SSH, LONG));
    rig.open(&once(v4(CLIENT_V4), 32, Proto::Udp, 53, LONG));
    rig.open(&once(v6(CLIENT_V6), 64, Proto::Tcp, SSH, LONG));
    rig.open(&once(cli2, 128, Proto::Tcp, SSH, LONG));
    rig.open(&door(v6(CLIENT_V6), 64, Proto::Udp, 53, LONG));
    let listed = || {
        let mut doors: Vec<_> =
            rig.list().iter().map(|d| (d.addr, d.prefix_len, d.proto, d.port, d.single_use)).collect();
        doors.sort_by_key(|d| (d.0, d.1, d.2 as u8, d.3));
        doors
    };
    assert_eq!(
        listed(),
        vec![
            (v4(CLIENT_V4), 32, Proto::Tcp, SSH, false),
            (v4(CLIENT_V4), 32, Proto::Udp, 53, true),
            (net64(CLIENT_V6), 64, Proto::Tcp, SSH, true),
            (net64(CLIENT_V6), 64, Proto::Udp, 53, false),
            (cli2, 128, Proto::Tcp, SSH, true),
        ]
    );
    // Opening a door in the other mode replaces it rather than adding a
    // second one (a service switched to single-use, then back).
    rig.open(&once(v4(CLIENT_V4), 32, Proto::Tcp, SSH, LONG));
    rig.open(&door(v6(CLIENT_V6), 64, Proto::Tcp, SSH, LONG));
    assert_eq!(
        listed(),
        vec![
            (v4(CLIENT_V4), 32, Proto::Tcp, SSH, true),
            (v4(CLIENT_V4), 32, Proto::Udp, 53, true),
            (net64(CLIENT_V6), 64, Proto::Tcp, SSH, false),
            (net64(CLIENT_V6), 64, Proto::Udp, 53, false),
            (cli2, 128, Proto::Tcp, SSH, true),
        ]
    );
    // Close removes whichever kind of door is there, whatever the caller
    // believes it to be.
    for d in [
        door(v4(CLIENT_V4), 32, Proto::Tcp, SSH, LONG),
        door(v4(CLIENT_V4), 32, Proto::Udp, 53, LONG),
        once(v6(CLIENT_V6), 64, Proto::Tcp, SSH, LONG),
        once(v6(CLIENT_V6), 64, Proto::Udp, 53, LONG),
        door(cli2, 128, Proto::Tcp, SSH, LONG),
    ] {
        rig.fw(|b| b.close(&d)).expect("close");
    }
    assert_eq!(listed(), vec![]);
    rig.assert_dropped(&rig.lab.client, None, v4(SERVER_V4), SSH);
    // Shapes that cannot be single-use are refused, not silently widened.
    let err = rig.fw(|b| b.open(&once(v6(CLIENT_V6), 56, Proto::Tcp, SSH, LONG)));
    assert!(matches!(err, Err(FirewallError::Unsupported(_))), "{err:?}");
}

fn single_use_udp_flow_continues_before_any_reply(rig: &Rig) {
    // A UDP flow is admitted as a whole: the client's later datagrams, sent
    // before the server has answered, are still "new" to conntrack but
    // belong to the flow that spent the door.
    const PORT: u16 = 5353;
    let probe = UdpProbe::new(rig, PORT);
    rig.install(&[Guarded { proto: Proto::Udp, port: PORT }]);
    rig.open(&once(v4(CLIENT_V4), 32, Proto::Udp, PORT, LONG));
    let flow = UdpProbe::client(rig);
    assert!(probe.arrives(&flow, b"first"));
    assert!(probe.arrives(&flow, b"second"), "the admitted flow was cut off");
    assert!(probe.arrives(&flow, b"third"));
    // Another flow (another source port) is another connection: dropped.
    assert!(probe.lost(&UdpProbe::client(rig), b"other flow"));
    assert!(probe.arrives(&flow, b"fourth"));
}

fn stray_segment_does_not_spend_a_single_use_door(rig: &Rig) {
    const PORT: u16 = 2222;
    rig.install(&[Guarded { proto: Proto::Tcp, port: PORT }]);
    let listener = rig.lab.server.tcp_listen(SocketAddr::new(v4(SERVER_V4), PORT)).unwrap();
    let plain = door(v4(CLIENT_V4), 32, Proto::Tcp, PORT, LONG);
    rig.open(&plain);
    let mut client = rig.lab.client.tcp_connect(SocketAddr::new(v4(SERVER_V4), PORT), ADMIT_WAIT).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    exchange(&mut client, &mut server, 1);
    // The server's conntrack forgets the connection (an operator's
    // `conntrack -F`, an entry that timed out), so the client's next segment
    // is "new" to conntrack (loose pick-up), though it is no SYN.
    rig.fw(|b| b.close(&plain)).unwrap();
    rig.lab.server.run(&["conntrack", "-F"]).unwrap();
    rig.open(&once(v4(CLIENT_V4), 32, Proto::Tcp, PORT, LONG));
    client.write_all(b"stray").unwrap();
    std::thread::sleep(DROP_WAIT);
    assert_eq!(rig.list().len(), 1, "a mid-stream segment spent the single-use door");
    let _fresh = rig
        .lab
        .client
        .tcp_connect(SocketAddr::new(v4(SERVER_V4), PORT), ADMIT_WAIT)
        .expect("the door must still admit a new connection");
}

// ------------------------------------------------------------ instantiation

/// `battery!(module, "tag", constructor, (footprint, tool listing))` makes
/// one `#[test]` per battery function, each in its own lab `nx<tag>-<short>`.
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
                doors_show_in_the_tools_listing_and_expire_there "tl",
                door_without_sets_is_a_netlink_error "ne",
                single_use_door_admits_one_connection "o1",
                unused_single_use_door_expires "oe",
                single_use_ipv6_doors "o6",
                list_and_close_single_use_doors "ol",
                single_use_udp_flow_continues_before_any_reply "ou",
                stray_segment_does_not_spend_a_single_use_door "os",
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

battery!(nftables, "nf", NftablesBackend::new(), (nft_footprint, nft_tool_doors));
battery!(iptables, "ip", IptablesBackend::new(), (iptables_footprint, ipset_tool_doors));

/// An `inet nxknock` table with another layout (an older nxknock, or a hand
/// edit) cannot be kept; install_guard replaces it whole instead of failing.
#[test]
fn nftables_install_replaces_a_foreign_layout() {
    if !require_root("nftables_install_replaces_a_foreign_layout") {
        return;
    }
    let rig = Rig::new("nxnf-fl", Box::new(NftablesBackend::new()), (nft_footprint, nft_tool_doors));
    let old = "table inet nxknock {\n\
               \tset doors4 { type ipv4_addr . inet_service; flags timeout; }\n\
               \tchain input { type filter hook input priority 0; policy accept; }\n\
               }\n";
    let mut nft = rig.lab.server.cmd("nft");
    nft.args(["-f", "-"]).stdin(std::process::Stdio::piped());
    let mut child = nft.spawn().unwrap();
    child.stdin.take().unwrap().write_all(old.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    rig.install(&ssh());
    let fp = rig.footprint().join("\n");
    assert!(fp.contains("type ipv4_addr . inet_proto . inet_service"), "{fp}");
    assert!(fp.contains("priority filter - 10"), "{fp}");
    rig.assert_dropped(&rig.lab.client, None, v4(SERVER_V4), SSH);
    rig.open(&door(v4(CLIENT_V4), 32, Proto::Tcp, SSH, LONG));
    rig.assert_admitted(&rig.lab.client, None, v4(SERVER_V4), SSH);
}

/// One backend object, called from two namespaces: each door lands in the
/// namespace of the calling thread, as it did when each call spawned a tool
/// there (the netlink socket is replaced when the caller's namespace changes).
fn doors_follow_the_callers_namespace(tag: &str, backend: Box<dyn DoorBackend>, tool_doors: ToolDoors) {
    let a = Lab::new(&format!("nx{tag}-nsa")).expect("lab");
    let b = Lab::new(&format!("nx{tag}-nsb")).expect("lab");
    let backend = &*backend;
    for lab in [&a, &b] {
        lab.server.enter(|| backend.install_guard(&ssh())).expect("install");
    }
    a.server.enter(|| backend.open(&door(v4(CLIENT_V4), 32, Proto::Tcp, SSH, LONG))).expect("open in a");
    b.server.enter(|| backend.open(&door(v4(ATTACKER_V4), 32, Proto::Tcp, SSH, LONG))).expect("open in b");
    a.server.enter(|| backend.open(&door(v4(CLIENT_V4), 32, Proto::Udp, 53, LONG))).expect("open in a again");
    let names = |lab: &Lab| tool_doors(&lab.server).into_iter().map(|(d, _)| d).collect::<Vec<_>>();
    let mut in_a = names(&a);
    in_a.sort();
    assert_eq!(in_a, vec!["198.18.0.2 tcp 22", "198.18.0.2 udp 53"]);
    assert_eq!(names(&b), vec!["198.18.0.3 tcp 22"]);
}

#[test]
fn nftables_doors_follow_the_callers_namespace() {
    if !require_root("nftables_doors_follow_the_callers_namespace") {
        return;
    }
    doors_follow_the_callers_namespace("nf", Box::new(NftablesBackend::new()), nft_tool_doors);
}

#[test]
fn iptables_doors_follow_the_callers_namespace() {
    if !require_root("iptables_doors_follow_the_callers_namespace") {
        return;
    }
    doors_follow_the_callers_namespace("ip", Box::new(IptablesBackend::new()), ipset_tool_doors);
}
