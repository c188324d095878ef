//! Revisions: every acknowledged write has a revision of its own (two writes acknowledged at
//! the same revision means two histories), and what one client sees never goes back (each
//! client's successive linearizable answers carry non-decreasing header revisions).

use std::collections::BTreeMap;

use serde::Serialize;

/// An acknowledged answer: `write` when it changed the store (its revision is its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Acked {
    pub client: u32,
    /// Completion order within the client.
    pub seq: u64,
    pub revision: i64,
    pub write: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum RevisionAnomaly {
    /// Two acknowledged writes at one revision.
    Shared { revision: i64, clients: Vec<u32> },
    /// A client saw `after` and then, later, the older `came`.
    WentBack { client: u32, after: i64, came: i64 },
}

pub fn check(acked: &[Acked]) -> Vec<RevisionAnomaly> {
    let mut out = Vec::new();
    let mut writes: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
    for a in acked.iter().filter(|a| a.write) {
        writes.entry(a.revision).or_default().push(a.client);
    }
    for (revision, clients) in writes {
        if clients.len() > 1 {
            out.push(RevisionAnomaly::Shared { revision, clients });
        }
    }
    let mut by_client: BTreeMap<u32, Vec<&Acked>> = BTreeMap::new();
    for a in acked {
        by_client.entry(a.client).or_default().push(a);
    }
    for (client, mut answers) in by_client {
        answers.sort_by_key(|a| a.seq);
        for w in answers.windows(2) {
            if w[1].revision < w[0].revision {
                out.push(RevisionAnomaly::WentBack { client, after: w[0].revision, came: w[1].revision });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(client: u32, seq: u64, revision: i64, write: bool) -> Acked {
        Acked { client, seq, revision, write }
    }

    #[test]
    fn own_revisions_and_monotonic_clients_pass() {
        assert!(check(&[a(1, 0, 5, true), a(1, 1, 5, false), a(2, 0, 6, true), a(1, 2, 7, true)]).is_empty());
    }

    #[test]
    fn a_shared_write_revision_and_a_client_going_back_are_flagged() {
        let out = check(&[a(1, 0, 5, true), a(2, 0, 5, true), a(2, 1, 4, false)]);
        assert_eq!(
            out,
            vec![
                RevisionAnomaly::Shared { revision: 5, clients: vec![1, 2] },
                RevisionAnomaly::WentBack { client: 2, after: 5, came: 4 }
            ]
        );
    }
}
