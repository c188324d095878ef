//! go-grpc-prometheus' server metrics, as etcd exports them: `grpc_server_started_total`,
//! `grpc_server_handled_total` and `grpc_server_handling_seconds`, labelled `grpc_type`,
//! `grpc_service`, `grpc_method` (and `grpc_code` once handled). A tower layer around the
//! client port's router: a call is started when its request arrives and handled when its
//! status is known, from the response headers (an error answered at once) or the trailers at
//! the end of the response body (a stream that ends). A response dropped before its status
//! (the client went away) counts as `Canceled`. Plain HTTP requests (`/metrics`) are not
//! counted.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// go-grpc-prometheus' default handling-time buckets (Prometheus' `DefBuckets`).
const HANDLING_BUCKETS_S: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

fn handling_histogram() -> Histogram {
    Histogram::new(HANDLING_BUCKETS_S)
}

#[derive(Clone)]
pub struct GrpcMetrics {
    started: Family<Labels, Counter>,
    handled: Family<Labels, Counter>,
    handling_seconds: Family<Labels, Histogram, fn() -> Histogram>,
}

impl Default for GrpcMetrics {
    fn default() -> Self {
        GrpcMetrics {
            started: Family::default(),
            handled: Family::default(),
            handling_seconds: Family::new_with_constructor(handling_histogram),
        }
    }
}

impl GrpcMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register("grpc_server_started", "Total number of RPCs started on the server.", self.started.clone());
        r.register(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            self.handled.clone(),
        );
        r.register(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            self.handling_seconds.clone(),
        );
    }

    pub fn layer(&self) -> GrpcMetricsLayer {
        GrpcMetricsLayer(self.clone())
    }
}

/// go-grpc-prometheus' `grpc_type` of an etcd method: the streaming ones are few and fixed.
fn grpc_type(service: &str, method: &str) -> &'static str {
    match (service, method) {
        ("etcdserverpb.Watch", "Watch") | ("etcdserverpb.Lease", "LeaseKeepAlive") => "bidi_stream",
        ("etcdserverpb.Maintenance", "Snapshot") | ("v3electionpb.Election", "Observe") => "server_stream",
        _ => "unary",
    }
}

/// grpc-go's `codes.Code.String()`, which go-grpc-prometheus puts in `grpc_code`.
fn code_name(code: &[u8]) -> &'static str {
    match code {
        b"0" => "OK",
        b"1" => "Canceled",
        b"2" => "Unknown",
        b"3" => "InvalidArgument",
        b"4" => "DeadlineExceeded",
        b"5" => "NotFound",
        b"6" => "AlreadyExists",
        b"7" => "PermissionDenied",
        b"8" => "ResourceExhausted",
        b"9" => "FailedPrecondition",
        b"10" => "Aborted",
        b"11" => "OutOfRange",
        b"12" => "Unimplemented",
        b"13" => "Internal",
        b"14" => "Unavailable",
        b"15" => "DataLoss",
        b"16" => "Unauthenticated",
        _ => "Unknown",
    }
}

/// Every method the etcd API defines (rpc.proto, v3lock.proto, v3election.proto): only these get
/// series of their own, so a client calling made-up paths cannot grow the families without end.
const KNOWN_METHODS: &[&str] = &[
    "/etcdserverpb.KV/Range",
    "/etcdserverpb.KV/Put",
    "/etcdserverpb.KV/DeleteRange",
    "/etcdserverpb.KV/Txn",
    "/etcdserverpb.KV/Compact",
    "/etcdserverpb.Watch/Watch",
    "/etcdserverpb.Lease/LeaseGrant",
    "/etcdserverpb.Lease/LeaseRevoke",
    "/etcdserverpb.Lease/LeaseKeepAlive",
    "/etcdserverpb.Lease/LeaseTimeToLive",
    "/etcdserverpb.Lease/LeaseLeases",
    "/etcdserverpb.Cluster/MemberAdd",
    "/etcdserverpb.Cluster/MemberRemove",
    "/etcdserverpb.Cluster/MemberUpdate",
    "/etcdserverpb.Cluster/MemberList",
    "/etcdserverpb.Cluster/MemberPromote",
    "/etcdserverpb.Maintenance/Alarm",
    "/etcdserverpb.Maintenance/Status",
    "/etcdserverpb.Maintenance/Defragment",
    "/etcdserverpb.Maintenance/Hash",
    "/etcdserverpb.Maintenance/HashKV",
    "/etcdserverpb.Maintenance/Snapshot",
    "/etcdserverpb.Maintenance/MoveLeader",
    "/etcdserverpb.Maintenance/Downgrade",
    "/etcdserverpb.Auth/AuthEnable",
    "/etcdserverpb.Auth/AuthDisable",
    "/etcdserverpb.Auth/AuthStatus",
    "/etcdserverpb.Auth/Authenticate",
    "/etcdserverpb.Auth/UserAdd",
    "/etcdserverpb.Auth/UserGet",
    "/etcdserverpb.Auth/UserList",
    "/etcdserverpb.Auth/UserDelete",
    "/etcdserverpb.Auth/UserChangePassword",
    "/etcdserverpb.Auth/UserGrantRole",
    "/etcdserverpb.Auth/UserRevokeRole",
    "/etcdserverpb.Auth/RoleAdd",
    "/etcdserverpb.Auth/RoleGet",
    "/etcdserverpb.Auth/RoleList",
    "/etcdserverpb.Auth/RoleDelete",
    "/etcdserverpb.Auth/RoleGrantPermission",
    "/etcdserverpb.Auth/RoleRevokePermission",
    "/v3lockpb.Lock/Lock",
    "/v3lockpb.Lock/Unlock",
    "/v3electionpb.Election/Campaign",
    "/v3electionpb.Election/Proclaim",
    "/v3electionpb.Election/Leader",
    "/v3electionpb.Election/Observe",
    "/v3electionpb.Election/Resign",
];

/// One call between its start and its status.
struct Call {
    metrics: GrpcMetrics,
    labels: Labels,
    started: Instant,
}

impl Call {
    /// `/etcdserverpb.KV/Put` into its service and method (a path the API does not define counts
    /// as service and method `unknown`); `None` for anything that is not a gRPC path.
    fn start(metrics: &GrpcMetrics, path: &str) -> Option<Call> {
        let (service, method) = path.strip_prefix('/')?.split_once('/')?;
        if service.is_empty() || method.is_empty() || method.contains('/') {
            return None;
        }
        let (service, method) = if KNOWN_METHODS.contains(&path) { (service, method) } else { ("unknown", "unknown") };
        let labels = vec![
            ("grpc_type", grpc_type(service, method).to_string()),
            ("grpc_service", service.to_string()),
            ("grpc_method", method.to_string()),
        ];
        metrics.started.get_or_create(&labels).inc();
        Some(Call { metrics: metrics.clone(), labels, started: Instant::now() })
    }

    fn finish(self, code: &'static str) {
        self.metrics.handling_seconds.get_or_create(&self.labels).observe(self.started.elapsed().as_secs_f64());
        let mut labels = self.labels;
        labels.push(("grpc_code", code.to_string()));
        self.metrics.handled.get_or_create(&labels).inc();
    }
}

fn status_of(headers: &HeaderMap) -> Option<&'static str> {
    headers.get("grpc-status").map(|v| code_name(v.as_bytes()))
}

#[derive(Clone)]
pub struct GrpcMetricsLayer(GrpcMetrics);

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService { inner, metrics: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: GrpcMetrics,
}

impl<S, B, RB> tower::Service<Request<B>> for GrpcMetricsService<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = Response<CountedBody<RB>>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let is_grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let call = if is_grpc { Call::start(&self.metrics, req.uri().path()) } else { None };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let (parts, body) = resp.into_parts();
            let mut call = call;
            // A trailers-only response (an error answered before any message) carries its
            // status in the headers.
            if let Some(code) = status_of(&parts.headers) {
                if let Some(c) = call.take() {
                    c.finish(code);
                }
            }
            Ok(Response::from_parts(parts, CountedBody { inner: body, call }))
        })
    }
}

/// A response body that finishes its call when the trailers carrying its status pass.
pub struct CountedBody<B> {
    inner: B,
    call: Option<Call>,
}

impl<B> http_body::Body for CountedBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_of) {
                    if let Some(c) = self.call.take() {
                        c.finish(code);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(c) = self.call.take() {
                    c.finish("Unknown");
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for CountedBody<B> {
    fn drop(&mut self) {
        // The connection went away (or the client cancelled) before a status was sent.
        if let Some(c) = self.call.take() {
            c.finish("Canceled");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handled(m: &GrpcMetrics, service: &str, method: &str, kind: &str, code: &str) -> u64 {
        let labels = vec![
            ("grpc_type", kind.to_string()),
            ("grpc_service", service.to_string()),
            ("grpc_method", method.to_string()),
            ("grpc_code", code.to_string()),
        ];
        m.handled.get_or_create(&labels).get()
    }

    #[test]
    fn a_call_is_labelled_as_go_grpc_prometheus_labels_it() {
        let m = GrpcMetrics::default();
        Call::start(&m, "/etcdserverpb.KV/Put").unwrap().finish(code_name(b"0"));
        Call::start(&m, "/etcdserverpb.Watch/Watch").unwrap().finish(code_name(b"14"));
        assert_eq!(handled(&m, "etcdserverpb.KV", "Put", "unary", "OK"), 1);
        assert_eq!(handled(&m, "etcdserverpb.Watch", "Watch", "bidi_stream", "Unavailable"), 1);
        assert!(Call::start(&m, "/metrics").is_none());
        assert!(Call::start(&m, "/a/b/c").is_none());
    }

    /// Made-up paths share one series: however many a client invents, the families stay bounded.
    #[test]
    fn paths_the_api_does_not_define_share_one_series() {
        let m = GrpcMetrics::default();
        for i in 0..1000 {
            Call::start(&m, &format!("/x.Y/m{i}")).unwrap().finish(code_name(b"12"));
            Call::start(&m, &format!("/etcdserverpb.KV/Nope{i}")).unwrap().finish(code_name(b"12"));
        }
        assert_eq!(handled(&m, "unknown", "unknown", "unary", "Unimplemented"), 2000);
        let mut text = String::new();
        let mut r = Registry::default();
        m.register(&mut r);
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        assert!(text.lines().filter(|l| l.starts_with("grpc_server_handled_total{")).count() <= 2, "{text}");
        assert!(KNOWN_METHODS.iter().all(|p| Call::start(&m, p).is_some()));
    }

    #[test]
    fn a_response_dropped_before_its_status_is_canceled() {
        let m = GrpcMetrics::default();
        let call = Call::start(&m, "/etcdserverpb.Lease/LeaseKeepAlive");
        drop(CountedBody { inner: http_body_util::Empty::<Bytes>::new(), call });
        assert_eq!(handled(&m, "etcdserverpb.Lease", "LeaseKeepAlive", "bidi_stream", "Canceled"), 1);
    }
}
