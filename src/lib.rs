//! nxknock: a port-knocking daemon that lives inside an authoritative DNS server.
//!
//! The pipeline is `listener -> knock -> verify -> door`, and data flows one way:
//!
//! * [`dns`] answers the zone and turns every knock-shaped query into a [`knock::Knock`]
//!   after the (constant) NXDOMAIN answer has been sent. It never touches the
//!   database or the firewall.
//! * [`token`] is the knock protocol: one-time hash chains and the plain/bound wire forms.
//! * [`verify`] holds the in-memory verifier index, checks a knock against it and
//!   commits the chain advance to the [`store`] *before* asking for a door.
//! * [`firewall`] backends turn a door request into a kernel set element with a timeout.
//!
//! [`client`] is the user side (`otp`, `knock`; [`connect`] for ssh's ProxyCommand,
//! [`profile`] for the options a user would otherwise type), [`config`] the operator's TOML, and
//! [`lab`] the network-namespace harness shared by `nxknock demo`, the tests and the benchmark.

pub mod agent;
pub mod capture;
pub mod check;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod connect;
pub mod credential;
pub mod demo;
pub mod direct;
pub mod dns;
pub mod doors;
pub mod enrol;
pub mod firewall;
#[doc(hidden)]
pub mod fuzzing;
pub mod hooks;
pub mod intake;
pub mod knock;
pub mod lab;
pub mod limit;
pub mod metrics;
pub mod netaddr;
pub mod notify;
pub mod privilege;
pub mod profile;
pub mod reload;
pub mod server;
pub mod store;
pub mod token;
pub mod verify;
pub mod whoami;
