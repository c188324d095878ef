//! The member's plain HTTP endpoints: health, readiness, version and Prometheus metrics.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use quorate_consensus::Member;
use serde_json::json;
use tokio::net::TcpListener;

pub struct HttpState {
    member: Member,
    cluster_id: u64,
    metrics: Arc<crate::metrics::Metrics>,
    failpoints: bool,
    brake: Arc<crate::brake_state::SharedBrake>,
    probe_source: Option<std::net::IpAddr>,
}

impl HttpState {
    pub fn member(&self) -> &Member {
        &self.member
    }

    pub fn new(
        member: Member,
        cluster_id: u64,
        metrics: Arc<crate::metrics::Metrics>,
        failpoints: bool,
        brake: Arc<crate::brake_state::SharedBrake>,
    ) -> Self {
        HttpState { member, cluster_id, metrics, failpoints, brake, probe_source: None }
    }

    /// Probes this member makes for the HTTP API (a repair's confirmation) leave from here.
    pub fn with_probe_source(mut self, ip: Option<std::net::IpAddr>) -> Self {
        self.probe_source = ip;
        self
    }

    pub fn probe_source(&self) -> Option<std::net::IpAddr> {
        self.probe_source
    }

    /// The eviction brake the leader's registry workers share (repairs go through it).
    pub fn brake(&self) -> &crate::brake_state::SharedBrake {
        &self.brake
    }
}

pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<quorate_tls::Acceptor>>,
    conns: Option<Arc<crate::conn_limit::ConnLimit>>,
    state: Arc<HttpState>,
    profiling: Arc<crate::pprof::Profiling>,
    limits: Arc<crate::rate_limit::RateLimits>,
    auth: Arc<quorate_api_http::access::HttpAuth>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .route("/v1/member/status", get(member_status))
        .route("/v1/registry/repair", axum::routing::post(crate::repair::repair))
        .route("/v1/member/timeline", get(crate::timeline::member_timeline))
        .route("/v1/member/isolate", axum::routing::post(crate::isolate::isolate))
        .route("/v1/member/unisolate", axum::routing::post(crate::isolate::unisolate))
        .route("/v1/member/recovery", get(crate::recover::info))
        .route("/v1/member/recover", axum::routing::post(crate::recover::recover))
        .route("/debug/failpoints/fsync-delay-ms", axum::routing::put(set_fsync_delay))
        .route("/debug/failpoints/diverge-put-key", axum::routing::put(set_diverge_put_key))
        .route("/debug/failpoints/hold-isolation", axum::routing::put(set_hold_isolation))
        .with_state(state.clone())
        .merge(
            quorate_api_http::router(Arc::new(quorate_api_http::Api {
                member: state.member.clone(),
                heartbeats: state.metrics.heartbeats.clone(),
            }))
            .layer(axum::middleware::from_fn_with_state(state.member.clone(), crate::removed_gate::refuse_http))
            .layer(axum::middleware::from_fn_with_state(limits, crate::rate_limit::limit_http)),
        )
        .merge(crate::pprof::router(profiling))
        // Outermost: with auth on, every route is checked against `access::need`'s table.
        .layer(axum::middleware::from_fn_with_state(auth, quorate_api_http::access::guard));
    use axum::serve::ListenerExt;
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    match tls {
        Some(tls) => {
            let listener = TlsListener { local: listener.local_addr()?, accepted: tls.serve(listener) };
            axum::serve(LimitedListener { inner: listener, limit: conns }.tap_io(|_| {}), app).await
        }
        None => {
            let listener = listener.tap_io(|tcp| quorate_tls::keep_alive(tcp));
            axum::serve(LimitedListener { inner: listener, limit: conns }.tap_io(|_| {}), app).await
        }
    }
}

/// A listener whose connections past `--max-connections-per-client` are closed at once.
struct LimitedListener<L> {
    inner: L,
    limit: Option<Arc<crate::conn_limit::ConnLimit>>,
}

impl<L> axum::serve::Listener for LimitedListener<L>
where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    type Io = crate::conn_limit::Limited<L::Io>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use crate::conn_limit::Limited;
        loop {
            let (io, addr) = self.inner.accept().await;
            match &self.limit {
                None => return (Limited::new(io, None), addr),
                Some(limit) => {
                    if let Some(guard) = limit.admit(addr) {
                        return (Limited::new(io, Some(guard)), addr);
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// The HTTP listener over TLS: connections whose handshake is done.
struct TlsListener {
    local: std::net::SocketAddr,
    accepted: tokio::sync::mpsc::Receiver<quorate_tls::ServerConn>,
}

impl axum::serve::Listener for TlsListener {
    type Io = quorate_tls::ServerConn;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.accepted.recv().await {
                Some(conn) => {
                    let remote = conn.remote.unwrap_or(([0, 0, 0, 0], 0).into());
                    return (conn, remote);
                }
                // The accept task ended (it never does while this receiver lives).
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Drill failpoint: every log fsync on this member stalls this many milliseconds (0: off).
async fn set_fsync_delay(State(s): State<Arc<HttpState>>, body: String) -> impl IntoResponse {
    if !s.failpoints {
        return (StatusCode::NOT_FOUND, Json(json!({"error": "failpoints are off (start with --drill-failpoints)"})));
    }
    match body.trim().parse::<u64>() {
        Ok(ms) => {
            tracing::warn!(ms, "failpoint: log fsync delay set");
            s.member.set_fsync_delay_ms(ms);
            (StatusCode::OK, Json(json!({"fsync_delay_ms": ms})))
        }
        Err(_) => (StatusCode::BAD_REQUEST, Json(json!({"error": "body must be a number of milliseconds"}))),
    }
}

/// Drill failpoint: the next put of the key in the body that this member applies stores
/// another value, so this member's state (and HashKV) diverges from the others'. Fires once.
async fn set_diverge_put_key(State(s): State<Arc<HttpState>>, body: String) -> impl IntoResponse {
    if !s.failpoints {
        return (StatusCode::NOT_FOUND, Json(json!({"error": "failpoints are off (start with --drill-failpoints)"})));
    }
    if body.is_empty() {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "body must be the key"})));
    }
    quorate_consensus::failpoint::arm_diverge_put(body.clone().into_bytes());
    (StatusCode::OK, Json(json!({"diverge_put_key": body})))
}

/// Drill failpoint: `true` holds this member's isolation reconciler (as leader it neither hands
/// over nor demotes an isolated member), `false` releases it.
async fn set_hold_isolation(State(s): State<Arc<HttpState>>, body: String) -> impl IntoResponse {
    if !s.failpoints {
        return (StatusCode::NOT_FOUND, Json(json!({"error": "failpoints are off (start with --drill-failpoints)"})));
    }
    match body.trim().parse::<bool>() {
        Ok(hold) => {
            quorate_consensus::failpoint::hold_isolation(hold);
            (StatusCode::OK, Json(json!({"hold_isolation": hold})))
        }
        Err(_) => (StatusCode::BAD_REQUEST, Json(json!({"error": "body must be true or false"}))),
    }
}

async fn health(State(s): State<Arc<HttpState>>) -> impl IntoResponse {
    crate::metrics::health(&s.member).await
}

async fn ready(State(s): State<Arc<HttpState>>) -> impl IntoResponse {
    let st = s.member.status();
    let ready = st.leader.is_some() && st.applied_index > 0;
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (
        code,
        Json(
            json!({"ready": ready, "leader": st.leader.map(|l| format!("{l:x}")), "cluster_id": format!("{:x}", s.cluster_id)}),
        ),
    )
}

async fn version() -> impl IntoResponse {
    Json(json!({
        "quorate": env!("CARGO_PKG_VERSION"),
        "etcdserver": quorate_api_grpc::ETCD_API_VERSION,
        "etcdcluster": quorate_api_grpc::ETCD_API_VERSION,
    }))
}

async fn metrics(State(s): State<Arc<HttpState>>, headers: axum::http::HeaderMap) -> impl IntoResponse {
    crate::metrics::serve_metrics(State(s.metrics.clone()), headers).await
}

/// What `quorate ctl status` asks of a member beyond etcd's Maintenance.Status (schema in
/// docs/ctl.md). The wall clock is read last, so that it is as close as it can be to the
/// reply leaving; the caller measures the round trip around it.
async fn member_status(State(s): State<Arc<HttpState>>) -> impl IntoResponse {
    let d = s.member.diagnostics();
    let st = &d.raft;
    let revision = s.member.read(|store| store.revision());
    let (isolated, isolated_members) = crate::isolate::status_fields(&s.member);
    let wall_clock_unix_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |t| t.as_millis() as u64);
    Json(json!({
        "id": format!("{:x}", st.id),
        "role": if st.is_learner && st.state != "leader" { "learner" } else { st.state },
        "term": st.term,
        "leader": st.leader.map(|l| format!("{l:x}")),
        "last_log_index": st.last_log_index,
        "commit_index": st.commit_index,
        "applied_index": st.applied_index,
        "revision": revision,
        "apply_lag_entries": st.commit_index.saturating_sub(st.applied_index),
        "last_leader_contact_ms": d.last_leader_contact_ms,
        "fsync_p99_us": d.fsync_p99_us,
        "fsync_samples": d.fsync_samples,
        "version": env!("CARGO_PKG_VERSION"),
        "isolated": isolated,
        "isolated_members": isolated_members,
        "incarnation": s.member.incarnation(),
        "fenced": quorate_consensus::incarnation::fenced(),
        "recovery": s.member.recovered_by(),
        "wall_clock_unix_ms": wall_clock_unix_ms,
    }))
}
