//! Section 1, `dns`: the DNS serving rate of nxknock against knotd serving the
//! same zone, with the same query files and client settings in alternating
//! rounds; then latency at a fixed offered rate, and what the tuning knobs give.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Result;
use nxknock::lab::interrupt;
use nxknock::token::{Form, Token};

use crate::dnsperf::{Dnsperf, QUERY_LINES, random_label, write_queries};
use crate::report::fmt_k;
use crate::stats::{median, summarize};
use crate::users::copy_db;
use crate::{Bench, SERVER};

impl Bench {
    pub(crate) fn dns_rate(&mut self) -> Result<()> {
        let o = self.opts.clone();
        // Query files: uniformly random base32 labels as the issue asks (most are not
        // even well-formed tokens), the same with 0.1% valid knocks, and well-formed
        // random tokens (every one costs the verifier a full window of hashes).
        let (random, wellformed) = self.query_files()?;
        let mix = self.dir.join("q-mix.txt");
        let lines = QUERY_LINES;
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
            (0..lines).map(|i| {
                if i % step == step / 2 && i / step < valid.len() { valid[i / step].clone() } else { random_label() }
            }),
        )?;
        let files = [
            ("random labels", &random),
            ("random + 0.1% valid knocks", &mix),
            ("well-formed random tokens", &wellformed),
        ];

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
                    interrupt::check()?;
                    let r = if server == "nxknock" {
                        let db = self.dir.join(format!("rate-{round}.db"));
                        copy_db(&template, &db)?;
                        let cfg = self.nx_config("rate", &db)?;
                        let d = self.start_nxknock(&cfg, "nxknock-rate.log", &[])?;
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
                    eprintln!(
                        "  {label:>28} {server:>8} round {round}: {:.0} q/s, lost {}, mean {:.0} µs",
                        r.qps, r.lost, r.mean_us
                    );
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
            interrupt::check()?;
            let (r, lat) = if server == "nxknock" {
                let db = self.dir.join("rate-lat.db");
                copy_db(&template, &db)?;
                let cfg = self.nx_config("rate", &db)?;
                let d = self.start_nxknock(&cfg, "nxknock-lat.log", &[])?;
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
                    interrupt::check()?;
                    let db = self.dir.join(format!("tune-{round}.db"));
                    copy_db(&template, &db)?;
                    let cfg = self.nx_config("rate", &db)?;
                    let d = self.start_nxknock(&cfg, "nxknock-tune.log", &env)?;
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
}
