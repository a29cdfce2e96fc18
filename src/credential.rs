//! The client's credential file: chain seed, MAC key and how many elements are used.
//!
//! It is the only place a seed exists. Written 0600 through a temporary file and
//! an atomic rename (a crash leaves the old or the new file, never half of one),
//! and refused when group or others can read it (Doorman's `.knockcf` rule).
//! Elements are reserved — the counter saved — *before* they are printed or
//! sent, so no element is ever handed out twice.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use data_encoding::HEXLOWER;
use serde::{Deserialize, Serialize};

use crate::token::{Element, Seed, ZoneId, chain};

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// For the user's eyes only; never sent.
    pub user: String,
    pub zone: String,
    /// Nameserver to knock directly, if the operator filled it in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    pub chain_len: u64,
    /// Elements handed out so far (knocks sent and names printed).
    pub used: u64,
    seed: String,
    mac_key: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("user", &self.user)
            .field("zone", &self.zone)
            .field("chain_len", &self.chain_len)
            .field("used", &self.used)
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
    #[error("credential {path}: chain used up ({used} of {len}); ask the operator for `nxknock user rekey`")]
    Exhausted { path: PathBuf, used: u64, len: u64 },
}

impl Credential {
    pub fn new(user: &str, zone: &ZoneId, server: Option<String>, chain_len: u64, seed: &Seed, mac_key: &[u8]) -> Credential {
        Credential {
            user: user.to_owned(),
            zone: zone.as_str().to_owned(),
            server,
            chain_len,
            used: 0,
            seed: HEXLOWER.encode(&seed.0),
            mac_key: HEXLOWER.encode(mac_key),
        }
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
        let invalid = |detail: String| CredentialError::Invalid { path: path.to_owned(), detail };
        let c: Credential = toml::from_str(&text).map_err(|e| invalid(e.to_string().trim_end().to_owned()))?;
        if HEXLOWER.decode(c.seed.as_bytes()).map(|b| b.len()) != Ok(32) {
            return Err(invalid("seed: expected 64 lowercase hex digits".into()));
        }
        if HEXLOWER.decode(c.mac_key.as_bytes()).map(|b| b.len() >= 16) != Ok(true) {
            return Err(invalid("mac_key: expected at least 32 lowercase hex digits".into()));
        }
        if c.used > c.chain_len {
            return Err(invalid(format!("used ({}) exceeds chain_len ({})", c.used, c.chain_len)));
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

    /// Reserve the next `n` elements, save the file, then return them in knock order.
    pub fn take(&mut self, path: &Path, n: u64) -> Result<Vec<Element>, CredentialError> {
        let left = self.chain_len - self.used;
        if n > left {
            return Err(CredentialError::Exhausted { path: path.to_owned(), used: self.used, len: self.chain_len });
        }
        let first = self.chain_len - self.used - 1; // index of the next element to reveal
        self.used += n;
        self.save(path)?;
        // Compute the deepest element once, then step forward: n + j hashes in all.
        let zone = self.zone_id();
        let last = first + 1 - n;
        let mut x = self.seed().element(&zone, last);
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            out.push(x);
            x = chain::step(&zone, &x);
        }
        out.reverse();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_hands_out_consecutive_elements_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice.cred");
        let zone = ZoneId::new("knock.example.com");
        let seed = Seed([4; 32]);
        Credential::new("alice", &zone, None, 10, &seed, &[1; 32]).create(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let mut c = Credential::load(&path).unwrap();
        let a = c.take(&path, 3).unwrap();
        assert_eq!(a, vec![seed.element(&zone, 9), seed.element(&zone, 8), seed.element(&zone, 7)]);
        let mut c = Credential::load(&path).unwrap();
        assert_eq!(c.used, 3);
        assert_eq!(c.take(&path, 1).unwrap(), vec![seed.element(&zone, 6)]);
        assert!(matches!(c.take(&path, 7), Err(CredentialError::Exhausted { .. })));
        assert_eq!(c.take(&path, 6).unwrap().last(), Some(&seed.element(&zone, 0)));
        assert!(Credential::new("alice", &zone, None, 10, &seed, &[1; 32]).create(&path).is_err());
    }

    #[test]
    fn readable_credentials_are_refused_and_secrets_not_debugged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let c = Credential::new("bob", &ZoneId::new("z"), None, 10, &Seed([0xee; 32]), &[0xdd; 32]);
        c.create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Credential::load(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        assert!(!format!("{c:?}").contains("eeee"));
        assert!(!format!("{c:?}").contains("dddd"));
    }

    #[test]
    fn corrupt_credential_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        std::fs::write(&path, "user = \"x\"\nzone = \"z\"\nchain_len = 5\nused = 0\nseed = \"zz\"\nmac_key = \"00\"\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = Credential::load(&path).unwrap_err().to_string();
        assert!(e.contains("seed"), "{e}");
    }
}
