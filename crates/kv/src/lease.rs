//! Leases as replicated data. When a lease expires is not decided here: the leader decides
//! from its monotonic clock and proposes `LeaseExpire`. This module only keeps what every
//! member must agree on: which leases exist, their granted TTL, the keys bound to them and
//! the remaining TTL at the last checkpoint.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::Key;

/// etcd's upper bound on a lease TTL (`MaxLeaseTTL`), in seconds.
pub const LEASE_MAX_TTL_S: i64 = 9_000_000_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: i64,
    /// TTL granted, in seconds.
    pub ttl_s: i64,
    /// Remaining TTL at the last checkpoint, in milliseconds; `None` until first checkpointed,
    /// which means a full TTL from when the grant was applied.
    pub remaining_ms: Option<i64>,
    /// Log index of the grant or of the last checkpoint: which decision `remaining_ms` is.
    /// Two members holding the same `set_at` know the same deadline, however differently
    /// they timed it (see the lease clock's tightening after an election).
    pub set_at: u64,
    pub keys: BTreeSet<Key>,
}

impl Lease {
    /// Milliseconds a new leader should count from the moment it applied the last grant or
    /// checkpoint of this lease.
    pub fn remaining_at_checkpoint_ms(&self) -> i64 {
        self.remaining_ms.unwrap_or(self.ttl_s.saturating_mul(1000))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseCheckpoint {
    pub id: i64,
    pub remaining_ms: i64,
}
