//! The verify and door stages as one unit of work, on whichever thread is free
//! (ARCHITECTURE.md, "Verification").
//!
//! The verifier's own thread takes knocks from the intake queues
//! ([`crate::intake`]). The capture listener, when its knock finds both queues
//! empty and the stage idle, runs the knock's cheap check and its door itself
//! ([`Inline`]): on an idle server that spares the knock the hand-off between
//! threads, a wake-up that costs ~0.1 ms here (more when the other CPU sleeps).
//! Whatever waits in a queue, or needs a deep walk, goes the usual way, so the
//! fairness between sources is the queues' and nothing jumps them. DNS knocks are
//! always queued: a thread that answers DNS must never pause for a valid knock's
//! commit, or the pause would tell a watcher which knock was valid.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use crate::capture::block::Blocklist;
use crate::doors::Doors;
use crate::intake::Inline;
use crate::knock::Knock;
use crate::limit::DeepQueue;
use crate::verify::{Decision, Reject, Verifier};

/// The verifier, the door stage and what waits for a deep walk.
pub struct Stage {
    pub verifier: Verifier,
    pub doors: Doors,
    pub deep: DeepQueue<Knock>,
    blocklist: Option<Arc<Blocklist>>,
    /// Knocks dropped before their deep walk, so far.
    pub shed: u64,
    /// Knocks taken since the last deep walk, and since the last chores.
    pub since_deep: u32,
    pub since_chores: u32,
}

impl Stage {
    pub fn new(verifier: Verifier, doors: Doors, deep: DeepQueue<Knock>, blocklist: Option<Arc<Blocklist>>) -> Stage {
        Stage { verifier, doors, deep, blocklist, shed: 0, since_deep: 0, since_chores: 0 }
    }

    /// The cheap check, and its decision carried out; `Err` gives back a knock
    /// only a deep walk can decide.
    pub fn quick(&mut self, knock: Knock) -> Result<(), Knock> {
        let Some(decision) = self.verifier.verify_quick(&knock) else { return Err(knock) };
        self.since_deep += 1;
        self.since_chores += 1;
        self.carry_out(&knock, &decision);
        Ok(())
    }

    /// [`Stage::quick`], or a place in the fair queue for the deep walk.
    pub fn take(&mut self, knock: Knock) {
        let Err(knock) = self.quick(knock) else { return };
        self.since_deep += 1;
        self.since_chores += 1;
        let (src, form) = (knock.seen_from, knock.token.form());
        // A shed knock is no strike: shedding says the verifier is busy (or the
        // source's network is), not that the knock was bad.
        if let Err(why) = self.deep.push(src, form, knock, Instant::now()) {
            self.shed += 1;
            if self.shed.is_power_of_two() {
                tracing::debug!(%src, ?why, shed = self.shed, "knock shed before its deep walk");
            }
        }
    }

    /// A full walk for `knock`, and its decision carried out.
    pub fn deep_walk(&mut self, knock: &Knock) {
        let decision = self.verifier.verify(knock);
        self.carry_out(knock, &decision);
    }

    fn carry_out(&mut self, knock: &Knock, decision: &Decision) {
        self.doors.apply(knock, decision, self.verifier.store_mut());
        // A refused *direct* knock is a strike against its source (block list).
        let Some(list) = &self.blocklist else { return };
        let strike = match decision {
            Decision::Reject { why, .. } => !matches!(why, Reject::Store(_) | Reject::Lost | Reject::UserRate),
            _ => false,
        };
        if strike && knock.via.is_direct() {
            list.strike(knock.seen_from, Instant::now());
        }
    }
}

/// The stage, shared by the verifier's thread and the listeners.
#[derive(Clone)]
pub struct SharedStage(Arc<Mutex<Stage>>);

impl SharedStage {
    pub fn new(stage: Stage) -> SharedStage {
        SharedStage(Arc::new(Mutex::new(stage)))
    }

    /// The stage, waiting for a listener that holds it. (A panic while holding it
    /// would be a bug; its state is still consistent between knocks, so it is used.)
    pub fn lock(&self) -> MutexGuard<'_, Stage> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inline for SharedStage {
    fn try_now(&self, knock: Knock) -> Result<(), Knock> {
        let Ok(mut stage) = self.0.try_lock() else { return Err(knock) };
        if !stage.deep.is_empty() {
            return Err(knock);
        }
        stage.quick(knock)
    }
}
