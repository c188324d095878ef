//! Leases: when each one ends, and who may say so (ADR 0002, ADR 0008).
//!
//! The decisions live in `core`, a pure function of (now, leadership, what was applied). This
//! module is the thin IO around it: a loop that feeds the core the time and Raft's view of
//! leadership every tick and proposes the expiries it returns, and the keep-alive path that logs
//! a renewal through Raft before it promises a client anything.
//!
//! Rules:
//! - Only the current, quorum-connected leader expires leases; each verdict names the term it
//!   was decided in and the decision it judged (`LeaseExpireAt`), so a deposed leader's verdict
//!   and a verdict on a revoked-and-re-granted id are no-ops.
//! - A keep-alive is answered only once a renewal covering it is committed: every member that
//!   may lead next then holds a deadline no earlier than the one the client was told.
//! - A new leader, and a leader that was itself stalled, give every lease one election timeout
//!   of grace: never less, and no more than that beyond the lease's own deadline.
//!
//! The core sits behind one mutex in the state machine's `Shared` (it is updated as entries are
//! applied). Lock order: the store, then the core; the core never takes the store.

pub mod core;

use std::sync::Arc;
use std::time::Duration;

use openraft::rt::{Instant as _, WatchReceiver as _};
use openraft::ServerState;
use quorate_kv::{Command, CommandResponse};
use tokio::time::Instant;
use tracing::{info, warn};

pub use self::core::{KeepAlive, Leadership, LeaseCore, Refused};
use crate::state_machine::Shared;
use crate::types::{Raft, Request};
use crate::ConsensusError;

/// How often the clock looks for expired leases.
pub const LEASE_TICK: Duration = Duration::from_millis(100);
/// How often a keep-alive that must wait (a verdict in flight, a leader not caught up) asks again.
const KEEPALIVE_RECHECK: Duration = Duration::from_millis(20);
/// How often a follower copies the leader's judgement of every lease.
pub const LEASE_SYNC_INTERVAL: Duration = Duration::from_millis(1000);

static PLANTED_EARLY_EXPIRY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// DRILL ONLY, UNSAFE: plant the bug ADR 0008 fixed. Renewals are still logged and answered,
/// but no member moves a lease's deadline for them, so every lease ends at its grant's deadline
/// however often a client was told otherwise. The drill must catch it (issue 11).
pub fn plant_early_lease_expiry() {
    warn!("DRILL ONLY: lease renewals do not move deadlines (planted early lease expiry)");
    PLANTED_EARLY_EXPIRY.store(true, std::sync::atomic::Ordering::Relaxed);
}

pub(crate) fn early_expiry_planted() -> bool {
    PLANTED_EARLY_EXPIRY.load(std::sync::atomic::Ordering::Relaxed)
}

/// A keep-alive answered by the leader: the TTL promised, and until when (on the leader's clock)
/// the promise may still reach the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Renewal {
    pub ttl_s: i64,
    pub valid_until: Instant,
}

impl From<Refused> for ConsensusError {
    fn from(r: Refused) -> Self {
        match r {
            Refused::NotLeader => ConsensusError::NotLeader,
            Refused::NoQuorum => ConsensusError::NoLeader,
            Refused::TooLate => ConsensusError::LeaseAnswerLate,
        }
    }
}

/// The driver around `LeaseCore`: reads Raft, proposes, and never decides anything itself.
pub struct LeaseClock {
    /// One election timeout: how stale a quorum acknowledgement may be.
    grace: Duration,
}

impl LeaseClock {
    pub fn new(grace: Duration) -> Arc<Self> {
        Arc::new(LeaseClock { grace })
    }

    /// Raft's view of this member's leadership, as the core takes it.
    fn leadership(&self, raft: &Raft) -> Option<Leadership> {
        let metrics = raft.metrics();
        let m = metrics.borrow_watched();
        // Applied an entry of its own term: everything committed before the election is applied,
        // so the core's marks hold every grant and renewal a previous leader answered.
        let caught_up = m.last_applied.as_ref().is_some_and(|l| l.leader_id.term == m.current_term);
        (m.state == ServerState::Leader)
            .then(|| Leadership { term: m.current_term, quorum_fresh: caught_up && self.quorum_fresh(&m) })
    }

    /// Ask the core about a keep-alive, waiting (boundedly) through the moments it cannot
    /// answer yet: a leader just elected that has not applied its first entry, and a verdict in
    /// flight that a renewal logged before it may still overturn.
    async fn ask(&self, raft: &Raft, shared: &Shared, id: i64) -> Result<KeepAlive, ConsensusError> {
        let until = Instant::now() + self.grace * 2;
        loop {
            let asked = shared.leases.lock().unwrap().keepalive(Instant::now(), self.leadership(raft), id);
            let waiting = match asked {
                Err(Refused::NoQuorum) => ConsensusError::NoLeader,
                Ok(KeepAlive::VerdictPending) => {
                    // Still pending at the bound: its expiry is being proposed.
                    if Instant::now() >= until {
                        return Ok(KeepAlive::NotFound);
                    }
                    ConsensusError::NoLeader
                }
                other => return Ok(other?),
            };
            if Instant::now() >= until {
                return Err(waiting);
            }
            tokio::time::sleep(KEEPALIVE_RECHECK).await;
        }
    }

    fn quorum_fresh(&self, m: &openraft::RaftMetrics<crate::TypeConfig>) -> bool {
        // A single-member cluster is its own quorum.
        if m.membership_config.membership().voter_ids().count() == 1 {
            return true;
        }
        m.last_quorum_acked.as_ref().is_some_and(|acked| acked.elapsed() <= self.grace)
    }

    /// Renew a lease at the leader; `None` when it does not exist or its expiry is proposed.
    pub async fn keepalive(&self, raft: &Raft, shared: &Shared, id: i64) -> Result<Option<Renewal>, ConsensusError> {
        let decision = match self.ask(raft, shared, id).await? {
            KeepAlive::Propose => {
                let proposed_at = Instant::now();
                let resp =
                    raft.client_write(Request::Kv(Command::LeaseRenew { ids: vec![id] })).await.map_err(|e| {
                        if e.forward_to_leader().is_some() {
                            ConsensusError::NotLeader
                        } else {
                            crate::raft_err(e)
                        }
                    })?;
                let applied = matches!(
                    resp.data.result,
                    Some(Ok(CommandResponse::LeaseRenew { ref renewed })) if renewed.contains(&id)
                );
                shared.leases.lock().unwrap().renewed(
                    Instant::now(),
                    self.leadership(raft),
                    id,
                    proposed_at,
                    applied,
                )?
            }
            other => other,
        };
        Ok(match decision {
            KeepAlive::NotFound | KeepAlive::Propose | KeepAlive::VerdictPending => None,
            KeepAlive::Answer { ttl_s, valid_until } => Some(Renewal { ttl_s, valid_until }),
        })
    }

    /// Remaining whole seconds of a lease as the leader judges it; `None` when it does not exist.
    pub fn remaining_s(&self, raft: &Raft, shared: &Shared, id: i64) -> Result<Option<i64>, ConsensusError> {
        let left = shared.leases.lock().unwrap().remaining_ms(Instant::now(), self.leadership(raft), id)?;
        Ok(left.map(|ms| ms.div_ceil(1000) as i64))
    }

    /// The leader's judgement of every lease, for followers to copy.
    pub fn table(&self, raft: &Raft, shared: &Shared) -> Result<Vec<(i64, u64, i64)>, ConsensusError> {
        let now = Instant::now();
        let mut core = shared.leases.lock().unwrap();
        // Promote first (a no-op when already leading), so the grace is in the table.
        core.remaining_ms(now, self.leadership(raft), 0)?;
        Ok(core.table(now))
    }

    /// Run until the Raft core stops.
    pub async fn run(self: Arc<Self>, raft: Raft, shared: Arc<Shared>, metrics: crate::metrics::ConsensusMetrics) {
        let mut tick = tokio::time::interval(LEASE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_tick = Instant::now();
        // A gap this long between ticks means this member itself was not running.
        let stall = LEASE_TICK * 5 + Duration::from_millis(200);
        let mut quorum_lost_logged = false;
        // The flight recorder's view: a leader that had a quorum in this term and lost it (a
        // leader just elected has not yet applied an entry of its term, which is no loss).
        let (mut fresh_in_term, mut recorded_lost) = (0, false);
        loop {
            tick.tick().await;
            let now = Instant::now();
            let gap = now - last_tick;
            let stalled = gap > stall;
            last_tick = now;
            if stalled {
                metrics.lease_clock_stalls.inc();
                metrics.flight.record(crate::flight::Event::Stall { gap_ms: gap.as_millis() as u64 });
            }
            if raft.metrics().borrow_watched().running_state.is_err() {
                return;
            }
            let leadership = self.leadership(&raft);
            let (due, before, after) = {
                let mut core = shared.leases.lock().unwrap();
                let before = core.leading_term();
                let due = core.tick(now, leadership, stalled);
                (due, before, core.leading_term())
            };
            match (before, after) {
                (b, Some(term)) if b != Some(term) => {
                    metrics.lease_clock_promotions.inc();
                    let grace_ms = self.grace.as_millis() as u64;
                    metrics.flight.record_in(term, crate::flight::Event::LeaseClockPromoted { grace_ms });
                    info!(term, grace_ms = self.grace.as_millis() as u64, "lease clock promoted")
                }
                (Some(term), None) => {
                    metrics.lease_clock_demotions.inc();
                    metrics.flight.record_in(term, crate::flight::Event::LeaseClockDemoted);
                    info!(term, "lease clock demoted: no longer leader")
                }
                _ => {}
            }
            let Some(lead) = leadership else { continue };
            if stalled {
                warn!(gap_ms = gap.as_millis() as u64, "lease clock was stalled; every lease gets grace again");
            }
            if !lead.quorum_fresh {
                if !quorum_lost_logged {
                    metrics.lease_expiry_suspended.inc();
                    warn!(term = lead.term, "leader has no recent quorum contact: lease expiry suspended");
                    quorum_lost_logged = true;
                }
                if fresh_in_term == lead.term && !recorded_lost {
                    metrics.flight.record_in(lead.term, crate::flight::Event::QuorumLost);
                    recorded_lost = true;
                }
                continue;
            }
            if recorded_lost && fresh_in_term == lead.term {
                metrics.flight.record_in(lead.term, crate::flight::Event::QuorumRegained);
            }
            (fresh_in_term, recorded_lost) = (lead.term, false);
            quorum_lost_logged = false;
            if due.is_empty() {
                continue;
            }
            info!(term = lead.term, leases = due.len(), "proposing lease expiry");
            let raft = raft.clone();
            let shared = shared.clone();
            let expired = metrics.leases_expired.clone();
            tokio::spawn(async move {
                let cmd = Command::LeaseExpireAt { leases: due.clone(), term: lead.term };
                match raft.client_write(Request::Kv(cmd)).await {
                    Ok(_) => {
                        expired.inc_by(due.len() as u64);
                    }
                    Err(e) => warn!(error = %e, "lease expiry proposal failed"),
                }
                shared.leases.lock().unwrap().verdicts_settled(&due);
            });
        }
    }
}
