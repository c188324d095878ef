//! The lease core: every decision about when a lease ends, as a pure function of time,
//! leadership and what this member applied. No IO, no locks, no clock of its own: the caller
//! passes `now`, and carries out what the core returns (see `super::LeaseClock`).
//!
//! What it owns (ADR 0008):
//! - one `Mark` per lease: an upper bound on the lease's deadline on this member's monotonic
//!   clock, set when a grant, renewal or checkpoint is applied, and tightened from peers that
//!   judged the same decision (`set_at`);
//! - while this member leads: the grace a new leader gives, the verdicts in flight, and the
//!   renewals this leader logged, from which it may answer further keep-alives for a short
//!   window without logging again.
//!
//! What it must never do: answer a keep-alive with a deadline that a member which may lead next
//! does not already hold; expire a lease before its mark; expire a lease by its id alone.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

/// Every mark set from an applied entry is this much later than the entry's apply time plus the
/// TTL: the margin that covers the time between a member applying a renewal and the client
/// receiving its answer (the answer is refused when it would come later, see `ANSWER_WINDOW`).
pub const RENEW_SLACK: Duration = Duration::from_millis(1000);
/// A keep-alive is answered only within this long after the renewal it relies on was proposed
/// on the leader's clock; the rest of `RENEW_SLACK` covers the last hop to the client.
pub const ANSWER_WINDOW: Duration = Duration::from_millis(850);
/// Every mark is also later by this fraction of its remaining time: monotonic clocks are slewed
/// by NTP (chrony up to ~8%, the kernel's PLL up to 0.05%), so members' clocks may run at
/// slightly different rates; 1% covers the PLL and ordinary slews on leases of any length.
pub const CLOCK_RATE_MARGIN_DIVISOR: u64 = 100;
/// Most leases named in one expiry entry.
pub const LEASE_BATCH_MAX: usize = 1000;

/// What this member knows of one lease's end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    /// No client can have been told the lease lives past this (an upper bound on every promise).
    pub deadline: Instant,
    /// The decision the deadline stems from: the log index of the lease's grant, last renewal or
    /// checkpoint. Two members with the same `set_at` judge the same promise.
    pub set_at: u64,
    pub ttl_s: i64,
}

/// The leader's view, as the driver reads it from Raft each time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leadership {
    pub term: u64,
    /// A quorum acknowledged this leader within one election timeout, and it has applied an
    /// entry of its own term (so everything committed before its election): only then may it
    /// judge leases or answer for them. A new leader's marks may lack a grant or renewal that the
    /// previous leader answered.
    pub quorum_fresh: bool,
}

/// How a keep-alive arriving at the leader is to be handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepAlive {
    /// The lease does not exist, or its expiry was decided and applied: etcd's "lease not found".
    NotFound,
    /// A verdict on the lease is in flight: ask again once it settled (a renewal logged before
    /// it makes it a no-op, and the lease lives on).
    VerdictPending,
    /// Answer now: a renewal this leader logged covers it until `valid_until`.
    Answer { ttl_s: i64, valid_until: Instant },
    /// Log a renewal first (`LeaseRenew`), then call `renewed`.
    Propose,
}

/// Why a keep-alive could not be answered with a TTL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    NotLeader,
    NoQuorum,
    /// The renewal committed too late to promise a full TTL from now; the client retries.
    TooLate,
}

#[derive(Debug)]
struct Leading {
    term: u64,
    /// No lease expires before `grace_from + grace`: set on promotion and after a stall.
    grace_from: Instant,
    /// Verdicts proposed and not yet settled, by (lease id, decision judged).
    expiring: BTreeMap<(i64, u64), ()>,
    /// For each lease, when the newest renewal this leader logged and saw applied was proposed.
    renewed_at: HashMap<i64, Instant>,
}

#[derive(Debug)]
pub struct LeaseCore {
    /// One election timeout: a new leader's grace.
    grace: Duration,
    marks: HashMap<i64, Mark>,
    leading: Option<Leading>,
}

impl LeaseCore {
    pub fn new(grace: Duration) -> Self {
        LeaseCore { grace, marks: HashMap::new(), leading: None }
    }

    // ---- what was applied (every member) ----

    /// A grant, renewal or checkpoint was applied at log index `set_at`: the lease lives at most
    /// `remaining_ms` (+ the slack) from now, and a new decision replaces whatever we knew.
    pub fn applied_deadline(&mut self, now: Instant, id: i64, ttl_s: i64, remaining_ms: i64, set_at: u64) {
        let remaining_ms = remaining_ms.max(0) as u64;
        let margin = Duration::from_millis(remaining_ms / CLOCK_RATE_MARGIN_DIVISOR);
        let deadline = now + Duration::from_millis(remaining_ms) + RENEW_SLACK + margin;
        self.marks.insert(id, Mark { deadline, set_at, ttl_s });
    }

    /// DRILL ONLY (the planted early expiry): take a renewal's decision without its deadline.
    pub fn renewed_keeping_deadline(&mut self, id: i64, set_at: u64) {
        if let Some(m) = self.marks.get_mut(&id) {
            m.set_at = set_at;
        }
    }

    /// The lease was revoked or expired.
    pub fn removed(&mut self, id: i64) {
        self.marks.remove(&id);
        if let Some(l) = &mut self.leading {
            l.renewed_at.remove(&id);
        }
    }

    /// The state was replaced (snapshot installed): `leases` are (id, ttl_s, remaining_ms, set_at).
    pub fn reset(&mut self, now: Instant, leases: impl IntoIterator<Item = (i64, i64, i64, u64)>) {
        self.marks.clear();
        if let Some(l) = &mut self.leading {
            l.renewed_at.clear();
        }
        for (id, ttl_s, remaining_ms, set_at) in leases {
            self.applied_deadline(now, id, ttl_s, remaining_ms, set_at);
        }
    }

    pub fn mark(&self, id: i64) -> Option<Mark> {
        self.marks.get(&id).copied()
    }

    // ---- leadership ----

    /// Lead in `term` if we do not yet: fresh leader state, grace from `now`.
    fn promote(&mut self, now: Instant, term: u64) -> &mut Leading {
        if self.leading.as_ref().is_none_or(|l| l.term != term) {
            self.leading =
                Some(Leading { term, grace_from: now, expiring: BTreeMap::new(), renewed_at: HashMap::new() });
        }
        self.leading.as_mut().expect("just promoted")
    }

    /// Whether this core leads, and in which term.
    pub fn leading_term(&self) -> Option<u64> {
        self.leading.as_ref().map(|l| l.term)
    }

    /// This member stopped leading: drop every leader decision at once.
    pub fn demote(&mut self) {
        self.leading = None;
    }

    /// When the lease ends as the leader judges it: its mark, never before the leader's grace.
    fn leader_deadline(&self, mark: &Mark) -> Instant {
        match &self.leading {
            Some(l) => mark.deadline.max(l.grace_from + self.grace),
            None => mark.deadline,
        }
    }

    /// One step of the leader's clock: which leases (with the decision judged) to expire now.
    /// `stalled` says this member itself was not running for a while: its pause is not the
    /// clients' fault, so every lease gets the grace again.
    pub fn tick(&mut self, now: Instant, leadership: Option<Leadership>, stalled: bool) -> Vec<(i64, u64)> {
        let Some(lead) = leadership else {
            self.demote();
            return Vec::new();
        };
        let l = self.promote(now, lead.term);
        // Our pause, or our lost contact with the quorum (during which no client could renew
        // through us), is not the clients' fault: the grace runs from when it ended.
        if stalled || !lead.quorum_fresh {
            l.grace_from = now;
        }
        if !lead.quorum_fresh {
            return Vec::new();
        }
        let mut due: Vec<(i64, u64)> = self
            .marks
            .iter()
            .filter(|(id, m)| self.leader_deadline(m) <= now && !self.is_expiring(**id, m))
            .map(|(id, m)| (*id, m.set_at))
            .collect();
        due.sort_unstable();
        due.truncate(LEASE_BATCH_MAX);
        let l = self.leading.as_mut().expect("leading");
        for v in &due {
            l.expiring.insert(*v, ());
        }
        due
    }

    fn is_expiring(&self, id: i64, mark: &Mark) -> bool {
        self.leading.as_ref().is_some_and(|l| l.expiring.contains_key(&(id, mark.set_at)))
    }

    /// The verdicts were committed (or failed): stop treating them as in flight. A verdict that
    /// failed is decided again at the next tick if the lease is still due.
    pub fn verdicts_settled(&mut self, verdicts: &[(i64, u64)]) {
        if let Some(l) = &mut self.leading {
            for v in verdicts {
                l.expiring.remove(v);
            }
        }
    }

    fn check_leading(&mut self, now: Instant, leadership: Option<Leadership>) -> Result<&mut Leading, Refused> {
        let lead = leadership.ok_or(Refused::NotLeader)?;
        if !lead.quorum_fresh {
            return Err(Refused::NoQuorum);
        }
        Ok(self.promote(now, lead.term))
    }

    // ---- keep-alives (leader only) ----

    /// A keep-alive for `id` arrived at the leader.
    pub fn keepalive(&mut self, now: Instant, leadership: Option<Leadership>, id: i64) -> Result<KeepAlive, Refused> {
        let renewed_at = self.check_leading(now, leadership)?.renewed_at.get(&id).copied();
        let Some(mark) = self.marks.get(&id).copied() else { return Ok(KeepAlive::NotFound) };
        if self.is_expiring(id, &mark) {
            return Ok(KeepAlive::VerdictPending);
        }
        match renewed_at {
            Some(at) if now <= at + ANSWER_WINDOW => {
                Ok(KeepAlive::Answer { ttl_s: mark.ttl_s, valid_until: at + ANSWER_WINDOW })
            }
            _ => Ok(KeepAlive::Propose),
        }
    }

    /// The renewal of `id` proposed at `proposed_at` was applied here (`applied` says whether the
    /// lease still existed then). Answer it if a member that leads next must hold its promise.
    pub fn renewed(
        &mut self,
        now: Instant,
        leadership: Option<Leadership>,
        id: i64,
        proposed_at: Instant,
        applied: bool,
    ) -> Result<KeepAlive, Refused> {
        // The renewal is committed, so every member that may lead next holds a mark at least
        // `RENEW_SLACK` past its own apply time + TTL, which is after `proposed_at`: the answer
        // is safe while it reaches the client within the window.
        self.check_leading(now, leadership)?;
        let Some(mark) = self.marks.get(&id).copied() else { return Ok(KeepAlive::NotFound) };
        if !applied || self.is_expiring(id, &mark) {
            return Ok(KeepAlive::NotFound);
        }
        if now > proposed_at + ANSWER_WINDOW {
            return Err(Refused::TooLate);
        }
        let l = self.leading.as_mut().expect("leading");
        let at = l.renewed_at.entry(id).or_insert(proposed_at);
        *at = (*at).max(proposed_at);
        Ok(KeepAlive::Answer { ttl_s: mark.ttl_s, valid_until: proposed_at + ANSWER_WINDOW })
    }

    /// Milliseconds left of a lease as a client may count on them (TimeToLive); `None` when it
    /// does not exist. Never more than the granted TTL: the slack, the clock margin and a new
    /// leader's grace are the members' margin, not a promise.
    pub fn remaining_ms(
        &mut self,
        now: Instant,
        leadership: Option<Leadership>,
        id: i64,
    ) -> Result<Option<u64>, Refused> {
        self.check_leading(now, leadership)?;
        Ok(self.marks.get(&id).map(|m| {
            let left = self.leader_deadline(m).saturating_duration_since(now).as_millis() as u64;
            left.min(m.ttl_s.max(0) as u64 * 1000)
        }))
    }

    // ---- marks shared between members ----

    /// Every lease as (id, set_at, remaining ms from `now`): the leader's judgement (with its
    /// grace) when leading, this member's own marks otherwise.
    pub fn table(&self, now: Instant) -> Vec<(i64, u64, i64)> {
        self.marks
            .iter()
            .map(|(id, m)| (*id, m.set_at, self.leader_deadline(m).saturating_duration_since(now).as_millis() as i64))
            .collect()
    }

    /// Adopt the leader's judgement of each lease where it judged the same decision we hold.
    /// `arrived` is when its answer came, after the leader read its clock, so `arrived + ms` is
    /// still an upper bound. Returns how many marks moved.
    pub fn adopt_leader_table(&mut self, theirs: &[(i64, u64, i64)], arrived: Instant) -> usize {
        self.merge(theirs, arrived, |_, _| true)
    }

    /// Lower our marks to a peer's where the peer's is earlier for the same decision: every
    /// member's mark is an upper bound on the promise made at `set_at`, so the earliest is too.
    pub fn tighten(&mut self, theirs: &[(i64, u64, i64)], arrived: Instant) -> usize {
        self.merge(theirs, arrived, |ours, candidate| candidate < ours)
    }

    fn merge(
        &mut self,
        theirs: &[(i64, u64, i64)],
        arrived: Instant,
        take: impl Fn(Instant, Instant) -> bool,
    ) -> usize {
        let mut moved = 0;
        for &(id, set_at, remaining_ms) in theirs {
            let Some(mark) = self.marks.get_mut(&id) else { continue };
            let candidate = arrived + Duration::from_millis(remaining_ms.max(0) as u64);
            if mark.set_at == set_at && candidate != mark.deadline && take(mark.deadline, candidate) {
                mark.deadline = candidate;
                moved += 1;
            }
        }
        moved
    }
}

#[cfg(test)]
mod tests;
