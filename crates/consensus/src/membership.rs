//! Membership changes (ADR 0004): members join as learners and are promoted by joint
//! consensus once caught up; removing the leader hands leadership over first; a removed member
//! is told so and stops.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::rt::WatchReceiver as _;
use openraft::{ChangeMembers, ServerState};
use tracing::{info, warn};

use crate::network::{self, decode, encode};
use crate::{pb, ConsensusError, ForwardReq, ForwardResp, Member, MemberInfo, MemberNode, NodeId};

/// How often the leader looks for learners to promote.
const PROMOTE_CHECK: Duration = Duration::from_millis(200);

/// etcd's rule for promoting a learner: it has matched at least 90% of the leader's commit.
pub fn learner_ready(matched: u64, leader_commit: u64) -> bool {
    matched as f64 >= leader_commit as f64 * 0.9
}

/// A membership change asked of the leader.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) enum Change {
    Add { peer_url: String, learner: bool },
    Remove(NodeId),
    Update { id: NodeId, peer_url: String },
    Promote(NodeId),
    Isolate { id: NodeId, isolation: crate::isolation::Isolation },
    Unisolate(NodeId),
}

/// A `scheme://host:port` peer URL, `https://` in a cluster whose peers speak TLS and `http://`
/// in one whose peers do not (a member is never dialled in plaintext by one that speaks TLS).
fn check_peer_url(url: &str) -> Result<(), ConsensusError> {
    let scheme = if crate::network::peer_tls() { "https://" } else { "http://" };
    let ok = url.strip_prefix(scheme).is_some_and(|rest| {
        rest.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
    });
    if ok {
        Ok(())
    } else {
        Err(ConsensusError::BadPeerUrls)
    }
}

impl Member {
    /// Add a member (a learner, or a voter once it has caught up). Returns its new id.
    pub async fn add_member(&self, peer_url: String, learner: bool) -> Result<NodeId, ConsensusError> {
        check_peer_url(&peer_url)?;
        match self.change(Change::Add { peer_url, learner }).await? {
            Some(id) => {
                self.wait_member_known(id).await;
                Ok(id)
            }
            None => Err(ConsensusError::Unavailable("add returned no id".into())),
        }
    }

    pub async fn remove_member(&self, id: NodeId) -> Result<(), ConsensusError> {
        self.change(Change::Remove(id)).await.map(drop)
    }

    pub async fn update_member(&self, id: NodeId, peer_url: String) -> Result<(), ConsensusError> {
        check_peer_url(&peer_url)?;
        self.change(Change::Update { id, peer_url }).await.map(drop)
    }

    pub async fn promote_member(&self, id: NodeId) -> Result<(), ConsensusError> {
        self.change(Change::Promote(id)).await.map(drop)
    }

    /// Run a change at the leader, forwarding it there if needed. Changes go one at a time
    /// (joint consensus); one that arrives while another, such as a learner's promotion, is
    /// still in flight waits for it (up to 5 s), as etcd queues them through its log.
    pub(crate) async fn change(&self, change: Change) -> Result<Option<NodeId>, ConsensusError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match self.change_once(change.clone()).await {
                Err(ConsensusError::ChangeInProgress) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, ?change, "membership change failed");
                    return Err(e);
                }
                ok => return ok,
            }
        }
    }

    async fn change_once(&self, change: Change) -> Result<Option<NodeId>, ConsensusError> {
        if self.is_leader() {
            return self.apply_change(change).await;
        }
        match self.forward_idempotent(ForwardReq::Change(change)).await? {
            ForwardResp::Changed(id) => Ok(id),
            ForwardResp::Err(e) => Err(e),
            _ => Err(ConsensusError::Unavailable("unexpected forward reply".into())),
        }
    }

    /// Wait (briefly) until this member's own view of the membership has `id`, so the member
    /// list it answers with right after an add includes the new member.
    async fn wait_member_known(&self, id: NodeId) {
        let _ = self
            .inner
            .raft
            .wait(Some(Duration::from_secs(2)))
            .metrics(|m| m.membership_config.membership().get_node(&id).is_some(), "member known")
            .await;
    }

    /// At the leader: validate and propose one change.
    pub(crate) async fn apply_change(&self, change: Change) -> Result<Option<NodeId>, ConsensusError> {
        let raft = &self.inner.raft;
        let m = raft.metrics().borrow_watched().clone();
        if m.state != ServerState::Leader {
            return Err(ConsensusError::NotLeader);
        }
        let membership = m.membership_config.membership();
        let nodes: BTreeMap<NodeId, MemberNode> = membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let url_taken =
            |url: &str, except: Option<NodeId>| nodes.iter().any(|(id, n)| Some(*id) != except && n.peer_url == url);
        let matched: BTreeMap<NodeId, u64> = nodes.keys().map(|id| (*id, matched_index(&m, *id))).collect();
        let commit = m.cluster_committed.as_ref().or(m.local_committed.as_ref()).map(|l| l.index).unwrap_or(0);
        let result = match change {
            Change::Add { peer_url, learner } => {
                if url_taken(&peer_url, None) {
                    return Err(ConsensusError::PeerUrlExists);
                }
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                let id = crate::stable_id(&["added", &peer_url, &now.as_nanos().to_string()]).max(1);
                let node = MemberNode { name: String::new(), peer_url: peer_url.clone(), promote: !learner };
                info!(member = %format!("{id:x}"), %peer_url, learner, "adding member as a learner");
                raft.add_learner(id, node, false).await.map_err(change_err)?;
                return Ok(Some(id));
            }
            Change::Remove(id) => {
                if !nodes.contains_key(&id) {
                    return Err(ConsensusError::MemberNotFound);
                }
                if voters.contains(&id) && voters.len() == 1 {
                    return Err(ConsensusError::Membership("cannot remove the only voting member".into()));
                }
                if id == self.id() {
                    let me = self.id();
                    let isolated = self.isolated_members();
                    let target = voters
                        .iter()
                        .copied()
                        .filter(|v| *v != me && !isolated.contains_key(v))
                        .max_by_key(|v| matched[v]);
                    return self.remove_self(target).await.map(|()| None);
                }
                info!(member = %format!("{id:x}"), "removing member");
                let change = if voters.contains(&id) {
                    ChangeMembers::RemoveVoters(BTreeSet::from([id]))
                } else {
                    ChangeMembers::RemoveNodes(BTreeSet::from([id]))
                };
                let r = raft.change_membership(change, false).await.map_err(change_err);
                if r.is_ok() {
                    let node = nodes[&id].clone();
                    tokio::spawn(tell_removed(id, node));
                }
                r
            }
            Change::Update { id, peer_url } => {
                let Some(node) = nodes.get(&id) else { return Err(ConsensusError::MemberNotFound) };
                if url_taken(&peer_url, Some(id)) {
                    return Err(ConsensusError::PeerUrlExists);
                }
                let node = MemberNode { peer_url, ..node.clone() };
                info!(member = %format!("{id:x}"), peer_url = %node.peer_url, "updating member");
                raft.change_membership(ChangeMembers::SetNodes(BTreeMap::from([(id, node)])), true)
                    .await
                    .map_err(change_err)
            }
            Change::Promote(id) => {
                if !nodes.contains_key(&id) {
                    return Err(ConsensusError::MemberNotFound);
                }
                if voters.contains(&id) {
                    return Err(ConsensusError::MemberNotLearner);
                }
                if self.isolated_members().contains_key(&id) {
                    return Err(ConsensusError::Membership(format!(
                        "member {id:x} is isolated: `quorate ctl unisolate` it, and it is promoted once caught up"
                    )));
                }
                if !learner_ready(matched[&id], commit) {
                    return Err(ConsensusError::LearnerNotReady);
                }
                info!(member = %format!("{id:x}"), "promoting learner");
                raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), true).await.map_err(change_err)
            }
            Change::Isolate { id, isolation } => return self.propose_isolation(id, isolation).await.map(|()| None),
            Change::Unisolate(id) => return self.propose_unisolation(&m, id).await.map(|()| None),
        };
        result.map(|_| None)
    }

    /// The leader removes itself: hand leadership to the most caught-up other voter, then ask
    /// the new leader to do the removal.
    async fn remove_self(&self, target: Option<NodeId>) -> Result<(), ConsensusError> {
        let me = self.id();
        let Some(target) = target else { return Err(ConsensusError::Membership("no other voter to lead".into())) };
        info!(to = %format!("{target:x}"), "removing this member, which leads: handing leadership over first");
        self.transfer_leader(target).await?;
        match self.forward_idempotent(ForwardReq::Change(Change::Remove(me))).await? {
            ForwardResp::Changed(_) => Ok(()),
            ForwardResp::Err(e) => Err(e),
            _ => Err(ConsensusError::Unavailable("unexpected forward reply".into())),
        }
    }

    /// At the leader, forever: make the membership follow the isolation records
    /// (`crate::isolation`), and promote learners that were added as voters once they catch up.
    pub(crate) async fn promote_caught_up(self) {
        let mut tick = tokio::time::interval(PROMOTE_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut joint_seen = None;
        loop {
            tick.tick().await;
            let m = self.inner.raft.metrics().borrow_watched().clone();
            if m.running_state.is_err() {
                return;
            }
            if m.state != ServerState::Leader {
                joint_seen = None;
                continue;
            }
            let membership = m.membership_config.membership();
            // One change at a time: openraft refuses a change while another is in flight.
            if membership.get_joint_config().len() > 1 {
                // A joint config committed, applied here, and still joint an election timeout
                // later was left by a leader that died between the two halves of a change (a
                // live driver proposes the second half as soon as the first is applied): nothing
                // else finishes it.
                let log_id = *m.membership_config.log_id();
                let settled = m.committed_membership_config.log_id() == m.membership_config.log_id()
                    && m.last_applied.map(|l| l.index) >= log_id.map(|l| l.index);
                let seen = match joint_seen {
                    Some((id, since)) if id == log_id && settled => Some((id, since)),
                    _ => settled.then(|| (log_id, tokio::time::Instant::now())),
                };
                if seen.is_some_and(|(_, since)| since.elapsed() >= self.election_timeout()) {
                    // Voters leaving keep a place as learners only when they were isolated
                    // (a demotion); a removal stays a removal.
                    let halves = membership.get_joint_config();
                    let leaving: Vec<NodeId> = halves[0].difference(&halves[1]).copied().collect();
                    let isolated = self.isolated_members();
                    let retain = !leaving.is_empty() && leaving.iter().all(|id| isolated.contains_key(id));
                    info!(?leaving, retain, "finishing a membership change its leader left joint");
                    let finish = ChangeMembers::AddVoterIds(BTreeSet::new());
                    if let Err(e) = self.inner.raft.change_membership(finish, retain).await {
                        warn!(error = %e, "finishing a joint membership failed; will retry");
                    }
                }
                joint_seen = seen;
                continue;
            }
            joint_seen = None;
            if self.reconcile_isolation(&m).await {
                continue;
            }
            let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
            let isolated = self.isolated_members();
            let commit = m.cluster_committed.as_ref().or(m.local_committed.as_ref()).map(|l| l.index).unwrap_or(0);
            let ready = membership.nodes().find(|(id, node)| {
                let matched = matched_index(&m, **id);
                node.promote
                    && !voters.contains(id)
                    && !isolated.contains_key(id)
                    && matched > 0
                    && learner_ready(matched, commit)
            });
            if let Some((id, _)) = ready {
                let id = *id;
                info!(member = %format!("{id:x}"), "learner caught up: promoting it to voter");
                let change = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
                if let Err(e) = self.inner.raft.change_membership(change, true).await {
                    warn!(member = %format!("{id:x}"), error = %e, "promotion failed; will retry");
                }
            }
        }
    }

    /// Ask the peers at `peer_urls` which member id the cluster gave `my_peer_url` (a member
    /// joining with `--initial-cluster-state existing`). Returns (member id, cluster id, the
    /// cluster's incarnation).
    pub async fn discover_id(
        peer_urls: &[String],
        my_peer_url: &str,
        timeout: Duration,
    ) -> Result<(NodeId, u64, u64), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = String::from("no peer answered");
        while tokio::time::Instant::now() < deadline {
            for url in peer_urls.iter().filter(|u| *u != my_peer_url) {
                let Ok(ch) = network::channel_to(url) else { continue };
                let mut client = network::new_client(ch);
                let mut request = tonic::Request::new(pb::Frame { data: encode(&ForwardReq::Members) });
                request.set_timeout(Duration::from_secs(3));
                let answer = client.forward(request).await.map(|r| {
                    let incarnation = crate::incarnation::of(r.metadata()).unwrap_or(1);
                    (incarnation, decode::<ForwardResp>(&r.into_inner().data))
                });
                match answer.map(|(incarnation, r)| r.map(|r| (incarnation, r))) {
                    Ok(Ok((incarnation, ForwardResp::Members(cluster_id, members)))) => {
                        if let Some((id, _)) = members.iter().find(|(_, u)| u == my_peer_url) {
                            return Ok((*id, cluster_id, incarnation));
                        }
                        last = format!(
                            "{url} knows no member with peer URL {my_peer_url}: add it first with `etcdctl member add`"
                        );
                    }
                    Ok(Ok((_, ForwardResp::Err(e)))) => last = format!("{url}: cannot answer for the cluster now: {e}"),
                    Ok(Ok(_)) | Ok(Err(_)) => last = format!("{url}: unexpected reply"),
                    Err(s) => last = format!("{url}: {}", s.message()),
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Err(last)
    }

    /// Every member's (id, peer URL), as this member knows them.
    pub(crate) fn peer_urls(&self) -> Vec<(NodeId, String)> {
        let m = self.inner.raft.metrics().borrow_watched().clone();
        m.membership_config.membership().nodes().map(|(id, n)| (*id, n.peer_url.clone())).collect()
    }

    /// The member list `MemberList` answers with: every membership change committed before the
    /// call, as etcd 3.5's linearizable member list. This member catches up with the leader's
    /// commit first; one that cannot within `catch_up` (it lags, or it was removed and the
    /// leader sends it nothing more) asks the leader for its list instead. A member that finds
    /// itself missing from either has been removed: it says so and stops. Only when no leader
    /// answers, and `linearizable` was not asked for, is the local view served (etcd 3.4's
    /// answer, and what an operator needs while the quorum is lost).
    pub async fn settled_members(
        &self,
        linearizable: bool,
        catch_up: Duration,
    ) -> Result<Vec<MemberInfo>, ConsensusError> {
        if self.is_removed() {
            return Err(ConsensusError::Removed);
        }
        let caught_up = match tokio::time::timeout(catch_up, self.linearize()).await {
            Ok(Ok(())) => Ok(self.members()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ConsensusError::Timeout),
        };
        let list = match caught_up {
            Ok(list) => list,
            Err(local_err) => {
                // A leader that cannot confirm itself has no one else to ask. Otherwise the
                // leader is asked: fully when linearizable was asked for, else briefly, so that a
                // member cut off from the quorum still answers with its own view at once.
                let leads = self.inner.raft.metrics().borrow_watched().current_leader == Some(self.id());
                let limit = if linearizable { network::FORWARD_TIMEOUT } else { catch_up * 2 };
                let asked = match leads {
                    true => Err(local_err),
                    false => tokio::time::timeout(limit, self.forward_idempotent(ForwardReq::MemberList))
                        .await
                        .unwrap_or(Err(ConsensusError::Timeout)),
                };
                match asked {
                    Ok(ForwardResp::MemberList(list)) => list,
                    Ok(ForwardResp::Err(e)) | Err(e) if linearizable => return Err(e),
                    Ok(_) if linearizable => {
                        return Err(ConsensusError::Unavailable("unexpected forward reply".into()))
                    }
                    _ => return Ok(self.members()),
                }
            }
        };
        if !list.iter().any(|m| m.id == self.id()) {
            self.mark_removed();
            return Err(ConsensusError::Removed);
        }
        Ok(list)
    }

    /// Whether this member knows it has been removed (it then serves no client request).
    pub fn is_removed(&self) -> bool {
        *self.inner.removed.borrow()
    }

    /// Resolves once this member has been removed from the cluster.
    pub async fn removed(&self) {
        let mut rx = self.inner.removed.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    pub(crate) fn mark_removed(&self) {
        let m = self.inner.raft.metrics().borrow_watched().clone();
        let still_member = m.membership_config.membership().get_node(&self.id()).is_some()
            && m.membership_config.membership().get_joint_config().len() == 1;
        if still_member && m.state == ServerState::Leader {
            // A stale notice: we lead a configuration that has us.
            return;
        }
        warn!("this member has been removed from the cluster; it stops serving now");
        let _ = self.inner.removed.send(true);
        self.inner.shared.serving.send_modify(|n| *n += 1);
    }
}

/// A change refused because this member no longer (or not yet fully) leads is retried at the
/// leader by the forwarding path.
fn change_err(
    e: openraft::errors::RaftError<crate::TypeConfig, openraft::errors::ClientWriteError<crate::TypeConfig>>,
) -> ConsensusError {
    use openraft::errors::{ChangeMembershipError, ClientWriteError};
    if e.forward_to_leader().is_some() {
        return ConsensusError::NotLeader;
    }
    if let Some(ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(_))) = e.api_error() {
        return ConsensusError::ChangeInProgress;
    }
    crate::raft_err(e)
}

/// The last log index the leader knows `id` has replicated.
pub(crate) fn matched_index(m: &openraft::RaftMetrics<crate::TypeConfig>, id: NodeId) -> u64 {
    m.replication.as_ref().and_then(|r| r.get(&id).cloned().flatten()).map(|l| l.index).unwrap_or(0)
}

/// Tell a removed member (best effort; it may be down) that it is out.
async fn tell_removed(id: NodeId, node: MemberNode) {
    let Ok(ch) = network::channel_to(&node.peer_url) else { return };
    let mut client = network::new_client(ch);
    for _ in 0..5 {
        let mut request = tonic::Request::new(pb::Frame { data: encode(&ForwardReq::Removed(id)) });
        request.set_timeout(Duration::from_secs(1));
        crate::incarnation::stamp(&mut request);
        if client.forward(request).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
