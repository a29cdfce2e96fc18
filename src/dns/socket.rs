//! Sockets and batched datagram I/O for the DNS listener: every `unsafe` block
//! of `dns/` lives here, each with its `SAFETY:` argument, so the answer-building
//! code in `fast.rs` and `mod.rs` is plain safe Rust over byte slices.
//!
//! * [`udp_socket`]: one nonblocking `SO_REUSEPORT` UDP socket with a large
//!   receive buffer (`setsockopt` has no safe wrapper for these options).
//! * [`Batch`]: receive and send buffers for `recvmmsg`/`sendmmsg`, so a serving
//!   thread moves up to [`BATCH`] datagrams per system call.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::env_usize;
use super::fast::MAX_FAST_ANSWER;

/// Datagrams per `recvmmsg`/`sendmmsg`.
pub const BATCH: usize = 32;
/// What hickory's UDP stream receives per datagram (`hickory_net::udp::MAX_RECEIVE_BUFFER_SIZE`).
const RECV_SIZE: usize = 4096;

/// Receive buffer asked for each UDP socket (the kernel caps it at `net.core.rmem_max`
/// unless we may force it, as root can).
const UDP_RECV_BUFFER: usize = 4 << 20;

/// One nonblocking UDP socket bound to `addr` with `SO_REUSEPORT` and a big receive buffer.
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use std::os::fd::AsRawFd;
    let sock =
        socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let rcvbuf = env_usize("NXKNOCK_UDP_RCVBUF").unwrap_or(UDP_RECV_BUFFER);
    if rcvbuf > 0 {
        set_recv_buffer(&sock, rcvbuf);
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// `SO_RCVBUFFORCE` (root, beyond `rmem_max`), else `SO_RCVBUF` (capped); best effort.
fn set_recv_buffer(sock: &socket2::Socket, bytes: usize) {
    use std::os::fd::AsRawFd;
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: as above.
    let forced = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    if !forced {
        let _ = sock.set_recv_buffer_size(bytes);
    }
}

/// Receive and send buffers for one socket's batches. The `mmsghdr`/`iovec`
/// arrays that point into them are rebuilt on each call, so nothing here holds
/// a raw pointer across an `.await` (and the serving future stays `Send`).
pub struct Batch {
    bufs: Vec<u8>,
    lens: [usize; BATCH],
    flags: [libc::c_int; BATCH],
    addrs: Vec<libc::sockaddr_storage>,
    addr_lens: [libc::socklen_t; BATCH],
    out: Vec<Vec<u8>>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch {
            bufs: vec![0; BATCH * RECV_SIZE],
            lens: [0; BATCH],
            flags: [0; BATCH],
            // SAFETY: sockaddr_storage is plain data; all zeroes is a valid (AF_UNSPEC) value.
            addrs: vec![unsafe { std::mem::zeroed() }; BATCH],
            addr_lens: [0; BATCH],
            out: (0..BATCH).map(|_| Vec::with_capacity(MAX_FAST_ANSWER)).collect(),
        }
    }

    pub fn datagram(&self, i: usize) -> &[u8] {
        &self.bufs[i * RECV_SIZE..i * RECV_SIZE + self.lens[i]]
    }

    /// Datagram `i` and the buffer its answer goes into.
    pub fn datagram_and_answer(&mut self, i: usize) -> (&[u8], &mut Vec<u8>) {
        (&self.bufs[i * RECV_SIZE..i * RECV_SIZE + self.lens[i]], &mut self.out[i])
    }

    pub fn truncated(&self, i: usize) -> bool {
        self.flags[i] & libc::MSG_TRUNC != 0
    }

    /// Where datagram `i` came from, if an answer may go there (as hickory's
    /// server checks: not port 0, not an unspecified or broadcast address; it
    /// drops anything else unanswered).
    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        let src = sockaddr_to_std(&self.addrs[i], self.addr_lens[i] as usize)?;
        let ok = src.port() != 0
            && match src.ip() {
                IpAddr::V4(a) => !a.is_unspecified() && !a.is_broadcast(),
                IpAddr::V6(a) => !a.is_unspecified(),
            };
        ok.then_some(src)
    }

    /// One `recvmmsg` without waiting: the number of datagrams received.
    /// Receive a batch if one is ready (`WouldBlock` otherwise): the number of datagrams.
    pub fn try_recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        sock.try_io(Interest::READABLE, || self.recv(sock.as_raw_fd()))
    }

    fn recv(&mut self, fd: std::os::fd::RawFd) -> io::Result<usize> {
        let mut iovs: [libc::iovec; BATCH] = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; BATCH];
        // SAFETY: mmsghdr is plain data; all zeroes is valid, and the pointers are set below.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (i, (chunk, addr)) in self.bufs.chunks_exact_mut(RECV_SIZE).zip(self.addrs.iter_mut()).enumerate() {
            iovs[i] = libc::iovec { iov_base: chunk.as_mut_ptr().cast(), iov_len: RECV_SIZE };
            hdrs[i].msg_hdr.msg_name = (addr as *mut libc::sockaddr_storage).cast();
            hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `hdrs` holds BATCH valid headers whose buffers and address
        // storage (in `self`, borrowed mutably) and iovecs (on this stack frame)
        // outlive the call; MSG_DONTWAIT never blocks.
        let n = unsafe {
            libc::recvmmsg(fd, hdrs.as_mut_ptr(), BATCH as libc::c_uint, libc::MSG_DONTWAIT, std::ptr::null_mut())
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, h) in hdrs.iter().enumerate().take(n) {
            self.lens[i] = (h.msg_len as usize).min(RECV_SIZE);
            self.flags[i] = h.msg_hdr.msg_flags;
            self.addr_lens[i] = h.msg_hdr.msg_namelen;
        }
        Ok(n)
    }

    /// Send `out[i]` to `addrs[i]` for every `i` marked in `which`, in as few
    /// `sendmmsg` calls as the socket allows. A datagram the kernel refuses is
    /// dropped, as a lost UDP answer would be.
    pub async fn send_answers(&mut self, sock: &UdpSocket, which: &[bool]) {
        let idx: Vec<usize> = which.iter().enumerate().filter(|(_, k)| **k).map(|(i, _)| i).collect();
        let mut done = 0;
        while done < idx.len() {
            match sock.try_io(Interest::WRITABLE, || self.send(sock.as_raw_fd(), &idx[done..])) {
                Ok(sent) => done += sent.max(1),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if sock.writable().await.is_err() {
                        return;
                    }
                }
                Err(error) => {
                    // The first datagram failed (e.g. an unreachable address): skip it.
                    tracing::debug!(%error, "sendmmsg");
                    done += 1;
                }
            }
        }
    }

    fn send(&mut self, fd: std::os::fd::RawFd, idx: &[usize]) -> io::Result<usize> {
        let mut iovs: [libc::iovec; BATCH] = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; BATCH];
        // SAFETY: as in `recv`.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (j, &i) in idx.iter().enumerate() {
            iovs[j] = libc::iovec { iov_base: self.out[i].as_mut_ptr().cast(), iov_len: self.out[i].len() };
            hdrs[j].msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            hdrs[j].msg_hdr.msg_namelen = self.addr_lens[i];
            hdrs[j].msg_hdr.msg_iov = &mut iovs[j];
            hdrs[j].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: the first `idx.len()` headers point into `self.out`, `self.addrs`
        // and `iovs`, all alive and unaliased for the call; MSG_DONTWAIT never blocks.
        let n = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), idx.len() as libc::c_uint, libc::MSG_DONTWAIT) };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
    }
}

/// A source address from what `recvmmsg` filled in.
fn sockaddr_to_std(addr: &libc::sockaddr_storage, len: usize) -> Option<SocketAddr> {
    match addr.ss_family as libc::c_int {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says this storage holds a sockaddr_in, and it is large enough.
            let a = unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(a.sin_port)))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddrs_round_trip() {
        let v4: SocketAddr = "198.18.0.2:5353".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:53".parse().unwrap();
        for a in [v4, v6] {
            let s = socket2::SockAddr::from(a);
            // SAFETY: SockAddr's storage is a sockaddr_storage.
            let st = unsafe { *(s.as_ptr() as *const libc::sockaddr_storage) };
            assert_eq!(sockaddr_to_std(&st, s.len() as usize), Some(a));
        }
    }
}
