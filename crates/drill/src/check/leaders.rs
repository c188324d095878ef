//! At most one leader per term: every member's own claim to lead (its Status says it is the
//! leader) is polled through the drill; two different members claiming the same term is a
//! split brain.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// One poll answer: `member` said it leads in `term` (only claims are recorded).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Claim {
    pub at_ms: u64,
    pub member: u64,
    pub term: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TwoLeaders {
    pub term: u64,
    pub members: Vec<u64>,
}

pub fn check(claims: &[Claim]) -> Vec<TwoLeaders> {
    let mut by_term: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for c in claims {
        by_term.entry(c.term).or_default().insert(c.member);
    }
    by_term
        .into_iter()
        .filter(|(_, m)| m.len() > 1)
        .map(|(term, m)| TwoLeaders { term, members: m.into_iter().collect() })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_leader_per_term_passes_and_two_are_flagged() {
        let c = |member, term| Claim { at_ms: 0, member, term };
        assert!(check(&[c(1, 2), c(1, 2), c(2, 3), c(3, 4)]).is_empty());
        assert_eq!(check(&[c(1, 2), c(2, 3), c(3, 3)]), vec![TwoLeaders { term: 3, members: vec![2, 3] }]);
    }
}
