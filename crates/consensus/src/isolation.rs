//! Isolating a member (ADR 0009 §1): an operator's decision, recorded through the log, that a
//! member serves no client and neither votes nor leads. The records are state (every member
//! knows them, they survive restarts and snapshots); the leader makes the membership follow
//! them, one change at a time, so that a leader killed between any two steps leaves a state
//! its successor finishes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::rt::{Instant as _, WatchReceiver as _};
use openraft::ChangeMembers;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::membership::Change;
use crate::{ConsensusError, Member, NodeId, Request};

/// One member's isolation, as `quorate ctl isolate` recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Isolation {
    pub reason: String,
    /// When the isolation was asked for (the asking member's wall clock).
    pub since_unix_ms: u64,
    /// Who asked: the command's user and host, as `ctl isolate` sends them.
    pub by: String,
}

/// The longest reason kept (longer ones are refused: it is shown in every refusal).
pub const REASON_BYTES_MAX: usize = 512;
/// The longest `by` kept (longer ones are cut).
pub const BY_BYTES_MAX: usize = 128;

/// Control characters (newlines included) become spaces: the text goes into gRPC headers and
/// single-line logs.
fn printable(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn cut(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

impl Isolation {
    /// What every refused client request is told.
    pub fn describe(&self) -> String {
        format!("this member is isolated since {} by {}: {}", utc_text(self.since_unix_ms), self.by, self.reason)
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` of a Unix time in milliseconds.
pub fn utc_text(ms: u64) -> String {
    let (time, date) = utc_parts(ms as i64);
    format!("{date}T{time}Z")
}

/// `HH:MM:SS.mmm` (UTC) of a Unix time in milliseconds, and the date `YYYY-MM-DD`.
pub fn utc_parts(ms: i64) -> (String, String) {
    let secs = ms.div_euclid(1000);
    let (days, day_s) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    (
        format!("{:02}:{:02}:{:02}.{:03}", day_s / 3600, day_s % 3600 / 60, day_s % 60, ms.rem_euclid(1000)),
        format!("{y:04}-{m:02}-{d:02}"),
    )
}

fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// Why demoting `target` now would cost the cluster its quorum, if it would. `voters` are the
/// voters now, `isolated` the members whose isolation is recorded (each will be demoted in turn),
/// `healthy` those that answered the leader within an election timeout (the leader among them).
///
/// The demotion is a joint change: both the voters now and the voters after (without every
/// isolated member and without `target`) must have a healthy majority, and the voters after
/// must not be empty. A learner's isolation changes no quorum.
pub fn quorum_refusal(
    voters: &BTreeSet<NodeId>,
    isolated: &BTreeSet<NodeId>,
    target: NodeId,
    healthy: &BTreeSet<NodeId>,
) -> Option<String> {
    if !voters.contains(&target) {
        return None;
    }
    let after: BTreeSet<NodeId> = voters.iter().copied().filter(|v| *v != target && !isolated.contains(v)).collect();
    if after.is_empty() {
        return Some("it is the last voter: isolating it would leave the cluster without a quorum".into());
    }
    short_of_quorum("the voters left", &after, healthy).or_else(|| short_of_quorum("the voters now", voters, healthy))
}

/// Why `set` has no healthy majority, if it has none (`which` names the set).
fn short_of_quorum(which: &str, set: &BTreeSet<NodeId>, healthy: &BTreeSet<NodeId>) -> Option<String> {
    let up = set.intersection(healthy).count();
    (up < majority(set.len())).then(|| {
        format!("{which} would have {up} of {} answering the leader: a quorum needs {}", set.len(), majority(set.len()))
    })
}

/// Why demoting `target` now would leave the joint change without a healthy quorum, if it
/// would: the configuration openraft commits is the voters now and the voters without `target`
/// (isolated members still waiting for their own demotion count in it), and both halves need a
/// healthy majority.
pub fn demotion_refusal(voters: &BTreeSet<NodeId>, target: NodeId, healthy: &BTreeSet<NodeId>) -> Option<String> {
    let after: BTreeSet<NodeId> = voters.iter().copied().filter(|v| *v != target).collect();
    if after.is_empty() {
        return Some("it is the last voter".into());
    }
    short_of_quorum("the voters now", voters, healthy).or_else(|| short_of_quorum("the voters after", &after, healthy))
}

/// What the leader does next to make the membership follow the isolation records, given the
/// voters, the members waiting for promotion (`promote` set) and the records. One step at a
/// time; `None` when the membership already follows them.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The leader itself is isolated: hand leadership to another voter first.
    HandOver,
    /// Mark an isolated voter for promotion, so that once unisolated it is promoted again by
    /// the learner rule (it stays a voter in the member list meanwhile).
    MarkForPromotion(NodeId),
    /// Demote an isolated voter to a learner that keeps replicating.
    Demote(NodeId),
}

/// The isolated voters are taken in this order: the ones that do not answer first (removing one
/// raises the share of healthy voters), then by id; the first whose demotion keeps a healthy
/// quorum in both halves of the joint change is the one.
pub fn next_step(
    leader: NodeId,
    voters: &BTreeSet<NodeId>,
    marked: &BTreeSet<NodeId>,
    isolated: &BTreeSet<NodeId>,
    healthy: &BTreeSet<NodeId>,
) -> Option<Step> {
    if isolated.contains(&leader) && voters.contains(&leader) {
        return Some(Step::HandOver);
    }
    let mut pending: Vec<NodeId> = voters.intersection(isolated).copied().collect();
    pending.sort_by_key(|id| (healthy.contains(id), *id));
    let id = pending.into_iter().find(|id| demotion_refusal(voters, *id, healthy).is_none())?;
    Some(if marked.contains(&id) { Step::Demote(id) } else { Step::MarkForPromotion(id) })
}

impl Member {
    /// This member's own isolation, if one is recorded.
    pub fn isolation(&self) -> Option<Isolation> {
        self.inner.shared.isolated.read().unwrap().get(&self.id()).cloned()
    }

    /// Every recorded isolation of a member still in the cluster.
    pub fn isolated_members(&self) -> BTreeMap<NodeId, Isolation> {
        let m = self.inner.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let isolated = self.inner.shared.isolated.read().unwrap();
        isolated.iter().filter(|(id, _)| membership.get_node(id).is_some()).map(|(id, i)| (*id, i.clone())).collect()
    }

    /// Isolate member `id` (forwarded to the leader, which refuses when it would cost the
    /// quorum). Isolating an isolated member again changes nothing.
    pub async fn isolate(&self, id: NodeId, mut isolation: Isolation) -> Result<(), ConsensusError> {
        isolation.reason = printable(isolation.reason.trim());
        isolation.by = cut(&printable(isolation.by.trim()), BY_BYTES_MAX);
        if isolation.reason.is_empty() {
            return Err(ConsensusError::Membership("an isolation needs a reason".into()));
        }
        if isolation.reason.len() > REASON_BYTES_MAX {
            return Err(ConsensusError::Membership(format!("the reason is longer than {REASON_BYTES_MAX} bytes")));
        }
        self.change(Change::Isolate { id, isolation }).await.map(drop)
    }

    /// Lift member `id`'s isolation; the leader promotes it again once it has caught up.
    pub async fn unisolate(&self, id: NodeId) -> Result<(), ConsensusError> {
        self.change(Change::Unisolate(id)).await.map(drop)
    }

    /// At the leader: record an isolation, after the quorum check.
    pub(crate) async fn propose_isolation(&self, id: NodeId, isolation: Isolation) -> Result<(), ConsensusError> {
        // One isolation at a time, checked against every one committed before it: two at once
        // would each pass the check alone.
        let _one = self.inner.isolating.lock().await;
        self.inner.raft.ensure_linearizable(openraft::ReadPolicy::ReadIndex).await.map_err(|e| {
            if e.forward_to_leader().is_some() {
                ConsensusError::NotLeader
            } else {
                crate::raft_err(e)
            }
        })?;
        let m = self.inner.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        if membership.get_node(&id).is_none() {
            return Err(ConsensusError::MemberNotFound);
        }
        if isolation.reason.len() > REASON_BYTES_MAX || isolation.by.len() > BY_BYTES_MAX {
            return Err(ConsensusError::Membership("the reason or the operator is too long".into()));
        }
        let isolated: BTreeSet<NodeId> = self.isolated_members().into_keys().collect();
        if isolated.contains(&id) {
            return Ok(());
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if let Some(why) = quorum_refusal(&voters, &isolated, id, &self.healthy(&m)) {
            return Err(ConsensusError::Membership(format!("cannot isolate member {id:x}: {why}")));
        }
        info!(member = %format!("{id:x}"), reason = %isolation.reason, by = %isolation.by, "isolating member");
        let (reason, by) = (isolation.reason.clone(), isolation.by.clone());
        let log_index = self.leader_write(Request::Isolate { id, isolation }).await?;
        // Recorded once, by the leader that committed it (a replay on restart records nothing).
        self.flight().record(crate::flight::Event::Isolated { target: format!("{id:x}"), reason, by, log_index });
        Ok(())
    }

    /// At the leader: record that member `id` is no longer isolated.
    pub(crate) async fn propose_unisolation(
        &self,
        m: &openraft::RaftMetrics<crate::TypeConfig>,
        id: NodeId,
    ) -> Result<(), ConsensusError> {
        if m.membership_config.membership().get_node(&id).is_none() {
            return Err(ConsensusError::MemberNotFound);
        }
        if !self.inner.shared.isolated.read().unwrap().contains_key(&id) {
            return Ok(());
        }
        info!(member = %format!("{id:x}"), "lifting member's isolation");
        let log_index = self.leader_write(Request::Unisolate { id }).await?;
        self.flight().record(crate::flight::Event::Unisolated { target: format!("{id:x}"), log_index });
        Ok(())
    }

    /// Propose at this leader; the committed entry's log index.
    async fn leader_write(&self, req: Request) -> Result<u64, ConsensusError> {
        match self.inner.raft.client_write(req).await {
            Ok(r) => Ok(r.log_id.index),
            Err(e) if e.forward_to_leader().is_some() => Err(ConsensusError::NotLeader),
            Err(e) => Err(crate::raft_err(e)),
        }
    }

    /// Members that answered this leader within an election timeout, the leader included.
    fn healthy(&self, m: &openraft::RaftMetrics<crate::TypeConfig>) -> BTreeSet<NodeId> {
        let window = Duration::from_millis(self.inner.cfg.election_timeout_ms);
        let mut healthy: BTreeSet<NodeId> = m
            .heartbeat
            .iter()
            .flatten()
            .filter(|(_, at)| at.as_ref().is_some_and(|t| t.elapsed() <= window))
            .map(|(id, _)| *id)
            .collect();
        healthy.insert(self.id());
        healthy
    }

    /// At the leader, one reconciler step (called by the membership loop every 200 ms, when no
    /// change is in flight). Returns whether it changed (or tried to change) anything.
    pub(crate) async fn reconcile_isolation(&self, m: &openraft::RaftMetrics<crate::TypeConfig>) -> bool {
        let isolated: BTreeSet<NodeId> = self.isolated_members().into_keys().collect();
        if isolated.is_empty() || crate::failpoint::isolation_held() {
            return false;
        }
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let marked: BTreeSet<NodeId> = membership.nodes().filter(|(_, n)| n.promote).map(|(id, _)| *id).collect();
        let healthy = self.healthy(m);
        let Some(step) = next_step(self.id(), &voters, &marked, &isolated, &healthy) else {
            if voters.iter().any(|v| isolated.contains(v)) {
                warn!("isolated members wait for their demotion: it would cost the quorum now");
            }
            return false;
        };
        let raft = &self.inner.raft;
        match step {
            Step::HandOver => {
                let target = voters
                    .iter()
                    .copied()
                    .filter(|v| *v != self.id() && !isolated.contains(v) && healthy.contains(v))
                    .max_by_key(|v| crate::membership::matched_index(m, *v));
                match target {
                    Some(to) => {
                        info!(to = %format!("{to:x}"), "this member is isolated: handing leadership over");
                        if let Err(e) = self.transfer_leader(to).await {
                            warn!(to = %format!("{to:x}"), error = %e, "handing leadership over failed; will retry");
                        }
                    }
                    None => {
                        warn!("this member is isolated but no other healthy voter can lead; it keeps leading");
                        // Nothing done: the promoter may still promote a learner that can lead.
                        return false;
                    }
                }
            }
            Step::MarkForPromotion(id) => {
                // Read the node now, not from the start of the tick: a `member update` committed
                // meanwhile must not be undone.
                let now = raft.metrics().borrow_watched().membership_config.clone();
                let Some(node) = now.membership().get_node(&id) else { return false };
                let node = crate::MemberNode { promote: true, ..node.clone() };
                let change = ChangeMembers::SetNodes(BTreeMap::from([(id, node)]));
                if let Err(e) = raft.change_membership(change, true).await {
                    warn!(member = %format!("{id:x}"), error = %e, "marking an isolated voter failed; will retry");
                }
            }
            Step::Demote(id) => {
                info!(member = %format!("{id:x}"), "demoting isolated member to a learner");
                let change = ChangeMembers::RemoveVoters(BTreeSet::from([id]));
                if let Err(e) = raft.change_membership(change, true).await {
                    warn!(member = %format!("{id:x}"), error = %e, "demoting an isolated member failed; will retry");
                }
            }
        }
        true
    }

    /// Why this member must refuse client requests now, if it must: it was removed, it was
    /// dropped by a recovery (fenced), or an operator isolated it.
    pub fn refusal(&self) -> Option<ConsensusError> {
        if self.is_removed() {
            return Some(ConsensusError::Removed);
        }
        if let Some(why) = crate::incarnation::fenced() {
            return Some(ConsensusError::Fenced(why));
        }
        self.isolation().map(|i| ConsensusError::Isolated(i.describe()))
    }

    /// Changes whenever `refusal` may have changed.
    pub fn serving_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.shared.serving.subscribe()
    }

    /// The voters in this member's view of the membership.
    pub fn voter_ids(&self) -> BTreeSet<NodeId> {
        self.inner.raft.metrics().borrow_watched().membership_config.membership().voter_ids().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn isolation_is_refused_when_it_would_cost_the_quorum() {
        let v3 = set(&[1, 2, 3]);
        let v5 = set(&[1, 2, 3, 4, 5]);
        // (voters, isolated already, target, healthy, refused?)
        type Row<'a> = (&'a BTreeSet<NodeId>, &'a [NodeId], NodeId, &'a [NodeId], bool);
        let table: &[Row] = &[
            (&v3, &[], 3, &[1, 2, 3], false),
            // The suspect itself is down: the other two still make both quorums.
            (&v3, &[], 3, &[1, 2], false),
            // One other voter down: two voters left, one answers.
            (&v3, &[], 3, &[1, 3], true),
            (&v3, &[3], 2, &[1, 2, 3], false),
            (&v3, &[3], 2, &[2, 3], true),
            (&set(&[1]), &[], 1, &[1], true),
            (&set(&[1, 2]), &[], 2, &[1, 2], false),
            (&set(&[1, 2]), &[], 2, &[1], true),
            (&v5, &[], 5, &[1, 2, 3], false),
            (&v5, &[], 5, &[1, 2], true),
            (&v5, &[5], 4, &[1, 2, 3], false),
            (&v5, &[5], 4, &[1, 2], true),
            (&v5, &[4, 5], 3, &[1, 2, 3, 4, 5], false),
            (&v5, &[3, 4, 5], 2, &[1, 2, 3, 4, 5], false),
            (&v5, &[2, 3, 4, 5], 1, &[1, 2, 3, 4, 5], true),
            // A learner's isolation changes no quorum.
            (&v3, &[], 9, &[1], false),
        ];
        for (voters, isolated, target, healthy, refused) in table {
            let why = quorum_refusal(voters, &set(isolated), *target, &set(healthy));
            assert_eq!(why.is_some(), *refused, "voters {voters:?} isolated {isolated:?} target {target}: {why:?}");
        }
    }

    #[test]
    fn the_leader_hands_over_first_and_marks_before_it_demotes() {
        let voters = set(&[1, 2, 3]);
        let all = set(&[1, 2, 3]);
        assert_eq!(next_step(1, &voters, &set(&[]), &set(&[]), &all), None);
        assert_eq!(next_step(1, &voters, &set(&[]), &set(&[1]), &all), Some(Step::HandOver));
        assert_eq!(next_step(1, &voters, &set(&[]), &set(&[1, 2]), &all), Some(Step::HandOver));
        assert_eq!(next_step(1, &voters, &set(&[]), &set(&[2]), &all), Some(Step::MarkForPromotion(2)));
        assert_eq!(next_step(1, &voters, &set(&[2]), &set(&[2]), &all), Some(Step::Demote(2)));
        // Demoted already: nothing left to do, promotion flag or not.
        assert_eq!(next_step(1, &set(&[1, 3]), &set(&[2]), &set(&[2]), &all), None);
    }

    /// The review's case: 5 voters, 4 and 5 dead, 3 4 5 isolated. Demoting 3 first would leave
    /// the joint's second half {1,2,4,5} with 2 of 4 answering; the dead ones go first, and 3
    /// only once it is safe.
    #[test]
    fn demotions_never_leave_either_half_of_the_joint_change_without_a_quorum() {
        let v5 = set(&[1, 2, 3, 4, 5]);
        let healthy = set(&[1, 2, 3]);
        let marked = set(&[3, 4, 5]);
        let isolated = set(&[3, 4, 5]);
        assert!(demotion_refusal(&v5, 3, &healthy).is_some());
        assert_eq!(next_step(1, &v5, &marked, &isolated, &healthy), Some(Step::Demote(4)));
        let v4 = set(&[1, 2, 3, 5]);
        assert_eq!(next_step(1, &v4, &marked, &isolated, &healthy), Some(Step::Demote(5)));
        let v3 = set(&[1, 2, 3]);
        assert_eq!(next_step(1, &v3, &marked, &isolated, &healthy), Some(Step::Demote(3)));
        // With 2 down of 3, no demotion is safe: nothing is done.
        assert_eq!(next_step(1, &v3, &marked, &set(&[3]), &set(&[1])), None);
    }

    #[test]
    fn times_are_shown_in_utc() {
        assert_eq!(utc_text(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc_text(1_796_040_000_123), "2026-11-30T12:00:00.123Z");
    }
}
