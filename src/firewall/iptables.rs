//! iptables backend: chain `NXKNOCK` in table `filter` (IPv4 and IPv6), doors
//! in ipsets with per-entry timeouts. The chains and sets are made, listed and
//! removed with the `iptables`/`ipset` tools; doors are added and deleted over
//! netlink from inside the process (`ipset_netlink.rs`), with the messages
//! `ipset add -exist`/`ipset del -exist` would send.
//!
//! ```text
//! INPUT:   -j NXKNOCK                          (one rule, inserted at the top)
//! NXKNOCK: -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN
//!          -m conntrack --ctstatus CONFIRMED -j RETURN
//!          -m set --match-set nxknock-doors4 src,dst -j RETURN   (doors6 for ip6tables)
//!          -p tcp -m tcp --syn -m conntrack --ctstate NEW
//!                 -m set --match-set nxknock-once4 src,dst -g NXKNOCK-ONCE4
//!          -p udp -m conntrack --ctstate NEW
//!                 -m set --match-set nxknock-once4 src,dst -g NXKNOCK-ONCE4
//!          -p tcp --dport 22 -j DROP                            (one per guarded service)
//! NXKNOCK-ONCE4: -j SET --del-set nxknock-once4 src,dst
//! ```
//!
//! For ip6tables the two single-use rules come twice, first for
//! `nxknock-once6host` (`-g NXKNOCK-ONCE6HOST`), then for `nxknock-once6`
//! (`-g NXKNOCK-ONCE6`).
//!
//! The chain RETURNs rather than ACCEPTs: an admitted packet goes back to the
//! operator's INPUT rules, which still decide. nxknock only ever adds a drop.
//!
//! `nxknock-doors4` is `hash:ip,port` (one address per door); `nxknock-doors6`
//! is `hash:net,port`, so a door can be a whole /64 next to /128 host doors
//! (hash:net looks up every prefix length it holds). All sets are created with
//! `timeout 0`, which enables per-entry timeouts without a default: every
//! entry we add carries its own. ipset timeouts are whole seconds; a door's
//! `open_for` is rounded *up*, never to 0, which ipset reads as "forever".
//!
//! # Single-use doors (Doorman's narrowing)
//!
//! A single-use door is an entry in an `nxknock-once*` set. The packet that
//! matches it is sent (`-g`, goto) to a chain whose only rule, the `SET`
//! target, deletes the packet's entry from the set; when that chain ends, the
//! packet returns to INPUT just as a RETURN from `NXKNOCK` would. The goto is
//! what makes this one decision: a second rule could not tell, after the
//! delete, that the set *had* matched. The conntrack rules admit the rest of
//! the connection. Measured on kernel 6.18 with ipset 7.17 and iptables 1.8.9:
//!
//! - `--del-set … src,dst` on a `hash:net,port` set does not delete the
//!   entry that matched but the packet's source masked to one prefix length
//!   (evidently the most specific one the set holds). With only /64 entries,
//!   a packet from any address of the /64 deletes the /64; add one /128 entry
//!   (for another address) and the /64 door is no longer consumed: the next
//!   connection from its /64 is admitted. So `nxknock-once6` holds /64s only, single-use IPv6 hosts go
//!   to `nxknock-once6host` (`hash:ip,port family inet6`), and other prefix
//!   lengths cannot be single-use ([`FirewallError::Unsupported`]). (A
//!   `hash:ip,port family inet6 netmask 64` set was measured to work too,
//!   but that is a newer ipset feature — revision 7 of the type here — and
//!   it lists its entries without their prefix length.)
//! - Only a new flow may consume a door, and for TCP only a SYN (`--syn`):
//!   with conntrack's default loose pick-up, a stray mid-stream segment whose
//!   conntrack entry is gone is `NEW` too and would otherwise spend the door.
//! - `NEW` also covers later packets of an admitted flow that has not been
//!   answered yet (a retransmitted SYN, a UDP client's second datagram before
//!   the first reply). Their conntrack entry is already CONFIRMED — a first
//!   packet's never is, and a dropped packet's is discarded — hence the
//!   `--ctstatus CONFIRMED` rule. For ordinary doors this means an unanswered
//!   flow outlives its door, like an established one.
//!
//! A door is in exactly one of its two sets: opening it in one mode removes
//! it from the other, and closing it removes it from both.

use std::net::IpAddr;
use std::time::Duration;

use super::exec;
use super::ipset_netlink::{self, Command, Entry};
use super::nfnl::NfnlSocket;
use super::{Door, DoorBackend, FirewallError, Guarded, OpenDoor, Proto, by_kind};
use crate::netaddr::Prefix;

const CHAIN: &str = "NXKNOCK";
const IPSET: &str = "ipset";
const SET4: &str = "nxknock-doors4";
const SET6: &str = "nxknock-doors6";
const ONCE4: &str = "nxknock-once4";
/// Single-use IPv6 /64s, and nothing else: see the module docs.
const ONCE6: &str = "nxknock-once6";
const ONCE6HOST: &str = "nxknock-once6host";
/// The block list (capture/block.rs) and the ports it closes to blocked sources.
const BLOCKED4: &str = "nxknock-blocked4";
const BLOCKED6: &str = "nxknock-blocked6";
const KNOCKPORTS: &str = "nxknock-knockports";
const KNOCKPORTS_CREATE: &[&str] = &["bitmap:port", "range", "0-65535"];

/// A set of single-use doors and the chain that consumes its entries.
struct OnceSet {
    set: &'static str,
    chain: &'static str,
    create: &'static [&'static str],
}

/// One address family: which tools and which sets.
struct Family {
    iptables: &'static str,
    restore: &'static str,
    set: &'static str,
    create: &'static [&'static str],
    blocked: &'static str,
    blocked_create: &'static [&'static str],
    /// In the order their rules are tried.
    once: &'static [OnceSet],
}

const FAMILIES: [Family; 2] = [
    Family {
        iptables: "iptables",
        restore: "iptables-restore",
        set: SET4,
        create: &["hash:ip,port", "family", "inet", "timeout", "0"],
        blocked: BLOCKED4,
        blocked_create: &["hash:ip", "family", "inet", "timeout", "0"],
        once: &[OnceSet {
            set: ONCE4,
            chain: "NXKNOCK-ONCE4",
            create: &["hash:ip,port", "family", "inet", "timeout", "0"],
        }],
    },
    Family {
        iptables: "ip6tables",
        restore: "ip6tables-restore",
        set: SET6,
        create: &["hash:net,port", "family", "inet6", "timeout", "0"],
        blocked: BLOCKED6,
        blocked_create: &["hash:net", "family", "inet6", "timeout", "0"],
        once: &[
            OnceSet {
                set: ONCE6HOST,
                chain: "NXKNOCK-ONCE6HOST",
                create: &["hash:ip,port", "family", "inet6", "timeout", "0"],
            },
            OnceSet {
                set: ONCE6,
                chain: "NXKNOCK-ONCE6",
                create: &["hash:net,port", "family", "inet6", "timeout", "0"],
            },
        ],
    },
];

/// Where a door lives: an ipset, the entry as ipset writes it
/// (`addr[/len],proto:port`, for logs), and the entry as netlink carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Slot {
    set: &'static str,
    entry: String,
    nl: Entry,
}

/// The `NXKNOCK` chains and `nxknock-doors*` ipsets.
#[derive(Clone, Debug, Default)]
pub struct IptablesBackend {
    /// For adding and deleting doors; see `nfnl.rs` on namespaces.
    nl: NfnlSocket,
    /// `[firewall] always_allow`: returned from our chain first, so never dropped.
    allow: Vec<Prefix>,
}

impl IptablesBackend {
    pub fn new() -> Self {
        IptablesBackend { nl: NfnlSocket::new(), allow: Vec::new() }
    }

    /// Networks the guard never drops (`[firewall] always_allow`).
    pub fn always_allow(mut self, nets: &[Prefix]) -> Self {
        self.allow = nets.to_vec();
        self
    }

    /// `script` with a `-s NET -j RETURN` for each of this family's always-allowed
    /// networks as the first rules of our chain, before every drop.
    fn with_allow(&self, fam: &Family, script: String) -> String {
        let v4 = fam.iptables == "iptables";
        let rules: String = self
            .allow
            .iter()
            .filter(|p| p.addr().is_ipv4() == v4)
            .map(|p| format!("-A {CHAIN} -s {p} -j RETURN\n"))
            .collect();
        match script.find(&format!("\n-A {CHAIN} ")) {
            Some(at) => format!("{}{rules}{}", &script[..at + 1], &script[at + 1..]),
            None => script,
        }
    }

    /// The ipsets that may hold `door`, with its entry in each: the one for
    /// an ordinary door, and the one for a single-use door if it can be one.
    fn slots(door: &Door) -> Result<(Slot, Option<Slot>), FirewallError> {
        let (addr, len) = door.checked()?;
        let (proto, port) = (door.proto, door.port);
        let tail = format!("{proto}:{port}");
        // `cidr` for the hash:net,port sets, none for hash:ip,port.
        let slot = |set, entry, cidr| Slot { set, entry, nl: Entry { addr, cidr, proto, port } };
        Ok(match addr {
            IpAddr::V4(a) if len == 32 => {
                (slot(SET4, format!("{a},{tail}"), None), Some(slot(ONCE4, format!("{a},{tail}"), None)))
            }
            IpAddr::V4(a) => {
                return Err(FirewallError::Unsupported(format!(
                    "IPv4 prefix {a}/{len}: IPv4 doors are for single addresses"
                )));
            }
            IpAddr::V6(a) => (
                slot(SET6, format!("{a}/{len},{tail}"), Some(len)),
                match len {
                    128 => Some(slot(ONCE6HOST, format!("{a},{tail}"), None)),
                    64 => Some(slot(ONCE6, format!("{a}/{len},{tail}"), Some(len))),
                    _ => None,
                },
            ),
        })
    }

    /// The `iptables-restore` input that (re)builds our chain. With
    /// `--noflush`, declaring `:NXKNOCK` flushes just that chain, so the
    /// whole rebuild — and the jump, if it is missing — is one atomic commit:
    /// the guard is never briefly absent.
    fn restore_script(fam: &Family, services: &[Guarded], add_jump: bool) -> String {
        let mut s = format!("*filter\n:{CHAIN} - [0:0]\n");
        for once in fam.once {
            s.push_str(&format!(":{} - [0:0]\n", once.chain));
        }
        s.push_str(&format!("-A {CHAIN} -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN\n"));
        s.push_str(&format!("-A {CHAIN} -m conntrack --ctstatus CONFIRMED -j RETURN\n"));
        s.push_str(&format!("-A {CHAIN} -m set --match-set {} src,dst -j RETURN\n", fam.set));
        for p in ["tcp", "udp"] {
            s.push_str(&format!(
                "-A {CHAIN} -p {p} -m set --match-set {} src -m set --match-set {KNOCKPORTS} dst -j DROP\n",
                fam.blocked
            ));
        }
        for once in fam.once {
            for first in ["-p tcp -m tcp --syn", "-p udp"] {
                s.push_str(&format!(
                    "-A {CHAIN} {first} -m conntrack --ctstate NEW -m set --match-set {} src,dst -g {}\n",
                    once.set, once.chain
                ));
            }
        }
        for g in services {
            s.push_str(&format!("-A {CHAIN} -p {p} -m {p} --dport {} -j DROP\n", g.port, p = g.proto));
        }
        for once in fam.once {
            s.push_str(&format!("-A {} -j SET --del-set {} src,dst\n", once.chain, once.set));
        }
        if add_jump {
            s.push_str(&format!("-I INPUT 1 -j {CHAIN}\n"));
        }
        s.push_str("COMMIT\n");
        s
    }
}

impl DoorBackend for IptablesBackend {
    fn name(&self) -> &'static str {
        "iptables"
    }

    /// Creates the ipsets if missing (keeping any open doors, so a daemon
    /// restart does not close them), rebuilds `NXKNOCK`, and inserts the jump
    /// from INPUT only if `iptables -C` finds none: exactly one jump however
    /// often this runs. If the operator later inserts rules above it, the jump
    /// stays where it is.
    fn install_guard(&self, services: &[Guarded]) -> Result<(), FirewallError> {
        for fam in &FAMILIES {
            let sets = [(fam.set, fam.create), (fam.blocked, fam.blocked_create), (KNOCKPORTS, KNOCKPORTS_CREATE)]
                .into_iter()
                .chain(fam.once.iter().map(|o| (o.set, o.create)));
            for (set, kind) in sets {
                let mut create = vec!["create", set];
                create.extend_from_slice(kind);
                create.push("-exist");
                exec::run(IPSET, &create, None)?;
            }
            let has_jump = exec::succeeds(fam.iptables, &["-w", "-C", "INPUT", "-j", CHAIN])?;
            let script = self.with_allow(fam, Self::restore_script(fam, services, !has_jump));
            exec::run(fam.restore, &["-w", "--noflush"], Some(&script))?;
        }
        tracing::info!(chain = CHAIN, ?services, "iptables guard installed");
        Ok(())
    }

    /// `ipset add -exist` replaces the entry's timeout (measured: both longer
    /// and shorter), which is exactly a refresh. Then the door leaves its
    /// other set (single-use or not), so it is only of the kind last asked
    /// for; between the two calls it is briefly in both, never in neither.
    fn open(&self, door: &Door) -> Result<(), FirewallError> {
        let (plain, once) = Self::slots(door)?;
        let (to, other) = by_kind(door, plain, once)?;
        let secs = ipset_timeout(door.open_for);
        let add = Command::Add { timeout_secs: u32::try_from(secs).unwrap_or(u32::MAX) };
        ipset_netlink::apply(&self.nl, add, to.set, &to.nl)?;
        if let Some(other) = other {
            ipset_netlink::apply(&self.nl, Command::Del, other.set, &other.nl)?;
        }
        tracing::debug!(entry = %to.entry, set = to.set, open_for_s = secs, "door opened");
        Ok(())
    }

    /// Removes the door from both its sets. `-exist` makes deleting an
    /// expired (or consumed) door a no-op rather than an error.
    fn close(&self, door: &Door) -> Result<(), FirewallError> {
        let (plain, once) = Self::slots(door)?;
        for Slot { set, nl, .. } in std::iter::once(&plain).chain(&once) {
            ipset_netlink::apply(&self.nl, Command::Del, set, nl)?;
        }
        tracing::debug!(entry = %plain.entry, "door closed");
        Ok(())
    }

    fn list(&self) -> Result<Vec<OpenDoor>, FirewallError> {
        let mut doors = Vec::new();
        let sets = [(SET4, false), (ONCE4, true), (SET6, false), (ONCE6HOST, true), (ONCE6, true)];
        for (set, single_use) in sets {
            let args = ["list", set, "-output", "save"];
            let out = exec::run(IPSET, &args, None)?;
            let parsed = parse_save(&out, set)
                .map_err(|detail| FirewallError::Parse { cmd: format!("{IPSET} {}", args.join(" ")), detail })?;
            doors.extend(parsed.into_iter().map(|d| OpenDoor { single_use, ..d }));
        }
        Ok(doors)
    }

    fn set_knock_ports(&self, ports: &[(u16, u16)]) -> Result<(), FirewallError> {
        exec::run(IPSET, &["flush", KNOCKPORTS], None)?;
        for (lo, hi) in ports {
            exec::run(IPSET, &["add", KNOCKPORTS, &format!("{lo}-{hi}"), "-exist"], None)?;
        }
        Ok(())
    }

    /// Rare (a few per attacker), so through `ipset`; the block thread calls it,
    /// never the knock path. `-exist` refreshes the timeout of a repeat block.
    fn block(&self, source: Prefix, length: Duration) -> Result<(), FirewallError> {
        let (set, entry) = match source.addr() {
            IpAddr::V4(a) => (BLOCKED4, a.to_string()),
            IpAddr::V6(_) => (BLOCKED6, source.to_string()),
        };
        let secs = ipset_timeout(length).max(1).to_string();
        exec::run(IPSET, &["add", set, &entry, "timeout", &secs, "-exist"], None).map(drop)
    }

    fn blocked(&self) -> Result<Vec<(Prefix, Duration)>, FirewallError> {
        let mut out = Vec::new();
        for set in [BLOCKED4, BLOCKED6] {
            let listing = exec::run(IPSET, &["list", set, "-output", "save"], None)?;
            for line in listing.lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                if let ["add", s, entry, "timeout", secs, ..] = words.as_slice() {
                    if *s == set {
                        let bad = |detail: String| FirewallError::Parse { cmd: format!("{IPSET} list {set}"), detail };
                        let prefix = match entry.parse::<IpAddr>() {
                            Ok(a) => Prefix::source_door(a),
                            Err(_) => entry.parse::<Prefix>().map_err(|e| bad(format!("{entry}: {e}")))?,
                        };
                        let left = secs.parse::<u64>().map_err(|e| bad(format!("{secs}: {e}")))?;
                        out.push((prefix, Duration::from_secs(left)));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Removes every jump to our chain, then our chains (all flushed before
    /// any is deleted, since `NXKNOCK` refers to the single-use chains), then
    /// the sets (a set cannot be destroyed while a rule references it).
    /// Whatever is already gone is skipped, so uninstalling twice is fine.
    fn uninstall(&self) -> Result<(), FirewallError> {
        for fam in &FAMILIES {
            let ipt = fam.iptables;
            while exec::succeeds(ipt, &["-w", "-C", "INPUT", "-j", CHAIN])? {
                exec::run(ipt, &["-w", "-D", "INPUT", "-j", CHAIN], None)?;
            }
            let mut chains = Vec::new();
            for c in std::iter::once(CHAIN).chain(fam.once.iter().map(|o| o.chain)) {
                if exec::succeeds(ipt, &["-w", "-S", c])? {
                    chains.push(c);
                }
            }
            for c in &chains {
                exec::run(ipt, &["-w", "-F", c], None)?;
            }
            for c in &chains {
                exec::run(ipt, &["-w", "-X", c], None)?;
            }
            let sets = [fam.set, fam.blocked].into_iter().chain(fam.once.iter().map(|o| o.set));
            for set in sets {
                if exec::succeeds(IPSET, &["list", "-n", set])? {
                    destroy_set(set)?;
                }
            }
        }
        // Shared by both families' rules: only now is nothing left that uses it.
        if exec::succeeds(IPSET, &["list", "-n", KNOCKPORTS])? {
            destroy_set(KNOCKPORTS)?;
        }
        tracing::info!(chain = CHAIN, "iptables chain and ipsets removed");
        Ok(())
    }
}

/// ipset timeouts are whole seconds: round up, so a door is never shorter
/// than asked and never 0 (= no timeout) for a non-zero `open_for`.
fn ipset_timeout(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// `ipset destroy`, retried briefly: the kernel may drop the last rule's
/// reference to the set a moment after the rule is deleted, and until then
/// the set is "in use".
fn destroy_set(set: &str) -> Result<(), FirewallError> {
    let mut tries = 0;
    loop {
        match exec::run(IPSET, &["destroy", set], None) {
            Ok(_) => return Ok(()),
            Err(FirewallError::Command { ref stderr, .. }) if stderr.contains("in use") && tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Parses `ipset list SET -output save`: lines
/// `add SET 198.18.0.2,tcp:22 timeout 29` (IPv6 nets as `2001:db8::/64,tcp:22`,
/// /128 without the suffix). Entries that are not tcp/udp cannot come from
/// nxknock; they are skipped with a warning rather than failing the listing.
fn parse_save(text: &str, set: &str) -> Result<Vec<OpenDoor>, String> {
    let mut doors = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("add") || words.next() != Some(set) {
            continue; // the `create` line, or blank
        }
        let entry = words.next().ok_or_else(|| format!("no entry in {line:?}"))?;
        let mut expires_in = Duration::ZERO;
        while let Some(w) = words.next() {
            if w == "timeout" {
                let secs = words.next().and_then(|s| s.parse().ok());
                expires_in = Duration::from_secs(secs.ok_or_else(|| format!("bad timeout in {line:?}"))?);
            }
        }
        let (net, service) = entry.split_once(',').ok_or_else(|| format!("bad entry {entry:?}"))?;
        let (proto, port) = service.split_once(':').ok_or_else(|| format!("bad service {service:?}"))?;
        let proto = match proto {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => {
                tracing::warn!(set, entry, "ipset entry that nxknock did not add; skipped");
                continue;
            }
        };
        let port = port.parse().map_err(|_| format!("bad port in {entry:?}"))?;
        let (addr, len) = match net.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (net, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("bad address in {entry:?}"))?;
        let prefix_len = match len {
            Some(l) => l.parse().map_err(|_| format!("bad prefix in {entry:?}"))?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        doors.push(OpenDoor { addr, prefix_len, proto, port, expires_in, single_use: false });
    }
    Ok(doors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_save_output() {
        // Captured from ipset 7.17.
        let v6 = "create nxknock-doors6 hash:net,port family inet6 hashsize 1024 maxelem 65536 timeout 0 bucketsize 12 initval 0x169650ce\n\
                  add nxknock-doors6 2001:db8:18::5,tcp:22 timeout 29\n\
                  add nxknock-doors6 2001:db8:18::5,udp:53 timeout 28\n\
                  add nxknock-doors6 2001:db8:18::/64,tcp:22 timeout 7\n\
                  add nxknock-doors6 2001:db8:18::/64,icmpv6:128/0 timeout 7\n";
        let doors = parse_save(v6, SET6).unwrap();
        let got: Vec<_> =
            doors.iter().map(|d| (d.addr.to_string(), d.prefix_len, d.proto, d.port, d.expires_in.as_secs())).collect();
        assert_eq!(
            got,
            vec![
                ("2001:db8:18::5".into(), 128, Proto::Tcp, 22, 29),
                ("2001:db8:18::5".into(), 128, Proto::Udp, 53, 28),
                ("2001:db8:18::".into(), 64, Proto::Tcp, 22, 7),
            ]
        );
        let v4 = "add nxknock-doors4 198.18.0.2,tcp:22 timeout 50\n";
        assert_eq!(parse_save(v4, SET4).unwrap()[0].prefix_len, 32);
        assert!(parse_save("add nxknock-doors4 198.18.0.2,tcp:x timeout 5\n", SET4).is_err());
        assert!(parse_save("add nxknock-doors4 198.18.0.2,tcp:22 timeout\n", SET4).is_err());
    }

    #[test]
    fn restore_script_adds_the_jump_only_when_asked() {
        let svc = [Guarded { proto: Proto::Udp, port: 53 }];
        let with = IptablesBackend::restore_script(&FAMILIES[0], &svc, true);
        assert!(with.contains("-A NXKNOCK -p udp -m udp --dport 53 -j DROP\n"));
        assert!(with.contains("-I INPUT 1 -j NXKNOCK\n"));
        let without = IptablesBackend::restore_script(&FAMILIES[1], &svc, false);
        assert!(without.contains("--match-set nxknock-doors6 src,dst"));
        assert!(!without.contains("INPUT"));
    }

    #[test]
    fn open_rounds_timeouts_up_and_masks_prefixes() {
        let door = Door {
            addr: "2001:db8:18::7".parse().unwrap(),
            prefix_len: 64,
            proto: Proto::Tcp,
            port: 22,
            open_for: Duration::from_millis(1500),
            single_use: false,
        };
        let (to, _) = IptablesBackend::slots(&door).unwrap();
        assert_eq!(to.set, SET6);
        assert_eq!(to.entry, "2001:db8:18::/64,tcp:22");
        assert_eq!(ipset_timeout(Duration::from_millis(1500)), 2);
        assert_eq!(ipset_timeout(Duration::from_millis(1)), 1);
        assert_eq!(ipset_timeout(Duration::from_secs(30)), 30);
    }

    #[test]
    fn doors_pick_the_right_set() {
        let door = |addr: &str, prefix_len, single_use| Door {
            addr: addr.parse().unwrap(),
            prefix_len,
            proto: Proto::Udp,
            port: 53,
            open_for: Duration::from_secs(30),
            single_use,
        };
        // (set it goes into, entry, set it leaves)
        let el = |d: Door| {
            IptablesBackend::slots(&d)
                .and_then(|(plain, once)| by_kind(&d, plain, once))
                .map(|(to, other)| (to.set, to.entry, other.map(|o| o.set)))
                .map_err(|e| e.to_string())
        };
        let ok = |to, entry: &str, other| Ok((to, entry.to_owned(), other));
        assert_eq!(el(door("198.18.0.2", 32, false)), ok(SET4, "198.18.0.2,udp:53", Some(ONCE4)));
        assert_eq!(el(door("198.18.0.2", 32, true)), ok(ONCE4, "198.18.0.2,udp:53", Some(SET4)));
        // Single-use /64s and hosts are in different sets (module docs).
        assert_eq!(el(door("2001:db8:18::7", 64, true)), ok(ONCE6, "2001:db8:18::/64,udp:53", Some(SET6)));
        assert_eq!(el(door("2001:db8:18::7", 128, true)), ok(ONCE6HOST, "2001:db8:18::7,udp:53", Some(SET6)));
        assert_eq!(el(door("2001:db8:18::7", 128, false)), ok(SET6, "2001:db8:18::7/128,udp:53", Some(ONCE6HOST)));
        assert_eq!(el(door("2001:db8:18::7", 56, false)), ok(SET6, "2001:db8:18::/56,udp:53", None));
        assert!(el(door("2001:db8:18::7", 56, true)).is_err());
        assert!(el(door("198.18.0.0", 24, true)).is_err());
    }

    #[test]
    fn restore_script_consumes_single_use_doors() {
        let v6 = IptablesBackend::restore_script(&FAMILIES[1], &[], false);
        let lines: Vec<_> = v6.lines().collect();
        let at = |needle: &str| {
            lines.iter().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("no {needle:?} in\n{v6}"))
        };
        // Host doors are tried before /64s; only SYNs and UDP consume.
        assert!(
            at("--match-set nxknock-doors6")
                < at(
                    "-p tcp -m tcp --syn -m conntrack --ctstate NEW -m set --match-set nxknock-once6host src,dst -g NXKNOCK-ONCE6HOST"
                )
        );
        assert!(
            at("-p udp -m conntrack --ctstate NEW -m set --match-set nxknock-once6host src,dst -g NXKNOCK-ONCE6HOST")
                < at("--match-set nxknock-once6 src,dst -g NXKNOCK-ONCE6")
        );
        assert!(at(":NXKNOCK-ONCE6 - [0:0]") < at("-A NXKNOCK"));
        at("-A NXKNOCK-ONCE6 -j SET --del-set nxknock-once6 src,dst");
        at("-A NXKNOCK-ONCE6HOST -j SET --del-set nxknock-once6host src,dst");
    }
}
