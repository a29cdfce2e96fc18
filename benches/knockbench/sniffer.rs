//! Kernel timestamps of the client's outgoing packets (AF_PACKET with
//! SO_TIMESTAMPNS): when a knock really left, whatever its client program does
//! before sending.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use nxknock::lab::Netns;

use crate::SSH_PORT;

/// One outgoing packet: (kernel timestamp in ns, IP protocol, destination, destination port).
type Packet = (i128, u8, Ipv4Addr, u16);
/// Packets seen so far, shared with the sniffer thread.
type Packets = Arc<Mutex<Vec<Packet>>>;

/// What a knock's first packet looks like: IP protocol, destination and a range of
/// destination ports (one port for a DNS query or an SPA datagram; nxknock's port
/// sequences start on a port of `sequence_ports` that changes with every knock).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Probe {
    proto: u8,
    dst: Ipv4Addr,
    ports: (u16, u16),
    /// How many packets the knock sends in all: its door cannot open before the last.
    pub(crate) packets: u64,
}

impl Probe {
    pub(crate) fn udp(dst: Ipv4Addr, port: u16) -> Probe {
        Probe { proto: 17, dst, ports: (port, port), packets: 1 }
    }
    pub(crate) fn tcp(dst: Ipv4Addr, port: u16) -> Probe {
        Probe { proto: 6, dst, ports: (port, port), packets: 1 }
    }
    /// A TCP packet to any port in `lo..=hi` (the client sends only SYNs there).
    pub(crate) fn tcp_range(dst: Ipv4Addr, (lo, hi): (u16, u16)) -> Probe {
        Probe { proto: 6, dst, ports: (lo, hi), packets: 1 }
    }
    /// A knock of `n` packets (a port sequence).
    pub(crate) fn of(self, n: usize) -> Probe {
        Probe { packets: n as u64, ..self }
    }
    fn matches(&self, proto: u8, dst: Ipv4Addr, port: u16) -> bool {
        proto == self.proto && dst == self.dst && (self.ports.0..=self.ports.1).contains(&port)
    }
}

/// Outgoing IPv4 packets on the client's `eth0`, with kernel timestamps (AF_PACKET, SO_TIMESTAMPNS).
pub(crate) struct Sniffer {
    packets: Packets,
    /// How many packets were captured so far: the probe steps finer once this moves.
    seen: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Sniffer {
    pub(crate) fn open(ns: &Netns) -> Result<Sniffer> {
        let fd = ns.try_enter(|| -> std::io::Result<OwnedFd> {
            // ETH_P_ALL: outgoing packets reach only the "all protocols" taps.
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket(2); the fd is owned right away.
            let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, proto as libc::c_int) };
            if raw < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: raw is a fresh, valid fd.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let ifname = std::ffi::CString::new("eth0").unwrap();
            // SAFETY: a valid C string.
            let ifindex = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
            // SAFETY: sockaddr_ll is plain data.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = ifindex as i32;
            let one: libc::c_int = 1;
            let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
            let buf: libc::c_int = 8 << 20;
            // SAFETY: valid fd, properly sized option values and address.
            unsafe {
                if libc::bind(
                    raw,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                libc::setsockopt(raw, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, (&one as *const libc::c_int).cast(), 4);
                libc::setsockopt(
                    raw,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                libc::setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, (&buf as *const libc::c_int).cast(), 4);
                // The connect loop's own SYNs (one every 0.05-0.25 ms) stay in the kernel:
                // a sniffer woken for each would take CPU from what is measured.
                let filter = not_the_probe();
                let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
                if libc::setsockopt(
                    raw,
                    libc::SOL_SOCKET,
                    libc::SO_ATTACH_FILTER,
                    (&prog as *const libc::sock_fprog).cast(),
                    std::mem::size_of::<libc::sock_fprog>() as u32,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(fd)
        })??;
        let packets = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicU64::new(0));
        let (p, n, s) = (packets.clone(), seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || sniff(fd, p, n, s));
        Ok(Sniffer { packets, seen, stop, thread: Mutex::new(Some(thread)) })
    }

    /// Packets captured so far (any of the client's, the probe's own SYNs excepted).
    pub(crate) fn seen(&self) -> u64 {
        self.seen.load(Ordering::Acquire)
    }

    /// The first captured packet matching `probe` at or after `t0`, waiting up to `wait` for the capture thread.
    pub(crate) fn first_after(&self, t0: i128, probe: Probe, wait: Duration) -> Option<i128> {
        let until = Instant::now() + wait;
        loop {
            let found = {
                let mut p = self.packets.lock().unwrap();
                let hit = p.iter().find(|(ts, pr, d, port)| *ts >= t0 && probe.matches(*pr, *d, *port)).map(|x| x.0);
                // Keep the list short: nothing before t0 is needed again.
                p.retain(|(ts, ..)| *ts >= t0);
                hit
            };
            if found.is_some() || Instant::now() >= until {
                if found.is_none() && std::env::var_os("KB_DEBUG").is_some() {
                    eprintln!(
                        "no packet {probe:?} after {t0}: {:?}",
                        self.packets.lock().unwrap().iter().take(5).collect::<Vec<_>>()
                    );
                }
                return found;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Classic BPF, run on the IPv4 header (a SOCK_DGRAM packet socket): drop TCP to
/// the SSH port (the connect loop), keep the rest.
fn not_the_probe() -> [libc::sock_filter; 7] {
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter { code: code as u16, jt, jf, k };
    [
        op(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0, 0, 9), // A = protocol
        op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 0, 3, 6), // TCP? else keep
        op(libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH, 0, 0, 0), // X = header length
        op(libc::BPF_LD | libc::BPF_H | libc::BPF_IND, 0, 0, 2), // A = destination port
        op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 1, 0, u32::from(SSH_PORT)), // the probe? drop
        op(libc::BPF_RET | libc::BPF_K, 0, 0, 65_535),           // keep
        op(libc::BPF_RET | libc::BPF_K, 0, 0, 0),                // drop
    ]
}

fn sniff(fd: OwnedFd, packets: Packets, seen: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    let mut buf = [0u8; 256];
    let mut ctrl = [0u64; 16];
    while !stop.load(Ordering::SeqCst) {
        // SAFETY: zeroed plain-data structs pointing at live local buffers.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut sll as *mut libc::sockaddr_ll).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ctrl.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&ctrl);
        // SAFETY: msg describes valid buffers for the duration of the call.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_TRUNC) };
        if n < 20 || sll.sll_pkttype != libc::PACKET_OUTGOING || sll.sll_protocol != (libc::ETH_P_IP as u16).to_be() {
            continue;
        }
        let mut ts = None;
        // SAFETY: walking the control messages the kernel wrote into `ctrl`.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let t = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                    ts = Some(t.tv_sec as i128 * 1_000_000_000 + t.tv_nsec as i128);
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let Some(ts) = ts else { continue };
        if buf[0] >> 4 != 4 {
            continue;
        }
        let ihl = ((buf[0] & 15) as usize) * 4;
        let proto = buf[9];
        let dst = Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]);
        if (proto != 6 && proto != 17) || ihl + 4 > (n as usize).min(buf.len()) {
            continue;
        }
        let dport = u16::from_be_bytes([buf[ihl + 2], buf[ihl + 3]]);
        if proto == 6 && dport == SSH_PORT {
            continue; // the connect loop itself
        }
        packets.lock().unwrap().push((ts, proto, dst, dport));
        seen.fetch_add(1, Ordering::Release);
    }
}
