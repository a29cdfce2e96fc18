//! The real `nxknock serve` inside a lab namespace.
//!
//! The demo, the tests and the benchmark all run the daemon as a separate
//! process, the way an operator does, and wait for the line it logs once its
//! listeners and firewall guard are up ("nxknock serving"). [`Serve`] says how
//! to start it; the [`Daemon`] it returns is a [`Process`]: its log, SIGTERM,
//! SIGKILL, killed on drop.
//!
//! `RUST_LOG` is removed from its environment: it would override `--log` and
//! could hide the line the harness waits for.

use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::time::Duration;

use super::Netns;
use super::process::Process;

/// The line `nxknock serve` logs once it answers.
pub const READY: &str = "nxknock serving";
/// The line `nxknock agent` logs once its guard is up and its grants reconciled.
pub const AGENT_READY: &str = "nxknock agent running";

/// How to start `nxknock serve`.
#[derive(Clone, Debug)]
pub struct Serve {
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    filter: Option<String>,
    env: Vec<(String, String)>,
    within: Duration,
    grace: Duration,
    agent: bool,
}

impl Serve {
    /// `bin serve --config config`, logging to `log`; ready within 20 s;
    /// killed (SIGKILL) on drop.
    pub fn new(bin: impl Into<PathBuf>, config: impl Into<PathBuf>, log: impl Into<PathBuf>) -> Serve {
        Serve {
            bin: bin.into(),
            config: config.into(),
            log: log.into(),
            filter: None,
            env: Vec::new(),
            within: Duration::from_secs(20),
            grace: Duration::ZERO,
            agent: false,
        }
    }

    /// Run `nxknock agent` (a protected host's door keeper) instead of `serve`.
    pub fn agent(mut self) -> Serve {
        self.agent = true;
        self
    }

    /// `--log filter` (e.g. `nxknock=debug,info`) instead of the default level.
    pub fn log_filter(mut self, filter: &str) -> Serve {
        self.filter = Some(filter.to_owned());
        self
    }

    /// An environment variable for the daemon (e.g. `NXKNOCK_DNS_THREADS`).
    pub fn env(mut self, key: &str, value: &str) -> Serve {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// How long it may take to start (a database of a million users loads slowly).
    pub fn ready_within(mut self, within: Duration) -> Serve {
        self.within = within;
        self
    }

    /// On drop, SIGTERM and up to `grace` for a clean exit before SIGKILL.
    pub fn stop_gently(mut self, grace: Duration) -> Serve {
        self.grace = grace;
        self
    }

    /// Starts the daemon in `ns` and waits until it serves.
    pub fn start(&self, ns: &Netns) -> anyhow::Result<Daemon> {
        let config = self.config.to_str().ok_or_else(|| anyhow::anyhow!("config path is not UTF-8"))?;
        let bin = self.bin.to_str().ok_or_else(|| anyhow::anyhow!("nxknock path is not UTF-8"))?;
        let mut cmd = ns.cmd(bin);
        cmd.arg(if self.agent { "agent" } else { "serve" });
        if let Some(f) = &self.filter {
            cmd.args(["--log", f]);
        }
        cmd.args(["--config", config]).env_remove("RUST_LOG");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let (name, ready) = if self.agent { ("nxknock agent", AGENT_READY) } else { ("nxknock serve", READY) };
        let mut process = Process::spawn(name, &mut cmd, &self.log)?.with_grace(self.grace);
        let ready_after = process.wait_ready(self.within, |p| p.log_text().contains(ready))?;
        Ok(Daemon { process, config: self.config.clone(), ready_after })
    }
}

/// A running `nxknock serve`; everything of [`Process`] (log, signals) through `Deref`.
#[derive(Debug)]
pub struct Daemon {
    process: Process,
    /// The config file it serves.
    pub config: PathBuf,
    /// How long it took from start to [`READY`].
    pub ready_after: Duration,
}

impl Deref for Daemon {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}
