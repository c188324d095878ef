//! The registry over HTTP on `--listen-http`: quorate's native JSON API and the Consul and
//! Eureka dialects (ADR 0005).
//!
//! Handlers translate and validate; what an instance is and when it may be evicted live in
//! `quorate-registry`, ordering and leadership in `quorate-consensus`. Every answer says who
//! served it, at which revision and term, and whether it may be stale.

pub mod access;
mod consul;
mod consul_kv;
mod consul_lock;
mod duration;
mod edge;
mod error;
mod eureka;
mod native;
mod ops;
mod watch;
mod xml;

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue};
use quorate_consensus::Member;

pub use error::ApiError;

/// Keys Consul's KV API neither shows nor writes: quorate's own records live there.
pub(crate) const CONSUL_HIDDEN_PREFIX: &str = "/quorate/";

/// What the handlers share.
pub struct Api {
    pub member: Member,
    /// Heartbeats accepted here, by dialect (the server registers the family).
    pub heartbeats: Heartbeats,
}

/// The dialects a heartbeat arrives in: the `dialect` label of the server's
/// `quorate_registry_heartbeats_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Native,
    Consul,
    Eureka,
}

impl Dialect {
    pub const ALL: [Dialect; 3] = [Dialect::Native, Dialect::Consul, Dialect::Eureka];

    pub fn label(self) -> &'static str {
        match self {
            Dialect::Native => "native",
            Dialect::Consul => "consul",
            Dialect::Eureka => "eureka",
        }
    }
}

/// Heartbeats this member accepted (each renewed an instance's lease), by dialect. Every label
/// set is made once, here: a heartbeat costs one atomic add.
#[derive(Clone)]
pub struct Heartbeats {
    pub family: prometheus_client::metrics::family::Family<
        Vec<(&'static str, &'static str)>,
        prometheus_client::metrics::counter::Counter,
    >,
    by_dialect: [prometheus_client::metrics::counter::Counter; 3],
}

impl Default for Heartbeats {
    fn default() -> Self {
        let family: prometheus_client::metrics::family::Family<_, prometheus_client::metrics::counter::Counter> =
            Default::default();
        let by_dialect = Dialect::ALL.map(|d| family.get_or_create(&vec![("dialect", d.label())]).clone());
        Heartbeats { family, by_dialect }
    }
}

impl Heartbeats {
    pub fn accepted(&self, dialect: Dialect) {
        self.by_dialect[dialect as usize].inc();
    }
}

/// The native API's routes, to be merged into the member's HTTP router.
pub fn router(api: Arc<Api>) -> axum::Router {
    let stamp = api.clone();
    let routes = native::router(api.clone())
        .merge(consul::router(api.clone()))
        .merge(consul_kv::router(api.clone()))
        .merge(eureka::router(api));
    with_edge(routes)
        // Errors (and anything else not stamped by its handler) still say who answered.
        .layer(axum::middleware::map_response(move |mut resp: axum::response::Response| {
            let api = stamp.clone();
            async move {
                if !resp.headers().contains_key("x-quorate-member") {
                    let rev = api.member.read(|s| s.revision());
                    for (name, value) in api.stamp(rev, Consistency::Linearizable).iter() {
                        resp.headers_mut().insert(name.clone(), value.clone());
                    }
                }
                resp
            }
        }))
}

/// Wrap `routes` in what every answer passes through (`edge`): a caught panic is a 500 with a
/// JSON body, every refusal is JSON, and a refused blocking query is not answered at once.
pub(crate) fn with_edge(routes: axum::Router) -> axum::Router {
    edge::install_panic_location_hook();
    routes.layer(axum::middleware::from_fn(edge::guard))
}

/// How a read was served.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Consistency {
    /// After a ReadIndex round: linearizable.
    Linearizable,
    /// From this member's state as it is (`?stale`).
    Stale,
}

/// `X-Quorate-Degraded: <reason>` when the eviction brake holds any of `instances` (suspect,
/// or a check's change held): how the Consul and Eureka dialects (whose bodies have no such
/// field) say it.
pub(crate) fn degraded_header<'a>(
    headers: &mut HeaderMap,
    instances: impl IntoIterator<Item = &'a quorate_registry::Instance>,
) {
    let reason = instances.into_iter().find_map(|i| i.degraded_reason());
    if let Some(reason) = reason {
        let clean: String = reason.chars().filter(|c| c.is_ascii() && !c.is_ascii_control()).collect();
        if let Ok(v) = HeaderValue::from_str(&clean) {
            headers.insert("x-quorate-degraded", v);
        }
    }
}

impl Api {
    /// Headers every native answer carries (PRODUCT promise 6).
    pub(crate) fn stamp(&self, revision: i64, consistency: Consistency) -> HeaderMap {
        let st = self.member.status();
        let mut h = HeaderMap::new();
        let mut put = |name: &'static str, value: String| {
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(name, v);
            }
        };
        put("x-quorate-revision", revision.to_string());
        put("x-quorate-term", st.term.to_string());
        put("x-quorate-member", format!("{:x}", st.id));
        put("x-quorate-leader", st.leader.map(|l| format!("{l:x}")).unwrap_or_default());
        if consistency == Consistency::Stale {
            put("x-quorate-stale", "true".into());
            let age = self.member.staleness_ms().map(|ms| ms.to_string()).unwrap_or_else(|| "unknown".into());
            put("x-quorate-stale-age-ms", age);
        }
        h
    }
}
