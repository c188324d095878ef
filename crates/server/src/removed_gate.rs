//! A member that knows it has been removed from the cluster refuses every client request at
//! once, in each protocol's terms, for the moment it still runs before it exits: its state
//! stopped following the cluster's when the removal committed, and an answer from it (a
//! member list that still has it, a read) would be a stale one.

use axum::extract::State;
use axum::response::IntoResponse;
use quorate_consensus::{ConsensusError, Member};

/// For the HTTP APIs (native, Consul, Eureka): a 503 with a JSON body.
pub async fn refuse_http(
    State(member): State<Member>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if member.is_removed() {
        return quorate_api_http::ApiError::from(ConsensusError::Removed).into_response();
    }
    next.run(req).await
}
