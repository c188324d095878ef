//! A member that knows it has been removed from the cluster refuses every client request at
//! once, in each protocol's terms, for the moment it still runs before it exits: its state
//! stopped following the cluster's when the removal committed, and an answer from it (a
//! member list that still has it, a read) would be a stale one. An isolated member (`quorate
//! ctl isolate`) refuses them too, for as long as it is isolated, saying since when, by whom
//! and why.

use axum::extract::State;
use axum::response::IntoResponse;
use quorate_consensus::{ConsensusError, Member};

/// For the HTTP APIs (native, Consul, Eureka): a 503 with a JSON body.
pub async fn refuse_http(
    State(member): State<Member>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if let Some(e @ (ConsensusError::Removed | ConsensusError::Fenced(_))) = member.refusal() {
        return quorate_api_http::ApiError::from(e).into_response();
    }
    if let Some(i) = member.isolation() {
        let body = serde_json::json!({"error": {
            "code": "isolated",
            "message": i.describe(),
            "reason": i.reason,
            "since": quorate_consensus::isolation::utc_text(i.since_unix_ms),
            "since_unix_ms": i.since_unix_ms,
            "by": i.by,
        }});
        return (http::StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    }
    next.run(req).await
}
