//! A long-running program inside a lab namespace: what the lab's daemons
//! (`nxknock serve`, unbound, and the benchmark's knotd, fwknopd and knockd)
//! have in common.
//!
//! Its stdout and stderr go to a log file, which is what readiness checks and
//! tests read. Waiting for it is always bounded and stops early if it dies.
//! It never outlives its owner: dropping it kills it — at once (SIGKILL, as a
//! crash would) unless it was given a grace period, then SIGTERM first.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::interrupt;

/// A running child with its log; stopped on drop.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    /// How long [`Process::stop`] waits after SIGTERM; zero: SIGKILL at once.
    grace: Duration,
}

impl Process {
    /// Spawns `cmd` (made with [`Netns::cmd`](super::Netns::cmd), arguments and
    /// environment set), stdin closed, stdout and stderr into a fresh `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<Process> {
        let f = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        Ok(Process { name: name.to_owned(), child: Some(child), log: log.to_owned(), grace: Duration::ZERO })
    }

    /// Stop with SIGTERM and up to `grace` for a clean exit (then SIGKILL)
    /// instead of SIGKILL at once.
    pub fn with_grace(mut self, grace: Duration) -> Process {
        self.grace = grace;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `ready` until it holds and returns how long that took; fails if
    /// the program exits first, after `within`, or on Ctrl-C.
    pub fn wait_ready(
        &mut self,
        within: Duration,
        mut ready: impl FnMut(&Process) -> bool,
    ) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        while t0.elapsed() < within {
            interrupt::check()?;
            if ready(self) {
                return Ok(t0.elapsed());
            }
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("{} exited ({st}) before it was ready:\n{}", self.name, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("{} not ready after {within:?}:\n{}", self.name, self.log_text())
    }

    /// Resident memory (VmRSS, VmHWM) in KiB; zeros once stopped.
    pub fn memory(&self) -> (u64, u64) {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |k: &str| {
            s.lines()
                .find(|l| l.starts_with(k))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM, and wait up to `within` for the exit, which is returned. Past
    /// that it is killed and this is an error.
    pub fn terminate(&mut self, within: Duration) -> anyhow::Result<ExitStatus> {
        let mut c = self.child.take().with_context(|| format!("{} is not running", self.name))?;
        // SAFETY: signalling our own, not yet reaped child by its pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < within {
            if let Some(st) = c.try_wait()? {
                return Ok(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
        bail!("{} did not exit within {within:?} of SIGTERM", self.name)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Ends it the way it was spawned to end: see [`Process::with_grace`].
    pub fn stop(&mut self) {
        if self.grace.is_zero() || self.child.is_none() {
            self.kill();
        } else {
            let _ = self.terminate(self.grace);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}
