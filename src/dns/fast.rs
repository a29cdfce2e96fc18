//! The UDP fast path: knock queries answered without hickory.
//!
//! Why: under a flood of random labels almost every query is a knock, and
//! hickory's per-query path (a task per request, a full decode and encode,
//! several allocations, one `recvfrom` and one `sendto` each) made nxknock serve
//! at ~0.8 of knotd's rate. Here each DNS thread reads its `SO_REUSEPORT` socket
//! in batches (`recvmmsg`), recognises a knock with a few byte comparisons
//! (cheap check before parse), builds the answer by copying (header bits, the
//! question verbatim, a pre-encoded SOA) and sends the batch's answers in one
//! `sendmmsg`. Only then are the labels decoded and queued, exactly as the
//! hickory path does (`KnockHandler::enqueue`).
//!
//! Anything the cheap check does not recognise — static names, `whoami`,
//! malformed packets, EDNS with options (ECS), TSIG, other opcodes — is handed
//! to hickory's handling (`KnockHandler` as a `RequestHandler`) and its answer
//! sent on the same socket, so behaviour outside the fast path is unchanged.
//! The fast answer is byte-identical to hickory's (tested below), so a knock
//! cannot tell which path answered it, and a valid and an invalid knock still
//! get the same answer at the same time.

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use hickory_proto::op::{Header, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{Name, Record};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};
use hickory_server::net::NetError;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder, Queries};
use tokio::net::UdpSocket;

use super::KnockHandler;
use super::socket::{BATCH, Batch};
use crate::knock::Via;

/// The fast path only sends answers that fit the plain-DNS UDP limit, so it never truncates.
pub(super) const MAX_FAST_ANSWER: usize = 512;
const HEADER: usize = 12;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;

/// Everything needed to recognise and answer a knock from its bytes alone.
pub struct FastPath {
    handler: Arc<KnockHandler>,
    /// The apex in wire format, lower case (length bytes never collide with letters).
    apex_wire: Vec<u8>,
    /// Lower-case labels directly under the apex that are not knocks: owner names
    /// of the zone, empty non-terminals, and `whoami` when enabled.
    taken: HashSet<Vec<u8>>,
    /// `soa[len]`: the authority section (the SOA record) exactly as hickory encodes
    /// it after a question whose label is `len` bytes long, or `None` when the
    /// answer would not fit [`MAX_FAST_ANSWER`]. It depends on the length only
    /// because hickory compresses the SOA's names against the SOA's own owner
    /// name, whose offset is the question's length (the echoed question is not a
    /// compression target for it).
    soa: Vec<Option<Vec<u8>>>,
}

/// A datagram the cheap check accepted.
#[derive(Clone, Copy, Debug)]
struct Knockish {
    /// End of the question (name + type + class).
    question_end: usize,
    /// The query's EDNS payload, if it had an OPT record.
    payload: Option<u16>,
}

impl FastPath {
    pub fn new(handler: Arc<KnockHandler>) -> FastPath {
        let zone = &handler.zone;
        let mut apex_wire = Vec::new();
        for label in zone.apex.iter() {
            apex_wire.push(label.len() as u8);
            apex_wire.extend(label.iter().map(u8::to_ascii_lowercase));
        }
        apex_wire.push(0);
        let depth = zone.apex.num_labels() + 1;
        let mut taken: HashSet<Vec<u8>> = zone
            .existing
            .iter()
            .filter(|n| n.num_labels() == depth)
            .filter_map(|n| Name::from(n.clone()).iter().next().map(|l| l.to_ascii_lowercase()))
            .collect();
        if handler.whoami.is_some() {
            taken.insert(b"whoami".to_vec());
        }
        let soa = (0..=63).map(|len| if len == 0 { None } else { soa_after_label_of(&handler, len) }).collect();
        FastPath { handler, apex_wire, taken, soa }
    }

    /// The cheap check: is this datagram a plain knock query the fast path may answer?
    /// Looks at fixed offsets only; anything unusual is `None` (slow path).
    fn classify(&self, q: &[u8]) -> Option<Knockish> {
        if q.len() < HEADER {
            return None;
        }
        let be16 = |i: usize| u16::from_be_bytes([q[i], q[i + 1]]);
        // QR=0, OPCODE=0; QD=1, AN=0, NS=0, AR<=1.
        if q[2] & 0xF8 != 0 || be16(4) != 1 || be16(6) != 0 || be16(8) != 0 || be16(10) > 1 {
            return None;
        }
        let len = *q.get(HEADER)? as usize;
        if !(1..=63).contains(&len) {
            return None; // also rejects compression pointers
        }
        let label = q.get(HEADER + 1..HEADER + 1 + len)?;
        let apex_at = HEADER + 1 + len;
        let apex = q.get(apex_at..apex_at + self.apex_wire.len())?;
        if !apex.eq_ignore_ascii_case(&self.apex_wire) || 1 + len + self.apex_wire.len() > 255 {
            return None;
        }
        let qtype_at = apex_at + self.apex_wire.len();
        if q.len() < qtype_at + 4 {
            return None;
        }
        // No meta types: AXFR/IXFR/TSIG/TKEY/OPT/0 go to hickory.
        if matches!(be16(qtype_at), 0 | TYPE_OPT | 249..=252) || be16(qtype_at + 2) != CLASS_IN {
            return None;
        }
        let question_end = qtype_at + 4;
        let payload = match be16(10) {
            0 if q.len() == question_end => None,
            // One OPT at the root, EDNS version 0, no options (RDLEN 0), nothing after it.
            1 if q.len() == question_end + 11
                && q[question_end] == 0
                && be16(question_end + 1) == TYPE_OPT
                && q[question_end + 6] == 0
                && be16(question_end + 9) == 0 =>
            {
                Some(be16(question_end + 3))
            }
            _ => return None,
        };
        let mut lower = [0u8; 63];
        for (d, s) in lower.iter_mut().zip(label) {
            *d = s.to_ascii_lowercase();
        }
        if self.taken.contains(&lower[..len]) {
            return None;
        }
        let soa = self.soa[len].as_ref()?;
        if question_end + soa.len() + if payload.is_some() { 11 } else { 0 } > MAX_FAST_ANSWER {
            return None;
        }
        Some(Knockish { question_end, payload })
    }

    /// The answer to an accepted knock query, built by copying: what hickory's
    /// `KnockHandler` would send (NXDOMAIN, AA, RD and CD copied, the question
    /// verbatim, the SOA, and an OPT with max(512, payload) if the query had one).
    fn answer(&self, q: &[u8], k: Knockish, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&q[0..2]);
        out.push(0x80 | 0x04 | (q[2] & 0x01)); // QR, AA, RD
        out.push((q[3] & 0x10) | ResponseCode::NXDomain.low()); // CD, RCODE
        out.extend_from_slice(&[0, 1, 0, 0, 0, 1, 0, u8::from(k.payload.is_some())]);
        out.extend_from_slice(&q[HEADER..k.question_end]);
        let len = q[HEADER] as usize;
        if let Some(soa) = &self.soa[len] {
            out.extend_from_slice(soa);
        }
        if let Some(p) = k.payload {
            out.extend_from_slice(&[0, 0, 41]);
            out.extend_from_slice(&p.max(512).to_be_bytes());
            out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        }
    }

    /// Serve one UDP socket until it fails: batches of knocks here, the rest through hickory.
    pub async fn serve(self: Arc<Self>, sock: std::net::UdpSocket) -> io::Result<()> {
        let sock = Arc::new(UdpSocket::from_std(sock)?);
        let mut batch = Batch::new();
        loop {
            sock.readable().await?;
            loop {
                let n = match batch.try_recv(&sock) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(error) => {
                        tracing::debug!(%error, "recvmmsg");
                        break;
                    }
                };
                self.handle_batch(&sock, &mut batch, n).await;
                if n == BATCH {
                    // Let the thread's other sockets (and TCP) have a turn under a flood.
                    tokio::task::yield_now().await;
                }
            }
        }
    }

    async fn handle_batch(&self, sock: &Arc<UdpSocket>, batch: &mut Batch, n: usize) {
        let received = Instant::now();
        self.handler.stats.queries.fetch_add(n as u64, Ordering::Relaxed);
        // `fast[i]`: datagram `i` is a knock answered here; `None` for the rest.
        let mut fast = [None::<Knockish>; BATCH];
        let mut answers = 0;
        for (i, k) in fast.iter_mut().enumerate().take(n) {
            if batch.truncated(i) || batch.source(i).is_none() {
                continue;
            }
            *k = self.classify(batch.datagram(i));
            if let Some(k) = *k {
                let (q, out) = batch.datagram_and_answer(i);
                self.answer(q, k, out);
                answers += 1;
            }
        }
        if answers > 0 {
            self.handler.stats.knock_answers.fetch_add(answers, Ordering::Relaxed);
            let which: Vec<bool> = fast[..n].iter().map(Option::is_some).collect();
            batch.send_answers(sock, &which).await;
        }
        // Answers first, verification afterwards: nothing below changes what was sent.
        for (i, k) in fast.iter().enumerate().take(n) {
            if let (Some(_), Some(src)) = (k, batch.source(i)) {
                let q = batch.datagram(i);
                let label = &q[HEADER + 1..HEADER + 1 + q[HEADER] as usize];
                self.handler.enqueue(label, src.ip(), Via::DnsUdp, None, received);
            }
        }
        // Everything else through hickory, one at a time (in-memory lookups only).
        for (i, k) in fast.iter().enumerate().take(n) {
            if let (None, Some(src)) = (k, batch.source(i)) {
                let bytes = batch.datagram(i).to_vec();
                self.slow(sock, bytes, src).await;
            }
        }
    }

    /// What hickory's server does with a UDP datagram, with `KnockHandler` behind it.
    async fn slow(&self, sock: &Arc<UdpSocket>, bytes: Vec<u8>, src: SocketAddr) {
        let reply = UdpReply { sock: sock.clone(), dst: src };
        slow_path(&self.handler, bytes, src, reply).await;
    }
}

/// hickory's request handling for one UDP datagram (as `hickory_server::Server`
/// does it): drop what has no header or is a response; FORMERR what does not
/// decode; hand the rest to the handler. (Unanswerable sources were dropped
/// before: [`Batch::source`].)
async fn slow_path<R: ResponseHandler>(handler: &KnockHandler, bytes: Vec<u8>, src: SocketAddr, mut reply: R) {
    let header = match Header::read(&mut BinDecoder::new(&bytes)) {
        Ok(h) => h,
        Err(_) => return,
    };
    match Request::from_bytes(bytes, src, Protocol::Udp) {
        Ok(request) => {
            if request.metadata.message_type == MessageType::Response {
                return;
            }
            handler.handle_request::<_, TokioTime>(&request, reply).await;
        }
        Err(error) => {
            tracing::debug!(%error, %src, "undecodable query: FORMERR");
            // No queries: what hickory echoes in a FORMERR.
            let Ok(queries) = Queries::read(&mut BinDecoder::new(&[]), 0) else { return };
            let response =
                MessageResponseBuilder::new(&queries, None).error_msg(&header.metadata, ResponseCode::FormErr);
            let _ = reply.send_response(response).await;
        }
    }
}

/// Encode a response for UDP as hickory's `ResponseHandle` does: limited to the
/// client's EDNS payload (512 without EDNS), SERVFAIL if it cannot be encoded.
/// Largest UDP answer sent to anyone (DNS Flag Day 2020's safe size).
const MAX_UDP_ANSWER: u16 = 1232;

fn encode_udp<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> Result<(ResponseInfo, Vec<u8>), NetError> {
    let id = response.metadata().id;
    // The client's EDNS payload, but never more than MAX_UDP_ANSWER: a forged source
    // cannot draw large answers (bigger ones go out truncated; real clients retry
    // over TCP). Knock answers are far smaller, so their bytes are unchanged.
    let max = response.edns().map_or(512, |e| e.max_payload()).min(MAX_UDP_ANSWER);
    let mut bytes = Vec::with_capacity(512);
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_max_size(max);
    match response.destructive_emit(&mut encoder) {
        Ok(info) => Ok((info, bytes)),
        Err(error) => {
            tracing::error!(%error, "error encoding message");
            bytes.clear();
            let mut encoder = BinEncoder::new(&mut bytes);
            encoder.set_max_size(512);
            let mut metadata = Metadata::new(id, MessageType::Response, OpCode::Query);
            metadata.response_code = ResponseCode::ServFail;
            let header = Header { metadata, counts: Default::default() };
            header.emit(&mut encoder).map_err(|e| NetError::from(e.to_string()))?;
            Ok((ResponseInfo::from(header), bytes))
        }
    }
}

/// The slow path's answer goes back on the socket the query came in on.
#[derive(Clone)]
struct UdpReply {
    sock: Arc<UdpSocket>,
    dst: SocketAddr,
}

#[async_trait::async_trait]
impl ResponseHandler for UdpReply {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let (info, bytes) = encode_udp(response)?;
        self.sock.send_to(&bytes, self.dst).await?;
        Ok(info)
    }
}

/// The SOA record as hickory's knock answer carries it after a `len`-byte label
/// (see [`FastPath::soa`]): taken from hickory's own encoding of such an answer.
fn soa_after_label_of(handler: &KnockHandler, len: usize) -> Option<Vec<u8>> {
    let mut q = vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, len as u8];
    q.extend(std::iter::repeat_n(b'a', len));
    for label in handler.zone.apex.iter() {
        q.push(label.len() as u8);
        q.extend_from_slice(label);
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let question_end = q.len();
    let request = Request::from_bytes(q, SocketAddr::from(([127, 0, 0, 1], 53)), Protocol::Udp).ok()?;
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.authoritative = true;
    metadata.response_code = ResponseCode::NXDomain;
    let response = MessageResponseBuilder::new(&request.queries, None).build(
        metadata,
        std::iter::empty(),
        std::iter::empty(),
        std::iter::once(&handler.zone.soa),
        std::iter::empty(),
    );
    let (info, bytes) = encode_udp(response).ok()?;
    let fits = !info.truncation && info.counts().authorities == 1 && bytes.len() < MAX_FAST_ANSWER;
    fits.then(|| bytes[question_end..].to_vec())
}

/// Captures what hickory's path would send (for [`Differential`] and the tests).
#[derive(Clone, Default)]
struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let (info, bytes) = encode_udp(response)?;
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = bytes;
        Ok(info)
    }
}

/// The fast path and hickory's path side by side, for the fuzz target and the
/// corpus replay (`crate::fuzzing`): neither may panic on any datagram, and where
/// the fast path answers, its bytes must be exactly hickory's.
#[doc(hidden)]
pub struct Differential {
    fp: FastPath,
    _knocks: std::sync::Mutex<std::sync::mpsc::Receiver<crate::knock::Knock>>,
    rt: tokio::runtime::Runtime,
}

impl Differential {
    pub fn new(zone: super::Zone) -> Differential {
        let (tx, rx) = std::sync::mpsc::sync_channel(16);
        let h = KnockHandler::new(zone, tx, Arc::new(super::DnsStats::default()))
            .with_whoami(Default::default(), vec![0; 16]);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        Differential { fp: FastPath::new(Arc::new(h)), _knocks: std::sync::Mutex::new(rx), rt }
    }

    /// hickory's answer to `q` (empty when it sends nothing).
    pub fn hickory(&self, q: &[u8]) -> Vec<u8> {
        let cap = Capture::default();
        self.rt.block_on(slow_path(
            &self.fp.handler,
            q.to_vec(),
            SocketAddr::from(([192, 0, 2, 7], 5353)),
            cap.clone(),
        ));
        cap.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The fast path's answer, if it takes `q` at all.
    pub fn fast(&self, q: &[u8]) -> Option<Vec<u8>> {
        let k = self.fp.classify(q)?;
        let mut out = Vec::new();
        self.fp.answer(q, k, &mut out);
        Some(out)
    }

    /// Both paths on `q`; an error when the fast path's bytes differ from hickory's.
    pub fn check(&self, q: &[u8]) -> Result<(), String> {
        let slow = self.hickory(q);
        match self.fast(q) {
            Some(fast) if fast != slow => Err(format!("fast {fast:02x?} != hickory {slow:02x?} for {q:02x?}")),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::sync_channel;

    use crate::dns::{DnsStats, Zone};

    fn fast_path(whoami: bool) -> (FastPath, std::sync::mpsc::Receiver<crate::knock::Knock>) {
        let zone_file = concat!(env!("CARGO_MANIFEST_DIR"), "/zones/knock.example.com.zone");
        let zone = Zone::load(std::path::Path::new(zone_file), None).expect("zone");
        let (tx, rx) = sync_channel(16);
        let mut h = KnockHandler::new(zone, tx, Arc::new(DnsStats::default()));
        if whoami {
            h = h.with_whoami(Default::default(), vec![0; 16]);
        }
        (FastPath::new(Arc::new(h)), rx)
    }

    fn query(id: u16, flags: [u8; 2], label: &[u8], apex: &[&[u8]], qtype: u16, opt: Option<&[u8]>) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&flags);
        q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(opt.is_some())]);
        q.push(label.len() as u8);
        q.extend_from_slice(label);
        for l in apex {
            q.push(l.len() as u8);
            q.extend_from_slice(l);
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        if let Some(o) = opt {
            q.extend_from_slice(o);
        }
        q
    }

    fn hickory_answer(fp: &FastPath, q: &[u8]) -> Vec<u8> {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let cap = Capture::default();
        rt.block_on(slow_path(&fp.handler, q.to_vec(), SocketAddr::from(([192, 0, 2, 7], 5353)), cap.clone()));
        cap.0.lock().unwrap().clone()
    }

    fn apex_labels(fp: &FastPath) -> Vec<Vec<u8>> {
        fp.handler.zone.apex.iter().map(<[u8]>::to_vec).collect()
    }

    /// EDNS OPT with payload `p`, version 0, DO as given, no options.
    fn opt(p: u16, dnssec_ok: bool) -> Vec<u8> {
        let mut o = vec![0, 0, 41];
        o.extend_from_slice(&p.to_be_bytes());
        o.extend_from_slice(&[0, 0, if dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
        o
    }

    #[test]
    fn fast_answers_are_byte_identical_to_hickorys() {
        let (fp, _rx) = fast_path(true);
        let apex = apex_labels(&fp);
        let upper: Vec<Vec<u8>> = apex.iter().map(|l| l.to_ascii_uppercase()).collect();
        let token_label = b"abcdefghijklmnopqrstuvwxyz234567abcdefghijklmnopqrstu".to_vec();
        let labels: Vec<Vec<u8>> = vec![
            b"x".to_vec(),
            b"RaNdOmLaBeL".to_vec(),
            token_label.clone(),
            token_label.to_ascii_uppercase(),
            vec![b'z'; 63],
            vec![0, b'.', 0xff, b'\\', 0x80],
        ];
        let mut checked = 0;
        for label in &labels {
            for apex in [&apex, &upper] {
                let apex: Vec<&[u8]> = apex.iter().map(Vec::as_slice).collect();
                for flags in [[0x00, 0x00], [0x01, 0x00], [0x01, 0x10], [0x00, 0x30]] {
                    for qtype in [1u16, 16, 28, 255, 6] {
                        for o in [None, Some(opt(1232, false)), Some(opt(100, true)), Some(opt(4096, false))] {
                            let q = query(0xBEEF, flags, label, &apex, qtype, o.as_deref());
                            let k = fp.classify(&q).unwrap_or_else(|| panic!("not fast: {q:?}"));
                            let mut fast = Vec::new();
                            fp.answer(&q, k, &mut fast);
                            assert_eq!(fast, hickory_answer(&fp, &q), "query {q:?}");
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 100);
    }

    #[test]
    fn no_udp_answer_is_larger_than_the_cap_whatever_the_client_asks() {
        let mut text = crate::lab::config::ZONE_TEXT.to_owned();
        for i in 0..12 {
            text.push_str(&format!("big IN TXT \"{}{i}\"\n", "x".repeat(200)));
        }
        let zone = crate::dns::Zone::parse(text, std::path::Path::new("big.zone"), None).expect("zone");
        let d = Differential::new(zone);
        let apex: Vec<Vec<u8>> = d.fp.handler.zone.apex.iter().map(<[u8]>::to_vec).collect();
        let apex: Vec<&[u8]> = apex.iter().map(Vec::as_slice).collect();
        let q = query(7, [0, 0], b"big", &apex, 16, Some(&opt(4096, false)));
        let a = d.hickory(&q);
        assert!(a.len() <= usize::from(MAX_UDP_ANSWER), "{} bytes", a.len());
        assert_ne!(a[2] & 0x02, 0, "sent truncated (TC): the client retries over TCP");
    }

    #[test]
    fn everything_unusual_goes_to_hickory() {
        let (fp, _rx) = fast_path(true);
        let apex = apex_labels(&fp);
        let apex: Vec<&[u8]> = apex.iter().map(Vec::as_slice).collect();
        let ok = query(1, [0, 0], b"knock", &apex, 1, None);
        assert!(fp.classify(&ok).is_some());
        let slow = |q: &[u8]| assert!(fp.classify(q).is_none(), "{q:?}");
        // Owner names of the zone (any case) and whoami.
        slow(&query(1, [0, 0], b"ns1", &apex, 1, None));
        slow(&query(1, [0, 0], b"NS1", &apex, 1, None));
        slow(&query(1, [0, 0], b"whoami", &apex, 16, None));
        // Response, NOTIFY, AXFR/IXFR, class CH.
        slow(&query(1, [0x80, 0], b"knock", &apex, 1, None));
        slow(&query(1, [0x20, 0], b"knock", &apex, 1, None));
        slow(&query(1, [0, 0], b"knock", &apex, 252, None));
        slow(&query(1, [0, 0], b"knock", &apex, 251, None));
        let mut ch = ok.clone();
        let n = ch.len();
        ch[n - 1] = 3;
        slow(&ch);
        // Trailing garbage, truncated, an option in the OPT (ECS), EDNS version 1, two labels.
        let mut trailing = ok.clone();
        trailing.push(0);
        slow(&trailing);
        slow(&ok[..ok.len() - 1]);
        let mut ecs = opt(1232, false);
        ecs[10] = 8;
        ecs.extend_from_slice(&[0, 8, 0, 4, 0, 1, 0, 0]);
        slow(&query(1, [0, 0], b"knock", &apex, 1, Some(&ecs)));
        let mut v1 = opt(1232, false);
        v1[6] = 1;
        slow(&query(1, [0, 0], b"knock", &apex, 1, Some(&v1)));
        let mut deeper = vec![b"a".as_slice()];
        deeper.extend(apex.iter().copied());
        slow(&query(1, [0, 0], b"knock", &deeper, 1, None));
        // Garbage of every short length.
        for len in 0..ok.len() {
            slow(&ok[..len]);
        }
    }

    #[test]
    fn the_slow_path_answers_formerr_or_drops_as_hickory_does() {
        let (fp, _rx) = fast_path(false);
        assert!(hickory_answer(&fp, &[1, 2, 3]).is_empty(), "no header: dropped");
        let garbage = [0xAB, 0xCD, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xC0, 0xFF];
        let ans = hickory_answer(&fp, &garbage);
        assert_eq!(&ans[..2], &[0xAB, 0xCD]);
        assert_eq!(ans[3] & 0x0F, 1, "FORMERR");
    }

    #[test]
    fn enqueue_after_fast_answer_decodes_the_label() {
        let (fp, rx) = fast_path(false);
        let apex = apex_labels(&fp);
        let apex: Vec<&[u8]> = apex.iter().map(Vec::as_slice).collect();
        let q = query(1, [0, 0], b"not-a-token", &apex, 1, None);
        assert!(fp.classify(&q).is_some());
        fp.handler.enqueue(b"not-a-token", "192.0.2.1".parse().unwrap(), Via::DnsUdp, None, Instant::now());
        assert_eq!(fp.handler.stats.not_tokens.load(Ordering::Relaxed), 1);
        assert!(rx.try_recv().is_err());
    }
}
