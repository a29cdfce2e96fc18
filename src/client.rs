//! The user's side: print one-time knock names, or send a bound knock.
//!
//! A knock is one DNS query, sent to the nameserver directly or through a
//! recursive resolver. The answer is always NXDOMAIN (valid or not), so the
//! client learns only that the query got through; retries resend the *same*
//! name, which the server treats as a harmless repeat.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};

use crate::credential::Credential;
use crate::token::{Bound, BoundAddr, Token, service_id};

/// The next `count` knock names (`<label>.<zone>`), reserved in the credential first.
pub fn otp(credential: &Path, count: u64) -> anyhow::Result<Vec<String>> {
    let mut cred = Credential::load(credential)?;
    let elements = cred.take(credential, count)?;
    Ok(elements.into_iter().map(|e| format!("{}.{}", Token::Plain(e).to_label(), cred.zone)).collect())
}

/// Where a knock goes.
#[derive(Clone, Debug)]
pub enum Target {
    /// The zone's nameserver itself (recursion not desired).
    Server(SocketAddr),
    /// A recursive resolver (recursion desired).
    Resolver(SocketAddr),
}

#[derive(Clone, Debug)]
pub struct KnockRequest {
    pub target: Target,
    /// Address the door should admit (embedded in the bound token).
    pub ip: IpAddr,
    pub service: Option<String>,
    pub close: bool,
    /// Attempts before giving up; each waits `timeout` for the answer.
    pub attempts: u32,
    pub timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct KnockReport {
    pub rcode: ResponseCode,
    pub authoritative: bool,
    pub attempts: u32,
    pub elapsed: Duration,
    pub name: String,
}

/// Parse `ADDR` or `ADDR:PORT` (port 53 by default; IPv6 as `[::1]:53` or bare).
pub fn parse_endpoint(s: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    let ip: IpAddr = s.parse().with_context(|| format!("{s:?} is not an address or address:port"))?;
    Ok(SocketAddr::new(ip, 53))
}

/// Build a bound knock name for the next element (reserving it first).
pub fn bound_name(credential: &Path, ip: IpAddr, service: Option<&str>, close: bool) -> anyhow::Result<String> {
    let mut cred = Credential::load(credential)?;
    let element = cred.take(credential, 1)?.remove(0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as u32;
    let sid = service.map(service_id).unwrap_or(0);
    let b = Bound::sign(&cred.mac_key(), &cred.zone_id(), element, BoundAddr::from_ip(ip), sid, now, close);
    Ok(format!("{}.{}.", Token::Bound(b).to_label(), cred.zone))
}

/// Send a bound knock and wait for its (NXDOMAIN) answer, retrying a lost one.
pub fn knock(credential: &Path, req: &KnockRequest) -> anyhow::Result<KnockReport> {
    let name = bound_name(credential, req.ip, req.service.as_deref(), req.close)?;
    let (addr, rd) = match req.target {
        Target::Server(a) => (a, false),
        Target::Resolver(a) => (a, true),
    };
    let started = Instant::now();
    let mut last_err = None;
    for attempt in 1..=req.attempts.max(1) {
        match query_once(addr, &name, rd, req.timeout) {
            Ok(resp) => {
                return Ok(KnockReport {
                    rcode: resp.metadata.response_code,
                    authoritative: resp.metadata.authoritative,
                    attempts: attempt,
                    elapsed: started.elapsed(),
                    name: name.trim_end_matches('.').to_owned(),
                });
            }
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
        .with_context(|| format!("no answer from {addr} after {} attempts", req.attempts.max(1)))
}

fn query_once(addr: SocketAddr, name: &str, rd: bool, timeout: Duration) -> anyhow::Result<Message> {
    let bind: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
    let sock = UdpSocket::bind(bind).context("bind UDP socket")?;
    sock.connect(addr).with_context(|| format!("connect to {addr}"))?;
    let id: u16 = rand::random();
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = rd;
    let qname = Name::from_ascii(name).context("knock name")?;
    msg.add_query(Query::query(qname.clone(), RecordType::A));
    sock.send(&msg.to_vec()?).context("send knock")?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("timed out after {timeout:?}");
        }
        sock.set_read_timeout(Some(left))?;
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                bail!("timed out after {timeout:?}")
            }
            Err(e) => return Err(e).context("receive answer"),
        };
        // Ignore anything that is not the answer to this query (spoofing, strays).
        let Ok(resp) = Message::from_vec(&buf[..n]) else { continue };
        if resp.metadata.id == id
            && resp.metadata.message_type == MessageType::Response
            && resp.queries.first().is_some_and(|q| q.name() == &qname)
        {
            return Ok(resp);
        }
    }
}
