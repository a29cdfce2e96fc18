//! Durable chain state: who is enrolled, each user's two chain verifiers, the
//! zone's admission key and the doors nxknock opened.
//!
//! The [`Store`] trait speaks only in our own types and its key operation is an
//! atomic compare-and-advance of one verifier. [`SqliteStore`] is the embedded
//! default (`sqlite.rs`, schema in `schema.sql`); [`PgStore`] shares one
//! PostgreSQL database between several nameservers of a zone (`postgres.rs`).
//! [`open`] picks one from `[store]`.

mod postgres;
mod sqlite;

use std::net::IpAddr;
use std::path::PathBuf;

pub use postgres::{PgStore, check_url};
pub use sqlite::{IntegrityCheck, SqliteStore};

use crate::config::StoreConfig;

/// Open the configured store, creating it if absent (`serve`, `user add`).
pub fn open(cfg: &StoreConfig) -> Result<Box<dyn Store>, StoreError> {
    Ok(match &cfg.url {
        Some(url) => Box::new(PgStore::open(url, true)?),
        None => Box::new(SqliteStore::open(&cfg.path)?),
    })
}

/// Open the configured store, which must exist already: commands that only read
/// or change what is there create nothing (a typo is an error, not a new database).
pub fn open_existing(cfg: &StoreConfig) -> Result<Box<dyn Store>, StoreError> {
    Ok(match &cfg.url {
        Some(url) => Box::new(PgStore::open(url, false)?),
        None => Box::new(SqliteStore::open_existing(&cfg.path)?),
    })
}

use crate::firewall::{DoorKey, Proto};
use crate::netaddr::Prefix;
use crate::token::{Element, Form, ZONE_KEY_LEN};

/// Where one of a user's chains stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainState {
    /// Current verifier `x(n − counter)`; the next knock of this form must hash to it.
    pub verifier: Element,
    /// Elements consumed so far (including ones skipped by the look-ahead window).
    pub counter: u64,
    /// Unix seconds of the last accepted knock (or of enrolment).
    pub updated: u64,
}

/// One enrolled user as the server sees it. Holds no chain seed: the server never has one.
#[derive(Clone, Debug)]
pub struct UserRecord {
    pub id: i64,
    pub name: String,
    /// Both chains, indexed by [`Form::index`].
    pub chains: [ChainState; 2],
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
    /// The user row's revision: its `updated` stamp, which every change to the row
    /// (`user set`, rekey, revoke) raises by at least one. A decision taken on this
    /// record is committed only if the row is still at this revision
    /// ([`Store::spend`]), so a record kept in memory cannot open a door by a
    /// policy that has changed meanwhile.
    pub revision: i64,
}

impl UserRecord {
    pub fn chain(&self, form: Form) -> &ChainState {
        &self.chains[form.index()]
    }

    pub fn chain_mut(&mut self, form: Form) -> &mut ChainState {
        &mut self.chains[form.index()]
    }
}

/// What `user add` and `user rekey` write.
#[derive(Clone, Debug)]
pub struct Enrolment {
    pub name: String,
    /// `x(chain_len)` of each chain, indexed by [`Form::index`].
    pub verifiers: [Element; 2],
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
    pub addr: IpAddr,
    pub prefix_len: u8,
    pub proto: Proto,
    pub port: u16,
    pub via: String,
    pub single_use: bool,
    /// Unix seconds.
    pub opened_at: u64,
    pub expires_at: u64,
    /// The host whose kernel holds the door: empty for the nameserver that accepted
    /// the knock, else an agent's `[agent] name` (`[[service]] hosts`).
    pub host: String,
}

impl DoorRecord {
    /// The kernel key of the door this record describes.
    pub fn key(&self) -> DoorKey {
        DoorKey { prefix: Prefix::new(self.addr, self.prefix_len), proto: self.proto, port: self.port }
    }

    /// The kernel door this record stands for, open for `open_for`.
    pub fn door(&self, open_for: std::time::Duration) -> crate::firewall::Door {
        crate::firewall::Door {
            addr: self.addr,
            prefix_len: self.prefix_len,
            proto: self.proto,
            port: self.port,
            open_for,
            single_use: self.single_use,
        }
    }
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
    #[error("database {path}: {detail}")]
    Unsafe { path: PathBuf, detail: String },
    #[error(
        "database {path} has schema 1, from before plain and bound knocks had separate chains; \
         run `nxknock store upgrade --config FILE` (users stay revoked until `nxknock user rekey NAME --out FILE`)"
    )]
    OldSchema { path: PathBuf },
    #[error("database {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A command that only reads found no database: nothing was created.
    #[error(
        "database {path} does not exist or is empty (check [store] path; `nxknock serve` and `nxknock user add` create it)"
    )]
    Missing { path: PathBuf },
    /// A PostgreSQL error (the URL is shown without its password).
    #[error("database {url}: {source}")]
    Postgres {
        url: String,
        #[source]
        source: ::postgres::Error,
    },
    #[error("database {url}: {detail}")]
    PgInvalid { url: String, detail: String },
    /// The connection is lost and the next attempt to make it again is not due yet.
    #[error("database {url}: not connected (retrying); nothing opens meanwhile")]
    PgUnavailable { url: String },
    #[error("user {0:?} already exists")]
    UserExists(String),
    #[error("no such user {0:?}")]
    NoSuchUser(String),
    #[error("user name {0:?}: use 1-64 letters, digits, '.', '_', '-' or '@', starting with a letter or digit")]
    BadUserName(String),
}

/// What another writer changed, as precisely as the store can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// One chain moved (another nameserver accepted a knock): `old`, if any, is no
    /// longer a verifier; `new`, if any, is. The index follows without a reload.
    Chain { user: i64, form: Form, old: Option<Element>, new: Option<Element> },
    /// Anything else (users added, revoked, rekeyed; door records closed), or not
    /// known precisely: reload the index and re-check the doors.
    Other,
}

/// Store upkeep for a thread of its own (see [`Store::housekeeping`]); call it
/// every [`HOUSEKEEPING_EVERY`].
pub type Housekeeping = Box<dyn FnMut() -> Result<(), StoreError> + Send>;

/// How often [`Housekeeping`] runs.
pub const HOUSEKEEPING_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Durable chain state. Implementations must make [`Store::spend`] atomic.
pub trait Store: Send {
    /// Move the store's own upkeep off the knock path: SQLite's WAL checkpoints would
    /// otherwise run inside whichever commit crosses the WAL's size limit — a
    /// knock's, several milliseconds long. The daemon runs the returned job on a
    /// thread of its own; `None` when there is nothing to move.
    fn housekeeping(&mut self) -> Result<Option<Housekeeping>, StoreError> {
        Ok(None)
    }
    /// All users that may knock (not revoked), for the in-memory verifier index.
    fn active_users(&mut self) -> Result<Vec<UserRecord>, StoreError>;
    /// Every user, revoked ones included, ordered by name.
    fn list_users(&mut self) -> Result<Vec<UserRecord>, StoreError>;
    /// Names of revoked users (the daemon closes their doors).
    fn revoked_users(&mut self) -> Result<Vec<String>, StoreError> {
        Ok(self.list_users()?.into_iter().filter(|u| u.revoked).map(|u| u.name).collect())
    }
    /// Call `f(user, form, verifier)` for every chain of every active user (the
    /// verifier index is built from this at start-up and after outside changes).
    fn active_verifiers(&mut self, f: &mut dyn FnMut(i64, Form, Element)) -> Result<(), StoreError>;
    /// About how many active users and chains there are (an upper bound is fine):
    /// sizes the index before it is filled.
    fn count_active(&mut self) -> Result<(usize, usize), StoreError>;
    /// One user by id, revoked or not.
    fn user(&mut self, id: i64) -> Result<Option<UserRecord>, StoreError>;
    /// The zone-wide admission key (created with the database).
    fn zone_key(&mut self) -> Result<[u8; ZONE_KEY_LEN], StoreError>;
    /// Spend an element: set `user`'s `form` chain to `new` and `counter` only if its
    /// verifier is still `expected` and the user is not revoked, and record `doors`
    /// (the doors this knock opens), all in one durable transaction — one commit, one
    /// disk flush per knock, and never a spent element without its doors' records or
    /// the reverse. With `revision`, also only if the user's row is still at that
    /// [`UserRecord::revision`] (the one the decision was taken on). `Ok(false)`
    /// means another writer won, the user was revoked or changed: nothing was
    /// written and the caller must not open a door.
    #[allow(clippy::too_many_arguments)]
    fn spend(
        &mut self,
        user: i64,
        form: Form,
        expected: &Element,
        new: &Element,
        counter: u64,
        doors: &[DoorRecord],
        revision: Option<i64>,
    ) -> Result<bool, StoreError>;
    /// Enrol a user; returns the user's id (written into the credential).
    fn add_user(&mut self, e: &Enrolment) -> Result<i64, StoreError>;
    /// Enrol many users at once, all or none (bulk enrolment: migrations, benchmarks).
    fn add_users(&mut self, users: &[Enrolment]) -> Result<usize, StoreError>;
    /// Revoke by name and close the user's door records, in one transaction; returns
    /// false if the user was already revoked.
    fn revoke(&mut self, name: &str) -> Result<bool, StoreError>;
    /// Replace a user's chains and MAC key (and un-revoke), closing the door records
    /// of the old credential in the same transaction; returns the user's id.
    fn rekey(&mut self, e: &Enrolment) -> Result<i64, StoreError>;
    /// True if another process changed the data since the last call (cheap; no disk I/O
    /// in WAL mode), so the verifier can reload its index after `user add`/`revoke`.
    fn changed_elsewhere(&mut self) -> Result<bool, StoreError>;
    /// [`Store::changed_elsewhere`], itemised where the store can: a shared store
    /// reports other nameservers' chain moves one by one, so a busy zone does not
    /// make every nameserver reload its whole index at every knock elsewhere.
    fn changes_elsewhere(&mut self) -> Result<Vec<Change>, StoreError> {
        Ok(if self.changed_elsewhere()? { vec![Change::Other] } else { Vec::new() })
    }
    /// Doors recorded as open whose expiry is after `now` (unix seconds), newest
    /// first, for every host. (SQLite records only the nameserver's own: a record
    /// for another host is refused.)
    fn live_doors(&mut self, now: u64) -> Result<Vec<DoorRecord>, StoreError>;
    /// Mark `user`'s recorded doors for this key closed (close knock).
    fn close_door(&mut self, user: &str, key: &DoorKey) -> Result<(), StoreError>;
    /// Mark every open door record of `user` closed; returns how many were open.
    /// (A running daemon then removes the kernel doors no live record accounts for.)
    fn close_user_doors(&mut self, user: &str) -> Result<usize, StoreError>;
    /// Remove a user and their chains, closing their door records in the same
    /// transaction (as revoke does). The name can be enrolled again afterwards.
    fn delete_user(&mut self, name: &str) -> Result<(), StoreError>;
    /// Replace a user's policy: services they may open (empty: all), networks they
    /// may open for (empty: anywhere), longest door (`None`: the service's). Their
    /// next knock obeys it; doors already open keep their time.
    fn set_policy(
        &mut self,
        name: &str,
        services: &[String],
        from: &[String],
        max_open: Option<u64>,
    ) -> Result<(), StoreError>;
}

/// User names reach logs, hook arguments and `doors` output: a letter or digit
/// first (never an option to a hook's program), then a short safe alphabet.
pub fn check_user_name(name: &str) -> Result<(), StoreError> {
    let ok = (1..=64).contains(&name.len())
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || b"._-@".contains(&c));
    if ok { Ok(()) } else { Err(StoreError::BadUserName(name.to_owned())) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names() {
        for good in ["alice", "Bob", "a", "alice.smith", "a-b_c@example.com", "0day"] {
            check_user_name(good).unwrap();
        }
        for bad in ["", "-rf", ".hidden", "_x", "@x", "a b", "a/b", "ä", "a;b", &"a".repeat(65)] {
            assert!(check_user_name(bad).is_err(), "{bad:?}");
        }
    }
}
