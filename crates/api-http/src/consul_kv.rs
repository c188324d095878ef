//! Consul's KV and sessions over the same MVCC keyspace the etcd API serves: Consul key `a/b`
//! is the key `a/b` (so `etcdctl get a/b` sees it), `CreateIndex`/`ModifyIndex` are its create
//! and mod revisions. A session is a lease that lives twice the session's TTL after each
//! renewal (Consul's `SessionTTLMultiplier`), with its record (TTL as asked, behavior, lock
//! delay) attached to it. Locks (`?acquire`, `?release`), what a session's end does to them
//! (`Behavior: release|delete`) and the lock delay that follows are `consul_lock`'s.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use quorate_kv::{
    Command, CommandResponse, Compare, CompareResult, CompareTarget, DeleteRangeRequest, KeyValue, PutRequest,
    RangeRequest, RequestOp, ResponseOp, TxnRequest,
};
use serde::Deserialize;
use serde_json::{json, Value};

// Consul KV writes carry lock records the caller does not name: checked at the door (by key,
// `access::need`), proposed as the member.
use crate::ops::{consistency, prefix_range, write_as_member as write};
use crate::{Api, ApiError, Consistency};

/// Where session records live (attached to the session's lease, so they end with it).
pub(crate) const SESSION_PREFIX: &str = "/quorate/consul/sessions/";
/// Consul's `SessionTTLMultiplier`: a session is invalidated no earlier than twice its TTL
/// after its last renewal. Clients (HA managers such as Patroni) rely on it and ask for half
/// the TTL they need, so the session's lease lives `SESSION_TTL_MULTIPLIER` x the asked TTL,
/// while every session answer still reports the TTL as asked.
const SESSION_TTL_MULTIPLIER: u32 = 2;
/// Consul's bounds on a session's TTL (`SessionTTLMin`, `SessionTTLMax`).
const SESSION_TTL_MIN: Duration = Duration::from_secs(10);
const SESSION_TTL_MAX: Duration = Duration::from_secs(86_400);
/// Consul's default lock delay, and its largest (`MaxLockDelay`).
const LOCK_DELAY_DEFAULT: Duration = Duration::from_secs(15);
const LOCK_DELAY_MAX: Duration = Duration::from_secs(60);
/// A bare number below this is a lock delay in seconds, else in nanoseconds (Consul's
/// `lockDelayMinThreshold`: old clients sent seconds, Go's client sends nanoseconds).
const LOCK_DELAY_SECONDS_BELOW: u64 = 1000;

type ApiResult = Result<Response, ApiError>;

pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/v1/kv/", get(kv_get_all).delete(kv_delete_all))
        .route("/v1/kv/{*key}", get(kv_get).put(kv_put).delete(kv_delete))
        .route("/v1/session/create", put(session_create))
        .route("/v1/session/renew/{id}", put(session_renew))
        .route("/v1/session/destroy/{id}", put(session_destroy))
        .route("/v1/session/info/{id}", get(session_info))
        .route("/v1/session/list", get(session_list))
        // Lock delays are tracked from the member's start, not from the first acquisition.
        .with_state({
            crate::consul_lock::delays(&api);
            api
        })
}

fn session_id(lease: i64) -> String {
    let l = lease as u64;
    format!("{:08x}-{:04x}-{:04x}-8000-000000000000", l >> 32, (l >> 16) & 0xffff, l & 0xffff)
}

fn lease_of(session: &str) -> Result<i64, ApiError> {
    let hex: String = session.chars().filter(|c| *c != '-').take(16).collect();
    u64::from_str_radix(&hex, 16)
        .map(|l| l as i64)
        .map_err(|_| ApiError::bad_request("bad_session", format!("invalid session {session:?}")))
}

fn b64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            out.push(if i <= c.len() { T[(n >> shift & 63) as usize] as char } else { '=' });
        }
    }
    out
}

/// A key as Consul shows it; `holder` is its lock's session and LockIndex (`consul_lock`).
fn entry(kv: &KeyValue, holder: Option<&(Option<String>, u64)>) -> Value {
    let mut e = json!({
        "LockIndex": holder.map_or(0, |h| h.1), "Key": String::from_utf8_lossy(&kv.key), "Flags": 0,
        "Value": if kv.value.is_empty() { Value::Null } else { Value::String(b64(&kv.value)) },
        "CreateIndex": kv.create_revision, "ModifyIndex": kv.mod_revision,
    });
    if let Some(session) = holder.and_then(|h| h.0.as_ref()) {
        e["Session"] = json!(session);
    }
    e
}

#[derive(Deserialize, Default)]
struct KvParams {
    recurse: Option<String>,
    keys: Option<String>,
    separator: Option<String>,
    raw: Option<String>,
    index: Option<i64>,
    wait: Option<String>,
    stale: Option<String>,
    cas: Option<i64>,
    acquire: Option<String>,
    release: Option<String>,
}

fn consul_headers(api: &Api, rev: i64, c: Consistency) -> axum::http::HeaderMap {
    crate::consul::consul_headers(api, rev, c)
}

/// `GET /v1/kv/` (the empty key: with `recurse` or `keys`, the whole keyspace).
async fn kv_get_all(state: State<Arc<Api>>, q: Query<KvParams>) -> ApiResult {
    kv_get(state, Path(String::new()), q).await
}

async fn kv_get(State(api): State<Arc<Api>>, Path(key): Path<String>, Query(q): Query<KvParams>) -> ApiResult {
    let whole_prefix = q.recurse.is_some() || q.keys.is_some();
    let lock_records = format!("{}{key}", crate::consul_lock::LOCK_PREFIX);
    crate::ops::block_if_asked_on(&api, &[&key, &lock_records], q.index, q.wait.as_deref()).await?;
    let c = consistency(&api, q.stale.is_some()).await?;
    let req = if whole_prefix {
        prefix_range(&key)
    } else {
        RangeRequest { key: key.clone().into_bytes(), ..Default::default() }
    };
    let (r, holders, rev) =
        api.member.read(|s| (s.range(&req), crate::consul_lock::holders(s, &req.key, &req.range_end), s.revision()));
    let kvs: Vec<KeyValue> =
        r?.kvs.into_iter().filter(|kv| !kv.key.starts_with(crate::CONSUL_HIDDEN_PREFIX.as_bytes())).collect();
    let headers = consul_headers(&api, rev, c);
    if kvs.is_empty() {
        return Ok((axum::http::StatusCode::NOT_FOUND, headers, "").into_response());
    }
    if q.keys.is_some() {
        let mut keys: Vec<String> = Vec::new();
        for kv in &kvs {
            let k = String::from_utf8_lossy(&kv.key).into_owned();
            let cut = q
                .separator
                .as_deref()
                .filter(|s| !s.is_empty())
                .and_then(|sep| k[key.len()..].find(sep).map(|i| k[..key.len() + i + sep.len()].to_string()));
            let k = cut.unwrap_or(k);
            if keys.last() != Some(&k) {
                keys.push(k);
            }
        }
        return Ok((headers, Json(keys)).into_response());
    }
    if q.raw.is_some() {
        return Ok((headers, kvs[0].value.clone()).into_response());
    }
    let out: Vec<Value> = kvs.iter().map(|kv| entry(kv, holders.get(&kv.key))).collect();
    Ok((headers, Json(out)).into_response())
}

fn cmp(key: &[u8], result: CompareResult, target: CompareTarget) -> Compare {
    Compare { result, target, key: key.to_vec(), range_end: vec![] }
}

fn put_op(key: &[u8], value: &[u8], lease: i64, keep_lease: bool) -> RequestOp {
    RequestOp::Put(PutRequest {
        key: key.to_vec(),
        value: value.to_vec(),
        lease,
        ignore_lease: keep_lease,
        ..Default::default()
    })
}

/// Whether a txn (or a txn nested in its failure branch) succeeded.
fn any_succeeded(resp: &CommandResponse) -> bool {
    fn txn(t: &quorate_kv::TxnResponse) -> bool {
        t.succeeded || t.responses.iter().any(|r| matches!(r, ResponseOp::Txn(inner) if txn(inner)))
    }
    matches!(resp, CommandResponse::Txn(t) if txn(t))
}

/// Every Consul KV write, checked as it would be proposed (after path decoding and the key
/// mapping): none may touch quorate's own keys, the registry's records among them (issue 11).
async fn kv_write(api: &Api, cmd: Command) -> Result<(CommandResponse, i64), ApiError> {
    refuse_quorate_keys(&cmd)?;
    write(api, cmd).await
}

/// `kv_write`'s check alone, for the lock operations that add quorate's own lock records to
/// the user's writes (`consul_lock`).
fn refuse_quorate_keys(cmd: &Command) -> Result<(), ApiError> {
    if let Some(refused) = quorate_registry::first_write_under(cmd, crate::CONSUL_HIDDEN_PREFIX.as_bytes()) {
        let key = String::from_utf8_lossy(&refused.key);
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "permission_denied",
            format!(
                "Permission denied: {key:?} touches keys under {}, which are quorate's own and read-only over the \
                 KV API; register, deregister and update instances through /v1/agent/service/register, \
                 /v1/agent/service/deregister/<id> or the registry API /api/v1/ns/<namespace>/services/...",
                crate::CONSUL_HIDDEN_PREFIX
            ),
        ));
    }
    Ok(())
}

/// `DELETE /v1/kv/` (the empty key: with `recurse`, the whole keyspace).
async fn kv_delete_all(state: State<Arc<Api>>, q: Query<KvParams>) -> ApiResult {
    kv_delete(state, Path(String::new()), q).await
}

async fn kv_put(
    State(api): State<Arc<Api>>,
    Path(key): Path<String>,
    Query(q): Query<KvParams>,
    body: Bytes,
) -> ApiResult {
    let k = key.as_bytes();
    if let Some(session) = q.acquire.as_deref().or(q.release.as_deref()) {
        return lock_put(&api, k, &body, session, q.acquire.is_some()).await;
    }
    let txn = if let Some(cas) = q.cas {
        cas_txn(cas, k, &body)
    } else {
        // A plain write keeps whatever session holds the key.
        let exists = cmp(k, CompareResult::Greater, CompareTarget::Create(0));
        TxnRequest {
            compare: vec![exists],
            success: vec![put_op(k, &body, 0, true)],
            failure: vec![put_op(k, &body, 0, false)],
        }
    };
    let conditional = q.cas.is_some();
    let (resp, rev) = kv_write(&api, Command::Txn(txn)).await?;
    let applied = !conditional || any_succeeded(&resp);
    Ok((consul_headers(&api, rev, Consistency::Linearizable), Json(applied)).into_response())
}

/// `?acquire=<session>` (`acquire`) or `?release=<session>`: `true` when it took effect.
async fn lock_put(api: &Api, key: &[u8], value: &[u8], session: &str, acquire: bool) -> ApiResult {
    let lease = lease_of(session)?;
    refuse_quorate_keys(&Command::Put(PutRequest { key: key.to_vec(), ..Default::default() }))?;
    api.member.linearize().await?;
    let (applied, rev) = if acquire {
        let invalid = || ApiError::bad_request("bad_session", format!("invalid session {session:?}"));
        let (record, _) = session_record(api, session).ok_or_else(invalid)?;
        let holder = crate::consul_lock::Holder {
            id: session,
            lease,
            delete: record["Behavior"] == "delete",
            lock_delay: Duration::from_nanos(record["LockDelay"].as_u64().unwrap_or(0)),
        };
        crate::consul_lock::acquire(api, key, value, &holder).await?
    } else {
        let (resp, rev) = write(api, Command::Txn(crate::consul_lock::release_txn(key, value, lease))).await?;
        (any_succeeded(&resp), rev)
    };
    Ok((consul_headers(api, rev, Consistency::Linearizable), Json(applied)).into_response())
}

/// `cas=0` creates only; `cas=N` replaces only the version with ModifyIndex N.
fn cas_txn(cas: i64, key: &[u8], value: &[u8]) -> TxnRequest {
    if cas == 0 {
        TxnRequest {
            compare: vec![cmp(key, CompareResult::Equal, CompareTarget::Create(0))],
            success: vec![put_op(key, value, 0, false)],
            failure: vec![],
        }
    } else {
        TxnRequest {
            compare: vec![cmp(key, CompareResult::Equal, CompareTarget::Mod(cas))],
            success: vec![put_op(key, value, 0, true)],
            failure: vec![],
        }
    }
}

async fn kv_delete(State(api): State<Arc<Api>>, Path(key): Path<String>, Query(q): Query<KvParams>) -> ApiResult {
    let range = if q.recurse.is_some() {
        prefix_range(&key)
    } else {
        RangeRequest { key: key.clone().into_bytes(), ..Default::default() }
    };
    let delete = RequestOp::DeleteRange(DeleteRangeRequest {
        key: range.key.clone(),
        range_end: range.range_end.clone(),
        prev_kv: false,
    });
    let compare = match q.cas {
        Some(cas) => vec![cmp(key.as_bytes(), CompareResult::Equal, CompareTarget::Mod(cas))],
        None => vec![],
    };
    let user_delete = Command::Txn(TxnRequest { compare, success: vec![delete], failure: vec![] });
    refuse_quorate_keys(&user_delete)?;
    // A deleted key is no longer held: its lock record goes with it, as in Consul.
    let Command::Txn(mut txn) = user_delete else { unreachable!() };
    txn.success.push(crate::consul_lock::lock_records_of(&range.key, &range.range_end));
    let (resp, rev) = write(&api, Command::Txn(txn)).await?;
    Ok((consul_headers(&api, rev, Consistency::Linearizable), Json(any_succeeded(&resp))).into_response())
}

#[derive(Deserialize, Default)]
struct SessionBody {
    name: Option<String>,
    ttl: Option<String>,
    behavior: Option<String>,
    lockdelay: Option<Value>,
}

/// A session's TTL as Consul checks it: a Go duration within [10s, 24h].
fn session_ttl(ttl: &str) -> Result<Duration, ApiError> {
    let d = crate::consul::body_duration("Session TTL", ttl)?;
    if !(SESSION_TTL_MIN..=SESSION_TTL_MAX).contains(&d) {
        return Err(ApiError::bad_request(
            "bad_ttl",
            format!("Invalid Session TTL '{ttl}', must be between [10s=24h0m0s]"),
        ));
    }
    Ok(d)
}

/// The lease behind a session with TTL `ttl`: `SESSION_TTL_MULTIPLIER` x the TTL, in whole
/// seconds rounded up (never shorter than Consul's invalidation).
fn session_lease_ttl_s(ttl: Duration) -> i64 {
    crate::duration::ceil_secs(ttl * SESSION_TTL_MULTIPLIER) as i64
}

/// `LockDelay` as Consul reads it: a Go duration string, or a number (seconds below 1000,
/// else nanoseconds); default 15 s, at most 60 s.
fn lock_delay(v: Option<&Value>) -> Result<Duration, ApiError> {
    let bad = |msg: String| ApiError::bad_request("bad_lock_delay", msg);
    let d = match v {
        None | Some(Value::Null) => return Ok(LOCK_DELAY_DEFAULT),
        Some(Value::String(s)) => crate::consul::body_duration("LockDelay", s)?,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(x) if x < LOCK_DELAY_SECONDS_BELOW => Duration::from_secs(x),
            Some(x) => Duration::from_nanos(x),
            None => return Err(bad(format!("invalid LockDelay {n}"))),
        },
        Some(other) => return Err(bad(format!("invalid LockDelay {other}"))),
    };
    if d > LOCK_DELAY_MAX {
        return Err(bad(format!("Invalid LockDelay {d:?}: must be at most 60s")));
    }
    Ok(d)
}

async fn session_create(State(api): State<Arc<Api>>, body: Bytes) -> ApiResult {
    let req: SessionBody = if body.iter().all(u8::is_ascii_whitespace) {
        SessionBody::default()
    } else {
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request("malformed_json", format!("Request decode failed: {e}")))?;
        serde_json::from_value(crate::consul::lower_keys(v))
            .map_err(|e| ApiError::bad_request("malformed_json", format!("Request decode failed: {e}")))?
    };
    // A session without a TTL is never invalidated by time: the longest lease there is.
    let lease_ttl_s = match req.ttl.as_deref().filter(|t| !t.is_empty()) {
        Some(t) => session_lease_ttl_s(session_ttl(t)?),
        None => quorate_kv::LEASE_MAX_TTL_S,
    };
    let lock_delay = lock_delay(req.lockdelay.as_ref())?;
    let behavior = req.behavior.unwrap_or_else(|| "release".into());
    if !matches!(behavior.as_str(), "release" | "delete") {
        return Err(ApiError::bad_request("bad_behavior", format!("Invalid Behavior setting {behavior:?}")));
    }
    let lease = match write(&api, Command::LeaseGrant { id: 0, ttl_s: lease_ttl_s }).await? {
        (CommandResponse::LeaseGrant { id, .. }, _) => id,
        (other, _) => return Err(ApiError::bad_request("internal", format!("{other:?}"))),
    };
    let id = session_id(lease);
    let record = json!({"ID": id, "Name": req.name.unwrap_or_default(), "TTL": req.ttl.unwrap_or_default(), "User": crate::access::caller(),
                        "Behavior": behavior, "LockDelay": lock_delay.as_nanos() as u64, "Node": "quorate", "NodeChecks": [], "ServiceChecks": []});
    let put = PutRequest {
        key: format!("{SESSION_PREFIX}{id}").into_bytes(),
        value: serde_json::to_vec(&record).expect("json"),
        lease,
        ..Default::default()
    };
    let (_, rev) = write(&api, Command::Put(put)).await?;
    Ok((consul_headers(&api, rev, Consistency::Linearizable), Json(json!({"ID": id}))).into_response())
}

/// The lease session `id`'s record is bound to: the session's own, whatever the id claims.
fn session_lease(api: &Api, id: &str) -> Option<i64> {
    api.member.read(|s| {
        let r =
            s.range(&RangeRequest { key: format!("{SESSION_PREFIX}{id}").into_bytes(), ..Default::default() }).ok()?;
        r.kvs.first().map(|kv| kv.lease).filter(|l| *l != 0)
    })
}

fn session_record(api: &Api, id: &str) -> Option<(Value, i64)> {
    api.member.read(|s| {
        let r =
            s.range(&RangeRequest { key: format!("{SESSION_PREFIX}{id}").into_bytes(), ..Default::default() }).ok()?;
        let kv = r.kvs.first()?;
        let mut v: Value = serde_json::from_slice(&kv.value).ok()?;
        v["CreateIndex"] = json!(kv.create_revision);
        v["ModifyIndex"] = json!(kv.mod_revision);
        Some((v, kv.mod_revision))
    })
}

/// With auth on, only a session's creator (or root) may renew or destroy it: its id names a
/// lease, and a lease is not anyone's to keep alive or revoke.
fn permit_session(api: &Api, record: &Value) -> Result<(), ApiError> {
    let caller = crate::access::caller();
    api.member
        .read(|s| {
            let auth = s.auth();
            if !auth.enabled() {
                return Ok(());
            }
            // A session made while auth was off has no owner: any user may keep it alive (a
            // leader's lock must survive `auth enable`).
            match record["User"].as_str() {
                None => auth.check_user(caller.as_deref()),
                Some(owner) if caller.as_deref() == Some(owner) => auth.check_user(caller.as_deref()),
                Some(_) => auth.check_admin(caller.as_deref()),
            }
        })
        .map_err(crate::access::refusal)
}

async fn session_renew(State(api): State<Arc<Api>>, Path(id): Path<String>) -> ApiResult {
    lease_of(&id)?;
    api.member.linearize().await?;
    let missing = || ApiError::not_found("unknown_session", format!("Session id '{id}' not found"));
    // Only a session's own lease (its record's): an id that names another lease is no session.
    let (record, _) = session_record(&api, &id).ok_or_else(missing)?;
    permit_session(&api, &record)?;
    let lease = session_lease(&api, &id).ok_or_else(missing)?;
    if api.member.lease_keepalive(lease).await?.is_none() {
        return Err(missing());
    }
    let (record, rev) = session_record(&api, &id).ok_or_else(missing)?;
    Ok((consul_headers(&api, rev, Consistency::Linearizable), Json(vec![record])).into_response())
}

async fn session_destroy(State(api): State<Arc<Api>>, Path(id): Path<String>) -> ApiResult {
    lease_of(&id)?;
    api.member.linearize().await?;
    // Only a session's own lease is revoked: an id that names another lease (an instance's, a
    // lock's) is no session, and is gone already as far as Consul is concerned.
    let Some((record, rev)) = session_record(&api, &id) else {
        return Ok((consul_headers(&api, api.member.read(|s| s.revision()), Consistency::Linearizable), Json(true))
            .into_response());
    };
    permit_session(&api, &record)?;
    let Some(lease) = session_lease(&api, &id) else {
        return Ok((consul_headers(&api, rev, Consistency::Linearizable), Json(true)).into_response());
    };
    let resp = api.member.write(Command::LeaseRevoke { id: lease }).await?;
    let rev = resp.revision.max(rev);
    // Destroying a session that is already gone succeeds, as in Consul.
    Ok((consul_headers(&api, rev, Consistency::Linearizable), Json(true)).into_response())
}

async fn session_info(State(api): State<Arc<Api>>, Path(id): Path<String>, Query(q): Query<KvParams>) -> ApiResult {
    lease_of(&id)?;
    let record = format!("{SESSION_PREFIX}{id}");
    crate::ops::block_if_asked(&api, &record, q.index, q.wait.as_deref()).await?;
    let c = consistency(&api, q.stale.is_some()).await?;
    let rev = api.member.read(|s| s.revision());
    let found: Vec<Value> = session_record(&api, &id).map(|(v, _)| v).into_iter().collect();
    Ok((consul_headers(&api, rev, c), Json(found)).into_response())
}

async fn session_list(State(api): State<Arc<Api>>, Query(q): Query<KvParams>) -> ApiResult {
    crate::ops::block_if_asked(&api, SESSION_PREFIX, q.index, q.wait.as_deref()).await?;
    let c = consistency(&api, q.stale.is_some()).await?;
    let (r, rev) = api.member.read(|s| (s.range(&prefix_range(SESSION_PREFIX)), s.revision()));
    let list: Vec<Value> = r?.kvs.iter().filter_map(|kv| serde_json::from_slice(&kv.value).ok()).collect();
    Ok((consul_headers(&api, rev, c), Json(list)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_lease_lives_twice_the_asked_ttl() {
        assert_eq!(session_lease_ttl_s(session_ttl("10s").unwrap()), 20);
        assert_eq!(session_lease_ttl_s(session_ttl("15s").unwrap()), 30);
        assert_eq!(session_lease_ttl_s(session_ttl("10.4s").unwrap()), 21);
        assert_eq!(session_lease_ttl_s(session_ttl("1m30s").unwrap()), 180);
        assert_eq!(session_lease_ttl_s(session_ttl("24h").unwrap()), 172_800);
        assert!(session_lease_ttl_s(session_ttl("24h").unwrap()) <= quorate_kv::LEASE_MAX_TTL_S);
    }

    #[test]
    fn session_ttls_outside_consuls_bounds_or_not_durations_are_refused() {
        for (ttl, code) in [
            ("9s", "bad_ttl"),
            ("9.999s", "bad_ttl"),
            ("24h0m1s", "bad_ttl"),
            ("-10s", "bad_duration"),
            ("10", "bad_duration"),
            ("99999999999999999999h", "bad_duration"),
            ("ten seconds", "bad_duration"),
        ] {
            let e = session_ttl(ttl).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{ttl}");
            assert_eq!(e.code, code, "{ttl}");
        }
        assert_eq!(session_ttl("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(session_ttl("86400s").unwrap(), Duration::from_secs(86_400));
    }

    #[test]
    fn lock_delays_as_consul_reads_them() {
        assert_eq!(lock_delay(None).unwrap(), Duration::from_secs(15));
        assert_eq!(lock_delay(Some(&json!("1ms"))).unwrap(), Duration::from_millis(1));
        assert_eq!(lock_delay(Some(&json!("0s"))).unwrap(), Duration::ZERO);
        assert_eq!(lock_delay(Some(&json!(10))).unwrap(), Duration::from_secs(10));
        assert_eq!(lock_delay(Some(&json!(15_000_000_000u64))).unwrap(), Duration::from_secs(15));
        assert!(lock_delay(Some(&json!("61s"))).is_err());
        assert!(lock_delay(Some(&json!("1d"))).is_err());
        assert!(lock_delay(Some(&json!(-1))).is_err());
        assert!(lock_delay(Some(&json!(true))).is_err());
    }

    #[test]
    fn base64_and_session_ids() {
        assert_eq!(b64(b""), "");
        assert_eq!(b64(b"f"), "Zg==");
        assert_eq!(b64(b"fo"), "Zm8=");
        assert_eq!(b64(b"foo"), "Zm9v");
        assert_eq!(b64(b"hello world"), "aGVsbG8gd29ybGQ=");
        for lease in [1i64, 0x7fff_ffff_ffff_ffff, 0x1234_5678_9abc_def0] {
            assert_eq!(lease_of(&session_id(lease)).unwrap(), lease);
        }
        assert!(lease_of("zz").is_err());
    }
}
