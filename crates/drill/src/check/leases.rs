//! Lease safety: once a revoke of a lease is acknowledged at revision R, no read at a later
//! revision shows a key attached to it; and when the drill ends, no key of a lease that was
//! revoked or left to expire is still there.

use serde::Serialize;

/// A linearizable read of a lease's key made after the lease was revoked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AfterRevoke {
    pub key: String,
    pub lease: i64,
    pub revoked_at: i64,
    pub read_at: i64,
    pub present: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum LeaseAnomaly {
    /// The key of a revoked lease was visible at a later revision.
    Outlived(AfterRevoke),
    /// At the end, a key of a revoked or abandoned lease was still stored.
    Leftover { key: String, lease: i64 },
}

/// `reads`: reads after acknowledged revokes; `leftover`: (key, lease) of revoked or abandoned
/// leases (long expired by then) that the final read still found.
pub fn check(reads: &[AfterRevoke], leftover: &[(String, i64)]) -> Vec<LeaseAnomaly> {
    let mut out: Vec<LeaseAnomaly> =
        reads.iter().filter(|r| r.present && r.read_at > r.revoked_at).cloned().map(LeaseAnomaly::Outlived).collect();
    out.extend(leftover.iter().map(|(key, lease)| LeaseAnomaly::Leftover { key: key.clone(), lease: *lease }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_seen_after_its_revoke_is_flagged() {
        let r = |present, read_at| AfterRevoke { key: "l/1".into(), lease: 7, revoked_at: 10, read_at, present };
        assert!(check(&[r(false, 11)], &[]).is_empty());
        assert_eq!(check(&[r(true, 11)], &[]), vec![LeaseAnomaly::Outlived(r(true, 11))]);
        assert_eq!(check(&[], &[("l/2".into(), 8)]), vec![LeaseAnomaly::Leftover { key: "l/2".into(), lease: 8 }]);
    }
}
