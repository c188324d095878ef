//! The client port speaks two protocols on one socket, as etcd's 2379 does: gRPC (HTTP/2) for
//! the etcd API, and HTTP/1 for `/metrics`, `/health` and (with `--enable-pprof`)
//! `/debug/pprof`. This layer splits them by HTTP version before any gRPC route is looked up:
//! an HTTP/1 request only ever reaches the small HTTP/1 router, whose fallback is a JSON 404.
//! tonic would otherwise serve every gRPC method over HTTP/1.1 to whoever framed one (a Put
//! included), past everything that assumes gRPC arrives over HTTP/2.
//!
//! It is also where a member that knows it has been removed refuses every gRPC request with
//! etcd's `UNAVAILABLE` ("etcdserver: the member has been permanently removed from the
//! cluster"), so that a client with other endpoints moves on to them (`crate::removed_gate`
//! does the same for the HTTP APIs). An isolated member (`quorate ctl isolate`) refuses the
//! same way, naming its isolation, except `Maintenance.Status`, which says why in its errors.

use std::task::{Context, Poll};

use axum::response::IntoResponse;
use http::{Request, Response, StatusCode, Version};
use quorate_consensus::{ConsensusError, Member};
use tower::ServiceExt;

/// A response body that ends, with the refusal as its gRPC status, as soon as the member stops
/// serving clients: a stream opened before (a watch, a keep-alive) must not outlive that.
struct CutOff<B> {
    inner: std::pin::Pin<Box<B>>,
    member: Member,
    changed: Option<futures::future::BoxFuture<'static, ()>>,
    done: bool,
}

impl<B> CutOff<B> {
    /// `changes` was subscribed before the call passed the gate, so a refusal that lands while
    /// the call starts is seen on the first poll.
    fn new(inner: B, member: Member, changes: tokio::sync::watch::Receiver<u64>) -> Self {
        CutOff { inner: Box::pin(inner), member, changed: Some(Self::wait(changes)), done: false }
    }

    fn wait(mut changes: tokio::sync::watch::Receiver<u64>) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async move {
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}

impl<B> http_body::Body for CutOff<B>
where
    B: http_body::Body<Data = bytes::Bytes>,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, B::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        while let Some(Poll::Ready(())) = self.changed.as_mut().map(|f| f.as_mut().poll(cx)) {
            self.changed = Some(Self::wait(self.member.serving_changes()));
            if let Some(e) = self.member.refusal() {
                self.done = true;
                let mut trailers = http::HeaderMap::new();
                let _ = quorate_api_grpc::consensus_status(e).add_header(&mut trailers);
                return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
            }
        }
        self.inner.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }
}

/// Opening a lease keep-alive stream: liveness traffic, limited apart from the rest.
const KEEPALIVE_PATH: &str = "/etcdserverpb.Lease/LeaseKeepAlive";

/// The streaming calls that can outlive a member's decision to stop serving.
const STREAMS: [&str; 3] =
    ["/etcdserverpb.Watch/Watch", "/etcdserverpb.Lease/LeaseKeepAlive", "/v3electionpb.Election/Observe"];

/// The one gRPC method an isolated member still answers.
const STATUS_PATH: &str = "/etcdserverpb.Maintenance/Status";

/// Wraps the gRPC service of a client port; `http1` answers every request that is not gRPC over
/// HTTP/2.
#[derive(Clone)]
pub struct Http1SplitLayer {
    http1: axum::Router,
    member: Member,
    limits: std::sync::Arc<crate::rate_limit::RateLimits>,
    cn_is_user: bool,
}

impl Http1SplitLayer {
    /// `http1`'s routes and, for any other path, a JSON 404; gRPC refused once `member` is removed.
    /// `cn_is_user`: `--client-cert-auth`, under which a certificate's common name is a user.
    pub fn new(
        http1: axum::Router,
        member: Member,
        limits: std::sync::Arc<crate::rate_limit::RateLimits>,
        cn_is_user: bool,
    ) -> Self {
        Http1SplitLayer { http1: http1.fallback(not_found), member, limits, cn_is_user }
    }
}

async fn not_found(uri: http::Uri) -> impl IntoResponse {
    let error = format!(
        "no HTTP/1 endpoint {}: this client port serves the etcd API over gRPC (HTTP/2), and /metrics, /health and /debug/pprof over HTTP/1",
        uri.path()
    );
    (StatusCode::NOT_FOUND, axum::Json(serde_json::json!({ "error": error })))
}

impl<S> tower::Layer<S> for Http1SplitLayer {
    type Service = Http1Split<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Http1Split {
            http1: self.http1.clone(),
            member: self.member.clone(),
            limits: self.limits.clone(),
            cn_is_user: self.cn_is_user,
            inner,
        }
    }
}

#[derive(Clone)]
pub struct Http1Split<S> {
    http1: axum::Router,
    member: Member,
    limits: std::sync::Arc<crate::rate_limit::RateLimits>,
    cn_is_user: bool,
    inner: S,
}

impl<S> Http1Split<S> {
    /// With auth on, the user a request speaks for, as the services will resolve it (a valid
    /// `token`, else under `--client-cert-auth` the certificate's common name): rate limits are
    /// per user then. A bad token counts against its address (it is refused further in).
    fn user_of<B>(&self, req: &Request<B>, info: Option<&quorate_tls::ConnInfo>) -> Option<String> {
        let token = req.headers().get(quorate_api_grpc::TOKEN_METADATA).and_then(|v| v.to_str().ok());
        let cn = || {
            let cn = info?.identity.as_ref()?.common_name.clone()?;
            (self.cn_is_user && !cn.is_empty()).then_some(cn)
        };
        self.member.read(|s| {
            let auth = s.auth();
            if !auth.enabled() {
                return None;
            }
            match token {
                Some(t) => auth.verify_token(t, quorate_consensus::passwords::now_unix_ms()).ok(),
                None => cn(),
            }
        })
    }
}

impl<S, B, RB> tower::Service<Request<B>> for Http1Split<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
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
        // Over TLS, ALPN puts curl and browsers on HTTP/2 too: what is not gRPC goes to the
        // HTTP/1 routes (as etcd's port dispatches on the content type).
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if req.version() != Version::HTTP_2 || !grpc {
            let answer = self.http1.clone().oneshot(req.map(axum::body::Body::new));
            return Box::pin(async move {
                let resp = match answer.await {
                    Ok(resp) => resp,
                    Err(never) => match never {},
                };
                Ok(resp.map(tonic::body::Body::new))
            });
        }
        // Over its rate, a client is refused before anything is decoded (etcd's error).
        let info = req.extensions().get::<quorate_tls::ConnInfo>();
        if let (true, Some(addr)) = (self.limits.enabled(), info.and_then(|c| c.remote)) {
            let liveness = req.uri().path() == KEEPALIVE_PATH;
            let user = self.user_of(&req, info);
            if self.limits.check(crate::rate_limit::ClientKey::of(user, addr.ip()), liveness).is_err() {
                let status = tonic::Status::resource_exhausted("etcdserver: too many requests");
                let slowed = crate::rate_limit::Slowed::enter();
                return Box::pin(async move {
                    slowed.wait().await;
                    Ok(status.into_http())
                });
            }
        }
        let path = req.uri().path().to_string();
        let status_call = path == STATUS_PATH;
        let changes = self.member.serving_changes();
        let refusal = match self.member.refusal() {
            Some(ConsensusError::Removed) => Some(ConsensusError::Removed),
            Some(_) if status_call => None,
            other => other,
        };
        if let Some(e) = refusal {
            let status = quorate_api_grpc::consensus_status(e);
            return Box::pin(futures::future::ready(Ok(status.into_http())));
        }
        // A stream already open when the member stops serving (a watch, a keep-alive, an
        // observe) is ended with the refusal. A unary call accepted before runs to its end: a
        // write cut off mid-way may still commit, and must not be answered as refused.
        let fut = self.inner.call(req);
        let member = (!status_call && STREAMS.contains(&path.as_str())).then(|| (self.member.clone(), changes));
        Box::pin(async move {
            let resp = fut.await?;
            Ok(match member {
                Some((member, changes)) => resp.map(|body| tonic::body::Body::new(CutOff::new(body, member, changes))),
                None => resp.map(tonic::body::Body::new),
            })
        })
    }
}
