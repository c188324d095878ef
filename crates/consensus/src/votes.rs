//! What a (pre-)vote's answer says, for the flight recorder and the refusal metrics. The peer
//! transport sees both sides of every PreVote and Vote RPC: the candidate records what it asked
//! and what came back, the voter what it answered and why.
//!
//! openraft's answer carries no reason, only the voter's vote and last log id, so the reason is
//! inferred from them in openraft's own order of checks (`Engine::handle_vote_req`): a higher
//! term; a live leader (the voter's leader lease, or the leader's own quorum lease); a log
//! behind the voter's; a vote already given in that term. A refused answer where the voter has
//! an established leader and a longer log fits both a live leader and a log behind: the
//! candidate records the log (a fact in the answer, and enough on its own to refuse); the voter
//! of a pre-vote finds out which it was by asking Raft again with its own last log id (a
//! pre-vote changes nothing, so asking twice is harmless).

use openraft::errors::RPCError;
use std::time::{Duration, Instant};

use openraft::raft::{VoteRequest, VoteResponse};

use crate::flight::{hex, Event, Outcome, Refusal};
use crate::metrics::ConsensusMetrics;
use crate::types::{NodeId, TypeConfig};

type Req = VoteRequest<TypeConfig>;
type Resp = VoteResponse<TypeConfig>;

/// Whether the answer grants the request.
pub(crate) fn granted(pre_vote: bool, req: &Req, resp: &Resp) -> bool {
    match pre_vote {
        true => resp.vote_granted,
        false => resp.vote_granted && resp.vote.leader_id == req.vote.leader_id,
    }
}

/// Why a refused request was refused, as far as the answer shows.
pub(crate) fn refusal(req: &Req, resp: &Resp) -> Refusal {
    let (asked, theirs) = (&req.vote.leader_id, &resp.vote.leader_id);
    if theirs.term > asked.term {
        return Refusal::HigherTerm;
    }
    if resp.last_log_id > req.last_log_id {
        return Refusal::LogBehind;
    }
    if resp.vote.committed {
        return Refusal::LeaderAlive;
    }
    Refusal::AlreadyVoted
}

/// The leader the voter has accepted, from its answer.
fn voter_leader(resp: &Resp) -> Option<String> {
    resp.vote.committed.then(|| hex(resp.vote.leader_id.node_id))
}

/// How often an unanswered (pre-)vote to one peer is recorded: a member cut off for an hour
/// asks every peer about once an election timeout, and recording each would push the start of
/// the incident out of the ring. The ones in between are counted in the next record.
pub(crate) const UNANSWERED_RECORD_INTERVAL: Duration = Duration::from_secs(10);

/// Which unanswered requests to one peer get recorded (the recorder keeps one per peer: openraft
/// makes a new network client for every round of votes).
#[derive(Debug, Default)]
pub(crate) struct Unanswered {
    last_recorded: Option<Instant>,
    unrecorded: u64,
}

impl Unanswered {
    /// An unanswered request at `now`: `Some(unrecorded before it)` if it is to be recorded.
    pub(crate) fn admit(&mut self, now: Instant) -> Option<u64> {
        match self.last_recorded {
            Some(at) if now.saturating_duration_since(at) < UNANSWERED_RECORD_INTERVAL => {
                self.unrecorded += 1;
                None
            }
            _ => {
                self.last_recorded = Some(now);
                Some(std::mem::take(&mut self.unrecorded))
            }
        }
    }
}

/// The candidate's side: record a request sent to `to` and what became of it.
pub(crate) fn record_sent(
    metrics: &ConsensusMetrics,
    to: NodeId,
    pre_vote: bool,
    req: &Req,
    result: &Result<Resp, RPCError<TypeConfig>>,
) {
    let for_term = req.vote.leader_id.term;
    let (outcome, reason, voter_term, leader) = match result {
        Ok(resp) if granted(pre_vote, req, resp) => (Outcome::Granted, None, Some(resp.vote.leader_id.term), None),
        Ok(resp) => (Outcome::Refused, Some(refusal(req, resp)), Some(resp.vote.leader_id.term), voter_leader(resp)),
        Err(_) => (Outcome::Unreachable, None, None, None),
    };
    if !pre_vote && outcome == Outcome::Refused {
        metrics.flight.note_vote_refused(for_term);
    }
    let admitted = match outcome {
        Outcome::Unreachable => metrics.flight.admit_unanswered(to, Instant::now()),
        Outcome::Refused if pre_vote => metrics.flight.admit_refused_pre_vote(to, false, Instant::now()),
        _ => Some(0),
    };
    let Some(unrecorded_before) = admitted else { return };
    // A pre-vote is asked from the current term for the next; a vote in the term it asks for.
    let term = if pre_vote { for_term.saturating_sub(1) } else { for_term };
    let to = hex(to);
    let event = match pre_vote {
        true => {
            Event::PreVoteSent { to, for_term, outcome, reason, voter_term, voter_leader: leader, unrecorded_before }
        }
        false => Event::VoteSent { to, for_term, outcome, reason, voter_term, voter_leader: leader, unrecorded_before },
    };
    metrics.flight.record_in(term.max(metrics.flight.term()), event);
}

/// The voter's side: record an answer given, with its reason, and count a refused pre-vote.
/// `reason` is the refusal as finally judged (see `answer_reason`).
pub(crate) fn record_answered(
    metrics: &ConsensusMetrics,
    pre_vote: bool,
    req: &Req,
    resp: &Resp,
    reason: Option<Refusal>,
) {
    let from = hex(req.vote.leader_id.node_id);
    let for_term = req.vote.leader_id.term;
    let granted = reason.is_none();
    if let (true, Some(r)) = (pre_vote, reason) {
        metrics.pre_votes_refused.get_or_create(&vec![("reason", r.label())]).inc();
    }
    if pre_vote
        && !granted
        && metrics.flight.admit_refused_pre_vote(req.vote.leader_id.node_id, true, Instant::now()).is_none()
    {
        return;
    }
    let event = match pre_vote {
        true => Event::PreVoteAnswered { from, for_term, granted, reason },
        false => Event::VoteAnswered { from, for_term, granted, reason },
    };
    metrics.flight.record_in(resp.vote.leader_id.term, event);
}

/// Whether a refusal the answer alone cannot pin down needs Raft asked again: the voter has an
/// established leader and a longer log, so either refused it.
pub(crate) fn ambiguous(req: &Req, resp: &Resp) -> bool {
    refusal(req, resp) == Refusal::LogBehind
        && resp.vote.committed
        && resp.vote.leader_id.term <= req.vote.leader_id.term
}

/// The pre-vote `req` with the voter's own last log id: if Raft grants this one, the log was
/// the only reason it refused.
pub(crate) fn with_log_of(req: &Req, resp: &Resp) -> Req {
    let mut probe = req.clone();
    probe.last_log_id = resp.last_log_id;
    probe
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{LogId, Vote};
    use openraft::vote::RaftLeaderIdExt;

    fn log(term: u64, index: u64) -> Option<LogId> {
        Some(openraft::LogId::new(openraft::alias::LeaderIdOf::<TypeConfig>::new_committed(term, 0), index))
    }

    fn req(term: u64, node: u64, last: Option<LogId>) -> Req {
        VoteRequest::new(Vote::new(term, node), last)
    }

    fn resp(vote: Vote, last: Option<LogId>, granted: bool) -> Resp {
        VoteResponse::new(vote, last, granted)
    }

    #[test]
    fn a_refusal_is_read_from_the_voters_vote_and_log() {
        // The returning member asks for term 7; the voter is at term 9.
        assert_eq!(
            refusal(&req(7, 1, log(5, 10)), &resp(Vote::new_committed(9, 2), log(5, 10), false)),
            Refusal::HigherTerm
        );
        // The voter follows leader 2 in term 6 and has nothing the candidate lacks: the lease.
        assert_eq!(
            refusal(&req(7, 1, log(6, 12)), &resp(Vote::new_committed(6, 2), log(6, 12), false)),
            Refusal::LeaderAlive
        );
        // Its log is longer.
        assert_eq!(refusal(&req(7, 1, log(5, 10)), &resp(Vote::new(6, 3), log(6, 12), false)), Refusal::LogBehind);
        // It voted for member 3 in term 7 already.
        assert_eq!(refusal(&req(7, 1, log(6, 12)), &resp(Vote::new(7, 3), log(6, 12), false)), Refusal::AlreadyVoted);
    }

    #[test]
    fn a_vote_is_granted_only_when_the_voter_took_the_candidates_vote() {
        let r = req(7, 1, log(6, 12));
        assert!(granted(false, &r, &resp(Vote::new(7, 1), log(6, 12), true)));
        assert!(!granted(false, &r, &resp(Vote::new(7, 3), log(6, 12), true)), "a late grant for another vote");
        assert!(granted(true, &r, &resp(Vote::new(6, 2), log(6, 12), true)), "a pre-vote grant leaves the vote alone");
    }

    #[test]
    fn unanswered_requests_to_a_peer_are_recorded_once_per_interval_and_counted() {
        let mut u = Unanswered::default();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(u.admit(t0), Some(0));
        assert_eq!(u.admit(t0 + s(1)), None);
        assert_eq!(u.admit(t0 + s(9)), None);
        assert_eq!(u.admit(t0 + s(10)), Some(2), "the two in between are counted");
        assert_eq!(u.admit(t0 + s(11)), None);
        assert_eq!(u.admit(t0 + s(30)), Some(1));
    }

    #[test]
    fn only_a_live_leader_with_a_longer_log_is_ambiguous() {
        let r = req(7, 1, log(5, 10));
        assert!(ambiguous(&r, &resp(Vote::new_committed(6, 2), log(6, 12), false)));
        assert!(!ambiguous(&r, &resp(Vote::new(6, 2), log(6, 12), false)), "no leader: the log it is");
        assert!(!ambiguous(&r, &resp(Vote::new_committed(6, 2), log(5, 10), false)), "same log: the lease it is");
        assert_eq!(with_log_of(&r, &resp(Vote::new_committed(6, 2), log(6, 12), false)).last_log_id, log(6, 12));
    }
}
