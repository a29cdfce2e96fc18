//! Section 3, `scale`: 10 to 1M enrolled users. Bulk enrolment, verification
//! cost in-process (a random well-formed token, a valid knock), then the daemon
//! on the same database: start-up, memory, DNS rate.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use nxknock::config::Config;
use nxknock::knock::{Knock, Via};
use nxknock::lab::interrupt;
use nxknock::store::{Enrolment, SqliteStore, Store};
use nxknock::token::{ELEMENT_LEN, Element, Form, Token};
use nxknock::verify::{Decision, Verifier};

use crate::report::{fmt_count, fmt_dur, fmt_k};
use crate::stats::summarize;
use crate::users::{db_size, random_bytes};
use crate::{Bench, CLIENT, SERVER};

impl Bench {
    pub(crate) fn scale(&mut self) -> Result<()> {
        let o = self.opts.clone();
        let (random, wellformed) = self.query_files()?;
        let mut t = String::from(
            "### 3. Scale with enrolled users\n\n\
             Filler users are enrolled through the library in one transaction per 100k (`Store::add_users`); five probe users \
             have real chains (taking turns). Verification is timed in-process on the same `Verifier` the daemon runs: a random well-formed \
             token (the full 32-step window, then rejected) and a valid knock (window hit, MAC/policy, SQLite commit with \
             `synchronous=FULL`). The daemon is then started on the same database (nftables backend) and loaded with dnsperf.\n\n\
             | users | enrol | DB size | bytes/user | index load | random token verify (mean / p99) | valid knock verify (p50 / p99) | daemon start | RSS idle | RSS under load | DNS q/s random labels | DNS q/s well-formed tokens |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for &n in &o.user_counts {
            interrupt::check()?;
            let db = self.dir.join(format!("scale-{n}.db"));
            let t0 = Instant::now();
            let probe_len = 1000u64;
            // Five probe users take turns: one user's accepted knocks are capped (bursts of 100).
            let probe = self.enrol(
                &db,
                &[
                    ("probe0", probe_len),
                    ("probe1", probe_len),
                    ("probe2", probe_len),
                    ("probe3", probe_len),
                    ("probe4", probe_len),
                ],
            )?;
            let mut store = SqliteStore::open(&db)?;
            let mut left = n.saturating_sub(1);
            let mut k = 0usize;
            while left > 0 {
                interrupt::check()?;
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
            let cfg_path = self.nx_config(&format!("scale-{n}"), &db)?;
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
            for j in 1..=if o.quick { 20u64 } else { 100 } {
                let who = &probe[(j % 5) as usize];
                let knock = knock_of(Token::Plain(who.element(&self.zone, Form::Plain, probe_len - j.div_ceil(5))));
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
            let d = self.start_nxknock(&cfg_path, &format!("nxknock-scale-{n}.log"), &[])?;
            let start = d.ready_after;
            interrupt::nap(Duration::from_millis(300))?;
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
}

fn knock_of(token: Token) -> Knock {
    Knock { token, seen_from: IpAddr::V4(CLIENT), via: Via::DnsUdp, ecs: None, received: Instant::now() }
}
