//! The openraft type configuration and the data carried in log entries and responses.

use std::fmt;

use quorate_kv::{Command, CommandResponse, KvError};
use serde::{Deserialize, Serialize};

/// A member as the Raft membership records it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberNode {
    pub name: String,
    /// Where other members reach this one's peer (Raft) service, e.g. `http://127.0.0.1:2380`.
    pub peer_url: String,
    /// Added as a voter: the leader promotes this learner once it has caught up (ADR 0004).
    pub promote: bool,
}

impl fmt::Display for MemberNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.peer_url)
    }
}

/// The payload of one application log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Kv(Command),
    /// A member announces how clients reach it (etcd publishes member attributes the same way).
    PublishMember {
        id: u64,
        name: String,
        client_urls: Vec<String>,
    },
    /// An operator isolated a member (`quorate ctl isolate`, ADR 0009): it serves no client,
    /// and the leader demotes it to a learner that keeps replicating.
    Isolate {
        id: u64,
        isolation: crate::isolation::Isolation,
    },
    /// The member's isolation is lifted; the leader promotes it again once it has caught up.
    Unisolate {
        id: u64,
    },
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Kv(c) => write!(f, "{}", command_name(c)),
            Request::PublishMember { id, name, .. } => write!(f, "publish-member({id:x}, {name})"),
            Request::Isolate { id, .. } => write!(f, "isolate({id:x})"),
            Request::Unisolate { id } => write!(f, "unisolate({id:x})"),
        }
    }
}

fn command_name(c: &Command) -> &'static str {
    match c {
        Command::Put(_) => "put",
        Command::DeleteRange(_) => "delete-range",
        Command::Txn(_) => "txn",
        Command::Compact { .. } => "compact",
        Command::LeaseGrant { .. } => "lease-grant",
        Command::LeaseRevoke { .. } => "lease-revoke",
        Command::LeaseExpire { .. } => "lease-expire",
        Command::LeaseCheckpoint(_) => "lease-checkpoint",
        Command::LeaseRenew { .. } => "lease-renew",
        Command::LeaseExpireAt { .. } => "lease-expire-at",
        Command::Alarm { .. } => "alarm",
        Command::Fenced { .. } => "fenced",
        Command::TermFenced { .. } => "term-fenced",
        Command::Auth(_) => "auth",
        Command::Authorized { cmd, .. } => command_name(cmd),
    }
}

/// What applying one entry produced, returned to the proposer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The MVCC revision after this entry.
    pub revision: i64,
    /// What the KV command produced; `None` for entries that carry no KV command.
    pub result: Option<Result<CommandResponse, KvError>>,
}

impl Response {
    pub(crate) fn empty(revision: i64) -> Self {
        Response { revision, result: None }
    }

    /// The KV command's result. Only called for responses to `Request::Kv`, which always
    /// have one: anything else is a bug.
    pub fn kv_result(self) -> Result<CommandResponse, KvError> {
        self.result.expect("a KV command's entry yields a KV result")
    }
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = MemberNode,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig, crate::state_machine::StateMachine>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
