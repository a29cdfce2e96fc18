//! `nxknock serve`: wires listener -> knock -> verify -> door and runs until signalled.
//!
//! Start-up order matters: the store and zone are checked and the guard is
//! installed *before* any socket answers, so a daemon that cannot protect its
//! services refuses to start instead of serving knocks that open nothing.
//! On SIGTERM/SIGINT the listeners stop and the guard stays in place (fail closed).

use std::sync::Arc;
use std::sync::mpsc::sync_channel;
use std::time::Duration;

use anyhow::Context;

use crate::config::Config;
use crate::dns::{DnsStats, KnockHandler, Zone};
use crate::doors::Doors;
use crate::knock::Knock;
use crate::store::SqliteStore;
use crate::token::ZoneId;
use crate::verify::Verifier;

/// Knocks waiting for verification. Beyond this the listener drops knocks (and
/// counts them) rather than let a flood grow memory without bound.
const VERIFY_QUEUE: usize = 4096;

pub fn serve(cfg: Config) -> anyhow::Result<()> {
    let zone = Zone::load(&cfg.dns.zone_file, cfg.dns.zone.as_deref())?;
    let zone_id = ZoneId::new(&zone.apex.to_ascii());
    let store = SqliteStore::open(&cfg.store.path)?;
    let verifier = Verifier::new(Box::new(store), zone_id.clone(), &cfg)?;
    let doors = Doors::new(
        crate::firewall::backend(cfg.firewall.backend),
        cfg.services.clone(),
        Duration::from_secs(cfg.firewall.open_seconds),
    );
    doors
        .install_guard()
        .with_context(|| format!("cannot install the {} guard; refusing to serve knocks that could open nothing", doors.backend_name()))?;

    let (tx, rx) = sync_channel::<Knock>(VERIFY_QUEUE);
    let users = verifier.active_users();
    std::thread::Builder::new()
        .name("verify".into())
        .spawn(move || verify_loop(verifier, doors, rx))
        .context("spawn verifier thread")?;

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    runtime.block_on(async move {
        let stats = Arc::new(DnsStats::default());
        let handler = KnockHandler::new(zone, tx, stats);
        let mut server = hickory_server::Server::new(handler);
        let bound = crate::dns::bind(&mut server, &cfg.dns.listen, Duration::from_secs(cfg.dns.tcp_timeout_seconds)).await?;
        tracing::info!(
            zone = %zone_id.as_str(), listen = ?bound, users, backend = ?cfg.firewall.backend,
            services = ?cfg.services.iter().map(|s| format!("{}={}/{}", s.name, s.proto, s.port)).collect::<Vec<_>>(),
            "nxknock serving"
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping; the guard stays in place"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping; the guard stays in place"),
            r = server.block_until_done() => r.context("dns server stopped")?,
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), server.shutdown_gracefully()).await;
        anyhow::Ok(())
    })
}

fn verify_loop(mut verifier: Verifier, doors: Doors, rx: std::sync::mpsc::Receiver<Knock>) {
    while let Ok(knock) = rx.recv() {
        let decision = verifier.verify(&knock);
        doors.apply(&knock, &decision);
    }
}
