//! The door stage: turns a verifier [`Decision`] into firewall doors.
//!
//! It knows services (name → proto/port) and the open window; the backend below
//! it knows only addresses and ports, the verifier above it only chains.

use std::time::Duration;

use crate::config::ServiceConfig;
use crate::firewall::{Door, DoorBackend, FirewallError, Guarded};
use crate::knock::Knock;
use crate::verify::{Decision, Reject};

pub struct Doors {
    backend: Box<dyn DoorBackend>,
    services: Vec<ServiceConfig>,
    open_for: Duration,
}

impl Doors {
    pub fn new(backend: Box<dyn DoorBackend>, services: Vec<ServiceConfig>, open_for: Duration) -> Doors {
        Doors { backend, services, open_for }
    }

    /// The guard for every configured service.
    pub fn guarded(services: &[ServiceConfig]) -> Vec<Guarded> {
        services.iter().map(|s| Guarded { proto: s.proto, port: s.port }).collect()
    }

    /// Install the guard; `serve` refuses to start if this fails.
    pub fn install_guard(&self) -> Result<(), FirewallError> {
        self.backend.install_guard(&Self::guarded(&self.services))
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    fn doors_for(&self, addr: std::net::IpAddr, prefix_len: u8, services: &[String]) -> Vec<(String, Door)> {
        self.services
            .iter()
            .filter(|s| services.contains(&s.name))
            .map(|s| {
                (s.name.clone(), Door {
                    addr,
                    prefix_len,
                    proto: s.proto,
                    port: s.port,
                    open_for: self.open_for,
                    single_use: s.single_use,
                })
            })
            .collect()
    }

    /// Act on a decision and log it. Never logs a token; unknown labels log at debug
    /// only, since a flood of them is expected and must not flood the log.
    pub fn apply(&self, knock: &Knock, decision: &Decision) {
        let via = knock.via.as_str();
        let from = knock.seen_from;
        let latency_us = knock.received.elapsed().as_micros() as u64;
        match decision {
            Decision::Open { user, addr, prefix_len, services } => {
                for (name, door) in self.doors_for(*addr, *prefix_len, services) {
                    match self.backend.open(&door) {
                        Ok(()) => tracing::info!(
                            %user, addr = %format_args!("{addr}/{prefix_len}"), service = %name, %via, %from,
                            open_seconds = self.open_for.as_secs(), latency_us, "door opened"
                        ),
                        Err(error) => tracing::error!(%user, service = %name, %error, "could not open door"),
                    }
                }
            }
            Decision::Close { user, addr, prefix_len, services } => {
                for (name, door) in self.doors_for(*addr, *prefix_len, services) {
                    match self.backend.close(&door) {
                        Ok(()) => tracing::info!(%user, addr = %format_args!("{addr}/{prefix_len}"), service = %name, %via, "door closed by close knock"),
                        Err(error) => tracing::error!(%user, service = %name, %error, "could not close door"),
                    }
                }
            }
            Decision::Repeat => tracing::debug!(%via, %from, "repeat of an accepted knock (resolver retry); nothing to do"),
            Decision::Reject(Reject::Unknown) => tracing::debug!(%via, %from, "knock matches no chain"),
            Decision::Reject(Reject::Store(error)) => {
                tracing::error!(%via, %from, %error, "store failed; knock refused (fail closed)")
            }
            Decision::Reject(r) => tracing::warn!(%via, %from, reason = ?r, "knock refused"),
        }
    }
}
