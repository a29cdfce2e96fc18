//! `[metrics] listen`: Prometheus text at `/metrics`, every name prefixed `nxknock_`.
//!
//! The counters live where the work happens (the DNS threads' [`DnsStats`], the door
//! stage's [`Metrics`]) as plain atomics, so counting costs the knock path one
//! relaxed add; the text is rendered only when scraped. The responder is a few lines
//! of HTTP/1.1 on the daemon's own tokio runtime: one request per connection, a
//! bounded head, a timeout, a cap on connections in flight. It is meant for
//! loopback (the config refuses anything else unless `allow_remote = true`):
//! refusal reasons and knock rates tell an outsider how the daemon is doing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::dns::DnsStats;

/// Upper bounds (seconds) of the door-latency histogram: packet receipt to door in
/// the kernel. About a millisecond is normal (BENCHMARKS.md); the tail buckets
/// show a slow disk or a blocked verifier.
const LATENCY_BOUNDS: [f64; 10] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5];

/// Scrapes in flight at once; more are closed unanswered.
const MAX_CONNECTIONS: usize = 8;
/// Bytes of request head read at most, and how long a client may take to send it.
const MAX_HEAD: usize = 4096;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// What the verifier and door stage count (the DNS threads count in [`DnsStats`]).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Knocks decided, by result: `open`, `close`, `repeat`, `refused`.
    results: Mutex<BTreeMap<&'static str, u64>>,
    /// Refused knocks by [`crate::verify::Reject::reason`].
    refused: Mutex<BTreeMap<&'static str, u64>>,
    doors_opened: AtomicU64,
    door_errors: AtomicU64,
    /// Live door records (a gauge, refreshed by the verify loop).
    doors_open: AtomicU64,
    /// Knocks shed before their deep walk (over budget, queue full, waited too long).
    shed: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BOUNDS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
}

impl Metrics {
    pub fn knock(&self, result: &'static str) {
        *self.results.lock().unwrap_or_else(|p| p.into_inner()).entry(result).or_default() += 1;
    }

    pub fn refused(&self, reason: &'static str) {
        self.knock("refused");
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()).entry(reason).or_default() += 1;
    }

    /// A door is in the kernel `latency` after its knock's packet arrived.
    pub fn door_opened(&self, latency: Duration) {
        self.doors_opened.fetch_add(1, Relaxed);
        let s = latency.as_secs_f64();
        for (i, bound) in LATENCY_BOUNDS.iter().enumerate() {
            if s <= *bound {
                self.latency_buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(latency.as_micros() as u64, Relaxed);
    }

    pub fn door_error(&self) {
        self.door_errors.fetch_add(1, Relaxed);
    }

    pub fn set_doors_open(&self, n: usize) {
        self.doors_open.store(n as u64, Relaxed);
    }

    pub fn shed(&self, n: u64) {
        self.shed.fetch_add(n, Relaxed);
    }

    pub fn reload(&self, ok: bool) {
        if ok { &self.reloads_ok } else { &self.reloads_failed }.fetch_add(1, Relaxed);
    }

    /// The Prometheus text exposition (version 0.0.4) of these and `dns`.
    pub fn render(&self, dns: &DnsStats) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, samples: &[(String, u64)]| {
            let _ = writeln!(out, "# HELP nxknock_{name} {help}\n# TYPE nxknock_{name} counter");
            for (labels, v) in samples {
                let _ = writeln!(out, "nxknock_{name}{labels} {v}");
            }
        };
        let one = |v: &AtomicU64| vec![(String::new(), v.load(Relaxed))];
        counter("queries_total", "DNS queries received (UDP datagrams and TCP messages).", &one(&dns.queries));
        counter("knock_answers_total", "Knock-shaped queries answered NXDOMAIN.", &one(&dns.knock_answers));
        counter("knocks_queued_total", "Knocks handed to the verifier.", &one(&dns.knocks_queued));
        let results: Vec<_> = self
            .results
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (format!("{{result=\"{k}\"}}"), *v))
            .collect();
        counter("knocks_total", "Knocks the verifier decided, by result.", &results);
        let refused: Vec<_> = self
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (format!("{{reason=\"{k}\"}}"), *v))
            .collect();
        counter("knocks_refused_total", "Refused knocks, by reason (nothing was spent).", &refused);
        let drops = vec![
            ("{stage=\"queue_full\"}".to_owned(), dns.knocks_dropped.load(Relaxed)),
            ("{stage=\"lookalike\"}".to_owned(), dns.lookalikes.load(Relaxed)),
            ("{stage=\"deep_shed\"}".to_owned(), self.shed.load(Relaxed)),
        ];
        counter("knocks_dropped_total", "Knocks dropped before verification, by stage.", &drops);
        counter("not_tokens_total", "Knock-shaped names that are no token at all.", &one(&dns.not_tokens));
        counter("doors_opened_total", "Doors put in the kernel.", &one(&self.doors_opened));
        counter("door_errors_total", "Doors the backend failed to open.", &one(&self.door_errors));
        let reloads = vec![
            ("{result=\"ok\"}".to_owned(), self.reloads_ok.load(Relaxed)),
            ("{result=\"refused\"}".to_owned(), self.reloads_failed.load(Relaxed)),
        ];
        counter("reloads_total", "SIGHUP reloads, applied or refused.", &reloads);
        let _ = writeln!(
            out,
            "# HELP nxknock_doors_open Live door records.\n# TYPE nxknock_doors_open gauge\nnxknock_doors_open {}",
            self.doors_open.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP nxknock_door_latency_seconds Knock packet received to door in the kernel.\n\
             # TYPE nxknock_door_latency_seconds histogram"
        );
        for (i, bound) in LATENCY_BOUNDS.iter().enumerate() {
            let v = self.latency_buckets[i].load(Relaxed);
            let _ = writeln!(out, "nxknock_door_latency_seconds_bucket{{le=\"{bound}\"}} {v}");
        }
        let count = self.latency_count.load(Relaxed);
        let _ = writeln!(out, "nxknock_door_latency_seconds_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.latency_sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "nxknock_door_latency_seconds_sum {sum}\nnxknock_door_latency_seconds_count {count}");
        out
    }
}

/// Serve `/metrics` on `listener` until the runtime ends.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, dns: Arc<DnsStats>) {
    let busy = Arc::new(AtomicUsize::new(0));
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            // Out of descriptors or the like: do not spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if busy.fetch_add(1, Relaxed) >= MAX_CONNECTIONS {
            busy.fetch_sub(1, Relaxed);
            continue; // dropped: closed unanswered
        }
        let (metrics, dns, busy) = (metrics.clone(), dns.clone(), busy.clone());
        tokio::spawn(async move {
            let _ = tokio::time::timeout(HEAD_TIMEOUT, respond(&mut conn, &metrics, &dns)).await;
            busy.fetch_sub(1, Relaxed);
        });
    }
}

/// Read one request head and answer it; the connection closes afterwards.
async fn respond(conn: &mut tokio::net::TcpStream, metrics: &Metrics, dns: &DnsStats) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = conn.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_HEAD {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let mut parts = std::str::from_utf8(line).unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics.render(dns)),
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "see /metrics\n".to_owned()),
        _ => ("405 Method Not Allowed", "text/plain", "GET /metrics\n".to_owned()),
    };
    let mut reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        reply.push_str(&body);
    }
    conn.write_all(reply.as_bytes()).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_counters_labels_and_a_cumulative_histogram() {
        let m = Metrics::default();
        let dns = DnsStats::default();
        dns.queries.fetch_add(3, Relaxed);
        m.knock("open");
        m.refused("replay");
        m.refused("replay");
        m.door_opened(Duration::from_micros(1500));
        let t = m.render(&dns);
        assert!(t.contains("nxknock_queries_total 3"), "{t}");
        assert!(t.contains("nxknock_knocks_total{result=\"open\"} 1"), "{t}");
        assert!(t.contains("nxknock_knocks_total{result=\"refused\"} 2"), "{t}");
        assert!(t.contains("nxknock_knocks_refused_total{reason=\"replay\"} 2"), "{t}");
        assert!(t.contains("nxknock_door_latency_seconds_bucket{le=\"0.001\"} 0"), "{t}");
        assert!(t.contains("nxknock_door_latency_seconds_bucket{le=\"0.002\"} 1"), "{t}");
        assert!(t.contains("nxknock_door_latency_seconds_bucket{le=\"+Inf\"} 1"), "{t}");
        assert!(t.lines().all(|l| l.starts_with('#') || l.starts_with("nxknock_")), "{t}");
    }
}
