//! The door stage: turns a verifier [`Decision`] into firewall doors.
//!
//! It knows services (name → proto/port, single use, hook) and the open window;
//! the backend below it knows only addresses and ports, the verifier above it
//! only chains. Every door it opens is recorded in the store, so `nxknock doors`
//! can say whose it is and a restarted daemon can tell its own doors from
//! anything else found in its table.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::ServiceConfig;
use crate::firewall::{Door, DoorBackend, FirewallError, Guarded, OpenDoor};
use crate::hooks::{self, HookEvent};
use crate::knock::Knock;
use crate::metrics::Metrics;
use crate::netaddr::Prefix;
use crate::store::{DoorRecord, Store};
use crate::verify::{Decision, Reject};

pub struct Doors {
    backend: Box<dyn DoorBackend>,
    services: Vec<ServiceConfig>,
    /// Whose doors the kernel here holds: `""` for a nameserver, an agent's
    /// `[agent] name` for a protected host. Records of other hosts are not ours.
    host: String,
    open_for: Duration,
    metrics: Arc<Metrics>,
    /// Refusals not logged one by one (see [`Doors::apply`]), by reason, until the
    /// next [`Doors::log_summary`].
    quiet: Mutex<BTreeMap<&'static str, u64>>,
    /// Info lines for refusals left this second (see [`LOUD_PER_SECOND`]).
    loud: Mutex<(u32, Option<std::time::Instant>)>,
}

/// Refusals logged one line each, at most, per second. Past that (someone replaying
/// a captured element in a loop) they are counted into the summary: a refusal never
/// costs more than a counter, whoever sends it.
const LOUD_PER_SECOND: u32 = 20;

/// A kernel door joined with what the store says about it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DoorView {
    pub user: Option<String>,
    pub service: Option<String>,
    pub addr: IpAddr,
    pub prefix_len: u8,
    pub proto: String,
    pub port: u16,
    pub seconds_left: u64,
    pub via: Option<String>,
    pub single_use: bool,
}

impl Doors {
    pub fn new(backend: Box<dyn DoorBackend>, services: Vec<ServiceConfig>, open_for: Duration) -> Doors {
        Doors {
            backend,
            services,
            host: String::new(),
            open_for,
            metrics: Arc::default(),
            quiet: Mutex::default(),
            loud: Mutex::new((LOUD_PER_SECOND, None)),
        }
    }

    /// Manage the doors of agent `host` (`nxknock agent`) rather than a nameserver's.
    pub fn for_host(mut self, host: &str) -> Doors {
        self.host = host.to_owned();
        self
    }

    /// The live door records of this host's kernel.
    pub fn live_records(&self, store: &mut dyn Store, t: u64) -> Result<Vec<DoorRecord>, crate::store::StoreError> {
        self.live(store, t)
    }

    fn live(&self, store: &mut dyn Store, t: u64) -> Result<Vec<DoorRecord>, crate::store::StoreError> {
        let mut records = store.live_doors(t)?;
        records.retain(|r| r.host == self.host);
        Ok(records)
    }

    /// Count decisions, doors and latencies into `metrics` (`[metrics]`).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Doors {
        self.metrics = metrics;
        self
    }

    /// Take the services, door time and guard of a reloaded config. The new guard
    /// goes in first, in one firewall transaction that keeps every open door; if
    /// the firewall refuses it, the old guard is put back and nothing changes.
    pub fn reconfigure(&mut self, cfg: &crate::config::Config) -> Result<(), FirewallError> {
        let backend = crate::firewall::backend_allowing(cfg.firewall.backend, &cfg.firewall.always_allow);
        if let Err(error) = backend.install_guard(&Self::guarded(&cfg.services)) {
            if let Err(again) = self.install_guard() {
                tracing::error!(%again, "could not put the old guard back either");
            }
            return Err(error);
        }
        self.backend = backend;
        self.services = cfg.services.clone();
        self.open_for = Duration::from_secs(cfg.firewall.open_seconds);
        Ok(())
    }

    /// Set the open-doors gauge from the live door records.
    pub fn count_open(&self, store: &mut dyn Store) {
        if let Ok(live) = self.live(store, now()) {
            self.metrics.set_doors_open(live.len());
        }
    }

    /// Knocks the verify loop shed before their deep walk.
    pub fn count_shed(&self, n: u64) {
        self.metrics.shed(n);
    }

    fn count_quietly(&self, reason: &'static str) {
        *self.quiet.lock().unwrap_or_else(|p| p.into_inner()).entry(reason).or_default() += 1;
    }

    /// One more info line for a refusal this second?
    fn may_log_loudly(&self) -> bool {
        let mut loud = self.loud.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if loud.1.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            *loud = (LOUD_PER_SECOND, Some(now));
        }
        if loud.0 == 0 {
            return false;
        }
        loud.0 -= 1;
        true
    }

    /// Log, at info, how many knocks were refused without a line each since the
    /// last call (random tokens, look-alikes); nothing if none were.
    pub fn log_summary(&self, every: Duration) {
        let counts = std::mem::take(&mut *self.quiet.lock().unwrap_or_else(|p| p.into_inner()));
        if counts.is_empty() {
            return;
        }
        let total: u64 = counts.values().sum();
        let by_reason = counts.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        tracing::info!(total, by_reason, seconds = every.as_secs(), "knocks refused without a log line each");
    }

    /// The door stage the configuration describes (backend, services, open window).
    pub fn from_config(cfg: &crate::config::Config) -> Doors {
        Doors::new(
            crate::firewall::backend_allowing(cfg.firewall.backend, &cfg.firewall.always_allow),
            cfg.services.clone(),
            Duration::from_secs(cfg.firewall.open_seconds),
        )
    }

    /// The guard for every configured service that lives here (a nameserver does
    /// not guard the services of `[[service]] hosts`: their agents do).
    pub fn guarded(services: &[ServiceConfig]) -> Vec<Guarded> {
        services.iter().filter(|s| s.hosts.is_empty()).map(|s| Guarded { proto: s.proto, port: s.port }).collect()
    }

    /// Install the guard; `serve` refuses to start if this fails.
    pub fn install_guard(&self) -> Result<(), FirewallError> {
        if self.host.is_empty() {
            self.backend.install_guard(&Self::guarded(&self.services))
        } else {
            // An agent's services are all its own (it keeps only those naming it).
            let all: Vec<Guarded> = self.services.iter().map(|s| Guarded { proto: s.proto, port: s.port }).collect();
            self.backend.install_guard(&all)
        }
    }

    /// Tell the guard which ports a blocked source may not reach (the capture
    /// listener's UDP port and sequence range).
    pub fn set_knock_ports(&self, ports: &[(u16, u16)]) -> Result<(), FirewallError> {
        self.backend.set_knock_ports(ports)
    }

    /// Sources the kernel blocks, with their time left (`nxknock doors`).
    pub fn blocked(&self) -> Result<Vec<(crate::netaddr::Prefix, Duration)>, FirewallError> {
        self.backend.blocked()
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// At start-up: keep (adopt) kernel doors the store recorded and that are still
    /// live; remove every other door found in our own sets. Returns (adopted, removed).
    pub fn reconcile(&self, store: &mut dyn Store) -> Result<(usize, usize), FirewallError> {
        self.reconcile_logged(store, true)
    }

    /// [`Doors::reconcile`]; adoptions are logged at info at start-up, at debug later.
    fn reconcile_logged(&self, store: &mut dyn Store, at_start: bool) -> Result<(usize, usize), FirewallError> {
        let records = match self.live(store, now()) {
            Ok(r) => r,
            Err(error) => {
                // Without records nothing can be recognised: fail closed.
                tracing::warn!(%error, "cannot read door records; removing every open door");
                Vec::new()
            }
        };
        let (mut adopted, mut removed) = (0, 0);
        for d in self.backend.list()? {
            if records.iter().any(|r| same_door(r, &d)) {
                adopted += 1;
                if at_start {
                    tracing::info!(door = %d.key(), left_s = d.expires_in.as_secs(), "adopted open door");
                }
                self.trim(&d, &records);
                continue;
            }
            let door = Door {
                addr: d.addr,
                prefix_len: d.prefix_len,
                proto: d.proto,
                port: d.port,
                open_for: Duration::from_secs(1),
                single_use: d.single_use,
            };
            self.backend.close(&door)?;
            removed += 1;
            tracing::warn!(door = %d.key(), "removed a door no live record accounts for");
        }
        Ok((adopted, removed))
    }

    /// Open doors joined with their records, for `nxknock doors`. The `none`
    /// backend has no kernel doors: its records are the doors it would have opened.
    pub fn view(&self, store: &mut dyn Store) -> anyhow::Result<Vec<DoorView>> {
        let t = now();
        let records = self.live(store, t)?;
        if self.backend.name() == "none" {
            return Ok(records
                .into_iter()
                .map(|r| DoorView {
                    seconds_left: r.expires_at.saturating_sub(t),
                    addr: r.addr,
                    prefix_len: r.prefix_len,
                    proto: r.proto.to_string(),
                    port: r.port,
                    single_use: r.single_use,
                    user: Some(r.user),
                    service: Some(r.service),
                    via: Some(r.via),
                })
                .collect());
        }
        Ok(self
            .backend
            .list()?
            .into_iter()
            .map(|d| {
                let r = records.iter().find(|r| same_door(r, &d));
                DoorView {
                    user: r.map(|r| r.user.clone()),
                    service: r.map(|r| r.service.clone()).or_else(|| {
                        self.services.iter().find(|s| s.proto == d.proto && s.port == d.port).map(|s| s.name.clone())
                    }),
                    addr: d.addr,
                    prefix_len: d.prefix_len,
                    proto: d.proto.to_string(),
                    port: d.port,
                    seconds_left: d.expires_in.as_secs(),
                    via: r.map(|r| r.via.clone()),
                    single_use: d.single_use,
                }
            })
            .collect())
    }

    /// `nxknock doors close`: close the records of `user`'s doors, or of every door
    /// admitting `addr`. Returns how many records were closed; the kernel doors go
    /// when the daemon (or [`Doors::reconcile`] without one) sees no live record.
    pub fn close_records(store: &mut dyn Store, user: Option<&str>, addr: Option<IpAddr>) -> anyhow::Result<usize> {
        if let Some(user) = user {
            return Ok(store.close_user_doors(user)?);
        }
        let Some(addr) = addr else { return Ok(0) };
        let mut closed = 0;
        for r in store.live_doors(now())? {
            if Prefix::new(r.addr, r.prefix_len).contains_ip(addr) {
                store.close_door(&r.user, &r.key())?;
                closed += 1;
            }
        }
        Ok(closed)
    }

    pub fn uninstall(&self) -> Result<(), FirewallError> {
        self.backend.uninstall()
    }

    fn doors_for<'a>(
        &'a self,
        door: Prefix,
        services: &'a [String],
        open_for: Duration,
    ) -> impl Iterator<Item = (&'a ServiceConfig, Door)> + 'a {
        self.services.iter().filter(|s| services.contains(&s.name)).map(move |s| {
            let door = Door {
                addr: door.addr(),
                prefix_len: door.len(),
                proto: s.proto,
                port: s.port,
                open_for,
                single_use: s.single_use,
            };
            (s, door)
        })
    }

    /// Act on a decision and log it. Never logs a token. A refused knock that names
    /// a user or a policy gets one info line with its stable `reason`; one that
    /// matches no chain (`unknown`, `look-alike`: what random traffic from the
    /// internet is) gets a debug line and is counted into the periodic summary
    /// ([`Doors::log_summary`]), since a flood of them is expected and must not
    /// flood the log.
    pub fn apply(&self, knock: &Knock, decision: &Decision, store: &mut dyn Store) {
        let via = knock.via.as_str();
        let from = knock.seen_from;
        match decision {
            Decision::Open { .. } => self.metrics.knock("open"),
            Decision::Close { .. } => self.metrics.knock("close"),
            Decision::Repeat => self.metrics.knock("repeat"),
            Decision::Reject { why, .. } => self.metrics.refused(why.reason()),
        }
        match decision {
            Decision::Open { user, door, records } => {
                // The verifier only makes door-sized prefixes; checked again here because
                // this is the last place before the kernel.
                if let Err(error) = door.door() {
                    tracing::error!(%user, %door, %error, "refusing a door wider than the rules allow");
                    return;
                }
                self.open(user, *door, records, knock, store);
            }
            Decision::Close { user, door, services } => self.close(user, *door, services, via, store),
            Decision::Repeat => {
                tracing::debug!(%via, %from, "repeat of an accepted knock (resolver retry); nothing to do")
            }
            Decision::Reject { user, why } => {
                let reason = why.reason();
                let user = user.as_deref().unwrap_or("-");
                match why {
                    Reject::Unknown | Reject::LookAlike => {
                        self.count_quietly(reason);
                        tracing::debug!(%via, %from, reason, "knock refused: {why}")
                    }
                    Reject::Store(_) => tracing::error!(%via, %from, reason, "knock refused (fail closed): {why}"),
                    _ if !self.may_log_loudly() => {
                        self.count_quietly(reason);
                        tracing::debug!(%user, %via, %from, reason, "knock refused: {why}")
                    }
                    _ => tracing::info!(%user, %via, %from, reason, "knock refused: {why}"),
                }
            }
        }
    }

    /// Open the doors of `records`, which the verifier committed with the spent
    /// element (so a door in the kernel always has its record: `doors` can name it
    /// and a restart adopts it). Records for other hosts are grants their agents
    /// open. A kernel door is one element per (address, proto, port) shared by every
    /// user who opened it: it opens at once with this knock's window, then, if
    /// another user's live record of the same door ends later, is set to that end —
    /// one user's short door never cuts another's long one, and the door never
    /// waits for that lookup.
    fn open(&self, user: &str, door: Prefix, records: &[DoorRecord], knock: &Knock, store: &mut dyn Store) {
        let (via, from) = (knock.via.as_str(), knock.seen_from);
        // How long the knock took to verify (and commit), for the log.
        let verified_us = knock.received.elapsed().as_micros() as u64;
        let mut opened = Vec::new();
        for r in records {
            // Until the record's end, counted from now: the commit took some time
            // since `opened_at`, and the kernel door must not outlive its record.
            let open_for = Duration::from_secs(r.expires_at.saturating_sub(now()).max(1));
            if r.host != self.host {
                tracing::info!(
                    %user, %door, service = %r.service, host = %r.host, %via, %from, open_seconds = open_for.as_secs(),
                    verified_us, "door granted (the host's agent opens it)"
                );
                continue;
            }
            let Some(svc) = self.service_of(r) else {
                // The config was reloaded between the decision and here.
                tracing::warn!(%user, service = %r.service, "service no longer configured; its door stays closed");
                continue;
            };
            let d = r.door(open_for);
            // latency_us: packet receipt to door in the kernel; verified_us: to the
            // verifier's committed decision; firewall_us: the backend's share.
            let asked = std::time::Instant::now();
            match self.backend.open(&d) {
                Ok(()) => {
                    self.metrics.door_opened(knock.received.elapsed());
                    tracing::info!(
                        %user, %door, service = %svc.name, %via, %from,
                        open_seconds = open_for.as_secs(), single_use = d.single_use,
                        latency_us = knock.received.elapsed().as_micros() as u64, verified_us,
                        firewall_us = asked.elapsed().as_micros() as u64, "door opened"
                    );
                    self.hook(svc, "open", user, &d, via);
                    opened.push((d, r.expires_at));
                }
                Err(error) => {
                    self.metrics.door_error();
                    tracing::error!(%user, service = %svc.name, %error, "could not open door");
                    let _ = store.close_door(user, &d.key());
                }
            }
        }
        if opened.is_empty() {
            return;
        }
        let t = now();
        let live = match self.live(store, t) {
            Ok(live) => live,
            Err(error) => {
                tracing::error!(%user, %error, "cannot read door records; a door shared with another user keeps this knock's window");
                return;
            }
        };
        for (mut d, ours) in opened {
            let key = d.key();
            let Some(latest) = live.iter().filter(|r| r.key() == key).map(|r| r.expires_at).max() else { continue };
            if latest <= ours {
                continue;
            }
            d.open_for = Duration::from_secs(latest.saturating_sub(t));
            if let Err(error) = self.backend.open(&d) {
                tracing::error!(%user, door = %key, %error, "could not extend a shared door to its latest record");
            }
        }
    }

    /// This host's service a record names (by name, protocol and port).
    fn service_of(&self, r: &DoorRecord) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == r.service && s.proto == r.proto && s.port == r.port)
    }

    /// An agent opens grant `r` (a record for its host): with the port of its own
    /// service of that name, until the latest live record of the same door ends.
    /// A grant for a service this host does not have, or whose port differs, is
    /// refused (logged). Returns whether a door opened.
    pub fn open_grant(&self, r: &DoorRecord, live: &[DoorRecord]) -> bool {
        let Some(svc) = self.service_of(r) else {
            tracing::warn!(user = %r.user, service = %r.service, port = r.port, "grant for a service this host does not guard; ignored");
            return false;
        };
        let t = now();
        let latest = live.iter().filter(|o| o.key() == r.key()).map(|o| o.expires_at).max().unwrap_or(r.expires_at);
        let door = r.door(Duration::from_secs(latest.saturating_sub(t).max(1)));
        if let Err(error) = door.key().prefix.door() {
            tracing::error!(user = %r.user, %error, "refusing a granted door wider than the rules allow");
            return false;
        }
        match self.backend.open(&door) {
            Ok(()) => {
                self.metrics.door_opened(Duration::ZERO);
                tracing::info!(
                    user = %r.user, door = %door.key().prefix, service = %svc.name, host = %self.host, via = %r.via,
                    open_seconds = door.open_for.as_secs(), single_use = door.single_use, "door opened"
                );
                self.hook(svc, "open", &r.user, &door, &r.via);
                true
            }
            Err(error) => {
                self.metrics.door_error();
                tracing::error!(user = %r.user, service = %svc.name, %error, "could not open granted door");
                false
            }
        }
    }

    /// A close knock ends the knocker's own doors. A kernel door shared with another
    /// user's live door (same address and port) stays open for that user.
    fn close(&self, user: &str, door: Prefix, services: &[String], via: &str, store: &mut dyn Store) {
        for (svc, d) in self.doors_for(door, services, self.open_for) {
            let key = d.key();
            if let Err(error) = store.close_door(user, &key) {
                tracing::error!(%user, %error, "could not record the closed door; leaving it to expire");
                continue;
            }
            if !svc.hosts.is_empty() {
                // The agents of those hosts see the record close and remove their doors.
                tracing::info!(%user, %door, service = %svc.name, hosts = %svc.hosts.join(","), %via, "close knock: grant closed");
                continue;
            }
            let live = match self.live(store, now()) {
                Ok(live) => live,
                Err(error) => {
                    tracing::error!(%error, "cannot read door records; leaving the door to expire");
                    continue;
                }
            };
            if live.iter().any(|r| r.key() == key) {
                tracing::info!(%user, %door, service = %svc.name, %via, "close knock: the door stays open for another user");
                // ... but no longer than that user's own door.
                if let Ok(kernel) = self.backend.list() {
                    for k in kernel.iter().filter(|k| k.key() == key) {
                        self.trim(k, &live);
                    }
                }
                continue;
            }
            match self.backend.close(&d) {
                Ok(()) => {
                    tracing::info!(%user, %door, service = %svc.name, %via, "door closed by close knock");
                    self.hook(svc, "close", user, &d, via);
                }
                Err(error) => tracing::error!(%user, service = %svc.name, %error, "could not close door"),
            }
        }
    }

    /// After another process changed the store (`user revoke`, `rekey`, …): remove
    /// every kernel door that no live record accounts for. Revoke and rekey close the
    /// user's records in the same transaction, so their doors go at once, even when
    /// both happen between two looks at the store.
    pub fn sync(&self, revoked: &[String], store: &mut dyn Store) {
        match self.reconcile_logged(store, false) {
            Ok((_, 0)) if revoked.is_empty() => {}
            Ok((_, removed)) => {
                tracing::info!(revoked = %revoked.join(","), doors_closed = removed, "store changed: doors without a live record closed")
            }
            Err(error) => {
                tracing::error!(%error, "store changed but doors could not be checked; they expire by themselves")
            }
        }
    }

    /// A kernel door is one element shared by every user who opened it, set to the
    /// latest of their expiries. When some of those records end early (revoke, close
    /// knock), the element must not outlive the latest record still live: set its
    /// timeout again from those records.
    fn trim(&self, d: &OpenDoor, live: &[DoorRecord]) {
        let Some(latest) = live.iter().filter(|r| same_door(r, d)).map(|r| r.expires_at).max() else { return };
        let left = Duration::from_secs(latest.saturating_sub(now()).max(1));
        if d.expires_in <= left + Duration::from_secs(1) {
            return;
        }
        let door = Door {
            addr: d.addr,
            prefix_len: d.prefix_len,
            proto: d.proto,
            port: d.port,
            open_for: left,
            single_use: d.single_use,
        };
        match self.backend.open(&door) {
            Ok(()) => {
                tracing::info!(door = %d.key(), left_s = left.as_secs(), "door shortened to its latest live record")
            }
            Err(error) => tracing::error!(door = %d.key(), %error, "could not shorten a door; it expires by itself"),
        }
    }

    fn hook(&self, svc: &ServiceConfig, event: &'static str, user: &str, door: &Door, via: &str) {
        let Some(argv) = &svc.hook else { return };
        hooks::spawn(
            argv,
            Duration::from_secs(svc.hook_timeout_seconds),
            HookEvent {
                event,
                user: user.to_owned(),
                service: svc.name.clone(),
                addr: door.addr.to_string(),
                prefix: door.prefix_len,
                proto: door.proto.to_string(),
                port: door.port,
                seconds: door.open_for.as_secs(),
                via: via.to_owned(),
            },
        );
    }
}

fn same_door(r: &DoorRecord, d: &OpenDoor) -> bool {
    r.key() == d.key()
}

fn now() -> u64 {
    crate::clock::unix_now()
}

/// What a granted knock records: for each service it opens, a record for this
/// nameserver's kernel (host `""`), or one per `hosts` entry (a grant that host's
/// agent opens), for the door window cut to the user's `max_open`. The verifier
/// commits these in the same transaction as the spent element, so a door in any
/// kernel always has its record and a crash never leaves one without the other.
#[derive(Clone, Debug)]
pub struct DoorPlan {
    services: Vec<ServiceConfig>,
    open_for: Duration,
}

impl DoorPlan {
    pub fn from_config(cfg: &crate::config::Config) -> DoorPlan {
        DoorPlan { services: cfg.services.clone(), open_for: Duration::from_secs(cfg.firewall.open_seconds) }
    }

    /// The configured services.
    pub fn services(&self) -> &[ServiceConfig] {
        &self.services
    }

    /// The records of `user`'s door at `door` for `services` (names), opened at `t`.
    pub fn records(
        &self,
        user: &str,
        door: Prefix,
        services: &[String],
        max_open: Option<u64>,
        via: &str,
        t: u64,
    ) -> Vec<DoorRecord> {
        let open_for = max_open.map_or(self.open_for, |m| self.open_for.min(Duration::from_secs(m)));
        let record = |svc: &ServiceConfig, host: &str| DoorRecord {
            user: user.to_owned(),
            service: svc.name.clone(),
            addr: door.addr(),
            prefix_len: door.len(),
            proto: svc.proto,
            port: svc.port,
            via: via.to_owned(),
            single_use: svc.single_use,
            opened_at: t,
            expires_at: t + open_for.as_secs(),
            host: host.to_owned(),
        };
        let mut out = Vec::new();
        for svc in self.services.iter().filter(|s| services.contains(&s.name)) {
            if svc.hosts.is_empty() {
                out.push(record(svc, ""));
            } else {
                out.extend(svc.hosts.iter().map(|h| record(svc, h)));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::{DoorKey, Guarded, OpenDoor};
    use crate::knock::Via;
    use crate::store::{Enrolment, SqliteStore};
    use crate::token::{Element, Form, Token};
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::Instant;

    /// Records the timeout the kernel would hold for each door.
    #[derive(Default)]
    struct Fake(Mutex<HashMap<DoorKey, Duration>>);
    impl DoorBackend for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn install_guard(&self, _: &[Guarded]) -> Result<(), FirewallError> {
            Ok(())
        }
        fn open(&self, d: &Door) -> Result<(), FirewallError> {
            self.0.lock().unwrap().insert(d.key(), d.open_for);
            Ok(())
        }
        fn close(&self, d: &Door) -> Result<(), FirewallError> {
            self.0.lock().unwrap().remove(&d.key());
            Ok(())
        }
        fn list(&self) -> Result<Vec<OpenDoor>, FirewallError> {
            Ok(self
                .0
                .lock()
                .unwrap()
                .iter()
                .map(|(k, t)| OpenDoor {
                    addr: k.prefix.addr(),
                    prefix_len: k.prefix.len(),
                    proto: k.proto,
                    port: k.port,
                    expires_in: *t,
                    single_use: false,
                })
                .collect())
        }
        fn uninstall(&self) -> Result<(), FirewallError> {
            Ok(())
        }
    }

    fn enrol(name: &str, v: u8, max_open: Option<u64>) -> Enrolment {
        Enrolment {
            name: name.into(),
            verifiers: [Element([v; 12]), Element([v.wrapping_add(100); 12])],
            chain_len: 100,
            mac_key: vec![9; 32],
            services: vec![],
            from: vec![],
            max_open,
        }
    }

    /// Alice (1 h door) and Bob (`max_open` 30 s) both open the door of one NAT address.
    struct Shared {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        store: SqliteStore,
        doors: Doors,
        door: Prefix,
        knock: Knock,
    }

    fn alice_and_bob_share_a_door() -> Shared {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut store = SqliteStore::open(&path).unwrap();
        let ids =
            [store.add_user(&enrol("alice", 1, None)).unwrap(), store.add_user(&enrol("bob", 2, Some(30))).unwrap()];
        let svc: ServiceConfig = toml::from_str("name = \"ssh\"\nproto = \"tcp\"\nport = 22").unwrap();
        let plan = DoorPlan { services: vec![svc.clone()], open_for: Duration::from_secs(3600) };
        let doors = Doors::new(Box::new(Fake::default()), vec![svc], Duration::from_secs(3600));
        let door: Prefix = "198.18.0.9/32".parse().unwrap();
        let knock = Knock {
            token: Token::Plain(Element([0; 12])),
            seen_from: door.addr(),
            via: Via::DnsUdp,
            ecs: None,
            received: Instant::now(),
        };
        for ((user, max_open), (id, v)) in
            [("alice", None), ("bob", Some(30))].into_iter().zip(ids.into_iter().zip(1u8..))
        {
            // What the verifier does: spend the element with the door's records, then open.
            let records = plan.records(user, door, &["ssh".into()], max_open, "dns/udp", now());
            assert!(
                store.spend(id, Form::Plain, &Element([v; 12]), &Element([v + 50; 12]), 1, &records, None).unwrap()
            );
            let open = Decision::Open { user: user.into(), door, records };
            doors.apply(&knock, &open, &mut store);
        }
        Shared { _dir: dir, path, store, doors, door, knock }
    }

    /// Alice is revoked: her records close, and the kernel door, kept for Bob's live
    /// record, must not keep Alice's hour (found by review: it did).
    #[test]
    fn a_revoked_users_long_door_is_cut_to_the_shared_records_end() {
        let Shared { _dir: _keep, path, mut store, doors, .. } = alice_and_bob_share_a_door();
        SqliteStore::open(&path).unwrap().revoke("alice").unwrap();
        doors.sync(&["alice".to_owned()], &mut store);
        let live = store.live_doors(now()).unwrap();
        assert_eq!(live.len(), 1, "only bob's record is live");
        let latest_live = live[0].expires_at - now();
        let kernel = doors.backend.list().unwrap()[0].expires_in.as_secs();
        assert!(
            kernel <= latest_live + 1,
            "kernel door {kernel} s, but the latest live record ends in {latest_live} s (alice revoked)"
        );
    }

    /// Same with a close knock: Alice closes; Bob's 30 s record keeps the door, for 30 s.
    #[test]
    fn a_close_knock_cuts_a_shared_door_to_the_other_users_end() {
        let Shared { _dir: _keep, mut store, doors, door, knock, .. } = alice_and_bob_share_a_door();
        doors.apply(&knock, &Decision::Close { user: "alice".into(), door, services: vec!["ssh".into()] }, &mut store);
        let kernel = doors.backend.list().unwrap()[0].expires_in.as_secs();
        assert!(kernel <= 31, "after alice's close knock the kernel door still has {kernel} s; bob's record has 30 s");
    }
}
