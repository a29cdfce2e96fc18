//! The user's side of direct knocks: sent straight to the host and read there by
//! the capture listener (`crate::capture`), for networks where UDP or TCP to the
//! host gets out.
//!
//! - `--via udp`: one datagram to the server's closed UDP port carrying a *bound*
//!   label — the same label a DNS knock would carry, so it opens only for the
//!   embedded address.
//! - `--via tcp` / `--via udp-seq`: the next element of the *plain* chain as a port
//!   sequence ([`SequenceCode`]): a SYN (`connect()`, abandoned at once) or an empty
//!   datagram to each port, in position order. It opens for the address the server
//!   sees. No privileges needed.
//!
//! Nothing answers a direct knock (the ports are closed), so success is only
//! "sent"; `--wait` tells whether a door opened.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;

use anyhow::{Context, bail};

use crate::credential::Credential;
use crate::token::{Form, SequenceCode};

/// How a direct knock travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direct {
    Udp,
    TcpSequence,
    UdpSequence,
}

impl Direct {
    /// From `--via`; `None` for `dns`.
    pub fn parse(via: &str) -> anyhow::Result<Option<Direct>> {
        Ok(match via {
            "dns" => None,
            "udp" => Some(Direct::Udp),
            "tcp" => Some(Direct::TcpSequence),
            "udp-seq" => Some(Direct::UdpSequence),
            other => bail!("--via {other:?}: one of dns, udp (one datagram), tcp or udp-seq (port sequences)"),
        })
    }
}

/// The server's UDP knock port: `--port`, else the credential's.
pub fn udp_port(cred: &Credential, port: Option<&str>) -> anyhow::Result<u16> {
    match port {
        Some(p) => p.parse().with_context(|| format!("--port {p:?}: a UDP port number for --via udp")),
        None => cred
            .udp_port
            .context("this credential records no UDP knock port (the server's [pcap] udp_port); pass --port PORT"),
    }
}

/// The server's sequence range: `--port LO-HI`, else the credential's.
pub fn sequence_code(cred: &Credential, port: Option<&str>) -> anyhow::Result<SequenceCode> {
    let range = match port {
        Some(p) => p.to_owned(),
        None => cred.sequence_ports.clone().context(
            "this credential records no sequence ports (the server's [pcap] sequence_ports); pass --port LO-HI",
        )?,
    };
    SequenceCode::parse(&range).with_context(|| format!("sequence ports {range:?}"))
}

/// Send the bound label `label` (no zone) in one datagram.
pub fn send_udp(server: IpAddr, port: u16, label: &str) -> anyhow::Result<()> {
    let sock = bind_for(server).context("open a UDP socket")?;
    sock.send_to(label.as_bytes(), SocketAddr::new(server, port))
        .with_context(|| format!("send the knock to {server} port {port}"))?;
    Ok(())
}

fn bind_for(server: IpAddr) -> std::io::Result<UdpSocket> {
    UdpSocket::bind(if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })
}

/// The next `n` plain elements as port sequences, reserved in the credential (one
/// locked read-advance-save for all of them) before they are returned.
pub fn next_sequences(
    cred: &mut Credential,
    path: &Path,
    code: &SequenceCode,
    n: u64,
) -> anyhow::Result<Vec<Vec<u16>>> {
    Ok(cred.take(path, Form::Plain, n)?.iter().map(|e| code.encode(e)).collect())
}

/// Knock the ports in order: a SYN each (a non-blocking connect, dropped as soon as
/// it is sent, so no port waits for an answer) or an empty datagram each.
pub fn send_sequence(server: IpAddr, ports: &[u16], how: Direct) -> anyhow::Result<()> {
    let udp = if how == Direct::UdpSequence { Some(bind_for(server)?) } else { None };
    for &port in ports {
        let to = SocketAddr::new(server, port);
        match &udp {
            Some(sock) => {
                sock.send_to(&[], to).with_context(|| format!("send to {to}"))?;
            }
            None => syn(to).with_context(|| format!("connect to {to}"))?,
        }
    }
    Ok(())
}

/// One SYN to `to`: a non-blocking connect, abandoned once the SYN is on its way.
fn syn(to: SocketAddr) -> std::io::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_nonblocking(true)?;
    match sock.connect(&to.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(()),
        // A closed port may answer with RST before we look: the SYN went out.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
        Err(e) => Err(e),
    }
}

/// `otp --via udp`: the bound labels alone (the datagram's payload).
pub fn label_of(name: &str) -> &str {
    name.split('.').next().unwrap_or(name)
}
