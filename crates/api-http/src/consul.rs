//! Consul's HTTP API over the same registry (namespace `default`): agent service register and
//! deregister, TTL check pass/warn/fail, agent services and self, catalog services and
//! service, health service, status leader and peers, with `X-Consul-Index`,
//! `X-Consul-KnownLeader`, `X-Consul-LastContact` and blocking queries (`index`, `wait`).
//!
//! Consul matches JSON keys case-insensitively (Python clients send `name`, Go clients
//! `Name`): bodies are parsed with their field names lower-cased (user metadata keys kept).
//! A service with a TTL check is ephemeral (its TTL is its lease; `check/pass` renews it) and
//! starts `critical` until its first pass, as in Consul; one without is persistent.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use quorate_kv::{Command, DeleteRangeRequest};
use quorate_registry::{instance_key, namespace_prefix, service_prefix, Health, Instance, Kind, RegisterRequest};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::ops::{consistency, instances_under, write};
use crate::{Api, ApiError, Consistency};

const NS: &str = quorate_registry::DEFAULT_NAMESPACE;
const DATACENTER: &str = "dc1";
/// The node every instance is listed under: quorate has no per-host agents.
const NODE: &str = "quorate";

type ApiResult = Result<Response, ApiError>;

pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/v1/agent/service/register", put(register))
        .route("/v1/agent/service/deregister/{id}", put(deregister))
        .route("/v1/agent/check/{verb}/{check}", put(check_update))
        .route("/v1/agent/services", get(agent_services))
        .route("/v1/agent/self", get(agent_self))
        .route("/v1/catalog/services", get(catalog_services))
        .route("/v1/catalog/service/{name}", get(catalog_service))
        .route("/v1/health/service/{name}", get(health_service))
        .route("/v1/status/leader", get(status_leader))
        .route("/v1/status/peers", get(status_peers))
        .with_state(api)
}

/// Lower-case an object's field names; `meta` (user data) keeps its keys, `check`, `checks`
/// and `weights` are lower-cased too.
pub(crate) fn lower_keys(v: Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let k = k.to_ascii_lowercase();
                    let v = match k.as_str() {
                        "check" | "weights" => lower_keys(v),
                        "checks" => match v {
                            Value::Array(items) => Value::Array(items.into_iter().map(lower_keys).collect()),
                            other => other,
                        },
                        _ => v,
                    };
                    (k, v)
                })
                .collect(),
        ),
        other => other,
    }
}

/// A duration field of a Consul body (Go's syntax, see `crate::duration`), non-negative.
pub(crate) fn body_duration(field: &str, value: &str) -> Result<Duration, ApiError> {
    crate::duration::parse_non_negative(value)
        .map_err(|e| ApiError::bad_request("bad_duration", format!("invalid {field} {value:?}: {e}")))
}

#[derive(Deserialize, Default)]
struct ConsulWeights {
    passing: Option<i64>,
}

#[derive(Deserialize, Default, Clone)]
struct ConsulCheck {
    checkid: Option<String>,
    ttl: Option<String>,
    status: Option<String>,
    http: Option<String>,
    tcp: Option<String>,
    interval: Option<String>,
    timeout: Option<String>,
    deregistercriticalserviceafter: Option<String>,
}

#[derive(Deserialize, Default)]
struct ConsulService {
    name: String,
    id: Option<String>,
    address: Option<String>,
    port: Option<i64>,
    tags: Option<Vec<String>>,
    meta: Option<BTreeMap<String, String>>,
    weights: Option<ConsulWeights>,
    check: Option<ConsulCheck>,
    checks: Option<Vec<ConsulCheck>>,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request("bad_request", msg)
}

fn health_of(status: &str) -> Result<Health, ApiError> {
    match status {
        "passing" => Ok(Health::Passing),
        "warning" => Ok(Health::Warning),
        "critical" => Ok(Health::Critical),
        other => Err(bad(format!("invalid check status {other:?}"))),
    }
}

fn status_of(i: &Instance) -> &'static str {
    match (i.suspect, i.health) {
        (true, _) | (_, Health::Critical) => "critical",
        (_, Health::Warning) => "warning",
        (_, Health::Passing) => "passing",
    }
}

async fn register(State(api): State<Arc<Api>>, body: Bytes) -> ApiResult {
    let raw: Value = serde_json::from_slice(&body).map_err(|e| bad(format!("Request decode failed: {e}")))?;
    let svc: ConsulService =
        serde_json::from_value(lower_keys(raw)).map_err(|e| bad(format!("Request decode failed: {e}")))?;
    if svc.name.is_empty() {
        return Err(bad("Missing service name"));
    }
    let id = svc.id.clone().filter(|i| !i.is_empty()).unwrap_or_else(|| svc.name.clone());
    let checks: Vec<ConsulCheck> =
        svc.check.clone().into_iter().chain(svc.checks.clone().unwrap_or_default()).collect();
    let ttl_check = checks.iter().find(|c| c.ttl.is_some()).cloned();
    let ttl = match ttl_check.as_ref().and_then(|c| c.ttl.as_deref()) {
        Some(t) => Some(body_duration("TTL", t)?),
        None => None,
    };
    let ttl_s = ttl.map(|d| crate::duration::ceil_secs(d).max(1));
    let req = RegisterRequest {
        address: svc.address.clone().filter(|a| !a.is_empty()).unwrap_or_else(|| "127.0.0.1".into()),
        port: svc.port.unwrap_or(0),
        zone: None,
        weight: svc.weights.as_ref().and_then(|w| w.passing),
        tags: svc.tags.clone().unwrap_or_default(),
        meta: svc.meta.clone().unwrap_or_default(),
        kind: if ttl_s.is_some() { Kind::Ephemeral } else { Kind::Persistent },
        heartbeat_interval_s: ttl_s.map(|t| (t / 3).max(1)),
        ttl_s,
        check: None,
        fence: None,
    };
    let active = checks.iter().find(|c| c.http.is_some() || c.tcp.is_some());
    let seconds = |d: &Option<String>, default: u64| -> Result<u64, ApiError> {
        match d {
            Some(d) => body_duration("duration", d).map(|d| crate::duration::ceil_secs(d).max(1)),
            None => Ok(default),
        }
    };
    let check = match active {
        Some(c) => Some(quorate_registry::CheckSpec {
            http: c.http.clone(),
            tcp: c.tcp.clone(),
            interval_s: seconds(&c.interval, 10)?,
            timeout_s: seconds(&c.timeout, 2)?.min(seconds(&c.interval, 10)?),
            failures_before_critical: 3,
            successes_before_passing: 1,
            deregister_critical_after_s: match &c.deregistercriticalserviceafter {
                Some(d) => Some(seconds(&Some(d.clone()), 0)?),
                None => None,
            },
        }),
        None => None,
    };
    let req = RegisterRequest { check, ..req };
    let mut instance = req.into_instance_with(NS, &svc.name, &id, 0, false)?;
    if let Some(check) = &ttl_check {
        instance.check_id = Some(check.checkid.clone().unwrap_or_else(|| format!("service:{id}")));
        // A TTL check is critical until its first pass, unless registered with a status.
        instance.health = health_of(check.status.as_deref().unwrap_or("critical"))?;
    }
    let (_, revision) = crate::ops::store_instance(&api, instance).await?;
    Ok((consul_headers(&api, revision, Consistency::Linearizable), "").into_response())
}

/// The instance with Consul service id `id` (ids are unique per agent; quorate looks across
/// every service of the default namespace).
/// The TTL-checked instance behind check `check`. `service:<id>` (what clients use) is found
/// from the keys; a custom check id needs every record read.
fn find_check(api: &Api, check: &str) -> Result<Option<(Instance, i64)>, ApiError> {
    let found = match check.strip_prefix("service:") {
        Some(id) => crate::ops::instance_by_id(api, NS, id)?,
        None => instances_under(api, &namespace_prefix(NS))?
            .0
            .into_iter()
            .find(|(i, _)| i.check_id.as_deref() == Some(check)),
    };
    Ok(found.filter(|(i, _)| i.check_id.as_deref() == Some(check)))
}

async fn deregister(State(api): State<Arc<Api>>, Path(id): Path<String>) -> ApiResult {
    api.member.linearize().await?;
    let Some((instance, _)) = crate::ops::instance_by_id(&api, NS, &id)? else {
        return Err(ApiError::not_found("unknown_service", format!("Unknown service ID {id:?}")));
    };
    let key = instance_key(NS, &instance.service, &instance.id);
    let (_, revision) =
        write(&api, Command::DeleteRange(DeleteRangeRequest { key: key.into_bytes(), ..Default::default() })).await?;
    if instance.lease != 0 {
        let _ = api.member.write(Command::LeaseRevoke { id: instance.lease }).await;
    }
    Ok((consul_headers(&api, revision, Consistency::Linearizable), "").into_response())
}

/// `PUT /v1/agent/check/{pass,warn,fail}/{check id}`: renews the TTL and records the status.
async fn check_update(State(api): State<Arc<Api>>, Path((verb, check)): Path<(String, String)>) -> ApiResult {
    let health = match verb.as_str() {
        "pass" => Health::Passing,
        "warn" => Health::Warning,
        "fail" => Health::Critical,
        other => return Err(ApiError::not_found("unknown_endpoint", format!("no such check verb {other:?}"))),
    };
    // Local first (check passes are heartbeats); a miss may only mean this member lags.
    let found = match find_check(&api, &check)? {
        Some(f) => Some(f),
        None => {
            api.member.linearize().await?;
            find_check(&api, &check)?
        }
    };
    let Some((instance, mod_revision)) = found else {
        return Err(ApiError::not_found("unknown_check", format!("CheckID {check:?} does not have associated TTL")));
    };
    // A check update is a heartbeat: the caller must be allowed to write its service.
    let key = instance_key(NS, &instance.service, &instance.id);
    crate::access::permit(&api.member, quorate_kv::auth::PermType::Write, key.as_bytes(), &[])?;
    if api.member.lease_keepalive(instance.lease).await?.is_none() {
        return Err(ApiError::not_found(
            "lease_expired",
            format!("CheckID {check:?}: the service missed its TTL and was deregistered; register it again"),
        ));
    }
    api.heartbeats.accepted(crate::Dialect::Consul);
    let mut revision = api.member.read(|s| s.revision());
    if instance.health != health || instance.suspect {
        let key = instance_key(NS, &instance.service, &instance.id).into_bytes();
        let updated = Instance { health, suspect: false, suspect_reason: None, ..instance };
        let txn = quorate_registry::replace_if_unchanged(&key, mod_revision, &updated);
        revision = write(&api, Command::Txn(txn)).await?.1;
    }
    Ok((consul_headers(&api, revision, Consistency::Linearizable), "").into_response())
}

#[derive(Deserialize, Default)]
struct ReadParams {
    index: Option<i64>,
    wait: Option<String>,
    stale: Option<String>,
    passing: Option<String>,
    tag: Option<String>,
}

impl ReadParams {
    /// `?passing`, `?passing=true` and `?passing=1` filter; `?passing=false` does not.
    fn passing(&self) -> bool {
        self.passing.as_deref().is_some_and(|v| !matches!(v, "false" | "0"))
    }
}

pub(crate) fn consul_headers(api: &Api, revision: i64, consistency: Consistency) -> HeaderMap {
    let mut h = api.stamp(revision, consistency);
    let st = api.member.status();
    let contact = match consistency {
        Consistency::Linearizable => 0,
        Consistency::Stale => api.member.staleness_ms().unwrap_or(0),
    };
    for (name, value) in [
        ("x-consul-index", revision.max(1).to_string()),
        ("x-consul-knownleader", st.leader.is_some().to_string()),
        ("x-consul-lastcontact", contact.to_string()),
    ] {
        h.insert(name, HeaderValue::from_str(&value).expect("ascii"));
    }
    h
}

/// Block (if asked) until `prefix` changes after `?index`, then read with the asked consistency.
async fn blocking_read(api: &Api, prefix: &str, q: &ReadParams) -> Result<(Vec<Instance>, HeaderMap), ApiError> {
    crate::ops::block_if_asked(api, prefix, q.index, q.wait.as_deref()).await?;
    let c = consistency(api, q.stale.is_some()).await?;
    let (all, rev) = instances_under(api, prefix)?;
    let list: Vec<Instance> =
        all.into_iter().map(|(i, _)| i).filter(|i| q.tag.as_ref().is_none_or(|t| i.tags.contains(t))).collect();
    let mut headers = consul_headers(api, rev, c);
    crate::degraded_header(&mut headers, &list);
    Ok((list, headers))
}

fn agent_service(i: &Instance) -> Value {
    json!({
        "ID": i.id, "Service": i.service, "Tags": i.tags, "Meta": i.meta, "Port": i.port, "Address": i.address,
        "Weights": {"Passing": i.weight, "Warning": 1}, "EnableTagOverride": false, "Datacenter": DATACENTER,
    })
}

async fn agent_services(State(api): State<Arc<Api>>, Query(q): Query<ReadParams>) -> ApiResult {
    let (list, headers) = blocking_read(&api, &namespace_prefix(NS), &q).await?;
    let map: BTreeMap<String, Value> = list.iter().map(|i| (i.id.clone(), agent_service(i))).collect();
    Ok((headers, Json(map)).into_response())
}

async fn catalog_services(State(api): State<Arc<Api>>, Query(q): Query<ReadParams>) -> ApiResult {
    let (list, headers) = blocking_read(&api, &namespace_prefix(NS), &q).await?;
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in &list {
        let tags = map.entry(i.service.clone()).or_default();
        for t in &i.tags {
            if !tags.contains(t) {
                tags.push(t.clone());
            }
        }
    }
    Ok((headers, Json(map)).into_response())
}

fn check_name(name: &str) -> Result<(), ApiError> {
    quorate_registry::check_name("service", name).map_err(ApiError::from)
}

async fn catalog_service(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
    Query(q): Query<ReadParams>,
) -> ApiResult {
    check_name(&name)?;
    let (list, headers) = blocking_read(&api, &service_prefix(NS, &name), &q).await?;
    let out: Vec<Value> = list
        .iter()
        .map(|i| {
            json!({
                "ID": "", "Node": NODE, "Address": i.address, "Datacenter": DATACENTER,
                "TaggedAddresses": null, "NodeMeta": {},
                "ServiceID": i.id, "ServiceName": i.service, "ServiceTags": i.tags, "ServiceAddress": i.address,
                "ServicePort": i.port, "ServiceMeta": i.meta, "ServiceWeights": {"Passing": i.weight, "Warning": 1},
                "ServiceEnableTagOverride": false,
            })
        })
        .collect();
    Ok((headers, Json(out)).into_response())
}

async fn health_service(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
    Query(q): Query<ReadParams>,
) -> ApiResult {
    check_name(&name)?;
    let (list, headers) = blocking_read(&api, &service_prefix(NS, &name), &q).await?;
    let out: Vec<Value> = list
        .iter()
        .filter(|i| !q.passing() || status_of(i) == "passing")
        .map(|i| {
            let check_id = i.check_id.clone().unwrap_or_else(|| format!("service:{}", i.id));
            let output = i.suspect_reason.clone().map(|r| format!("suspect: {r}")).unwrap_or_default();
            json!({
                "Node": {"ID": "", "Node": NODE, "Address": i.address, "Datacenter": DATACENTER},
                "Service": agent_service(i),
                "Checks": [
                    {"Node": NODE, "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "passing",
                     "ServiceID": "", "ServiceName": "", "Output": "", "Type": ""},
                    {"Node": NODE, "CheckID": check_id, "Name": format!("Service '{}' check", i.service),
                     "Status": status_of(i), "ServiceID": i.id, "ServiceName": i.service, "Output": output,
                     "Type": if i.kind == Kind::Ephemeral { "ttl" } else { "" }},
                ],
            })
        })
        .collect();
    Ok((headers, Json(out)).into_response())
}

/// `host:port` of a peer URL.
fn peer_addr(url: &str) -> String {
    url.split("://").last().unwrap_or(url).trim_end_matches('/').to_string()
}

async fn status_leader(State(api): State<Arc<Api>>) -> ApiResult {
    let st = api.member.status();
    let rev = api.member.read(|s| s.revision());
    let addr = st
        .leader
        .and_then(|l| api.member.members().into_iter().find(|m| m.id == l))
        .and_then(|m| m.peer_urls.first().map(|u| peer_addr(u)))
        .unwrap_or_default();
    Ok((consul_headers(&api, rev, Consistency::Stale), Json(addr)).into_response())
}

async fn status_peers(State(api): State<Arc<Api>>) -> ApiResult {
    let rev = api.member.read(|s| s.revision());
    let peers: Vec<String> = api
        .member
        .members()
        .into_iter()
        .filter(|m| !m.is_learner)
        .filter_map(|m| m.peer_urls.first().map(|u| peer_addr(u)))
        .collect();
    Ok((consul_headers(&api, rev, Consistency::Stale), Json(peers)).into_response())
}

async fn agent_self(State(api): State<Arc<Api>>) -> ApiResult {
    let st = api.member.status();
    let me = api.member.members().into_iter().find(|m| m.id == st.id);
    let name = me.as_ref().map(|m| m.name.clone()).unwrap_or_default();
    let addr = me.as_ref().and_then(|m| m.peer_urls.first().map(|u| peer_addr(u))).unwrap_or_default();
    let body = json!({
        "Config": {"Datacenter": DATACENTER, "NodeName": name, "NodeID": format!("{:x}", st.id), "Server": true,
                   "Version": concat!(env!("CARGO_PKG_VERSION"), " (quorate)")},
        "Member": {"Name": name, "Addr": addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(""), "Status": 1},
    });
    let rev = api.member.read(|s| s.revision());
    Ok((consul_headers(&api, rev, Consistency::Stale), Json(body)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_lowercased_but_meta_keys_are_not() {
        let v = lower_keys(
            json!({"Name": "web", "Meta": {"Version": "1"}, "Check": {"TTL": "10s"}, "Checks": [{"CheckID": "c"}]}),
        );
        assert_eq!(
            v,
            json!({"name": "web", "meta": {"Version": "1"}, "check": {"ttl": "10s"}, "checks": [{"checkid": "c"}]})
        );
    }
}
