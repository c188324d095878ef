//! The leader's lease clock: decides lease expiry from monotonic time, only while leading.
//!
//! Rules (see docs/adr/0002-leader-side-effects.md):
//! - Only the current leader expires leases, and each expiry proposal is stamped with the term
//!   the leader was elected in; the state machine ignores it if the entry's term differs.
//! - A leader that has not heard from a majority within one election timeout proposes no
//!   expiry and accepts no keepalive.
//! - A new leader projects each lease's deadline from the last grant or checkpoint it applied
//!   (`LeaseMark`), and never earlier than one election timeout after it took over.
//! - If this member's own loop was stalled (a pause, a stopped process), every lease gets the
//!   same grace again: our pause is not the clients' fault.
//! - Keepalives are not logged one by one; renewed leases are checkpointed in batches.
//! - Followers copy the leader's projected deadlines every second, outside the log, so a member
//!   that restarted (and replayed old grants "now") does not carry stale, too-late deadlines
//!   into its own leadership.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use openraft::rt::{Instant as _, WatchReceiver as _};
use openraft::ServerState;
use quorate_kv::{Command, LeaseCheckpoint};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::state_machine::{LeaseMark, Shared};
use crate::types::{Raft, Request};

/// How often the clock looks for expired leases.
pub const LEASE_TICK: Duration = Duration::from_millis(100);
/// How often renewed leases are checkpointed through Raft.
pub const LEASE_CHECKPOINT_INTERVAL: Duration = Duration::from_millis(1000);
/// How often a follower copies the leader's lease deadlines.
pub const LEASE_SYNC_INTERVAL: Duration = Duration::from_millis(1000);
/// Most leases named in one expiry or checkpoint entry.
pub const LEASE_BATCH_MAX: usize = 1000;

#[derive(Default)]
struct ClockState {
    /// The term this member leads in; 0 when it is not leading.
    term: u64,
    promoted_at: Option<Instant>,
    keepalive_deadline: HashMap<i64, Instant>,
    renewed: HashSet<i64>,
    expiring: HashSet<i64>,
    quorum_lost_logged: bool,
}

pub struct LeaseClock {
    /// Taken after `Shared::lease_marks` whenever both are held: see `lock_marks_and_state`.
    state: Mutex<ClockState>,
    /// One election timeout: the grace a new leader gives, and how stale a quorum ack may be.
    grace: Duration,
}

impl LeaseClock {
    pub fn new(grace: Duration) -> Arc<Self> {
        Arc::new(LeaseClock { state: Mutex::new(ClockState::default()), grace })
    }

    /// Start leading in `term` if we have not yet: fresh leader state, grace from now. Called
    /// from the tick and from every request, so a keepalive that arrives between openraft
    /// electing us and our next tick is recorded in the new term's state, not wiped by it.
    fn promote(&self, st: &mut ClockState, term: u64, now: Instant) {
        if st.term != term {
            info!(term, grace_ms = self.grace.as_millis() as u64, "lease clock promoted");
            *st = ClockState { term, promoted_at: Some(now), ..Default::default() };
        }
    }

    fn deadline(&self, st: &ClockState, id: i64, mark: &LeaseMark) -> Instant {
        let projected = mark.deadline();
        let grace = st.promoted_at.map(|p| p + self.grace).unwrap_or(projected);
        let kept = st.keepalive_deadline.get(&id).copied().unwrap_or(projected);
        projected.max(grace).max(kept)
    }

    /// Renew a lease at the leader. `None` when the lease does not exist.
    pub fn keepalive(&self, raft: &Raft, shared: &Shared, id: i64) -> Result<Option<i64>, crate::ConsensusError> {
        let term = self.check_leading(raft)?;
        let Some(ttl_s) = shared.store.read().unwrap().lease(id).map(|l| l.ttl_s) else {
            return Ok(None);
        };
        let mut st = self.state.lock().unwrap();
        self.promote(&mut st, term, Instant::now());
        st.keepalive_deadline.insert(id, Instant::now() + Duration::from_secs(ttl_s as u64));
        st.renewed.insert(id);
        Ok(Some(ttl_s))
    }

    /// The lease marks and the clock state, locked in the one order every holder of both uses
    /// (after the store, if that is held too). Taking them in the other order in one place once
    /// froze a leader: its tick and a follower's table request each held one and waited for the
    /// other, blocking both runtime threads.
    fn lock_marks_and_state<'a>(
        &'a self,
        shared: &'a Shared,
    ) -> (MutexGuard<'a, HashMap<i64, LeaseMark>>, MutexGuard<'a, ClockState>) {
        let marks = shared.lease_marks.lock().unwrap();
        (marks, self.state.lock().unwrap())
    }

    /// Remaining whole seconds of a lease as the leader sees it; `None` when it does not exist.
    pub fn remaining_s(&self, raft: &Raft, shared: &Shared, id: i64) -> Result<Option<i64>, crate::ConsensusError> {
        let term = self.check_leading(raft)?;
        let (marks, mut st) = self.lock_marks_and_state(shared);
        let Some(mark) = marks.get(&id) else { return Ok(None) };
        self.promote(&mut st, term, Instant::now());
        let left = self.deadline(&st, id, mark).saturating_duration_since(Instant::now());
        Ok(Some(left.as_secs_f64().ceil() as i64))
    }

    /// Remaining milliseconds of every lease, as this leader projects them: what followers
    /// copy so that their own projections stay current (see `Member::sync_lease_table`).
    pub fn table(&self, raft: &Raft, shared: &Shared) -> Result<Vec<(i64, i64)>, crate::ConsensusError> {
        let term = self.check_leading(raft)?;
        let now = Instant::now();
        let (marks, mut st) = self.lock_marks_and_state(shared);
        self.promote(&mut st, term, now);
        Ok(marks
            .iter()
            .map(|(id, mark)| (*id, self.deadline(&st, *id, mark).saturating_duration_since(now).as_millis() as i64))
            .collect())
    }

    /// The term this member leads in, if it leads with a fresh quorum.
    fn check_leading(&self, raft: &Raft) -> Result<u64, crate::ConsensusError> {
        let metrics = raft.metrics();
        let m = metrics.borrow_watched();
        if m.state != ServerState::Leader {
            return Err(crate::ConsensusError::NotLeader);
        }
        if !self.quorum_fresh(&m) {
            return Err(crate::ConsensusError::NoLeader);
        }
        Ok(m.current_term)
    }

    fn quorum_fresh(&self, m: &openraft::RaftMetrics<crate::TypeConfig>) -> bool {
        // A single-member cluster is its own quorum.
        if m.membership_config.membership().voter_ids().count() == 1 {
            return true;
        }
        m.last_quorum_acked.as_ref().is_some_and(|acked| acked.elapsed() <= self.grace)
    }

    /// Run until the Raft core stops.
    pub async fn run(self: Arc<Self>, raft: Raft, shared: Arc<Shared>) {
        let mut tick = tokio::time::interval(LEASE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_tick = Instant::now();
        let mut last_checkpoint = Instant::now();
        // A gap this long between ticks means this member itself was not running.
        let stall = LEASE_TICK * 5 + Duration::from_millis(200);
        loop {
            tick.tick().await;
            let now = Instant::now();
            let gap = now - last_tick;
            last_tick = now;
            let m = raft.metrics().borrow_watched().clone();
            if m.running_state.is_err() {
                return;
            }
            let leading = m.state == ServerState::Leader;
            let (to_expire, to_checkpoint, term) = {
                let (marks, mut st) = self.lock_marks_and_state(&shared);
                if !leading {
                    if st.term != 0 {
                        info!(term = st.term, "lease clock demoted: no longer leader");
                        *st = ClockState::default();
                    }
                    continue;
                }
                self.promote(&mut st, m.current_term, now);
                if gap > stall {
                    warn!(gap_ms = gap.as_millis() as u64, "lease clock was stalled; every lease gets grace again");
                    st.promoted_at = Some(now);
                }
                if !self.quorum_fresh(&m) {
                    if !st.quorum_lost_logged {
                        warn!(term = st.term, "leader has no recent quorum contact: lease expiry suspended");
                        st.quorum_lost_logged = true;
                    }
                    continue;
                }
                st.quorum_lost_logged = false;
                st.keepalive_deadline.retain(|id, _| marks.contains_key(id));
                let mut expired = Vec::new();
                for (id, mark) in marks.iter() {
                    if expired.len() >= LEASE_BATCH_MAX {
                        break;
                    }
                    if !st.expiring.contains(id) && self.deadline(&st, *id, mark) <= now {
                        expired.push(*id);
                    }
                }
                drop(marks);
                st.expiring.extend(expired.iter().copied());
                let mut cps = Vec::new();
                if now - last_checkpoint >= LEASE_CHECKPOINT_INTERVAL {
                    last_checkpoint = now;
                    let renewed: Vec<i64> = st.renewed.drain().collect();
                    for id in renewed {
                        if let Some(d) = st.keepalive_deadline.get(&id) {
                            cps.push(LeaseCheckpoint {
                                id,
                                remaining_ms: d.saturating_duration_since(now).as_millis() as i64,
                            });
                        }
                    }
                }
                (expired, cps, st.term)
            };
            if !to_expire.is_empty() {
                info!(term, leases = to_expire.len(), "proposing lease expiry");
                let clock = self.clone();
                let raft = raft.clone();
                tokio::spawn(async move {
                    let cmd = Command::LeaseExpire { ids: to_expire.clone(), term };
                    if let Err(e) = raft.client_write(Request::Kv(cmd)).await {
                        warn!(error = %e, "lease expiry proposal failed");
                    }
                    let mut st = clock.state.lock().unwrap();
                    for id in to_expire {
                        st.expiring.remove(&id);
                    }
                });
            }
            for chunk in to_checkpoint.chunks(LEASE_BATCH_MAX) {
                let cmd = Command::LeaseCheckpoint(chunk.to_vec());
                let raft = raft.clone();
                tokio::spawn(async move {
                    if let Err(e) = raft.client_write(Request::Kv(cmd)).await {
                        warn!(error = %e, "lease checkpoint proposal failed");
                    }
                });
            }
        }
    }
}
