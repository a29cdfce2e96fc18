//! The capture listener: knocks read off the wire with libpcap, for hosts (or
//! networks) where a knock should go straight to the host rather than through DNS.
//!
//! Three kinds, each on when its `[pcap]` key is set (ARCHITECTURE.md, "The capture
//! listener"):
//! - **UDP**: one datagram to the closed `udp_port` carrying a bound label — the same
//!   chains, MAC, admission tag and checks as a DNS knock;
//! - **port sequence**: a plain chain element spread over TCP SYNs or UDP datagrams
//!   to `sequence_ports` ([`crate::token::SequenceCode`], [`assemble`]);
//! - **passive DNS**: knock queries addressed to another nameserver on this host.
//!
//! A kernel BPF filter built from the config keeps every other packet out of user
//! space, the capture runs in immediate mode (no buffering delay), and only inbound
//! packets are read. Like the DNS listener, this one only builds [`Knock`]s: it never
//! touches the store or the firewall. Sources that keep sending bad direct knocks go
//! on the [`block`] list.

pub mod assemble;
pub mod block;
pub mod packet;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use pcap::{Active, Capture, Direction, Linktype, PacketCodec};

use crate::config::{PASSIVE_DNS_PORT, PcapConfig};
use crate::dns::{KnockHandler, Offered};
use crate::knock::{Knock, Via};
use crate::token::Token;
use assemble::{Assembler, Step};
use block::Blocklist;
use packet::{L4, Link};

/// Bytes captured per packet: a knock datagram, a DNS query or a SYN fits easily.
const SNAPLEN: i32 = 1024;
/// How often partial sequences are swept (finished with one loss, or timed out).
const SWEEP_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    #[error(
        "[pcap] cannot capture on interface {iface:?}: {source} (capturing needs CAP_NET_RAW, and the interface must exist)"
    )]
    Open {
        iface: String,
        #[source]
        source: pcap::Error,
    },
    #[error("[pcap] interface {iface:?} has link type {dlt}; nxknock reads Ethernet, Linux cooked (any) and raw IP")]
    Link { iface: String, dlt: i32 },
    #[error(
        "[pcap] {what} {lo}-{hi} overlaps this host's ephemeral ports {elo}-{ehi} \
         (net.ipv4.ip_local_port_range): replies to the host's own traffic would arrive there \
         and look like knocks; pick ports above {ehi} (e.g. sequence_ports = \"61000-61999\")"
    )]
    Ephemeral { what: &'static str, lo: u16, hi: u16, elo: u16, ehi: u16 },
    #[error("[pcap] interface {iface:?}: the kernel refused the filter {filter:?}: {source}")]
    Filter {
        iface: String,
        filter: String,
        #[source]
        source: pcap::Error,
    },
}

/// The BPF filter for `cfg`: only packets that could be a knock reach user space.
/// (libpcap cannot read TCP flags of IPv6 packets; bare SYNs are picked there in
/// [`packet::parse`].)
pub fn filter(cfg: &PcapConfig) -> String {
    let mut parts = Vec::new();
    if let Some(port) = cfg.udp_port {
        parts.push(format!("(udp dst port {port})"));
    }
    if let Some(code) = cfg.sequence_code() {
        let (lo, hi) = code.range();
        parts.push(format!(
            "(ip and tcp dst portrange {lo}-{hi} and (tcp[tcpflags] & (tcp-syn|tcp-ack)) == tcp-syn) \
             or (ip6 and tcp dst portrange {lo}-{hi}) or (udp dst portrange {lo}-{hi})"
        ));
    }
    if cfg.passive_dns {
        parts.push(format!("(udp dst port {PASSIVE_DNS_PORT})"));
    }
    parts.join(" or ")
}

/// One capture handle, open and filtered, not yet reading.
pub struct Opened {
    iface: String,
    cap: Capture<Active>,
    link: Link,
}

/// Open every configured interface. Done at start-up, before the daemon gives up
/// privileges, so a missing interface or capability stops it with a clear error.
pub fn open(cfg: &PcapConfig) -> Result<Vec<Opened>, CaptureError> {
    check_ephemeral(cfg, ephemeral_ports())?;
    let expr = filter(cfg);
    cfg.interfaces
        .iter()
        .map(|iface| {
            let err = |source| CaptureError::Open { iface: iface.clone(), source };
            let mut cap = Capture::from_device(iface.as_str())
                .map_err(err)?
                .immediate_mode(true)
                .promisc(false)
                .snaplen(SNAPLEN)
                .timeout(100)
                .open()
                .map_err(err)?;
            if cap.get_datalink().0 == 276 {
                // libpcap may give `any` the newer cooked header; ask for version 1.
                let _ = cap.set_datalink(Linktype::LINUX_SLL);
            }
            let dlt = cap.get_datalink().0;
            let link = Link::from_dlt(dlt).ok_or(CaptureError::Link { iface: iface.clone(), dlt })?;
            cap.filter(&expr, true).map_err(|source| CaptureError::Filter {
                iface: iface.clone(),
                filter: expr.clone(),
                source,
            })?;
            cap.direction(Direction::In).map_err(err)?;
            close_on_exec(&cap).map_err(|e| err(pcap::Error::IoError(e.kind())))?;
            Ok(Opened { iface: iface.clone(), cap, link })
        })
        .collect()
}

/// This network namespace's ephemeral port range, if it can be read.
pub fn ephemeral_ports() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    Some((it.next()?.ok()?, it.next()?.ok()?))
}

/// The knock ports must lie outside the ephemeral range: answers to the host's own
/// outbound UDP (DNS, NTP) land on ephemeral ports and would count as bad knocks
/// against the servers it talks to.
pub fn check_ephemeral(cfg: &PcapConfig, ephemeral: Option<(u16, u16)>) -> Result<(), CaptureError> {
    let Some((elo, ehi)) = ephemeral else { return Ok(()) };
    let ranges = cfg.udp_port.map(|p| ("udp_port", p, p)).into_iter().chain(cfg.sequence_code().map(|c| {
        let (lo, hi) = c.range();
        ("sequence_ports", lo, hi)
    }));
    for (what, lo, hi) in ranges {
        if lo <= ehi && elo <= hi {
            return Err(CaptureError::Ephemeral { what, lo, hi, elo, ehi });
        }
    }
    Ok(())
}

/// libpcap opens its packet socket without close-on-exec: without this, every
/// program the daemon runs (hooks, `nft`) would inherit a raw socket on the wire.
fn close_on_exec(cap: &Capture<Active>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = cap.as_raw_fd();
    // SAFETY: fcntl on a descriptor this capture owns, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Counters for the exit summary (and metrics).
#[derive(Default, Debug)]
pub struct CaptureStats {
    pub udp_knocks: AtomicU64,
    pub sequences: AtomicU64,
    pub passive_knocks: AtomicU64,
    /// Bad direct knocks: payloads that are no bound knock, sequences that do not add up.
    pub bad: AtomicU64,
    /// Sequence packets from blocked sources, ignored.
    pub ignored_blocked: AtomicU64,
}

/// What every capture thread shares.
pub struct Listener {
    handler: Arc<KnockHandler>,
    udp_port: Option<u16>,
    passive: bool,
    sequences: Option<Mutex<Assembler>>,
    block: Arc<Blocklist>,
    pub stats: CaptureStats,
}

impl Listener {
    pub fn new(cfg: &PcapConfig, handler: Arc<KnockHandler>, block: Arc<Blocklist>) -> Listener {
        Listener {
            handler,
            udp_port: cfg.udp_port,
            passive: cfg.passive_dns,
            sequences: cfg.sequence_code().map(|c| Mutex::new(Assembler::new(c))),
            block,
            stats: CaptureStats::default(),
        }
    }

    fn assembler(&self) -> Option<std::sync::MutexGuard<'_, Assembler>> {
        self.sequences.as_ref().map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// One captured frame.
    pub fn handle(&self, link: Link, frame: &[u8], now: Instant) {
        let Some(seen) = packet::parse(link, frame) else { return };
        match seen.l4 {
            L4::Udp if Some(seen.dst_port) == self.udp_port => self.udp_knock(seen.src, seen.payload, now),
            L4::Udp if self.passive && seen.dst_port == PASSIVE_DNS_PORT => {
                if self.handler.passive(seen.payload, seen.src, now) == Some(Offered::Queued) {
                    self.stats.passive_knocks.fetch_add(1, Ordering::Relaxed);
                }
            }
            l4 => {
                if self.block.is_blocked(seen.src, now) {
                    self.stats.ignored_blocked.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let step = match self.assembler() {
                    Some(mut a) => a.add(seen.src, l4, seen.dst_port, now),
                    None => return,
                };
                self.sequence_step(seen.src, l4, step, now);
            }
        }
    }

    /// A datagram to the UDP knock port: its payload is one bound label (a trailing
    /// newline from `echo` or `socat` is allowed).
    fn udp_knock(&self, src: IpAddr, payload: &[u8], now: Instant) {
        // A bare element is queued too: the verifier refuses it by name
        // (`plain-over-udp`) without spending it, and the log says whose it was.
        match self.handler.enqueue(payload.trim_ascii_end(), src, Via::Udp, None, now) {
            Offered::Queued => {
                self.stats.udp_knocks.fetch_add(1, Ordering::Relaxed);
            }
            Offered::NotToken | Offered::LookAlike => self.bad(src, now),
            Offered::Dropped => {}
        }
    }

    fn sequence_step(&self, src: IpAddr, l4: L4, step: Step, now: Instant) {
        match step {
            Step::Pending => {}
            Step::Bad => self.bad(src, now),
            Step::Copied { original, via, element } => {
                tracing::info!(source = %src, original = %original, "port sequence copied from another source's; the original's source gets it");
                self.bad(src, now);
                self.sequence_step(original, via, Step::Done(element), now);
            }
            Step::Done(element) => {
                self.stats.sequences.fetch_add(1, Ordering::Relaxed);
                let via = if l4 == L4::Syn { Via::TcpSequence } else { Via::UdpSequence };
                tracing::trace!(%src, via = via.as_str(), "port sequence complete");
                self.handler.queue(Knock {
                    token: Token::Plain(element),
                    seen_from: src,
                    via,
                    ecs: None,
                    received: now,
                });
            }
        }
    }

    fn bad(&self, src: IpAddr, now: Instant) {
        self.stats.bad.fetch_add(1, Ordering::Relaxed);
        self.block.strike(src, now);
    }

    /// Finish quiet sequences missing one packet; forget timed-out ones.
    pub fn sweep(&self, now: Instant) {
        let done = match self.assembler() {
            Some(mut a) => a.sweep(now),
            None => return,
        };
        for (src, l4, step) in done {
            self.sequence_step(src, l4, step, now);
        }
    }
}

/// Feeds each captured packet to the listener as the stream reads it.
struct Feed {
    link: Link,
    listener: Arc<Listener>,
}

impl PacketCodec for Feed {
    type Item = ();

    fn decode(&mut self, packet: pcap::Packet<'_>) {
        self.listener.handle(self.link, packet.data, Instant::now());
    }
}

/// Read every opened interface on its own thread until `stop` changes.
pub fn spawn(
    opened: Vec<Opened>,
    listener: Arc<Listener>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    opened
        .into_iter()
        .map(|o| {
            let listener = listener.clone();
            let mut stop = stop.clone();
            std::thread::Builder::new().name(format!("pcap-{}", o.iface)).spawn(move || {
                let iface = o.iface.clone();
                if let Err(error) = read(o, listener, &mut stop) {
                    tracing::error!(%iface, %error, "capture stopped; direct knocks on this interface are not seen");
                }
            })
        })
        .collect()
}

fn read(o: Opened, listener: Arc<Listener>, stop: &mut tokio::sync::watch::Receiver<bool>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut stream = o.cap.setnonblock()?.stream(Feed { link: o.link, listener: listener.clone() })?;
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        tracing::info!(iface = %o.iface, "capture listener reading");
        loop {
            tokio::select! {
                _ = stop.changed() => return Ok(()),
                _ = sweep.tick() => listener.sweep(Instant::now()),
                next = stream.next() => match next {
                    Some(Ok(())) => {}
                    Some(Err(error)) => return Err(error.into()),
                    None => return Ok(()),
                },
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knock_ports_must_lie_outside_the_ephemeral_range() {
        let cfg = |seq: &str| PcapConfig {
            udp_port: Some(62201),
            sequence_ports: Some(seq.to_owned()),
            ..PcapConfig::default()
        };
        let linux = Some((32768, 60999));
        assert!(check_ephemeral(&cfg("61000-61999"), linux).is_ok());
        let e = check_ephemeral(&cfg("40000-40999"), linux).unwrap_err().to_string();
        assert!(e.contains("sequence_ports 40000-40999") && e.contains("32768-60999"), "{e}");
        let e = check_ephemeral(&cfg("61000-61999"), Some((50000, 65000))).unwrap_err().to_string();
        assert!(e.contains("udp_port 62201"), "{e}");
        assert!(check_ephemeral(&cfg("40000-40999"), None).is_ok(), "unknown range: nothing to check");
    }

    #[test]
    fn the_filter_compiles_for_every_combination() {
        let code = "40000-40999".to_owned();
        for (udp, seq, passive) in
            [(true, false, false), (false, true, false), (false, false, true), (true, true, true)]
        {
            let cfg = PcapConfig {
                udp_port: udp.then_some(62201),
                sequence_ports: seq.then(|| code.clone()),
                passive_dns: passive,
                ..PcapConfig::default()
            };
            let expr = filter(&cfg);
            for link in [Linktype::ETHERNET, Linktype::LINUX_SLL, Linktype(12)] {
                let dead = Capture::dead(link).unwrap();
                dead.compile(&expr, true).unwrap_or_else(|e| panic!("{expr}: {e}"));
            }
        }
    }
}
