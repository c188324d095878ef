//! What every log line about consensus carries: which member wrote it (name and id) and where
//! that member stands in the log (term, commit index, applied index). The member keeps it
//! current from Raft's metrics (`follow`); the log formatter (the binary's `logging`) reads it
//! for every event from openraft or quorate_consensus.
//!
//! Atomics, read without a lock: a formatter must never wait on the member (an event can be
//! written from inside Raft), and a line is allowed to pair a new term with an index from just
//! before it. The values are the ones Raft had last published when the line was written: a
//! line openraft writes while it moves to a new term (a vote request) can still show the old
//! term; the term is current at once after Raft publishes it, the indexes within
//! `INDEX_REFRESH`. One member per process (the `quorate server` binary): the first name set
//! stays.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Duration;

/// How stale the indexes on a log line may be (they move with every write).
pub const INDEX_REFRESH: Duration = Duration::from_millis(10);

static NAME: OnceLock<String> = OnceLock::new();
static ID: AtomicU64 = AtomicU64::new(0);
static TERM: AtomicU64 = AtomicU64::new(0);
static COMMIT_INDEX: AtomicU64 = AtomicU64::new(0);
static APPLIED_INDEX: AtomicU64 = AtomicU64::new(0);

/// This member and its place in the log, as a log line shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsensusContext {
    pub member: &'static str,
    pub member_id: u64,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
}

/// The context for a log line now; `None` before the member has its name and id (nothing
/// about consensus is logged before then).
pub fn current() -> Option<ConsensusContext> {
    let member = NAME.get()?;
    Some(ConsensusContext {
        member,
        member_id: ID.load(Relaxed),
        term: TERM.load(Relaxed),
        commit_index: COMMIT_INDEX.load(Relaxed),
        applied_index: APPLIED_INDEX.load(Relaxed),
    })
}

/// Whether events from `target` are about consensus (and so carry the context).
pub fn is_consensus_target(target: &str) -> bool {
    ["openraft", "quorate_consensus"]
        .iter()
        .any(|c| target.strip_prefix(c).is_some_and(|rest| rest.is_empty() || rest.starts_with("::")))
}

pub(crate) fn set_member(name: &str, id: u64) {
    let _ = NAME.set(name.to_string());
    ID.store(id, Relaxed);
}

/// Keep the context current until Raft stops.
pub(crate) async fn follow(member: quorate_consensus::Member) {
    member
        .follow_status(INDEX_REFRESH, |st| {
            TERM.store(st.term, Relaxed);
            COMMIT_INDEX.store(st.commit_index, Relaxed);
            APPLIED_INDEX.store(st.applied_index, Relaxed);
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::is_consensus_target;

    #[test]
    fn consensus_targets_are_openraft_and_quorate_consensus_with_their_modules() {
        let table = [
            ("openraft", true),
            ("openraft::core::raft_core", true),
            ("quorate_consensus", true),
            ("quorate_consensus::network", true),
            ("quorate_consensus_extra", false),
            ("openraftish", false),
            ("quorate_server", false),
            ("quorate_registry::brake", false),
        ];
        for (target, want) in table {
            assert_eq!(is_consensus_target(target), want, "{target}");
        }
    }
}
