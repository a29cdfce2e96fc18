//! iptables backend: chain `NXKNOCK` in table `filter` (IPv4 and IPv6), doors
//! in ipsets with per-entry timeouts.
//!
//! ```text
//! INPUT:   -j NXKNOCK                          (one rule, inserted at the top)
//! NXKNOCK: -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN
//!          -m set --match-set nxknock-doors4 src,dst -j RETURN   (doors6 for ip6tables)
//!          -p tcp --dport 22 -j DROP                            (one per guarded service)
//! ```
//!
//! The chain RETURNs rather than ACCEPTs: an admitted packet goes back to the
//! operator's INPUT rules, which still decide. nxknock only ever adds a drop.
//!
//! `nxknock-doors4` is `hash:ip,port` (one address per door); `nxknock-doors6`
//! is `hash:net,port`, so a door can be a whole /64 next to /128 host doors
//! (hash:net looks up every prefix length it holds). Both are created with
//! `timeout 0`, which enables per-entry timeouts without a default: every
//! entry we add carries its own. ipset timeouts are whole seconds; a door's
//! `open_for` is rounded *up*, never to 0, which ipset reads as "forever".

use std::net::IpAddr;
use std::time::Duration;

use super::exec;
use super::{Door, DoorBackend, FirewallError, Guarded, OpenDoor, Proto};

const CHAIN: &str = "NXKNOCK";
const IPSET: &str = "ipset";
const SET4: &str = "nxknock-doors4";
const SET6: &str = "nxknock-doors6";

/// One address family: which tools and which set.
struct Family {
    iptables: &'static str,
    restore: &'static str,
    set: &'static str,
    create: &'static [&'static str],
}

const FAMILIES: [Family; 2] = [
    Family {
        iptables: "iptables",
        restore: "iptables-restore",
        set: SET4,
        create: &["hash:ip,port", "family", "inet", "timeout", "0"],
    },
    Family {
        iptables: "ip6tables",
        restore: "ip6tables-restore",
        set: SET6,
        create: &["hash:net,port", "family", "inet6", "timeout", "0"],
    },
];

/// The `NXKNOCK` chains and `nxknock-doors*` ipsets.
#[derive(Clone, Debug, Default)]
pub struct IptablesBackend {
    _private: (),
}

impl IptablesBackend {
    pub fn new() -> Self {
        IptablesBackend { _private: () }
    }

    /// The ipset and entry (`addr[/len],proto:port`) for `door`.
    fn entry(door: &Door) -> Result<(&'static str, String), FirewallError> {
        let (addr, len) = door.checked()?;
        let tail = format!("{}:{}", door.proto, door.port);
        Ok(match addr {
            IpAddr::V4(a) if len == 32 => (SET4, format!("{a},{tail}")),
            IpAddr::V4(a) => {
                return Err(FirewallError::Unsupported(format!(
                    "IPv4 prefix {a}/{len}: IPv4 doors are for single addresses"
                )));
            }
            IpAddr::V6(a) => (SET6, format!("{a}/{len},{tail}")),
        })
    }

    /// The `iptables-restore` input that (re)builds our chain. With
    /// `--noflush`, declaring `:NXKNOCK` flushes just that chain, so the
    /// whole rebuild — and the jump, if it is missing — is one atomic commit:
    /// the guard is never briefly absent.
    fn restore_script(fam: &Family, services: &[Guarded], add_jump: bool) -> String {
        let mut s = format!("*filter\n:{CHAIN} - [0:0]\n");
        s.push_str(&format!(
            "-A {CHAIN} -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN\n"
        ));
        s.push_str(&format!(
            "-A {CHAIN} -m set --match-set {} src,dst -j RETURN\n",
            fam.set
        ));
        for g in services {
            s.push_str(&format!(
                "-A {CHAIN} -p {p} -m {p} --dport {} -j DROP\n",
                g.port,
                p = g.proto
            ));
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
            let mut create = vec!["create", fam.set];
            create.extend_from_slice(fam.create);
            create.push("-exist");
            exec::run(IPSET, &create, None)?;
            let has_jump = exec::succeeds(fam.iptables, &["-w", "-C", "INPUT", "-j", CHAIN])?;
            let script = Self::restore_script(fam, services, !has_jump);
            exec::run(fam.restore, &["-w", "--noflush"], Some(&script))?;
        }
        tracing::info!(chain = CHAIN, ?services, "iptables guard installed");
        Ok(())
    }

    /// `ipset add -exist` replaces the entry's timeout (measured: both longer
    /// and shorter), which is exactly a refresh.
    fn open(&self, door: &Door) -> Result<(), FirewallError> {
        let (set, entry) = Self::entry(door)?;
        let secs = ipset_timeout(door.open_for).to_string();
        exec::run(
            IPSET,
            &["add", "-exist", set, &entry, "timeout", &secs],
            None,
        )?;
        tracing::debug!(%entry, set, open_for_s = %secs, "door opened");
        Ok(())
    }

    /// `-exist` makes deleting an expired door a no-op rather than an error.
    fn close(&self, door: &Door) -> Result<(), FirewallError> {
        let (set, entry) = Self::entry(door)?;
        exec::run(IPSET, &["del", "-exist", set, &entry], None)?;
        tracing::debug!(%entry, set, "door closed");
        Ok(())
    }

    fn list(&self) -> Result<Vec<OpenDoor>, FirewallError> {
        let mut doors = Vec::new();
        for set in [SET4, SET6] {
            let args = ["list", set, "-output", "save"];
            let out = exec::run(IPSET, &args, None)?;
            doors.extend(
                parse_save(&out, set).map_err(|detail| FirewallError::Parse {
                    cmd: format!("{IPSET} {}", args.join(" ")),
                    detail,
                })?,
            );
        }
        Ok(doors)
    }

    /// Removes every jump to our chain, then the chain, then the sets (a set
    /// cannot be destroyed while a rule references it). Whatever is already
    /// gone is skipped, so uninstalling twice is fine.
    fn uninstall(&self) -> Result<(), FirewallError> {
        for fam in &FAMILIES {
            let ipt = fam.iptables;
            while exec::succeeds(ipt, &["-w", "-C", "INPUT", "-j", CHAIN])? {
                exec::run(ipt, &["-w", "-D", "INPUT", "-j", CHAIN], None)?;
            }
            if exec::succeeds(ipt, &["-w", "-S", CHAIN])? {
                exec::run(ipt, &["-w", "-F", CHAIN], None)?;
                exec::run(ipt, &["-w", "-X", CHAIN], None)?;
            }
            if exec::succeeds(IPSET, &["list", "-n", fam.set])? {
                destroy_set(fam.set)?;
            }
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
            Err(FirewallError::Command { ref stderr, .. })
                if stderr.contains("in use") && tries < 20 =>
            {
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
        let entry = words
            .next()
            .ok_or_else(|| format!("no entry in {line:?}"))?;
        let mut expires_in = Duration::ZERO;
        while let Some(w) = words.next() {
            if w == "timeout" {
                let secs = words.next().and_then(|s| s.parse().ok());
                expires_in =
                    Duration::from_secs(secs.ok_or_else(|| format!("bad timeout in {line:?}"))?);
            }
        }
        let (net, service) = entry
            .split_once(',')
            .ok_or_else(|| format!("bad entry {entry:?}"))?;
        let (proto, port) = service
            .split_once(':')
            .ok_or_else(|| format!("bad service {service:?}"))?;
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
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("bad address in {entry:?}"))?;
        let prefix_len = match len {
            Some(l) => l.parse().map_err(|_| format!("bad prefix in {entry:?}"))?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        doors.push(OpenDoor {
            addr,
            prefix_len,
            proto,
            port,
            expires_in,
            single_use: false,
        });
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
        let got: Vec<_> = doors
            .iter()
            .map(|d| {
                (
                    d.addr.to_string(),
                    d.prefix_len,
                    d.proto,
                    d.port,
                    d.expires_in.as_secs(),
                )
            })
            .collect();
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
        let svc = [Guarded {
            proto: Proto::Udp,
            port: 53,
        }];
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
        assert_eq!(
            IptablesBackend::entry(&door).unwrap(),
            (SET6, "2001:db8:18::/64,tcp:22".to_owned())
        );
        assert_eq!(ipset_timeout(Duration::from_millis(1500)), 2);
        assert_eq!(ipset_timeout(Duration::from_millis(1)), 1);
        assert_eq!(ipset_timeout(Duration::from_secs(30)), 30);
    }
}
