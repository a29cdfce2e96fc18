//! The PostgreSQL store: one database shared by several nameservers of a zone
//! (and, later, door agents), for operators who already run, replicate or rent
//! PostgreSQL.
//!
//! The same tables as the SQLite store (`postgres_v1.sql`), versioned in a
//! `schema_version` table and migrated under an advisory lock, so two daemons
//! starting at once do not both create it. The compare-and-advance is one
//! `UPDATE … WHERE verifier = $old` committed on its own: under READ COMMITTED a
//! second writer of the same row waits for the first, re-reads the row and then
//! matches nothing, so of any number of nameservers exactly one accepts an element.
//!
//! Other writers are noticed through `LISTEN nxknock` (a trigger notifies on
//! every change of users, chains and closed doors) on a second connection that a
//! thread of its own waits on; it raises a flag that [`Store::changed_elsewhere`]
//! reads without blocking, and ignores notifications of the store's own writes. A lost connection fails closed (every call
//! errs, so nothing opens) and is made again on a later call, at most once a
//! second; after a reconnect the caller is told to reload, since notifications
//! sent meanwhile were lost.
//!
//! TLS (rustls, ring) where the URL asks for it with libpq's `sslmode=require`,
//! `verify-ca` or `verify-full`: the server's certificate is always checked, chain
//! and name, against `sslrootcert` or the system's CAs.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, IsolationLevel, NoTls, Transaction};

use super::{ChainState, Change, DoorRecord, Enrolment, Store, StoreError, UserRecord, check_user_name};
use crate::config::StoreUrl;
use crate::firewall::{DoorKey, Proto};
use crate::token::{Element, Form, ZONE_KEY_LEN};

/// Migrations in order; `schema_version` holds how many have run.
const MIGRATIONS: &[&str] = &[include_str!("postgres_v1.sql"), include_str!("postgres_v2.sql")];
/// The notification channel of changes every nameserver and agent cares about.
const CHANNEL: &str = "nxknock";
/// The channel of new door grants, with the host's name (agents only).
const GRANTS: &str = "nxknock_grant";
/// Key of the advisory lock held while migrating ("nxkn").
const MIGRATE_LOCK: i64 = 0x6e78_6b6e;
/// How long one connection attempt may take; the verifier waits this long at most.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts to reconnect are this far apart at least.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Check a `[store] url` without connecting: the scheme, the client crate's
/// parameters, and ours (`sslmode`, `sslrootcert`). Messages never contain the password.
pub fn check_url(url: &StoreUrl) -> Result<(), String> {
    parse_url(url).map(drop)
}

/// Whether and how the connection is encrypted.
#[derive(Clone, Debug, PartialEq)]
enum TlsWant {
    /// `sslmode` absent, `disable` or `prefer`: in clear (a private network, a
    /// Unix socket, a tunnel). `prefer` never falls back silently from a TLS
    /// handshake: it means "clear" here.
    Off,
    /// `sslmode=require`, `verify-ca` or `verify-full`: TLS, and always with the
    /// server's certificate checked, chain *and* name (stricter than libpq's
    /// `require`), against `sslrootcert` (PEM) or else the system's CAs.
    Verify { root: Option<PathBuf> },
}

/// Split libpq's TLS parameters off the URL (the client crate knows neither
/// `verify-*` nor `sslrootcert`) and parse the rest.
fn parse_url(url: &StoreUrl) -> Result<(postgres::Config, TlsWant), String> {
    let text = url.expose();
    if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
        return Err(format!("a URL such as \"postgres://nxknock@db.example/nxknock\", got {}", url.redacted()));
    }
    let (base, query) = text.split_once('?').unwrap_or((text, ""));
    let (mut mode, mut root) = (None, None);
    let mut rest = Vec::new();
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        match kv.split_once('=') {
            Some(("sslmode", v)) => mode = Some(v.to_owned()),
            Some(("sslrootcert", v)) => root = Some(PathBuf::from(percent_decode(v))),
            _ => rest.push(kv),
        }
    }
    let want = match mode.as_deref() {
        None | Some("disable") | Some("prefer") => TlsWant::Off,
        Some("require") | Some("verify-ca") | Some("verify-full") => TlsWant::Verify { root: root.clone() },
        Some(other) => {
            return Err(format!(
                "sslmode disable, prefer, require, verify-ca or verify-full, got {other:?} ({})",
                url.redacted()
            ));
        }
    };
    if root.is_some() && want == TlsWant::Off {
        return Err(format!("sslrootcert needs sslmode=verify-full (or require, verify-ca) ({})", url.redacted()));
    }
    let plain = if rest.is_empty() { base.to_owned() } else { format!("{base}?{}", rest.join("&")) };
    let mut config: postgres::Config =
        plain.parse().map_err(|e| format!("a PostgreSQL URL ({}): {e}", url.redacted()))?;
    config.ssl_mode(match want {
        TlsWant::Off => postgres::config::SslMode::Disable,
        TlsWant::Verify { .. } => postgres::config::SslMode::Require,
    });
    Ok((config, want))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Makes connections, in clear or over verified TLS (rustls with ring).
#[derive(Clone)]
struct Connector {
    config: postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl Connector {
    fn new(url: &StoreUrl) -> Result<Connector, StoreError> {
        let invalid = |detail: String| StoreError::PgInvalid { url: url.redacted(), detail };
        let (mut config, want) = parse_url(url).map_err(invalid)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // A database that stops answering (a partition, no reset) must not hold the
        // verify thread for long: unacknowledged writes fail after 3 s, a silent peer is
        // found by keepalives within ~4 s, and no statement runs past 5 s on the server.
        // Every such failure fails closed: nothing opens until the connection is back.
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(2))
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(2)
            .tcp_user_timeout(Duration::from_secs(3));
        if config.get_options().is_none() {
            config.options("-c statement_timeout=5000");
        }
        if config.get_application_name().is_none() {
            config.application_name("nxknock");
        }
        let tls = match want {
            TlsWant::Off => None,
            TlsWant::Verify { root } => {
                Some(tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(root.as_deref()).map_err(invalid)?))
            }
        };
        Ok(Connector { config, tls })
    }

    fn connect(&self) -> Result<Client, postgres::Error> {
        match &self.tls {
            None => self.config.connect(NoTls),
            Some(tls) => self.config.connect(tls.clone()),
        }
    }
}

/// The CAs a server certificate must chain to: the PEM file `root`, or the system's.
fn tls_config(root: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match root {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            for cert in certs {
                roots.add(cert).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("sslrootcert {}: no PEM certificate in it", path.display()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err("no system CA certificates found; name the server's CA with sslrootcert=FILE".into());
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The PostgreSQL store.
pub struct PgStore {
    url: StoreUrl,
    connector: Connector,
    client: Option<Client>,
    /// What the listener thread shares with us.
    shared: Arc<Shared>,
    /// No new connection attempt before this.
    retry_at: Option<Instant>,
    /// [`SPEND`], prepared on the current connection (a new connection prepares anew).
    spend: Option<postgres::Statement>,
}

/// Between the store and its listener thread.
#[derive(Default)]
struct Shared {
    /// Our main connection's backend process id: notifications from it are our own writes.
    pid: AtomicI32,
    /// The store is gone: the listener thread ends.
    stop: AtomicBool,
    /// An agent's name: grants for it count as changes (nameservers: `None`).
    grants_for: Option<String>,
    /// What other writers changed (or whether notifications may have been lost)
    /// since the last [`Store::changes_elsewhere`].
    pending: Mutex<Pending>,
    /// Wakes [`PgStore::wait_change`].
    wake: Condvar,
}

/// Changes not taken yet: chain moves one by one, up to [`PENDING_MAX`]; past
/// that, or for anything else, "everything".
#[derive(Default)]
struct Pending {
    all: bool,
    chains: Vec<Change>,
}

/// Chain moves kept one by one before they collapse into "reload everything".
const PENDING_MAX: usize = 4096;

impl Shared {
    fn raise(&self, change: Change) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        match change {
            Change::Chain { .. } if !p.all && p.chains.len() < PENDING_MAX => p.chains.push(change),
            Change::Chain { .. } if p.all => {}
            _ => {
                p.all = true;
                p.chains = Vec::new();
            }
        }
        self.wake.notify_all();
    }

    fn take(&self) -> Vec<Change> {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if std::mem::take(&mut p.all) { vec![Change::Other] } else { std::mem::take(&mut p.chains) }
    }
}

/// A notification's payload: `chains USER FORM OLD NEW` (hex, `-` for none) from
/// the chains trigger; anything else is [`Change::Other`].
fn parse_change(payload: &str) -> Change {
    let hex = |h: &str| -> Option<Option<Element>> {
        if h == "-" {
            return Some(None);
        }
        let bytes = data_encoding::HEXLOWER_PERMISSIVE.decode(h.as_bytes()).ok()?;
        Element::from_slice(&bytes).map(Some)
    };
    let parts: Vec<&str> = payload.split(' ').collect();
    let parsed = match parts.as_slice() {
        ["chains", user, form, old, new] => (|| {
            let form = match *form {
                "0" => Form::Plain,
                "1" => Form::Bound,
                _ => return None,
            };
            Some(Change::Chain { user: user.parse().ok()?, form, old: hex(old)?, new: hex(new)? })
        })(),
        _ => None,
    };
    parsed.unwrap_or(Change::Other)
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// The listener thread: its own connection, `LISTEN nxknock`, waiting for
/// notifications so nothing on the verifier's path ever waits for one. A lost
/// connection is made again (at most every [`RETRY_EVERY`]); since notifications
/// were lost meanwhile, the store then reports a change (the caller reloads).
fn listen(connector: Connector, url: StoreUrl, mut client: Client, shared: Arc<Shared>) {
    // Capabilities are per thread, and this one may start before the daemon gives
    // up its own (`serve` opens the store first): it gets no more than the rest.
    if let Err(error) = crate::privilege::restrict() {
        tracing::warn!(%error, "the notification thread could not give up privileges");
    }
    loop {
        loop {
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            let next = client.notifications().timeout_iter(Duration::from_millis(250)).next();
            match next {
                Ok(Some(n)) => {
                    let ours = n.process_id() == shared.pid.load(Ordering::Relaxed);
                    let relevant = match n.channel() {
                        GRANTS => shared.grants_for.as_deref() == Some(n.payload()),
                        _ => true,
                    };
                    if relevant && !ours {
                        shared.raise(parse_change(n.payload()));
                    }
                }
                Ok(None) if client.is_closed() => break,
                Ok(None) => {}
                Err(_) => break,
            }
        }
        tracing::warn!(url = %url.redacted(), "lost the notification connection; reconnecting");
        client = loop {
            std::thread::sleep(RETRY_EVERY);
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            match connector.connect().and_then(|mut c| c.batch_execute(&listen_sql(&shared)).map(|_| c)) {
                Ok(c) => break c,
                Err(error) => tracing::debug!(%error, "notification connection not back yet"),
            }
        };
        shared.raise(Change::Other);
        tracing::info!(url = %url.redacted(), "notification connection made again");
    }
}

impl PgStore {
    /// Connect and bring the schema up to date (creating it, with a new zone key,
    /// in an empty database). `create = false` (commands that only read) refuses a
    /// database without an nxknock schema instead of creating one.
    pub fn open(url: &StoreUrl, create: bool) -> Result<PgStore, StoreError> {
        PgStore::open_as(url, create, None)
    }

    /// [`PgStore::open`] for the agent of host `name` (the schema must exist: the
    /// nameservers make it): its grants count as changes
    /// too, and [`PgStore::wait_change`] wakes for them.
    pub fn open_agent(url: &StoreUrl, name: &str) -> Result<PgStore, StoreError> {
        PgStore::open_as(url, false, Some(name.to_owned()))
    }

    fn open_as(url: &StoreUrl, create: bool, grants_for: Option<String>) -> Result<PgStore, StoreError> {
        let connector = Connector::new(url)?;
        let mut client = connector.connect().map_err(|source| pg(url, source))?;
        migrate(&mut client, url, create)?;
        // Listening before the caller reads anything: no change can fall in between.
        let shared = Arc::new(Shared { grants_for, ..Shared::default() });
        let mut listener = connector.connect().map_err(|source| pg(url, source))?;
        listener.batch_execute(&listen_sql(&shared)).map_err(|source| pg(url, source))?;
        let mut store = PgStore { url: url.clone(), connector, client: None, shared, retry_at: None, spend: None };
        store.adopt(client)?;
        store.shared.take();
        let (connector, url2, shared) = (store.connector.clone(), url.clone(), store.shared.clone());
        std::thread::Builder::new()
            .name("pg-listen".into())
            .spawn(move || listen(connector, url2, listener, shared))
            .map_err(|e| StoreError::PgInvalid {
            url: url.redacted(),
            detail: format!("cannot start the listener thread: {e}"),
        })?;
        Ok(store)
    }

    /// Wait up to `timeout` for changes (see [`Store::changes_elsewhere`]), without
    /// polling: the listener thread wakes us.
    pub fn wait_change(&mut self, timeout: Duration) -> Result<Vec<Change>, StoreError> {
        {
            let guard = self.shared.pending.lock().unwrap_or_else(|p| p.into_inner());
            if !guard.all && guard.chains.is_empty() {
                let _ = self.shared.wake.wait_timeout(guard, timeout);
            }
        }
        self.changes_elsewhere()
    }

    /// Bring the schema of an existing database up to date; returns the versions
    /// before and after.
    pub fn upgrade(url: &StoreUrl) -> Result<(i64, i64), StoreError> {
        let mut client = Connector::new(url)?.connect().map_err(|e| pg(url, e))?;
        let before = schema_version(&mut client).map_err(|e| pg(url, e))?;
        migrate(&mut client, url, true)?;
        Ok((before, MIGRATIONS.len() as i64))
    }

    /// Use `client` from now on. Changes made while we had no connection are
    /// unknown: report one, so the caller reloads.
    fn adopt(&mut self, mut client: Client) -> Result<(), StoreError> {
        let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).map_err(|e| pg(&self.url, e))?.get(0);
        self.shared.pid.store(pid, Ordering::Relaxed);
        self.client = Some(client);
        self.spend = None;
        self.shared.raise(Change::Other);
        Ok(())
    }

    /// The connection, made again if it was lost (at most every [`RETRY_EVERY`]).
    fn client(&mut self) -> Result<&mut Client, StoreError> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            tracing::warn!(url = %self.url.redacted(), "lost the database connection; nothing opens until it is back");
            self.client = None;
        }
        if self.client.is_none() {
            if self.retry_at.is_some_and(|t| Instant::now() < t) {
                return Err(StoreError::PgUnavailable { url: self.url.redacted() });
            }
            self.retry_at = Some(Instant::now() + RETRY_EVERY);
            let client = self.connector.connect().map_err(|e| pg(&self.url, e))?;
            self.adopt(client)?;
            tracing::info!(url = %self.url.redacted(), "database connection made again");
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    fn invalid(&self, detail: String) -> StoreError {
        StoreError::PgInvalid { url: self.url.redacted(), detail }
    }

    fn query_users(&mut self, which: Which) -> Result<Vec<UserRecord>, StoreError> {
        let (users_where, chains_where) = match which {
            Which::All => ("", ""),
            Which::Active => ("WHERE revoked = 0", ""),
            Which::Id(_) => ("WHERE id = $1", "WHERE user_id = $1"),
        };
        let id = match which {
            Which::Id(id) => id,
            _ => 0,
        };
        let params: &[&(dyn postgres::types::ToSql + Sync)] = if matches!(which, Which::Id(_)) { &[&id] } else { &[] };
        let url = self.url.clone();
        let c = self.client()?;
        // One snapshot for both tables, so a user and their chains agree.
        let mut read = || -> Result<_, postgres::Error> {
            let mut tx =
                c.build_transaction().read_only(true).isolation_level(IsolationLevel::RepeatableRead).start()?;
            let users = tx.query(
                &format!(
                    "SELECT id, name, chain_len, mac_key, services, src_nets, revoked, max_open, updated FROM users {users_where} ORDER BY name"
                ),
                params,
            )?;
            let chains = tx.query(
                &format!("SELECT user_id, form, verifier, counter, updated FROM chains {chains_where}"),
                params,
            )?;
            tx.commit()?;
            Ok((users, chains))
        };
        let (users, chains) = read().map_err(|e| pg(&url, e))?;
        let unset = ChainState { verifier: Element([0; crate::token::ELEMENT_LEN]), counter: 0, updated: 0 };
        let mut out: Vec<(UserRecord, [bool; 2])> = users
            .iter()
            .map(|r| {
                (
                    UserRecord {
                        id: r.get(0),
                        name: r.get(1),
                        chain_len: r.get::<_, i64>(2).max(0) as u64,
                        mac_key: r.get(3),
                        services: split_list(r.get(4)),
                        from: split_list(r.get(5)),
                        revoked: r.get::<_, i64>(6) != 0,
                        max_open: r.get::<_, Option<i64>>(7).map(|v| v.max(1) as u64),
                        revision: r.get(8),
                        chains: [unset; 2],
                    },
                    [false; 2],
                )
            })
            .collect();
        let at: std::collections::HashMap<i64, usize> = out.iter().enumerate().map(|(i, (u, _))| (u.id, i)).collect();
        for r in &chains {
            let (id, form, verifier, counter, updated): (i64, i64, Vec<u8>, i64, i64) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            let Some(&i) = at.get(&id) else { continue };
            let form = match form {
                0 => Form::Plain,
                1 => Form::Bound,
                f => return Err(self.invalid(format!("user {:?} has a chain of unknown form {f}", out[i].0.name))),
            };
            let verifier = Element::from_slice(&verifier).ok_or_else(|| {
                self.invalid(format!("user {:?} has a verifier of {} bytes", out[i].0.name, verifier.len()))
            })?;
            *out[i].0.chain_mut(form) =
                ChainState { verifier, counter: counter.max(0) as u64, updated: updated.max(0) as u64 };
            out[i].1[form.index()] = true;
        }
        let mut users = Vec::with_capacity(out.len());
        for (user, seen) in out {
            if !user.revoked && seen != [true; 2] {
                return Err(self.invalid(format!("active user {:?} lacks a chain", user.name)));
            }
            users.push(user);
        }
        Ok(users)
    }

    /// Run `f` in one transaction and commit it; a unique violation becomes `exists`.
    fn write<T>(
        &mut self,
        exists: Option<&str>,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T, Failure>,
    ) -> Result<T, StoreError> {
        let url = self.url.clone();
        let c = self.client()?;
        let mut tx = c.transaction().map_err(|e| pg(&url, e))?;
        let out = match f(&mut tx) {
            Ok(v) => v,
            Err(Failure::Store(e)) => return Err(e),
            Err(Failure::Pg(e)) => {
                if let (Some(name), Some(&SqlState::UNIQUE_VIOLATION)) = (exists, e.code()) {
                    return Err(StoreError::UserExists(name.to_owned()));
                }
                return Err(pg(&url, e));
            }
        };
        tx.commit().map_err(|e| pg(&url, e))?;
        Ok(out)
    }
}

/// What a write closure can fail with.
enum Failure {
    Pg(postgres::Error),
    Store(StoreError),
}

impl From<postgres::Error> for Failure {
    fn from(e: postgres::Error) -> Failure {
        Failure::Pg(e)
    }
}

fn pg(url: &StoreUrl, source: postgres::Error) -> StoreError {
    StoreError::Postgres { url: url.redacted(), source }
}

fn schema_version(client: &mut Client) -> Result<i64, postgres::Error> {
    let exists: bool = client.query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])?.get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client.query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])?.get(0))
}

/// What the listener connection listens to.
fn listen_sql(shared: &Shared) -> String {
    match shared.grants_for {
        Some(_) => format!("LISTEN {CHANNEL}; LISTEN {GRANTS}"),
        None => format!("LISTEN {CHANNEL}"),
    }
}

/// Run the migrations not yet run, in one transaction under an advisory lock.
fn migrate(client: &mut Client, url: &StoreUrl, create: bool) -> Result<(), StoreError> {
    let e = |source| pg(url, source);
    let current = schema_version(client).map_err(e)?;
    let latest = MIGRATIONS.len() as i64;
    if current == latest {
        return Ok(());
    }
    if current > latest {
        return Err(StoreError::PgInvalid {
            url: url.redacted(),
            detail: format!("schema version {current} is newer than this nxknock knows ({latest}); upgrade nxknock"),
        });
    }
    if current == 0 && !create {
        return Err(StoreError::PgInvalid {
            url: url.redacted(),
            detail: "holds no nxknock schema (`nxknock serve` and `nxknock user add` create it)".into(),
        });
    }
    let mut tx = client.transaction().map_err(e)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK]).map_err(e)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT PRIMARY KEY, applied BIGINT NOT NULL)")
        .map_err(e)?;
    // Another daemon may have migrated while we waited for the lock.
    let current: i64 = tx.query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[]).map_err(e)?.get(0);
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current.max(0) as usize) {
        tx.batch_execute(sql).map_err(e)?;
        if i == 0 {
            tx.execute("INSERT INTO meta (key, value) VALUES ('zone_key', $1)", &[&&random_zone_key()[..]])
                .map_err(e)?;
        }
        tx.execute("INSERT INTO schema_version (version, applied) VALUES ($1, $2)", &[&(i as i64 + 1), &now()])
            .map_err(e)?;
    }
    tx.commit().map_err(e)
}

#[derive(Clone, Copy)]
enum Which {
    All,
    Active,
    Id(i64),
}

fn random_zone_key() -> [u8; ZONE_KEY_LEN] {
    let mut k = [0u8; ZONE_KEY_LEN];
    rand::fill(&mut k);
    k
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',').filter(|x| !x.is_empty()).map(str::to_owned).collect()
}

fn now() -> i64 {
    crate::clock::unix_now().min(i64::MAX as u64) as i64
}

/// A knock's spend as one statement (`Store::spend`): one round trip instead of one
/// per statement (and two per unprepared one), measured ~0.4 ms less per knock here.
///
/// `live` share-locks the user's row first, and only while not revoked (and at the
/// decision's revision): a `revoke`, which locks the row for update, then waits
/// for this commit and closes the records it adds; if the revoke holds the lock
/// first, this waits, re-reads the row under READ COMMITTED, finds it revoked and
/// changes nothing. Without the lock a revoke committing between the advance and
/// the door inserts would miss those records, and a revoked user would keep a
/// door for its whole window. `moved` is the compare-and-advance; the door
/// records go in only if it moved (`$8`..`$18` are one array per column), and
/// doors that expired a day ago are forgotten. The result is the number of
/// chains moved: 1, or 0 when nothing was written.
///
/// `live` takes its lock only because `moved` reads it (a WITH query runs only as
/// far as it is read): keep that reference, and `live` materialized.
/// `tests/postgres.rs` `a_revoke_during_a_spend_leaves_no_door` guards it.
const SPEND: &str = "
WITH live AS (
    SELECT id FROM users
     WHERE id = $1 AND revoked = 0 AND ($7::bigint IS NULL OR updated = $7)
       FOR SHARE
), moved AS (
    UPDATE chains SET verifier = $2, counter = $3, updated = $4
     WHERE user_id = (SELECT id FROM live) AND form = $5 AND verifier = $6
    RETURNING user_id
), recorded AS (
    INSERT INTO doors (user_name, service, addr, prefix_len, proto, port, via, single_use, opened_at, expires_at, host)
    SELECT * FROM unnest($8::text[], $9::text[], $10::text[], $11::bigint[], $12::text[], $13::bigint[],
                         $14::text[], $15::bigint[], $16::bigint[], $17::bigint[], $18::text[])
     WHERE EXISTS (SELECT 1 FROM moved)
), forgotten AS (
    DELETE FROM doors
     WHERE expires_at < $19 AND cardinality($8::text[]) > 0 AND EXISTS (SELECT 1 FROM moved)
)
SELECT count(*) FROM moved";

const ADD_USER: &str =
    "INSERT INTO users (name, chain_len, mac_key, services, src_nets, max_open, revoked, created, updated)
     VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $7) RETURNING id";
const ADD_CHAIN: &str = "INSERT INTO chains (user_id, form, verifier, counter, updated) VALUES ($1, $2, $3, 0, $4)";
const CLOSE_USER_DOORS: &str = "UPDATE doors SET closed = 1 WHERE user_name = $1 AND closed = 0";

fn insert_user(tx: &mut Transaction<'_>, e: &Enrolment, now: i64) -> Result<i64, postgres::Error> {
    let max_open = e.max_open.map(|v| v as i64);
    let id: i64 = tx
        .query_one(
            ADD_USER,
            &[&e.name, &(e.chain_len as i64), &e.mac_key, &e.services.join(","), &e.from.join(","), &max_open, &now],
        )?
        .get(0);
    for form in Form::ALL {
        tx.execute(ADD_CHAIN, &[&id, &(form as i64), &&e.verifiers[form.index()].0[..], &now])?;
    }
    Ok(id)
}

impl Store for PgStore {
    fn active_users(&mut self) -> Result<Vec<UserRecord>, StoreError> {
        self.query_users(Which::Active)
    }

    fn list_users(&mut self) -> Result<Vec<UserRecord>, StoreError> {
        self.query_users(Which::All)
    }

    fn user(&mut self, id: i64) -> Result<Option<UserRecord>, StoreError> {
        Ok(self.query_users(Which::Id(id))?.pop())
    }

    fn revoked_users(&mut self) -> Result<Vec<String>, StoreError> {
        let url = self.url.clone();
        let rows = self.client()?.query("SELECT name FROM users WHERE revoked != 0 ORDER BY name", &[]);
        Ok(rows.map_err(|e| pg(&url, e))?.iter().map(|r| r.get(0)).collect())
    }

    fn count_active(&mut self) -> Result<(usize, usize), StoreError> {
        let url = self.url.clone();
        let row = self.client()?.query_one("SELECT count(*) FROM chains", &[]).map_err(|e| pg(&url, e))?;
        let chains = row.get::<_, i64>(0).max(0) as usize;
        Ok((chains / 2, chains))
    }

    fn active_verifiers(&mut self, f: &mut dyn FnMut(i64, Form, Element)) -> Result<(), StoreError> {
        let url = self.url.clone();
        let c = self.client()?;
        let params: [&(dyn postgres::types::ToSql + Sync); 0] = [];
        let mut rows = c
            .query_raw(
                "SELECT c.user_id, c.form, c.verifier FROM chains c JOIN users u ON u.id = c.user_id WHERE u.revoked = 0",
                params,
            )
            .map_err(|e| pg(&url, e))?;
        while let Some(r) = rows.next().map_err(|e| pg(&url, e))? {
            let form = match r.get::<_, i64>(1) {
                0 => Form::Plain,
                1 => Form::Bound,
                _ => continue,
            };
            // A malformed verifier is skipped: it can match nothing anyway.
            if let Some(v) = Element::from_slice(r.get::<_, &[u8]>(2)) {
                f(r.get(0), form, v);
            }
        }
        Ok(())
    }

    fn zone_key(&mut self) -> Result<[u8; ZONE_KEY_LEN], StoreError> {
        let url = self.url.clone();
        let row =
            self.client()?.query_one("SELECT value FROM meta WHERE key = 'zone_key'", &[]).map_err(|e| pg(&url, e))?;
        let v: Vec<u8> = row.get(0);
        v.try_into()
            .map_err(|v: Vec<u8>| self.invalid(format!("zone_key has {} bytes, expected {ZONE_KEY_LEN}", v.len())))
    }

    fn spend(
        &mut self,
        user: i64,
        form: Form,
        expected: &Element,
        new: &Element,
        counter: u64,
        doors: &[DoorRecord],
        revision: Option<i64>,
    ) -> Result<bool, StoreError> {
        // One statement, prepared once per connection, committed on its own
        // (synchronous_commit on) before this returns: the advance and its door
        // records together or not at all, in one round trip (see SPEND).
        let url = self.url.clone();
        let col = |f: fn(&DoorRecord) -> String| doors.iter().map(f).collect::<Vec<String>>();
        let num = |f: fn(&DoorRecord) -> i64| doors.iter().map(f).collect::<Vec<i64>>();
        let (users, services, addrs, protos, vias, hosts) = (
            col(|d| d.user.clone()),
            col(|d| d.service.clone()),
            col(|d| d.addr.to_string()),
            col(|d| d.proto.as_str().to_owned()),
            col(|d| d.via.clone()),
            col(|d| d.host.clone()),
        );
        let (lens, ports, once, opened, expires) = (
            num(|d| i64::from(d.prefix_len)),
            num(|d| i64::from(d.port)),
            num(|d| i64::from(d.single_use)),
            num(|d| d.opened_at as i64),
            num(|d| d.expires_at as i64),
        );
        // Connected (or reconnected) once, then prepared on that very connection.
        self.client()?; // a reconnection here clears `self.spend` (`adopt`)
        let c = self.client.as_mut().expect("connected above");
        let statement = match self.spend.clone() {
            Some(s) => s,
            None => c.prepare(SPEND).map_err(|e| pg(&url, e))?,
        };
        self.spend = Some(statement.clone());
        let moved: i64 = c
            .query_one(
                &statement,
                &[
                    &user,
                    &&new.0[..],
                    &(counter as i64),
                    &now(),
                    &(form as i64),
                    &&expected.0[..],
                    &revision,
                    &users,
                    &services,
                    &addrs,
                    &lens,
                    &protos,
                    &ports,
                    &vias,
                    &once,
                    &opened,
                    &expires,
                    &hosts,
                    // Keep the table small: forget doors that expired a day ago.
                    &(now() - 86_400),
                ],
            )
            .map_err(|e| pg(&url, e))?
            .get(0);
        Ok(moved == 1)
    }

    fn add_user(&mut self, e: &Enrolment) -> Result<i64, StoreError> {
        check_user_name(&e.name)?;
        self.write(Some(&e.name), |tx| Ok(insert_user(tx, e, now())?))
    }

    fn add_users(&mut self, users: &[Enrolment]) -> Result<usize, StoreError> {
        for e in users {
            check_user_name(&e.name)?;
        }
        let url = self.url.clone();
        let c = self.client()?;
        let mut tx = c.transaction().map_err(|e| pg(&url, e))?;
        let now = now();
        for e in users {
            insert_user(&mut tx, e, now).map_err(|source| {
                if source.code() == Some(&SqlState::UNIQUE_VIOLATION) {
                    StoreError::UserExists(e.name.clone())
                } else {
                    pg(&url, source)
                }
            })?;
        }
        tx.commit().map_err(|e| pg(&url, e))?;
        Ok(users.len())
    }

    fn revoke(&mut self, name: &str) -> Result<bool, StoreError> {
        self.write(None, |tx| {
            let revoked: Option<i64> =
                tx.query_opt("SELECT revoked FROM users WHERE name = $1 FOR UPDATE", &[&name])?.map(|r| r.get(0));
            let changed = match revoked {
                None => return Err(Failure::Store(StoreError::NoSuchUser(name.to_owned()))),
                Some(0) => {
                    tx.execute(
                        "UPDATE users SET revoked = 1, updated = GREATEST($2, updated + 1) WHERE name = $1",
                        &[&name, &now()],
                    )?;
                    true
                }
                Some(_) => false,
            };
            tx.execute(CLOSE_USER_DOORS, &[&name])?;
            Ok(changed)
        })
    }

    fn rekey(&mut self, e: &Enrolment) -> Result<i64, StoreError> {
        self.write(None, |tx| {
            let id: Option<i64> =
                tx.query_opt("SELECT id FROM users WHERE name = $1 FOR UPDATE", &[&e.name])?.map(|r| r.get(0));
            let Some(id) = id else { return Err(Failure::Store(StoreError::NoSuchUser(e.name.clone()))) };
            let now = now();
            tx.execute(
                "UPDATE users SET chain_len = $2, mac_key = $3, revoked = 0, updated = GREATEST($4, updated + 1) WHERE id = $1",
                &[&id, &(e.chain_len as i64), &e.mac_key, &now],
            )?;
            tx.execute("DELETE FROM chains WHERE user_id = $1", &[&id])?;
            tx.execute(CLOSE_USER_DOORS, &[&e.name])?;
            for form in Form::ALL {
                tx.execute(ADD_CHAIN, &[&id, &(form as i64), &&e.verifiers[form.index()].0[..], &now])?;
            }
            Ok(id)
        })
    }

    fn changed_elsewhere(&mut self) -> Result<bool, StoreError> {
        Ok(!self.changes_elsewhere()?.is_empty())
    }

    fn changes_elsewhere(&mut self) -> Result<Vec<Change>, StoreError> {
        // The listener thread has the news; make sure the main connection is (or
        // comes) back too, so a reconnect is reported.
        match self.client() {
            Ok(_) => {}
            // Between two attempts: say nothing new (every other call fails closed
            // meanwhile); a failed attempt, once a second, is reported.
            Err(StoreError::PgUnavailable { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        }
        Ok(self.shared.take())
    }

    fn live_doors(&mut self, now: u64) -> Result<Vec<DoorRecord>, StoreError> {
        let url = self.url.clone();
        let rows = self
            .client()?
            .query(
                "SELECT user_name, service, addr, prefix_len, proto, port, via, single_use, opened_at, expires_at, host
                 FROM doors WHERE closed = 0 AND expires_at > $1 ORDER BY opened_at DESC, id DESC",
                &[&(now as i64)],
            )
            .map_err(|e| pg(&url, e))?;
        let mut out = Vec::new();
        for r in rows {
            // A row we cannot parse is skipped, not trusted.
            let Ok(addr) = r.get::<_, String>(2).parse::<IpAddr>() else { continue };
            let proto = match r.get::<_, &str>(4) {
                "tcp" => Proto::Tcp,
                "udp" => Proto::Udp,
                _ => continue,
            };
            let (Ok(prefix_len), Ok(port)) = (u8::try_from(r.get::<_, i64>(3)), u16::try_from(r.get::<_, i64>(5)))
            else {
                continue;
            };
            out.push(DoorRecord {
                user: r.get(0),
                service: r.get(1),
                addr,
                prefix_len,
                proto,
                port,
                via: r.get(6),
                single_use: r.get::<_, i64>(7) != 0,
                opened_at: r.get::<_, i64>(8).max(0) as u64,
                expires_at: r.get::<_, i64>(9).max(0) as u64,
                host: r.get(10),
            });
        }
        Ok(out)
    }

    fn close_door(&mut self, user: &str, key: &DoorKey) -> Result<(), StoreError> {
        let url = self.url.clone();
        let (addr, prefix_len, proto, port) = (key.prefix.addr(), key.prefix.len(), key.proto.as_str(), key.port);
        self.client()?
            .execute(
                "UPDATE doors SET closed = 1
                 WHERE user_name = $1 AND addr = $2 AND prefix_len = $3 AND proto = $4 AND port = $5 AND closed = 0",
                &[&user, &addr.to_string(), &i64::from(prefix_len), &proto, &i64::from(port)],
            )
            .map(|_| ())
            .map_err(|e| pg(&url, e))
    }

    fn close_user_doors(&mut self, user: &str) -> Result<usize, StoreError> {
        let url = self.url.clone();
        self.client()?
            .execute(
                "UPDATE doors SET closed = 1 WHERE user_name = $1 AND closed = 0 AND expires_at > $2",
                &[&user, &now()],
            )
            .map(|n| n as usize)
            .map_err(|e| pg(&url, e))
    }

    fn delete_user(&mut self, name: &str) -> Result<(), StoreError> {
        self.write(None, |tx| {
            let id: Option<i64> =
                tx.query_opt("SELECT id FROM users WHERE name = $1 FOR UPDATE", &[&name])?.map(|r| r.get(0));
            let Some(id) = id else { return Err(Failure::Store(StoreError::NoSuchUser(name.to_owned()))) };
            tx.execute(CLOSE_USER_DOORS, &[&name])?;
            tx.execute("DELETE FROM chains WHERE user_id = $1", &[&id])?;
            tx.execute("DELETE FROM users WHERE id = $1", &[&id])?;
            Ok(())
        })
    }

    fn set_policy(
        &mut self,
        name: &str,
        services: &[String],
        from: &[String],
        max_open: Option<u64>,
    ) -> Result<(), StoreError> {
        let url = self.url.clone();
        let n = self
            .client()?
            .execute(
                "UPDATE users SET services = $2, src_nets = $3, max_open = $4, updated = GREATEST($5, updated + 1) WHERE name = $1",
                &[&name, &services.join(","), &from.join(","), &max_open.map(|v| v as i64), &now()],
            )
            .map_err(|e| pg(&url, e))?;
        if n == 0 { Err(StoreError::NoSuchUser(name.to_owned())) } else { Ok(()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_notifications_parse_and_anything_else_is_other() {
        let e = |b: u8| Element([b; crate::token::ELEMENT_LEN]);
        let hex = |b: u8| data_encoding::HEXLOWER.encode(&e(b).0);
        assert_eq!(
            parse_change(&format!("chains 7 1 {} {}", hex(1), hex(2))),
            Change::Chain { user: 7, form: Form::Bound, old: Some(e(1)), new: Some(e(2)) }
        );
        assert_eq!(
            parse_change(&format!("chains 3 0 - {}", hex(9))),
            Change::Chain { user: 3, form: Form::Plain, old: None, new: Some(e(9)) }
        );
        for other in ["users", "doors", "", "chains 1 2 - -", "chains x 0 - -", "chains 1 0 abc -", "chains 1 0 - - x"]
        {
            assert_eq!(parse_change(other), Change::Other, "{other:?}");
        }
    }

    #[test]
    fn urls_split_off_tls_parameters() {
        let (c, want) = parse_url(&StoreUrl::new(
            "postgres://u@db/x?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3",
        ))
        .unwrap();
        assert_eq!(want, TlsWant::Verify { root: Some(PathBuf::from("/etc/ca.pem")) });
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(3)));
        assert_eq!(parse_url(&StoreUrl::new("postgres://u@db/x")).unwrap().1, TlsWant::Off);
        assert!(parse_url(&StoreUrl::new("postgres://u@db/x?sslmode=maybe")).is_err());
        assert!(parse_url(&StoreUrl::new("mysql://u@db/x")).is_err());
    }
}
