//! The etcd v3 gRPC API over quorate's replicated state: KV, Watch, Lease, Cluster and
//! Maintenance, answering real etcd clients (etcdctl, Go clientv3, Python and Rust clients).
//!
//! This crate translates and checks requests; every rule about what a command does lives in
//! `quorate-kv`, and every decision about ordering and leadership in `quorate-consensus`.

mod access;
mod auth_service;
mod authority;
pub mod codec;
mod convert;
mod kv_service;
pub mod lane;
mod lease_service;
mod lock_service;
mod maintenance_service;
mod paged;
mod status;
mod watch_service;

pub mod pb {
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod authpb {
        tonic::include_proto!("authpb");
    }
    pub mod v3lockpb {
        tonic::include_proto!("v3lockpb");
    }
    pub mod v3electionpb {
        tonic::include_proto!("v3electionpb");
    }
}

use std::path::PathBuf;
use std::sync::Arc;

use pb::etcdserverpb as etcd;
use quorate_consensus::Member;

pub use access::TOKEN_METADATA;
pub use authority::AuthorityFix;
pub use kv_service::FENCE_HEADER;
pub use maintenance_service::HTTP_ADDR_METADATA;
pub use status::{auth_status, consensus_status, kv_status};

/// Accepted client connections, each wrapped so etcd Go clients' `:authority` is tolerated.
pub fn incoming(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<AuthorityFix<tokio::net::TcpStream>>> {
    use futures::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        quorate_tls::keep_alive(&conn);
        Ok(AuthorityFix::new(conn))
    })
}

/// `incoming`, over TLS: connections whose handshake `acceptor` completed (each in a task of
/// its own, so a slow client holds up no other).
pub fn incoming_tls(
    listener: tokio::net::TcpListener,
    acceptor: std::sync::Arc<quorate_tls::Acceptor>,
) -> impl futures::Stream<Item = std::io::Result<AuthorityFix<quorate_tls::ServerConn>>> {
    use futures::StreamExt;
    tokio_stream::wrappers::ReceiverStream::new(acceptor.serve(listener)).map(|conn| Ok(AuthorityFix::new(conn)))
}

/// Largest request proposed by default (etcd's `--max-request-bytes` default), in bytes.
pub const REQUEST_BYTES_MAX: usize = 1536 * 1024;
/// How far gRPC's own message limit sits above `--max-request-bytes` (etcd's
/// `grpcOverheadBytes`): a request between the two gets etcd's `request is too large`, a larger
/// one is refused by gRPC before it is decoded (tonic says `OutOfRange` where grpc-go says
/// `ResourceExhausted`).
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// The etcd API version this server speaks, as `Status` reports it.
pub const ETCD_API_VERSION: &str = "3.4.0";

/// What every service needs: the member, and facts for response headers.
pub struct Ctx {
    pub member: Member,
    pub cluster_id: u64,
    pub data_dir: PathBuf,
    /// Smallest lease TTL granted, in seconds (etcd: 1.5 election timeouts, rounded up).
    pub min_lease_ttl_s: i64,
    /// DRILL ONLY (a planted bug): serve linearizable KV reads from local state.
    pub unsafe_local_reads: bool,
    /// etcd's `--max-txn-ops`: most compares, and most ops per list, in a Txn (nested Txns
    /// spend from the same budget).
    pub max_txn_ops: usize,
    /// etcd's `--max-request-bytes`: largest write request proposed.
    pub max_request_bytes: usize,
    /// `--max-watchers-per-stream`: watchers one Watch stream may hold at once.
    pub max_watchers_per_stream: usize,
    /// This member's `--listen-http` address; Maintenance.Status names it in the response
    /// metadata `quorate-http-addr`, so `quorate ctl` finds `/v1/member/status` from a client
    /// URL alone.
    pub http_addr: Option<String>,
    /// How long a token from `Authenticate` is good for (etcd's `--auth-token-ttl`).
    pub auth_token_ttl: std::time::Duration,
    /// Under `--client-cert-auth`, a request without a token is the user its certificate's
    /// common name names (etcd's rule).
    pub cn_is_user: bool,
}

impl Ctx {
    /// A response header at the member's current revision.
    pub fn header(&self) -> etcd::ResponseHeader {
        let rev = self.member.read(|s| s.revision());
        self.header_at(rev)
    }

    /// etcd's learners serve serializable reads only.
    pub fn refuse_learner(&self) -> Result<(), tonic::Status> {
        if self.member.is_learner() {
            return Err(consensus_status(quorate_consensus::ConsensusError::Learner));
        }
        Ok(())
    }

    pub fn header_at(&self, revision: i64) -> etcd::ResponseHeader {
        etcd::ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member.id(),
            revision,
            raft_term: self.member.term(),
        }
    }
}

/// All etcd services, ready to be added to a tonic server.
pub struct EtcdServices {
    pub kv: etcd::kv_server::KvServer<kv_service::KvService>,
    pub watch: etcd::watch_server::WatchServer<watch_service::WatchService>,
    pub lease: etcd::lease_server::LeaseServer<lease_service::LeaseService>,
    pub cluster: etcd::cluster_server::ClusterServer<maintenance_service::ClusterService>,
    pub maintenance: etcd::maintenance_server::MaintenanceServer<maintenance_service::MaintenanceService>,
    pub lock: pb::v3lockpb::lock_server::LockServer<lock_service::LockService>,
    pub election: pb::v3electionpb::election_server::ElectionServer<lock_service::ElectionService>,
    pub auth: etcd::auth_server::AuthServer<auth_service::AuthService>,
}

impl EtcdServices {
    pub fn new(ctx: Ctx) -> Self {
        let ctx = Arc::new(ctx);
        let decoding_max = ctx.max_request_bytes.saturating_add(GRPC_OVERHEAD_BYTES);
        EtcdServices {
            kv: etcd::kv_server::KvServer::new(kv_service::KvService { ctx: ctx.clone() })
                .max_decoding_message_size(decoding_max)
                .max_encoding_message_size(usize::MAX),
            watch: etcd::watch_server::WatchServer::new(watch_service::WatchService { ctx: ctx.clone() })
                .max_encoding_message_size(usize::MAX),
            lease: etcd::lease_server::LeaseServer::new(lease_service::LeaseService { ctx: ctx.clone() }),
            cluster: etcd::cluster_server::ClusterServer::new(maintenance_service::ClusterService { ctx: ctx.clone() }),
            maintenance: etcd::maintenance_server::MaintenanceServer::new(maintenance_service::MaintenanceService {
                ctx: ctx.clone(),
            }),
            lock: lock_service::lock_server(ctx.clone()).max_decoding_message_size(decoding_max),
            election: lock_service::election_server(ctx.clone()).max_decoding_message_size(decoding_max),
            auth: etcd::auth_server::AuthServer::new(auth_service::AuthService { ctx }),
        }
    }
}
