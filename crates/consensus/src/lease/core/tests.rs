//! The lease core under virtual time: every instant is `t0 + ms(n)`, nothing sleeps.

use super::*;

const GRACE: Duration = Duration::from_millis(1000);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// What a mark set from `remaining_ms` adds up to: the time, the slack and the clock-rate margin.
fn bound(remaining_ms: u64) -> Duration {
    ms(remaining_ms) + RENEW_SLACK + ms(remaining_ms / CLOCK_RATE_MARGIN_DIVISOR)
}

fn lead(term: u64) -> Option<Leadership> {
    Some(Leadership { term, quorum_fresh: true })
}

fn cut_off(term: u64) -> Option<Leadership> {
    Some(Leadership { term, quorum_fresh: false })
}

/// A core holding lease 1 (TTL 5 s) granted at log index 10, applied at `t0`.
fn with_lease(t0: Instant) -> LeaseCore {
    let mut c = LeaseCore::new(GRACE);
    c.applied_deadline(t0, 1, 5, 5_000, 10);
    c
}

/// The first instant (in 100 ms ticks from `from`) at which the core proposes expiry of `id`.
fn expires_at(c: &mut LeaseCore, from: Instant, leadership: Option<Leadership>, id: i64) -> Option<Duration> {
    for step in 0..2_000u64 {
        let now = from + ms(step * 100);
        if c.tick(now, leadership, false).iter().any(|(i, _)| *i == id) {
            return Some(now - from);
        }
    }
    None
}

#[test]
fn an_abandoned_lease_expires_after_its_ttl_plus_the_slack_and_not_before() {
    let t0 = Instant::now();
    let mut c = with_lease(t0);
    c.tick(t0, lead(2), false);
    let at = expires_at(&mut c, t0, lead(2), 1).expect("expires");
    assert!(at >= bound(5_000), "expired after {at:?}");
    assert!(at <= bound(5_000) + ms(100), "expired after {at:?}");
}

#[test]
fn a_new_leader_gives_one_election_timeout_of_grace_and_no_more() {
    let t0 = Instant::now();
    let mut c = with_lease(t0);
    // Elected 5.5 s after the grant: the mark says 6.05 s, the grace says 6.5 s.
    let promoted = t0 + ms(5_500);
    assert_eq!(expires_at(&mut c, promoted, lead(3), 1), Some(GRACE));
    // Elected 1 s after the grant: the mark (6.05 s) is later than the grace (2 s).
    let mut c = with_lease(t0);
    assert_eq!(expires_at(&mut c, t0 + ms(1_000), lead(3), 1), Some(ms(5_100)));
}

#[test]
fn a_leader_without_a_fresh_quorum_expires_nothing_and_answers_no_keepalive() {
    let t0 = Instant::now();
    let mut c = with_lease(t0);
    assert_eq!(expires_at(&mut c, t0, cut_off(2), 1), None);
    assert_eq!(c.keepalive(t0, cut_off(2), 1), Err(Refused::NoQuorum));
    assert_eq!(c.keepalive(t0, None, 1), Err(Refused::NotLeader));
}

#[test]
fn a_demoted_leader_forgets_its_verdicts_and_a_stall_restarts_the_grace() {
    let t0 = Instant::now();
    let mut c = with_lease(t0);
    c.tick(t0, lead(2), false);
    let late = t0 + ms(10_000);
    assert_eq!(c.tick(late, lead(2), false), vec![(1, 10)]);
    c.tick(late, None, false);
    assert_eq!(c.leading_term(), None);
    // Leading again (next term): grace from the promotion, verdict decided anew.
    let again = late + ms(100);
    assert!(c.tick(again, lead(4), false).is_empty());
    assert_eq!(c.tick(again + GRACE, lead(4), false), vec![(1, 10)]);
    // A stall at the moment the lease fell due gives it the grace again.
    let mut c = with_lease(t0);
    c.tick(t0, lead(2), false);
    let woke = t0 + ms(9_000);
    assert!(c.tick(woke, lead(2), true).is_empty());
    assert!(c.tick(woke + GRACE - ms(1), lead(2), false).is_empty());
    assert_eq!(c.tick(woke + GRACE, lead(2), false), vec![(1, 10)]);
}

#[test]
fn a_keepalive_is_answered_only_after_a_renewal_is_logged_and_only_within_the_window() {
    let t0 = Instant::now();
    let mut c = with_lease(t0);
    let t = t0 + ms(4_200);
    assert_eq!(c.keepalive(t, lead(2), 1), Ok(KeepAlive::Propose));
    // The renewal is applied here (as everywhere) 3 ms later and answered.
    c.applied_deadline(t + ms(3), 1, 5, 5_000, 20);
    let answer = c.renewed(t + ms(3), lead(2), 1, t, true);
    assert_eq!(answer, Ok(KeepAlive::Answer { ttl_s: 5, valid_until: t + ANSWER_WINDOW }));
    // Further keep-alives inside the window ride on that renewal; after it, they log again.
    assert_eq!(
        c.keepalive(t + ms(100), lead(2), 1),
        Ok(KeepAlive::Answer { ttl_s: 5, valid_until: t + ANSWER_WINDOW })
    );
    assert_eq!(c.keepalive(t + ANSWER_WINDOW + ms(1), lead(2), 1), Ok(KeepAlive::Propose));
    // A renewal that committed after the window cannot be promised.
    assert_eq!(c.renewed(t + ANSWER_WINDOW + ms(1), lead(2), 1, t, true), Err(Refused::TooLate));
    // The renewed lease lives a full TTL past the last answer that could reach a client.
    let at = expires_at(&mut c, t, lead(2), 1).expect("expires");
    assert!(t + at >= t + ANSWER_WINDOW + ms(5_000), "expired {at:?} after the renewal");
}

#[test]
fn every_member_that_applied_a_renewal_holds_the_promise_a_client_was_given() {
    // The seed's failure: renewal at 4.2 s of a 6 s lease, the leader dies right after its
    // answer. The follower that wins the next election applied the renewal before the answer
    // reached the client (here 3 ms before, the worst order), and leads 1.5 s later.
    let t0 = Instant::now();
    let mut follower = LeaseCore::new(GRACE);
    follower.applied_deadline(t0, 1, 6, 6_000, 10);
    let proposed = t0 + ms(4_200);
    follower.applied_deadline(proposed + ms(1), 1, 6, 6_000, 20);
    let client_told = proposed + ms(4) + ms(6_000);
    let promoted = proposed + ms(1_500);
    let at = expires_at(&mut follower, promoted, lead(3), 1).expect("expires");
    assert!(promoted + at >= client_told, "expired {:?} early", client_told - (promoted + at));
}

#[test]
fn a_keepalive_for_a_lease_whose_expiry_is_proposed_waits_for_the_verdict() {
    let t0 = Instant::now();
    let mut c = with_lease(t0);
    c.tick(t0, lead(2), false);
    let due = t0 + ms(7_000);
    assert_eq!(c.tick(due, lead(2), false), vec![(1, 10)]);
    assert_eq!(c.keepalive(due + ms(1), lead(2), 1), Ok(KeepAlive::VerdictPending));
    // A renewal that was in flight when the verdict was taken is not answered either.
    assert_eq!(c.renewed(due + ms(2), lead(2), 1, due - ms(1), true), Ok(KeepAlive::NotFound));
    // Not proposed twice while in flight; decided again if it failed and the lease is still due.
    assert!(c.tick(due + ms(100), lead(2), false).is_empty());
    c.verdicts_settled(&[(1, 10)]);
    assert_eq!(c.tick(due + ms(200), lead(2), false), vec![(1, 10)]);
    // Applied: the lease is gone, and so it is not found.
    c.removed(1);
    c.verdicts_settled(&[(1, 10)]);
    assert_eq!(c.keepalive(due + ms(300), lead(2), 1), Ok(KeepAlive::NotFound));
}

#[test]
fn a_renewal_logged_before_a_verdict_overturns_it_and_the_waiting_keepalive_proceeds() {
    let t0 = Instant::now();
    let mut c = with_lease(t0);
    c.tick(t0, lead(2), false);
    let due = t0 + ms(7_000);
    assert_eq!(c.keepalive(due - ms(5), lead(2), 1), Ok(KeepAlive::Propose));
    assert_eq!(c.tick(due, lead(2), false), vec![(1, 10)]);
    assert_eq!(c.keepalive(due + ms(1), lead(2), 1), Ok(KeepAlive::VerdictPending));
    // The renewal (index 30) applies before the verdict, which is then a no-op at apply.
    c.applied_deadline(due + ms(3), 1, 5, 5_000, 30);
    assert_eq!(
        c.renewed(due + ms(3), lead(2), 1, due - ms(5), true),
        Ok(KeepAlive::Answer { ttl_s: 5, valid_until: due - ms(5) + ANSWER_WINDOW })
    );
    c.verdicts_settled(&[(1, 10)]);
    assert!(matches!(c.keepalive(due + ms(10), lead(2), 1), Ok(KeepAlive::Answer { .. })));
}

#[test]
fn a_leader_that_regains_its_quorum_gives_the_grace_again() {
    // An asymmetric partition: no client could renew through this leader while it was cut off;
    // when it heals, nothing expires before one election timeout.
    let t0 = Instant::now();
    let mut c = with_lease(t0);
    c.tick(t0, lead(2), false);
    for step in 1..=100u64 {
        assert!(c.tick(t0 + ms(step * 100), cut_off(2), false).is_empty());
    }
    // Last seen cut off at 10 s; the grace runs from there.
    let last_cut_off = t0 + ms(10_000);
    assert!(c.tick(last_cut_off + ms(100), lead(2), false).is_empty());
    assert!(c.tick(last_cut_off + GRACE - ms(1), lead(2), false).is_empty());
    assert_eq!(c.tick(last_cut_off + GRACE, lead(2), false), vec![(1, 10)]);
}

#[test]
fn marks_carry_a_margin_for_clock_rates_that_grows_with_the_ttl() {
    let t0 = Instant::now();
    let mut c = LeaseCore::new(GRACE);
    c.applied_deadline(t0, 1, 600, 600_000, 1);
    assert_eq!(c.mark(1).unwrap().deadline, t0 + ms(600_000) + RENEW_SLACK + ms(6_000));
}

#[test]
fn a_lease_granted_again_under_the_same_id_inherits_nothing() {
    let t0 = Instant::now();
    let mut c = with_lease(t0);
    c.tick(t0, lead(2), false);
    let due = t0 + ms(7_000);
    assert_eq!(c.tick(due, lead(2), false), vec![(1, 10)]);
    // Revoked and granted again (index 30) while the old verdict is in flight.
    c.removed(1);
    c.applied_deadline(due + ms(10), 1, 5, 5_000, 30);
    assert_eq!(c.keepalive(due + ms(20), lead(2), 1), Ok(KeepAlive::Propose));
    assert!(c.tick(due + ms(100), lead(2), false).is_empty());
    assert_eq!(c.mark(1).map(|m| m.set_at), Some(30));
}

#[test]
fn a_renewal_applied_after_the_lease_is_gone_is_not_found() {
    let t0 = Instant::now();
    let mut c = with_lease(t0);
    assert_eq!(c.keepalive(t0 + ms(100), lead(2), 1), Ok(KeepAlive::Propose));
    c.removed(1);
    assert_eq!(c.renewed(t0 + ms(105), lead(2), 1, t0 + ms(100), false), Ok(KeepAlive::NotFound));
    assert_eq!(c.keepalive(t0 + ms(110), lead(2), 1), Ok(KeepAlive::NotFound));
}

#[test]
fn a_lease_granted_just_before_a_leader_change_lives_at_least_the_new_leaders_grace() {
    let t0 = Instant::now();
    let mut c = LeaseCore::new(GRACE);
    c.tick(t0, lead(2), false);
    // A 1 s lease granted in term 2; this member is elected in term 3 shortly after.
    c.applied_deadline(t0 + ms(50), 2, 1, 1_000, 40);
    let promoted = t0 + ms(1_500);
    assert_eq!(expires_at(&mut c, promoted, lead(3), 2), Some(GRACE));
}

#[test]
fn tightening_takes_the_earlier_bound_only_for_the_same_decision() {
    let t0 = Instant::now();
    let mut c = LeaseCore::new(GRACE);
    // Our marks: leases 1 and 2 replayed after a restart, 3 already tight, 4 unknown to the peer.
    c.applied_deadline(t0, 1, 10, 10_000, 7);
    c.applied_deadline(t0, 2, 10, 10_000, 9);
    c.applied_deadline(t0, 3, 10, 2_000, 11);
    c.applied_deadline(t0, 4, 10, 5_000, 12);
    let theirs = [
        (1, 7, 3_000),  // same grant, seen live: adopt
        (2, 8, 1_000),  // an older decision: we know of a later one, ignore
        (3, 11, 4_000), // same decision but later: keep ours
        (5, 13, 1_000), // a lease we do not have: ignore
    ];
    assert_eq!(c.tighten(&theirs, t0), 1);
    assert_eq!(c.mark(1).unwrap().deadline, t0 + ms(3_000));
    assert_eq!(c.mark(2).unwrap().deadline, t0 + bound(10_000));
    assert_eq!(c.mark(3).unwrap().deadline, t0 + bound(2_000));
    assert!(c.mark(5).is_none());
}

#[test]
fn a_follower_adopts_the_leaders_table_only_for_the_decision_it_holds() {
    let t0 = Instant::now();
    let mut c = LeaseCore::new(GRACE);
    c.applied_deadline(t0, 1, 10, 10_000, 7);
    // The leader's table was read before a renewal we have already applied (index 9): a copy
    // of it would shorten the promise the renewal made.
    c.applied_deadline(t0 + ms(5), 1, 10, 10_000, 9);
    assert_eq!(c.adopt_leader_table(&[(1, 7, 2_000)], t0 + ms(6)), 0);
    assert_eq!(c.mark(1).unwrap().deadline, t0 + ms(5) + bound(10_000));
    // The same decision: the leader's judgement (with its grace) is taken, later or earlier.
    assert_eq!(c.adopt_leader_table(&[(1, 9, 12_000)], t0 + ms(10)), 1);
    assert_eq!(c.mark(1).unwrap().deadline, t0 + ms(12_010));
}

#[test]
fn time_to_live_never_reports_more_than_the_granted_ttl() {
    let t0 = Instant::now();
    let mut c = with_lease(t0);
    assert_eq!(c.remaining_ms(t0, lead(2), 1), Ok(Some(5_000)));
    assert_eq!(c.remaining_ms(t0 + ms(5_000), lead(2), 1), Ok(Some(1_050)));
    assert_eq!(c.remaining_ms(t0, lead(2), 9), Ok(None));
}
