//! Watch guarantees: a watcher sees, from its start revision to the last revision it saw,
//! exactly the changes the store made to its range, in revision order, with no gaps and no
//! duplicates, and the events of one revision together.

/// One change as (revision, key).
pub type Change = (i64, String);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchAnomaly {
    OutOfOrder {
        after: Change,
        came: Change,
    },
    Duplicate(Change),
    /// A change the store made in the watched span that the watcher never got.
    Gap(Change),
    /// A change the watcher got that the store never made.
    Phantom(Change),
    /// One revision's events were split across deliveries.
    SplitRevision(i64),
}

/// `deliveries`: what the watcher received, one inner vector per response; `reference`: every
/// change the store made to the watched range (from its history), in revision order.
pub fn check(start: i64, deliveries: &[Vec<Change>], reference: &[Change]) -> Vec<WatchAnomaly> {
    let mut out = Vec::new();
    let seen: Vec<&Change> = deliveries.iter().flatten().collect();
    for pair in seen.windows(2) {
        if pair[1].0 < pair[0].0 {
            out.push(WatchAnomaly::OutOfOrder { after: pair[0].clone(), came: pair[1].clone() });
        }
    }
    let mut unique = std::collections::BTreeSet::new();
    for c in &seen {
        if !unique.insert((*c).clone()) {
            out.push(WatchAnomaly::Duplicate((*c).clone()));
        }
    }
    for pair in deliveries.windows(2) {
        if let (Some(a), Some(b)) = (pair[0].last(), pair[1].first()) {
            if a.0 == b.0 {
                out.push(WatchAnomaly::SplitRevision(a.0));
            }
        }
    }
    let last = seen.iter().map(|c| c.0).max().unwrap_or(start - 1);
    let expected: std::collections::BTreeSet<&Change> =
        reference.iter().filter(|c| c.0 >= start && c.0 <= last).collect();
    for c in &expected {
        if !unique.contains(*c) {
            out.push(WatchAnomaly::Gap((*c).clone()));
        }
    }
    for c in &unique {
        if !expected.contains(c) {
            out.push(WatchAnomaly::Phantom(c.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(rev: i64, key: &str) -> Change {
        (rev, key.to_string())
    }

    #[test]
    fn a_faithful_watch_passes() {
        let reference = vec![c(5, "a"), c(6, "a"), c(6, "b"), c(8, "a")];
        let got = vec![vec![c(5, "a")], vec![c(6, "a"), c(6, "b")], vec![c(8, "a")]];
        assert!(check(5, &got, &reference).is_empty());
        // Stopping early is fine: only the span up to the last seen revision counts.
        assert!(check(5, &got[..2], &reference).is_empty());
    }

    #[test]
    fn gaps_duplicates_order_splits_and_phantoms_are_flagged() {
        let reference = vec![c(5, "a"), c(6, "a"), c(6, "b"), c(8, "a")];
        let gap = vec![vec![c(5, "a")], vec![c(8, "a")]];
        assert_eq!(check(5, &gap, &reference), vec![WatchAnomaly::Gap(c(6, "a")), WatchAnomaly::Gap(c(6, "b"))]);
        let dup = vec![vec![c(5, "a")], vec![c(5, "a")]];
        assert!(check(5, &dup, &reference).contains(&WatchAnomaly::Duplicate(c(5, "a"))));
        let order = vec![vec![c(6, "a"), c(6, "b")], vec![c(5, "a")]];
        assert!(check(5, &order, &reference).iter().any(|a| matches!(a, WatchAnomaly::OutOfOrder { .. })));
        let split = vec![vec![c(5, "a"), c(6, "a")], vec![c(6, "b")]];
        assert!(check(5, &split, &reference).contains(&WatchAnomaly::SplitRevision(6)));
        let phantom = vec![vec![c(5, "a"), c(7, "z")]];
        assert!(check(5, &phantom, &reference).contains(&WatchAnomaly::Phantom(c(7, "z"))));
    }
}
