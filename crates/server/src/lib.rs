//! A quorate member: configuration, listeners, the HTTP endpoints (`/health`, `/ready`,
//! `/version`, `/metrics`) and shutdown. It wires the libraries together and owns no rules.

mod brake_state;
pub mod cidr;
mod client_port;
mod config;
pub mod conn_limit;
mod grpc_metrics;
mod http;
mod isolate;
pub mod log_context;
mod metrics;
mod pprof;
mod prober;
mod process_metrics;
pub mod rate_limit;
mod reaper;
mod recover;
mod registry_counts;
mod registry_view;
mod removed_gate;
mod repair;
mod timeline;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use quorate_api_grpc::{Ctx, EtcdServices};
use quorate_consensus::{Member, PEER_MESSAGE_BYTES_MAX};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::info;

pub use config::{
    parse_initial_cluster, url_to_addr, ClusterState, DrillFlags, PeerTls, RateLimitConfig, ServerConfig, TlsConfig,
};

/// Sockets the caller has bound, so tests can bind port 0.
pub struct Listeners {
    pub client: Vec<TcpListener>,
    pub peer: TcpListener,
    pub http: TcpListener,
    /// `--listen-metrics-urls`: `/metrics` and `/health` only.
    pub metrics: Vec<TcpListener>,
}

impl Listeners {
    pub async fn bind(cfg: &ServerConfig) -> anyhow::Result<Self> {
        let mut client = Vec::new();
        for addr in &cfg.listen_client_addrs {
            client.push(TcpListener::bind(addr).await.with_context(|| format!("bind client address {addr}"))?);
        }
        let peer = TcpListener::bind(cfg.listen_peer_addr)
            .await
            .with_context(|| format!("bind peer address {}", cfg.listen_peer_addr))?;
        let http = TcpListener::bind(cfg.listen_http_addr)
            .await
            .with_context(|| format!("bind http address {}", cfg.listen_http_addr))?;
        let mut metrics = Vec::new();
        for addr in &cfg.listen_metrics_addrs {
            metrics.push(TcpListener::bind(addr).await.with_context(|| format!("bind metrics address {addr}"))?);
        }
        Ok(Listeners { client, peer, http, metrics })
    }
}

/// Run a member until `shutdown` resolves.
pub async fn run(cfg: ServerConfig, listeners: Listeners, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut member_cfg = cfg.member_config()?;
    // Certificates are read now: a missing or unusable file stops the start, naming its flag.
    let acceptor = |s: &Option<quorate_tls::ServerSettings>| s.clone().map(quorate_tls::Acceptor::new).transpose();
    let client_tls = acceptor(&cfg.tls.client)?;
    let http_tls = acceptor(&cfg.tls.http)?;
    let peer_tls = acceptor(&cfg.tls.peer.as_ref().map(|p| p.server.clone()))?;
    if let Some(peer) = &cfg.tls.peer {
        quorate_consensus::set_peer_tls(
            quorate_tls::Connector::new(peer.client.clone())?,
            peer.server.client_cert_auth,
        );
    }
    (member_cfg.id, member_cfg.cluster_id, member_cfg.join_incarnation) =
        resolve_ids(&cfg, member_cfg.id, member_cfg.cluster_id).await?;
    log_context::set_member(&cfg.name, member_cfg.id);
    info!(
        name = %cfg.name,
        member = %format!("{:x}", member_cfg.id),
        data_dir = %cfg.data_dir.display(),
        peer = %cfg.advertise_peer_url,
        clients = %cfg.advertise_client_urls.join(","),
        "starting member"
    );
    let (member, peer_service) = Member::start(member_cfg).await.map_err(anyhow::Error::msg)?;
    tokio::spawn(log_context::follow(member.clone()));

    let peer_router = tonic::transport::Server::builder().add_service(
        quorate_consensus::pb::peer_server::PeerServer::new(peer_service)
            .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX),
    );
    // Raft messages are small and latency-bound: no Nagle on peer connections. Over TLS, a
    // connection is served only once its handshake (and certificate) passed.
    let peer_task = match peer_tls {
        Some(tls) => {
            let incoming =
                tokio_stream::wrappers::ReceiverStream::new(tls.serve(listeners.peer)).map(Ok::<_, std::io::Error>);
            tokio::spawn(peer_router.serve_with_incoming(incoming))
        }
        None => {
            let incoming = TcpListenerStream::new(listeners.peer).map(|conn| {
                let conn = conn?;
                conn.set_nodelay(true)?;
                Ok::<_, std::io::Error>(conn)
            });
            tokio::spawn(peer_router.serve_with_incoming(incoming))
        }
    };

    info!("waiting for the cluster to record this member's client URLs");
    tokio::select! {
        _ = member.wait_published() => {}
        _ = &mut shutdown => {
            member.shutdown().await;
            peer_task.abort();
            return Ok(());
        }
    }

    let ctx = Ctx {
        member: member.clone(),
        cluster_id: member.cluster_id(),
        data_dir: cfg.data_dir.clone(),
        min_lease_ttl_s: ((cfg.election_timeout_ms * 3 / 2) as i64 + 999) / 1000,
        unsafe_local_reads: cfg.drill.unsafe_local_reads,
        max_txn_ops: cfg.max_txn_ops,
        max_watchers_per_stream: cfg.max_watchers_per_stream,
        auth_token_ttl: cfg.auth_token_ttl,
        cn_is_user: cfg.tls.client.as_ref().is_some_and(|c| c.client_cert_auth),
        max_request_bytes: cfg.max_request_bytes,
        // What `Status` tells `quorate ctl` of the HTTP port (with its scheme when TLS).
        http_addr: Some(match cfg.tls.http {
            Some(_) => format!("https://{}", cfg.listen_http_addr),
            None => cfg.listen_http_addr.to_string(),
        }),
    };
    if cfg.drill.early_lease_expiry {
        quorate_consensus::plant_early_lease_expiry();
    }
    if cfg.drill.snapshot_chunk_bytes > 0 {
        quorate_consensus::set_snapshot_chunk_bytes(cfg.drill.snapshot_chunk_bytes);
    }
    if cfg.drill.unsafe_local_reads {
        tracing::warn!("DRILL ONLY: linearizable reads are served from local state; this member is unsafe");
    }
    let services = EtcdServices::new(ctx);
    let static_tokens = match &cfg.auth_static_tokens_file {
        Some(path) => Some(quorate_api_http::access::StaticTokens::load(path.clone()).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let http_auth = Arc::new(quorate_api_http::access::HttpAuth::new(member.clone(), static_tokens));
    if let Some(jwt) = quorate_tls::jwt::Jwt::from_flag(&cfg.auth_token).map_err(anyhow::Error::msg)? {
        info!(signs = jwt.signs(), "auth tokens are JWTs (--auth-token jwt)");
        quorate_tls::jwt::install(jwt);
        quorate_kv::auth::set_external_tokens(Box::new(JwtTokens));
    }
    let reaper_stats = Arc::new(reaper::ReaperStats::default());
    let registry_counts = Arc::new(registry_counts::RegistryCounts::default());
    member.set_apply_observer(registry_counts.clone());
    let metrics = Arc::new(metrics::Metrics::new(
        member.clone(),
        cfg.data_dir.clone(),
        cfg.quota_backend_bytes,
        reaper_stats.clone(),
        registry_counts.clone(),
    ));
    let profiling = Arc::new(pprof::Profiling::new(cfg.enable_pprof, &cfg.name));
    if cfg.enable_pprof {
        info!("CPU profiles served at /debug/pprof/profile (--enable-pprof)");
    }
    let mut client_tasks = Vec::new();
    let grpc_limits = Arc::new(rate_limit::RateLimits::new(&cfg.rate_limit));
    // One count for all the client URLs, one for the HTTP port.
    let client_conns = conn_limit::ConnLimit::new(cfg.max_connections_per_client, "client");
    for (i, l) in listeners.client.into_iter().enumerate() {
        // gRPC and, beside it on the same port, HTTP/1 `/metrics`, `/health` and (with
        // --enable-pprof) `/debug/pprof`, as etcd serves them on 2379.
        let routes = tonic::service::Routes::new(services.kv.clone())
            .add_service(services.watch.clone())
            .add_service(services.lease.clone())
            .add_service(services.cluster.clone())
            .add_service(services.maintenance.clone())
            .add_service(services.lock.clone())
            .add_service(services.election.clone())
            .add_service(services.auth.clone());
        // HTTP/1 is split off before gRPC's routes (`client_port`): outermost, so it is not
        // counted as gRPC either.
        // With auth on, profiles are root's; /metrics and /health stay open (as etcd's).
        let http1 = metrics::router(metrics.clone())
            .merge(pprof::router(profiling.clone()))
            .layer(axum::middleware::from_fn_with_state(http_auth.clone(), quorate_api_http::access::guard));
        let router = tonic::transport::Server::builder()
            .max_concurrent_streams(cfg.max_concurrent_streams)
            .accept_http1(true)
            .layer(client_port::Http1SplitLayer::new(
                http1,
                member.clone(),
                grpc_limits.clone(),
                cfg.tls.client.as_ref().is_some_and(|c| c.client_cert_auth),
            ))
            .layer(metrics.grpc.layer())
            .add_routes(routes);
        let tls = client_tls.clone().filter(|_| cfg.tls.client_https.get(i).copied().unwrap_or(false));
        let limit = client_conns.clone();
        client_tasks.push(match tls {
            Some(tls) => {
                let incoming = conn_limit::admit_all(quorate_api_grpc::incoming_tls(l, tls), limit);
                tokio::spawn(router.serve_with_incoming(incoming))
            }
            None => {
                let incoming = conn_limit::admit_all(quorate_api_grpc::incoming(l), limit);
                tokio::spawn(router.serve_with_incoming(incoming))
            }
        });
    }
    for l in listeners.metrics {
        let app = metrics::router(metrics.clone());
        client_tasks.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(l, app).await {
                tracing::error!(error = %e, "metrics listener stopped");
            }
            Ok(())
        }));
    }

    tokio::spawn(watch_quota(member.clone(), cfg.quota_backend_bytes));
    cidr::set_allowed(cfg.check_allowed_cidrs.clone());
    member.set_app_handler(Arc::new(prober::ProbeHandler { source: cfg.probe_source_ip }));
    let brake = Arc::new(brake_state::SharedBrake::new(cfg.brake.clone()));
    let checks = metrics.checks.clone();
    tokio::spawn(prober::run(member.clone(), cfg.probe_source_ip, brake.clone(), checks, registry_counts.clone()));
    tokio::spawn(reaper::run(member.clone(), brake.clone(), reaper_stats, registry_counts));

    let http_state = Arc::new(
        http::HttpState::new(member.clone(), member.cluster_id(), metrics, cfg.drill.failpoints, brake)
            .with_probe_source(cfg.probe_source_ip),
    );
    let http_limits = Arc::new(rate_limit::RateLimits::new(&cfg.rate_limit.for_http()));
    let http_conns = conn_limit::ConnLimit::new(cfg.max_connections_per_client, "http");
    let http_task =
        tokio::spawn(http::serve(listeners.http, http_tls, http_conns, http_state, profiling, http_limits, http_auth));
    info!("member ready to serve clients");

    tokio::select! {
        _ = shutdown => info!("shutting down"),
        _ = member.removed() => {
            tracing::error!("this member has been removed from the cluster; exiting");
            // Let in-flight answers (such as the reply to the `member remove` that removed us)
            // reach their clients.
            tokio::time::sleep(REMOVED_GRACE).await;
        }
    }
    http_task.abort();
    for t in client_tasks {
        t.abort();
    }
    member.shutdown().await;
    peer_task.abort();
    Ok(())
}

/// What `restore_snapshot` built.
#[derive(Debug)]
pub struct Restored {
    pub revision: i64,
    pub member_id: u64,
    pub cluster_id: u64,
}

/// `quorate snapshot restore`: build a fresh data directory for member `name` (peer URL
/// `peer_url`) of a new cluster `initial_cluster` from a snapshot file, as `etcdutl snapshot
/// restore` does. Every member of the new cluster is restored from the same file with the same
/// `--initial-cluster` and token, so they agree on the membership and the new cluster id.
pub fn restore_snapshot(
    file: &std::path::Path,
    data_dir: &std::path::Path,
    name: &str,
    peer_url: &str,
    initial_cluster: &[(String, String)],
    token: &str,
) -> anyhow::Result<Restored> {
    use quorate_consensus::{member_id, stable_id, MemberNode};
    let bytes = std::fs::read(file).with_context(|| format!("read {}", file.display()))?;
    if !initial_cluster.iter().any(|(n, u)| n == name && u == peer_url) {
        anyhow::bail!("--initial-cluster has no entry {name}={peer_url} for this member");
    }
    let members: std::collections::BTreeMap<u64, MemberNode> = initial_cluster
        .iter()
        .map(|(n, u)| (member_id(n, u), MemberNode { name: n.clone(), peer_url: u.clone(), promote: false }))
        .collect();
    let mut listed: Vec<String> = initial_cluster.iter().map(|(n, u)| format!("{n}={u}")).collect();
    listed.sort();
    // A new cluster id, derived alike by every member restored from this file.
    let digest: String = bytes.iter().rev().take(8).map(|b| format!("{b:02x}")).collect();
    let cluster_id = stable_id(&[&listed.join(","), token, "restored", &digest]);
    let revision = quorate_consensus::backup::restore(&bytes, data_dir, &members)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let member_id = member_id(name, peer_url);
    write_ids(data_dir, member_id, cluster_id)?;
    Ok(Restored { revision, member_id, cluster_id })
}

/// How long a removed member keeps answering in-flight requests before it exits.
const REMOVED_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// The file in a data directory that records which member and cluster it belongs to.
pub const IDS_FILE: &str = "member.id";

/// Write the ids file of a data directory: member id and cluster id, in hex, one per line.
pub fn write_ids(data_dir: &std::path::Path, member: u64, cluster: u64) -> anyhow::Result<()> {
    write_ids_joined(data_dir, member, cluster, None)
}

/// `write_ids`, with (third line, decimal) the incarnation a joining member starts at.
fn write_ids_joined(
    data_dir: &std::path::Path,
    member: u64,
    cluster: u64,
    incarnation: Option<u64>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("create {}", data_dir.display()))?;
    let path = data_dir.join(IDS_FILE);
    let joined = incarnation.map_or(String::new(), |n| format!("{n}\n"));
    std::fs::write(&path, format!("{member:x}\n{cluster:x}\n{joined}"))
        .with_context(|| format!("write {}", path.display()))
}

/// This member's id and its cluster's id: recorded in the data directory on the first start.
/// A member joining an existing cluster (`--initial-cluster-state existing`, empty data
/// directory) asks its peers which id `member add` gave its peer URL, as etcd does, and the
/// cluster's incarnation (a recovered cluster's is above 1), which it starts at.
async fn resolve_ids(cfg: &ServerConfig, member: u64, cluster: u64) -> anyhow::Result<(u64, u64, Option<u64>)> {
    let path = cfg.data_dir.join(IDS_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let corrupt = || anyhow::anyhow!("{} is corrupt", path.display());
        let mut lines = text.lines();
        let mut hex = || lines.next().and_then(|l| u64::from_str_radix(l.trim(), 16).ok());
        let member = hex().ok_or_else(corrupt)?;
        let cluster = hex().ok_or_else(corrupt)?;
        let incarnation = text.lines().nth(2).and_then(|l| l.trim().parse::<u64>().ok());
        return Ok((member, cluster, incarnation));
    }
    let fresh = !quorate_consensus::has_raft_log(&cfg.data_dir);
    let ids = if cfg.initial_cluster_state == ClusterState::Existing && fresh {
        let peers: Vec<String> = cfg.initial_cluster.iter().map(|(_, url)| url.clone()).collect();
        info!("joining an existing cluster: asking {} for this member's id", peers.join(","));
        let (member, cluster, incarnation) =
            Member::discover_id(&peers, &cfg.advertise_peer_url, std::time::Duration::from_secs(30))
                .await
                .map_err(|e| anyhow::anyhow!("cannot join the existing cluster: {e}"))?;
        (member, cluster, Some(incarnation))
    } else {
        (member, cluster, None)
    };
    write_ids_joined(&cfg.data_dir, ids.0, ids.1, ids.2)?;
    Ok(ids)
}

/// How often the keyspace size is compared with `--quota-backend-bytes`.
const QUOTA_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Raise this member's NOSPACE alarm (through Raft) once the keyspace outgrows the quota, as
/// etcd does; writes that add data are then refused cluster-wide until it is disarmed. (A write
/// that would pass the quota is refused before it is logged, `Member::write`; this catches what
/// grew the keyspace otherwise, e.g. a quota lowered across a restart.)
async fn watch_quota(member: quorate_consensus::Member, quota_bytes: u64) {
    use quorate_kv::AlarmType;
    let me = member.id();
    let mut tick = tokio::time::interval(QUOTA_CHECK_INTERVAL);
    loop {
        tick.tick().await;
        let (in_use, raised) = member.read(|s| (s.bytes_in_use(), s.alarms().contains(&(me, AlarmType::NoSpace))));
        if in_use > quota_bytes && !raised {
            member.raise_no_space(format!("{in_use} bytes in use, over the quota of {quota_bytes}"));
        }
    }
}

/// `--auth-token jwt`: the installed keys vouch for a token's user.
struct JwtTokens;

impl quorate_kv::auth::ExternalTokens for JwtTokens {
    fn user_of(&self, token: &str, now_unix_ms: u64) -> Option<String> {
        let jwt = quorate_tls::jwt::installed()?;
        quorate_tls::jwt::Jwt::looks_like(token).then(|| jwt.verify(token, now_unix_ms / 1000)).flatten()
    }
}
