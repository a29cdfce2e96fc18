//! `nxknock agent`: the door keeper of a protected host that runs no DNS.
//!
//! A knock is verified by whichever nameserver it reaches; for a service that
//! lives elsewhere (`[[service]] hosts = ["bastion"]`) that nameserver records a
//! door *grant* — a door record with the host's name — in the shared PostgreSQL
//! database and opens nothing itself. The agent of that host (`[agent] name =
//! "bastion"`) is told at once (`LISTEN nxknock_grant`, payload: the host's name)
//! and opens the door in its own kernel with the same backends and guard as a
//! nameserver, expiring by itself. Closed records (revoke, rekey, close knock,
//! `nxknock doors close`) come as notifications too and close the kernel doors.
//!
//! At start it reconciles: kernel doors a live grant accounts for stay, others
//! go, and live grants not yet in the kernel open. It opens only services that
//! name it, with the ports of its own config. Without the database nothing new
//! opens (fail closed); doors already open keep their kernel timeout; the store
//! reconnects by itself and the agent reconciles again.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, FirewallConfig, LogConfig, ServiceConfig, StoreConfig, valid_host_name};
use crate::doors::Doors;
use crate::store::{Change, DoorRecord, PgStore};

/// An agent's config file: `[agent]`, `[store]` (a `url`), `[firewall]`,
/// `[[service]]` (those listing this agent's name in `hosts` are opened here).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub agent: AgentConfig,
    pub store: StoreConfig,
    pub firewall: FirewallConfig,
    #[serde(rename = "service", default)]
    pub services: Vec<ServiceConfig>,
    #[serde(default)]
    pub log: LogConfig,
}

/// `[agent]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This host's name, as services list it in `hosts`.
    pub name: String,
}

impl AgentFile {
    /// Read and check an agent config; errors name the file and key.
    pub fn load(path: &Path) -> Result<AgentFile, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let cfg: AgentFile = toml::from_str(&text)
            .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string().trim_end().to_owned() })?;
        let invalid = |key: &str, expected: String| ConfigError::Invalid {
            path: path.to_owned(),
            line: crate::check::line_of(&text, key),
            key: key.to_owned(),
            expected,
        };
        if !valid_host_name(&cfg.agent.name) {
            return Err(invalid(
                "agent.name",
                format!("1-64 letters, digits, '.', '-' or '_', got {:?}", cfg.agent.name),
            ));
        }
        match &cfg.store.url {
            None => {
                return Err(invalid(
                    "store.url",
                    "the nameservers' PostgreSQL database: an agent gets its grants from there".into(),
                ));
            }
            Some(url) => crate::store::check_url(url).map_err(|why| invalid("store.url", why))?,
        }
        if !cfg.store.path.as_os_str().is_empty() {
            return Err(invalid("store.path", "no path: an agent uses [store] url only".into()));
        }
        if cfg.own_services().is_empty() {
            return Err(invalid(
                "service",
                format!("at least one [[service]] with hosts = [\"{}\", …] (this agent's name)", cfg.agent.name),
            ));
        }
        Ok(cfg)
    }

    /// The services that live on this host.
    pub fn own_services(&self) -> Vec<ServiceConfig> {
        self.services.iter().filter(|s| s.hosts.contains(&self.agent.name)).cloned().collect()
    }
}

/// Run the agent for the config at `path` until SIGTERM/SIGINT (the guard stays).
pub fn run(path: &Path) -> anyhow::Result<()> {
    let cfg = AgentFile::load(path)?;
    // Nothing here needs more than the network capabilities: give up the rest while
    // this is the only thread (capabilities are per thread).
    crate::privilege::restrict().context("cannot give up privileges; refusing to run")?;
    let name = cfg.agent.name.clone();
    let url = cfg.store.url.clone().expect("checked by load");
    let mut store = PgStore::open_agent(&url, &name)?;
    let doors = Doors::new(
        crate::firewall::backend_allowing(cfg.firewall.backend, &cfg.firewall.always_allow),
        cfg.own_services(),
        Duration::from_secs(cfg.firewall.open_seconds),
    )
    .for_host(&name);
    let _owner = match cfg.firewall.backend {
        crate::firewall::BackendKind::None => None,
        _ => Some(crate::server::claim_firewall(doors.backend_name())?),
    };
    doors.install_guard().with_context(|| format!("cannot install the {} guard", doors.backend_name()))?;
    let (adopted, removed) = doors.reconcile(&mut store).context("reconcile open doors")?;
    let stop = Arc::new(AtomicBool::new(false));
    catch_stop(stop.clone())?;
    let mut agent = Agent { doors, name, opened: HashSet::new() };
    let opened = agent.converge(&mut store);
    tracing::info!(
        agent = %agent.name, database = %url.redacted(), adopted, removed, opened,
        services = ?agent.doors_services(&cfg),
        "nxknock agent running"
    );
    crate::notify::notify("READY=1\nSTATUS=agent running");
    while !stop.load(Ordering::Relaxed) {
        match store.wait_change(Duration::from_millis(200)) {
            // Chains moving (knocks accepted anywhere) are no business of ours.
            Ok(changes) if changes.contains(&Change::Other) => {
                agent.converge(&mut store);
            }
            Ok(_) => {}
            Err(error) => tracing::error!(%error, "database unreachable; nothing new opens until it is back"),
        }
    }
    tracing::info!("stopping; the guard stays in place");
    crate::notify::notify("STOPPING=1");
    Ok(())
}

/// What the agent remembers between changes.
struct Agent {
    doors: Doors,
    name: String,
    /// Grants already opened (user, door, opened, expires): each opens once, so a
    /// single-use door that was used is not opened again by the next change.
    opened: HashSet<(String, String, u64, u64)>,
}

impl Agent {
    fn doors_services(&self, cfg: &AgentFile) -> Vec<String> {
        cfg.own_services().iter().map(|s| format!("{}={}/{}", s.name, s.proto, s.port)).collect()
    }

    /// Open the live grants not opened yet, then remove kernel doors no live
    /// grant accounts for. Returns how many doors opened.
    fn converge(&mut self, store: &mut PgStore) -> usize {
        let t = crate::clock::unix_now();
        let live = match self.doors.live_records(store, t) {
            Ok(live) => live,
            Err(error) => {
                tracing::error!(%error, "cannot read door grants; nothing new opens (fail closed)");
                return 0;
            }
        };
        let id = |r: &DoorRecord| (r.user.clone(), r.key().to_string(), r.opened_at, r.expires_at);
        let mut opened = 0;
        for r in &live {
            if !self.opened.contains(&id(r)) && self.doors.open_grant(r, &live) {
                opened += 1;
            }
            self.opened.insert(id(r));
        }
        let now_live: HashSet<_> = live.iter().map(id).collect();
        self.opened.retain(|k| now_live.contains(k));
        self.doors.sync(&[], store);
        opened
    }
}

/// SIGTERM/SIGINT set `stop` (a small runtime on a thread of its own).
fn catch_stop(stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async {
                let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
                    return;
                };
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            });
            stop.store(true, Ordering::Relaxed);
        })
        .context("spawn signal thread")?;
    Ok(())
}
