//! Two primaries (issue 11): the seed's primary election (a lease, `Txn If(CreateRevision(k)
//! == 0) Then Put(k, lease)`, keep-alives) may never let two candidates believe they are
//! primary at once.
//!
//! A candidate believes from the moment its winning Txn's answer arrives until the last promise
//! it was given for that lease runs out (its grant's or last renewal's answer + TTL), or until
//! it invoked a revoke of the lease itself, whichever is first. That is what the store promised
//! it, so it is what a careful client may act on. Two beliefs on different leases that overlap
//! in time are two primaries. Checked by one sweep over the beliefs sorted by start
//! (O(n log n)): a belief that overlaps any earlier one overlaps the one that lasts longest.

use std::collections::HashMap;

use serde::Serialize;

use crate::check::lease_expiry::{LeaseAnswer, Revoke};
use crate::history::Nanos;

/// A candidate's Txn that succeeded: it put the primary key with `lease`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Win {
    pub candidate: u32,
    pub lease: i64,
    /// When the success answer arrived.
    pub at_ns: Nanos,
    /// The primary key's create revision (the candidate's fencing token).
    pub create_revision: i64,
}

/// One candidate's time as primary, [from, until).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Belief {
    pub candidate: u32,
    pub lease: i64,
    pub create_revision: i64,
    pub from_ns: Nanos,
    pub until_ns: Nanos,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TwoPrimaries {
    pub earlier: Belief,
    pub later: Belief,
    /// How long both believed.
    pub overlap_ms: u64,
}

/// Each win's belief: until the latest promise for its lease, cut at the first revoke the
/// candidate invoked. Wins that were never promised anything beyond their start are dropped.
pub fn beliefs(wins: &[Win], answers: &[LeaseAnswer], revokes: &[Revoke]) -> Vec<Belief> {
    let mut promised: HashMap<i64, Nanos> = HashMap::new();
    for a in answers {
        if let Some(until) = a.promised_until_ns() {
            let e = promised.entry(a.lease).or_insert(until);
            *e = (*e).max(until);
        }
    }
    let mut revoked: HashMap<i64, Nanos> = HashMap::new();
    for r in revokes {
        let e = revoked.entry(r.lease).or_insert(r.invoke_ns);
        *e = (*e).min(r.invoke_ns);
    }
    wins.iter()
        .filter_map(|w| {
            let mut until = *promised.get(&w.lease)?;
            if let Some(&r) = revoked.get(&w.lease) {
                until = until.min(r);
            }
            (until > w.at_ns).then_some(Belief {
                candidate: w.candidate,
                lease: w.lease,
                create_revision: w.create_revision,
                from_ns: w.at_ns,
                until_ns: until,
            })
        })
        .collect()
}

/// Every belief that started while another, on a different lease, still held.
pub fn check(beliefs: &[Belief]) -> Vec<TwoPrimaries> {
    let mut sorted = beliefs.to_vec();
    sorted.sort_by_key(|b| (b.from_ns, b.until_ns));
    let mut out = Vec::new();
    // The belief seen so far that lasts longest.
    let mut longest: Option<Belief> = None;
    for b in sorted {
        if let Some(l) = longest {
            if b.from_ns < l.until_ns && b.lease != l.lease {
                let overlap_ns = l.until_ns.min(b.until_ns) - b.from_ns;
                out.push(TwoPrimaries { earlier: l, later: b, overlap_ms: overlap_ns / 1_000_000 });
            }
        }
        if longest.is_none_or(|l| b.until_ns > l.until_ns) {
            longest = Some(b);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Nanos = 1_000_000;

    fn answer(lease: i64, at_ms: u64, ttl_s: i64) -> LeaseAnswer {
        LeaseAnswer { client: lease as u32, lease, at_ns: at_ms * MS, ttl_s }
    }

    fn win(candidate: u32, lease: i64, at_ms: u64) -> Win {
        Win { candidate, lease, at_ns: at_ms * MS, create_revision: lease * 10 }
    }

    fn belief(candidate: u32, lease: i64, from_ms: u64, until_ms: u64) -> Belief {
        Belief { candidate, lease, create_revision: lease * 10, from_ns: from_ms * MS, until_ns: until_ms * MS }
    }

    #[test]
    fn a_belief_lasts_from_the_win_to_the_last_promise_or_the_revoke() {
        // Granted at 0 (TTL 3), won at 50, renewed at 1 000 and 2 000, then a "not found".
        let answers = [answer(1, 0, 3), answer(1, 1_000, 3), answer(1, 2_000, 3), answer(1, 3_000, 0)];
        assert_eq!(beliefs(&[win(1, 1, 50)], &answers, &[]), vec![belief(1, 1, 50, 5_000)]);
        let revoke = [Revoke { client: 1, lease: 1, invoke_ns: 2_500 * MS }];
        assert_eq!(beliefs(&[win(1, 1, 50)], &answers, &revoke), vec![belief(1, 1, 50, 2_500)]);
        // A win whose lease was never answered (or ran out before the win) believes nothing.
        assert!(beliefs(&[win(2, 2, 50)], &answers, &[]).is_empty());
        assert!(beliefs(&[win(1, 1, 6_000)], &answers, &[]).is_empty());
    }

    #[test]
    fn primaries_in_turn_pass() {
        // Candidate 1 abandons its lease; 2 wins after it ran out, then 3 after 2 revoked.
        let b = [belief(1, 1, 50, 5_000), belief(2, 2, 5_400, 9_000), belief(3, 3, 9_000, 12_000)];
        assert!(check(&b).is_empty());
        assert!(check(&[]).is_empty());
    }

    #[test]
    fn a_takeover_before_the_old_promise_ran_out_is_two_primaries() {
        // The planted bug: 1's lease ended at its grant's deadline (3 500) though it was told
        // 5 000; candidate 2 won at 3 600.
        let b = [belief(2, 2, 3_600, 9_000), belief(1, 1, 50, 5_000), belief(3, 3, 9_500, 12_000)];
        let found = check(&b);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].earlier.candidate, found[0].later.candidate), (1, 2));
        assert_eq!(found[0].overlap_ms, 1_400);
    }

    #[test]
    fn an_overlap_with_a_long_belief_behind_a_short_one_is_found() {
        // 2 is nested inside 1; 3 starts after 2 ended but while 1 still held.
        let b = [belief(1, 1, 0, 10_000), belief(2, 2, 1_000, 2_000), belief(3, 3, 3_000, 4_000)];
        let found = check(&b);
        assert_eq!(found.iter().map(|t| (t.earlier.lease, t.later.lease)).collect::<Vec<_>>(), vec![(1, 2), (1, 3)]);
        assert_eq!(found[1].overlap_ms, 1_000);
    }

    #[test]
    fn one_candidate_winning_again_on_a_new_lease_while_the_old_held_is_flagged() {
        let b = [belief(1, 1, 0, 5_000), belief(1, 2, 4_000, 8_000)];
        assert_eq!(check(&b).len(), 1);
    }
}
