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

/// The latency section models two machines on this one: the server side (the
/// daemon under test, the resolver, the reference daemons) runs on CPU 0, the
/// client side (the knocking program, the probe, the sniffer) on CPU 1, so the
/// client's own start-up and exit do not take CPU from the server, nor the server's
/// from the probe. (The DNS-rate and flood sections leave every CPU to the server.)
pub(crate) const SERVER_CPU: usize = 0;
pub(crate) const CLIENT_CPU: usize = 1;

/// Run every thread of process `pid` (0: this process) on CPU `cpu` only. New
/// threads and children inherit it. A machine with one CPU keeps everything there.
pub(crate) fn pin(pid: u32, cpu: usize) {
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if cpus < 2 {
        return;
    }
    let dir = if pid == 0 { "/proc/self/task".to_owned() } else { format!("/proc/{pid}/task") };
    let Ok(tasks) = std::fs::read_dir(&dir) else { return };
    for t in tasks.flatten() {
        let Ok(tid) = t.file_name().to_string_lossy().parse::<i32>() else { continue };
        // SAFETY: cpu_set_t is plain data; sched_setaffinity only reads it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

/// Every CPU again for this process (the latency section is over).
pub(crate) fn unpin() {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return };
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    for t in tasks.flatten() {
        let Ok(tid) = t.file_name().to_string_lossy().parse::<i32>() else { continue };
        // SAFETY: as in `pin`.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for c in 0..cpus {
                libc::CPU_SET(c, &mut set);
            }
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}
