//! nftables backend: one table, `inet nxknock`, driven through the `nft` binary.
//!
//! Layout (see DESIGN.md §5 for why the guard must live in our own table):
//!
//! ```text
//! table inet nxknock {
//!     set doors4     { type ipv4_addr . inet_proto . inet_service; flags timeout; }
//!     set doors6     { type ipv6_addr . inet_proto . inet_service; flags interval,timeout; }
//!     set doors6host { type ipv6_addr . inet_proto . inet_service; flags timeout; }
//!     set guarded    { type inet_proto . inet_service; }
//!     chain input {
//!         type filter hook input priority filter - 10; policy accept;
//!         ct state established,related accept
//!         ip saddr . meta l4proto . th dport @doors4 accept
//!         ip6 saddr . meta l4proto . th dport @doors6 accept
//!         ip6 saddr . meta l4proto . th dport @doors6host accept
//!         meta l4proto . th dport @guarded counter drop
//!     }
//! }
//! ```
//!
//! An `accept` here only ends *our* chain; the operator's chains still see the
//! packet. Only our `drop` is final, which is exactly the guard.
//!
//! IPv6 prefix doors (a bound knock admits the client's /64) need an interval
//! set; nft 1.0.6 on kernel 6.18 handles `flags interval, timeout` with a
//! concatenation (measured: a /64 element admits every address of the /64 and
//! expires on time). Interval sets refuse overlapping elements, though, so a
//! host door inside an open /64 would fail with "File exists". Host (/128)
//! doors therefore live in their own hash set `doors6host`. Nested prefixes of
//! different lengths for the same service (a /56 and a /64) still conflict;
//! nothing in nxknock opens those.

use std::net::IpAddr;
use std::time::Duration;

use serde_json::Value;

use super::exec;
use super::{Door, DoorBackend, FirewallError, Guarded, OpenDoor, Proto};

const NFT: &str = "nft";
const FAMILY: &str = "inet";
const DEFAULT_TABLE: &str = "nxknock";

/// Door sets and the guard chain in table `inet nxknock`.
#[derive(Clone, Debug)]
pub struct NftablesBackend {
    table: String,
}

impl Default for NftablesBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl NftablesBackend {
    /// The backend for table `inet nxknock`.
    pub fn new() -> Self {
        NftablesBackend {
            table: DEFAULT_TABLE.to_owned(),
        }
    }

    /// Our table, as nft names it in commands.
    fn table_ref(&self) -> String {
        format!("{FAMILY} {}", self.table)
    }

    /// The table with every set and the base chain, but no rules or guarded
    /// elements. `table … { … }` in a script *adds*: existing objects with the
    /// same definition are kept (with their elements), missing ones created.
    fn skeleton(&self) -> String {
        format!(
            "table {t} {{\n\
             \tset doors4 {{ type ipv4_addr . inet_proto . inet_service; flags timeout; }}\n\
             \tset doors6 {{ type ipv6_addr . inet_proto . inet_service; flags interval, timeout; }}\n\
             \tset doors6host {{ type ipv6_addr . inet_proto . inet_service; flags timeout; }}\n\
             \tset guarded {{ type inet_proto . inet_service; }}\n\
             \tchain input {{ type filter hook input priority filter - 10; policy accept; }}\n\
             }}\n",
            t = self.table_ref()
        )
    }

    /// Rules and guarded services, to follow a flush of the chain and set.
    fn rules(&self, services: &[Guarded]) -> String {
        let t = self.table_ref();
        let mut s = String::new();
        for rule in [
            "ct state established,related accept",
            "ip saddr . meta l4proto . th dport @doors4 accept",
            "ip6 saddr . meta l4proto . th dport @doors6 accept",
            "ip6 saddr . meta l4proto . th dport @doors6host accept",
            "meta l4proto . th dport @guarded counter drop",
        ] {
            s.push_str(&format!("add rule {t} input {rule}\n"));
        }
        if !services.is_empty() {
            let elems: Vec<String> = services
                .iter()
                .map(|g| format!("{} . {}", g.proto, g.port))
                .collect();
            s.push_str(&format!(
                "add element {t} guarded {{ {} }}\n",
                elems.join(", ")
            ));
        }
        s
    }

    /// Which set holds `door`, and the element key nft understands.
    fn element(door: &Door) -> Result<(&'static str, String), FirewallError> {
        let (addr, len) = door.checked()?;
        let tail = format!("{} . {}", door.proto, door.port);
        Ok(match addr {
            IpAddr::V4(a) if len == 32 => ("doors4", format!("{a} . {tail}")),
            IpAddr::V4(a) => {
                return Err(FirewallError::Unsupported(format!(
                    "IPv4 prefix {a}/{len}: IPv4 doors are for single addresses"
                )));
            }
            IpAddr::V6(a) if len == 128 => ("doors6host", format!("{a} . {tail}")),
            IpAddr::V6(a) => ("doors6", format!("{a}/{len} . {tail}")),
        })
    }

    fn script(&self, script: &str) -> Result<(), FirewallError> {
        exec::run(NFT, &["-f", "-"], Some(script)).map(drop)
    }
}

impl DoorBackend for NftablesBackend {
    fn name(&self) -> &'static str {
        "nftables"
    }

    /// Re-creates the guard in one transaction, so there is never a moment
    /// without it. Doors already open are kept: restarting the daemon should
    /// not slam a user's door shut (they still expire by their kernel
    /// timeout). If our table exists with a different layout (an older
    /// nxknock), keeping it fails and the table is replaced whole, which
    /// drops its doors — failing closed.
    fn install_guard(&self, services: &[Guarded]) -> Result<(), FirewallError> {
        let t = self.table_ref();
        let body = format!(
            "flush chain {t} input\nflush set {t} guarded\n{}",
            self.rules(services)
        );
        let keep = format!("{}{body}", self.skeleton());
        match self.script(&keep) {
            Ok(()) => {}
            Err(err) => {
                tracing::warn!(cause = %err, table = %t, "cannot reuse our table; replacing it, open doors are dropped");
                // `table X` then `delete table X` deletes it whether or not it
                // existed (nft 1.0.6 has no `destroy`).
                let replace = format!("table {t}\ndelete table {t}\n{}{body}", self.skeleton());
                self.script(&replace)?;
            }
        }
        tracing::info!(table = %t, ?services, "nftables guard installed");
        Ok(())
    }

    /// Adds the element with a fresh timeout. A plain `add element` of an
    /// existing element is not a refresh (measured, nft 1.0.6 on kernel
    /// 6.18): with the same timeout the old expiry stands; only a *different*
    /// timeout restarts the clock (and older kernels ignore it entirely). So
    /// a re-open is `add` (so the delete cannot fail) + `delete` + `add`, in
    /// one transaction: the door never blinks closed.
    fn open(&self, door: &Door) -> Result<(), FirewallError> {
        let (set, key) = Self::element(door)?;
        let t = self.table_ref();
        let ms = door.open_for.as_millis().max(1);
        let script = format!(
            "add element {t} {set} {{ {key} timeout {ms}ms }}\n\
             delete element {t} {set} {{ {key} }}\n\
             add element {t} {set} {{ {key} timeout {ms}ms }}\n"
        );
        self.script(&script)?;
        tracing::debug!(%key, set, open_for_ms = ms as u64, "door opened");
        Ok(())
    }

    /// Deletes the element. A door that already expired is not an error, so
    /// the delete is preceded by a short-lived add in the same transaction.
    fn close(&self, door: &Door) -> Result<(), FirewallError> {
        let (set, key) = Self::element(door)?;
        let t = self.table_ref();
        let script = format!(
            "add element {t} {set} {{ {key} timeout 1s }}\n\
             delete element {t} {set} {{ {key} }}\n"
        );
        self.script(&script)?;
        tracing::debug!(%key, set, "door closed");
        Ok(())
    }

    /// Reads the door sets with `nft -j`. nft 1.0.6 reports `expires` in
    /// whole seconds (rounded down) in JSON, so a door in its last second
    /// shows `expires_in` zero.
    fn list(&self) -> Result<Vec<OpenDoor>, FirewallError> {
        let args = ["-j", "list", "table", FAMILY, &self.table];
        let out = exec::run(NFT, &args, None)?;
        let cmd = format!("{NFT} {}", args.join(" "));
        parse_list(&out).map_err(|detail| FirewallError::Parse { cmd, detail })
    }

    fn uninstall(&self) -> Result<(), FirewallError> {
        let t = self.table_ref();
        self.script(&format!("table {t}\ndelete table {t}\n"))?;
        tracing::info!(table = %t, "nftables table removed");
        Ok(())
    }
}

/// Extracts the doors from `nft -j list table inet nxknock` output.
fn parse_list(json: &str) -> Result<Vec<OpenDoor>, String> {
    let root: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let items = root
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or("no top-level \"nftables\" array")?;
    let mut doors = Vec::new();
    for set in items.iter().filter_map(|i| i.get("set")) {
        let name = set.get("name").and_then(Value::as_str).unwrap_or("");
        if !matches!(name, "doors4" | "doors6" | "doors6host") {
            continue;
        }
        let Some(elems) = set.get("elem").and_then(Value::as_array) else {
            continue; // an empty set has no "elem" key
        };
        for e in elems {
            doors.push(parse_elem(e).map_err(|d| format!("set {name}: {d}: {e}"))?);
        }
    }
    Ok(doors)
}

/// One element: `{"elem": {"val": {"concat": [addr, proto, port]}, "expires": s}}`,
/// where `addr` is a string or `{"prefix": {"addr": …, "len": …}}`.
fn parse_elem(e: &Value) -> Result<OpenDoor, &'static str> {
    let inner = e.get("elem").unwrap_or(e);
    let parts = inner
        .get("val")
        .unwrap_or(inner)
        .get("concat")
        .and_then(Value::as_array)
        .ok_or("no concat value")?;
    let [addr, proto, port] = parts.as_slice() else {
        return Err("expected address . proto . port");
    };
    let (addr, prefix_len) = match addr {
        Value::String(s) => {
            let a: IpAddr = s.parse().map_err(|_| "bad address")?;
            (a, if a.is_ipv4() { 32 } else { 128 })
        }
        other => {
            let p = other
                .get("prefix")
                .ok_or("address is neither string nor prefix")?;
            let a: IpAddr = p
                .get("addr")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok())
                .ok_or("bad prefix address")?;
            let len = p
                .get("len")
                .and_then(Value::as_u64)
                .ok_or("bad prefix length")?;
            (a, u8::try_from(len).map_err(|_| "bad prefix length")?)
        }
    };
    // nft prints the protocol by name, or by number with `-n`.
    let proto = match proto {
        Value::String(s) if s == "tcp" => Proto::Tcp,
        Value::String(s) if s == "udp" => Proto::Udp,
        Value::Number(n) if n.as_u64() == Some(6) => Proto::Tcp,
        Value::Number(n) if n.as_u64() == Some(17) => Proto::Udp,
        _ => return Err("protocol is not tcp or udp"),
    };
    let port = port
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .ok_or("bad port")?;
    let expires = inner.get("expires").and_then(Value::as_f64).unwrap_or(0.0);
    Ok(OpenDoor {
        addr,
        prefix_len,
        proto,
        port,
        expires_in: Duration::try_from_secs_f64(expires).unwrap_or_default(),
        single_use: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from nft 1.0.6 (`nft -j list table inet nxknock`), trimmed.
    const LISTING: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "nxknock", "handle": 2}}, {"set": {"family": "inet", "name": "doors4", "table": "nxknock", "type": ["ipv4_addr", "inet_proto", "inet_service"], "handle": 2, "flags": ["timeout"], "elem": [{"elem": {"val": {"concat": ["198.18.0.2", "tcp", 22]}, "timeout": 30, "expires": 29}}]}}, {"set": {"family": "inet", "name": "doors6", "table": "nxknock", "type": ["ipv6_addr", "inet_proto", "inet_service"], "handle": 3, "flags": ["interval", "timeout"], "elem": [{"elem": {"val": {"concat": [{"prefix": {"addr": "2001:db8:18::", "len": 64}}, "tcp", 22]}, "timeout": 30, "expires": 29}}]}}, {"set": {"family": "inet", "name": "doors6host", "table": "nxknock", "type": ["ipv6_addr", "inet_proto", "inet_service"], "handle": 4, "flags": ["timeout"], "elem": [{"elem": {"val": {"concat": ["2001:db8::1", 17, 53]}, "timeout": 1, "expires": 0}}]}}, {"set": {"family": "inet", "name": "guarded", "table": "nxknock", "type": ["inet_proto", "inet_service"], "handle": 5, "elem": [{"concat": ["tcp", 22]}]}}]}"#;

    #[test]
    fn parses_hosts_prefixes_and_numeric_protocols() {
        let doors = parse_list(LISTING).unwrap();
        assert_eq!(
            doors,
            vec![
                OpenDoor {
                    addr: "198.18.0.2".parse().unwrap(),
                    prefix_len: 32,
                    proto: Proto::Tcp,
                    port: 22,
                    expires_in: Duration::from_secs(29),
                    single_use: false,
                },
                OpenDoor {
                    addr: "2001:db8:18::".parse().unwrap(),
                    prefix_len: 64,
                    proto: Proto::Tcp,
                    port: 22,
                    expires_in: Duration::from_secs(29),
                    single_use: false,
                },
                OpenDoor {
                    addr: "2001:db8::1".parse().unwrap(),
                    prefix_len: 128,
                    proto: Proto::Udp,
                    port: 53,
                    expires_in: Duration::ZERO,
                    single_use: false,
                },
            ]
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_list("not json").is_err());
        assert!(parse_list(r#"{"other": []}"#).is_err());
        let bad = r#"{"nftables": [{"set": {"name": "doors4", "elem": [{"elem": {"val": {"concat": ["x", "tcp", 22]}}}]}}]}"#;
        assert!(parse_list(bad).is_err());
    }

    #[test]
    fn elements_pick_the_right_set() {
        let door = |addr: &str, prefix_len| Door {
            addr: addr.parse().unwrap(),
            prefix_len,
            proto: Proto::Tcp,
            port: 22,
            open_for: Duration::from_secs(30),
            single_use: false,
        };
        let el = |d: Door| NftablesBackend::element(&d).map_err(|e| e.to_string());
        assert_eq!(
            el(door("198.18.0.2", 32)),
            Ok(("doors4", "198.18.0.2 . tcp . 22".into()))
        );
        assert_eq!(
            el(door("2001:db8:18::5", 64)),
            Ok(("doors6", "2001:db8:18::/64 . tcp . 22".into()))
        );
        assert_eq!(
            el(door("2001:db8:18::5", 128)),
            Ok(("doors6host", "2001:db8:18::5 . tcp . 22".into()))
        );
        // What a dual-stack socket reports for an IPv4 client.
        assert_eq!(
            el(door("::ffff:198.18.0.2", 128)),
            Ok(("doors4", "198.18.0.2 . tcp . 22".into()))
        );
        assert!(el(door("198.18.0.0", 24)).is_err());
        assert!(el(door("2001:db8::", 0)).is_err());
        let mut zero = door("198.18.0.2", 32);
        zero.open_for = Duration::ZERO;
        assert!(el(zero).is_err());
    }
}
