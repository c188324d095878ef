//! Registry operations over the replicated state, shared by every HTTP dialect.

use std::time::Duration;

use quorate_consensus::Applied;
use quorate_kv::{Command, CommandResponse, KeyValue, PutRequest, RangeRequest};
use quorate_registry::{Instance, Kind};

use crate::{Api, ApiError, Consistency};

/// Longest a blocking query may wait (Consul caps `wait` at 10 minutes too).
const BLOCKING_WAIT_MAX: Duration = Duration::from_secs(600);
const BLOCKING_WAIT_DEFAULT: Duration = Duration::from_secs(300);
/// Consul's `JitterFraction`: a wait gets up to 1/16 more, at random.
const BLOCKING_WAIT_JITTER_FRACTION: u32 = 16;

/// Propose a client's write, as the request's caller: checked again where it is applied.
pub async fn write(api: &Api, cmd: Command) -> Result<(CommandResponse, i64), ApiError> {
    // Wrapped with auth off too: a member that lags behind `auth enable` must not let a write
    // through unchecked.
    write_as_member(api, cmd.authorized(crate::access::caller())).await
}

/// Propose a write as the member itself (records a client does not name: Consul's sessions and
/// lock records); the route's check at the door is all the caller gets.
pub async fn write_as_member(api: &Api, cmd: Command) -> Result<(CommandResponse, i64), ApiError> {
    let resp = api.member.write(cmd).await?;
    let revision = resp.revision;
    Ok((resp.kv_result()?, revision))
}

pub fn decode(kv: &KeyValue) -> Option<Instance> {
    serde_json::from_slice(&kv.value).ok()
}

/// The stored record of one instance, read locally.
pub fn read_instance(api: &Api, key: &str) -> Option<(Instance, i64)> {
    api.member.read(|s| {
        let r = s.range(&RangeRequest { key: key.as_bytes().to_vec(), ..Default::default() }).ok()?;
        let kv = r.kvs.first()?;
        decode(kv).map(|i| (i, kv.mod_revision))
    })
}

pub async fn consistency(api: &Api, stale: bool) -> Result<Consistency, ApiError> {
    if stale {
        return Ok(Consistency::Stale);
    }
    api.member.linearize().await?;
    Ok(Consistency::Linearizable)
}

pub fn prefix_range(prefix: &str) -> RangeRequest {
    let key = prefix.as_bytes().to_vec();
    RangeRequest { range_end: quorate_kv::prefix_end(&key), key, ..Default::default() }
}

/// `?wait=`: any Go duration (`9.98s`, `1m30s`, `1500ms`, as Consul reads it, see
/// `crate::duration`), or plain seconds (`7`, which quorate's native API has always taken).
/// As in Consul, a zero or negative wait means the default, a wait over 10 minutes is
/// capped at 10 minutes, and up to 1/16 of it is added at random so that clients woken
/// together do not come back together.
fn parse_wait(s: &str) -> Result<Duration, crate::duration::DurationError> {
    let asked = match s.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs.min(BLOCKING_WAIT_MAX.as_secs())),
        Err(_) => {
            let ns = crate::duration::parse_go_duration(s)?;
            Duration::from_nanos(u64::try_from(ns).unwrap_or(0))
        }
    };
    let wait = if asked.is_zero() { BLOCKING_WAIT_DEFAULT } else { asked.min(BLOCKING_WAIT_MAX) };
    Ok(wait + jitter(wait / BLOCKING_WAIT_JITTER_FRACTION))
}

/// A random duration below `max` (zero for zero).
fn jitter(max: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    Duration::from_nanos(random % nanos)
}

/// A blocking query (`?index=N&wait=30s`, native and Consul alike): when `index` is given,
/// return once something under `prefix` changed after it, or once `wait` (default 5 min) passed.
pub async fn block_if_asked(api: &Api, prefix: &str, index: Option<i64>, wait: Option<&str>) -> Result<(), ApiError> {
    block_if_asked_on(api, &[prefix], index, wait).await
}

/// `block_if_asked`, waking on a change under any of `prefixes` (a Consul key and its lock
/// record: a lock released by its session's end changes only the record).
pub async fn block_if_asked_on(
    api: &Api,
    prefixes: &[&str],
    index: Option<i64>,
    wait: Option<&str>,
) -> Result<(), ApiError> {
    let Some(index) = index else { return Ok(()) };
    // An empty `wait=` is no wait at all, as in Consul.
    let wait = match wait.filter(|w| !w.is_empty()) {
        Some(w) => {
            parse_wait(w).map_err(|e| ApiError::bad_request("bad_wait", format!("Invalid wait time {w:?}: {e}")))?
        }
        None => BLOCKING_WAIT_DEFAULT,
    };
    wait_for_change(api, prefixes, index, wait).await
}

/// Block until something under one of `prefixes` changes after revision `index`, or `wait`
/// passes.
async fn wait_for_change(api: &Api, prefixes: &[&str], index: i64, wait: Duration) -> Result<(), ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    let ranges: Vec<(Vec<u8>, Vec<u8>)> =
        prefixes.iter().map(|p| (p.as_bytes().to_vec(), quorate_kv::prefix_end(p.as_bytes()))).collect();
    let mut events = api.member.subscribe();
    api.member.linearize().await?;
    // History answers for changes already applied; a compacted index counts as changed.
    let changed = api.member.read(|s| {
        ranges.iter().any(|(key, end)| s.events_since(key, end, index + 1).map(|e| !e.is_empty()).unwrap_or(true))
    });
    if changed {
        return Ok(());
    }
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => return Ok(()),
            Ok(Ok(Applied::Events { revision, events })) => {
                if revision > index && events.iter().any(|e| ranges.iter().any(|(key, _)| e.kv.key.starts_with(key))) {
                    return Ok(());
                }
            }
            // Resynchronised or lagging: answer now rather than risk missing the change.
            Ok(Ok(Applied::Reset { .. })) | Ok(Err(_)) => return Ok(()),
        }
    }
}

/// Store `instance` (validated) under its key. An ephemeral instance keeps its live lease when
/// it registers again with the same TTL, or gets a fresh one (a new TTL takes effect at once;
/// the old lease is revoked once the record no longer names it). Returns the stored record and
/// the revision.
pub async fn store_instance(api: &Api, instance: Instance) -> Result<(Instance, i64), ApiError> {
    store_fenced(api, instance, None).await
}

/// `store_instance`, guarded by `fence` (the write applies only while the fence holds).
pub async fn store_fenced(
    api: &Api,
    mut instance: Instance,
    fence: Option<quorate_kv::Fence>,
) -> Result<(Instance, i64), ApiError> {
    let key = quorate_registry::instance_key(&instance.namespace, &instance.service, &instance.id);
    instance.registered_by = crate::access::caller();
    api.member.linearize().await?;
    let mut replaced_lease = None;
    if instance.kind == Kind::Ephemeral {
        let old_lease = read_instance(api, &key)
            .map(|(old, _)| old.lease)
            .filter(|l| *l != 0)
            .and_then(|l| api.member.read(|s| s.lease(l).map(|lease| (l, lease.ttl_s))));
        let live = old_lease.filter(|(_, ttl_s)| *ttl_s == instance.ttl_s as i64).map(|(l, _)| l);
        replaced_lease = old_lease.filter(|_| live.is_none()).map(|(l, _)| l);
        instance.lease = match live {
            Some(l) => l,
            None => match write(api, Command::LeaseGrant { id: 0, ttl_s: instance.ttl_s as i64 }).await? {
                (CommandResponse::LeaseGrant { id, .. }, _) => id,
                (other, _) => {
                    return Err(ApiError::new(
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        format!("lease grant answered {other:?}"),
                    ))
                }
            },
        };
    }
    let value = serde_json::to_vec(&instance).expect("instances serialize");
    let put = Command::Put(PutRequest { key: key.into_bytes(), value, ..Default::default() });
    let (_, revision) = write(api, put.fenced(fence)).await?;
    if let Some(old) = replaced_lease {
        // Nothing names it any more; if this fails it simply expires.
        let _ = api.member.write(Command::LeaseRevoke { id: old }).await;
    }
    Ok((instance, revision))
}

/// A `fence` given as `<key>@<revision>`.
pub fn parse_fence(s: Option<&str>) -> Result<Option<quorate_kv::Fence>, ApiError> {
    match s {
        None => Ok(None),
        Some(s) => quorate_kv::Fence::parse(s)
            .map(Some)
            .ok_or_else(|| ApiError::bad_request("bad_fence", format!("fence {s:?} is not <key>@<revision>"))),
    }
}

/// The instance with id `id` anywhere in namespace `ns` (Consul and Eureka name instances by id
/// alone; the first match), found from the keys so only that one record is decoded.
pub fn instance_by_id(api: &Api, ns: &str, id: &str) -> Result<Option<(Instance, i64)>, ApiError> {
    let req = RangeRequest { keys_only: true, ..prefix_range(&quorate_registry::namespace_prefix(ns)) };
    let keys = api.member.read(|s| s.range(&req))?.kvs;
    let key = keys
        .into_iter()
        .find(|kv| quorate_registry::parse_instance_key(&kv.key).is_some_and(|(_, _, i)| i == id))
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned());
    Ok(key.and_then(|k| read_instance(api, &k)))
}

/// Every instance under a key prefix, with its mod revision, and the revision read at.
pub fn instances_under(api: &Api, prefix: &str) -> Result<(Vec<(Instance, i64)>, i64), ApiError> {
    let (r, rev) = api.member.read(|s| (s.range(&prefix_range(prefix)), s.revision()));
    Ok((r?.kvs.iter().filter_map(|kv| decode(kv).map(|i| (i, kv.mod_revision))).collect(), rev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_durations() {
        // Jitter adds up to 1/16: each wait is checked against [asked, asked * 17/16].
        let within = |s: &str, want: Duration| {
            let got = parse_wait(s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
            assert!(got >= want && got <= want + want / 16, "{s:?}: {got:?} not within 1/16 above {want:?}");
        };
        within("30s", Duration::from_secs(30));
        within("5m", Duration::from_secs(300));
        within("1500ms", Duration::from_millis(1500));
        within("9.98s", Duration::from_millis(9980));
        within("1m2.5s", Duration::from_millis(62_500));
        within("250us", Duration::from_micros(250));
        within("7", Duration::from_secs(7));
        within("2h", BLOCKING_WAIT_MAX);
        within("20m", BLOCKING_WAIT_MAX);
        within("99999999999", BLOCKING_WAIT_MAX);
        within("0", BLOCKING_WAIT_DEFAULT);
        within("-5s", BLOCKING_WAIT_DEFAULT);
        for bad in ["", "abc", "5x", "1d", "99999999999999999999h", "5 s"] {
            assert!(parse_wait(bad).is_err(), "{bad:?}");
        }
    }
}
