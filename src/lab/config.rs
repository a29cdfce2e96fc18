//! Daemon configs for the lab, built as typed [`Config`] values.
//!
//! The demo, the tests and the benchmark each used to write the TOML by hand;
//! now they start from [`ConfigBuilder::new`] (the lab's server on port 53, the
//! lab zone, ssh on tcp/22) and change only what they need, and
//! [`crate::config`] serializes it. So a new config key is one edit there, and a
//! harness cannot drift from what the parser accepts.
//!
//! [`ConfigBuilder::raw`] is the escape hatch for what a typed value cannot say
//! (an unknown key, a wrong type: tests of the parser's refusals).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::SERVER_V4;
use crate::config::{Config, DnsConfig, FirewallConfig, PlainPolicy, ServiceConfig, StoreConfig, TokenConfig};
use crate::firewall::{BackendKind, Proto};
use crate::netaddr::Prefix;

/// The lab's knock zone.
pub const ZONE: &str = "knock.example.com";
/// Its zone file, as shipped in `zones/` (built in, so the installed demo has it).
pub const ZONE_TEXT: &str = include_str!("../../zones/knock.example.com.zone");
/// The zone file's name next to a written config.
pub const ZONE_FILE: &str = "knock.example.com.zone";
/// The database's name next to a written config.
pub const STORE_FILE: &str = "nxknock.db";

/// Writes [`ZONE_TEXT`] as `dir/`[`ZONE_FILE`] and returns its path.
pub fn write_zone(dir: &Path) -> anyhow::Result<PathBuf> {
    let p = dir.join(ZONE_FILE);
    std::fs::write(&p, ZONE_TEXT).with_context(|| format!("write {}", p.display()))?;
    Ok(p)
}

/// ssh on tcp/22, the service every lab config guards unless told otherwise.
pub fn ssh() -> ServiceConfig {
    ServiceConfig::new("ssh", Proto::Tcp, 22)
}

/// A daemon config in the making; see the module docs.
#[derive(Clone, Debug)]
pub struct ConfigBuilder {
    config: Config,
    raw: Vec<String>,
}

impl ConfigBuilder {
    /// `backend`, listening on the lab server's port 53, serving [`ZONE_FILE`]
    /// and storing in [`STORE_FILE`] (both next to the written config), doors
    /// open 30 s, guarding [`ssh`]; every other key at its default.
    pub fn new(backend: BackendKind) -> ConfigBuilder {
        let config = Config {
            dns: DnsConfig::new(ZONE_FILE, vec![SocketAddr::new(IpAddr::V4(SERVER_V4), 53)]),
            store: StoreConfig { path: STORE_FILE.into(), url: None },
            firewall: FirewallConfig::new(backend),
            token: TokenConfig::default(),
            services: vec![ssh()],
            pcap: None,
            metrics: None,
            daemon: None,
            log: Default::default(),
        };
        ConfigBuilder { config, raw: Vec::new() }
    }

    /// Adds a `[pcap]` listener.
    pub fn pcap(mut self, pcap: crate::config::PcapConfig) -> Self {
        self.config.pcap = Some(pcap);
        self
    }

    pub fn open_seconds(mut self, seconds: u64) -> Self {
        self.config.firewall.open_seconds = seconds;
        self
    }

    /// Replaces the listen addresses.
    pub fn listen(mut self, addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.config.dns.listen = addrs.into_iter().collect();
        self
    }

    /// Adds a listen address.
    pub fn also_listen(mut self, addr: SocketAddr) -> Self {
        self.config.dns.listen.push(addr);
        self
    }

    /// The database path (relative: to the config's directory).
    pub fn store(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.store.path = path.into();
        self
    }

    /// Store in the PostgreSQL database at `url` instead of a file.
    pub fn store_url(mut self, url: &str) -> Self {
        self.config.store = StoreConfig { path: PathBuf::new(), url: Some(crate::config::StoreUrl::new(url)) };
        self
    }

    pub fn whoami(mut self, on: bool) -> Self {
        self.config.dns.whoami = on;
        self
    }

    pub fn knocks_per_source(mut self, n: u32) -> Self {
        self.config.dns.knocks_per_source = n;
        self
    }

    pub fn plain(mut self, policy: PlainPolicy) -> Self {
        self.config.token.plain = policy;
        self
    }

    pub fn ecs_from(mut self, resolvers: impl IntoIterator<Item = Prefix>) -> Self {
        self.config.token.ecs_from = resolvers.into_iter().collect();
        self
    }

    /// Replaces the guarded services.
    pub fn services(mut self, services: impl IntoIterator<Item = ServiceConfig>) -> Self {
        self.config.services = services.into_iter().collect();
        self
    }

    /// Adds a guarded service.
    pub fn service(mut self, service: ServiceConfig) -> Self {
        self.config.services.push(service);
        self
    }

    /// TOML merged over the typed config when it is written: tables merge key by
    /// key (`"[firewall]\nopen_secs = 5"` adds a key to `[firewall]`), anything
    /// else replaces. For what [`Config`] cannot hold; it must parse as TOML.
    pub fn raw(mut self, toml: &str) -> Self {
        self.raw.push(toml.to_owned());
        self
    }

    /// The typed config, for keys without a method here.
    pub fn config_mut(&mut self) -> &mut Config {
        &mut self.config
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The config file's text.
    pub fn toml(&self) -> anyhow::Result<String> {
        let mut table = toml::Table::try_from(&self.config).context("serialize the config")?;
        for raw in &self.raw {
            let extra: toml::Table = raw.parse().with_context(|| format!("raw TOML {raw:?}"))?;
            merge(&mut table, extra);
        }
        Ok(toml::to_string(&table)?)
    }

    /// Writes the config to `path` and the lab zone next to it (see [`write_zone`]).
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        write_zone(path.parent().unwrap_or(Path::new(".")))?;
        std::fs::write(path, self.toml()?).with_context(|| format!("write {}", path.display()))
    }
}

/// `extra` over `base`: tables merge recursively, other values replace.
fn merge(base: &mut toml::Table, extra: toml::Table) {
    for (k, v) in extra {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(e)) => merge(b, e),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(b: &ConfigBuilder) -> Result<Config, crate::config::ConfigError> {
        Config::parse(&b.toml().unwrap(), Path::new("/lab/nxknock.toml"))
    }

    #[test]
    fn default_config_parses_with_paths_next_to_it() {
        let c = parse(&ConfigBuilder::new(BackendKind::Nftables)).unwrap();
        assert_eq!(c.dns.zone_file, Path::new("/lab/knock.example.com.zone"));
        assert_eq!(c.store.path, Path::new("/lab/nxknock.db"));
        assert_eq!(c.dns.listen, vec!["198.18.0.1:53".parse().unwrap()]);
        assert_eq!((c.firewall.open_seconds, c.services.len()), (30, 1));
        assert_eq!(c.service("ssh"), Some(&ssh()));
        assert_eq!(ZONE_TEXT.lines().find(|l| l.starts_with("$ORIGIN")), Some(format!("$ORIGIN {ZONE}.").as_str()));
    }

    #[test]
    fn typed_changes_reach_the_daemon() {
        let b = ConfigBuilder::new(BackendKind::Iptables)
            .open_seconds(3)
            .also_listen("[2001:db8:18::1]:53".parse().unwrap())
            .whoami(true)
            .knocks_per_source(0)
            .plain(PlainPolicy::Ecs)
            .ecs_from(["198.18.0.4/32".parse().unwrap()])
            .service(ServiceConfig { single_use: true, ..ServiceConfig::new("web", Proto::Tcp, 80) });
        let c = parse(&b).unwrap();
        assert_eq!((c.firewall.backend, c.firewall.open_seconds), (BackendKind::Iptables, 3));
        assert_eq!(c.dns.listen.len(), 2);
        assert!(c.dns.whoami && c.dns.knocks_per_source == 0);
        assert_eq!(c.token.plain, PlainPolicy::Ecs);
        assert!(c.service("web").unwrap().single_use);
    }

    #[test]
    fn raw_toml_merges_into_its_table() {
        let b = ConfigBuilder::new(BackendKind::None).raw("[firewall]\nopen_secs = 5");
        let text = b.toml().unwrap();
        assert!(text.contains("backend = \"none\""), "{text}");
        let e = parse(&b).unwrap_err().to_string();
        assert!(e.contains("open_secs"), "{e}");
        let c = parse(&ConfigBuilder::new(BackendKind::None).raw("[dns]\nwhoami = true")).unwrap();
        assert!(c.dns.whoami);
    }
}
