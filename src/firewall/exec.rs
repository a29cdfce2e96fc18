//! Running firewall tools as child processes.
//!
//! The backends run the tools (`nft`, `iptables`, `ipset`) for everything but
//! doors: installing the guard, listing, uninstalling. The tools are what
//! operators already trust and debug with, and a failing call can be
//! reproduced by hand from the logged command line. The cost is a few
//! milliseconds per call (measured in BENCHMARKS.md), too much per knock:
//! opening and closing doors goes over netlink instead (`nfnl.rs`), so no
//! process is spawned per knock.
//!
//! A child inherits the network namespace of the *thread* that spawns it, so
//! the tests (and `nxknock demo`) run backends inside a namespace simply by
//! calling them from a thread that entered it.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use super::FirewallError;

/// Runs `program args…`, feeding `stdin` if given, and returns its stdout.
/// A non-zero exit becomes [`FirewallError::Command`] carrying stderr, since
/// that is where every one of these tools explains itself.
pub(crate) fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
    let out = output(program, args, stdin)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(FirewallError::Command {
            cmd: display(program, args),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Runs `program args…` and reports only whether it exited with success.
/// Used for existence probes (`iptables -C`, `ipset list -n`) whose failure
/// is an answer, not an error; failing to *spawn* is still an error.
pub(crate) fn succeeds(program: &str, args: &[&str]) -> Result<bool, FirewallError> {
    Ok(output(program, args, None)?.status.success())
}

fn output(program: &str, args: &[&str], stdin: Option<&str>) -> Result<Output, FirewallError> {
    let cmd = display(program, args);
    tracing::debug!(%cmd, stdin = stdin.unwrap_or(""), "firewall command");
    let spawn_err = |source| FirewallError::Spawn { cmd: cmd.clone(), source };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    let mut written = Ok(());
    if let Some(text) = stdin {
        // Dropping the handle at the end of this block closes the pipe, which
        // is how `nft -f -` and `iptables-restore` learn the script has ended.
        let mut pipe = child.stdin.take().expect("stdin was piped");
        written = pipe.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    match written {
        // A tool that rejects its input may exit before reading all of it;
        // its stderr then explains more than our "broken pipe" would.
        Err(e) if out.status.success() => Err(spawn_err(e)),
        _ => Ok(out),
    }
}

fn display(program: &str, args: &[&str]) -> String {
    let mut s = program.to_owned();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}
