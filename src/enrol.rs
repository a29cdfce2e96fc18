//! Enrolment: making a user's chains and handing the secrets to exactly one place,
//! the 0600 credential file. The store gets only verifiers and the MAC key.
//!
//! `add` and `rekey` order their writes so a failure never leaves a user that
//! nobody can knock as without saying so: `add` enrols, then writes the credential
//! (removing the user again if that fails, so the name can simply be added again); `rekey` writes the new credential first,
//! then switches the store over (removing the file if that fails).

use std::path::{Path, PathBuf};

use crate::credential::{Credential, CredentialError, CredentialKeys};
use crate::netaddr::Prefix;
use crate::store::{Enrolment, Store, StoreError, check_user_name};
use crate::token::{Form, Seed, ZoneId};

/// The longest chain `user add` makes: a client computes up to this many hashes per knock.
pub const MAX_CHAIN_LEN: u64 = 10_000_000;

/// What the operator asks for.
#[derive(Clone, Debug)]
pub struct UserSpec {
    pub name: String,
    /// Services the user may open; empty: all.
    pub services: Vec<String>,
    /// Source networks the user may open for; empty: anywhere.
    pub from: Vec<Prefix>,
    pub max_open: Option<u64>,
    pub chain_len: u64,
    /// Nameserver to record in the credential for `knock`.
    pub server: Option<String>,
    /// Service names the credential records as openable (the client refuses others).
    pub openable: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrolError {
    #[error("--chain-len must be between 1 and {MAX_CHAIN_LEN}")]
    ChainLen,
    #[error("--max-open must be at least 1 second")]
    MaxOpen,
    #[error("{0} already exists; refusing to overwrite a credential")]
    OutExists(PathBuf),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the credential for {user} could not be written, so the user was not added: {source}")]
    CredentialLost {
        user: String,
        #[source]
        source: CredentialError,
    },
    #[error(transparent)]
    Credential(#[from] CredentialError),
}

/// A fresh seed (two chains) and MAC key, and the enrolment the store keeps.
struct NewChains {
    seed: Seed,
    mac_key: Vec<u8>,
    enrol: Enrolment,
}

fn new_chains(spec: &UserSpec, zone: &ZoneId) -> Result<NewChains, EnrolError> {
    if !(1..=MAX_CHAIN_LEN).contains(&spec.chain_len) {
        return Err(EnrolError::ChainLen);
    }
    if spec.max_open == Some(0) {
        return Err(EnrolError::MaxOpen);
    }
    check_user_name(&spec.name)?;
    let seed = Seed::random();
    let mut mac_key = vec![0u8; 32];
    rand::fill(&mut mac_key[..]);
    let enrol = Enrolment {
        name: spec.name.clone(),
        verifiers: Form::ALL.map(|form| seed.element(zone, form, spec.chain_len)),
        chain_len: spec.chain_len,
        mac_key: mac_key.clone(),
        services: spec.services.clone(),
        from: spec.from.iter().map(Prefix::to_string).collect(),
        max_open: spec.max_open,
    };
    Ok(NewChains { seed, mac_key, enrol })
}

fn credential(
    c: &NewChains,
    id: i64,
    zone: &ZoneId,
    server: Option<String>,
    store: &mut dyn Store,
) -> Result<Credential, EnrolError> {
    let zone_key = store.zone_key()?;
    // SQLite row ids start at 1 and grow by one; a store past u32 is refused, not wrapped.
    let id = u32::try_from(id).map_err(|_| StoreError::Invalid {
        path: PathBuf::new(),
        detail: format!("user id {id} does not fit a credential"),
    })?;
    let keys = CredentialKeys { seed: &c.seed, mac_key: &c.mac_key, zone_key: &zone_key };
    Ok(Credential::new(&c.enrol.name, id, zone, server, c.enrol.chain_len, keys))
}

/// Enrol a new user and write their credential to `out`. Returns what was enrolled.
pub fn add(store: &mut dyn Store, zone: &ZoneId, spec: &UserSpec, out: &Path) -> Result<Enrolment, EnrolError> {
    if out.exists() {
        return Err(EnrolError::OutExists(out.to_owned()));
    }
    let chains = new_chains(spec, zone)?;
    let id = store.add_user(&chains.enrol)?;
    let written = credential(&chains, id, zone, spec.server.clone(), store).and_then(|mut c| {
        c.services = spec.openable.clone();
        Ok(c.create(out)?)
    });
    if let Err(e) = written {
        // Do not leave a user nobody can knock as: remove it (revoke if even that
        // fails), so a second `user add` of the same name just works.
        if store.delete_user(&spec.name).is_err() {
            let _ = store.revoke(&spec.name);
        }
        let source = match e {
            EnrolError::Credential(c) => c,
            other => return Err(other),
        };
        return Err(EnrolError::CredentialLost { user: spec.name.clone(), source });
    }
    Ok(chains.enrol)
}

/// Give an existing user fresh chains and MAC key (and un-revoke), writing the
/// new credential to `out` first: a rekey whose credential is lost would lock the user out.
pub fn rekey(
    store: &mut dyn Store,
    zone: &ZoneId,
    name: &str,
    chain_len: u64,
    server: Option<String>,
    openable: Vec<String>,
    out: &Path,
) -> Result<(), EnrolError> {
    if out.exists() {
        return Err(EnrolError::OutExists(out.to_owned()));
    }
    let spec =
        UserSpec { name: name.to_owned(), services: vec![], from: vec![], max_open: None, chain_len, server, openable };
    let chains = new_chains(&spec, zone)?;
    let id = store.list_users()?.into_iter().find(|u| u.name == name).map(|u| u.id);
    let id = id.ok_or_else(|| StoreError::NoSuchUser(name.to_owned()))?;
    let mut cred = credential(&chains, id, zone, spec.server, store)?;
    cred.services = spec.openable;
    cred.create(out)?;
    if let Err(e) = store.rekey(&chains.enrol) {
        let _ = std::fs::remove_file(out);
        return Err(e.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    fn spec(name: &str) -> UserSpec {
        UserSpec {
            name: name.into(),
            services: vec![],
            from: vec![],
            max_open: None,
            chain_len: 100,
            server: None,
            openable: vec!["ssh".into()],
        }
    }

    #[test]
    fn add_then_rekey_round_trip_through_the_credential() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let zone = ZoneId::new("knock.example.com");
        let out = dir.path().join("alice.cred");
        add(&mut store, &zone, &spec("alice"), &out).unwrap();
        let cred = Credential::load(&out).unwrap();
        let user = &store.active_users().unwrap()[0];
        assert_eq!(i64::from(cred.user_id), user.id);
        assert!(matches!(add(&mut store, &zone, &spec("bob"), &out), Err(EnrolError::OutExists(_))));
        assert!(matches!(
            add(&mut store, &zone, &spec("-bob"), &dir.path().join("b")),
            Err(EnrolError::Store(StoreError::BadUserName(_)))
        ));
        let out2 = dir.path().join("alice2.cred");
        rekey(&mut store, &zone, "alice", 50, None, vec![], &out2).unwrap();
        assert_eq!(Credential::load(&out2).unwrap().user_id, cred.user_id);
        assert_ne!(store.active_users().unwrap()[0].chains, user.chains);
        let out3 = dir.path().join("nobody.cred");
        assert!(matches!(
            rekey(&mut store, &zone, "nobody", 50, None, vec![], &out3),
            Err(EnrolError::Store(StoreError::NoSuchUser(_)))
        ));
        assert!(!out3.exists());
    }
}
