//! Least privilege once the daemon has started (ARCHITECTURE.md, "Privileges").
//!
//! After the sockets are bound, the capture handles open and the guard installed,
//! `serve` keeps only what running needs:
//! - `CAP_NET_ADMIN` (doors over netlink, blocks and reloads through `nft`/`ipset`),
//! - `CAP_NET_BIND_SERVICE` (a reload that binds again), and
//! - `CAP_NET_RAW` (capture),
//!
//! in the effective, permitted and inheritable sets and the bounding set, with
//! `no_new_privs` (no setuid or file-capability program can give any back) and the
//! `NOROOT` securebits (running a program as root no longer grants every
//! capability). The three stay *ambient*, so the `nft`/`ipset` tools the daemon
//! runs can still change its own firewall; hooks are started with the ambient set
//! cleared ([`clear_for_child`]) and so run with no capability at all.
//!
//! Capabilities belong to threads in Linux: this must run while the daemon is still
//! single-threaded, so every thread started afterwards inherits the reduced sets.

use caps::{CapSet, Capability, CapsHashSet};

/// What the daemon keeps.
pub const KEEP: [Capability; 3] =
    [Capability::CAP_NET_ADMIN, Capability::CAP_NET_BIND_SERVICE, Capability::CAP_NET_RAW];

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("cannot set the {set} capability set: {source}")]
    Caps {
        set: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
    #[error("cannot set no_new_privs: {0}")]
    NoNewPrivs(std::io::Error),
    #[error("capabilities beyond the three nxknock keeps are still effective: {0}")]
    Leftover(String),
    #[error("[daemon] user {0:?}: no such user on this system")]
    NoUser(String),
    #[error("cannot become user {user:?}: {source}")]
    Switch {
        user: String,
        #[source]
        source: std::io::Error,
    },
}

/// What [`restrict`] could not do and why (it never fails for these).
#[derive(Debug, Default)]
pub struct Restricted {
    /// The bounding set could not be cut (no CAP_SETPCAP): the process already
    /// runs with fewer privileges than root, and `no_new_privs` keeps it so.
    pub bounding_kept: bool,
    /// The NOROOT securebits could not be set (no CAP_SETPCAP).
    pub securebits_kept: bool,
}

fn keep() -> CapsHashSet {
    KEEP.into_iter().collect()
}

/// Reduce this (single) thread's capabilities to [`KEEP`] and set `no_new_privs`.
pub fn restrict() -> Result<Restricted, PrivilegeError> {
    let mut done = Restricted::default();
    let permitted =
        caps::read(None, CapSet::Permitted).map_err(|source| PrivilegeError::Caps { set: "permitted", source })?;
    let keep_now: CapsHashSet = keep().intersection(&permitted).copied().collect();
    // The bounding set and the securebits need CAP_SETPCAP: first, while we have it.
    for cap in caps::all() {
        if !KEEP.contains(&cap)
            && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false)
            && caps::drop(None, CapSet::Bounding, cap).is_err()
        {
            done.bounding_kept = true;
        }
    }
    // SECBIT_NOROOT | SECBIT_NOROOT_LOCKED: a program run as root gets only what is
    // inheritable and ambient, not every capability of the bounding set.
    const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
    const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
    // SAFETY: prctl with integer arguments only; no memory is passed.
    let rc = unsafe { libc::prctl(libc::PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED, 0, 0, 0) };
    if rc != 0 {
        done.securebits_kept = true;
    }
    for (set, name) in
        [(CapSet::Effective, "effective"), (CapSet::Permitted, "permitted"), (CapSet::Inheritable, "inheritable")]
    {
        caps::set(None, set, &keep_now).map_err(|source| PrivilegeError::Caps { set: name, source })?;
    }
    for cap in &keep_now {
        caps::raise(None, CapSet::Ambient, *cap).map_err(|source| PrivilegeError::Caps { set: "ambient", source })?;
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(PrivilegeError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    let effective =
        caps::read(None, CapSet::Effective).map_err(|source| PrivilegeError::Caps { set: "effective", source })?;
    let extra: Vec<String> = effective.difference(&keep()).map(|c| c.to_string()).collect();
    if !extra.is_empty() {
        return Err(PrivilegeError::Leftover(extra.join(",")));
    }
    Ok(done)
}

/// For a child that must run with no capability and no inherited descriptor
/// (hooks): called between fork and exec, so only async-signal-safe work — raw
/// prctl, close_range and capget/capset system calls. Clears the ambient set and the inheritable set (so nothing can be inherited by
/// any program the hook runs); with the NOROOT securebits and `no_new_privs`, the
/// program then starts with no capability at all.
pub fn clear_for_child() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments only; async-signal-safe.
    if unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Every descriptor above stderr closes at exec, whoever opened it and however
    // (a library's socket, one inherited from whatever started the daemon): the
    // program gets its three standard descriptors and nothing else. Marked rather
    // than closed, so the spawner's own exec-error pipe still works. (close_range
    // with CLOSE_RANGE_CLOEXEC: Linux 5.11; on older kernels this step is skipped.)
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: a plain system call with integer arguments; async-signal-safe.
    let _ = unsafe { libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, libc::c_uint::MAX, CLOSE_RANGE_CLOEXEC) };
    // struct __user_cap_header_struct / __user_cap_data_struct, version 3 (two words).
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header { version: VERSION_3, pid: 0 };
    let mut data = [Data { effective: 0, permitted: 0, inheritable: 0 }; 2];
    // SAFETY: capget/capset on this thread with a correctly sized version-3 header and
    // two data words on our stack; plain system calls, async-signal-safe.
    unsafe {
        if libc::syscall(libc::SYS_capget, &mut header as *mut Header, data.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        for d in &mut data {
            d.inheritable = 0;
        }
        if libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Become `name` (its uid, its primary group, no supplementary groups), keeping the
/// permitted capabilities for [`restrict`], which must follow. Single-threaded, like
/// `restrict`. Neither the daemon nor any program it runs is uid 0 afterwards, so
/// root's files (the database among them, unless opened before) are out of reach.
pub fn become_user(name: &str) -> Result<(u32, u32), PrivilegeError> {
    let cname = std::ffi::CString::new(name).map_err(|_| PrivilegeError::NoUser(name.to_owned()))?;
    // SAFETY: getpwnam with a valid C string; the result is read at once, before any
    // other call that could reuse its static buffer (we are the only thread).
    let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
    if pw.is_null() {
        return Err(PrivilegeError::NoUser(name.to_owned()));
    }
    // SAFETY: `pw` is non-null and points at libc's passwd record.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    let fail = |source| PrivilegeError::Switch { user: name.to_owned(), source };
    let check = |rc: libc::c_int| if rc == 0 { Ok(()) } else { Err(fail(std::io::Error::last_os_error())) };
    // SAFETY: prctl, setgroups, setgid and setuid with integer arguments (and a null
    // group list of length 0); glibc applies the id changes to every thread.
    unsafe {
        check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0))?;
        check(libc::setgroups(0, std::ptr::null()))?;
        check(libc::setgid(gid))?;
        check(libc::setuid(uid))?;
    }
    Ok((uid, gid))
}
