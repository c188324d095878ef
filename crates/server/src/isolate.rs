//! `POST /v1/member/isolate` and `POST /v1/member/unisolate` (what `quorate ctl isolate` and
//! `unisolate` call; ADR 0009 §1). Any member answers: the change goes to the leader, which
//! refuses an isolation that would cost the quorum.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use quorate_api_http::ApiError;
use quorate_consensus::{ConsensusError, Isolation, Member, NodeId};
use serde::Deserialize;
use serde_json::json;

use crate::http::HttpState;

#[derive(Deserialize)]
pub struct IsolateBody {
    /// The member's name or its id in hex.
    member: String,
    #[serde(default)]
    reason: String,
    /// Who asks (`ctl isolate` sends user@host).
    #[serde(default)]
    by: String,
}

/// The member named `name` (its name or hex id), or the 404 that says which names exist.
fn resolve(member: &Member, name: &str) -> Result<NodeId, ApiError> {
    let members = member.members();
    let known = || members.iter().map(|m| format!("{} ({:x})", m.name, m.id)).collect::<Vec<_>>().join(", ");
    let by_id = u64::from_str_radix(name, 16).ok().filter(|id| members.iter().any(|m| m.id == *id));
    let mut by_name = members.iter().filter(|m| !m.name.is_empty() && m.name == name).map(|m| m.id);
    let named = by_name.next();
    let ambiguous = by_name.next().is_some() || matches!((named, by_id), (Some(a), Some(b)) if a != b);
    if ambiguous {
        let message = format!("{name:?} names more than one member: use the hex id; members: {}", known());
        return Err(ApiError::new(StatusCode::CONFLICT, "ambiguous_member", message));
    }
    named.or(by_id).ok_or_else(|| {
        let message = format!("no member {name:?}; members: {}", known());
        ApiError::not_found("member_not_found", message)
    })
}

/// A refusal from consensus as the member endpoints answer it: a refused change is a 409 that
/// says why (shared with `crate::recover`).
pub(crate) fn refused(e: ConsensusError) -> Response {
    match e {
        ConsensusError::MemberNotFound => ApiError::not_found("member_not_found", e.to_string()).into_response(),
        ConsensusError::Membership(m) => ApiError::new(StatusCode::CONFLICT, "refused", m).into_response(),
        e => ApiError::from(e).into_response(),
    }
}

pub async fn isolate(State(s): State<Arc<HttpState>>, Json(body): Json<IsolateBody>) -> Response {
    let member = s.member();
    let id = match resolve(member, &body.member) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    if body.reason.trim().is_empty() {
        return ApiError::bad_request("reason_required", "an isolation needs a reason (--reason)").into_response();
    }
    let by = if body.by.trim().is_empty() { "unknown".to_string() } else { body.by };
    let isolation = Isolation { reason: body.reason, since_unix_ms: quorate_consensus::flight::unix_ms() as u64, by };
    match member.isolate(id, isolation).await {
        Ok(()) => {
            // Committed at the leader; read it back once applied here too.
            let _ = member.linearize().await;
            let recorded = member.isolated_members().get(&id).map(describe);
            Json(json!({"member": format!("{id:x}"), "isolated": recorded.is_some(), "isolation": recorded}))
                .into_response()
        }
        Err(e) => refused(e),
    }
}

pub async fn unisolate(State(s): State<Arc<HttpState>>, Json(body): Json<IsolateBody>) -> Response {
    let member = s.member();
    let id = match resolve(member, &body.member) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    match member.unisolate(id).await {
        Ok(()) => Json(json!({"member": format!("{id:x}"), "isolated": false})).into_response(),
        Err(e) => refused(e),
    }
}

/// What `/v1/member/status` says about isolation: this member's own, and every isolated
/// member this member knows of (still a voter: its demotion is pending).
pub fn status_fields(member: &Member) -> (serde_json::Value, serde_json::Value) {
    let own = member.isolation().map(|i| describe(&i));
    let voting = member.voter_ids();
    let all: Vec<serde_json::Value> = member
        .isolated_members()
        .into_iter()
        .map(|(id, i)| {
            let mut v = describe(&i);
            v["id"] = json!(format!("{id:x}"));
            v["demotion_pending"] = json!(voting.contains(&id));
            v
        })
        .collect();
    (json!(own), json!(all))
}

fn describe(i: &Isolation) -> serde_json::Value {
    json!({
        "reason": i.reason,
        "since": quorate_consensus::isolation::utc_text(i.since_unix_ms),
        "since_unix_ms": i.since_unix_ms,
        "by": i.by,
    })
}
