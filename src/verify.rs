//! Verification: is this knock the next unspent element of some user's chain?
//!
//! The verifier keeps every active user's current verifier in a hash map so the
//! hot path never waits on disk: a knock costs at most `window` hashes and map
//! probes whatever the number of users, and no user name is needed (or sent).
//! SQLite is the durable record, written on accept — and written *before* the
//! caller opens a door, so a crash can never leave a spent element reusable.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::{Config, PlainPolicy, ServiceConfig};
use crate::knock::Knock;
use crate::netaddr;
use crate::store::{Store, StoreError, UserRecord};
use crate::token::{Element, Token, ZoneId, chain, service_id};

/// What the door stage should do for a knock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Open `services` for `addr/prefix_len`. The chain advance is already committed.
    /// `max_open` is the user's limit on the door's open time, if any.
    Open { user: String, addr: IpAddr, prefix_len: u8, services: Vec<String>, max_open: Option<u64> },
    /// Close the user's doors for `addr/prefix_len` (close knock). Committed too.
    Close { user: String, addr: IpAddr, prefix_len: u8, services: Vec<String> },
    /// The same token as one accepted moments ago: a resolver retry. Nothing to do.
    Repeat,
    /// Not a valid knock; the reason is for the log only.
    Reject(Reject),
}

/// Why a knock opened nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// No user's verifier within the window: random, spent, revoked, or foreign.
    Unknown,
    /// The user's last accepted element, again, after the grace period.
    Replay { user: String },
    BadMac { user: String },
    TooOld { user: String, delta: i64 },
    /// Valid knock, but the user's policy does not allow this address or service.
    Policy { user: String, why: String },
    /// The chain is used up; the user must be re-keyed.
    Exhausted { user: String },
    /// The store refused or failed; fail closed.
    Store(String),
}

struct UserState {
    record: UserRecord,
}

/// The in-memory verifier index over a [`Store`].
pub struct Verifier {
    store: Box<dyn Store>,
    zone: ZoneId,
    window: u32,
    max_age: u64,
    grace: Duration,
    plain: PlainPolicy,
    services: Vec<ServiceConfig>,
    users: HashMap<i64, UserState>,
    /// Current verifier -> user id.
    index: HashMap<Element, i64>,
    /// Recently accepted elements, so resolver retries are silent no-ops.
    recent: HashMap<Element, Instant>,
}

impl Verifier {
    pub fn new(store: Box<dyn Store>, zone: ZoneId, cfg: &Config) -> Result<Verifier, StoreError> {
        let mut v = Verifier {
            store,
            zone,
            window: cfg.token.window,
            max_age: cfg.token.max_age_seconds,
            grace: Duration::from_secs(cfg.token.grace_seconds),
            plain: cfg.token.plain,
            services: cfg.services.clone(),
            users: HashMap::new(),
            index: HashMap::new(),
            recent: HashMap::new(),
        };
        v.reload()?;
        Ok(v)
    }

    /// The durable store, shared with the door stage on the same thread and
    /// connection (so door bookkeeping does not look like another writer).
    pub fn store_mut(&mut self) -> &mut dyn Store {
        self.store.as_mut()
    }

    /// Number of users that can knock.
    pub fn active_users(&self) -> usize {
        self.users.len()
    }

    fn reload(&mut self) -> Result<(), StoreError> {
        let users = self.store.active_users()?;
        self.index = users.iter().map(|u| (u.verifier, u.id)).collect();
        self.users = users.into_iter().map(|u| (u.id, UserState { record: u })).collect();
        tracing::debug!(users = self.users.len(), "verifier index loaded");
        Ok(())
    }

    /// Verify one knock. On `Open`/`Close` the advance is durable in the store.
    pub fn verify(&mut self, knock: &Knock) -> Decision {
        self.verify_at(knock, unix_now(), Instant::now())
    }

    fn verify_at(&mut self, knock: &Knock, now_unix: u64, now: Instant) -> Decision {
        // Pick up `user add`/`revoke`/`rekey` done by another process.
        match self.store.changed_elsewhere() {
            Ok(false) => {}
            Ok(true) => {
                if let Err(e) = self.reload() {
                    return Decision::Reject(Reject::Store(e.to_string()));
                }
            }
            Err(e) => return Decision::Reject(Reject::Store(e.to_string())),
        }
        let element = *knock.token.element();
        if let Some(at) = self.recent.get(&element) {
            if now.duration_since(*at) <= self.grace {
                return Decision::Repeat;
            }
        }
        // An element that *is* a current verifier was accepted already — by us before a
        // restart, or by another nameserver sharing the database. Within the grace
        // period that is a resolver's retry; later it is a replay.
        if let Some(id) = self.index.get(&element) {
            let user = &self.users[id].record;
            if now_unix.saturating_sub(user.updated) <= self.grace.as_secs() {
                return Decision::Repeat;
            }
            return Decision::Reject(Reject::Replay { user: user.name.clone() });
        }
        // Walk forward from the revealed element: the k-th hash equals the verifier
        // if the user skipped k-1 elements (lost knocks, unused OTP names).
        let mut h = element;
        let mut found = None;
        for k in 1..=self.window as u64 {
            h = chain::step(&self.zone, &h);
            if let Some(&id) = self.index.get(&h) {
                found = Some((id, k));
                break;
            }
        }
        let Some((id, k)) = found else {
            return Decision::Reject(Reject::Unknown);
        };
        let user = &self.users[&id].record;
        let name = user.name.clone();
        if user.counter + k > user.chain_len {
            return Decision::Reject(Reject::Exhausted { user: name });
        }
        // A bound knock's MAC and age are checked before anything is spent: an
        // element seen on the wire must not let a forger burn the user's chain.
        let (addr, prefix_len, requested, close) = match &knock.token {
            Token::Plain(_) => match (self.plain, knock.ecs) {
                (PlainPolicy::Source, _) => {
                    let (a, p) = host_prefix(knock.seen_from);
                    (a, p, 0, false)
                }
                // The door backends admit one IPv4 address (or an IPv6 prefix): a wider
                // IPv4 ECS prefix is refused here, before anything is spent.
                (PlainPolicy::Ecs, Some((a, p))) if a.to_canonical().is_ipv4() && p < 32 => {
                    return Decision::Reject(Reject::Policy {
                        user: name,
                        why: format!("ECS prefix /{p} is wider than one IPv4 address; have the resolver send /32 or use a bound knock"),
                    });
                }
                (PlainPolicy::Ecs, Some((a, p))) if p > 0 => {
                    let (a, p) = ecs_prefix(a, p);
                    (a, p, 0, false)
                }
                // Refused before anything is spent: the element stays usable.
                (PlainPolicy::Ecs, _) => {
                    return Decision::Reject(Reject::Policy { user: name, why: "plain knock without EDNS Client Subnet (plain = \"ecs\")".into() });
                }
                (PlainPolicy::Off, _) => {
                    return Decision::Reject(Reject::Policy { user: name, why: "plain knocks are off (plain = \"off\"); use a bound knock".into() });
                }
            },
            Token::Bound(b) => {
                if b.verify_mac(&user.mac_key, &self.zone).is_err() {
                    return Decision::Reject(Reject::BadMac { user: name });
                }
                if let Err(crate::token::TokenError::TooOld(delta)) = b.check_age(now_unix, self.max_age) {
                    return Decision::Reject(Reject::TooOld { user: name, delta });
                }
                let (a, p) = b.addr.to_prefix();
                (a, p, b.service, b.close)
            }
        };
        // Commit the advance first; only a committed advance may open a door.
        let (old, counter) = (user.verifier, user.counter + k);
        match self.store.advance(id, &old, &element, counter) {
            Ok(true) => {}
            Ok(false) => {
                // Another writer won or the user was revoked meanwhile: resync, open nothing.
                let _ = self.reload();
                return Decision::Reject(Reject::Unknown);
            }
            Err(e) => return Decision::Reject(Reject::Store(e.to_string())),
        }
        self.index.remove(&old);
        self.index.insert(element, id);
        let state = self.users.get_mut(&id).expect("user present");
        state.record.verifier = element;
        state.record.counter = counter;
        state.record.updated = now_unix;
        self.remember(element, now);

        let user = &self.users[&id].record;
        if let Some(why) = policy_refusal(user, addr, prefix_len) {
            return Decision::Reject(Reject::Policy { user: name, why });
        }
        let services: Vec<String> = self
            .services
            .iter()
            .filter(|s| requested == 0 || service_id(&s.name) == requested)
            .filter(|s| user.services.is_empty() || user.services.contains(&s.name))
            .map(|s| s.name.clone())
            .collect();
        if services.is_empty() {
            return Decision::Reject(Reject::Policy { user: name, why: "no permitted service matches the request".into() });
        }
        if close {
            Decision::Close { user: name, addr, prefix_len, services }
        } else {
            Decision::Open { user: name, addr, prefix_len, services, max_open: user.max_open }
        }
    }

    fn remember(&mut self, element: Element, now: Instant) {
        let grace = self.grace;
        if self.recent.len() >= 4096 {
            self.recent.retain(|_, at| now.duration_since(*at) <= grace);
        }
        self.recent.insert(element, now);
    }
}

/// The door for an address seen on the wire: the host for IPv4, the /64 for IPv6
/// (clients rotate privacy addresses within their /64).
fn host_prefix(ip: IpAddr) -> (IpAddr, u8) {
    // A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d.
    let ip = ip.to_canonical();
    match ip {
        IpAddr::V4(_) => (ip, 32),
        IpAddr::V6(_) => crate::token::BoundAddr::from_ip(ip).to_prefix(),
    }
}

/// The door for an ECS prefix: the network with host bits cleared. An IPv6
/// prefix longer than /64 is widened to the /64, as for every IPv6 door.
fn ecs_prefix(ip: IpAddr, len: u8) -> (IpAddr, u8) {
    let ip = ip.to_canonical();
    let len = if ip.is_ipv4() { len.min(32) } else { len.min(64) };
    (netaddr::mask(ip, len), len)
}

/// `Some(reason)` if the user's source-network policy excludes `addr/prefix_len`.
fn policy_refusal(user: &UserRecord, addr: IpAddr, prefix_len: u8) -> Option<String> {
    if user.from.is_empty() {
        return None;
    }
    let inside = user.from.iter().any(|cidr| cidr_contains(cidr, addr, prefix_len));
    (!inside).then(|| format!("{addr}/{prefix_len} is outside {}", user.from.join(",")))
}

/// Does `cidr` contain the whole of `addr/prefix_len`? Malformed CIDRs contain nothing.
pub fn cidr_contains(cidr: &str, addr: IpAddr, prefix_len: u8) -> bool {
    parse_cidr(cidr).is_some_and(|(net, len)| netaddr::contains(net, len, addr, prefix_len))
}

/// Parse `a.b.c.d/n` or `x::/n` (a bare address is a host route).
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip.parse::<IpAddr>().ok()?, len.parse::<u8>().ok()?),
        None => {
            let ip = s.parse::<IpAddr>().ok()?;
            (ip, if ip.is_ipv4() { 32 } else { 128 })
        }
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((ip, len))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::knock::Via;
    use crate::store::{Enrolment, SqliteStore};
    use crate::token::{Bound, BoundAddr, Seed};

    const CFG: &str = r#"
[dns]
zone_file = "z"
listen = ["127.0.0.1:5353"]
[store]
path = "db"
[firewall]
backend = "none"
[[service]]
name = "ssh"
proto = "tcp"
port = 22
[[service]]
name = "web"
proto = "tcp"
port = 443
"#;

    struct Fixture {
        _dir: tempfile::TempDir,
        v: Verifier,
        seed: Seed,
        zone: ZoneId,
        path: std::path::PathBuf,
    }

    const N: u64 = 50;

    fn fixture(from: Vec<String>, services: Vec<String>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let zone = ZoneId::new("knock.example.com");
        let seed = Seed([5; 32]);
        let mut store = SqliteStore::open(&path).unwrap();
        store
            .add_user(&Enrolment {
                name: "alice".into(),
                verifier: seed.element(&zone, N),
                chain_len: N,
                mac_key: b"key".to_vec(),
                services,
                from,
                max_open: None,
            })
            .unwrap();
        let cfg = Config::parse(CFG, std::path::Path::new("/x/c.toml")).unwrap();
        let v = Verifier::new(Box::new(store), zone.clone(), &cfg).unwrap();
        Fixture { _dir: dir, v, seed, zone, path }
    }

    fn knock(token: Token) -> Knock {
        Knock { token, seen_from: "198.18.0.2".parse().unwrap(), via: Via::DnsUdp, ecs: None, received: Instant::now() }
    }

    #[test]
    fn plain_knock_opens_once_then_is_spent() {
        let mut f = fixture(vec![], vec![]);
        let t = Token::Plain(f.seed.element(&f.zone, N - 1));
        let d = f.v.verify(&knock(t.clone()));
        assert_eq!(
            d,
            Decision::Open { user: "alice".into(), addr: "198.18.0.2".parse().unwrap(), prefix_len: 32, services: vec!["ssh".into(), "web".into()], max_open: None }
        );
        // Within grace: a silent repeat. After grace: unknown (spent).
        assert_eq!(f.v.verify(&knock(t.clone())), Decision::Repeat);
        let later = Instant::now() + Duration::from_secs(3600);
        assert_eq!(
            f.v.verify_at(&knock(t.clone()), unix_now() + 3600, later),
            Decision::Reject(Reject::Replay { user: "alice".into() })
        );
        // Once the chain has moved on, the old element is simply unknown.
        let next = Token::Plain(f.seed.element(&f.zone, N - 2));
        assert!(matches!(f.v.verify_at(&knock(next), unix_now() + 3600, later), Decision::Open { .. }));
        assert_eq!(f.v.verify_at(&knock(t), unix_now() + 3600, later), Decision::Reject(Reject::Unknown));
        // The advance is durable.
        let mut s = SqliteStore::open(&f.path).unwrap();
        assert_eq!(s.active_users().unwrap()[0].counter, 2);
    }

    #[test]
    fn window_skips_lost_knocks_but_not_beyond() {
        let mut f = fixture(vec![], vec![]);
        let far = Token::Plain(f.seed.element(&f.zone, N - 33));
        assert_eq!(f.v.verify(&knock(far)), Decision::Reject(Reject::Unknown));
        let skip = Token::Plain(f.seed.element(&f.zone, N - 32));
        assert!(matches!(f.v.verify(&knock(skip)), Decision::Open { .. }));
        // Older elements (already passed) never open again.
        let old = Token::Plain(f.seed.element(&f.zone, N - 5));
        assert_eq!(f.v.verify(&knock(old)), Decision::Reject(Reject::Unknown));
    }

    #[test]
    fn bound_knock_opens_embedded_address_for_requested_service() {
        let mut f = fixture(vec![], vec![]);
        let e = f.seed.element(&f.zone, N - 1);
        let addr = BoundAddr::from_ip("2001:db8:18::77".parse().unwrap());
        let b = Bound::sign(b"key", &f.zone, e, addr, service_id("web"), unix_now() as u32, false);
        assert_eq!(
            f.v.verify(&knock(Token::Bound(b))),
            Decision::Open { user: "alice".into(), addr: "2001:db8:18::".parse().unwrap(), prefix_len: 64, services: vec!["web".into()], max_open: None }
        );
    }

    #[test]
    fn forged_or_stale_bound_knock_spends_nothing() {
        let mut f = fixture(vec![], vec![]);
        let e = f.seed.element(&f.zone, N - 1);
        let addr = BoundAddr::from_ip("198.18.0.3".parse().unwrap());
        let forged = Bound::sign(b"not-the-key", &f.zone, e, addr, 0, unix_now() as u32, false);
        assert_eq!(f.v.verify(&knock(Token::Bound(forged))), Decision::Reject(Reject::BadMac { user: "alice".into() }));
        let stale = Bound::sign(b"key", &f.zone, e, addr, 0, unix_now() as u32 - 500, false);
        assert!(matches!(f.v.verify(&knock(Token::Bound(stale))), Decision::Reject(Reject::TooOld { .. })));
        // The genuine knock still works: nothing was spent.
        let good = Bound::sign(b"key", &f.zone, e, addr, 0, unix_now() as u32, false);
        assert!(matches!(f.v.verify(&knock(Token::Bound(good))), Decision::Open { .. }));
    }

    #[test]
    fn policy_refuses_outside_networks_and_services() {
        let mut f = fixture(vec!["203.0.113.0/24".into()], vec!["ssh".into()]);
        let t = Token::Plain(f.seed.element(&f.zone, N - 1));
        assert!(matches!(f.v.verify(&knock(t)), Decision::Reject(Reject::Policy { .. })));
        let mut f = fixture(vec!["198.18.0.0/15".into()], vec!["ssh".into()]);
        let e = f.seed.element(&f.zone, N - 1);
        let b = Bound::sign(b"key", &f.zone, e, BoundAddr::from_ip("198.18.0.2".parse().unwrap()), service_id("web"), unix_now() as u32, false);
        assert!(matches!(f.v.verify(&knock(Token::Bound(b))), Decision::Reject(Reject::Policy { .. })));
    }

    #[test]
    fn element_accepted_by_another_nameserver_is_a_silent_repeat() {
        let mut a = fixture(vec![], vec![]);
        let store_b = SqliteStore::open(&a.path).unwrap();
        let cfg = Config::parse(CFG, std::path::Path::new("/x/c.toml")).unwrap();
        let mut b = Verifier::new(Box::new(store_b), a.zone.clone(), &cfg).unwrap();
        let t = Token::Plain(a.seed.element(&a.zone, N - 1));
        assert!(matches!(a.v.verify(&knock(t.clone())), Decision::Open { .. }));
        assert_eq!(b.verify(&knock(t)), Decision::Repeat);
    }

    #[test]
    fn plain_policy_ecs_and_off() {
        let mut f = fixture(vec![], vec![]);
        f.v.plain = PlainPolicy::Ecs;
        let t = Token::Plain(f.seed.element(&f.zone, N - 1));
        assert!(matches!(f.v.verify(&knock(t.clone())), Decision::Reject(Reject::Policy { .. })));
        let mut k = knock(t);
        k.ecs = Some(("198.51.100.77".parse().unwrap(), 24));
        assert!(matches!(f.v.verify(&k), Decision::Reject(Reject::Policy { .. })), "IPv4 ECS wider than /32");
        k.ecs = Some(("198.51.100.77".parse().unwrap(), 32));
        assert_eq!(
            f.v.verify(&k),
            Decision::Open { user: "alice".into(), addr: "198.51.100.77".parse().unwrap(), prefix_len: 32, services: vec!["ssh".into(), "web".into()], max_open: None }
        );
        f.v.plain = PlainPolicy::Off;
        let t = Token::Plain(f.seed.element(&f.zone, N - 2));
        assert!(matches!(f.v.verify(&knock(t.clone())), Decision::Reject(Reject::Policy { .. })));
        // Refused plain knocks spend nothing: the same element still opens as policy allows.
        f.v.plain = PlainPolicy::Source;
        assert!(matches!(f.v.verify(&knock(t)), Decision::Open { .. }));
    }

    #[test]
    fn revocation_by_another_process_is_picked_up() {
        let mut f = fixture(vec![], vec![]);
        SqliteStore::open(&f.path).unwrap().revoke("alice").unwrap();
        let t = Token::Plain(f.seed.element(&f.zone, N - 1));
        assert_eq!(f.v.verify(&knock(t)), Decision::Reject(Reject::Unknown));
    }

    #[test]
    fn cidr_matching() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(cidr_contains("198.18.0.0/15", ip("198.19.1.1"), 32));
        assert!(!cidr_contains("198.18.0.0/16", ip("198.19.1.1"), 32));
        assert!(cidr_contains("2001:db8::/32", ip("2001:db8:18::"), 64));
        assert!(!cidr_contains("2001:db8:18::1/128", ip("2001:db8:18::"), 64));
        assert!(!cidr_contains("garbage", ip("1.2.3.4"), 32));
        assert!(!cidr_contains("10.0.0.0/8", ip("::1"), 128));
        assert!(parse_cidr("10.0.0.0/33").is_none());
    }
}
