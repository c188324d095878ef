//! The one place where quorate's errors become gRPC statuses, with etcd's codes and exact
//! messages (clients match on the message text).

use quorate_consensus::ConsensusError;
use quorate_kv::auth::AuthError;
use quorate_kv::KvError;
use tonic::{Code, Status};

pub const ERR_REQUEST_TOO_LARGE: &str = "etcdserver: request is too large";
pub const ERR_PERMISSION_DENIED: &str = "etcdserver: permission denied";
pub const ERR_BAD_FENCE: &str = "quorate: malformed quorate-fence header: expected <key>@<revision>";

pub fn kv_status(e: KvError) -> Status {
    let (code, msg) = match e {
        // The one message that names its key and token.
        KvError::FenceRejected { .. } => return Status::failed_precondition(format!("quorate: {e}")),
        KvError::FenceNotAllowed => (Code::InvalidArgument, "quorate: only put, delete and txn can carry a fence"),
        KvError::Compacted { .. } => (Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted"),
        KvError::FutureRevision { .. } => {
            (Code::OutOfRange, "etcdserver: mvcc: required revision is a future revision")
        }
        KvError::LeaseNotFound { .. } => (Code::NotFound, "etcdserver: requested lease not found"),
        KvError::LeaseExists { .. } => (Code::FailedPrecondition, "etcdserver: lease already exists"),
        KvError::LeaseTtlTooLarge { .. } => (Code::OutOfRange, "etcdserver: too large lease TTL"),
        KvError::NoSpace => (Code::ResourceExhausted, "etcdserver: mvcc: database space exceeded"),
        KvError::EmptyKey => (Code::InvalidArgument, "etcdserver: key is not provided"),
        KvError::DuplicateKey => (Code::InvalidArgument, "etcdserver: duplicate key given in txn request"),
        KvError::TooManyOps { .. } => (Code::InvalidArgument, "etcdserver: too many operations in txn request"),
        KvError::KeyNotFound => (Code::InvalidArgument, "etcdserver: key not found"),
        KvError::ValueProvided => (Code::InvalidArgument, "etcdserver: value is provided"),
        KvError::LeaseProvided => (Code::InvalidArgument, "etcdserver: lease is provided"),
        KvError::Auth(e) => return auth_status(e),
    };
    Status::new(code, msg)
}

/// etcd's auth errors with etcd's codes (`rpctypes`); clients match on the message.
pub fn auth_status(e: AuthError) -> Status {
    let code = match e {
        AuthError::UserEmpty
        | AuthError::RoleEmpty
        | AuthError::AuthFailed
        | AuthError::PermissionNotGiven
        | AuthError::InvalidAuthMgmt
        | AuthError::AuthOldRevision => Code::InvalidArgument,
        AuthError::PermissionDenied => Code::PermissionDenied,
        AuthError::InvalidAuthToken => Code::Unauthenticated,
        AuthError::RootUserNotExist
        | AuthError::RootRoleNotExist
        | AuthError::UserAlreadyExist
        | AuthError::UserNotFound
        | AuthError::RoleAlreadyExist
        | AuthError::RoleNotFound
        | AuthError::RoleNotGranted
        | AuthError::PermissionNotGranted
        | AuthError::AuthNotEnabled => Code::FailedPrecondition,
    };
    Status::new(code, e.to_string())
}

/// A KV write into the registry's records (issue 11): etcd's permission-denied code and
/// message, then what to use instead. Reads and watches of the registry stay open.
pub fn registry_read_only(refused: &quorate_registry::Refused) -> Status {
    let what = if refused.range_end.is_empty() {
        format!("key {:?}", String::from_utf8_lossy(&refused.key))
    } else {
        format!(
            "range [{:?}, {:?})",
            String::from_utf8_lossy(&refused.key),
            String::from_utf8_lossy(&refused.range_end)
        )
    };
    Status::permission_denied(format!(
        "{ERR_PERMISSION_DENIED}: {what} touches the registry's records under {}, which are read-only over \
         the KV API; register, deregister and update instances through the registry's HTTP API \
         (/api/v1/ns/<namespace>/services/<service>/instances/<id>, Consul /v1/agent/service/..., \
         Eureka /eureka/apps/...)",
        quorate_registry::REGISTRY_PREFIX
    ))
}

pub fn consensus_status(e: ConsensusError) -> Status {
    match e {
        ConsensusError::NoLeader | ConsensusError::NotLeader => Status::unavailable("etcdserver: no leader"),
        ConsensusError::BadTransferee => Status::failed_precondition("etcdserver: bad leader transferee"),
        ConsensusError::Timeout => Status::unavailable("etcdserver: request timed out"),
        ConsensusError::Stopped(_) => Status::unavailable("etcdserver: server stopped"),
        ConsensusError::Unavailable(_) => Status::unavailable("etcdserver: leader changed"),
        ConsensusError::Membership(m) => Status::failed_precondition(format!("etcdserver: {m}")),
        // etcd queues membership changes in its log and never says this; ours waited 5 s first.
        ConsensusError::ChangeInProgress => Status::unavailable("etcdserver: request timed out"),
        ConsensusError::MemberNotFound => Status::not_found("etcdserver: member not found"),
        ConsensusError::PeerUrlExists => Status::failed_precondition("etcdserver: Peer URLs already exists"),
        ConsensusError::BadPeerUrls => Status::invalid_argument("etcdserver: given member URLs are invalid"),
        ConsensusError::MemberNotLearner => {
            Status::failed_precondition("etcdserver: can only promote a learner member")
        }
        ConsensusError::LearnerNotReady => {
            Status::failed_precondition("etcdserver: can only promote a learner member which is in sync with leader")
        }
        ConsensusError::Learner => Status::unavailable("etcdserver: rpc not supported for learner"),
        // Nothing was promised; etcd's clients retry "request timed out" at once.
        ConsensusError::LeaseAnswerLate => Status::unavailable("etcdserver: request timed out"),
        // Unavailable, so that a client with other endpoints tries them.
        ConsensusError::Removed => {
            Status::unavailable("etcdserver: the member has been permanently removed from the cluster")
        }
        ConsensusError::Isolated(why) | ConsensusError::Fenced(why) => {
            Status::unavailable(format!("etcdserver: {why}"))
        }
    }
}
