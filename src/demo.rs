//! `nxknock demo`: the whole story in throwaway network namespaces.
//!
//! Server, client and attacker hosts on one bridge; the real daemon with the
//! nftables backend; a knock with real `dig`; real TCP connections. Everything
//! lives in namespaces created here and removed by Drop guards — also on error
//! and on Ctrl-C (see [`crate::lab::interrupt`]). The stage is the one the tests
//! and the benchmark use: [`crate::lab`].

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::firewall::BackendKind;
use crate::lab::config::ConfigBuilder;
use crate::lab::daemon::Serve;
use crate::lab::dig::Dig;
use crate::lab::interrupt::{self, check};
use crate::lab::{ATTACKER_V4, CLIENT_V4, Lab, Netns, SERVER_V4};

const OPEN_SECONDS: u64 = 5;

fn step(n: u32, text: &str) {
    println!("\n\x1b[1m[{n}] {text}\x1b[0m");
}

pub fn run() -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo needs root: it creates network namespaces and firewall rules (run: sudo ./scripts/demo)");
    }
    interrupt::catch_signals();
    let exe = std::env::current_exe().context("own path")?;
    let tmp = TempDir::new()?;
    let dir = tmp.0.as_path();

    step(1, "Build three hosts on one bridge: server 198.18.0.1, client 198.18.0.2, attacker 198.18.0.3");
    let lab = Lab::new("nxdemo").context("create namespaces")?;
    check()?;

    let config = dir.join("nxknock.toml");
    ConfigBuilder::new(BackendKind::Nftables).open_seconds(OPEN_SECONDS).write(&config)?;
    let cfg = config.to_str().context("utf-8 path")?;

    step(2, "Start an SSH-like service on the server's port 22, and nxknock serve (nftables backend)");
    let service = lab.server.tcp_listen(SocketAddr::new(SERVER_V4.into(), 22))?;
    std::thread::spawn(move || {
        for s in service.incoming().flatten() {
            std::thread::spawn(move || banner(s));
        }
    });
    let daemon = Serve::new(&exe, &config, dir.join("serve.log"))
        .ready_within(Duration::from_secs(15))
        .start(&lab.server)
        .context("start nxknock serve")?;
    println!("    nxknock is answering for knock.example.com on {SERVER_V4}:53");

    let ssh = SocketAddr::new(SERVER_V4.into(), 22);
    step(3, "Before any knock, the client cannot reach port 22");
    show_connect(&lab.client, "client", ssh);
    check()?;

    step(4, "The operator enrols alice; alice prints a one-time knock name");
    let cred = dir.join("alice.cred");
    let out = std::process::Command::new(&exe)
        .args(["user", "add", "alice", "--out", cred.to_str().context("utf-8")?, "--config", cfg])
        .output()?;
    print!("    {}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!("user add failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let names = crate::client::otp(&cred, 1)?;
    let name = &names[0];
    println!("    knock name: {name}");

    step(5, "alice knocks with plain dig from the client");
    println!("    $ dig @{SERVER_V4} {name}");
    dig(&lab.client, name)?;
    check()?;

    step(6, "The door is open for the client's address only");
    let doors = lab.server.cmd(exe.to_str().unwrap_or("nxknock")).args(["doors", "--config", cfg]).output()?;
    for l in String::from_utf8_lossy(&doors.stdout).lines() {
        println!("    {l}");
    }
    let mut held = None;
    for _ in 0..5 {
        if let Ok(s) = lab.client.tcp_connect(ssh, Duration::from_millis(300)) {
            held = Some(s);
            break;
        }
    }
    let mut held = held.context("client could not connect after the knock")?;
    println!("    client {CLIENT_V4} -> {ssh}: connected, server says {:?}", read_banner(&mut held));
    show_connect(&lab.attacker, "attacker", ssh);

    step(7, "The attacker saw the name and replays it: same NXDOMAIN, no door");
    println!("    $ dig @{SERVER_V4} {name}   (from {ATTACKER_V4})");
    dig(&lab.attacker, name)?;
    std::thread::sleep(Duration::from_millis(200));
    show_connect(&lab.attacker, "attacker", ssh);
    check()?;

    step(8, &format!("The door closes by itself after {OPEN_SECONDS} s, in the kernel; the open connection stays up"));
    let started = Instant::now();
    loop {
        check()?;
        std::thread::sleep(Duration::from_millis(500));
        if lab.client.tcp_connect(ssh, Duration::from_millis(300)).is_err() {
            break;
        }
        if started.elapsed() > Duration::from_secs(OPEN_SECONDS + 10) {
            bail!("door did not close");
        }
    }
    println!("    after {:.1} s: new connections from the client are dropped again", started.elapsed().as_secs_f64());
    held.write_all(b"ping\n")?;
    let mut buf = [0u8; 5];
    held.set_read_timeout(Some(Duration::from_secs(2)))?;
    held.read_exact(&mut buf)?;
    println!("    the connection made during the window still echoes: {:?}", String::from_utf8_lossy(&buf).trim());

    step(9, "What the daemon logged (no token appears in it)");
    for l in daemon.log_text().lines().filter(|l| l.contains("door") || l.contains("serving")) {
        println!("    {l}");
    }
    println!("\nDone; removing the namespaces.");
    drop(daemon);
    drop(lab);
    Ok(())
}

/// An SSH-like banner, then echo.
fn banner(mut s: TcpStream) {
    let _ = s.write_all(b"SSH-2.0-nxknock-demo\r\n");
    let mut buf = [0u8; 256];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 || s.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

fn read_banner(s: &mut TcpStream) -> String {
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    let _ = BufReader::new(&*s).read_line(&mut line);
    line.trim().to_owned()
}

fn show_connect(ns: &Netns, who: &str, addr: SocketAddr) {
    match ns.tcp_connect(addr, Duration::from_millis(500)) {
        Ok(_) => println!("    {who} -> {addr}: CONNECTED"),
        Err(e) => println!("    {who} -> {addr}: no connection ({e})"),
    }
}

fn dig(ns: &Netns, name: &str) -> anyhow::Result<()> {
    let d = Dig::run(ns, &[&format!("@{SERVER_V4}"), "+norec", name]).context("run dig")?;
    for l in d.header() {
        println!("    {}", l.trim_start_matches(";; "));
    }
    Ok(())
}

/// A private temporary directory (0700), removed on drop.
struct TempDir(std::path::PathBuf);
impl TempDir {
    fn new() -> anyhow::Result<TempDir> {
        use std::os::unix::fs::DirBuilderExt;
        let p = std::env::temp_dir().join(format!("nxknock-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::DirBuilder::new().mode(0o700).create(&p).with_context(|| format!("create {}", p.display()))?;
        Ok(TempDir(p))
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
