//! Per-service action hooks (knockd / SAdoor style), run after a door opens or
//! is closed by a close knock.
//!
//! A hook is a program and its arguments, executed directly — never through a
//! shell, so nothing in a door's fields can be interpreted as shell syntax. It
//! gets the door's fields as `{placeholder}` substitutions in its arguments and
//! as `NXKNOCK_*` environment variables, runs on its own thread with a timeout
//! (then it is killed), and its failure is only logged: a hook can never close,
//! open or delay a door. At most [`MAX_RUNNING`] run at once; one more is skipped
//! and logged, so a stream of knocks (an insider at their rate limit, many users
//! at once) cannot pile up processes and threads without bound.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Hooks that may run at once.
pub const MAX_RUNNING: usize = 32;

/// Places for running hooks: taken when one starts, given back when it ends.
pub struct Slots {
    running: AtomicUsize,
    max: usize,
    /// Hooks skipped so far (logged at powers of two, so a stream is not a log flood).
    skipped: AtomicU64,
}

impl Slots {
    pub const fn new(max: usize) -> Slots {
        Slots { running: AtomicUsize::new(0), max, skipped: AtomicU64::new(0) }
    }

    fn take(&'static self) -> Option<Slot> {
        if self.running.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.running.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(self))
    }
}

/// One running hook's place; given back on drop (also if the hook's thread panics).
struct Slot(&'static Slots);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The daemon's hooks.
static HOOKS: Slots = Slots::new(MAX_RUNNING);

/// The fields a hook receives.
#[derive(Clone, Debug)]
pub struct HookEvent {
    pub event: &'static str,
    pub user: String,
    pub service: String,
    pub addr: String,
    pub prefix: u8,
    pub proto: String,
    pub port: u16,
    pub seconds: u64,
    pub via: String,
}

impl HookEvent {
    fn fields(&self) -> [(&'static str, String); 9] {
        [
            ("event", self.event.to_owned()),
            ("user", self.user.clone()),
            ("service", self.service.clone()),
            ("addr", self.addr.clone()),
            ("prefix", self.prefix.to_string()),
            ("proto", self.proto.clone()),
            ("port", self.port.to_string()),
            ("seconds", self.seconds.to_string()),
            ("via", self.via.clone()),
        ]
    }
}

/// Start `argv` for `ev` in the background; returns at once, and whether it started.
pub fn spawn(argv: &[String], timeout: Duration, ev: HookEvent) -> bool {
    spawn_in(&HOOKS, argv, timeout, ev)
}

fn spawn_in(slots: &'static Slots, argv: &[String], timeout: Duration, ev: HookEvent) -> bool {
    let Some(slot) = slots.take() else {
        let n = slots.skipped.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(service = %ev.service, running = slots.max, skipped = n, "hook skipped: too many running; doors unaffected");
        }
        return false;
    };
    let argv = argv.to_vec();
    std::thread::Builder::new()
        .name("hook".into())
        .spawn(move || {
            let _slot = slot;
            run(&argv, timeout, &ev)
        })
        .is_ok()
}

/// Run `argv` for `ev` and wait (bounded by `timeout`). Returns whether it succeeded.
pub fn run(argv: &[String], timeout: Duration, ev: &HookEvent) -> bool {
    let Some((program, args)) = argv.split_first() else { return false };
    let fields = ev.fields();
    let args: Vec<String> =
        args.iter().map(|a| fields.iter().fold(a.clone(), |acc, (k, v)| acc.replace(&format!("{{{k}}}"), v))).collect();
    let mut cmd = Command::new(program);
    cmd.args(&args).env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    for (k, v) in &fields {
        cmd.env(format!("NXKNOCK_{}", k.to_ascii_uppercase()), v);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // Hooks run with no capability: the daemon's ambient set (kept for nft/ipset) is
    // cleared in the child, and with the NOROOT securebits root gains nothing at exec.
    // SAFETY: the closure runs between fork and exec and only calls prctl, which is
    // async-signal-safe; it touches no memory of the parent.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(crate::privilege::clear_for_child);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(error) => {
            tracing::warn!(hook = %program, service = %ev.service, %error, "hook could not start; doors unaffected");
            return false;
        }
    };
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => {
                tracing::debug!(hook = %program, service = %ev.service, event = ev.event, "hook ran");
                return true;
            }
            Ok(Some(status)) => {
                tracing::warn!(hook = %program, service = %ev.service, %status, "hook failed; doors unaffected");
                return false;
            }
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!(hook = %program, service = %ev.service, timeout_s = timeout.as_secs(), "hook timed out and was killed; doors unaffected");
                return false;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(error) => {
                tracing::warn!(hook = %program, %error, "waiting for hook failed");
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev() -> HookEvent {
        HookEvent {
            event: "open",
            user: "alice".into(),
            service: "ssh".into(),
            addr: "198.18.0.2".into(),
            prefix: 32,
            proto: "tcp".into(),
            port: 22,
            seconds: 30,
            via: "dns/udp".into(),
        }
    }

    #[test]
    fn placeholders_and_environment_reach_the_program_without_a_shell() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!("echo \"$0 $1 $NXKNOCK_USER $NXKNOCK_PORT\" > {}", out.display());
        let argv = vec!["/bin/sh".into(), "-c".into(), script, "{addr}/{prefix}".into(), "{service};rm -rf /".into()];
        assert!(run(&argv, Duration::from_secs(5), &ev()));
        let got = std::fs::read_to_string(&out).unwrap();
        assert_eq!(got.trim(), "198.18.0.2/32 ssh;rm -rf / alice 22");
    }

    #[test]
    fn no_more_than_the_cap_run_at_once_and_a_place_comes_back_when_one_ends() {
        static TWO: Slots = Slots::new(2);
        let sleep = |s: &str| vec!["/bin/sleep".to_owned(), s.to_owned()];
        assert!(spawn_in(&TWO, &sleep("0.5"), Duration::from_secs(5), ev()));
        assert!(spawn_in(&TWO, &sleep("0.5"), Duration::from_secs(5), ev()));
        assert!(!spawn_in(&TWO, &sleep("0.5"), Duration::from_secs(5), ev()), "a third ran");
        assert_eq!(TWO.skipped.load(Ordering::Relaxed), 1);
        let t = Instant::now();
        while TWO.running.load(Ordering::Acquire) > 0 && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(spawn_in(&TWO, &["/bin/true".to_owned()], Duration::from_secs(5), ev()), "no place came back");
    }

    #[test]
    fn failing_missing_and_slow_hooks_report_failure() {
        assert!(!run(&["/bin/false".into()], Duration::from_secs(5), &ev()));
        assert!(!run(&["/nonexistent/hook".into()], Duration::from_secs(5), &ev()));
        let t = Instant::now();
        assert!(!run(&["/bin/sleep".into(), "30".into()], Duration::from_millis(300), &ev()));
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
