use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why a request could not be served by consensus. Mapped to protocol errors at each API edge.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum ConsensusError {
    /// No leader is known, or the leader cannot reach a majority.
    #[error("no leader")]
    NoLeader,
    /// This member is not the leader and the request may not be forwarded further.
    #[error("not leader")]
    NotLeader,
    #[error("request timed out")]
    Timeout,
    /// The member is shutting down or its Raft core has stopped.
    #[error("member stopped: {0}")]
    Stopped(String),
    /// The leader could not be reached or answered with a transport error.
    #[error("leader unreachable: {0}")]
    Unavailable(String),
    /// A leadership transfer named a member that cannot take over (unknown, a learner, or not
    /// caught up).
    #[error("bad leader transferee")]
    BadTransferee,
    /// A membership change was refused.
    #[error("{0}")]
    Membership(String),
    /// Another membership change is still in flight (changes go one at a time).
    #[error("a membership change is in progress")]
    ChangeInProgress,
    #[error("member not found")]
    MemberNotFound,
    #[error("peer URLs already exist")]
    PeerUrlExists,
    #[error("given member URLs are invalid")]
    BadPeerUrls,
    #[error("can only promote a learner member")]
    MemberNotLearner,
    #[error("can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    /// A keep-alive's renewal committed too late for its answer to be a safe promise
    /// (ADR 0008); nothing was promised, the client may retry at once.
    #[error("lease renewal committed too late to be promised; retry")]
    LeaseAnswerLate,
    /// A learner serves only serializable reads.
    #[error("rpc not supported for learner")]
    Learner,
    /// This member has applied (or been told by the leader of) its own removal: it serves
    /// nothing more and exits.
    #[error("the member has been permanently removed from the cluster")]
    Removed,
    /// An operator isolated this member (`quorate ctl isolate`): it serves no client request.
    /// The text says since when, by whom and why.
    #[error("{0}")]
    Isolated(String),
    /// A recovery dropped this member (`crate::incarnation`): it serves nothing until its data
    /// directory is wiped and it is added again. The text says so.
    #[error("{0}")]
    Fenced(String),
}
