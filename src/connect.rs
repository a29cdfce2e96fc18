//! `nxknock connect`: after the knock, get through the door and carry stdin and
//! stdout over the connection, for `ssh -o ProxyCommand="nxknock connect %h %p"`.
//!
//! The NXDOMAIN leaves the server before the door opens (ARCHITECTURE.md, "DNS"),
//! so the first SYN may meet the guard, which drops it; the kernel would retry
//! only after a second. [`open_door`] therefore starts a new connection attempt
//! every [`RETRY_EVERY`] and keeps the earlier ones pending: it never gives up on
//! an attempt that might already have been let in. The first attempt that
//! connects *is* the connection returned, never a probe that is closed and
//! redone, because a single-use door admits exactly one new connection; the
//! others are abandoned when one wins or the time is up.
//!
//! [`relay`] copies both ways on two threads and passes each end-of-file on: the
//! end of stdin becomes a TCP half-close (ssh's last bytes still arrive), the
//! server's end of stream closes our stdout (ssh sees it and exits).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// How often a new connection attempt starts while the door is not yet open.
pub const RETRY_EVERY: Duration = Duration::from_millis(15);

/// Why no connection got through.
#[derive(Debug, thiserror::Error)]
#[error("{} did not accept a connection within {within:?} of the knock (last: {last})", show(addrs))]
pub struct DoorShut {
    pub addrs: Vec<SocketAddr>,
    pub within: Duration,
    pub last: String,
}

fn show(addrs: &[SocketAddr]) -> String {
    addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(" or ")
}

/// Connect to one of `addrs` (taken in turn), a new attempt every
/// [`RETRY_EVERY`], until one connects or `within` passes. Returns the
/// connection and how long it took.
pub fn open_door(addrs: &[SocketAddr], within: Duration) -> Result<(TcpStream, Duration), DoorShut> {
    let shut = |last: String| DoorShut { addrs: addrs.to_vec(), within, last };
    if addrs.is_empty() {
        return Err(shut("no address to connect to".into()));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| shut(format!("cannot start the connect loop: {e}")))?;
    let started = Instant::now();
    let won = rt.block_on(async {
        let deadline = tokio::time::Instant::now() + within;
        let mut tick = tokio::time::interval(RETRY_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next = addrs.iter().copied().cycle();
        let mut pending = tokio::task::JoinSet::new();
        let mut last = "no attempt finished (the guard drops packets until the door opens)".to_owned();
        // Returning drops `pending`, which aborts the attempts still waiting.
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Err(last),
                _ = tick.tick() => {
                    let addr = next.next().expect("cycle over a non-empty list");
                    pending.spawn(async move { (addr, tokio::net::TcpStream::connect(addr).await) });
                }
                Some(done) = pending.join_next() => match done {
                    Ok((_, Ok(stream))) => return Ok(stream),
                    Ok((addr, Err(e))) => last = format!("{addr}: {e}"),
                    Err(e) => last = format!("connect task: {e}"),
                },
            }
        }
    });
    let stream = won.map_err(shut)?;
    let stream = stream.into_std().map_err(|e| shut(e.to_string()))?;
    stream.set_nonblocking(false).map_err(|e| shut(e.to_string()))?;
    Ok((stream, started.elapsed()))
}

/// Copy `input` to `conn` and `conn` to `output` until both directions have
/// ended. The end of `input` half-closes `conn`; the end of `conn` closes
/// `output` (it is dropped). An error in one direction ends that direction
/// only, except that a broken connection also stops the other side's wait.
pub fn relay<R, W>(conn: TcpStream, mut input: R, output: W) -> std::io::Result<()>
where
    R: Read + Send,
    W: Write + Send,
{
    let up_conn = conn.try_clone()?;
    std::thread::scope(|s| {
        let up = s.spawn(move || {
            let mut conn = up_conn;
            let copied = pump(&mut input, &mut conn);
            // Our side is done sending: tell the server, but keep reading its answer.
            let _ = conn.shutdown(Shutdown::Write);
            copied.map(drop)
        });
        let down = s.spawn(move || {
            let mut conn = conn;
            let mut output = output;
            let copied = pump(&mut conn, &mut output);
            drop(output); // closes our stdout: the reader (ssh) sees the end
            if copied.is_err() {
                // The connection broke: nothing more can be sent either.
                let _ = conn.shutdown(Shutdown::Both);
            }
            copied
        });
        let down = down.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        let up = up.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        down.and(up)
    })
}

/// Copy until the end of `from`, passing each read on at once. Not
/// `std::io::copy`: between a pipe and a socket it uses `splice(2)`, and a
/// splice from a blocking TCP socket into ssh's pipe was seen (kernel 6.18) to
/// keep waiting with the server's first bytes already taken, so ssh never saw
/// the server's banner.
fn pump(from: &mut impl Read, to: &mut impl Write) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return to.flush(),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        to.flush()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn relay_carries_both_ways_and_passes_the_half_close_on() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // A server that reads to the end, then answers with what it got, reversed:
        // it can answer only after the client's half-close arrived.
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            got.reverse();
            s.write_all(&got).unwrap();
        });
        let (conn, _) = open_door(&[addr], Duration::from_secs(3)).unwrap();
        let mut out = Vec::new();
        relay(conn, &b"hello, door"[..], &mut out).unwrap();
        server.join().unwrap();
        assert_eq!(out, b"rood ,olleh");
    }

    #[test]
    fn open_door_gives_up_with_the_addresses_it_tried() {
        // A listener that is bound but closed again: connections are refused.
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let e = open_door(&[addr], Duration::from_millis(100)).unwrap_err().to_string();
        assert!(e.contains(&addr.to_string()) && e.contains("refused"), "{e}");
    }
}
