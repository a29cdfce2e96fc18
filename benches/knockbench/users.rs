//! Users and their databases: enrolment through the library (fast, for the
//! scale section), the real `nxknock user add` and `otp` (what a user runs),
//! and copies of a database so every run starts from the same state.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, bail};
use nxknock::store::{Enrolment, SqliteStore, Store};
use nxknock::token::{Form, Seed};

use crate::{BIN, Bench};

impl Bench {
    /// Enrol users through the library (one transaction); returns their seeds.
    pub(crate) fn enrol(&self, db: &Path, users: &[(&str, u64)]) -> Result<Vec<Seed>> {
        let mut store = SqliteStore::open(db)?;
        let mut seeds = Vec::new();
        let mut batch = Vec::new();
        for (name, len) in users {
            let seed = Seed::random();
            batch.push(Enrolment {
                name: (*name).to_owned(),
                verifiers: Form::ALL.map(|form| seed.element(&self.zone, form, *len)),
                chain_len: *len,
                mac_key: random_bytes(32),
                services: vec![],
                from: vec![],
                max_open: None,
            });
            seeds.push(seed);
        }
        store.add_users(&batch)?;
        Ok(seeds)
    }

    /// `nxknock user add` (the credential the real client reads).
    pub(crate) fn user_add(&self, config: &Path, name: &str) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.clients.0)?;
        let cred = self.clients.0.join(format!("{name}.cred"));
        let out = Command::new(BIN)
            .args(["user", "add", name, "--out", cred.to_str().unwrap(), "--config", config.to_str().unwrap()])
            .output()?;
        if !out.status.success() {
            bail!("user add {name}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(cred)
    }
}

pub(crate) fn otp(cred: &Path, n: usize) -> Result<Vec<String>> {
    let mut names = Vec::new();
    while names.len() < n {
        let k = (n - names.len()).min(1000);
        let out = Command::new(BIN)
            .args(["otp", "--credential", cred.to_str().unwrap(), "--count", &k.to_string()])
            .output()?;
        if !out.status.success() {
            bail!("otp: {}", String::from_utf8_lossy(&out.stderr));
        }
        names.extend(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned));
    }
    Ok(names)
}

pub(crate) fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::fill(&mut v[..]);
    v
}

/// Copy a (closed) SQLite database with its WAL, if any.
pub(crate) fn copy_db(from: &Path, to: &Path) -> Result<()> {
    for suffix in ["", "-wal", "-shm"] {
        let src = PathBuf::from(format!("{}{suffix}", from.display()));
        let dst = PathBuf::from(format!("{}{suffix}", to.display()));
        let _ = std::fs::remove_file(&dst);
        if src.exists() {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

pub(crate) fn db_size(db: &Path) -> u64 {
    ["", "-wal"].iter().map(|s| std::fs::metadata(format!("{}{s}", db.display())).map(|m| m.len()).unwrap_or(0)).sum()
}
