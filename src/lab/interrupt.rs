//! Ctrl-C for programs that own a lab (`nxknock demo`, the benchmark).
//!
//! Dropping the lab and its daemons is what removes the namespaces, firewall
//! rules and processes, so a signal must not end the program on the spot: it
//! only sets a flag. Every step calls [`check`] (waits use [`nap`]), which turns
//! the flag into an error that unwinds through the Drop guards.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From now on SIGINT and SIGTERM only set the flag.
pub fn catch_signals() {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// Whether a signal caught by [`catch_signals`] has arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// An error once interrupted, so `?` starts the teardown.
pub fn check() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted; tearing down");
    }
    Ok(())
}

/// Sleeps `d` in small steps, failing as soon as it is interrupted.
pub fn nap(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check()?;
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}
