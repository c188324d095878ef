//! The one place where errors become HTTP statuses, each with a JSON body
//! `{"error": {"code": "...", "message": "..."}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use quorate_consensus::ConsensusError;
use quorate_registry::RegistryError;
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        ApiError::bad_request(e.code(), e.to_string())
    }
}

impl From<ConsensusError> for ApiError {
    fn from(e: ConsensusError) -> Self {
        let (status, code) = match e {
            ConsensusError::NoLeader | ConsensusError::NotLeader => (StatusCode::SERVICE_UNAVAILABLE, "no_leader"),
            ConsensusError::Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            ConsensusError::Learner => (StatusCode::SERVICE_UNAVAILABLE, "learner"),
            ConsensusError::Stopped(_) => (StatusCode::SERVICE_UNAVAILABLE, "stopped"),
            ConsensusError::Removed => (StatusCode::SERVICE_UNAVAILABLE, "removed"),
            ConsensusError::Isolated(_) => (StatusCode::SERVICE_UNAVAILABLE, "isolated"),
            ConsensusError::Fenced(_) => (StatusCode::SERVICE_UNAVAILABLE, "stale_incarnation"),
            _ => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<quorate_kv::KvError> for ApiError {
    fn from(e: quorate_kv::KvError) -> Self {
        use quorate_kv::KvError;
        let (status, code) = match e {
            KvError::NoSpace => (StatusCode::INSUFFICIENT_STORAGE, "no_space"),
            KvError::Compacted { .. } => (StatusCode::GONE, "compacted"),
            KvError::FutureRevision { .. } => (StatusCode::BAD_REQUEST, "future_revision"),
            KvError::FenceRejected { .. } => (StatusCode::CONFLICT, "fence_rejected"),
            KvError::LeaseNotFound { .. } => (StatusCode::NOT_FOUND, "lease_not_found"),
            KvError::Auth(a) => return crate::access::refusal(a),
            _ => (StatusCode::BAD_REQUEST, "bad_request"),
        };
        ApiError::new(status, code, e.to_string())
    }
}
