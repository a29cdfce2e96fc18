//! `nxknock check-config`: every check `serve` makes before it answers, and every
//! problem found at once, so the operator fixes the file in one go and a systemd
//! `ExecStartPre` refuses exactly what `serve` would refuse.
//!
//! Errors are what `serve` would refuse (a config rule, an unreadable zone, a listen
//! address that cannot be bound, a database that is not safe to open, a missing
//! firewall tool, a hook that cannot run). Warnings are what works but is probably
//! wrong (a zone without NS at its apex, a negative TTL that lets resolvers cache
//! knock answers, a listen address already in use by a running daemon). Nothing here
//! creates a file, a directory or a firewall object.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use hickory_proto::rr::{RData, RecordType};
use hickory_proto::serialize::txt::Parser;

use crate::config::{Config, ConfigError};
use crate::firewall::BackendKind;
use crate::store::{SqliteStore, StoreError};

/// How bad a [`Finding`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// `serve` would refuse to start.
    Error,
    /// `serve` starts, but something is probably wrong.
    Warning,
}

/// One problem, already phrased for the operator (file, line or key, what to do).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    pub message: String,
}

/// Everything `check-config` found; `summary` is set when the config itself parsed.
#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
    /// "zone X, N services" when the zone loaded.
    pub summary: Option<String>,
}

impl Report {
    pub fn errors(&self) -> usize {
        self.findings.iter().filter(|f| f.severity == Severity::Error).count()
    }

    fn error(&mut self, message: String) {
        self.findings.push(Finding { severity: Severity::Error, message });
    }

    fn warn(&mut self, message: String) {
        self.findings.push(Finding { severity: Severity::Warning, message });
    }
}

/// Run every check on the config at `path`.
pub fn check(path: &Path) -> Report {
    let mut report = Report::default();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(source) => {
            report.error(ConfigError::Read { path: path.to_owned(), source }.to_string());
            return report;
        }
    };
    let cfg = match Config::parse(&text, path) {
        Ok(cfg) => cfg,
        Err(e @ ConfigError::Parse { .. }) => {
            report.error(e.to_string());
            return report;
        }
        Err(e) => {
            for p in e.problems() {
                report.error(p.to_string());
            }
            // The rules failed but the file parsed: the other checks still tell
            // the operator something (a zone typo, an unbindable address).
            match Config::parse_unvalidated(&text, path) {
                Ok(cfg) => cfg,
                Err(_) => return report,
            }
        }
    };
    check_zone(&cfg, &mut report);
    check_listen(&cfg, &mut report);
    match &cfg.store.url {
        // Reaching the database is part of the check; a missing schema is created by serve.
        Some(url) => match crate::store::PgStore::open(url, false) {
            Ok(_) => {}
            Err(StoreError::PgInvalid { detail, .. }) if detail.contains("holds no nxknock schema") => {}
            Err(e) => report.error(format!("store.url: {e}")),
        },
        None if cfg.store.path.as_os_str().is_empty() => {}
        None => check_store(&cfg.store.path, &mut report),
    }
    check_backend(&cfg, &mut report);
    check_hooks(&cfg, path, &text, &mut report);
    // The knock ports against this network namespace's ephemeral range, as serve checks.
    if let Some(p) = &cfg.pcap {
        if let Err(e) = crate::capture::check_ephemeral(p, crate::capture::ephemeral_ports()) {
            report.error(e.to_string());
        }
    }
    report
}

/// What `serve` loads ([`crate::dns::Zone::load`]) and what a delegated, unsigned
/// knock zone needs.
fn check_zone(cfg: &Config, report: &mut Report) {
    let zone = match crate::dns::Zone::load(&cfg.dns.zone_file, cfg.dns.zone.as_deref()) {
        Ok(zone) => zone,
        Err(e) => {
            let line = std::fs::read_to_string(&cfg.dns.zone_file)
                .ok()
                .and_then(|text| zone_error_line(&text, &cfg.dns.zone_file, cfg.dns.zone.as_deref()));
            let p = cfg.dns.zone_file.display().to_string();
            let message = match (line, e) {
                (Some(l), crate::dns::ZoneError::Invalid { detail, .. }) => format!("zone file {p}:{l}: {detail}"),
                (_, e) => e.to_string(),
            };
            return report.error(message);
        }
    };
    report.summary = Some(format!("zone {}, {} services", zone.apex, cfg.services.len()));
    let p = cfg.dns.zone_file.display();
    let Ok(text) = std::fs::read_to_string(&cfg.dns.zone_file) else { return };
    let origin = cfg.dns.zone.as_deref().and_then(|o| hickory_proto::rr::Name::from_ascii(o).ok());
    let Ok((apex, records)) = Parser::new(text.clone(), Some(cfg.dns.zone_file.clone()), origin).parse() else {
        return;
    };
    let at_apex = |t: RecordType| records.values().any(|r| r.name() == &apex && r.record_type() == t);
    if !at_apex(RecordType::NS) {
        report.warn(format!(
            "zone file {p}: no NS record at {apex}: the parent zone delegates to NS names, list them here too"
        ));
    }
    let soa = records.values().filter(|r| r.record_type() == RecordType::SOA).flat_map(|r| r.records_without_rrsigs());
    for record in soa {
        if let RData::SOA(s) = &record.data {
            if s.minimum != 0 {
                let line = text.lines().position(|l| l.contains("SOA")).map(|i| i + 1);
                let at = line.map(|l| format!(":{l}")).unwrap_or_default();
                report.warn(format!(
                    "zone file {p}{at}: SOA minimum (negative TTL) is {}: resolvers may cache knock answers; use 0",
                    s.minimum
                ));
            }
        }
    }
    if records.values().any(|r| matches!(r.record_type(), RecordType::DNSKEY | RecordType::NSEC | RecordType::NSEC3)) {
        report.warn(format!(
            "zone file {p}: DNSSEC records: keep the knock zone unsigned (NSEC lets resolvers answer knocks from cache)"
        ));
    }
}

/// The line a zone file's syntax error is on. hickory's parser does not say, so
/// find the shortest head of the file that fails with the same error (a head cut
/// inside a multi-line record fails differently, so it is not mistaken for it).
fn zone_error_line(text: &str, path: &Path, origin: Option<&str>) -> Option<usize> {
    let origin = origin.and_then(|o| hickory_proto::rr::Name::from_ascii(o).ok());
    let parse = |t: String| Parser::new(t, Some(path.to_owned()), origin.clone()).parse().err().map(|e| e.to_string());
    let full = parse(text.to_owned())?;
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() > 5000 {
        return None;
    }
    (1..=lines.len()).find(|&n| parse(lines[..n].join("\n") + "\n").as_ref() == Some(&full))
}

/// `serve` binds every listen address (UDP and TCP) and the metrics address. Plain
/// sockets, never `SO_REUSEPORT`: next to a running daemon (`ExecReload`) a probe
/// joining its reuseport group would take some of its queries for that moment.
fn check_listen(cfg: &Config, report: &mut Report) {
    for addr in &cfg.dns.listen {
        let bound = std::net::UdpSocket::bind(addr).and_then(|u| {
            // Port 0: TCP on the port UDP got, as `serve` does.
            let local = u.local_addr()?;
            std::net::TcpListener::bind(local).map(drop)
        });
        if let Err(e) = bound {
            note_bind(report, "dns.listen", &addr.to_string(), &e);
        }
    }
    if let Some(m) = &cfg.metrics {
        if let Err(e) = std::net::TcpListener::bind(m.listen) {
            note_bind(report, "metrics.listen", &m.listen.to_string(), &e);
        }
    }
}

fn note_bind(report: &mut Report, key: &str, addr: &str, e: &std::io::Error) {
    if e.kind() == ErrorKind::AddrInUse {
        report.warn(format!("{key}: {addr} is in use (by the running nxknock?); serve would fail if it still is"));
    } else {
        report.error(format!("{key}: cannot bind {addr}: {e}"));
    }
}

/// The database: an existing one must be safe to open and have our schema; a
/// missing one needs a place `serve` can create it in.
fn check_store(db: &Path, report: &mut Report) {
    match SqliteStore::open_existing(db) {
        Ok(_) => {}
        Err(StoreError::Missing { .. }) => {
            let mut dir: PathBuf = match db.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
                _ => ".".into(),
            };
            while std::fs::symlink_metadata(&dir).is_err() {
                match dir.parent() {
                    Some(p) if !p.as_os_str().is_empty() => dir = p.to_owned(),
                    _ => break,
                }
            }
            if !writable(&dir) {
                report.error(format!(
                    "store.path: database {} does not exist and {} is not writable: serve cannot create it",
                    db.display(),
                    dir.display()
                ));
            }
        }
        Err(e) => report.error(format!("store.path: {e}")),
    }
}

fn writable(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return false };
    // SAFETY: `c` is a valid NUL-terminated path; access() only reads it.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

/// The firewall tools the backend runs for the guard and listings.
fn check_backend(cfg: &Config, report: &mut Report) {
    let tools: &[&str] = match cfg.firewall.backend {
        BackendKind::Nftables => &["nft"],
        BackendKind::Iptables => &["iptables", "ip6tables", "iptables-restore", "ip6tables-restore", "ipset"],
        BackendKind::None => &[],
    };
    for tool in tools {
        if which(tool).is_none() {
            report.error(format!(
                "firewall.backend: `{tool}` is not in PATH; serve cannot install the {:?} guard",
                cfg.firewall.backend
            ));
        }
    }
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A hook whose program is missing would fail at every door.
fn check_hooks(cfg: &Config, path: &Path, text: &str, report: &mut Report) {
    for (i, s) in cfg.services.iter().enumerate() {
        let Some(program) = s.hook.as_ref().and_then(|h| h.first()) else { continue };
        if Path::new(program).is_absolute() && !is_executable(Path::new(program)) {
            let key = format!("service[{i}].hook");
            let at = line_of(text, &key).map(|l| format!(":{l}")).unwrap_or_default();
            report.error(format!("config {}{at}: {key}: {program} is not an executable file", path.display()));
        }
    }
}

/// The line (1-based) of `key` in a config's text: `table.leaf` is looked up in
/// `[table]`, `service[i].leaf` in the i-th `[[service]]`; a bare `table` or a leaf
/// that is not written (a default) gives the table's header line. `None` when the
/// file says it some other way (inline tables, dotted keys).
pub fn line_of(text: &str, key: &str) -> Option<usize> {
    let (table, leaf) = match key.split_once('.') {
        Some((t, l)) => (t, Some(l)),
        None => (key, None),
    };
    let (name, index) = match table.split_once('[') {
        Some((n, i)) => (n, i.trim_end_matches(']').parse::<usize>().ok()),
        None => (table, None),
    };
    let mut header = None;
    let mut seen = 0usize;
    let mut inside = false;
    for (n, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('[') {
            let arr = l.starts_with("[[");
            let h = l.trim_start_matches('[').split(']').next().unwrap_or("").trim();
            inside = false;
            if h == name {
                match (arr, index) {
                    (true, Some(i)) => {
                        inside = seen == i;
                        seen += 1;
                    }
                    (true, None) => inside = header.is_none(),
                    (false, _) => inside = true,
                }
                if inside {
                    header = Some(n + 1);
                }
            }
            continue;
        }
        if let (true, Some(leaf)) = (inside, leaf) {
            let k = l.split('=').next().unwrap_or("").trim().trim_matches('"');
            if l.contains('=') && k == leaf {
                return Some(n + 1);
            }
        }
    }
    header
}

#[cfg(test)]
mod tests {
    use super::line_of;

    const TEXT: &str = "[dns]\nlisten = []\n\n[firewall]\nbackend = \"none\"\nopen_seconds = 0\n\n\
                        [[service]]\nname = \"ssh\"\nport = 22\n\n[[service]]\nname = \"web\"\nport = 0\n";

    #[test]
    fn keys_are_found_in_their_table() {
        assert_eq!(line_of(TEXT, "dns.listen"), Some(2));
        assert_eq!(line_of(TEXT, "firewall.open_seconds"), Some(6));
        assert_eq!(line_of(TEXT, "service[1].port"), Some(14));
        assert_eq!(line_of(TEXT, "service[0].port"), Some(10));
        // Not written (a default): the table's header.
        assert_eq!(line_of(TEXT, "firewall.always_allow"), Some(4));
        assert_eq!(line_of(TEXT, "service"), Some(8));
        assert_eq!(line_of(TEXT, "token.window"), None);
    }
}
