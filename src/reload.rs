//! SIGHUP: re-read the config file and apply what can change under a running daemon.
//!
//! Applied in place, by the verify thread between two knocks (so no knock sees half
//! of a config): the services (the guard is re-installed in one firewall
//! transaction, open doors kept), `open_seconds`, `always_allow`, the token policy
//! (`window`, `max_age_seconds`, `grace_seconds`, `plain`, `ecs_from`) and
//! `knocks_per_source`. Chains, door records and kernel doors are never touched: a
//! reload loses no state.
//!
//! Needs a restart, and is logged and left as it was: what is bound, loaded or
//! claimed once at start — the listen addresses, the zone, `whoami`, the TCP
//! timeout, the database, the firewall backend, the metrics address, the log format.
//!
//! A file that does not parse or breaks a rule is refused whole, with the reason in
//! the log; so is one whose guard the firewall refuses (the old guard is put back).
//! Either way the daemon keeps serving on the config it had.

use std::time::Duration;

use crate::config::Config;
use crate::doors::Doors;
use crate::knock::Knock;
use crate::limit::DeepQueue;
use crate::verify::Verifier;

/// A new config for the verify thread, and where it says whether it took.
pub struct Request {
    pub config: Config,
    pub reply: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// The keys whose change needs a restart and differ between `old` and `new`.
pub fn restart_only(old: &Config, new: &Config) -> Vec<&'static str> {
    let (o, n) = (&old.dns, &new.dns);
    [
        ("dns.listen", o.listen != n.listen),
        ("dns.zone_file", o.zone_file != n.zone_file),
        ("dns.zone", o.zone != n.zone),
        ("dns.whoami", o.whoami != n.whoami),
        ("dns.tcp_timeout_seconds", o.tcp_timeout_seconds != n.tcp_timeout_seconds),
        ("dns.rrl_per_second", o.rrl_per_second != n.rrl_per_second),
        ("dns.rrl_slip", o.rrl_slip != n.rrl_slip),
        ("store.path", old.store.path != new.store.path),
        ("store.url", old.store.url != new.store.url),
        ("firewall.backend", old.firewall.backend != new.firewall.backend),
        ("metrics", old.metrics != new.metrics),
        ("log.format", old.log.format != new.log.format),
        ("pcap", old.pcap != new.pcap),
        ("daemon", old.daemon != new.daemon),
    ]
    .into_iter()
    .filter_map(|(k, changed)| changed.then_some(k))
    .collect()
}

/// `new` with `old`'s value for every key [`restart_only`] names: the config the
/// running daemon actually applies (and compares the next reload with).
pub fn applicable(old: &Config, new: Config) -> Config {
    let mut c = new;
    let knocks_per_source = c.dns.knocks_per_source;
    c.dns = old.dns.clone();
    c.dns.knocks_per_source = knocks_per_source;
    c.store = old.store.clone();
    c.firewall.backend = old.firewall.backend;
    c.metrics = old.metrics.clone();
    c.log.format = old.log.format;
    c.pcap = old.pcap.clone();
    c.daemon = old.daemon.clone();
    c
}

/// On the verify thread: the firewall first (the only step that can fail), then the
/// verifier's policy and the deep queue's budget.
pub fn apply(
    cfg: &Config,
    verifier: &mut Verifier,
    doors: &mut Doors,
    deep: &mut DeepQueue<Knock>,
) -> Result<(), String> {
    doors.reconfigure(cfg).map_err(|e| format!("the firewall refused the new guard ({e}); the old one is kept"))?;
    verifier.reconfigure(cfg);
    deep.set_rate(cfg.dns.knocks_per_source);
    Ok(())
}

/// After this long without an answer from the verify thread (it looks when idle,
/// at least every 200 ms, and every 256 knocks; a guard install spawns `nft`),
/// `serve` says it is still waiting.
pub const APPLY_WITHIN: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(extra: &str) -> Config {
        let text = format!(
            "[dns]\nzone_file = \"z\"\nlisten = [\"127.0.0.1:53\"]\n[store]\npath = \"db\"\n[firewall]\n\
             backend = \"none\"\n[[service]]\nname = \"ssh\"\nproto = \"tcp\"\nport = 22\n{extra}"
        );
        Config::parse(&text, Path::new("/etc/nxknock/nxknock.toml")).unwrap()
    }

    #[test]
    fn listen_changes_wait_for_a_restart_and_the_rest_applies() {
        let old = cfg("");
        let mut new = cfg("[[service]]\nname = \"web\"\nproto = \"tcp\"\nport = 80\n");
        new.dns.listen = vec!["127.0.0.1:5353".parse().unwrap()];
        new.dns.knocks_per_source = 7;
        new.firewall.open_seconds = 9;
        assert_eq!(restart_only(&old, &new), vec!["dns.listen"]);
        // The capture listener and RRL are built once too: their changes wait as well.
        let mut pcap = old.clone();
        pcap.pcap = Some(crate::config::PcapConfig { udp_port: Some(62201), ..Default::default() });
        pcap.dns.rrl_per_second = 5;
        assert_eq!(restart_only(&old, &pcap), vec!["dns.rrl_per_second", "pcap"]);
        assert_eq!(applicable(&old, pcap.clone()).pcap, old.pcap);
        let applied = applicable(&old, new);
        assert_eq!(applied.dns.listen, old.dns.listen, "listen kept");
        assert_eq!((applied.dns.knocks_per_source, applied.firewall.open_seconds), (7, 9));
        assert_eq!(applied.services.len(), 2);
        assert!(restart_only(&old, &applied).is_empty());
    }
}
