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
//!   succeeds, for nxknock (bound direct, dig plain, bound via unbound, and the
//!   capture listener's `knock --via udp` and `--via tcp`), fwknop and knockd.
//! * `scale`: bulk enrolment of 10, 10k and 1M users; verification cost, start-up,
//!   memory and DNS rate for each.
//! * `attack`: legitimate knocks while a flood of random knock labels runs at full rate.
//!

mod attack;
mod dns_rate;
mod dnsperf;
mod exec;
mod knock_to_open;
mod peers;
mod report;
mod scale;
mod sniffer;
mod stats;
mod users;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nxknock::config::PcapConfig;
use nxknock::firewall::BackendKind;
use nxknock::lab::config::{ConfigBuilder, ZONE};
use nxknock::lab::daemon::{Daemon, Serve};
use nxknock::lab::interrupt;
use nxknock::lab::{Lab, Netns};
use nxknock::token::ZoneId;

const BIN: &str = env!("CARGO_BIN_EXE_nxknock");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const SERVER: Ipv4Addr = nxknock::lab::SERVER_V4;
const CLIENT: Ipv4Addr = nxknock::lab::CLIENT_V4;
const RESOLVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 4);
const RESOLVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 4);
const SSH_PORT: u16 = 22;
/// nxknock's `[pcap] udp_port` in the latency section (fwknop's port too; they never run together).
const PCAP_UDP_PORT: u16 = 62201;
/// nxknock's `[pcap] sequence_ports` in the latency section.
const PCAP_SEQUENCE_PORTS: &str = "61000-61999";

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
    interrupt::catch_signals();
    match run(&opts) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("knockbench: {e:#}");
            std::process::exit(1);
        }
    }
}

struct Bench {
    opts: Opts,
    lab: Lab,
    dir: PathBuf,
    /// Where the clients keep their credentials (see [`ClientDir`]).
    clients: ClientDir,
    zone: ZoneId,
    report: String,
    /// Per method: latencies (ms) of the knocks that opened, and the number of trials.
    cdf: BTreeMap<String, (Vec<f64>, usize)>,
    notes: Vec<String>,
}

/// The clients' credentials live on a tmpfs (`/dev/shm`), not on the disk the
/// servers commit to: on a real network the client saves its counter on its own
/// machine's disk, and here its flushes (which `knock` overlaps with sending) would
/// queue with the server's commit on the one disk this machine has. Removed on drop.
struct ClientDir(PathBuf);

impl ClientDir {
    fn new(fallback: &std::path::Path) -> Result<ClientDir> {
        let shm = std::path::Path::new("/dev/shm");
        if !shm.is_dir() {
            eprintln!("knockbench: no /dev/shm; client credentials share the servers' disk");
            return Ok(ClientDir(fallback.join("clients")));
        }
        let dir = shm.join(format!("nxknock-kb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700).create(&dir)?;
        Ok(ClientDir(dir))
    }
}

impl Drop for ClientDir {
    fn drop(&mut self) {
        if self.0.starts_with("/dev/shm") {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
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
        clients: ClientDir::new(&dir)?,
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
        interrupt::check()?;
        eprintln!("knockbench: == {name}");
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        b.notes.push(format!(
            "load average before `{name}`: {} (other work on the machine shows up here)",
            load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        ));
        if let Err(e) = f(&mut b) {
            if interrupt::interrupted() {
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

    // ------------------------------------------------------------ nxknock setup

    /// `<name>.toml` in the run directory: the lab's config (nftables) on database `db`.
    fn nx_config(&self, name: &str, db: &Path) -> Result<PathBuf> {
        let p = self.dir.join(format!("{name}.toml"));
        ConfigBuilder::new(BackendKind::Nftables).store(db).write(&p)?;
        Ok(p)
    }

    /// [`Bench::nx_config`] with the capture listener on: `[pcap]` with a UDP knock
    /// port and a sequence range (the knock-to-open rows for `knock --via udp|tcp`).
    fn nx_config_pcap(&self, name: &str, db: &Path) -> Result<PathBuf> {
        let p = self.dir.join(format!("{name}.toml"));
        let pcap = PcapConfig {
            udp_port: Some(PCAP_UDP_PORT),
            sequence_ports: Some(PCAP_SEQUENCE_PORTS.to_owned()),
            ..PcapConfig::default()
        };
        ConfigBuilder::new(BackendKind::Nftables).store(db).pcap(pcap).write(&p)?;
        Ok(p)
    }

    /// `nxknock serve` in the server namespace, waited for (`ready_after` says how long).
    fn start_nxknock(&self, config: &Path, log: &str, env: &[(&str, &str)]) -> Result<Daemon> {
        let serve = env.iter().fold(Serve::new(BIN, config, self.dir.join(log)), |s, (k, v)| s.env(k, v));
        serve.ready_within(Duration::from_secs(120)).stop_gently(Duration::from_secs(3)).start(self.srv())
    }
}
