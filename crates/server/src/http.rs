//! The member's plain HTTP endpoints: health, readiness, version and Prometheus metrics.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use quorate_consensus::Member;
use serde_json::json;
use tokio::net::TcpListener;

pub struct HttpState {
    member: Member,
    cluster_id: u64,
    registry: Registry,
    term: Gauge,
    commit_index: Gauge,
    applied_index: Gauge,
    is_leader: Gauge,
    has_leader: Gauge,
    revision: Gauge,
    keys: Gauge,
    log_commits: Counter,
    log_entries: Counter,
    reaper: Arc<crate::reaper::ReaperStats>,
    evicted: Counter,
    marked_suspect: Counter,
    brake_engaged_zones: Gauge,
    failpoints: bool,
}

impl HttpState {
    pub fn new(member: Member, cluster_id: u64, reaper: Arc<crate::reaper::ReaperStats>, failpoints: bool) -> Self {
        let mut registry = Registry::with_prefix("quorate");
        let term = Gauge::default();
        let commit_index = Gauge::default();
        let applied_index = Gauge::default();
        let is_leader = Gauge::default();
        let has_leader = Gauge::default();
        let revision = Gauge::default();
        let keys = Gauge::default();
        let log_commits = Counter::default();
        let log_entries = Counter::default();
        registry.register("storage_log_commits", "Durable (fsynced) commits of the Raft log", log_commits.clone());
        registry.register("storage_log_entries", "Raft log entries made durable", log_entries.clone());
        registry.register("raft_term", "Current Raft term", term.clone());
        registry.register("raft_commit_index", "Highest log index known committed", commit_index.clone());
        registry.register(
            "raft_applied_index",
            "Highest log index applied to the state machine",
            applied_index.clone(),
        );
        registry.register("raft_is_leader", "1 if this member is the leader", is_leader.clone());
        registry.register("raft_has_leader", "1 if this member knows a leader", has_leader.clone());
        registry.register("mvcc_revision", "Current MVCC revision", revision.clone());
        registry.register("mvcc_keys", "Keys with history in the MVCC store", keys.clone());
        let (evicted, marked_suspect, brake_engaged_zones) = (Counter::default(), Counter::default(), Gauge::default());
        registry.register(
            "registry_evictions",
            "Instances this member evicted as leader (lease expired)",
            evicted.clone(),
        );
        registry.register(
            "registry_marked_suspect",
            "Instances this member marked suspect as leader while the eviction brake held",
            marked_suspect.clone(),
        );
        registry.register(
            "registry_brake_engaged_zones",
            "Zones where the eviction brake holds now (leader only)",
            brake_engaged_zones.clone(),
        );
        HttpState {
            member,
            cluster_id,
            registry,
            term,
            commit_index,
            applied_index,
            is_leader,
            has_leader,
            revision,
            keys,
            log_commits,
            log_entries,
            reaper,
            evicted,
            marked_suspect,
            brake_engaged_zones,
            failpoints,
        }
    }
}

pub async fn serve(listener: TcpListener, state: Arc<HttpState>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .route("/v1/member/status", get(member_status))
        .route("/debug/failpoints/fsync-delay-ms", axum::routing::put(set_fsync_delay))
        .with_state(state.clone())
        .merge(quorate_api_http::router(Arc::new(quorate_api_http::Api { member: state.member.clone() })));
    axum::serve(listener, app).await
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

async fn health(State(s): State<Arc<HttpState>>) -> impl IntoResponse {
    // Healthy means a leader is known and a linearizable read goes through, as etcd's /health.
    let result = tokio::time::timeout(std::time::Duration::from_secs(5), s.member.linearize()).await;
    match result {
        Ok(Ok(())) => (StatusCode::OK, Json(json!({"health": "true", "reason": ""}))),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"health": "false", "reason": e.to_string()}))),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"health": "false", "reason": "timed out"}))),
    }
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

async fn metrics(State(s): State<Arc<HttpState>>) -> impl IntoResponse {
    let st = s.member.status();
    s.term.set(st.term as i64);
    s.commit_index.set(st.commit_index as i64);
    s.applied_index.set(st.applied_index as i64);
    s.is_leader.set((st.leader == Some(st.id)) as i64);
    s.has_leader.set(st.leader.is_some() as i64);
    let (rev, keys) = s.member.read(|store| (store.revision(), store.key_count()));
    s.revision.set(rev);
    s.keys.set(keys as i64);
    let (commits, entries) = s.member.log_stats();
    // Counters only move forward: add what happened since the last scrape.
    s.log_commits.inc_by(commits.saturating_sub(s.log_commits.get()));
    s.log_entries.inc_by(entries.saturating_sub(s.log_entries.get()));
    {
        use std::sync::atomic::Ordering::Relaxed;
        s.evicted.inc_by(s.reaper.evicted.load(Relaxed).saturating_sub(s.evicted.get()));
        s.marked_suspect.inc_by(s.reaper.marked_suspect.load(Relaxed).saturating_sub(s.marked_suspect.get()));
        s.brake_engaged_zones.set(s.reaper.brake_engaged_zones.load(Relaxed) as i64);
    }
    let mut body = String::new();
    match encode(&mut body, &s.registry) {
        Ok(()) => (StatusCode::OK, [("content-type", "text/plain; version=0.0.4")], body),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, [("content-type", "text/plain")], e.to_string()),
    }
}

/// What `quorate ctl status` asks of a member beyond etcd's Maintenance.Status (schema in
/// docs/ctl.md). The wall clock is read last, so that it is as close as it can be to the
/// reply leaving; the caller measures the round trip around it.
async fn member_status(State(s): State<Arc<HttpState>>) -> impl IntoResponse {
    let d = s.member.diagnostics();
    let st = &d.raft;
    let revision = s.member.read(|store| store.revision());
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
        "wall_clock_unix_ms": wall_clock_unix_ms,
    }))
}
