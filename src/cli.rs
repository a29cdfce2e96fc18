//! Command-line surface (the contract in ARCHITECTURE.md, "Operator surface"). Parsing with clap; each command is a small
//! function over the library. Nothing secret is ever written to stdout: user
//! enrolment writes its secrets only into the 0600 credential file.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::client::{self, KnockRequest, Target};
use crate::config::Config;
use crate::credential::Credential;
use crate::dns::Zone;
use crate::enrol::{self, UserSpec};
use crate::netaddr::Prefix;
use crate::profile::{self, Profile, ProfileFile};
use crate::store::SqliteStore;
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
    /// On a protected host: open the doors that knocks at any nameserver grant this
    /// host (`[agent] name`), from the shared PostgreSQL database. Runs no DNS.
    Agent(ConfigArg),
    /// Manage enrolled users.
    #[command(subcommand)]
    User(UserCmd),
    /// Maintain the database.
    #[command(subcommand)]
    Store(StoreCmd),
    /// Print the next one-time knock names (for dig, host, nslookup or a printed list).
    Otp {
        /// Profile whose credential to use (default: the profile file's `default`).
        #[arg(long)]
        profile: Option<String>,
        /// Credential file (default: the profile's).
        #[arg(long)]
        credential: Option<PathBuf>,
        /// How many names to print (1 to 1000), each usable once, in order.
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// Print *bound* names that open for this address (valid for the server's
        /// max age, 120 s by default) instead of plain ones.
        #[arg(long)]
        ip: Option<IpAddr>,
        /// With --ip: the service to open.
        #[arg(long, requires = "ip")]
        service: Option<String>,
        /// `dns` (names), `udp` (bound labels to send as one datagram each; needs
        /// --ip), `tcp` or `udp-seq` (port sequences, one per line).
        #[arg(long, default_value = "dns")]
        via: String,
        /// With --via tcp|udp-seq: the server's sequence range LO-HI (default: the credential's).
        #[arg(long)]
        port: Option<String>,
    },
    /// Send a knock.
    Knock(KnockArgs),
    /// Knock, get through the door and relay stdin/stdout over the connection:
    /// `ssh -o ProxyCommand="nxknock connect %h %p" HOST`.
    Connect(ConnectArgs),
    /// List open doors: user, address, service, time left, via (or `doors close`).
    #[command(args_conflicts_with_subcommands = true)]
    Doors {
        #[command(flatten)]
        config: ConfigArg,
        /// One JSON array, for scripts.
        #[arg(long)]
        json: bool,
        /// List the sources the block list holds (bad direct knocks) instead of doors.
        #[arg(long)]
        blocked: bool,
        #[command(subcommand)]
        action: Option<DoorsCmd>,
    },
    /// Is the daemon running here; how many users and open doors (exit 3 when not running).
    Status(ConfigArg),
    /// Remove nxknock's own firewall table/chain and sets (the daemon must be stopped).
    UninstallFirewall(ConfigArg),
    /// Run the whole story in throwaway network namespaces (root).
    Demo,
    /// Write manual pages (troff), one per command, into a directory.
    Man {
        /// Directory to write `nxknock.1`, `nxknock-knock.1`, … into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Print a shell completion script to stdout.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
pub enum DoorsCmd {
    /// Close a user's doors, or every door admitting an address, now. The running
    /// daemon removes them from the kernel within a fraction of a second.
    Close {
        /// Close this user's doors.
        #[arg(long, required_unless_present = "address", conflicts_with = "address")]
        user: Option<String>,
        /// Close every door admitting this address.
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
        /// The user's name (for the operator's eyes; never sent in a knock).
        name: String,
        /// Where to write the user's credential file (0600; never overwritten).
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
    /// List users: knocks used per chain, state, services, source networks.
    List(ConfigArg),
    /// Revoke a user: their knocks stop working and their open doors close.
    Revoke {
        /// The user to revoke.
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Remove a user for good, closing their doors (as revoke does); the name can be added again.
    Delete {
        /// The user to delete.
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Change a user's policy; what is not given stays. Their next knock obeys it.
    Set {
        /// The user to change.
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
        /// The user to rekey.
        name: String,
        /// Where to write the new credential file (0600; never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Knocks in the new chain before the next rekey is needed.
        #[arg(long, default_value_t = 10_000)]
        chain_len: u64,
        /// Nameserver address to record in the credential for `knock`.
        #[arg(long)]
        server: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// Where and how to knock: shared by `knock` and `connect`. Every value not given
/// here comes from the client profile (see [`crate::profile`]).
#[derive(Args, Debug, Clone)]
pub struct KnockOpts {
    /// Client profile to use (default: the `default` of the profile file,
    /// $XDG_CONFIG_HOME/nxknock/client.toml); flags override its values.
    #[arg(long)]
    pub profile: Option<String>,
    /// Credential file (default: the profile's).
    #[arg(long)]
    pub credential: Option<PathBuf>,
    /// Knock transport: `dns` (a query), `udp` (one datagram to the server's UDP
    /// knock port; needs --ip), `tcp` or `udp-seq` (a port sequence of SYNs or
    /// datagrams; opens for the address the server sees).
    #[arg(long, default_value = "dns")]
    pub via: String,
    /// With --via udp: the server's UDP knock port; with --via tcp|udp-seq: its
    /// sequence range LO-HI. Default: what the credential records.
    #[arg(long = "port", id = "knock_port", value_name = "PORT|LO-HI")]
    pub knock_port: Option<String>,
    /// Query this nameserver directly (HOST or HOST:PORT; a name or an address). With
    /// --resolver too, the knock goes through the resolver and the server is only
    /// asked for --ip auto.
    #[arg(long)]
    pub server: Option<String>,
    /// Query through this recursive resolver (HOST or HOST:PORT), or `system` for
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
    /// Attempts before giving up.
    #[arg(long, default_value_t = 3)]
    pub attempts: u32,
}

#[derive(Args, Debug)]
pub struct KnockArgs {
    #[command(flatten)]
    pub opts: KnockOpts,
    /// Close your open doors for this address instead of opening.
    #[arg(long)]
    pub close: bool,
    /// After the answer, retry a TCP connect to HOST:PORT quickly (up to 3 s) until
    /// the door admits it: closes the short race between the NXDOMAIN and the door.
    /// The test connection spends a single-use door; `connect` does not.
    #[arg(long, value_name = "HOST:PORT")]
    pub wait: Option<String>,
    /// Program to run after the knock (and --wait), e.g. `-- ssh user@host`; never a shell.
    #[arg(last = true)]
    pub run: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub opts: KnockOpts,
    /// Host to connect to after the knock (a name or an address; ssh's %h).
    pub host: String,
    /// TCP port to connect to (ssh's %p).
    pub port: u16,
}

/// How long `--wait` and `connect` retry the connection after the knock's answer.
const DOOR_WAIT: Duration = Duration::from_secs(3);

/// The process exit status for an error: a knock that reached nothing, the wrong
/// server or an unknown service says which (3, 4, 5, see [`client::KnockError`]);
/// a door that did not admit the connection after a good knock is 6; anything else 1.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if let Some(k) = e.downcast_ref::<client::KnockError>() {
        k.exit_code()
    } else if e.downcast_ref::<crate::connect::DoorShut>().is_some() {
        6
    } else {
        1
    }
}

/// An error and its causes on one line, each said once: our error types already
/// name their OS error, so a cause whose text is already in the line is skipped.
pub fn render_error(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}

impl Cli {
    /// The log format: `--log-format`, else for `serve` and `agent` the config's `[log] format`
    /// (a config that does not load is reported by `serve` itself), else text.
    pub fn log_format(&self) -> crate::config::LogFormat {
        if let Some(f) = self.log_format {
            return f;
        }
        match &self.command {
            Command::Serve(c) => Config::load(&c.config).map(|c| c.log.format).unwrap_or_default(),
            Command::Agent(c) => crate::agent::AgentFile::load(&c.config).map(|c| c.log.format).unwrap_or_default(),
            _ => crate::config::LogFormat::default(),
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(c) => crate::server::serve(&c.config),
        Command::Agent(c) => crate::agent::run(&c.config),
        Command::CheckConfig(c) => check_config(&c.config),
        Command::User(u) => user(u),
        Command::Store(StoreCmd::Upgrade(c)) => {
            let cfg = Config::load(&c.config)?;
            if let Some(url) = &cfg.store.url {
                let (before, after) = crate::store::PgStore::upgrade(url)?;
                if before == after {
                    println!("{}: schema {after} is current; nothing to do", url.redacted());
                } else {
                    println!("{}: schema {before} -> {after}", url.redacted());
                }
                return Ok(());
            }
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
        Command::Otp { profile, credential, count, ip, service, via, port } => {
            if count == 0 || count > 1000 {
                bail!("--count must be between 1 and 1000");
            }
            let needed = credential.is_none();
            let credential = match (credential, client_profile(profile.as_deref(), needed)?) {
                (Some(c), _) => c,
                (None, Some((p, path))) => profile_credential(p, &path)?,
                (None, None) => unreachable!("client_profile returns a profile when it is needed"),
            };
            if let Some(how) = crate::direct::Direct::parse(&via)? {
                return otp_direct(&credential, count, ip, service.as_deref(), how, port.as_deref());
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
        Command::Connect(c) => connect(c),
        Command::Doors { action: Some(DoorsCmd::Close { user, address, config }), .. } => {
            close_doors(&Config::load(&config.config)?, user.as_deref(), address)
        }
        Command::Doors { config, json, blocked: false, action: None } => doors(&Config::load(&config.config)?, json),
        Command::Doors { config, json, blocked: true, action: None } => blocked(&Config::load(&config.config)?, json),
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
        Command::Man { out } => {
            std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
            clap_mangen::generate_to(Cli::command(), &out)
                .with_context(|| format!("write pages to {}", out.display()))?;
            eprintln!("manual pages written to {}", out.display());
            Ok(())
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "nxknock", &mut std::io::stdout());
            Ok(())
        }
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
            let mut store = crate::store::open(&cfg.store)?;
            let enrol = enrol::add(store.as_mut(), &zone_id(&cfg)?, &spec, &out)?;
            println!(
                "added user {name}: {chain_len} knocks, services {}, from {}; credential written to {} (mode 0600)",
                list_or(&enrol.services, "all"),
                list_or(&enrol.from, "anywhere"),
                out.display()
            );
            record_knock_ports(&cfg, &out)
        }
        UserCmd::List(c) => {
            let cfg = Config::load(&c.config)?;
            let mut store = crate::store::open_existing(&cfg.store)?;
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
            let mut store = crate::store::open_existing(&cfg.store)?;
            if store.revoke(&name)? {
                println!("revoked {name}");
            } else {
                println!("{name} was already revoked");
            }
            Ok(())
        }
        UserCmd::Delete { name, config } => {
            let cfg = Config::load(&config.config)?;
            let mut store = crate::store::open_existing(&cfg.store)?;
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
            let mut store = crate::store::open_existing(&cfg.store)?;
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
            let mut store = crate::store::open_existing(&cfg.store)?;
            let services =
                store.list_users()?.into_iter().find(|u| u.name == name).map(|u| u.services).unwrap_or_default();
            enrol::rekey(store.as_mut(), &zone_id(&cfg)?, &name, chain_len, server, openable(&cfg, &services), &out)?;
            println!("rekeyed {name}: {chain_len} knocks; credential written to {} (mode 0600)", out.display());
            record_knock_ports(&cfg, &out)
        }
    }
}

/// The capture listener's ports go into the credential, so `knock --via udp|tcp`
/// needs no `--port`.
fn record_knock_ports(cfg: &Config, out: &std::path::Path) -> anyhow::Result<()> {
    let Some(p) = &cfg.pcap else { return Ok(()) };
    let mut cred = Credential::load(out)?;
    cred.udp_port = p.udp_port;
    cred.sequence_ports = p.sequence_ports.clone();
    cred.save(out)?;
    Ok(())
}

/// What a credential records as openable: the user's services, or every configured one.
fn openable(cfg: &Config, services: &[String]) -> Vec<String> {
    if services.is_empty() { cfg.services.iter().map(|s| s.name.clone()).collect() } else { services.to_vec() }
}

fn list_or(v: &[String], empty: &str) -> String {
    if v.is_empty() { empty.to_owned() } else { v.join(",") }
}

/// `otp --via udp|tcp|udp-seq`: what to send by hand (payloads or port lists).
fn otp_direct(
    credential: &std::path::Path,
    count: u64,
    ip: Option<IpAddr>,
    service: Option<&str>,
    how: crate::direct::Direct,
    port: Option<&str>,
) -> anyhow::Result<()> {
    use crate::direct::{self, Direct};
    let mut cred = Credential::load(credential)?;
    if how == Direct::Udp {
        let Some(ip) = ip else { bail!("--via udp prints bound labels: --ip ADDR (the address to admit) is required") };
        let port = direct::udp_port(&cred, port)?;
        for name in client::otp_bound(credential, count, ip, service)? {
            println!("{}", direct::label_of(&name));
        }
        eprintln!(
            "send each line as one datagram: printf %s LABEL > /dev/udp/HOST/{port}  (or: echo LABEL | socat - UDP:HOST:{port})"
        );
        return Ok(());
    }
    if ip.is_some() {
        bail!("port sequences open for the address the server sees; --ip does not apply");
    }
    let code = direct::sequence_code(&cred, port)?;
    for ports in direct::next_sequences(&mut cred, credential, &code, count)? {
        println!("{}", ports.iter().map(u16::to_string).collect::<Vec<_>>().join(" "));
    }
    match how {
        Direct::TcpSequence => eprintln!(
            "knock each line in order: for p in LINE; do (exec 3<>/dev/tcp/HOST/$p) 2>/dev/null; done  (or: nc -z -w1 HOST $p)"
        ),
        _ => eprintln!("knock each line in order: for p in LINE; do printf '' > /dev/udp/HOST/$p; done"),
    }
    Ok(())
}

/// `--via udp|tcp|udp-seq`: straight to the host (the capture listener). Returns
/// what to tell the user.
fn send_direct(o: &KnockOpts, plan: &KnockPlan, close: bool, how: crate::direct::Direct) -> anyhow::Result<String> {
    use crate::direct::{self, Direct};
    let mut cred = Credential::load(&plan.credential)?;
    let server = plan.server.as_ref().or(cred.server.as_ref()).context("--server HOST: the host to knock at")?;
    let server = client::parse_endpoint(server).context("--server")?.ip();
    if how == Direct::Udp {
        let ip: IpAddr = match plan.ip.as_deref() {
            Some(s) => s.parse().with_context(|| format!("--ip {s:?} is not an IP address"))?,
            None => bail!("--via udp sends a bound knock: --ip ADDR (the address the door should admit) is required"),
        };
        let port = direct::udp_port(&cred, o.knock_port.as_deref())?;
        client::with_bound_name(&plan.credential, ip, plan.service.as_deref(), close, |name| {
            direct::send_udp(server, port, direct::label_of(name))
        })?;
        return Ok(format!("knocked for {ip}: one datagram to {server} port {port}"));
    }
    if close || plan.service.is_some() || plan.ip.is_some() {
        bail!("port sequences carry a plain element: no --close, --service or --ip (use --via udp or dns for those)");
    }
    let code = direct::sequence_code(&cred, o.knock_port.as_deref())?;
    let ports = direct::next_sequences(&mut cred, &plan.credential, &code, 1)?.remove(0);
    direct::send_sequence(server, &ports, how)?;
    Ok(format!("knocked: {} packets to {server} ports {}-{}", ports.len(), code.range().0, code.range().1))
}

/// The knock options with the profile filled in: flags win, then the profile.
struct KnockPlan {
    credential: PathBuf,
    server: Option<String>,
    resolver: Option<String>,
    ip: Option<String>,
    service: Option<String>,
}

/// The client profile when one is asked for (`--profile`) or `needed` (no
/// `--credential`), with the file it came from; `None` when neither.
fn client_profile(name: Option<&str>, needed: bool) -> anyhow::Result<Option<(Profile, PathBuf)>> {
    if name.is_none() && !needed {
        return Ok(None);
    }
    let path = profile::default_path()?;
    if name.is_none() && !path.exists() {
        bail!(
            "no --credential given and no client profile file {p}: pass --credential FILE, or write {p} \
             (mode 0600) with `default = \"NAME\"` and a [profile.NAME] table with `credential = \"FILE\"`",
            p = path.display()
        );
    }
    let file = ProfileFile::load(&path)?;
    Ok(Some((file.select(&path, name)?.clone(), path)))
}

fn profile_credential(p: Profile, path: &std::path::Path) -> anyhow::Result<PathBuf> {
    p.credential.ok_or_else(|| {
        anyhow::anyhow!("no --credential given and the profile in {} has no `credential = \"FILE\"`", path.display())
    })
}

impl KnockPlan {
    fn new(o: &KnockOpts) -> anyhow::Result<KnockPlan> {
        let Some((p, path)) = client_profile(o.profile.as_deref(), o.credential.is_none())? else {
            let credential = o.credential.clone().expect("a profile is needed without --credential");
            return Ok(KnockPlan {
                credential,
                server: o.server.clone(),
                resolver: o.resolver.clone(),
                ip: o.ip.clone(),
                service: o.service.clone(),
            });
        };
        let pick = |flag: &Option<String>, from_profile: &Option<String>| flag.clone().or_else(|| from_profile.clone());
        Ok(KnockPlan {
            server: pick(&o.server, &p.server),
            resolver: pick(&o.resolver, &p.resolver),
            ip: pick(&o.ip, &p.ip),
            service: pick(&o.service, &p.service),
            credential: match &o.credential {
                Some(c) => c.clone(),
                None => profile_credential(p, &path)?,
            },
        })
    }
}

/// Send the knock `o` and `plan` describe. Returns the address the door admits and the report.
fn send_knock(o: &KnockOpts, plan: &KnockPlan, close: bool) -> anyhow::Result<(IpAddr, client::KnockReport)> {
    let cred = Credential::load(&plan.credential)?;
    let target = match (&plan.server, &plan.resolver, &cred.server) {
        (_, Some(r), _) if r == "system" => {
            Target::Resolver(client::system_resolver(std::path::Path::new("/etc/resolv.conf"))?)
        }
        (_, Some(r), _) => Target::Resolver(client::parse_endpoint(r).context("--resolver")?),
        (Some(s), None, _) => Target::Server(client::parse_endpoint(s).context("--server")?),
        (None, None, Some(s)) => Target::Server(
            client::parse_endpoint(s).with_context(|| format!("`server` in {}", plan.credential.display()))?,
        ),
        _ => bail!("say where to knock: --server HOST (the zone's nameserver) or --resolver HOST"),
    };
    let ip: IpAddr = match plan.ip.as_deref() {
        Some("auto") => auto_ip(plan.server.as_ref(), &cred)?,
        Some(s) => s.parse().with_context(|| format!("--ip {s:?} is not an IP address or \"auto\""))?,
        None => bail!(
            "--ip ADDR is required: the public address the door should admit (the one your connection will come from)"
        ),
    };
    let report = client::knock(
        &plan.credential,
        &KnockRequest {
            target,
            ip,
            service: plan.service.clone(),
            close,
            attempts: o.attempts,
            timeout: Duration::from_millis(1000),
            tcp: o.tcp,
        },
    )?;
    Ok((ip, report))
}

fn knock(k: KnockArgs) -> anyhow::Result<()> {
    let plan = KnockPlan::new(&k.opts)?;
    // Resolve --wait before knocking: a name that does not resolve spends no element.
    let wait = k.wait.as_deref().map(|w| client::resolve_endpoint(w, None).context("--wait")).transpose()?;
    if let Some(how) = crate::direct::Direct::parse(&k.opts.via)? {
        eprintln!("{}", send_direct(&k.opts, &plan, k.close, how)?);
    } else {
        let (ip, report) = send_knock(&k.opts, &plan, k.close)?;
        eprintln!(
            "knocked for {ip}: {} answer in {:.1} ms after {} attempt(s)",
            report.rcode,
            report.elapsed.as_secs_f64() * 1000.0,
            report.attempts
        );
    }
    if let Some(addrs) = wait {
        let (conn, waited) = crate::connect::open_door(&addrs, DOOR_WAIT)?;
        let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        eprintln!("door open: {peer} accepted a connection {:.1} ms after the answer", waited.as_secs_f64() * 1000.0);
    }
    if let Some((program, args)) = k.run.split_first() {
        use std::os::unix::process::CommandExt;
        let err = std::process::Command::new(program).args(args).exec();
        bail!("cannot run {program}: {err}");
    }
    Ok(())
}

/// `connect`: knock, get through the door, relay stdin/stdout. Quiet on success
/// (ssh shows a ProxyCommand's stderr); stdout carries only the relayed bytes.
fn connect(c: ConnectArgs) -> anyhow::Result<()> {
    let plan = KnockPlan::new(&c.opts)?;
    // Resolve the host before knocking: a name that does not resolve spends no element.
    let addrs = client::resolve_host(&c.host, c.port)?;
    let ip = match crate::direct::Direct::parse(&c.opts.via)? {
        Some(how) => {
            let said = send_direct(&c.opts, &plan, false, how)?;
            tracing::debug!(said, "knocked");
            plan.ip.as_deref().and_then(|i| i.parse::<IpAddr>().ok())
        }
        None => {
            let (ip, report) = send_knock(&c.opts, &plan, false)?;
            tracing::debug!(%ip, rcode = %report.rcode, attempts = report.attempts, "knocked");
            Some(ip)
        }
    };
    // The door admits `ip`: connect over its address family when the host has one.
    let same: Vec<SocketAddr> =
        addrs.iter().copied().filter(|a| ip.is_none_or(|ip| a.is_ipv4() == ip.is_ipv4())).collect();
    let addrs = if same.is_empty() { addrs } else { same };
    let (conn, waited) = crate::connect::open_door(&addrs, DOOR_WAIT)?;
    tracing::debug!(peer = ?conn.peer_addr().ok(), waited_ms = waited.as_millis() as u64, "door open");
    crate::connect::relay(conn, std::io::stdin(), stdout_file()).context("relay")
}

/// Standard output as a file this process owns, so that the relay can close it
/// when the server closes (ssh reads that end of file as the connection's end).
fn stdout_file() -> std::fs::File {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    let _ = std::io::stdout().flush();
    // SAFETY: fd 1 is open for the life of the process, and after this point
    // nothing in `connect` writes to stdout except through this File (all
    // diagnostics go to stderr), so closing it here cannot pull it from under
    // another user.
    unsafe { std::fs::File::from_raw_fd(1) }
}

/// `--ip auto`: ask the nameserver directly which address it sees.
fn auto_ip(server: Option<&String>, cred: &Credential) -> anyhow::Result<IpAddr> {
    let server = server.or(cred.server.as_ref()).ok_or_else(|| {
        anyhow::anyhow!(
            "--ip auto needs the nameserver's address (--server HOST, or `server` in the credential) to ask it \
             directly; through a resolver it would see the resolver. Pass --ip YOUR.PUBLIC.IP instead"
        )
    })?;
    let addr = client::parse_endpoint(server)?;
    client::whoami(addr, cred, Duration::from_millis(1500))
        .with_context(|| format!("--ip auto: no trustworthy whoami answer from {addr}"))
}

/// The kernel's block list: what the guard drops at the knock ports.
fn blocked(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let list = crate::doors::Doors::from_config(cfg).blocked()?;
    if json {
        let rows: Vec<serde_json::Value> = list
            .iter()
            .map(|(p, left)| serde_json::json!({ "source": p.to_string(), "seconds_left": left.as_secs() }))
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("{:<44} {:>7}", "BLOCKED SOURCE", "LEFT(s)");
    for (p, left) in list {
        println!("{:<44} {:>7}", p.to_string(), left.as_secs());
    }
    Ok(())
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
    let mut store = crate::store::open_existing(&cfg.store)?;
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
    let mut store = crate::store::open_existing(&cfg.store)?;
    let closed = crate::doors::Doors::close_records(store.as_mut(), user, address)?;
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
            let (_, removed) = doors.reconcile(store.as_mut())?;
            println!("closed {closed} door record(s) {what}; no daemon is running: removed {removed} kernel door(s)");
        }
        Err(_) => println!("closed {closed} door record(s) {what}; the running daemon removes them within a second"),
    }
    Ok(())
}

fn doors(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let mut store = crate::store::open_existing(&cfg.store)?;
    let view = crate::doors::Doors::from_config(cfg).view(store.as_mut())?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command and every argument says what it is for: `--help`, the man
    /// pages and the shell completions are all generated from these strings.
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                let sub_path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(sub_path.clone());
                }
                walk(sub, &sub_path, missing);
            }
        }
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "nxknock", &mut missing);
        assert!(missing.is_empty(), "no help text for: {}", missing.join(", "));
    }

    #[test]
    fn knock_and_connect_share_their_options() {
        let knock = Cli::try_parse_from(["nxknock", "knock", "--profile", "w", "--ip", "auto", "--close"]).unwrap();
        let Command::Knock(k) = knock.command else { panic!("knock") };
        assert_eq!((k.opts.profile.as_deref(), k.opts.ip.as_deref(), k.close), (Some("w"), Some("auto"), true));
        let c = Cli::try_parse_from(["nxknock", "connect", "--credential", "c", "--server", "ns1", "h.example", "22"])
            .unwrap();
        let Command::Connect(c) = c.command else { panic!("connect") };
        assert_eq!((c.host.as_str(), c.port, c.opts.server.as_deref()), ("h.example", 22, Some("ns1")));
        // `connect` only knocks to open: it has no --close, --wait or program to run.
        assert!(Cli::try_parse_from(["nxknock", "connect", "--close", "h", "22"]).is_err());
    }
}
