//! Per-client rate limits (issue 14 §3): a token bucket per source address (per user, once auth
//! exists), one set for the gRPC client port and one for the HTTP APIs. Liveness traffic
//! (opening a lease keep-alive stream, registry heartbeats and session renewals) has buckets of
//! its own, so that a write storm from a client cannot starve its own leases and instances, and
//! a heartbeat storm cannot take the write budget. Over its rate, a request is refused at once,
//! before it is decoded: gRPC `RESOURCE_EXHAUSTED` "etcdserver: too many requests" (etcd's
//! error), HTTP 429 with `Retry-After` and a JSON body. Off by default (rate 0).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A bucket: tokens now, as of `at`.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Take one token from `b` at `now`, refilling at `rate` per second up to `burst`: `Err` with
/// how long until one is there.
pub fn take(b: &mut Bucket, now: Instant, rate: f64, burst: f64) -> Result<(), Duration> {
    let refill = now.saturating_duration_since(b.at).as_secs_f64() * rate;
    b.tokens = (b.tokens + refill).min(burst);
    b.at = now;
    if b.tokens >= 1.0 {
        b.tokens -= 1.0;
        Ok(())
    } else {
        Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
    }
}

/// Buckets kept before idle (full) ones are dropped.
const BUCKETS_MAX: usize = 65_536;

pub struct Limiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl Limiter {
    /// `None` when `rate` is 0 (no limit). `burst` 0 means twice the rate (at least 1).
    pub fn new(rate: f64, burst: f64) -> Option<Limiter> {
        (rate > 0.0).then(|| Limiter {
            rate,
            burst: if burst > 0.0 { burst } else { (rate * 2.0).max(1.0) },
            buckets: Mutex::default(),
        })
    }

    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap();
        if buckets.len() >= BUCKETS_MAX && !buckets.contains_key(&ip) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let b = buckets.entry(ip).or_insert(Bucket { tokens: self.burst, at: now });
        take(b, now, self.rate, self.burst)
    }
}

/// The limits of one API: requests, and liveness traffic.
pub struct RateLimits {
    pub requests: Option<Limiter>,
    pub liveness: Option<Limiter>,
}

impl RateLimits {
    pub fn new(cfg: &crate::config::RateLimitConfig) -> RateLimits {
        RateLimits {
            requests: Limiter::new(cfg.rps, cfg.burst),
            liveness: Limiter::new(cfg.liveness_rps, cfg.liveness_burst),
        }
    }

    /// Check one request from `ip` (a liveness one or not).
    pub fn check(&self, ip: IpAddr, liveness: bool) -> Result<(), Duration> {
        let limiter = if liveness { &self.liveness } else { &self.requests };
        limiter.as_ref().map_or(Ok(()), |l| l.check(ip))
    }
}

/// Whether an HTTP request keeps something alive: a native heartbeat, a Consul check update or
/// session renewal, a Eureka renewal (PUT of an instance).
pub fn http_liveness(method: &http::Method, path: &str) -> bool {
    path.ends_with("/heartbeat")
        || path.starts_with("/v1/agent/check/")
        || path.starts_with("/v1/session/renew/")
        || (method == http::Method::PUT && path.starts_with("/eureka/apps/") && path.split('/').count() == 5)
}

/// The HTTP APIs' middleware: 429 with `Retry-After` over the rate.
pub async fn limit_http(
    axum::extract::State(limits): axum::extract::State<std::sync::Arc<RateLimits>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let ip = req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip());
    if let Some(ip) = ip {
        if let Err(wait) = limits.check(ip, http_liveness(req.method(), req.uri().path())) {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let body = serde_json::json!({"error": {
                "code": "too_many_requests",
                "message": format!("too many requests from {ip}: retry in {secs} s"),
            }});
            let mut resp = (http::StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
            resp.headers_mut().insert(http::header::RETRY_AFTER, secs.into());
            return resp;
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_at_its_rate_up_to_its_burst() {
        let t0 = Instant::now();
        let mut b = Bucket { tokens: 2.0, at: t0 };
        assert!(take(&mut b, t0, 10.0, 2.0).is_ok());
        assert!(take(&mut b, t0, 10.0, 2.0).is_ok());
        let wait = take(&mut b, t0, 10.0, 2.0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        assert!(take(&mut b, t0 + Duration::from_millis(100), 10.0, 2.0).is_ok(), "one token back after 1/rate");
        // A long idle time refills to the burst, no more.
        let later = t0 + Duration::from_secs(60);
        assert!(take(&mut b, later, 10.0, 2.0).is_ok());
        assert!(take(&mut b, later, 10.0, 2.0).is_ok());
        assert!(take(&mut b, later, 10.0, 2.0).is_err());
    }

    #[test]
    fn liveness_requests_are_told_apart() {
        use http::Method;
        assert!(http_liveness(&Method::PUT, "/api/v1/ns/default/services/web/instances/i1/heartbeat"));
        assert!(http_liveness(&Method::PUT, "/v1/agent/check/pass/service:web"));
        assert!(http_liveness(&Method::PUT, "/v1/session/renew/abc"));
        assert!(http_liveness(&Method::PUT, "/eureka/apps/WEB/i1"));
        assert!(!http_liveness(&Method::POST, "/eureka/apps/WEB"));
        assert!(!http_liveness(&Method::PUT, "/v1/kv/a"));
    }
}
