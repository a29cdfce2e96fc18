//! The DNS listener: an authoritative server for the knock zone (hickory-server).
//!
//! Static names from the zone file are answered by hickory's `Catalog` with AA.
//! Every other name exactly one label below the apex is a *knock*: whatever the
//! label and QTYPE, it gets the same NXDOMAIN + SOA, AA set, the question echoed
//! byte for byte (exact case, from the request's own wire bytes). The answer is
//! built and sent before the label is even decoded, so a valid and an invalid
//! knock cannot differ in content or timing. Only then is the label parsed
//! (cheap checks first) and handed to the verifier over a bounded queue; the
//! listener never touches the database or the firewall.
//!
//! Names deeper than one label below the apex are left to the catalog: knocks
//! are one label deep, so no knock name ever has names below it (RFC 8020).

use crate::intake::IntakeSender;
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use hickory_proto::op::{Edns, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_proto::serialize::txt::Parser;
use hickory_server::net::runtime::{Time, TokioRuntimeProvider};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, MessageResponseBuilder, ZoneType};

use crate::knock::{Knock, Via};
use crate::netaddr::Prefix;
use crate::token::{Token, ZoneId, ZoneKey};
use crate::whoami::{KeyTable, Nonces};

pub mod fast;
pub mod rrl;
mod socket;

use socket::udp_socket;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ZoneError {
    #[error("cannot read zone file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("zone file {path}: {detail}")]
    Invalid { path: String, detail: String },
}

/// The loaded zone: what the catalog serves plus what the knock path needs.
pub struct Zone {
    pub apex: Name,
    apex_lower: LowerName,
    catalog: Catalog,
    /// Every owner name in the zone and every empty non-terminal above one.
    existing: HashSet<LowerName>,
    /// SOA for the authority section of NXDOMAIN, TTL capped at the SOA minimum (RFC 2308).
    soa: Record,
}

impl Zone {
    /// Parse a zone file. `origin` overrides `$ORIGIN`. The zone must have an SOA.
    pub fn load(path: &Path, origin: Option<&str>) -> Result<Zone, ZoneError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ZoneError::Read { path: p.clone(), source })?;
        Zone::parse(text, path, origin)
    }

    /// Parse a zone file's `text` (`path` names it in errors and anchors `$INCLUDE`).
    pub fn parse(text: String, path: &Path, origin: Option<&str>) -> Result<Zone, ZoneError> {
        let p = path.display().to_string();
        let invalid = |detail: String| ZoneError::Invalid { path: p.clone(), detail };
        let origin =
            origin.map(|o| Name::from_ascii(o).map_err(|e| invalid(format!("zone name {o:?}: {e}")))).transpose()?;
        let (apex, records) =
            Parser::new(text, Some(path.to_owned()), origin).parse().map_err(|e| invalid(e.to_string()))?;
        let apex_lower = LowerName::new(&apex);
        let mut existing = HashSet::new();
        let mut soa = None;
        for rrset in records.values() {
            let mut name = LowerName::new(rrset.name());
            if !apex_lower.zone_of(&name) {
                return Err(invalid(format!("{} is outside the zone {apex}", rrset.name())));
            }
            if rrset.record_type() == RecordType::SOA {
                soa = rrset.records_without_rrsigs().next().cloned();
            }
            while name != apex_lower && existing.insert(name.clone()) {
                name = name.base_name();
            }
        }
        let mut soa = soa.ok_or_else(|| invalid(format!("no SOA record at {apex}")))?;
        if let RData::SOA(s) = &soa.data {
            let ttl = soa.ttl.min(s.minimum);
            soa.ttl = ttl;
        }
        let handler = InMemoryZoneHandler::<TokioRuntimeProvider>::new(
            apex.clone(),
            records,
            ZoneType::Primary,
            AxfrPolicy::Deny,
        )
        .map_err(invalid)?;
        let mut catalog = Catalog::new();
        catalog.upsert(apex_lower.clone(), vec![Arc::new(handler)]);
        Ok(Zone { apex_lower, apex, catalog, existing, soa })
    }

    /// Is `name` a knock: exactly one label below the apex and not a name of the zone?
    /// Called on every query: allocates nothing.
    fn is_knock(&self, name: &LowerName) -> bool {
        name.num_labels() == self.apex.num_labels() + 1
            && self.apex_lower.zone_of(name)
            && !self.existing.contains(name)
    }
}

/// Counters the operator (and the benchmarks) can read.
#[derive(Default, Debug)]
pub struct DnsStats {
    /// Every UDP datagram received and every TCP query.
    pub queries: AtomicU64,
    pub knock_answers: AtomicU64,
    pub knocks_queued: AtomicU64,
    /// Knocks dropped because the verifier queue was full (overload).
    pub knocks_dropped: AtomicU64,
    /// Bound labels without the zone's admission tag: look-alikes, never queued.
    pub lookalikes: AtomicU64,
    pub not_tokens: AtomicU64,
    /// Ordinary answers over a source network's rate: dropped, or sent truncated.
    pub rrl_dropped: AtomicU64,
    pub rrl_slipped: AtomicU64,
}

/// What answering whoami needs: its name, the users' keys, the zone key.
struct Whoami {
    name: LowerName,
    keys: Arc<KeyTable>,
    zone_key: Vec<u8>,
    zone: ZoneId,
    nonces: Nonces,
    /// Key for decoy answers; random per process.
    secret: [u8; 32],
}

/// hickory request handler: knock names here, everything else to the catalog.
pub struct KnockHandler {
    zone: Zone,
    /// `<question>.whoami.<zone>`, when the operator enabled it.
    whoami: Option<Whoami>,
    /// The zone key that bound labels must carry an admission tag under.
    admission: Option<ZoneKey>,
    /// Response rate limiting of the zone's ordinary UDP answers ([`rrl`]).
    rrl: Option<rrl::Rrl>,
    knocks: IntakeSender,
    pub stats: Arc<DnsStats>,
}

impl KnockHandler {
    pub fn new(zone: Zone, knocks: impl Into<IntakeSender>, stats: Arc<DnsStats>) -> KnockHandler {
        let knocks = knocks.into();
        KnockHandler { zone, whoami: None, admission: None, rrl: None, knocks, stats }
    }

    /// Limit the zone's ordinary UDP answers to `rate` a second per source network,
    /// every `slip`-th answer over it sent truncated ([`rrl`]). `rate` 0: no limit.
    pub fn with_rrl(mut self, rate: u32, slip: u32) -> KnockHandler {
        self.rrl = (rate > 0).then(|| rrl::Rrl::new(rate, slip));
        self
    }

    /// Answer whoami questions ([`crate::whoami`]) with the querier's address under
    /// the asking user's key, for `nxknock knock --ip auto`.
    pub fn with_whoami(mut self, keys: Arc<KeyTable>, zone_key: Vec<u8>) -> KnockHandler {
        let name = Name::from_ascii("whoami").expect("static label").append_domain(&self.zone.apex);
        let zone = ZoneId::new(&self.zone.apex.to_ascii());
        let mut secret = [0u8; 32];
        rand::fill(&mut secret);
        let nonces = Nonces::new(std::time::Duration::from_secs(300), 65_536);
        self.whoami = name.ok().map(|n| Whoami { name: LowerName::new(&n), keys, zone_key, zone, nonces, secret });
        self
    }

    /// Drop bound labels without the zone's admission tag here, on the DNS threads
    /// (one keyed hash each, spread over every core), so a look-alike flood never
    /// reaches the verifier's queue, whichever resolver relays it.
    pub fn with_admission(mut self, zone_key: ZoneKey) -> KnockHandler {
        self.admission = Some(zone_key);
        self
    }

    async fn answer_whoami<R: ResponseHandler>(
        &self,
        who: &Whoami,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let q = &request.queries.queries()[0];
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        // `whoami.<zone>` itself exists (it has names below it): NOERROR, no data.
        let strings = match q.name().iter().next() {
            Some(label) if q.name() != &who.name => match crate::whoami::parse_label(label, &who.zone_key, &who.zone) {
                Some((nonce, id)) => {
                    let seen = request.src().ip();
                    match who.keys.get(id) {
                        Some(key) if who.nonces.first(&nonce, Instant::now()) => {
                            Some(crate::whoami::answer(&key, &who.zone, &nonce, seen).to_vec())
                        }
                        // No such user, or a question already answered: a decoy.
                        _ => Some(crate::whoami::decoy(&who.secret, &who.zone, &nonce, seen).to_vec()),
                    }
                }
                None => None,
            },
            _ => None,
        };
        let txt = strings.map(|s| Record::from_rdata(q.original().name().clone(), 0, RData::TXT(TXT::new(s))));
        let txt = txt.filter(|_| q.query_type() == RecordType::TXT);
        let resp_edns = response_edns(request);
        let response = MessageResponseBuilder::new(&request.queries, resp_edns.as_ref()).build(
            metadata,
            txt.as_ref(),
            std::iter::empty(),
            txt.is_none().then_some(&self.zone.soa),
            std::iter::empty(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(_) => servfail(request),
        }
    }

    /// Decode the label and queue it for verification. Runs after the answer is
    /// sent, on both paths (hickory's and the UDP fast path in [`fast`]), and for
    /// knocks the capture listener read off the wire (`crate::capture`).
    pub fn enqueue(
        &self,
        label: &[u8],
        seen_from: IpAddr,
        via: Via,
        ecs: Option<Prefix>,
        received: Instant,
    ) -> Offered {
        let token = match Token::parse(label) {
            Ok(t) => t,
            Err(_) => {
                self.stats.not_tokens.fetch_add(1, Ordering::Relaxed);
                return Offered::NotToken;
            }
        };
        if let (Token::Bound(b), Some(key)) = (&token, &self.admission) {
            if b.check_admission(key).is_err() {
                self.stats.lookalikes.fetch_add(1, Ordering::Relaxed);
                return Offered::LookAlike;
            }
        }
        self.queue(Knock { token, seen_from, via, ecs, received })
    }

    /// Queue a decoded knock for the verifier, or count it dropped when the queue is full.
    pub fn queue(&self, knock: Knock) -> Offered {
        match self.knocks.send(knock) {
            Ok(()) => {
                self.stats.knocks_queued.fetch_add(1, Ordering::Relaxed);
                Offered::Queued
            }
            Err(_) => {
                self.stats.knocks_dropped.fetch_add(1, Ordering::Relaxed);
                Offered::Dropped
            }
        }
    }

    /// A DNS message read off the wire on its way to another nameserver (passive
    /// mode): if it is a knock query for this zone, queue it as one, with the same
    /// rules as a query we answer ourselves. Nothing is ever sent.
    pub fn passive(&self, message: &[u8], src: IpAddr, received: Instant) -> Option<Offered> {
        let msg = hickory_proto::op::Message::from_vec(message).ok()?;
        let [q] = msg.queries.as_slice() else { return None };
        if msg.metadata.message_type != MessageType::Query || msg.metadata.op_code != OpCode::Query {
            return None;
        }
        let name = LowerName::new(q.name());
        if !self.zone.is_knock(&name) || q.query_type() == RecordType::AXFR || q.query_type() == RecordType::IXFR {
            return None;
        }
        let ecs = msg.edns.as_ref().and_then(|e| match e.option(EdnsCode::Subnet) {
            Some(EdnsOption::Subnet(cs)) => Some(Prefix::new(cs.addr(), cs.source_prefix())),
            _ => None,
        });
        let label = q.name().iter().next()?;
        Some(self.enqueue(label, src, Via::DnsPassive, ecs, received))
    }
}

/// What became of a knock offered to the verifier queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offered {
    Queued,
    /// The label is no token of any form.
    NotToken,
    /// A bound label without the zone's admission tag.
    LookAlike,
    /// The verifier queue was full.
    Dropped,
}

#[async_trait::async_trait]
impl RequestHandler for KnockHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let received = Instant::now();
        if let (Some(who), [q]) = (&self.whoami, request.queries.queries()) {
            let under = q.name() == &who.name
                || (q.name().num_labels() == who.name.num_labels() + 1 && who.name.zone_of(q.name()));
            if under && request.metadata.op_code == OpCode::Query && request.metadata.message_type == MessageType::Query
            {
                return self.answer_whoami(who, request, response_handle).await;
            }
        }
        let knock_query = match request.queries.queries() {
            [q] if request.metadata.message_type == MessageType::Query
                && request.metadata.op_code == OpCode::Query
                && request.edns.as_ref().is_none_or(|e| e.version() == 0)
                && q.query_type() != RecordType::AXFR
                && q.query_type() != RecordType::IXFR
                && self.zone.is_knock(q.name()) =>
            {
                q
            }
            _ => return self.zone_answer::<R, T>(request, response_handle).await,
        };

        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        metadata.response_code = ResponseCode::NXDomain;
        let resp_edns = response_edns(request);
        let response = MessageResponseBuilder::new(&request.queries, resp_edns.as_ref()).build(
            metadata,
            std::iter::empty(),
            std::iter::empty(),
            std::iter::once(&self.zone.soa),
            std::iter::empty(),
        );
        self.stats.knock_answers.fetch_add(1, Ordering::Relaxed);
        let info = match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(error) => {
                tracing::debug!(%error, "failed to send knock answer");
                servfail(request)
            }
        };
        // Answer first, verify afterwards: nothing below changes what was sent.
        let name = knock_query.original().name();
        if let Some(label) = name.iter().next() {
            let via = if request.protocol() == Protocol::Tcp { Via::DnsTcp } else { Via::DnsUdp };
            let ecs = request.edns.as_ref().and_then(|e| match e.option(EdnsCode::Subnet) {
                Some(EdnsOption::Subnet(cs)) => Some(Prefix::new(cs.addr(), cs.source_prefix())),
                _ => None,
            });
            self.enqueue(label, request.src().ip(), via, ecs, received);
        }
        info
    }
}

impl KnockHandler {
    /// An ordinary answer from the zone, through the rate limiter when it goes over UDP.
    async fn zone_answer<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let verdict = match (&self.rrl, request.protocol()) {
            (Some(rrl), Protocol::Udp) => rrl.check(request.src().ip(), Instant::now()),
            _ => rrl::Verdict::Send,
        };
        match verdict {
            rrl::Verdict::Send => self.zone.catalog.handle_request::<R, T>(request, response_handle).await,
            rrl::Verdict::Drop => {
                self.stats.rrl_dropped.fetch_add(1, Ordering::Relaxed);
                servfail(request)
            }
            rrl::Verdict::Slip => {
                self.stats.rrl_slipped.fetch_add(1, Ordering::Relaxed);
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.truncation = true;
                let edns = response_edns(request);
                let response = MessageResponseBuilder::new(&request.queries, edns.as_ref()).build_no_records(metadata);
                response_handle.send_response(response).await.unwrap_or_else(|_| servfail(request))
            }
        }
    }
}

/// One handler shared by a thread's UDP fast path and hickory's server (TCP).
pub struct SharedHandler(pub Arc<KnockHandler>);

#[async_trait::async_trait]
impl RequestHandler for SharedHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, response_handle: R) -> ResponseInfo {
        self.0.stats.queries.fetch_add(1, Ordering::Relaxed);
        self.0.handle_request::<R, T>(request, response_handle).await
    }
}

/// EDNS for a response: present iff the request had it; version 0, the client's
/// payload size (at least 512). No options are echoed, ECS included, so every
/// knock answer is the same whatever the resolver sent.
fn response_edns(request: &Request) -> Option<Edns> {
    request.edns.as_ref().map(|req| {
        let mut e = Edns::new();
        e.set_max_payload(req.max_payload().max(512));
        e.set_version(0);
        e
    })
}

fn servfail(request: &Request) -> ResponseInfo {
    let mut m = Metadata::response_from_request(&request.metadata);
    m.response_code = ResponseCode::ServFail;
    ResponseInfo::from(hickory_proto::op::Header { metadata: m, counts: Default::default() })
}

/// The sockets of every listen address, bound before any runtime starts.
pub struct Sockets {
    /// The addresses actually bound (port 0 in the config becomes a real port).
    pub local: Vec<SocketAddr>,
    /// `udp[i]`: the UDP sockets for serving thread `i`, one per listen address.
    pub udp: Vec<Vec<std::net::UdpSocket>>,
    pub tcp: Vec<std::net::TcpListener>,
}

/// Bind UDP and TCP on every listen address, with `threads` UDP sockets per
/// address sharing the port through `SO_REUSEPORT`: the kernel spreads clients
/// over them, and each serving thread receives, answers and sends on its own
/// sockets without waking another core. Each gets a large receive buffer so a
/// burst is queued rather than dropped. TCP gets one listener per address.
pub fn bind(listen: &[SocketAddr], threads: usize) -> std::io::Result<Sockets> {
    let threads = threads.max(1);
    let mut out = Sockets { local: Vec::new(), udp: (0..threads).map(|_| Vec::new()).collect(), tcp: Vec::new() };
    for addr in listen {
        let first = udp_socket(*addr).map_err(|e| std::io::Error::new(e.kind(), format!("bind udp {addr}: {e}")))?;
        let local = first.local_addr()?;
        out.udp[0].push(first);
        // The same port for the others (matters when the config asked for port 0).
        for t in 1..threads {
            let s = udp_socket(local).map_err(|e| std::io::Error::new(e.kind(), format!("bind udp {local}: {e}")))?;
            out.udp[t].push(s);
        }
        let tcp = std::net::TcpListener::bind(local)
            .map_err(|e| std::io::Error::new(e.kind(), format!("bind tcp {local}: {e}")))?;
        tcp.set_nonblocking(true)?;
        out.tcp.push(tcp);
        out.local.push(local);
    }
    Ok(out)
}

/// DNS serving threads (and UDP sockets per listen address): one per core.
/// `NXKNOCK_DNS_THREADS` overrides it (the benchmarks use it to show what they give).
pub fn dns_threads() -> usize {
    env_usize("NXKNOCK_DNS_THREADS")
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
        .clamp(1, 64)
}

pub(super) fn env_usize(key: &str) -> Option<usize> {
    std::env::var(key).ok().and_then(|v| v.parse().ok())
}
