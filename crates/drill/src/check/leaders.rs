//! At most one leader per term: every member's own claim to lead, from its Status polled by
//! the drill and from its log; two different members claiming the same term is a split brain.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// `member` said it leads in `term` (a Status answer, or a line of its log).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Claim {
    pub at_ms: u64,
    pub member: String,
    pub term: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TwoLeaders {
    pub term: u64,
    pub members: Vec<String>,
}

/// The terms a member's log says it led in: quorate's "lease clock promoted term=N" and
/// etcd's raft "became leader at term N".
pub fn terms_in_log(log: &str) -> Vec<u64> {
    let number = |rest: &str| rest.chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok();
    log.lines()
        .filter_map(|line| {
            if let Some((_, rest)) = line.split_once("lease clock promoted term=") {
                number(rest)
            } else if let Some((_, rest)) = line.split_once(" became leader at term ") {
                number(rest)
            } else {
                None
            }
        })
        .collect()
}

pub fn check(claims: &[Claim]) -> Vec<TwoLeaders> {
    let mut by_term: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for c in claims {
        by_term.entry(c.term).or_default().insert(c.member.clone());
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
        let c = |member: &str, term| Claim { at_ms: 0, member: member.into(), term };
        assert!(check(&[c("a", 2), c("a", 2), c("b", 3), c("c", 4)]).is_empty());
        assert_eq!(
            check(&[c("a", 2), c("b", 3), c("c", 3)]),
            vec![TwoLeaders { term: 3, members: vec!["b".into(), "c".into()] }]
        );
    }

    #[test]
    fn leader_terms_are_read_from_quorate_and_etcd_logs() {
        let log = "2026-11-26T23:42:30Z  INFO quorate_consensus::lease_clock: lease clock promoted term=12 grace_ms=1000\n\
                   raft2026/11/26 23:59:01 INFO: 8e9e05c52164694d became leader at term 7\n\
                   2026-11-26T23:42:30Z  INFO quorate_consensus::lease_clock: lease clock demoted: no longer leader term=12";
        assert_eq!(terms_in_log(log), vec![12, 7]);
    }
}
