//! `nxknock serve`: wires listener -> knock -> verify -> door and runs until signalled.
//!
//! Start-up order matters: the store and zone are checked and the guard is
//! installed *before* any socket answers, so a daemon that cannot protect its
//! services refuses to start instead of serving knocks that open nothing.
//! On SIGTERM/SIGINT the listeners stop and the guard stays in place (fail closed).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError, sync_channel};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::capture::block::{Blocklist, KernelBlocks};
use crate::config::Config;
use crate::dns::fast::FastPath;
use crate::dns::{DnsStats, KnockHandler, SharedHandler, Zone};
use crate::doors::Doors;
use crate::knock::Knock;
use crate::limit::DeepQueue;
use crate::store::SqliteStore;
use crate::token::ZoneId;
use crate::verify::{Decision, Reject, Verifier};

/// Knocks waiting for the cheap check. Beyond this the listener drops knocks (and
/// counts them) rather than let a flood grow memory without bound; at one hash a
/// knock the verifier drains it far faster than a network can fill it.
const VERIFY_QUEUE: usize = 4096;
/// Knocks waiting for a deep walk, in all and from one lane (see [`DeepQueue`]).
const DEEP_QUEUE: usize = 4096;
const DEEP_QUEUE_PER_LANE: usize = 256;
/// A deep walk at least once every this many cheap checks.
const DEEP_EVERY: u32 = 64;
/// Deep-queue knocks older than this are dropped unwalked.
const DEEP_MAX_WAIT: Duration = Duration::from_secs(10);

pub fn serve(cfg: Config) -> anyhow::Result<()> {
    let zone = Zone::load(&cfg.dns.zone_file, cfg.dns.zone.as_deref())?;
    let zone_id = ZoneId::new(&zone.apex.to_ascii());
    let mut store = SqliteStore::open(&cfg.store.path)?;
    let zone_key = crate::store::Store::zone_key(&mut store)?;
    let mut verifier = Verifier::new(Box::new(store), zone_id.clone(), &cfg)?;
    let whoami_keys = Arc::new(crate::whoami::KeyTable::default());
    if cfg.dns.whoami {
        verifier.publish_keys(whoami_keys.clone())?;
    }
    let doors = Doors::from_config(&cfg);
    // Capture handles open before anything is installed: a missing interface or
    // CAP_NET_RAW stops the daemon here with the interface named.
    let captures = match &cfg.pcap {
        Some(p) => Some((crate::capture::open(p)?, p.clone())),
        None => None,
    };
    let _owner = match cfg.firewall.backend {
        crate::firewall::BackendKind::None => None,
        _ => Some(claim_firewall(doors.backend_name())?),
    };
    doors.install_guard().with_context(|| {
        format!("cannot install the {} guard; refusing to serve knocks that could open nothing", doors.backend_name())
    })?;
    if let Some(p) = &cfg.pcap {
        doors.set_knock_ports(&p.knock_ports()).context("cannot set the knock ports for the block list")?;
    }
    let (adopted, removed) = doors.reconcile(verifier.store_mut()).context("reconcile open doors")?;
    tracing::info!(adopted, removed, "doors reconciled");

    let (tx, rx) = sync_channel::<Knock>(VERIFY_QUEUE);
    let deep = DeepQueue::new(cfg.dns.knocks_per_source, DEEP_QUEUE, DEEP_QUEUE_PER_LANE);
    let users = verifier.active_users();
    let blocklist = cfg.pcap.as_ref().map(|p| {
        let (list, kernel) = Blocklist::new(p.block_after, Duration::from_secs(p.block_seconds));
        spawn_blocker(kernel, &cfg);
        Arc::new(list)
    });
    let verify_blocks = blocklist.clone();
    std::thread::Builder::new()
        .name("verify".into())
        .spawn(move || verify_loop(verifier, doors, rx, deep, verify_blocks))
        .context("spawn verifier thread")?;
    // The whole-file integrity check reads every page: it runs beside serving, so a
    // large database starts fast; a damaged one stops the daemon (the guard stays).
    let db = cfg.store.path.clone();
    std::thread::Builder::new()
        .name("integrity".into())
        .spawn(move || match SqliteStore::check_integrity_of(&db) {
            Ok(None) => tracing::debug!(path = %db.display(), "database integrity check passed"),
            Ok(Some(problem)) => {
                tracing::error!(path = %db.display(), %problem, "database is damaged; stopping (the guard stays in place)");
                std::process::exit(3);
            }
            // Not a verdict on the file (busy, out of descriptors, …): say so and go on.
            Err(error) => tracing::warn!(%error, "could not run the database integrity check"),
        })
        .context("spawn integrity thread")?;

    // One single-threaded runtime per core, each serving its own SO_REUSEPORT
    // UDP sockets through the fast path (batched knocks, the rest via hickory): a
    // query is received, answered and sent on one thread, with no task migration
    // or cross-core wake-up. Thread 0 (this one) also serves TCP (hickory) and
    // handles signals.
    let threads = crate::dns::dns_threads();
    let sockets = crate::dns::bind(&cfg.dns.listen, threads)?;
    let tcp_timeout = Duration::from_secs(cfg.dns.tcp_timeout_seconds);
    let stats = Arc::new(DnsStats::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // One handler (zone, admission key, queue sender) shared by every serving thread:
    // the knock path reads it only, so there is nothing to gain from a copy per thread.
    let mut handler = KnockHandler::new(zone, tx, stats.clone());
    if cfg.dns.whoami {
        handler = handler.with_whoami(whoami_keys, zone_key.to_vec());
    }
    handler = handler.with_admission(crate::token::ZoneKey::new(&zone_key, &zone_id));
    handler = handler.with_rrl(cfg.dns.rrl_per_second, cfg.dns.rrl_slip);
    let handler = Arc::new(handler);
    let mut capture = None;
    if let (Some((opened, pcfg)), Some(block)) = (captures, blocklist) {
        let listener = Arc::new(crate::capture::Listener::new(&pcfg, handler.clone(), block));
        let threads =
            crate::capture::spawn(opened, listener.clone(), stop_rx.clone()).context("spawn capture thread")?;
        capture = Some((listener, threads));
    }
    let mut udp = sockets.udp.into_iter();
    let main_udp = udp.next().unwrap_or_default();
    let mut workers = Vec::new();
    for (i, socks) in udp.enumerate() {
        let handler = handler.clone();
        let mut stop = stop_rx.clone();
        let worker = std::thread::Builder::new()
            .name(format!("dns-{}", i + 1))
            .spawn(move || -> anyhow::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
                rt.block_on(async move {
                    let fast = Arc::new(FastPath::new(handler));
                    let mut tasks = tokio::task::JoinSet::new();
                    for s in socks {
                        tasks.spawn(fast.clone().serve(s));
                    }
                    tokio::select! {
                        _ = stop.changed() => {}
                        Some(r) = tasks.join_next() => r.context("dns task")?.context("dns socket failed")?,
                    }
                    anyhow::Ok(())
                })
                .inspect_err(|error| tracing::error!(error = %format!("{error:#}"), "dns thread stopped"))
            })
            .context("spawn dns thread")?;
        workers.push(worker);
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    let result = runtime.block_on(async move {
        let fast = Arc::new(FastPath::new(handler.clone()));
        let mut udp_tasks = tokio::task::JoinSet::new();
        for s in main_udp {
            udp_tasks.spawn(fast.clone().serve(s));
        }
        // TCP stays on hickory.
        let mut server = hickory_server::Server::new(SharedHandler(handler));
        let has_tcp = !sockets.tcp.is_empty();
        for l in sockets.tcp {
            server.register_listener(tokio::net::TcpListener::from_std(l)?, tcp_timeout, 65_535);
        }
        tracing::info!(
            zone = %zone_id.as_str(), listen = ?sockets.local, users, backend = ?cfg.firewall.backend, threads,
            services = ?cfg.services.iter().map(|s| format!("{}={}/{}", s.name, s.proto, s.port)).collect::<Vec<_>>(),
            "nxknock serving"
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping; the guard stays in place"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping; the guard stays in place"),
            r = server.block_until_done(), if has_tcp => r.context("dns server stopped")?,
            Some(r) = udp_tasks.join_next() => r.context("dns task")?.context("dns socket failed")?,
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), server.shutdown_gracefully()).await;
        anyhow::Ok(())
    });
    let _ = stop_tx.send(true);
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        knock_answers = load(&stats.knock_answers),
        knocks_queued = load(&stats.knocks_queued),
        knocks_dropped = load(&stats.knocks_dropped),
        lookalikes = load(&stats.lookalikes),
        not_tokens = load(&stats.not_tokens),
        rrl_dropped = load(&stats.rrl_dropped),
        rrl_slipped = load(&stats.rrl_slipped),
        "dns totals"
    );
    if let Some((listener, threads)) = capture {
        let s = &listener.stats;
        tracing::info!(
            udp_knocks = load(&s.udp_knocks),
            sequences = load(&s.sequences),
            passive_knocks = load(&s.passive_knocks),
            bad = load(&s.bad),
            ignored_blocked = load(&s.ignored_blocked),
            "capture totals"
        );
        for t in threads {
            let _ = t.join();
        }
    }
    for w in workers {
        let _ = w.join();
    }
    result
}

/// One daemon per firewall per network namespace: two daemons sharing a table
/// would remove each other's doors at start-up. An abstract Unix socket is the
/// lock: abstract names are per network namespace (as the firewall is), and the
/// kernel releases it when the process dies, even by SIGKILL.
pub fn claim_firewall(backend: &str) -> anyhow::Result<std::os::unix::net::UnixListener> {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("nxknock/firewall/{backend}");
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    std::os::unix::net::UnixListener::bind_addr(&addr).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!("another nxknock daemon already owns the {backend} firewall in this network namespace; refusing to share its table")
        } else {
            anyhow::anyhow!("cannot claim the {backend} firewall lock: {e}")
        }
    })
}

/// How often an idle verifier looks for `user revoke` done by another process:
/// a revoked user's doors close within this time, not at the next knock.
const REFRESH_EVERY: Duration = Duration::from_millis(200);

/// The verifier's thread: every queued knock gets the cheap check at once; what
/// it cannot decide waits in the fair [`DeepQueue`] for a full walk, done only
/// when no knock is waiting for its cheap check. Between knocks (and at least every
/// [`REFRESH_EVERY`]) it re-reads the store, so revocations close doors promptly.
fn verify_loop(
    mut verifier: Verifier,
    doors: Doors,
    rx: Receiver<Knock>,
    mut deep: DeepQueue<Knock>,
    blocklist: Option<Arc<Blocklist>>,
) {
    // A refused or shed *direct* knock is a strike against its source (block list).
    let judge = |knock: &Knock, decision: Option<&Decision>| {
        let Some(list) = &blocklist else { return };
        let strike = match decision {
            None => true,
            Some(Decision::Reject { why, .. }) => !matches!(why, Reject::Store(_) | Reject::Lost | Reject::UserRate),
            Some(_) => false,
        };
        if strike && knock.via.is_direct() {
            list.strike(knock.seen_from, Instant::now());
        }
    };
    let mut shed = 0u64;
    let mut since_deep = 0u32;
    loop {
        // Deep walks get their turn when no knock waits for its cheap check, and at
        // least once every DEEP_EVERY knocks, so a flood that keeps the channel busy
        // cannot starve them.
        let deep_turn = !deep.is_empty() && since_deep >= DEEP_EVERY;
        let next = if deep_turn {
            None
        } else if deep.is_empty() {
            match rx.recv_timeout(REFRESH_EVERY) {
                Ok(k) => Some(k),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match rx.try_recv() {
                Ok(k) => Some(k),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => return,
            }
        };
        match next {
            Some(knock) => {
                since_deep += 1;
                tracing::trace!(queued_us = knock.received.elapsed().as_micros() as u64, "knock picked up");
                match verifier.verify_quick(&knock) {
                    Some(decision) => {
                        doors.apply(&knock, &decision, verifier.store_mut());
                        judge(&knock, Some(&decision));
                    }
                    None => {
                        let (src, form, direct) = (knock.seen_from, knock.token.form(), knock.via.is_direct());
                        if let Err(why) = deep.push(src, form, knock, Instant::now()) {
                            if direct {
                                if let Some(list) = &blocklist {
                                    list.strike(src, Instant::now());
                                }
                            }
                            shed += 1;
                            if shed.is_power_of_two() {
                                tracing::debug!(%src, ?why, shed, "knock shed before its deep walk");
                            }
                        }
                    }
                }
            }
            None => {
                since_deep = 0;
                match deep.pop() {
                    // A knock that waited this long is stale: a bound one has expired
                    // anyway, and the user has long since knocked again.
                    Some(knock) if knock.received.elapsed() > DEEP_MAX_WAIT => shed += 1,
                    Some(knock) => {
                        let decision = verifier.verify(&knock);
                        doors.apply(&knock, &decision, verifier.store_mut());
                        judge(&knock, Some(&decision));
                    }
                    None => {
                        if let Err(error) = verifier.refresh() {
                            tracing::error!(%error, "cannot re-read the store");
                        }
                    }
                }
            }
        }
        if let Some(revoked) = verifier.take_changes() {
            doors.sync(&revoked, verifier.store_mut());
        }
    }
}

/// Blocks reach the kernel from a thread of their own with its own backend handle,
/// so neither the capture nor the verify thread ever waits on the firewall for them.
fn spawn_blocker(kernel: KernelBlocks, cfg: &Config) {
    let backend = crate::firewall::backend(cfg.firewall.backend);
    let spawned = std::thread::Builder::new().name("block".into()).spawn(move || {
        for (source, length) in kernel {
            if let Err(error) = backend.block(source, length) {
                tracing::warn!(%source, %error, "cannot add the block to the kernel (nxknock still ignores the source)");
            }
        }
    });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start the block thread; blocks stay in nxknock only");
    }
}
