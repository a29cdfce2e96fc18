//! dnsperf, the DNS load generator every section uses, and its query files.
//!
//! Every server gets the same files and the same client settings, so their
//! rates compare.

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use nxknock::lab::Netns;
use nxknock::lab::config::ZONE;
use nxknock::lab::process::Process;
use nxknock::token::{ELEMENT_LEN, Element, Token};

use crate::exec::run_in;
use crate::users::random_bytes;
use crate::{Bench, SERVER};

/// dnsperf client settings shared by every server: 4 clients (sockets), default 100 outstanding.
pub(crate) const DNSPERF_CLIENTS: &str = "4";
/// Queries in each query file.
pub(crate) const QUERY_LINES: usize = 100_000;

impl Bench {
    /// The query files of random labels and of well-formed random tokens, written
    /// once per run: `(random, wellformed)`.
    pub(crate) fn query_files(&self) -> Result<(PathBuf, PathBuf)> {
        let random = self.dir.join("q-random.txt");
        if !random.exists() {
            write_queries(&random, (0..QUERY_LINES).map(|_| random_label()))?;
        }
        let wellformed = self.dir.join("q-wellformed.txt");
        if !wellformed.exists() {
            write_queries(&wellformed, (0..QUERY_LINES).map(|_| wellformed_label()))?;
        }
        Ok((random, wellformed))
    }

    /// Look-alikes of bound knocks (format-2 kind byte, random content), for the
    /// flood relayed through the shared resolver.
    pub(crate) fn lookalike_file(&self) -> Result<PathBuf> {
        let f = self.dir.join("q-lookalike.txt");
        if !f.exists() {
            write_queries(&f, (0..QUERY_LINES).map(|_| lookalike_label()))?;
        }
        Ok(f)
    }

    /// dnsperf from `ns` at full rate.
    pub(crate) fn dnsperf(
        &self,
        ns: &Netns,
        server: Ipv4Addr,
        file: &Path,
        secs: u64,
        extra: &[&str],
    ) -> Result<Dnsperf> {
        let s = server.to_string();
        let l = secs.to_string();
        let mut args = vec!["dnsperf", "-s", &s, "-d", file.to_str().unwrap(), "-c", DNSPERF_CLIENTS, "-l", &l];
        args.extend_from_slice(extra);
        let out = run_in(ns, &args, Duration::from_secs(secs + 30))?;
        Dnsperf::parse(&out)
    }

    /// dnsperf while sampling the daemon's memory; returns the result and the peak RSS (KiB).
    pub(crate) fn dnsperf_sampling(&self, d: &Process, file: &Path, secs: u64) -> Result<(Dnsperf, u64)> {
        let r = self.dnsperf(self.cli(), SERVER, file, secs, &[])?;
        Ok((r, d.memory().1))
    }

    /// dnsperf at a fixed rate with per-answer latencies (µs).
    pub(crate) fn dnsperf_verbose(&self, file: &Path, secs: u64, qps: u32) -> Result<(Dnsperf, Vec<f64>)> {
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
}

const B32: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";

/// A random base32 label of 20 or 56 characters (the plain and bound-IPv4 lengths).
pub(crate) fn random_label() -> String {
    let r = random_bytes(57);
    let len = if r[0] & 1 == 0 { 20 } else { 56 };
    r[1..=len].iter().map(|b| B32[(*b & 31) as usize] as char).collect()
}

/// A well-formed random token: a random plain element, or a bound-IPv4-shaped label.
pub(crate) fn wellformed_label() -> String {
    let r = random_bytes(36);
    if r[0] & 1 == 0 {
        Token::Plain(Element(r[1..=ELEMENT_LEN].try_into().unwrap())).to_label()
    } else {
        let mut b = vec![0x21u8];
        b.extend_from_slice(&r[1..35]);
        data_encoding::BASE32_NOPAD.encode(&b).to_ascii_lowercase()
    }
}

/// A bound-IPv4-shaped label with a valid kind byte and random content.
pub(crate) fn lookalike_label() -> String {
    let r = random_bytes(35);
    let mut b = vec![0x21u8];
    b.extend_from_slice(&r[1..35]);
    data_encoding::BASE32_NOPAD.encode(&b).to_ascii_lowercase()
}

pub(crate) fn write_queries(path: &Path, labels: impl Iterator<Item = String>) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for l in labels {
        writeln!(f, "{l}.{ZONE} A")?;
    }
    f.flush()?;
    Ok(())
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Dnsperf {
    pub(crate) sent: u64,
    pub(crate) completed: u64,
    pub(crate) lost: u64,
    pub(crate) qps: f64,
    pub(crate) mean_us: f64,
}

impl Dnsperf {
    pub(crate) fn parse(out: &str) -> Result<Dnsperf> {
        let num = |key: &str| -> Option<f64> {
            out.lines()
                .find(|l| l.trim_start().starts_with(key))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
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
