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
    let mut verifier = verifier;
    let _owner = match cfg.firewall.backend {
        crate::firewall::BackendKind::None => None,
        _ => Some(claim_firewall(doors.backend_name())?),
    };
    doors
        .install_guard()
        .with_context(|| format!("cannot install the {} guard; refusing to serve knocks that could open nothing", doors.backend_name()))?;
    let (adopted, removed) = doors.reconcile(verifier.store_mut()).context("reconcile open doors")?;
    tracing::info!(adopted, removed, "doors reconciled");

    let (tx, rx) = sync_channel::<Knock>(VERIFY_QUEUE);
    let users = verifier.active_users();
    std::thread::Builder::new()
        .name("verify".into())
        .spawn(move || verify_loop(verifier, doors, rx))
        .context("spawn verifier thread")?;

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    runtime.block_on(async move {
        let stats = Arc::new(DnsStats::default());
        let mut handler = KnockHandler::new(zone, tx, stats);
        if cfg.dns.whoami {
            handler = handler.with_whoami();
        }
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

fn verify_loop(mut verifier: Verifier, doors: Doors, rx: std::sync::mpsc::Receiver<Knock>) {
    while let Ok(knock) = rx.recv() {
        let decision = verifier.verify(&knock);
        doors.apply(&knock, &decision, verifier.store_mut());
    }
}
