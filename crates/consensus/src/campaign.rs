//! Prompt campaigns (issue 15: failover at least as fast as etcd's, loyalty unchanged).
//!
//! openraft keeps a follower loyal to its leader for `election_timeout_max` (the leader lease,
//! 1.25 election timeouts here) after the last message from it, and starts its own pre-vote
//! only once a whole further election timeout has passed beyond that: `lease + [T, 1.25T)`,
//! 2.25 to 2.5 election timeouts after a leader dies. etcd campaigns at `[T, 2T)`.
//!
//! This task asks for the pre-vote as soon as the loyalty has run out instead: at a random
//! moment in the `SPREAD` (a quarter timeout) after it, so that two followers seldom ask at
//! once. Nothing about who may win changes: `Trigger::elect(pre_vote = true)` is a no-op while
//! this member's own lease on its leader is valid, a peer grants the pre-vote only once its own
//! lease has run out too, and only a pre-vote granted by a quorum leads to an election. A
//! refused pre-vote raises no term. So the loyalty that keeps a partitioned leader's return from
//! raising the term, and PreVote itself, are exactly as before; only the wait beyond them goes.
//!
//! A member's lease is touched when Raft processes a leader's message, a little after the
//! network layer saw it arrive (`Signals::heard`): the first ask can come a few milliseconds
//! early and be refused locally (nothing is sent), and a peer that heard the leader a few
//! milliseconds later refuses the first pre-vote. So the ask is repeated every `RETRY`, up to
//! `ASKS` times, while this member is still a follower that has heard nothing since. After that
//! openraft's own timer remains, as before.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// What the network layer tells the campaign task: when a leader's message last arrived and how
/// many pre-votes this member has sent.
pub(crate) struct Signals {
    base: Instant,
    /// Nanoseconds since `base` at which the last AppendEntries arrived; 0 for never.
    heard_ns: AtomicU64,
    pre_votes_sent: AtomicU64,
}

impl Default for Signals {
    fn default() -> Self {
        Signals { base: Instant::now(), heard_ns: AtomicU64::new(0), pre_votes_sent: AtomicU64::new(0) }
    }
}

impl Signals {
    /// A leader's AppendEntries (a heartbeat included) arrived.
    pub(crate) fn heard(&self) {
        let ns = self.base.elapsed().as_nanos().max(1) as u64;
        self.heard_ns.fetch_max(ns, Ordering::AcqRel);
    }

    fn last_heard(&self) -> Option<Instant> {
        match self.heard_ns.load(Ordering::Acquire) {
            0 => None,
            ns => Some(self.base + Duration::from_nanos(ns)),
        }
    }

    pub(crate) fn pre_vote_sent(&self) {
        self.pre_votes_sent.fetch_add(1, Ordering::AcqRel);
    }

    fn pre_votes_sent(&self) -> u64 {
        self.pre_votes_sent.load(Ordering::Acquire)
    }
}

/// Asks are spread over this share of an election timeout after the loyalty ends.
const SPREAD_DIVISOR: u32 = 4;
/// Between asks for the same silence.
const RETRY: Duration = Duration::from_millis(25);
/// Asks for one silence of the leader, at most.
const ASKS: u32 = 8;

/// When to first ask for a pre-vote after the leader was last heard at `heard`: once the
/// loyalty (`lease`) has run out, plus `jitter` (a fraction in [0, 1) of the spread).
pub(crate) fn first_ask(heard: Instant, lease: Duration, election_timeout: Duration, jitter: f64) -> Instant {
    heard + lease + election_timeout.div_f64(SPREAD_DIVISOR as f64).mul_f64(jitter.clamp(0.0, 1.0))
}

/// Where this member stands, as the campaign reads it before each ask.
#[derive(Clone, Copy)]
struct Standing {
    running: bool,
    follower: bool,
    term: u64,
    /// Its vote is for a leader a quorum granted (not one it gave a candidate).
    vote_committed: bool,
}

impl Standing {
    /// Whether to ask for a pre-vote for the silence that began in `silent_term`. Once the term
    /// moves (this member granted a candidate its vote, or heard of a newer term), or its vote
    /// is no longer one for an established leader, that silence is over: a candidate this
    /// member voted for may be about to win, and a pre-vote for the term after would depose it.
    /// openraft's own timer then stays as it always was.
    fn may_ask(self, silent_term: u64) -> bool {
        self.running && self.follower && self.term == silent_term && self.vote_committed
    }
}

impl crate::Member {
    /// Runs for the member's life; see the module's text.
    pub(crate) async fn campaign_promptly(self, lease: Duration) {
        use openraft::rt::WatchReceiver as _;
        use openraft::ServerState;
        let signals = self.inner.campaign.clone();
        let timeout = self.election_timeout();
        // The silence already asked for: one round of asks per silence.
        let mut asked_for: Option<Instant> = None;
        loop {
            if *self.inner.removed.borrow() {
                return;
            }
            let Some(heard) = signals.last_heard().filter(|h| asked_for != Some(*h)) else {
                tokio::time::sleep(timeout / SPREAD_DIVISOR).await;
                continue;
            };
            tokio::time::sleep_until(first_ask(heard, lease, timeout, rand::random::<f64>())).await;
            if signals.last_heard() != Some(heard) {
                continue;
            }
            asked_for = Some(heard);
            let silent_term = self.inner.raft.metrics().borrow_watched().current_term;
            for _ in 0..ASKS {
                let follower = {
                    let metrics = self.inner.raft.metrics();
                    let m = metrics.borrow_watched();
                    let now = Standing {
                        running: m.running_state.is_ok(),
                        follower: m.state == ServerState::Follower,
                        term: m.current_term,
                        vote_committed: m.vote.is_committed(),
                    };
                    now.may_ask(silent_term)
                };
                if !follower || crate::incarnation::fenced().is_some() || signals.last_heard() != Some(heard) {
                    break;
                }
                let sent = signals.pre_votes_sent();
                if self.inner.raft.trigger().elect(true).await.is_err() {
                    return;
                }
                tokio::time::sleep(RETRY).await;
                if signals.pre_votes_sent() != sent {
                    // A round went out: its answers get time to come back before it is replaced.
                    // Granted, it made this member a candidate, which ends the asks; refused (a
                    // peer's loyalty ran a few milliseconds behind), it is asked again.
                    tokio::time::sleep(RETRY * 3).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_ask_comes_after_the_whole_loyalty_within_a_quarter_timeout() {
        let heard = Instant::now();
        let (lease, t) = (Duration::from_millis(1250), Duration::from_millis(1000));
        assert_eq!(first_ask(heard, lease, t, 0.0), heard + lease);
        assert_eq!(first_ask(heard, lease, t, 0.5), heard + lease + Duration::from_millis(125));
        assert!(first_ask(heard, lease, t, 0.999_999) < heard + lease + Duration::from_millis(250));
        assert_eq!(first_ask(heard, lease, t, -3.0), heard + lease, "never before the loyalty ends");
        assert_eq!(first_ask(heard, lease, t, 7.0), heard + lease + Duration::from_millis(250));
    }

    #[test]
    fn only_a_follower_still_loyal_to_the_silent_leaders_term_asks() {
        let loyal = Standing { running: true, follower: true, term: 5, vote_committed: true };
        assert!(loyal.may_ask(5));
        // (standing, why it must not ask)
        let table = [
            (Standing { term: 6, ..loyal }, "the term moved: it voted for a candidate, or heard of a newer term"),
            (Standing { vote_committed: false, ..loyal }, "its vote is one it gave a candidate, not a leader"),
            (Standing { follower: false, ..loyal }, "it is a candidate or leader already, or a learner"),
            (Standing { running: false, ..loyal }, "its Raft core stopped"),
        ];
        for (standing, why) in table {
            assert!(!standing.may_ask(5), "asked although {why}");
        }
    }

    #[test]
    fn the_last_message_heard_only_moves_forward() {
        let s = Signals::default();
        assert_eq!(s.last_heard(), None);
        s.heard();
        let first = s.last_heard().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        s.heard();
        assert!(s.last_heard().unwrap() > first);
    }
}
