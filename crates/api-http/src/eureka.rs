//! Eureka's REST API over the same registry (namespace `default`), under `/eureka` and
//! `/eureka/v2`: register (JSON or XML), renew (404 when unknown, so the client registers
//! again), cancel, status overrides, and fetches of all applications, the delta, one
//! application and one instance. XML by default, JSON when the client accepts it.
//!
//! An application `MY-APP` is the service `my-app`; Eureka's `leaseInfo` becomes the instance's
//! TTL (`durationInSecs`) and heartbeat interval (`renewalIntervalInSecs`). Status maps to
//! health: `UP` passing, `STARTING`/`UNKNOWN` warning, `DOWN`/`OUT_OF_SERVICE` critical; health
//! is shown back as `UP` (passing, warning) or `DOWN` (critical). The delta is always empty and
//! carries the current `apps__hashcode`: a client whose copy differs fetches everything again,
//! which is Eureka's own reconciliation.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use quorate_kv::{Command, DeleteRangeRequest};
use quorate_registry::{instance_key, namespace_prefix, service_prefix, Health, Instance, Kind, RegisterRequest};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::ops::{consistency, instances_under, read_instance, write};
use crate::{Api, ApiError, Consistency};

const NS: &str = quorate_registry::DEFAULT_NAMESPACE;
/// Eureka's defaults for `leaseInfo`.
const DEFAULT_DURATION_S: u64 = 90;
const DEFAULT_RENEWAL_S: u64 = 30;

type ApiResult = Result<Response, ApiError>;

pub fn router(api: Arc<Api>) -> Router {
    let routes = Router::new()
        .route("/apps", get(all_apps))
        .route("/apps/", get(all_apps))
        .route("/apps/delta", get(delta))
        .route("/apps/{app}", get(one_app).post(register))
        .route("/apps/{app}/{id}", get(one_instance).put(renew).delete(cancel))
        .route("/apps/{app}/{id}/status", put(set_status).delete(clear_status))
        .route("/instances/{id}", get(instance_by_id))
        .with_state(api);
    Router::new().nest("/eureka", routes.clone()).nest("/eureka/v2", routes)
}

fn service_of(app: &str) -> String {
    app.to_ascii_lowercase()
}

fn num(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        Value::Object(m) => m.get("$").and_then(num),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn health_of(status: &str) -> Result<Health, ApiError> {
    match status.to_ascii_uppercase().as_str() {
        "UP" => Ok(Health::Passing),
        "STARTING" | "UNKNOWN" => Ok(Health::Warning),
        "DOWN" | "OUT_OF_SERVICE" => Ok(Health::Critical),
        other => Err(ApiError::bad_request("bad_status", format!("unknown Eureka status {other:?}"))),
    }
}

fn status_of(i: &Instance) -> &'static str {
    match i.health {
        Health::Passing | Health::Warning => "UP",
        Health::Critical => "DOWN",
    }
}

fn wants_json(headers: &HeaderMap) -> bool {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("json"))
}

/// Answer with `value` as the document `root`: XML unless the client accepts JSON.
fn document(
    api: &Api,
    headers: &HeaderMap,
    (rev, c): (i64, Consistency),
    shown: &[Instance],
    root: &str,
    value: Value,
) -> Response {
    let mut stamp = api.stamp(rev, c);
    crate::degraded_header(&mut stamp, shown);
    if wants_json(headers) {
        (stamp, axum::Json(json!({ root: value }))).into_response()
    } else {
        let body = crate::xml::to_xml(root, &value);
        (stamp, [(header::CONTENT_TYPE, "application/xml")], body).into_response()
    }
}

fn instance_doc(i: &Instance) -> Value {
    let mut metadata: serde_json::Map<String, Value> =
        i.meta.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
    if metadata.is_empty() {
        metadata.insert("@class".into(), json!("java.util.Collections$EmptyMap"));
    }
    let app = i.service.to_ascii_uppercase();
    json!({
        "instanceId": i.id,
        "hostName": i.address,
        "app": app,
        "ipAddr": i.address,
        "status": status_of(i),
        "overriddenstatus": "UNKNOWN",
        "port": {"$": i.port, "@enabled": "true"},
        "securePort": {"$": 443, "@enabled": "false"},
        "countryId": 1,
        "dataCenterInfo": {"@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo", "name": "MyOwn"},
        "leaseInfo": {
            "renewalIntervalInSecs": i.heartbeat_interval_s, "durationInSecs": i.ttl_s,
            "registrationTimestamp": 0, "lastRenewalTimestamp": 0, "evictionTimestamp": 0, "serviceUpTimestamp": 0,
        },
        "metadata": metadata,
        "vipAddress": i.service,
        "secureVipAddress": i.service,
        "isCoordinatingDiscoveryServer": "false",
        "lastUpdatedTimestamp": "0",
        "lastDirtyTimestamp": "0",
        "actionType": "ADDED",
    })
}

fn applications_doc(instances: &[Instance]) -> Value {
    let mut apps: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for i in instances {
        apps.entry(i.service.to_ascii_uppercase()).or_default().push(instance_doc(i));
        *counts.entry(status_of(i)).or_default() += 1;
    }
    let hashcode: String = counts.iter().map(|(s, n)| format!("{s}_{n}_")).collect();
    let application: Vec<Value> =
        apps.into_iter().map(|(name, instance)| json!({"name": name, "instance": instance})).collect();
    json!({"versions__delta": "1", "apps__hashcode": hashcode, "application": application})
}

async fn register(State(api): State<Arc<Api>>, Path(app): Path<String>, body: Bytes) -> ApiResult {
    let is_xml = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'<');
    let doc: Value = if is_xml {
        let (root, v) = crate::xml::from_xml(&body).map_err(|e| ApiError::bad_request("malformed_xml", e))?;
        json!({ root: v })
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request("malformed_json", format!("malformed registration: {e}")))?
    };
    let inst = doc.get("instance").ok_or_else(|| ApiError::bad_request("bad_request", "no instance in the body"))?;
    let field = |k: &str| inst.get(k).and_then(text);
    let id = field("instanceId")
        .or_else(|| {
            field("hostName")
                .map(|h| format!("{h}:{}:{}", app.to_ascii_lowercase(), inst.get("port").and_then(num).unwrap_or(0)))
        })
        .ok_or_else(|| ApiError::bad_request("bad_request", "instanceId or hostName is required"))?;
    let lease = inst.get("leaseInfo");
    let ttl_s = lease.and_then(|l| l.get("durationInSecs")).and_then(num).map(|n| n.max(1) as u64);
    let renewal_s = lease.and_then(|l| l.get("renewalIntervalInSecs")).and_then(num).map(|n| n.max(1) as u64);
    let meta: BTreeMap<String, String> = inst
        .get("metadata")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter().filter(|(k, _)| !k.starts_with('@')).filter_map(|(k, v)| text(v).map(|v| (k.clone(), v))).collect()
        })
        .unwrap_or_default();
    let req = RegisterRequest {
        address: field("ipAddr").or_else(|| field("hostName")).unwrap_or_default(),
        port: inst.get("port").and_then(num).unwrap_or(-1),
        zone: None,
        weight: None,
        tags: Vec::new(),
        meta,
        kind: Kind::Ephemeral,
        heartbeat_interval_s: Some(renewal_s.unwrap_or(DEFAULT_RENEWAL_S)),
        ttl_s: Some(ttl_s.unwrap_or(DEFAULT_DURATION_S)),
        check: None,
        fence: None,
    };
    let mut instance = req.into_instance(NS, &service_of(&app), &id, 0)?;
    instance.health = health_of(&field("status").unwrap_or_else(|| "UP".into()))?;
    crate::ops::store_instance(&api, instance).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn names(app: &str, id: Option<&str>) -> Result<(), ApiError> {
    quorate_registry::check_name("service", &service_of(app))?;
    if let Some(id) = id {
        quorate_registry::check_name("instance id", id)?;
    }
    Ok(())
}

async fn find(api: &Api, app: &str, id: &str) -> Result<Option<(Instance, i64)>, ApiError> {
    let key = instance_key(NS, &service_of(app), id);
    if let Some(found) = read_instance(api, &key) {
        return Ok(Some(found));
    }
    api.member.linearize().await?;
    Ok(read_instance(api, &key))
}

fn unknown(app: &str, id: &str) -> ApiError {
    ApiError::not_found("unknown_instance", format!("no instance {id} of application {app}"))
}

async fn renew(State(api): State<Arc<Api>>, Path((app, id)): Path<(String, String)>) -> ApiResult {
    names(&app, Some(&id))?;
    let Some((instance, _)) = find(&api, &app, &id).await? else { return Err(unknown(&app, &id)) };
    if instance.kind != Kind::Ephemeral || api.member.lease_keepalive(instance.lease).await?.is_none() {
        return Err(unknown(&app, &id));
    }
    api.heartbeats.accepted(crate::Dialect::Eureka);
    let rev = api.member.read(|s| s.revision());
    Ok((api.stamp(rev, Consistency::Stale), "").into_response())
}

async fn cancel(State(api): State<Arc<Api>>, Path((app, id)): Path<(String, String)>) -> ApiResult {
    names(&app, Some(&id))?;
    let Some((instance, _)) = find(&api, &app, &id).await? else { return Err(unknown(&app, &id)) };
    let key = instance_key(NS, &instance.service, &instance.id);
    let (_, rev) =
        write(&api, Command::DeleteRange(DeleteRangeRequest { key: key.into_bytes(), ..Default::default() })).await?;
    if instance.lease != 0 {
        let _ = api.member.write(Command::LeaseRevoke { id: instance.lease }).await;
    }
    Ok((api.stamp(rev, Consistency::Linearizable), "").into_response())
}

#[derive(Deserialize, Default)]
struct StatusParams {
    value: Option<String>,
}

async fn update_health(api: &Api, app: &str, id: &str, health: Health) -> ApiResult {
    names(app, Some(id))?;
    let Some((instance, mod_revision)) = find(api, app, id).await? else { return Err(unknown(app, id)) };
    let key = instance_key(NS, &instance.service, &instance.id).into_bytes();
    let txn = quorate_registry::replace_if_unchanged(&key, mod_revision, &Instance { health, ..instance });
    let (_, rev) = write(api, Command::Txn(txn)).await?;
    Ok((api.stamp(rev, Consistency::Linearizable), "").into_response())
}

async fn set_status(
    State(api): State<Arc<Api>>,
    Path((app, id)): Path<(String, String)>,
    Query(q): Query<StatusParams>,
) -> ApiResult {
    let value = q.value.ok_or_else(|| ApiError::bad_request("bad_status", "value is required"))?;
    update_health(&api, &app, &id, health_of(&value)?).await
}

async fn clear_status(State(api): State<Arc<Api>>, Path((app, id)): Path<(String, String)>) -> ApiResult {
    update_health(&api, &app, &id, Health::Passing).await
}

#[derive(Deserialize, Default)]
struct ReadParams {
    stale: Option<String>,
}

async fn all_apps(State(api): State<Arc<Api>>, headers: HeaderMap, Query(q): Query<ReadParams>) -> ApiResult {
    let c = consistency(&api, q.stale.is_some()).await?;
    let (all, rev) = instances_under(&api, &namespace_prefix(NS))?;
    let list: Vec<Instance> = all.into_iter().map(|(i, _)| i).collect();
    Ok(document(&api, &headers, (rev, c), &list, "applications", applications_doc(&list)))
}

async fn delta(State(api): State<Arc<Api>>, headers: HeaderMap, Query(q): Query<ReadParams>) -> ApiResult {
    let c = consistency(&api, q.stale.is_some()).await?;
    let (all, rev) = instances_under(&api, &namespace_prefix(NS))?;
    let list: Vec<Instance> = all.into_iter().map(|(i, _)| i).collect();
    let mut doc = applications_doc(&list);
    doc["application"] = json!([]);
    Ok(document(&api, &headers, (rev, c), &list, "applications", doc))
}

async fn one_app(
    State(api): State<Arc<Api>>,
    Path(app): Path<String>,
    headers: HeaderMap,
    Query(q): Query<ReadParams>,
) -> ApiResult {
    names(&app, None)?;
    let c = consistency(&api, q.stale.is_some()).await?;
    let (all, rev) = instances_under(&api, &service_prefix(NS, &service_of(&app)))?;
    if all.is_empty() {
        return Err(ApiError::not_found("unknown_application", format!("no application {app}")));
    }
    let shown: Vec<Instance> = all.into_iter().map(|(i, _)| i).collect();
    let instances: Vec<Value> = shown.iter().map(instance_doc).collect();
    let doc = json!({"name": app.to_ascii_uppercase(), "instance": instances});
    Ok(document(&api, &headers, (rev, c), &shown, "application", doc))
}

async fn one_instance(
    State(api): State<Arc<Api>>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
    Query(q): Query<ReadParams>,
) -> ApiResult {
    names(&app, Some(&id))?;
    let c = consistency(&api, q.stale.is_some()).await?;
    let Some((instance, _)) = read_instance(&api, &instance_key(NS, &service_of(&app), &id)) else {
        return Err(unknown(&app, &id));
    };
    let rev = api.member.read(|s| s.revision());
    let doc = instance_doc(&instance);
    Ok(document(&api, &headers, (rev, c), &[instance], "instance", doc))
}

async fn instance_by_id(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<ReadParams>,
) -> ApiResult {
    quorate_registry::check_name("instance id", &id)?;
    let c = consistency(&api, q.stale.is_some()).await?;
    let Some((instance, _)) = crate::ops::instance_by_id(&api, NS, &id)? else {
        return Err(ApiError::not_found("unknown_instance", format!("no instance {id}")));
    };
    let rev = api.member.read(|s| s.revision());
    let doc = instance_doc(&instance);
    Ok(document(&api, &headers, (rev, c), &[instance], "instance", doc))
}
