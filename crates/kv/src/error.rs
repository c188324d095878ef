use thiserror::Error;

/// Errors a command or read can return. Each maps to one etcd gRPC status in `api-grpc`.
#[derive(Debug, Clone, PartialEq, Eq, Error, serde::Serialize, serde::Deserialize)]
pub enum KvError {
    #[error("mvcc: required revision has been compacted")]
    Compacted { requested: i64, compacted: i64 },
    #[error("mvcc: required revision is a future revision")]
    FutureRevision { requested: i64, current: i64 },
    #[error("requested lease not found")]
    LeaseNotFound { id: i64 },
    #[error("lease already exists")]
    LeaseExists { id: i64 },
    #[error("too large lease TTL")]
    LeaseTtlTooLarge { ttl_s: i64 },
    #[error("mvcc: database space exceeded")]
    NoSpace,
    #[error("key is not provided")]
    EmptyKey,
    #[error("duplicate key given in txn request")]
    DuplicateKey,
    #[error("too many operations in txn request")]
    TooManyOps { ops: usize, max: usize },
    #[error("key not found")]
    KeyNotFound,
    #[error("value is provided")]
    ValueProvided,
    #[error("lease is provided")]
    LeaseProvided,
    /// A fenced write whose guard key is gone or was re-created: its holder lost the lock.
    #[error("fenced write rejected: {key} is not held at revision {revision}")]
    FenceRejected { key: String, revision: i64 },
    /// Only Put, DeleteRange and Txn can be fenced.
    #[error("only put, delete and txn can carry a fence")]
    FenceNotAllowed,
    /// Refused by the auth store (etcd's auth errors, with their messages).
    #[error("{0}")]
    Auth(#[from] crate::auth::AuthError),
}
