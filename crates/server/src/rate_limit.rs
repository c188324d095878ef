//! Per-client rate limits (issue 14 §3): a token bucket per authenticated user with auth on (a
//! client that presents a valid token, or a certificate whose common name is its user), else per
//! source address; one set for the gRPC client port and one for the HTTP APIs. Liveness traffic
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
    b.at = b.at.max(now);
    if b.tokens >= 1.0 {
        b.tokens -= 1.0;
        Ok(())
    } else {
        let wait = (1.0 - b.tokens) / rate;
        Err(Duration::try_from_secs_f64(wait).unwrap_or(Duration::from_secs(3600)).min(Duration::from_secs(3600)))
    }
}

/// Buckets kept before idle (full) ones are dropped.
const BUCKETS_MAX: usize = 65_536;

pub struct Limiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<Buckets>,
}

/// Who a bucket belongs to: an authenticated user, or (auth off, or nobody authenticated) a
/// source address as `client_key` groups them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClientKey {
    User(String),
    Addr(IpAddr),
}

impl ClientKey {
    /// The user when there is one, else the address.
    pub fn of(user: Option<String>, ip: IpAddr) -> ClientKey {
        match user {
            Some(u) => ClientKey::User(u),
            None => ClientKey::Addr(client_key(ip)),
        }
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientKey::User(u) => write!(f, "user {u}"),
            ClientKey::Addr(ip) => write!(f, "{ip}"),
        }
    }
}

#[derive(Default)]
struct Buckets {
    by_client: HashMap<ClientKey, Bucket>,
    /// Shared by every client that arrives while the table is full of active ones.
    overflow: Option<Bucket>,
    swept: Option<Instant>,
}

pub use quorate_tls::client_key;

/// The slowest rate accepted, so that a retry time is always a sane duration.
pub const RATE_MIN: f64 = 0.001;

impl Limiter {
    /// `None` when `rate` is 0 (no limit). `burst` 0 means twice the rate (at least 1).
    pub fn new(rate: f64, burst: f64) -> Option<Limiter> {
        (rate > 0.0).then(|| Limiter {
            rate: rate.max(RATE_MIN),
            burst: if burst > 0.0 { burst.max(1.0) } else { (rate * 2.0).max(1.0) },
            buckets: Mutex::default(),
        })
    }

    pub fn check(&self, key: ClientKey) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap();
        let now = Instant::now();
        let (rate, burst) = (self.rate, self.burst);
        let full = |b: &Bucket| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate >= burst;
        let b = &mut *buckets;
        if b.by_client.len() >= BUCKETS_MAX && !b.by_client.contains_key(&key) {
            // Idle clients (buckets back to full) are forgotten, at most once a second.
            if b.swept.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
                b.by_client.retain(|_, bucket| !full(bucket));
                b.swept = Some(now);
            }
            if b.by_client.len() >= BUCKETS_MAX {
                let shared = b.overflow.get_or_insert(Bucket { tokens: burst, at: now });
                return take(shared, now, rate, burst);
            }
        }
        let bucket = b.by_client.entry(key).or_insert(Bucket { tokens: burst, at: now });
        take(bucket, now, rate, burst)
    }
}

/// The limits of one API: requests, and liveness traffic.
pub struct RateLimits {
    pub requests: Option<Limiter>,
    pub liveness: Option<Limiter>,
}

impl RateLimits {
    /// With a request rate and no liveness rate, liveness gets a budget of the same size (its
    /// own buckets): never unlimited while requests are limited.
    pub fn new(cfg: &crate::config::RateLimitConfig) -> RateLimits {
        let (liveness_rps, liveness_burst) = match cfg.liveness_rps {
            r if r > 0.0 => (r, cfg.liveness_burst),
            _ => (cfg.rps, cfg.burst),
        };
        RateLimits { requests: Limiter::new(cfg.rps, cfg.burst), liveness: Limiter::new(liveness_rps, liveness_burst) }
    }

    /// Check one request from `key` (a liveness one or not).
    pub fn check(&self, key: ClientKey, liveness: bool) -> Result<(), Duration> {
        let limiter = if liveness { &self.liveness } else { &self.requests };
        limiter.as_ref().map_or(Ok(()), |l| l.check(key))
    }

    pub fn enabled(&self) -> bool {
        self.requests.is_some() || self.liveness.is_some()
    }
}

/// How long a refusal is held before it is sent. A client that retries at once (a closed loop,
/// a flood) then sends a handful of requests a second per stream instead of tens of thousands,
/// each of which costs the member a request to parse and refuse; a client that backs off, as
/// `Retry-After` asks, never notices.
pub const REFUSAL_DELAY: Duration = Duration::from_millis(250);

/// Most refusals held at once on a member; past it they are sent at once (a client with
/// unbounded concurrency must not make the member hold unbounded timers).
const HELD_REFUSALS_MAX: usize = 4096;

static HELD_REFUSALS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One refusal, held for `REFUSAL_DELAY` while there is room (`wait`).
pub struct Slowed(bool);

impl Slowed {
    pub fn enter() -> Slowed {
        use std::sync::atomic::Ordering::Relaxed;
        let held = HELD_REFUSALS.fetch_add(1, Relaxed) < HELD_REFUSALS_MAX;
        if !held {
            HELD_REFUSALS.fetch_sub(1, Relaxed);
        }
        Slowed(held)
    }

    pub async fn wait(self) {
        if self.0 {
            tokio::time::sleep(REFUSAL_DELAY).await;
        }
    }
}

impl Drop for Slowed {
    fn drop(&mut self) {
        if self.0 {
            HELD_REFUSALS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Whether an HTTP request keeps something alive, by the exact shape of its route (a key or an
/// instance named "heartbeat" is not one): a native heartbeat
/// (`PUT|POST /api/v1/ns/{ns}/services/{svc}/instances/{id}/heartbeat`), a Consul check update
/// (`PUT /v1/agent/check/{pass|warn|fail}/{id}`) or session renewal
/// (`PUT /v1/session/renew/{id}`), a Eureka renewal (`PUT /eureka[/v2]/apps/{app}/{id}`).
pub fn http_liveness(method: &http::Method, path: &str) -> bool {
    let seg: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let put = method == http::Method::PUT;
    match seg.as_slice() {
        ["api", "v1", "ns", _, "services", _, "instances", _, "heartbeat"] => put || method == http::Method::POST,
        ["v1", "agent", "check", "pass" | "warn" | "fail", _] => put,
        ["v1", "session", "renew", _] => put,
        ["eureka", "apps", _, _] | ["eureka", "v2", "apps", _, _] => put,
        _ => false,
    }
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
        // The user the auth guard (outside this layer) established, if any.
        let key = ClientKey::of(quorate_api_http::access::caller(), ip);
        if let Err(wait) = limits.check(key.clone(), http_liveness(req.method(), req.uri().path())) {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let body = serde_json::json!({"error": {
                "code": "too_many_requests",
                "message": format!("too many requests from {key}: retry in {secs} s"),
            }});
            let mut resp = (http::StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
            resp.headers_mut().insert(http::header::RETRY_AFTER, secs.into());
            Slowed::enter().wait().await;
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
    fn clients_are_keyed_by_ipv4_address_or_ipv6_64() {
        let k = |s: &str| client_key(s.parse().unwrap());
        assert_eq!(k("10.1.2.3"), k("::ffff:10.1.2.3"));
        assert_ne!(k("10.1.2.3"), k("10.1.2.4"));
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        // A burst below one would refuse everything forever: it is raised to one.
        let addr = |s: &str| ClientKey::of(None, s.parse().unwrap());
        let l = Limiter::new(1.0, 0.5).unwrap();
        assert!(l.check(addr("10.0.0.1")).is_ok());
        // A rate so slow its retry time overflows is clamped, never a panic.
        let slow = Limiter::new(1e-20, 1.0).unwrap();
        assert!(slow.check(addr("10.0.0.1")).is_ok());
        assert!(slow.check(addr("10.0.0.1")).is_err());
    }

    #[test]
    fn authenticated_users_have_buckets_of_their_own_whatever_their_address() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let l = Limiter::new(1.0, 1.0).unwrap();
        assert!(l.check(ClientKey::of(Some("alice".into()), ip)).is_ok());
        assert!(l.check(ClientKey::of(Some("alice".into()), ip)).is_err(), "alice spent hers");
        assert!(l.check(ClientKey::of(Some("bob".into()), ip)).is_ok(), "bob, same address, has his own");
        assert!(l.check(ClientKey::of(None, ip)).is_ok(), "nobody at that address, its own too");
        assert_eq!(ClientKey::of(Some("u".into()), ip).to_string(), "user u");
    }

    #[test]
    fn liveness_requests_are_told_apart() {
        use http::Method;
        assert!(http_liveness(&Method::PUT, "/api/v1/ns/default/services/web/instances/i1/heartbeat"));
        assert!(http_liveness(&Method::PUT, "/v1/agent/check/pass/service:web"));
        assert!(http_liveness(&Method::PUT, "/v1/session/renew/abc"));
        assert!(http_liveness(&Method::PUT, "/eureka/apps/WEB/i1"));
        assert!(http_liveness(&Method::PUT, "/eureka/v2/apps/WEB/i1"));
        assert!(!http_liveness(&Method::POST, "/eureka/apps/WEB"));
        assert!(!http_liveness(&Method::PUT, "/v1/kv/a"));
        // Routes that only look like liveness: writes, charged as requests.
        assert!(!http_liveness(&Method::PUT, "/v1/kv/x/heartbeat"));
        assert!(!http_liveness(&Method::DELETE, "/v1/kv/x/heartbeat"));
        assert!(!http_liveness(&Method::PUT, "/api/v1/ns/x/services/y/instances/heartbeat"));
        assert!(!http_liveness(&Method::POST, "/eureka/apps/heartbeat"));
        assert!(!http_liveness(&Method::PUT, "/v1/agent/check/register"));
        assert!(!http_liveness(&Method::PUT, "/eureka/apps/WEB/i1/status"));
    }
}
