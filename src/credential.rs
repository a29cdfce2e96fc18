//! The client's credential file: chain seed, MAC key, the zone's admission key and
//! how many elements of each chain are used.
//!
//! Format 2 (this one) has one seed for two chains, plain and bound
//! ([`crate::token::Form`]), each with its own counter. Format 1 files (one chain
//! used for both forms) are refused with the command that replaces them: their
//! elements may already have travelled inside bound labels.
//!
//! It is the only place a seed exists. Written 0600 through a temporary file and
//! an atomic rename (a crash leaves the old or the new file, never half of one),
//! and refused when group or others can read it (Doorman's `.knockcf` rule).
//! Elements are reserved — the counter saved — *before* they are printed or
//! sent, so no element is ever handed out twice: [`Credential::take`] holds an
//! exclusive `flock` on a sibling lock file (`.NAME.lock`) while it re-reads,
//! advances and saves the counter, so two `otp`/`knock` processes on one
//! credential never hand out the same element. (The lock cannot be on the
//! credential itself: the rename replaces its inode.)

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use data_encoding::HEXLOWER;
use serde::{Deserialize, Serialize};

use crate::token::{Element, Form, Seed, ZONE_KEY_LEN, ZoneId, ZoneKey, chain};

/// The credential format this version writes and reads.
pub const FORMAT: u32 = 2;

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    pub format: u32,
    /// For the user's eyes only; never sent.
    pub user: String,
    /// The server's number for this user. Sent only encrypted (whoami), never the name.
    pub user_id: u32,
    pub zone: String,
    /// Nameserver to knock directly, if the operator filled it in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// Services this credential may open, as enrolled (the client refuses others
    /// before knocking); empty when not recorded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// The server's closed UDP port for `knock --via udp` (its `[pcap] udp_port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_port: Option<u16>,
    /// The server's port range for `knock --via tcp|udp-seq` (its `[pcap] sequence_ports`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence_ports: Option<String>,
    /// Length of each of the two chains.
    pub chain_len: u64,
    /// Plain elements handed out so far (names printed by `otp`).
    pub used_plain: u64,
    /// Bound elements handed out so far (knocks sent, bound names printed).
    pub used_bound: u64,
    seed: String,
    mac_key: String,
    zone_key: String,
    /// A saved element of each chain just below the next one to hand out, so a
    /// knock hashes at most [`PEBBLE_STRIDE`] times instead of up to `chain_len`
    /// (~0.6 ms at 10,000). No more secret than `seed`, beside which it is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pebble_plain: Option<Pebble>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pebble_bound: Option<Pebble>,
}

/// Element `index` of a chain (hex), saved to start hashing from.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pebble {
    index: u64,
    element: String,
}

/// Pebbles sit on multiples of this: a knock costs at most this many hashes, and
/// every this many knocks the next pebble is hashed from the start (off the
/// knock's path in [`Credential::take_sending`]).
const PEBBLE_STRIDE: u64 = 64;

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("user", &self.user)
            .field("zone", &self.zone)
            .field("chain_len", &self.chain_len)
            .field("used_plain", &self.used_plain)
            .field("used_bound", &self.used_bound)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    #[error("credential {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("credential {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("credential {path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error("credential {path} already exists; refusing to overwrite a credential")]
    Exists { path: PathBuf },
    #[error("credential {path}: {form} chain used up ({used} of {len}); ask the operator for `nxknock user rekey`")]
    Exhausted { path: PathBuf, form: &'static str, used: u64, len: u64 },
    #[error(
        "credential {path} is format {found}, from before plain and bound knocks had separate chains; \
         its elements may have travelled inside bound knocks, so it is refused. Ask the operator for a new one: \
         `nxknock user rekey {user} --out FILE`"
    )]
    OldFormat { path: PathBuf, found: u32, user: String },
    #[error(
        "the knock went out, but credential {path} could not be updated ({source}); until it can, \
         every knock repeats a spent element and is refused"
    )]
    NotSaved {
        path: PathBuf,
        #[source]
        source: Box<CredentialError>,
    },
}

/// What the server side of an enrolment gives the credential.
pub struct CredentialKeys<'a> {
    pub seed: &'a Seed,
    pub mac_key: &'a [u8],
    pub zone_key: &'a [u8; ZONE_KEY_LEN],
}

impl Credential {
    pub fn new(
        user: &str,
        user_id: u32,
        zone: &ZoneId,
        server: Option<String>,
        chain_len: u64,
        keys: CredentialKeys,
    ) -> Credential {
        Credential {
            format: FORMAT,
            user: user.to_owned(),
            user_id,
            zone: zone.as_str().to_owned(),
            server,
            services: Vec::new(),
            udp_port: None,
            sequence_ports: None,
            chain_len,
            used_plain: 0,
            used_bound: 0,
            seed: HEXLOWER.encode(&keys.seed.0),
            mac_key: HEXLOWER.encode(keys.mac_key),
            zone_key: HEXLOWER.encode(keys.zone_key),
            pebble_plain: None,
            pebble_bound: None,
        }
    }

    /// Elements of `form`'s chain handed out so far.
    pub fn used(&self, form: Form) -> u64 {
        match form {
            Form::Plain => self.used_plain,
            Form::Bound => self.used_bound,
        }
    }

    fn pebble_mut(&mut self, form: Form) -> &mut Option<Pebble> {
        match form {
            Form::Plain => &mut self.pebble_plain,
            Form::Bound => &mut self.pebble_bound,
        }
    }

    fn pebble(&self, form: Form) -> Option<&Pebble> {
        match form {
            Form::Plain => self.pebble_plain.as_ref(),
            Form::Bound => self.pebble_bound.as_ref(),
        }
    }

    /// Element `j` of `form`'s chain, from the pebble when it lies at or below `j`.
    fn element(&self, form: Form, j: u64) -> Element {
        let zone = self.zone_id();
        let from = self.pebble(form).filter(|p| p.index <= j).and_then(|p| {
            let e = HEXLOWER.decode(p.element.as_bytes()).ok()?;
            Some((p.index, Element::from_slice(&e)?))
        });
        match from {
            Some((index, x)) => chain::walk(&zone, form, x, j - index),
            None => self.seed().element(&zone, form, j),
        }
    }

    /// Put `form`'s pebble on the multiple of [`PEBBLE_STRIDE`] at or below the
    /// next element to hand out (none once the chain is used up).
    fn move_pebble(&mut self, form: Form) {
        let used = self.used(form);
        if used >= self.chain_len {
            *self.pebble_mut(form) = None;
            return;
        }
        let at = (self.chain_len - used - 1) / PEBBLE_STRIDE * PEBBLE_STRIDE;
        if self.pebble(form).is_some_and(|p| p.index == at) {
            return;
        }
        let element = HEXLOWER.encode(self.element(form, at).as_bytes());
        *self.pebble_mut(form) = Some(Pebble { index: at, element });
    }

    fn used_mut(&mut self, form: Form) -> &mut u64 {
        match form {
            Form::Plain => &mut self.used_plain,
            Form::Bound => &mut self.used_bound,
        }
    }

    /// The zone's admission key, keyed for this credential's zone.
    pub fn zone_key(&self) -> ZoneKey {
        ZoneKey::new(&self.zone_key_bytes(), &self.zone_id())
    }

    /// The raw zone key (for whoami's encrypted user id).
    pub fn zone_key_bytes(&self) -> Vec<u8> {
        HEXLOWER.decode(self.zone_key.as_bytes()).unwrap_or_default()
    }

    pub fn zone_id(&self) -> ZoneId {
        ZoneId::new(&self.zone)
    }

    pub fn mac_key(&self) -> Vec<u8> {
        HEXLOWER.decode(self.mac_key.as_bytes()).unwrap_or_default()
    }

    fn seed(&self) -> Seed {
        let mut s = [0u8; 32];
        if let Ok(b) = HEXLOWER.decode(self.seed.as_bytes()) {
            if b.len() == 32 {
                s.copy_from_slice(&b);
            }
        }
        Seed(s)
    }

    /// Read a credential, refusing one that others can read.
    pub fn load(path: &Path) -> Result<Credential, CredentialError> {
        let io = |source| CredentialError::Io { path: path.to_owned(), source };
        let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(CredentialError::Permissions { path: path.to_owned(), mode: mode & 0o777 });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        Credential::parse(&text, path)
    }

    /// Parse and check a credential's text (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Credential, CredentialError> {
        let invalid = |detail: String| CredentialError::Invalid { path: path.to_owned(), detail };
        // Tell an old format apart before the strict parse, so its error says what to do.
        let loose: toml::Table = toml::from_str(text).map_err(|e| invalid(e.to_string().trim_end().to_owned()))?;
        let found = loose.get("format").and_then(|v| v.as_integer()).unwrap_or(1);
        if found != i64::from(FORMAT) {
            let user = loose.get("user").and_then(|v| v.as_str()).unwrap_or("NAME").to_owned();
            return Err(CredentialError::OldFormat {
                path: path.to_owned(),
                found: found.clamp(0, u32::MAX as i64) as u32,
                user,
            });
        }
        let c: Credential = toml::from_str(text).map_err(|e| invalid(e.to_string().trim_end().to_owned()))?;
        if HEXLOWER.decode(c.seed.as_bytes()).map(|b| b.len()) != Ok(32) {
            return Err(invalid("seed: expected 64 lowercase hex digits".into()));
        }
        if HEXLOWER.decode(c.mac_key.as_bytes()).map(|b| b.len() >= 16) != Ok(true) {
            return Err(invalid("mac_key: expected at least 32 lowercase hex digits".into()));
        }
        if HEXLOWER.decode(c.zone_key.as_bytes()).map(|b| b.len()) != Ok(ZONE_KEY_LEN) {
            return Err(invalid(format!("zone_key: expected {} lowercase hex digits", 2 * ZONE_KEY_LEN)));
        }
        for (name, pebble) in [("pebble_plain", &c.pebble_plain), ("pebble_bound", &c.pebble_bound)] {
            if let Some(p) = pebble {
                if p.index >= c.chain_len || HEXLOWER.decode(p.element.as_bytes()).map(|b| b.len()) != Ok(12) {
                    return Err(invalid(format!(
                        "{name}: expected an index below chain_len and 24 lowercase hex digits"
                    )));
                }
            }
        }
        for form in Form::ALL {
            if c.used(form) > c.chain_len {
                return Err(invalid(format!(
                    "used_{} ({}) exceeds chain_len ({})",
                    form.as_str(),
                    c.used(form),
                    c.chain_len
                )));
            }
        }
        Ok(c)
    }

    /// Write a new credential; never overwrites an existing file.
    pub fn create(&self, path: &Path) -> Result<(), CredentialError> {
        if path.exists() {
            return Err(CredentialError::Exists { path: path.to_owned() });
        }
        self.save(path)
    }

    /// Atomically replace the file (temp file 0600, fsync, rename, fsync dir).
    pub fn save(&self, path: &Path) -> Result<(), CredentialError> {
        let io = |source| CredentialError::Io { path: path.to_owned(), source };
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".{}.tmp{}",
            path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        let body = format!(
            "# nxknock credential: SECRET. Anyone with this file can knock as {}.\n# Keep it mode 0600; never share or commit it.\n{}",
            self.user,
            toml::to_string(self).expect("credential serialises")
        );
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io)?;
        f.write_all(body.as_bytes()).and_then(|_| f.sync_all()).map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The lock file beside `path` (`.NAME.lock`, 0600, never removed: removing it
    /// would let a later process lock a new inode while an old holder still runs).
    fn lock_file(path: &Path) -> Result<std::fs::File, CredentialError> {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
        let lock = dir.join(format!(".{name}.lock"));
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock)
            .map_err(|source| CredentialError::Io { path: lock, source })
    }

    /// Reserve the next `n` elements of `form`'s chain, save the file, then return
    /// them in knock order.
    ///
    /// The counters are re-read under the credential's lock first: another
    /// process may have advanced them since this copy was loaded.
    pub fn take(&mut self, path: &Path, form: Form, n: u64) -> Result<Vec<Element>, CredentialError> {
        let mut lock = fd_lock::RwLock::new(Self::lock_file(path)?);
        let _held = lock.write().map_err(|source| CredentialError::Io { path: path.to_owned(), source })?;
        let first = self.reserve(path, form, n)?;
        let elements = self.elements(form, first, n);
        self.move_pebble(form);
        self.save(path)?;
        Ok(elements)
    }

    /// [`Credential::take`] of one element for a knock that goes out at once: the
    /// element is reserved under the lock as there, but `send` runs while the new
    /// counter is written and flushed beside it, so the knock does not wait for the
    /// disk (two flushes, ~0.7 ms here). The lock is held until the file is saved.
    /// A crash in between leaves the old file or the new one, never half of one; at
    /// worst the next knock repeats an element the server has spent and is refused
    /// — the element was already on the wire either way, and nothing opens for a
    /// repeat. A save that fails after `send` is [`CredentialError::NotSaved`].
    pub fn take_sending<R>(
        &mut self,
        path: &Path,
        form: Form,
        send: impl FnOnce(&Credential, Element) -> R,
    ) -> Result<R, CredentialError> {
        let mut lock = fd_lock::RwLock::new(Self::lock_file(path)?);
        let held = lock.write().map_err(|source| CredentialError::Io { path: path.to_owned(), source })?;
        let first = self.reserve(path, form, 1)?;
        let element = self.elements(form, first, 1)[0];
        let mut reserved = self.clone();
        std::thread::scope(|s| {
            let saving = s.spawn(move || {
                reserved.move_pebble(form);
                let saved = reserved.save(path);
                drop(held);
                saved
            });
            let sent = send(self, element);
            match saving.join() {
                Ok(Ok(())) => Ok(sent),
                Ok(Err(e)) => Err(CredentialError::NotSaved { path: path.to_owned(), source: Box::new(e) }),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Re-read the file (the caller holds the lock) and count `n` more elements of
    /// `form` as used; returns the index of the first of them.
    fn reserve(&mut self, path: &Path, form: Form, n: u64) -> Result<u64, CredentialError> {
        *self = Credential::load(path)?;
        let used = self.used(form);
        let left = self.chain_len - used;
        if n > left {
            return Err(CredentialError::Exhausted {
                path: path.to_owned(),
                form: form.as_str(),
                used,
                len: self.chain_len,
            });
        }
        *self.used_mut(form) += n;
        Ok(self.chain_len - used - 1) // index of the next element to reveal
    }

    /// Elements `first`, `first - 1`, … (`n` of them) of `form`'s chain, in knock order.
    fn elements(&self, form: Form, first: u64, n: u64) -> Vec<Element> {
        // Compute the deepest element once (from the pebble when it can), then step
        // forward.
        let zone = self.zone_id();
        let last = first + 1 - n;
        let mut x = self.element(form, last);
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            out.push(x);
            x = chain::step(&zone, form, &x);
        }
        out.reverse();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZK: [u8; ZONE_KEY_LEN] = [7; ZONE_KEY_LEN];

    fn cred(user: &str, seed: &Seed, mac: &[u8], len: u64) -> Credential {
        Credential::new(
            user,
            1,
            &ZoneId::new("knock.example.com"),
            None,
            len,
            CredentialKeys { seed, mac_key: mac, zone_key: &ZK },
        )
    }

    #[test]
    fn take_hands_out_consecutive_elements_once_per_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice.cred");
        let zone = ZoneId::new("knock.example.com");
        let seed = Seed([4; 32]);
        cred("alice", &seed, &[1; 32], 10).create(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let mut c = Credential::load(&path).unwrap();
        let a = c.take(&path, Form::Plain, 3).unwrap();
        let p = |j| seed.element(&zone, Form::Plain, j);
        let b = |j| seed.element(&zone, Form::Bound, j);
        assert_eq!(a, vec![p(9), p(8), p(7)]);
        let mut c = Credential::load(&path).unwrap();
        assert_eq!((c.used_plain, c.used_bound), (3, 0));
        // The bound chain is counted apart and never yields a plain element.
        assert_eq!(c.take(&path, Form::Bound, 1).unwrap(), vec![b(9)]);
        assert_eq!(c.take(&path, Form::Plain, 1).unwrap(), vec![p(6)]);
        assert!(matches!(c.take(&path, Form::Plain, 7), Err(CredentialError::Exhausted { .. })));
        assert_eq!(c.take(&path, Form::Plain, 6).unwrap().last(), Some(&p(0)));
        assert_eq!(Credential::load(&path).unwrap().used_bound, 1);
        assert!(cred("alice", &seed, &[1; 32], 10).create(&path).is_err());
    }

    #[test]
    fn take_sending_sends_the_next_element_and_saves_it_as_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice.cred");
        let zone = ZoneId::new("knock.example.com");
        let seed = Seed([4; 32]);
        cred("alice", &seed, &[1; 32], 10).create(&path).unwrap();
        let mut c = Credential::load(&path).unwrap();
        let b = |j| seed.element(&zone, Form::Bound, j);
        assert_eq!(c.take_sending(&path, Form::Bound, |_, e| e).unwrap(), b(9));
        assert_eq!(c.take(&path, Form::Bound, 1).unwrap(), vec![b(8)], "the first element is counted as used");
        assert_eq!(Credential::load(&path).unwrap().used_bound, 2);
        // A save that fails after the send says so; the knock itself went out.
        std::fs::create_dir(dir.path().join(format!(".alice.cred.tmp{}", std::process::id()))).unwrap();
        let mut sent = None;
        let err = c.take_sending(&path, Form::Bound, |_, e| sent = Some(e)).unwrap_err();
        assert!(matches!(err, CredentialError::NotSaved { .. }), "{err}");
        assert_eq!(sent, Some(b(7)));
        assert!(err.to_string().contains("the knock went out"), "{err}");
        assert_eq!(Credential::load(&path).unwrap().used_bound, 2, "the file is the old one, whole");
        // Exhausted: nothing is sent.
        let mut short = cred("bob", &seed, &[1; 32], 1);
        let bob = dir.path().join("bob.cred");
        short.create(&bob).unwrap();
        short.take_sending(&bob, Form::Plain, |_, _| ()).unwrap();
        let r = short.take_sending(&bob, Form::Plain, |_, _| panic!("an exhausted chain sends nothing"));
        assert!(matches!(r, Err(CredentialError::Exhausted { .. })));
    }

    /// Through a whole chain, one knock at a time and in batches, every element
    /// handed out is the chain's own, whatever the pebbles say.
    #[test]
    fn pebbles_shorten_the_walk_and_never_change_an_element() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.cred");
        let zone = ZoneId::new("knock.example.com");
        let seed = Seed([5; 32]);
        let len = 3 * PEBBLE_STRIDE + 7;
        cred("erin", &seed, &[1; 32], len).create(&path).unwrap();
        let mut c = Credential::load(&path).unwrap();
        let mut j = len;
        while j > 0 {
            j -= 1;
            assert_eq!(c.take_sending(&path, Form::Bound, |_, e| e).unwrap(), seed.element(&zone, Form::Bound, j));
            let saved = Credential::load(&path).unwrap();
            match (j, &saved.pebble_bound) {
                (0, p) => assert!(p.is_none(), "a used-up chain keeps no pebble"),
                (_, Some(p)) => assert_eq!(p.index, (j - 1) / PEBBLE_STRIDE * PEBBLE_STRIDE),
                (_, None) => panic!("no pebble saved at {j}"),
            }
        }
        let mut j = len;
        while j >= 5 {
            let want: Vec<Element> = (0..5).map(|i| seed.element(&zone, Form::Plain, j - 1 - i)).collect();
            assert_eq!(c.take(&path, Form::Plain, 5).unwrap(), want);
            j -= 5;
        }
        // A damaged pebble is a clear error, not wrong knocks.
        let text = std::fs::read_to_string(&path).unwrap().replace("index = ", "index = 99999");
        assert!(matches!(Credential::parse(&text, &path), Err(CredentialError::Invalid { .. })));
    }

    #[test]
    fn concurrent_takes_never_hand_out_an_element_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        cred("dora", &Seed([9; 32]), &[2; 32], 400).create(&path).unwrap();
        // Each thread loads its own (soon stale) copy first, as a separate process would.
        let copies: Vec<Credential> = (0..8).map(|_| Credential::load(&path).unwrap()).collect();
        let handed: Vec<Element> = std::thread::scope(|s| {
            let threads: Vec<_> = copies
                .into_iter()
                .map(|mut c| {
                    let path = &path;
                    s.spawn(move || {
                        (0..5)
                            .flat_map(|i| match i % 2 {
                                0 => c.take(path, Form::Plain, 5).unwrap(),
                                _ => vec![c.take_sending(path, Form::Plain, |_, e| e).unwrap()],
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            threads.into_iter().flat_map(|t| t.join().unwrap()).collect()
        });
        let distinct: std::collections::HashSet<_> = handed.iter().map(|e| e.0).collect();
        // 8 threads × (3 takes of 5 + 2 take_sendings of 1).
        assert_eq!((handed.len(), distinct.len()), (136, 136), "an element was handed out twice");
        assert_eq!(Credential::load(&path).unwrap().used_plain, 136);
    }

    #[test]
    fn readable_credentials_are_refused_and_secrets_not_debugged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let c = cred("bob", &Seed([0xee; 32]), &[0xdd; 32], 10);
        c.create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Credential::load(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        assert!(!format!("{c:?}").contains("eeee"));
        assert!(!format!("{c:?}").contains("dddd"));
        assert!(!format!("{c:?}").contains("0707"));
    }

    #[test]
    fn corrupt_credential_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        std::fs::write(
            &path,
            "format = 2\nuser = \"x\"\nuser_id = 1\nzone = \"z\"\nchain_len = 5\nused_plain = 0\nused_bound = 0\n\
             seed = \"zz\"\nmac_key = \"00\"\nzone_key = \"00\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = Credential::load(&path).unwrap_err().to_string();
        assert!(e.contains("seed"), "{e}");
    }

    #[test]
    fn format_1_credentials_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        std::fs::write(
            &path,
            format!(
                "user = \"carol\"\nzone = \"z\"\nchain_len = 5\nused = 0\nseed = \"{}\"\nmac_key = \"{}\"\n",
                "ab".repeat(32),
                "cd".repeat(32)
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = Credential::load(&path).unwrap_err().to_string();
        assert!(e.contains("format 1") && e.contains("nxknock user rekey carol"), "{e}");
    }
}
