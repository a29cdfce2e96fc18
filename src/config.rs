//! The operator's TOML configuration.
//!
//! Unknown keys are errors (a typo in a security daemon's config must not be
//! silently ignored), and every error names the file, the key and what was
//! expected. Relative paths are resolved against the config file's directory so
//! the daemon behaves the same from any working directory.
//!
//! The types also serialize back to TOML, so harnesses (`nxknock demo`, the tests,
//! the benchmark: see [`crate::lab::config`]) build configs as typed values and
//! a new key is one edit here. Paths are written as they are held: a config that was
//! loaded has absolute paths and means the same wherever it is written; relative ones
//! are resolved against the directory of the file they are written to.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::firewall::{BackendKind, Proto};
use crate::netaddr::Prefix;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub dns: DnsConfig,
    pub store: StoreConfig,
    pub firewall: FirewallConfig,
    #[serde(default)]
    pub token: TokenConfig,
    #[serde(rename = "service", default)]
    pub services: Vec<ServiceConfig>,
    /// The capture listener (UDP, port-sequence and passive DNS knocks); absent = no capture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcap: Option<PcapConfig>,
    /// Prometheus text at `/metrics`; off unless configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    /// `[daemon]`: how `serve` runs once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon: Option<DaemonConfig>,
    #[serde(default, skip_serializing_if = "LogConfig::is_default")]
    pub log: LogConfig,
}

/// `[daemon]`: what `serve` becomes once its sockets, captures and guard are set up.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Run as this user (its primary group, no supplementary groups), keeping only
    /// the three network capabilities, so that neither the daemon nor its hooks can
    /// read or write root's files. The database must stay readable and writable to
    /// it through the descriptors opened before the switch (ARCHITECTURE.md, "Privileges").
    pub user: String,
}

/// `[metrics]`: where to serve Prometheus text. Counters tell how busy the daemon is
/// and why knocks were refused, which is reconnaissance an outsider should not get:
/// only a loopback address is accepted unless `allow_remote` says otherwise.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// e.g. `"127.0.0.1:9153"`.
    pub listen: SocketAddr,
    /// Accept a non-loopback `listen` (behind your own firewall).
    #[serde(default)]
    pub allow_remote: bool,
}

/// `[log]`: how the daemon writes its log (stderr).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `"text"` (default) or `"json"` (one object a line); `--log-format` overrides it.
    #[serde(default)]
    pub format: LogFormat,
    /// Refused knocks that match no chain (random tokens from the internet, look-alikes)
    /// are not logged one by one: they are counted and summed up at info once per this
    /// many seconds, if any came.
    #[serde(default = "default_summary_seconds")]
    pub summary_seconds: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, summary_seconds: default_summary_seconds() }
    }
}

impl LogConfig {
    fn is_default(&self) -> bool {
        self.format == LogFormat::Text && self.summary_seconds == default_summary_seconds()
    }
}

/// `[pcap]`: knocks read off the wire with libpcap (ARCHITECTURE.md, "The capture
/// listener"). Each knock kind is on when its key is set.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PcapConfig {
    /// Interfaces to capture on; `any` is every interface.
    #[serde(default = "default_interfaces")]
    pub interfaces: Vec<String>,
    /// Closed UDP port that takes single-datagram bound knocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_port: Option<u16>,
    /// Closed port range `"LO-HI"` for port-sequence knocks (TCP SYNs or UDP datagrams).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence_ports: Option<String>,
    /// Read knock queries sent to another nameserver on this host (port 53).
    #[serde(default)]
    pub passive_dns: bool,
    /// Bad direct knocks (UDP or sequence) from one source, within a minute, before
    /// the source is blocked; 0 = never block. DNS knocks never count.
    #[serde(default = "default_block_after")]
    pub block_after: u32,
    /// How long a block lasts (in the kernel, like a door).
    #[serde(default = "default_block_seconds")]
    pub block_seconds: u64,
}

impl Default for PcapConfig {
    fn default() -> Self {
        PcapConfig {
            interfaces: default_interfaces(),
            udp_port: None,
            sequence_ports: None,
            passive_dns: false,
            block_after: default_block_after(),
            block_seconds: default_block_seconds(),
        }
    }
}

impl PcapConfig {
    /// Ports of this host that take direct knocks (inclusive ranges).
    pub fn knock_ports(&self) -> Vec<(u16, u16)> {
        let mut ports: Vec<(u16, u16)> = self.udp_port.map(|p| (p, p)).into_iter().collect();
        ports.extend(self.sequence_code().map(|c| c.range()));
        ports
    }

    /// The port-sequence code, if sequences are on (validated at load).
    pub fn sequence_code(&self) -> Option<crate::token::SequenceCode> {
        self.sequence_ports.as_deref().and_then(|r| crate::token::SequenceCode::parse(r).ok())
    }
}

/// The port passive mode reads DNS queries on.
pub const PASSIVE_DNS_PORT: u16 = 53;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Zone file (SOA, NS, glue, static records) served with AA.
    pub zone_file: PathBuf,
    /// Zone apex; if absent, the zone file's `$ORIGIN` is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// UDP and TCP listen addresses.
    pub listen: Vec<SocketAddr>,
    /// Answer `whoami.<zone>` TXT with the address the query came from, so
    /// `nxknock knock --ip auto` can learn its public address. Off by default.
    #[serde(default)]
    pub whoami: bool,
    /// Deep walks (knocks that are not a user's next element: random tokens, skipped
    /// elements) per second for one source (an IPv4 address or IPv6 /64) and knock
    /// form, bursts up to twice that; beyond it they are answered as always but not
    /// walked. A next-element knock never needs one. 0 = no limit.
    #[serde(default = "default_knocks_per_source")]
    pub knocks_per_source: u32,
    /// Seconds an idle TCP connection may stay open.
    #[serde(default = "default_tcp_timeout")]
    pub tcp_timeout_seconds: u64,
    /// Response rate limiting: the zone's ordinary UDP answers (not knock answers)
    /// per second to one source network (IPv4 /24, IPv6 /56); 0 = no limit.
    #[serde(default = "default_rrl_per_second")]
    pub rrl_per_second: u32,
    /// Over that rate, every this-many-th answer is sent truncated (the client
    /// retries over TCP) and the rest dropped; 0 = drop them all.
    #[serde(default = "default_rrl_slip")]
    pub rrl_slip: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// The embedded SQLite file (one nameserver). Exactly one of `path` and `url`.
    #[serde(default, skip_serializing_if = "path_is_unset")]
    pub path: PathBuf,
    /// A PostgreSQL database shared by several nameservers and door agents
    /// (`postgres://user@host/db`). Exactly one of `path` and `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<StoreUrl>,
}

fn path_is_unset(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

impl StoreConfig {
    /// The SQLite file, if this store is one.
    pub fn sqlite_path(&self) -> Option<&Path> {
        (self.url.is_none()).then_some(self.path.as_path())
    }
}

/// A PostgreSQL connection URL. It may hold a password, so `Debug` and
/// [`StoreUrl::redacted`] show it without one; only the store reads the full text.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct StoreUrl(String);

impl StoreUrl {
    pub fn new(url: impl Into<String>) -> StoreUrl {
        StoreUrl(url.into())
    }

    /// The URL as written, password included: for the PostgreSQL client only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`, for messages and logs.
    pub fn redacted(&self) -> String {
        let s = &self.0;
        let Some(scheme_end) = s.find("://") else { return s.clone() };
        let rest = &s[scheme_end + 3..];
        let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let Some(at) = rest[..auth_end].rfind('@') else {
            return redact_query_password(s);
        };
        let userinfo = &rest[..at];
        let user = userinfo.split(':').next().unwrap_or("");
        let shown = if userinfo.contains(':') { format!("{user}:***") } else { user.to_owned() };
        redact_query_password(&format!("{}{shown}{}", &s[..scheme_end + 3], &rest[at..]))
    }
}

/// `password=` in the query string is a password too.
fn redact_query_password(s: &str) -> String {
    let Some(q) = s.find('?') else { return s.to_owned() };
    let pairs: Vec<String> = s[q + 1..]
        .split('&')
        .map(|kv| if kv.starts_with("password=") { "password=***".to_owned() } else { kv.to_owned() })
        .collect();
    format!("{}?{}", &s[..q], pairs.join("&"))
}

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallConfig {
    pub backend: BackendKind,
    /// How long a door admits new connections.
    #[serde(default = "default_open_seconds")]
    pub open_seconds: u64,
    /// Sources the guard never drops (a management network): new connections from
    /// them reach the guarded ports without a knock. Empty by default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub always_allow: Vec<Prefix>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// How many chain elements a knock may skip ahead (lost knocks, unused OTP names).
    #[serde(default = "default_window")]
    pub window: u32,
    /// Bound knocks older (or newer) than this are refused.
    #[serde(default = "default_max_age")]
    pub max_age_seconds: u64,
    /// A repeat of an accepted token within this time is a silent no-op (resolver retries).
    #[serde(default = "default_grace")]
    pub grace_seconds: u64,
    /// What a plain knock (bare chain element, e.g. from `dig`) opens for.
    #[serde(default)]
    pub plain: PlainPolicy,
    /// Resolvers whose EDNS Client Subnet is believed (with `plain = "ecs"`). ECS is a
    /// claim by whoever sent the query, so it is ignored from everyone else. Empty by default.
    #[serde(default)]
    pub ecs_from: Vec<Prefix>,
}

/// Where a plain knock's door goes. Bound knocks always open for their embedded address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlainPolicy {
    /// The address the query came from: the client's, or its resolver's (COK behaviour;
    /// right where the resolver shares the users' public address).
    #[default]
    Source,
    /// The EDNS Client Subnet prefix the resolver forwarded; nothing without ECS.
    Ecs,
    /// Plain knocks open nothing: only bound knocks count.
    Off,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            window: default_window(),
            max_age_seconds: default_max_age(),
            grace_seconds: default_grace(),
            plain: PlainPolicy::default(),
            ecs_from: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    pub proto: Proto,
    pub port: u16,
    /// Doorman's narrowing: the first admitted new connection consumes the door.
    #[serde(default)]
    pub single_use: bool,
    /// Program (absolute path) and arguments run when a door of this service opens
    /// or is closed by a close knock; never through a shell. Placeholders in the
    /// arguments: {event} {user} {service} {addr} {prefix} {proto} {port} {seconds} {via}.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<Vec<String>>,
    /// The hook is killed after this many seconds.
    #[serde(default = "default_hook_timeout")]
    pub hook_timeout_seconds: u64,
    /// Protected hosts this service lives on (each runs `nxknock agent` with
    /// `[agent] name` one of these); the nameserver records a door grant for each
    /// and opens nothing itself. Empty: the service lives on the nameserver's host.
    /// Needs `[store] url`: grants travel through the shared database.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

/// Host names (`[[service]] hosts`, `[agent] name`) go into door records and logs.
pub fn valid_host_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || b".-_".contains(&c))
}

impl DnsConfig {
    /// Serve `zone_file` on `listen`; every other key at its default.
    pub fn new(zone_file: impl Into<PathBuf>, listen: Vec<SocketAddr>) -> DnsConfig {
        DnsConfig {
            zone_file: zone_file.into(),
            zone: None,
            listen,
            whoami: false,
            knocks_per_source: default_knocks_per_source(),
            tcp_timeout_seconds: default_tcp_timeout(),
            rrl_per_second: default_rrl_per_second(),
            rrl_slip: default_rrl_slip(),
        }
    }
}

impl FirewallConfig {
    /// `backend` with the default door time.
    pub fn new(backend: BackendKind) -> FirewallConfig {
        FirewallConfig { backend, open_seconds: default_open_seconds(), always_allow: Vec::new() }
    }
}

impl ServiceConfig {
    /// Guard `proto/port` as `name`; no single use, no hook.
    pub fn new(name: &str, proto: Proto, port: u16) -> ServiceConfig {
        ServiceConfig {
            name: name.to_owned(),
            proto,
            port,
            single_use: false,
            hook: None,
            hook_timeout_seconds: default_hook_timeout(),
            hosts: Vec::new(),
        }
    }
}

fn default_rrl_per_second() -> u32 {
    20
}
fn default_rrl_slip() -> u32 {
    2
}
fn default_interfaces() -> Vec<String> {
    vec!["any".to_owned()]
}
fn default_block_after() -> u32 {
    5
}
fn default_block_seconds() -> u64 {
    600
}
fn default_tcp_timeout() -> u64 {
    5
}
fn default_open_seconds() -> u64 {
    30
}
fn default_knocks_per_source() -> u32 {
    50
}
fn default_hook_timeout() -> u64 {
    5
}
fn default_window() -> u32 {
    32
}
fn default_max_age() -> u64 {
    120
}
fn default_grace() -> u64 {
    60
}
fn default_summary_seconds() -> u64 {
    60
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value the parser read but the rules refuse; `line` is where the key (or its
    /// table) is in the file, when it could be found.
    #[error("config {}: {key}: {expected}", at(path, *line))]
    Invalid { path: PathBuf, line: Option<usize>, key: String, expected: String },
    /// Several [`ConfigError::Invalid`], one a line: every problem at once, so the
    /// operator fixes the file in one go.
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Many(Vec<ConfigError>),
}

/// `path` or `path:line`.
fn at(path: &Path, line: Option<usize>) -> String {
    match line {
        Some(l) => format!("{}:{l}", path.display()),
        None => path.display().to_string(),
    }
}

impl ConfigError {
    /// The single problems inside (one for everything but [`ConfigError::Many`]).
    pub fn problems(&self) -> Vec<&ConfigError> {
        match self {
            ConfigError::Many(v) => v.iter().collect(),
            e => vec![e],
        }
    }
}

impl Config {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::parse(&text, path)
    }

    /// Parse `text` as if read from `path` (used for relative paths and messages).
    /// Every rule is checked; several broken ones come back together as
    /// [`ConfigError::Many`].
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg = Config::parse_unvalidated(text, path)?;
        let mut problems: Vec<ConfigError> = cfg
            .problems()
            .into_iter()
            .map(|(key, expected)| ConfigError::Invalid {
                path: path.to_owned(),
                line: crate::check::line_of(text, &key),
                key,
                expected,
            })
            .collect();
        match problems.len() {
            0 => Ok(cfg),
            1 => Err(problems.remove(0)),
            _ => Err(ConfigError::Many(problems)),
        }
    }

    /// Parse without the rules (for `check-config`, which reports the rules itself
    /// and goes on to check the zone, the listen addresses, the store).
    pub(crate) fn parse_unvalidated(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string().trim_end().to_owned() })?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.dns.zone_file = base.join(&cfg.dns.zone_file);
        if !cfg.store.path.as_os_str().is_empty() {
            cfg.store.path = base.join(&cfg.store.path);
        }
        Ok(cfg)
    }

    /// Every rule the parser cannot express, as (key, what was expected).
    fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut bad = |key: &str, expected: String| out.push((key.to_owned(), expected));
        match (self.store.path.as_os_str().is_empty(), &self.store.url) {
            (true, None) => bad(
                "store.path",
                "a database file such as \"/var/lib/nxknock/nxknock.db\", or [store] url = \"postgres://…\"".into(),
            ),
            (false, Some(_)) => {
                bad("store.url", "either [store] path (SQLite) or [store] url (PostgreSQL), not both".into())
            }
            (true, Some(url)) => {
                if let Err(why) = crate::store::check_url(url) {
                    bad("store.url", why);
                }
            }
            (false, None) => {}
        }
        if self.dns.listen.is_empty() && self.pcap.is_none() {
            bad(
                "dns.listen",
                "at least one address such as \"0.0.0.0:53\" (an empty list needs a [pcap] listener)".into(),
            );
        }
        if let Some(p) = &self.pcap {
            if let Err((key, expected)) = self.validate_pcap(p) {
                bad(&format!("pcap.{key}"), expected);
            }
        }
        if !(1..=86_400).contains(&self.firewall.open_seconds) {
            bad("firewall.open_seconds", format!("between 1 and 86400, got {}", self.firewall.open_seconds));
        }
        if !(1..=1024).contains(&self.token.window) {
            bad("token.window", format!("between 1 and 1024, got {}", self.token.window));
        }
        if !(1..=3600).contains(&self.token.max_age_seconds) {
            bad("token.max_age_seconds", format!("between 1 and 3600, got {}", self.token.max_age_seconds));
        }
        if self.token.plain == PlainPolicy::Ecs && self.token.ecs_from.is_empty() {
            bad(
                "token.ecs_from",
                "the resolvers whose EDNS Client Subnet to believe, e.g. [\"192.0.2.53/32\"], with plain = \"ecs\""
                    .into(),
            );
        }
        for net in &self.firewall.always_allow {
            if net.len() == 0 {
                bad(
                    "firewall.always_allow",
                    format!("networks of your own, got {net}, which lets everyone past the guard"),
                );
            }
        }
        if let Some(m) = &self.metrics {
            if !m.listen.ip().is_loopback() && !m.allow_remote {
                bad(
                    "metrics.listen",
                    format!(
                        "a loopback address such as \"127.0.0.1:9153\", got {} (set allow_remote = true to serve \
                         metrics beyond this host)",
                        m.listen
                    ),
                );
            }
        }
        if !(1..=86_400).contains(&self.log.summary_seconds) {
            bad("log.summary_seconds", format!("between 1 and 86400, got {}", self.log.summary_seconds));
        }
        if self.services.is_empty() {
            bad("service", "at least one [[service]] with name, proto and port".into());
        }
        let mut names = HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            if s.name.is_empty() || !s.name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_') {
                bad(&format!("service[{i}].name"), format!("letters, digits, '-' or '_', got {:?}", s.name));
            } else if !names.insert(s.name.as_str()) {
                bad(&format!("service[{i}].name"), format!("a unique name, {:?} appears twice", s.name));
            }
            if s.port == 0 {
                bad(&format!("service[{i}].port"), "a port between 1 and 65535, got 0".into());
            }
            if let Some(h) = s.hosts.iter().find(|h| !valid_host_name(h)) {
                bad(
                    &format!("service[{i}].hosts"),
                    format!("host names of letters, digits, '.', '-' or '_' (as in [agent] name), got {h:?}"),
                );
            } else if !s.hosts.is_empty() && self.store.url.is_none() {
                bad(
                    &format!("service[{i}].hosts"),
                    "[store] url: door grants reach other hosts through a shared PostgreSQL database".into(),
                );
            }
            if let Some(hook) = &s.hook {
                if hook.first().is_none_or(|p| !Path::new(p).is_absolute()) {
                    bad(&format!("service[{i}].hook"), "[\"/absolute/path/to/program\", \"arg\", …]".into());
                }
            }
            if !(1..=300).contains(&s.hook_timeout_seconds) {
                bad(
                    &format!("service[{i}].hook_timeout_seconds"),
                    format!("between 1 and 300, got {}", s.hook_timeout_seconds),
                );
            }
        }
        out
    }

    fn validate_pcap(&self, p: &PcapConfig) -> Result<(), (&'static str, String)> {
        if p.udp_port.is_none() && p.sequence_ports.is_none() && !p.passive_dns {
            return Err(("udp_port", "[pcap] enables no knock: set udp_port, sequence_ports or passive_dns".into()));
        }
        if p.interfaces.is_empty() || p.interfaces.iter().any(|i| i.is_empty() || i.len() > 15 || i.contains('/')) {
            return Err((
                "interfaces",
                format!("interface names such as [\"eth0\"] or [\"any\"], got {:?}", p.interfaces),
            ));
        }
        let code = match &p.sequence_ports {
            Some(r) => Some(crate::token::SequenceCode::parse(r).map_err(|e| ("sequence_ports", e.to_string()))?),
            None => None,
        };
        let in_seq = |port: u16| code.is_some_and(|c| (c.range().0..=c.range().1).contains(&port));
        if let Some(u) = p.udp_port {
            if u == 0 || in_seq(u) || (p.passive_dns && u == PASSIVE_DNS_PORT) {
                return Err(("udp_port", format!("a port of its own (not 0, DNS or in sequence_ports), got {u}")));
            }
        }
        if let Some(s) = self.services.iter().find(|s| in_seq(s.port) || p.udp_port == Some(s.port)) {
            return Err((
                "sequence_ports",
                format!("ports apart from the guarded services; {} uses {}", s.name, s.port),
            ));
        }
        if let Some(l) = self.dns.listen.iter().find(|l| in_seq(l.port()) || p.udp_port == Some(l.port())) {
            return Err(("sequence_ports", format!("ports apart from dns.listen ({l})")));
        }
        if p.passive_dns && self.dns.listen.iter().any(|l| l.port() == PASSIVE_DNS_PORT) {
            return Err((
                "passive_dns",
                "passive mode reads queries for another nameserver on port 53; with nxknock listening there too \
                 every knock would be seen twice: set [dns] listen = [] (or another port)"
                    .into(),
            ));
        }
        if !(1..=86_400).contains(&p.block_seconds) {
            return Err(("block_seconds", format!("between 1 and 86400, got {}", p.block_seconds)));
        }
        Ok(())
    }

    /// The service with this name.
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[dns]
zone_file = "zones/z.zone"
listen = ["127.0.0.1:5353"]
[store]
path = "state/nxknock.db"
[firewall]
backend = "nftables"
open_seconds = 10
[[service]]
name = "ssh"
proto = "tcp"
port = 22
"#;

    fn err(text: &str) -> String {
        Config::parse(text, Path::new("/etc/nxknock/nxknock.toml")).unwrap_err().to_string()
    }

    #[test]
    fn good_config_resolves_paths_against_its_directory() {
        let c = Config::parse(GOOD, Path::new("/etc/nxknock/nxknock.toml")).unwrap();
        assert_eq!(c.dns.zone_file, Path::new("/etc/nxknock/zones/z.zone"));
        assert_eq!(c.store.path, Path::new("/etc/nxknock/state/nxknock.db"));
        assert_eq!(c.firewall.backend, BackendKind::Nftables);
        assert_eq!(c.token.window, 32);
        assert_eq!(c.service("ssh").unwrap().port, 22);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&GOOD.replace("open_seconds = 10", "open_seconds = 10\nopen_secs = 5"));
        assert!(e.contains("/etc/nxknock/nxknock.toml") && e.contains("open_secs"), "{e}");
    }

    #[test]
    fn wrong_type_names_key_and_expectation() {
        let e = err(&GOOD.replace("open_seconds = 10", "open_seconds = \"ten\""));
        assert!(e.contains("open_seconds") && e.contains("expected u64"), "{e}");
        let e = err(&GOOD.replace("backend = \"nftables\"", "backend = \"pf\""));
        assert!(e.contains("pf") && e.contains("nftables") && e.contains("iptables"), "{e}");
    }

    #[test]
    fn out_of_range_values_are_named() {
        let e = err(&GOOD.replace("open_seconds = 10", "open_seconds = 0"));
        assert!(e.contains("firewall.open_seconds") && e.contains("between 1 and 86400"), "{e}");
        let e = err(&GOOD.replace("port = 22", "port = 0"));
        assert!(e.contains("service[0].port"), "{e}");
        let e = err(&GOOD.replace("port = 22", "port = 70000"));
        assert!(e.contains("port"), "{e}");
        let e = err(&GOOD.replace("port = 22", "port = 22\nhook = [\"relative/prog\"]"));
        assert!(e.contains("service[0].hook") && e.contains("absolute"), "{e}");
        let e = err(&format!("{GOOD}\n[[service]]\nname = \"ssh\"\nproto = \"tcp\"\nport = 2222\n"));
        assert!(e.contains("service[1].name") && e.contains("twice"), "{e}");
    }

    #[test]
    fn ecs_from_is_parsed_once_and_required_with_plain_ecs() {
        let c = Config::parse(
            &format!("{GOOD}\n[token]\nplain = \"ecs\"\necs_from = [\"192.0.2.53\", \"2001:db8::/48\"]\n"),
            Path::new("/c.toml"),
        )
        .unwrap();
        assert_eq!(c.token.ecs_from, vec!["192.0.2.53/32".parse().unwrap(), "2001:db8::/48".parse().unwrap()]);
        let e = err(&format!("{GOOD}\n[token]\nplain = \"ecs\"\n"));
        assert!(e.contains("token.ecs_from"), "{e}");
        let e = err(&format!("{GOOD}\n[token]\necs_from = [\"192.0.2.0/33\"]\n"));
        assert!(e.contains("ecs_from") && e.contains("192.0.2.0/33"), "{e}");
    }

    #[test]
    fn written_config_reads_back_the_same() {
        let mut c = Config::parse(GOOD, Path::new("/etc/nxknock/nxknock.toml")).unwrap();
        c.token.plain = PlainPolicy::Ecs;
        c.token.ecs_from = vec!["192.0.2.53/32".parse().unwrap(), "2001:db8::/48".parse().unwrap()];
        c.services[0].hook = Some(vec!["/bin/true".into(), "{event}".into()]);
        let text = toml::to_string(&c).unwrap();
        assert_eq!(Config::parse(&text, Path::new("/elsewhere/x.toml")).unwrap(), c, "{text}");
        // The constructors' defaults are the parser's.
        let parsed = Config::parse(&GOOD.replace("open_seconds = 10\n", ""), Path::new("/c.toml")).unwrap();
        assert_eq!(DnsConfig::new(parsed.dns.zone_file.clone(), parsed.dns.listen.clone()), parsed.dns);
        assert_eq!(FirewallConfig::new(BackendKind::Nftables), parsed.firewall);
        assert_eq!(ServiceConfig::new("ssh", Proto::Tcp, 22), parsed.services[0]);
    }

    #[test]
    fn missing_section_is_named() {
        let e = err(&GOOD.replace("[store]\npath = \"state/nxknock.db\"\n", ""));
        assert!(e.contains("store"), "{e}");
        let e = err("[dns\n");
        assert!(e.contains("/etc/nxknock/nxknock.toml"), "{e}");
    }

    #[test]
    fn store_urls_never_show_their_password() {
        let u = StoreUrl::new("postgres://nx:s3cret@db.example:5432/nxknock?sslmode=disable&password=other");
        let shown = format!("{} {u:?}", u.redacted());
        assert!(!shown.contains("s3cret") && !shown.contains("other"), "{shown}");
        assert!(shown.contains("nx:***@db.example:5432/nxknock"), "{shown}");
        assert_eq!(StoreUrl::new("postgres://nx@db/x").redacted(), "postgres://nx@db/x");
    }
}
