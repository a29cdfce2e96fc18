//! `nxknock serve`: wires listener -> knock -> verify -> door and runs until signalled.
//!
//! Start-up order matters: the store and zone are checked and every socket is
//! bound (DNS, metrics) *before* the guard is installed, so a daemon that cannot
//! answer fails without leaving a guard behind; and the guard is installed before
//! any socket answers, so a daemon that cannot protect its services refuses to
//! start instead of serving knocks that open nothing. Only then does it tell
//! systemd it is ready (`READY=1`, see [`crate::notify`]).
//! SIGHUP reloads the config ([`crate::reload`]); on SIGTERM/SIGINT the listeners
//! stop and the guard stays in place (fail closed).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::capture::block::{Blocklist, KernelBlocks};
use crate::config::Config;
use crate::dns::fast::FastPath;
use crate::dns::{DnsStats, KnockHandler, SharedHandler, Zone};
use crate::doors::Doors;
use crate::intake::IntakeReceiver;
use crate::knock::Knock;
use crate::limit::DeepQueue;
use crate::metrics::Metrics;
use crate::reload;
use crate::store::SqliteStore;
use crate::token::ZoneId;
use crate::verify::{Decision, Reject, Verifier};

/// Knocks waiting for the cheap check. Beyond this the listener drops knocks (and
/// counts them) rather than let a flood grow memory without bound; at one hash a
/// knock the verifier drains it far faster than a network can fill it.
const VERIFY_QUEUE: usize = 4096;
/// Plain knocks over their source's budget waiting behind the main queue ([`crate::intake`]).
const OVERFLOW_QUEUE: usize = 4096;
/// Knocks waiting for a deep walk, in all and from one lane (see [`DeepQueue`]).
const DEEP_QUEUE: usize = 4096;
const DEEP_QUEUE_PER_LANE: usize = 256;
/// A deep walk at least once every this many cheap checks.
const DEEP_EVERY: u32 = 64;
/// Deep-queue knocks older than this are dropped unwalked.
const DEEP_MAX_WAIT: Duration = Duration::from_secs(10);

/// Serve the config at `path` (read again on SIGHUP).
pub fn serve(path: &Path) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    let zone = Zone::load(&cfg.dns.zone_file, cfg.dns.zone.as_deref())?;
    let zone_id = ZoneId::new(&zone.apex.to_ascii());
    let mut store = crate::store::open(&cfg.store)?;
    let zone_key = store.zone_key()?;
    let mut verifier = Verifier::new(store, zone_id.clone(), &cfg)?;
    let whoami_keys = Arc::new(crate::whoami::KeyTable::default());
    if cfg.dns.whoami {
        verifier.publish_keys(whoami_keys.clone())?;
    }
    let metrics = Arc::new(Metrics::default());
    let doors = Doors::from_config(&cfg).with_metrics(metrics.clone());
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
    // Every socket before the guard: an address that cannot be bound stops the
    // daemon here, with nothing installed.
    let threads = crate::dns::dns_threads();
    let sockets = crate::dns::bind(&cfg.dns.listen, threads)
        .context("cannot bind [dns] listen; nothing was installed in the firewall")?;
    let metrics_listener = match &cfg.metrics {
        Some(m) => {
            let l = std::net::TcpListener::bind(m.listen)
                .with_context(|| format!("cannot bind [metrics] listen {}; nothing was installed", m.listen))?;
            l.set_nonblocking(true)?;
            Some(l)
        }
        None => None,
    };
    doors.install_guard().with_context(|| {
        format!("cannot install the {} guard; refusing to serve knocks that could open nothing", doors.backend_name())
    })?;
    if let Some(p) = &cfg.pcap {
        doors.set_knock_ports(&p.knock_ports()).context("cannot set the knock ports for the block list")?;
    }
    let (adopted, removed) = doors.reconcile(verifier.store_mut()).context("reconcile open doors")?;
    tracing::info!(adopted, removed, "doors reconciled");
    // Everything privileged at start-up is done: keep only the three network
    // capabilities, while this is still the only thread (capabilities are per thread).
    // The integrity check's own read-only connection is opened now, while the file
    // is still readable whoever we become next.
    let integrity = cfg.store.sqlite_path().map(|db| (db.to_path_buf(), SqliteStore::open_for_check(db)));
    let housekeeping = verifier.store_mut().housekeeping().context("store housekeeping")?;
    if let Some(d) = &cfg.daemon {
        let (uid, gid) = crate::privilege::become_user(&d.user).context("refusing to serve")?;
        tracing::info!(user = %d.user, uid, gid, "running as an unprivileged user");
    }
    let kept = crate::privilege::restrict().context("cannot give up privileges; refusing to serve")?;
    tracing::info!(
        keep = "CAP_NET_ADMIN,CAP_NET_BIND_SERVICE,CAP_NET_RAW",
        no_new_privs = true,
        bounding_set_cut = !kept.bounding_kept,
        noroot_securebits = !kept.securebits_kept,
        "privileges reduced"
    );

    let (tx, rx) = crate::intake::channel(VERIFY_QUEUE, OVERFLOW_QUEUE);
    let deep = DeepQueue::new(cfg.dns.knocks_per_source, DEEP_QUEUE, DEEP_QUEUE_PER_LANE);
    let users = verifier.active_users();
    let blocklist = cfg.pcap.as_ref().map(|p| {
        let (list, kernel) = Blocklist::new(p.block_after, Duration::from_secs(p.block_seconds));
        spawn_blocker(kernel, &cfg);
        Arc::new(list)
    });
    let verify_blocks = blocklist.clone();
    let (reload_tx, reload_rx) = std::sync::mpsc::channel::<reload::Request>();
    let summary_every = Duration::from_secs(cfg.log.summary_seconds);
    std::thread::Builder::new()
        .name("verify".into())
        .spawn(move || verify_loop(verifier, doors, rx, deep, reload_rx, summary_every, verify_blocks))
        .context("spawn verifier thread")?;
    // The whole-file integrity check reads every page: it runs beside serving, so a
    // large database starts fast; a damaged one stops the daemon (the guard stays).
    // (PostgreSQL checks its own pages: `data_checksums`, `amcheck`.)
    if let Some((db, check)) = integrity {
        spawn_integrity_check(db, check)?;
    }
    if let Some(job) = housekeeping {
        spawn_housekeeping(job)?;
    }

    // One single-threaded runtime per core, each serving its own SO_REUSEPORT
    // UDP sockets through the fast path (batched knocks, the rest via hickory): a
    // query is received, answered and sent on one thread, with no task migration
    // or cross-core wake-up. Thread 0 (this one) also serves TCP (hickory) and
    // handles signals.
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
    let (path, running) = (path.to_owned(), cfg.clone());
    let metrics_stats = stats.clone();
    let result = runtime.block_on(async move {
        if let Some(l) = metrics_listener {
            let l = tokio::net::TcpListener::from_std(l)?;
            tracing::info!(listen = %l.local_addr()?, "metrics at /metrics");
            tokio::spawn(crate::metrics::serve(l, metrics.clone(), metrics_stats));
        }
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(reload_on_hup(hup, path, running, reload_tx, metrics));
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
        crate::notify::notify("READY=1\nSTATUS=serving");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping; the guard stays in place"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping; the guard stays in place"),
            r = server.block_until_done(), if has_tcp => r.context("dns server stopped")?,
            Some(r) = udp_tasks.join_next() => r.context("dns task")?.context("dns socket failed")?,
        }
        crate::notify::notify("STOPPING=1");
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

/// SIGHUP, for as long as the daemon runs: read the config file again and hand
/// what may change to the verify thread ([`crate::reload`]). A file that does not
/// load is refused with the reason in the log, and the daemon goes on as it was.
async fn reload_on_hup(
    mut hup: tokio::signal::unix::Signal,
    path: PathBuf,
    mut running: Config,
    to_verifier: Sender<reload::Request>,
    metrics: Arc<Metrics>,
) {
    while hup.recv().await.is_some() {
        crate::notify::reloading();
        let outcome = match Config::load(&path) {
            Err(error) => Err(format!("{error}")),
            Ok(new) => {
                for key in reload::restart_only(&running, &new) {
                    tracing::warn!(key, "SIGHUP: this key changed but needs a restart; keeping the running value");
                }
                let next = reload::applicable(&running, new);
                let (reply, mut answer) = tokio::sync::oneshot::channel();
                match to_verifier.send(reload::Request { config: next.clone(), reply }) {
                    Err(_) => Err("the verifier thread has stopped".to_owned()),
                    Ok(()) => {
                        // The request cannot be taken back once sent, so wait for its
                        // answer however long it takes: `running` must be what applies.
                        let answered = match tokio::time::timeout(reload::APPLY_WITHIN, &mut answer).await {
                            Ok(a) => a,
                            Err(_) => {
                                tracing::warn!("SIGHUP: the verifier has not taken the new config yet; waiting");
                                answer.await
                            }
                        };
                        match answered {
                            Ok(Ok(())) => {
                                running = next;
                                Ok(())
                            }
                            Ok(Err(why)) => Err(why),
                            Err(_) => Err("the verifier thread has stopped".to_owned()),
                        }
                    }
                }
            }
        };
        metrics.reload(outcome.is_ok());
        match outcome {
            Ok(()) => tracing::info!(
                config = %path.display(),
                services = ?running.services.iter().map(|s| format!("{}={}/{}", s.name, s.proto, s.port)).collect::<Vec<_>>(),
                open_seconds = running.firewall.open_seconds,
                "SIGHUP: config reloaded"
            ),
            Err(error) => {
                tracing::error!(config = %path.display(), %error, "SIGHUP: reload refused; still serving the previous config")
            }
        }
        crate::notify::notify("READY=1\nSTATUS=serving");
    }
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

/// The verify loop's chores run at least once every this many knocks.
const CHORES_EVERY: u32 = 256;

/// What the verify loop does besides knocks: take a reloaded config, sum up the
/// refusals not logged one by one, refresh the gauges.
struct Chores {
    summary_every: Duration,
    summarised: Instant,
    gauged: Option<Instant>,
    shed_counted: u64,
}

impl Chores {
    fn run(
        &mut self,
        reloads: &Receiver<reload::Request>,
        verifier: &mut Verifier,
        doors: &mut Doors,
        deep: &mut DeepQueue<Knock>,
        shed: u64,
    ) {
        if let Ok(req) = reloads.try_recv() {
            let result = reload::apply(&req.config, verifier, doors, deep);
            if result.is_ok() {
                self.summary_every = Duration::from_secs(req.config.log.summary_seconds);
            }
            let _ = req.reply.send(result);
        }
        if self.summarised.elapsed() >= self.summary_every {
            doors.log_summary(self.summary_every);
            self.summarised = Instant::now();
        }
        if self.gauged.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            doors.count_open(verifier.store_mut());
            doors.count_shed(shed - self.shed_counted);
            self.shed_counted = shed;
            self.gauged = Some(Instant::now());
        }
    }
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
    mut doors: Doors,
    rx: IntakeReceiver,
    mut deep: DeepQueue<Knock>,
    reloads: Receiver<reload::Request>,
    summary_every: Duration,
    blocklist: Option<Arc<Blocklist>>,
) {
    // A refused *direct* knock is a strike against its source (block list).
    let judge = |knock: &Knock, decision: &Decision| {
        let Some(list) = &blocklist else { return };
        let strike = match decision {
            Decision::Reject { why, .. } => !matches!(why, Reject::Store(_) | Reject::Lost | Reject::UserRate),
            _ => false,
        };
        if strike && knock.via.is_direct() {
            list.strike(knock.seen_from, Instant::now());
        }
    };
    let mut shed = 0u64;
    let mut since_deep = 0u32;
    let mut chores = Chores { summary_every, summarised: Instant::now(), gauged: None, shed_counted: 0 };
    let (mut since_chores, mut chores_due) = (0u32, true);
    loop {
        // Between two knocks, when idle or every CHORES_EVERY knocks (so a flood
        // adds nothing per knock and cannot postpone them either).
        if chores_due || since_chores >= CHORES_EVERY {
            chores.run(&reloads, &mut verifier, &mut doors, &mut deep, shed);
            (since_chores, chores_due) = (0, false);
        }
        // Deep walks get their turn when no knock waits for its cheap check, and at
        // least once every DEEP_EVERY knocks, so a flood that keeps the channel busy
        // cannot starve them.
        let deep_turn = !deep.is_empty() && since_deep >= DEEP_EVERY;
        let next = if deep_turn {
            None
        } else if deep.is_empty() {
            match rx.recv_timeout(REFRESH_EVERY) {
                Ok(k) => Some(k),
                Err(false) => None,
                Err(true) => return,
            }
        } else {
            match rx.try_recv() {
                Ok(k) => Some(k),
                Err(false) => None,
                Err(true) => return,
            }
        };
        match next {
            Some(knock) => {
                since_deep += 1;
                since_chores += 1;
                tracing::trace!(queued_us = knock.received.elapsed().as_micros() as u64, "knock picked up");
                match verifier.verify_quick(&knock) {
                    Some(decision) => {
                        doors.apply(&knock, &decision, verifier.store_mut());
                        judge(&knock, &decision);
                    }
                    None => {
                        let (src, form) = (knock.seen_from, knock.token.form());
                        // A shed knock is no strike: shedding says the verifier is
                        // busy (or the source's network is), not that the knock was bad.
                        if let Err(why) = deep.push(src, form, knock, Instant::now()) {
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
                chores_due = true;
                match deep.pop() {
                    // A knock that waited this long is stale: a bound one has expired
                    // anyway, and the user has long since knocked again.
                    Some(knock) if knock.received.elapsed() > DEEP_MAX_WAIT => shed += 1,
                    Some(knock) => {
                        let decision = verifier.verify(&knock);
                        doors.apply(&knock, &decision, verifier.store_mut());
                        judge(&knock, &decision);
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

/// The SQLite file's whole-file integrity check, beside serving.
fn spawn_integrity_check(
    db: PathBuf,
    check: Result<crate::store::IntegrityCheck, crate::store::StoreError>,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("integrity".into())
        .spawn(move || match check.and_then(|c| c.run()) {
            Ok(None) => tracing::debug!(path = %db.display(), "database integrity check passed"),
            Ok(Some(problem)) => {
                tracing::error!(path = %db.display(), %problem, "database is damaged; stopping (the guard stays in place)");
                std::process::exit(3);
            }
            // Not a verdict on the file (busy, out of descriptors, …): say so and go on.
            Err(error) => tracing::warn!(%error, "could not run the database integrity check"),
        })
        .context("spawn integrity thread")?;
    Ok(())
}

/// The store's upkeep (WAL checkpoints), beside serving: a failure is logged (at
/// most once a minute) and the next round tries again.
fn spawn_housekeeping(mut job: crate::store::Housekeeping) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("housekeeping".into())
        .spawn(move || {
            let mut said: Option<Instant> = None;
            loop {
                std::thread::sleep(crate::store::HOUSEKEEPING_EVERY);
                if let Err(error) = job() {
                    if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        tracing::warn!(%error, "store housekeeping (WAL checkpoint) failed; retrying");
                        said = Some(Instant::now());
                    }
                }
            }
        })
        .context("spawn housekeeping thread")?;
    Ok(())
}

/// Blocks reach the kernel from a thread of their own with its own backend handle,
/// so neither the capture nor the verify thread ever waits on the firewall for them.
fn spawn_blocker(kernel: KernelBlocks, cfg: &Config) {
    let backend = crate::firewall::backend(cfg.firewall.backend);
    let spawned = std::thread::Builder::new().name("block".into()).spawn(move || {
        // At most KERNEL_BLOCKS_PER_SECOND go to the kernel (each runs `nft`/`ipset`);
        // the rest stay in nxknock's own list, which is what ignores the source.
        const KERNEL_BLOCKS_PER_SECOND: u32 = 20;
        let (mut second, mut sent, mut skipped) = (Instant::now(), 0u32, 0u64);
        for (source, length) in kernel {
            if second.elapsed() >= Duration::from_secs(1) {
                if skipped > 0 {
                    tracing::warn!(skipped, "blocks kept in nxknock only: more than {KERNEL_BLOCKS_PER_SECOND} a second");
                }
                (second, sent, skipped) = (Instant::now(), 0, 0);
            }
            if sent >= KERNEL_BLOCKS_PER_SECOND {
                skipped += 1;
                continue;
            }
            sent += 1;
            if let Err(error) = backend.block(source, length) {
                tracing::warn!(%source, %error, "cannot add the block to the kernel (nxknock still ignores the source)");
            }
        }
    });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start the block thread; blocks stay in nxknock only");
    }
}
