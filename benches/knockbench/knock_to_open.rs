//! Section 2, `latency`: knock-to-open, from the knock's first packet leaving
//! the client (kernel timestamp, see `sniffer`) to the first TCP connect that
//! succeeds: nxknock bound direct, dig plain, bound via unbound, and the capture
//! listener's UDP datagram (`--via udp`) and TCP port sequence (`--via tcp`);
//! fwknop; knockd.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use nxknock::firewall::BackendKind;
use nxknock::lab::interrupt;

use crate::exec::{CLIENT_CPU, SERVER_CPU, now_ns, pin, run_in, unpin, wait_bounded};
use crate::peers::{FWKNOP_PORT, KNOCKD_PORTS};
use crate::report::fmt_ms;
use crate::sniffer::{Probe, Sniffer};
use crate::stats::summarize;
use crate::users::otp;
use crate::{BIN, Bench, CLIENT, PCAP_SEQUENCE_PORTS, PCAP_UDP_PORT, RESOLVER, SERVER, SSH_PORT};

/// The probe's step before the knock has left: a new connect every 0.25 ms.
const CONNECT_EACH: Duration = Duration::from_micros(250);
/// The probe's step once the knock is on the wire (the sniffer has seen a packet
/// of the client's): the resolution of the figure.
const CONNECT_FINE: Duration = Duration::from_micros(50);

impl Bench {
    pub(crate) fn latency(&mut self) -> Result<()> {
        // Client side on one CPU, server side on the other (`exec::SERVER_CPU`).
        pin(0, CLIENT_CPU);
        let out = self.latency_pinned();
        unpin();
        out
    }

    fn latency_pinned(&mut self) -> Result<()> {
        let trials = self.opts.trials;
        let _door = self.srv().tcp_listen(SocketAddr::new(SERVER.into(), SSH_PORT))?;
        let door = _door.try_clone()?;
        std::thread::spawn(move || accept_and_drop(door));
        let sniffer = Sniffer::open(self.cli())?;
        let mut rows: Vec<(String, Vec<Trial>, String)> = Vec::new();
        #[allow(clippy::type_complexity)]
        // nxknock: nftables backend and the capture listener (`[pcap]`: its own thread,
        // a BPF filter that lets no DNS packet through), one user per method so each
        // method has its own chain. `user add` records the capture ports in the credential.
        let db = self.dir.join("lat.db");
        let cfg = self.nx_config_pcap("lat", &db)?;
        let alice = self.user_add(&cfg, "alice")?;
        let bob = self.user_add(&cfg, "bob")?;
        let carol = self.user_add(&cfg, "carol")?;
        let dave = self.user_add(&cfg, "dave")?;
        let erin = self.user_add(&cfg, "erin")?;
        let names = otp(&bob, trials)?;
        let mut nx = self.start_nxknock(&cfg, "nxknock-lat.log", &[])?;
        let unbound = self.start_unbound()?;
        pin(nx.pid(), SERVER_CPU);
        pin(unbound.pid(), SERVER_CPU);
        let flush_nft = || {
            run_in(self.srv(), &["nft", "flush", "set", "inet", "nxknock", "doors4"], Duration::from_secs(5)).map(drop)
        };
        let server53 = Probe::udp(SERVER, 53);
        type Method<'a> = (&'a str, Box<dyn Fn(usize) -> Command + Sync + 'a>, Probe, &'a str);
        let dns_methods: Vec<Method<'_>> = vec![
            (
                "nxknock knock (bound, direct)",
                Box::new(|_| {
                    let mut c = Command::new(BIN);
                    c.args([
                        "knock",
                        "--credential",
                        alice.to_str().unwrap(),
                        "--server",
                        &SERVER.to_string(),
                        "--ip",
                        &CLIENT.to_string(),
                    ]);
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
                    c.args([
                        "knock",
                        "--credential",
                        carol.to_str().unwrap(),
                        "--resolver",
                        &RESOLVER.to_string(),
                        "--ip",
                        &CLIENT.to_string(),
                    ]);
                    c
                }),
                Probe::udp(RESOLVER, 53),
                "`nxknock knock --resolver 198.18.0.4 --ip 198.18.0.2` (unbound 1.17, stub-zone)",
            ),
        ];
        // The capture listener: one datagram to the UDP knock port (a bound label, as
        // over DNS), and a plain element as a sequence of SYNs to the sequence range
        // (the first SYN's port changes with every knock, so the probe takes the range).
        let sequence = nxknock::token::SequenceCode::parse(PCAP_SEQUENCE_PORTS)?;
        let seq_how = format!(
            "`nxknock knock --server 198.18.0.1 --via tcp` ({} SYNs to ports {PCAP_SEQUENCE_PORTS})",
            sequence.len()
        );
        let udp_how = format!("`nxknock knock --server 198.18.0.1 --via udp --ip 198.18.0.2` (UDP {PCAP_UDP_PORT})");
        let capture_methods: Vec<Method<'_>> = vec![
            (
                "nxknock knock --via udp",
                Box::new(|_| {
                    let mut c = Command::new(BIN);
                    c.args([
                        "knock",
                        "--credential",
                        dave.to_str().unwrap(),
                        "--server",
                        &SERVER.to_string(),
                        "--via",
                        "udp",
                        "--ip",
                        &CLIENT.to_string(),
                    ]);
                    c
                }),
                Probe::udp(SERVER, PCAP_UDP_PORT),
                &udp_how,
            ),
            (
                "nxknock knock --via tcp",
                Box::new(|_| {
                    let mut c = Command::new(BIN);
                    c.args(["knock", "--credential", erin.to_str().unwrap(), "--server", &SERVER.to_string()]);
                    c.args(["--via", "tcp"]);
                    c
                }),
                Probe::tcp_range(SERVER, sequence.range()).of(sequence.len()),
                &seq_how,
            ),
        ];
        for (label, cmd, pkt, how) in &dns_methods {
            let v = self.trials(&sniffer, trials, &flush_nft, cmd, *pkt)?;
            eprintln!("  {label}: {}", brief(&v));
            rows.push((label.to_string(), v, how.to_string()));
        }
        // The daemon's own view of the DNS knocks: `latency_us` on each "door opened"
        // line runs from the knock packet's receipt to the door being in the kernel;
        // `firewall_us` is the backend's share. Set beside the outside probe, they must
        // tell the same story. (Taken before the capture rows: a sequence's `latency_us`
        // starts at its last packet, the probe at its first.)
        let log = nx.log_text();
        let probe: Vec<f64> = rows.iter().flat_map(|(_, v, _)| v.iter().filter_map(|t| t.packet_ms)).collect();
        for (label, cmd, pkt, how) in &capture_methods {
            let v = self.trials(&sniffer, trials, &flush_nft, cmd, *pkt)?;
            eprintln!("  {label}: {}", brief(&v));
            rows.push((label.to_string(), v, how.to_string()));
        }
        let (_, nx_hwm) = nx.memory();
        let field = |name: &str| -> Vec<f64> {
            log.lines()
                .filter(|l| l.contains("door opened"))
                .filter_map(|l| l.split(&format!("{name}=")).nth(1)?.split_whitespace().next()?.parse::<f64>().ok())
                .map(|us| us / 1000.0)
                .collect()
        };
        let (inside, fw) = (summarize(&field("latency_us")), summarize(&field("firewall_us")));
        let verified = summarize(&field("verified_us"));
        let probe = summarize(&probe);
        self.notes.push(format!(
            "nxknock's own log, the same {n} DNS knocks: `latency_us` (packet received → door in the kernel) p50 {} p99 {}; \
             `verified_us` (→ the verifier's committed decision) p50 {} p99 {}; `firewall_us` (the netlink door) \
             p50 {} p99 {}; the outside probe (packet sent → first connect that succeeds, the three nxknock DNS methods) \
             p50 {} p99 {}.",
            fmt_ms(inside.p50),
            fmt_ms(inside.p99),
            fmt_ms(verified.p50),
            fmt_ms(verified.p99),
            fmt_ms(fw.p50),
            fmt_ms(fw.p99),
            fmt_ms(probe.p50),
            fmt_ms(probe.p99),
            n = field("latency_us").len(),
        ));
        nx.stop();
        drop(unbound);
        self.notes.push(format!(
            "nxknock peak resident memory during the latency trials: {:.1} MiB.",
            nx_hwm as f64 / 1024.0
        ));
        // The same bound direct knock with the PostgreSQL store beside SQLite: a local
        // cluster (initdb/pg_ctl as the postgres user) reached over its Unix socket, so
        // the row differs from the first only in the store's commits.
        let pg_row = {
            let flush = || {
                run_in(self.srv(), &["nft", "flush", "set", "inet", "nxknock", "doors4"], Duration::from_secs(5))
                    .map(drop)
            };
            self.latency_postgres(&sniffer, trials, &flush)
        };
        match pg_row {
            Ok(v) => {
                eprintln!("  nxknock knock (bound, direct), PostgreSQL store: {}", brief(&v));
                rows.insert(
                    1,
                    (
                        "nxknock knock (bound, direct), PostgreSQL store".into(),
                        v,
                        "as the first row, `[store] url` = a local PostgreSQL over its Unix socket".into(),
                    ),
                );
            }
            Err(e) => self.notes.push(format!("PostgreSQL knock-to-open row skipped: {e:#}")),
        }
        let out = run_in(
            self.srv(),
            &[BIN, "uninstall-firewall", "--config", cfg.to_str().unwrap()],
            Duration::from_secs(10),
        );
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
            pin(fw.0.pid(), SERVER_CPU);
            let (k, h) = fw.1.clone();
            let rc = self.dir.join("fwknop/fwknoprc");
            let fwknop = |_| {
                let mut c = Command::new("fwknop");
                // fwknop writes ~/.fwknoprc and ~/.fwknop.run whatever it is told: keep them in the lab dir.
                c.env("HOME", rc.parent().unwrap());
                c.args([
                    "-A",
                    "tcp/22",
                    "-a",
                    &CLIENT.to_string(),
                    "-D",
                    &SERVER.to_string(),
                    "--key-base64-rijndael",
                    &k,
                    "--key-base64-hmac",
                    &h,
                    "--use-hmac",
                    "--rc-file",
                    rc.to_str().unwrap(),
                    "--no-save-args",
                ]);
                c
            };
            let v = self.trials(&sniffer, trials, &flush_kb, fwknop, Probe::udp(SERVER, FWKNOP_PORT))?;
            eprintln!("  fwknop: {}", brief(&v));
            rows.push((
                "fwknop SPA (fwknopd defaults, pcap)".into(),
                v,
                "`fwknop -A tcp/22 -a 198.18.0.2 -D 198.18.0.1 --use-hmac …`".into(),
            ));
        }
        // knockd: three-port TCP SYN sequence.
        {
            let _kd = self.start_knockd()?;
            pin(_kd.pid(), SERVER_CPU);
            let knock = |_| {
                let mut c = Command::new("knock");
                c.arg(SERVER.to_string()).args(KNOCKD_PORTS.map(|p| p.to_string()));
                c
            };
            let v = self.trials(
                &sniffer,
                trials,
                &flush_kb,
                knock,
                Probe::tcp(SERVER, KNOCKD_PORTS[0]).of(KNOCKD_PORTS.len()),
            )?;
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
             a new connect starts every 0.25 ms until the knock's last packet is on the wire, then every 0.05 ms (the \
             figure's resolution; it includes the handshake's round trip), for up to 2 s; attempts overlap, each waiting \
             up to 2 ms for its SYN-ACK. Between trials the \
             door is removed (`nft flush set`, `iptables -F`), so every trial starts closed. \"from command start\" \
             adds the client program's own start-up.\n\n\
             | method | opened | p50 | p99 | mean | max | p50 from command start | p99 from command start | command |\n|---|---:|---:|---:|---:|---:|---:|---:|---|\n"
        );
        for (label, v, how) in &rows {
            let ok: Vec<f64> = v.iter().filter_map(|t| t.packet_ms).collect();
            let cmd: Vec<f64> = v.iter().filter_map(|t| t.command_ms).collect();
            let s = summarize(&ok);
            let c = summarize(&cmd);
            let _ = writeln!(
                t,
                "| {label} | {}/{} | {} | {} | {} | {} | {} | {} | {how} |",
                ok.len(),
                v.len(),
                fmt_ms(s.p50),
                fmt_ms(s.p99),
                fmt_ms(s.mean),
                fmt_ms(s.max),
                fmt_ms(c.p50),
                fmt_ms(c.p99)
            );
            self.cdf.insert(label.clone(), (ok, v.len()));
        }
        let _ = write!(
            t,
            "\nThe `--via udp` and `--via tcp` rows go to nxknock's capture listener (`[pcap] udp_port = \
             {PCAP_UDP_PORT}, sequence_ports = \"{PCAP_SEQUENCE_PORTS}\"`, the same daemon as the rows above): \"from \
             the knock packet\" is the UDP datagram to port {PCAP_UDP_PORT}, or the first SYN of the sequence (the door \
             opens only once the last one is in, so the sequence's own sending time is part of the figure, as with \
             knockd's three ports).\n\
             A plain knock through a resolver opens for the resolver's address (by design), so plain via unbound is not a \
             knock-to-open path for the client and has no row.\n\n",
        );
        eprint!("{t}");
        self.report.push_str(&t);
        Ok(())
    }

    /// Knock-to-open trials of `nxknock knock` (bound, direct) on a daemon whose store
    /// is a throwaway PostgreSQL cluster.
    fn latency_postgres(&self, sniffer: &Sniffer, trials: usize, close: &dyn Fn() -> Result<()>) -> Result<Vec<Trial>> {
        let pg = nxknock::lab::postgres::Postgres::start("kb-lat", None)?;
        if let Some(pid) = pg.pid() {
            pin(pid, SERVER_CPU); // before its backends fork: they inherit it
        }
        let cfg = self.dir.join("lat-pg.toml");
        nxknock::lab::config::ConfigBuilder::new(BackendKind::Nftables).store_url(&pg.url()).write(&cfg)?;
        let frank = self.user_add(&cfg, "frank")?;
        let mut nx = self.start_nxknock(&cfg, "nxknock-lat-pg.log", &[])?;
        pin(nx.pid(), SERVER_CPU);
        let cmd = |_| {
            let mut c = Command::new(BIN);
            c.args(["knock", "--credential", frank.to_str().unwrap(), "--server", &SERVER.to_string()]);
            c.args(["--ip", &CLIENT.to_string()]);
            c
        };
        let v = self.trials(sniffer, trials, close, cmd, Probe::udp(SERVER, 53));
        nx.stop();
        v
    }

    /// `n` trials of `cmd(i)`, each after `close()` so every one starts with the door closed.
    fn trials(
        &self,
        sniffer: &Sniffer,
        n: usize,
        close: &dyn Fn() -> Result<()>,
        cmd: impl Fn(usize) -> Command + Sync,
        pkt: Probe,
    ) -> Result<Vec<Trial>> {
        let mut v = Vec::new();
        for i in 0..n {
            interrupt::check()?;
            close()?;
            v.push(self.trial(sniffer, || cmd(i), pkt)?);
        }
        Ok(v)
    }

    /// One knock trial: run the client in the client namespace, then connect until open.
    pub(crate) fn trial(&self, sniffer: &Sniffer, cmd: impl Fn() -> Command + Sync, pkt: Probe) -> Result<Trial> {
        let target = SocketAddr::new(SERVER.into(), SSH_PORT);
        let (t0, done, ok) = self.cli().enter(|| -> Result<(i128, i128, Option<i128>)> {
            let t0 = now_ns();
            let mut c = cmd();
            let mut child = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
            let seen = sniffer.seen();
            let knock_out = || sniffer.seen() >= seen + pkt.packets;
            let ok = connect_until_open(target, CONNECT_EACH, CONNECT_FINE, Duration::from_secs(2), knock_out);
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
}

#[derive(Debug)]
pub(crate) struct Trial {
    /// Knock packet on the wire → connect succeeded (ms); None if it never opened.
    pub(crate) packet_ms: Option<f64>,
    /// Client command started → connect succeeded (ms).
    pub(crate) command_ms: Option<f64>,
    pub(crate) packet_seen: bool,
}

pub(crate) fn brief(v: &[Trial]) -> String {
    let ok: Vec<f64> = v.iter().filter_map(|t| t.packet_ms).collect();
    let s = summarize(&ok);
    let unseen = v.iter().filter(|t| !t.packet_seen).count();
    format!(
        "{}/{} opened, p50 {}, p99 {}{}",
        ok.len(),
        v.len(),
        fmt_ms(s.p50),
        fmt_ms(s.p99),
        if unseen > 0 { format!(", {unseen} knocks not captured") } else { String::new() }
    )
}

/// Connect attempts until one succeeds (or `total` passes); returns when it
/// succeeded (ns since the epoch). A new attempt starts every `each` while
/// `knock_out()` is false (the knock's last packet has not left: the door
/// cannot be open yet, and the client program should not share its CPU with a
/// busy probe while it starts and sends), then every `fine`. Attempts overlap: each stays open for
/// [`ATTEMPT_LIVES`] and any of them may be the one answered, so a SYN-ACK that
/// is slow to arrive is not thrown away. The figure's resolution is thus `fine`
/// plus the handshake's round trip, which it includes.
pub(crate) fn connect_until_open(
    target: SocketAddr,
    each: Duration,
    fine: Duration,
    total: Duration,
    knock_out: impl Fn() -> bool,
) -> Option<i128> {
    use std::os::fd::AsRawFd;
    let _rt = Realtime::now();
    let t0 = Instant::now();
    let mut pending: Vec<(socket2::Socket, Instant)> = Vec::new();
    while t0.elapsed() < total {
        pending.retain(|(_, at)| at.elapsed() < ATTEMPT_LIVES);
        if pending.len() < MAX_PENDING {
            match start_connect(target) {
                Ok(Attempt::Connected) => return Some(now_ns()),
                Ok(Attempt::Pending(s)) => pending.push((s, Instant::now())),
                Err(_) => {}
            }
        }
        let step = if knock_out() { fine } else { each };
        let mut pfds: Vec<libc::pollfd> = pending
            .iter()
            .map(|(s, _)| libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLOUT, revents: 0 })
            .collect();
        let ts = libc::timespec { tv_sec: 0, tv_nsec: step.as_nanos().min(999_999_999) as libc::c_long };
        // SAFETY: `pfds` is a live array of valid pollfds, `ts` a valid timespec, no signal mask.
        let n = unsafe { libc::ppoll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, &ts, std::ptr::null()) };
        if n <= 0 {
            continue; // no answer within the step (or interrupted): start another
        }
        let mut failed = Vec::new();
        for (i, p) in pfds.iter().enumerate() {
            if p.revents == 0 {
                continue;
            }
            match pending[i].0.take_error() {
                Ok(None) => return Some(now_ns()),
                _ => failed.push(i),
            }
        }
        for i in failed.into_iter().rev() {
            pending.swap_remove(i);
        }
    }
    None
}

/// How long an attempt waits for its SYN-ACK before it is dropped: a SYN the
/// door dropped is never answered, so this only bounds how many stay open.
const ATTEMPT_LIVES: Duration = Duration::from_millis(2);
/// At most this many attempts at once (2 ms at the finest step is 40).
const MAX_PENDING: usize = 64;

enum Attempt {
    Connected,
    Pending(socket2::Socket),
}

/// Starts a non-blocking connect (its SYN leaves now). `std`'s
/// `TcpStream::connect_timeout` cannot serve here: it waits in `poll(2)`, whose
/// timeout is whole milliseconds, so the figure's resolution would be 1 ms.
fn start_connect(target: SocketAddr) -> std::io::Result<Attempt> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
    sock.set_nonblocking(true)?;
    match sock.connect(&target.into()) {
        Ok(()) => Ok(Attempt::Connected),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(Attempt::Pending(sock)),
        Err(e) => Err(e),
    }
}

pub(crate) fn accept_and_drop(l: TcpListener) {
    for s in l.incoming() {
        match s {
            Ok(s) => drop(s),
            Err(_) => break,
        }
    }
}

/// While alive, the calling thread runs under SCHED_FIFO: the probe sleeps between
/// attempts, so it takes little, but it looks the moment it wakes instead of
/// waiting behind the knocking program on the client's CPU.
struct Realtime(bool);

impl Realtime {
    fn now() -> Realtime {
        let p = libc::sched_param { sched_priority: 10 };
        // SAFETY: plain syscall on the calling thread with a valid parameter.
        Realtime(unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) } == 0)
    }
}

impl Drop for Realtime {
    fn drop(&mut self) {
        if self.0 {
            let p = libc::sched_param { sched_priority: 0 };
            // SAFETY: as above.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &p) };
        }
    }
}
