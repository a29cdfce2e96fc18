//! Command-line surface (the contract in ARCHITECTURE.md, "Operator surface"). Parsing with clap; each command is a small
//! function over the library. Nothing secret is ever written to stdout: user
//! enrolment writes its secrets only into the 0600 credential file.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::client::{self, KnockRequest, Target};
use crate::config::Config;
use crate::credential::Credential;
use crate::dns::Zone;
use crate::enrol::{self, UserSpec};
use crate::netaddr::Prefix;
use crate::store::{SqliteStore, Store};
use crate::token::{Form, ZoneId};

#[derive(Parser, Debug)]
#[command(name = "nxknock", version, about = "Port knocking through an authoritative DNS server")]
pub struct Cli {
    /// Log filter (also RUST_LOG), e.g. "info" or "nxknock=debug".
    #[arg(long, global = true, default_value = "info")]
    pub log: String,
    /// Log as text or as one JSON object a line (default: `[log] format` for serve, else text).
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<crate::config::LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct ConfigArg {
    /// Configuration file.
    #[arg(long, short, default_value = "config/nxknock.toml", env = "NXKNOCK_CONFIG")]
    pub config: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the DNS server and open doors for valid knocks.
    Serve(ConfigArg),
    /// Check the configuration and zone file, then exit.
    CheckConfig(ConfigArg),
    /// Manage enrolled users.
    #[command(subcommand)]
    User(UserCmd),
    /// Maintain the database.
    #[command(subcommand)]
    Store(StoreCmd),
    /// Print the next one-time knock names (for dig, host, nslookup or a printed list).
    Otp {
        #[arg(long)]
        credential: PathBuf,
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// Print *bound* names that open for this address (valid for the server's
        /// max age, 120 s by default) instead of plain ones.
        #[arg(long)]
        ip: Option<IpAddr>,
        /// With --ip: the service to open.
        #[arg(long, requires = "ip")]
        service: Option<String>,
    },
    /// Send a knock.
    Knock(KnockArgs),
    /// List open doors: user, address, service, time left, via (or `doors close`).
    #[command(args_conflicts_with_subcommands = true)]
    Doors {
        #[command(flatten)]
        config: ConfigArg,
        /// One JSON array, for scripts.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<DoorsCmd>,
    },
    /// Is the daemon running here; how many users and open doors (exit 3 when not running).
    Status(ConfigArg),
    /// Remove nxknock's own firewall table/chain and sets (the daemon must be stopped).
    UninstallFirewall(ConfigArg),
    /// Run the whole story in throwaway network namespaces (root).
    Demo,
}

#[derive(Subcommand, Debug)]
pub enum DoorsCmd {
    /// Close a user's doors, or every door admitting an address, now. The running
    /// daemon removes them from the kernel within a fraction of a second.
    Close {
        #[arg(long, required_unless_present = "address", conflicts_with = "address")]
        user: Option<String>,
        #[arg(long)]
        address: Option<IpAddr>,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand, Debug)]
pub enum StoreCmd {
    /// Upgrade an older database in place. Schema 1 (one chain per user, used for
    /// both knock forms) cannot be split: its users stay revoked until rekeyed.
    Upgrade(ConfigArg),
}

#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// Enrol a user and write their credential file (0600).
    Add {
        name: String,
        #[arg(long)]
        out: PathBuf,
        /// Service the user may open (repeat; default: all).
        #[arg(long = "service")]
        services: Vec<String>,
        /// Source network the user may open for (repeat; default: any).
        #[arg(long = "from")]
        from: Vec<String>,
        /// Longest time (seconds) a door of this user stays open (default: the service's).
        #[arg(long)]
        max_open: Option<u64>,
        /// Knocks in the chain before a rekey is needed.
        #[arg(long, default_value_t = 10_000)]
        chain_len: u64,
        /// Nameserver address to record in the credential for `knock`.
        #[arg(long)]
        server: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
    List(ConfigArg),
    Revoke {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Remove a user for good, closing their doors (as revoke does); the name can be added again.
    Delete {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Change a user's policy; what is not given stays. Their next knock obeys it.
    Set {
        name: String,
        /// Service the user may open (repeat; replaces the list; `all` for every service).
        #[arg(long = "service")]
        services: Vec<String>,
        /// Source network the user may open for (repeat; replaces the list; `any` for anywhere).
        #[arg(long = "from")]
        from: Vec<String>,
        /// Longest time (seconds) a door of this user stays open; 0: the service's.
        #[arg(long)]
        max_open: Option<u64>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Give a user a fresh chain and MAC key (and un-revoke).
    Rekey {
        name: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 10_000)]
        chain_len: u64,
        #[arg(long)]
        server: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Args, Debug)]
pub struct KnockArgs {
    #[arg(long)]
    pub credential: PathBuf,
    /// Knock transport (only dns for now).
    #[arg(long, default_value = "dns")]
    pub via: String,
    /// Query this nameserver directly (ADDR or ADDR:PORT). With --resolver too, the
    /// knock goes through the resolver and the server is only asked for --ip auto.
    #[arg(long)]
    pub server: Option<String>,
    /// Query through this recursive resolver (ADDR or ADDR:PORT), or `system` for
    /// the first nameserver in /etc/resolv.conf.
    #[arg(long)]
    pub resolver: Option<String>,
    /// Address the door should admit, or `auto` to ask the nameserver (needs its
    /// `[dns] whoami` and a direct path to it).
    #[arg(long)]
    pub ip: Option<String>,
    /// Send the knock over TCP.
    #[arg(long)]
    pub tcp: bool,
    /// Service to open (default: every service you may open).
    #[arg(long)]
    pub service: Option<String>,
    /// Close your open doors for this address instead of opening.
    #[arg(long)]
    pub close: bool,
    /// Attempts before giving up.
    #[arg(long, default_value_t = 3)]
    pub attempts: u32,
    /// After the answer, retry a TCP connect to ADDR:PORT quickly (up to 3 s) until
    /// the door admits it: closes the short race between the NXDOMAIN and the door.
    #[arg(long, value_name = "ADDR:PORT")]
    pub wait: Option<SocketAddr>,
    /// Program to run after the knock (and --wait), e.g. `-- ssh user@host`; never a shell.
    #[arg(last = true)]
    pub run: Vec<String>,
}

impl Cli {
    /// The log format: `--log-format`, else for `serve` the config's `[log] format`
    /// (a config that does not load is reported by `serve` itself), else text.
    pub fn log_format(&self) -> crate::config::LogFormat {
        if let Some(f) = self.log_format {
            return f;
        }
        match &self.command {
            Command::Serve(c) => Config::load(&c.config).map(|c| c.log.format).unwrap_or_default(),
            _ => crate::config::LogFormat::default(),
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(c) => crate::server::serve(&c.config),
        Command::CheckConfig(c) => check_config(&c.config),
        Command::User(u) => user(u),
        Command::Store(StoreCmd::Upgrade(c)) => {
            let cfg = Config::load(&c.config)?;
            let users = SqliteStore::upgrade(&cfg.store.path)?;
            if users.is_empty() {
                println!("{}: schema is current; nothing to do", cfg.store.path.display());
            } else {
                println!(
                    "{}: upgraded; these users are revoked until `nxknock user rekey NAME --out FILE`:",
                    cfg.store.path.display()
                );
                for u in users {
                    println!("  {u}");
                }
            }
            Ok(())
        }
        Command::Otp { credential, count, ip, service } => {
            if count == 0 || count > 1000 {
                bail!("--count must be between 1 and 1000");
            }
            let names = match ip {
                Some(ip) => client::otp_bound(&credential, count, ip, service.as_deref())?,
                None => client::otp(&credential, count)?,
            };
            for name in names {
                println!("{name}");
            }
            Ok(())
        }
        Command::Knock(k) => knock(k),
        Command::Doors { action: Some(DoorsCmd::Close { user, address, config }), .. } => {
            close_doors(&Config::load(&config.config)?, user.as_deref(), address)
        }
        Command::Doors { config, json, action: None } => doors(&Config::load(&config.config)?, json),
        Command::Status(c) => status(&Config::load(&c.config)?),
        Command::UninstallFirewall(c) => {
            let cfg = Config::load(&c.config)?;
            let doors = crate::doors::Doors::from_config(&cfg);
            if cfg.firewall.backend != crate::firewall::BackendKind::None {
                let _lock = crate::server::claim_firewall(doors.backend_name()).context(
                    "stop `nxknock serve` first: uninstalling under a running daemon would open every guarded port",
                )?;
                doors.uninstall()?;
            }
            println!(
                "removed nxknock's {} firewall objects; guarded services are no longer protected by nxknock",
                doors.backend_name()
            );
            Ok(())
        }
        Command::Demo => crate::demo::run(),
    }
}

/// Every check `serve` would make, every problem listed; exit status 1 on errors.
fn check_config(path: &std::path::Path) -> anyhow::Result<()> {
    let report = crate::check::check(path);
    for f in &report.findings {
        match f.severity {
            crate::check::Severity::Error => eprintln!("error: {}", f.message),
            crate::check::Severity::Warning => eprintln!("warning: {}", f.message),
        }
    }
    match report.errors() {
        0 => {
            println!("{}: ok ({})", path.display(), report.summary.as_deref().unwrap_or("-"));
            Ok(())
        }
        1 => bail!("{}: 1 error", path.display()),
        n => bail!("{}: {n} errors", path.display()),
    }
}

fn zone_id(cfg: &Config) -> anyhow::Result<ZoneId> {
    let zone = Zone::load(&cfg.dns.zone_file, cfg.dns.zone.as_deref())?;
    Ok(ZoneId::new(&zone.apex.to_ascii()))
}

fn user(cmd: UserCmd) -> anyhow::Result<()> {
    match cmd {
        UserCmd::Add { name, out, services, from, max_open, chain_len, server, config } => {
            let cfg = Config::load(&config.config)?;
            for s in &services {
                if cfg.service(s).is_none() {
                    bail!("--service {s:?} is not a [[service]] in {}", config.config.display());
                }
            }
            let from = from
                .iter()
                .map(|f| f.parse::<Prefix>().map_err(|e| anyhow::anyhow!("--from {e}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let openable = openable(&cfg, &services);
            let spec = UserSpec { name: name.clone(), services, from, max_open, chain_len, server, openable };
            let mut store = SqliteStore::open(&cfg.store.path)?;
            let enrol = enrol::add(&mut store, &zone_id(&cfg)?, &spec, &out)?;
            println!(
                "added user {name}: {chain_len} knocks, services {}, from {}; credential written to {} (mode 0600)",
                list_or(&enrol.services, "all"),
                list_or(&enrol.from, "anywhere"),
                out.display()
            );
            Ok(())
        }
        UserCmd::List(c) => {
            let cfg = Config::load(&c.config)?;
            let mut store = SqliteStore::open_existing(&cfg.store.path)?;
            println!(
                "{:<20} {:>9} {:>9} {:>9}  {:<8} {:<16} FROM",
                "USER", "PLAIN", "BOUND", "CHAIN", "STATE", "SERVICES"
            );
            for u in store.list_users()? {
                println!(
                    "{:<20} {:>9} {:>9} {:>9}  {:<8} {:<16} {}",
                    u.name,
                    u.chain(Form::Plain).counter,
                    u.chain(Form::Bound).counter,
                    u.chain_len,
                    if u.revoked { "revoked" } else { "active" },
                    list_or(&u.services, "all"),
                    list_or(&u.from, "anywhere")
                );
            }
            Ok(())
        }
        UserCmd::Revoke { name, config } => {
            let cfg = Config::load(&config.config)?;
            let mut store = SqliteStore::open_existing(&cfg.store.path)?;
            if store.revoke(&name)? {
                println!("revoked {name}");
            } else {
                println!("{name} was already revoked");
            }
            Ok(())
        }
        UserCmd::Delete { name, config } => {
            let cfg = Config::load(&config.config)?;
            let mut store = SqliteStore::open_existing(&cfg.store.path)?;
            store.delete_user(&name)?;
            println!("deleted {name}; a running daemon closes their doors within a second");
            Ok(())
        }
        UserCmd::Set { name, services, from, max_open, config } => {
            let cfg = Config::load(&config.config)?;
            for s in services.iter().filter(|s| *s != "all") {
                if cfg.service(s).is_none() {
                    bail!("--service {s:?} is not a [[service]] in {}", config.config.display());
                }
            }
            let parsed_from = from
                .iter()
                .filter(|f| *f != "any")
                .map(|f| f.parse::<Prefix>().map(|p| p.to_string()).map_err(|e| anyhow::anyhow!("--from {e}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            if max_open.is_some_and(|m| m > 86_400) {
                bail!("--max-open must be at most 86400 seconds (0: the service's time)");
            }
            let mut store = SqliteStore::open_existing(&cfg.store.path)?;
            let user = store
                .list_users()?
                .into_iter()
                .find(|u| u.name == name)
                .ok_or_else(|| crate::store::StoreError::NoSuchUser(name.clone()))?;
            let services =
                if services.is_empty() { user.services } else { services.into_iter().filter(|s| s != "all").collect() };
            let from = if from.is_empty() { user.from } else { parsed_from };
            let max_open = match max_open {
                None => user.max_open,
                Some(0) => None,
                Some(m) => Some(m),
            };
            store.set_policy(&name, &services, &from, max_open)?;
            println!(
                "{name}: services {}, from {}, longest door {}; open doors keep their time. \
                 The credential still lists the services it was made with: `user rekey` refreshes it.",
                list_or(&services, "all"),
                list_or(&from, "anywhere"),
                max_open.map_or("the service's".to_owned(), |m| format!("{m} s"))
            );
            Ok(())
        }
        UserCmd::Rekey { name, out, chain_len, server, config } => {
            let cfg = Config::load(&config.config)?;
            let mut store = SqliteStore::open_existing(&cfg.store.path)?;
            let services =
                store.list_users()?.into_iter().find(|u| u.name == name).map(|u| u.services).unwrap_or_default();
            enrol::rekey(&mut store, &zone_id(&cfg)?, &name, chain_len, server, openable(&cfg, &services), &out)?;
            println!("rekeyed {name}: {chain_len} knocks; credential written to {} (mode 0600)", out.display());
            Ok(())
        }
    }
}

/// What a credential records as openable: the user's services, or every configured one.
fn openable(cfg: &Config, services: &[String]) -> Vec<String> {
    if services.is_empty() { cfg.services.iter().map(|s| s.name.clone()).collect() } else { services.to_vec() }
}

fn list_or(v: &[String], empty: &str) -> String {
    if v.is_empty() { empty.to_owned() } else { v.join(",") }
}

fn knock(k: KnockArgs) -> anyhow::Result<()> {
    if k.via != "dns" {
        bail!("--via {}: only \"dns\" is available in this version", k.via);
    }
    let cred = Credential::load(&k.credential)?;
    let target = match (&k.server, &k.resolver, &cred.server) {
        (_, Some(r), _) if r == "system" => {
            Target::Resolver(client::system_resolver(std::path::Path::new("/etc/resolv.conf"))?)
        }
        (_, Some(r), _) => Target::Resolver(client::parse_endpoint(r)?),
        (Some(s), None, _) => Target::Server(client::parse_endpoint(s)?),
        (None, None, Some(s)) => Target::Server(client::parse_endpoint(s)?),
        _ => bail!("say where to knock: --server ADDR (the zone's nameserver) or --resolver ADDR"),
    };
    let ip: IpAddr = match k.ip.as_deref() {
        Some("auto") => auto_ip(&k, &cred)?,
        Some(s) => s.parse().with_context(|| format!("--ip {s:?} is not an IP address or \"auto\""))?,
        None => bail!(
            "--ip ADDR is required: the public address the door should admit (the one your connection will come from)"
        ),
    };
    let report = client::knock(
        &k.credential,
        &KnockRequest {
            target,
            ip,
            service: k.service.clone(),
            close: k.close,
            attempts: k.attempts,
            timeout: Duration::from_millis(1000),
            tcp: k.tcp,
        },
    )?;
    eprintln!(
        "knocked for {ip}: {} answer in {:.1} ms after {} attempt(s)",
        report.rcode,
        report.elapsed.as_secs_f64() * 1000.0,
        report.attempts
    );
    if let Some(addr) = k.wait {
        let waited = client::wait_for_door(addr, Duration::from_secs(3))
            .with_context(|| format!("{addr} did not accept a connection within 3 s of the knock"))?;
        eprintln!("door open: {addr} accepted a connection {:.1} ms after the answer", waited.as_secs_f64() * 1000.0);
    }
    if let Some((program, args)) = k.run.split_first() {
        use std::os::unix::process::CommandExt;
        let err = std::process::Command::new(program).args(args).exec();
        bail!("cannot run {program}: {err}");
    }
    Ok(())
}

/// `--ip auto`: ask the nameserver directly which address it sees.
fn auto_ip(k: &KnockArgs, cred: &Credential) -> anyhow::Result<IpAddr> {
    let server = k.server.as_ref().or(cred.server.as_ref()).ok_or_else(|| {
        anyhow::anyhow!(
            "--ip auto needs the nameserver's address (--server ADDR, or `server` in the credential) to ask it directly; \
             through a resolver it would see the resolver. Pass --ip YOUR.PUBLIC.IP instead"
        )
    })?;
    let addr = client::parse_endpoint(server)?;
    client::whoami(addr, cred, Duration::from_millis(1500))
        .with_context(|| format!("--ip auto: no trustworthy whoami answer from {addr}"))
}

/// `status`: the daemon (its firewall lock in this network namespace), users, doors.
/// Exits 3 when no daemon runs, as LSB `status` does.
fn status(cfg: &Config) -> anyhow::Result<()> {
    let doors = crate::doors::Doors::from_config(cfg);
    let running = match cfg.firewall.backend {
        crate::firewall::BackendKind::None => None,
        _ => Some(crate::server::claim_firewall(doors.backend_name()).is_err()),
    };
    match running {
        Some(true) => println!("daemon:  running ({} backend, in this network namespace)", doors.backend_name()),
        Some(false) => println!("daemon:  not running ({} backend, in this network namespace)", doors.backend_name()),
        None => println!("daemon:  unknown (backend none holds no lock)"),
    }
    let mut store = SqliteStore::open_existing(&cfg.store.path)?;
    let users = store.list_users()?;
    let revoked = users.iter().filter(|u| u.revoked).count();
    println!("users:   {} active, {revoked} revoked", users.len() - revoked);
    println!("doors:   {} open", store.live_doors(crate::clock::unix_now())?.len());
    if let Some(m) = &cfg.metrics {
        println!("metrics: http://{}/metrics", m.listen);
    }
    if running == Some(false) {
        std::process::exit(3);
    }
    Ok(())
}

/// `doors close`: close the records; without a running daemon, remove the kernel
/// doors here (the daemon's lock tells which).
fn close_doors(cfg: &Config, user: Option<&str>, address: Option<IpAddr>) -> anyhow::Result<()> {
    let mut store = SqliteStore::open_existing(&cfg.store.path)?;
    let closed = crate::doors::Doors::close_records(&mut store, user, address)?;
    let doors = crate::doors::Doors::from_config(cfg);
    let what = user.map_or_else(
        || format!("admitting {}", address.map(|a| a.to_string()).unwrap_or_default()),
        |u| format!("of {u}"),
    );
    if cfg.firewall.backend == crate::firewall::BackendKind::None {
        println!("closed {closed} door(s) {what}");
        return Ok(());
    }
    match crate::server::claim_firewall(doors.backend_name()) {
        Ok(_lock) => {
            let (_, removed) = doors.reconcile(&mut store)?;
            println!("closed {closed} door record(s) {what}; no daemon is running: removed {removed} kernel door(s)");
        }
        Err(_) => println!("closed {closed} door record(s) {what}; the running daemon removes them within a second"),
    }
    Ok(())
}

fn doors(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let mut store = SqliteStore::open_existing(&cfg.store.path)?;
    let view = crate::doors::Doors::from_config(cfg).view(&mut store)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    println!("{:<16} {:<26} {:<10} {:<9} {:>7}  {:<8} ONCE", "USER", "ADDRESS", "SERVICE", "PORT", "LEFT(s)", "VIA");
    for d in view {
        println!(
            "{:<16} {:<26} {:<10} {:<9} {:>7}  {:<8} {}",
            d.user.as_deref().unwrap_or("?"),
            format!("{}/{}", d.addr, d.prefix_len),
            d.service.as_deref().unwrap_or("?"),
            format!("{}/{}", d.proto, d.port),
            d.seconds_left,
            d.via.as_deref().unwrap_or("?"),
            if d.single_use { "yes" } else { "no" }
        );
    }
    Ok(())
}
