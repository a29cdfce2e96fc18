//! Verification: is this knock the next unspent element of one of some user's chains?
//!
//! The verifier keeps every active user's two verifiers (one per [`Form`]) in a
//! hash map so the hot path never waits on disk: a knock costs at most `window`
//! hashes and map probes whatever the number of users, and no user name is needed
//! (or sent). SQLite is the durable record, written on accept — and written
//! *before* the caller opens a door, so a crash can never leave a spent element
//! reusable.
//!
//! Every refusal is decided before anything is spent: a knock that opens nothing
//! leaves the user's chain where it was, so whoever sends a copy of a user's knock
//! (from the wrong address, as the wrong form, with a forged ECS) cannot use up
//! the element the user's own knock needs. See ARCHITECTURE.md, "Verification".

mod index;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::unix_now;
use crate::config::{Config, PlainPolicy};
use crate::doors::DoorPlan;
use crate::knock::{Knock, Via};
use crate::netaddr::{DoorSizeError, Prefix};
use crate::store::{ChainState, Change, DoorRecord, Store, StoreError, UserRecord};
use crate::token::{Element, Form, Token, TokenError, ZoneId, ZoneKey, chain, service_id};
use crate::whoami::KeyTable;
use index::{ChainRef, Index};

/// What the door stage should do for a knock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Open `door` for these door records (services, hosts, windows), which are
    /// committed together with the chain's advance.
    Open { user: String, door: Prefix, records: Vec<DoorRecord> },
    /// Close this user's doors for `door` (close knock). Committed too.
    Close { user: String, door: Prefix, services: Vec<String> },
    /// The same token as one accepted moments ago: a resolver retry. Nothing to do.
    Repeat,
    /// Not a valid knock, or one that may open nothing. Nothing was spent.
    Reject { user: Option<String>, why: Reject },
}

/// Why a knock opened nothing. [`Reject::reason`] is the stable word for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// No user's verifier within the window: random, spent, revoked, or foreign.
    Unknown,
    /// A bound label without the zone's admission tag: not made by an enrolled client.
    LookAlike,
    /// The element belongs to the user's other chain (e.g. a bound knock's element
    /// sent as a plain knock).
    WrongForm,
    /// The user's last accepted element, again, after the grace period.
    Replay,
    BadMac,
    TooOld {
        delta: i64,
    },
    /// The chain is used up; the user must be re-keyed.
    Exhausted,
    /// `plain = "off"`.
    PlainOff,
    /// A bare element in a single UDP datagram: that transport takes bound knocks
    /// only (a plain one would open for whoever races the copy of the datagram).
    PlainOverUdp,
    /// A port sequence carrying a plain element that was already seen, and refused,
    /// on another path: whoever saw it there could be the one sending the sequence.
    Exposed,
    /// `plain = "ecs"` and the query carried no usable ECS.
    NoEcs,
    /// ECS from a source outside `[token] ecs_from`.
    EcsUntrusted,
    /// The address to admit is not a door: too wide, mapped or reserved.
    DoorSize(DoorSizeError),
    /// Valid knock, but the user may not open for this address.
    OutsideFrom {
        door: Prefix,
    },
    /// Valid knock, but no service the user may open matches the request.
    NoService,
    /// The chain moved under us (another writer, a revocation): nothing spent here.
    Lost,
    /// The user's knocks came faster than the verifier serves one user (nothing spent).
    UserRate,
    /// The store refused or failed; fail closed.
    Store(String),
}

impl Reject {
    /// One stable word per cause, for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Reject::Unknown => "unknown",
            Reject::LookAlike => "look-alike",
            Reject::WrongForm => "wrong-form",
            Reject::Replay => "replay",
            Reject::BadMac => "bad-mac",
            Reject::TooOld { .. } => "too-old",
            Reject::Exhausted => "exhausted",
            Reject::PlainOff => "plain-off",
            Reject::PlainOverUdp => "plain-over-udp",
            Reject::Exposed => "exposed",
            Reject::NoEcs => "no-ecs",
            Reject::EcsUntrusted => "ecs-untrusted",
            Reject::DoorSize(_) => "door-size",
            Reject::OutsideFrom { .. } => "outside-from",
            Reject::NoService => "no-service",
            Reject::Lost => "lost-race",
            Reject::UserRate => "user-rate",
            Reject::Store(_) => "store",
        }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reject::Unknown => f.write_str("matches no chain (random, spent, revoked or foreign)"),
            Reject::LookAlike => f.write_str("bound label without this zone's admission tag"),
            Reject::WrongForm => {
                f.write_str("element of the user's other chain (a bound element sent as plain, or the reverse)")
            }
            Reject::Replay => f.write_str("the user's last accepted element, replayed after the grace period"),
            Reject::BadMac => f.write_str("bound knock whose MAC does not verify"),
            Reject::TooOld { delta } => write!(f, "bound knock made {delta} s away from now, beyond max_age_seconds"),
            Reject::Exhausted => f.write_str("chain used up; `nxknock user rekey` the user"),
            Reject::PlainOff => f.write_str("plain knocks are off (plain = \"off\"); use a bound knock"),
            Reject::Exposed => {
                f.write_str("a port sequence carrying an element already seen and refused on another path")
            }
            Reject::PlainOverUdp => {
                f.write_str("a plain element in a UDP knock; send a bound knock (`--via udp --ip`)")
            }
            Reject::NoEcs => f.write_str("plain knock without EDNS Client Subnet (plain = \"ecs\")"),
            Reject::EcsUntrusted => f.write_str("EDNS Client Subnet from a source outside [token] ecs_from"),
            Reject::DoorSize(e) => write!(f, "{e}"),
            Reject::OutsideFrom { door } => write!(f, "{door} is outside the user's --from networks"),
            Reject::NoService => f.write_str("no permitted service matches the request"),
            Reject::Lost => f.write_str("the chain moved meanwhile (another nameserver, or a revocation)"),
            Reject::UserRate => f.write_str("this user's knocks come faster than the verifier serves one user"),
            Reject::Store(e) => write!(f, "store failed: {e}"),
        }
    }
}

/// How long (and how many) refused plain elements are remembered as exposed.
const EXPOSED_FOR: Duration = Duration::from_secs(24 * 3600);
const EXPOSED_MAX: usize = 65_536;

fn reject(user: Option<&UserRecord>, why: Reject) -> Decision {
    Decision::Reject { user: user.map(|u| u.name.clone()), why }
}

/// What a knock asks for, once its address is settled.
struct Target {
    door: Prefix,
    /// [`service_id`] requested; 0 asks for every permitted service.
    service: u16,
    close: bool,
}

/// Steps the cheap check walks: the next element, or one after one or two lost
/// knocks (a client reserves an element before sending it, so a lost knock leaves
/// a gap that every later knock would otherwise need a deep walk to cross).
const QUICK_DEPTH: u32 = 3;
/// How often the knock path asks the store for outside changes, at most.
const REFRESH_GAP: Duration = Duration::from_millis(20);
/// Accepted knocks a second one user may have (bursts of [`USER_BURST`]).
const USER_RATE: f64 = 50.0;
const USER_BURST: f64 = 100.0;

/// Replays remembered so a replayed element costs no database read twice.
const STALE_CACHE: usize = 4096;
/// Users kept in memory after a decision (bounded: cleared when full).
const KNOWN_USERS: usize = 4096;

/// The verifier over a [`Store`]: a compact in-memory index of every active
/// chain's verifier (see `index.rs`); everything else about a user is read from the
/// store only when a knock hits that user's chain, which random tokens never do.
pub struct Verifier {
    store: Box<dyn Store>,
    zone: ZoneId,
    zone_key: ZoneKey,
    window: u32,
    max_age: u64,
    grace: Duration,
    plain: PlainPolicy,
    ecs_from: Vec<Prefix>,
    /// The services, and what a granted knock records (committed with its element).
    plan: DoorPlan,
    /// Current verifier -> the chain it ends.
    index: Index,
    users: usize,
    /// Users a knock was recently decided for, as the store had them then (their
    /// chains advanced by our own spends): a user's next knock is decided without
    /// reading the store first, which was ~0.06 ms of a knock's ~0.7 ms here
    /// (a cold read after idle). Safe because the spend commits only if the row is
    /// still at the record's revision and the chain at its verifier; if not, the
    /// knock is decided again on a fresh read ([`Verifier::decide`]).
    known: HashMap<i64, UserRecord>,
    /// Recently accepted elements, so resolver retries are silent no-ops.
    recent: HashMap<Element, (Form, Instant)>,
    /// Elements found replayed after the grace period (bounded).
    stale: HashMap<Element, Instant>,
    /// Plain elements refused for how they arrived (plain off, over UDP, no or
    /// untrusted ECS): seen on a wrong path, so never good for a port sequence, which
    /// opens for whoever sends it (bounded; see ARCHITECTURE.md, "Port sequences").
    exposed: HashMap<Element, Instant>,
    /// Revoked users as of the last load, to notice new revocations.
    revoked_names: HashSet<String>,
    /// Users revoked since the last [`Verifier::take_changes`].
    revoked: Vec<String>,
    /// Another process changed the store since the last [`Verifier::take_changes`].
    changed: bool,
    /// A reload failed: retry at the next refresh even if nothing changes again.
    dirty: bool,
    /// When the store was last asked for outside changes (at most every
    /// [`REFRESH_GAP`] on the knock path, so a flood does not ask per knock).
    asked: Option<Instant>,
    /// Accepted knocks per user: an enrolled user cannot monopolise the verifier
    /// (and its disk commits) with a stream of their own valid elements.
    per_user: HashMap<i64, (f64, Instant)>,
    /// Where the DNS listener finds MAC keys to answer whoami, if enabled.
    whoami_keys: Option<Arc<KeyTable>>,
}

impl Verifier {
    pub fn new(mut store: Box<dyn Store>, zone: ZoneId, cfg: &Config) -> Result<Verifier, StoreError> {
        let zone_key = ZoneKey::new(&store.zone_key()?, &zone);
        let revoked_names = store.revoked_users()?.into_iter().collect();
        let mut v = Verifier {
            store,
            zone,
            zone_key,
            window: cfg.token.window,
            max_age: cfg.token.max_age_seconds,
            grace: Duration::from_secs(cfg.token.grace_seconds),
            plain: cfg.token.plain,
            ecs_from: cfg.token.ecs_from.clone(),
            plan: DoorPlan::from_config(cfg),
            index: Index::with_capacity(0),
            users: 0,
            known: HashMap::new(),
            recent: HashMap::new(),
            exposed: HashMap::new(),
            stale: HashMap::new(),
            revoked_names,
            revoked: Vec::new(),
            changed: false,
            dirty: false,
            asked: None,
            per_user: HashMap::new(),
            whoami_keys: None,
        };
        v.reload()?;
        Ok(v)
    }

    /// Take the policy of a reloaded config (SIGHUP): window, ages, plain policy,
    /// trusted ECS sources, services. The index, the chains and the memory of recent
    /// knocks stay, so a reload neither forgets a spent element nor re-reads the store.
    pub fn reconfigure(&mut self, cfg: &Config) {
        self.window = cfg.token.window;
        self.max_age = cfg.token.max_age_seconds;
        self.grace = Duration::from_secs(cfg.token.grace_seconds);
        self.plain = cfg.token.plain;
        self.ecs_from = cfg.token.ecs_from.clone();
        self.plan = DoorPlan::from_config(cfg);
    }

    /// Keep `table` filled with the active users' MAC keys, for whoami answers.
    /// (Only with `[dns] whoami`: it costs the keys' memory.)
    pub fn publish_keys(&mut self, table: Arc<KeyTable>) -> Result<(), StoreError> {
        self.whoami_keys = Some(table);
        self.publish()
    }

    fn publish(&mut self) -> Result<(), StoreError> {
        if let Some(t) = &self.whoami_keys {
            let users = self.store.active_users()?;
            t.replace(users.into_iter().filter_map(|u| Some((u32::try_from(u.id).ok()?, u.mac_key))).collect());
        }
        Ok(())
    }

    /// The durable store, shared with the door stage on the same thread and
    /// connection (so door bookkeeping does not look like another writer).
    pub fn store_mut(&mut self) -> &mut dyn Store {
        self.store.as_mut()
    }

    /// Number of users that can knock.
    pub fn active_users(&self) -> usize {
        self.users
    }

    /// Bytes of RAM the verifier index holds (what grows with the number of users).
    pub fn index_bytes(&self) -> usize {
        self.index.bytes()
    }

    fn reload(&mut self) -> Result<(), StoreError> {
        let (_, chains) = self.store.count_active()?;
        let mut pairs = Vec::with_capacity(chains);
        let (mut users, mut unfit) = (0, 0);
        self.store.active_verifiers(&mut |user, form, verifier| {
            if ChainRef::fits(user) {
                pairs.push((verifier, ChainRef { user, form }));
                users += usize::from(form == Form::Plain);
            } else {
                unfit += 1;
            }
        })?;
        if unfit > 0 {
            tracing::warn!(chains = unfit, "chains of users with ids beyond 2^31 cannot knock; re-add those users");
        }
        self.index = Index::build(pairs);
        self.users = users;
        self.known.clear();
        let now_revoked: HashSet<String> = self.store.revoked_users()?.into_iter().collect();
        self.revoked.extend(now_revoked.difference(&self.revoked_names).cloned());
        self.revoked_names = now_revoked;
        self.stale.clear();
        self.publish()?;
        tracing::debug!(users = self.users, index_bytes = self.index.bytes(), "verifier index loaded");
        Ok(())
    }

    /// Pick up `user add`/`revoke`/`rekey` done by another process. Cheap when
    /// nothing changed (no disk I/O in WAL mode); the daemon calls it when idle too,
    /// so a revocation closes doors at once and not at the next knock.
    /// Returns whether anything changed.
    pub fn refresh(&mut self) -> Result<bool, StoreError> {
        self.asked = Some(Instant::now());
        let changes = self.store.changes_elsewhere()?;
        if self.dirty || changes.contains(&Change::Other) {
            self.changed = true;
            self.dirty = true;
            self.reload()?;
            self.dirty = false;
            return Ok(true);
        }
        let moved = !changes.is_empty();
        // Only chains moved (knocks accepted by another nameserver): follow them.
        for change in changes {
            let Change::Chain { user, form, old, new } = change else { continue };
            let chain = ChainRef { user, form };
            self.known.remove(&user);
            if let Some(old) = old {
                if self.index.get(&old) == Some(chain) {
                    self.index.remove(&old);
                }
            }
            if let Some(new) = new.filter(|_| ChainRef::fits(user)) {
                self.index.insert(new, chain);
            }
        }
        Ok(moved)
    }

    /// [`Verifier::refresh`], at most every [`REFRESH_GAP`]: on the knock path.
    fn refresh_soon(&mut self, now: Instant) -> Result<bool, StoreError> {
        match self.asked {
            Some(at) if now.duration_since(at) < REFRESH_GAP && !self.dirty => Ok(false),
            _ => self.refresh(),
        }
    }

    /// May this user have one more accepted knock now? A token bucket per user.
    fn user_budget(&mut self, user: i64, now: Instant) -> bool {
        if self.per_user.len() > 65_536 {
            self.per_user.clear();
        }
        let (tokens, last) = self.per_user.entry(user).or_insert((USER_BURST, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * USER_RATE).min(USER_BURST);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// `Some(users revoked meanwhile)` if another process changed the store since the
    /// last call: the door stage then re-checks its doors against their records.
    pub fn take_changes(&mut self) -> Option<Vec<String>> {
        std::mem::take(&mut self.changed).then(|| std::mem::take(&mut self.revoked))
    }

    /// The user a chain belongs to, from the store; `None` if gone or revoked
    /// meanwhile (the index is then stale: reload it).
    fn load_user(&mut self, id: i64) -> Result<Option<UserRecord>, Reject> {
        match self.store.user(id) {
            Ok(Some(u)) if !u.revoked => Ok(Some(u)),
            Ok(_) => {
                let _ = self.reload();
                Ok(None)
            }
            Err(e) => Err(Reject::Store(e.to_string())),
        }
    }

    /// [`Verifier::load_user`] from memory if the user is known (see
    /// [`Verifier::known`]); the flag says whether it came from memory.
    fn known_user(&mut self, id: i64, fresh: bool) -> Result<Option<(UserRecord, bool)>, Reject> {
        if !fresh {
            if let Some(u) = self.known.get(&id) {
                return Ok(Some((u.clone(), true)));
            }
        }
        let Some(u) = self.load_user(id)? else { return Ok(None) };
        if self.known.len() >= KNOWN_USERS {
            self.known.clear();
        }
        self.known.insert(id, u.clone());
        Ok(Some((u, false)))
    }

    /// Verify one knock, walking the whole window. On `Open`/`Close` the advance is
    /// durable in the store.
    pub fn verify(&mut self, knock: &Knock) -> Decision {
        self.verify_at(knock, unix_now(), Instant::now())
    }

    /// The cheap case first: decide the knock if it is the *next* element of a chain
    /// (one hash), a repeat, or refusable without hashing; `None` means only a deeper
    /// walk can tell, which the caller does with [`Verifier::verify`] when it has
    /// time to spare. A flood of random tokens thus costs one hash each, and a user's
    /// next knock never waits behind it.
    pub fn verify_quick(&mut self, knock: &Knock) -> Option<Decision> {
        self.verify_depth(knock, unix_now(), Instant::now(), QUICK_DEPTH)
    }

    fn verify_at(&mut self, knock: &Knock, now_unix: u64, now: Instant) -> Decision {
        let window = self.window;
        self.verify_depth(knock, now_unix, now, window).expect("a full-window walk always decides")
    }

    /// Verification with a forward walk of at most `depth` steps; `None` if the walk
    /// found nothing but a longer one (up to `window`) might.
    fn verify_depth(&mut self, knock: &Knock, now_unix: u64, now: Instant, depth: u32) -> Option<Decision> {
        let form = knock.token.form();
        let element = *knock.token.element();
        // Look-alikes cost one keyed hash here, never a chain walk (the DNS listener
        // already drops them; this keeps the verifier safe on its own).
        if let Token::Bound(b) = &knock.token {
            if b.check_admission(&self.zone_key).is_err() {
                return Some(reject(None, Reject::LookAlike));
            }
        }
        if let Some(d) = self.already_accepted(&element, form, now_unix, now) {
            return Some(d);
        }
        // A hit needs no look at the store first: the user's record is kept or read,
        // and the advance compared-and-set in the store itself. A miss may be a chain this
        // index has not seen yet (a user added or re-keyed by another process), so it
        // looks (at most every REFRESH_GAP) and walks again if anything changed.
        let hit = match self.find(&element, form, depth) {
            Some(hit) => Some(hit),
            None => match self.refresh_soon(now) {
                Err(e) => return Some(reject(None, Reject::Store(e.to_string()))),
                Ok(true) => self.find(&element, form, depth),
                Ok(false) => None,
            },
        };
        let Some((chain, found, k)) = hit else {
            return (depth >= self.window).then(|| reject(None, Reject::Unknown));
        };
        Some(self.decide(knock, chain, found, k, now_unix, now))
    }

    /// The walk found `chain`'s verifier `found`, `k` steps ahead: check
    /// everything, then spend. First on the user's record as kept in memory
    /// ([`Verifier::known`]); whatever that record cannot settle for certain (it
    /// refuses the knock, or the store refuses the spend because the row or the
    /// chain changed meanwhile) is decided again on a fresh read, so a kept
    /// record never refuses a knock the store's would allow, nor opens one it
    /// would not.
    fn decide(
        &mut self,
        knock: &Knock,
        chain: ChainRef,
        found: Element,
        k: u64,
        now_unix: u64,
        now: Instant,
    ) -> Decision {
        if chain.form != knock.token.form() {
            return reject(None, Reject::WrongForm);
        }
        if !self.user_budget(chain.user, now) {
            return reject(None, Reject::UserRate);
        }
        let mut fresh = false;
        loop {
            let (user, kept) = match self.known_user(chain.user, fresh) {
                Ok(Some(u)) => u,
                Ok(None) => return reject(None, Reject::Unknown),
                Err(why) => return reject(None, why),
            };
            match self.decide_for(knock, chain, found, k, user, kept, now_unix, now) {
                Some(d) => return d,
                None => {
                    self.known.remove(&chain.user);
                    fresh = true;
                }
            }
        }
    }

    /// [`Verifier::decide`] on one record of the user; `None` when the record was
    /// a `kept` one and did not settle the knock.
    #[allow(clippy::too_many_arguments)]
    fn decide_for(
        &mut self,
        knock: &Knock,
        chain: ChainRef,
        found: Element,
        mut k: u64,
        user: UserRecord,
        kept: bool,
        now_unix: u64,
        now: Instant,
    ) -> Option<Decision> {
        let form = knock.token.form();
        let element = *knock.token.element();
        let refuse = |why| if kept { None } else { Some(reject(Some(&user), why)) };
        let state = *user.chain(form);
        if state.verifier != found && kept {
            return None;
        }
        if state.verifier != found {
            // Another nameserver advanced this chain: our index is behind. Catch up.
            let _ = self.refresh();
            if state.verifier == element {
                // ... by spending this very element (the same knock reached it too).
                self.recent.insert(element, (form, now));
                return Some(Decision::Repeat);
            }
            // ... by spending earlier elements: this one may still be ahead of the
            // store's verifier, and then it is decided on the store's state.
            let mut h = element;
            let Some(ahead) = (1..=k).find(|_| {
                h = chain::step(&self.zone, form, &h);
                h == state.verifier
            }) else {
                return refuse(Reject::Lost);
            };
            k = ahead;
        }
        if state.counter + k > user.chain_len {
            return refuse(Reject::Exhausted);
        }
        let target = match self.target(knock, &user, now_unix) {
            Ok(t) => t,
            Err(why @ (Reject::PlainOff | Reject::PlainOverUdp | Reject::NoEcs | Reject::EcsUntrusted)) => {
                // Not spent (the user's own knock may still come by the right path), but
                // remembered: as a sequence it would open for whoever saw it here.
                if self.exposed.len() >= EXPOSED_MAX {
                    let cutoff = now.checked_sub(EXPOSED_FOR).unwrap_or(now);
                    self.exposed.retain(|_, at| *at > cutoff);
                    if self.exposed.len() >= EXPOSED_MAX {
                        self.exposed.clear();
                    }
                }
                self.exposed.insert(element, now);
                return refuse(why);
            }
            Err(why) => return refuse(why),
        };
        if knock.via.is_sequence() && self.exposed.get(&element).is_some_and(|at| now.duration_since(*at) < EXPOSED_FOR)
        {
            return refuse(Reject::Exposed);
        }
        // Stored CIDRs were checked at enrolment; one that no longer parses admits nothing.
        let from: Vec<Prefix> = user.from.iter().filter_map(|c| c.parse().ok()).collect();
        if !user.from.is_empty() && !from.iter().any(|net| net.contains_prefix(&target.door)) {
            return refuse(Reject::OutsideFrom { door: target.door });
        }
        let services = self.permitted(&user, target.service);
        if services.is_empty() {
            return refuse(Reject::NoService);
        }
        // Every check passed: commit the advance and the door records in one
        // transaction, on the row's revision; only a committed advance may open a door.
        let records = if target.close {
            Vec::new()
        } else {
            self.plan.records(&user.name, target.door, &services, user.max_open, knock.via.as_str(), now_unix)
        };
        let counter = state.counter + k;
        if let Err(why) = self.spend(chain, &state.verifier, element, counter, &records, user.revision, now) {
            if matches!(why, Reject::Lost) {
                if kept {
                    return None; // the kept record may be behind the store
                }
                // Another writer won or the user was revoked or changed meanwhile:
                // resync, open nothing.
                let _ = self.reload();
                // If the winner spent this very element (the same knock reached
                // another nameserver sharing the store), this one is its repeat.
                if matches!(self.store.user(chain.user), Ok(Some(u)) if u.chain(form).verifier == element) {
                    self.recent.insert(element, (form, now));
                    return Some(Decision::Repeat);
                }
            }
            return Some(reject(Some(&user), why));
        }
        if let Some(u) = self.known.get_mut(&chain.user) {
            *u.chain_mut(form) = ChainState { verifier: element, counter, updated: now_unix };
        }
        Some(if target.close {
            Decision::Close { user: user.name, door: target.door, services }
        } else {
            Decision::Open { user: user.name, door: target.door, records }
        })
    }

    /// Is this element one we accepted already? Within the grace period that is a
    /// resolver's retry (or a second nameserver's copy, or us before a restart);
    /// later it is a replay. The wrong form is never a repeat.
    fn already_accepted(&mut self, element: &Element, form: Form, now_unix: u64, now: Instant) -> Option<Decision> {
        if let Some((f, at)) = self.recent.get(element) {
            if now.duration_since(*at) <= self.grace {
                return Some(if *f == form { Decision::Repeat } else { reject(None, Reject::WrongForm) });
            }
        }
        let chain = self.index.get(element)?;
        if chain.form != form {
            return Some(reject(None, Reject::WrongForm));
        }
        if self.stale.contains_key(element) {
            return Some(reject(None, Reject::Replay));
        }
        let user = match self.load_user(chain.user) {
            Ok(Some(u)) => u,
            Ok(None) => return Some(reject(None, Reject::Unknown)),
            Err(why) => return Some(reject(None, why)),
        };
        if now_unix.saturating_sub(user.chain(form).updated) <= self.grace.as_secs() {
            return Some(Decision::Repeat);
        }
        if self.stale.len() >= STALE_CACHE {
            self.stale.clear();
        }
        self.stale.insert(*element, now);
        Some(reject(Some(&user), Reject::Replay))
    }

    /// Walk forward from the revealed element with `form`'s step function: the k-th
    /// hash equals a verifier if the user skipped k-1 elements (lost knocks, unused
    /// printed names). A hit on the other form's verifier is returned too, so it can
    /// be refused by name.
    fn find(&self, element: &Element, form: Form, depth: u32) -> Option<(ChainRef, Element, u64)> {
        let mut h = *element;
        for k in 1..=u64::from(depth.min(self.window)) {
            h = chain::step(&self.zone, form, &h);
            if let Some(c) = self.index.get(&h) {
                return Some((c, h, k));
            }
        }
        None
    }

    /// The door a knock asks for: the embedded address of a bound knock (after its
    /// MAC and age), or for a plain knock what `[token] plain` allows.
    fn target(&self, knock: &Knock, user: &UserRecord, now_unix: u64) -> Result<Target, Reject> {
        match &knock.token {
            Token::Bound(b) => {
                b.verify_mac(&user.mac_key, &self.zone).map_err(|_| Reject::BadMac)?;
                if let Err(TokenError::TooOld(delta)) = b.check_age(now_unix, self.max_age) {
                    return Err(Reject::TooOld { delta });
                }
                let door = b.addr.to_prefix().door().map_err(Reject::DoorSize)?;
                Ok(Target { door, service: b.service, close: b.close })
            }
            Token::Plain(_) if knock.via.is_sequence() => {
                // Sequences come straight to this host: the packet source is the
                // sender (or its NAT); resolvers and ECS play no part.
                let door = Prefix::source_door(knock.seen_from);
                Ok(Target { door: door.door().map_err(Reject::DoorSize)?, service: 0, close: false })
            }
            Token::Plain(_) if knock.via == Via::Udp => Err(Reject::PlainOverUdp),
            Token::Plain(_) => {
                let door = match self.plain {
                    PlainPolicy::Off => return Err(Reject::PlainOff),
                    PlainPolicy::Source => Prefix::source_door(knock.seen_from),
                    PlainPolicy::Ecs => self.ecs_door(knock)?,
                };
                Ok(Target { door: door.door().map_err(Reject::DoorSize)?, service: 0, close: false })
            }
        }
    }

    /// ECS is believed only from `[token] ecs_from`, and only as wide as a door may be.
    fn ecs_door(&self, knock: &Knock) -> Result<Prefix, Reject> {
        let Some(ecs) = knock.ecs else { return Err(Reject::NoEcs) };
        if !self.ecs_from.iter().any(|net| net.contains_ip(knock.seen_from)) {
            return Err(Reject::EcsUntrusted);
        }
        // Family 2 carrying ::ffff:a.b.c.d must not pass for IPv4 (`Prefix::door`
        // refuses all of ::/8 too; this names the cause).
        if let IpAddr::V6(a) = ecs.addr() {
            if a.to_ipv4_mapped().is_some() {
                return Err(Reject::DoorSize(DoorSizeError::Reserved));
            }
        }
        Ok(ecs)
    }

    /// Configured services this knock may open: the requested one (or all), within
    /// the user's list.
    fn permitted(&self, user: &UserRecord, requested: u16) -> Vec<String> {
        self.plan
            .services()
            .iter()
            .filter(|s| requested == 0 || service_id(&s.name) == requested)
            .filter(|s| user.services.is_empty() || user.services.contains(&s.name))
            .map(|s| s.name.clone())
            .collect()
    }

    /// Commit `element` as the chain's new verifier, with the door records it
    /// opens, if the user's row is still at `revision`; then update the index.
    /// `Lost` when the store refused (the caller decides whether to resync).
    #[allow(clippy::too_many_arguments)]
    fn spend(
        &mut self,
        chain: ChainRef,
        old: &Element,
        element: Element,
        counter: u64,
        records: &[DoorRecord],
        revision: i64,
        now: Instant,
    ) -> Result<(), Reject> {
        match self.store.spend(chain.user, chain.form, old, &element, counter, records, Some(revision)) {
            Ok(true) => {}
            Ok(false) => return Err(Reject::Lost),
            Err(e) => return Err(Reject::Store(e.to_string())),
        }
        // Committed: from here the element is spent for good. The position (how far
        // down the chain) is no secret (`user list` shows it) and lets an operator —
        // and the crash test — see that no position is ever accepted twice.
        tracing::debug!(user_id = chain.user, form = ?chain.form, position = counter, "element spent");
        self.index.remove(old);
        self.index.insert(element, chain);
        let grace = self.grace;
        if self.recent.len() >= 4096 {
            self.recent.retain(|_, (_, at)| now.duration_since(*at) <= grace);
        }
        self.recent.insert(element, (chain.form, now));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::knock::Via;
    use crate::store::{Enrolment, SqliteStore};
    use crate::token::{Bound, BoundAddr, BoundKnock, Seed};

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
        zone_key: ZoneKey,
        path: std::path::PathBuf,
    }

    const N: u64 = 50;

    impl Fixture {
        fn plain(&self, j: u64) -> Token {
            Token::Plain(self.seed.element(&self.zone, Form::Plain, j))
        }

        fn bound_with(&self, key: &[u8], j: u64, ip: &str, service: u16, time: u32, close: bool) -> Token {
            let element = self.seed.element(&self.zone, Form::Bound, j);
            let knock = BoundKnock { element, addr: BoundAddr::from_ip(ip.parse().unwrap()), service, time, close };
            Token::Bound(Bound::sign(key, &self.zone_key, &self.zone, knock))
        }

        fn bound(&self, j: u64, ip: &str, service: u16) -> Token {
            self.bound_with(b"key", j, ip, service, unix_now() as u32, false)
        }
    }

    fn fixture(from: Vec<String>, services: Vec<String>) -> Fixture {
        fixture_cfg(CFG, from, services)
    }

    fn fixture_n(n: u64) -> Fixture {
        fixture_cfg_n(CFG, vec![], vec![], n)
    }

    fn fixture_cfg(cfg: &str, from: Vec<String>, services: Vec<String>) -> Fixture {
        fixture_cfg_n(cfg, from, services, N)
    }

    fn fixture_cfg_n(cfg: &str, from: Vec<String>, services: Vec<String>, n: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let zone = ZoneId::new("knock.example.com");
        let seed = Seed([5; 32]);
        let mut store = SqliteStore::open(&path).unwrap();
        store
            .add_user(&Enrolment {
                name: "alice".into(),
                verifiers: [seed.element(&zone, Form::Plain, n), seed.element(&zone, Form::Bound, n)],
                chain_len: n,
                mac_key: b"key".to_vec(),
                services,
                from,
                max_open: None,
            })
            .unwrap();
        let zone_key = ZoneKey::new(&store.zone_key().unwrap(), &zone);
        let cfg = Config::parse(cfg, std::path::Path::new("/x/c.toml")).unwrap();
        let v = Verifier::new(Box::new(store), zone.clone(), &cfg).unwrap();
        Fixture { _dir: dir, v, seed, zone, zone_key, path }
    }

    fn knock(token: Token) -> Knock {
        knock_from(token, "198.18.0.2")
    }

    fn knock_from(token: Token, from: &str) -> Knock {
        Knock { token, seen_from: from.parse().unwrap(), via: Via::DnsUdp, ecs: None, received: Instant::now() }
    }

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    /// Who, where and which services an `Open` decision opens (its records,
    /// which the same test checks are committed).
    fn opened(d: Decision) -> (String, Prefix, Vec<String>) {
        let Decision::Open { user, door, records } = d else { panic!("not an Open decision: {d:?}") };
        for r in &records {
            assert_eq!((r.addr, r.prefix_len, r.user.as_str()), (door.addr(), door.len(), user.as_str()));
        }
        (user, door, records.into_iter().map(|r| r.service).collect())
    }

    fn why(d: Decision) -> Reject {
        match d {
            Decision::Reject { why, .. } => why,
            d => panic!("expected a refusal, got {d:?}"),
        }
    }

    #[test]
    fn plain_knock_opens_once_then_is_spent() {
        let mut f = fixture(vec![], vec![]);
        let t = f.plain(N - 1);
        let d = f.v.verify(&knock(t.clone()));
        assert_eq!(opened(d), ("alice".to_owned(), p("198.18.0.2/32"), vec!["ssh".to_owned(), "web".to_owned()]));
        // Within grace: a silent repeat. After grace: a replay.
        assert_eq!(f.v.verify(&knock(t.clone())), Decision::Repeat);
        let later = Instant::now() + Duration::from_secs(3600);
        assert_eq!(why(f.v.verify_at(&knock(t.clone()), unix_now() + 3600, later)), Reject::Replay);
        // Once the chain has moved on, the old element is simply unknown.
        let next = f.plain(N - 2);
        assert!(matches!(f.v.verify_at(&knock(next), unix_now() + 3600, later), Decision::Open { .. }));
        assert_eq!(why(f.v.verify_at(&knock(t), unix_now() + 3600, later)), Reject::Unknown);
        // The advance is durable, and only the plain chain moved.
        let mut s = SqliteStore::open(&f.path).unwrap();
        let u = &s.active_users().unwrap()[0];
        assert_eq!((u.chain(Form::Plain).counter, u.chain(Form::Bound).counter), (2, 0));
    }

    #[test]
    fn the_quick_check_decides_the_next_element_and_defers_the_rest() {
        let mut f = fixture(vec![], vec![]);
        // A random plain token and one far ahead both need the deep walk.
        let random = Token::Plain(Element([0x5a; crate::token::ELEMENT_LEN]));
        assert_eq!(f.v.verify_quick(&knock(random.clone())), None);
        assert_eq!(why(f.v.verify(&knock(random))), Reject::Unknown);
        assert_eq!(f.v.verify_quick(&knock(f.plain(N - 5))), None);
        // The next element is decided by one hash, for either form.
        assert!(matches!(f.v.verify_quick(&knock(f.plain(N - 1))), Some(Decision::Open { .. })));
        assert!(matches!(f.v.verify_quick(&knock(f.bound(N - 1, "198.18.0.2", 0))), Some(Decision::Open { .. })));
        // Repeats are decided without a walk.
        assert_eq!(f.v.verify_quick(&knock(f.plain(N - 1))), Some(Decision::Repeat));
        // Up to two lost knocks are crossed by the cheap check too; more need the walk.
        assert!(matches!(f.v.verify_quick(&knock(f.plain(N - 4))), Some(Decision::Open { .. })));
        assert!(f.v.verify_quick(&knock(f.plain(N - 8))).is_none());
        assert!(matches!(f.v.verify(&knock(f.plain(N - 8))), Decision::Open { .. }));
    }

    #[test]
    fn one_user_cannot_monopolise_the_verifier() {
        let mut f = fixture_n(200);
        let now = Instant::now();
        let t = unix_now();
        let opened = (1..=150)
            .filter(|j| matches!(f.v.verify_at(&knock(f.plain(200 - j)), t, now), Decision::Open { .. }))
            .count();
        assert_eq!(opened, 100, "a burst of 100, then the user waits");
        // The refused ones spent nothing: a second later the next opens.
        let later = now + Duration::from_secs(1);
        assert!(matches!(f.v.verify_at(&knock(f.plain(200 - 101)), t, later), Decision::Open { .. }));
    }

    #[test]
    fn window_skips_lost_knocks_but_not_beyond() {
        let mut f = fixture(vec![], vec![]);
        assert_eq!(why(f.v.verify(&knock(f.plain(N - 33)))), Reject::Unknown);
        assert!(matches!(f.v.verify(&knock(f.plain(N - 32))), Decision::Open { .. }));
        // Older elements (already passed) never open again.
        assert_eq!(why(f.v.verify(&knock(f.plain(N - 5)))), Reject::Unknown);
    }

    #[test]
    fn bound_knock_opens_embedded_address_for_requested_service() {
        let mut f = fixture(vec![], vec![]);
        let t = f.bound(N - 1, "2001:db8:18::77", service_id("web"));
        assert_eq!(opened(f.v.verify(&knock(t))), ("alice".to_owned(), p("2001:db8:18::/64"), vec!["web".to_owned()]));
    }

    #[test]
    fn a_bound_element_never_opens_as_plain_and_spends_nothing() {
        let mut f = fixture(vec![], vec![]);
        for policy in [PlainPolicy::Source, PlainPolicy::Ecs] {
            f.v.plain = policy;
            f.v.ecs_from = vec![p("0.0.0.0/0")];
            for j in [N, N - 1, N - 2, N - 20] {
                let element = f.seed.element(&f.zone, Form::Bound, j);
                let mut k = knock_from(Token::Plain(element), "198.18.0.3");
                k.ecs = Some("198.18.0.3/32".parse().unwrap());
                let d = f.v.verify(&k);
                assert!(matches!(d, Decision::Reject { why: Reject::Unknown | Reject::WrongForm, .. }), "{d:?}");
            }
        }
        f.v.plain = PlainPolicy::Source;
        // The user's own bound knock still opens, for the user's address.
        let d = f.v.verify(&knock(f.bound(N - 1, "198.18.0.2", 0)));
        assert!(matches!(&d, Decision::Open { door, .. } if *door == p("198.18.0.2/32")), "{d:?}");
        // Now the bound verifier is that element: as a plain knock it is the wrong form, not a repeat.
        let element = f.seed.element(&f.zone, Form::Bound, N - 1);
        assert_eq!(why(f.v.verify(&knock_from(Token::Plain(element), "198.18.0.3"))), Reject::WrongForm);
        // And a plain element never opens as a bound one.
        let plain_el = f.seed.element(&f.zone, Form::Plain, N - 1);
        let knock_b = BoundKnock {
            element: plain_el,
            addr: BoundAddr::from_ip("198.18.0.3".parse().unwrap()),
            service: 0,
            time: unix_now() as u32,
            close: false,
        };
        let forged = Token::Bound(Bound::sign(b"key", &f.zone_key, &f.zone, knock_b));
        assert_eq!(why(f.v.verify(&knock(forged))), Reject::Unknown);
        assert!(matches!(f.v.verify(&knock(f.plain(N - 1))), Decision::Open { .. }), "plain chain untouched");
    }

    #[test]
    fn look_alikes_and_forged_or_stale_bound_knocks_spend_nothing() {
        let mut f = fixture(vec![], vec![]);
        let outsider = ZoneKey::new(b"not-the-zone-key", &f.zone);
        let element = f.seed.element(&f.zone, Form::Bound, N - 1);
        let kb = BoundKnock {
            element,
            addr: BoundAddr::from_ip("198.18.0.3".parse().unwrap()),
            service: 0,
            time: unix_now() as u32,
            close: false,
        };
        let look_alike = Token::Bound(Bound::sign(b"key", &outsider, &f.zone, kb));
        assert_eq!(why(f.v.verify(&knock(look_alike))), Reject::LookAlike);
        let forged = f.bound_with(b"not-the-key", N - 1, "198.18.0.3", 0, unix_now() as u32, false);
        assert_eq!(f.v.verify(&knock(forged)), Decision::Reject { user: Some("alice".into()), why: Reject::BadMac });
        let stale = f.bound_with(b"key", N - 1, "198.18.0.3", 0, unix_now() as u32 - 500, false);
        assert!(matches!(why(f.v.verify(&knock(stale))), Reject::TooOld { .. }));
        // The genuine knock still works: nothing was spent.
        assert!(matches!(f.v.verify(&knock(f.bound(N - 1, "198.18.0.3", 0))), Decision::Open { .. }));
    }

    #[test]
    fn policy_refuses_outside_networks_and_services_without_spending() {
        let mut f = fixture(vec!["203.0.113.0/24".into()], vec!["ssh".into()]);
        assert_eq!(why(f.v.verify(&knock(f.plain(N - 1)))), Reject::OutsideFrom { door: p("198.18.0.2/32") });
        assert!(matches!(f.v.verify(&knock_from(f.plain(N - 1), "203.0.113.9")), Decision::Open { .. }), "not spent");
        let mut f = fixture(vec!["198.18.0.0/15".into()], vec!["ssh".into()]);
        assert_eq!(why(f.v.verify(&knock(f.bound(N - 1, "198.18.0.2", service_id("web"))))), Reject::NoService);
        assert!(matches!(f.v.verify(&knock(f.bound(N - 1, "198.18.0.2", service_id("ssh")))), Decision::Open { .. }));
    }

    #[test]
    fn element_accepted_by_another_nameserver_is_a_silent_repeat() {
        let mut a = fixture(vec![], vec![]);
        let store_b = SqliteStore::open(&a.path).unwrap();
        let cfg = Config::parse(CFG, std::path::Path::new("/x/c.toml")).unwrap();
        let mut b = Verifier::new(Box::new(store_b), a.zone.clone(), &cfg).unwrap();
        let t = a.plain(N - 1);
        assert!(matches!(a.v.verify(&knock(t.clone())), Decision::Open { .. }));
        assert_eq!(b.verify(&knock(t)), Decision::Repeat);
    }

    #[test]
    fn ecs_is_believed_only_from_listed_resolvers_and_never_wider_than_a_door() {
        let cfg = format!("{CFG}\n[token]\nplain = \"ecs\"\necs_from = [\"198.18.0.4/32\"]\n");
        let mut f = fixture_cfg(&cfg, vec![], vec![]);
        let t = f.plain(N - 1);
        let with_ecs = |from: &str, ecs: Option<(&str, u8)>| {
            let mut k = knock_from(t.clone(), from);
            k.ecs = ecs.map(|(a, l)| Prefix::new(a.parse().unwrap(), l));
            k
        };
        assert_eq!(why(f.v.verify(&with_ecs("198.18.0.4", None))), Reject::NoEcs);
        assert_eq!(why(f.v.verify(&with_ecs("198.18.0.3", Some(("198.18.0.3", 32))))), Reject::EcsUntrusted);
        for (ecs, len) in [("2000::", 3), ("0.0.0.0", 0), ("198.51.100.0", 24), ("2001:db8::", 55), ("::", 0)] {
            assert!(
                matches!(why(f.v.verify(&with_ecs("198.18.0.4", Some((ecs, len))))), Reject::DoorSize(_)),
                "{ecs}/{len}"
            );
        }
        for (ecs, len) in [("::ffff:198.18.0.3", 128), ("::ffff:0.0.0.0", 96)] {
            assert_eq!(
                why(f.v.verify(&with_ecs("198.18.0.4", Some((ecs, len))))),
                Reject::DoorSize(DoorSizeError::Reserved),
                "{ecs}/{len}"
            );
        }
        // A /56 is a whole site: wider than a door.
        assert_eq!(
            why(f.v.verify(&with_ecs("198.18.0.4", Some(("2001:db8:77:1200::", 56))))),
            Reject::DoorSize(DoorSizeError::V6TooWide)
        );
        // Refusals spent nothing: the same element opens as the trusted resolver's ECS says.
        assert_eq!(
            opened(f.v.verify(&with_ecs("198.18.0.4", Some(("2001:db8:77:1234::", 64))))),
            ("alice".to_owned(), p("2001:db8:77:1234::/64"), vec!["ssh".to_owned(), "web".to_owned()])
        );
        let t2 = f.plain(N - 2);
        let mut k = knock_from(t2, "198.18.0.4");
        k.ecs = Some("198.51.100.77/32".parse().unwrap());
        assert!(matches!(f.v.verify(&k), Decision::Open { door, .. } if door == p("198.51.100.77/32")));
    }

    #[test]
    fn direct_transports_decide_where_a_plain_element_may_open() {
        let mut f = fixture(vec![], vec![]);
        let via = |t: Token, from: &str, via: Via| Knock { via, ..knock_from(t, from) };
        // A bare element in a UDP datagram: refused by name, nothing spent...
        assert_eq!(why(f.v.verify(&via(f.plain(N - 1), "198.18.0.3", Via::Udp))), Reject::PlainOverUdp);
        // ...but exposed: whoever saw the datagram cannot send it as a port sequence,
        // which would open for them (and that spends nothing either).
        assert_eq!(why(f.v.verify(&via(f.plain(N - 1), "198.18.0.3", Via::TcpSequence))), Reject::Exposed);
        // The user's own next sequence opens for its packet source, whatever `plain`
        // says about DNS (no resolver, no ECS on that path).
        f.v.plain = PlainPolicy::Off;
        let mut k = via(f.plain(N - 2), "198.18.0.2", Via::TcpSequence);
        k.ecs = Some("203.0.113.9/32".parse().unwrap());
        assert!(matches!(f.v.verify(&k), Decision::Open { door, .. } if door == p("198.18.0.2/32")));
        // Passive DNS is DNS: the policy applies, and the refused element is exposed too.
        assert_eq!(why(f.v.verify(&via(f.plain(N - 3), "198.18.0.2", Via::DnsPassive))), Reject::PlainOff);
        assert_eq!(why(f.v.verify(&via(f.plain(N - 3), "198.18.0.9", Via::UdpSequence))), Reject::Exposed);
        // An exposed element still opens by a path that is allowed: no jam.
        f.v.plain = PlainPolicy::Source;
        assert!(matches!(f.v.verify(&via(f.plain(N - 3), "198.18.0.2", Via::DnsUdp)), Decision::Open { .. }));
    }

    #[test]
    fn plain_off_refuses_plain_knocks_without_spending() {
        let mut f = fixture(vec![], vec![]);
        f.v.plain = PlainPolicy::Off;
        assert_eq!(why(f.v.verify(&knock(f.plain(N - 1)))), Reject::PlainOff);
        f.v.plain = PlainPolicy::Source;
        assert!(matches!(f.v.verify(&knock(f.plain(N - 1))), Decision::Open { .. }));
    }

    #[test]
    fn revocation_by_another_process_is_picked_up_and_reported() {
        let mut f = fixture(vec![], vec![]);
        SqliteStore::open(&f.path).unwrap().revoke("alice").unwrap();
        f.v.refresh().unwrap();
        assert_eq!(f.v.take_changes(), Some(vec!["alice".to_owned()]));
        assert_eq!(f.v.take_changes(), None);
        assert_eq!(why(f.v.verify(&knock(f.plain(N - 1)))), Reject::Unknown);
    }

    /// A user's next knock is decided on the record kept from the last one, but a
    /// change made meanwhile by another process (policy, rekey, revocation) wins
    /// at once, without waiting for a refresh: the spend commits only on the
    /// row's revision, and a refused spend is decided again on a fresh read.
    #[test]
    fn a_kept_user_record_never_outlives_a_change_made_elsewhere() {
        let mut f = fixture(vec![], vec!["ssh".into(), "web".into()]);
        let ssh = service_id("ssh");
        let other = || SqliteStore::open(&f.path).unwrap();
        // Kept after this knock.
        assert!(matches!(f.v.verify(&knock(f.bound(N - 1, "198.18.0.2", ssh))), Decision::Open { .. }));
        assert!(f.v.known.contains_key(&1), "the user's record is kept");
        // Narrowed elsewhere: ssh no longer, and only from 203.0.113.0/24.
        let mut o = other();
        o.set_policy("alice", &["web".into()], &["203.0.113.0/24".into()], None).unwrap();
        let d = f.v.verify(&knock(f.bound(N - 2, "198.18.0.2", ssh)));
        assert!(matches!(d, Decision::Reject { why: Reject::NoService | Reject::OutsideFrom { .. }, .. }), "{d:?}");
        // Nothing was spent: once widened again, that very element opens.
        o.set_policy("alice", &[], &[], None).unwrap();
        assert!(matches!(f.v.verify(&knock(f.bound(N - 2, "198.18.0.2", ssh))), Decision::Open { .. }));
        // Twice in the same second: the revision still moves.
        o.set_policy("alice", &["web".into()], &[], None).unwrap();
        o.set_policy("alice", &["web".into()], &["203.0.113.0/24".into()], None).unwrap();
        let web = service_id("web");
        let d = f.v.verify(&knock(f.bound(N - 3, "198.18.0.2", web)));
        assert!(matches!(d, Decision::Reject { why: Reject::OutsideFrom { .. }, .. }), "{d:?}");
        // Revoked elsewhere: refused although the kept record says active.
        o.set_policy("alice", &[], &[], None).unwrap();
        assert!(matches!(f.v.verify(&knock(f.bound(N - 3, "198.18.0.2", web))), Decision::Open { .. }));
        o.revoke("alice").unwrap();
        assert!(matches!(f.v.verify(&knock(f.bound(N - 4, "198.18.0.2", web))), Decision::Reject { .. }));
        let u = o.user(1).unwrap().unwrap();
        assert_eq!(u.chain(Form::Bound).counter, 3, "no spend after the narrowing or the revocation");
    }

    #[test]
    fn close_knock_is_a_bound_knock_that_closes() {
        let mut f = fixture(vec![], vec![]);
        let t = f.bound_with(b"key", N - 1, "198.18.0.2", service_id("ssh"), unix_now() as u32, true);
        assert_eq!(
            f.v.verify(&knock(t)),
            Decision::Close { user: "alice".into(), door: p("198.18.0.2/32"), services: vec!["ssh".into()] }
        );
    }
}
