//! knockbench: nxknock measured against what a user would pick instead, in one run.
//!
//! Run it with `scripts/bench` (or `cargo bench --bench knockbench -- [--quick]` as
//! root once the reference daemons are installed). Everything happens inside
//! throwaway network namespaces of an [`nxknock::lab::Lab`] plus a resolver host:
//! every daemon (nxknock, knotd, unbound, fwknopd, knockd) listens only on lab
//! addresses, every load generator sends only to them, every loop is bounded in
//! count and time, and the namespaces vanish on exit or Ctrl-C.
//!
//! Sections (`--only dns,latency,scale,attack`):
//! * `dns`: dnsperf against nxknock and knotd serving the same zone, same query
//!   files, same client settings, alternating rounds; q/s, lost, mean latency at
//!   saturation, and p50/p99 at a fixed offered rate.
//! * `latency`: knock-to-open, from the knock's first packet leaving the client
//!   (kernel timestamp on the client's interface) to the first TCP connect that
//!   succeeds, for nxknock (bound direct, dig plain, bound via unbound), fwknop
//!   and knockd.
//! * `scale`: bulk enrolment of 10, 10k and 1M users; verification cost, start-up,
//!   memory and DNS rate for each.
//! * `attack`: legitimate knocks while a flood of random knock labels runs at full rate.
//!
//! Figures only: nothing here asserts a wall-clock threshold.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use nxknock::config::Config;
use nxknock::knock::{Knock, Via};
use nxknock::lab::{Lab, Netns};
use nxknock::store::{Enrolment, SqliteStore, Store};
use nxknock::token::{ELEMENT_LEN, Element, Form, Seed, Token, ZoneId};
use nxknock::verify::{Decision, Verifier};

const BIN: &str = env!("CARGO_BIN_EXE_nxknock");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const ZONE: &str = "knock.example.com";
const SERVER: Ipv4Addr = nxknock::lab::SERVER_V4;
const CLIENT: Ipv4Addr = nxknock::lab::CLIENT_V4;
const RESOLVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
const RESOLVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 4);
const SSH_PORT: u16 = 22;
const FWKNOP_PORT: u16 = 62201;
const KNOCKD_PORTS: [u16; 3] = [7000, 8000, 9000];
/// Timeout of each connect attempt of the knock-to-open loop (a dropped SYN costs this much).
const CONNECT_EACH: Duration = Duration::from_millis(1);
/// dnsperf client settings shared by every server: 4 clients (sockets), default 100 outstanding.
const DNSPERF_CLIENTS: &str = "4";

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn check_stop() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleep in small steps so Ctrl-C is noticed.
fn nap(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_stop()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}

#[derive(Clone, Debug)]
struct Opts {
    quick: bool,
    only: Vec<String>,
    out: PathBuf,
    write: bool,
    /// dnsperf seconds per run.
    dns_secs: u64,
    rounds: usize,
    trials: usize,
    user_counts: Vec<usize>,
    attack_secs: u64,
    attack_trials: usize,
}

impl Opts {
    fn parse() -> Result<Option<Opts>> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        // `cargo test --all-targets` runs this binary without `--bench`: nothing to do.
        if !args.iter().any(|a| a == "--bench") {
            println!("knockbench: benchmarks run with scripts/bench (cargo bench --bench knockbench)");
            return Ok(None);
        }
        let quick = args.iter().any(|a| a == "--quick");
        let mut o = Opts {
            quick,
            only: vec!["dns".into(), "latency".into(), "scale".into(), "attack".into()],
            out: Path::new(ROOT).join("target/knockbench"),
            write: args.iter().any(|a| a == "--write"),
            dns_secs: if quick { 3 } else { 10 },
            rounds: if quick { 1 } else { 3 },
            trials: if quick { 20 } else { 200 },
            user_counts: if quick { vec![10, 10_000, 100_000] } else { vec![10, 10_000, 1_000_000] },
            attack_secs: if quick { 8 } else { 30 },
            attack_trials: if quick { 20 } else { 100 },
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--only" => o.only = it.next().context("--only needs a list")?.split(',').map(str::to_owned).collect(),
                "--trials" => o.trials = it.next().context("--trials N")?.parse()?,
                "--dns-secs" => o.dns_secs = it.next().context("--dns-secs N")?.parse()?,
                "--rounds" => o.rounds = it.next().context("--rounds N")?.parse()?,
                _ => {}
            }
        }
        o.trials = o.trials.clamp(1, 1000);
        o.dns_secs = o.dns_secs.clamp(1, 60);
        o.rounds = o.rounds.clamp(1, 10);
        Ok(Some(o))
    }
    fn wants(&self, s: &str) -> bool {
        self.only.iter().any(|x| x == s)
    }
}

fn main() {
    let opts = match Opts::parse() {
        Ok(Some(o)) => o,
        Ok(None) => return,
        Err(e) => {
            eprintln!("knockbench: {e:#}");
            std::process::exit(2);
        }
    };
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    match run(&opts) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("knockbench: {e:#}");
            std::process::exit(1);
        }
    }
}

// ---------------------------------------------------------------- processes

/// A daemon started inside a namespace; stopped (TERM, then KILL) on drop.
struct Daemon {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn start(ns: &Netns, name: &str, program: &str, args: &[&str], log: &Path, env: &[(&str, &str)]) -> Result<Daemon> {
        let f = std::fs::File::create(log)?;
        let mut cmd = ns.cmd(program);
        cmd.args(args).stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f).env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("start {name}"))?;
        Ok(Daemon { name: name.into(), child: Some(child), log: log.to_owned() })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait (bounded) until `ready()`; fail early if the daemon died.
    fn wait_ready(&mut self, within: Duration, mut ready: impl FnMut(&Daemon) -> bool) -> Result<Duration> {
        let t0 = Instant::now();
        while t0.elapsed() < within {
            check_stop()?;
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

    /// (VmRSS, VmHWM) in KiB.
    fn memory(&self) -> (u64, u64) {
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

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(3) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Run to completion inside `ns` (bounded by `timeout`); stdout on success.
fn run_in(ns: &Netns, args: &[&str], timeout: Duration) -> Result<String> {
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
fn wait_bounded(child: &mut Child, timeout: Duration) -> Result<std::process::Output> {
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
        if t0.elapsed() > timeout || STOP.load(Ordering::SeqCst) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("killed after {:?}", t0.elapsed());
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    Ok(std::process::Output { status, stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default() })
}

fn host_cmd(args: &[&str]) -> String {
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

fn now_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}

// ---------------------------------------------------------------- statistics

#[derive(Clone, Debug, Default)]
struct Summary {
    mean: f64,
    p50: f64,
    p99: f64,
    max: f64,
}

fn summarize(v: &[f64]) -> Summary {
    if v.is_empty() {
        return Summary::default();
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| s[(((s.len() as f64) * p).ceil() as usize).clamp(1, s.len()) - 1];
    Summary { mean: s.iter().sum::<f64>() / s.len() as f64, p50: pct(0.50), p99: pct(0.99), max: s[s.len() - 1] }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 }
}

// ---------------------------------------------------------------- the bench

struct Bench {
    opts: Opts,
    lab: Lab,
    dir: PathBuf,
    zone: ZoneId,
    report: String,
    /// Per method: latencies (ms) of the knocks that opened, and the number of trials.
    cdf: BTreeMap<String, (Vec<f64>, usize)>,
    notes: Vec<String>,
}

fn run(opts: &Opts) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root (network namespaces, firewalls)");
    }
    let dir = opts.out.join("run");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    eprintln!("knockbench: building the lab (namespaces kb-*)");
    let mut lab = Lab::new("kb")?;
    lab.add_host("res", RESOLVER, RESOLVER_V6)?;
    let mut b = Bench {
        opts: opts.clone(),
        lab,
        dir,
        zone: ZoneId::new(ZONE),
        report: String::new(),
        cdf: BTreeMap::new(),
        notes: Vec::new(),
    };
    b.machine();
    let mut failed = Vec::new();
    for (name, f) in [
        ("dns", Bench::dns_rate as fn(&mut Bench) -> Result<()>),
        ("latency", Bench::latency),
        ("scale", Bench::scale),
        ("attack", Bench::attack),
    ] {
        if !opts.wants(name) {
            continue;
        }
        check_stop()?;
        eprintln!("knockbench: == {name}");
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        b.notes.push(format!("load average before `{name}`: {} (other work on the machine shows up here)", load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")));
        if let Err(e) = f(&mut b) {
            if STOP.load(Ordering::SeqCst) {
                return Err(e);
            }
            eprintln!("knockbench: section {name} failed: {e:#}");
            let _ = writeln!(b.report, "\n**Section `{name}` failed:** `{}`\n", format!("{e:#}").replace('\n', " "));
            failed.push(name);
        }
    }
    if !b.notes.is_empty() {
        b.report.push_str("\n### Notes from this run\n\n");
        for n in &b.notes {
            let _ = writeln!(b.report, "- {n}");
        }
    }
    b.finish()?;
    if !failed.is_empty() {
        bail!("sections failed: {}", failed.join(", "));
    }
    Ok(())
}

impl Bench {
    fn srv(&self) -> &Netns {
        &self.lab.server
    }
    fn cli(&self) -> &Netns {
        &self.lab.client
    }
    fn res(&self) -> &Netns {
        self.lab.host("res").expect("resolver host")
    }

    fn machine(&mut self) {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("?")
            .trim()
            .to_owned();
        let first = |s: String| s.lines().find(|l| !l.trim().is_empty()).unwrap_or("?").trim().to_owned();
        let mem = host_cmd(&["free", "-g"]);
        let mem = mem.lines().find(|l| l.starts_with("Mem:")).unwrap_or("?").split_whitespace().nth(1).unwrap_or("?").to_owned();
        let dnsperf = host_cmd(&["dnsperf", "-h"]).lines().find(|l| l.starts_with("Version")).unwrap_or("?").to_owned();
        let knockd = first(host_cmd(&["knockd", "--version"]));
        let rows = [
            ("CPU", format!("{} × {cpu}", host_cmd(&["nproc"]).trim())),
            ("memory", format!("{mem} GiB")),
            ("kernel", host_cmd(&["uname", "-r"]).trim().to_owned()),
            ("OS", std::fs::read_to_string("/etc/debian_version").map(|v| format!("Debian {}", v.trim())).unwrap_or_default()),
            ("nxknock", first(host_cmd(&[BIN, "--version"]))),
            ("rustc", first(host_cmd(&["rustc", "--version"]))),
            ("knotd", first(host_cmd(&["knotd", "--version"]))),
            ("dnsperf", dnsperf),
            ("unbound", first(host_cmd(&["unbound", "-V"]))),
            // (`fwknop --version` would write ~/.fwknoprc: ask dpkg instead.)
            ("fwknopd / fwknop", format!("{} / fwknop-client {}", first(host_cmd(&["fwknopd", "--version"])), host_cmd(&["dpkg-query", "-W", "-f=${Version}", "fwknop-client"]).trim())),
            ("knockd", knockd),
        ];
        let mut s = String::from("### Machine and versions\n\n| | |\n|---|---|\n");
        for (k, v) in rows {
            let _ = writeln!(s, "| {k} | {} |", v.replace('|', "/"));
        }
        let _ = writeln!(
            s,
            "\nRun: `scripts/bench{}` at {} (mode: {}).\n",
            if self.opts.quick { " --quick" } else { "" },
            host_cmd(&["date", "-u", "+%Y-%m-%d %H:%M UTC"]).trim(),
            if self.opts.quick { "quick" } else { "full" }
        );
        eprint!("{s}");
        self.report.push_str(&s);
    }

    // ------------------------------------------------------------ nxknock setup

    fn nx_config(&self, name: &str, db: &Path, backend: &str) -> Result<PathBuf> {
        let text = format!(
            "[dns]\nzone_file = \"{ROOT}/zones/knock.example.com.zone\"\nlisten = [\"{SERVER}:53\"]\n\
             [store]\npath = \"{}\"\n[firewall]\nbackend = \"{backend}\"\nopen_seconds = 30\n\
             [[service]]\nname = \"ssh\"\nproto = \"tcp\"\nport = {SSH_PORT}\n",
            db.display()
        );
        let p = self.dir.join(format!("{name}.toml"));
        std::fs::write(&p, text)?;
        Ok(p)
    }

    /// `nxknock serve` in the server namespace, waited for.
    fn start_nxknock(&self, config: &Path, log: &str, env: &[(&str, &str)]) -> Result<(Daemon, Duration)> {
        let mut d = Daemon::start(
            self.srv(),
            "nxknock",
            BIN,
            &["serve", "--config", config.to_str().unwrap()],
            &self.dir.join(log),
            env,
        )?;
        let t = d.wait_ready(Duration::from_secs(120), |d| d.log_text().contains("nxknock serving"))?;
        Ok((d, t))
    }

    /// Enrol users through the library (one transaction); returns their seeds.
    fn enrol(&self, db: &Path, users: &[(&str, u64)]) -> Result<Vec<Seed>> {
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
    fn user_add(&self, config: &Path, name: &str) -> Result<PathBuf> {
        let cred = self.dir.join(format!("{name}.cred"));
        let out = Command::new(BIN)
            .args(["user", "add", name, "--out", cred.to_str().unwrap(), "--config", config.to_str().unwrap()])
            .output()?;
        if !out.status.success() {
            bail!("user add {name}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(cred)
    }

    // ------------------------------------------------------------ knotd

    fn start_knotd(&self) -> Result<Daemon> {
        let kdir = self.dir.join("knot");
        std::fs::create_dir_all(&kdir)?;
        let conf = kdir.join("knot.conf");
        std::fs::write(
            &conf,
            format!(
                "server:\n    rundir: \"{k}\"\n    listen: {SERVER}@53\n    user: root:root\n\
                 database:\n    storage: \"{k}\"\n\
                 log:\n  - target: stderr\n    any: warning\n\
                 zone:\n  - domain: {ZONE}\n    file: \"{ROOT}/zones/knock.example.com.zone\"\n    storage: \"{k}\"\n    journal-content: none\n    zonefile-sync: -1\n",
                k = kdir.display()
            ),
        )?;
        let mut d = Daemon::start(self.srv(), "knotd", "knotd", &["-c", conf.to_str().unwrap()], &self.dir.join("knotd.log"), &[])?;
        let cli = self.cli();
        d.wait_ready(Duration::from_secs(20), |_| {
            run_in(cli, &["dig", "+norec", "+time=1", "+tries=1", &format!("@{SERVER}"), &format!("ns1.{ZONE}")], Duration::from_secs(3))
                .is_ok_and(|o| o.contains("status: NOERROR"))
        })?;
        Ok(d)
    }

    // ------------------------------------------------------------ 1. DNS rate

    fn dns_rate(&mut self) -> Result<()> {
        let o = self.opts.clone();
        // Query files: uniformly random base32 labels as the issue asks (most are not
        // even well-formed tokens), the same with 0.1% valid knocks, and well-formed
        // random tokens (every one costs the verifier a full window of hashes).
        let random = self.dir.join("q-random.txt");
        let wellformed = self.dir.join("q-wellformed.txt");
        let mix = self.dir.join("q-mix.txt");
        let lines = 100_000;
        write_queries(&random, (0..lines).map(|_| random_label()))?;
        write_queries(&wellformed, (0..lines).map(|_| wellformed_label()))?;
        // Valid knocks: 10 users × 10 names, spread through the random file.
        let template = self.dir.join("rate-template.db");
        let names: Vec<String> = (0..10).map(|i| format!("mix{i}")).collect();
        let users: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), 1000u64)).collect();
        let seeds = self.enrol(&template, &users)?;
        let mut valid = Vec::new();
        for s in &seeds {
            for j in 1..=10u64 {
                valid.push(Token::Plain(s.element(&self.zone, Form::Plain, 1000 - j)).to_label());
            }
        }
        let step = lines / valid.len();
        write_queries(
            &mix,
            (0..lines).map(|i| if i % step == step / 2 && i / step < valid.len() { valid[i / step].clone() } else { random_label() }),
        )?;
        let files = [("random labels", &random), ("random + 0.1% valid knocks", &mix), ("well-formed random tokens", &wellformed)];

        let mut table = String::from(
            "### 1. DNS serving rate (dnsperf, same zone, same query file, same settings)\n\n\
             | query file | server | q/s (median) | runs (q/s) | lost | mean latency | ratio nxknock/knotd |\n\
             |---|---|---:|---|---:|---:|---:|\n",
        );
        let mut rss_load = 0u64;
        let mut opened_note = None;
        for (label, file) in files {
            let mut res: BTreeMap<&str, Vec<Dnsperf>> = BTreeMap::new();
            for round in 0..o.rounds {
                for server in ["nxknock", "knotd"] {
                    check_stop()?;
                    let r = if server == "nxknock" {
                        let db = self.dir.join(format!("rate-{round}.db"));
                        copy_db(&template, &db)?;
                        let cfg = self.nx_config("rate", &db, "nftables")?;
                        let (d, _) = self.start_nxknock(&cfg, "nxknock-rate.log", &[])?;
                        let (r, peak) = self.dnsperf_sampling(&d, file, o.dns_secs)?;
                        rss_load = rss_load.max(peak);
                        drop(d);
                        if file == &mix && opened_note.is_none() {
                            let log = std::fs::read_to_string(self.dir.join("nxknock-rate.log")).unwrap_or_default();
                            opened_note = Some(log.matches("door opened").count());
                        }
                        r
                    } else {
                        let d = self.start_knotd()?;
                        let r = self.dnsperf(self.cli(), SERVER, file, o.dns_secs, &[])?;
                        drop(d);
                        r
                    };
                    eprintln!("  {label:>28} {server:>8} round {round}: {:.0} q/s, lost {}, mean {:.0} µs", r.qps, r.lost, r.mean_us);
                    res.entry(server).or_default().push(r);
                }
            }
            let med = |s: &str| median(&res[s].iter().map(|r| r.qps).collect::<Vec<_>>());
            let (nx, kn) = (med("nxknock"), med("knotd"));
            for server in ["nxknock", "knotd"] {
                let rs = &res[server];
                let runs = rs.iter().map(|r| format!("{:.0}", r.qps)).collect::<Vec<_>>().join(", ");
                let lost: u64 = rs.iter().map(|r| r.lost).sum();
                let sent: u64 = rs.iter().map(|r| r.sent).sum();
                let mean = median(&rs.iter().map(|r| r.mean_us).collect::<Vec<_>>());
                let _ = writeln!(
                    table,
                    "| {label} | {server} | {} | {runs} | {lost} of {sent} | {mean:.0} µs | {} |",
                    fmt_k(med(server)),
                    if server == "nxknock" { format!("**{:.2}**", nx / kn) } else { String::new() }
                );
            }
        }
        if let Some(n) = opened_note {
            self.notes.push(format!("mixed file: the 100 valid knocks opened {n} doors in the first nxknock run (\"door opened\" log lines; later passes over the file replay spent names)."));
        }

        // Latency at the same offered load (dnsperf -Q, every answer's latency with -v).
        let qps = if o.quick { 10_000 } else { 20_000 };
        let secs = if o.quick { 3 } else { 5 };
        let _ = writeln!(
            table,
            "\nLatency at a fixed offered load of {qps} q/s for {secs} s (random labels; dnsperf `-Q {qps} -v`, every answer):\n\n\
             | server | answers | lost | mean | p50 | p99 | max |\n|---|---:|---:|---:|---:|---:|---:|"
        );
        for server in ["nxknock", "knotd"] {
            check_stop()?;
            let (r, lat) = if server == "nxknock" {
                let db = self.dir.join("rate-lat.db");
                copy_db(&template, &db)?;
                let cfg = self.nx_config("rate", &db, "nftables")?;
                let (d, _) = self.start_nxknock(&cfg, "nxknock-lat.log", &[])?;
                let r = self.dnsperf_verbose(&random, secs, qps)?;
                drop(d);
                r
            } else {
                let d = self.start_knotd()?;
                let r = self.dnsperf_verbose(&random, secs, qps)?;
                drop(d);
                r
            };
            let s = summarize(&lat);
            let _ = writeln!(
                table,
                "| {server} | {} | {} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs |",
                r.completed, r.lost, s.mean, s.p50, s.p99, s.max
            );
        }

        // What the tuning knobs give, on this binary (same file, same settings).
        if !o.quick {
            let _ = writeln!(
                table,
                "\nTuning knobs on this binary (random labels, median of {} runs, q/s):\n\n| nxknock variant | q/s | runs |\n|---|---:|---|",
                o.rounds
            );
            for (label, env) in [
                ("default (1 thread + 1 SO_REUSEPORT socket per core, 4 MiB rcvbuf)", vec![]),
                ("`NXKNOCK_DNS_THREADS=1` (one thread, one socket)", vec![("NXKNOCK_DNS_THREADS", "1")]),
                ("`NXKNOCK_UDP_RCVBUF=0` (kernel default receive buffer)", vec![("NXKNOCK_UDP_RCVBUF", "0")]),
            ] {
                let mut v = Vec::new();
                for round in 0..o.rounds {
                    check_stop()?;
                    let db = self.dir.join(format!("tune-{round}.db"));
                    copy_db(&template, &db)?;
                    let cfg = self.nx_config("rate", &db, "nftables")?;
                    let (d, _) = self.start_nxknock(&cfg, "nxknock-tune.log", &env)?;
                    let r = self.dnsperf(self.cli(), SERVER, &random, o.dns_secs, &[])?;
                    drop(d);
                    eprintln!("  tuning {label}: {:.0} q/s", r.qps);
                    v.push(r.qps);
                }
                let runs = v.iter().map(|q| format!("{q:.0}")).collect::<Vec<_>>().join(", ");
                let _ = writeln!(table, "| {label} | {} | {runs} |", fmt_k(median(&v)));
            }
        }
        let _ = writeln!(
            table,
            "\nnxknock resident memory at the end of the saturated runs: peak (VmHWM) {:.1} MiB.\n",
            rss_load as f64 / 1024.0
        );
        eprint!("{table}");
        self.report.push_str(&table);
        Ok(())
    }

    /// dnsperf from `ns` at full rate.
    fn dnsperf(&self, ns: &Netns, server: Ipv4Addr, file: &Path, secs: u64, extra: &[&str]) -> Result<Dnsperf> {
        let s = server.to_string();
        let l = secs.to_string();
        let mut args = vec!["dnsperf", "-s", &s, "-d", file.to_str().unwrap(), "-c", DNSPERF_CLIENTS, "-l", &l];
        args.extend_from_slice(extra);
        let out = run_in(ns, &args, Duration::from_secs(secs + 30))?;
        Dnsperf::parse(&out)
    }

    /// dnsperf while sampling the daemon's memory; returns the result and the peak RSS (KiB).
    fn dnsperf_sampling(&self, d: &Daemon, file: &Path, secs: u64) -> Result<(Dnsperf, u64)> {
        let r = self.dnsperf(self.cli(), SERVER, file, secs, &[])?;
        Ok((r, d.memory().1))
    }

    /// dnsperf at a fixed rate with per-answer latencies (µs).
    fn dnsperf_verbose(&self, file: &Path, secs: u64, qps: u32) -> Result<(Dnsperf, Vec<f64>)> {
        let q = qps.to_string();
        let l = secs.to_string();
        let s = SERVER.to_string();
        let out = run_in(
            self.cli(),
            &["dnsperf", "-s", &s, "-d", file.to_str().unwrap(), "-c", DNSPERF_CLIENTS, "-l", &l, "-Q", &q, "-v"],
            Duration::from_secs(secs + 30),
        )?;
        let lat = out
            .lines()
            .filter(|l| l.starts_with("> "))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|s| s * 1e6)
            .collect();
        Ok((Dnsperf::parse(&out)?, lat))
    }

    // ------------------------------------------------------------ 2. knock-to-open

    fn latency(&mut self) -> Result<()> {
        let trials = self.opts.trials;
        let _door = self.srv().tcp_listen(SocketAddr::new(SERVER.into(), SSH_PORT))?;
        let door = _door.try_clone()?;
        std::thread::spawn(move || accept_and_drop(door));
        let sniffer = Sniffer::open(self.cli())?;
        let mut rows: Vec<(String, Vec<Trial>, String)> = Vec::new();
        #[allow(clippy::type_complexity)]

        // nxknock: nftables backend, three users so each method has its own chain.
        let db = self.dir.join("lat.db");
        let cfg = self.nx_config("lat", &db, "nftables")?;
        let alice = self.user_add(&cfg, "alice")?;
        let bob = self.user_add(&cfg, "bob")?;
        let carol = self.user_add(&cfg, "carol")?;
        let names = otp(&bob, trials)?;
        let (mut nx, _) = self.start_nxknock(&cfg, "nxknock-lat.log", &[])?;
        let unbound = self.start_unbound()?;
        let flush_nft = || run_in(self.srv(), &["nft", "flush", "set", "inet", "nxknock", "doors4"], Duration::from_secs(5)).map(drop);
        let server53 = (17u8, SERVER, 53u16);
        type Method<'a> = (&'a str, Box<dyn Fn(usize) -> Command + Sync + 'a>, (u8, Ipv4Addr, u16), &'a str);
        let methods: Vec<Method<'_>> = vec![
            (
                "nxknock knock (bound, direct)",
                Box::new(|_| {
                    let mut c = Command::new(BIN);
                    c.args(["knock", "--credential", alice.to_str().unwrap(), "--server", &SERVER.to_string(), "--ip", &CLIENT.to_string()]);
                    c
                }),
                server53,
                "`nxknock knock --server 198.18.0.1 --ip 198.18.0.2`",
            ),
            (
                "dig (plain, direct)",
                Box::new(|i| {
                    let mut c = Command::new("dig");
                    c.args(["+norec", "+time=1", "+tries=1", &format!("@{SERVER}"), &names[i]]);
                    c
                }),
                server53,
                "`dig +norec @198.18.0.1 <otp name>`",
            ),
            (
                "nxknock knock via unbound",
                Box::new(|_| {
                    let mut c = Command::new(BIN);
                    c.args(["knock", "--credential", carol.to_str().unwrap(), "--resolver", &RESOLVER.to_string(), "--ip", &CLIENT.to_string()]);
                    c
                }),
                (17, RESOLVER, 53),
                "`nxknock knock --resolver 198.18.0.4 --ip 198.18.0.2` (unbound 1.17, stub-zone)",
            ),
        ];
        for (label, cmd, pkt, how) in &methods {
            let mut v = Vec::new();
            for i in 0..trials {
                check_stop()?;
                flush_nft()?;
                v.push(self.trial(&sniffer, || cmd(i), *pkt)?);
            }
            eprintln!("  {label}: {}", brief(&v));
            rows.push((label.to_string(), v, how.to_string()));
        }
        let (_, nx_hwm) = nx.memory();
        nx.stop();
        drop(unbound);
        self.notes.push(format!("nxknock peak resident memory during the latency trials: {:.1} MiB.", nx_hwm as f64 / 1024.0));
        let out = run_in(self.srv(), &[BIN, "uninstall-firewall", "--config", cfg.to_str().unwrap()], Duration::from_secs(10));
        if let Err(e) = out {
            self.notes.push(format!("uninstall-firewall: {e}"));
        }

        // The peers: the same guard, as an iptables chain their hooks add to.
        for rule in [
            vec!["iptables", "-N", "KB"],
            vec!["iptables", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "KB"],
            vec!["iptables", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "DROP"],
        ] {
            run_in(self.srv(), &rule, Duration::from_secs(5))?;
        }
        let flush_kb = || run_in(self.srv(), &["iptables", "-F", "KB"], Duration::from_secs(5)).map(drop);

        // fwknop: SPA over UDP 62201, fwknopd defaults (libpcap), CMD_CYCLE hooks.
        {
            let fw = self.start_fwknopd()?;
            let (k, h) = fw.1.clone();
            let rc = self.dir.join("fwknop/fwknoprc");
            let mut v = Vec::new();
            let fw_trials = trials;
            for _ in 0..fw_trials {
                check_stop()?;
                flush_kb()?;
                v.push(self.trial(
                    &sniffer,
                    || {
                        let mut c = Command::new("fwknop");
                        // fwknop writes ~/.fwknoprc and ~/.fwknop.run whatever it is told: keep them in the lab dir.
                        c.env("HOME", rc.parent().unwrap());
                        c.args([
                            "-A", "tcp/22", "-a", &CLIENT.to_string(), "-D", &SERVER.to_string(),
                            "--key-base64-rijndael", &k, "--key-base64-hmac", &h, "--use-hmac",
                            "--rc-file", rc.to_str().unwrap(), "--no-save-args",
                        ]);
                        c
                    },
                    (17, SERVER, FWKNOP_PORT),
                )?);
            }
            eprintln!("  fwknop: {}", brief(&v));
            rows.push(("fwknop SPA (fwknopd defaults, pcap)".into(), v, "`fwknop -A tcp/22 -a 198.18.0.2 -D 198.18.0.1 --use-hmac …`".into()));
        }
        // knockd: three-port TCP SYN sequence.
        {
            let _kd = self.start_knockd()?;
            let mut v = Vec::new();
            for _ in 0..trials {
                check_stop()?;
                flush_kb()?;
                v.push(self.trial(
                    &sniffer,
                    || {
                        let mut c = Command::new("knock");
                        c.arg(SERVER.to_string()).args(KNOCKD_PORTS.map(|p| p.to_string()));
                        c
                    },
                    (6, SERVER, KNOCKD_PORTS[0]),
                )?);
            }
            eprintln!("  knockd: {}", brief(&v));
            rows.push(("knockd (3-port TCP sequence)".into(), v, "`knock 198.18.0.1 7000 8000 9000`".into()));
        }
        sniffer.stop();
        for rule in [vec!["iptables", "-F", "INPUT"], vec!["iptables", "-F", "KB"], vec!["iptables", "-X", "KB"]] {
            run_in(self.srv(), &rule, Duration::from_secs(5))?;
        }

        let mut t = format!(
            "### 2. Knock-to-open latency ({trials} trials each)\n\n\
             From the knock's first packet leaving the client (kernel timestamp of the outgoing packet on the client's \
             interface) to the first TCP connect to port 22 that succeeds. From the moment the client command starts, \
             connects are tried back to back, each with a 1 ms timeout (a dropped SYN), for up to 2 s. Between trials the \
             door is removed (`nft flush set`, `iptables -F`), so every trial starts closed. \"from command start\" \
             adds the client program's own start-up.\n\n\
             | method | opened | p50 | p99 | mean | max | p50 from command start | command |\n|---|---:|---:|---:|---:|---:|---:|---|\n"
        );
        for (label, v, how) in &rows {
            let ok: Vec<f64> = v.iter().filter_map(|t| t.packet_ms).collect();
            let cmd: Vec<f64> = v.iter().filter_map(|t| t.command_ms).collect();
            let s = summarize(&ok);
            let c = summarize(&cmd);
            let _ = writeln!(
                t,
                "| {label} | {}/{} | {} | {} | {} | {} | {} | {how} |",
                ok.len(),
                v.len(),
                fmt_ms(s.p50),
                fmt_ms(s.p99),
                fmt_ms(s.mean),
                fmt_ms(s.max),
                fmt_ms(c.p50)
            );
            self.cdf.insert(label.clone(), (ok, v.len()));
        }
        t.push_str(
            "\nThe UDP single-packet knock of nxknock (pcap listener) does not exist yet, so it has no row.\n\
             A plain knock through a resolver opens for the resolver's address (by design), so plain via unbound is not a \
             knock-to-open path for the client and has no row either.\n\n",
        );
        eprint!("{t}");
        self.report.push_str(&t);
        Ok(())
    }

    /// One knock trial: run the client in the client namespace, then connect until open.
    fn trial(&self, sniffer: &Sniffer, cmd: impl Fn() -> Command + Sync, pkt: (u8, Ipv4Addr, u16)) -> Result<Trial> {
        let target = SocketAddr::new(SERVER.into(), SSH_PORT);
        let (t0, done, ok) = self.cli().enter(|| -> Result<(i128, i128, Option<i128>)> {
            let t0 = now_ns();
            let mut c = cmd();
            let mut child = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
            let ok = connect_until_open(target, CONNECT_EACH, Duration::from_secs(2));
            let out = wait_bounded(&mut child, Duration::from_secs(10))?;
            let done = now_ns();
            if !out.status.success() {
                bail!("client failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok((t0, done, ok))
        })?;
        let _ = done;
        let sent = sniffer.first_after(t0, pkt, Duration::from_millis(200));
        Ok(Trial {
            packet_ms: match (sent, ok) {
                (Some(s), Some(o)) => Some((o - s) as f64 / 1e6),
                _ => None,
            },
            command_ms: ok.map(|o| (o - t0) as f64 / 1e6),
            packet_seen: sent.is_some(),
        })
    }

    fn start_unbound(&self) -> Result<Daemon> {
        let udir = self.dir.join("unbound");
        std::fs::create_dir_all(&udir)?;
        let conf = udir.join("unbound.conf");
        std::fs::write(
            &conf,
            format!(
                "server:\n  interface: {RESOLVER}\n  port: 53\n  access-control: 198.18.0.0/15 allow\n\
                 do-ip6: no\n  do-not-query-localhost: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n\
                 pidfile: \"{d}/unbound.pid\"\n  use-syslog: no\n  logfile: \"\"\n  verbosity: 0\n  num-threads: 1\n\
                 module-config: \"iterator\"\n  domain-insecure: \"{ZONE}\"\n  outgoing-interface: {RESOLVER}\n\
                 remote-control:\n  control-enable: no\n\
                 stub-zone:\n  name: \"{ZONE}\"\n  stub-addr: {SERVER}\n",
                d = udir.display()
            ),
        )?;
        let mut d = Daemon::start(self.res(), "unbound", "unbound", &["-d", "-c", conf.to_str().unwrap()], &udir.join("unbound.log"), &[])?;
        let cli = self.cli();
        d.wait_ready(Duration::from_secs(20), |_| {
            run_in(cli, &["dig", "+time=1", "+tries=1", &format!("@{RESOLVER}"), &format!("ns1.{ZONE}")], Duration::from_secs(3))
                .is_ok_and(|o| o.contains("status: NOERROR"))
        })?;
        Ok(d)
    }

    /// fwknopd in the server namespace; returns the daemon and the (Rijndael, HMAC) keys.
    fn start_fwknopd(&self) -> Result<(Daemon, (String, String))> {
        let fdir = self.dir.join("fwknop");
        std::fs::create_dir_all(&fdir)?;
        let b64 = data_encoding::BASE64;
        let (k, h) = (b64.encode(&random_bytes(32)), b64.encode(&random_bytes(64)));
        let conf = fdir.join("fwknopd.conf");
        let access = fdir.join("access.conf");
        std::fs::write(&conf, format!("PCAP_INTF eth0;\nFWKNOP_RUN_DIR {};\n", fdir.display()))?;
        std::fs::write(
            &access,
            format!(
                "SOURCE ANY\nKEY_BASE64 {k}\nHMAC_KEY_BASE64 {h}\n\
                 CMD_CYCLE_OPEN /usr/sbin/iptables -I KB -s $IP -p tcp --dport 22 -j ACCEPT\n\
                 CMD_CYCLE_CLOSE /usr/sbin/iptables -D KB -s $IP -p tcp --dport 22 -j ACCEPT\n\
                 CMD_CYCLE_TIMER 30\n"
            ),
        )?;
        use std::os::unix::fs::PermissionsExt;
        for p in [&conf, &access] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))?;
        }
        std::fs::write(fdir.join("fwknoprc"), "")?;
        std::fs::set_permissions(fdir.join("fwknoprc"), std::fs::Permissions::from_mode(0o600))?;
        let mut d = Daemon::start(
            self.srv(),
            "fwknopd",
            "fwknopd",
            &[
                "-f",
                "-c", conf.to_str().unwrap(),
                "-a", access.to_str().unwrap(),
                "-d", fdir.join("digest.cache").to_str().unwrap(),
                "-p", fdir.join("fwknopd.pid").to_str().unwrap(),
            ],
            &fdir.join("fwknopd.log"),
            &[],
        )?;
        d.wait_ready(Duration::from_secs(20), |d| d.log_text().contains("main event loop"))?;
        Ok((d, (k, h)))
    }

    fn start_knockd(&self) -> Result<Daemon> {
        let kdir = self.dir.join("knockd");
        std::fs::create_dir_all(&kdir)?;
        let conf = kdir.join("knockd.conf");
        std::fs::write(
            &conf,
            format!(
                "[options]\n    Interface = eth0\n    LogFile = {d}/knockd.log\n\
                 [open]\n    sequence = {s}\n    seq_timeout = 5\n    tcpflags = syn\n\
                 start_command = /usr/sbin/iptables -I KB -s %IP% -p tcp --dport 22 -j ACCEPT\n    cmd_timeout = 30\n\
                 stop_command = /usr/sbin/iptables -D KB -s %IP% -p tcp --dport 22 -j ACCEPT\n",
                d = kdir.display(),
                s = KNOCKD_PORTS.map(|p| p.to_string()).join(",")
            ),
        )?;
        let mut d = Daemon::start(
            self.srv(),
            "knockd",
            "knockd",
            &["-c", conf.to_str().unwrap(), "-i", "eth0", "-p", kdir.join("knockd.pid").to_str().unwrap()],
            &kdir.join("stdout.log"),
            &[],
        )?;
        let log = kdir.join("knockd.log");
        d.wait_ready(Duration::from_secs(20), |_| std::fs::read_to_string(&log).unwrap_or_default().contains("listening on"))?;
        Ok(d)
    }

    // ------------------------------------------------------------ 3. scale

    fn scale(&mut self) -> Result<()> {
        let o = self.opts.clone();
        let random = self.dir.join("q-random.txt");
        if !random.exists() {
            write_queries(&random, (0..100_000).map(|_| random_label()))?;
        }
        let wellformed = self.dir.join("q-wellformed.txt");
        if !wellformed.exists() {
            write_queries(&wellformed, (0..100_000).map(|_| wellformed_label()))?;
        }
        let mut t = String::from(
            "### 3. Scale with enrolled users\n\n\
             Filler users are enrolled through the library in one transaction per 100k (`Store::add_users`); one probe user \
             has a real chain. Verification is timed in-process on the same `Verifier` the daemon runs: a random well-formed \
             token (the full 32-step window, then rejected) and a valid knock (window hit, MAC/policy, SQLite commit with \
             `synchronous=FULL`). The daemon is then started on the same database (nftables backend) and loaded with dnsperf.\n\n\
             | users | enrol | DB size | bytes/user | index load | random token verify (mean / p99) | valid knock verify (p50 / p99) | daemon start | RSS idle | RSS under load | DNS q/s random labels | DNS q/s well-formed tokens |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for &n in &o.user_counts {
            check_stop()?;
            let db = self.dir.join(format!("scale-{n}.db"));
            let t0 = Instant::now();
            let probe_len = 1000u64;
            let probe = self.enrol(&db, &[("probe", probe_len)])?;
            let mut store = SqliteStore::open(&db)?;
            let mut left = n.saturating_sub(1);
            let mut k = 0usize;
            while left > 0 {
                check_stop()?;
                let m = left.min(100_000);
                let batch: Vec<Enrolment> = (0..m)
                    .map(|i| Enrolment {
                        name: format!("user{:07}", k + i),
                        verifiers: [0, 1].map(|_| Element(random_bytes(ELEMENT_LEN).try_into().unwrap())),
                        chain_len: 10_000,
                        mac_key: random_bytes(32),
                        services: vec![],
                        from: vec![],
                        max_open: None,
                    })
                    .collect();
                store.add_users(&batch)?;
                k += m;
                left -= m;
            }
            drop(store);
            let enrol = t0.elapsed();
            let size = db_size(&db);

            // In-process verification cost.
            let cfg_path = self.nx_config(&format!("scale-{n}"), &db, "nftables")?;
            let cfg = Config::load(&cfg_path)?;
            let t1 = Instant::now();
            let mut v = Verifier::new(Box::new(SqliteStore::open(&db)?), self.zone.clone(), &cfg)?;
            let load = t1.elapsed();
            let reps = if o.quick { 5_000 } else { 20_000 };
            let mut rand_ns = Vec::with_capacity(reps);
            for _ in 0..reps {
                let knock = knock_of(Token::Plain(Element(random_bytes(ELEMENT_LEN).try_into().unwrap())));
                let t = Instant::now();
                let d = v.verify(&knock);
                rand_ns.push(t.elapsed().as_nanos() as f64);
                if !matches!(d, Decision::Reject { .. }) {
                    bail!("a random token was accepted: {d:?}");
                }
            }
            let mut valid_us = Vec::new();
            for j in 1..=if o.quick { 20 } else { 100 } {
                let knock = knock_of(Token::Plain(probe[0].element(&self.zone, Form::Plain, probe_len - j)));
                let t = Instant::now();
                let d = v.verify(&knock);
                valid_us.push(t.elapsed().as_nanos() as f64 / 1e3);
                if !matches!(d, Decision::Open { .. }) {
                    bail!("probe knock {j} not accepted: {d:?}");
                }
            }
            drop(v);
            let rs = summarize(&rand_ns);
            let vs = summarize(&valid_us);

            // The daemon on this database.
            let (d, start) = self.start_nxknock(&cfg_path, &format!("nxknock-scale-{n}.log"), &[])?;
            nap(Duration::from_millis(300))?;
            let idle = d.memory().0;
            let secs = o.dns_secs.min(if o.quick { 3 } else { 8 });
            let r1 = self.dnsperf(self.cli(), SERVER, &random, secs, &[])?;
            let r2 = self.dnsperf(self.cli(), SERVER, &wellformed, secs, &[])?;
            let hwm = d.memory().1;
            drop(d);
            eprintln!(
                "  {n} users: enrol {enrol:.1?}, {size} B, load {load:.1?}, random {:.1} µs, valid p50 {:.0} µs, start {start:.1?}, rss {idle} kB, {:.0}/{:.0} q/s",
                rs.mean / 1e3,
                vs.p50,
                r1.qps,
                r2.qps
            );
            let _ = writeln!(
                t,
                "| {} | {:.1} s | {:.1} MiB | {:.0} | {} | {:.1} / {:.1} µs | {:.0} / {:.0} µs | {} | {:.1} MiB | {:.1} MiB | {} | {} |",
                fmt_count(n),
                enrol.as_secs_f64(),
                size as f64 / (1 << 20) as f64,
                size as f64 / n as f64,
                fmt_dur(load),
                rs.mean / 1e3,
                rs.p99 / 1e3,
                vs.p50,
                vs.p99,
                fmt_dur(start),
                idle as f64 / 1024.0,
                hwm as f64 / 1024.0,
                fmt_k(r1.qps),
                fmt_k(r2.qps),
            );
            let _ = std::fs::remove_file(&db);
        }
        t.push('\n');
        eprint!("{t}");
        self.report.push_str(&t);
        Ok(())
    }

    // ------------------------------------------------------------ 4. under attack

    fn attack(&mut self) -> Result<()> {
        let o = self.opts.clone();
        let _door = self.srv().tcp_listen(SocketAddr::new(SERVER.into(), SSH_PORT));
        if let Ok(l) = &_door {
            let l = l.try_clone()?;
            std::thread::spawn(move || accept_and_drop(l));
        }
        let sniffer = Sniffer::open(self.cli())?;
        let random = self.dir.join("q-random.txt");
        if !random.exists() {
            write_queries(&random, (0..100_000).map(|_| random_label()))?;
        }
        let wellformed = self.dir.join("q-wellformed.txt");
        if !wellformed.exists() {
            write_queries(&wellformed, (0..100_000).map(|_| wellformed_label()))?;
        }
        let mut t = format!(
            "### 4. Under attack\n\n\
             The attacker host floods the server with dnsperf at full rate (`-c 4`, no rate limit, {}s) while the client \
             makes legitimate bound knocks (`nxknock knock --server`), one at a time, each followed by the connect loop \
             (up to 2 s). \"opened\" counts knocks whose door opened within 2 s; the latency is knock packet → connect.\n\n\
             | flood | flood q/s answered | flood lost | legit knocks opened | p50 | p99 | max |\n|---|---:|---:|---:|---:|---:|---:|\n",
            o.attack_secs
        );
        for (label, file) in [("none (baseline)", None), ("random labels", Some(&random)), ("well-formed random tokens", Some(&wellformed))] {
            check_stop()?;
            let db = self.dir.join("attack.db");
            let _ = std::fs::remove_file(&db);
            let cfg = self.nx_config("attack", &db, "nftables")?;
            let cred = self.user_add(&cfg, &format!("legit{}", label.len()))?;
            let (mut d, _) = self.start_nxknock(&cfg, "nxknock-attack.log", &[])?;
            let mut flood = None;
            if let Some(f) = file {
                let s = SERVER.to_string();
                let l = o.attack_secs.to_string();
                flood = Some(
                    self.lab
                        .attacker
                        .cmd("dnsperf")
                        .args(["-s", &s, "-d", f.to_str().unwrap(), "-c", DNSPERF_CLIENTS, "-l", &l])
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()?,
                );
                nap(Duration::from_secs(1))?;
            }
            let t_end = Instant::now() + Duration::from_secs(o.attack_secs.saturating_sub(2));
            let mut v = Vec::new();
            let mut peak = 0;
            while v.len() < o.attack_trials && (flood.is_none() || Instant::now() < t_end) {
                check_stop()?;
                run_in(self.srv(), &["nft", "flush", "set", "inet", "nxknock", "doors4"], Duration::from_secs(5))?;
                v.push(self.trial(
                    &sniffer,
                    || {
                        let mut c = Command::new(BIN);
                        c.args(["knock", "--credential", cred.to_str().unwrap(), "--server", &SERVER.to_string(), "--ip", &CLIENT.to_string()]);
                        c
                    },
                    (17, SERVER, 53),
                )?);
                peak = peak.max(d.memory().0);
                if flood.is_some() {
                    nap(Duration::from_millis(50))?;
                }
            }
            let fr = match flood.take() {
                Some(mut c) => Some(Dnsperf::parse(&String::from_utf8_lossy(&wait_bounded(&mut c, Duration::from_secs(o.attack_secs + 30))?.stdout))?),
                None => None,
            };
            let hwm = d.memory().1;
            d.stop();
            let ok: Vec<f64> = v.iter().filter_map(|t| t.packet_ms).collect();
            let s = summarize(&ok);
            eprintln!("  flood {label}: {}", brief(&v));
            let _ = writeln!(
                t,
                "| {label} | {} | {} | {}/{} ({:.0}%) | {} | {} | {} |",
                fr.as_ref().map(|r| fmt_k(r.qps)).unwrap_or_else(|| "–".into()),
                fr.as_ref().map(|r| r.lost.to_string()).unwrap_or_else(|| "–".into()),
                ok.len(),
                v.len(),
                100.0 * ok.len() as f64 / v.len().max(1) as f64,
                fmt_ms(s.p50),
                fmt_ms(s.p99),
                fmt_ms(s.max),
            );
            if file.is_some() {
                self.cdf.insert(format!("nxknock knock under flood ({label})"), (ok.clone(), v.len()));
                self.notes.push(format!("nxknock resident memory under the {label} flood: {:.1} MiB now, {:.1} MiB peak.", peak as f64 / 1024.0, hwm as f64 / 1024.0));
            }
            let _ = run_in(self.srv(), &[BIN, "uninstall-firewall", "--config", cfg.to_str().unwrap()], Duration::from_secs(10));
        }
        sniffer.stop();
        t.push('\n');
        eprint!("{t}");
        self.report.push_str(&t);
        Ok(())
    }

    // ------------------------------------------------------------ output

    fn finish(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.opts.out)?;
        let png = self.plot()?;
        if let Some(p) = &png {
            let _ = writeln!(self.report, "\n![knock-to-open latency CDF]({})\n", p.file_name().unwrap().to_string_lossy());
        }
        let results = self.opts.out.join("results.md");
        std::fs::write(&results, &self.report)?;
        println!("\n{}", self.report);
        println!("knockbench: results in {}", results.display());
        if self.opts.write {
            let doc = Path::new(ROOT).join("BENCHMARKS.md");
            let text = std::fs::read_to_string(&doc).unwrap_or_default();
            let (begin, end) = ("<!-- results:begin -->", "<!-- results:end -->");
            let body = self.report.replace("](latency_cdf.png)", "](benches/latency_cdf.png)");
            let new = match (text.find(begin), text.find(end)) {
                (Some(a), Some(b)) if a < b => format!("{}{begin}\n{body}\n{end}{}", &text[..a], &text[b + end.len()..]),
                _ => format!("{text}\n{begin}\n{body}\n{end}\n"),
            };
            std::fs::write(&doc, new)?;
            if let Some(p) = &png {
                std::fs::copy(p, Path::new(ROOT).join("benches/latency_cdf.png"))?;
            }
            println!("knockbench: wrote BENCHMARKS.md and benches/latency_cdf.png");
        }
        Ok(())
    }

    /// Latency CDF with gnuplot (pngcairo); None if there is nothing to plot or no gnuplot.
    fn plot(&self) -> Result<Option<PathBuf>> {
        if self.cdf.values().all(|(v, _)| v.is_empty()) {
            return Ok(None);
        }
        let mut script = String::from(
            "set terminal pngcairo size 1100,650 font ',11'\nset output 'latency_cdf.png'\n\
             set title 'Knock-to-open latency (knock packet leaves the client → TCP connect succeeds); curves end at the fraction that opened'\n\
             set xlabel 'milliseconds (log scale)'\nset ylabel 'fraction of knocks'\nset logscale x\n\
             set key bottom right\nset grid\nset yrange [0:1]\n",
        );
        let mut plots = Vec::new();
        for (i, (label, (v, trials))) in self.cdf.iter().enumerate() {
            if v.is_empty() {
                continue;
            }
            let mut s = v.clone();
            s.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let f = format!("cdf-{i}.dat");
            // Fractions of all trials: knocks that never opened keep the curve below 1.
            let mut data = format!("{} 0\n", s[0]);
            for (j, x) in s.iter().enumerate() {
                let _ = writeln!(data, "{x} {}", (j + 1) as f64 / (*trials).max(1) as f64);
            }
            std::fs::write(self.opts.out.join(&f), data)?;
            plots.push(format!("'{f}' using 1:2 with steps lw 2 title '{}'", label.replace('\'', "")));
        }
        let _ = writeln!(script, "plot {}", plots.join(", \\\n     "));
        std::fs::write(self.opts.out.join("latency_cdf.gp"), &script)?;
        let st = Command::new("gnuplot").arg("latency_cdf.gp").current_dir(&self.opts.out).status();
        match st {
            Ok(s) if s.success() => Ok(Some(self.opts.out.join("latency_cdf.png"))),
            _ => {
                eprintln!("knockbench: gnuplot failed or missing; no plot");
                Ok(None)
            }
        }
    }
}

// ---------------------------------------------------------------- helpers

#[derive(Debug)]
struct Trial {
    /// Knock packet on the wire → connect succeeded (ms); None if it never opened.
    packet_ms: Option<f64>,
    /// Client command started → connect succeeded (ms).
    command_ms: Option<f64>,
    packet_seen: bool,
}

fn brief(v: &[Trial]) -> String {
    let ok: Vec<f64> = v.iter().filter_map(|t| t.packet_ms).collect();
    let s = summarize(&ok);
    let unseen = v.iter().filter(|t| !t.packet_seen).count();
    format!("{}/{} opened, p50 {}, p99 {}{}", ok.len(), v.len(), fmt_ms(s.p50), fmt_ms(s.p99), if unseen > 0 { format!(", {unseen} knocks not captured") } else { String::new() })
}

/// Connect attempts with a short timeout until one succeeds (or `total` passes);
/// returns when it succeeded (ns since the epoch).
fn connect_until_open(target: SocketAddr, each: Duration, total: Duration) -> Option<i128> {
    let t0 = Instant::now();
    while t0.elapsed() < total {
        match TcpStream::connect_timeout(&target, each) {
            Ok(s) => {
                let t = now_ns();
                drop(s);
                return Some(t);
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => std::thread::sleep(each),
        }
    }
    None
}

fn accept_and_drop(l: TcpListener) {
    for s in l.incoming() {
        match s {
            Ok(s) => drop(s),
            Err(_) => break,
        }
    }
}

fn knock_of(token: Token) -> Knock {
    Knock { token, seen_from: IpAddr::V4(CLIENT), via: Via::DnsUdp, ecs: None, received: Instant::now() }
}

fn otp(cred: &Path, n: usize) -> Result<Vec<String>> {
    let mut names = Vec::new();
    while names.len() < n {
        let k = (n - names.len()).min(1000);
        let out = Command::new(BIN).args(["otp", "--credential", cred.to_str().unwrap(), "--count", &k.to_string()]).output()?;
        if !out.status.success() {
            bail!("otp: {}", String::from_utf8_lossy(&out.stderr));
        }
        names.extend(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned));
    }
    Ok(names)
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::fill(&mut v[..]);
    v
}

const B32: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";

/// A random base32 label of 20 or 56 characters (the plain and bound-IPv4 lengths).
fn random_label() -> String {
    let r = random_bytes(57);
    let len = if r[0] & 1 == 0 { 20 } else { 56 };
    r[1..=len].iter().map(|b| B32[(*b & 31) as usize] as char).collect()
}

/// A well-formed random token: a random plain element, or a bound-IPv4-shaped label.
fn wellformed_label() -> String {
    let r = random_bytes(36);
    if r[0] & 1 == 0 {
        Token::Plain(Element(r[1..=ELEMENT_LEN].try_into().unwrap())).to_label()
    } else {
        let mut b = vec![0x21u8];
        b.extend_from_slice(&r[1..35]);
        data_encoding::BASE32_NOPAD.encode(&b).to_ascii_lowercase()
    }
}

fn write_queries(path: &Path, labels: impl Iterator<Item = String>) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for l in labels {
        writeln!(f, "{l}.{ZONE} A")?;
    }
    f.flush()?;
    Ok(())
}

/// Copy a (closed) SQLite database with its WAL, if any.
fn copy_db(from: &Path, to: &Path) -> Result<()> {
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

fn db_size(db: &Path) -> u64 {
    ["", "-wal"].iter().map(|s| std::fs::metadata(format!("{}{s}", db.display())).map(|m| m.len()).unwrap_or(0)).sum()
}

fn fmt_k(q: f64) -> String {
    if q >= 1000.0 { format!("{:.1}k", q / 1000.0) } else { format!("{q:.0}") }
}

fn fmt_ms(ms: f64) -> String {
    if ms == 0.0 {
        "–".into()
    } else if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

fn fmt_dur(d: Duration) -> String {
    if d.as_secs_f64() >= 1.0 { format!("{:.2} s", d.as_secs_f64()) } else { format!("{:.0} ms", d.as_secs_f64() * 1e3) }
}

fn fmt_count(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1000 && n % 1000 == 0 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

#[derive(Clone, Debug, Default)]
struct Dnsperf {
    sent: u64,
    completed: u64,
    lost: u64,
    qps: f64,
    mean_us: f64,
}

impl Dnsperf {
    fn parse(out: &str) -> Result<Dnsperf> {
        let num = |key: &str| -> Option<f64> {
            out.lines().find(|l| l.trim_start().starts_with(key)).and_then(|l| l.split(':').nth(1)).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok())
        };
        let r = Dnsperf {
            sent: num("Queries sent").unwrap_or(0.0) as u64,
            completed: num("Queries completed").unwrap_or(0.0) as u64,
            lost: num("Queries lost").unwrap_or(0.0) as u64,
            qps: num("Queries per second").context("dnsperf printed no rate")?,
            mean_us: num("Average Latency (s)").unwrap_or(0.0) * 1e6,
        };
        Ok(r)
    }
}

// ---------------------------------------------------------------- packet timestamps

/// One outgoing packet: (kernel timestamp in ns, IP protocol, destination, destination port).
type Packet = (i128, u8, Ipv4Addr, u16);
/// Packets seen so far, shared with the sniffer thread.
type Packets = Arc<Mutex<Vec<Packet>>>;

/// Outgoing IPv4 packets on the client's `eth0`, with kernel timestamps (AF_PACKET, SO_TIMESTAMPNS).
struct Sniffer {
    packets: Packets,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Sniffer {
    fn open(ns: &Netns) -> Result<Sniffer> {
        let fd = ns.try_enter(|| -> std::io::Result<OwnedFd> {
            // ETH_P_ALL: outgoing packets reach only the "all protocols" taps.
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket(2); the fd is owned right away.
            let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, proto as libc::c_int) };
            if raw < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: raw is a fresh, valid fd.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let ifname = std::ffi::CString::new("eth0").unwrap();
            // SAFETY: a valid C string.
            let ifindex = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
            // SAFETY: sockaddr_ll is plain data.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = ifindex as i32;
            let one: libc::c_int = 1;
            let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
            let buf: libc::c_int = 8 << 20;
            // SAFETY: valid fd, properly sized option values and address.
            unsafe {
                if libc::bind(raw, (&sll as *const libc::sockaddr_ll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::setsockopt(raw, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, (&one as *const libc::c_int).cast(), 4);
                libc::setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&tv as *const libc::timeval).cast(), std::mem::size_of::<libc::timeval>() as u32);
                libc::setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, (&buf as *const libc::c_int).cast(), 4);
            }
            Ok(fd)
        })??;
        let packets = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (packets.clone(), stop.clone());
        let thread = std::thread::spawn(move || sniff(fd, p, s));
        Ok(Sniffer { packets, stop, thread: Mutex::new(Some(thread)) })
    }

    /// The first captured packet (proto, dst, dport) at or after `t0`, waiting up to `wait` for the capture thread.
    fn first_after(&self, t0: i128, (proto, dst, dport): (u8, Ipv4Addr, u16), wait: Duration) -> Option<i128> {
        let until = Instant::now() + wait;
        loop {
            let found = {
                let mut p = self.packets.lock().unwrap();
                let hit = p.iter().find(|(ts, pr, d, port)| *ts >= t0 && *pr == proto && *d == dst && *port == dport).map(|x| x.0);
                // Keep the list short: nothing before t0 is needed again.
                p.retain(|(ts, ..)| *ts >= t0);
                hit
            };
            if found.is_some() || Instant::now() >= until {
                if found.is_none() && std::env::var_os("KB_DEBUG").is_some() {
                    eprintln!("no packet {proto}/{dst}/{dport} after {t0}: {:?}", self.packets.lock().unwrap().iter().take(5).collect::<Vec<_>>());
                }
                return found;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn sniff(fd: OwnedFd, packets: Packets, stop: Arc<AtomicBool>) {
    let mut buf = [0u8; 256];
    let mut ctrl = [0u64; 16];
    while !stop.load(Ordering::SeqCst) {
        // SAFETY: zeroed plain-data structs pointing at live local buffers.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut sll as *mut libc::sockaddr_ll).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ctrl.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&ctrl);
        // SAFETY: msg describes valid buffers for the duration of the call.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_TRUNC) };
        if n < 20 || sll.sll_pkttype != libc::PACKET_OUTGOING || sll.sll_protocol != (libc::ETH_P_IP as u16).to_be() {
            continue;
        }
        let mut ts = None;
        // SAFETY: walking the control messages the kernel wrote into `ctrl`.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let t = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                    ts = Some(t.tv_sec as i128 * 1_000_000_000 + t.tv_nsec as i128);
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let Some(ts) = ts else { continue };
        if buf[0] >> 4 != 4 {
            continue;
        }
        let ihl = ((buf[0] & 15) as usize) * 4;
        let proto = buf[9];
        let dst = Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]);
        if (proto != 6 && proto != 17) || ihl + 4 > (n as usize).min(buf.len()) {
            continue;
        }
        let dport = u16::from_be_bytes([buf[ihl + 2], buf[ihl + 3]]);
        if proto == 6 && dport == SSH_PORT {
            continue; // the connect loop itself
        }
        packets.lock().unwrap().push((ts, proto, dst, dport));
    }
}
