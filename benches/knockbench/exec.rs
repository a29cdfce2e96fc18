//! Commands run to completion, inside a namespace or on the host: always
//! bounded in time and stopped by Ctrl-C. (Daemons that keep running are
//! [`nxknock::lab::process::Process`]es.)

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use nxknock::lab::{Netns, interrupt};

/// Run to completion inside `ns` (bounded by `timeout`); stdout on success.
pub(crate) fn run_in(ns: &Netns, args: &[&str], timeout: Duration) -> Result<String> {
    let mut child = ns
        .cmd(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {args:?}"))?;
    let out = wait_bounded(&mut child, timeout).with_context(|| format!("{args:?}"))?;
    if !out.status.success() {
        bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Wait for a child with a deadline (killed past it), collecting its output as it
/// comes (a chatty child must not block on a full pipe).
pub(crate) fn wait_bounded(child: &mut Child, timeout: Duration) -> Result<std::process::Output> {
    use std::io::Read;
    let drain = |p: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut p) = p {
                let _ = p.read_to_end(&mut v);
            }
            v
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t0.elapsed() > timeout || interrupt::interrupted() {
            let _ = child.kill();
            let _ = child.wait();
            bail!("killed after {:?}", t0.elapsed());
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    Ok(std::process::Output { status, stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default() })
}

pub(crate) fn host_cmd(args: &[&str]) -> String {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s
        })
        .unwrap_or_default()
}

pub(crate) fn now_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}
