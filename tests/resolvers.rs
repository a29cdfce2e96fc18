//! Knocks through real recursive resolvers (unbound), with their habits: QNAME
//! minimisation, 0x20 case randomisation, ECS, retries, TCP upstream, negative
//! caching. The client can reach only the resolver; the server sees only the
//! resolver's address. Every test ends in real TCP connections.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;

fn out_text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

/// Wait (bounded) until the daemon log holds `n` copies of `needle`.
fn wait_count(s: &Setup, needle: &str, n: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if count(&s.daemon.log_text(), needle) >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Lab with a resolver host (198.18.0.4) running unbound; client DNS only via it.
fn resolver_setup(prefix: &str, open_seconds: u64, uo: &UnboundOpts) -> (Setup, Unbound) {
    let mut s = Setup::new(prefix, "nftables", open_seconds);
    s.lab.add_host("res", RESOLVER.parse().unwrap(), "2001:db8:18::4".parse().unwrap()).unwrap();
    let u = s.unbound("res", RESOLVER, uo);
    block_direct_dns(&s.lab.client);
    (s, u)
}

fn resolver_ns(s: &Setup) -> &Netns {
    s.lab.host("res").unwrap()
}

fn bound_through_resolver(prefix: &str, uo: UnboundOpts) {
    let (s, _u) = resolver_setup(prefix, 2, &uo);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("alice", &[]);
    // The client really cannot reach the server's DNS itself.
    let d = dig(&s.lab.client, &[&format!("@{SERVER}"), "+time=1", "+tries=1", &format!("ns1.{ZONE}")]);
    assert_eq!(d.status, "NO-ANSWER", "{}", d.text);

    for round in 1..=2 {
        // Two knocks in a row through the same resolver: negative caching must not eat the second.
        let out = s.knock(&s.lab.client, &cred, &["--resolver", RESOLVER, "--ip", CLIENT]);
        assert!(out.status.success(), "{}", out_text(&out));
        assert!(out_text(&out).contains("Non-Existent Domain"), "{}", out_text(&out));
        let mut c = connect_soon(&s.lab.client, ssh_addr())
            .unwrap_or_else(|e| panic!("round {round}: door for the client: {e}\n{}", s.daemon.log_text()));
        assert!(echo_works(&mut c));
        assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err());
        assert!(try_connect(resolver_ns(&s), ssh_addr()).is_err(), "the door is not for the resolver");
        assert!(wait_count(&s, "nxknock::doors: door opened", round));
        assert_eq!(count(&s.daemon.log_text(), "nxknock::doors: door opened"), round);
        assert!(wait_closed(&s.lab.client, ssh_addr(), Duration::from_secs(6)));
    }
    let log = s.daemon.log_text();
    assert!(log.contains(&format!("from={RESOLVER}")), "the server saw only the resolver:\n{log}");
    assert!(!log.contains("WARN"), "nothing to warn about:\n{log}");
}

#[test]
fn bound_knock_through_unbound_with_qname_minimisation_and_0x20() {
    if !require_root("bound_knock_through_unbound_with_qname_minimisation_and_0x20") {
        return;
    }
    bound_through_resolver("rqmin", UnboundOpts { qname_minimisation: true, caps_for_id: true, ..Default::default() });
}

#[test]
fn bound_knock_through_unbound_without_minimisation_or_0x20() {
    if !require_root("bound_knock_through_unbound_without_minimisation_or_0x20") {
        return;
    }
    bound_through_resolver("rplain", UnboundOpts::default());
}

#[test]
fn plain_knock_opens_for_the_resolver_by_default() {
    if !require_root("plain_knock_opens_for_the_resolver_by_default") {
        return;
    }
    let (s, _u) = resolver_setup(
        "rsource",
        30,
        &UnboundOpts { qname_minimisation: true, caps_for_id: true, ..Default::default() },
    );
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("alice", &[]);
    let names = s.otp(&cred, 2);
    let d = dig(&s.lab.client, &[&format!("@{RESOLVER}"), &names[0]]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.text);
    connect_soon(resolver_ns(&s), ssh_addr()).expect("plain = source opens for the address the server saw");
    assert!(try_connect(&s.lab.client, ssh_addr()).is_err(), "not for the client behind the resolver");
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err());
    // The printed list also works with `host`.
    let out = s.lab.client.cmd("host").args([&names[1], RESOLVER]).output().unwrap();
    assert!(out_text(&out).contains("NXDOMAIN"), "{}", out_text(&out));
    assert!(wait_count(&s, "nxknock::doors: door opened", 2), "{}", s.daemon.log_text());
}

#[test]
fn plain_knock_with_ecs_opens_for_the_client_subnet() {
    if !require_root("plain_knock_with_ecs_opens_for_the_client_subnet") {
        return;
    }
    let (mut s, _u) = resolver_setup("recs", 30, &UnboundOpts { ecs: true, caps_for_id: true, ..Default::default() });
    // `plain` lives in [token]; the setup wrote the default, so change it and restart.
    s.reconfigure(|c| c.plain(PlainPolicy::Ecs).ecs_from([format!("{RESOLVER}/32").parse().unwrap()]));
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("alice", &[]);
    let names = s.otp(&cred, 2);
    let d = dig(&s.lab.client, &[&format!("@{RESOLVER}"), &names[0]]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.text);
    let mut c = connect_soon(&s.lab.client, ssh_addr())
        .unwrap_or_else(|e| panic!("ECS door for the client: {e}\n{}", s.daemon.log_text()));
    assert!(echo_works(&mut c));
    assert!(try_connect(resolver_ns(&s), ssh_addr()).is_err(), "not for the resolver");
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err());
    let out = s.lab.client.cmd("host").args([&names[1], RESOLVER]).output().unwrap();
    assert!(out_text(&out).contains("NXDOMAIN"), "{}", out_text(&out));
    assert!(wait_count(&s, "nxknock::doors: door opened", 2), "{}", s.daemon.log_text());
}

#[test]
fn plain_off_opens_nothing_but_bound_still_works() {
    if !require_root("plain_off_opens_nothing_but_bound_still_works") {
        return;
    }
    let (mut s, _u) = resolver_setup("roff", 30, &UnboundOpts::default());
    s.reconfigure(|c| c.plain(PlainPolicy::Off));
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("alice", &[]);
    let name = s.otp(&cred, 1).remove(0);
    let d = dig(&s.lab.client, &[&format!("@{RESOLVER}"), &name]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.text);
    assert!(wait_count(&s, "plain knocks are off", 1), "{}", s.daemon.log_text());
    for ns in [&s.lab.client, resolver_ns(&s), &s.lab.attacker] {
        assert!(try_connect(ns, ssh_addr()).is_err());
    }
    let out = s.knock(&s.lab.client, &cred, &["--resolver", RESOLVER, "--ip", CLIENT]);
    assert!(out.status.success(), "{}", out_text(&out));
    connect_soon(&s.lab.client, ssh_addr()).expect("bound knock opens with plain = off");
}

#[test]
fn the_same_knock_twice_opens_once_and_raises_no_alarm() {
    if !require_root("the_same_knock_twice_opens_once_and_raises_no_alarm") {
        return;
    }
    // Two resolvers (two egress addresses) relaying one name, as resolvers that retry do.
    let (mut s, _u) = resolver_setup("rtwice", 30, &UnboundOpts { caps_for_id: true, ..Default::default() });
    s.lab.add_host("res2", RESOLVER2.parse().unwrap(), "2001:db8:18::5".parse().unwrap()).unwrap();
    let _u2 = s.unbound("res2", RESOLVER2, &UnboundOpts::default());
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("alice", &[]);
    let out = nx(&["otp", "--credential", cred.to_str().unwrap(), "--ip", CLIENT], &[]);
    assert!(out.status.success(), "{}", out_text(&out));
    let name = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(name.split('.').next().unwrap().len(), 56, "a bound name");
    for r in [RESOLVER, RESOLVER2, RESOLVER] {
        let d = dig(&s.lab.client, &[&format!("@{r}"), &name]);
        assert_eq!(d.status, "NXDOMAIN", "{}", d.text);
    }
    connect_soon(&s.lab.client, ssh_addr()).expect("the first copy opens");
    assert!(wait_count(&s, "nxknock::doors: door opened", 1));
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err());
    assert!(wait_count(&s, "repeat of an accepted knock", 1), "{}", s.daemon.log_text());
    let log = s.daemon.log_text();
    assert_eq!(count(&log, "nxknock::doors: door opened"), 1, "{log}");
    assert!(!log.contains("WARN") && !log.contains("ERROR"), "repeats raise no alarm:\n{log}");
}

#[test]
fn two_nameservers_sharing_one_database_open_once() {
    if !require_root("two_nameservers_sharing_one_database_open_once") {
        return;
    }
    let mut s = Setup::new("rtwons", "nftables", 30);
    let ns2_addr = "198.18.0.6";
    s.lab.add_host("ns2", ns2_addr.parse().unwrap(), "2001:db8:18::6".parse().unwrap()).unwrap();
    // The second nameserver: same zone, same database file, its own listen address.
    let cfg2 = s.dir.join("ns2.toml");
    s.config.clone().listen([format!("{ns2_addr}:53").parse().unwrap()]).write(&cfg2).unwrap();
    let second = start_daemon(s.lab.host("ns2").unwrap(), &s.dir, &cfg2);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("alice", &[]);
    let out = nx(&["otp", "--credential", cred.to_str().unwrap(), "--ip", CLIENT], &[]);
    let name = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    // A resolver asks every nameserver of the zone: first ours, then the second.
    let d = dig(&s.lab.client, &[&format!("@{SERVER}"), "+norec", &name]);
    assert_eq!(d.status, "NXDOMAIN");
    connect_soon(&s.lab.client, ssh_addr()).expect("first nameserver opens");
    let d = dig(&s.lab.client, &[&format!("@{ns2_addr}"), "+norec", &name]);
    assert_eq!(d.status, "NXDOMAIN");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !second.log_text().contains("repeat of an accepted knock") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log2 = second.log_text();
    assert!(log2.contains("repeat of an accepted knock"), "{log2}");
    assert!(!log2.contains("nxknock::doors: door opened") && !log2.contains("WARN"), "{log2}");
    assert!(
        s.lab
            .host("ns2")
            .unwrap()
            .run(&["nft", "list", "set", "inet", "nxknock", "doors4"])
            .unwrap()
            .matches("198.18.0.2")
            .count()
            == 0
    );
    assert!(wait_count(&s, "nxknock::doors: door opened", 1));
    assert_eq!(count(&s.daemon.log_text(), "nxknock::doors: door opened"), 1);
}

#[test]
fn knocks_over_tcp_work_through_the_resolver_and_directly() {
    if !require_root("knocks_over_tcp_work_through_the_resolver_and_directly") {
        return;
    }
    let (s, _u) = resolver_setup("rtcp", 2, &UnboundOpts { tcp_upstream: true, ..Default::default() });
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("alice", &[]);
    let out = s.knock(&s.lab.client, &cred, &["--resolver", RESOLVER, "--ip", CLIENT]);
    assert!(out.status.success(), "{}", out_text(&out));
    connect_soon(&s.lab.client, ssh_addr()).expect("knock relayed over TCP opens");
    assert!(wait_count(&s, "via=dns/tcp", 1), "{}", s.daemon.log_text());
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err());
    assert!(wait_closed(&s.lab.client, ssh_addr(), Duration::from_secs(6)));
    // The client's own TCP knock, straight to the resolver (dig +tcp style).
    let out = s.knock(&s.lab.client, &cred, &["--resolver", RESOLVER, "--ip", CLIENT, "--tcp"]);
    assert!(out.status.success(), "{}", out_text(&out));
    connect_soon(&s.lab.client, ssh_addr()).expect("knock --tcp opens");
}

#[test]
fn ip_auto_learns_the_address_from_whoami() {
    if !require_root("ip_auto_learns_the_address_from_whoami") {
        return;
    }
    let mut s = Setup::new("rauto", "nftables", 30);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("alice", &[]);
    // whoami is off by default: --ip auto must say what to pass instead.
    let out = s.knock(&s.lab.client, &cred, &["--ip", "auto"]);
    assert!(!out.status.success());
    assert!(out_text(&out).contains("--ip YOUR.PUBLIC.IP"), "{}", out_text(&out));
    let d = dig(&s.lab.client, &[&format!("@{SERVER}"), "+norec", &format!("whoami.{ZONE}"), "TXT"]);
    assert_eq!(d.status, "NXDOMAIN", "whoami is an ordinary knock name when off");

    s.reconfigure(|c| c.whoami(true));
    // whoami.<zone> exists (questions live below it) but gives nobody an unauthenticated address.
    let d = dig(&s.lab.client, &[&format!("@{SERVER}"), "+norec", &format!("whoami.{ZONE}"), "TXT"]);
    assert!(d.status == "NOERROR" && d.aa && !d.text.contains(&format!("\"{CLIENT}\"")), "{}", d.text);
    let out = s.knock(&s.lab.client, &cred, &["--ip", "auto"]);
    assert!(out.status.success(), "{}", out_text(&out));
    assert!(out_text(&out).contains(&format!("knocked for {CLIENT}")), "{}", out_text(&out));
    connect_soon(&s.lab.client, ssh_addr()).expect("door for the address whoami reported");
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err());
    // Through a resolver only, with no server known, auto cannot work: it says so.
    let out = s
        .lab
        .client
        .cmd(BIN)
        .args(["knock", "--credential", cred.to_str().unwrap(), "--resolver", SERVER, "--ip", "auto"])
        .output()
        .unwrap();
    assert!(!out.status.success() && out_text(&out).contains("--server"), "{}", out_text(&out));
}

/// `/etc/netns/<ns>/resolv.conf` is what `ip netns exec` shows a program as
/// /etc/resolv.conf; removed on drop.
struct NetnsResolvConf(PathBuf);
impl NetnsResolvConf {
    fn new(ns: &Netns, nameserver: &str) -> NetnsResolvConf {
        let dir = PathBuf::from("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), format!("# test\nsearch example\nnameserver {nameserver}\n")).unwrap();
        NetnsResolvConf(dir)
    }
}
impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn resolver_system_reads_resolv_conf() {
    if !require_root("resolver_system_reads_resolv_conf") {
        return;
    }
    let (s, _u) = resolver_setup("rsys", 30, &UnboundOpts { qname_minimisation: true, ..Default::default() });
    let _conf = NetnsResolvConf::new(&s.lab.client, RESOLVER);
    let _svc = echo_service(&s.lab.server, &format!("{SERVER}:22"));
    let cred = s.add_user("alice", &[]);
    let out = s
        .lab
        .client
        .cmd(BIN)
        .args(["knock", "--credential", cred.to_str().unwrap(), "--resolver", "system", "--ip", CLIENT])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", out_text(&out));
    connect_soon(&s.lab.client, ssh_addr()).expect("knock via the system resolver opens");
    assert!(wait_count(&s, &format!("from={RESOLVER}"), 1), "{}", s.daemon.log_text());
    assert!(try_connect(&s.lab.attacker, ssh_addr()).is_err());
}
