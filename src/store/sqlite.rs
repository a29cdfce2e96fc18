//! The embedded SQLite store: WAL, `synchronous=FULL`, so an advance that
//! returned `Ok(true)` is on disk before any door opens.
//!
//! The file holds MAC keys, so it is opened only where nobody else can swap or
//! read it: the file and its directory must belong to the user we run as, the
//! directory must not be writable by others, and neither may be a symlink.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use rusqlite::{Connection, OptionalExtension, params};

use super::{ChainState, DoorRecord, Enrolment, Store, StoreError, UserRecord, check_user_name};
use crate::firewall::{DoorKey, Proto};
use crate::token::{Element, Form, ZONE_KEY_LEN};

const SCHEMA_VERSION: i64 = 2;
/// The record of applied schema versions, as the PostgreSQL store keeps it too.
/// `PRAGMA user_version` stays the value `open` decides by (it needs no table to
/// read); this table says when each version was applied.
const VERSION_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied INTEGER NOT NULL);
INSERT OR IGNORE INTO schema_version (version, applied) VALUES (2, CAST(strftime('%s', 'now') AS INTEGER));";
const SCHEMA: &str = include_str!("schema.sql");
/// Every change to a user's row raises its revision (`updated`) by at least one,
/// whoever writes it — this nxknock does so itself, an older one or SQL by hand need
/// not: a knock decided on a record kept in memory commits only while the row is at
/// the revision it saw (ARCHITECTURE.md, "Verification"). Additive: files of schema 2
/// get it when opened for writing, and older nxknock versions ignore it.
const REVISION_TRIGGER: &str = "CREATE TRIGGER IF NOT EXISTS users_revision AFTER UPDATE ON users
WHEN NEW.updated <= OLD.updated
BEGIN
    UPDATE users SET updated = OLD.updated + 1 WHERE id = NEW.id;
END;";
const DOORS: &str = include_str!("doors.sql");
const UPGRADE_V1: &str = include_str!("upgrade_v1.sql");

/// The embedded SQLite store.
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    data_version: i64,
}

impl SqliteStore {
    /// Open (creating if absent, mode 0600, in a 0700 directory) and check the
    /// schema. A file that is not an nxknock database is refused with an error
    /// naming it; nothing is written to it.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let io = |source| StoreError::Io { path: path.to_owned(), source };
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if std::fs::symlink_metadata(dir).is_err() {
            use std::os::unix::fs::DirBuilderExt;
            // A directory we create for the database is private.
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
        }
        check_dir(path, dir)?;
        if std::fs::symlink_metadata(path).is_err() {
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
        }
        check_file(path)?;
        let sq = |source| StoreError::Sqlite { path: path.to_owned(), source };
        let conn = Connection::open(path).map_err(sq)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(sq)?;
        let mut store = SqliteStore { conn, path: path.to_owned(), data_version: 0 };
        store.init()?;
        store.data_version = store.data_version()?;
        Ok(store)
    }

    /// Open a database that must already exist, creating nothing (no file, no
    /// directory): for commands that only read (`user list`, `doors`, `check-config`),
    /// so a typo in `[store] path` is an error and not a new empty database. An empty
    /// file counts as missing: opening it would write a fresh schema and zone key.
    pub fn open_existing(path: &Path) -> Result<SqliteStore, StoreError> {
        match std::fs::symlink_metadata(path) {
            Ok(md) if md.is_file() && md.len() == 0 => Err(StoreError::Missing { path: path.to_owned() }),
            Ok(_) => SqliteStore::open(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::Missing { path: path.to_owned() }),
            Err(source) => Err(StoreError::Io { path: path.to_owned(), source }),
        }
    }

    /// Upgrade a schema-1 database in place (one transaction). Returns the names of
    /// the users, now revoked until rekeyed. A current database is left as it is.
    pub fn upgrade(path: &Path) -> Result<Vec<String>, StoreError> {
        match SqliteStore::open(path) {
            Ok(_) => return Ok(Vec::new()),
            Err(StoreError::OldSchema { .. }) => {}
            Err(e) => return Err(e),
        }
        let sq = |source| StoreError::Sqlite { path: path.to_owned(), source };
        let mut conn = Connection::open(path).map_err(sq)?;
        let tx = conn.transaction().map_err(sq)?;
        let names: Vec<String> = {
            let mut stmt = tx.prepare("SELECT name FROM users ORDER BY name").map_err(sq)?;
            stmt.query_map([], |r| r.get(0)).map_err(sq)?.collect::<Result<_, _>>().map_err(sq)?
        };
        tx.execute_batch("DROP INDEX users_verifier; ALTER TABLE users RENAME TO users_v1;").map_err(sq)?;
        tx.execute_batch(SCHEMA).map_err(sq)?;
        tx.execute_batch(UPGRADE_V1).map_err(sq)?;
        tx.execute_batch("DROP TABLE users_v1;").map_err(sq)?;
        tx.execute("INSERT INTO meta (key, value) VALUES ('zone_key', ?1)", [&random_zone_key()[..]]).map_err(sq)?;
        tx.execute_batch(VERSION_TABLE).map_err(sq)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(sq)?;
        tx.commit().map_err(sq)?;
        Ok(names)
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite { path: self.path.clone(), source }
    }

    /// [`SqliteStore::check_integrity`] on a read-only connection of its own:
    /// `Ok(Some(problem))` if the file is damaged, `Err` if the check could not run.
    pub fn check_integrity_of(path: &Path) -> Result<Option<String>, StoreError> {
        SqliteStore::open_for_check(path)?.run()
    }

    /// A read-only connection for [`IntegrityCheck::run`], opened now (the daemon
    /// opens it before it gives up root, and runs it beside serving).
    pub fn open_for_check(path: &Path) -> Result<IntegrityCheck, StoreError> {
        let sq = |source| StoreError::Sqlite { path: path.to_owned(), source };
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sq)?;
        conn.busy_timeout(std::time::Duration::from_secs(30)).map_err(sq)?;
        Ok(IntegrityCheck { conn, path: path.to_owned() })
    }

    /// SQLite's `quick_check` over the whole file: reads every page, so it takes
    /// time in proportion to the database (a third of a second at a million users).
    /// `open` only reads the header and schema (a file that is not a database fails
    /// there); the daemon runs this once it serves, and stops if it fails.
    pub fn check_integrity(&self) -> Result<(), StoreError> {
        let check: String = self.conn.query_row("PRAGMA quick_check", [], |r| r.get(0)).map_err(|e| self.err(e))?;
        if check != "ok" {
            return Err(StoreError::Invalid {
                path: self.path.clone(),
                detail: format!("integrity check failed: {check}"),
            });
        }
        Ok(())
    }

    fn init(&mut self) -> Result<(), StoreError> {
        self.conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| self.err(e))?;
        self.conn.pragma_update(None, "synchronous", "FULL").map_err(|e| self.err(e))?;
        let version: i64 = self.conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(|e| self.err(e))?;
        match version {
            0 => {
                let tx =
                    self.conn.transaction().map_err(|e| StoreError::Sqlite { path: self.path.clone(), source: e })?;
                let sq = |source| StoreError::Sqlite { path: self.path.clone(), source };
                tx.execute_batch(SCHEMA).map_err(sq)?;
                tx.execute_batch(DOORS).map_err(sq)?;
                tx.execute("INSERT INTO meta (key, value) VALUES ('zone_key', ?1)", [&random_zone_key()[..]])
                    .map_err(sq)?;
                tx.execute_batch(VERSION_TABLE).map_err(sq)?;
                tx.execute_batch(REVISION_TRIGGER).map_err(sq)?;
                tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(sq)?;
                tx.commit().map_err(sq)
            }
            1 => Err(StoreError::OldSchema { path: self.path.clone() }),
            SCHEMA_VERSION => {
                // Schema-2 files from before the table or the trigger: add what is missing.
                let has = |kind: &str, name: &str| -> Result<bool, StoreError> {
                    self.conn
                        .query_row(
                            "SELECT count(*) FROM sqlite_master WHERE type = ?1 AND name = ?2",
                            [kind, name],
                            |r| r.get::<_, i64>(0),
                        )
                        .map(|n| n > 0)
                        .map_err(|e| self.err(e))
                };
                if !has("table", "schema_version")? {
                    self.conn.execute_batch(VERSION_TABLE).map_err(|e| self.err(e))?;
                }
                if !has("trigger", "users_revision")? {
                    self.conn.execute_batch(REVISION_TRIGGER).map_err(|e| self.err(e))?;
                }
                Ok(())
            }
            v => Err(StoreError::Invalid {
                path: self.path.clone(),
                detail: format!("schema version {v} is not one this nxknock knows ({SCHEMA_VERSION})"),
            }),
        }
    }

    fn data_version(&self) -> Result<i64, StoreError> {
        self.conn.pragma_query_value(None, "data_version", |r| r.get(0)).map_err(|e| self.err(e))
    }

    fn query_users(&self, which: Which) -> Result<Vec<UserRecord>, StoreError> {
        let (users_where, chains_where, id) = match which {
            Which::All => ("", "", 0),
            Which::Active => ("WHERE revoked = 0", "", 0),
            Which::Id(id) => ("WHERE id = ?1", "WHERE user_id = ?1", id),
        };
        let sql = format!(
            "SELECT id, name, chain_len, mac_key, services, src_nets, revoked, max_open, updated FROM users {users_where} ORDER BY name"
        );
        let params: &[&dyn rusqlite::ToSql] = if matches!(which, Which::Id(_)) { &[&id] } else { &[] };
        let mut stmt = self.conn.prepare_cached(&sql).map_err(|e| self.err(e))?;
        let unset = ChainState { verifier: Element([0; crate::token::ELEMENT_LEN]), counter: 0, updated: 0 };
        let rows = stmt
            .query_map(params, |r| {
                Ok(UserRecord {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    chain_len: r.get::<_, i64>(2)?.max(0) as u64,
                    mac_key: r.get(3)?,
                    services: split_list(&r.get::<_, String>(4)?),
                    from: split_list(&r.get::<_, String>(5)?),
                    revoked: r.get::<_, i64>(6)? != 0,
                    max_open: r.get::<_, Option<i64>>(7)?.map(|v| v.max(1) as u64),
                    revision: r.get(8)?,
                    chains: [unset; 2],
                })
            })
            .map_err(|e| self.err(e))?;
        let mut users = BTreeMap::new();
        let mut order = Vec::new();
        for row in rows {
            let u = row.map_err(|e| self.err(e))?;
            order.push(u.id);
            users.insert(u.id, (u, [false; 2]));
        }
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT user_id, form, verifier, counter, updated FROM chains {chains_where}"))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params, |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        for row in rows {
            let (id, form, verifier, counter, updated) = row.map_err(|e| self.err(e))?;
            let Some((user, seen)) = users.get_mut(&id) else { continue };
            let form = match form {
                0 => Form::Plain,
                1 => Form::Bound,
                f => return Err(self.invalid(format!("user {:?} has a chain of unknown form {f}", user.name))),
            };
            let verifier = Element::from_slice(&verifier).ok_or_else(|| {
                self.invalid(format!("user {:?} has a verifier of {} bytes", user.name, verifier.len()))
            })?;
            *user.chain_mut(form) =
                ChainState { verifier, counter: counter.max(0) as u64, updated: updated.max(0) as u64 };
            seen[form.index()] = true;
        }
        let mut out = Vec::with_capacity(order.len());
        for id in order {
            let (user, seen) = users.remove(&id).expect("listed above");
            // A revoked user upgraded from schema 1 has no chains until rekeyed.
            if !user.revoked && seen != [true; 2] {
                return Err(self.invalid(format!("active user {:?} lacks a chain", user.name)));
            }
            out.push(user);
        }
        Ok(out)
    }

    fn invalid(&self, detail: String) -> StoreError {
        StoreError::Invalid { path: self.path.clone(), detail }
    }
}

/// Every chain with `after < rowid <= upto`, of users not in `revoked`.
fn scan_chains(
    conn: &Connection,
    after: i64,
    upto: i64,
    revoked: &HashSet<i64>,
    f: &mut dyn FnMut(i64, Form, Element),
) -> Result<(), rusqlite::Error> {
    let mut stmt =
        conn.prepare_cached("SELECT user_id, form, verifier FROM chains WHERE rowid > ?1 AND rowid <= ?2")?;
    let mut rows = stmt.query([after, upto])?;
    while let Some(r) = rows.next()? {
        let (user, form): (i64, i64) = (r.get(0)?, r.get(1)?);
        if revoked.contains(&user) {
            continue;
        }
        let form = match form {
            0 => Form::Plain,
            1 => Form::Bound,
            _ => continue,
        };
        // A malformed verifier is skipped: it can match nothing anyway.
        if let Some(v) = Element::from_slice(r.get_ref(2)?.as_blob()?) {
            f(user, form, v);
        }
    }
    Ok(())
}

/// Which users a query reads.
#[derive(Clone, Copy)]
enum Which {
    All,
    Active,
    Id(i64),
}

/// The database's directory: a real directory (not a symlink), ours, and not
/// writable by group or others (who could otherwise swap the file or its WAL).
fn check_dir(path: &Path, dir: &Path) -> Result<(), StoreError> {
    let unsafe_ = |detail: String| StoreError::Unsafe { path: path.to_owned(), detail };
    let md = std::fs::symlink_metadata(dir).map_err(|source| StoreError::Io { path: dir.to_owned(), source })?;
    if md.file_type().is_symlink() {
        return Err(unsafe_(format!(
            "its directory {} is a symlink; point [store] path at the real directory",
            dir.display()
        )));
    }
    if !md.is_dir() {
        return Err(unsafe_(format!("{} is not a directory", dir.display())));
    }
    let me = euid();
    if md.uid() != me {
        return Err(unsafe_(format!(
            "its directory {} belongs to uid {}, not to uid {me} that nxknock runs as; run as that user or `chown` it",
            dir.display(),
            md.uid()
        )));
    }
    if md.mode() & 0o022 != 0 {
        return Err(unsafe_(format!(
            "its directory {} is writable by group or others; run `chmod go-w {}`",
            dir.display(),
            dir.display()
        )));
    }
    Ok(())
}

/// The database file: a regular file (not a symlink), ours; private (0600) by
/// tightening if needed, since it holds MAC keys.
fn check_file(path: &Path) -> Result<(), StoreError> {
    let unsafe_ = |detail: String| StoreError::Unsafe { path: path.to_owned(), detail };
    let io = |source| StoreError::Io { path: path.to_owned(), source };
    let md = std::fs::symlink_metadata(path).map_err(io)?;
    if md.file_type().is_symlink() {
        return Err(unsafe_("is a symlink; point [store] path at the real file".into()));
    }
    if !md.is_file() {
        return Err(unsafe_("is not a regular file".into()));
    }
    let me = euid();
    if md.uid() != me {
        return Err(unsafe_(format!(
            "belongs to uid {}, not to uid {me} that nxknock runs as; run as that user or `chown` it",
            md.uid()
        )));
    }
    let mode = md.mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "database was readable by others; setting 0600");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(())
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn random_zone_key() -> [u8; ZONE_KEY_LEN] {
    let mut k = [0u8; ZONE_KEY_LEN];
    rand::fill(&mut k);
    k
}

const ADD_USER: &str =
    "INSERT INTO users (name, chain_len, mac_key, services, src_nets, max_open, revoked, created, updated)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7, ?7)";
const ADD_CHAIN: &str = "INSERT INTO chains (user_id, form, verifier, counter, updated) VALUES (?1, ?2, ?3, 0, ?4)";

fn split_list(s: &str) -> Vec<String> {
    s.split(',').filter(|x| !x.is_empty()).map(str::to_owned).collect()
}

fn now() -> i64 {
    crate::clock::unix_now().min(i64::MAX as u64) as i64
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

/// Insert one user and both chains inside the caller's transaction.
fn insert_user(tx: &rusqlite::Transaction, e: &Enrolment, now: i64) -> Result<i64, rusqlite::Error> {
    tx.prepare_cached(ADD_USER)?.execute(params![
        e.name,
        e.chain_len as i64,
        e.mac_key,
        e.services.join(","),
        e.from.join(","),
        e.max_open.map(|v| v as i64),
        now
    ])?;
    let id = tx.last_insert_rowid();
    for form in Form::ALL {
        tx.prepare_cached(ADD_CHAIN)?.execute(params![id, form as i64, &e.verifiers[form.index()].0[..], now])?;
    }
    Ok(id)
}

/// A read-only connection that runs SQLite's `quick_check` over the whole file.
pub struct IntegrityCheck {
    conn: Connection,
    path: PathBuf,
}

impl IntegrityCheck {
    /// `Ok(Some(problem))` if the file is damaged, `Err` if the check could not run.
    pub fn run(self) -> Result<Option<String>, StoreError> {
        let sq = |source| StoreError::Sqlite { path: self.path.clone(), source };
        match self.conn.query_row("PRAGMA quick_check", [], |r| r.get::<_, String>(0)) {
            Ok(ok) if ok == "ok" => Ok(None),
            Ok(problem) => Ok(Some(problem)),
            Err(rusqlite::Error::SqliteFailure(f, _))
                if matches!(f.code, rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) =>
            {
                Ok(Some(f.to_string()))
            }
            Err(e) => Err(sq(e)),
        }
    }
}

impl Store for SqliteStore {
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
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name FROM users WHERE revoked != 0 ORDER BY name")
            .map_err(|e| self.err(e))?;
        let names = stmt.query_map([], |r| r.get(0)).map_err(|e| self.err(e))?.collect::<Result<Vec<String>, _>>();
        names.map_err(|e| self.err(e))
    }

    fn count_active(&mut self) -> Result<(usize, usize), StoreError> {
        // An estimate: enough to size the index before it is filled.
        // max(rowid) is read from the b-tree's end, not counted: an upper bound is enough
        // to size a vector, and costs nothing at a million users.
        let chains: Option<i64> =
            self.conn.query_row("SELECT max(rowid) FROM chains", [], |r| r.get(0)).map_err(|e| self.err(e))?;
        let chains = chains.unwrap_or(0).max(0) as usize;
        Ok((chains / 2, chains))
    }

    fn active_verifiers(&mut self, f: &mut dyn FnMut(i64, Form, Element)) -> Result<(), StoreError> {
        // Straight scans of `chains`; the (usually few) revoked users are left out by
        // id rather than by a join, which would double the time. The upper half of the
        // rows is read on a second connection and thread meanwhile: at a million users
        // this is most of the daemon's start-up.
        let revoked: HashSet<i64> = {
            let mut stmt =
                self.conn.prepare_cached("SELECT id FROM users WHERE revoked != 0").map_err(|e| self.err(e))?;
            let ids = stmt.query_map([], |r| r.get(0)).map_err(|e| self.err(e))?.collect::<Result<_, _>>();
            ids.map_err(|e| self.err(e))?
        };
        let top: Option<i64> =
            self.conn.query_row("SELECT max(rowid) FROM chains", [], |r| r.get(0)).map_err(|e| self.err(e))?;
        let mid = top.unwrap_or(0) / 2;
        let path = self.path.clone();
        std::thread::scope(|scope| {
            let upper = (mid > 10_000).then(|| {
                let (path, revoked) = (&path, &revoked);
                scope.spawn(move || -> Result<Vec<(i64, Form, Element)>, StoreError> {
                    let sq = |source| StoreError::Sqlite { path: path.to_owned(), source };
                    let conn =
                        Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sq)?;
                    let mut out = Vec::new();
                    scan_chains(&conn, mid, i64::MAX, revoked, &mut |u, fm, v| out.push((u, fm, v))).map_err(sq)?;
                    Ok(out)
                })
            });
            let lower_end = if upper.is_some() { mid } else { i64::MAX };
            scan_chains(&self.conn, i64::MIN, lower_end, &revoked, f).map_err(|e| self.err(e))?;
            if let Some(h) = upper {
                let rows = h.join().map_err(|_| self.invalid("the chain scan thread panicked".into()))??;
                for (u, fm, v) in rows {
                    f(u, fm, v);
                }
            }
            Ok(())
        })
    }

    fn zone_key(&mut self) -> Result<[u8; ZONE_KEY_LEN], StoreError> {
        let v: Vec<u8> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'zone_key'", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        v.try_into()
            .map_err(|v: Vec<u8>| self.invalid(format!("zone_key has {} bytes, expected {ZONE_KEY_LEN}", v.len())))
    }

    fn housekeeping(&mut self) -> Result<Option<super::Housekeeping>, StoreError> {
        if let Err(error) = self.prewrite_wal() {
            // Only a knock's commit gets slower (it appends to the WAL): say so, go on.
            tracing::warn!(%error, "cannot pre-write the WAL; commits append to it instead");
        }
        let path = self.path.clone();
        let sq = move |source| StoreError::Sqlite { path: path.clone(), source };
        let conn = Connection::open(&self.path).map_err(sq.clone())?;
        // Commits no longer checkpoint; they only say how long the WAL has grown.
        self.conn.pragma_update(None, "wal_autocheckpoint", 0).map_err(sq.clone())?;
        let frames = Arc::new(AtomicU32::new(0));
        let seen = frames.clone();
        self.conn
            .wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages: std::ffi::c_int| {
                seen.store(pages.max(0) as u32, Ordering::Relaxed);
                Ok(())
            }))
            .map_err(sq.clone())?;
        Ok(Some(Box::new(move || {
            // SQLite's own threshold. Checkpointing sooner would restart the WAL more
            // often, and a restarted WAL costs its next commit a second flush.
            if frames.load(Ordering::Relaxed) < CHECKPOINT_FRAMES {
                return Ok(());
            }
            // PASSIVE: copies what no reader still needs and never waits for a lock,
            // so it never holds up a knock's commit.
            let (log, copied): (i64, i64) =
                conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get(1)?, r.get(2)?))).map_err(&sq)?;
            if log == copied {
                frames.store(0, Ordering::Relaxed);
            }
            Ok(())
        })))
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
        if let Some(d) = doors.iter().find(|d| !d.host.is_empty()) {
            return Err(
                self.invalid(format!("a door for host {:?} needs the shared PostgreSQL store ([store] url)", d.host))
            );
        }
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(err)?;
        let n = tx
            .prepare_cached(
                "UPDATE chains SET verifier = ?1, counter = ?2, updated = ?3
                 WHERE user_id = ?4 AND form = ?5 AND verifier = ?6
                   AND EXISTS (SELECT 1 FROM users WHERE id = ?4 AND revoked = 0 AND (?7 IS NULL OR updated = ?7))",
            )
            .and_then(|mut s| {
                s.execute(params![&new.0[..], counter as i64, now(), user, form as i64, &expected.0[..], revision])
            })
            .map_err(err)?;
        if n != 1 {
            // Dropping the transaction rolls it back: nothing was written.
            return Ok(false);
        }
        insert_doors(&tx, doors).map_err(err)?;
        // One synchronous=FULL commit: the advance and its door records reach the
        // disk together, before any door opens.
        tx.commit().map_err(err)?;
        Ok(true)
    }

    fn add_user(&mut self, e: &Enrolment) -> Result<i64, StoreError> {
        check_user_name(&e.name)?;
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(err)?;
        let id = insert_user(&tx, e, now()).map_err(|source| {
            if is_constraint(&source) { StoreError::UserExists(e.name.clone()) } else { err(source) }
        })?;
        tx.commit().map_err(err)?;
        Ok(id)
    }

    fn add_users(&mut self, users: &[Enrolment]) -> Result<usize, StoreError> {
        for e in users {
            check_user_name(&e.name)?;
        }
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(err)?;
        let now = now();
        for e in users {
            insert_user(&tx, e, now).map_err(|source| {
                if is_constraint(&source) { StoreError::UserExists(e.name.clone()) } else { err(source) }
            })?;
        }
        tx.commit().map_err(err)?;
        Ok(users.len())
    }

    fn revoke(&mut self, name: &str) -> Result<bool, StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(err)?;
        let revoked: Option<i64> =
            tx.query_row("SELECT revoked FROM users WHERE name = ?1", [name], |r| r.get(0)).optional().map_err(err)?;
        let changed = match revoked {
            None => return Err(StoreError::NoSuchUser(name.to_owned())),
            Some(0) => {
                tx.execute(
                    "UPDATE users SET revoked = 1, updated = max(?2, updated + 1) WHERE name = ?1",
                    params![name, now()],
                )
                .map_err(err)?;
                true
            }
            Some(_) => false,
        };
        // Whether newly revoked or not: none of this user's doors may stay recorded as open,
        // so a restarted daemon does not adopt them and a running one closes them.
        tx.execute("UPDATE doors SET closed = 1 WHERE user_name = ?1 AND closed = 0", [name]).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(changed)
    }

    fn rekey(&mut self, e: &Enrolment) -> Result<i64, StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(err)?;
        let id: Option<i64> =
            tx.query_row("SELECT id FROM users WHERE name = ?1", [&e.name], |r| r.get(0)).optional().map_err(err)?;
        let Some(id) = id else { return Err(StoreError::NoSuchUser(e.name.clone())) };
        let now = now();
        tx.execute(
            "UPDATE users SET chain_len = ?2, mac_key = ?3, revoked = 0, updated = max(?4, updated + 1) WHERE id = ?1",
            params![id, e.chain_len as i64, e.mac_key, now],
        )
        .map_err(err)?;
        tx.execute("DELETE FROM chains WHERE user_id = ?1", [id]).map_err(err)?;
        // The old credential may be why the user is rekeyed: its doors close too.
        tx.execute("UPDATE doors SET closed = 1 WHERE user_name = ?1 AND closed = 0", [&e.name]).map_err(err)?;
        for form in Form::ALL {
            tx.execute(ADD_CHAIN, params![id, form as i64, &e.verifiers[form.index()].0[..], now]).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(id)
    }

    fn changed_elsewhere(&mut self) -> Result<bool, StoreError> {
        let v = self.data_version()?;
        let changed = v != self.data_version;
        self.data_version = v;
        Ok(changed)
    }

    fn live_doors(&mut self, now: u64) -> Result<Vec<DoorRecord>, StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite { path: path.clone(), source };
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT user_name, service, addr, prefix_len, proto, port, via, single_use, opened_at, expires_at
                 FROM doors WHERE closed = 0 AND expires_at > ?1 ORDER BY opened_at DESC, id DESC",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map([now as i64], |r| {
                Ok((
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(4)?,
                    DoorRecord {
                        user: r.get(0)?,
                        service: r.get(1)?,
                        addr: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                        prefix_len: r.get(3)?,
                        proto: Proto::Tcp,
                        port: r.get(5)?,
                        via: r.get(6)?,
                        single_use: r.get(7)?,
                        opened_at: r.get::<_, i64>(8)? as u64,
                        expires_at: r.get::<_, i64>(9)? as u64,
                        host: String::new(),
                    },
                ))
            })
            .map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            let (addr, proto, mut d) = row.map_err(err)?;
            // A row we cannot parse is skipped, not trusted.
            let Ok(a) = addr.parse() else { continue };
            d.proto = match proto.as_str() {
                "tcp" => Proto::Tcp,
                "udp" => Proto::Udp,
                _ => continue,
            };
            d.addr = a;
            out.push(d);
        }
        Ok(out)
    }

    fn close_door(&mut self, user: &str, key: &DoorKey) -> Result<(), StoreError> {
        let (addr, prefix_len, proto, port) = (key.prefix.addr(), key.prefix.len(), key.proto.as_str(), key.port);
        self.conn
            .execute(
                "UPDATE doors SET closed = 1
                 WHERE user_name = ?1 AND addr = ?2 AND prefix_len = ?3 AND proto = ?4 AND port = ?5 AND closed = 0",
                params![user, addr.to_string(), prefix_len, proto, port],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    fn close_user_doors(&mut self, user: &str) -> Result<usize, StoreError> {
        self.conn
            .execute(
                "UPDATE doors SET closed = 1 WHERE user_name = ?1 AND closed = 0 AND expires_at > ?2",
                params![user, now()],
            )
            .map_err(|e| self.err(e))
    }

    fn delete_user(&mut self, name: &str) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(err)?;
        let id: Option<i64> =
            tx.query_row("SELECT id FROM users WHERE name = ?1", [name], |r| r.get(0)).optional().map_err(err)?;
        let Some(id) = id else { return Err(StoreError::NoSuchUser(name.to_owned())) };
        tx.execute("UPDATE doors SET closed = 1 WHERE user_name = ?1 AND closed = 0", [name]).map_err(err)?;
        tx.execute("DELETE FROM chains WHERE user_id = ?1", [id]).map_err(err)?;
        tx.execute("DELETE FROM users WHERE id = ?1", [id]).map_err(err)?;
        tx.commit().map_err(err)
    }

    fn set_policy(
        &mut self,
        name: &str,
        services: &[String],
        from: &[String],
        max_open: Option<u64>,
    ) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE users SET services = ?2, src_nets = ?3, max_open = ?4, updated = max(?5, updated + 1) WHERE name = ?1",
                params![name, services.join(","), from.join(","), max_open.map(|v| v as i64), now()],
            )
            .map_err(|e| self.err(e))?;
        if n == 0 { Err(StoreError::NoSuchUser(name.to_owned())) } else { Ok(()) }
    }
}

/// WAL frames after which [`Store::housekeeping`] checkpoints (SQLite's default
/// `wal_autocheckpoint`).
const CHECKPOINT_FRAMES: u32 = 1000;

impl SqliteStore {
    /// Extends the WAL file with zeros to the length it reaches between two
    /// checkpoints (a quarter more), and makes that durable, so that a knock's
    /// commit overwrites blocks that exist instead of appending: an append makes
    /// `fdatasync` journal the file's new size and blocks too, which measured
    /// ~0.1 ms of a knock's ~0.55 ms commit here. After the first checkpoint SQLite
    /// reuses the file from its start anyway; this gives a freshly started daemon
    /// the same. (ARCHITECTURE.md, "Storage".)
    ///
    /// Safe because only the holder of the write lock (taken here by an empty
    /// `BEGIN IMMEDIATE`) ever writes the WAL, and only at or below the end of
    /// its valid frames; this writes strictly past the file's end, never
    /// touching a frame. Zeros are never valid frames (page number 0, no salt),
    /// so crash recovery stops where the valid frames end, as with any WAL
    /// longer than its content.
    fn prewrite_wal(&mut self) -> Result<(), StoreError> {
        use std::os::unix::fs::FileExt;
        let path = self.path.clone();
        let sq = |source| StoreError::Sqlite { path: path.clone(), source };
        let page: i64 = self.conn.pragma_query_value(None, "page_size", |r| r.get(0)).map_err(sq)?;
        let target = WAL_HEADER + (WAL_FRAME_HEADER + page.max(512) as u64) * u64::from(CHECKPOINT_FRAMES) * 5 / 4;
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(sq)?;
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        let wal = PathBuf::from(wal);
        let io = |source| StoreError::Io { path: wal.clone(), source };
        // The write lock is held and the WAL open (SQLite opens it with the first read).
        let f = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NOFOLLOW).open(&wal).map_err(io)?;
        let md = f.metadata().map_err(io)?;
        let db = std::fs::metadata(&self.path).map_err(io)?;
        if !md.is_file() || md.nlink() != 1 || md.uid() != db.uid() || (md.dev(), md.ino()) == (db.dev(), db.ino()) {
            // Not SQLite's own WAL (a hard link, say): leave it alone.
            return Err(io(std::io::Error::other("not a private WAL file (link count, owner or inode)")));
        }
        let mut at = md.len();
        if at >= target {
            return Ok(());
        }
        let zeros = vec![0u8; 64 << 10];
        while at < target {
            let n = (target - at).min(zeros.len() as u64) as usize;
            f.write_all_at(&zeros[..n], at).map_err(io)?;
            at += n as u64;
        }
        // Durable (blocks allocated, size journalled) before any commit may rely on it.
        f.sync_all().map_err(io)?;
        drop(f);
        tx.rollback().map_err(sq)?;
        tracing::debug!(path = %wal.display(), bytes = target, "WAL pre-written");
        Ok(())
    }
}

/// A WAL file's header and each frame's header, in bytes (sqlite.org/fileformat.html).
const WAL_HEADER: u64 = 32;
const WAL_FRAME_HEADER: u64 = 24;

/// Insert door records (the caller's transaction), and forget doors that expired a
/// day ago, which keeps the table small.
fn insert_doors(tx: &rusqlite::Transaction<'_>, doors: &[DoorRecord]) -> rusqlite::Result<()> {
    if doors.is_empty() {
        return Ok(());
    }
    let mut stmt = tx.prepare_cached(
        "INSERT INTO doors (user_name, service, addr, prefix_len, proto, port, via, single_use, opened_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    for d in doors {
        stmt.execute(params![
            d.user,
            d.service,
            d.addr.to_string(),
            d.prefix_len,
            d.proto.as_str(),
            d.port,
            d.via,
            d.single_use,
            d.opened_at as i64,
            d.expires_at as i64
        ])?;
    }
    tx.prepare_cached("DELETE FROM doors WHERE expires_at < ?1")?.execute([now() - 86_400])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enrol(name: &str, v: u8) -> Enrolment {
        Enrolment {
            name: name.into(),
            verifiers: [Element([v; 12]), Element([v.wrapping_add(100); 12])],
            chain_len: 100,
            mac_key: vec![9; 32],
            services: vec!["ssh".into()],
            from: vec![],
            max_open: None,
        }
    }

    /// With housekeeping handed off, a knock's commit never checkpoints (the
    /// database file stays as it was however long the WAL grows), and the
    /// housekeeping job checkpoints once the WAL is long, not before.
    #[test]
    fn checkpoints_run_in_housekeeping_not_in_a_knocks_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut s = SqliteStore::open(&path).unwrap();
        let id = s.add_user(&enrol("alice", 1)).unwrap();
        let mut job = s.housekeeping().unwrap().expect("SQLite has housekeeping");
        let file = || std::fs::read(&path).unwrap();
        let el = |x: u16| {
            let mut e = [0xee; 12];
            e[..2].copy_from_slice(&x.to_le_bytes());
            Element(e)
        };
        let mut verifier = Element([1; 12]);
        let mut spend = |from: u16, to: u16| {
            for j in from..to {
                assert!(s.spend(id, Form::Plain, &verifier, &el(j), u64::from(j), &[], None).unwrap());
                verifier = el(j);
            }
        };
        job().unwrap();
        let before = file();
        spend(1, 1200);
        assert!(file() == before, "a commit checkpointed into the database file");
        job().unwrap();
        let after = file();
        assert!(after != before, "housekeeping did not checkpoint a long WAL");
        spend(1200, 1210);
        job().unwrap();
        assert!(file() == after, "housekeeping checkpointed a short WAL (its next commit would pay a WAL restart)");
    }

    /// The daemon's store pre-writes its WAL, so commits overwrite instead of
    /// appending; the zeros never pass for frames: a copy taken as a crash
    /// would leave the files (database and WAL, no shared memory) recovers
    /// exactly the committed advances.
    #[test]
    fn the_wal_is_pre_written_and_recovery_ignores_the_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let wal = dir.path().join("db-wal");
        let mut s = SqliteStore::open(&path).unwrap();
        let id = s.add_user(&enrol("alice", 1)).unwrap();
        let short = std::fs::metadata(&wal).unwrap().len();
        let _job = s.housekeeping().unwrap();
        let long = std::fs::metadata(&wal).unwrap().len();
        assert!(long > 4 << 20 && long > short, "WAL not pre-written: {short} -> {long}");
        let mut verifier = Element([1; 12]);
        for j in 1..=20u8 {
            let next = Element([j + 30; 12]);
            assert!(s.spend(id, Form::Plain, &verifier, &next, u64::from(j), &[], None).unwrap());
            verifier = next;
        }
        assert_eq!(std::fs::metadata(&wal).unwrap().len(), long, "commits appended past the pre-written WAL");
        let crash = tempfile::tempdir().unwrap();
        std::fs::set_permissions(crash.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        for f in ["db", "db-wal"] {
            std::fs::copy(dir.path().join(f), crash.path().join(f)).unwrap();
        }
        let mut recovered = SqliteStore::open(&crash.path().join("db")).unwrap();
        let u = recovered.user(id).unwrap().unwrap();
        assert_eq!((u.chain(Form::Plain).verifier, u.chain(Form::Plain).counter), (verifier, 20));
        assert_eq!(u.chain(Form::Bound).verifier, Element([101; 12]), "the other chain is untouched");
    }

    /// Every change to a user's row raises its revision, even twice in one second,
    /// and a spend on a revision the row has left writes nothing.
    #[test]
    fn a_spend_on_an_old_revision_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("db")).unwrap();
        let id = s.add_user(&enrol("alice", 1)).unwrap();
        let r0 = s.user(id).unwrap().unwrap().revision;
        s.set_policy("alice", &[], &[], None).unwrap();
        s.set_policy("alice", &["ssh".into()], &[], None).unwrap();
        let r2 = s.user(id).unwrap().unwrap().revision;
        assert!(r2 >= r0 + 2, "{r0} -> {r2}");
        assert!(!s.spend(id, Form::Plain, &Element([1; 12]), &Element([2; 12]), 1, &[], Some(r0)).unwrap());
        assert!(s.spend(id, Form::Plain, &Element([1; 12]), &Element([2; 12]), 1, &[], Some(r2)).unwrap());
        s.revoke("alice").unwrap();
        let r3 = s.user(id).unwrap().unwrap().revision;
        assert!(r3 > r2);
        s.rekey(&enrol("alice", 3)).unwrap();
        let r4 = s.user(id).unwrap().unwrap().revision;
        assert!(r4 > r3);
        // A writer that sets `updated` to the time, or leaves it (an older nxknock, SQL
        // by hand), still moves the revision: the trigger raises it.
        s.conn.execute("UPDATE users SET services = 'web', updated = ?2 WHERE id = ?1", params![id, r4]).unwrap();
        s.conn.execute("UPDATE users SET src_nets = '198.18.0.0/15' WHERE id = ?1", [id]).unwrap();
        assert_eq!(s.user(id).unwrap().unwrap().revision, r4 + 2);
    }

    #[test]
    fn compare_and_advance_is_exactly_once_per_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let mut s = SqliteStore::open(&path).unwrap();
        let id = s.add_user(&enrol("alice", 1)).unwrap();
        assert!(s.spend(id, Form::Plain, &Element([1; 12]), &Element([2; 12]), 1, &[], None).unwrap());
        // The same expected verifier again: someone already advanced.
        assert!(!s.spend(id, Form::Plain, &Element([1; 12]), &Element([3; 12]), 2, &[], None).unwrap());
        // The plain verifier does not advance the bound chain.
        assert!(!s.spend(id, Form::Bound, &Element([2; 12]), &Element([4; 12]), 1, &[], None).unwrap());
        assert!(s.spend(id, Form::Bound, &Element([101; 12]), &Element([5; 12]), 1, &[], None).unwrap());
        drop(s);
        let mut s = SqliteStore::open(&path).unwrap();
        let u = &s.active_users().unwrap()[0];
        assert_eq!((u.chain(Form::Plain).verifier, u.chain(Form::Plain).counter), (Element([2; 12]), 1));
        assert_eq!(u.chain(Form::Bound).verifier, Element([5; 12]));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(s.zone_key().unwrap(), SqliteStore::open(&path).unwrap().zone_key().unwrap(), "zone key is stable");
    }

    #[test]
    fn revoked_users_cannot_advance_and_their_doors_are_closed() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("db")).unwrap();
        let id = s.add_user(&enrol("bob", 1)).unwrap();
        let carol = s.add_user(&enrol("carol", 2)).unwrap();
        assert!(matches!(s.add_user(&enrol("bob", 5)), Err(StoreError::UserExists(_))));
        let t = now() as u64;
        let door = |user: &str| DoorRecord {
            user: user.into(),
            service: "ssh".into(),
            addr: "198.18.0.2".parse().unwrap(),
            prefix_len: 32,
            proto: Proto::Tcp,
            port: 22,
            via: "dns/udp".into(),
            single_use: false,
            opened_at: t,
            expires_at: t + 30,
            host: String::new(),
        };
        assert!(s.spend(id, Form::Plain, &Element([1; 12]), &Element([11; 12]), 1, &[door("bob")], None).unwrap());
        assert!(s.spend(carol, Form::Plain, &Element([2; 12]), &Element([12; 12]), 1, &[door("carol")], None).unwrap());
        assert!(s.revoke("bob").unwrap());
        assert!(
            !s.spend(id, Form::Plain, &Element([11; 12]), &Element([21; 12]), 2, &[door("bob")], None).unwrap(),
            "a revoked user spends nothing and no door is recorded"
        );
        assert!(!s.revoke("bob").unwrap());
        assert!(matches!(s.revoke("nobody"), Err(StoreError::NoSuchUser(_))));
        assert_eq!(s.active_users().unwrap().len(), 1);
        assert!(!s.spend(id, Form::Plain, &Element([1; 12]), &Element([2; 12]), 1, &[], None).unwrap());
        assert_eq!(s.list_users().unwrap().len(), 2);
        assert_eq!(s.revoked_users().unwrap(), vec!["bob".to_owned()]);
        assert_eq!(
            s.live_doors(t).unwrap(),
            vec![door("carol")],
            "the revoked user's door record is closed, carol's stays"
        );
        // Rekey brings bob back with fresh chains, same id.
        assert_eq!(s.rekey(&enrol("bob", 7)).unwrap(), id);
        // ... and a rekey closes the doors of the old credential.
        assert!(s.spend(id, Form::Plain, &Element([7; 12]), &Element([8; 12]), 1, &[door("bob")], None).unwrap());
        s.rekey(&enrol("bob", 9)).unwrap();
        assert_eq!(s.live_doors(t).unwrap(), vec![door("carol")]);
    }

    #[test]
    fn bad_user_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("db")).unwrap();
        assert!(matches!(s.add_user(&enrol("-rf", 1)), Err(StoreError::BadUserName(_))));
        assert!(matches!(s.add_users(&[enrol("ok", 1), enrol("x y", 2)]), Err(StoreError::BadUserName(_))));
        assert!(s.list_users().unwrap().is_empty());
    }

    #[test]
    fn garbage_file_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let junk = b"this is not a database, it is a shopping list\n".repeat(200);
        std::fs::write(&path, &junk).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = SqliteStore::open(&path).err().expect("must refuse").to_string();
        assert!(err.contains("not a database"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), junk);
    }

    #[test]
    fn symlinked_or_exposed_databases_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.db");
        SqliteStore::open(&real).unwrap();
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = SqliteStore::open(&link).err().expect("symlink refused").to_string();
        assert!(e.contains("symlink") && e.contains("link.db"), "{e}");
        let linkdir = dir.path().join("linkdir");
        std::os::unix::fs::symlink(dir.path(), &linkdir).unwrap();
        let e = SqliteStore::open(&linkdir.join("real.db")).err().expect("symlinked directory refused").to_string();
        assert!(e.contains("symlink"), "{e}");
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = SqliteStore::open(&open.join("db")).err().expect("world-writable directory refused").to_string();
        assert!(e.contains("writable by group or others"), "{e}");
        assert!(!open.join("db").exists(), "nothing created in a refused directory");
    }

    #[test]
    fn schema_1_is_refused_then_upgraded_with_users_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).unwrap();
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, verifier BLOB NOT NULL,
                   counter INTEGER NOT NULL, chain_len INTEGER NOT NULL, mac_key BLOB NOT NULL, services TEXT NOT NULL,
                   src_nets TEXT NOT NULL, max_open INTEGER, revoked INTEGER NOT NULL DEFAULT 0, created INTEGER NOT NULL,
                   updated INTEGER NOT NULL);
                 CREATE UNIQUE INDEX users_verifier ON users(verifier);
                 CREATE TABLE doors (id INTEGER PRIMARY KEY, user_name TEXT NOT NULL, service TEXT NOT NULL, addr TEXT NOT NULL,
                   prefix_len INTEGER NOT NULL, proto TEXT NOT NULL, port INTEGER NOT NULL, via TEXT NOT NULL,
                   single_use INTEGER NOT NULL, opened_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
                   closed INTEGER NOT NULL DEFAULT 0);
                 INSERT INTO users VALUES (1, 'dave', x'00', 3, 100, x'0102', 'ssh', '', NULL, 0, 1, 1);
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let e = SqliteStore::open(&path).err().expect("schema 1 refused").to_string();
        assert!(e.contains("nxknock store upgrade"), "{e}");
        assert_eq!(SqliteStore::upgrade(&path).unwrap(), vec!["dave".to_owned()]);
        let mut s = SqliteStore::open(&path).unwrap();
        let users = s.list_users().unwrap();
        assert_eq!(
            (users[0].name.as_str(), users[0].revoked, users[0].services.clone()),
            ("dave", true, vec!["ssh".to_owned()])
        );
        assert!(s.active_users().unwrap().is_empty());
        s.rekey(&enrol("dave", 3)).unwrap();
        assert_eq!(s.active_users().unwrap().len(), 1);
        assert!(SqliteStore::upgrade(&path).unwrap().is_empty(), "upgrading a current database changes nothing");
        assert_eq!(recorded_versions(&path), vec![2], "the upgrade is recorded");
    }

    fn recorded_versions(path: &Path) -> Vec<i64> {
        let c = Connection::open(path).unwrap();
        let mut st = c.prepare("SELECT version FROM schema_version ORDER BY version").unwrap();
        st.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
    }

    #[test]
    fn the_schema_version_is_recorded_in_a_table_also_for_older_schema_2_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        drop(SqliteStore::open(&path).unwrap());
        assert_eq!(recorded_versions(&path), vec![2], "a new database records its version");
        // A schema-2 file from before the table gets it on its next open.
        Connection::open(&path).unwrap().execute_batch("DROP TABLE schema_version").unwrap();
        drop(SqliteStore::open(&path).unwrap());
        assert_eq!(recorded_versions(&path), vec![2]);
        // And the revision trigger, in a file from before it.
        let trigger = || -> i64 {
            Connection::open(&path)
                .unwrap()
                .query_row(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name = 'users_revision'",
                    [],
                    |r| r.get(0),
                )
                .unwrap()
        };
        assert_eq!(trigger(), 1, "a new database has the revision trigger");
        Connection::open(&path).unwrap().execute_batch("DROP TRIGGER users_revision").unwrap();
        drop(SqliteStore::open(&path).unwrap());
        assert_eq!(trigger(), 1, "an older schema-2 file gets it on its next open");
    }

    #[test]
    fn bulk_enrolment_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("db")).unwrap();
        assert_eq!(s.add_users(&[enrol("a", 1), enrol("b", 2), enrol("c", 3)]).unwrap(), 3);
        assert_eq!(s.active_users().unwrap().len(), 3);
        // "b" exists: the whole batch is refused, "d" included.
        assert!(matches!(s.add_users(&[enrol("d", 4), enrol("b", 5)]), Err(StoreError::UserExists(n)) if n == "b"));
        assert_eq!(s.list_users().unwrap().iter().map(|u| u.name.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
    }

    #[test]
    fn another_writer_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut a = SqliteStore::open(&path).unwrap();
        let mut b = SqliteStore::open(&path).unwrap();
        assert!(!a.changed_elsewhere().unwrap());
        b.add_user(&enrol("carol", 4)).unwrap();
        assert!(a.changed_elsewhere().unwrap());
        assert!(!a.changed_elsewhere().unwrap());
    }

    #[test]
    fn doors_are_recorded_listed_and_closed_per_user() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("db")).unwrap();
        let t = now() as u64;
        let d = DoorRecord {
            user: "alice".into(),
            service: "ssh".into(),
            addr: "2001:db8:18::".parse().unwrap(),
            prefix_len: 64,
            proto: Proto::Tcp,
            port: 22,
            via: "dns/udp".into(),
            single_use: true,
            opened_at: t,
            expires_at: t + 30,
            host: String::new(),
        };
        let old = DoorRecord { expires_at: t - 1, ..d.clone() };
        let bobs = DoorRecord { user: "bob".into(), ..d.clone() };
        s.add_users(&[enrol("alice", 1), enrol("bob", 2)]).unwrap();
        let [alice, bob] = [0, 1].map(|i| s.active_users().unwrap()[i].id);
        assert!(s.spend(alice, Form::Plain, &Element([1; 12]), &Element([3; 12]), 1, &[d.clone(), old], None).unwrap());
        assert!(
            s.spend(bob, Form::Plain, &Element([2; 12]), &Element([4; 12]), 1, std::slice::from_ref(&bobs), None)
                .unwrap()
        );
        assert_eq!(s.live_doors(t).unwrap(), vec![bobs.clone(), d.clone()]);
        s.close_door("bob", &d.key()).unwrap();
        assert_eq!(s.live_doors(t).unwrap(), vec![d.clone()], "closing bob's door leaves alice's");
        s.close_door("alice", &d.key()).unwrap();
        assert!(s.live_doors(t).unwrap().is_empty());
    }
}
