//! The user's side: print one-time knock names, or send a bound knock.
//!
//! A knock is one DNS query, sent to the nameserver directly or through a
//! recursive resolver. The answer is always NXDOMAIN (valid or not), so the
//! client learns only that the query got through; retries resend the *same*
//! name, which the server treats as a harmless repeat.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};

use crate::credential::Credential;
use crate::token::{Bound, BoundAddr, BoundKnock, Form, Token, service_id};

/// The next `count` plain knock names (`<label>.<zone>`) from the credential's
/// plain chain, reserved in the credential first.
pub fn otp(credential: &Path, count: u64) -> anyhow::Result<Vec<String>> {
    let mut cred = Credential::load(credential)?;
    let elements = cred.take(credential, Form::Plain, count)?;
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
    /// Send over TCP instead of UDP (networks that mangle UDP/53).
    pub tcp: bool,
}

#[derive(Clone, Debug)]
pub struct KnockReport {
    pub rcode: ResponseCode,
    pub authoritative: bool,
    pub attempts: u32,
    pub elapsed: Duration,
    pub name: String,
}

/// The first `nameserver` in a resolv.conf, like a stub resolver would use.
pub fn system_resolver(resolv_conf: &Path) -> anyhow::Result<SocketAddr> {
    let text = std::fs::read_to_string(resolv_conf).with_context(|| format!("read {}", resolv_conf.display()))?;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("nameserver") {
            if let Some(addr) = words.next() {
                // Drop an IPv6 zone index (fe80::1%eth0): not routable for us anyway.
                let addr = addr.split('%').next().unwrap_or(addr);
                if let Ok(ip) = addr.parse::<IpAddr>() {
                    return Ok(SocketAddr::new(ip, 53));
                }
            }
        }
    }
    bail!("no usable nameserver line in {}", resolv_conf.display())
}

/// Ask the nameserver itself which address it sees us at, and believe the answer
/// only if it carries this user's tag over our nonce (see [`crate::whoami`]).
/// Only meaningful directly: through a resolver it would report the resolver.
pub fn whoami(server: SocketAddr, cred: &Credential, timeout: Duration) -> anyhow::Result<IpAddr> {
    let zone = cred.zone_id();
    let q = crate::whoami::question(&cred.zone_key_bytes(), &zone, cred.user_id);
    let name = format!("{}.whoami.{}.", q.label, zone.as_str());
    let resp = exchange(server, &name, RecordType::TXT, false, false, timeout)?;
    let mut last = None;
    for r in &resp.answers {
        if let hickory_proto::rr::RData::TXT(txt) = &r.data {
            let strings: Vec<String> = txt.txt_data.iter().map(|d| String::from_utf8_lossy(d).into_owned()).collect();
            match crate::whoami::check(&cred.mac_key(), &zone, &q, &strings) {
                Ok(ip) => return Ok(ip),
                Err(e) => last = Some(e),
            }
        }
    }
    match last {
        Some(e) => bail!("whoami answer from {server} refused: {e}; not knocking. Pass --ip YOUR.PUBLIC.IP"),
        None => bail!(
            "{server} gave no whoami answer (rcode {}); the server has `[dns] whoami` off. Pass --ip YOUR.PUBLIC.IP",
            resp.metadata.response_code
        ),
    }
}

/// A nameserver or resolver: `HOST` or `HOST:PORT` (port 53 by default), where HOST
/// is an address (IPv6 bare or as `[::1]:53`) or a name the system resolves.
/// A name with several addresses gives the first.
pub fn parse_endpoint(s: &str) -> anyhow::Result<SocketAddr> {
    Ok(resolve_endpoint(s, Some(53))?.remove(0))
}

/// `HOST:PORT` (or `HOST` when `default_port` is given) to its addresses, in the
/// system resolver's order (`/etc/hosts`, then DNS, as `getaddrinfo` does). Never empty.
pub fn resolve_endpoint(s: &str, default_port: Option<u16>) -> anyhow::Result<Vec<SocketAddr>> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(vec![sa]);
    }
    let (host, port) = match s.rsplit_once(':') {
        // `[v6]:port`, or `name:port`; a bare IPv6 address has more than one colon.
        Some((h, p)) if h.starts_with('[') || !h.contains(':') => {
            (h, p.parse::<u16>().with_context(|| format!("{s:?}: {p:?} is not a port number"))?)
        }
        _ => (s, default_port.with_context(|| format!("{s:?}: give HOST:PORT"))?),
    };
    resolve_host(host, port)
}

/// `host` (an address, `[v6]`, or a name) and `port` to socket addresses. A name
/// that does not resolve is an error that names it. Never empty.
pub fn resolve_host(host: &str, port: u16) -> anyhow::Result<Vec<SocketAddr>> {
    use std::net::ToSocketAddrs;
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    if bare.is_empty() || bare.contains(['[', ']', '/', ' ']) {
        bail!("{host:?} is not a host name or address");
    }
    let addrs: Vec<SocketAddr> =
        (bare, port).to_socket_addrs().with_context(|| format!("cannot resolve host name {bare:?}"))?.collect();
    if addrs.is_empty() {
        bail!("host name {bare:?} has no address");
    }
    Ok(addrs)
}

/// The next `count` *bound* knock names for `ip`, stamped now: usable with `dig`
/// through any resolver, but only within the server's `max_age_seconds`.
pub fn otp_bound(credential: &Path, count: u64, ip: IpAddr, service: Option<&str>) -> anyhow::Result<Vec<String>> {
    let mut cred = Credential::load(credential)?;
    // Refused before any element is taken: a name for a service the server will not
    // open would only use one up.
    check_service(&cred, service)?;
    let elements = cred.take(credential, Form::Bound, count)?;
    let now = crate::clock::unix_now() as u32;
    Ok(elements
        .into_iter()
        .map(|element| bound_name(&cred, element, ip, service, now, false).trim_end_matches('.').to_owned())
        .collect())
}

/// The bound knock name (absolute, with the final dot) of `element` for `ip`,
/// stamped `time`.
fn bound_name(
    cred: &Credential,
    element: crate::token::Element,
    ip: IpAddr,
    service: Option<&str>,
    time: u32,
    close: bool,
) -> String {
    let sid = service.map(service_id).unwrap_or(0);
    let knock = BoundKnock { element, addr: BoundAddr::from_ip(ip), service: sid, time, close };
    let b = Bound::sign(&cred.mac_key(), &cred.zone_key(), &cred.zone_id(), knock);
    format!("{}.{}.", Token::Bound(b).to_label(), cred.zone)
}

fn check_service(cred: &Credential, service: Option<&str>) -> Result<(), KnockError> {
    if let Some(service) = service {
        if !cred.services.is_empty() && !cred.services.iter().any(|s| s == service) {
            let may = format!("{}; a service added since needs `nxknock user rekey`", cred.services.join(", "));
            return Err(KnockError::UnknownService(service.to_owned(), may));
        }
    }
    Ok(())
}

/// Why a knock did not reach the knock zone's nameserver. Each has its own exit
/// status (see [`KnockError::exit_code`]), so scripts can tell them apart.
#[derive(Debug, thiserror::Error)]
pub enum KnockError {
    #[error("no answer from {server} after {attempts} attempt(s); the knock may not have arrived")]
    NoAnswer { server: SocketAddr, attempts: u32 },
    #[error(
        "{server} answered {rcode}{aa} without the SOA of {zone}: not the knock zone's nameserver \
         (check --server/--resolver and the zone's delegation)"
    )]
    WrongAnswer { server: SocketAddr, rcode: ResponseCode, aa: &'static str, zone: String },
    #[error("service {0:?} is not one this credential may open (it may open: {1})")]
    UnknownService(String, String),
}

impl KnockError {
    /// 3: no answer; 4: an answer that is not the knock zone's NXDOMAIN (refused,
    /// wrong zone, broken delegation); 5: a service the credential may not open.
    /// (1 is any other error; 2 a usage error, as clap reports it.)
    pub fn exit_code(&self) -> u8 {
        match self {
            KnockError::NoAnswer { .. } => 3,
            KnockError::WrongAnswer { .. } => 4,
            KnockError::UnknownService(..) => 5,
        }
    }
}

/// Is `resp` the knock zone's NXDOMAIN: the zone's SOA in authority, and the AA bit
/// when asked directly (a resolver's relayed answer never carries AA)?
fn zone_answered(resp: &Message, zone: &str, direct: bool) -> bool {
    let Ok(apex) = Name::from_ascii(format!("{}.", zone.trim_end_matches('.'))) else { return false };
    resp.metadata.response_code == ResponseCode::NXDomain
        && (!direct || resp.metadata.authoritative)
        // hickory compares names without regard to case.
        && resp.authorities.iter().any(|r| r.record_type() == RecordType::SOA && r.name == apex)
}

/// Send a bound knock and wait for its (NXDOMAIN) answer, retrying a lost one.
/// Succeeds only on the knock zone's NXDOMAIN ([`KnockError`] otherwise).
pub fn knock(credential: &Path, req: &KnockRequest) -> anyhow::Result<KnockReport> {
    with_bound_name(credential, req.ip, req.service.as_deref(), req.close, |name| exchange_knock(name, req))
}

/// Reserve the next bound element and hand its knock name for `ip` to `send`,
/// which runs while the credential's new counter is saved
/// ([`Credential::take_sending`]). A service the credential records as not
/// openable is refused before an element is taken.
pub fn with_bound_name<R>(
    credential: &Path,
    ip: IpAddr,
    service: Option<&str>,
    close: bool,
    send: impl FnOnce(&str) -> anyhow::Result<R>,
) -> anyhow::Result<R> {
    let mut cred = Credential::load(credential)?;
    check_service(&cred, service)?;
    cred.take_sending(credential, Form::Bound, |cred, element| {
        send(&bound_name(cred, element, ip, service, crate::clock::unix_now() as u32, close))
    })?
}

/// Send knock `name` as `req` says, with its retries, and check the answer.
fn exchange_knock(name: &str, req: &KnockRequest) -> anyhow::Result<KnockReport> {
    let (addr, rd) = match req.target {
        Target::Server(a) => (a, false),
        Target::Resolver(a) => (a, true),
    };
    let started = Instant::now();
    let mut last_err = None;
    let zone = name.split_once('.').map(|(_, z)| z.trim_end_matches('.').to_owned()).unwrap_or_default();
    for attempt in 1..=req.attempts.max(1) {
        match exchange(addr, name, RecordType::A, rd, req.tcp, req.timeout) {
            Ok(resp) if !zone_answered(&resp, &zone, !rd) => {
                return Err(KnockError::WrongAnswer {
                    server: addr,
                    rcode: resp.metadata.response_code,
                    aa: if resp.metadata.authoritative { " (authoritative)" } else { "" },
                    zone,
                }
                .into());
            }
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
    if let Some(e) = last_err {
        tracing::debug!(error = %format!("{e:#}"), "last attempt");
    }
    Err(KnockError::NoAnswer { server: addr, attempts: req.attempts.max(1) }.into())
}

/// One query, one answer (UDP or TCP), checked to be the answer to *this* query.
fn exchange(
    addr: SocketAddr,
    name: &str,
    qtype: RecordType,
    rd: bool,
    tcp: bool,
    timeout: Duration,
) -> anyhow::Result<Message> {
    let id: u16 = rand::random();
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = rd;
    let qname = Name::from_ascii(name).context("knock name")?;
    msg.add_query(Query::query(qname.clone(), qtype));
    let bytes = msg.to_vec()?;
    let matches = |resp: &Message| {
        resp.metadata.id == id
            && resp.metadata.message_type == MessageType::Response
            && resp.queries.first().is_some_and(|q| q.name() == &qname)
    };
    if tcp {
        let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connect to {addr} over TCP"))?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        s.write_all(&framed).context("send knock over TCP")?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).context("read answer length")?;
        let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut buf).context("read answer")?;
        let resp = Message::from_vec(&buf).context("malformed answer")?;
        if !matches(&resp) {
            bail!("answer over TCP does not match the query");
        }
        return Ok(resp);
    }
    let bind: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
    let sock = UdpSocket::bind(bind).context("bind UDP socket")?;
    sock.connect(addr).with_context(|| format!("connect to {addr}"))?;
    sock.send(&bytes).context("send knock")?;
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
        if matches(&resp) {
            return Ok(resp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_take_addresses_names_and_ports() {
        let one = |s: &str| parse_endpoint(s).unwrap().to_string();
        assert_eq!(one("198.18.0.1"), "198.18.0.1:53");
        assert_eq!(one("198.18.0.1:5353"), "198.18.0.1:5353");
        assert_eq!(one("2001:db8::1"), "[2001:db8::1]:53");
        assert_eq!(one("[2001:db8::1]:5353"), "[2001:db8::1]:5353");
        // `localhost` is in every /etc/hosts.
        assert!(parse_endpoint("localhost:5353").unwrap().ip().is_loopback());
        assert_eq!(resolve_host("[::1]", 22).unwrap(), vec!["[::1]:22".parse().unwrap()]);
        let e = format!("{:#}", resolve_endpoint("localhost", None).unwrap_err());
        assert!(e.contains("HOST:PORT"), "{e}");
        let e = format!("{:#}", parse_endpoint("198.18.0.1:dns").unwrap_err());
        assert!(e.contains("port"), "{e}");
        let e = format!("{:#}", resolve_host("bad host", 22).unwrap_err());
        assert!(e.contains("bad host"), "{e}");
    }
}
