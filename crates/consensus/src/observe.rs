//! Watches Raft's server metrics (role, vote, leader, membership) and turns each change into
//! flight-recorder events and counters: term changes, elections started, won and lost (with the
//! reason), leaders elected and lost, membership changes, etcd's leader changes.
//!
//! The decisions are a pure step (`Observer::step`) over what was last seen and what is seen
//! now, table-tested below. A watch hands over only the latest value: several changes can
//! arrive as one (a member that wins at once never shows as a candidate, and a single member
//! never does), so elections are counted from the vote, once per term, never from the role's
//! transitions: a won election is always a started one.

use std::collections::BTreeSet;

use openraft::rt::WatchReceiver as _;
use openraft::ServerState;

use crate::flight::{hex, Event, LostReason};
use crate::metrics::ConsensusMetrics;
use crate::types::{NodeId, Raft};

/// What the step looks at in Raft's server metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Seen {
    pub term: u64,
    pub voted_for: Option<NodeId>,
    pub leading: bool,
    pub leader: Option<NodeId>,
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
    pub membership_index: u64,
}

/// The step's memory.
#[derive(Debug, Default)]
pub(crate) struct Observer {
    me: NodeId,
    last: Option<Seen>,
    /// The term of an election this member stood in that has not ended yet.
    standing: Option<u64>,
    /// The last term this member stood in.
    started_term: u64,
    /// The last leader this member knew (etcd counts a change only to another leader).
    known_leader: Option<NodeId>,
}

impl Observer {
    pub(crate) fn new(me: NodeId) -> Self {
        Observer { me, ..Default::default() }
    }

    /// The events that the change from the last seen state to `now` makes, each with its term.
    /// `vote_refused_in(t)`: whether a voter refused this member's vote in term `t`.
    pub(crate) fn step(&mut self, now: Seen, vote_refused_in: impl Fn(u64) -> bool) -> Vec<(u64, Event)> {
        let mut out = Vec::new();
        let first = self.last.is_none();
        let prev = self.last.clone().unwrap_or_default();
        if first {
            // What it was before this start is history: an election it stood in then is over.
            self.started_term = now.term;
        }
        if prev.leading && !now.leading {
            let reason = match now.term > prev.term {
                true => format!("saw term {}", now.term),
                false => "stepped down".to_string(),
            };
            out.push((prev.term, Event::LeaderLost { reason }));
        }
        if !first && now.term != prev.term {
            out.push((
                now.term,
                Event::TermChanged { from: prev.term, to: now.term, voted_for: now.voted_for.map(hex) },
            ));
        }
        if let Some(t) = self.standing {
            if now.leading && now.term == t {
                out.push((t, Event::ElectionWon));
                self.standing = None;
            } else {
                let lost = if now.term == t && now.leader.is_some_and(|l| l != self.me) {
                    Some(LostReason::AnotherLeader)
                } else if now.term > t && now.voted_for == Some(self.me) {
                    Some(if vote_refused_in(t) { LostReason::VoteRefused } else { LostReason::NoQuorum })
                } else if now.term > t {
                    Some(LostReason::HigherTerm)
                } else {
                    None
                };
                if let Some(reason) = lost {
                    out.push((t, Event::ElectionLost { reason }));
                    self.standing = None;
                }
            }
        }
        if now.voted_for == Some(self.me) && now.term > self.started_term {
            self.started_term = now.term;
            out.push((now.term, Event::ElectionStarted));
            if now.leading {
                out.push((now.term, Event::ElectionWon));
            } else {
                self.standing = Some(now.term);
            }
        }
        if let Some(l) = now.leader.filter(|l| Some(*l) != self.known_leader) {
            self.known_leader = Some(l);
            out.push((now.term, Event::LeaderElected { leader: hex(l) }));
        }
        let known = !now.voters.is_empty() || !now.learners.is_empty();
        if known && (first || now.voters != prev.voters || now.learners != prev.learners) {
            let ids = |s: &BTreeSet<NodeId>| s.iter().map(|i| hex(*i)).collect();
            out.push((
                now.term,
                Event::MembershipChanged {
                    voters: ids(&now.voters),
                    learners: ids(&now.learners),
                    log_index: now.membership_index,
                },
            ));
        }
        self.last = Some(now);
        out
    }
}

fn seen(raft: &Raft) -> Seen {
    let metrics = raft.server_metrics();
    let s = metrics.borrow_watched();
    let membership = s.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let learners = membership.nodes().map(|(id, _)| *id).filter(|id| !voters.contains(id)).collect();
    Seen {
        term: s.vote.leader_id.term,
        voted_for: Some(s.vote.leader_id.node_id),
        leading: s.state == ServerState::Leader,
        leader: s.current_leader,
        voters,
        learners,
        membership_index: s.membership_config.log_id().as_ref().map_or(0, |l| l.index),
    }
}

/// Count and record every change of this member's Raft role, vote, leader and membership, until
/// Raft stops.
pub(crate) async fn watch(raft: Raft, me: NodeId, metrics: ConsensusMetrics) {
    let mut server = raft.server_metrics();
    let mut observer = Observer::new(me);
    loop {
        let now = seen(&raft);
        metrics.flight.set_term(now.term);
        for (term, event) in observer.step(now, |t| metrics.flight.vote_refused_in(t)) {
            match &event {
                Event::ElectionStarted => metrics.elections_started.inc(),
                Event::ElectionWon => metrics.elections_won.inc(),
                Event::ElectionLost { reason } => {
                    metrics.elections_lost.get_or_create(&vec![("reason", reason.label())]).inc()
                }
                Event::LeaderElected { .. } => metrics.leader_changes.inc(),
                _ => 0,
            };
            if let Event::ElectionLost { reason } = &event {
                tracing::info!(term, reason = reason.label(), "election lost");
            }
            metrics.flight.record_in(term, event);
        }
        if server.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: NodeId = 1;

    fn at(term: u64, voted_for: NodeId, leading: bool, leader: Option<NodeId>) -> Seen {
        Seen {
            term,
            voted_for: Some(voted_for),
            leading,
            leader,
            voters: [1, 2, 3].into(),
            learners: BTreeSet::new(),
            membership_index: 1,
        }
    }

    fn names(events: &[(u64, Event)]) -> Vec<String> {
        events
            .iter()
            .map(|(t, e)| format!("{t}:{}", serde_json::to_value(e).unwrap()["event"].as_str().unwrap()))
            .collect()
    }

    fn observer_at(s: Seen) -> Observer {
        let mut o = Observer::new(ME);
        o.step(s, |_| false);
        o
    }

    #[test]
    fn a_win_seen_in_one_change_counts_as_started_and_won() {
        // Follower in term 3, then (the candidate state never seen) leader of term 4.
        let mut o = observer_at(at(3, 2, false, Some(2)));
        let ev = o.step(at(4, ME, true, Some(ME)), |_| false);
        assert_eq!(names(&ev), ["4:term_changed", "4:election_started", "4:election_won", "4:leader_elected"]);
    }

    #[test]
    fn a_single_member_that_elects_itself_counts_one_start_and_one_win() {
        let mut o = Observer::new(ME);
        let alone = |term, leading: bool| Seen {
            term,
            voted_for: Some(ME),
            leading,
            leader: leading.then_some(ME),
            voters: [ME].into(),
            ..Default::default()
        };
        let started = names(&o.step(alone(0, false), |_| false));
        assert_eq!(started, ["0:membership_changed"], "nothing stood for at start");
        let ev = o.step(alone(1, true), |_| false);
        assert_eq!(names(&ev), ["1:term_changed", "1:election_started", "1:election_won", "1:leader_elected"]);
        assert!(o.step(alone(1, true), |_| false).is_empty(), "nothing changed, nothing counted");
    }

    #[test]
    fn an_election_ends_lost_with_its_reason() {
        // Stood in term 4; member 2 won term 4.
        let mut o = observer_at(at(3, 2, false, Some(2)));
        assert_eq!(names(&o.step(at(4, ME, false, Some(2)), |_| false))[1], "4:election_started");
        let ev = o.step(at(4, ME, false, Some(3)), |_| false);
        assert_eq!(ev[0], (4, Event::ElectionLost { reason: LostReason::AnotherLeader }));

        // Stood in 5, then a candidate of term 6 asked and got our vote.
        let mut o = observer_at(at(4, 2, false, Some(2)));
        o.step(at(5, ME, false, Some(2)), |_| false);
        let ev = o.step(at(6, 3, false, Some(2)), |_| false);
        assert!(ev.contains(&(5, Event::ElectionLost { reason: LostReason::HigherTerm })), "{ev:?}");

        // Stood in 5 and 6: the first refused by a voter, then one nobody answered.
        let mut o = observer_at(at(4, 2, false, Some(2)));
        o.step(at(5, ME, false, Some(2)), |_| false);
        let ev = o.step(at(6, ME, false, Some(2)), |t| t == 5);
        assert!(ev.contains(&(5, Event::ElectionLost { reason: LostReason::VoteRefused })), "{ev:?}");
        assert!(ev.contains(&(6, Event::ElectionStarted)), "{ev:?}");
        let ev = o.step(at(7, ME, false, Some(2)), |t| t == 5);
        assert!(ev.contains(&(6, Event::ElectionLost { reason: LostReason::NoQuorum })), "{ev:?}");
    }

    #[test]
    fn a_deposed_leader_records_the_term_it_lost() {
        let mut o = observer_at(at(4, ME, true, Some(ME)));
        let ev = o.step(at(5, 2, false, Some(2)), |_| false);
        assert_eq!(
            ev,
            vec![
                (4, Event::LeaderLost { reason: "saw term 5".into() }),
                (5, Event::TermChanged { from: 4, to: 5, voted_for: Some("2".into()) }),
                (5, Event::LeaderElected { leader: "2".into() }),
            ]
        );
    }

    #[test]
    fn started_never_reads_below_won() {
        // Any sequence of observations: every win is of a term this member stood in.
        let mut o = Observer::new(ME);
        let (mut started, mut won) = (0, 0);
        let seq = [
            at(1, 2, false, Some(2)),
            at(2, ME, true, Some(ME)),
            at(3, 3, false, Some(3)),
            at(4, ME, false, None),
            at(4, ME, true, Some(ME)),
            at(6, ME, true, Some(ME)),
        ];
        for s in seq {
            for (_, e) in o.step(s, |_| false) {
                started += (e == Event::ElectionStarted) as u32;
                won += (e == Event::ElectionWon) as u32;
                assert!(started >= won, "started {started} < won {won}");
            }
        }
        assert_eq!((started, won), (3, 3));
    }
}
