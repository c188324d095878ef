//! Recovering from the loss of a quorum (ADR 0009 §2). `quorate ctl recover` asks every
//! survivor what it holds (`RecoveryInfo`), plans the new cluster with `plan` (pure), and has
//! each survivor apply the plan: the chosen survivor (the most recent log) appends one membership
//! entry whose voters are the survivors; every survivor raises its incarnation
//! (`crate::incarnation`), which fences the dropped members out for good. Online, a survivor
//! stops Raft, writes, and the server re-executes itself in place; offline, the same writes go
//! to a stopped survivor's data directory.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use openraft::entry::RaftEntry as _;
use openraft::rt::WatchReceiver as _;
use openraft::vote::RaftLeaderIdExt as _;
use openraft::{EntryPayload, Membership, ServerState};
use serde::{Deserialize, Serialize};

use crate::log_store::LogStore;
use crate::types::{Entry, LogId, MemberNode, NodeId, TypeConfig, Vote};
use crate::{ConsensusError, Member};

/// A log id as `ctl recover` shows and compares them: by term, then leader, then index
/// (openraft's order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LogPos {
    pub term: u64,
    pub leader: u64,
    pub index: u64,
}

impl LogPos {
    fn of(l: &LogId) -> LogPos {
        LogPos { term: l.leader_id.term, leader: l.leader_id.node_id, index: l.index }
    }
}

/// A member of the membership as a survivor knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownMember {
    pub id: u64,
    pub name: String,
    pub peer_url: String,
    pub client_urls: Vec<String>,
    pub voter: bool,
}

/// What a survivor tells `ctl recover` about itself (`GET /v1/member/recovery`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryInfo {
    pub id: u64,
    pub name: String,
    pub incarnation: u64,
    /// The plan that raised the incarnation to what it is, if one did.
    pub recovery_plan: Option<RecoveryPlan>,
    pub last_log: Option<LogPos>,
    pub committed: u64,
    pub applied: u64,
    /// The term of this member's vote.
    pub term: u64,
    /// The membership in this member's log (the last membership entry), every member in it.
    pub members: Vec<KnownMember>,
    /// Its voter sets: one, or two while a joint change is under way.
    #[serde(default)]
    pub configs: Vec<Vec<u64>>,
    /// The leader this member hears from now (none: the quorum is lost, or it is cut off).
    pub live_leader: Option<u64>,
}

/// What `ctl recover --apply` sends every survivor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPlan {
    pub plan_id: String,
    pub from_incarnation: u64,
    pub incarnation: u64,
    /// The survivor whose log becomes the cluster's.
    pub chosen: u64,
    /// The new cluster's voters: every survivor.
    pub voters: Vec<u64>,
    pub dropped: Vec<u64>,
    /// Every survivor's last log id when the plan was made: a survivor whose log moved since
    /// refuses it.
    pub expected: BTreeMap<String, Option<LogPos>>,
    /// Every entry up to here is kept (the chosen survivor's last log index).
    pub kept_up_to: u64,
    /// The highest commit index any survivor knew of.
    pub highest_commit_seen: u64,
    pub by: String,
    /// When it was applied (set by `ctl recover --apply`; not part of the plan id).
    #[serde(default)]
    pub at_unix_ms: u64,
}

fn hex(id: u64) -> String {
    format!("{id:x}")
}

/// Plan a recovery from the survivors' answers. `voters` are counted from the most recent
/// membership among the survivors. Refused (with why) when a majority of those voters answers,
/// when the survivors disagree on the incarnation, or when a survivor is not in the membership.
pub fn plan(survivors: &[RecoveryInfo], by: &str) -> Result<RecoveryPlan, String> {
    let chosen =
        survivors.iter().max_by_key(|s| (s.last_log, s.committed)).ok_or_else(|| "no survivor answered".to_string())?;
    if let Some(p) = unfinished(survivors) {
        return Ok(p);
    }
    let incarnations: BTreeSet<u64> = survivors.iter().map(|s| s.incarnation).collect();
    if incarnations.len() > 1 {
        return Err(format!(
            "the survivors are at different incarnations {incarnations:?}, and not as one recovery left them \
             half done: recover only members of one incarnation"
        ));
    }
    let from_incarnation = chosen.incarnation;
    let known: BTreeMap<u64, &KnownMember> = chosen.members.iter().map(|m| (m.id, m)).collect();
    let voters: BTreeSet<u64> = chosen.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
    let ids: BTreeSet<u64> = survivors.iter().map(|s| s.id).collect();
    if ids.len() != survivors.len() {
        return Err("the same member was given twice".into());
    }
    if let Some(s) = survivors.iter().find(|s| !known.contains_key(&s.id)) {
        return Err(format!("survivor {} ({:x}) is not in the membership of the most recent log", s.name, s.id));
    }
    // A joint membership elects with a majority of each half: survivors that are a majority of
    // every half need no recovery.
    let halves: Vec<BTreeSet<u64>> = match chosen.configs.is_empty() {
        true => vec![voters.clone()],
        false => chosen.configs.iter().map(|c| c.iter().copied().collect()).collect(),
    };
    if halves.iter().all(|h| h.intersection(&ids).count() > h.len() / 2) {
        let answering = voters.intersection(&ids).count();
        return Err(format!(
            "{answering} of the {} voters answer, a majority: the cluster can elect a leader without a recovery \
             (check `quorate ctl doctor`)",
            voters.len()
        ));
    }
    if let Some(s) = survivors.iter().find(|s| s.live_leader.is_some()) {
        return Err(format!("{} still hears from a leader ({:x}): nothing to recover", s.name, s.live_leader.unwrap()));
    }
    let dropped: Vec<u64> = known.keys().copied().filter(|id| !ids.contains(id)).collect();
    let last = chosen.last_log;
    let expected = survivors.iter().map(|s| (hex(s.id), s.last_log)).collect();
    let digest = format!(
        "{from_incarnation}:{:x}:{last:?}:{}",
        chosen.id,
        ids.iter().map(|i| hex(*i)).collect::<Vec<_>>().join(",")
    );
    Ok(RecoveryPlan {
        plan_id: format!("{:016x}", crate::stable_id(&["recovery", &digest])),
        from_incarnation,
        incarnation: from_incarnation.checked_add(1).ok_or("the incarnation cannot go higher")?,
        chosen: chosen.id,
        voters: ids.into_iter().collect(),
        dropped,
        expected,
        kept_up_to: last.map_or(0, |l| l.index),
        highest_commit_seen: survivors.iter().map(|s| s.committed).max().unwrap_or(0),
        by: by.to_string(),
        at_unix_ms: 0,
    })
}

/// A plan some survivors applied and others not yet (an `--apply` cut short): the same plan,
/// to finish. Every survivor that moved on must carry it, and every other must be one of its
/// survivors still at its starting incarnation.
fn unfinished(survivors: &[RecoveryInfo]) -> Option<RecoveryPlan> {
    let top = survivors.iter().map(|s| s.incarnation).max()?;
    let applied: Vec<&RecoveryInfo> = survivors.iter().filter(|s| s.incarnation == top).collect();
    let plan = applied.first()?.recovery_plan.clone()?;
    let same = applied.iter().all(|s| s.recovery_plan.as_ref().is_some_and(|p| p.plan_id == plan.plan_id));
    let rest_pending = survivors
        .iter()
        .filter(|s| s.incarnation != top)
        .all(|s| s.incarnation == plan.from_incarnation && plan.voters.contains(&s.id));
    let some_pending = survivors.iter().any(|s| s.incarnation != top);
    (plan.incarnation == top && same && rest_pending && some_pending).then_some(plan)
}

/// What the chosen survivor writes: one membership entry after its last, whose voters are the
/// survivors, as a leader of a term newer than any it has seen would (its vote says so). The
/// others write nothing but the incarnation: they vote for the chosen one, whose log is the most
/// recent, and receive the entry from it.
fn writes(
    me: NodeId,
    plan: &RecoveryPlan,
    last: Option<LogId>,
    vote: Option<Vote>,
    nodes: &BTreeMap<NodeId, MemberNode>,
) -> Result<(Option<Entry>, Option<Vote>), String> {
    if me != plan.chosen {
        return Ok((None, None));
    }
    let voters: BTreeSet<NodeId> = plan.voters.iter().copied().collect();
    let mut kept = BTreeMap::new();
    for id in &voters {
        let node = nodes.get(id).ok_or_else(|| format!("member {id:x} is not in this member's membership"))?;
        kept.insert(*id, MemberNode { promote: false, ..node.clone() });
    }
    let membership = Membership::new(vec![voters], kept).map_err(|e| e.to_string())?;
    let seen = vote.map_or(0, |v| v.leader_id().term).max(last.map_or(0, |l| l.leader_id.term));
    let term = seen + 1;
    let leader = openraft::alias::LeaderIdOf::<TypeConfig>::new_committed(term, me);
    let entry = Entry::new_membership(openraft::LogId::new(leader, last.map_or(0, |l| l.index) + 1), membership);
    Ok((Some(entry), Some(Vote::new_committed(term, me))))
}

/// The last membership in `entries`, else `fallback` (the snapshot's).
fn membership_of(
    entries: &[Entry],
    fallback: Option<crate::types::StoredMembership>,
) -> Option<Membership<NodeId, MemberNode>> {
    let in_log = entries.iter().rev().find_map(|e| match &e.payload {
        EntryPayload::Membership(m) => Some(m.clone()),
        _ => None,
    });
    in_log.or_else(|| fallback.map(|m| m.membership().clone()))
}

fn known_members(
    m: &Membership<NodeId, MemberNode>,
    published: &BTreeMap<u64, crate::PublishedMember>,
) -> Vec<KnownMember> {
    let voters: BTreeSet<NodeId> = m.voter_ids().collect();
    m.nodes()
        .map(|(id, n)| {
            let p = published.get(id);
            KnownMember {
                id: *id,
                name: p.map_or_else(|| n.name.clone(), |p| p.name.clone()),
                peer_url: n.peer_url.clone(),
                client_urls: p.map(|p| p.client_urls.clone()).unwrap_or_default(),
                voter: voters.contains(id),
            }
        })
        .collect()
}

/// A plan member `me` may apply at all, whoever sent it: one incarnation up, the chosen survivor
/// among the voters, short texts, and, on the chosen survivor (which writes the new membership
/// from its own), every member named known here. Another survivor may be behind the chosen one
/// (it missed a `member add`): it takes the membership from the chosen one's log.
fn well_formed(plan: &RecoveryPlan, me: NodeId, known: &BTreeSet<NodeId>) -> Result<(), String> {
    if plan.from_incarnation.checked_add(1) != Some(plan.incarnation) {
        return Err(format!(
            "a plan raises the incarnation by one, not {} to {}",
            plan.from_incarnation, plan.incarnation
        ));
    }
    if !plan.voters.contains(&plan.chosen) {
        return Err(format!("the chosen survivor {:x} is not among the plan's voters", plan.chosen));
    }
    let unknown = plan.voters.iter().chain(&plan.dropped).find(|id| !known.contains(id));
    if let Some(id) = unknown.filter(|_| me == plan.chosen) {
        return Err(format!("member {id:x} of the plan is not in this member's membership"));
    }
    if plan.voters.iter().any(|v| plan.dropped.contains(v)) {
        return Err("a member is both kept and dropped".into());
    }
    if plan.plan_id.len() > 64 || plan.by.len() > crate::isolation::BY_BYTES_MAX {
        return Err("the plan id or the operator is too long".into());
    }
    Ok(())
}

fn check(me: NodeId, plan: &RecoveryPlan, incarnation: u64, last: Option<LogId>) -> Result<(), String> {
    if !plan.voters.contains(&me) {
        return Err(format!("member {me:x} is not a survivor in plan {}", plan.plan_id));
    }
    if incarnation != plan.from_incarnation {
        return Err(format!(
            "this member is at incarnation {incarnation}, the plan starts from {}",
            plan.from_incarnation
        ));
    }
    let expected = plan.expected.get(&hex(me)).copied().flatten();
    if last.map(|l| LogPos::of(&l)) != expected {
        return Err(format!(
            "this member's log moved since the plan was made (last log {:?}, planned {expected:?}): plan again",
            last.map(|l| LogPos::of(&l))
        ));
    }
    Ok(())
}

/// The outcome of applying a plan on one survivor.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// Written: the member must restart now (Raft is stopped).
    Written,
    /// This plan was applied here before: nothing to do.
    Already,
}

impl Member {
    /// The recovery that set this member's incarnation, if one did.
    pub fn recovered_by(&self) -> Option<RecoveryPlan> {
        self.inner.log.recovery_plan()
    }

    /// This member's incarnation (`crate::incarnation`).
    pub fn incarnation(&self) -> u64 {
        self.inner.log.incarnation()
    }

    /// What this member holds, for `ctl recover`.
    pub async fn recovery_info(&self) -> RecoveryInfo {
        let m = self.inner.raft.metrics().borrow_watched().clone();
        let (last, vote, committed) = self.inner.log.state();
        let published = self.inner.shared.members.read().unwrap().clone();
        let members = known_members(m.membership_config.membership(), &published);
        RecoveryInfo {
            id: self.id(),
            name: self.inner.cfg.name.clone(),
            incarnation: self.inner.log.incarnation(),
            recovery_plan: self.recovered_by(),
            last_log: last.map(|l| LogPos::of(&l)),
            committed: committed.map_or(0, |l| l.index).max(m.last_applied.map_or(0, |l| l.index)),
            applied: m.last_applied.map_or(0, |l| l.index),
            term: vote.map_or(m.current_term, |v| v.leader_id().term),
            members,
            configs: m
                .membership_config
                .membership()
                .get_joint_config()
                .iter()
                .map(|c| c.iter().copied().collect())
                .collect(),
            live_leader: self.live_leader(),
        }
    }

    /// Apply a recovery plan on this running member: check it, stop Raft, write. On `Written`
    /// the caller must re-execute the process (this member serves nothing more meanwhile).
    pub async fn apply_recovery(&self, plan: &RecoveryPlan) -> Result<Applied, ConsensusError> {
        let _one = self.inner.isolating.lock().await;
        let refuse = ConsensusError::Membership;
        if self.recovered_by().is_some_and(|p| p.plan_id == plan.plan_id) {
            return Ok(Applied::Already);
        }
        if let Some(leader) = self.live_leader() {
            return Err(refuse(format!("this member hears from leader {leader:x}: nothing to recover")));
        }
        let nodes: BTreeMap<NodeId, MemberNode> = {
            let m = self.inner.raft.metrics().borrow_watched().clone();
            if m.state == ServerState::Leader && m.membership_config.membership().voter_ids().count() == 1 {
                return Err(refuse("this member leads: nothing to recover".into()));
            }
            m.membership_config.membership().nodes().map(|(id, n)| (*id, n.clone())).collect()
        };
        let (last, _, _) = self.inner.log.state();
        well_formed(plan, self.id(), &nodes.keys().copied().collect()).map_err(refuse)?;
        check(self.id(), plan, self.inner.log.incarnation(), last).map_err(refuse)?;
        tracing::warn!(plan = %plan.plan_id, incarnation = plan.incarnation, "recovery: stopping Raft to apply the plan");
        self.shutdown().await;
        // From here Raft is stopped: every failure is `Stopped`, on which the server restarts
        // the process (as it was, when nothing was written).
        let stopped = |e: String| ConsensusError::Stopped(format!("recovery not applied: {e}"));
        // Raft may have appended between the check and the stop: check again on what is final.
        let (last, vote, _) = self.inner.log.state();
        check(self.id(), plan, self.inner.log.incarnation(), last).map_err(stopped)?;
        let (entry, vote) = writes(self.id(), plan, last, vote, &nodes).map_err(stopped)?;
        self.inner
            .log
            .write_recovery(entry, vote, plan)
            .await
            .map_err(|e| ConsensusError::Stopped(format!("recovery write failed: {e}")))?;
        self.flight().record(crate::flight::Event::Recovered {
            plan: plan.plan_id.clone(),
            by: plan.by.clone(),
            incarnation: plan.incarnation,
            kept_up_to: plan.kept_up_to,
            dropped: plan.dropped.iter().map(|d| hex(*d)).collect(),
        });
        Ok(Applied::Written)
    }
}

/// The member id a data directory belongs to (its `member.id` file's first line).
fn dir_member_id(dir: &Path) -> Result<NodeId, String> {
    let path = dir.join("member.id");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .next()
        .and_then(|l| u64::from_str_radix(l.trim(), 16).ok())
        .ok_or_else(|| format!("{} is corrupt", path.display()))
}

/// A stopped member's data directory, opened for `ctl recover --data-dir` (its log store is
/// held open, so the member cannot be started meanwhile).
pub struct Stopped {
    dir: std::path::PathBuf,
    id: NodeId,
    log: LogStore,
    snapshot_membership: Option<crate::types::StoredMembership>,
}

impl Stopped {
    pub fn open(dir: &Path) -> Result<Stopped, String> {
        let id = dir_member_id(dir)?;
        let log = LogStore::open(dir).map_err(|e| {
            format!("open the raft log in {}: {e} (is the member still running? stop it first)", dir.display())
        })?;
        let sm = crate::state_machine::StateMachine::open(&dir.join("state.redb"), std::time::Duration::ZERO)
            .map_err(|e| format!("open {}: {e}", dir.join("state.redb").display()))?;
        let snapshot_membership = sm.stored_membership().map_err(|e| e.to_string())?;
        Ok(Stopped { dir: dir.to_path_buf(), id, log, snapshot_membership })
    }

    fn membership(&self) -> Result<Membership<NodeId, MemberNode>, String> {
        let entries = self.log.entries_from(0).map_err(|e| format!("read the raft log: {e}"))?;
        membership_of(&entries, self.snapshot_membership.clone())
            .ok_or_else(|| format!("{}: no membership in the log or the snapshot", self.dir.display()))
    }

    /// What the data directory holds.
    pub fn info(&self) -> Result<RecoveryInfo, String> {
        let (last, vote, committed) = self.log.state();
        let membership = self.membership()?;
        let members = known_members(&membership, &BTreeMap::new());
        let configs = membership.get_joint_config().iter().map(|c| c.iter().copied().collect()).collect();
        let name = members.iter().find(|m| m.id == self.id).map(|m| m.name.clone()).unwrap_or_default();
        Ok(RecoveryInfo {
            id: self.id,
            name,
            incarnation: self.log.incarnation(),
            recovery_plan: self.log.recovery_plan(),
            last_log: last.map(|l| LogPos::of(&l)),
            committed: committed.map_or(0, |l| l.index),
            applied: 0,
            term: vote.map_or(0, |v| v.leader_id().term),
            members,
            configs,
            live_leader: None,
        })
    }

    /// Apply a plan to the data directory.
    pub async fn apply(&self, plan: &RecoveryPlan) -> Result<Applied, String> {
        let applied = self.log.recovery_plan();
        if applied.is_some_and(|p| p.plan_id == plan.plan_id) {
            return Ok(Applied::Already);
        }
        let (last, vote, _) = self.log.state();
        let nodes: BTreeMap<NodeId, MemberNode> = self.membership()?.nodes().map(|(id, n)| (*id, n.clone())).collect();
        well_formed(plan, self.id, &nodes.keys().copied().collect())?;
        check(self.id, plan, self.log.incarnation(), last)?;
        let (entry, vote) = writes(self.id, plan, last, vote, &nodes)?;
        self.log.write_recovery(entry, vote, plan).await.map_err(|e| e.to_string())?;
        Ok(Applied::Written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: u64, last: Option<(u64, u64)>, committed: u64) -> RecoveryInfo {
        let members = (1..=5)
            .map(|i| KnownMember {
                id: i,
                name: format!("m{i}"),
                peer_url: format!("http://127.0.0.1:{i}"),
                client_urls: vec![],
                voter: true,
            })
            .collect();
        RecoveryInfo {
            id,
            name: format!("m{id}"),
            incarnation: 1,
            recovery_plan: None,
            last_log: last.map(|(term, index)| LogPos { term, leader: 1, index }),
            committed,
            applied: committed,
            term: 3,
            members,
            configs: vec![],
            live_leader: None,
        }
    }

    #[test]
    fn the_most_recent_log_is_chosen_and_a_majority_has_nothing_to_recover() {
        let p = plan(&[info(4, Some((2, 90)), 80), info(5, Some((3, 70)), 60)], "op").unwrap();
        assert_eq!(p.chosen, 5, "a later term beats a longer log");
        assert_eq!((p.voters.clone(), p.dropped.clone()), (vec![4, 5], vec![1, 2, 3]));
        assert_eq!((p.kept_up_to, p.highest_commit_seen, p.incarnation), (70, 80, 2));
        let tie = plan(&[info(4, Some((3, 70)), 65), info(5, Some((3, 70)), 60)], "op").unwrap();
        assert_eq!(tie.chosen, 4, "ties: the highest commit");
        assert!(plan(&[info(3, None, 0), info(4, None, 0), info(5, None, 0)], "op").unwrap_err().contains("majority"));
        let mut led = info(5, Some((3, 70)), 60);
        led.live_leader = Some(1);
        assert!(plan(&[led], "op").is_err());
        let mut other = info(5, Some((3, 70)), 60);
        other.incarnation = 2;
        assert!(plan(&[info(4, Some((3, 70)), 60), other], "op").unwrap_err().contains("incarnations"));
        assert!(plan(&[info(9, Some((3, 70)), 60)], "op").unwrap_err().contains("not in the membership"));
        // A joint membership: a majority of one half only cannot elect; of both, it can.
        let mut joint = info(4, Some((3, 70)), 60);
        joint.configs = vec![vec![1, 2, 3], vec![1, 2, 4, 5, 6]];
        let mut j5 = info(5, Some((3, 70)), 60);
        j5.configs = joint.configs.clone();
        assert!(plan(&[joint.clone(), j5.clone()], "op").is_ok(), "4,5: no majority of either half");
        let mut j1 = info(1, Some((3, 70)), 60);
        j1.configs = joint.configs.clone();
        let mut j2 = info(2, Some((3, 70)), 60);
        j2.configs = joint.configs.clone();
        assert!(plan(&[j1, j2, joint], "op").unwrap_err().contains("majority"), "1,2,4: both halves");
    }

    #[test]
    fn a_plan_cut_short_is_finished_not_planned_anew() {
        let p = plan(&[info(4, Some((2, 90)), 80), info(5, Some((3, 70)), 60)], "op").unwrap();
        let mut done = info(4, Some((2, 90)), 80);
        done.incarnation = 2;
        done.recovery_plan = Some(p.clone());
        let again = plan(&[done.clone(), info(5, Some((3, 70)), 60)], "op").unwrap();
        assert_eq!(again, p, "the same plan, to finish");
        let mut stranger = info(3, Some((3, 70)), 60);
        stranger.incarnation = 1;
        assert!(plan(&[done, stranger], "op").is_err(), "a member the plan does not keep cannot join it");
    }

    #[test]
    fn only_the_chosen_survivor_writes_an_entry_in_a_term_newer_than_it_has_seen() {
        let p = plan(&[info(4, Some((2, 90)), 80), info(5, Some((3, 70)), 60)], "op").unwrap();
        let nodes: BTreeMap<NodeId, MemberNode> = (1..=5)
            .map(|i| (i, MemberNode { name: format!("m{i}"), peer_url: format!("http://h:{i}"), promote: true }))
            .collect();
        let leader = |t, n| openraft::alias::LeaderIdOf::<TypeConfig>::new_committed(t, n);
        let last = Some(openraft::LogId::new(leader(3, 1), 70));
        assert_eq!(writes(4, &p, last, None, &nodes).unwrap(), (None, None));
        let (entry, vote) = writes(5, &p, last, Some(Vote::new(6, 2)), &nodes).unwrap();
        let entry = entry.unwrap();
        assert_eq!((entry.log_id.index, entry.log_id.leader_id.term), (71, 7));
        assert_eq!(vote, Some(Vote::new_committed(7, 5)));
        let EntryPayload::Membership(m) = entry.payload else { panic!("a membership entry") };
        assert_eq!(m.voter_ids().collect::<Vec<_>>(), vec![4, 5]);
        assert!(m.nodes().all(|(_, n)| !n.promote));
        assert!(check(5, &p, 1, last).is_ok());
        assert!(check(5, &p, 2, last).is_err(), "another incarnation");
        assert!(check(5, &p, 1, Some(openraft::LogId::new(leader(3, 1), 71))).is_err(), "the log moved");
        assert!(check(3, &p, 1, last).is_err(), "not a survivor");
        let known: BTreeSet<NodeId> = (1..=5).collect();
        assert!(well_formed(&p, p.chosen, &known).is_ok());
        // A survivor that missed a member's addition takes the plan; the chosen one does not.
        let other = *p.voters.iter().find(|v| **v != p.chosen).unwrap();
        let behind: BTreeSet<NodeId> = known.iter().copied().filter(|id| *id != p.dropped[0]).collect();
        assert!(well_formed(&p, other, &behind).is_ok(), "a survivor behind the chosen one");
        assert!(well_formed(&p, p.chosen, &behind).is_err(), "the chosen one must know every member");
        let bad = |f: fn(&mut RecoveryPlan)| {
            let mut q = p.clone();
            f(&mut q);
            well_formed(&q, q.chosen, &known).is_err()
        };
        assert!(bad(|q| q.incarnation = q.from_incarnation), "no fence");
        assert!(bad(|q| q.incarnation = u64::MAX), "a jump");
        assert!(bad(|q| q.chosen = 1), "the chosen one dropped");
        assert!(bad(|q| q.voters.push(9)), "an unknown member");
        assert!(bad(|q| q.dropped.push(4)), "kept and dropped");
        assert!(bad(|q| q.by = "x".repeat(1000)), "a long text");
    }
}
