//! systemd readiness (`Type=notify`): one datagram to `$NOTIFY_SOCKET`.
//!
//! The protocol is a single `AF_UNIX` datagram of `KEY=VALUE` lines (sd_notify(3));
//! a path starting with `@` is an abstract socket. Written by hand because it is
//! ten lines and libsystemd would be the daemon's only C dependency. Without
//! `$NOTIFY_SOCKET` (not under systemd) every call does nothing.
//!
//! `serve` sends `READY=1` only once the guard is installed and every socket is
//! bound, so units ordered after nxknock start when knocks already open doors;
//! around a SIGHUP reload it sends `RELOADING=1` (with `MONOTONIC_USEC`, which
//! systemd ≥ 253 requires) and `READY=1` again.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Send `state` to the service manager, if there is one. Failures are logged at
/// debug and otherwise ignored: readiness is a courtesy, not a reason to stop.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let path = path.to_string_lossy().into_owned();
    if let Err(error) = send(&path, state) {
        tracing::debug!(%error, socket = %path, "sd_notify failed");
    }
}

fn send(path: &str, state: &str) -> std::io::Result<()> {
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
        None => SocketAddr::from_pathname(path)?,
    };
    UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr).map(drop)
}

/// `RELOADING=1` with the monotonic clock in microseconds, as systemd asks.
pub fn reloading() {
    notify(&reloading_state());
}

fn reloading_state() -> String {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000;
    format!("RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading the configuration")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagram_reaches_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        send(path.to_str().unwrap(), "READY=1").unwrap();
        send(path.to_str().unwrap(), &reloading_state()).unwrap();
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let n = sock.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(text.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{text}");
    }
}
