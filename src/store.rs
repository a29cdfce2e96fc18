//! Durable chain state: who is enrolled, each user's current verifier and counter.
//!
//! The [`Store`] trait is the seam for a future PostgreSQL backend (several
//! nameservers of one zone sharing state), so it speaks only in our own types
//! and its key operation is an atomic compare-and-advance of one verifier.
//! [`SqliteStore`] is the embedded default: WAL, `synchronous=FULL`, so an
//! advance that returned `Ok(true)` is on disk before any door opens.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

use crate::token::Element;

/// One enrolled user as the server sees it. Holds no chain seed: the server never has one.
#[derive(Clone, Debug)]
pub struct UserRecord {
    pub id: i64,
    pub name: String,
    /// Current verifier `x(n − counter)`; the next knock must hash to it.
    pub verifier: Element,
    /// Elements consumed so far (including ones skipped by the look-ahead window).
    pub counter: u64,
    pub chain_len: u64,
    /// Key for bound-knock tags. Secret: the database file is 0600.
    pub mac_key: Vec<u8>,
    /// Services the user may open; empty means every configured service.
    pub services: Vec<String>,
    /// Source networks (CIDR) the user may open for; empty means any.
    pub from: Vec<String>,
    /// Longest a door of this user may stay open (seconds); `None`: the service default.
    pub max_open: Option<u64>,
    pub revoked: bool,
    /// Unix seconds of the last change (an accepted knock advances it).
    pub updated: u64,
}

/// What `user add` and `user rekey` write.
#[derive(Clone, Debug)]
pub struct Enrolment {
    pub name: String,
    pub verifier: Element,
    pub chain_len: u64,
    pub mac_key: Vec<u8>,
    pub services: Vec<String>,
    pub from: Vec<String>,
    pub max_open: Option<u64>,
}

/// A door nxknock opened, as recorded for `nxknock doors` and for adoption at restart.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DoorRecord {
    pub user: String,
    pub service: String,
    pub addr: std::net::IpAddr,
    pub prefix_len: u8,
    pub proto: String,
    pub port: u16,
    pub via: String,
    pub single_use: bool,
    /// Unix seconds.
    pub opened_at: u64,
    pub expires_at: u64,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database {path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error("database {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("user {0:?} already exists")]
    UserExists(String),
    #[error("no such user {0:?}")]
    NoSuchUser(String),
}

/// Durable chain state. Implementations must make [`Store::advance`] atomic.
pub trait Store: Send {
    /// All users that may knock (not revoked), for the in-memory verifier index.
    fn active_users(&mut self) -> Result<Vec<UserRecord>, StoreError>;
    /// Every user, revoked ones included, ordered by name.
    fn list_users(&mut self) -> Result<Vec<UserRecord>, StoreError>;
    /// Set `user`'s verifier to `new` and counter to `counter` only if it is still
    /// `expected` and the user is not revoked. `Ok(false)` means another writer won
    /// (or the user was revoked); the caller must not open a door.
    fn advance(&mut self, user: i64, expected: &Element, new: &Element, counter: u64) -> Result<bool, StoreError>;
    fn add_user(&mut self, e: &Enrolment) -> Result<i64, StoreError>;
    /// Enrol many users at once, all or none (bulk enrolment: migrations, benchmarks).
    /// The default adds them one by one; a store should do it in one transaction.
    fn add_users(&mut self, users: &[Enrolment]) -> Result<usize, StoreError> {
        for e in users {
            self.add_user(e)?;
        }
        Ok(users.len())
    }
    /// Revoke by name; returns false if the user was already revoked.
    fn revoke(&mut self, name: &str) -> Result<bool, StoreError>;
    /// Replace a user's chain and MAC key (and un-revoke).
    fn rekey(&mut self, e: &Enrolment) -> Result<(), StoreError>;
    /// True if another process changed the data since the last call (cheap; no disk I/O
    /// in WAL mode), so the verifier can reload its index after `user add`/`revoke`.
    fn changed_elsewhere(&mut self) -> Result<bool, StoreError>;
    /// Record doors just opened (one transaction).
    fn record_doors(&mut self, doors: &[DoorRecord]) -> Result<(), StoreError>;
    /// Doors recorded as open whose expiry is after `now` (unix seconds), newest first.
    fn live_doors(&mut self, now: u64) -> Result<Vec<DoorRecord>, StoreError>;
    /// Mark recorded doors for this key closed (close knock, or removed at restart).
    fn close_door(&mut self, addr: std::net::IpAddr, prefix_len: u8, proto: &str, port: u16) -> Result<(), StoreError>;
}

const SCHEMA_VERSION: i64 = 1;

/// The embedded SQLite store.
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    data_version: i64,
}

impl SqliteStore {
    /// Open (creating if absent, mode 0600) and check the schema. A file that is
    /// not an nxknock database is refused with an error naming it; nothing is written to it.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let io = |source| StoreError::Io { path: path.to_owned(), source };
        if !path.exists() {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                use std::os::unix::fs::DirBuilderExt;
                // A directory we create for the database is private too.
                std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
            }
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
        }
        let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
        if mode & 0o077 != 0 {
            // The file holds MAC keys: tighten rather than refuse, and say so.
            tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "database was readable by others; setting 0600");
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
        let sq = |source| StoreError::Sqlite { path: path.to_owned(), source };
        let conn = Connection::open(path).map_err(sq)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(sq)?;
        let mut store = SqliteStore { conn, path: path.to_owned(), data_version: 0 };
        store.init()?;
        store.data_version = store.data_version()?;
        Ok(store)
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite { path: self.path.clone(), source }
    }

    fn init(&mut self) -> Result<(), StoreError> {
        let conn = &self.conn;
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        if check != "ok" {
            return Err(StoreError::Invalid { path: self.path.clone(), detail: format!("integrity check failed: {check}") });
        }
        conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| self.err(e))?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(|e| self.err(e))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(|e| self.err(e))?;
        match version {
            0 => {
                conn.execute_batch(
                    "BEGIN;
                     CREATE TABLE users (
                        id        INTEGER PRIMARY KEY,
                        name      TEXT NOT NULL UNIQUE,
                        verifier  BLOB NOT NULL,
                        counter   INTEGER NOT NULL,
                        chain_len INTEGER NOT NULL,
                        mac_key   BLOB NOT NULL,
                        services  TEXT NOT NULL,
                        src_nets  TEXT NOT NULL,
                        max_open  INTEGER,
                        revoked   INTEGER NOT NULL DEFAULT 0,
                        created   INTEGER NOT NULL,
                        updated   INTEGER NOT NULL
                     );
                     CREATE UNIQUE INDEX users_verifier ON users(verifier);
                     CREATE TABLE doors (
                        id         INTEGER PRIMARY KEY,
                        user_name  TEXT NOT NULL,
                        service    TEXT NOT NULL,
                        addr       TEXT NOT NULL,
                        prefix_len INTEGER NOT NULL,
                        proto      TEXT NOT NULL,
                        port       INTEGER NOT NULL,
                        via        TEXT NOT NULL,
                        single_use INTEGER NOT NULL,
                        opened_at  INTEGER NOT NULL,
                        expires_at INTEGER NOT NULL,
                        closed     INTEGER NOT NULL DEFAULT 0
                     );
                     CREATE INDEX doors_expiry ON doors(expires_at);
                     PRAGMA user_version = 1;
                     COMMIT;",
                )
                .map_err(|e| self.err(e))?;
                Ok(())
            }
            SCHEMA_VERSION => Ok(()),
            v => Err(StoreError::Invalid {
                path: self.path.clone(),
                detail: format!("schema version {v} is not one this nxknock knows ({SCHEMA_VERSION})"),
            }),
        }
    }

    fn data_version(&self) -> Result<i64, StoreError> {
        self.conn.pragma_query_value(None, "data_version", |r| r.get(0)).map_err(|e| self.err(e))
    }

    fn query_users(&self, sql: &str) -> Result<Vec<UserRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                let verifier: Vec<u8> = r.get(2)?;
                Ok((
                    verifier,
                    UserRecord {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        verifier: Element([0; crate::token::ELEMENT_LEN]),
                        counter: r.get::<_, i64>(3)? as u64,
                        chain_len: r.get::<_, i64>(4)? as u64,
                        mac_key: r.get(5)?,
                        services: split_list(&r.get::<_, String>(6)?),
                        from: split_list(&r.get::<_, String>(7)?),
                        revoked: r.get::<_, i64>(8)? != 0,
                        max_open: r.get::<_, Option<i64>>(9)?.map(|v| v.max(1) as u64),
                        updated: r.get::<_, i64>(10)?.max(0) as u64,
                    },
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (verifier, mut user) = row.map_err(|e| self.err(e))?;
            user.verifier = Element::from_slice(&verifier).ok_or_else(|| StoreError::Invalid {
                path: self.path.clone(),
                detail: format!("user {:?} has a verifier of {} bytes", user.name, verifier.len()),
            })?;
            out.push(user);
        }
        Ok(out)
    }
}

const USER_COLUMNS: &str =
    "SELECT id, name, verifier, counter, chain_len, mac_key, services, src_nets, revoked, max_open, updated FROM users";

const ADD_USER: &str =
    "INSERT INTO users (name, verifier, counter, chain_len, mac_key, services, src_nets, max_open, revoked, created, updated)
     VALUES (?1, ?2, 0, ?3, ?4, ?5, ?6, ?8, 0, ?7, ?7)";

fn split_list(s: &str) -> Vec<String> {
    s.split(',').filter(|x| !x.is_empty()).map(str::to_owned).collect()
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

impl Store for SqliteStore {
    fn active_users(&mut self) -> Result<Vec<UserRecord>, StoreError> {
        self.query_users(&format!("{USER_COLUMNS} WHERE revoked = 0"))
    }

    fn list_users(&mut self) -> Result<Vec<UserRecord>, StoreError> {
        self.query_users(&format!("{USER_COLUMNS} ORDER BY name"))
    }

    fn advance(&mut self, user: i64, expected: &Element, new: &Element, counter: u64) -> Result<bool, StoreError> {
        let n = self
            .conn
            .prepare_cached(
                "UPDATE users SET verifier = ?1, counter = ?2, updated = ?3
                 WHERE id = ?4 AND verifier = ?5 AND revoked = 0",
            )
            .and_then(|mut s| s.execute(params![&new.0[..], counter as i64, now(), user, &expected.0[..]]))
            .map_err(|e| self.err(e))?;
        Ok(n == 1)
    }

    fn add_user(&mut self, e: &Enrolment) -> Result<i64, StoreError> {
        let res = self.conn.execute(
            ADD_USER,
            params![
                e.name,
                &e.verifier.0[..],
                e.chain_len as i64,
                e.mac_key,
                e.services.join(","),
                e.from.join(","),
                now(),
                e.max_open.map(|v| v as i64)
            ],
        );
        match res {
            Ok(_) => Ok(self.conn.last_insert_rowid()),
            Err(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                Err(StoreError::UserExists(e.name.clone()))
            }
            Err(err) => Err(self.err(err)),
        }
    }

    fn add_users(&mut self, users: &[Enrolment]) -> Result<usize, StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut stmt = tx.prepare_cached(ADD_USER).map_err(err)?;
            let now = now();
            for e in users {
                stmt.execute(params![
                    e.name,
                    &e.verifier.0[..],
                    e.chain_len as i64,
                    e.mac_key,
                    e.services.join(","),
                    e.from.join(","),
                    now,
                    e.max_open.map(|v| v as i64)
                ])
                .map_err(|source| match source {
                    rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                        StoreError::UserExists(e.name.clone())
                    }
                    source => err(source),
                })?;
            }
        }
        tx.commit().map_err(err)?;
        Ok(users.len())
    }

    fn revoke(&mut self, name: &str) -> Result<bool, StoreError> {
        let revoked: Option<i64> = self
            .conn
            .query_row("SELECT revoked FROM users WHERE name = ?1", [name], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))?;
        match revoked {
            None => Err(StoreError::NoSuchUser(name.to_owned())),
            Some(1) => Ok(false),
            Some(_) => {
                self.conn
                    .execute("UPDATE users SET revoked = 1, updated = ?2 WHERE name = ?1", params![name, now()])
                    .map_err(|e| self.err(e))?;
                Ok(true)
            }
        }
    }

    fn rekey(&mut self, e: &Enrolment) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE users SET verifier = ?2, counter = 0, chain_len = ?3, mac_key = ?4, revoked = 0, updated = ?5
                 WHERE name = ?1",
                params![e.name, &e.verifier.0[..], e.chain_len as i64, e.mac_key, now()],
            )
            .map_err(|err| self.err(err))?;
        if n == 0 {
            return Err(StoreError::NoSuchUser(e.name.clone()));
        }
        Ok(())
    }

    fn changed_elsewhere(&mut self) -> Result<bool, StoreError> {
        let v = self.data_version()?;
        let changed = v != self.data_version;
        self.data_version = v;
        Ok(changed)
    }

    fn record_doors(&mut self, doors: &[DoorRecord]) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO doors (user_name, service, addr, prefix_len, proto, port, via, single_use, opened_at, expires_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )
                .map_err(err)?;
            for d in doors {
                stmt.execute(params![
                    d.user,
                    d.service,
                    d.addr.to_string(),
                    d.prefix_len,
                    d.proto,
                    d.port,
                    d.via,
                    d.single_use,
                    d.opened_at as i64,
                    d.expires_at as i64
                ])
                .map_err(err)?;
            }
            // Keep the table small: forget doors that expired a day ago.
            tx.execute("DELETE FROM doors WHERE expires_at < ?1", [now() - 86_400]).map_err(err)?;
        }
        tx.commit().map_err(err)
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
                    DoorRecord {
                        user: r.get(0)?,
                        service: r.get(1)?,
                        addr: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                        prefix_len: r.get(3)?,
                        proto: r.get(4)?,
                        port: r.get(5)?,
                        via: r.get(6)?,
                        single_use: r.get(7)?,
                        opened_at: r.get::<_, i64>(8)? as u64,
                        expires_at: r.get::<_, i64>(9)? as u64,
                    },
                ))
            })
            .map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            let (addr, mut d) = row.map_err(err)?;
            // A row we cannot parse is skipped, not trusted.
            let Ok(a) = addr.parse() else { continue };
            d.addr = a;
            out.push(d);
        }
        Ok(out)
    }

    fn close_door(&mut self, addr: std::net::IpAddr, prefix_len: u8, proto: &str, port: u16) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE doors SET closed = 1 WHERE addr = ?1 AND prefix_len = ?2 AND proto = ?3 AND port = ?4 AND closed = 0",
                params![addr.to_string(), prefix_len, proto, port],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enrol(name: &str, v: u8) -> Enrolment {
        Enrolment {
            name: name.into(),
            verifier: Element([v; 12]),
            chain_len: 100,
            mac_key: vec![9; 32],
            services: vec!["ssh".into()],
            from: vec![],
            max_open: None,
        }
    }

    #[test]
    fn compare_and_advance_is_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let mut s = SqliteStore::open(&path).unwrap();
        let id = s.add_user(&enrol("alice", 1)).unwrap();
        assert!(s.advance(id, &Element([1; 12]), &Element([2; 12]), 1).unwrap());
        // The same expected verifier again: someone already advanced.
        assert!(!s.advance(id, &Element([1; 12]), &Element([3; 12]), 2).unwrap());
        drop(s);
        let mut s = SqliteStore::open(&path).unwrap();
        let u = &s.active_users().unwrap()[0];
        assert_eq!((u.verifier, u.counter), (Element([2; 12]), 1));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn revoked_users_cannot_advance_and_are_not_active() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("db")).unwrap();
        let id = s.add_user(&enrol("bob", 1)).unwrap();
        assert!(matches!(s.add_user(&enrol("bob", 5)), Err(StoreError::UserExists(_))));
        assert!(s.revoke("bob").unwrap());
        assert!(!s.revoke("bob").unwrap());
        assert!(matches!(s.revoke("nobody"), Err(StoreError::NoSuchUser(_))));
        assert!(s.active_users().unwrap().is_empty());
        assert!(!s.advance(id, &Element([1; 12]), &Element([2; 12]), 1).unwrap());
        assert_eq!(s.list_users().unwrap().len(), 1);
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
}

#[cfg(test)]
mod door_tests {
    use super::*;

    #[test]
    fn doors_are_recorded_listed_and_closed() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("db")).unwrap();
        let t = now() as u64;
        let d = DoorRecord {
            user: "alice".into(),
            service: "ssh".into(),
            addr: "2001:db8:18::".parse().unwrap(),
            prefix_len: 64,
            proto: "tcp".into(),
            port: 22,
            via: "dns/udp".into(),
            single_use: true,
            opened_at: t,
            expires_at: t + 30,
        };
        let old = DoorRecord { expires_at: t - 1, ..d.clone() };
        s.record_doors(&[d.clone(), old]).unwrap();
        assert_eq!(s.live_doors(t).unwrap(), vec![d.clone()]);
        s.close_door(d.addr, 64, "tcp", 22).unwrap();
        assert!(s.live_doors(t).unwrap().is_empty());
    }
}
