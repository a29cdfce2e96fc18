//! Section 4, `attack`: legitimate bound knocks, each followed by the connect
//! loop, while the attacker host floods the server with dnsperf at full rate —
//! directly, or through the recursive resolver the user knocks through (then the
//! server sees one source for both).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Result;
use nxknock::lab::interrupt;

use crate::dnsperf::{DNSPERF_CLIENTS, Dnsperf};
use crate::exec::{run_in, wait_bounded};
use crate::knock_to_open::{accept_and_drop, brief};
use crate::report::{fmt_k, fmt_ms};
use crate::sniffer::{Probe, Sniffer};
use crate::stats::summarize;
use crate::{BIN, Bench, CLIENT, RESOLVER, SERVER, SSH_PORT};

impl Bench {
    pub(crate) fn attack(&mut self) -> Result<()> {
        let o = self.opts.clone();
        let _door = self.srv().tcp_listen(SocketAddr::new(SERVER.into(), SSH_PORT));
        if let Ok(l) = &_door {
            let l = l.try_clone()?;
            std::thread::spawn(move || accept_and_drop(l));
        }
        let sniffer = Sniffer::open(self.cli())?;
        let (random, wellformed) = self.query_files()?;
        let lookalikes = self.lookalike_file()?;
        let mut t = format!(
            "### 4. Under attack\n\n\
             The attacker host floods the server with dnsperf at full rate (`-c 4`, no rate limit, {}s) while the client \
             makes legitimate bound knocks (`nxknock knock --server`), one at a time, each followed by the connect loop \
             (up to 2 s). In the last row the flood (look-alikes of bound knocks: valid kind byte, random content) goes \
             through the recursive resolver (unbound) and so do the user's knocks (`--resolver`): the server sees one \
             source for both. \"opened\" counts knocks whose door opened within 2 s; the latency is knock packet → \
             connect, and from the client command's start.\n\n\
             | flood | flood q/s answered | flood lost | legit knocks opened | p50 | p99 | max | p50 from command |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|\n",
            o.attack_secs
        );
        let rows = [
            ("none (baseline)", None, false),
            ("random labels", Some(&random), false),
            ("well-formed random tokens", Some(&wellformed), false),
            ("look-alikes via the shared resolver", Some(&lookalikes), true),
        ];
        for (label, file, via_resolver) in rows {
            interrupt::check()?;
            let db = self.dir.join("attack.db");
            let _ = std::fs::remove_file(&db);
            let cfg = self.nx_config("attack", &db)?;
            let cred = self.user_add(&cfg, &format!("legit{}", label.len()))?;
            let mut d = self.start_nxknock(&cfg, "nxknock-attack.log", &[])?;
            // The resolver needs the zone's nameserver up to start (it checks through it).
            let _unbound = if via_resolver { Some(self.start_unbound()?) } else { None };
            let mut flood = None;
            if let Some(f) = file {
                let s = if via_resolver { RESOLVER.to_string() } else { SERVER.to_string() };
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
                interrupt::nap(Duration::from_secs(1))?;
            }
            let t_end = Instant::now() + Duration::from_secs(o.attack_secs.saturating_sub(2));
            let mut v = Vec::new();
            let mut peak = 0;
            while v.len() < o.attack_trials && (flood.is_none() || Instant::now() < t_end) {
                interrupt::check()?;
                run_in(self.srv(), &["nft", "flush", "set", "inet", "nxknock", "doors4"], Duration::from_secs(5))?;
                v.push(self.trial(
                    &sniffer,
                    || {
                        let mut c = Command::new(BIN);
                        let (how, to) = if via_resolver { ("--resolver", RESOLVER) } else { ("--server", SERVER) };
                        c.args([
                            "knock",
                            "--credential",
                            cred.to_str().unwrap(),
                            how,
                            &to.to_string(),
                            "--ip",
                            &CLIENT.to_string(),
                        ]);
                        c
                    },
                    Probe::udp(if via_resolver { RESOLVER } else { SERVER }, 53),
                )?);
                peak = peak.max(d.memory().0);
                if flood.is_some() {
                    interrupt::nap(Duration::from_millis(50))?;
                }
            }
            let fr = match flood.take() {
                Some(mut c) => Some(Dnsperf::parse(&String::from_utf8_lossy(
                    &wait_bounded(&mut c, Duration::from_secs(o.attack_secs + 30))?.stdout,
                ))?),
                None => None,
            };
            let hwm = d.memory().1;
            d.stop();
            let ok: Vec<f64> = v.iter().filter_map(|t| t.packet_ms).collect();
            let s = summarize(&ok);
            let from_cmd = summarize(&v.iter().filter_map(|t| t.command_ms).collect::<Vec<_>>());
            eprintln!("  flood {label}: {}", brief(&v));
            let _ = writeln!(
                t,
                "| {label} | {} | {} | {}/{} ({:.0}%) | {} | {} | {} | {} |",
                fr.as_ref().map(|r| fmt_k(r.qps)).unwrap_or_else(|| "–".into()),
                fr.as_ref().map(|r| r.lost.to_string()).unwrap_or_else(|| "–".into()),
                ok.len(),
                v.len(),
                100.0 * ok.len() as f64 / v.len().max(1) as f64,
                fmt_ms(s.p50),
                fmt_ms(s.p99),
                fmt_ms(s.max),
                fmt_ms(from_cmd.p50),
            );
            if file.is_some() {
                self.cdf.insert(format!("nxknock knock under flood ({label})"), (ok.clone(), v.len()));
                self.notes.push(format!(
                    "nxknock resident memory under the {label} flood: {:.1} MiB now, {:.1} MiB peak.",
                    peak as f64 / 1024.0,
                    hwm as f64 / 1024.0
                ));
            }
            let _ = run_in(
                self.srv(),
                &[BIN, "uninstall-firewall", "--config", cfg.to_str().unwrap()],
                Duration::from_secs(10),
            );
        }
        sniffer.stop();
        t.push('\n');
        eprint!("{t}");
        self.report.push_str(&t);
        Ok(())
    }
}
