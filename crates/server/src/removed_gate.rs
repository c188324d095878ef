//! A member that knows it has been removed from the cluster refuses every client request at
//! once, in each protocol's terms, for the moment it still runs before it exits: its state
//! stopped following the cluster's when the removal committed, and an answer from it (a
//! member list that still has it, a read) would be a stale one.

use std::task::{Context, Poll};

use axum::extract::State;
use axum::response::IntoResponse;
use http::{Request, Response};
use quorate_consensus::{ConsensusError, Member};

/// For the gRPC router on the client URLs: gRPC requests get etcd's `UNAVAILABLE`
/// ("etcdserver: the member has been permanently removed from the cluster"), so that a client
/// with other endpoints moves on to them. `/metrics` and `/health` beside it still answer.
#[derive(Clone)]
pub struct RemovedGateLayer(pub Member);

impl<S> tower::Layer<S> for RemovedGateLayer {
    type Service = RemovedGate<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RemovedGate { member: self.0.clone(), inner }
    }
}

#[derive(Clone)]
pub struct RemovedGate<S> {
    member: Member,
    inner: S,
}

impl<S, B, RB> tower::Service<Request<B>> for RemovedGate<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    RB::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if grpc && self.member.is_removed() {
            let status = quorate_api_grpc::consensus_status(ConsensusError::Removed);
            return Box::pin(futures::future::ready(Ok(status.into_http())));
        }
        let fut = self.inner.call(req);
        Box::pin(async move { Ok(fut.await?.map(tonic::body::Body::new)) })
    }
}

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
