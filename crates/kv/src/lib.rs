//! The MVCC state machine of quorate: etcd's data model (one global revision, per-key
//! create/mod revision and version, leases, history until compaction) as pure logic.
//!
//! This crate owns every rule about what a command does to the replicated state. It takes
//! revisions, terms and log positions as arguments and returns outcomes; it never reads a
//! clock, never logs, never does IO, and never depends on a runtime. Everything here is
//! deterministic: every member applying the same commands in the same order reaches the same
//! state, which is what `hash` checks.

pub mod auth;
mod error;
mod lease;
mod store;
mod txn_check;
mod types;

pub use error::KvError;
pub use lease::{Lease, LeaseCheckpoint, LEASE_MAX_TTL_S};
pub use store::{
    read_only_txn_ranges, read_only_txn_response, txn_writes, Applied, EventScan, HashScan, RangeScan, SnapshotScan,
    Store, StoreSnapshot, READ_PAGE_KEYS,
};
pub use txn_check::{check_txn_request, check_txn_writes, TXN_DEPTH_MAX};
pub use types::*;
