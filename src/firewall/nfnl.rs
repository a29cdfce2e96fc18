//! One `NETLINK_NETFILTER` socket per backend, for the door path.
//!
//! Opening or closing a door is a few set-element messages (nf_tables, see
//! `nft_netlink.rs`; ipset, see `ipset_netlink.rs`) sent from inside the
//! process instead of a spawned `nft`/`ipset`. Everything else (guard,
//! listing, uninstall) still runs the tools (`exec.rs`).
//!
//! # Namespaces
//!
//! A netlink socket talks to the network namespace it was *created* in, for
//! good. A spawned tool used to start in the namespace of the calling thread,
//! and the tests (and `nxknock demo`) rely on that: they build a backend on
//! one thread and call it from threads that joined a lab namespace. So the
//! socket is opened lazily, remembers the namespace it belongs to (the
//! `/proc/thread-self/ns/net` inode, read once per thread), and is replaced
//! when a call comes from a thread in another namespace. Without `/proc`, no socket is kept at all:
//! every exchange opens a fresh one, in the caller's namespace. A door can
//! therefore never land in the wrong namespace's firewall.
//!
//! # Answers
//!
//! Every command message asks for an acknowledgement (`NLM_F_ACK`), so success
//! is confirmed rather than inferred from silence. nfnetlink handles a request
//! synchronously inside `sendmsg`, so all answers are queued by the time it
//! returns; the receive timeout only guards against a kernel that never
//! answers. An error addressed to a message that asked for no answer (a batch
//! header) refuses the whole request. Late answers to an earlier request are
//! recognised by their sequence number and skipped.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::Duration;

use netlink_packet_core::{DecodeError, ErrorBuffer, NLM_F_ACK, NLMSG_ERROR, NetlinkBuffer, NetlinkMessage};
use netlink_packet_netfilter::NetfilterMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

/// How long to wait for the kernel's answer before giving up on the socket.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Receive buffer for one answer; acknowledgements are capped to the request
/// header (`NETLINK_CAP_ACK`), so a few dozen bytes each.
const RECV_BUF: usize = 8192;

/// What the kernel said about one message of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The message asked for no acknowledgement and got no error.
    Unasked,
    /// Acknowledged without error.
    Ok,
    /// Refused with this (positive) errno.
    Refused(i32),
}

/// The namespace a socket belongs to: device and inode of its nsfs file.
type NetnsId = (u64, u64);

/// The calling thread's network namespace, if `/proc` can tell. Read once per
/// thread (a `stat` of `/proc` on every door cost ~10 µs): in this program a
/// thread joins a namespace only when it starts (`lab::Netns::try_enter` runs
/// its closure on a fresh thread), never after its first door.
fn current_netns() -> Option<NetnsId> {
    use std::os::unix::fs::MetadataExt;
    thread_local! {
        static NETNS: std::cell::OnceCell<Option<NetnsId>> = const { std::cell::OnceCell::new() };
    }
    let read = || std::fs::metadata("/proc/thread-self/ns/net").ok().map(|m| (m.dev(), m.ino()));
    NETNS.with(|n| *n.get_or_init(read))
}

struct Conn {
    sock: Socket,
    netns: Option<NetnsId>,
    seq: u32,
}

impl Conn {
    fn open(netns: Option<NetnsId>) -> io::Result<Conn> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Acknowledgements carry only the request's header, not all of it.
        sock.set_cap_ack(true)?;
        let tv = libc::timeval {
            tv_sec: ANSWER_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: ANSWER_TIMEOUT.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: a valid socket, and a timeval of the size given.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // Sequence numbers only tell our answers from stale ones; any start will do.
        let seq = std::process::id().wrapping_mul(0x9e37_79b9);
        Ok(Conn { sock, netns, seq })
    }

    /// Numbers, sends and awaits `msgs` (see [`NfnlSocket::exchange`]).
    fn exchange(&mut self, mut msgs: Vec<NetlinkMessage<NetfilterMessage>>) -> io::Result<Vec<Answer>> {
        let first = self.seq.wrapping_add(1);
        let mut out = Vec::new();
        for m in &mut msgs {
            self.seq = self.seq.wrapping_add(1);
            m.header.sequence_number = self.seq;
            m.finalize();
            let at = out.len();
            out.resize(at + m.buffer_len(), 0);
            m.serialize(&mut out[at..]);
        }
        let sent = self.sock.send(&out, 0)?;
        if sent != out.len() {
            return Err(io::Error::other(format!("netlink send: {sent} of {} bytes", out.len())));
        }
        let mut answers: Vec<Answer> = msgs.iter().map(|_| Answer::Unasked).collect();
        let asked = |i: usize| msgs[i].header.flags & NLM_F_ACK != 0;
        let mut waiting = (0..msgs.len()).filter(|&i| asked(i)).count();
        let mut buf = Vec::with_capacity(RECV_BUF);
        while waiting > 0 {
            buf.clear();
            let n = match self.sock.recv(&mut buf, 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let msg = format!("no answer from the kernel within {ANSWER_TIMEOUT:?}");
                    return Err(io::Error::new(io::ErrorKind::TimedOut, msg));
                }
                Err(e) => return Err(e),
            };
            let mut at = 0;
            while at < n.min(buf.len()) {
                let bad = |e: DecodeError| io::Error::new(io::ErrorKind::InvalidData, format!("netlink answer: {e}"));
                let msg = NetlinkBuffer::new_checked(&buf[at..n]).map_err(bad)?;
                at += (msg.length() as usize).next_multiple_of(4);
                if msg.message_type() != NLMSG_ERROR {
                    continue; // nothing else is expected, and nothing else matters
                }
                let i = msg.sequence_number().wrapping_sub(first) as usize;
                if i >= msgs.len() || answers[i] != Answer::Unasked {
                    continue; // an answer to an earlier request
                }
                let code = ErrorBuffer::new_checked(msg.payload()).map_err(bad)?.code().map_or(0, |c| c.get());
                answers[i] = if code == 0 { Answer::Ok } else { Answer::Refused(-code) };
                if asked(i) {
                    waiting -= 1;
                } else if code != 0 {
                    // A batch refused as a whole (permission, commit failure).
                    return Ok(answers);
                }
            }
        }
        Ok(answers)
    }
}

/// A `NETLINK_NETFILTER` socket in the caller's network namespace, opened on
/// first use and kept (see the module docs).
#[derive(Default)]
pub(crate) struct NfnlSocket {
    conn: Mutex<Option<Conn>>,
}

impl NfnlSocket {
    pub(crate) fn new() -> NfnlSocket {
        NfnlSocket::default()
    }

    /// Sends `msgs` in one datagram, in order, and returns the kernel's answer
    /// to each. The caller sets each message's flags (`NLM_F_REQUEST`, and
    /// `NLM_F_ACK` on every command); this sets sequence numbers and lengths.
    /// An error means no trustworthy answer came (send or receive failed, or
    /// timed out); the socket is then dropped and the next call opens a new one.
    pub(crate) fn exchange(&self, msgs: Vec<NetlinkMessage<NetfilterMessage>>) -> io::Result<Vec<Answer>> {
        let netns = current_netns();
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let reuse = matches!(&*guard, Some(c) if netns.is_some() && c.netns == netns);
        if !reuse {
            *guard = Some(Conn::open(netns)?);
        }
        let conn = guard.as_mut().expect("just opened");
        let result = conn.exchange(msgs);
        if result.is_err() || netns.is_none() {
            *guard = None;
        }
        result
    }
}

impl Clone for NfnlSocket {
    /// A clone shares nothing: it opens its own socket when first used.
    fn clone(&self) -> NfnlSocket {
        NfnlSocket::new()
    }
}

impl std::fmt::Debug for NfnlSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let open = self.conn.lock().map(|c| c.is_some()).unwrap_or(false);
        f.debug_struct("NfnlSocket").field("open", &open).finish()
    }
}

/// `strerror(errno)`, without Rust's " (os error N)" suffix: the errors that
/// use this print the number themselves.
pub(crate) fn errno_text(errno: i32) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    match text.rfind(" (os error ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}
