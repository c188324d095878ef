//! quorate's native registry API:
//!
//! - `PUT    /api/v1/ns/{ns}/services/{svc}/instances/{id}`            register or update
//! - `DELETE /api/v1/ns/{ns}/services/{svc}/instances/{id}`            deregister
//! - `PUT    /api/v1/ns/{ns}/services/{svc}/instances/{id}/heartbeat`  renew (404: register again)
//! - `GET    /api/v1/ns/{ns}/services`                                 services and instance counts
//! - `GET    /api/v1/ns/{ns}/services/{svc}/instances`                 discovery, with
//!   `healthy`, `zone`, `prefer_zone`, `tag`, blocking `index` + `wait`, and `stale`

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use quorate_kv::{Command, DeleteRangeRequest, RangeRequest};
use quorate_registry::{instance_key, namespace_prefix, parse_instance_key, service_prefix, Instance, Kind};
use serde::Deserialize;
use serde_json::json;

use crate::ops::{consistency, prefix_range, read_instance, write};
use crate::{Api, ApiError, Consistency};

type ApiResult = Result<Response, ApiError>;

pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/api/v1/ns/{ns}/services", get(list_services))
        .route("/api/v1/ns/{ns}/services/{svc}/instances", get(list_instances))
        .route("/api/v1/ns/{ns}/services/{svc}/instances/{id}", put(register).delete(deregister).get(get_instance))
        .route("/api/v1/ns/{ns}/services/{svc}/instances/{id}/heartbeat", put(heartbeat))
        .route("/api/v1/ns/{ns}/watch", get(crate::watch::watch))
        .with_state(api)
}

fn check_names(ns: &str, svc: Option<&str>, id: Option<&str>) -> Result<(), ApiError> {
    quorate_registry::check_name("namespace", ns)?;
    if let Some(svc) = svc {
        quorate_registry::check_name("service", svc)?;
    }
    if let Some(id) = id {
        quorate_registry::check_name("instance id", id)?;
    }
    Ok(())
}

async fn register(
    State(api): State<Arc<Api>>,
    Path((ns, svc, id)): Path<(String, String, String)>,
    body: Bytes,
) -> ApiResult {
    let req: quorate_registry::RegisterRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("malformed_json", format!("malformed registration: {e}")))?;
    // Validate everything before anything is written.
    let fence = crate::ops::parse_fence(req.fence.as_deref())?;
    let instance = req.into_instance(&ns, &svc, &id, 0)?;
    let (instance, revision) = crate::ops::store_fenced(&api, instance, fence).await?;
    let body = json!({
        "instance": instance,
        "heartbeat_interval_s": instance.heartbeat_interval_s,
        "ttl_s": instance.ttl_s,
        "revision": revision,
    });
    Ok((api.stamp(revision, Consistency::Linearizable), Json(body)).into_response())
}

#[derive(Deserialize, Default)]
struct FenceParam {
    fence: Option<String>,
}

async fn deregister(
    State(api): State<Arc<Api>>,
    Path((ns, svc, id)): Path<(String, String, String)>,
    Query(q): Query<FenceParam>,
) -> ApiResult {
    check_names(&ns, Some(&svc), Some(&id))?;
    let fence = crate::ops::parse_fence(q.fence.as_deref())?;
    let key = instance_key(&ns, &svc, &id);
    api.member.linearize().await?;
    let Some((instance, _)) = read_instance(&api, &key) else {
        return Err(ApiError::not_found("unknown_instance", format!("no instance {id} in {ns}/{svc}")));
    };
    let delete = Command::DeleteRange(DeleteRangeRequest { key: key.into_bytes(), ..Default::default() });
    let (_, revision) = write(&api, delete.fenced(fence)).await?;
    if instance.lease != 0 {
        // Gone already is fine: the instance is deregistered either way.
        let _ = api.member.write(Command::LeaseRevoke { id: instance.lease }).await;
    }
    Ok((api.stamp(revision, Consistency::Linearizable), Json(json!({"deregistered": id, "revision": revision})))
        .into_response())
}

async fn heartbeat(State(api): State<Arc<Api>>, Path((ns, svc, id)): Path<(String, String, String)>) -> ApiResult {
    check_names(&ns, Some(&svc), Some(&id))?;
    let key = instance_key(&ns, &svc, &id);
    // Local first (heartbeats are frequent); a miss may only mean this member lags.
    let found = match read_instance(&api, &key) {
        Some(found) => Some(found),
        None => {
            api.member.linearize().await?;
            read_instance(&api, &key)
        }
    };
    let Some((instance, _)) = found else {
        return Err(ApiError::not_found("unknown_instance", format!("no instance {id} in {ns}/{svc}; register it")));
    };
    if instance.kind != Kind::Ephemeral {
        return Err(ApiError::bad_request("not_ephemeral", "persistent instances are checked, not heartbeaten"));
    }
    match api.member.lease_keepalive(instance.lease).await? {
        Some(ttl) => {
            api.heartbeats.accepted(crate::Dialect::Native);
            let rev = api.member.read(|s| s.revision());
            let body = json!({"ttl_s": ttl, "heartbeat_interval_s": instance.heartbeat_interval_s});
            Ok((api.stamp(rev, Consistency::Stale), Json(body)).into_response())
        }
        None => Err(ApiError::not_found(
            "lease_expired",
            format!("instance {id} missed its heartbeats and its lease expired; register it again"),
        )),
    }
}

#[derive(Deserialize, Default)]
struct ReadParams {
    stale: Option<String>,
}

async fn get_instance(
    State(api): State<Arc<Api>>,
    Path((ns, svc, id)): Path<(String, String, String)>,
    Query(q): Query<ReadParams>,
) -> ApiResult {
    check_names(&ns, Some(&svc), Some(&id))?;
    let consistency = consistency(&api, q.stale.is_some()).await?;
    let key = instance_key(&ns, &svc, &id);
    let Some((instance, _)) = read_instance(&api, &key) else {
        return Err(ApiError::not_found("unknown_instance", format!("no instance {id} in {ns}/{svc}")));
    };
    let rev = api.member.read(|s| s.revision());
    Ok((api.stamp(rev, consistency), Json(instance)).into_response())
}

async fn list_services(State(api): State<Arc<Api>>, Path(ns): Path<String>, Query(q): Query<ReadParams>) -> ApiResult {
    check_names(&ns, None, None)?;
    let consistency = consistency(&api, q.stale.is_some()).await?;
    let req = RangeRequest { keys_only: true, ..prefix_range(&namespace_prefix(&ns)) };
    let (r, rev) = api.member.read(|s| (s.range(&req), s.revision()));
    let mut services: BTreeMap<String, usize> = BTreeMap::new();
    for kv in r?.kvs {
        if let Some((_, svc, _)) = parse_instance_key(&kv.key) {
            *services.entry(svc).or_default() += 1;
        }
    }
    // Namespaces exist while they hold instances (`default` always does).
    if services.is_empty() && ns != quorate_registry::DEFAULT_NAMESPACE {
        return Err(ApiError::not_found("unknown_namespace", format!("no namespace {ns}")));
    }
    let list: Vec<_> = services.into_iter().map(|(name, n)| json!({"name": name, "instances": n})).collect();
    Ok((api.stamp(rev, consistency), Json(json!({"namespace": ns, "services": list, "revision": rev}))).into_response())
}

#[derive(Deserialize, Default)]
struct ListParams {
    healthy: Option<bool>,
    zone: Option<String>,
    prefer_zone: Option<String>,
    tag: Option<String>,
    index: Option<i64>,
    wait: Option<String>,
    stale: Option<String>,
}

async fn list_instances(
    State(api): State<Arc<Api>>,
    Path((ns, svc)): Path<(String, String)>,
    Query(q): Query<ListParams>,
) -> ApiResult {
    check_names(&ns, Some(&svc), None)?;
    let prefix = service_prefix(&ns, &svc);
    crate::ops::block_if_asked(&api, &prefix, q.index, q.wait.as_deref()).await?;
    let consistency = consistency(&api, q.stale.is_some()).await?;
    let (all, rev) = crate::ops::instances_under(&api, &prefix)?;
    // A service exists while it has instances. A blocking query may wait for one to appear.
    if all.is_empty() && q.index.is_none() {
        return Err(ApiError::not_found("unknown_service", format!("no service {svc} in namespace {ns}")));
    }
    let all: Vec<Instance> = all.into_iter().map(|(i, _)| i).collect();
    let mut chosen: Vec<&Instance> = all
        .iter()
        .filter(|i| !q.healthy.unwrap_or(false) || i.is_healthy())
        .filter(|i| q.zone.as_ref().is_none_or(|z| i.zone == *z))
        .filter(|i| q.tag.as_ref().is_none_or(|t| i.tags.contains(t)))
        .collect();
    if let Some(z) = &q.prefer_zone {
        // Same-zone healthy instances when there are any, else every healthy one.
        let local: Vec<&Instance> = chosen.iter().copied().filter(|i| i.zone == *z && i.is_healthy()).collect();
        chosen = if local.is_empty() { chosen.into_iter().filter(|i| i.is_healthy()).collect() } else { local };
    }
    let degraded = all.iter().find_map(|i| i.degraded_reason());
    let body = json!({
        "namespace": ns,
        "service": svc,
        "revision": rev,
        "degraded": degraded.is_some(),
        "degraded_reason": degraded,
        "instances": chosen,
    });
    let mut headers = api.stamp(rev, consistency);
    crate::degraded_header(&mut headers, &all);
    Ok((headers, Json(body)).into_response())
}
