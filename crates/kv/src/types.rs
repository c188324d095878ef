//! Plain data: the shapes of etcd's KV, Txn and Lease requests as the state machine sees them.
//! The gRPC layer converts its protobuf messages into these; nothing here knows about prost.

use serde::{Deserialize, Serialize};

pub type Key = Vec<u8>;

/// Most operations allowed in one Txn (etcd's `--max-txn-ops` default). The API enforces it
/// before proposing (`check_txn_request`); apply does not, so members never disagree over a flag.
pub const TXN_OPS_MAX: usize = 128;

/// A key's value at one revision, exactly etcd's `mvccpb.KeyValue`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: Key,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub value: Vec<u8>,
    pub lease: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change, as a watcher sees it. For a delete, `kv` carries only the key and the
/// revision of the deletion (`mod_revision`), as etcd does. Values are shared with the store,
/// not copied: an event costs no value copy until it is sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: std::sync::Arc<KeyValue>,
    pub prev_kv: Option<std::sync::Arc<KeyValue>>,
}

impl Event {
    pub fn revision(&self) -> i64 {
        self.kv.mod_revision
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SortOrder {
    #[default]
    None,
    Ascend,
    Descend,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SortTarget {
    #[default]
    Key,
    Version,
    Create,
    Mod,
    Value,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    pub key: Key,
    pub range_end: Key,
    pub limit: i64,
    pub revision: i64,
    pub sort_order: SortOrder,
    pub sort_target: SortTarget,
    pub keys_only: bool,
    pub count_only: bool,
    pub min_mod_revision: i64,
    pub max_mod_revision: i64,
    pub min_create_revision: i64,
    pub max_create_revision: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResponse {
    pub kvs: Vec<KeyValue>,
    pub more: bool,
    pub count: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutRequest {
    pub key: Key,
    pub value: Vec<u8>,
    pub lease: i64,
    pub prev_kv: bool,
    pub ignore_value: bool,
    pub ignore_lease: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutResponse {
    pub prev_kv: Option<KeyValue>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRangeRequest {
    pub key: Key,
    pub range_end: Key,
    pub prev_kv: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRangeResponse {
    pub deleted: i64,
    pub prev_kvs: Vec<KeyValue>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareResult {
    Equal,
    Greater,
    Less,
    NotEqual,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    Version(i64),
    Create(i64),
    Mod(i64),
    Value(Vec<u8>),
    Lease(i64),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    pub result: CompareResult,
    pub target: CompareTarget,
    pub key: Key,
    pub range_end: Key,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestOp {
    Range(RangeRequest),
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseOp {
    Range(RangeResponse),
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRequest {
    pub compare: Vec<Compare>,
    pub success: Vec<RequestOp>,
    pub failure: Vec<RequestOp>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResponse {
    pub succeeded: bool,
    pub responses: Vec<ResponseOp>,
}

/// A change to the replicated state: the payload of one Raft log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact {
        revision: i64,
        physical: bool,
    },
    /// `id == 0` asks the state machine to choose an id.
    LeaseGrant {
        id: i64,
        ttl_s: i64,
    },
    LeaseRevoke {
        id: i64,
    },
    /// Leases the leader of `term` found expired. Applied only by an entry of that same term,
    /// so a deposed leader's decision can never delete keys.
    LeaseExpire {
        ids: Vec<i64>,
        term: u64,
    },
    /// Remaining TTLs of leases renewed since their last checkpoint, so that a new leader
    /// neither resets nor shortens them.
    LeaseCheckpoint(Vec<crate::LeaseCheckpoint>),
    /// Raise or clear an alarm for a member (etcd's Maintenance.Alarm).
    Alarm {
        activate: bool,
        member: u64,
        alarm: AlarmType,
    },
    /// A side effect decided by the leader of `term` (registry eviction, ADR 0005): applied
    /// only by an entry of that same term, so a deposed leader's decision is a no-op.
    TermFenced {
        term: u64,
        cmd: Box<Command>,
    },
    /// A Put, DeleteRange or Txn applied only while `fence` still holds (ADR 0004).
    Fenced {
        fence: Fence,
        cmd: Box<Command>,
    },
    /// Leases a keep-alive renewed, logged before the keep-alive is answered (ADR 0008): every
    /// member restarts each one's full TTL from when it applies this entry, so no leader that
    /// follows can know an older deadline than a client was told.
    LeaseRenew {
        ids: Vec<i64>,
    },
    /// Leases the leader of `term` found expired, each named with the decision it judged (the
    /// lease's `set_at`: its grant or last renewal). Applied only by an entry of that same term,
    /// and only to a lease still at that decision: a lease renewed or re-granted with the same
    /// id in the meantime is not expired by a verdict on its predecessor.
    LeaseExpireAt {
        leases: Vec<(i64, u64)>,
        term: u64,
    },
    /// A change to users, roles or whether auth is on (etcd's auth API, ADR 0010).
    Auth(crate::auth::AuthCommand),
    /// A client's command, with the user the member that took it authenticated (`None`:
    /// nobody). Checked again at apply against the auth store as it is then, so that no write
    /// is applied under a permission revoked (or with auth enabled) before it in the log.
    Authorized {
        user: Option<String>,
        cmd: Box<Command>,
    },
}

/// A guard on a write: the lock or election key `key` must exist with
/// `create_revision == revision` (the fencing token) when the write is applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    pub key: Vec<u8>,
    pub revision: i64,
}

impl Command {
    /// The command a client's `Authorized` wrapper carries (the command itself otherwise).
    pub fn unwrapped(&self) -> &Command {
        match self {
            Command::Authorized { cmd, .. } => cmd.unwrapped(),
            other => other,
        }
    }

    /// This command as `user`'s (`None`: nobody authenticated), to be checked again at apply.
    pub fn authorized(self, user: Option<String>) -> Command {
        Command::Authorized { user, cmd: Box::new(self) }
    }

    /// This command, guarded by `fence` when there is one.
    pub fn fenced(self, fence: Option<Fence>) -> Command {
        match fence {
            Some(fence) => Command::Fenced { fence, cmd: Box::new(self) },
            None => self,
        }
    }
}

impl Fence {
    /// Parse `<key>@<revision>` (the `quorate-fence` header). The key may itself contain `@`:
    /// the token is after the last one.
    pub fn parse(s: &str) -> Option<Fence> {
        let (key, rev) = s.rsplit_once('@')?;
        let revision: i64 = rev.trim().parse().ok()?;
        (!key.is_empty() && revision > 0).then(|| Fence { key: key.as_bytes().to_vec(), revision })
    }
}

impl std::fmt::Display for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", String::from_utf8_lossy(&self.key), self.revision)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AlarmType {
    /// The keyspace outgrew `--quota-backend-bytes`: writes that add data are refused.
    NoSpace,
    Corrupt,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResponse {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compact,
    LeaseGrant {
        id: i64,
        ttl_s: i64,
    },
    LeaseRevoke,
    /// Which of the requested leases were expired; empty when the entry's term was stale.
    LeaseExpire {
        expired: Vec<i64>,
        stale_term: bool,
    },
    LeaseCheckpoint,
    /// A `TermFenced` command from a stale term: nothing was applied.
    StaleTerm,
    /// Alarms active after the command.
    Alarm {
        alarms: Vec<(u64, AlarmType)>,
    },
    /// Which of the leases named in a `LeaseRenew` existed and were renewed.
    LeaseRenew {
        renewed: Vec<i64>,
    },
    /// An auth change applied; the auth revision after it.
    Auth {
        revision: u64,
    },
}

/// Where an entry sits in the Raft log: the only non-data input to `apply`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogPosition {
    pub index: u64,
    pub term: u64,
}

/// The key range `[key, range_end)` with etcd's conventions: an empty end is the single key,
/// an end of `"\0"` is every key `>= key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyRange<'a> {
    Single(&'a [u8]),
    FromKey(&'a [u8]),
    Between(&'a [u8], &'a [u8]),
}

impl<'a> KeyRange<'a> {
    pub fn new(key: &'a [u8], range_end: &'a [u8]) -> Self {
        if range_end.is_empty() {
            KeyRange::Single(key)
        } else if range_end == [0] {
            KeyRange::FromKey(key)
        } else {
            KeyRange::Between(key, range_end)
        }
    }

    pub fn contains(&self, k: &[u8]) -> bool {
        match self {
            KeyRange::Single(key) => k == *key,
            KeyRange::FromKey(key) => k >= *key,
            KeyRange::Between(start, end) => k >= *start && k < *end,
        }
    }

    /// Whether two ranges share a key (used for etcd's duplicate-key check in a Txn).
    pub fn overlaps(&self, other: &KeyRange<'_>) -> bool {
        let (a0, a1) = self.bounds();
        let (b0, b1) = other.bounds();
        let a_before_b = match a1 {
            Some(end) => end <= b0,
            None => false,
        };
        let b_before_a = match b1 {
            Some(end) => end <= a0,
            None => false,
        };
        !a_before_b && !b_before_a
    }

    /// Half-open bounds as an owned start and an optional exclusive end.
    fn bounds(&self) -> (Vec<u8>, Option<Vec<u8>>) {
        match self {
            KeyRange::Single(k) => {
                let mut end = k.to_vec();
                end.push(0);
                (k.to_vec(), Some(end))
            }
            KeyRange::FromKey(k) => (k.to_vec(), None),
            KeyRange::Between(s, e) => (s.to_vec(), Some(e.to_vec())),
        }
    }
}

/// The range end that selects every key with `prefix` (etcd's `GetPrefixRangeEnd`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}
